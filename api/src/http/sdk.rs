//! The SDK routes: handshake nonces, the signed handshake that answers with
//! a token and the device's SDK, and offline builds for admins.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use fleetgate_admin::registry::RegistryError;
use fleetgate_admin::{unix_now, unix_now_ms, HandshakeError, Handshakes};
use fleetgate_protocol::sdk::abi::ModuleSchema;
use fleetgate_protocol::sdk::{SignedHandshake, Target};
use fleetgate_protocol::Role;
use fleetgate_sdk_builder::{Artifact, Builder, Recipient};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState, Caller};

/// How long what a handshake hands out stays good.
#[derive(Clone)]
pub struct SdkSettings {
    pub handshakes: Arc<Handshakes>,
    pub builder: Arc<Builder>,
    pub token_ttl: Duration,
    pub manifest_ttl: Duration,
    /// The MQTT port devices should connect to.
    pub mqtt_port: u16,
    /// The MQTT-over-TLS port, when TLS is on (devices that can do secure
    /// transfer use only this).
    pub mqtts_port: Option<u16>,
}

impl From<HandshakeError> for ApiError {
    fn from(e: HandshakeError) -> Self {
        let status = match e {
            HandshakeError::Malformed(_) => StatusCode::BAD_REQUEST,
            HandshakeError::Refused(_) => StatusCode::UNAUTHORIZED,
            HandshakeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, e.to_string())
    }
}

pub async fn nonce(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let (nonce, expires) = state.sdk.handshakes.issue_nonce(unix_now_ms())?;
    Ok(Json(json!({ "nonce": nonce, "expires_at_ms": expires })))
}

/// The streams a device of `role` and `device_type` may write: its SDK
/// carries encoders for those only.
fn schema_for(state: &AppState, role: Role, device_type: Option<&str>) -> ModuleSchema {
    let streams = state.catalog.list();
    Builder::module_schema(
        role,
        device_type,
        streams.iter().map(|s| (s.name.as_str(), &s.def)),
    )
}

/// Builds on a blocking thread: compiling native code takes milliseconds of CPU.
async fn build(
    state: &AppState,
    role: Role,
    device_type: Option<&str>,
    target: Target,
) -> Result<(Arc<Artifact>, bool), ApiError> {
    let schema = schema_for(state, role, device_type);
    let builder = state.sdk.builder.clone();
    tokio::task::spawn_blocking(move || builder.build(&schema, target))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))
}

pub async fn handshake(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let signed: SignedHandshake = serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("malformed handshake: {e}")))?;
    let (claims, device) = state.sdk.handshakes.verify(&signed, unix_now_ms()).await?;
    let target = claims
        .target
        .unwrap_or_else(|| Target::native_for_arch(&claims.arch));
    let (artifact, cached) =
        build(&state, device.role, device.device_type.as_deref(), target).await?;
    let now = unix_now();
    let token_ttl = state.sdk.token_ttl.as_secs().max(1) as i64;
    let token = state.platform.mint(&device.id, device.role, token_ttl, now);
    let bundle = Builder::seal(
        &artifact,
        &Recipient {
            device_id: &device.id,
            nonce: Some(&claims.nonce),
            now,
            ttl_secs: state.sdk.manifest_ttl.as_secs().max(1) as i64,
        },
        &state.platform.signer,
    );
    tracing::info!(
        device = %device.id,
        role = %device.role,
        %target,
        cached,
        os = %claims.os,
        fingerprint = %claims.fingerprint,
        "SDK handshake"
    );
    Ok(Json(json!({
        "device": device.id,
        "role": device.role,
        "target": target,
        "cached": cached,
        "token": token,
        "token_expires_at": now + token_ttl,
        "mqtt_port": state.sdk.mqtt_port,
        "mqtts_port": state.sdk.mqtts_port,
        "sdk": bundle,
    })))
}

#[derive(Deserialize)]
pub struct OfflineBuild {
    device: String,
    target: Target,
    /// Manifest lifetime; default one year.
    ttl_secs: Option<i64>,
}

/// `POST /v1/sdk/build`: a bundle for a device flashed before shipping.
pub async fn offline_build(
    State(state): State<AppState>,
    caller: Caller,
    Json(request): Json<OfflineBuild>,
) -> Result<Json<Value>, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    let device = state
        .registry
        .get(&request.device)
        .ok_or_else(|| RegistryError::NotFound(request.device.clone()))?;
    if device.revoked_at.is_some() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("device {:?} is revoked", device.id),
        ));
    }
    let ttl = request.ttl_secs.unwrap_or(365 * 24 * 3600);
    if !(1..=10 * 365 * 24 * 3600).contains(&ttl) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("ttl_secs must be between 1 and ten years, not {ttl}"),
        ));
    }
    state
        .audit(
            admin,
            "sdk.build",
            &device.id,
            json!({ "target": request.target, "ttl_secs": ttl }),
        )
        .await?;
    let (artifact, cached) = build(
        &state,
        device.role,
        device.device_type.as_deref(),
        request.target,
    )
    .await?;
    let bundle = Builder::seal(
        &artifact,
        &Recipient {
            device_id: &device.id,
            nonce: None,
            now: unix_now(),
            ttl_secs: ttl,
        },
        &state.platform.signer,
    );
    Ok(Json(json!({ "cached": cached, "sdk": bundle })))
}
