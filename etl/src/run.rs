//! Runs: their records, live progress and rejects.

use std::sync::atomic::{AtomicU64, Ordering};

use fleetgate_store::{with_pool, Db};
use serde::Serialize;
use sqlx::Row as _;

/// Row counts of a run as it goes; written to its record every second.
#[derive(Debug, Default)]
pub struct Progress {
    pub read: AtomicU64,
    pub transformed: AtomicU64,
    pub loaded: AtomicU64,
    pub rejected: AtomicU64,
}

impl Progress {
    pub fn counts(&self) -> [i64; 4] {
        [&self.read, &self.transformed, &self.loaded, &self.rejected]
            .map(|c| c.load(Ordering::Relaxed) as i64)
    }
}

/// A run that has not written its progress for this long is taken as
/// interrupted: the process running it stopped.
pub const STALE_MS: i64 = 30_000;

pub fn ddl(db: &Db) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS fleetgate_etl_runs ({}, job TEXT NOT NULL, target TEXT NOT NULL, \
             status TEXT NOT NULL, trigger TEXT NOT NULL, due_at BIGINT, started_at BIGINT NOT NULL, \
             heartbeat_at BIGINT NOT NULL, finished_at BIGINT, rows_read BIGINT NOT NULL DEFAULT 0, \
             rows_transformed BIGINT NOT NULL DEFAULT 0, rows_loaded BIGINT NOT NULL DEFAULT 0, \
             rows_rejected BIGINT NOT NULL DEFAULT 0, window_from BIGINT, window_to BIGINT, \
             error TEXT, interim TEXT)",
            db.auto_id_column("id")
        ),
        // One run per scheduled time, however many processes schedule.
        "CREATE UNIQUE INDEX IF NOT EXISTS fleetgate_etl_runs_due ON fleetgate_etl_runs (job, due_at)".into(),
        "CREATE TABLE IF NOT EXISTS fleetgate_etl_rejects (run_id BIGINT NOT NULL, source TEXT NOT NULL, \
         file TEXT, line BIGINT, reason TEXT NOT NULL, data TEXT NOT NULL)".into(),
        "CREATE INDEX IF NOT EXISTS fleetgate_etl_rejects_run ON fleetgate_etl_rejects (run_id)".into(),
    ]
}

#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub id: i64,
    pub job: String,
    pub target: String,
    /// `running`, `succeeded` or `failed`.
    pub status: String,
    /// `manual` or `schedule`.
    pub trigger: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub rows_read: i64,
    pub rows_transformed: i64,
    pub rows_loaded: i64,
    pub rows_rejected: i64,
    /// The time window the run covers (epoch ms, end excluded).
    pub window_from: Option<i64>,
    pub window_to: Option<i64>,
    pub error: Option<String>,
    /// Where the run's extracted data was copied.
    pub interim: Option<String>,
}

const RUN_COLUMNS: &str = "id, job, target, status, trigger, started_at, finished_at, rows_read, \
     rows_transformed, rows_loaded, rows_rejected, window_from, window_to, error, interim, heartbeat_at";

fn record<R: sqlx::Row>(row: &R, now_ms: i64) -> Result<RunRecord, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let mut run = RunRecord {
        id: row.try_get("id")?,
        job: row.try_get("job")?,
        target: row.try_get("target")?,
        status: row.try_get("status")?,
        trigger: row.try_get("trigger")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        rows_read: row.try_get("rows_read")?,
        rows_transformed: row.try_get("rows_transformed")?,
        rows_loaded: row.try_get("rows_loaded")?,
        rows_rejected: row.try_get("rows_rejected")?,
        window_from: row.try_get("window_from")?,
        window_to: row.try_get("window_to")?,
        error: row.try_get("error")?,
        interim: row.try_get("interim")?,
    };
    let heartbeat: i64 = row.try_get("heartbeat_at")?;
    if run.status == "running" && now_ms - heartbeat > STALE_MS {
        run.status = "failed".into();
        run.error = Some("interrupted: the process running it stopped".into());
    }
    Ok(run)
}

/// Runs, newest first: of one job, or all.
pub async fn list(
    db: &Db,
    job: Option<&str>,
    limit: i64,
    now_ms: i64,
) -> Result<Vec<RunRecord>, String> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM fleetgate_etl_runs WHERE (CAST($1 AS TEXT) IS NULL OR job = $1) ORDER BY id DESC LIMIT $2"
    );
    let result = with_pool!(db, pool => {
        sqlx::query(&sql).bind(job).bind(limit).fetch_all(pool).await.and_then(|rows| {
            rows.iter().map(|r| record(r, now_ms)).collect::<Result<Vec<_>, _>>()
        })
    });
    result.map_err(|e| format!("cannot read runs: {e}"))
}

pub async fn get(db: &Db, id: i64, now_ms: i64) -> Result<Option<RunRecord>, String> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM fleetgate_etl_runs WHERE id = $1");
    let result = with_pool!(db, pool => {
        match sqlx::query(&sql).bind(id).fetch_optional(pool).await {
            Ok(Some(row)) => record(&row, now_ms).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        }
    });
    result.map_err(|e| format!("cannot read run {id}: {e}"))
}

/// Records a new run; `None` when a run for the same scheduled time exists.
pub async fn begin(
    db: &Db,
    job: &str,
    target: &str,
    trigger: &str,
    due_at: Option<i64>,
    now_ms: i64,
) -> Result<Option<i64>, String> {
    let sql = "INSERT INTO fleetgate_etl_runs (job, target, status, trigger, due_at, started_at, heartbeat_at) \
               VALUES ($1, $2, 'running', $3, $4, $5, $5) ON CONFLICT DO NOTHING RETURNING id";
    let result = with_pool!(db, pool => {
        sqlx::query(sql).bind(job).bind(target).bind(trigger).bind(due_at).bind(now_ms)
            .fetch_optional(pool).await
            .and_then(|row| row.map(|r| r.try_get::<i64, _>(0)).transpose())
    });
    result.map_err(|e| format!("cannot record the run: {e}"))
}

/// Writes the counts so far (and that the run is alive).
pub async fn heartbeat(db: &Db, id: i64, progress: &Progress, interim: &str, now_ms: i64) {
    let [read, transformed, loaded, rejected] = progress.counts();
    let sql = "UPDATE fleetgate_etl_runs SET heartbeat_at = $2, rows_read = $3, rows_transformed = $4, \
               rows_loaded = $5, rows_rejected = $6, interim = $7 WHERE id = $1 AND status = 'running'";
    let result = with_pool!(db, pool => {
        sqlx::query(sql).bind(id).bind(now_ms).bind(read).bind(transformed).bind(loaded)
            .bind(rejected).bind(interim).execute(pool).await.map(|_| ())
    });
    if let Err(e) = result {
        tracing::warn!(run = id, error = %e, "cannot record run progress");
    }
}

/// The statement that closes a run as succeeded: executed by the load in
/// its own transaction, so a run is `succeeded` exactly when its rows are
/// committed. Binds: id, finished_at, the four counts, window from, to.
pub const SUCCEEDED: &str = "UPDATE fleetgate_etl_runs SET status = 'succeeded', finished_at = $2, \
     heartbeat_at = $2, rows_read = $3, rows_transformed = $4, rows_loaded = $5, rows_rejected = $6, \
     window_from = $7, window_to = $8 WHERE id = $1";

pub async fn fail(db: &Db, id: i64, progress: &Progress, error: &str, now_ms: i64) {
    let [read, transformed, _, rejected] = progress.counts();
    let sql = "UPDATE fleetgate_etl_runs SET status = 'failed', finished_at = $2, heartbeat_at = $2, \
               rows_read = $3, rows_transformed = $4, rows_loaded = 0, rows_rejected = $5, error = $6 \
               WHERE id = $1";
    let result = with_pool!(db, pool => {
        sqlx::query(sql).bind(id).bind(now_ms).bind(read).bind(transformed).bind(rejected)
            .bind(error).execute(pool).await.map(|_| ())
    });
    if let Err(e) = result {
        tracing::error!(run = id, error = %e, "cannot record that the run failed");
    }
}

/// A row a run refused, and why.
#[derive(Debug, Clone, Serialize)]
pub struct RejectRecord {
    pub source: String,
    pub file: Option<String>,
    pub line: Option<i64>,
    pub reason: String,
    /// The line as read, or the row as the refusing rule saw it.
    pub data: String,
}

/// Rejects kept per run; beyond this they are counted, not stored.
pub const KEPT_REJECTS: usize = 10_000;

/// Inserts a run's rejects (at most [`KEPT_REJECTS`]) on `$conn`, a
/// connection or transaction of either backend. A macro, so one body
/// serves both backends' concrete types.
macro_rules! insert_rejects {
    ($conn:expr, $run:expr, $rejects:expr) => {{
        let rejects: &[$crate::run::RejectRecord] = $rejects;
        let kept = &rejects[..rejects.len().min($crate::run::KEPT_REJECTS)];
        let mut inserted: Result<(), sqlx::Error> = Ok(());
        for chunk in kept.chunks(500) {
            let mut insert = sqlx::QueryBuilder::new(
                "INSERT INTO fleetgate_etl_rejects (run_id, source, file, line, reason, data) ",
            );
            insert.push_values(chunk, |mut row, r| {
                row.push_bind($run)
                    .push_bind(r.source.as_str())
                    .push_bind(r.file.as_deref())
                    .push_bind(r.line)
                    .push_bind(r.reason.as_str())
                    .push_bind(r.data.as_str());
            });
            if let Err(e) = insert.build().execute(&mut *$conn).await {
                inserted = Err(e);
                break;
            }
        }
        inserted
    }};
}
pub(crate) use insert_rejects;

pub async fn save_rejects(db: &Db, run: i64, rejects: &[RejectRecord]) -> Result<(), String> {
    let result = with_pool!(db, pool => async {
        let mut tx = pool.begin().await?;
        insert_rejects!(tx, run, rejects)?;
        tx.commit().await
    }.await);
    result.map_err(|e| format!("cannot record rejects: {e}"))
}

pub async fn rejects(db: &Db, run: i64, limit: i64) -> Result<Vec<RejectRecord>, String> {
    let sql =
        "SELECT source, file, line, reason, data FROM fleetgate_etl_rejects WHERE run_id = $1 \
               ORDER BY source, file, line LIMIT $2";
    let result = with_pool!(db, pool => {
        sqlx::query(sql).bind(run).bind(limit).fetch_all(pool).await.and_then(|rows| {
            rows.iter()
                .map(|r| {
                    Ok(RejectRecord {
                        source: r.try_get(0)?,
                        file: r.try_get(1)?,
                        line: r.try_get(2)?,
                        reason: r.try_get(3)?,
                        data: r.try_get(4)?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
        })
    });
    result.map_err(|e| format!("cannot read rejects: {e}"))
}
