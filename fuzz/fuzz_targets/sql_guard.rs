//! A query's way through the store before it runs, as `POST /v1/query`
//! takes it: the SQL guard (`query::check`), compaction's note of the
//! fields it touches, `expand` (tiers and compacted fields), the view
//! router with each view's `rewrite`, and the shape automatic views count
//! by; on the fixture's streams and views.
//!
//! Input: the query text. It is checked as SQLite parses it (the
//! fixture's database, where the whole route runs, the result's column
//! names included) and as PostgreSQL does (the guard, expand, and every
//! view's rewrite). Everything after the guard runs on a thread with the
//! stack the server's runtime threads have, as in the server.

#![no_main]

use fleetgate_fuzz::{runtime, store};
use fleetgate_store::db::Backend;
use fleetgate_store::expand;
use fleetgate_store::query::{self, WORKER_STACK_BYTES};
use fleetgate_store::views::{rewrite, rows, shape};
use libfuzzer_sys::fuzz_target;
use sqlparser::ast::{Expr, Query, SelectItem, SetExpr};

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .stack_size(WORKER_STACK_BYTES)
            .spawn_scoped(scope, || route(sql))
            .expect("worker thread")
            .join()
            .expect("the query route panicked");
    });
});

fn route(sql: &str) {
    let store = store();
    let checked = query::check(sql, &store.tables, Backend::Sqlite);
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!("{sql}: {:?}", checked.as_ref().err());
    }
    if let Ok(parsed) = checked {
        store.compaction.observe(&parsed);
        let expanded = expand::expand(&parsed, &store.catalog, Backend::Sqlite);
        let primary_sql = match expanded {
            Ok(primary) => primary.unwrap_or_else(|| sql.to_string()),
            Err(_) => return,
        };
        let names = runtime()
            .block_on(query::columns(&store.db, &primary_sql))
            .unwrap_or_else(|_| output_names(&parsed));
        let routed = store.views.route(sql, &parsed, &names);
        if std::env::var_os("FUZZ_DEBUG").is_some() {
            eprintln!("names {names:?}, view {:?}: {}", routed.view, routed.sql);
        }
        let _ = expand::tiered_bool_outputs(&parsed, &store.catalog);
        let _ = shape::of_query(&parsed);
    }
    if let Ok(parsed) = query::check(sql, &store.tables, Backend::Postgres) {
        let _ = expand::expand(&parsed, &store.catalog, Backend::Postgres);
        let names = output_names(&parsed);
        for plan in store.views.plans() {
            let leads = store
                .catalog
                .get(plan.source())
                .map(|stream| rows::table_leads(&stream))
                .unwrap_or_default();
            let _ = rewrite::rewrite(&parsed, &plan, &names, Backend::Postgres, &leads);
        }
        let _ = shape::of_query(&parsed);
    }
}

/// The result's column names, as a database would name them (near
/// enough: the rewrite only needs one per output).
fn output_names(query: &Query) -> Vec<String> {
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Vec::new();
    };
    select
        .projection
        .iter()
        .map(|item| match item {
            SelectItem::ExprWithAlias { alias, .. } => alias.value.clone(),
            SelectItem::UnnamedExpr(Expr::Identifier(id)) => id.value.clone(),
            SelectItem::UnnamedExpr(Expr::CompoundIdentifier(ids)) => {
                ids.last().map(|id| id.value.clone()).unwrap_or_default()
            }
            other => other.to_string(),
        })
        .collect()
}
