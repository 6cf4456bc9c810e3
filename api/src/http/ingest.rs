//! `POST /v1/ingest/{stream}`: records over HTTP, for web pages and
//! servers. The body (one JSON object or an array) goes to the same
//! `IngestService` as an MQTT publish on `ingest/<stream>/<device>`, so it
//! gets the same decoding, validation, keys, writers, rejects and live
//! copies, and the reply comes only after the commit: a 200 means stored
//! (`stored` new records, `duplicates` whose key already was).

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use fleetgate_admin::unix_now_ms;
use fleetgate_protocol::ingest::IngestMessage;
use fleetgate_protocol::topic::may_publish;
use fleetgate_protocol::Role;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState, Caller};

#[derive(Deserialize)]
pub struct IngestParams {
    /// The device the records belong to; only admins may name another
    /// device than their own (a server forwarding for its fleet).
    device: Option<String>,
}

pub async fn ingest(
    State(state): State<AppState>,
    caller: Caller,
    Path(stream): Path<String>,
    Query(params): Query<IngestParams>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let principal = caller.require(Role::Ingest, &state)?.clone();
    let device = params.device.unwrap_or_else(|| principal.device_id.clone());
    let topic = format!("ingest/{stream}/{device}");
    if let Err(denied) = may_publish(principal.role, &principal.device_id, &topic) {
        state
            .auth
            .record_refusal(&principal.device_id, &format!("http ingest: {}", denied.0));
        return Err(ApiError(StatusCode::FORBIDDEN, denied.0));
    }
    let device_id = principal.device_id.clone();
    let message = IngestMessage {
        principal,
        stream,
        device_id: device,
        payload: body,
        truncated_from: None,
        received_at_ms: unix_now_ms(),
        state_version: None,
    };
    let unavailable = |why: String| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not stored ({why}); send it again"),
        )
    };
    let pending = state
        .ingest
        .submit(message)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let outcome = match pending.await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => return Err(unavailable(e.to_string())),
        Err(_) => return Err(unavailable("the store stopped".into())),
    };
    // The store refused the sender (its device type may not write this
    // stream): a 403, counted like the topic check above; nothing stored.
    if let Some(reason) = outcome.refused {
        state
            .auth
            .record_refusal(&device_id, &format!("http ingest: {reason}"));
        return Err(ApiError(StatusCode::FORBIDDEN, reason));
    }
    // Stored records stay stored; a 422 says some were rejected and why.
    // Duplicates (keys already stored) are not an error: they are stored.
    let status = if outcome.rejected == 0 {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    Ok((
        status,
        Json(json!({
            "stored": outcome.stored,
            "duplicates": outcome.duplicates,
            "rejected": outcome.rejected,
            "first_reason": outcome.first_reason,
        })),
    ))
}
