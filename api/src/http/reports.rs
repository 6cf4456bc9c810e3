//! `/v1/reports` and `/v1/reconciliations`: hybrid series over batch and
//! real-time data, and what each batch corrected.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use fleetgate_admin::unix_now_ms;
use fleetgate_etl::report::{combine, ReportDef, ReportsFile};
use fleetgate_protocol::Role;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::query::answer;
use super::{bad_request, internal_error, ApiError, AppState, Caller, Window};

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
    // Declaring a report before the job that loads its batch table is
    // legitimate, so this is a warning, not a refusal; but a misspelled
    // table would otherwise go unnoticed, the report serving real-time
    // data only.
    let loaded = state.etl.tables();
    let warnings: Vec<String> = file
        .reports
        .iter()
        .filter(|(_, def)| !loaded.contains(&def.batch.table))
        .map(|(name, def)| {
            format!(
                "report {name}: no ETL job loads a table named {:?} (jobs load: {}); until one does, the report serves real-time data only",
                def.batch.table,
                if loaded.is_empty() { "none yet".to_string() } else { loaded.join(", ") }
            )
        })
        .collect();
    Ok(Json(json!({ "applied": applied, "warnings": warnings })))
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
) -> Result<Response, ApiError> {
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
    // The real-time side only where no batch answers: usually just after
    // the boundary, instead of the whole period.
    let mut realtime = Vec::new();
    let mut view = None;
    let realtime_from = realtime_source(&state, &def)?;
    for (gap_from, gap_to) in realtime_gaps(windows, from, to, width) {
        let sql = def.side_sql(&realtime_from, &def.realtime.time, gap_from, gap_to, width);
        let (result, served_by) = answer(&state, &caller, &sql).await?;
        realtime.extend(result.rows);
        view = view.or(served_by);
    }
    let points = combine(def.group_by.is_some(), windows, width, &batch, realtime);
    // Serialized straight from the points: a year of hourly points per
    // region is tens of thousands of them.
    Ok(Json(SeriesBody {
        report: &name,
        from,
        to,
        bucket_ms: width,
        boundary: windows.last().map(|w| w.1),
        batch_windows: windows,
        realtime_view: view,
        points,
    })
    .into_response())
}

#[derive(Serialize)]
struct SeriesBody<'a> {
    report: &'a str,
    from: i64,
    to: i64,
    bucket_ms: i64,
    /// Where real-time data takes over: the end of the last batch.
    boundary: Option<i64>,
    batch_windows: &'a [(i64, i64)],
    realtime_view: Option<String>,
    points: Vec<fleetgate_etl::report::Point>,
}

/// What the real-time side reads: the stream, and for a bucketed stream
/// the rows batches superseded too (a report bucket a batch covers only in
/// part comes from real time, and some of its rows were swapped out). Named
/// tables only: the query is checked like any other.
fn realtime_source(state: &AppState, def: &ReportDef) -> Result<String, ApiError> {
    let name = &def.realtime.stream;
    let Some(stream) = state.catalog.get(name).filter(|s| s.bucket().is_some()) else {
        return Ok(name.clone());
    };
    let mut columns = vec![def.realtime.time.clone()];
    columns.extend(def.group_by.iter().cloned());
    columns.extend(def.value().map_err(bad_request)?.column);
    columns.dedup();
    let columns = columns.join(", ");
    Ok(format!(
        "(SELECT {columns} FROM {name} UNION ALL SELECT {columns} FROM {}) AS {name}",
        stream.superseded_table()
    ))
}

/// The parts of `[from, to)` whose buckets no batch window wholly covers,
/// on bucket boundaries; the whole period when there are many.
fn realtime_gaps(windows: &[(i64, i64)], from: i64, to: i64, width: i64) -> Vec<(i64, i64)> {
    const MAX_GAPS: usize = 8;
    let mut gaps = Vec::new();
    let mut start = from;
    for &(w_from, w_to) in windows {
        // Buckets wholly inside the window come from the batch.
        let first = w_from.div_euclid(width) * width
            + if w_from.rem_euclid(width) > 0 {
                width
            } else {
                0
            };
        let end = w_to.div_euclid(width) * width;
        if first >= end {
            continue;
        }
        if first > start {
            gaps.push((start, first.min(to)));
        }
        start = start.max(end);
    }
    if start < to {
        gaps.push((start, to));
    }
    gaps.retain(|(a, b)| a < b);
    if gaps.len() > MAX_GAPS {
        return vec![(from, to)];
    }
    gaps
}

#[cfg(test)]
mod tests {
    use super::realtime_gaps;

    #[test]
    fn real_time_is_read_only_where_no_batch_covers_whole_buckets() {
        let hour = 3_600_000;
        assert_eq!(realtime_gaps(&[], 0, 10 * hour, hour), [(0, 10 * hour)]);
        assert_eq!(
            realtime_gaps(&[(0, 4 * hour)], 0, 10 * hour, hour),
            [(4 * hour, 10 * hour)]
        );
        // A window ending mid-bucket leaves that bucket to real time.
        assert_eq!(
            realtime_gaps(&[(2 * hour, 5 * hour + 1)], 0, 10 * hour, hour),
            [(0, 2 * hour), (5 * hour, 10 * hour)]
        );
        assert_eq!(realtime_gaps(&[(0, 20 * hour)], 0, 10 * hour, hour), []);
    }
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
