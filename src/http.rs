//! The HTTP API: device administration, streams, rejects, queries, metrics.
//!
//! Every `/v1` route takes a bearer token (the same tokens as MQTT), checked
//! by the same authenticator the gatekeeper uses.

pub mod events;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use fleetgate_admin::audit::Outcome;
use fleetgate_admin::registry::RegistryError;
use fleetgate_admin::{unix_now, AuditLog, Bans, Platform, RefusalLedger, Registry};
use fleetgate_api::{QueryFailure, QueryService};
use fleetgate_protocol::schema::StreamsFile;
use fleetgate_protocol::sdk::from_hex;
use fleetgate_protocol::{AuthError, Authenticate, Principal, Role};
use fleetgate_store::query;
use fleetgate_store::tiers::Tiers;
use fleetgate_store::views::{Views, ViewsFile};
use fleetgate_store::{rejects, Catalog, Db};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub catalog: Catalog,
    pub registry: Registry,
    pub platform: Arc<Platform>,
    pub auth: Arc<dyn Authenticate>,
    pub ledger: Arc<RefusalLedger>,
    pub bans: Bans,
    pub audit: AuditLog,
    pub metrics: Arc<prometheus_client::registry::Registry>,
    pub sdk: crate::sdk_api::SdkSettings,
    /// Set in cluster mode (`fleetgate broker`).
    pub balancer: Option<fleetgate_broker::balancer::Balancer>,
    /// The state rollout coordinator.
    pub rollout: Arc<fleetgate_admin::rollout::Rollout>,
    /// The store's state in `up` (one process).
    pub local_state: Option<Arc<fleetgate_store::state::StateStore>>,
    pub views: Arc<Views>,
    pub tiers: Arc<Tiers>,
    pub compaction: Arc<fleetgate_store::compaction::Compaction>,
    pub buckets: Arc<fleetgate_store::buckets::Buckets>,
    /// Batch jobs, their runs and tables.
    pub etl: Arc<fleetgate_etl::Etl>,
    pub reports: Arc<fleetgate_etl::reports::Reports>,
    pub analyses: Arc<fleetgate_etl::analysis::Analyses>,
    /// Where HTTP ingest goes: the local store, or the balancer.
    pub ingest: Arc<dyn fleetgate_protocol::ingest::IngestService>,
    /// The per-address limit on routes that take no token (`None`: off).
    pub unauth_limit: Option<Arc<crate::rate_limit::RateLimit>>,
    /// The query path `/v1/query` shares with the PostgreSQL wire endpoint.
    pub queries: QueryService,
    /// What `/v1/events` pushes to the dashboard.
    pub events: Arc<events::Events>,
}

pub fn router(state: AppState) -> Router {
    // The routes anyone may call, without a token: rate limited per address.
    let mut public = Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/handshake/nonce", get(crate::sdk_api::nonce))
        .route("/v1/handshake", post(crate::sdk_api::handshake));
    if let Some(limit) = &state.unauth_limit {
        public = public.route_layer(middleware::from_fn_with_state(
            limit.clone(),
            crate::rate_limit::limit,
        ));
    }
    Router::new()
        .merge(public)
        .route("/v1/devices", get(list_devices).post(add_device))
        .route(
            "/v1/devices/import",
            post(crate::import_api::import)
                .layer(DefaultBodyLimit::max(crate::import_api::MAX_BODY_BYTES)),
        )
        .route("/v1/devices/{id}/token", post(mint_token))
        .route("/v1/devices/{id}/revoke", post(revoke_device))
        .route("/v1/devices/{id}/role", post(change_role))
        .route("/v1/devices/{id}/key", post(set_key))
        .route("/v1/refusals", get(refusals))
        .route("/v1/bans", get(list_bans))
        .route("/v1/bans/{id}", delete(lift_ban))
        .route("/v1/audit", get(list_audit))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/state", get(crate::state::show))
        .route("/v1/state/{kind}/{name}", post(crate::state::push))
        .route("/v1/streams", get(list_streams).post(apply_streams))
        .route("/v1/streams/{name}/rejects", get(list_rejects))
        .route("/v1/query", post(run_query))
        .route("/v1/query/explain", post(explain_query))
        .route("/v1/views", get(list_views).post(create_views))
        .route("/v1/views/{name}", delete(drop_view))
        .route("/v1/views/shapes", get(list_shapes))
        .route("/v1/streams/{name}/tiers", get(stream_tiers))
        .route("/v1/streams/{name}/fields", get(stream_fields))
        .route("/v1/streams/{name}/buckets", get(stream_buckets))
        .route("/v1/streams/{name}/buckets/swap", post(swap_buckets))
        .route("/v1/ingest/{stream}", post(crate::ingest_api::ingest))
        .route(
            "/v1/etl/jobs",
            get(crate::etl_api::list).post(crate::etl_api::apply),
        )
        .route("/v1/etl/jobs/{name}", delete(crate::etl_api::delete))
        .route("/v1/etl/jobs/{name}/run", post(crate::etl_api::run))
        .route("/v1/etl/runs", get(crate::etl_api::runs))
        .route("/v1/etl/runs/{id}", get(crate::etl_api::get_run))
        .route("/v1/etl/runs/{id}/rejects", get(crate::etl_api::rejects))
        .route(
            "/v1/reports",
            get(crate::reports_api::list).post(crate::reports_api::apply),
        )
        .route("/v1/reports/{name}", get(crate::reports_api::series))
        .route(
            "/v1/reports/{name}/reconcile",
            post(crate::reports_api::reconcile),
        )
        .route(
            "/v1/reconciliations",
            get(crate::reports_api::reconciliations),
        )
        .route(
            "/v1/analyses",
            get(crate::analysis_api::list).post(crate::analysis_api::apply),
        )
        .route("/v1/alerts", get(crate::analysis_api::alerts))
        .route("/v1/events", get(events::stream))
        .route("/v1/sdk/build", post(crate::sdk_api::offline_build))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            audit_outcomes,
        ))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn(json_ends_with_newline))
        .with_state(state)
}

/// A JSON answer ends with a newline, as a line of text does, so `curl`
/// in a terminal or a script prints it as a whole line (not glued to the
/// prompt, or to what another process prints next).
async fn json_ends_with_newline(request: Request, next: Next) -> Response {
    use futures::StreamExt;
    let response = next.run(request).await;
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(length) = length {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, (length + 1).into());
    }
    let newline = futures::stream::once(async { Ok(bytes::Bytes::from_static(b"\n")) });
    let body = axum::body::Body::from_stream(body.into_data_stream().chain(newline));
    Response::from_parts(parts, body)
}

/// Gives the refusals axum makes itself (a body that is not the JSON a
/// route takes, a bad path or query parameter, a body over the limit) the
/// API's error body, `{"error": "..."}`, with axum's message, which says
/// what was wrong: e.g. `role: unknown role "root": expected ingest,
/// extract or admin`. Their status stays axum's (400, 413, 415, 422).
async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let plain_text = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    if !(status.is_client_error() || status.is_server_error())
        || !plain_text
        || response.extensions().get::<ErrorMessage>().is_some()
    {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_string(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() {
        parts
            .status
            .canonical_reason()
            .unwrap_or("refused")
            .to_string()
    } else {
        text
    };
    let mut json = ApiError(parts.status, message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            json.headers_mut().insert(name.clone(), value.clone());
        }
    }
    json
}

/// The dashboard: one self-contained page (no CDN, no external fetch;
/// the policy forbids any) that signs in by token and reads the API.
async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
        ],
        include_str!("dashboard.html"),
    )
}

/// An error as the API reports it: a status and `{"error": "..."}`.
pub struct ApiError(pub StatusCode, pub String);

/// The message of an [`ApiError`], kept on its response for the audit
/// log's outcome (the body is already serialized by then).
#[derive(Clone)]
struct ErrorMessage(String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.with_details(json!({}))
    }
}

impl ApiError {
    /// The error's response with more fields (an object) beside `error`.
    pub fn with_details(self, details: Value) -> Response {
        let mut body = json!({ "error": self.1 });
        if let Value::Object(fields) = details {
            body.as_object_mut().expect("an object").extend(fields);
        }
        let mut response = (self.0, Json(body)).into_response();
        response.extensions_mut().insert(ErrorMessage(self.1));
        response
    }
}

pub fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

/// A failure of the server's own (a database error): 500.
pub fn internal_error(message: String) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, message)
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match e {
            RegistryError::Invalid(_) => StatusCode::BAD_REQUEST,
            RegistryError::Exists(_) | RegistryError::Conflict(_) => StatusCode::CONFLICT,
            RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistryError::Database(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

/// The authenticated caller of a `/v1` route.
pub struct Caller(Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Caller::authenticate(state, bearer_token(&parts.headers)?)
    }
}

/// The token of a request's `Authorization: Bearer <token>` header.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            ApiError(
                StatusCode::UNAUTHORIZED,
                "missing Authorization: Bearer <token>".into(),
            )
        })
}

impl Caller {
    /// The caller a token names, or the refusal every route answers: 401,
    /// or 403 for a banned device.
    pub fn authenticate(state: &AppState, token: &str) -> Result<Caller, ApiError> {
        state
            .auth
            .authenticate(None, token)
            .map(Caller)
            .map_err(|e| match e {
                AuthError::Banned { .. } => ApiError(StatusCode::FORBIDDEN, e.to_string()),
                _ => ApiError(StatusCode::UNAUTHORIZED, e.to_string()),
            })
    }

    pub fn require(&self, role: Role, state: &AppState) -> Result<&Principal, ApiError> {
        fleetgate_api::require(&*state.auth, &self.0, role, "http").map_err(query_failure)
    }
}

impl AppState {
    /// Writes an admin action to the audit log, as pending, before it takes
    /// effect: an action whose entry cannot be written is not performed, so
    /// none goes unrecorded. [`audit_outcomes`] finishes the entry with the
    /// request's outcome once the handler has answered, so handlers need
    /// not (and cannot forget to).
    pub async fn audit(
        &self,
        admin: &Principal,
        action: &str,
        target: &str,
        detail: Value,
    ) -> Result<(), ApiError> {
        let id = self
            .audit
            .begin(&admin.device_id, action, target, detail)
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        let tracked = AUDITED.try_with(|entries| entries.lock().expect("audit lock").push(id));
        if tracked.is_err() {
            // Only a request through `router` has the scope; an entry made
            // elsewhere stays pending, which the log reads as "unknown".
            tracing::error!(
                id,
                action,
                "audit entry written outside a request; its outcome will not be recorded"
            );
        }
        Ok(())
    }
}

tokio::task_local! {
    /// The audit entries the current request has written.
    static AUDITED: Arc<std::sync::Mutex<Vec<i64>>>;
}

/// Finishes the audit entries a request wrote with its outcome: a 2xx or
/// 3xx is `done`, a 4xx `refused` and a 5xx `failed`, with the error's
/// message as the reason. Every audited handler answers only once its
/// action has run, so the status is the action's outcome (for `etl.run`,
/// a 202: the run was started).
async fn audit_outcomes(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let entries = Arc::new(std::sync::Mutex::new(Vec::new()));
    // If the request is dropped mid-action (its client went away), the
    // guard marks its entries interrupted rather than leaving them pending.
    let mut guard = InterruptedGuard {
        audit: state.audit.clone(),
        entries: Some(entries.clone()),
    };
    let response = AUDITED.scope(entries.clone(), next.run(request)).await;
    guard.entries = None;
    let ids = std::mem::take(&mut *entries.lock().expect("audit lock"));
    if ids.is_empty() {
        return response;
    }
    let status = response.status();
    // Owned before any await: a response body is not `Sync`, so a borrow
    // of it would make this future not `Send`.
    let reason = response
        .extensions()
        .get::<ErrorMessage>()
        .map(|m| m.0.clone())
        .unwrap_or_else(|| status.to_string());
    let outcome = if status.is_client_error() {
        Outcome::Refused(reason)
    } else if status.is_server_error() {
        Outcome::Failed(reason)
    } else {
        Outcome::Done
    };
    for id in ids {
        if let Err(e) = state.audit.finish(id, &outcome).await {
            // The action already happened; its entry stays pending.
            tracing::error!(error = %e, "cannot record an admin action's outcome");
        }
    }
    response
}

struct InterruptedGuard {
    audit: AuditLog,
    entries: Option<Arc<std::sync::Mutex<Vec<i64>>>>,
}

impl Drop for InterruptedGuard {
    fn drop(&mut self) {
        let Some(entries) = self.entries.take() else {
            return;
        };
        let ids = std::mem::take(&mut *entries.lock().expect("audit lock"));
        if ids.is_empty() {
            return;
        }
        let audit = self.audit.clone();
        tokio::spawn(async move {
            for id in ids {
                if let Err(e) = audit.finish(id, &Outcome::Interrupted).await {
                    tracing::error!(error = %e, "cannot record an admin action's outcome");
                }
            }
        });
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &state.metrics) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[derive(Deserialize)]
struct NewDevice {
    id: String,
    role: Role,
    #[serde(rename = "type")]
    device_type: Option<String>,
    /// Hex Ed25519 public key for SDK handshakes.
    public_key: Option<String>,
    ttl_secs: Option<i64>,
}

const DEFAULT_TOKEN_TTL_SECS: i64 = 365 * 24 * 3600;
const MAX_TOKEN_TTL_SECS: i64 = 10 * 365 * 24 * 3600;

pub(crate) fn checked_ttl(ttl_secs: Option<i64>) -> Result<i64, ApiError> {
    match ttl_secs.unwrap_or(DEFAULT_TOKEN_TTL_SECS) {
        ttl if (1..=MAX_TOKEN_TTL_SECS).contains(&ttl) => Ok(ttl),
        ttl => Err(bad_request(format!(
            "ttl_secs must be between 1 and {MAX_TOKEN_TTL_SECS}, not {ttl}"
        ))),
    }
}

async fn add_device(
    State(state): State<AppState>,
    caller: Caller,
    Json(new): Json<NewDevice>,
) -> Result<Response, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    // Checked before anything is created.
    let ttl = checked_ttl(new.ttl_secs)?;
    let now = unix_now();
    if state.registry.get(&new.id).is_some() {
        return Err(RegistryError::Exists(new.id).into());
    }
    let public_key = new
        .public_key
        .as_deref()
        .map(parse_public_key)
        .transpose()?;
    fleetgate_admin::registry::check_registration(
        &new.id,
        new.device_type.as_deref(),
        public_key.as_deref(),
    )
    .map_err(bad_request)?;
    state
        .audit(
            admin,
            "device.add",
            &new.id,
            json!({ "role": new.role, "type": new.device_type }),
        )
        .await?;
    let device = state
        .registry
        .add(
            &new.id,
            new.role,
            new.device_type.as_deref(),
            public_key.as_deref(),
            now,
        )
        .await?;
    let token = state.platform.mint(&device.id, device.role, ttl, now);
    Ok((
        StatusCode::CREATED,
        Json(json!({ "device": device, "token": token, "expires_at": now + ttl })),
    )
        .into_response())
}

#[derive(Deserialize)]
struct DeviceFilter {
    #[serde(rename = "type")]
    device_type: Option<String>,
    role: Option<String>,
}

/// Registered devices, by id; `?type=` and `?role=` keep those of that
/// type and role.
async fn list_devices(
    State(state): State<AppState>,
    caller: Caller,
    Query(filter): Query<DeviceFilter>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin, &state)?;
    let role: Option<Role> = filter
        .role
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(bad_request)?;
    let devices: Vec<_> = state
        .registry
        .list()
        .into_iter()
        .filter(|d| role.is_none_or(|r| d.role == r))
        .filter(|d| {
            filter
                .device_type
                .as_deref()
                .is_none_or(|t| d.device_type.as_deref() == Some(t))
        })
        .collect();
    Ok(Json(json!({ "devices": devices })))
}

#[derive(Deserialize, Default)]
struct TokenRequest {
    ttl_secs: Option<i64>,
}

async fn mint_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Option<Json<TokenRequest>>,
) -> Result<Json<Value>, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    let device = state.registry.get(&id).ok_or(RegistryError::NotFound(id))?;
    if device.revoked_at.is_some() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("device {:?} is revoked", device.id),
        ));
    }
    let ttl = checked_ttl(body.and_then(|b| b.0.ttl_secs))?;
    let now = unix_now();
    state
        .audit(
            admin,
            "device.token",
            &device.id,
            json!({ "ttl_secs": ttl }),
        )
        .await?;
    let token = state.platform.mint(&device.id, device.role, ttl, now);
    Ok(Json(
        json!({ "device": device.id, "role": device.role, "token": token, "expires_at": now + ttl }),
    ))
}

async fn revoke_device(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    if state.registry.get(&id).is_none() {
        return Err(RegistryError::NotFound(id).into());
    }
    state.audit(admin, "device.revoke", &id, json!({})).await?;
    let device = state.registry.revoke(&id, unix_now()).await?;
    Ok(Json(json!({ "device": device })))
}

pub(crate) fn parse_public_key(hex: &str) -> Result<Vec<u8>, ApiError> {
    from_hex(hex)
        .ok()
        .filter(|k| k.len() == 32)
        .ok_or_else(|| bad_request("public_key must be 64 hex digits (an Ed25519 public key)"))
}

#[derive(Deserialize)]
struct KeyChange {
    public_key: String,
}

/// Registers or rotates the key a device signs SDK handshakes with.
async fn set_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(change): Json<KeyChange>,
) -> Result<Json<Value>, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    let key = parse_public_key(&change.public_key)?;
    if state.registry.get(&id).is_none() {
        return Err(RegistryError::NotFound(id).into());
    }
    state
        .audit(
            admin,
            "device.key",
            &id,
            json!({ "public_key": change.public_key }),
        )
        .await?;
    let device = state.registry.set_public_key(&id, &key).await?;
    Ok(Json(json!({ "device": device })))
}

#[derive(Deserialize)]
struct RoleChange {
    role: Role,
}

async fn change_role(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(change): Json<RoleChange>,
) -> Result<Json<Value>, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    let current = state
        .registry
        .get(&id)
        .ok_or_else(|| RegistryError::NotFound(id.clone()))?;
    if current.revoked_at.is_some() {
        return Err(RegistryError::Invalid(format!("device {id:?} is revoked")).into());
    }
    state
        .audit(
            admin,
            "device.role",
            &id,
            json!({ "from": current.role, "to": change.role }),
        )
        .await?;
    let device = state.registry.set_role(&id, change.role).await?;
    Ok(Json(json!({ "device": device })))
}

async fn list_bans(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin, &state)?;
    Ok(Json(json!({ "bans": state.bans.list(unix_now()) })))
}

async fn lift_ban(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    if state.bans.get(&id, unix_now()).is_none() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("device {id:?} is not banned"),
        ));
    }
    state.audit(admin, "device.unban", &id, json!({})).await?;
    state
        .bans
        .unban(&id, unix_now())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(json!({ "unbanned": id })))
}

#[derive(Deserialize)]
struct Page {
    limit: Option<i64>,
    before: Option<i64>,
}

async fn list_audit(
    State(state): State<AppState>,
    caller: Caller,
    Query(page): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin, &state)?;
    let entries = state
        .audit
        .list(page.limit.unwrap_or(100).clamp(1, 10_000), page.before)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(json!({ "entries": entries })))
}

/// Store nodes in cluster mode; empty when everything runs in one process.
async fn list_nodes(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin, &state)?;
    let nodes = state
        .balancer
        .as_ref()
        .map(|b| b.nodes())
        .unwrap_or_default();
    Ok(Json(json!({ "nodes": nodes })))
}

async fn refusals(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin, &state)?;
    Ok(Json(
        json!({ "devices": state.ledger.by_device(), "alerts": state.ledger.alerts() }),
    ))
}

async fn apply_streams(
    State(state): State<AppState>,
    caller: Caller,
    body: String,
) -> Result<Json<Value>, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    let file = StreamsFile::parse(&body).map_err(bad_request)?;
    let names: Vec<&String> = file.streams.keys().collect();
    state
        .audit(
            admin,
            "stream.apply",
            "streams",
            json!({ "streams": names }),
        )
        .await?;
    let applied = state.catalog.apply(&file).await.map_err(bad_request)?;
    Ok(Json(json!({ "applied": applied })))
}

async fn list_streams(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Extract, &state)?;
    let streams: Vec<Value> = state
        .catalog
        .list()
        .iter()
        .map(|s| {
            json!({
                "name": s.name, "key": s.def.key, "fields": s.def.fields,
                "columns": s.columns, "compacted": s.compacted,
            })
        })
        .collect();
    Ok(Json(json!({ "streams": streams })))
}

/// Each declared field: a column or compacted into `extra`, and its use.
async fn stream_fields(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Extract, &state)?;
    let stream = stream_named(&state, &name)?;
    let fields = state
        .compaction
        .fields(&stream)
        .await
        .map_err(internal_error)?;
    Ok(Json(json!({ "stream": name, "fields": fields })))
}

/// A bucketed stream's buckets in `[from, to)` (default: all), oldest
/// first: real-time rows, and rows a batch superseded.
async fn stream_buckets(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(window): Query<crate::etl_api::Window>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Extract, &state)?;
    stream_named(&state, &name)?;
    let (from, to) = window.parse()?.unwrap_or((i64::MIN, i64::MAX));
    let buckets = state
        .buckets
        .list(&name, from, to)
        .await
        .map_err(bad_request)?;
    Ok(Json(json!({ "stream": name, "buckets": buckets })))
}

/// Swaps out a bucketed stream's whole buckets in `[from, to)` by hand, as
/// a batch run that supersedes them does (recorded as run 0).
async fn swap_buckets(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(window): Query<crate::etl_api::Window>,
) -> Result<Json<Value>, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    stream_named(&state, &name)?;
    let (from, to) = window
        .parse()?
        .ok_or_else(|| bad_request("give the period: ?from=...&to=..."))?;
    state
        .audit(admin, "stream.swap", &name, json!({ "window": (from, to) }))
        .await?;
    let swap = state
        .buckets
        .swap(&name, from, to, 0)
        .await
        .map_err(bad_request)?;
    Ok(Json(json!(swap)))
}

async fn stream_tiers(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Extract, &state)?;
    let stream = stream_named(&state, &name)?;
    let stats = state.tiers.stats(&stream).await.map_err(internal_error)?;
    Ok(Json(json!(stats)))
}

fn stream_named(
    state: &AppState,
    name: &str,
) -> Result<Arc<fleetgate_store::catalog::Stream>, ApiError> {
    state
        .catalog
        .get(name)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no stream named {name:?}")))
}

async fn list_rejects(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(params): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Extract, &state)?;
    let limit = params.limit.unwrap_or(100).clamp(1, 10_000);
    let rows = rejects::list(&state.db, &name, limit, params.before)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(json!({ "stream": name, "rejects": rows })))
}

#[derive(Deserialize)]
struct QueryRequest {
    sql: String,
}

async fn explain_query(
    State(state): State<AppState>,
    caller: Caller,
    Json(request): Json<QueryRequest>,
) -> Result<Json<Value>, ApiError> {
    let route = state
        .queries
        .explain(&caller.0, "http", &request.sql)
        .await
        .map_err(query_failure)?;
    Ok(Json(json!(route)))
}

/// `/v1/query`'s answer: the result with the view that served it.
/// Serialized straight from the rows, not through a second `Value` tree,
/// so a result up to `--query-max-bytes` is held once, plus its text.
#[derive(serde::Serialize)]
struct QueryAnswer {
    #[serde(flatten)]
    result: query::QueryResult,
    view: Option<String>,
}

async fn run_query(
    State(state): State<AppState>,
    caller: Caller,
    Json(request): Json<QueryRequest>,
) -> Result<Json<QueryAnswer>, ApiError> {
    let (result, view) = answer(&state, &caller, &request.sql).await?;
    Ok(Json(QueryAnswer { result, view }))
}

/// A query's failure as the API answers it.
fn query_failure(failure: QueryFailure) -> ApiError {
    let status = match failure {
        QueryFailure::Forbidden(_) => StatusCode::FORBIDDEN,
        QueryFailure::Invalid(_) => StatusCode::BAD_REQUEST,
        QueryFailure::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
        QueryFailure::TooLarge(_) => StatusCode::UNPROCESSABLE_ENTITY,
        QueryFailure::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    ApiError(status, failure.to_string())
}

/// Runs a read-only query as `/v1/query` does (and the PostgreSQL wire
/// endpoint): [`QueryService::answer`]. Returns the result and the view
/// that served it.
pub async fn answer(
    state: &AppState,
    caller: &Caller,
    sql: &str,
) -> Result<(query::QueryResult, Option<String>), ApiError> {
    let answer = state
        .queries
        .answer(&caller.0, "http", sql)
        .await
        .map_err(query_failure)?;
    Ok((answer.result, answer.view))
}

async fn create_views(
    State(state): State<AppState>,
    caller: Caller,
    body: String,
) -> Result<Json<Value>, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    let file = ViewsFile::parse(&body).map_err(bad_request)?;
    let names: Vec<&String> = file.views.keys().collect();
    state
        .audit(admin, "view.create", "views", json!({ "views": names }))
        .await?;
    let created = state.views.create(&file).await.map_err(bad_request)?;
    Ok(Json(json!({ "created": created })))
}

async fn list_views(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Extract, &state)?;
    let views = state
        .views
        .list()
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(json!({ "views": views })))
}

/// The query shapes the store has logged, with what it decided for each.
async fn list_shapes(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Extract, &state)?;
    let shapes = state
        .views
        .shapes()
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(json!({ "shapes": shapes })))
}

async fn drop_view(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    if let Some(dependent) = state.views.dependent(&name) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("view {dependent} is built on {name}; drop it first"),
        ));
    }
    state.audit(admin, "view.drop", &name, json!({})).await?;
    match state.views.drop_view(&name).await {
        Ok(true) => Ok(Json(json!({ "dropped": name }))),
        Ok(false) => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no view named {name:?}"),
        )),
        Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e)),
    }
}
