//! Queries name streams; a stream is not always one plain table. A tiered
//! stream's rows are in two tables, and a compacted field is in `extra`,
//! not a column. [`expand`] rewrites a checked query so each such stream
//! reads as declared, under the name (or alias) the query gives it.

use std::collections::HashMap;
use std::ops::ControlFlow;

use sqlparser::ast::{Query, SetExpr, Statement, TableFactor, VisitMut, VisitorMut};
use sqlparser::dialect::{Dialect, PostgreSqlDialect, SQLiteDialect};
use sqlparser::parser::Parser;

use crate::catalog::Catalog;
use crate::db::Backend;

/// `query` with each stream it reads that is not one plain table (tiered,
/// or with compacted fields) replaced by
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
    for stream in catalog.list() {
        if !stream.is_plain() {
            reads.insert(stream.name.clone(), stream.read_from());
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
                    "{table} is read through a subquery (tiers or compacted fields); \
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
                    SELECT id, device_id, received_at, kwh, extra FROM fgc_meter";
        assert_eq!(
            expanded("SELECT kwh FROM meter").unwrap(),
            format!("SELECT kwh FROM ({both}) AS meter")
        );
        assert_eq!(
            expanded("SELECT m.kwh FROM meter AS m JOIN plain ON true").unwrap(),
            format!("SELECT m.kwh FROM ({both}) AS m JOIN plain ON true")
        );
        assert_eq!(expanded("SELECT kwh FROM plain"), None);
        let renamed = crate::query::check("SELECT a FROM meter AS m(a)", &tables, Backend::Sqlite);
        if let Ok(parsed) = renamed {
            assert!(expand(&parsed, &catalog, Backend::Sqlite).is_err());
        }
    }
}
