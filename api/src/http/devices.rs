//! Device administration: `/v1/devices` (register, tokens, keys, roles,
//! revocation), `/v1/refusals`, `/v1/bans` and `/v1/audit`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use fleetgate_admin::registry::RegistryError;
use fleetgate_admin::unix_now;
use fleetgate_protocol::sdk::from_hex;
use fleetgate_protocol::Role;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{bad_request, ApiError, AppState, Caller, Page};

#[derive(Deserialize)]
pub struct NewDevice {
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

pub(super) fn checked_ttl(ttl_secs: Option<i64>) -> Result<i64, ApiError> {
    match ttl_secs.unwrap_or(DEFAULT_TOKEN_TTL_SECS) {
        ttl if (1..=MAX_TOKEN_TTL_SECS).contains(&ttl) => Ok(ttl),
        ttl => Err(bad_request(format!(
            "ttl_secs must be between 1 and {MAX_TOKEN_TTL_SECS}, not {ttl}"
        ))),
    }
}

pub async fn add_device(
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
pub struct DeviceFilter {
    #[serde(rename = "type")]
    device_type: Option<String>,
    role: Option<String>,
}

/// Registered devices, by id; `?type=` and `?role=` keep those of that
/// type and role.
pub async fn list_devices(
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
pub struct TokenRequest {
    ttl_secs: Option<i64>,
}

pub async fn mint_token(
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

pub async fn revoke_device(
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

pub(super) fn parse_public_key(hex: &str) -> Result<Vec<u8>, ApiError> {
    from_hex(hex)
        .ok()
        .filter(|k| k.len() == 32)
        .ok_or_else(|| bad_request("public_key must be 64 hex digits (an Ed25519 public key)"))
}

#[derive(Deserialize)]
pub struct KeyChange {
    public_key: String,
}

/// Registers or rotates the key a device signs SDK handshakes with.
pub async fn set_key(
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
pub struct RoleChange {
    role: Role,
}

pub async fn change_role(
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

pub async fn list_bans(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin, &state)?;
    Ok(Json(json!({ "bans": state.bans.list(unix_now()) })))
}

pub async fn lift_ban(
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

pub async fn refusals(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin, &state)?;
    Ok(Json(
        json!({ "devices": state.ledger.by_device(), "alerts": state.ledger.alerts() }),
    ))
}

pub async fn list_audit(
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
