//! Read-only SQL over the stream tables.
//!
//! Two independent guards: the statement is parsed and must be one SELECT
//! naming only stream tables and known-harmless functions; and it runs on a
//! read-only SQLite connection or in a PostgreSQL READ ONLY transaction, so
//! even a statement the parser misjudged cannot write.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::time::Duration;

use futures::TryStreamExt;
use rust_decimal::prelude::ToPrimitive;
use serde::Serialize;
use serde_json::Value;
use sqlparser::ast::{Expr, ObjectName, Query, SetExpr, Statement, TableFactor, Visit, Visitor};
use sqlparser::dialect::{PostgreSqlDialect, SQLiteDialect};
use sqlparser::parser::Parser;
use sqlx::{Column, Executor, Row, Statement as _, TypeInfo, ValueRef};

use crate::db::{Backend, Db, Pools};

/// A query as [`check`] parsed it.
pub use sqlparser::ast::Query as ParsedQuery;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
    /// True when more rows matched than `max_rows`; only the first are returned.
    pub truncated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    NotAllowed(String),
    #[error("{0}")]
    Database(String),
    #[error("query did not finish within {0:?}")]
    Timeout(Duration),
}

pub struct QueryLimits {
    pub max_rows: usize,
    pub timeout: Duration,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            max_rows: 100_000,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Functions a query may call: aggregates, arithmetic, text, time and JSON
/// helpers of SQLite and PostgreSQL. Anything else (file access, settings,
/// extensions, sleeps) is refused by name.
const ALLOWED_FUNCTIONS: &[&str] = &[
    "abs",
    "avg",
    "ceil",
    "ceiling",
    "coalesce",
    "concat",
    "count",
    "cume_dist",
    "date",
    "date_part",
    "date_trunc",
    "datetime",
    "dense_rank",
    "exp",
    "first_value",
    "floor",
    "greatest",
    "group_concat",
    "ifnull",
    "iif",
    "instr",
    "json_extract",
    "json_extract_path_text",
    "julianday",
    "lag",
    "last_value",
    "lead",
    "least",
    "length",
    "ln",
    "log",
    "lower",
    "ltrim",
    "max",
    "min",
    "mod",
    "now",
    "nth_value",
    "ntile",
    "nullif",
    "percent_rank",
    "position",
    "power",
    "rank",
    "replace",
    "round",
    "row_number",
    "rtrim",
    "sign",
    "sqrt",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "strftime",
    "string_agg",
    "substr",
    "substring",
    "sum",
    "time",
    "to_char",
    "to_timestamp",
    "total",
    "trim",
    "trunc",
    "typeof",
    "unixepoch",
    "upper",
    "var_pop",
    "var_samp",
    "variance",
];

/// Checks that `sql` is a single read-only SELECT over `tables`, parsed as
/// the database that will run it parses it (SQLite does not nest comments,
/// PostgreSQL does: a generic parser can be shown a different query).
/// Returns the parsed query, for the view router.
pub fn check(
    sql: &str,
    tables: &HashSet<String>,
    backend: Backend,
) -> Result<Box<Query>, QueryError> {
    let mut statements = match backend {
        Backend::Sqlite => Parser::parse_sql(&SQLiteDialect {}, sql),
        Backend::Postgres => Parser::parse_sql(&PostgreSqlDialect {}, sql),
    }
    .map_err(|e| QueryError::NotAllowed(format!("cannot parse query: {e}")))?;
    let statement = match statements.len() {
        1 => statements.remove(0),
        0 => return Err(QueryError::NotAllowed("empty query".into())),
        _ => {
            return Err(QueryError::NotAllowed(
                "only one statement per query".into(),
            ))
        }
    };
    let Statement::Query(query) = statement else {
        return Err(QueryError::NotAllowed(
            "only SELECT queries are allowed (the query API is read-only)".into(),
        ));
    };
    let mut guard = Guard {
        tables,
        scopes: Vec::new(),
        problem: None,
    };
    if let ControlFlow::Break(()) = query.visit(&mut guard) {
        return Err(QueryError::NotAllowed(guard.problem.unwrap_or_default()));
    }
    Ok(query)
}

/// Prefixes of the platform's own tables and the databases' catalogs: no
/// query may name them, not even as a CTE (which could make a reference
/// elsewhere in the query look like the CTE while it reads the real table).
const RESERVED_PREFIXES: &[&str] = &["fleetgate_", "sqlite_", "pg_"];

struct Guard<'a> {
    tables: &'a HashSet<String>,
    /// CTE names visible at the current point, one set per enclosing query.
    scopes: Vec<HashSet<String>>,
    problem: Option<String>,
}

impl Guard<'_> {
    fn refuse(&mut self, problem: String) -> ControlFlow<()> {
        self.problem = Some(problem);
        ControlFlow::Break(())
    }

    fn is_cte(&self, name: &str) -> bool {
        self.scopes.iter().any(|scope| scope.contains(name))
    }
}

fn simple_name(name: &ObjectName) -> Option<String> {
    match name.0.as_slice() {
        [one] => one.as_ident().map(|i| i.value.to_lowercase()),
        _ => None,
    }
}

/// Only SELECTs, VALUES, parenthesized queries and set operations over them;
/// `TABLE x`, and anything that writes, is refused wherever it appears.
fn read_only_body(body: &SetExpr) -> Result<(), String> {
    match body {
        SetExpr::Select(select) if select.into.is_some() => {
            Err("SELECT INTO is not allowed (the query API is read-only)".into())
        }
        SetExpr::Select(_) | SetExpr::Query(_) | SetExpr::Values(_) => Ok(()),
        SetExpr::SetOperation { left, right, .. } => {
            read_only_body(left).and(read_only_body(right))
        }
        SetExpr::Table(_) => Err("TABLE statements are not allowed; use SELECT".into()),
        _ => Err("only SELECT queries are allowed (the query API is read-only)".into()),
    }
}

impl Visitor for Guard<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        let mut scope = HashSet::new();
        if let Some(with) = &query.with {
            let names: Vec<String> = with
                .cte_tables
                .iter()
                .map(|c| c.alias.name.value.to_lowercase())
                .collect();
            for (i, (cte, name)) in with.cte_tables.iter().zip(&names).enumerate() {
                if RESERVED_PREFIXES.iter().any(|p| name.starts_with(p)) {
                    return self.refuse(format!("a CTE may not be named {name:?}"));
                }
                // Without RECURSIVE, a CTE's own name and later siblings'
                // names inside its body are real tables to PostgreSQL, not
                // CTEs: they must not pass as CTEs here.
                if !with.recursive {
                    let not_yet_defined = &names[i..];
                    let mut early = None;
                    let _ =
                        sqlparser::ast::visit_relations(&*cte.query, |relation| match simple_name(
                            relation,
                        )
                        .filter(|n| not_yet_defined.contains(n))
                        {
                            Some(n) => {
                                early = Some(n);
                                ControlFlow::Break(())
                            }
                            None => ControlFlow::Continue(()),
                        });
                    if let Some(early) = early {
                        return self.refuse(format!(
                            "CTE {name} refers to {early}, which is not defined before it (use WITH RECURSIVE for that)"
                        ));
                    }
                }
                scope.insert(name.clone());
            }
        }
        self.scopes.push(scope);
        if !query.locks.is_empty() {
            return self.refuse("row locks (FOR UPDATE/SHARE) are not allowed".into());
        }
        if let Err(problem) = read_only_body(&query.body) {
            return self.refuse(problem);
        }
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _query: &Query) -> ControlFlow<()> {
        self.scopes.pop();
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            TableFactor::Table { args: None, .. }
            | TableFactor::Derived { .. }
            | TableFactor::NestedJoin { .. } => ControlFlow::Continue(()),
            TableFactor::Table { name, .. } => {
                self.refuse(format!("table function {name} is not allowed in queries"))
            }
            _ => self.refuse("only tables, subqueries and joins may appear in FROM".into()),
        }
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        match simple_name(relation) {
            Some(name) if self.tables.contains(&name) || self.is_cte(&name) => {
                ControlFlow::Continue(())
            }
            _ => self.refuse(format!(
                "unknown table {relation}: queries may read only stream tables ({})",
                sorted(self.tables).join(", ")
            )),
        }
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(function) = expr {
            match simple_name(&function.name) {
                Some(name) if ALLOWED_FUNCTIONS.contains(&name.as_str()) => {}
                _ => {
                    return self.refuse(format!(
                        "function {} is not allowed in queries",
                        function.name
                    ))
                }
            }
        }
        ControlFlow::Continue(())
    }
}

fn sorted(set: &HashSet<String>) -> Vec<&str> {
    let mut names: Vec<&str> = set.iter().map(String::as_str).collect();
    names.sort();
    names
}

/// Streams rows off `$conn` (a `&mut` connection) into a [`QueryResult`],
/// converting values with `$value`. A macro, so that one body serves both
/// backends' concrete connection types.
macro_rules! collect {
    ($conn:expr, $sql:expr, $max_rows:expr, $value:expr) => {{
        let mut columns: Option<Vec<String>> = None;
        let mut rows = Vec::new();
        let mut truncated = false;
        {
            let mut stream = sqlx::query($sql).fetch(&mut *$conn);
            while let Some(row) = stream.try_next().await.map_err(db_error)? {
                if rows.len() == $max_rows {
                    truncated = true;
                    break;
                }
                if columns.is_none() {
                    columns = Some(row.columns().iter().map(|c| c.name().to_string()).collect());
                }
                rows.push((0..row.len()).map(|i| $value(&row, i)).collect());
            }
        }
        let columns = match columns {
            Some(columns) => columns,
            None => {
                let described = (&mut *$conn).describe($sql).await.map_err(db_error)?;
                described
                    .columns()
                    .iter()
                    .map(|c| c.name().to_string())
                    .collect()
            }
        };
        Ok::<_, QueryError>(QueryResult {
            columns,
            rows,
            truncated,
        })
    }};
}

/// The result column names a checked query would have, without running it.
/// (Prepared, not described: sqlx describes a SQLite statement by analysing
/// its bytecode, which takes hundreds of milliseconds for an aggregate.)
pub async fn columns(db: &Db, sql: &str) -> Result<Vec<String>, QueryError> {
    fn names<C: Column>(columns: &[C]) -> Vec<String> {
        columns.iter().map(|c| c.name().to_string()).collect()
    }
    match &db.pools {
        Pools::Sqlite { read, .. } => read.prepare(sql).await.map(|s| names(s.columns())),
        Pools::Postgres { read, .. } => read.prepare(sql).await.map(|s| names(s.columns())),
    }
    .map_err(db_error)
}

/// Runs a checked query on a read-only connection.
pub async fn run(db: &Db, sql: &str, limits: &QueryLimits) -> Result<QueryResult, QueryError> {
    let work = async {
        match &db.pools {
            Pools::Sqlite { read, .. } => {
                let mut conn = read.acquire().await.map_err(db_error)?;
                // SQLite has no statement timeout, and dropping the future does
                // not stop its worker thread: interrupt the statement itself.
                let deadline = std::time::Instant::now() + limits.timeout;
                conn.lock_handle()
                    .await
                    .map_err(db_error)?
                    .set_progress_handler(10_000, move || std::time::Instant::now() < deadline);
                collect!(conn, sql, limits.max_rows, sqlite_value)
            }
            Pools::Postgres { read: pool, .. } => {
                let mut tx = pool.begin().await.map_err(db_error)?;
                sqlx::query("SET TRANSACTION READ ONLY")
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                let timeout = format!(
                    "SET LOCAL statement_timeout = {}",
                    limits.timeout.as_millis()
                );
                sqlx::query(&timeout)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                let result = collect!(tx, sql, limits.max_rows, postgres_value);
                let _ = tx.rollback().await;
                result
            }
        }
    };
    // The database's own deadline comes first; this one only catches a
    // connection that never answers.
    let result = tokio::time::timeout(limits.timeout + Duration::from_secs(2), work)
        .await
        .map_err(|_| QueryError::Timeout(limits.timeout))?;
    match result {
        // SQLite's progress handler stopped it, or PostgreSQL's statement_timeout.
        Err(QueryError::Database(message))
            if message == "interrupted" || message.contains("statement timeout") =>
        {
            Err(QueryError::Timeout(limits.timeout))
        }
        other => other,
    }
}

fn db_error(e: sqlx::Error) -> QueryError {
    match e {
        sqlx::Error::Database(db) => QueryError::Database(db.message().to_string()),
        other => QueryError::Database(other.to_string()),
    }
}

/// Gives back as booleans the 0s and 1s of the result `columns` known to
/// read a boolean column ([`crate::expand::tiered_bool_outputs`]).
pub fn restore_bools(result: &mut QueryResult, columns: &[usize]) {
    for row in &mut result.rows {
        for &i in columns {
            if let Some(value) = row.get_mut(i) {
                match value.as_i64() {
                    Some(0) => *value = Value::Bool(false),
                    Some(1) => *value = Value::Bool(true),
                    _ => {}
                }
            }
        }
    }
}

pub fn sqlite_value(row: &sqlx::sqlite::SqliteRow, i: usize) -> Value {
    let Ok(raw) = row.try_get_raw(i) else {
        return Value::Null;
    };
    if raw.is_null() {
        return Value::Null;
    }
    let declared_bool = row.column(i).type_info().name() == "BOOLEAN";
    let runtime = raw.type_info().name().to_string();
    match runtime.as_str() {
        "INTEGER" if declared_bool => row
            .try_get::<bool, _>(i)
            .map(Value::from)
            .unwrap_or(Value::Null),
        "INTEGER" => row
            .try_get::<i64, _>(i)
            .map(Value::from)
            .unwrap_or(Value::Null),
        "REAL" => row
            .try_get::<f64, _>(i)
            .map(Value::from)
            .unwrap_or(Value::Null),
        "TEXT" => row
            .try_get::<String, _>(i)
            .map(Value::from)
            .unwrap_or(Value::Null),
        _ => row
            .try_get::<Vec<u8>, _>(i)
            .map(|b| Value::from(String::from_utf8_lossy(&b).into_owned()))
            .unwrap_or(Value::Null),
    }
}

pub fn postgres_value(row: &sqlx::postgres::PgRow, i: usize) -> Value {
    fn get<'r, T>(row: &'r sqlx::postgres::PgRow, i: usize) -> Value
    where
        T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Into<Value>,
    {
        row.try_get::<Option<T>, _>(i)
            .ok()
            .flatten()
            .map_or(Value::Null, Into::into)
    }
    let type_name = row.column(i).type_info().name().to_string();
    match type_name.as_str() {
        "BOOL" => get::<bool>(row, i),
        "INT2" => get::<i16>(row, i),
        "INT4" => get::<i32>(row, i),
        "INT8" => get::<i64>(row, i),
        "FLOAT4" => get::<f32>(row, i),
        "FLOAT8" => get::<f64>(row, i),
        "NUMERIC" => row
            .try_get::<Option<rust_decimal::Decimal>, _>(i)
            .ok()
            .flatten()
            .and_then(|d| d.to_f64())
            .map_or(Value::Null, Value::from),
        "JSON" | "JSONB" => row
            .try_get::<Option<Value>, _>(i)
            .ok()
            .flatten()
            .unwrap_or(Value::Null),
        "TIMESTAMPTZ" => row
            .try_get::<Option<chrono::DateTime<chrono::Utc>>, _>(i)
            .ok()
            .flatten()
            .map_or(Value::Null, |t| Value::from(t.to_rfc3339())),
        "TIMESTAMP" => row
            .try_get::<Option<chrono::NaiveDateTime>, _>(i)
            .ok()
            .flatten()
            .map_or(Value::Null, |t| Value::from(t.to_string())),
        "DATE" => row
            .try_get::<Option<chrono::NaiveDate>, _>(i)
            .ok()
            .flatten()
            .map_or(Value::Null, |t| Value::from(t.to_string())),
        _ => get::<String>(row, i),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> HashSet<String> {
        ["temperature".to_string(), "sales".to_string()].into()
    }

    #[test]
    fn allows_ordinary_analytics() {
        for sql in [
            "SELECT * FROM temperature",
            "SELECT device_id, avg(celsius) FROM temperature WHERE received_at > 0 GROUP BY device_id",
            "WITH t AS (SELECT * FROM temperature) SELECT count(*) FROM t",
            "WITH a AS (SELECT 1 AS x), b AS (SELECT x FROM a) SELECT * FROM b",
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 5) SELECT * FROM c",
            "SELECT a.device_id FROM temperature a JOIN sales b ON a.device_id = b.device_id",
            "SELECT 1",
        ] {
            for backend in [Backend::Sqlite, Backend::Postgres] {
                check(sql, &tables(), backend).unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
        }
    }

    #[test]
    fn parses_comments_as_the_database_does() {
        // SQLite does not nest comments: the subquery is live code there.
        let sql = "SELECT 1 /* /* */ , (SELECT count(*) FROM fleetgate_devices) -- */";
        let err = check(sql, &tables(), Backend::Sqlite)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown table"), "{err}");
    }

    #[test]
    fn refuses_writes_other_tables_and_dangerous_functions() {
        for (sql, expected) in [
            ("DELETE FROM temperature", "only SELECT"),
            ("INSERT INTO temperature VALUES (1)", "only SELECT"),
            ("ATTACH DATABASE '/tmp/x.db' AS x", "only SELECT"),
            ("SELECT 1; DROP TABLE temperature", "one statement"),
            ("SELECT * FROM fleetgate_devices", "unknown table"),
            ("SELECT * FROM sqlite_master", "unknown table"),
            ("SELECT * FROM pg_catalog.pg_tables", "unknown table"),
            ("SELECT pg_read_file('/etc/passwd')", "not allowed"),
            ("SELECT load_extension('x')", "not allowed"),
            ("SELECT * FROM temperature FOR UPDATE", "locks"),
            ("SELECT * INTO copy FROM temperature", "SELECT INTO"),
            (
                "SELECT (SELECT count(*) FROM fleetgate_rejects)",
                "unknown table",
            ),
            ("SELEC * FROM temperature", "cannot parse"),
            // Reviewed bypasses: scoped CTE names, reserved CTE names, TABLE,
            // table functions.
            (
                "SELECT * FROM (WITH t AS (SELECT 1) SELECT 1) s, t",
                "unknown table t",
            ),
            (
                "WITH fleetgate_devices AS (SELECT * FROM fleetgate_devices) SELECT * FROM fleetgate_devices",
                "may not be named",
            ),
            ("SELECT 1 UNION ALL TABLE fleetgate_devices", "TABLE"),
            ("SELECT * FROM temperature, LATERAL pg_read_file('/etc/passwd') f", "in FROM"),
            ("SELECT * FROM generate_series(1, 10)", "not allowed"),
            ("WITH t AS (SELECT * FROM t) SELECT * FROM t", "not defined before it"),
            ("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a", "not defined before it"),
        ] {
            for backend in [Backend::Sqlite, Backend::Postgres] {
                let err = check(sql, &tables(), backend).expect_err(sql).to_string();
                assert!(err.contains(expected), "{backend:?} {sql}: {err}");
            }
        }
    }
}
