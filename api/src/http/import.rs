//! `POST /v1/devices/import`: many devices in one request, checked row by
//! row, registered in one transaction, each answered with its token.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use fleetgate_admin::registry::{check_registration, Registration};
use fleetgate_admin::unix_now;
use fleetgate_protocol::Role;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::devices::{checked_ttl, parse_public_key};
use super::{internal_error, ApiError, AppState, Caller};

/// Most devices one import may hold.
pub const MAX_DEVICES: usize = 100_000;
/// Most bytes an import's body may hold: `MAX_DEVICES` rows of the longest
/// id, type and key fit.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

#[derive(Deserialize)]
pub struct ImportRequest {
    devices: Vec<Row>,
    ttl_secs: Option<i64>,
    /// Register the valid rows and list the invalid ones, instead of
    /// registering nothing when any row is invalid.
    #[serde(default)]
    skip_invalid: bool,
    /// Check every row and answer as an import would, registering nothing.
    #[serde(default)]
    dry_run: bool,
}

/// One device of an import. Every field is checked here, row by row, so a
/// missing or wrong one is that row's error, not the whole body's.
#[derive(Deserialize)]
struct Row {
    #[serde(default)]
    id: String,
    #[serde(default)]
    role: String,
    #[serde(rename = "type")]
    device_type: Option<String>,
    /// Hex Ed25519 public key for SDK handshakes.
    public_key: Option<String>,
}

/// A row that cannot be registered: its position in `devices` (from 0),
/// its id, and what is wrong and what is allowed.
#[derive(Serialize)]
struct Invalid {
    index: usize,
    id: String,
    error: String,
}

/// Checks every row and sorts them into registrations and invalid rows.
fn check(state: &AppState, rows: Vec<Row>) -> (Vec<(usize, Registration)>, Vec<Invalid>) {
    let mut first_at: HashMap<String, usize> = HashMap::with_capacity(rows.len());
    let mut valid = Vec::with_capacity(rows.len());
    let mut invalid = Vec::new();
    for (index, row) in rows.into_iter().enumerate() {
        let checked = (|| {
            fleetgate_protocol::validate_device_id(&row.id)?;
            let role: Role = row.role.parse()?;
            let public_key = row
                .public_key
                .as_deref()
                .map(parse_public_key)
                .transpose()
                .map_err(|ApiError(_, message)| message)?;
            check_registration(&row.id, row.device_type.as_deref(), public_key.as_deref())?;
            if let Some(first) = first_at.get(&row.id) {
                return Err(format!(
                    "device {:?} is listed more than once (first in row {} of the import)",
                    row.id,
                    first + 1
                ));
            }
            if state.registry.get(&row.id).is_some() {
                return Err(format!("device {:?} already exists", row.id));
            }
            Ok(Registration {
                id: row.id.clone(),
                role,
                device_type: row.device_type.clone(),
                public_key,
            })
        })();
        match checked {
            Ok(registration) => {
                first_at.insert(row.id, index);
                valid.push((index, registration));
            }
            Err(error) => invalid.push(Invalid {
                index,
                id: row.id,
                error,
            }),
        }
    }
    (valid, invalid)
}

/// Registers the devices of a request in one transaction and answers with
/// their tokens. If any row is invalid, nothing is registered and the
/// answer (422) lists every invalid row, unless `skip_invalid`.
pub async fn import(
    State(state): State<AppState>,
    caller: Caller,
    Json(request): Json<ImportRequest>,
) -> Result<Response, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    if request.devices.len() > MAX_DEVICES {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "an import holds at most {MAX_DEVICES} devices, this one {}: split it",
                request.devices.len()
            ),
        ));
    }
    let ttl = checked_ttl(request.ttl_secs)?;
    let rows = request.devices.len();
    let (valid, invalid) = check(&state, request.devices);
    if !invalid.is_empty() && !request.skip_invalid {
        let message = format!(
            "{} of {rows} devices are invalid; nothing was imported",
            invalid.len()
        );
        return Ok(ApiError(StatusCode::UNPROCESSABLE_ENTITY, message)
            .with_details(json!({ "invalid": invalid })));
    }
    if request.dry_run || valid.is_empty() {
        let answer = json!({
            "imported": 0,
            "valid": valid.len(),
            "devices": [],
            "invalid": invalid,
            "dry_run": request.dry_run,
        });
        return Ok(Json(answer).into_response());
    }
    let ids: Vec<&str> = valid.iter().map(|(_, r)| r.id.as_str()).collect();
    state
        .audit(
            admin,
            "device.import",
            "devices",
            json!({ "count": ids.len(), "ids": ids, "ttl_secs": ttl }),
        )
        .await?;
    let now = unix_now();
    // Tokens are signatures, not state: made (off the async workers) before
    // the commit, so a committed device always has one in the answer.
    let platform = state.platform.clone();
    let (indexes, registrations): (Vec<usize>, Vec<Registration>) = valid.into_iter().unzip();
    let (tokens, registrations) = tokio::task::spawn_blocking(move || {
        let tokens: Vec<String> = registrations
            .iter()
            .map(|r| platform.mint(&r.id, r.role, ttl, now))
            .collect();
        (tokens, registrations)
    })
    .await
    .map_err(|e| internal_error(format!("cannot mint tokens: {e}")))?;
    let devices = state.registry.import(&registrations, now).await?;
    let devices: Vec<_> = devices
        .iter()
        .zip(tokens)
        .zip(indexes)
        .map(|((device, token), index)| {
            json!({
                "index": index,
                "id": device.id,
                "role": device.role,
                "type": device.device_type,
                "token": token,
                "expires_at": now + ttl,
            })
        })
        .collect();
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "imported": devices.len(),
            "devices": devices,
            "invalid": invalid,
            "dry_run": false,
        })),
    )
        .into_response())
}
