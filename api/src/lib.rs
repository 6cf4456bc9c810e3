//! fleetgate's doors for people and programs: the HTTP API ([`http`]) and
//! the PostgreSQL wire endpoint ([`pg`]), side by side over the one query
//! path, [`QueryService`], that both call, so that nothing is reachable
//! through one door that is not through the other.
//!
//! What it owns: the routes, their request and answer shapes (JSON,
//! statuses, the `{"error": ...}` body), the audit trail around admin
//! routes, the per-address rate limit, the dashboard page and its event
//! stream, the PostgreSQL protocol, and the query path's checks, routing
//! and limits.
//!
//! What it must not touch: each door is an adapter. It holds no store,
//! registry, ETL or MQTT logic of its own; it calls the crates that own
//! them (`fleetgate-store`, `fleetgate-admin`, `fleetgate-etl`, ingest
//! through `IngestService`), and it starts nothing but its own servers and
//! the dashboard's event hub. Processes, listeners, flags and the wiring of
//! the parts are the binary's (`src/up.rs`), which builds an
//! [`http::AppState`] and a [`pg::PgServer`] and serves them.

pub mod http;
pub mod pg;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetgate_etl::analysis::Analyses;
use fleetgate_etl::Etl;
use fleetgate_protocol::schema::{FieldType, RECEIVED_AT};
use fleetgate_protocol::{Authenticate, Principal, Role};
use fleetgate_store::compaction::Compaction;
use fleetgate_store::db::Backend;
use fleetgate_store::query::{self, QueryError, QueryLimits, QueryResult};
use fleetgate_store::row_stream::RowStream;
use fleetgate_store::sqlite_limits;
use fleetgate_store::timestamp_sql;
use fleetgate_store::views::{Route, Views};
use fleetgate_store::{Catalog, Db};

/// Why a query was not answered. Each door turns the kind into its own
/// answer (an HTTP status, a SQLSTATE); the message is the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryFailure {
    /// The caller's role may not query (recorded as a refusal).
    Forbidden(String),
    /// The guard refused the text, or the database refused the query.
    Invalid(String),
    /// `--query-timeout`.
    Timeout(String),
    /// `--query-max-bytes` (the result, a value, or SQLite's memory budget).
    TooLarge(String),
    /// The server cannot take the query on now.
    Unavailable(String),
}

impl QueryFailure {
    pub fn message(&self) -> &str {
        match self {
            QueryFailure::Forbidden(m)
            | QueryFailure::Invalid(m)
            | QueryFailure::Timeout(m)
            | QueryFailure::TooLarge(m)
            | QueryFailure::Unavailable(m) => m,
        }
    }
}

impl std::fmt::Display for QueryFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

/// A checked query and where it runs.
pub struct Routed {
    pub route: Route,
    pub parsed: Box<query::ParsedQuery>,
    /// What runs on the primary tables: the query, reading both tiers of
    /// tiered streams.
    pub primary_sql: String,
}

/// A query's answer: its rows as they come (the first batch already
/// read, so a query that fails early fails before anything is sent), and
/// the view that serves it.
pub struct Answer {
    pub rows: RowStream,
    pub view: Option<String>,
}

impl Answer {
    /// The whole result, for a door that sends it in one piece.
    pub async fn collect(self, service: &QueryService) -> Result<QueryResult, QueryFailure> {
        self.rows.collect().await.map_err(|e| service.failure(e))
    }
}

/// The read-only query path: role check, the SQL guard, expansion of
/// tiered and compacted streams, view routing, the limits, and the
/// observation of fields and shapes (compaction, automatic views).
#[derive(Clone)]
pub struct QueryService {
    pub db: Db,
    pub catalog: Catalog,
    pub views: Arc<Views>,
    pub compaction: Arc<Compaction>,
    pub etl: Arc<Etl>,
    pub analyses: Arc<Analyses>,
    /// Where refusals are recorded (the one authenticator).
    pub auth: Arc<dyn Authenticate>,
    /// `--query-timeout`.
    pub timeout: Duration,
    /// `--query-max-bytes`.
    pub max_bytes: usize,
}

impl QueryService {
    /// The role a query needs; a caller without it is refused and the
    /// refusal recorded against it, naming the door (`http`, `pg`).
    pub fn authorize<'p>(
        &self,
        principal: &'p Principal,
        door: &str,
    ) -> Result<&'p Principal, QueryFailure> {
        require(&*self.auth, principal, Role::Extract, door)
    }

    /// What a query may name: streams, the superseded tables of bucketed
    /// streams, the batch tables ETL jobs load and the analyses' tables.
    pub fn tables(&self) -> HashSet<String> {
        let superseded = self
            .catalog
            .list()
            .into_iter()
            .filter(|s| s.bucket().is_some())
            .map(|s| s.superseded_table());
        self.catalog
            .names()
            .into_iter()
            .chain(superseded)
            .chain(self.etl.tables())
            .chain(self.analyses.tables())
            .collect()
    }

    /// The columns that hold times (epoch milliseconds): `received_at` and
    /// the `timestamp` fields of the streams `named` picks.
    pub fn timestamp_fields(&self, named: impl Fn(&str) -> bool) -> HashSet<String> {
        let mut names: HashSet<String> = [RECEIVED_AT.to_string()].into();
        for stream in self.catalog.list().into_iter().filter(|s| named(&s.name)) {
            names.extend(
                stream
                    .def
                    .fields
                    .iter()
                    .filter(|(_, d)| d.ty == FieldType::Timestamp && !d.code)
                    .map(|(f, _)| f.clone()),
            );
        }
        names
    }

    /// Checks a query and picks where it runs: the cheapest view that
    /// answers it exactly, or the primary table.
    pub async fn route(
        &self,
        principal: &Principal,
        door: &str,
        sql: &str,
    ) -> Result<Routed, QueryFailure> {
        self.authorize(principal, door)?;
        let tables = self.tables();
        let backend = self.db.backend();
        let mut parsed = query::check(sql, &tables, backend).map_err(|e| self.failure(e))?;
        self.compaction.observe(&parsed);
        // Every stream's: a column of that name anywhere compared with a
        // timestamp literal, or whose epoch is taken, can only mean a time.
        let timed = timestamp_sql::rewrite(&mut parsed, &self.timestamp_fields(|_| true));
        let named = backend == Backend::Sqlite && query::name_calls_as_postgres(&mut parsed);
        let primary_sql = fleetgate_store::expand::expand(&parsed, &self.catalog, backend)
            .map_err(QueryFailure::Invalid)?
            .unwrap_or_else(|| match named || timed {
                true => parsed.to_string(),
                false => sql.to_string(),
            });
        let mut route = if self.views.is_empty() {
            Route {
                view: None,
                sql: sql.to_string(),
                candidates: Vec::new(),
            }
        } else {
            let names = query::columns(&self.db, &primary_sql)
                .await
                .map_err(|e| QueryFailure::Invalid(e.to_string()))?;
            self.views.route(sql, &parsed, &names)
        };
        if route.view.is_none() {
            route.sql = primary_sql.clone();
        }
        Ok(Routed {
            route,
            parsed,
            primary_sql,
        })
    }

    /// Where a query would run, and why other views do not fit.
    pub async fn explain(
        &self,
        principal: &Principal,
        door: &str,
        sql: &str,
    ) -> Result<Route, QueryFailure> {
        let Routed {
            route, primary_sql, ..
        } = self.route(principal, door, sql).await?;
        // Without views the route skipped preparing it: a query the
        // database refuses is still refused here, not a plan.
        query::columns(&self.db, &primary_sql)
            .await
            .map_err(|e| QueryFailure::Invalid(e.to_string()))?;
        Ok(route)
    }

    /// Runs a read-only query: checked, routed to a view where one answers
    /// exactly, else on the primary tables, within the limits. The rows
    /// stream; the first batch has arrived when this returns.
    pub async fn answer(
        &self,
        principal: &Principal,
        door: &str,
        sql: &str,
    ) -> Result<Answer, QueryFailure> {
        let Routed {
            route,
            parsed,
            primary_sql,
        } = self.route(principal, door, sql).await?;
        let limits = QueryLimits {
            timeout: self.timeout,
            max_bytes: self.max_bytes,
            ..Default::default()
        };
        let started = Instant::now();
        let through_view = match &route.view {
            Some(view) => self
                .run_through_view(view, &route.sql, &limits)
                .await
                .map(|outcome| (Some(view.clone()), outcome)),
            None => None,
        };
        let (view, outcome) = match through_view {
            Some(done) => done,
            None => (None, first_rows(&self.db, &primary_sql, &limits).await),
        };
        match outcome {
            Ok(mut rows) => {
                if view.is_none() && self.db.backend() == Backend::Sqlite {
                    let bools =
                        fleetgate_store::expand::tiered_bool_outputs(&parsed, &self.catalog);
                    rows = rows.restoring_bools(bools);
                }
                // A result of one batch, as dashboards' are, is timed
                // whole; a longer one until its first rows.
                self.views
                    .observe(sql, &parsed, view.as_deref(), started.elapsed())
                    .await;
                Ok(Answer { rows, view })
            }
            Err(e) => Err(self.failure(e)),
        }
    }

    /// Runs a routed query on its view; `None` when the view could not
    /// answer after all, for the primary table to: a view that fails before
    /// its first rows must not fail the query.
    async fn run_through_view(
        &self,
        view: &str,
        sql: &str,
        limits: &QueryLimits,
    ) -> Option<Result<RowStream, QueryError>> {
        if let Err(e) = self.views.prepare(view).await {
            tracing::error!(view, error = %e, "cannot bring view up to date");
            return None;
        }
        match first_rows(&self.db, sql, limits).await {
            Err(QueryError::Database(e)) => {
                tracing::error!(view, error = %e, sql, "query through view failed");
                None
            }
            other => Some(other),
        }
    }

    /// A query's failure, with the message both doors give.
    pub fn failure(&self, error: QueryError) -> QueryFailure {
        let bound = query::human_bytes(self.max_bytes);
        match error {
            QueryError::Timeout(d) => QueryFailure::Timeout(format!(
                "query did not finish within {d:?} (--query-timeout)"
            )),
            QueryError::ResultTooLarge(_) => QueryFailure::TooLarge(format!(
                "the result is larger than {bound}, the limit on a query's result \
                 (--query-max-bytes {bound}): select fewer rows or columns, or aggregate"
            )),
            QueryError::ValueTooLarge(_) => QueryFailure::TooLarge(format!(
                "a value the query builds is larger than {bound}, the limit on a query's \
                 values (--query-max-bytes {bound})"
            )),
            QueryError::OutOfMemory => QueryFailure::TooLarge(format!(
                "the query needs more memory than a query may take: {} ({} × \
                 --query-max-bytes {bound}); make it build smaller or fewer values",
                query::human_bytes(sqlite_limits::budget_for(self.max_bytes).unwrap_or(usize::MAX)),
                sqlite_limits::BUDGET_FACTOR,
            )),
            QueryError::Unavailable(message) => QueryFailure::Unavailable(message),
            QueryError::ReaderGone => QueryFailure::Unavailable(QueryError::ReaderGone.to_string()),
            QueryError::NotAllowed(message) | QueryError::Database(message) => {
                QueryFailure::Invalid(message)
            }
        }
    }
}

/// Starts `sql` and waits for its first rows.
async fn first_rows(db: &Db, sql: &str, limits: &QueryLimits) -> Result<RowStream, QueryError> {
    let mut rows = query::stream(db, sql, limits).await?;
    rows.wait_for_rows().await?;
    Ok(rows)
}

/// `principal` if its role allows `role`; otherwise the refusal, recorded
/// against the device with the door it came through.
pub fn require<'p>(
    auth: &dyn Authenticate,
    principal: &'p Principal,
    role: Role,
    door: &str,
) -> Result<&'p Principal, QueryFailure> {
    if principal.role.allows(role) {
        Ok(principal)
    } else {
        let reason = format!(
            "this needs the {role} role; {} has {}",
            principal.device_id, principal.role
        );
        auth.record_refusal(&principal.device_id, &format!("{door}: {reason}"));
        Err(QueryFailure::Forbidden(reason))
    }
}
