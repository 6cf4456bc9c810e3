//! Queries name streams; a stream is not always one plain table. A tiered
//! stream's rows are in two tables, a compacted field is in `extra`, not a
//! column, and a PostgreSQL stream table has a column queries must not see
//! (`catalog::INSERT_XID`). [`expand`] rewrites a checked query so each such stream
//! reads as declared, under the name (or alias) the query gives it.

use std::collections::HashMap;
use std::ops::ControlFlow;

use fleetgate_protocol::schema::RECEIVED_AT;
use sqlparser::ast::{
    BinaryOperator, Expr, Query, Select, SelectItem, SetExpr, Statement, TableFactor, VisitMut,
    VisitorMut,
};
use sqlparser::dialect::{Dialect, PostgreSqlDialect, SQLiteDialect};
use sqlparser::parser::Parser;

use crate::catalog::Catalog;
use crate::db::Backend;
use crate::sql_expr::{integer, split_and, ReceivedSpan};
use crate::values::ColumnKind;

/// `query` with each stream it reads that is not one plain table (tiered,
/// with compacted fields, or on PostgreSQL) replaced by
/// [`crate::catalog::Stream::read_from`] (a superseded table with
/// compacted fields by `read_superseded`) under the
/// stream's name (or alias); `None` when it reads none, and runs as
/// written. An error when it cannot be read so: it must not run on one
/// tier alone, or miss a compacted field.
pub fn expand(
    query: &Query,
    catalog: &Catalog,
    backend: Backend,
) -> Result<Option<String>, String> {
    // Each name that reads through a subquery, and the subquery.
    let mut reads: HashMap<String, String> = HashMap::new();
    let spans = received_spans(query);
    for stream in catalog.list() {
        if !stream.is_plain() {
            let span = spans.get(&stream.name).copied().unwrap_or_default();
            reads.insert(stream.name.clone(), stream.read_from_within(span));
        }
        let superseded = stream.read_superseded();
        if stream.bucket().is_some() && superseded != stream.superseded_table() {
            reads.insert(stream.superseded_table(), superseded);
        }
    }
    if reads.is_empty() {
        return Ok(None);
    }
    let dialect: Box<dyn Dialect> = match backend {
        Backend::Sqlite => Box::new(SQLiteDialect {}),
        Backend::Postgres => Box::new(PostgreSqlDialect {}),
    };
    let mut expander = Expander {
        reads,
        dialect,
        changed: false,
    };
    let mut query = query.clone();
    if let ControlFlow::Break(problem) = query.visit(&mut expander) {
        return Err(problem);
    }
    Ok(expander.changed.then(|| query.to_string()))
}

/// The spans the outermost SELECT's WHERE puts on `received_at` of the
/// streams it reads (comparisons with integers, BETWEEN, joined by AND),
/// for streams the query names only there: a stream named again elsewhere
/// (a subquery, a self-join) is read whole.
fn received_spans(query: &Query) -> HashMap<String, ReceivedSpan> {
    let mut named: HashMap<String, usize> = HashMap::new();
    let _ = sqlparser::ast::visit_relations(query, |relation| {
        *named
            .entry(relation.to_string().to_lowercase())
            .or_default() += 1;
        ControlFlow::<()>::Continue(())
    });
    let mut spans = HashMap::new();
    let SetExpr::Select(select) = query.body.as_ref() else {
        return spans;
    };
    let Some(selection) = &select.selection else {
        return spans;
    };
    let (tables, alone) = from_tables(select);
    for FromTable {
        table,
        under,
        quoted,
    } in tables
    {
        // A quoted alias may differ from another only by case: not worth
        // the risk of bounding the wrong table.
        if named.get(&table) != Some(&1) || quoted {
            continue;
        }
        // `received_at` alone names it only when it is the one table.
        let is_received = |expr: &Expr| match expr {
            Expr::Identifier(id) => alone && id.value.eq_ignore_ascii_case(RECEIVED_AT),
            Expr::CompoundIdentifier(parts) => {
                parts.len() == 2
                    && parts[0].quote_style.is_none()
                    && parts[0].value.to_lowercase() == under
                    && parts[1].value.eq_ignore_ascii_case(RECEIVED_AT)
            }
            _ => false,
        };
        let mut span = ReceivedSpan::default();
        let mut narrow = |from: Option<i64>, to: Option<i64>| {
            span.from = span.from.max(from);
            span.to = match (span.to, to) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        };
        for conjunct in split_and(selection) {
            match conjunct {
                Expr::BinaryOp { left, op, right } => {
                    let (bound, op) = match (is_received(left), is_received(right)) {
                        (true, false) => (integer(right), op.clone()),
                        (false, true) => (integer(left), flip(op)),
                        _ => continue,
                    };
                    let Some(bound) = bound else { continue };
                    match op {
                        BinaryOperator::Gt | BinaryOperator::GtEq => narrow(Some(bound), None),
                        BinaryOperator::Lt | BinaryOperator::LtEq => narrow(None, Some(bound)),
                        BinaryOperator::Eq => narrow(Some(bound), Some(bound)),
                        _ => {}
                    }
                }
                Expr::Between {
                    expr,
                    negated: false,
                    low,
                    high,
                } if is_received(expr) => narrow(integer(low), integer(high)),
                _ => {}
            }
        }
        if span != ReceivedSpan::default() {
            spans.insert(table, span);
        }
    }
    spans
}

/// A table a SELECT's FROM names (joins included).
struct FromTable {
    table: String,
    /// The name the query reads it under: its alias, or its own.
    under: String,
    /// Whether the alias is quoted.
    quoted: bool,
}

/// The tables `select` reads from, and whether FROM holds just one item.
fn from_tables(select: &Select) -> (Vec<FromTable>, bool) {
    let factors: Vec<&TableFactor> = select
        .from
        .iter()
        .flat_map(|t| std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation)))
        .collect();
    let alone = factors.len() == 1;
    let tables = factors
        .into_iter()
        .filter_map(|factor| {
            let TableFactor::Table { name, alias, .. } = factor else {
                return None;
            };
            let table = name.to_string().to_lowercase();
            Some(FromTable {
                under: alias
                    .as_ref()
                    .map_or(table.clone(), |a| a.name.value.to_lowercase()),
                quoted: alias.as_ref().is_some_and(|a| a.name.quote_style.is_some()),
                table,
            })
        })
        .collect();
    (tables, alone)
}

/// `a op b` as `b op' a`.
fn flip(op: &BinaryOperator) -> BinaryOperator {
    match op {
        BinaryOperator::Gt => BinaryOperator::Lt,
        BinaryOperator::GtEq => BinaryOperator::LtEq,
        BinaryOperator::Lt => BinaryOperator::Gt,
        BinaryOperator::LtEq => BinaryOperator::GtEq,
        other => other.clone(),
    }
}

/// The result columns of `query` that read a tiered stream's boolean
/// column as it is (`flag`, `m.flag`, or `*` over that one stream). SQLite
/// tells a boolean from 0/1 only by a table column's declared type, which
/// a union with the cold tier's unpacked rows does not have: these are the
/// columns to give back as booleans there ([`crate::row_stream::RowStream::restoring_bools`]).
pub fn tiered_bool_outputs(query: &Query, catalog: &Catalog) -> Vec<usize> {
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Vec::new();
    };
    // The tiered streams read, under the name the query reads them by.
    let (tables, one_table) = from_tables(select);
    let streams: Vec<_> = tables
        .into_iter()
        .filter_map(|t| {
            let stream = catalog.get(&t.table).filter(|s| s.tiered())?;
            Some((t.under, stream))
        })
        .collect();
    if streams.is_empty() {
        return Vec::new();
    }
    let mut bools = Vec::new();
    let mut position = 0;
    for item in &select.projection {
        let expr = match item {
            SelectItem::UnnamedExpr(expr) | SelectItem::ExprWithAlias { expr, .. } => expr,
            SelectItem::Wildcard(_) if one_table => {
                let columns = streams[0].1.query_columns();
                for (i, column) in columns.iter().enumerate() {
                    if streams[0].1.column_kind(column) == Some(ColumnKind::Bool) {
                        bools.push(position + i);
                    }
                }
                position += columns.len();
                continue;
            }
            // Where the columns after it are is not known here.
            _ => break,
        };
        let (qualifier, column) = match expr {
            Expr::Identifier(id) => (None, id.value.to_lowercase()),
            Expr::CompoundIdentifier(parts) if parts.len() == 2 => (
                Some(parts[0].value.to_lowercase()),
                parts[1].value.to_lowercase(),
            ),
            _ => {
                position += 1;
                continue;
            }
        };
        let is_bool = streams.iter().any(|(under, stream)| {
            qualifier.as_ref().is_none_or(|q| q == under)
                && stream.column_kind(&column) == Some(ColumnKind::Bool)
        });
        if is_bool {
            bools.push(position);
        }
        position += 1;
    }
    bools
}

struct Expander {
    reads: HashMap<String, String>,
    dialect: Box<dyn Dialect>,
    changed: bool,
}

impl VisitorMut for Expander {
    type Break = String;

    // After the children: the replacement names the stream's table itself,
    // which must not be replaced again.
    fn post_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<String> {
        let TableFactor::Table { name, alias, .. } = factor else {
            return ControlFlow::Continue(());
        };
        let table = name.to_string().to_lowercase();
        let Some(from) = self.reads.get(&table) else {
            return ControlFlow::Continue(());
        };
        let read_from = match alias {
            // `… AS <stream>`, renamed to the query's alias.
            Some(alias) if alias.columns.is_empty() => {
                let cut = from.rfind(" AS ").expect("read_from ends with an alias");
                format!("{} AS {}", &from[..cut], alias.name)
            }
            // `AS m(a, b)` renames columns, which a union's would not match.
            Some(alias) => {
                return ControlFlow::Break(format!(
                    "{table} is read through a subquery (tiers, compacted fields, or a hidden column); \
                     read it without renaming its columns ({alias})"
                ))
            }
            None => from.clone(),
        };
        let template = format!("SELECT 1 FROM {read_from}");
        let relation = Parser::parse_sql(self.dialect.as_ref(), &template)
            .ok()
            .and_then(|mut statements| match statements.pop() {
                Some(Statement::Query(parsed)) => match *parsed.body {
                    SetExpr::Select(select) => select.from.into_iter().next(),
                    _ => None,
                },
                _ => None,
            });
        let Some(from) = relation else {
            return ControlFlow::Break(format!("cannot read all of {table}"));
        };
        *factor = from.relation;
        self.changed = true;
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Db;

    #[tokio::test]
    async fn queries_read_both_tiers_under_the_name_or_alias_they_use() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(None, &dir.path().join("store.db")).await.unwrap();
        let catalog = Catalog::load(db).await.unwrap();
        let file = fleetgate_protocol::schema::StreamsFile::parse(
            "[streams.meter]\nhot = \"1h\"\nfields.kwh = { type = \"float\" }\n\
             [streams.plain]\nfields.kwh = { type = \"float\" }\n",
        )
        .unwrap();
        catalog.apply(&file).await.unwrap();
        let tables = ["meter", "plain"].map(String::from).into_iter().collect();
        let expanded = |sql: &str| {
            let parsed = crate::query::check(sql, &tables, Backend::Sqlite).unwrap();
            expand(&parsed, &catalog, Backend::Sqlite).unwrap()
        };
        let both = "SELECT id, device_id, received_at, kwh, extra FROM meter UNION ALL \
                    SELECT (r.value ->> 'id') AS id, (r.value ->> 'device_id') AS device_id, \
                    (r.value ->> 'received_at') AS received_at, (r.value ->> 'kwh') AS kwh, \
                    (r.value ->> 'extra') AS extra \
                    FROM fgc_meter AS fgc, json_each(fg_decompress(fgc.rows)) AS r";
        assert_eq!(
            expanded("SELECT kwh FROM meter").unwrap(),
            format!("SELECT kwh FROM ({both}) AS meter")
        );
        assert_eq!(
            expanded("SELECT m.kwh FROM meter AS m JOIN plain ON true").unwrap(),
            format!("SELECT m.kwh FROM ({both}) AS m JOIN plain ON true")
        );
        assert_eq!(expanded("SELECT kwh FROM plain"), None);
        // Bounds on received_at keep the cold side to the chunks within.
        let bounded = expanded(
            "SELECT kwh FROM meter WHERE kwh > 1 AND (received_at >= 100 AND 200 > received_at)",
        )
        .unwrap();
        assert!(
            bounded.contains("WHERE fgc.last_at >= 100 AND fgc.first_at <= 200) AS meter"),
            "{bounded}"
        );
        let between =
            expanded("SELECT m.kwh FROM meter AS m WHERE m.received_at BETWEEN 5 AND 9").unwrap();
        assert!(
            between.contains("WHERE fgc.last_at >= 5 AND fgc.first_at <= 9) AS m"),
            "{between}"
        );
        // Named twice, or bounded only inside: read whole.
        for whole in [
            "SELECT a.kwh FROM meter AS a JOIN meter AS b ON a.id = b.id WHERE a.received_at > 5",
            "SELECT kwh FROM meter WHERE received_at > 5 OR kwh > 1",
            "SELECT kwh FROM meter JOIN plain ON true WHERE received_at > 5",
        ] {
            assert!(!expanded(whole).unwrap().contains("fgc.last_at"), "{whole}");
        }
        let renamed = crate::query::check("SELECT a FROM meter AS m(a)", &tables, Backend::Sqlite);
        if let Ok(parsed) = renamed {
            assert!(expand(&parsed, &catalog, Backend::Sqlite).is_err());
        }
    }
}
