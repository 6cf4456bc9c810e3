//! `/v1/reports` and `/v1/reconciliations`: hybrid series over batch and
//! real-time data, and what each batch corrected.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use fleetgate_admin::unix_now_ms;
use fleetgate_etl::report::{combine, ReportDef, ReportsFile};
use fleetgate_protocol::Role;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::etl_api::Window;
use crate::http::{answer, bad_request, internal_error, ApiError, AppState, Caller};

pub async fn apply(
    State(state): State<AppState>,
    caller: Caller,
    body: String,
) -> Result<Json<Value>, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    let file = ReportsFile::parse(&body).map_err(bad_request)?;
    let names: Vec<&String> = file.reports.keys().collect();
    state
        .audit(
            admin,
            "report.apply",
            "reports",
            json!({ "reports": names }),
        )
        .await?;
    let applied = state.reports.apply(&file).await.map_err(bad_request)?;
    Ok(Json(json!({ "applied": applied })))
}

pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Extract, &state)?;
    let reports = state.reports.list().await.map_err(internal_error)?;
    Ok(Json(json!({ "reports": reports })))
}

#[derive(Deserialize)]
pub struct SeriesQuery {
    from: Option<String>,
    to: Option<String>,
    bucket: Option<String>,
}

/// The report's series over `[from, to)` (default: the last 7 days).
pub async fn series(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(query): Query<SeriesQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Extract, &state)?;
    let def = state
        .reports
        .get(&name)
        .await
        .map_err(internal_error)?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no report named {name:?}")))?;
    let width = ReportDef::bucket_ms(query.bucket.as_deref().unwrap_or(&def.bucket))
        .map_err(bad_request)?;
    let window = Window {
        from: query.from,
        to: query.to,
    }
    .parse()?;
    let (from, to) = window.unwrap_or_else(|| {
        let now = unix_now_ms();
        (now - 7 * 86_400_000, now + 1)
    });
    // Whole buckets only: a bucket cut by `from` would be under-counted.
    let from = from.div_euclid(width) * width;
    let coverage = state
        .reports
        .coverage(&def.batch.table)
        .await
        .map_err(internal_error)?;
    let windows = &coverage.windows;
    let batch = match coverage.last_run {
        None => Default::default(),
        Some(last_run) => {
            let key = (name.clone(), from, to, width);
            match state.reports.cached_batch(&key, last_run) {
                Some(rows) => rows,
                None => {
                    let sql = def.side_sql(&def.batch.table, &def.batch.time, from, to, width);
                    let rows = std::sync::Arc::new(answer(&state, &caller, &sql).await?.0.rows);
                    state.reports.cache_batch(key, last_run, rows.clone());
                    rows
                }
            }
        }
    };
    let sql = def.side_sql(&def.realtime.stream, &def.realtime.time, from, to, width);
    let (realtime, view) = answer(&state, &caller, &sql).await?;
    let points = combine(
        def.group_by.is_some(),
        windows,
        width,
        &batch,
        realtime.rows,
    );
    Ok(Json(json!({
        "report": name,
        "from": from,
        "to": to,
        "bucket_ms": width,
        // Where real-time data takes over: the end of the last batch.
        "boundary": windows.last().map(|w| w.1),
        "batch_windows": windows,
        "realtime_view": view,
        "points": points,
    })))
}

pub async fn reconcile(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(window): Query<Window>,
) -> Result<Json<Value>, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    let window = window
        .parse()?
        .ok_or_else(|| bad_request("give the period: ?from=...&to=..."))?;
    state
        .audit(
            admin,
            "report.reconcile",
            &name,
            json!({ "window": window }),
        )
        .await?;
    let result = state
        .reports
        .reconcile(&name, window, None)
        .await
        .map_err(bad_request)?;
    Ok(Json(json!(result)))
}

#[derive(Deserialize)]
pub struct ReconciliationsQuery {
    report: Option<String>,
    limit: Option<i64>,
}

pub async fn reconciliations(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ReconciliationsQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Extract, &state)?;
    let limit = query.limit.unwrap_or(20).clamp(1, 1000);
    let list = state
        .reports
        .reconciliations(query.report.as_deref(), limit)
        .await
        .map_err(internal_error)?;
    Ok(Json(json!({ "reconciliations": list })))
}
