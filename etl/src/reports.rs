//! `Reports`: declared hybrid reports, the batch windows they switch on,
//! and the reconciliations run after each batch load and on demand.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetgate_protocol::unix_now_ms;
use fleetgate_store::buckets::Buckets;
use fleetgate_store::compaction::FieldUse;
use fleetgate_store::query::{self, QueryLimits};
use fleetgate_store::{with_pool, Catalog, Db};
use serde::Serialize;
use serde_json::Value;
use sqlx::Row as _;

use crate::declared::Declared;
use crate::reconcile::{self, Differences, SideRows};
use crate::report::{merge_windows, ReportDef, ReportsFile};
use crate::run::RunRecord;
use crate::Etl;

const REPORTS: Declared = Declared {
    kind: "report",
    table: "fleetgate_reports",
};

/// Rows a reconciliation reads per side at most.
const MAX_RECONCILED_ROWS: usize = 2_000_000;

pub struct Reports {
    db: Db,
    catalog: Catalog,
    /// Swaps out the real-time periods a batch run supersedes, for
    /// bucketed streams.
    buckets: Arc<Buckets>,
    /// The fields reports read count as used, for column compaction.
    usage: FieldUse,
    /// Batch sides already computed. A batch table changes only when a run
    /// succeeds, so an entry holds until a newer run loads the table.
    batch_cache: Mutex<HashMap<BatchQuery, (i64, SideResult)>>,
}

/// A side's rows as the query returned them.
pub type SideResult = Arc<Vec<Vec<Value>>>;

/// One batch side of a report: the report, its window and bucket width.
pub type BatchQuery = (String, i64, i64, i64);

/// Batch sides kept; beyond this the cache starts over.
const CACHED_BATCH_SIDES: usize = 32;

/// The periods a batch table's succeeded runs cover, and the newest such
/// run (which identifies the table's contents).
#[derive(Debug, Clone, Default)]
pub struct Coverage {
    pub windows: Vec<(i64, i64)>,
    pub last_run: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReportInfo {
    pub name: String,
    pub definition: ReportDef,
}

#[derive(Debug, Clone, Serialize)]
pub struct Reconciliation {
    pub id: i64,
    pub report: String,
    /// The batch run that triggered it; `None` when asked for.
    pub run: Option<i64>,
    pub window_from: i64,
    pub window_to: i64,
    pub created_at: i64,
    /// Real-time rows of the window the batch now answers for in reports.
    pub superseded: usize,
    pub differences: Differences,
}

impl Reports {
    pub async fn open(
        db: Db,
        catalog: Catalog,
        buckets: Arc<Buckets>,
        usage: FieldUse,
    ) -> Result<Arc<Reports>, String> {
        db.execute_ddl(&[
            REPORTS.ddl(),
            format!(
                "CREATE TABLE IF NOT EXISTS fleetgate_reconciliations ({}, report TEXT NOT NULL, run_id BIGINT, \
                 window_from BIGINT NOT NULL, window_to BIGINT NOT NULL, created_at BIGINT NOT NULL, result TEXT NOT NULL)",
                db.auto_id_column("id")
            ),
        ])
        .await
        .map_err(|e| format!("cannot create the report tables: {e}"))?;
        Ok(Arc::new(Reports {
            db,
            catalog,
            buckets,
            usage,
            batch_cache: Mutex::default(),
        }))
    }

    /// Reconciles every report over a batch table after each succeeded
    /// run that loads it.
    pub fn follow_runs(self: &Arc<Self>, etl: &Etl) {
        let reports = self.clone();
        etl.observe(Arc::new(move |run: &RunRecord| {
            let (Some(from), Some(to)) = (run.window_from, run.window_to) else {
                return;
            };
            if run.status != "succeeded" {
                return;
            }
            let (reports, run) = (reports.clone(), run.clone());
            tokio::spawn(async move {
                let Ok(list) = reports.list().await else {
                    return;
                };
                for report in list {
                    let def = &report.definition;
                    if def.batch.table != run.target {
                        continue;
                    }
                    if def.reconcile.is_some() {
                        if let Err(e) = reports.reconcile(&report.name, (from, to), Some(run.id)).await {
                            tracing::warn!(report = report.name, run = run.id, error = %e, "reconciliation failed");
                            // The real-time rows stay until it is reconciled.
                            continue;
                        }
                    }
                    reports.supersede(def, (from, to), run.id).await;
                }
            });
        }));
    }

    /// Declares (or replaces) reports; their stream must exist.
    pub async fn apply(&self, file: &ReportsFile) -> Result<Vec<String>, String> {
        for (name, def) in &file.reports {
            if self.catalog.get(&def.realtime.stream).is_none() {
                return Err(format!(
                    "report {name}: no stream named {:?}",
                    def.realtime.stream
                ));
            }
        }
        REPORTS.save(&self.db, &file.reports, unix_now_ms()).await?;
        Ok(file.reports.keys().cloned().collect())
    }

    pub async fn list(&self) -> Result<Vec<ReportInfo>, String> {
        Ok(REPORTS
            .load(&self.db)
            .await?
            .into_iter()
            .map(|stored| ReportInfo {
                name: stored.name,
                definition: stored.definition,
            })
            .collect())
    }

    pub async fn get(&self, name: &str) -> Result<Option<ReportDef>, String> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .find(|r| r.name == name)
            .map(|r| r.definition))
    }

    /// The periods succeeded batch runs into `table` cover, merged.
    pub async fn coverage(&self, table: &str) -> Result<Coverage, String> {
        let runs: Vec<(i64, Option<i64>, Option<i64>)> = with_pool!(self.db, pool => {
            sqlx::query(
                "SELECT id, window_from, window_to FROM fleetgate_etl_runs \
                 WHERE target = $1 AND status = 'succeeded'",
            )
            .bind(table)
            .fetch_all(pool).await
            .and_then(|rows| rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))).collect())
        })
        .map_err(|e| format!("cannot read the batch windows of {table}: {e}"))?;
        Ok(Coverage {
            last_run: runs.iter().map(|r| r.0).max(),
            windows: merge_windows(runs.iter().filter_map(|r| Some((r.1?, r.2?))).collect()),
        })
    }

    /// A batch side computed while `last_run` was the newest run.
    pub fn cached_batch(&self, query: &BatchQuery, last_run: i64) -> Option<SideResult> {
        let cache = self.batch_cache.lock().expect("batch cache");
        cache
            .get(query)
            .filter(|(run, _)| *run == last_run)
            .map(|(_, rows)| rows.clone())
    }

    pub fn cache_batch(&self, query: BatchQuery, last_run: i64, rows: SideResult) {
        let mut cache = self.batch_cache.lock().expect("batch cache");
        if cache.len() >= CACHED_BATCH_SIDES {
            cache.clear();
        }
        cache.insert(query, (last_run, rows));
    }

    /// A bucketed stream's real-time rows of a period a batch run now
    /// answers for leave the stream for its superseded table; other
    /// streams keep them (reports read the batch for that period anyway).
    async fn supersede(&self, def: &ReportDef, window: (i64, i64), run: i64) {
        let stream = &def.realtime.stream;
        // Only when the stream is bucketed by the time the report (and so
        // the batch window) reads: bucketed by another, a swap would move
        // rows of periods no batch covers.
        let bucketed_by_report_time = self
            .catalog
            .get(stream)
            .and_then(|s| s.bucket().map(|(time, _)| time == def.realtime.time))
            .unwrap_or(false);
        if !bucketed_by_report_time {
            return;
        }
        if let Err(e) = self.buckets.swap(stream, window.0, window.1, run).await {
            tracing::warn!(%stream, run, error = %e, "cannot swap out superseded buckets");
        }
    }

    /// What `FROM` reads as the report's real-time rows: the stream (both
    /// tiers of a tiered one), and the rows batches superseded of a
    /// bucketed one (a reconciliation compares them all).
    fn realtime_from(&self, def: &ReportDef) -> Result<String, String> {
        let read = def.realtime_fields();
        self.usage
            .note(&def.realtime.stream, read.iter().map(String::as_str));
        self.catalog
            .get(&def.realtime.stream)
            .map(|stream| stream.read_with_superseded())
            .ok_or_else(|| format!("no stream named {:?}", def.realtime.stream))
    }

    /// Compares the report's two sides over `window` and stores the result.
    pub async fn reconcile(
        &self,
        name: &str,
        window: (i64, i64),
        run: Option<i64>,
    ) -> Result<Reconciliation, String> {
        let def = self
            .get(name)
            .await?
            .ok_or_else(|| format!("no report named {name:?}"))?;
        let spec = def
            .reconcile
            .as_ref()
            .ok_or_else(|| format!("report {name} declares no reconcile = {{ key = ... }}"))?;
        let width = ReportDef::bucket_ms(&def.bucket)?;
        let value = def.value()?.column;
        let select = |time: &str| {
            let mut columns = vec![spec.key.clone(), time.to_string()];
            columns.extend(spec.compare.iter().cloned());
            columns.extend(value.iter().cloned());
            columns
        };
        let (from, to) = window;
        let batch_sql = format!(
            "SELECT {} FROM {} WHERE {t} >= {from} AND {t} < {to}",
            select(&def.batch.time).join(", "),
            def.batch.table,
            t = def.batch.time
        );
        let realtime_sql = format!(
            "SELECT {} FROM {} WHERE {t} >= {from} AND {t} < {to}",
            select(&def.realtime.time).join(", "),
            self.realtime_from(&def)?,
            t = def.realtime.time
        );
        let batch = self.read(&batch_sql).await?;
        let realtime = self.read(&realtime_sql).await?;
        let superseded = realtime.rows.len();
        let differences =
            reconcile::compare(&spec.compare, value.is_some(), width, batch, realtime);
        let created_at = unix_now_ms();
        let result =
            serde_json::json!({ "superseded": superseded, "differences": differences }).to_string();
        let id: i64 = with_pool!(self.db, pool => {
            sqlx::query(
                "INSERT INTO fleetgate_reconciliations (report, run_id, window_from, window_to, created_at, result) \
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            )
            .bind(name).bind(run).bind(from).bind(to).bind(created_at).bind(&result)
            .fetch_one(pool).await
            .and_then(|r| r.try_get(0))
        })
        .map_err(|e| format!("cannot store the reconciliation: {e}"))?;
        Ok(Reconciliation {
            id,
            report: name.to_string(),
            run,
            window_from: from,
            window_to: to,
            created_at,
            superseded,
            differences,
        })
    }

    async fn read(&self, sql: &str) -> Result<SideRows, String> {
        let limits = QueryLimits {
            max_rows: MAX_RECONCILED_ROWS,
            timeout: Duration::from_secs(300),
            // The store's own SQL, bounded by its rows: no bound on bytes.
            max_bytes: usize::MAX,
        };
        let result = query::run(&self.db, sql, &limits)
            .await
            .map_err(|e| format!("{sql}: {e}"))?;
        if result.truncated {
            return Err(format!(
                "more than {MAX_RECONCILED_ROWS} rows in the window; reconcile a shorter one"
            ));
        }
        Ok(SideRows { rows: result.rows })
    }

    /// Stored reconciliations, newest first.
    pub async fn reconciliations(
        &self,
        report: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Value>, String> {
        fn item<R: sqlx::Row>(r: &R) -> Result<Value, sqlx::Error>
        where
            usize: sqlx::ColumnIndex<R>,
            for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
            for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
            for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
        {
            let result: String = r.try_get(6)?;
            let mut item: Value = serde_json::from_str(&result).unwrap_or(Value::Null);
            item["id"] = r.try_get::<i64, _>(0)?.into();
            item["report"] = r.try_get::<String, _>(1)?.into();
            item["run"] = r.try_get::<Option<i64>, _>(2)?.into();
            item["window_from"] = r.try_get::<i64, _>(3)?.into();
            item["window_to"] = r.try_get::<i64, _>(4)?.into();
            item["created_at"] = r.try_get::<i64, _>(5)?.into();
            Ok(item)
        }
        with_pool!(self.db, pool => {
            sqlx::query(
                "SELECT id, report, run_id, window_from, window_to, created_at, result FROM fleetgate_reconciliations \
                 WHERE (CAST($1 AS TEXT) IS NULL OR report = $1) ORDER BY id DESC LIMIT $2",
            )
            .bind(report).bind(limit)
            .fetch_all(pool).await
            .and_then(|rows| rows.iter().map(item).collect())
        })
        .map_err(|e| format!("cannot read reconciliations: {e}"))
    }
}
