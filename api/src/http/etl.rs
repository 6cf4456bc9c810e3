//! `/v1/etl`: declare batch jobs, run them, follow their runs and rejects.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use fleetgate_etl::job::JobsFile;
use fleetgate_etl::StartError;
use fleetgate_protocol::Role;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{bad_request, internal_error, ApiError, AppState, Caller, Window};

pub async fn apply(
    State(state): State<AppState>,
    caller: Caller,
    body: String,
) -> Result<Json<Value>, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    let file = JobsFile::parse(&body).map_err(bad_request)?;
    let names: Vec<&String> = file.jobs.keys().collect();
    state
        .audit(admin, "etl.apply", "jobs", json!({ "jobs": names }))
        .await?;
    let taken = |table: &str| {
        state.catalog.get(table).is_some() || state.views.plans().iter().any(|v| v.name == table)
    };
    let applied = state.etl.apply(&file, taken).await.map_err(bad_request)?;
    Ok(Json(json!({ "applied": applied })))
}

pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Extract, &state)?;
    let jobs = state.etl.jobs().await.map_err(internal_error)?;
    Ok(Json(json!({ "jobs": jobs })))
}

pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    state.audit(admin, "etl.delete", &name, json!({})).await?;
    if !state.etl.delete(&name).await.map_err(internal_error)? {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no job named {name:?}"),
        ));
    }
    Ok(Json(json!({ "deleted": name })))
}

/// Starts a run; the reply names it at once (`202`), the run goes on.
pub async fn run(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(window): Query<Window>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    let window = window.parse()?;
    state
        .audit(admin, "etl.run", &name, json!({ "window": window }))
        .await?;
    let id = state.etl.start(&name, window).await.map_err(|e| match e {
        StartError::NoSuchJob(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
        StartError::Busy(_) => ApiError(StatusCode::CONFLICT, e.to_string()),
        StartError::Failed(e) => internal_error(e),
    })?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "run": id }))))
}

#[derive(Deserialize)]
pub struct RunsQuery {
    job: Option<String>,
    limit: Option<i64>,
}

pub async fn runs(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<RunsQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Extract, &state)?;
    let limit = query.limit.unwrap_or(50).clamp(1, 1000);
    let runs = state
        .etl
        .runs(query.job.as_deref(), limit)
        .await
        .map_err(internal_error)?;
    Ok(Json(json!({ "runs": runs })))
}

pub async fn get_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Extract, &state)?;
    match state.etl.get_run(id).await.map_err(internal_error)? {
        Some(run) => Ok(Json(json!(run))),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no run {id}"))),
    }
}

#[derive(Deserialize)]
pub struct Limit {
    limit: Option<i64>,
}

pub async fn rejects(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<i64>,
    Query(limit): Query<Limit>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Extract, &state)?;
    let limit = limit.limit.unwrap_or(100).clamp(1, 10_000);
    // A run that does not exist is not one without rejects.
    if state
        .etl
        .get_run(id)
        .await
        .map_err(internal_error)?
        .is_none()
    {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no run {id}")));
    }
    let rejects = state.etl.rejects(id, limit).await.map_err(internal_error)?;
    Ok(Json(json!({ "run": id, "rejects": rejects })))
}
