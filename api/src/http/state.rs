//! The cluster's stores: `/v1/nodes` (store nodes in cluster mode) and
//! `/v1/state` (state versions: push one, and see which stores hold it),
//! behind `fleetgate state`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use fleetgate_admin::rollout::RolloutError;
use fleetgate_protocol::state::{StateFormat, StateKey, StateValue};
use fleetgate_protocol::Role;
use fleetgate_store::state::{self as store_state, LOCAL_NODE};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState, Caller};

/// Store nodes in cluster mode; empty when everything runs in one process.
pub async fn list_nodes(
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

#[derive(Deserialize)]
pub struct PushRequest {
    text: String,
    format: StateFormat,
    /// Activation time, Unix milliseconds on the cluster clock.
    at_ms: Option<i64>,
    /// Or: this long from now (the cluster's now, not the caller's).
    in_ms: Option<u64>,
    #[serde(default = "yes")]
    wait: bool,
}

fn yes() -> bool {
    true
}

pub async fn push(
    State(state): State<AppState>,
    caller: Caller,
    Path((kind, name)): Path<(String, String)>,
    Json(request): Json<PushRequest>,
) -> Result<Json<Value>, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    let key = format!("{kind}/{name}");
    let at_ms = match (request.at_ms, request.in_ms) {
        (Some(_), Some(_)) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "give at_ms or in_ms, not both".into(),
            ))
        }
        (at, None) => at,
        (None, Some(wait)) => {
            let wait = i64::try_from(wait).unwrap_or(i64::MAX);
            Some(state.rollout.cluster_now_ms().saturating_add(wait))
        }
    };
    // Checked before the audit entry, so a refused document leaves no trace
    // but the refusal.
    let parsed = StateKey::parse(&key)
        .and_then(|k| StateValue::parse(&k, &request.text, request.format).map(|v| (k, v)))
        .and_then(|(k, v)| store_state::check_against(&state.catalog, &k, &v));
    parsed.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    state
        .rollout
        .check_activation_time(at_ms)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    state
        .audit(
            admin,
            "state.push",
            &key,
            json!({ "at_ms": at_ms, "bytes": request.text.len() }),
        )
        .await?;
    match state
        .rollout
        .push(&key, &request.text, request.format, at_ms, request.wait)
        .await
    {
        Ok(report) => Ok(Json(json!(report))),
        Err(RolloutError::Invalid(e)) => Err(ApiError(StatusCode::BAD_REQUEST, e)),
        Err(RolloutError::Failed(e)) => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e)),
    }
}

pub async fn show(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin, &state)?;
    let internal = |e: String| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e);
    let versions = store_state::versions(&state.db).await.map_err(internal)?;
    let newest = versions.iter().find(|r| r.status == "published");
    let confirmed = match newest {
        Some(row) => store_state::activations(&state.db, row.version)
            .await
            .map_err(internal)?,
        None => Vec::new(),
    };
    let stores: Vec<Value> = match &state.balancer {
        Some(balancer) => balancer
            .nodes()
            .into_iter()
            .map(|n| json!({ "node": n.id, "up": n.up, "active": n.state.active, "previous": n.state.previous }))
            .collect(),
        None => {
            let held = state.local_state.as_ref().map(|s| s.held()).unwrap_or_default();
            vec![json!({ "node": LOCAL_NODE, "up": true, "active": held.active, "previous": held.previous })]
        }
    };
    Ok(Json(json!({
        "current": newest.map(|r| r.version).unwrap_or(0),
        "versions": versions,
        "confirmed": confirmed.into_iter().map(|(node, at)| json!({ "node": node, "activated_at_ms": at })).collect::<Vec<_>>(),
        "stores": stores,
    })))
}
