//! `/v1/streams`: declare streams, and read what the store holds of each:
//! its fields (columns or compacted), tiers, buckets and rejects.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use fleetgate_protocol::schema::StreamsFile;
use fleetgate_protocol::Role;
use fleetgate_store::rejects;
use serde_json::{json, Value};

use super::{bad_request, internal_error, ApiError, AppState, Caller, Page, Window};

pub async fn apply_streams(
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

pub async fn list_streams(
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
pub async fn stream_fields(
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
pub async fn stream_buckets(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(window): Query<Window>,
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
pub async fn swap_buckets(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(window): Query<Window>,
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

pub async fn stream_tiers(
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

pub async fn list_rejects(
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
