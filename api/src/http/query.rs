//! `/v1/query` and `/v1/query/explain`: the HTTP door to
//! [`QueryService`](crate::QueryService), the same query path the
//! PostgreSQL wire endpoint takes.

use axum::extract::State;
use axum::Json;
use fleetgate_store::query;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{query_failure, ApiError, AppState, Caller};

#[derive(Deserialize)]
pub struct QueryRequest {
    sql: String,
}

pub async fn explain_query(
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
pub struct QueryAnswer {
    #[serde(flatten)]
    result: query::QueryResult,
    view: Option<String>,
}

pub async fn run_query(
    State(state): State<AppState>,
    caller: Caller,
    Json(request): Json<QueryRequest>,
) -> Result<Json<QueryAnswer>, ApiError> {
    let (result, view) = answer(&state, &caller, &request.sql).await?;
    Ok(Json(QueryAnswer { result, view }))
}

/// Runs a read-only query as `/v1/query` does (and the PostgreSQL wire
/// endpoint): [`QueryService::answer`](crate::QueryService::answer).
/// Returns the result and the view that served it.
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
    let view = answer.view.clone();
    let result = answer
        .collect(&state.queries)
        .await
        .map_err(query_failure)?;
    Ok((result, view))
}
