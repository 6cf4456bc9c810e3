//! The HTTP API: device administration, streams, rejects, queries, views,
//! ETL, reports, analyses, state rollout, SDKs, ingest, metrics, and the
//! dashboard page with its event stream.
//!
//! Every `/v1` route takes a bearer token (the same tokens as MQTT), checked
//! by the same authenticator the gatekeeper uses; the routes without one
//! (the dashboard page, `/healthz`, `/metrics`, the SDK handshake) are rate
//! limited per address. Each route group is a module of its own; this one
//! holds what they share: [`AppState`], the router, the caller extractor,
//! the error body, the audit trail of admin actions, and serving.

mod analysis;
mod devices;
mod etl;
mod events;
mod import;
mod ingest;
mod query;
mod rate_limit;
mod reports;
mod sdk;
mod state;
mod streams;
mod views;

pub use events::Events;
pub use import::MAX_DEVICES as MAX_IMPORT_DEVICES;
pub use rate_limit::RateLimit;
pub use sdk::SdkSettings;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use fleetgate_admin::audit::Outcome;
use fleetgate_admin::registry::RegistryError;
use fleetgate_admin::{AuditLog, Bans, Platform, RefusalLedger, Registry};
use fleetgate_broker::tls::{TlsIncoming, TlsStream};
use fleetgate_etl::schema::parse_timestamp;
use fleetgate_protocol::{AuthError, Authenticate, Principal, Role};
use fleetgate_store::tiers::Tiers;
use fleetgate_store::views::Views;
use fleetgate_store::{Catalog, Db};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

use crate::{QueryFailure, QueryService};
use rate_limit::ClientAddr;

/// Everything the routes reach: the binary builds it once (`up`, `broker`)
/// from the parts it started, and hands it to [`serve`] and [`serve_tls`]
/// (and to [`Events::start`]).
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub catalog: Catalog,
    /// The device registry (`/v1/devices`, `/v1/devices/import`).
    pub registry: Registry,
    /// Mints tokens and signs SDK bundles.
    pub platform: Arc<Platform>,
    /// The one authenticator (the same `TokenAuthenticator` as MQTT and the
    /// PostgreSQL wire endpoint).
    pub auth: Arc<dyn Authenticate>,
    /// Refusals per device (`/v1/refusals`).
    pub ledger: Arc<RefusalLedger>,
    pub bans: Bans,
    /// Where admin actions are recorded before they take effect.
    pub audit: AuditLog,
    /// What `/metrics` serves.
    pub metrics: Arc<prometheus_client::registry::Registry>,
    /// The SDK handshake and builds.
    pub sdk: SdkSettings,
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
    pub unauth_limit: Option<Arc<RateLimit>>,
    /// The query path `/v1/query` shares with the PostgreSQL wire endpoint.
    pub queries: QueryService,
    /// What `/v1/events` pushes to the dashboard.
    pub events: Arc<Events>,
}

/// Serves the API on `listener` until `shutdown` completes (then finishes
/// the requests under way, as axum's graceful shutdown does).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    // The client's address, for the per-address rate limit.
    let service = router(state).into_make_service_with_connect_info::<ClientAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(shutdown)
        .await
}

/// [`serve`] over TLS: HTTPS on connections whose handshake `incoming`
/// completed.
pub async fn serve_tls(
    incoming: TlsIncoming,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let service = router(state).into_make_service_with_connect_info::<ClientAddr>();
    axum::serve(HttpsListener(incoming), service)
        .with_graceful_shutdown(shutdown)
        .await
}

/// HTTPS for axum: connections arrive with their handshake already done.
struct HttpsListener(TlsIncoming);

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.0.accept().await {
            Some(connection) => connection,
            // The accept loop only ends when the listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.0.local_addr())
    }
}

fn router(state: AppState) -> Router {
    // The routes anyone may call, without a token: rate limited per address.
    let mut public = Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/handshake/nonce", get(sdk::nonce))
        .route("/v1/handshake", post(sdk::handshake));
    if let Some(limit) = &state.unauth_limit {
        public = public.route_layer(middleware::from_fn_with_state(
            limit.clone(),
            rate_limit::limit,
        ));
    }
    Router::new()
        .merge(public)
        .route(
            "/v1/devices",
            get(devices::list_devices).post(devices::add_device),
        )
        .route(
            "/v1/devices/import",
            post(import::import).layer(DefaultBodyLimit::max(import::MAX_BODY_BYTES)),
        )
        .route("/v1/devices/{id}/token", post(devices::mint_token))
        .route("/v1/devices/{id}/revoke", post(devices::revoke_device))
        .route("/v1/devices/{id}/role", post(devices::change_role))
        .route("/v1/devices/{id}/key", post(devices::set_key))
        .route("/v1/refusals", get(devices::refusals))
        .route("/v1/bans", get(devices::list_bans))
        .route("/v1/bans/{id}", delete(devices::lift_ban))
        .route("/v1/audit", get(devices::list_audit))
        .route("/v1/nodes", get(state::list_nodes))
        .route("/v1/state", get(state::show))
        .route("/v1/state/{kind}/{name}", post(state::push))
        .route(
            "/v1/streams",
            get(streams::list_streams).post(streams::apply_streams),
        )
        .route("/v1/streams/{name}/rejects", get(streams::list_rejects))
        .route("/v1/query", post(query::run_query))
        .route("/v1/query/explain", post(query::explain_query))
        .route(
            "/v1/views",
            get(views::list_views).post(views::create_views),
        )
        .route("/v1/views/{name}", delete(views::drop_view))
        .route("/v1/views/shapes", get(views::list_shapes))
        .route("/v1/streams/{name}/tiers", get(streams::stream_tiers))
        .route("/v1/streams/{name}/fields", get(streams::stream_fields))
        .route("/v1/streams/{name}/buckets", get(streams::stream_buckets))
        .route(
            "/v1/streams/{name}/buckets/swap",
            post(streams::swap_buckets),
        )
        .route("/v1/ingest/{stream}", post(ingest::ingest))
        .route("/v1/etl/jobs", get(etl::list).post(etl::apply))
        .route("/v1/etl/jobs/{name}", delete(etl::delete))
        .route("/v1/etl/jobs/{name}/run", post(etl::run))
        .route("/v1/etl/runs", get(etl::runs))
        .route("/v1/etl/runs/{id}", get(etl::get_run))
        .route("/v1/etl/runs/{id}/rejects", get(etl::rejects))
        .route("/v1/reports", get(reports::list).post(reports::apply))
        .route("/v1/reports/{name}", get(reports::series))
        .route("/v1/reports/{name}/reconcile", post(reports::reconcile))
        .route("/v1/reconciliations", get(reports::reconciliations))
        .route("/v1/analyses", get(analysis::list).post(analysis::apply))
        .route("/v1/alerts", get(analysis::alerts))
        .route("/v1/events", get(events::stream))
        .route("/v1/sdk/build", post(sdk::offline_build))
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
pub(crate) struct ApiError(pub StatusCode, pub String);

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
    pub(crate) fn with_details(self, details: Value) -> Response {
        let mut body = json!({ "error": self.1 });
        if let Value::Object(fields) = details {
            body.as_object_mut().expect("an object").extend(fields);
        }
        let mut response = (self.0, Json(body)).into_response();
        response.extensions_mut().insert(ErrorMessage(self.1));
        response
    }
}

pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

/// A failure of the server's own (a database error): 500.
pub(crate) fn internal_error(message: String) -> ApiError {
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
pub(crate) struct Caller(Principal);

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
pub(crate) fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
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
    pub(crate) fn authenticate(state: &AppState, token: &str) -> Result<Caller, ApiError> {
        state
            .auth
            .authenticate(None, token)
            .map(Caller)
            .map_err(|e| match e {
                AuthError::Banned { .. } => ApiError(StatusCode::FORBIDDEN, e.to_string()),
                _ => ApiError(StatusCode::UNAUTHORIZED, e.to_string()),
            })
    }

    pub(crate) fn require(&self, role: Role, state: &AppState) -> Result<&Principal, ApiError> {
        crate::require(&*state.auth, &self.0, role, "http").map_err(query_failure)
    }
}

impl AppState {
    /// Writes an admin action to the audit log, as pending, before it takes
    /// effect: an action whose entry cannot be written is not performed, so
    /// none goes unrecorded. [`audit_outcomes`] finishes the entry with the
    /// request's outcome once the handler has answered, so handlers need
    /// not (and cannot forget to).
    pub(crate) async fn audit(
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

/// `?limit=&before=`: a page of a list (audit entries, rejects).
#[derive(Deserialize)]
pub(crate) struct Page {
    limit: Option<i64>,
    before: Option<i64>,
}

/// `?from=&to=`: RFC 3339, a date, or epoch milliseconds.
#[derive(Deserialize)]
pub(crate) struct Window {
    pub from: Option<String>,
    pub to: Option<String>,
}

impl Window {
    pub(crate) fn parse(&self) -> Result<Option<(i64, i64)>, ApiError> {
        let at = |text: &str| {
            parse_timestamp(text).ok_or_else(|| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("{text:?} is not a time (RFC 3339, YYYY-MM-DD or epoch ms)"),
                )
            })
        };
        match (&self.from, &self.to) {
            (None, None) => Ok(None),
            (Some(from), Some(to)) => {
                let (from, to) = (at(from)?, at(to)?);
                if from >= to {
                    return Err(ApiError(
                        StatusCode::BAD_REQUEST,
                        "from must come before to".into(),
                    ));
                }
                Ok(Some((from, to)))
            }
            _ => Err(ApiError(
                StatusCode::BAD_REQUEST,
                "give both from and to, or neither".into(),
            )),
        }
    }
}
