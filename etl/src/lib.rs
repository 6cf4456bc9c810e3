//! fleetgate's batch ETL: jobs declared in TOML extract from files and
//! databases, transform by rules, and load into batch tables — by hand or
//! on a schedule.
//!
//! - [`job`]: declarations and their checks.
//! - [`confine`]: what sources may reach (files under `--etl-dir`,
//!   configured databases that are not a fleetgate store).
//! - [`extract`]: sources, copied into the run's interim area, then read.
//! - [`transform`]: the rules, each a [`transform::Step`].
//! - [`expr`]: the SQL-syntax expressions rules use.
//! - [`load`]: the batch table, written in one transaction with the run's
//!   success.
//! - [`run`]: run records, progress and rejects.
//! - [`report`], [`reports`], [`reconcile`]: hybrid reports over a batch
//!   table and a stream, and the reconciliation of the two.
//! - [`analysis`]: per-device statistics and anomaly alerts.
//!
//! A run: record it → dump → read → transform → load (+ mark succeeded).
//! Whatever fails before the load's commit leaves the table untouched and
//! the run `failed` with the reason.

pub mod analysis;
pub mod confine;
pub mod declared;
pub mod expr;
pub mod extract;
pub mod job;
pub mod load;
pub mod reconcile;
pub mod report;
pub mod reports;
pub mod run;
pub mod schema;
pub mod transform;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fleetgate_protocol::unix_now_ms;
use fleetgate_store::{with_pool, Db};
use sqlx::Row as _;

use crate::declared::{Declared, Stored};
use crate::job::{JobDef, JobsFile, LoadMode};
use crate::run::{Progress, RejectRecord, RunRecord};
use crate::transform::{Context, Row};

const JOBS: Declared = Declared {
    kind: "job",
    table: "fleetgate_etl_jobs",
};

/// Interim directories kept per job; older ones are removed.
const KEPT_INTERIM_RUNS: usize = 5;

/// What a finished run tells whoever waits on it (reconciliation, the
/// caller of [`Etl::run`]).
pub type RunObserver = Arc<dyn Fn(&RunRecord) + Send + Sync>;

pub struct Etl {
    db: Db,
    data_dir: PathBuf,
    /// Where sources may read from.
    access: confine::SourceAccess,
    /// Runs of this process, with their live counts.
    active: Mutex<HashMap<i64, Arc<Progress>>>,
    /// Jobs with a run in this process: one at a time each.
    running: Mutex<HashSet<String>>,
    /// Every job's target table, for the query guard.
    tables: RwLock<Vec<String>>,
    observers: Mutex<Vec<RunObserver>>,
}

/// A job as listed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobInfo {
    pub name: String,
    pub definition: JobDef,
    pub updated_at: i64,
    /// When the schedule runs it next.
    pub next_run_at: Option<i64>,
}

impl Etl {
    /// Creates the ETL tables (idempotent).
    pub async fn open(
        db: Db,
        data_dir: &Path,
        access: confine::SourceAccess,
    ) -> Result<Arc<Etl>, String> {
        let mut ddl = run::ddl(&db);
        ddl.push(JOBS.ddl());
        db.execute_ddl(&ddl)
            .await
            .map_err(|e| format!("cannot create the ETL tables: {e}"))?;
        let etl = Arc::new(Etl {
            db,
            data_dir: data_dir.to_path_buf(),
            access,
            active: Mutex::default(),
            running: Mutex::default(),
            tables: RwLock::default(),
            observers: Mutex::default(),
        });
        etl.refresh_tables().await?;
        Ok(etl)
    }

    /// Calls `observer` after every run of this process ends.
    pub fn observe(&self, observer: RunObserver) {
        self.observers.lock().expect("observers").push(observer);
    }

    /// The batch tables jobs load into.
    pub fn tables(&self) -> Vec<String> {
        self.tables.read().expect("tables").clone()
    }

    async fn refresh_tables(&self) -> Result<(), String> {
        let jobs = self.jobs().await?;
        self.set_tables(&jobs);
        Ok(())
    }

    fn set_tables(&self, jobs: &[JobInfo]) {
        let mut tables: Vec<String> = jobs
            .iter()
            .map(|j| j.definition.load.table.clone())
            .collect();
        tables.sort();
        tables.dedup();
        *self.tables.write().expect("tables") = tables;
    }

    /// Declares (or replaces) the file's jobs. `taken` says whether a
    /// table name belongs to something else (a stream, a view).
    pub async fn apply(
        &self,
        file: &JobsFile,
        taken: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, String> {
        let jobs = self.jobs().await?;
        for (name, def) in &file.jobs {
            // Refused with the reason now, not at the first run: a file
            // outside --etl-dir, an unconfigured database, a store.
            self.access
                .check_job(def)
                .map_err(|e| format!("job {name}: {e}"))?;
            let table = &def.load.table;
            if taken(table) {
                return Err(format!("job {name}: {table} is already a stream or view"));
            }
            if let Some(other) = jobs
                .iter()
                .find(|j| j.name != *name && j.definition.load.table == *table)
            {
                return Err(format!(
                    "job {name}: job {} already loads {table}",
                    other.name
                ));
            }
        }
        JOBS.save(&self.db, &file.jobs, unix_now_ms()).await?;
        self.refresh_tables().await?;
        Ok(file.jobs.keys().cloned().collect())
    }

    pub async fn jobs(&self) -> Result<Vec<JobInfo>, String> {
        let mut jobs = Vec::new();
        for stored in JOBS.load::<JobDef>(&self.db).await? {
            let Stored {
                name,
                definition,
                updated_at,
            } = stored;
            let next_run_at = match definition.schedule() {
                Ok(Some(schedule)) => {
                    let last = self.last_due(&name).await?.unwrap_or(updated_at);
                    schedule.next_after(last.max(updated_at))
                }
                _ => None,
            };
            jobs.push(JobInfo {
                name,
                definition,
                updated_at,
                next_run_at,
            });
        }
        Ok(jobs)
    }

    pub async fn job(&self, name: &str) -> Result<Option<JobInfo>, String> {
        Ok(self.jobs().await?.into_iter().find(|j| j.name == name))
    }

    async fn require_job(&self, name: &str) -> Result<JobInfo, StartError> {
        self.job(name)
            .await
            .map_err(StartError::Failed)?
            .ok_or_else(|| StartError::NoSuchJob(name.to_string()))
    }

    /// Forgets a job; its table and runs stay.
    pub async fn delete(&self, name: &str) -> Result<bool, String> {
        let deleted = JOBS.delete(&self.db, name).await?;
        self.refresh_tables().await?;
        Ok(deleted)
    }

    async fn last_due(&self, job: &str) -> Result<Option<i64>, String> {
        with_pool!(self.db, pool => {
            sqlx::query("SELECT MAX(due_at) FROM fleetgate_etl_runs WHERE job = $1")
                .bind(job).fetch_one(pool).await
                .and_then(|r| r.try_get::<Option<i64>, _>(0))
        })
        .map_err(|e| format!("cannot read the runs of {job}: {e}"))
    }

    /// Starts a run and returns its id at once. `window` replaces the
    /// window the rows would give (rows outside it are rejected).
    pub async fn start(
        self: &Arc<Self>,
        name: &str,
        window: Option<(i64, i64)>,
    ) -> Result<i64, StartError> {
        let job = self.require_job(name).await?;
        self.begin(job, "manual", None, window)
            .await?
            .map(|(id, _)| id)
            .ok_or_else(|| StartError::Failed("the run was not recorded".into()))
    }

    async fn begin(
        self: &Arc<Self>,
        job: JobInfo,
        trigger: &str,
        due_at: Option<i64>,
        window: Option<(i64, i64)>,
    ) -> Result<Option<(i64, tokio::task::JoinHandle<()>)>, StartError> {
        if !self
            .running
            .lock()
            .expect("running")
            .insert(job.name.clone())
        {
            return Err(StartError::Busy(job.name));
        }
        let recorded = run::begin(
            &self.db,
            &job.name,
            &job.definition.load.table,
            trigger,
            due_at,
            unix_now_ms(),
        )
        .await;
        let id = match recorded {
            Ok(Some(id)) => id,
            other => {
                self.running.lock().expect("running").remove(&job.name);
                return other.map(|_| None).map_err(StartError::Failed);
            }
        };
        let progress = Arc::new(Progress::default());
        self.active
            .lock()
            .expect("active")
            .insert(id, progress.clone());
        let etl = self.clone();
        let task = tokio::spawn(async move {
            let interim = etl
                .data_dir
                .join("etl")
                .join(&job.name)
                .join(format!("run-{id}"));
            let result = etl.execute(id, &job, window, &progress, &interim).await;
            if let Err(e) = &result {
                tracing::warn!(job = job.name, run = id, error = %e, "ETL run failed");
                run::fail(&etl.db, id, &progress, e, unix_now_ms()).await;
            }
            etl.active.lock().expect("active").remove(&id);
            etl.running.lock().expect("running").remove(&job.name);
            prune_interim(&interim);
            if let Ok(Some(record)) = run::get(&etl.db, id, unix_now_ms()).await {
                let observers = etl.observers.lock().expect("observers").clone();
                for observer in observers {
                    observer(&record);
                }
            }
        });
        Ok(Some((id, task)))
    }

    /// Runs a job to its end.
    pub async fn run(
        self: &Arc<Self>,
        name: &str,
        window: Option<(i64, i64)>,
    ) -> Result<RunRecord, StartError> {
        let job = self.require_job(name).await?;
        let (id, task) = self
            .begin(job, "manual", None, window)
            .await?
            .ok_or_else(|| StartError::Failed("the run was not recorded".into()))?;
        task.await
            .map_err(|e| StartError::Failed(format!("the run stopped: {e}")))?;
        self.get_run(id)
            .await
            .map_err(StartError::Failed)?
            .ok_or_else(|| StartError::Failed(format!("run {id} has no record")))
    }

    /// A run's record, with live counts when this process runs it.
    pub async fn get_run(&self, id: i64) -> Result<Option<RunRecord>, String> {
        let mut record = run::get(&self.db, id, unix_now_ms()).await?;
        if let Some(record) = &mut record {
            self.live(record);
        }
        Ok(record)
    }

    pub async fn runs(&self, job: Option<&str>, limit: i64) -> Result<Vec<RunRecord>, String> {
        let mut records = run::list(&self.db, job, limit, unix_now_ms()).await?;
        for record in &mut records {
            self.live(record);
        }
        Ok(records)
    }

    /// A run this process is executing, as it stands now: running (its
    /// heartbeat may be late while a long SQLite load holds the only
    /// writer), with its live counts.
    fn live(&self, record: &mut RunRecord) {
        let progress = self.active.lock().expect("active").get(&record.id).cloned();
        let Some(progress) = progress else { return };
        if record.status == "running" || record.finished_at.is_none() {
            record.status = "running".into();
            record.error = None;
            let [read, transformed, loaded, rejected] = progress.counts();
            record.rows_read = read;
            record.rows_transformed = transformed;
            record.rows_loaded = loaded;
            record.rows_rejected = rejected;
        }
    }

    pub async fn rejects(&self, run: i64, limit: i64) -> Result<Vec<RejectRecord>, String> {
        run::rejects(&self.db, run, limit).await
    }

    async fn execute(
        &self,
        id: i64,
        job: &JobInfo,
        window: Option<(i64, i64)>,
        progress: &Arc<Progress>,
        interim: &Path,
    ) -> Result<(), String> {
        let def = &job.definition;
        let heartbeat = {
            let (db, progress) = (self.db.clone(), progress.clone());
            let interim = interim.display().to_string();
            tokio::spawn(async move {
                loop {
                    run::heartbeat(&db, id, &progress, &interim, unix_now_ms()).await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        };
        let _stop_heartbeat = AbortOnDrop(heartbeat);
        let mut dumps = Vec::new();
        for (name, source) in &def.sources {
            dumps.push(extract::dump(name, source, &interim.join(name), &self.access).await?);
        }
        let pipeline = def.pipeline()?;
        // Rows load while the rest is still read and transformed, unless a
        // rule (sort, aggregate) or the load (last row per key) needs them
        // all first.
        if pipeline.row_by_row() && def.load.key.is_none() && def.load.mode != LoadMode::Upsert {
            let output = pipeline.output().clone();
            return self
                .load_while_reading(id, def, &dumps, window, progress, output)
                .await;
        }
        let Transformed {
            rows,
            rejected,
            window,
            output,
        } = {
            let (def, progress, dumps) = (def.clone(), progress.clone(), dumps.clone());
            tokio::task::spawn_blocking(move || transform_all(&def, &dumps, &progress, window))
                .await
                .map_err(|e| format!("the transformation stopped: {e}"))??
        };
        let rejects = reject_records(def, &dumps, rejected);
        run::save_rejects(&self.db, id, &rejects).await?;
        let target = load::Load {
            def: &def.load,
            schema: &output,
            run: id,
            window,
        };
        load::load(&self.db, &target, rows, progress, unix_now_ms).await?;
        Ok(())
    }

    /// Reads and transforms the main source in batches on a blocking
    /// thread while the load writes each batch, in its transaction.
    async fn load_while_reading(
        &self,
        id: i64,
        def: &JobDef,
        dumps: &[Vec<PathBuf>],
        window: Option<(i64, i64)>,
        progress: &Arc<Progress>,
        output: schema::Schema,
    ) -> Result<(), String> {
        let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_QUEUE);
        let producer = {
            let (def, progress, dumps) = (def.clone(), progress.clone(), dumps.to_vec());
            tokio::task::spawn_blocking(move || stream_all(&def, &dumps, &progress, window, sender))
        };
        let end = async {
            let (rejected, window) = producer
                .await
                .map_err(|e| format!("the transformation stopped: {e}"))??;
            Ok(load::StreamEnd {
                window,
                rejects: reject_records(def, dumps, rejected),
            })
        };
        let target = load::Load {
            def: &def.load,
            schema: &output,
            run: id,
            window: None,
        };
        load::load_streamed(&self.db, target, receiver, progress, end, unix_now_ms).await?;
        Ok(())
    }

    /// Runs scheduled jobs when they are due; checks every second.
    pub fn schedule(self: &Arc<Self>) {
        let etl = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = etl.run_due().await {
                    tracing::warn!(error = %e, "cannot check the ETL schedule");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    async fn run_due(self: &Arc<Self>) -> Result<(), String> {
        let now = unix_now_ms();
        let jobs = self.jobs().await?;
        self.set_tables(&jobs);
        for job in jobs {
            let Ok(Some(schedule)) = job.definition.schedule() else {
                continue;
            };
            let Some(mut due) = job.next_run_at else {
                continue;
            };
            if due > now {
                continue;
            }
            // After a stop, run once for the latest missed time, not for each.
            while let Some(next) = schedule.next_after(due).filter(|n| *n <= now) {
                due = next;
            }
            match self.begin(job, "schedule", Some(due), None).await {
                Ok(_) | Err(StartError::Busy(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug)]
pub enum StartError {
    NoSuchJob(String),
    /// A run of the job is under way in this process.
    Busy(String),
    Failed(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::NoSuchJob(name) => write!(f, "no job named {name:?}"),
            StartError::Busy(name) => write!(f, "job {name} is already running"),
            StartError::Failed(e) => f.write_str(e),
        }
    }
}

type Rejected = Vec<(transform::Origin, String, String)>;

/// What the transformation hands the load: rows, rejects, the window.
struct Transformed {
    rows: Vec<Row>,
    rejected: Rejected,
    /// The time window the run covers.
    window: Option<(i64, i64)>,
    /// The loaded rows' columns.
    output: schema::Schema,
}

/// Reads every source's copy and applies the rules (CPU-bound: runs on a
/// blocking thread).
fn transform_all(
    def: &JobDef,
    dumps: &[Vec<PathBuf>],
    progress: &Progress,
    window: Option<(i64, i64)>,
) -> Result<Transformed, String> {
    let pipeline = def.pipeline()?;
    let mut rejected: Rejected = Vec::new();
    let mut by_source = HashMap::new();
    let mut main_rows = Vec::new();
    for (i, ((name, source), files)) in def.sources.iter().zip(dumps).enumerate() {
        let mut extract_rejects = Vec::new();
        let rows = extract::read(i as u16, source, files, progress, &mut extract_rejects)
            .map_err(|e| format!("source {name}: {e}"))?;
        rejected.extend(
            extract_rejects
                .into_iter()
                .map(|r| (r.origin, r.reason, r.raw)),
        );
        if i == 0 {
            main_rows = rows;
        } else {
            by_source.insert(name.clone(), rows);
        }
    }
    let mut context = Context {
        sources: &by_source,
        rejects: Vec::new(),
    };
    let mut rows = pipeline.apply(main_rows, &mut context);
    rejected.extend(
        context
            .rejects
            .into_iter()
            .map(|r| (r.origin, r.reason, r.row)),
    );
    let output = pipeline.output();
    let mut window = window;
    if let Some(time) = &def.load.time {
        let at = output.require(time)?;
        let mut span = None;
        rows = keep_in_window(rows, time, at, window, &mut span, &mut rejected);
        if window.is_none() {
            window = window_of(def, span)?;
        }
    }
    if let Some(key) = &def.load.key {
        let positions = key
            .iter()
            .map(|k| output.require(k))
            .collect::<Result<Vec<_>, _>>()?;
        rows = load::last_per_key(rows, &positions);
    }
    progress
        .transformed
        .store(rows.len() as u64, Ordering::Relaxed);
    progress
        .rejected
        .store(rejected.len() as u64, Ordering::Relaxed);
    Ok(Transformed {
        rows,
        rejected,
        window,
        output: output.clone(),
    })
}

/// Rows per batch when a run loads while it reads.
const STREAM_BATCH: usize = 20_000;
/// Batches transformed ahead of the load at most.
const STREAM_QUEUE: usize = 4;

/// Reads the joined sources whole, then the main source in batches, each
/// transformed and sent to the load; returns the rejects and the window.
fn stream_all(
    def: &JobDef,
    dumps: &[Vec<PathBuf>],
    progress: &Progress,
    window: Option<(i64, i64)>,
    sender: tokio::sync::mpsc::Sender<Vec<Row>>,
) -> Result<(Rejected, Option<(i64, i64)>), String> {
    let pipeline = def.pipeline()?;
    let mut rejected: Rejected = Vec::new();
    let mut by_source = HashMap::new();
    let mut extract_rejects = Vec::new();
    for (i, ((name, source), files)) in def.sources.iter().zip(dumps).enumerate().skip(1) {
        let rows = extract::read(i as u16, source, files, progress, &mut extract_rejects)
            .map_err(|e| format!("source {name}: {e}"))?;
        by_source.insert(name.clone(), rows);
    }
    let time = match &def.load.time {
        Some(time) => Some((time.as_str(), pipeline.output().require(time)?)),
        None => None,
    };
    let mut span = None;
    let (main, source) = def.sources.get_index(0).ok_or("the job has no source")?;
    extract::read_each(
        0,
        source,
        &dumps[0],
        progress,
        &mut extract_rejects,
        STREAM_BATCH,
        &mut |batch| {
            let mut context = Context {
                sources: &by_source,
                rejects: Vec::new(),
            };
            let mut rows = pipeline.apply(batch, &mut context);
            rejected.extend(
                context
                    .rejects
                    .into_iter()
                    .map(|r| (r.origin, r.reason, r.row)),
            );
            if let Some((time, at)) = time {
                rows = keep_in_window(rows, time, at, window, &mut span, &mut rejected);
            }
            progress
                .transformed
                .fetch_add(rows.len() as u64, Ordering::Relaxed);
            progress
                .rejected
                .store(rejected.len() as u64, Ordering::Relaxed);
            sender
                .blocking_send(rows)
                .map_err(|_| "the load stopped".to_string())
        },
    )
    .map_err(|e| format!("source {main}: {e}"))?;
    rejected.extend(
        extract_rejects
            .into_iter()
            .map(|r| (r.origin, r.reason, r.raw)),
    );
    progress
        .rejected
        .store(rejected.len() as u64, Ordering::Relaxed);
    let window = match window {
        Some(window) => Some(window),
        None => window_of(def, span)?,
    };
    Ok((rejected, window))
}

/// Keeps the rows whose load time lies in `window` (when one was given),
/// rejecting the others and those without a time; widens `span` by the
/// times kept.
fn keep_in_window(
    rows: Vec<Row>,
    time: &str,
    at: usize,
    window: Option<(i64, i64)>,
    span: &mut Option<(i64, i64)>,
    rejected: &mut Rejected,
) -> Vec<Row> {
    use fleetgate_store::values::SqlValue;
    let mut kept = Vec::with_capacity(rows.len());
    for row in rows {
        let reason = match (&row.values[at], window) {
            (SqlValue::Int(t), Some((from, to))) if *t < from || *t >= to => {
                Some(format!("{time} is outside the run's window"))
            }
            (SqlValue::Int(t), _) => {
                *span = Some(span.map_or((*t, *t), |(a, b)| (a.min(*t), b.max(*t))));
                None
            }
            _ => Some(format!("{time} is empty")),
        };
        match reason {
            None => kept.push(row),
            Some(reason) => rejected.push((row.origin, reason, String::new())),
        }
    }
    kept
}

/// The window the loaded times span, widened to whole `covers` periods.
fn window_of(def: &JobDef, span: Option<(i64, i64)>) -> Result<Option<(i64, i64)>, String> {
    let covers = def.load.covers()?.map(|d| d.as_millis() as i64);
    Ok(span.map(|(first, last)| match covers {
        Some(p) => (first.div_euclid(p) * p, (last.div_euclid(p) + 1) * p),
        None => (first, last + 1),
    }))
}

/// Rejects as the run records them: which source, file and line.
fn reject_records(def: &JobDef, dumps: &[Vec<PathBuf>], rejected: Rejected) -> Vec<RejectRecord> {
    rejected
        .into_iter()
        .map(|(origin, reason, data)| {
            let (source, _) = def
                .sources
                .get_index(origin.source as usize)
                .expect("source index");
            RejectRecord {
                source: source.clone(),
                file: dumps[origin.source as usize]
                    .get(origin.file as usize)
                    .and_then(|f| f.file_name())
                    .map(|f| {
                        f.to_string_lossy()
                            .split_once('-')
                            .map_or(String::new(), |(_, n)| n.to_string())
                    }),
                line: Some(origin.line as i64),
                reason,
                data,
            }
        })
        .collect()
}

/// Removes all but the newest interim directories of the run's job.
fn prune_interim(run_dir: &Path) {
    let Some(job_dir) = run_dir.parent() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(job_dir) else {
        return;
    };
    let mut runs: Vec<(i64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let id = e.file_name().to_str()?.strip_prefix("run-")?.parse().ok()?;
            Some((id, e.path()))
        })
        .collect();
    runs.sort();
    let excess = runs.len().saturating_sub(KEPT_INTERIM_RUNS);
    for (_, dir) in runs.into_iter().take(excess) {
        let _ = std::fs::remove_dir_all(dir);
    }
}
