//! Views: aggregates the store maintains over a stream, and the routing
//! that answers queries from them.
//!
//! - [`def`]: a declared view checked against its source, and its SQL.
//! - [`rewrite`]: a query over a stream as the same query over a view.
//!
//! The database maintains views itself, with a trigger on the source table
//! that runs inside each ingest commit: the writer does not know views
//! exist, every store node of a cluster maintains them alike, and a record
//! that was not inserted (a re-sent key) is not counted.

pub mod def;
pub mod rewrite;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlparser::ast::Query;
use sqlx::Row;

use crate::catalog::Catalog;
use crate::db::{Backend, Db};
use crate::with_pool;
pub use def::{Refresh, ViewDef, ViewPlan, ViewsFile};

#[derive(Debug, Clone, Serialize)]
pub struct ViewInfo {
    pub name: String,
    pub source: String,
    /// "declared" (by a user).
    pub origin: String,
    pub refresh: String,
    pub definition: ViewDef,
    /// Rows in the view's table and its unfolded tail.
    pub rows: i64,
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

pub struct Views {
    db: Db,
    catalog: Catalog,
    plans: RwLock<BTreeMap<String, Arc<ViewPlan>>>,
    folded: Mutex<HashMap<String, Instant>>,
}

impl Views {
    pub async fn open(db: Db, catalog: Catalog) -> Result<Views, String> {
        db.execute_ddl(&[
            "CREATE TABLE IF NOT EXISTS fleetgate_views (name TEXT PRIMARY KEY, \
             definition TEXT NOT NULL, origin TEXT NOT NULL, created_at BIGINT NOT NULL)"
                .to_string(),
        ])
        .await
        .map_err(|e| format!("cannot create the view catalog: {e}"))?;
        let views = Views {
            db,
            catalog,
            plans: RwLock::default(),
            folded: Mutex::default(),
        };
        views.reload().await?;
        Ok(views)
    }

    /// Reads the view catalog again (another broker may have changed it).
    pub async fn reload(&self) -> Result<(), String> {
        let rows: Vec<(String, String)> = with_pool!(self.db, pool => {
            sqlx::query("SELECT name, definition FROM fleetgate_views")
                .fetch_all(pool)
                .await
                .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
        .map_err(|e| format!("cannot read the view catalog: {e}"))?;
        let mut plans = BTreeMap::new();
        for (name, definition) in rows {
            let planned = serde_json::from_str::<ViewDef>(&definition)
                .map_err(|e| e.to_string())
                .and_then(|def| {
                    let source = self
                        .catalog
                        .get(&def.source)
                        .ok_or_else(|| format!("source stream {} is gone", def.source))?;
                    ViewPlan::new(&name, &def, &source)
                });
            match planned {
                Ok(plan) => {
                    plans.insert(name, Arc::new(plan));
                }
                Err(e) => tracing::error!(view = %name, error = %e, "view cannot be used"),
            }
        }
        *self.plans.write().expect("views lock") = plans;
        Ok(())
    }

    pub fn plans(&self) -> Vec<Arc<ViewPlan>> {
        self.plans
            .read()
            .expect("views lock")
            .values()
            .cloned()
            .collect()
    }

    fn plan(&self, name: &str) -> Option<Arc<ViewPlan>> {
        self.plans.read().expect("views lock").get(name).cloned()
    }

    pub async fn list(&self) -> Result<Vec<ViewInfo>, String> {
        let mut out = Vec::new();
        for plan in self.plans() {
            let sql = format!(
                "SELECT (SELECT count(*) FROM {}) + (SELECT count(*) FROM {})",
                plan.table(),
                plan.tail()
            );
            let rows: i64 =
                with_pool!(self.db, pool => sqlx::query_scalar(&sql).fetch_one(pool).await)
                    .map_err(|e| format!("cannot count view {}: {e}", plan.name))?;
            out.push(ViewInfo {
                name: plan.name.clone(),
                source: plan.source().to_string(),
                origin: "declared".into(),
                refresh: match plan.refresh {
                    Refresh::Realtime => "realtime".into(),
                    Refresh::OnDemand => "on_demand".into(),
                    Refresh::Every(period) => {
                        format!("every {}", humantime::format_duration(period))
                    }
                },
                definition: plan.def.clone(),
                rows,
            });
        }
        Ok(out)
    }

    /// Checks every view of `file` first, then creates each (tables,
    /// trigger, rows already in the source) in a transaction of its own.
    pub async fn create(&self, file: &ViewsFile) -> Result<Vec<String>, String> {
        self.reload().await?;
        let mut planned = Vec::new();
        for (name, def) in &file.views {
            if self.plan(name).is_some() {
                return Err(format!("view {name} exists; drop it first to change it"));
            }
            let source = match self.catalog.get(&def.source) {
                Some(source) => source,
                None if self.plan(&def.source).is_some()
                    || file.views.contains_key(&def.source) =>
                {
                    return Err(format!(
                        "view {name}: its source {} is a view; views over views are not supported \
                         (declare it over the stream instead)",
                        def.source
                    ))
                }
                None => {
                    return Err(format!(
                        "view {name}: unknown source stream {:?}",
                        def.source
                    ))
                }
            };
            planned.push(ViewPlan::new(name, def, &source)?);
        }
        let backend = self.db.backend();
        let mut created = Vec::new();
        for plan in planned {
            let mut statements = plan.create_sql(backend);
            statements.push(plan.backfill_sql(backend));
            let definition = serde_json::to_string(&plan.def).expect("view serializes");
            let now = fleetgate_protocol::unix_now_ms();
            with_pool!(self.db, pool => async {
                let mut tx = pool.begin().await?;
                for statement in &statements {
                    sqlx::query(statement).execute(&mut *tx).await?;
                }
                sqlx::query("INSERT INTO fleetgate_views (name, definition, origin, created_at) VALUES ($1, $2, 'declared', $3)")
                    .bind(&plan.name)
                    .bind(&definition)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await
            }.await)
            .map_err(|e| format!("cannot create view {}: {e}", plan.name))?;
            tracing::info!(view = %plan.name, source = %plan.source(), "view created");
            created.push(plan.name.clone());
            self.plans
                .write()
                .expect("views lock")
                .insert(plan.name.clone(), Arc::new(plan));
        }
        Ok(created)
    }

    /// `Ok(false)` when there is no such view.
    pub async fn drop_view(&self, name: &str) -> Result<bool, String> {
        self.reload().await?;
        let Some(plan) = self.plan(name) else {
            return Ok(false);
        };
        let statements = plan.drop_sql(self.db.backend());
        with_pool!(self.db, pool => async {
            let mut tx = pool.begin().await?;
            for statement in &statements {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            sqlx::query("DELETE FROM fleetgate_views WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }.await)
        .map_err(|e| format!("cannot drop view {name}: {e}"))?;
        self.plans.write().expect("views lock").remove(name);
        tracing::info!(view = %name, "view dropped");
        Ok(true)
    }

    /// Folds a view's tail into its table.
    pub async fn fold(&self, plan: &ViewPlan) -> Result<(), String> {
        let backend = self.db.backend();
        let [merge, empty] = plan.fold_sql(backend);
        let lock = format!("LOCK TABLE {} IN EXCLUSIVE MODE", plan.tail());
        with_pool!(self.db, pool => async {
            let mut tx = pool.begin().await?;
            // Commits append to the tail meanwhile; they wait for this, so
            // nothing lands between the merge and the emptying. (SQLite
            // has one writer at a time anyway.)
            if backend == Backend::Postgres {
                sqlx::query(&lock).execute(&mut *tx).await?;
            }
            sqlx::query(&merge).execute(&mut *tx).await?;
            sqlx::query(&empty).execute(&mut *tx).await?;
            tx.commit().await
        }.await)
        .map_err(|e| format!("cannot refresh view {}: {e}", plan.name))?;
        self.folded
            .lock()
            .expect("folded lock")
            .insert(plan.name.clone(), Instant::now());
        Ok(())
    }

    /// Refreshes periodic views when due, and re-reads the catalog, every
    /// second.
    pub fn follow(self: &Arc<Self>) {
        let views = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(views) = views.upgrade() else { return };
                if let Err(e) = views.reload().await {
                    tracing::warn!(error = %e, "cannot reload views");
                }
                for plan in views.plans() {
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
            }
        });
    }

    /// Whether any view exists (if none, there is nothing to route).
    pub fn is_empty(&self) -> bool {
        self.plans.read().expect("views lock").is_empty()
    }

    /// Picks the cheapest view that answers `query` exactly (`sql` as the
    /// query guard parsed it), whose result columns are `names`.
    pub fn route(&self, sql: &str, query: &Query, names: &[String]) -> Route {
        let backend = self.db.backend();
        let mut candidates = Vec::new();
        let mut usable = Vec::new();
        for plan in self.plans() {
            match rewrite::rewrite(query, &plan, names, backend) {
                Ok(rewritten) => {
                    candidates.push(Candidate {
                        view: plan.name.clone(),
                        usable: true,
                        reason: "answers the query exactly".into(),
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
        let Some((plan, rewritten)) = usable
            .into_iter()
            .min_by_key(|(plan, _)| rewrite::rank(plan))
        else {
            return Route {
                view: None,
                sql: sql.to_string(),
                candidates,
            };
        };
        for candidate in &mut candidates {
            if candidate.usable && candidate.view != plan.name {
                candidate.reason = format!("answers the query, but {} is cheaper", plan.name);
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
