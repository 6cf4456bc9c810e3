//! Rows views: one row per source row, stored under a key of the view's
//! own, with a subset of the source's fields and columns derived from
//! them.
//!
//! ```toml
//! [views.by_room]
//! source = "climate"
//! key = ["room"]                                  # the view's leading key
//! fields = ["celsius"]                            # a subset of the source's
//! derived = { label = "concat(site, '/', room)" } # computed as rows arrive
//! ```
//!
//! The source rows' own key (and `received_at`) is always kept after the
//! view's key, so a view with no fields is an index: key value → the keys
//! of the rows that hold it. A query over the stream is answered from the
//! view when every column it reads is in the view (a derived expression
//! written as declared counts as its column) and it filters on the view's
//! leading key, which the stream's table is not ordered by: then the view
//! reads the few rows the filter selects where the table would scan.

use std::ops::ControlFlow;

use fleetgate_protocol::schema::{RECEIVED_AT, ROW_ID};
use sqlparser::ast::{
    BinaryOperator, Expr, Ident, OrderBy, OrderByKind, Query, SelectItem, SetExpr, TableFactor,
    VisitMut, VisitorMut,
};
use sqlparser::dialect::{Dialect, PostgreSqlDialect, SQLiteDialect};
use sqlparser::parser::Parser;

use super::def::{Refresh, ViewDef, ViewPlan};
use super::rewrite::{column_of, single_table};
use crate::catalog::{sql_type, Stream};
use crate::db::Backend;
use crate::sql_expr::split_and;
use crate::values::ColumnKind;

/// Functions a derived column may use: deterministic, scalar, and the same
/// on SQLite and PostgreSQL.
const DERIVED_FUNCTIONS: &[&str] = &[
    "abs", "ceil", "coalesce", "concat", "floor", "length", "lower", "ltrim", "nullif", "replace",
    "round", "rtrim", "substr", "trim", "upper",
];

#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub kind: ColumnKind,
    /// What the column holds, over the stream's columns: the column itself,
    /// or a derived expression.
    pub sql: String,
    /// For a derived column: its expression as queries write it (without
    /// qualifiers), and the stream columns it reads.
    derived: Option<(String, Vec<String>)>,
}

/// A rows view checked against its source.
#[derive(Debug, Clone)]
pub struct RowsPlan {
    /// In table order: the view's key, the source rows' key, received_at,
    /// the fields, the derived columns.
    pub columns: Vec<Column>,
    /// How many leading columns form the view's declared key.
    key_len: usize,
}

fn dialect() -> PostgreSqlDialect {
    PostgreSqlDialect {}
}

/// `expr` as queries may write it, qualifiers dropped, for comparing.
fn normalized(expr: &Expr) -> String {
    let mut expr = expr.clone();
    let _ = VisitMut::visit(&mut expr, &mut Unqualify);
    expr.to_string()
}

struct Unqualify;

impl VisitorMut for Unqualify {
    type Break = ();
    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if let Expr::CompoundIdentifier(parts) = expr {
            if let Some(last) = parts.last().cloned() {
                *expr = Expr::Identifier(last);
            }
        }
        ControlFlow::Continue(())
    }
}

impl RowsPlan {
    pub fn new(
        def: &ViewDef,
        stream: &Stream,
        over: Option<&ViewPlan>,
    ) -> Result<RowsPlan, String> {
        let over_rows = match over {
            Some(view) => Some(view.rows.as_ref().ok_or_else(|| {
                format!(
                    "its source {} is an aggregate view; a view over it must aggregate too",
                    view.name
                )
            })?),
            None => None,
        };
        // A column of the source: a stream column, or (over a rows view)
        // one of that view's, which may be derived.
        let resolve = |name: &str| -> Result<Column, String> {
            if let Some(rows) = over_rows {
                return rows
                    .columns
                    .iter()
                    .find(|c| c.name == name)
                    .cloned()
                    .ok_or_else(|| {
                        format!(
                            "{name:?} is not a column of view {} (columns: {})",
                            def.source,
                            rows.columns
                                .iter()
                                .map(|c| c.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    });
            }
            let kind = stream
                .column_kind(name)
                .ok_or_else(|| stream.unknown_column(name))?;
            Ok(Column {
                name: name.to_string(),
                kind,
                sql: name.to_string(),
                derived: None,
            })
        };
        if def.key.is_empty() {
            return Err("a rows view needs a key (the column its rows are ordered by)".into());
        }
        let mut columns: Vec<Column> = Vec::new();
        let push = |column: Column, columns: &mut Vec<Column>| {
            if !columns.iter().any(|c| c.name == column.name) {
                columns.push(column);
            }
        };
        for name in &def.key {
            if columns.iter().any(|c| c.name == *name) {
                return Err(format!("the key names {name:?} twice"));
            }
            push(resolve(name)?, &mut columns);
        }
        let key_len = columns.len();
        let mut row_key = stream.primary_key();
        if row_key.is_empty() {
            row_key.push(ROW_ID.to_string());
        }
        row_key.push(RECEIVED_AT.to_string());
        for name in &row_key {
            let kind = stream
                .column_kind(name)
                .expect("a stream's key is its column");
            push(
                Column {
                    name: name.clone(),
                    kind,
                    sql: name.clone(),
                    derived: None,
                },
                &mut columns,
            );
        }
        for name in &def.fields {
            push(resolve(name)?, &mut columns);
        }
        for (name, text) in &def.derived {
            fleetgate_protocol::schema::check_identifier("derived column", name)?;
            if name.starts_with("fg_") || stream.column_kind(name).is_some() {
                return Err(format!(
                    "derived column {name:?} is reserved or already a column of {}",
                    stream.name
                ));
            }
            if columns.iter().any(|c| c.name == *name) {
                return Err(format!("{name:?} is declared twice"));
            }
            let expr = Parser::new(&dialect())
                .try_with_sql(text)
                .and_then(|mut p| p.parse_expr())
                .map_err(|e| format!("derived {name} = {text:?}: {e}"))?;
            let (kind, reads) = derived_kind(&expr, &|column| resolve(column).ok())
                .map_err(|e| format!("derived {name} = {text:?}: {e}"))?;
            // Over a rows view, a derived column it has is read as its
            // expression over the stream.
            let sql = substitute(&expr, &|column| {
                resolve(column)
                    .ok()
                    .filter(|c| c.derived.is_some())
                    .map(|c| format!("({})", c.sql))
            });
            columns.push(Column {
                name: name.clone(),
                kind,
                sql,
                derived: Some((normalized(&expr), reads)),
            });
        }
        Ok(RowsPlan { columns, key_len })
    }

    /// The stream columns the view reads.
    pub fn reads(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().flat_map(|c| match &c.derived {
            Some((_, reads)) => reads.iter().map(String::as_str).collect::<Vec<_>>(),
            None => vec![c.sql.as_str()],
        })
    }

    pub fn column_kind(&self, name: &str) -> Option<ColumnKind> {
        self.columns.iter().find(|c| c.name == name).map(|c| c.kind)
    }

    pub fn is_derived(&self, name: &str) -> bool {
        self.columns
            .iter()
            .any(|c| c.name == name && c.derived.is_some())
    }

    fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn values(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.sql.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `INSERT` of the view's rows of every source row `from` reads.
    pub fn insert_sql(&self, table: &str, from: &str) -> String {
        format!(
            "INSERT INTO {table} ({}) SELECT {} FROM {from}",
            self.column_list(),
            self.values()
        )
    }

    pub fn create_sql(&self, plan: &ViewPlan) -> Vec<String> {
        let columns: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("{} {}", c.name, sql_type(c.kind)))
            .collect();
        let (table, tail, source, trigger) =
            (plan.table(), plan.tail(), plan.source(), plan.trigger());
        let key: Vec<&str> = self
            .columns
            .iter()
            .map(|c| c.name.as_str())
            .take(self.key_len)
            .collect();
        let mut sql = vec![
            format!("CREATE TABLE {table} ({})", columns.join(", ")),
            format!("CREATE INDEX {table}_key ON {table} ({})", key.join(", ")),
            format!("CREATE TABLE {tail} ({})", columns.join(", ")),
        ];
        let target = match plan.refresh {
            Refresh::Realtime => &table,
            Refresh::Every(_) | Refresh::OnDemand => &tail,
        };
        match plan.backend {
            Backend::Postgres => {
                sql.extend(plan.statement_trigger_sql(&self.insert_sql(target, "fgv_new")));
            }
            Backend::Sqlite => {
                let mut reads: Vec<&str> = self.reads().collect();
                reads.sort_unstable();
                reads.dedup();
                let row: Vec<String> = reads.iter().map(|c| format!("NEW.{c} AS {c}")).collect();
                let from = format!("(SELECT {}) AS fgv_row", row.join(", "));
                let body = self.insert_sql(target, &from);
                sql.push(format!(
                    "CREATE TRIGGER {trigger} AFTER INSERT ON {source} BEGIN {body}; END"
                ));
            }
        }
        sql
    }

    /// How many columns the view has (narrower is cheaper to read).
    pub fn width(&self) -> usize {
        self.columns.len()
    }

    /// The query over the view, or why it cannot be.
    pub fn rewrite(
        &self,
        query: &Query,
        plan: &ViewPlan,
        names: &[String],
        backend: Backend,
        primary_leads_with: &[String],
    ) -> Result<String, String> {
        if query.with.is_some() {
            return Err("the query has a WITH clause".into());
        }
        let SetExpr::Select(select) = query.body.as_ref() else {
            return Err("the query is not a single SELECT".into());
        };
        let (table, alias) = single_table(select)?;
        if table != plan.source() {
            return Err(format!("the query reads {table}, not {}", plan.source()));
        }
        let mut relations = 0;
        let _ = sqlparser::ast::visit_relations(query, |_| {
            relations += 1;
            ControlFlow::<()>::Continue(())
        });
        if relations != 1 {
            return Err("the query reads another table in a subquery".into());
        }
        if select.projection.iter().any(|i| {
            matches!(
                i,
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
            )
        }) {
            return Err("the query selects * (the view holds some columns only)".into());
        }
        if select.projection.len() != names.len() {
            return Err("the query's result columns could not be matched".into());
        }
        // Derived expressions as the query writes them become their columns.
        let mut rewritten = query.clone();
        let _ = VisitMut::visit(&mut rewritten, &mut ToView { rows: self });
        let SetExpr::Select(mapped) = rewritten.body.as_ref() else {
            unreachable!("checked above");
        };
        let leading = &self.columns[0].name;
        if primary_leads_with.contains(leading) {
            return Err(format!(
                "the stream's table is ordered by {leading} already: the view is no cheaper"
            ));
        }
        let filters_leading = mapped
            .selection
            .as_ref()
            .is_some_and(|w| split_and(w).into_iter().any(|c| bounds(c, leading, &alias)));
        if !filters_leading {
            return Err(format!(
                "the query does not filter on {leading}, the view's leading key: it would read every row either way"
            ));
        }
        // A whole ORDER BY key may name a result alias: both databases read
        // it as the alias, on the table and on the view alike. Anywhere else
        // (WHERE, the select list, within an ORDER BY expression) the table
        // reads its own column of that name, so the view must hold it: else
        // SQLite would read the alias instead, or the view would fail where
        // the table answers.
        let mut checked = rewritten.clone();
        if let Some(OrderBy {
            kind: OrderByKind::Expressions(keys),
            ..
        }) = &mut checked.order_by
        {
            keys.retain(|key| {
                !matches!(&key.expr, Expr::Identifier(i) if output_alias(select, &i.value.to_lowercase()))
            });
        }
        let mut unknown = None;
        let _ = sqlparser::ast::visit_expressions(&checked, |e| {
            let name = match e {
                Expr::Identifier(i) => i.value.to_lowercase(),
                Expr::CompoundIdentifier(parts) if parts.len() == 2 => {
                    if parts[0].value.to_lowercase() != alias {
                        unknown = Some(format!("{e} does not name the stream"));
                        return ControlFlow::Break(());
                    }
                    parts[1].value.to_lowercase()
                }
                Expr::CompoundIdentifier(_) => {
                    unknown = Some(format!("{e} does not name the stream"));
                    return ControlFlow::Break(());
                }
                _ => return ControlFlow::Continue(()),
            };
            if self.column_kind(&name).is_none() {
                unknown = Some(if output_alias(select, &name) {
                    format!(
                        "column {name} is not in the view (a result alias stands for a column only as an ORDER BY key)"
                    )
                } else {
                    format!("column {name} is not in the view")
                });
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        });
        if let Some(reason) = unknown {
            return Err(reason);
        }
        let SetExpr::Select(select) = rewritten.body.as_mut() else {
            unreachable!("checked above");
        };
        for (item, name) in select.projection.iter_mut().zip(names) {
            let expr = match item {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e.clone(),
                _ => unreachable!("wildcards refused above"),
            };
            *item = SelectItem::ExprWithAlias {
                expr,
                alias: Ident::with_quote('"', name.as_str()),
            };
        }
        select.from[0].relation = view_relation(plan, &alias, backend)?;
        Ok(rewritten.to_string())
    }
}

/// Replaces each derived expression a query writes with its column.
struct ToView<'a> {
    rows: &'a RowsPlan,
}

impl VisitorMut for ToView<'_> {
    type Break = ();
    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if matches!(
            expr,
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) | Expr::Value(_)
        ) {
            return ControlFlow::Continue(());
        }
        let text = normalized(expr);
        if let Some(column) = self
            .rows
            .columns
            .iter()
            .find(|c| c.derived.as_ref().is_some_and(|(d, _)| *d == text))
        {
            *expr = Expr::Identifier(Ident::new(column.name.clone()));
        }
        ControlFlow::Continue(())
    }
}

fn output_alias(select: &sqlparser::ast::Select, name: &str) -> bool {
    select.projection.iter().any(|item| {
        matches!(item, SelectItem::ExprWithAlias { alias, .. } if alias.value.to_lowercase() == name)
    })
}

/// Whether a WHERE conjunct bounds `column`: a comparison, IN, BETWEEN or
/// LIKE with the column on one side.
fn bounds(conjunct: &Expr, column: &str, alias: &str) -> bool {
    let is_column = |e: &Expr| column_of(e, alias).as_deref() == Some(column);
    match conjunct {
        Expr::BinaryOp { left, op, right } => {
            matches!(
                op,
                BinaryOperator::Eq
                    | BinaryOperator::Lt
                    | BinaryOperator::LtEq
                    | BinaryOperator::Gt
                    | BinaryOperator::GtEq
            ) && (is_column(left) || is_column(right))
        }
        Expr::InList {
            expr,
            negated: false,
            ..
        }
        | Expr::Between {
            expr,
            negated: false,
            ..
        }
        | Expr::Like {
            expr,
            negated: false,
            ..
        } => is_column(expr),
        Expr::Nested(inner) => bounds(inner, column, alias),
        _ => false,
    }
}

/// What a query reads the view from, under the alias it reads the stream
/// by: the table, or (periodic) the table and its tail.
fn view_relation(plan: &ViewPlan, alias: &str, backend: Backend) -> Result<TableFactor, String> {
    let from = match plan.refresh {
        Refresh::Every(_) => format!(
            "(SELECT * FROM {} UNION ALL SELECT * FROM {}) AS {alias}",
            plan.table(),
            plan.tail()
        ),
        Refresh::Realtime | Refresh::OnDemand => format!("{} AS {alias}", plan.table()),
    };
    let dialect: Box<dyn Dialect> = match backend {
        Backend::Sqlite => Box::new(SQLiteDialect {}),
        Backend::Postgres => Box::new(PostgreSqlDialect {}),
    };
    Parser::parse_sql(dialect.as_ref(), &format!("SELECT 1 FROM {from}"))
        .ok()
        .and_then(|mut statements| match statements.pop() {
            Some(sqlparser::ast::Statement::Query(q)) => match *q.body {
                SetExpr::Select(select) => select.from.into_iter().next().map(|f| f.relation),
                _ => None,
            },
            _ => None,
        })
        .ok_or_else(|| format!("cannot read view {}", plan.name))
}

/// The columns a stream's table is ordered by first (its key's first
/// column, or its id) or indexed on: a rows view that leads with one of
/// them reads no fewer rows than the table.
pub fn table_leads(stream: &Stream) -> Vec<String> {
    let mut leads = vec![RECEIVED_AT.to_string()];
    leads.push(
        stream
            .primary_key()
            .into_iter()
            .next()
            .unwrap_or_else(|| ROW_ID.to_string()),
    );
    leads
}

type Lookup<'a> = &'a dyn Fn(&str) -> Option<Column>;

/// The kind of value a derived expression gives, and the stream columns it
/// reads; or why it cannot be a derived column.
fn derived_kind(expr: &Expr, column: Lookup) -> Result<(ColumnKind, Vec<String>), String> {
    let mut reads = Vec::new();
    let kind = kind_of(expr, column, &mut reads)?;
    if reads.is_empty() {
        return Err("it reads no column".into());
    }
    reads.sort();
    reads.dedup();
    Ok((kind, reads))
}

fn kind_of(expr: &Expr, column: Lookup, reads: &mut Vec<String>) -> Result<ColumnKind, String> {
    use sqlparser::ast::{FunctionArg, FunctionArgExpr, FunctionArguments, Value};
    Ok(match expr {
        Expr::Identifier(ident) => {
            let name = ident.value.to_lowercase();
            let found =
                column(&name).ok_or_else(|| format!("{name:?} is not a column of the source"))?;
            match found.derived {
                // A column the source view derives: the stream columns it reads.
                Some((_, derived_reads)) => reads.extend(derived_reads),
                None => reads.push(found.sql),
            }
            found.kind
        }
        Expr::Nested(inner) => kind_of(inner, column, reads)?,
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(_) => ColumnKind::Text,
            Value::Number(n, _) if n.contains(['.', 'e', 'E']) => ColumnKind::Float,
            Value::Number(..) => ColumnKind::Int,
            other => return Err(format!("literal {other} is not supported")),
        },
        Expr::BinaryOp { left, op, right } => {
            let (l, r) = (
                kind_of(left, column, reads)?,
                kind_of(right, column, reads)?,
            );
            match op {
                BinaryOperator::StringConcat => ColumnKind::Text,
                // A zero divisor fails the statement on PostgreSQL: in a
                // view's trigger, that would fail ingest.
                BinaryOperator::Divide | BinaryOperator::Modulo => {
                    return Err(format!(
                    "{op} is not supported in derived columns (a zero divisor would fail ingest)"
                ))
                }
                BinaryOperator::Plus | BinaryOperator::Minus | BinaryOperator::Multiply => {
                    match (l, r) {
                        (ColumnKind::Int, ColumnKind::Int) => ColumnKind::Int,
                        (
                            ColumnKind::Int | ColumnKind::Float,
                            ColumnKind::Int | ColumnKind::Float,
                        ) => ColumnKind::Float,
                        _ => return Err(format!("{op} needs numbers")),
                    }
                }
                other => return Err(format!("operator {other} is not supported")),
            }
        }
        Expr::Function(f) => {
            let name = f.name.to_string().to_lowercase();
            if !DERIVED_FUNCTIONS.contains(&name.as_str()) {
                return Err(format!(
                    "function {name} is not supported in derived columns (use {})",
                    DERIVED_FUNCTIONS.join(", ")
                ));
            }
            let FunctionArguments::List(list) = &f.args else {
                return Err(format!("{name} takes arguments"));
            };
            let mut kinds = Vec::new();
            for arg in &list.args {
                let FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) = arg else {
                    return Err(format!("{name}: only plain arguments"));
                };
                kinds.push(kind_of(e, column, reads)?);
            }
            // The arguments each takes on both databases.
            let arity = match name.as_str() {
                "abs" | "ceil" | "floor" | "round" | "length" | "lower" | "upper" | "trim"
                | "ltrim" | "rtrim" => 1..=1,
                "nullif" => 2..=2,
                "substr" => 2..=3,
                "replace" => 3..=3,
                _ => 1..=usize::MAX,
            };
            if !arity.contains(&kinds.len()) {
                return Err(format!(
                    "{name} takes {} argument(s) in a derived column",
                    if arity.end() == arity.start() {
                        arity.start().to_string()
                    } else {
                        format!("{} to {}", arity.start(), arity.end())
                    }
                ));
            }
            let numeric = |k: &ColumnKind| matches!(k, ColumnKind::Int | ColumnKind::Float);
            match name.as_str() {
                "abs" if numeric(&kinds[0]) => kinds[0],
                "ceil" | "floor" | "round" if numeric(&kinds[0]) => ColumnKind::Float,
                "abs" | "ceil" | "floor" | "round" => return Err(format!("{name} needs a number")),
                // One kind for all arguments: as the database would
                // unify them, or refused.
                "coalesce" | "nullif" => {
                    let mut kind = kinds[0];
                    for other in &kinds[1..] {
                        kind = match (kind, *other) {
                            (a, b) if a == b => a,
                            (a, b) if numeric(&a) && numeric(&b) => ColumnKind::Float,
                            _ => return Err(format!("{name} mixes types")),
                        };
                    }
                    kind
                }
                "length" => ColumnKind::Int,
                _ => ColumnKind::Text,
            }
        }
        other => return Err(format!("{other} is not supported in derived columns")),
    })
}

/// `expr` as SQL, with `replace` giving what some columns read as.
fn substitute(expr: &Expr, replace: &dyn Fn(&str) -> Option<String>) -> String {
    struct Substitute<'a>(&'a dyn Fn(&str) -> Option<String>);
    impl VisitorMut for Substitute<'_> {
        type Break = ();
        fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
            if let Expr::Identifier(ident) = expr {
                if let Some(sql) = (self.0)(&ident.value.to_lowercase()) {
                    if let Ok(parsed) = Parser::new(&dialect())
                        .try_with_sql(&sql)
                        .and_then(|mut p| p.parse_expr())
                    {
                        *expr = parsed;
                    }
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut expr = expr.clone();
    let _ = VisitMut::visit(&mut expr, &mut Substitute(replace));
    expr.to_string()
}
