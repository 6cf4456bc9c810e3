//! `/v1/analyses` and `/v1/alerts`: per-device statistics of streams and
//! the anomalies they raise.

use axum::extract::{Query, State};
use axum::Json;
use fleetgate_etl::analysis::AnalysesFile;
use fleetgate_protocol::Role;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{bad_request, internal_error, ApiError, AppState, Caller};

pub async fn apply(
    State(state): State<AppState>,
    caller: Caller,
    body: String,
) -> Result<Json<Value>, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    let file = AnalysesFile::parse(&body).map_err(bad_request)?;
    let names: Vec<&String> = file.analyses.keys().collect();
    state
        .audit(
            admin,
            "analysis.apply",
            "analyses",
            json!({ "analyses": names }),
        )
        .await?;
    let applied = state.analyses.apply(&file).await.map_err(bad_request)?;
    Ok(Json(json!({ "applied": applied })))
}

pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Extract, &state)?;
    let list = state.analyses.list().await.map_err(internal_error)?;
    let analyses: Vec<Value> = list
        .into_iter()
        .map(|(name, def)| json!({ "name": name, "table": fleetgate_etl::analysis::table(&name), "definition": def }))
        .collect();
    Ok(Json(json!({ "analyses": analyses })))
}

#[derive(Deserialize)]
pub struct Limit {
    limit: Option<i64>,
}

pub async fn alerts(
    State(state): State<AppState>,
    caller: Caller,
    Query(limit): Query<Limit>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Extract, &state)?;
    let alerts = state
        .analyses
        .alerts(limit.limit.unwrap_or(50).clamp(1, 1000))
        .await
        .map_err(internal_error)?;
    Ok(Json(json!({ "alerts": alerts })))
}
