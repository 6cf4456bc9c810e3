//! Automatic views. The router logs the shape and cost of each aggregate
//! query ([`Views::observe`]); when a shape comes back often enough within
//! a window, costs enough, and the view that would answer it holds far
//! fewer rows than what answers it now (its source, or a finer view: a
//! fleet-wide dashboard summing a per-device view's partials), the store
//! creates that view (origin "auto") within a storage budget. Automatic
//! views that go unused are dropped again.
//!
//! The refresh of an automatic view follows the measured lag between the
//! stream's newest row and the shape's queries: queries that read what just
//! arrived get a realtime view; queries that come long after ingest get a
//! periodic one, folded at half that lag, which spares ingest the merge.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlparser::ast::Query;
use sqlx::Row;

use super::def::{RefreshDef, ViewPlan};
use super::shape::{self, Shape};
use super::{rewrite, Origin, Views};
use crate::db::Backend;
use crate::{with_pool, with_reading_pool};

#[derive(Debug, Clone)]
pub struct AutoSettings {
    /// Space all automatic views together may take, in bytes; 0 turns
    /// automatic views off (and drops any there are).
    pub budget_bytes: u64,
    /// Runs on the primary table within `window` that make a shape worth
    /// a view.
    pub recurrences: usize,
    pub window: Duration,
    /// Queries faster than this on the primary table are left alone.
    pub min_cost: Duration,
    /// How many times fewer rows the view must hold than its source.
    pub min_gain: f64,
    /// An automatic view unused this long is dropped.
    pub unused_after: Duration,
}

impl AutoSettings {
    pub fn off() -> AutoSettings {
        AutoSettings {
            budget_bytes: 0,
            recurrences: 5,
            window: Duration::from_secs(600),
            min_cost: Duration::from_millis(10),
            min_gain: 10.0,
            unused_after: Duration::from_secs(3600),
        }
    }

    fn on(&self) -> bool {
        self.budget_bytes > 0
    }

    /// A shape's decision until it has one: what would earn it a view.
    fn watching(&self) -> String {
        if !self.on() {
            return "watching: automatic views are off (--auto-views-budget 0)".into();
        }
        let cost = if self.min_cost.is_zero() {
            String::new()
        } else {
            format!(
                ", each taking at least {}",
                humantime::format_duration(self.min_cost)
            )
        };
        format!(
            "watching: a view is considered once this shape runs on the primary table, or through a view that keeps far more rows than its own would, {} times within {}{cost}",
            self.recurrences,
            humantime::format_duration(self.window),
        )
    }
}

/// Queries whose stream's newest row is younger than this want fresh data:
/// their automatic view is realtime.
const REALTIME_LAG: Duration = Duration::from_secs(60);
/// Shapes kept in memory; the least recently seen go first.
const MAX_SHAPES: usize = 1000;
/// Lags kept per shape for the median.
const MAX_LAGS: usize = 16;
/// How often the budget is measured against what automatic views hold.
const BUDGET_CHECK: Duration = Duration::from_secs(30);

/// One shape, as this process has seen it since its last flush to
/// `fleetgate_query_shapes`.
pub(super) struct ShapeLog {
    shape: Shape,
    /// The newest query of the shape: a view is judged by whether it
    /// answers this one.
    sql: String,
    query: Box<Query>,
    /// Runs that took at least `min_cost`, on the primary table or
    /// through a view other than the shape's own.
    costly_runs_in_window: VecDeque<Instant>,
    lags_ms: VecDeque<i64>,
    last_seen: Instant,
    last_seen_ms: i64,
    decided: Option<Instant>,
    decision: String,
    /// Whether `decision` changed since the last flush.
    decision_unflushed: bool,
    unflushed: Counts,
}

/// A shape's row in `fleetgate_query_shapes`, with this process's counts
/// since the last flush.
struct ShapeRow {
    key: String,
    source: String,
    definition: String,
    counts: Counts,
    lag_ms: Option<i64>,
    last_seen_ms: i64,
    /// Set when it changed.
    decision: Option<String>,
}

#[derive(Default, Clone, Copy)]
struct Counts {
    queries: i64,
    primary_runs: i64,
    primary_ms: f64,
    view_runs: i64,
}

/// A shape as `GET /v1/views/shapes` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ShapeInfo {
    pub shape: String,
    pub source: String,
    /// The view that would answer it.
    pub definition: serde_json::Value,
    pub queries: i64,
    pub primary_runs: i64,
    pub primary_mean_ms: Option<f64>,
    pub view_runs: i64,
    /// Median time between the stream's newest row and a query, ms.
    pub lag_ms: Option<i64>,
    pub last_seen_at: i64,
    /// What the store decided, and why.
    pub decision: String,
}

pub(super) const SHAPES_DDL: &str = "CREATE TABLE IF NOT EXISTS fleetgate_query_shapes (\
    shape TEXT PRIMARY KEY, source TEXT NOT NULL, definition TEXT NOT NULL, \
    queries BIGINT NOT NULL, primary_runs BIGINT NOT NULL, primary_ms DOUBLE PRECISION NOT NULL, \
    view_runs BIGINT NOT NULL, lag_ms BIGINT, last_seen_at BIGINT NOT NULL, decision TEXT NOT NULL)";
pub(super) const USAGE_DDL: &str = "CREATE TABLE IF NOT EXISTS fleetgate_view_usage (\
    name TEXT PRIMARY KEY, last_used_at BIGINT NOT NULL)";

impl Views {
    /// Logs a query that ran: its shape, where it ran and what it cost.
    pub async fn observe(&self, sql: &str, query: &Query, view: Option<&str>, elapsed: Duration) {
        let now_ms = fleetgate_protocol::unix_now_ms();
        if let Some(view) = view {
            self.used
                .lock()
                .expect("usage lock")
                .insert(view.to_string(), now_ms);
        }
        if !self.auto.on() {
            return;
        }
        let Ok(shape) = shape::of_query(query) else {
            return;
        };
        // Slow through the view the shape would get is as good as it gets;
        // slow on the table or through a coarser view's cousin is not.
        let own_view = auto_name(&shape.def.source, &shape.key);
        let costly = elapsed >= self.auto.min_cost && view != Some(own_view.as_str());
        // What a costly query reads against what arrived last: the lag the
        // refresh is chosen by.
        let lag_ms = if costly {
            let sql = format!("SELECT max(received_at) FROM {}", shape.def.source);
            with_reading_pool!(self.db, pool => sqlx::query_scalar::<_, Option<i64>>(&sql).fetch_one(pool).await)
                .ok()
                .flatten()
                .map(|newest| (now_ms - newest).max(0))
        } else {
            None
        };
        let mut shapes = self.shapes.lock().expect("shapes lock");
        if !shapes.contains_key(&shape.key) && shapes.len() >= MAX_SHAPES {
            if let Some(oldest) = shapes
                .iter()
                .min_by_key(|(_, log)| log.last_seen)
                .map(|(key, _)| key.clone())
            {
                shapes.remove(&oldest);
            }
        }
        let log = shapes.entry(shape.key.clone()).or_insert_with(|| ShapeLog {
            shape,
            sql: String::new(),
            query: Box::new(query.clone()),
            costly_runs_in_window: VecDeque::new(),
            lags_ms: VecDeque::new(),
            last_seen: Instant::now(),
            last_seen_ms: now_ms,
            decided: None,
            decision: self.auto.watching(),
            decision_unflushed: true,
            unflushed: Counts::default(),
        });
        log.sql = sql.to_string();
        *log.query = query.clone();
        log.last_seen = Instant::now();
        log.last_seen_ms = now_ms;
        log.unflushed.queries += 1;
        match view {
            Some(_) => log.unflushed.view_runs += 1,
            None => {
                log.unflushed.primary_runs += 1;
                log.unflushed.primary_ms += elapsed.as_secs_f64() * 1000.0;
            }
        }
        if costly {
            log.costly_runs_in_window.push_back(Instant::now());
        }
        if let Some(lag) = lag_ms {
            if log.lags_ms.len() == MAX_LAGS {
                log.lags_ms.pop_front();
            }
            log.lags_ms.push_back(lag);
        }
    }

    /// The query shapes logged so far, most queried first.
    pub async fn shapes(&self) -> Result<Vec<ShapeInfo>, String> {
        self.flush_shapes().await?;
        let rows = with_pool!(self.db, pool => {
            sqlx::query(
                "SELECT shape, source, definition, queries, primary_runs, primary_ms, view_runs, \
                 lag_ms, last_seen_at, decision FROM fleetgate_query_shapes \
                 ORDER BY queries DESC, shape",
            )
            .fetch_all(pool)
            .await
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        let primary_runs: i64 = r.get(4);
                        let primary_ms: f64 = r.get(5);
                        ShapeInfo {
                            shape: r.get(0),
                            source: r.get(1),
                            definition: serde_json::from_str(r.get::<&str, _>(2))
                                .unwrap_or(serde_json::Value::Null),
                            queries: r.get(3),
                            primary_runs,
                            primary_mean_ms: (primary_runs > 0)
                                .then(|| primary_ms / primary_runs as f64),
                            view_runs: r.get(6),
                            lag_ms: r.get(7),
                            last_seen_at: r.get(8),
                            decision: r.get(9),
                        }
                    })
                    .collect()
            })
        })
        .map_err(|e| format!("cannot read query shapes: {e}"))?;
        Ok(rows)
    }

    /// One round of the automatic-view loop: record what was seen and used,
    /// create the views recurring shapes earn, drop the ones nobody uses.
    pub(super) async fn advise(&self) {
        if let Err(e) = self.flush_usage().await {
            tracing::warn!(error = %e, "cannot record view usage");
        }
        if !self.auto.on() {
            self.drop_auto_views(|_, _| true, "automatic views are off (budget 0)")
                .await;
            return;
        }
        for key in self.due_shapes() {
            let decision = self.consider(&key).await;
            let mut shapes = self.shapes.lock().expect("shapes lock");
            if let Some(log) = shapes.get_mut(&key) {
                log.decided = Some(Instant::now());
                log.decision = decision;
                log.decision_unflushed = true;
                log.costly_runs_in_window.clear();
            }
        }
        if let Err(e) = self.flush_shapes().await {
            tracing::warn!(error = %e, "cannot record query shapes");
        }
        let unused_after = self.auto.unused_after.as_millis() as i64;
        let now_ms = fleetgate_protocol::unix_now_ms();
        self.drop_auto_views(|_, last_used| now_ms - last_used > unused_after, "unused")
            .await;
        let budget_due = self
            .budget_checked
            .lock()
            .expect("budget lock")
            .is_none_or(|at| at.elapsed() >= BUDGET_CHECK);
        if budget_due {
            self.enforce_budget().await;
        }
    }

    /// Shapes that ran costly often enough, lately, and were not judged
    /// within the window.
    fn due_shapes(&self) -> Vec<String> {
        let window = self.auto.window;
        let mut shapes = self.shapes.lock().expect("shapes lock");
        shapes
            .iter_mut()
            .filter_map(|(key, log)| {
                while log
                    .costly_runs_in_window
                    .front()
                    .is_some_and(|at| at.elapsed() > window)
                {
                    log.costly_runs_in_window.pop_front();
                }
                let fresh_decision = log.decided.is_some_and(|at| at.elapsed() < window);
                (log.costly_runs_in_window.len() >= self.auto.recurrences && !fresh_decision)
                    .then(|| key.clone())
            })
            .collect()
    }

    /// Creates the view a shape earns, or says why not.
    async fn consider(&self, key: &str) -> String {
        let Some((shape, sql, query, lag)) =
            self.shapes
                .lock()
                .expect("shapes lock")
                .get(key)
                .map(|log| {
                    (
                        log.shape.clone(),
                        log.sql.clone(),
                        log.query.clone(),
                        median(&log.lags_ms),
                    )
                })
        else {
            return "forgotten".into();
        };
        match self.earn_view(&shape, &sql, &query, lag).await {
            Ok(created) => created,
            Err(reason) => {
                tracing::debug!(shape = %key, reason, "no automatic view");
                reason
            }
        }
    }

    async fn earn_view(
        &self,
        shape: &Shape,
        sql: &str,
        query: &Query,
        lag_ms: Option<i64>,
    ) -> Result<String, String> {
        let backend = self.db.backend();
        let stream = self
            .catalog
            .get(&shape.def.source)
            .ok_or_else(|| format!("stream {} is gone", shape.def.source))?;
        let names = crate::query::columns(&self.db, sql)
            .await
            .map_err(|e| format!("the query no longer runs: {e}"))?;
        let leads = super::rows::table_leads(&stream);
        let answering: Vec<Arc<ViewPlan>> = self
            .plans()
            .into_iter()
            .filter(|plan| rewrite::rewrite(query, plan, &names, backend, &leads).is_ok())
            .collect();
        let name = auto_name(&shape.def.source, &shape.key);
        if answering.iter().any(|plan| plan.name == name) {
            return Err(format!("answered by view {name}, its own"));
        }
        let mut def = shape.def.clone();
        def.refresh = refresh_for_lag(lag_ms);
        let plan = ViewPlan::new(&name, &def, &stream, None)
            .map_err(|e| format!("no view can answer it: {e}"))?;
        rewrite::rewrite(query, &plan, &names, backend, &leads)
            .map_err(|e| format!("no view can answer it: {e}"))?;

        let (rows, groups) = self.estimate(&plan).await?;
        // Against the smallest view that answers it now, if one does.
        let mut smallest: Option<(&str, i64)> = None;
        for view in &answering {
            let held = self.rows_held(view).await?;
            if smallest.is_none_or(|(_, least)| held < least) {
                smallest = Some((view.name.as_str(), held));
            }
        }
        if let Some((view, held)) = smallest {
            let gain = held as f64 / groups.max(1) as f64;
            if gain < self.auto.min_gain {
                return Err(format!(
                    "answered by view {view}, which keeps {held} rows; a view of its own would keep {groups} ({gain:.1}x fewer; {}x wanted)",
                    self.auto.min_gain
                ));
            }
        }
        let gain = rows as f64 / groups.max(1) as f64;
        if gain < self.auto.min_gain {
            return Err(format!(
                "a view would keep {groups} rows for {rows} ({gain:.1}x fewer; {}x wanted)",
                self.auto.min_gain
            ));
        }
        let wanted = groups.max(1) * plan.row_bytes_estimate();
        let used = self.auto_bytes().await?;
        if used + wanted > self.auto.budget_bytes as i64 {
            return Err(format!(
                "over budget: a view would take about {wanted} bytes, {used} of {} are in use",
                self.auto.budget_bytes
            ));
        }
        self.install(plan, Origin::Auto)
            .await
            .map_err(|e| e.to_string())?;
        let refresh = match &def.refresh {
            RefreshDef::Named(n) => n.clone(),
            RefreshDef::Every { every } => format!("every {every}"),
        };
        tracing::info!(
            view = %name,
            shape = %shape.key,
            rows,
            groups,
            lag_ms,
            refresh,
            "automatic view created"
        );
        Ok(format!(
            "created view {name}: {groups} rows for {rows} ({gain:.0}x fewer), refresh {refresh}"
        ))
    }

    /// Rows in the source, and groups the view would hold.
    async fn estimate(&self, plan: &ViewPlan) -> Result<(i64, i64), String> {
        let source = self
            .catalog
            .get(plan.source())
            .ok_or_else(|| format!("stream {} is gone", plan.source()))?
            .read_from();
        let mut key: Vec<String> = plan.group_by.iter().map(|(c, _)| c.clone()).collect();
        if plan.bucket.is_some() {
            key.push(plan.bucket_sql(""));
        }
        let rows_sql = format!("SELECT count(*) FROM {source}");
        let groups_sql = if key.is_empty() {
            format!("SELECT count(*) FROM (SELECT 1 AS one FROM {source} LIMIT 1) AS fg_groups")
        } else {
            format!(
                "SELECT count(*) FROM (SELECT 1 AS one FROM {source} GROUP BY {}) AS fg_groups",
                key.join(", ")
            )
        };
        with_reading_pool!(self.db, pool => async {
            let rows: i64 = sqlx::query_scalar(&rows_sql).fetch_one(pool).await?;
            let groups: i64 = sqlx::query_scalar(&groups_sql).fetch_one(pool).await?;
            Ok::<_, sqlx::Error>((rows, groups))
        }.await)
        .map_err(|e| format!("cannot estimate the view: {e}"))
    }

    /// Rows a view's table keeps now.
    async fn rows_held(&self, plan: &ViewPlan) -> Result<i64, String> {
        let sql = format!("SELECT count(*) FROM {}", plan.table());
        with_reading_pool!(self.db, pool => sqlx::query_scalar::<_, i64>(&sql).fetch_one(pool).await)
            .map_err(|e| format!("cannot count the rows of view {}: {e}", plan.name))
    }

    /// Bytes a view's tables take on disk.
    pub async fn bytes(&self, plan: &ViewPlan) -> Result<i64, String> {
        let (table, tail) = (plan.table(), plan.tail());
        let index = format!("{table}_key");
        match &self.db.pools {
            crate::db::Pools::Postgres { write, .. } => sqlx::query_scalar(
                "SELECT CAST(COALESCE(pg_total_relation_size(to_regclass($1)), 0) \
                 + COALESCE(pg_total_relation_size(to_regclass($2)), 0) AS BIGINT)",
            )
            .bind(&table)
            .bind(&tail)
            .fetch_one(write)
            .await,
            crate::db::Pools::Sqlite { write, .. } => sqlx::query_scalar(
                "SELECT CAST(COALESCE(sum(pgsize), 0) AS BIGINT) FROM dbstat WHERE name IN ($1, $2, $3)",
            )
            .bind(&table)
            .bind(&tail)
            .bind(&index)
            .fetch_one(write)
            .await,
        }
        .map_err(|e| format!("cannot measure view {}: {e}", plan.name))
    }

    async fn auto_bytes(&self) -> Result<i64, String> {
        let mut used = 0;
        for entry in self.entries() {
            if entry.origin == Origin::Auto {
                used += self.bytes(&entry.plan).await?;
            }
        }
        Ok(used)
    }

    /// Drops automatic views, least recently used first, until they fit
    /// the budget again (it may have been lowered, or the views grown).
    async fn enforce_budget(&self) {
        *self.budget_checked.lock().expect("budget lock") = Some(Instant::now());
        let mut sized = Vec::new();
        for entry in self.entries() {
            if entry.origin == Origin::Auto {
                match self.bytes(&entry.plan).await {
                    Ok(bytes) => sized.push((entry.plan.name.clone(), bytes)),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot check the automatic view budget");
                        return;
                    }
                }
            }
        }
        let mut used: i64 = sized.iter().map(|(_, b)| b).sum();
        if used <= self.auto.budget_bytes as i64 {
            return;
        }
        let last_used = match self.last_used().await {
            Ok(last_used) => last_used,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the automatic view budget");
                return;
            }
        };
        sized.sort_by_key(|(name, _)| last_used.get(name).copied().unwrap_or(0));
        for (name, bytes) in sized {
            if used <= self.auto.budget_bytes as i64 {
                break;
            }
            if self
                .drop_logged(&name, "over the automatic view budget")
                .await
            {
                used -= bytes;
            }
        }
    }

    /// Drops the automatic views `doomed` picks by name and last use.
    async fn drop_auto_views(&self, doomed: impl Fn(&str, i64) -> bool, why: &str) {
        let autos: Vec<_> = self
            .entries()
            .into_iter()
            .filter(|e| e.origin == Origin::Auto)
            .collect();
        if autos.is_empty() {
            return;
        }
        let last_used = match self.last_used().await {
            Ok(last_used) => last_used,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read view usage");
                return;
            }
        };
        for entry in autos {
            let used = last_used
                .get(&entry.plan.name)
                .copied()
                .unwrap_or(entry.created_at)
                .max(entry.created_at);
            if doomed(&entry.plan.name, used) {
                self.drop_logged(&entry.plan.name, why).await;
            }
        }
    }

    async fn drop_logged(&self, name: &str, why: &str) -> bool {
        match self.drop_view(name).await {
            Ok(dropped) => {
                if dropped {
                    tracing::info!(view = %name, why, "automatic view dropped");
                }
                dropped
            }
            Err(e) => {
                tracing::warn!(view = %name, error = %e, "cannot drop automatic view");
                false
            }
        }
    }

    /// When each view last answered a query, across every process sharing
    /// the database.
    async fn last_used(&self) -> Result<HashMap<String, i64>, String> {
        with_pool!(self.db, pool => {
            sqlx::query("SELECT name, last_used_at FROM fleetgate_view_usage")
                .fetch_all(pool)
                .await
                .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
        .map_err(|e| format!("cannot read view usage: {e}"))
    }

    async fn flush_usage(&self) -> Result<(), String> {
        let used: Vec<(String, i64)> = self.used.lock().expect("usage lock").drain().collect();
        let upsert = match self.db.backend() {
            Backend::Postgres => "INSERT INTO fleetgate_view_usage (name, last_used_at) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET last_used_at = GREATEST(fleetgate_view_usage.last_used_at, excluded.last_used_at)",
            Backend::Sqlite => "INSERT INTO fleetgate_view_usage (name, last_used_at) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET last_used_at = max(fleetgate_view_usage.last_used_at, excluded.last_used_at)",
        };
        for (name, at) in used {
            with_pool!(self.db, pool => sqlx::query(upsert).bind(&name).bind(at).execute(pool).await.map(|_| ()))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Adds what this process saw since the last flush to the shape log
    /// every process shares.
    async fn flush_shapes(&self) -> Result<(), String> {
        let pending: Vec<ShapeRow> = {
            let mut shapes = self.shapes.lock().expect("shapes lock");
            shapes
                .iter_mut()
                .map(|(key, log)| ShapeRow {
                    key: key.clone(),
                    source: log.shape.def.source.clone(),
                    definition: serde_json::to_string(&log.shape.def).expect("view serializes"),
                    counts: std::mem::take(&mut log.unflushed),
                    lag_ms: median(&log.lags_ms),
                    last_seen_ms: log.last_seen_ms,
                    decision: std::mem::take(&mut log.decision_unflushed)
                        .then(|| log.decision.clone()),
                })
                .collect()
        };
        let last_seen = match self.db.backend() {
            Backend::Postgres => {
                "GREATEST(fleetgate_query_shapes.last_seen_at, excluded.last_seen_at)"
            }
            Backend::Sqlite => "max(fleetgate_query_shapes.last_seen_at, excluded.last_seen_at)",
        };
        let upsert = format!(
            "INSERT INTO fleetgate_query_shapes (shape, source, definition, queries, primary_runs, \
             primary_ms, view_runs, lag_ms, last_seen_at, decision) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (shape) DO UPDATE SET \
             queries = fleetgate_query_shapes.queries + excluded.queries, \
             primary_runs = fleetgate_query_shapes.primary_runs + excluded.primary_runs, \
             primary_ms = fleetgate_query_shapes.primary_ms + excluded.primary_ms, \
             view_runs = fleetgate_query_shapes.view_runs + excluded.view_runs, \
             lag_ms = COALESCE(excluded.lag_ms, fleetgate_query_shapes.lag_ms), \
             last_seen_at = {last_seen}, \
             decision = COALESCE($11, fleetgate_query_shapes.decision)"
        );
        for ShapeRow {
            key,
            source,
            definition,
            counts,
            lag_ms,
            last_seen_ms,
            decision,
        } in pending
        {
            if counts.queries == 0 && decision.is_none() {
                continue;
            }
            let outcome = with_pool!(self.db, pool => {
                sqlx::query(&upsert)
                    .bind(&key)
                    .bind(&source)
                    .bind(&definition)
                    .bind(counts.queries)
                    .bind(counts.primary_runs)
                    .bind(counts.primary_ms)
                    .bind(counts.view_runs)
                    .bind(lag_ms)
                    .bind(last_seen_ms)
                    .bind(decision.clone().unwrap_or_else(|| self.auto.watching()))
                    .bind(&decision)
                    .execute(pool)
                    .await
                    .map(|_| ())
            });
            if let Err(e) = outcome {
                // Counted again next time rather than lost.
                if let Some(log) = self.shapes.lock().expect("shapes lock").get_mut(&key) {
                    log.decision_unflushed |= decision.is_some();
                    log.unflushed.queries += counts.queries;
                    log.unflushed.primary_runs += counts.primary_runs;
                    log.unflushed.primary_ms += counts.primary_ms;
                    log.unflushed.view_runs += counts.view_runs;
                }
                return Err(e.to_string());
            }
        }
        Ok(())
    }
}

/// Realtime for queries that read what just arrived; otherwise folded at
/// half the lag, so a query usually finds the tail folded.
fn refresh_for_lag(lag_ms: Option<i64>) -> RefreshDef {
    match lag_ms {
        Some(lag) if lag >= REALTIME_LAG.as_millis() as i64 => RefreshDef::Every {
            every: format!("{}s", (lag / 2000).clamp(1, 3600)),
        },
        _ => RefreshDef::default(),
    }
}

fn median(values: &VecDeque<i64>) -> Option<i64> {
    let mut sorted: Vec<i64> = values.iter().copied().collect();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied()
}

/// A stable name for the view of a shape: `auto_<source>_<digest>`.
fn auto_name(source: &str, key: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let hex: String = digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let prefix: String = source.chars().take(30).collect();
    format!("auto_{prefix}_{hex}")
}

/// `"256MiB"`, `"64MB"`, `"1GiB"`, `"0"`: a byte size.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 256MiB, 64MB, 0)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" => 1 << 10,
        "mb" => 1_000_000,
        "mib" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, KB, KiB, MB, MiB, GB, GiB)"
            ))
        }
    };
    Ok((number * scale as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_or_say_why_not() {
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("1.5 GB"), Ok(1_500_000_000));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5 parsecs").unwrap_err().contains("unit"));
    }

    #[test]
    fn the_refresh_follows_the_lag_between_ingest_and_queries() {
        assert_eq!(refresh_for_lag(None), RefreshDef::default());
        assert_eq!(refresh_for_lag(Some(2_000)), RefreshDef::default());
        let every = |s: &str| RefreshDef::Every { every: s.into() };
        assert_eq!(refresh_for_lag(Some(600_000)), every("300s"));
        assert_eq!(refresh_for_lag(Some(30 * 86_400_000)), every("3600s"));
    }

    #[test]
    fn auto_names_are_stable_identifiers() {
        let name = auto_name("a_very_long_stream_name_that_goes_on_and_on_x", "k");
        assert_eq!(
            name,
            auto_name("a_very_long_stream_name_that_goes_on_and_on_x", "k")
        );
        assert_ne!(
            name,
            auto_name("a_very_long_stream_name_that_goes_on_and_on_x", "j")
        );
        fleetgate_protocol::schema::check_identifier("view", &name).unwrap();
    }
}
