//! Read-only SQL over the stream tables.
//!
//! Two independent guards: the statement is parsed and must be one SELECT
//! naming only stream tables and known-harmless functions; and it runs on a
//! read-only SQLite connection or in a PostgreSQL READ ONLY transaction, so
//! even a statement the parser misjudged cannot write.
//!
//! Every query's cost is bounded too. Its text: length, terms and bracket
//! nesting are checked on the tokens before parsing, and the depth of the
//! parsed tree before anything else walks it (see [`MAX_DEPTH`]). Its
//! result: [`QueryLimits::max_bytes`], counted as rows arrive. Its memory in
//! the database: on SQLite, limits on the read connection and a memory
//! budget for the query ([`crate::sqlite_limits`]), whose rows are read by
//! [`crate::sqlite_query`]; on PostgreSQL, `work_mem` and `temp_file_limit`
//! on the read pool's sessions ([`crate::db`]), and a row-size check that
//! keeps a row over the bound from ever being sent.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::time::Duration;

use futures::TryStreamExt;
use rust_decimal::prelude::ToPrimitive;
use serde::Serialize;
use serde_json::Value;
use sqlparser::ast::{
    ArrayElemTypeDef, DataType, Expr, Ident, ObjectName, Query, SelectItem, SetExpr, Statement,
    TableFactor, Visit, Visitor, VisitorMut,
};
use sqlparser::dialect::{Dialect, PostgreSqlDialect, SQLiteDialect};
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};
use sqlx::{Column, Executor, Row, Statement as _, TypeInfo, ValueRef};

use crate::db::{Backend, Db, Pools};
use crate::row_stream::{Batcher, Chunk, RowStream};

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
    /// The result would be larger than [`QueryLimits::max_bytes`].
    #[error("the result is larger than {} (the limit on a query's result)", human_bytes(*.0))]
    ResultTooLarge(usize),
    /// A value the query builds is larger than [`QueryLimits::max_bytes`]
    /// (SQLite's length limit).
    #[error("a value the query builds is larger than {} (the limit on a query's values)", human_bytes(*.0))]
    ValueTooLarge(usize),
    /// The query needed more of SQLite's memory than its budget
    /// ([`crate::sqlite_limits::budget_for`]).
    #[error("the query needs more memory than a query may take")]
    OutOfMemory,
    /// The server could not take the query on now (no thread to check it on).
    #[error("{0}")]
    Unavailable(String),
    /// The reader of a streamed answer left (a cancelled query, a client
    /// that hung up): what stops its producer, seen by nobody.
    #[error("the reader of the answer went away")]
    ReaderGone,
}

pub struct QueryLimits {
    pub max_rows: usize,
    pub timeout: Duration,
    /// Most bytes a result may hold, and the longest value a query may
    /// build. A result is counted as its rows arrive: each value costs its
    /// JSON text plus [`VALUE_BYTES`] (its size in memory), so the bound
    /// holds for the rows kept and for the answer sent. `usize::MAX` for the
    /// store's own reads, which `max_rows` bounds.
    pub max_bytes: usize,
}

/// `--query-max-bytes`'s default.
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            max_rows: 100_000,
            timeout: Duration::from_secs(30),
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// `1048576` as `1 MiB`, for messages.
pub fn human_bytes(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// Longest query text, in bytes.
pub const MAX_SQL_BYTES: usize = 256 * 1024;
/// Most terms a query may have: words, literals and operators (commas,
/// parentheses, semicolons, periods, whitespace and comments do not count).
/// This bounds the work of parsing, and how deep a tree the parser can
/// build before [`MAX_DEPTH`] is checked (a term or two per level).
pub const MAX_TERMS: usize = 10_000;
/// Most brackets (`(`, `[`, `{`) open at once.
pub const MAX_NESTING: usize = 32;
/// Deepest parsed tree a query may have: every operator of a chain is a
/// level (`a AND b AND c` is two deep, as the parser nests `(a AND b) AND
/// c`), as are function calls, casts, subqueries and set operations.
///
/// Why: everything after the check walks the tree recursively on a
/// worker's stack (view routing, expansion, `Clone`, `Drop`). A
/// 40,000-term flat chain once overflowed a tokio worker's stack and
/// aborted the process. In a debug build those walks take up to 8 KB a
/// level, so 256 levels need up to 2 MiB: a quarter of
/// [`WORKER_STACK_BYTES`] (a release build needs far less).
pub const MAX_DEPTH: usize = 256;
/// The stack the server's runtime threads must have (the binary sets it;
/// tokio's default is 2 MiB) for walks of a tree [`MAX_DEPTH`] deep.
pub const WORKER_STACK_BYTES: usize = 8 << 20;
/// Stack of the thread [`check`] parses on. Parsing (where sqlparser does
/// not grow its stack itself, as in nested types) and dropping a refused
/// tree recurse once per level, and the terms bound the levels to about
/// 5,000: under 1 KB each in the worst case measured, so 16 MiB is four
/// times what the deepest text needs. It is address space: a query
/// touches only what it uses.
const CHECK_STACK_BYTES: usize = 16 << 20;
/// The parser's own recursion limit. Its default, 50, would refuse before
/// [`MAX_NESTING`] and [`MAX_DEPTH`] apply, and not always with its own
/// message (a prefix chain like `NOT NOT …` that meets it backtracks into a
/// misleading syntax error). The terms bound the recursion anyway, and
/// [`check`]'s stack is sized for it.
const PARSER_RECURSION_LIMIT: usize = MAX_TERMS;

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
/// PostgreSQL does: a generic parser can be shown a different query), and
/// within the limits on length, terms, nesting and depth. Returns the
/// parsed query, for the view router; its tree is at most [`MAX_DEPTH`]
/// deep, so it may be walked, cloned and dropped on any thread.
///
/// The work runs on a thread of its own with a stack sized for the terms
/// limit ([`CHECK_STACK_BYTES`]): the parser and `Drop` recurse once per
/// level of the tree, and a refused query's tree may be as deep as its
/// terms allow. (The caller waits, as it would for parsing in place.)
pub fn check(
    sql: &str,
    tables: &HashSet<String>,
    backend: Backend,
) -> Result<Box<Query>, QueryError> {
    if sql.len() > MAX_SQL_BYTES {
        return Err(QueryError::NotAllowed(format!(
            "the query is {} bytes long; at most {MAX_SQL_BYTES} are allowed",
            sql.len()
        )));
    }
    // SQLite reads a text only up to its first NUL, so it would not run the
    // query checked here, and sqlx, preparing what follows the NUL, never
    // gets past it: `SELECT 1 /* \0 */ WHERE 1` held a read connection and a core
    // for ever (found by fuzzing). PostgreSQL refuses NUL in text anyway.
    if sql.contains('\0') {
        return Err(QueryError::NotAllowed(
            "the query contains a NUL character".into(),
        ));
    }
    std::thread::scope(|scope| {
        let checking = std::thread::Builder::new()
            .name("fleetgate-sql-check".into())
            .stack_size(CHECK_STACK_BYTES)
            .spawn_scoped(scope, || check_here(sql, tables, backend))
            .map_err(|e| QueryError::Unavailable(format!("cannot check the query now: {e}")))?;
        checking.join().unwrap_or_else(|_| {
            // A bug in the parser must not take the server down with it.
            Err(QueryError::NotAllowed(
                "cannot parse query: the parser failed on it".into(),
            ))
        })
    })
}

/// [`check`], on the calling thread, which must have [`CHECK_STACK_BYTES`].
fn check_here(
    sql: &str,
    tables: &HashSet<String>,
    backend: Backend,
) -> Result<Box<Query>, QueryError> {
    let mut statements = match backend {
        Backend::Sqlite => parse_within_limits(&SQLiteDialect {}, sql),
        Backend::Postgres => parse_within_limits(&PostgreSqlDialect {}, sql),
    }?;
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
        depth: 0,
        query_levels: Vec::new(),
        problem: None,
    };
    if let ControlFlow::Break(()) = query.visit(&mut guard) {
        return Err(QueryError::NotAllowed(guard.problem.unwrap_or_default()));
    }
    Ok(query)
}

/// Tokenizes `sql`, checks its terms and nesting on the flat token list
/// (no recursion, so any text is safe to look at), and only then parses it.
fn parse_within_limits(dialect: &dyn Dialect, sql: &str) -> Result<Vec<Statement>, QueryError> {
    let cannot_parse = |e: ParserError| match e {
        ParserError::RecursionLimitExceeded => too_deep(),
        e => QueryError::NotAllowed(format!("cannot parse query: {e}")),
    };
    let tokens = Tokenizer::new(dialect, sql)
        .tokenize_with_location()
        .map_err(|e| cannot_parse(e.into()))?;
    check_tokens(&tokens)?;
    Parser::new(dialect)
        .with_recursion_limit(PARSER_RECURSION_LIMIT)
        .with_tokens_with_locations(tokens)
        .parse_statements()
        .map_err(cannot_parse)
}

fn check_tokens(tokens: &[TokenWithSpan]) -> Result<(), QueryError> {
    let mut terms = 0;
    let mut open = 0usize;
    for token in tokens {
        match token.token {
            Token::LParen | Token::LBracket | Token::LBrace => {
                open += 1;
                if open > MAX_NESTING {
                    return Err(QueryError::NotAllowed(format!(
                        "the query nests brackets more than {MAX_NESTING} deep; \
                         at most {MAX_NESTING} are allowed"
                    )));
                }
            }
            Token::RParen | Token::RBracket | Token::RBrace => open = open.saturating_sub(1),
            _ => {}
        }
        // Square brackets and braces are terms: `int[][]…` nests a type a
        // level per pair without nesting brackets.
        let term = !matches!(
            token.token,
            Token::Whitespace(_)
                | Token::Comma
                | Token::SemiColon
                | Token::Period
                | Token::LParen
                | Token::RParen
                | Token::EOF
        );
        if term {
            terms += 1;
            if terms > MAX_TERMS {
                return Err(QueryError::NotAllowed(format!(
                    "the query has more than {MAX_TERMS} terms (names, values and operators); \
                     at most {MAX_TERMS} are allowed: use IN (...) or a join rather than long \
                     chains of conditions"
                )));
            }
        }
    }
    Ok(())
}

fn too_deep() -> QueryError {
    QueryError::NotAllowed(format!(
        "the query nests more than {MAX_DEPTH} levels deep; at most {MAX_DEPTH} are allowed \
         (each operator of a chain such as a OR b OR c is a level, as are function calls, \
         casts, subqueries and UNIONs): use IN (...) rather than long chains of OR, or a join"
    ))
}

/// How many levels `data_type` nests (`int[][]` is 2). Recursive: it runs
/// in [`check`]'s guard, on its large stack, before the depth is known.
fn type_depth(data_type: &DataType) -> usize {
    let inner = match data_type {
        DataType::Array(
            ArrayElemTypeDef::AngleBracket(inner)
            | ArrayElemTypeDef::SquareBracket(inner, _)
            | ArrayElemTypeDef::Parenthesis(inner),
        )
        | DataType::Nullable(inner)
        | DataType::LowCardinality(inner) => type_depth(inner),
        DataType::Map(key, value, _) => type_depth(key).max(type_depth(value)),
        DataType::Tuple(fields) | DataType::Struct(fields, _) => fields
            .iter()
            .map(|f| type_depth(&f.field_type))
            .max()
            .unwrap_or(0),
        DataType::Union(fields) => fields
            .iter()
            .map(|f| type_depth(&f.field_type))
            .max()
            .unwrap_or(0),
        DataType::Nested(columns) | DataType::Table(Some(columns)) => columns
            .iter()
            .map(|c| type_depth(&c.data_type))
            .max()
            .unwrap_or(0),
        _ => 0,
    };
    inner + 1
}

/// How many set operations deep `body` is (`a UNION b UNION c` is 2),
/// without recursion: its tree is as deep as its terms allow.
fn set_operation_depth(body: &SetExpr) -> usize {
    let mut deepest = 0;
    let mut pending = vec![(body, 0)];
    while let Some((body, depth)) = pending.pop() {
        match body {
            SetExpr::SetOperation { left, right, .. } => {
                pending.push((left, depth + 1));
                pending.push((right, depth + 1));
            }
            _ => deepest = deepest.max(depth),
        }
    }
    deepest
}

/// Prefixes of the platform's own tables and the databases' catalogs: no
/// query may name them, not even as a CTE (which could make a reference
/// elsewhere in the query look like the CTE while it reads the real table).
const RESERVED_PREFIXES: &[&str] = &["fleetgate_", "sqlite_", "pg_"];

struct Guard<'a> {
    tables: &'a HashSet<String>,
    /// CTE names visible at the current point, one set per enclosing query.
    scopes: Vec<HashSet<String>>,
    /// Levels of the tree above the current point (see [`MAX_DEPTH`]).
    /// The visitor stops at the first level too many, so it never goes
    /// deeper itself.
    depth: usize,
    /// What each enclosing query added to `depth`.
    query_levels: Vec<usize>,
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
/// Without recursion: a chain of set operations is as deep as it is long.
fn read_only_body(body: &SetExpr) -> Result<(), String> {
    let mut pending = vec![body];
    while let Some(body) = pending.pop() {
        match body {
            SetExpr::Select(select) if select.into.is_some() => {
                return Err("SELECT INTO is not allowed (the query API is read-only)".into())
            }
            SetExpr::Select(_) | SetExpr::Query(_) | SetExpr::Values(_) => {}
            SetExpr::SetOperation { left, right, .. } => {
                pending.push(left);
                pending.push(right);
            }
            SetExpr::Table(_) => return Err("TABLE statements are not allowed; use SELECT".into()),
            _ => return Err("only SELECT queries are allowed (the query API is read-only)".into()),
        }
    }
    Ok(())
}

impl Visitor for Guard<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        // Before anything walks its body: a chain of UNIONs is a level per
        // operation, and the query itself one more.
        let levels = 1 + set_operation_depth(&query.body);
        self.depth += levels;
        if self.depth > MAX_DEPTH {
            return self.refuse(too_deep().to_string());
        }
        self.query_levels.push(levels);
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
        self.depth -= self.query_levels.pop().unwrap_or(0);
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        // A table alias may declare column types (`AS t(a int[][]…)`).
        let alias = match factor {
            TableFactor::Table { alias, .. } | TableFactor::Derived { alias, .. } => alias.as_ref(),
            _ => None,
        };
        let alias_types = alias.into_iter().flat_map(|a| &a.columns);
        for data_type in alias_types.filter_map(|c| c.data_type.as_ref()) {
            if self.depth + type_depth(data_type) > MAX_DEPTH {
                return self.refuse(too_deep().to_string());
            }
        }
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
        self.depth += 1;
        // A type is walked like the rest of the tree, but the visitor does
        // not count its levels: count them here.
        let data_type = match expr {
            Expr::Cast { data_type, .. } => Some(data_type),
            Expr::Convert { data_type, .. } => data_type.as_ref(),
            Expr::TypedString(typed) => Some(&typed.data_type),
            _ => None,
        };
        let type_levels = data_type.map_or(0, type_depth);
        if self.depth + type_levels > MAX_DEPTH {
            return self.refuse(too_deep().to_string());
        }
        if let Some(problem) = data_type.and_then(catalog_type) {
            return self.refuse(problem);
        }
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

    fn post_visit_expr(&mut self, _expr: &Expr) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }
}

/// PostgreSQL's object identifier types: a cast to one looks a name up in
/// the catalog (`'public.fleetgate_devices'::regclass` answers, or says the
/// relation does not exist), so it would let a query probe internal names.
const CATALOG_TYPES: &[&str] = &[
    "oid",
    "regclass",
    "regcollation",
    "regconfig",
    "regdictionary",
    "regnamespace",
    "regoper",
    "regoperator",
    "regproc",
    "regprocedure",
    "regrole",
    "regtype",
    "xid",
    "xid8",
    "cid",
    "tid",
];

/// Why a cast to `data_type` (or to an array or other type built on it)
/// could read internal catalog names, if it could: an object identifier
/// type, or a type named like an internal table (every PostgreSQL table
/// has a row type of its name, so `NULL::fleetgate_devices` probes for the
/// table). Functions that read the catalog (`to_regclass`, `pg_get_…`,
/// `format_type`) are refused already by the function allow-list. Its
/// stack is bounded: the guard checks a type's depth before this runs.
fn catalog_type(data_type: &DataType) -> Option<String> {
    let mut pending = vec![data_type];
    while let Some(data_type) = pending.pop() {
        match data_type {
            DataType::Regclass => {
                return Some("casts to regclass are not allowed: they read the catalog".into())
            }
            DataType::Custom(name, _) => {
                let last = name.0.last().and_then(|part| part.as_ident());
                let last = last.map(|ident| ident.value.to_lowercase());
                let last = last.unwrap_or_default();
                if CATALOG_TYPES.contains(&last.as_str()) {
                    return Some(format!(
                        "casts to {last} are not allowed: they read the catalog"
                    ));
                }
                if name.0.len() > 1 || RESERVED_PREFIXES.iter().any(|p| last.starts_with(p)) {
                    return Some(format!("type {name} is not allowed in queries"));
                }
            }
            DataType::Array(
                ArrayElemTypeDef::AngleBracket(inner)
                | ArrayElemTypeDef::SquareBracket(inner, _)
                | ArrayElemTypeDef::Parenthesis(inner),
            )
            | DataType::Nullable(inner)
            | DataType::LowCardinality(inner) => pending.push(inner),
            DataType::Map(key, value, _) => pending.extend([&**key, &**value]),
            DataType::Tuple(fields) | DataType::Struct(fields, _) => {
                pending.extend(fields.iter().map(|f| &f.field_type))
            }
            DataType::Union(fields) => pending.extend(fields.iter().map(|f| &f.field_type)),
            DataType::Nested(columns) | DataType::Table(Some(columns)) => {
                pending.extend(columns.iter().map(|c| &c.data_type))
            }
            _ => {}
        }
    }
    None
}

fn sorted(set: &HashSet<String>) -> Vec<&str> {
    let mut names: Vec<&str> = set.iter().map(String::as_str).collect();
    names.sort();
    names
}

/// What a value costs a result beyond its text (its size in memory); see
/// [`QueryLimits::max_bytes`].
pub const VALUE_BYTES: usize = std::mem::size_of::<Value>();

/// A value's cost to a result: [`VALUE_BYTES`], plus its text as JSON
/// where that can be longer (numbers, booleans and null print shorter).
pub(crate) fn value_bytes(value: &Value) -> usize {
    VALUE_BYTES
        + match value {
            Value::String(s) => json_string_len(s),
            Value::Array(_) | Value::Object(_) => {
                // The tree was costed before it was built (`json_cost`);
                // count it again, exactly, without recursion of our own.
                let mut count = ByteCount(0);
                let _ = serde_json::to_writer(&mut count, value);
                count.0 + nodes(value) * VALUE_BYTES
            }
            _ => 0,
        }
}

/// `s` as a JSON string: quotes, and escapes for quotes, backslashes and
/// control characters (up to six bytes for one).
fn json_string_len(s: &str) -> usize {
    let escapes: usize = s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 1,
            0..=0x1f => 5,
            _ => 0,
        })
        .sum();
    2 + s.len() + escapes
}

/// Values inside a JSON array or object (serde_json bounds their nesting).
fn nodes(value: &Value) -> usize {
    let mut count = 0;
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        match value {
            Value::Array(items) => {
                count += items.len();
                pending.extend(items);
            }
            Value::Object(map) => {
                count += map.len();
                pending.extend(map.values());
            }
            _ => {}
        }
    }
    count
}

struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the JSON document `text` would cost as a [`Value`] tree, computed
/// without building it: a JSON column can hold millions of small values,
/// each far larger in memory than in text.
fn json_cost(text: &[u8]) -> usize {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

    struct Cost<'a>(&'a mut usize);

    impl<'de> DeserializeSeed<'de> for Cost<'_> {
        type Value = ();

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Cost<'_> {
        type Value = ();

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            *self.0 += VALUE_BYTES;
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            *self.0 += VALUE_BYTES;
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            *self.0 += VALUE_BYTES;
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            *self.0 += VALUE_BYTES;
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            *self.0 += VALUE_BYTES;
            Ok(())
        }
        fn visit_str<E>(self, s: &str) -> Result<(), E> {
            *self.0 += VALUE_BYTES + json_string_len(s);
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            *self.0 += VALUE_BYTES;
            while seq.next_element_seed(Cost(&mut *self.0))?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            *self.0 += VALUE_BYTES;
            while map.next_key_seed(Cost(&mut *self.0))?.is_some() {
                map.next_value_seed(Cost(&mut *self.0))?;
            }
            Ok(())
        }
    }

    let mut cost = 0;
    let mut deserializer = serde_json::Deserializer::from_slice(text);
    match Cost(&mut cost).deserialize(&mut deserializer) {
        Ok(()) => cost,
        // Not JSON after all: it will arrive as text.
        Err(_) => text.len() + 2,
    }
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

/// SQLite names an unaliased function call's result column by the call's
/// text (`count(*)`), PostgreSQL by the function (`count`). Gives each
/// such call, in every SELECT of `query` (so derived tables too), its
/// function's name as an alias, so that a query's columns read the same
/// on both backends; returns whether it named any. (Other unaliased
/// expressions keep SQLite's names: PostgreSQL calls them all `?column?`,
/// which says less.)
pub fn name_calls_as_postgres(query: &mut Query) -> bool {
    struct Namer {
        named: bool,
    }
    impl VisitorMut for Namer {
        type Break = ();
        fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<()> {
            self.name_in(&mut query.body);
            ControlFlow::Continue(())
        }
    }
    impl Namer {
        fn name_in(&mut self, body: &mut SetExpr) {
            match body {
                SetExpr::Select(select) => {
                    for item in &mut select.projection {
                        let SelectItem::UnnamedExpr(expr) = item else {
                            continue;
                        };
                        if let Some(name) = function_named(expr) {
                            *item = SelectItem::ExprWithAlias {
                                expr: expr.clone(),
                                alias: Ident::with_quote('"', name),
                            };
                            self.named = true;
                        }
                    }
                }
                SetExpr::SetOperation { left, right, .. } => {
                    self.name_in(left);
                    self.name_in(right);
                }
                _ => {}
            }
        }
    }
    /// The function a column is named after, as PostgreSQL names it
    /// (through casts and parentheses).
    fn function_named(expr: &Expr) -> Option<String> {
        match expr {
            Expr::Function(call) => call
                .name
                .0
                .last()
                .and_then(|part| part.as_ident())
                .map(|ident| ident.value.to_lowercase()),
            Expr::Cast { expr, .. } | Expr::Nested(expr) => function_named(expr),
            _ => None,
        }
    }
    let mut namer = Namer { named: false };
    let _ = sqlparser::ast::VisitMut::visit(query, &mut namer);
    namer.named
}

/// The start of the error PostgreSQL raises for a row over the bound
/// ([`bounded_rows`]).
const ROW_TOO_LARGE: &str = "fleetgate: a result row is larger than";

/// `sql` for PostgreSQL, refusing at the database any row larger than
/// `max_bytes`. Rows are counted as they arrive, but a row arrives whole:
/// PostgreSQL can build a value of up to 1 GB, which would be read into
/// memory before it could be refused. The cast error is the only way plain
/// SQL can raise one; the row's size in it keeps it from being folded into
/// a constant (and raised for every query) when the query is planned. A
/// subquery with an ORDER BY is not flattened, so its order is kept.
fn bounded_rows(sql: &str, max_bytes: usize) -> String {
    let sql = without_trailing_semicolons(sql);
    format!(
        "SELECT * FROM (\n{sql}\n) AS fg_result WHERE CASE WHEN pg_column_size(fg_result.*) <= {max_bytes} \
         THEN true ELSE ('{ROW_TOO_LARGE} {max_bytes} bytes: ' || pg_column_size(fg_result.*))::int = 0 END"
    )
}

/// `sql` up to the end of its last token that is not a semicolon,
/// whitespace or a comment: one statement may end with `;`, which a
/// subquery may not.
fn without_trailing_semicolons(sql: &str) -> &str {
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize_with_location() else {
        return sql;
    };
    let last = tokens.iter().rposition(|t| {
        !matches!(
            t.token,
            Token::Whitespace(_) | Token::SemiColon | Token::EOF
        )
    });
    let Some(end) = last.and_then(|i| tokens.get(i + 1)) else {
        return sql;
    };
    // Locations count lines and characters from 1.
    let (line, column) = (end.span.start.line, end.span.start.column);
    let line_start: usize = sql
        .split_inclusive('\n')
        .take(line.saturating_sub(1) as usize)
        .map(str::len)
        .sum();
    let offset = sql[line_start..]
        .char_indices()
        .nth(column.saturating_sub(1) as usize)
        .map_or(sql.len(), |(i, _)| line_start + i);
    &sql[..offset]
}

/// Runs a checked query on a read-only connection and collects its whole
/// answer: [`stream`], read to the end.
pub async fn run(db: &Db, sql: &str, limits: &QueryLimits) -> Result<QueryResult, QueryError> {
    stream(db, sql, limits).await?.collect().await
}

/// Starts a checked query on a read-only connection: its rows arrive in
/// batches as the database yields them, within `limits` (see
/// [`crate::row_stream`]). Fails here if the query fails before its columns
/// are known (a refused statement, a timeout waiting for a connection).
pub async fn stream(db: &Db, sql: &str, limits: &QueryLimits) -> Result<RowStream, QueryError> {
    let (sender, receiver) = RowStream::channel();
    let (max_rows, max_bytes, timeout) = (limits.max_rows, limits.max_bytes, limits.timeout);
    let sql = sql.to_string();
    match &db.pools {
        Pools::Sqlite { read, .. } => {
            let read = read.clone();
            tokio::spawn(async move {
                let Ok(acquired) = tokio::time::timeout(timeout, read.acquire()).await else {
                    let _ = sender.send(Err(QueryError::Timeout(timeout))).await;
                    return;
                };
                let mut conn = match acquired {
                    Ok(conn) => conn,
                    Err(e) => {
                        let _ = sender.send(Err(db_error(e))).await;
                        return;
                    }
                };
                let runtime = tokio::runtime::Handle::current();
                // Stepping a statement blocks: a thread of the blocking
                // pool runs it, and the query's memory budget applies to
                // that thread's SQLite allocations only.
                let stepped = tokio::task::spawn_blocking(move || {
                    let deadline = std::time::Instant::now() + timeout;
                    let result = runtime
                        .block_on(conn.lock_handle())
                        .map_err(db_error)
                        .and_then(|mut handle| {
                            // SQLite has no statement timeout, and dropping
                            // the future does not stop this thread:
                            // interrupt the statement itself, at the
                            // deadline or once its reader is gone (a
                            // cancelled query, a client that hung up).
                            let reader = sender.clone();
                            handle.set_progress_handler(10_000, move || {
                                std::time::Instant::now() < deadline && !reader.is_closed()
                            });
                            crate::sqlite_limits::limit_connection(&mut handle, max_bytes);
                            let budget = crate::sqlite_limits::budget_for(max_bytes)
                                .map(crate::sqlite_limits::budget);
                            // Waiting for the reader counts against the
                            // deadline too: the connection is held meanwhile.
                            let mut send = |chunk| {
                                let until = tokio::time::Instant::from_std(deadline);
                                match runtime.block_on(tokio::time::timeout_at(
                                    until,
                                    sender.send(Ok(chunk)),
                                )) {
                                    Ok(Ok(())) => Ok(()),
                                    Ok(Err(_)) => Err(QueryError::ReaderGone),
                                    Err(_) => Err(QueryError::Timeout(timeout)),
                                }
                            };
                            let result = crate::sqlite_query::read(
                                &mut handle,
                                &sql,
                                max_rows,
                                max_bytes,
                                &mut send,
                            );
                            // The handler holds a sender: the channel ends
                            // only once it is gone too.
                            handle.remove_progress_handler();
                            match result {
                                Err(QueryError::Database(message))
                                    if message == "out of memory"
                                        && budget.is_some_and(|b| b.exceeded()) =>
                                {
                                    Err(QueryError::OutOfMemory)
                                }
                                other => other,
                            }
                        });
                    if let Err(e) = result {
                        send_failure(&runtime, &sender, e);
                    }
                    // Back to the pool from the runtime, not this thread.
                    conn
                });
                let _ = stepped.await;
            });
        }
        Pools::Postgres {
            read: pool, write, ..
        } => {
            let (pool, write) = (pool.clone(), write.clone());
            tokio::spawn(async move {
                // The database's own deadline comes first; this one only
                // catches a connection that never answers.
                let backend = std::sync::atomic::AtomicI32::new(0);
                let limits = QueryLimits {
                    max_rows,
                    max_bytes,
                    timeout,
                };
                let work = stream_postgres(&pool, &write, &sql, &limits, &sender, &backend);
                let work = async {
                    let mut work = std::pin::pin!(work);
                    tokio::select! {
                        done = &mut work => done,
                        () = sender.closed() => {
                            // Its reader left (a cancelled query, a client
                            // that hung up). Dropping the connection does
                            // not stop the server's work, and the connection
                            // stays busy until it ends: cancel it there, from
                            // a connection of the other pool, which a full
                            // read pool cannot starve. The query still holds
                            // its connection meanwhile, so the process
                            // cancelled runs this query and no other.
                            let backend = backend.load(std::sync::atomic::Ordering::Acquire);
                            if backend != 0 {
                                cancel_backend(&write, backend).await;
                            }
                            let _ = tokio::time::timeout(FAILURE_GRACE, &mut work).await;
                            Ok(())
                        }
                    }
                };
                match tokio::time::timeout(timeout + Duration::from_secs(2), work).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        let _ = tokio::time::timeout(FAILURE_GRACE, sender.send(Err(e))).await;
                    }
                    Err(_) => {
                        let _ = sender.try_send(Err(QueryError::Timeout(timeout)));
                    }
                }
            });
        }
    }
    RowStream::open(receiver, limits).await
}

/// How long a producer waits to hand its reader the error that ended the
/// query; a reader that takes longer sees a timeout instead.
const FAILURE_GRACE: Duration = Duration::from_secs(2);

/// Hands the reader the error that ended a query, from a blocking thread.
fn send_failure(
    runtime: &tokio::runtime::Handle,
    sender: &crate::row_stream::ChunkSender,
    error: QueryError,
) {
    if matches!(error, QueryError::ReaderGone) {
        return;
    }
    let _ = runtime.block_on(tokio::time::timeout(FAILURE_GRACE, sender.send(Err(error))));
}

/// Reads `sql` off a PostgreSQL read-only transaction into `sender`,
/// refusing as soon as the rows sent would cost more than `max_bytes`: a
/// value's size as it arrived is checked before it is converted.
/// Stops what the server process `pid` is running (a query its reader
/// left), through `pool`, a pool other than the one the query holds a
/// connection of.
async fn cancel_backend(pool: &sqlx::PgPool, pid: i32) {
    if let Err(e) = sqlx::query("SELECT pg_cancel_backend($1)")
        .bind(pid)
        .execute(pool)
        .await
    {
        tracing::warn!(pid, error = %e, "cannot cancel a query its reader left");
    }
}

async fn stream_postgres(
    pool: &sqlx::PgPool,
    canceller: &sqlx::PgPool,
    sql: &str,
    limits: &QueryLimits,
    sender: &crate::row_stream::ChunkSender,
    backend: &std::sync::atomic::AtomicI32,
) -> Result<(), QueryError> {
    let (max_rows, max_bytes, timeout) = (limits.max_rows, limits.max_bytes, limits.timeout);
    let mut tx = pool.begin().await.map_err(db_error)?;
    sqlx::query("SET TRANSACTION READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    // SET LOCAL statement_timeout, and the server process to cancel should
    // the reader leave, in one round trip.
    let (pid, _): (i32, String) =
        sqlx::query_as("SELECT pg_backend_pid(), set_config('statement_timeout', $1, true)")
            .bind(timeout.as_millis().to_string())
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
    backend.store(pid, std::sync::atomic::Ordering::Release);
    // PostgreSQL builds no value over 1 GB: above that the bound is no
    // bound, and the store's own reads skip it.
    let bounded;
    let sql = if max_bytes < 1 << 30 {
        bounded = bounded_rows(sql, max_bytes);
        bounded.as_str()
    } else {
        sql
    };
    let send = |chunk| async move {
        sender
            .send(Ok(chunk))
            .await
            .map_err(|_| QueryError::ReaderGone)
    };
    let mut columns_sent = false;
    let mut batcher = Batcher::default();
    let (mut count, mut bytes, mut truncated) = (0usize, 0usize, false);
    let read = async {
        let mut rows = sqlx::query(sql).fetch(&mut *tx);
        while let Some(row) = rows.try_next().await.map_err(db_error)? {
            if count == max_rows {
                truncated = true;
                break;
            }
            if !columns_sent {
                let names = row.columns().iter().map(|c| c.name().to_string());
                send(Chunk::Columns(names.collect())).await?;
                columns_sent = true;
            }
            let mut row_bytes = std::mem::size_of::<Vec<Value>>();
            let mut values = Vec::with_capacity(row.len());
            for i in 0..row.len() {
                let arrived = postgres_raw_len(&row, i);
                if bytes.saturating_add(row_bytes + VALUE_BYTES + arrived) > max_bytes {
                    return Err(QueryError::ResultTooLarge(max_bytes));
                }
                let value = postgres_value(&row, i);
                row_bytes += value_bytes(&value);
                values.push(value);
            }
            bytes = bytes.saturating_add(row_bytes);
            if bytes > max_bytes {
                return Err(QueryError::ResultTooLarge(max_bytes));
            }
            count += 1;
            if let Some(batch) = batcher.push(values, row_bytes) {
                send(batch).await?;
            }
        }
        Ok(())
    };
    let read = read.await;
    // The server's part is over (or failed), or stopped here because the
    // reader left midway, which leaves the server sending: cancel it while
    // the connection is still this query's. Either way nothing is left to
    // cancel when the reader leaves from now on.
    if matches!(read, Err(QueryError::ReaderGone)) {
        cancel_backend(canceller, pid).await;
    }
    backend.store(0, std::sync::atomic::Ordering::Release);
    match read {
        Err(QueryError::ReaderGone) => return Ok(()),
        other => other?,
    }
    if !columns_sent {
        let described = (&mut *tx).describe(sql).await.map_err(db_error)?;
        let names = described.columns().iter().map(|c| c.name().to_string());
        send(Chunk::Columns(names.collect())).await?;
    }
    if let Some(batch) = batcher.rest() {
        send(batch).await?;
    }
    send(Chunk::End { truncated }).await?;
    let _ = tx.rollback().await;
    Ok(())
}

/// A failed query's error as callers are told it: SQLite's progress
/// handler or PostgreSQL's statement_timeout stopping it is the timeout;
/// SQLite's length limit (set to the bound) and PostgreSQL's refusal of a
/// row over the bound are the byte bound.
pub(crate) fn classify(error: QueryError, timeout: Duration, max_bytes: usize) -> QueryError {
    match error {
        QueryError::Database(message)
            if message == "interrupted" || message.contains("statement timeout") =>
        {
            QueryError::Timeout(timeout)
        }
        QueryError::Database(message) if message == "string or blob too big" => {
            QueryError::ValueTooLarge(max_bytes)
        }
        QueryError::Database(message) if message.contains(ROW_TOO_LARGE) => {
            QueryError::ResultTooLarge(max_bytes)
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

/// A PostgreSQL value's size as it arrived; for JSON, what its tree will
/// cost once parsed.
fn postgres_raw_len(row: &sqlx::postgres::PgRow, i: usize) -> usize {
    let Ok(raw) = row.try_get_raw(i) else {
        return 0;
    };
    if raw.is_null() {
        return 0;
    }
    let binary = raw.format() == sqlx::postgres::PgValueFormat::Binary;
    let bytes = raw.as_bytes().unwrap_or_default();
    match row.column(i).type_info().name() {
        // Binary JSONB starts with its format's version.
        "JSONB" if binary => json_cost(bytes.get(1..).unwrap_or_default()),
        "JSON" | "JSONB" => json_cost(bytes),
        _ => bytes.len(),
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

    /// Hostile texts within the length limit: each answers with the limit
    /// it breaks, in bounded time, on this test thread's ordinary stack.
    #[test]
    fn refuses_text_over_the_limits_without_overflowing() {
        let chain = |head: &str, link: &str, n: usize| format!("{head}{}", link.repeat(n));
        let wrap = |open: &str, inner: &str, close: &str, n: usize| {
            format!("SELECT {}{inner}{}", open.repeat(n), close.repeat(n))
        };
        for (sql, expected) in [
            (chain("SELECT 1", " + 1", 40_000), "terms"),
            (chain("SELECT 1 WHERE 1", " AND 1", 40_000), "terms"),
            (chain("SELECT 1", "+1", 4_900), "levels deep"),
            (chain("SELECT 1", " || 'x'", 3_000), "levels deep"),
            (chain("SELECT ", "NOT ", 4_000) + "1", "levels deep"),
            (chain("SELECT ", "- ", 4_000) + "1", "levels deep"),
            (chain("SELECT 1", " UNION SELECT 1", 2_400), "levels deep"),
            (chain("SELECT 1", " IS NULL", 3_000), "levels deep"),
            // (SQLite reads `[]` as a quoted name, PostgreSQL as an array.)
            (
                chain("SELECT CAST(1 AS int", "[]", 4_000) + ")",
                "levels deep|cannot parse",
            ),
            (chain("SELECT 1::int", "::int", 4_000), "levels deep"),
            (
                chain("SELECT CAST(1 AS ", "ARRAY<", 4_000) + "int",
                "cannot parse",
            ),
            (
                chain("SELECT CAST(1 AS ", "ARRAY<", 3_000) + "int" + &"> ".repeat(3_000) + ")",
                "levels deep",
            ),
            (
                chain("SELECT x FROM temperature", " JOIN sales USING (x)", 3_000),
                "terms",
            ),
            (wrap("(", "1", ")", 100), "brackets"),
            (wrap("(SELECT ", "1", ")", 100), "brackets"),
            (wrap("abs(", "1", ")", 100), "brackets"),
            (wrap("CASE WHEN 1 THEN ", "1", " END", 1_500), "levels deep"),
            (chain("SELECT 'x'", " 'y'", 30_000), "terms"),
            (
                format!("SELECT '{}'", "x".repeat(MAX_SQL_BYTES)),
                "bytes long",
            ),
        ] {
            for backend in [Backend::Sqlite, Backend::Postgres] {
                let started = std::time::Instant::now();
                let err = check(&sql, &tables(), backend)
                    .map(|_| ())
                    .expect_err(&sql[..60.min(sql.len())])
                    .to_string();
                let head = &sql[..40.min(sql.len())];
                let refused = expected.split('|').any(|expected| {
                    err.contains(expected)
                        && (expected == "cannot parse" || err.contains("at most"))
                });
                assert!(refused, "{backend:?} {head}…: {err}");
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "{backend:?} {head}…: {:?}",
                    started.elapsed()
                );
            }
        }
        // Within the limits: answered, and the tree is safe to clone and
        // drop on an ordinary stack.
        for sql in [
            chain("SELECT 1", " + 1", MAX_DEPTH - 10),
            chain("SELECT 1", " UNION SELECT 1", 100),
            wrap("(", "1", ")", MAX_NESTING - 1),
            format!(
                "SELECT 1 WHERE 1 IN ({})",
                vec!["1"; MAX_TERMS - 10].join(",")
            ),
        ] {
            for backend in [Backend::Sqlite, Backend::Postgres] {
                let parsed = check(&sql, &tables(), backend)
                    .unwrap_or_else(|e| panic!("{}…: {e}", &sql[..40]));
                drop(parsed.clone());
            }
        }
    }

    /// A query at the depth limit goes through every walk the server makes
    /// of it (expansion, view rewrites of both kinds, shapes, clone,
    /// display, drop) on a quarter of a worker's stack
    /// ([`WORKER_STACK_BYTES`]): the limit leaves room, even in a debug
    /// build, where these walks take up to 8 KB a level.
    #[tokio::test]
    async fn trees_at_the_depth_limit_walk_on_a_small_stack() {
        use crate::views::{rewrite, shape, ViewPlan, ViewsFile};
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(None, &dir.path().join("store.db")).await.unwrap();
        let catalog = crate::Catalog::load(db).await.unwrap();
        let file = fleetgate_protocol::schema::StreamsFile::parse(
            "[streams.meter]\nhot = \"1h\"\nfields.kwh = { type = \"float\" }\n\
             fields.site = { type = \"string\" }\n",
        )
        .unwrap();
        catalog.apply(&file).await.unwrap();
        let stream = catalog.get("meter").unwrap();
        let views = ViewsFile::parse(
            "[views.per_site]\nsource = \"meter\"\ngroup_by = [\"site\"]\n\
             aggregates = { n = \"count(*)\", mean = \"avg(kwh)\" }\n\
             [views.by_site]\nsource = \"meter\"\nkey = [\"site\"]\nfields = [\"kwh\"]\n",
        )
        .unwrap();
        let plans: Vec<ViewPlan> = views
            .views
            .iter()
            .map(|(name, def)| ViewPlan::new(name, def, &stream, None).unwrap())
            .collect();
        let tables: HashSet<String> = ["meter".to_string()].into();
        let sites: Vec<String> = (0..MAX_DEPTH / 2 - 4)
            .map(|i| format!("site = 's{i}'"))
            .collect();
        let queries = [
            format!(
                "SELECT site, count(*) FROM meter WHERE {} GROUP BY site",
                sites.join(" OR ")
            ),
            format!(
                "SELECT site, avg(kwh{}) FROM meter WHERE site = 'a' GROUP BY site",
                " + 0".repeat(MAX_DEPTH - 8)
            ),
            format!(
                "SELECT kwh FROM meter WHERE site = 'a' AND kwh{} > 0",
                " + 1".repeat(MAX_DEPTH - 8)
            ),
        ];
        for sql in queries {
            let parsed = check(&sql, &tables, Backend::Sqlite).unwrap();
            std::thread::scope(|scope| {
                std::thread::Builder::new()
                    .stack_size(WORKER_STACK_BYTES / 4)
                    .spawn_scoped(scope, || {
                        let expanded = crate::expand::expand(&parsed, &catalog, Backend::Sqlite)
                            .unwrap()
                            .unwrap();
                        assert!(expanded.len() > sql.len());
                        let names = vec!["a".to_string(), "b".to_string()];
                        for plan in &plans {
                            let _ = rewrite::rewrite(&parsed, plan, &names, Backend::Sqlite, &[]);
                        }
                        let _ = shape::of_query(&parsed);
                        let copy = parsed.clone();
                        assert_eq!(copy.to_string(), parsed.to_string());
                        drop(copy);
                    })
                    .unwrap()
                    .join()
                    .unwrap();
            });
        }
    }

    #[test]
    fn statements_lose_their_trailing_semicolons_for_the_row_check() {
        for (sql, expected) in [
            ("SELECT 1", "SELECT 1"),
            ("SELECT 1;", "SELECT 1"),
            ("SELECT 1 ; ;  -- done\n", "SELECT 1"),
            ("SELECT 'a;é'\nFROM t /* ; */ ;\n", "SELECT 'a;é'\nFROM t"),
            ("SELECT 'é' -- trailing", "SELECT 'é'"),
            ("SELECT 'é',\n  'ü' ; ", "SELECT 'é',\n  'ü'"),
        ] {
            assert_eq!(without_trailing_semicolons(sql), expected, "{sql:?}");
        }
    }

    #[test]
    fn values_cost_their_json_and_their_memory() {
        assert_eq!(value_bytes(&Value::from(12)), VALUE_BYTES);
        assert_eq!(value_bytes(&Value::from("ab")), VALUE_BYTES + 4);
        // A control character is sent as six bytes.
        assert_eq!(value_bytes(&Value::from("\u{1}")), VALUE_BYTES + 8);
        // A JSON column costs its tree: known before it is built (six
        // values, the key among them, and two strings' text), and counted
        // once built (five values and the text).
        let text = r#"{"a":[1,2,"x"]}"#;
        let tree: Value = serde_json::from_str(text).unwrap();
        assert_eq!(json_cost(text.as_bytes()), 6 * VALUE_BYTES + 6);
        assert_eq!(value_bytes(&tree), 5 * VALUE_BYTES + text.len());
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

    /// Found by fuzzing (`fuzz/corpus/sql_guard/found-nul-in-comment`): the
    /// parser took a NUL inside a comment, SQLite stops reading there, and
    /// sqlx preparing the rest looped for ever.
    #[test]
    fn refuses_a_nul_character() {
        for sql in [
            "SELECT 1 /* \0 */ WHERE 1",
            "SELECT device_id FROM temperature -- \0",
            "SELECT '\0'",
        ] {
            for backend in [Backend::Sqlite, Backend::Postgres] {
                let err = check(sql, &tables(), backend).expect_err(sql).to_string();
                assert!(err.contains("NUL character"), "{backend:?} {sql:?}: {err}");
            }
        }
    }
}
