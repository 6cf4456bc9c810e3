//! Views: aggregates the store maintains over a stream, and the routing
//! that answers queries from them.
//!
//! - [`def`]: a declared view checked against its source, and its SQL.
//! - [`rewrite`]: a query over a stream as the same query over a view.
//! - [`rows`]: rows views (a subset of fields and derived columns under a
//!   key of their own, or an index), and the queries they answer.
//! - [`shape`]: the view a query would need, with its literal values taken out.
//! - [`auto`]: automatic views, created for recurring costly shapes within a
//!   budget and dropped when unused.
//! - [`sweep`]: folding a realtime view on SQLite from its watermark, in
//!   slices that give the writer back to ingest.
//!
//! The writer does not know views exist, every store node of a cluster
//! maintains them alike, and a record that was not inserted (a re-sent key)
//! is not counted. Realtime aggregate views are folded from the source rows
//! after a watermark, off the ingest path: on SQLite a rowid, folded by
//! [`sweep`]; on PostgreSQL a snapshot (see [`def::CUTS`]), folded in one
//! statement a round. Queries add the rows after it. Other views are kept
//! by a trigger on the source table, inside each ingest commit.

pub mod auto;
pub mod def;
pub mod rewrite;
#[cfg(test)]
mod route_fixtures;
pub mod rows;
pub mod shape;
pub mod sweep;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlparser::ast::Query;
use sqlx::Row;

use crate::catalog::Catalog;
use crate::db::{Backend, Db, Pools};
use crate::{with_pool, with_reading_pool};
pub use auto::{AutoSettings, ShapeInfo};
pub use def::{Refresh, ViewDef, ViewPlan, ViewsFile};

#[derive(Debug, Clone, Serialize)]
pub struct ViewInfo {
    pub name: String,
    /// The stream its rows come from.
    pub source: String,
    /// The view it is declared over, if any.
    pub built_on: Option<String>,
    /// `aggregate`, or `rows` (a subset of fields under a key of its own,
    /// or an index).
    pub kind: &'static str,
    pub origin: Origin,
    pub refresh: String,
    pub definition: ViewDef,
    /// Rows in the view's table and its unfolded tail.
    pub rows: i64,
    /// Of those, tail rows not folded into the table yet: how far the
    /// folder is behind (queries read them meanwhile).
    pub unfolded: i64,
    /// Bytes its tables take.
    pub bytes: i64,
    pub created_at: i64,
}

/// Who made a view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// By a user, with `fleetgate view create` or `POST /v1/views`.
    Declared,
    /// By the store, for a recurring query shape ([`auto`]).
    Auto,
}

impl Origin {
    fn as_str(self) -> &'static str {
        match self {
            Origin::Declared => "declared",
            Origin::Auto => "auto",
        }
    }
}

/// A view in the catalog.
#[derive(Clone)]
struct Entry {
    plan: Arc<ViewPlan>,
    origin: Origin,
    created_at: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub view: String,
    pub usable: bool,
    pub reason: String,
}

/// Where a query runs, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Route {
    /// The view that answers it; `None` for the primary table.
    pub view: Option<String>,
    /// What runs.
    pub sql: String,
    pub candidates: Vec<Candidate>,
}

/// Why views could not be created or dropped: what the caller tells its
/// own caller differs (the declaration is wrong, a name is taken, another
/// view depends on it, or the database failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewError {
    /// The declaration cannot be a view; says why.
    Invalid(String),
    /// A view of that name exists.
    Exists(String),
    /// `dependent` is built on `view`, which cannot go before it.
    DependedOn { view: String, dependent: String },
    /// The database failed; the request itself may be fine.
    Database(String),
}

impl std::fmt::Display for ViewError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ViewError::Invalid(why) | ViewError::Database(why) => f.write_str(why),
            ViewError::Exists(name) => write!(f, "view {name} exists; drop it first to change it"),
            ViewError::DependedOn { view, dependent } => {
                write!(f, "view {dependent} is built on {view}; drop it first")
            }
        }
    }
}

impl std::error::Error for ViewError {}

/// The wait between two rounds of [`Views::follow`]. On PostgreSQL it is
/// twice as long as the round's folds took, within these bounds. When
/// records arrive out of order a fold rewrites most groups of a view,
/// however few rows it takes, so rounds one second apart kept a core busy
/// with folds at 80,000 records/s; this keeps folds to about a third of
/// the time. Queries pay for the wait: they aggregate the rows not folded
/// yet themselves, at most 8 s of them plus a round.
const FOLD_PAUSE: std::ops::Range<Duration> = Duration::from_secs(1)..Duration::from_secs(8);

pub struct Views {
    db: Db,
    catalog: Catalog,
    entries: RwLock<BTreeMap<String, Entry>>,
    folded: Mutex<HashMap<String, Instant>>,
    /// Groups each watermark view's last fold wrote (see [`Views::fold`]).
    fold_groups: Mutex<HashMap<String, u64>>,
    /// The server runs `MERGE` (PostgreSQL 15 or later); see
    /// [`ViewPlan::merge_statement`].
    merge_statement: bool,
    /// PostgreSQL sources known to have statistics (see
    /// [`Views::analyze_once`]).
    analyzed: Mutex<std::collections::HashSet<String>>,
    auto: AutoSettings,
    /// Query shapes seen since they were last written to the shape log.
    shapes: Mutex<HashMap<String, auto::ShapeLog>>,
    /// Views that answered queries since usage was last recorded: unix ms.
    used: Mutex<HashMap<String, i64>>,
    budget_checked: Mutex<Option<Instant>>,
}

impl Views {
    pub async fn open(db: Db, catalog: Catalog, auto: AutoSettings) -> Result<Views, String> {
        db.execute_ddl(&[
            "CREATE TABLE IF NOT EXISTS fleetgate_views (name TEXT PRIMARY KEY, \
             definition TEXT NOT NULL, origin TEXT NOT NULL, created_at BIGINT NOT NULL)"
                .to_string(),
            auto::SHAPES_DDL.to_string(),
            auto::USAGE_DDL.to_string(),
        ])
        .await
        .map_err(|e| format!("cannot create the view catalog: {e}"))?;
        let mut merge_statement = false;
        match db.backend() {
            Backend::Sqlite => create_marks(&db).await?,
            Backend::Postgres => {
                merge_statement = with_pool!(db, pool => {
                    sqlx::query_scalar(
                        "SELECT current_setting('server_version_num')::int >= 150000",
                    )
                    .fetch_one(pool)
                    .await
                })
                .map_err(|e| format!("cannot read PostgreSQL's version: {e}"))?;
                // Processes starting together: one replaces the function
                // at a time.
                let mut ddl = vec![
                    "SELECT pg_advisory_xact_lock(hashtext('fleetgate_view_cuts'))".to_string(),
                ];
                ddl.extend(def::CUTS_DDL.map(String::from));
                db.execute_ddl(&ddl)
                    .await
                    .map_err(|e| format!("cannot create the views' cuts: {e}"))?;
            }
        }
        let views = Views {
            db,
            catalog,
            entries: RwLock::default(),
            folded: Mutex::default(),
            fold_groups: Mutex::default(),
            merge_statement,
            analyzed: Mutex::default(),
            auto,
            shapes: Mutex::default(),
            used: Mutex::default(),
            budget_checked: Mutex::default(),
        };
        views.reload().await?;
        views.adopt_watermarks().await?;
        Ok(views)
    }

    /// Realtime views an earlier version kept with a trigger: the trigger
    /// goes, and the watermark starts where the trigger's counting ended
    /// (on SQLite the source's last row).
    async fn adopt_watermarks(&self) -> Result<(), String> {
        let marks = match self.db.backend() {
            Backend::Sqlite => def::MARKS,
            Backend::Postgres => def::CUTS,
        };
        for plan in self.plans().into_iter().filter(|p| p.watermark) {
            let marked: Option<String> = with_pool!(self.db, pool => {
                sqlx::query_scalar(&format!("SELECT name FROM {marks} WHERE name = $1"))
                    .bind(&plan.name)
                    .fetch_optional(pool)
                    .await
            })
            .map_err(|e| format!("cannot read view {}'s watermark: {e}", plan.name))?;
            if marked.is_some() {
                continue;
            }
            let statements = match self.db.backend() {
                Backend::Postgres => plan.adopt_cut_sql(),
                Backend::Sqlite => {
                    let mut statements = vec![format!("DROP TRIGGER IF EXISTS {}", plan.trigger())];
                    statements.extend(plan.mark_sql());
                    statements
                }
            };
            self.db
                .execute_ddl(&statements)
                .await
                .map_err(|e| format!("cannot give view {} a watermark: {e}", plan.name))?;
            tracing::info!(view = %plan.name, "realtime view now folded from a watermark");
        }
        Ok(())
    }

    /// Reads the view catalog again (another broker may have changed it).
    pub async fn reload(&self) -> Result<(), String> {
        let rows: Vec<(String, String, String, i64)> = with_pool!(self.db, pool => {
            sqlx::query("SELECT name, definition, origin, created_at FROM fleetgate_views")
                .fetch_all(pool)
                .await
                .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect())
        })
        .map_err(|e| format!("cannot read the view catalog: {e}"))?;
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        // A view over a view is planned after the view it is built on.
        let mut pending: Vec<(String, String, String, i64)> = rows;
        while !pending.is_empty() {
            let before = pending.len();
            let mut waiting = Vec::new();
            for (name, definition, origin, created_at) in pending {
                let def = match serde_json::from_str::<ViewDef>(&definition) {
                    Ok(def) => def,
                    Err(e) => {
                        tracing::error!(view = %name, error = %e, "view cannot be used");
                        continue;
                    }
                };
                let over = entries.get(&def.source).map(|e| e.plan.clone());
                if over.is_none() && self.catalog.get(&def.source).is_none() {
                    waiting.push((name, definition, origin, created_at));
                    continue;
                }
                match self.plan_def(&name, &def, over.as_deref()) {
                    Ok(plan) => {
                        let origin = if origin == "auto" {
                            Origin::Auto
                        } else {
                            Origin::Declared
                        };
                        let plan = Arc::new(plan);
                        entries.insert(
                            name,
                            Entry {
                                plan,
                                origin,
                                created_at,
                            },
                        );
                    }
                    Err(e) => tracing::error!(view = %name, error = %e, "view cannot be used"),
                }
            }
            if waiting.len() == before {
                for (name, definition, ..) in &waiting {
                    tracing::error!(view = %name, definition, "view cannot be used: its source is gone");
                }
                break;
            }
            pending = waiting;
        }
        *self.entries.write().expect("views lock") = entries;
        Ok(())
    }

    /// Plans `def`, over the view `over` when its source is one.
    fn plan_def(
        &self,
        name: &str,
        def: &ViewDef,
        over: Option<&ViewPlan>,
    ) -> Result<ViewPlan, String> {
        let stream_name = over.map_or(def.source.as_str(), |v| v.source());
        let stream = self
            .catalog
            .get(stream_name)
            .ok_or_else(|| format!("view {name}: unknown source stream {stream_name:?}"))?;
        let mut plan = ViewPlan::new(name, def, &stream, over)?;
        plan.merge_statement = self.merge_statement;
        Ok(plan)
    }

    fn entries(&self) -> Vec<Entry> {
        self.entries
            .read()
            .expect("views lock")
            .values()
            .cloned()
            .collect()
    }

    pub fn plans(&self) -> Vec<Arc<ViewPlan>> {
        self.entries().into_iter().map(|e| e.plan).collect()
    }

    fn plan(&self, name: &str) -> Option<Arc<ViewPlan>> {
        self.entries
            .read()
            .expect("views lock")
            .get(name)
            .map(|e| e.plan.clone())
    }

    pub async fn list(&self) -> Result<Vec<ViewInfo>, String> {
        let mut out = Vec::new();
        for Entry {
            plan,
            origin,
            created_at,
        } in self.entries()
        {
            let sql = format!(
                "SELECT (SELECT count(*) FROM {}), ({})",
                plan.table(),
                plan.unfolded_count_sql()
            );
            let counted: Result<(i64, i64), String> =
                with_reading_pool!(self.db, pool => sqlx::query_as(&sql).fetch_one(pool).await)
                    .map_err(|e| format!("cannot count view {}: {e}", plan.name));
            let sized = match counted {
                Ok(rows) => self.bytes(&plan).await.map(|bytes| (rows, bytes)),
                Err(e) => Err(e),
            };
            let ((folded, unfolded), bytes) = match sized {
                Ok(sized) => sized,
                Err(e) => {
                    // Dropped meanwhile (by the automatic-view loop, or
                    // another broker): no longer listed.
                    self.reload().await?;
                    if self.plan(&plan.name).is_none() {
                        continue;
                    }
                    return Err(e);
                }
            };
            out.push(ViewInfo {
                name: plan.name.clone(),
                source: plan.source().to_string(),
                built_on: plan.built_on().map(str::to_string),
                kind: if plan.rows.is_some() {
                    "rows"
                } else {
                    "aggregate"
                },
                origin,
                bytes,
                created_at,
                refresh: match plan.refresh {
                    Refresh::Realtime => "realtime".into(),
                    Refresh::OnDemand => "on_demand".into(),
                    Refresh::Every(period) => {
                        format!("every {}", humantime::format_duration(period))
                    }
                },
                definition: plan.def.clone(),
                // A watermark view's unfolded are source rows, not partials.
                rows: if plan.watermark {
                    folded
                } else {
                    folded + unfolded
                },
                unfolded,
            });
        }
        Ok(out)
    }

    /// Checks every view of `file` first, then creates each (tables,
    /// trigger, rows already in the source) in a transaction of its own.
    pub async fn create(&self, file: &ViewsFile) -> Result<Vec<String>, ViewError> {
        self.reload().await.map_err(ViewError::Database)?;
        let mut planned: Vec<ViewPlan> = Vec::new();
        // In dependency order: a view over another of the file comes after it.
        let mut pending: Vec<(&String, &ViewDef)> = file.views.iter().collect();
        while !pending.is_empty() {
            let before = pending.len();
            let mut waiting = Vec::new();
            for (name, def) in pending {
                if self.plan(name).is_some() {
                    return Err(ViewError::Exists(name.clone()));
                }
                if def.source == *name {
                    return Err(ViewError::Invalid(format!(
                        "view {name}: a view cannot be its own source"
                    )));
                }
                let over = match planned.iter().find(|p| p.name == def.source) {
                    Some(plan) => Some(Arc::new(plan.clone())),
                    None if file.views.contains_key(&def.source) => {
                        waiting.push((name, def));
                        continue;
                    }
                    None => self.plan(&def.source),
                };
                if over.is_none() && self.catalog.get(&def.source).is_none() {
                    return Err(ViewError::Invalid(format!(
                        "view {name}: unknown source {:?} (neither a stream nor a view)",
                        def.source
                    )));
                }
                let plan = self.plan_def(name, def, over.as_deref());
                planned.push(plan.map_err(ViewError::Invalid)?);
            }
            if waiting.len() == before {
                let mut cycle: Vec<String> = waiting
                    .iter()
                    .map(|(n, d)| format!("{n} -> {}", d.source))
                    .collect();
                cycle.sort();
                return Err(ViewError::Invalid(format!(
                    "views form a cycle ({}): each must reach a stream",
                    cycle.join(", ")
                )));
            }
            pending = waiting;
        }
        let mut created = Vec::new();
        for plan in planned {
            created.push(plan.name.clone());
            self.install(plan, Origin::Declared).await?;
        }
        Ok(created)
    }

    /// Creates a checked view: tables, trigger, rows already in the source
    /// and its catalog entry, in one transaction. A watermark view over a
    /// stream in one table is created empty instead and swept in before
    /// this returns: taking in a big stream in one transaction would hold
    /// SQLite's one writer, and ingest with it, for seconds.
    async fn install(&self, plan: ViewPlan, origin: Origin) -> Result<(), ViewError> {
        let backend = self.db.backend();
        let gone = || {
            ViewError::Invalid(format!(
                "view {}: stream {} is gone",
                plan.name,
                plan.source()
            ))
        };
        let source = self.catalog.get(plan.source()).ok_or_else(gone)?;
        // Its trigger reads columns: fields it needs come out of `extra`.
        for column in plan.source_columns() {
            if source.compacted.contains(column) {
                self.catalog
                    .promote(plan.source(), column)
                    .await
                    .map_err(ViewError::Database)?;
            }
        }
        let source = self.catalog.get(plan.source()).ok_or_else(gone)?;
        let swept_in = plan.watermark && !source.tiered() && backend == Backend::Sqlite;
        let mut statements = plan.create_sql();
        statements.push(match swept_in {
            true => plan.unmark_sql(),
            false => plan.backfill_sql(&source.read_from()),
        });
        let definition = serde_json::to_string(&plan.def).expect("view serializes");
        let now = fleetgate_protocol::unix_now_ms();
        with_pool!(self.db, pool => async {
            let mut tx = pool.begin().await?;
            for statement in &statements {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO fleetgate_views (name, definition, origin, created_at) VALUES ($1, $2, $3, $4)")
                .bind(&plan.name)
                .bind(&definition)
                .bind(origin.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }.await)
        .map_err(|e| ViewError::Database(format!("cannot create view {}: {e}", plan.name)))?;
        if swept_in {
            // Created: queries through it are exact meanwhile, only slower;
            // a failed sweep is taken up by the next round.
            if let Err(e) = self.fold(&plan).await {
                tracing::warn!(view = %plan.name, error = %e, "cannot take in the rows already stored yet");
            }
        }
        tracing::info!(view = %plan.name, source = %plan.source(), origin = origin.as_str(), "view created");
        self.entries.write().expect("views lock").insert(
            plan.name.clone(),
            Entry {
                plan: Arc::new(plan),
                origin,
                created_at: now,
            },
        );
        Ok(())
    }

    /// `Ok(false)` when there is no such view.
    pub async fn drop_view(&self, name: &str) -> Result<bool, ViewError> {
        self.reload().await.map_err(ViewError::Database)?;
        let Some(plan) = self.plan(name) else {
            return Ok(false);
        };
        if let Some(dependent) = self.dependent(name) {
            return Err(ViewError::DependedOn {
                view: name.to_string(),
                dependent,
            });
        }
        let statements = plan.drop_sql();
        with_pool!(self.db, pool => async {
            let mut tx = pool.begin().await?;
            for statement in &statements {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            sqlx::query("DELETE FROM fleetgate_views WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM fleetgate_view_usage WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }.await)
        .map_err(|e| ViewError::Database(format!("cannot drop view {name}: {e}")))?;
        self.entries.write().expect("views lock").remove(name);
        tracing::info!(view = %name, "view dropped");
        Ok(true)
    }

    /// A view declared over `name`, if any (`name` cannot be dropped
    /// before it).
    pub fn dependent(&self, name: &str) -> Option<String> {
        self.plans()
            .iter()
            .find(|p| p.built_on() == Some(name))
            .map(|p| p.name.clone())
    }

    /// Folds a view's tail into its table; a watermark view, every row
    /// stored when the fold began.
    pub async fn fold(&self, plan: &ViewPlan) -> Result<(), String> {
        let backend = self.db.backend();
        if plan.watermark && backend == Backend::Sqlite {
            return self.sweep_up_to_now(plan, usize::MAX).await;
        }
        let statements = match plan.watermark {
            true => plan.fold_cut_sql(),
            false => plan.fold_sql(),
        };
        // PostgreSQL: expiry, swaps and view creation lock the source in
        // SHARE ROW EXCLUSIVE mode while they rewrite a view; this mode
        // waits for them (and they for it) but not for ingest, whose
        // appends go on during the fold. SQLite has one writer anyway.
        let serialize = format!(
            "LOCK TABLE {} IN SHARE UPDATE EXCLUSIVE MODE",
            plan.source()
        );
        let settings = match backend {
            Backend::Postgres if plan.watermark => self.fold_settings(plan).await,
            _ => Vec::new(),
        };
        let merged = with_pool!(self.db, pool => async {
            let mut tx = pool.begin().await?;
            for setting in &settings {
                sqlx::query(setting).execute(&mut *tx).await?;
            }
            if backend == Backend::Postgres && !plan.watermark {
                sqlx::query(&serialize).execute(&mut *tx).await?;
            }
            let mut merged = 0;
            for statement in &statements {
                merged += sqlx::query(statement).execute(&mut *tx).await?.rows_affected();
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(merged)
        }.await)
        .map_err(|e| format!("cannot refresh view {}: {e}", plan.name))?;
        if plan.watermark && merged > 0 {
            self.analyze_once(plan.source()).await;
        }
        if plan.watermark {
            self.fold_groups
                .lock()
                .expect("fold groups lock")
                .insert(plan.name.clone(), merged);
        }
        self.folded
            .lock()
            .expect("folded lock")
            .insert(plan.name.clone(), Instant::now());
        Ok(())
    }

    /// A PostgreSQL fold's session settings, for its transaction. A fold
    /// reads a second's rows or more, but the planner, whose statistics
    /// end before them, expects a few: so the sort or hash of hundreds of
    /// thousands of rows gets memory instead of spilling to disk (4 MB by
    /// default: a fifth of the fold's time went to an external merge), and
    /// no JIT compilation, which costs more than so short a statement
    /// gains. When the last fold wrote at least an eighth of the table's
    /// groups, `MERGE` joins by one pass over the table rather than an
    /// index probe per group: half the time at 168,000 groups
    /// (BENCHMARKS.md).
    async fn fold_settings(&self, plan: &ViewPlan) -> Vec<&'static str> {
        let mut settings = vec!["SET LOCAL work_mem = '64MB'", "SET LOCAL jit = off"];
        let last_groups = self
            .fold_groups
            .lock()
            .expect("fold groups lock")
            .get(&plan.name)
            .copied();
        let (Some(last_groups), true, Pools::Postgres { write, .. }) =
            (last_groups, plan.merge_statement, &self.db.pools)
        else {
            return settings;
        };
        // -1 until the table is first vacuumed or analyzed.
        let groups: Result<f32, _> =
            sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = $1::regclass")
                .bind(plan.table())
                .fetch_one(write)
                .await;
        if groups.is_ok_and(|groups| last_groups as f32 * 8.0 >= groups) {
            settings.push("SET LOCAL enable_nestloop = off");
        }
        settings
    }

    /// Gives a PostgreSQL source statistics if it has none yet. Queries
    /// through a watermark view read the source's rows after the cut's
    /// oldest xid; with statistics (however old: past their histogram the
    /// planner asks the index) the planner knows those are few. Without,
    /// as after a bulk load into a new stream before autovacuum came by,
    /// it guessed a third of a 10M-row table, and compiling that plan
    /// (JIT) took 300 ms of a query that then read no row.
    async fn analyze_once(&self, source: &str) {
        if self
            .analyzed
            .lock()
            .expect("analyzed lock")
            .contains(source)
        {
            return;
        }
        let Pools::Postgres { write, .. } = &self.db.pools else {
            return;
        };
        let has_statistics =
            "SELECT EXISTS (SELECT 1 FROM pg_stats WHERE schemaname = current_schema() \
             AND tablename = $1 AND attname = $2)";
        let analyzed = async {
            let known: bool = sqlx::query_scalar(has_statistics)
                .bind(source)
                .bind(crate::catalog::INSERT_XID)
                .fetch_one(write)
                .await?;
            if !known {
                sqlx::query(&format!("ANALYZE {source}"))
                    .execute(write)
                    .await?;
            }
            Ok::<_, sqlx::Error>(())
        };
        match analyzed.await {
            Ok(()) => {
                self.analyzed
                    .lock()
                    .expect("analyzed lock")
                    .insert(source.to_string());
            }
            Err(e) => tracing::warn!(stream = %source, error = %e, "cannot analyze the stream"),
        }
    }

    /// For an operation that takes rows out of `stream` (expiry, a tier
    /// move, a swap), in its transaction: what to run before (every
    /// watermark view folds the rows after its watermark, so none leaves
    /// unseen) and after (the watermarks back on the last row left).
    pub fn around_removal(&self, stream: &str) -> (Vec<String>, Vec<String>) {
        let plans = self.plans();
        let of_stream = || plans.iter().filter(|p| p.source() == stream);
        (
            of_stream().flat_map(|p| p.settle_sql()).collect(),
            of_stream().flat_map(|p| p.mark_sql()).collect(),
        )
    }

    /// For a tier move of `stream`, which lets ingest go on: a condition
    /// (`" AND …"`, or empty) that keeps in the hot table the rows a
    /// watermark view has not folded, since a row that committed after the
    /// move's folds must not reach the cold tier unseen. They move on the
    /// next round.
    pub fn folded_in_every_view(&self, stream: &str) -> String {
        self.plans()
            .iter()
            .filter(|p| p.source() == stream)
            .filter_map(|p| p.folded_rows())
            .map(|condition| format!(" AND {condition}"))
            .collect()
    }

    /// Sweeps one batch of a watermark view. `Some(to)`: the table now
    /// holds the rows up to `to`; `None`: nothing was left to fold.
    async fn sweep(&self, plan: &ViewPlan) -> Result<Option<i64>, String> {
        let limits = sweep::SweepLimits::default();
        let failed = |e: sqlx::Error| format!("cannot fold view {}: {e}", plan.name);
        // Overtaken (a removal or rebuild moved the marks meanwhile): read
        // the batch again.
        loop {
            let Some(batch) = sweep::Batch::read(&self.db, plan, &limits)
                .await
                .map_err(failed)?
            else {
                return Ok(None);
            };
            match batch.merge(&self.db, plan, &limits).await.map_err(failed)? {
                sweep::Merged::Done { to } => return Ok(Some(to)),
                sweep::Merged::Paused | sweep::Merged::Overtaken => {}
            }
        }
    }

    /// Sweeps a watermark view batch by batch until it holds every row
    /// there was when it started, or `batches` of them; ingest commits
    /// between slices.
    async fn sweep_up_to_now(&self, plan: &ViewPlan, batches: usize) -> Result<(), String> {
        let target: i64 = with_reading_pool!(self.db, pool => {
            sqlx::query_scalar(&format!("SELECT COALESCE(max(rowid), 0) FROM {}", plan.source()))
                .fetch_one(pool)
                .await
        })
        .map_err(|e| format!("cannot fold view {}: {e}", plan.name))?;
        for _ in 0..batches {
            match self.sweep(plan).await? {
                Some(to) if to < target => {}
                _ => break,
            }
        }
        Ok(())
    }

    /// A round's folding of a watermark view: on SQLite a few batches at
    /// most, the next round goes on; on PostgreSQL every row its cut does
    /// not see.
    async fn catch_up(&self, plan: &ViewPlan) {
        let folded = match self.db.backend() {
            Backend::Sqlite => self.sweep_up_to_now(plan, 8).await,
            Backend::Postgres => self.fold(plan).await,
        };
        if let Err(e) = folded {
            tracing::warn!(error = %e, "realtime view fold failed");
        }
    }

    /// Every second or more (see [`FOLD_PAUSE`]): re-reads the catalog,
    /// folds watermark views, refreshes periodic views when due, and runs a
    /// round of automatic views.
    pub fn follow(self: &Arc<Self>) {
        let views = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut pause = FOLD_PAUSE.start;
            loop {
                tokio::time::sleep(pause).await;
                let Some(views) = views.upgrade() else { return };
                if let Err(e) = views.reload().await {
                    tracing::warn!(error = %e, "cannot reload views");
                }
                let mut folding = Duration::ZERO;
                for plan in views.plans() {
                    if plan.watermark {
                        let started = Instant::now();
                        views.catch_up(&plan).await;
                        folding += started.elapsed();
                        continue;
                    }
                    let Refresh::Every(period) = plan.refresh else {
                        continue;
                    };
                    let last = views
                        .folded
                        .lock()
                        .expect("folded lock")
                        .get(&plan.name)
                        .copied();
                    if last.is_some_and(|at| at.elapsed() < period) {
                        continue;
                    }
                    if let Err(e) = views.fold(&plan).await {
                        tracing::warn!(error = %e, "periodic view refresh failed");
                    }
                }
                views.advise().await;
                pause = match views.db.backend() {
                    Backend::Postgres => (folding * 2).clamp(FOLD_PAUSE.start, FOLD_PAUSE.end),
                    // A sweep paces itself, in slices (see `sweep`).
                    Backend::Sqlite => FOLD_PAUSE.start,
                };
            }
        });
    }

    /// Whether any view exists (if none, there is nothing to route).
    pub fn is_empty(&self) -> bool {
        self.entries.read().expect("views lock").is_empty()
    }

    /// Picks the cheapest view that answers `query` exactly (`sql` as the
    /// query guard parsed it), whose result columns are `names`; a view
    /// with a ttl of its own before any other.
    pub fn route(&self, sql: &str, query: &Query, names: &[String]) -> Route {
        let backend = self.db.backend();
        let mut candidates = Vec::new();
        let mut usable = Vec::new();
        for plan in self.plans() {
            let leads = self
                .catalog
                .get(plan.source())
                .map(|stream| rows::table_leads(&stream))
                .unwrap_or_default();
            match rewrite::rewrite(query, &plan, names, backend, &leads) {
                Ok(rewritten) => {
                    let reason = match &plan.def.ttl {
                        Some(ttl) => format!(
                            "answers the query, with the buckets it keeps for {ttl} (after the stream's rows expire)"
                        ),
                        None => "answers the query exactly".into(),
                    };
                    candidates.push(Candidate {
                        view: plan.name.clone(),
                        usable: true,
                        reason,
                    });
                    usable.push((plan, rewritten));
                }
                Err(reason) => candidates.push(Candidate {
                    view: plan.name.clone(),
                    usable: false,
                    reason,
                }),
            }
        }
        // A view that keeps history its stream has expired answers first, so
        // the same query gets the same history whichever other views exist.
        let Some((plan, rewritten)) = usable
            .into_iter()
            .min_by_key(|(plan, _)| (plan.ttl.is_none(), rewrite::rank(plan)))
        else {
            return Route {
                view: None,
                sql: sql.to_string(),
                candidates,
            };
        };
        for candidate in &mut candidates {
            if candidate.usable && candidate.view != plan.name {
                candidate.reason = if plan.ttl.is_some() {
                    format!("answers the query, but {} keeps more history", plan.name)
                } else {
                    format!("answers the query, but {} is cheaper", plan.name)
                };
            }
        }
        Route {
            view: Some(plan.name.clone()),
            sql: rewritten,
            candidates,
        }
    }

    /// Brings an on-demand view up to date before it answers.
    pub async fn prepare(&self, view: &str) -> Result<(), String> {
        match self.plan(view) {
            Some(plan) if plan.refresh == Refresh::OnDemand => self.fold(&plan).await,
            _ => Ok(()),
        }
    }
}

/// The watermark views' marks (SQLite only), with the sweep's columns
/// added to an earlier version's table.
async fn create_marks(db: &Db) -> Result<(), String> {
    let failed = |e: sqlx::Error| format!("cannot create the views' watermarks: {e}");
    db.execute_ddl(&[def::MARKS_DDL.to_string()])
        .await
        .map_err(failed)?;
    let swept: i64 = with_pool!(db, pool => {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM pragma_table_info('{}') WHERE name = 'generation'",
            def::MARKS
        ))
        .fetch_one(pool)
        .await
    })
    .map_err(failed)?;
    if swept == 0 {
        db.execute_ddl(&def::MARKS_SWEEP_COLUMNS.map(String::from))
            .await
            .map_err(failed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An earlier version's marks table (a watermark alone) gets the
    /// sweep's columns when the store opens, its watermarks kept.
    #[tokio::test]
    async fn an_earlier_versions_marks_get_the_sweeps_columns() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(None, &dir.path().join("store.db")).await.unwrap();
        db.execute_ddl(&[
            "CREATE TABLE fleetgate_view_marks (name TEXT PRIMARY KEY, upto BIGINT NOT NULL)"
                .into(),
            "INSERT INTO fleetgate_view_marks VALUES ('old', 42)".into(),
        ])
        .await
        .unwrap();
        let catalog = Catalog::load(db.clone()).await.unwrap();
        Views::open(db.clone(), catalog, AutoSettings::off())
            .await
            .unwrap();
        let marks: (i64, Option<i64>, i64) = with_pool!(db, pool => {
            sqlx::query_as("SELECT upto, sweep_to, generation FROM fleetgate_view_marks WHERE name = 'old'")
                .fetch_one(pool)
                .await
        })
        .unwrap();
        assert_eq!(marks, (42, None, 0));
    }

    /// A realtime view an earlier version made on SQLite, with a trigger,
    /// becomes a watermark view when the store opens: the trigger goes, no
    /// row is counted twice or missed, and later rows are folded.
    #[tokio::test]
    async fn a_trigger_view_of_an_earlier_version_gets_a_watermark() {
        let (_dir, db, catalog) =
            crate::catalog::scratch_store("[streams.meter]\nfields.kwh = { type = \"float\" }\n")
                .await;
        drop(Views::open(db.clone(), catalog.clone(), AutoSettings::off()).await);
        let insert = |device: &str, kwh: f64| {
            format!(
                "INSERT INTO meter (device_id, received_at, kwh, extra) VALUES ('{device}', 1, {kwh}, '{{}}')"
            )
        };
        db.execute_ddl(&[insert("a", 1.0), insert("b", 2.0)])
            .await
            .unwrap();
        // What an earlier version made: the view's tables, its trigger,
        // the rows there were, and its catalog row.
        let file = ViewsFile::parse(
            "[views.totals]\nsource = \"meter\"\ngroup_by = [\"device_id\"]\n\
             aggregates = { n = \"count(*)\", total = \"sum(kwh)\" }\n",
        )
        .unwrap();
        let (name, view) = file.views.iter().next().unwrap();
        let stream = catalog.get("meter").unwrap();
        let mut old = ViewPlan::new(name, view, &stream, None).unwrap();
        old.watermark = false;
        let mut statements = old.create_sql();
        statements.push(old.backfill_sql(&stream.read_from()));
        statements.push(format!(
            "INSERT INTO fleetgate_views (name, definition, origin, created_at) \
             VALUES ('totals', '{}', 'declared', 0)",
            serde_json::to_string(&old.def).unwrap()
        ));
        statements.push(insert("a", 3.0));
        db.execute_ddl(&statements).await.unwrap();

        let views = Views::open(db.clone(), catalog.clone(), AutoSettings::off())
            .await
            .unwrap();
        let plan = views.plan("totals").unwrap();
        assert!(plan.watermark);
        db.execute_ddl(&[insert("b", 4.0), insert("c", 5.0)])
            .await
            .unwrap();
        let read = |sql: String| {
            let db = db.clone();
            async move {
                with_pool!(db, pool => {
                    sqlx::query_as::<_, (String, i64, f64)>(&sql).fetch_all(pool).await
                })
                .unwrap()
            }
        };
        let through_view = format!(
            "SELECT device_id, sum(fg_rows), sum(kwh__sum) FROM {} GROUP BY 1 ORDER BY 1",
            plan.read_from()
        );
        let expected = vec![
            ("a".to_string(), 2, 4.0),
            ("b".to_string(), 2, 6.0),
            ("c".to_string(), 1, 5.0),
        ];
        assert_eq!(read(through_view.clone()).await, expected);
        let triggers: i64 = with_pool!(db, pool => {
            sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name = $1")
                .bind(plan.trigger())
                .fetch_one(pool)
                .await
        })
        .unwrap();
        assert_eq!(triggers, 0, "the trigger is gone");
        views.fold(&plan).await.unwrap();
        assert_eq!(read(through_view).await, expected);
        let listed = views.list().await.unwrap();
        assert_eq!((listed[0].rows, listed[0].unfolded), (3, 0));
    }
}
