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
use sqlparser::ast::{Expr, ObjectName, Query, SetExpr, Statement, Visit, Visitor};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;
use sqlx::{Column, Executor, Row, TypeInfo, ValueRef};

use crate::db::{Db, Pools};

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

/// Checks that `sql` is a single read-only SELECT over `tables`.
pub fn check(sql: &str, tables: &HashSet<String>) -> Result<(), QueryError> {
    let statements = Parser::parse_sql(&GenericDialect {}, sql)
        .map_err(|e| QueryError::NotAllowed(format!("cannot parse query: {e}")))?;
    let statement = match statements.as_slice() {
        [one] => one,
        [] => return Err(QueryError::NotAllowed("empty query".into())),
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
        ctes: HashSet::new(),
        problem: None,
    };
    if let ControlFlow::Break(()) = query.visit(&mut guard) {
        return Err(QueryError::NotAllowed(guard.problem.unwrap_or_default()));
    }
    Ok(())
}

struct Guard<'a> {
    tables: &'a HashSet<String>,
    ctes: HashSet<String>,
    problem: Option<String>,
}

impl Guard<'_> {
    fn refuse(&mut self, problem: String) -> ControlFlow<()> {
        self.problem = Some(problem);
        ControlFlow::Break(())
    }
}

fn simple_name(name: &ObjectName) -> Option<String> {
    match name.0.as_slice() {
        [one] => one.as_ident().map(|i| i.value.to_lowercase()),
        _ => None,
    }
}

impl Visitor for Guard<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.ctes.insert(cte.alias.name.value.to_lowercase());
            }
        }
        if !query.locks.is_empty() {
            return self.refuse("row locks (FOR UPDATE/SHARE) are not allowed".into());
        }
        if let SetExpr::Select(select) = query.body.as_ref() {
            if select.into.is_some() {
                return self
                    .refuse("SELECT INTO is not allowed (the query API is read-only)".into());
            }
        }
        if !matches!(
            query.body.as_ref(),
            SetExpr::Select(_)
                | SetExpr::Query(_)
                | SetExpr::SetOperation { .. }
                | SetExpr::Values(_)
        ) {
            return self
                .refuse("only SELECT queries are allowed (the query API is read-only)".into());
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        match simple_name(relation) {
            Some(name) if self.tables.contains(&name) || self.ctes.contains(&name) => {
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

/// Runs a checked query on a read-only connection.
pub async fn run(db: &Db, sql: &str, limits: &QueryLimits) -> Result<QueryResult, QueryError> {
    let work = async {
        match &db.pools {
            Pools::Sqlite { read, .. } => {
                let mut conn = read.acquire().await.map_err(db_error)?;
                collect!(conn, sql, limits.max_rows, sqlite_value)
            }
            Pools::Postgres(pool) => {
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
    tokio::time::timeout(limits.timeout, work)
        .await
        .map_err(|_| QueryError::Timeout(limits.timeout))?
}

fn db_error(e: sqlx::Error) -> QueryError {
    match e {
        sqlx::Error::Database(db) => QueryError::Database(db.message().to_string()),
        other => QueryError::Database(other.to_string()),
    }
}

fn sqlite_value(row: &sqlx::sqlite::SqliteRow, i: usize) -> Value {
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

fn postgres_value(row: &sqlx::postgres::PgRow, i: usize) -> Value {
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
            "SELECT a.device_id FROM temperature a JOIN sales b ON a.device_id = b.device_id",
            "SELECT 1",
        ] {
            check(sql, &tables()).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
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
        ] {
            let err = check(sql, &tables()).expect_err(sql).to_string();
            assert!(err.contains(expected), "{sql}: {err}");
        }
    }
}
