//! Column compaction: a declared field that no query has touched for a
//! while is folded into the `extra` JSON column, and its column dropped; a
//! compacted field that a query touches again gets its column back.
//! Queries keep working across both moves ([`crate::expand`] reads a
//! compacted field out of `extra` under its name); the moves themselves
//! are the catalog's ([`Catalog::compact`], [`Catalog::promote`]).
//!
//! Which fields a query touches is judged from its text: every field of
//! every stream it names whose name appears in it as a column reference,
//! and every field for `SELECT *`. That may count a field as used when it
//! was not, never the reverse. The fields analyses and reports read count
//! too ([`FieldUse`]), each time they run. Fields that keys, booleans and views read
//! are never compacted, nor the time a bucketed stream is bucketed by. Use is counted by every process that answers
//! queries, in `fleetgate_field_usage`, so a cluster's brokers add up.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use sqlparser::ast::{Expr, Query, SelectItem, SetExpr, Visit, Visitor};
use sqlx::Row;

use crate::catalog::{compacted, Catalog, Stream};
use crate::db::Db;
use crate::views::Views;
use crate::with_pool;

#[derive(Debug, Clone)]
pub struct CompactionSettings {
    /// A field no query touched this long is compacted; `None`: never.
    pub unused_after: Option<Duration>,
    /// How long a promoted field's fence stands (see
    /// [`Catalog::promote`]): longer than any commit takes to learn of
    /// the change.
    pub fence_for: Duration,
}

impl Default for CompactionSettings {
    fn default() -> Self {
        CompactionSettings {
            unused_after: None,
            fence_for: Duration::from_secs(60),
        }
    }
}

/// One declared field, where it is stored, and when queries last used it.
#[derive(Debug, Clone, Serialize)]
pub struct FieldUsage {
    pub field: String,
    /// `"column"`, or `"extra"` while it is compacted.
    pub stored: &'static str,
    /// Unix ms of the last query that touched it (or of when the store
    /// first saw the field, before any did).
    pub last_used_at: Option<i64>,
    pub compacted_at: Option<i64>,
    /// Why it is never compacted, if it is not: a key, a boolean, or read
    /// by a view.
    pub pinned: Option<String>,
}

type FieldKey = (String, String);

/// Fields read since the last compaction round, with when: by queries
/// ([`Compaction::observe`]) and by the store's own readers (analyses,
/// reports), so that a field only they read is used all the same.
#[derive(Clone, Default)]
pub struct FieldUse(Arc<Mutex<HashMap<FieldKey, i64>>>);

impl FieldUse {
    /// Notes that `fields` of `stream` were read now (names that are not
    /// its declared fields are ignored at the round).
    pub fn note<'a>(&self, stream: &str, fields: impl IntoIterator<Item = &'a str>) {
        let now = fleetgate_protocol::unix_now_ms();
        let mut touched = self.0.lock().expect("field use lock");
        for field in fields {
            touched.insert((stream.to_string(), field.to_string()), now);
        }
    }

    fn take(&self) -> HashMap<FieldKey, i64> {
        std::mem::take(&mut *self.0.lock().expect("field use lock"))
    }

    /// Puts back use that could not be written (newest use wins).
    fn restore(&self, touched: HashMap<FieldKey, i64>) {
        let mut now = self.0.lock().expect("field use lock");
        for (key, at) in touched {
            let entry = now.entry(key).or_insert(at);
            *entry = (*entry).max(at);
        }
    }
}

pub struct Compaction {
    db: Db,
    catalog: Catalog,
    views: Arc<Views>,
    settings: CompactionSettings,
    /// Fields read since the last round.
    touched: FieldUse,
    /// Fields known to have a usage row.
    known: Mutex<HashSet<FieldKey>>,
}

impl Compaction {
    pub async fn open(
        db: Db,
        catalog: Catalog,
        views: Arc<Views>,
        settings: CompactionSettings,
    ) -> Result<Compaction, String> {
        db.execute_ddl(&["CREATE TABLE IF NOT EXISTS fleetgate_field_usage (stream TEXT NOT NULL, field TEXT NOT NULL, last_used_at BIGINT NOT NULL, PRIMARY KEY (stream, field))".to_string()])
            .await
            .map_err(|e| format!("cannot create the field usage table: {e}"))?;
        Ok(Compaction {
            db,
            catalog,
            views,
            settings,
            touched: FieldUse::default(),
            known: Mutex::default(),
        })
    }

    /// Notes the fields a checked query touches.
    pub fn observe(&self, query: &Query) {
        let mut reads = Reads::default();
        let _ = query.visit(&mut reads);
        for name in &reads.relations {
            let Some(stream) = self.catalog.get(name) else {
                continue;
            };
            let fields = stream
                .def
                .fields
                .keys()
                .filter(|field| reads.everything || reads.names.contains(*field));
            self.touched.note(&stream.name, fields.map(String::as_str));
        }
    }

    /// Where the store's own readers note the fields they read.
    pub fn usage(&self) -> FieldUse {
        self.touched.clone()
    }

    /// A round every second.
    pub fn follow(self: Arc<Self>) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Err(e) = self.round(fleetgate_protocol::unix_now_ms()).await {
                    tracing::warn!(error = %e, "column compaction round failed");
                }
            }
        });
    }

    /// Records use, promotes compacted fields queries touched since they
    /// were compacted, compacts fields unused for `unused_after`, and
    /// takes down fences that have stood long enough.
    pub async fn round(&self, now_ms: i64) -> Result<(), String> {
        self.record_use(now_ms).await?;
        let used = self.last_use().await?;
        for ((stream, field), compacted_at) in self.catalog.compacted_since().await? {
            let touched_since = used
                .get(&(stream.clone(), field.clone()))
                .is_some_and(|at| *at > compacted_at);
            if touched_since {
                // One field's failure does not hold up the others.
                match self.catalog.promote(&stream, &field).await {
                    Ok(true) => {
                        tracing::info!(%stream, %field, "compacted field used again: promoted to a column")
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(%stream, %field, error = %e, "cannot promote field"),
                }
            }
        }
        if let Some(unused_after) = self.settings.unused_after {
            let cutoff = now_ms - unused_after.as_millis() as i64;
            for stream in self.catalog.list() {
                for field in stream.def.fields.keys() {
                    let unused = used
                        .get(&(stream.name.clone(), field.clone()))
                        .is_some_and(|at| *at <= cutoff);
                    if !unused
                        || stream.compacted.contains(field)
                        || self.pinned(&stream, field).is_some()
                    {
                        continue;
                    }
                    match self.catalog.compact(&stream.name, field).await {
                        Ok(true) => {
                            tracing::info!(stream = %stream.name, %field, "unused field compacted into extra")
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(stream = %stream.name, %field, error = %e, "cannot compact field")
                        }
                    }
                }
            }
        }
        let fence_from = now_ms - self.settings.fence_for.as_millis() as i64;
        self.catalog.drop_fences(fence_from).await?;
        Ok(())
    }

    /// Every declared field of `stream`, where it is stored and its use.
    pub async fn fields(&self, stream: &Stream) -> Result<Vec<FieldUsage>, String> {
        let used = self.last_use().await?;
        let since = self.catalog.compacted_since().await?;
        Ok(stream
            .def
            .fields
            .keys()
            .map(|field| {
                let key = (stream.name.clone(), field.clone());
                FieldUsage {
                    field: field.clone(),
                    stored: if stream.compacted.contains(field) {
                        "extra"
                    } else {
                        "column"
                    },
                    last_used_at: used.get(&key).copied(),
                    compacted_at: since.get(&key).copied(),
                    pinned: self.pinned(stream, field),
                }
            })
            .collect())
    }

    /// Why `field` must stay a column, if it must.
    fn pinned(&self, stream: &Stream, field: &str) -> Option<String> {
        if stream.def.key.iter().flatten().any(|k| k == field) {
            return Some("key".into());
        }
        if stream.bucket().is_some_and(|(time, _)| time == field) {
            return Some("bucket time".into());
        }
        if !stream.field_kind(field).is_some_and(compacted::foldable) {
            return Some("boolean".into());
        }
        self.views
            .plans()
            .iter()
            .find(|plan| plan.source() == stream.name && plan.source_columns().any(|c| c == field))
            .map(|plan| format!("view {}", plan.name))
    }

    /// Writes the use queries made since the last round, and starts the
    /// clock of every field not seen before.
    async fn record_use(&self, now_ms: i64) -> Result<(), String> {
        let touched = self.touched.take();
        let restore = |touched: HashMap<FieldKey, i64>| self.touched.restore(touched);
        let unseen: Vec<FieldKey> = {
            let known = self.known.lock().expect("known lock");
            self.catalog
                .list()
                .iter()
                .flat_map(|s| s.def.fields.keys().map(|f| (s.name.clone(), f.clone())))
                .filter(|key| !known.contains(key))
                .collect()
        };
        if touched.is_empty() && unseen.is_empty() {
            return Ok(());
        }
        let written = with_pool!(self.db, pool => async {
            let mut tx = pool.begin().await?;
            for (stream, field) in &unseen {
                sqlx::query("INSERT INTO fleetgate_field_usage (stream, field, last_used_at) VALUES ($1, $2, $3) ON CONFLICT (stream, field) DO NOTHING")
                    .bind(stream).bind(field).bind(now_ms)
                    .execute(&mut *tx).await?;
            }
            for ((stream, field), at) in &touched {
                sqlx::query(
                    "INSERT INTO fleetgate_field_usage (stream, field, last_used_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (stream, field) DO UPDATE SET last_used_at = excluded.last_used_at \
                     WHERE excluded.last_used_at > fleetgate_field_usage.last_used_at",
                )
                .bind(stream).bind(field).bind(at)
                .execute(&mut *tx).await?;
            }
            tx.commit().await
        }.await);
        if let Err(e) = written {
            restore(touched);
            return Err(format!("cannot record field use: {e}"));
        }
        self.known.lock().expect("known lock").extend(unseen);
        Ok(())
    }

    async fn last_use(&self) -> Result<HashMap<FieldKey, i64>, String> {
        with_pool!(self.db, pool => {
            sqlx::query("SELECT stream, field, last_used_at FROM fleetgate_field_usage")
                .fetch_all(pool)
                .await
                .map(|rows| rows.iter().map(|r| ((r.get(0), r.get(1)), r.get(2))).collect())
        })
        .map_err(|e| format!("cannot read field use: {e}"))
    }
}

/// What a query reads: the tables it names, the names it uses as column
/// references, and whether it selects every column somewhere.
#[derive(Default)]
struct Reads {
    relations: HashSet<String>,
    names: HashSet<String>,
    everything: bool,
}

fn selects_everything(body: &SetExpr) -> bool {
    match body {
        SetExpr::Select(select) => select.projection.iter().any(|item| {
            matches!(
                item,
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
            )
        }),
        SetExpr::Query(query) => selects_everything(&query.body),
        SetExpr::SetOperation { left, right, .. } => {
            selects_everything(left) || selects_everything(right)
        }
        _ => false,
    }
}

impl Visitor for Reads {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        self.everything |= selects_everything(&query.body);
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &sqlparser::ast::ObjectName) -> ControlFlow<()> {
        if let Some(name) = relation.0.last().and_then(|part| part.as_ident()) {
            self.relations.insert(name.value.to_lowercase());
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        match expr {
            Expr::Identifier(ident) => {
                self.names.insert(ident.value.to_lowercase());
            }
            Expr::CompoundIdentifier(parts) => {
                if let Some(last) = parts.last() {
                    self.names.insert(last.value.to_lowercase());
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Backend;

    fn reads(sql: &str) -> Reads {
        let tables = ["meter".to_string(), "plain".to_string()].into();
        let parsed = crate::query::check(sql, &tables, Backend::Sqlite).unwrap();
        let mut reads = Reads::default();
        let _ = parsed.visit(&mut reads);
        reads
    }

    #[test]
    fn a_query_touches_the_names_it_references() {
        let r = reads("SELECT device_id, avg(m.kwh) FROM meter AS m WHERE volts > 3 GROUP BY 1");
        assert!(r.relations.contains("meter"));
        for name in ["device_id", "kwh", "volts"] {
            assert!(r.names.contains(name), "{name}");
        }
        assert!(!r.names.contains("amps"));
        assert!(!r.everything);
        assert!(!reads("SELECT count(*) FROM meter").everything);
        assert!(reads("SELECT * FROM meter").everything);
        assert!(reads("SELECT 1 UNION ALL SELECT m.* FROM meter m").everything);
        assert!(reads("SELECT (SELECT max(amps) FROM plain) FROM meter")
            .names
            .contains("amps"));
    }
}
