//! The stream catalog: which streams exist, their fields, and their tables.
//!
//! A stream's table layout can change under it: a declared field may be
//! *compacted* (folded into `extra`, its column dropped) and later promoted
//! back. The catalog owns those moves ([`Catalog::compact`],
//! [`Catalog::promote`]); queries and internal readers see every declared
//! field under its name either way, through [`Stream::read_from`].

pub mod cold;
pub mod compacted;

/// The column of a superseded table that names the batch run that
/// superseded the row.
pub const SUPERSEDED_BY: &str = "fg_superseded_by";

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use fleetgate_protocol::schema::{
    EnrichDef, FieldDef, StreamDef, StreamsFile, BUCKET_COLUMN, DEVICE_ID, EXTRA, RECEIVED_AT,
    ROW_ID,
};
use sqlx::Row;

use crate::db::{Backend, Db};
use crate::sql_expr::ReceivedSpan;
use crate::values::{ColumnKind, SqlValue};
use crate::with_pool;

/// A stream as the pipeline uses it: its declaration plus derived SQL.
#[derive(Debug)]
pub struct Stream {
    pub name: String,
    pub def: StreamDef,
    /// Insert column order: device_id, received_at, declared fields, extra,
    /// enrich columns.
    pub columns: Vec<String>,
    /// `INSERT INTO <name> (<columns>) ` — the VALUES list is appended per batch.
    pub insert_head: String,
    /// Appended after the VALUES list: makes re-sent keys a no-op.
    pub insert_tail: &'static str,
    /// The SQL type of each insert column, to bind NULLs with the right type.
    pub kinds: Vec<ColumnKind>,
    /// Declared fields kept in `extra` instead of a column of their own.
    pub compacted: BTreeSet<String>,
    backend: Backend,
}

impl Stream {
    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn new(name: &str, def: StreamDef, compacted: BTreeSet<String>, backend: Backend) -> Stream {
        let column_fields = || def.fields.iter().filter(|(f, _)| !compacted.contains(*f));
        let mut columns = vec![DEVICE_ID.to_string(), RECEIVED_AT.to_string()];
        columns.extend(column_fields().map(|(f, _)| f.clone()));
        columns.push(EXTRA.to_string());
        columns.extend(def.enrich.keys().cloned());
        if def.bucket.is_some() {
            columns.push(BUCKET_COLUMN.to_string());
        }
        let insert_head = format!("INSERT INTO {name} ({}) ", columns.join(", "));
        let insert_tail = if def.key.is_some() {
            " ON CONFLICT DO NOTHING"
        } else {
            ""
        };
        let mut kinds = vec![ColumnKind::Text, ColumnKind::Int];
        kinds.extend(column_fields().map(|(_, d)| ColumnKind::of_field(d)));
        kinds.push(ColumnKind::Text);
        kinds.extend(def.enrich.values().map(|e| ColumnKind::from(e.ty)));
        if def.bucket.is_some() {
            kinds.push(ColumnKind::Int);
        }
        Stream {
            name: name.to_string(),
            def,
            columns,
            insert_head,
            insert_tail,
            kinds,
            compacted,
            backend,
        }
    }

    /// The same stream with `field` compacted (`true`) or a column again.
    fn with_field_compacted(&self, field: &str, compact: bool) -> Stream {
        let mut compacted = self.compacted.clone();
        if compact {
            compacted.insert(field.to_string());
        } else {
            compacted.remove(field);
        }
        Stream::new(&self.name, self.def.clone(), compacted, self.backend)
    }

    /// `values`, in the insert order of `from` (an earlier layout of this
    /// stream), rearranged into this layout: a field compacted since goes
    /// into `extra`, one promoted since comes out of it, a field added
    /// since is NULL.
    pub fn adapt(&self, from: &Stream, values: &[SqlValue]) -> Vec<SqlValue> {
        let position = |column: &str| from.columns.iter().position(|c| c == column);
        let mut extra = match position(EXTRA).map(|i| &values[i]) {
            Some(SqlValue::Text(text)) => match serde_json::from_str(text) {
                Ok(serde_json::Value::Object(map)) => map,
                _ => serde_json::Map::new(),
            },
            _ => serde_json::Map::new(),
        };
        for (i, column) in from.columns.iter().enumerate() {
            if self.compacted.contains(column) && values[i] != SqlValue::Null {
                extra.insert(compacted::folded_key(column), values[i].to_json());
            }
        }
        let mut adapted = Vec::with_capacity(self.columns.len());
        for (column, kind) in self.columns.iter().zip(&self.kinds) {
            let value = match position(column) {
                _ if column == EXTRA => continue,
                Some(i) => values[i].clone(),
                None if from.compacted.contains(column) => extra
                    .remove(&compacted::folded_key(column))
                    .map_or(SqlValue::Null, |v| SqlValue::from_json(*kind, &v)),
                None => SqlValue::Null,
            };
            adapted.push(value);
        }
        let extra_at = self.columns.iter().position(|c| c == EXTRA).expect("extra");
        let extra = if extra.is_empty() {
            SqlValue::Null
        } else {
            SqlValue::Text(serde_json::Value::Object(extra).to_string())
        };
        adapted.insert(extra_at, extra);
        adapted
    }
}

impl Stream {
    /// Whether the stream keeps old rows in a cold tier.
    pub fn tiered(&self) -> bool {
        self.def.hot.is_some()
    }

    /// The cold tier's table.
    pub fn cold_table(&self) -> String {
        format!("fgc_{}", self.name)
    }

    /// Every stored column: the server-assigned id of a keyless stream,
    /// then the insert columns.
    pub fn stored_columns(&self) -> Vec<String> {
        let mut columns = Vec::new();
        if self.def.key.is_none() {
            columns.push(ROW_ID.to_string());
        }
        columns.extend(self.columns.iter().cloned());
        columns
    }

    /// Whether the stream's rows are one table whose columns are its
    /// fields, which a query can read as it is. On PostgreSQL the table
    /// also holds [`INSERT_XID`], which queries must not see.
    pub fn is_plain(&self) -> bool {
        !self.tiered() && self.compacted.is_empty() && self.backend == Backend::Sqlite
    }

    /// The kind of a declared field's column.
    pub fn field_kind(&self, field: &str) -> Option<ColumnKind> {
        self.def.fields.get(field).map(ColumnKind::of_field)
    }

    /// The kind of any column queries see: the platform's, a declared
    /// field's, or an enrich column's.
    pub fn column_kind(&self, name: &str) -> Option<ColumnKind> {
        match name {
            DEVICE_ID => Some(ColumnKind::Text),
            RECEIVED_AT => Some(ColumnKind::Int),
            BUCKET_COLUMN if self.def.bucket.is_some() => Some(ColumnKind::Int),
            ROW_ID if self.def.key.is_none() => Some(ColumnKind::Int),
            _ => self
                .field_kind(name)
                .or_else(|| self.def.enrich.get(name).map(|e| ColumnKind::from(e.ty))),
        }
    }

    /// Why `column` cannot be read from this stream, naming what can.
    pub fn unknown_column(&self, column: &str) -> String {
        let columns: Vec<&str> = self
            .columns
            .iter()
            .map(String::as_str)
            .filter(|c| *c != EXTRA)
            .collect();
        format!(
            "{column:?} is not a column of stream {} (columns: {})",
            self.name,
            columns.join(", ")
        )
    }

    /// Every column as queries see it, in declaration order: stored columns
    /// by name, compacted fields read out of `extra` under theirs.
    fn logical_columns(&self) -> String {
        let columns: Vec<String> = self
            .logical_column_list(&self.compacted)
            .into_iter()
            .map(|(name, read)| {
                if name == read {
                    name
                } else {
                    format!("{read} AS {name}")
                }
            })
            .collect();
        columns.join(", ")
    }

    /// The names of the columns queries see, in order (what `*` gives).
    pub fn query_columns(&self) -> Vec<String> {
        self.logical_column_list(&self.compacted)
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    }

    /// Each column queries see, and the SQL that reads it from a stored
    /// row when `compacted` fields are in `extra`.
    fn logical_column_list(&self, compacted: &BTreeSet<String>) -> Vec<(String, String)> {
        let plain = |name: &str| (name.to_string(), name.to_string());
        let mut columns = Vec::new();
        if self.def.key.is_none() {
            columns.push(plain(ROW_ID));
        }
        columns.extend([plain(DEVICE_ID), plain(RECEIVED_AT)]);
        for (field, def) in &self.def.fields {
            columns.push(if compacted.contains(field) {
                let kind = ColumnKind::of_field(def);
                (
                    field.clone(),
                    compacted::extract(self.backend, "", field, kind),
                )
            } else {
                plain(field)
            });
        }
        columns.push(if compacted.is_empty() {
            plain(EXTRA)
        } else {
            let folded: Vec<&str> = compacted.iter().map(String::as_str).collect();
            (
                EXTRA.to_string(),
                compacted::extra_without(self.backend, "", &folded),
            )
        });
        columns.extend(self.def.enrich.keys().map(|c| plain(c)));
        if self.bucket().is_some() {
            columns.push(plain(BUCKET_COLUMN));
        }
        columns
    }

    /// The bucket's time column and width (ms) of a bucketed stream.
    pub fn bucket(&self) -> Option<(&str, i64)> {
        self.def.bucket_width_ms().ok().flatten()
    }

    /// The table holding a bucketed stream's rows that a batch superseded.
    pub fn superseded_table(&self) -> String {
        format!("fgs_{}", self.name)
    }

    /// What reads the superseded rows as declared (compacted fields by
    /// name), and which run superseded each.
    pub fn read_superseded(&self) -> String {
        let table = self.superseded_table();
        if self.compacted.is_empty() {
            return table;
        }
        format!(
            "(SELECT {}, {SUPERSEDED_BY} FROM {table}) AS {table}",
            self.logical_columns()
        )
    }

    /// What reads every real-time row of the stream as declared: for a
    /// bucketed stream, its rows and those batches superseded together.
    pub fn read_with_superseded(&self) -> String {
        if self.bucket().is_none() {
            return self.read_from();
        }
        // Both sides read the fields as declared already.
        let columns = self.query_columns().join(", ");
        format!(
            "(SELECT {columns} FROM {} UNION ALL SELECT {columns} FROM {}) AS {}",
            self.read_from(),
            self.read_superseded(),
            self.name
        )
    }

    /// The primary key's columns: the bucket first, if bucketed.
    pub fn primary_key(&self) -> Vec<String> {
        let mut key = Vec::new();
        if self.def.bucket.is_some() {
            key.push(BUCKET_COLUMN.to_string());
        }
        key.extend(self.def.key.iter().flatten().cloned());
        key
    }

    /// A bucketed stream's trigger that sends a record arriving for a
    /// superseded bucket to the superseded table instead (so it neither
    /// shows as real time for a period a batch answers for, nor is lost).
    /// It copies every column, so it is made again whenever the layout
    /// changes: the statements drop it first.
    pub fn late_trigger_ddl(&self) -> Vec<String> {
        if self.bucket().is_none() {
            return Vec::new();
        }
        let (name, fgs) = (&self.name, self.superseded_table());
        let trigger = format!("{fgs}_late");
        let columns = self.stored_columns();
        let values: Vec<String> = columns.iter().map(|c| format!("NEW.{c}")).collect();
        let (columns, values) = (columns.join(", "), values.join(", "));
        let range = format!(
            "FROM fleetgate_superseded WHERE stream = '{name}' \
             AND NEW.{BUCKET_COLUMN} >= from_bucket AND NEW.{BUCKET_COLUMN} < to_bucket"
        );
        match self.backend {
            Backend::Sqlite => vec![
                format!("DROP TRIGGER IF EXISTS {trigger}"),
                format!(
                    "CREATE TRIGGER {trigger} BEFORE INSERT ON {name} WHEN (SELECT max(run) {range}) IS NOT NULL \
                     BEGIN INSERT OR IGNORE INTO {fgs} ({columns}, {SUPERSEDED_BY}) VALUES ({values}, (SELECT max(run) {range})); \
                     SELECT RAISE(IGNORE); END"
                ),
            ],
            Backend::Postgres => vec![
                format!("DROP TRIGGER IF EXISTS {trigger} ON {name}"),
                format!(
                    "CREATE OR REPLACE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $fgs$ \
                     DECLARE superseding BIGINT; BEGIN \
                     SELECT max(run) INTO superseding {range}; \
                     IF superseding IS NULL THEN RETURN NEW; END IF; \
                     INSERT INTO {fgs} ({columns}, {SUPERSEDED_BY}) VALUES ({values}, superseding) ON CONFLICT DO NOTHING; \
                     RETURN NULL; END $fgs$"
                ),
                format!(
                    "CREATE TRIGGER {trigger} BEFORE INSERT ON {name} FOR EACH ROW EXECUTE FUNCTION {trigger}()"
                ),
            ],
        }
    }

    /// What reads all of the stream's rows as declared, whichever tier
    /// holds them and whichever fields are compacted: the table, or a
    /// subquery under the stream's name. Columns are listed, since the
    /// tiers' column orders may differ.
    pub fn read_from(&self) -> String {
        self.read_from_within(ReceivedSpan::default())
    }

    /// [`Self::read_from`] for a query whose rows were all received within
    /// `span`: the cold side reads only the chunks that overlap it.
    pub fn read_from_within(&self, span: ReceivedSpan) -> String {
        if self.is_plain() {
            return self.name.clone();
        }
        let columns = self.logical_columns();
        let cold = if self.tiered() {
            format!(" UNION ALL {}", self.read_cold(span))
        } else {
            String::new()
        };
        format!(
            "(SELECT {columns} FROM {}{cold}) AS {}",
            self.name, self.name
        )
    }

    /// The stream's tables that hold rows in its layout (and so change with
    /// it): the hot one, and the superseded rows of a bucketed one. (Cold
    /// chunks hold rows as declared.)
    fn tables(&self) -> Vec<String> {
        let mut tables = vec![self.name.clone()];
        if self.bucket().is_some() {
            tables.push(self.superseded_table());
        }
        tables
    }
}

/// The query (binding the table's name) for the columns a table has now,
/// in order. Moves of rows between a stream's tables read it inside their
/// transaction, after taking a lock compaction's `ALTER TABLE` waits for:
/// a column list from the catalog's memory may be a layout behind, and
/// copying by it would drop a column promoted meanwhile.
pub fn physical_columns_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "SELECT name FROM pragma_table_info($1) ORDER BY cid",
        // Without INSERT_XID: a row copied elsewhere gets its new
        // transaction's there.
        Backend::Postgres => {
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1 \
             AND column_name <> 'fg_insert_xid' ORDER BY ordinal_position"
        }
    }
}

/// PostgreSQL: the column of a stream's table that holds the id of the
/// transaction that inserted the row, so realtime views can fold the rows
/// a snapshot did not see yet (see `crate::views::def::CUTS`). The
/// top-level xid, epoch included, as a bigint, whose statistics the
/// planner can interpolate, unlike `xid8`'s. Rows stored before the column existed have
/// NULL: views took them in already. Indexed, since views read only the
/// newest: a btree, which holds each transaction's rows as one entry (its
/// deduplication), and stays exact where a BRIN index would not once
/// expiry frees space for new rows among old ones.
pub const INSERT_XID: &str = "fg_insert_xid";

/// Adds [`INSERT_XID`] to a PostgreSQL stream table, `table`, and indexes
/// it; with `existing`, for a table that already holds rows, which keep
/// NULL (a default that is not constant would rewrite the table).
fn insert_xid_ddl(table: &str, existing: bool) -> Vec<String> {
    let default = "(pg_current_xact_id()::text)::bigint";
    let mut ddl = if existing {
        vec![
            format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {INSERT_XID} BIGINT"),
            format!("ALTER TABLE {table} ALTER COLUMN {INSERT_XID} SET DEFAULT {default}"),
        ]
    } else {
        vec![format!(
            "ALTER TABLE {table} ADD COLUMN {INSERT_XID} BIGINT DEFAULT {default}"
        )]
    };
    ddl.push(format!(
        "CREATE INDEX IF NOT EXISTS {table}_insert_xid ON {table} ({INSERT_XID})"
    ));
    ddl
}

/// Gives the PostgreSQL stream tables an earlier version made their
/// [`INSERT_XID`] column; nothing on SQLite.
async fn add_insert_xids(db: &Db, streams: &HashMap<String, Arc<Stream>>) -> Result<(), String> {
    if db.backend() != Backend::Postgres || streams.is_empty() {
        return Ok(());
    }
    let with_column: Vec<String> = with_pool!(db, pool => {
        sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND column_name = $1",
        )
        .bind(INSERT_XID)
        .fetch_all(pool)
        .await
    })
    .map_err(|e| format!("cannot read the stream tables' columns: {e}"))?;
    for name in streams.keys().filter(|n| !with_column.contains(n)) {
        // Processes starting together: one adds it, the others wait.
        let mut ddl = vec![format!("SELECT pg_advisory_xact_lock(hashtext('{name}'))")];
        ddl.extend(insert_xid_ddl(name, true));
        db.execute_ddl(&ddl)
            .await
            .map_err(|e| format!("cannot add {INSERT_XID} to stream {name}: {e}"))?;
        tracing::info!(stream = %name, "stream table takes the inserting transaction's id now");
    }
    Ok(())
}

pub fn sql_type(kind: ColumnKind) -> &'static str {
    // These spellings mean the same to SQLite (by affinity) and PostgreSQL.
    match kind {
        ColumnKind::Int => "BIGINT",
        ColumnKind::Float => "DOUBLE PRECISION",
        ColumnKind::Bool => "BOOLEAN",
        ColumnKind::Text => "TEXT",
    }
}

fn column_ddl(name: &str, def: &FieldDef) -> String {
    // Declared columns stay nullable: `required` is enforced by validation,
    // so a field added later can be required without rewriting old rows.
    format!("{name} {}", sql_type(ColumnKind::of_field(def)))
}

fn enrich_column_ddl(name: &str, def: &EnrichDef) -> String {
    format!("{name} {}", sql_type(ColumnKind::from(def.ty)))
}

#[derive(Clone)]
pub struct Catalog {
    db: Db,
    streams: Arc<RwLock<HashMap<String, Arc<Stream>>>>,
    /// Held from reading the database to replacing what is in memory (by a
    /// reload, an apply or a layout change), so a reload that read before
    /// a change committed cannot install the older layout after it.
    changes: Arc<tokio::sync::Mutex<()>>,
}

/// What `apply` did, per stream, for the CLI and API to report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AppliedStream {
    pub stream: String,
    pub action: &'static str,
    pub added_fields: Vec<String>,
}

/// A SQLite store in a temporary directory with `streams` (a streams file)
/// applied: the start of the crate's tests that need a database.
#[cfg(test)]
pub async fn scratch_store(streams: &str) -> (tempfile::TempDir, Db, Catalog) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(None, &dir.path().join("store.db")).await.unwrap();
    let catalog = Catalog::load(db.clone()).await.unwrap();
    catalog
        .apply(&StreamsFile::parse(streams).unwrap())
        .await
        .unwrap();
    (dir, db, catalog)
}

impl Catalog {
    pub async fn load(db: Db) -> Result<Catalog, String> {
        db.execute_ddl(&[
            "CREATE TABLE IF NOT EXISTS fleetgate_streams (name TEXT PRIMARY KEY, definition TEXT NOT NULL, updated_at BIGINT NOT NULL)".to_string(),
            // A field with `promoted_at` NULL is compacted; otherwise it is a
            // column again and its fence stands until it is dropped.
            // Periods of bucketed streams a batch run superseded: the
            // buckets from_bucket <= b < to_bucket.
            "CREATE TABLE IF NOT EXISTS fleetgate_superseded (stream TEXT NOT NULL, from_bucket BIGINT NOT NULL, to_bucket BIGINT NOT NULL, run BIGINT NOT NULL, at BIGINT NOT NULL)".to_string(),
            "CREATE INDEX IF NOT EXISTS fleetgate_superseded_period ON fleetgate_superseded (stream, from_bucket)".to_string(),
            "CREATE TABLE IF NOT EXISTS fleetgate_compacted_fields (stream TEXT NOT NULL, field TEXT NOT NULL, compacted_at BIGINT NOT NULL, promoted_at BIGINT, PRIMARY KEY (stream, field))".to_string(),
        ])
        .await
        .map_err(|e| format!("cannot create the stream catalog: {e}"))?;
        let streams = read_streams(&db).await?;
        add_insert_xids(&db, &streams).await?;
        Ok(Catalog {
            db,
            streams: Arc::new(RwLock::new(streams)),
            changes: Arc::default(),
        })
    }

    /// Reads the catalog again, for changes another process applied.
    pub async fn reload(&self) -> Result<(), String> {
        let _changes = self.changes.lock().await;
        let streams = read_streams(&self.db).await?;
        *self.streams.write().expect("catalog lock") = streams;
        Ok(())
    }

    /// In a cluster sharing PostgreSQL, reloads whenever any process applies
    /// streams (they `NOTIFY fleetgate_catalog` in the applying transaction).
    /// Does nothing on SQLite, which only one process uses.
    pub fn follow_changes(&self) {
        let catalog = self.clone();
        self.db.follow(CATALOG_CHANNEL, move |_| {
            let catalog = catalog.clone();
            async move {
                if let Err(e) = catalog.reload().await {
                    tracing::warn!(error = %e, "cannot reload the stream catalog");
                }
            }
        });
    }

    pub fn get(&self, name: &str) -> Option<Arc<Stream>> {
        self.streams
            .read()
            .expect("catalog lock")
            .get(name)
            .cloned()
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<_> = self
            .streams
            .read()
            .expect("catalog lock")
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    pub fn list(&self) -> Vec<Arc<Stream>> {
        let streams = self.streams.read().expect("catalog lock");
        let mut list: Vec<_> = streams.values().cloned().collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Folds `field` of `stream` into `extra` and drops its column, in both
    /// tiers, in one transaction. `Ok(false)` when it is compacted already
    /// (perhaps by another process). Keys, booleans and undeclared names
    /// are refused.
    pub async fn compact(&self, stream: &str, field: &str) -> Result<bool, String> {
        let _changes = self.changes.lock().await;
        let current = self.existing(stream)?;
        let kind = current
            .field_kind(field)
            .ok_or_else(|| format!("stream {stream} declares no field {field:?}"))?;
        let is_key = current.def.key.iter().flatten().any(|k| k == field)
            || current.bucket().is_some_and(|(time, _)| time == field);
        if is_key || !compacted::foldable(kind) {
            return Err(format!(
                "stream {stream}: field {field} cannot be compacted (keys, bucket times and booleans stay columns)"
            ));
        }
        if current.compacted.contains(field) {
            return Ok(false);
        }
        let backend = self.db.backend();
        let mut statements = Vec::new();
        // A fence left by a recent promotion would move the field back out.
        statements.extend(compacted::drop_fence(
            backend,
            stream,
            &self.fence_name(&current, field),
        ));
        let after = current.with_field_compacted(field, true);
        statements.splice(0..0, lock_tables(backend, &current));
        statements.extend(current.late_trigger_ddl().into_iter().take(1));
        for table in current.tables() {
            statements.extend(compacted::fold(backend, &table, field, kind));
        }
        statements.extend(after.late_trigger_ddl());
        let claimed =
            "INSERT INTO fleetgate_compacted_fields (stream, field, compacted_at, promoted_at) \
             VALUES ($1, $2, $3, NULL) ON CONFLICT (stream, field) DO UPDATE \
             SET compacted_at = excluded.compacted_at, promoted_at = NULL \
             WHERE fleetgate_compacted_fields.promoted_at IS NOT NULL";
        let changed = self
            .change_layout(stream, field, claimed, &statements)
            .await?;
        if changed {
            self.replace(current.with_field_compacted(field, true));
        }
        Ok(changed)
    }

    /// Gives a compacted field its column back, moving its values out of
    /// `extra`, in one transaction; a fence keeps rows that writers with the
    /// old layout still insert right until [`Self::drop_fences`] removes it.
    /// `Ok(false)` when it is a column already.
    pub async fn promote(&self, stream: &str, field: &str) -> Result<bool, String> {
        let _changes = self.changes.lock().await;
        let current = self.existing(stream)?;
        if !current.compacted.contains(field) {
            return Ok(false);
        }
        let def = &current.def.fields[field];
        let kind = ColumnKind::of_field(def);
        let backend = self.db.backend();
        let after = current.with_field_compacted(field, false);
        let mut statements = lock_tables(backend, &current);
        statements.extend(current.late_trigger_ddl().into_iter().take(1));
        for table in current.tables() {
            statements.extend(compacted::unfold(
                backend,
                &table,
                field,
                kind,
                sql_type(kind),
            ));
        }
        statements.extend(compacted::fence(
            backend,
            stream,
            &self.fence_name(&current, field),
            field,
            kind,
        ));
        statements.extend(after.late_trigger_ddl());
        let claimed = "UPDATE fleetgate_compacted_fields SET promoted_at = $3 \
             WHERE stream = $1 AND field = $2 AND promoted_at IS NULL";
        let changed = self
            .change_layout(stream, field, claimed, &statements)
            .await?;
        if changed {
            self.replace(after);
        }
        Ok(changed)
    }

    /// Removes the fences of fields promoted before `before_ms`.
    pub async fn drop_fences(&self, before_ms: i64) -> Result<usize, String> {
        let promoted: Vec<(String, String)> = with_pool!(self.db, pool => {
            sqlx::query("SELECT stream, field FROM fleetgate_compacted_fields WHERE promoted_at < $1")
                .bind(before_ms)
                .fetch_all(pool)
                .await
                .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
        .map_err(|e| format!("cannot read promoted fields: {e}"))?;
        for (stream, field) in &promoted {
            let Some(current) = self.get(stream) else {
                continue;
            };
            let statements =
                compacted::drop_fence(self.db.backend(), stream, &self.fence_name(&current, field));
            with_pool!(self.db, pool => async {
                let mut tx = pool.begin().await?;
                for statement in &statements {
                    sqlx::query(statement).execute(&mut *tx).await?;
                }
                sqlx::query("DELETE FROM fleetgate_compacted_fields WHERE stream = $1 AND field = $2 AND promoted_at IS NOT NULL")
                    .bind(stream)
                    .bind(field)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await
            }.await)
            .map_err(|e| format!("cannot drop the fence of {stream}.{field}: {e}"))?;
        }
        Ok(promoted.len())
    }

    /// When each compacted field was compacted, per stream.
    pub async fn compacted_since(&self) -> Result<HashMap<(String, String), i64>, String> {
        with_pool!(self.db, pool => {
            sqlx::query("SELECT stream, field, compacted_at FROM fleetgate_compacted_fields WHERE promoted_at IS NULL")
                .fetch_all(pool)
                .await
                .map(|rows| rows.iter().map(|r| ((r.get(0), r.get(1)), r.get(2))).collect())
        })
        .map_err(|e| format!("cannot read compacted fields: {e}"))
    }

    fn fence_name(&self, stream: &Stream, field: &str) -> String {
        let position = stream.def.fields.get_index_of(field).unwrap_or_default();
        compacted::fence_name(&stream.name, position)
    }

    /// Runs a layout change: `claim` (binding stream, field, now) must
    /// change one row of `fleetgate_compacted_fields`, or another process
    /// made the change first and nothing is done.
    async fn change_layout(
        &self,
        stream: &str,
        field: &str,
        claim: &str,
        statements: &[String],
    ) -> Result<bool, String> {
        let now = fleetgate_protocol::unix_now_ms();
        let postgres = self.db.backend() == Backend::Postgres;
        with_pool!(self.db, pool => async {
            let mut tx = pool.begin().await?;
            let claimed = sqlx::query(claim)
                .bind(stream)
                .bind(field)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if claimed == 0 {
                return Ok(false);
            }
            for statement in statements {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            if postgres {
                sqlx::query(&format!("NOTIFY {CATALOG_CHANNEL}")).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(true)
        }.await)
        .map_err(|e: sqlx::Error| format!("cannot change the layout of {stream}.{field}: {e}"))
    }

    fn existing(&self, name: &str) -> Result<Arc<Stream>, String> {
        self.get(name)
            .ok_or_else(|| format!("no stream named {name:?}"))
    }

    fn replace(&self, stream: Stream) {
        self.streams
            .write()
            .expect("catalog lock")
            .insert(stream.name.clone(), Arc::new(stream));
    }

    /// Creates or evolves every stream in `file` in one transaction: either
    /// all of it takes effect or none. Adding fields is allowed; changing a
    /// field's type or the key is refused, since stored rows would no longer
    /// mean what they meant.
    pub async fn apply(&self, file: &StreamsFile) -> Result<Vec<AppliedStream>, String> {
        let _changes = self.changes.lock().await;
        let mut ddl = Vec::new();
        let mut report = Vec::new();
        for (name, def) in &file.streams {
            def.check(name)?;
            match self.get(name) {
                None => {
                    ddl.extend(self.create_table_ddl(name, def));
                    let stream = Stream::new(name, def.clone(), BTreeSet::new(), self.db.backend());
                    if def.hot.is_some() {
                        ddl.extend(stream.cold_tier_ddl(self.db.auto_id_column("chunk")));
                    }
                    if def.bucket.is_some() {
                        ddl.extend(superseded_ddl(&stream));
                    }
                    report.push(AppliedStream {
                        stream: name.clone(),
                        action: "created",
                        added_fields: vec![],
                    });
                }
                Some(existing) => {
                    let added = evolve(&existing.def, def, name)?;
                    for field in &added {
                        let column = match def.fields.get(field) {
                            Some(field_def) => column_ddl(field, field_def),
                            None => enrich_column_ddl(field, &def.enrich[field]),
                        };
                        ddl.push(format!("ALTER TABLE {name} ADD COLUMN {column}"));
                    }
                    if !existing.tiered() && def.hot.is_some() {
                        let tiered =
                            Stream::new(name, def.clone(), BTreeSet::new(), self.db.backend());
                        ddl.extend(tiered.cold_tier_ddl(self.db.auto_id_column("chunk")));
                    }
                    if !added.is_empty() {
                        // Superseded rows keep every column too.
                        for column in &added {
                            if existing.bucket().is_some() {
                                let ddl_column = match def.fields.get(column) {
                                    Some(field_def) => column_ddl(column, field_def),
                                    None => enrich_column_ddl(column, &def.enrich[column]),
                                };
                                ddl.push(format!(
                                    "ALTER TABLE {} ADD COLUMN {ddl_column}",
                                    existing.superseded_table()
                                ));
                            }
                        }
                        let evolved = Stream::new(
                            name,
                            def.clone(),
                            existing.compacted.clone(),
                            self.db.backend(),
                        );
                        ddl.extend(evolved.late_trigger_ddl());
                    }
                    let action = if added.is_empty() && existing.def == *def {
                        "unchanged"
                    } else {
                        "updated"
                    };
                    report.push(AppliedStream {
                        stream: name.clone(),
                        action,
                        added_fields: added,
                    });
                }
            }
        }
        let now = chrono::Utc::now().timestamp_millis();
        with_pool!(self.db, pool => {
            let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
            for statement in &ddl {
                sqlx::query(statement).execute(&mut *tx).await
                    .map_err(|e| format!("cannot apply streams ({statement}): {e}"))?;
            }
            for (name, def) in &file.streams {
                let definition = serde_json::to_string(def).expect("definition serializes");
                sqlx::query(
                    "INSERT INTO fleetgate_streams (name, definition, updated_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET definition = excluded.definition, updated_at = excluded.updated_at",
                )
                .bind(name).bind(definition).bind(now)
                .execute(&mut *tx).await.map_err(|e| format!("cannot record streams: {e}"))?;
            }
            if self.db.backend() == crate::db::Backend::Postgres {
                sqlx::query(&format!("NOTIFY {CATALOG_CHANNEL}"))
                    .execute(&mut *tx).await.map_err(|e| format!("cannot announce streams: {e}"))?;
            }
            tx.commit().await.map_err(|e| format!("cannot commit streams: {e}"))
        })?;
        let mut streams = self.streams.write().expect("catalog lock");
        for (name, def) in &file.streams {
            let compacted = streams
                .get(name)
                .map(|s| s.compacted.clone())
                .unwrap_or_default();
            let stream = Stream::new(name, def.clone(), compacted, self.db.backend());
            streams.insert(name.clone(), Arc::new(stream));
        }
        Ok(report)
    }

    fn create_table_ddl(&self, name: &str, def: &StreamDef) -> Vec<String> {
        let mut ddl = table_ddl(name, def, self.db.auto_id_column(ROW_ID));
        if self.db.backend() == Backend::Postgres {
            ddl.extend(insert_xid_ddl(name, false));
        }
        ddl
    }
}

/// On PostgreSQL, locks a stream's tables for a layout change: a commit
/// that wrote the column after the move began would lose its value to
/// the drop (SQLite's one writer excludes that already).
fn lock_tables(backend: Backend, stream: &Stream) -> Vec<String> {
    match backend {
        Backend::Sqlite => Vec::new(),
        Backend::Postgres => stream
            .tables()
            .iter()
            .map(|t| format!("LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE"))
            .collect(),
    }
}

/// A bucketed stream's superseded table: its columns, the run that
/// superseded each row, and the same key; and the trigger that sends
/// late records of superseded buckets there.
fn superseded_ddl(stream: &Stream) -> Vec<String> {
    let fgs = stream.superseded_table();
    let mut ddl = table_ddl(&fgs, &stream.def, format!("{ROW_ID} BIGINT PRIMARY KEY"));
    ddl.push(format!(
        "ALTER TABLE {fgs} ADD COLUMN {SUPERSEDED_BY} BIGINT"
    ));
    ddl.extend(stream.late_trigger_ddl());
    ddl
}

/// A stream's table (`id_column`: how a keyless stream's id is made).
fn table_ddl(name: &str, def: &StreamDef, id_column: String) -> Vec<String> {
    let mut columns = Vec::new();
    if def.key.is_none() {
        columns.push(id_column);
    }
    columns.push(format!("{DEVICE_ID} TEXT NOT NULL"));
    columns.push(format!("{RECEIVED_AT} BIGINT NOT NULL"));
    columns.extend(def.fields.iter().map(|(f, d)| column_ddl(f, d)));
    columns.push(format!("{EXTRA} TEXT"));
    columns.extend(def.enrich.iter().map(|(c, d)| enrich_column_ddl(c, d)));
    let bucket = def.bucket.as_ref();
    if bucket.is_some() {
        columns.push(format!("{BUCKET_COLUMN} BIGINT NOT NULL"));
    }
    if let Some(key) = &def.key {
        let bucketed = bucket.map(|_| BUCKET_COLUMN.to_string());
        let key: Vec<String> = bucketed.into_iter().chain(key.iter().cloned()).collect();
        columns.push(format!("PRIMARY KEY ({})", key.join(", ")));
    }
    let mut ddl = vec![
        format!("CREATE TABLE {name} ({})", columns.join(", ")),
        format!("CREATE INDEX {name}_received_at ON {name} ({RECEIVED_AT})"),
    ];
    // A bucket reads in time order.
    if let Some(bucket) = bucket {
        ddl.push(format!(
            "CREATE INDEX {name}_bucket ON {name} ({BUCKET_COLUMN}, {})",
            bucket.time
        ));
    }
    ddl
}

/// Fields `new` adds to `old`, or why `new` cannot replace `old`.
fn evolve(old: &StreamDef, new: &StreamDef, name: &str) -> Result<Vec<String>, String> {
    if old.hot.is_some() && new.hot.is_none() {
        return Err(format!(
            "stream {name}: hot cannot be removed (rows live in its cold tier); set a longer hot instead"
        ));
    }
    if old.bucket != new.bucket {
        return Err(format!(
            "stream {name}: the bucket cannot change ({:?} -> {:?}): it leads the key; declare a new stream instead",
            old.bucket, new.bucket
        ));
    }
    if old.key != new.key {
        let shown = |key: &Option<Vec<String>>| match key {
            Some(fields) => format!("[{}]", fields.join(", ")),
            None => "none".to_string(),
        };
        return Err(format!(
            "stream {name}: the key cannot change ({} -> {}); declare a new stream instead",
            shown(&old.key),
            shown(&new.key)
        ));
    }
    let mut added = Vec::new();
    for (field, def) in &new.fields {
        match old.fields.get(field) {
            Some(previous) if previous.ty != def.ty => {
                return Err(format!(
                    "stream {name}: field {field} cannot change type ({:?} -> {:?})",
                    previous.ty, def.ty
                ))
            }
            Some(previous)
                if (previous.code, previous.scale, previous.offset)
                    != (def.code, def.scale, def.offset) =>
            {
                return Err(format!(
                    "stream {name}: field {field} cannot change how it is stored (code, scale, offset): its column holds data"
                ))
            }
            Some(_) => {}
            None => added.push(field.clone()),
        }
    }
    for (column, def) in &new.enrich {
        match old.enrich.get(column) {
            Some(previous) if previous.ty != def.ty => {
                return Err(format!(
                    "stream {name}: enrich column {column} cannot change type ({:?} -> {:?})",
                    previous.ty, def.ty
                ))
            }
            Some(_) => {}
            None => added.push(column.clone()),
        }
    }
    if let Some(dropped) = old.enrich.keys().find(|c| !new.enrich.contains_key(*c)) {
        return Err(format!(
            "stream {name}: enrich column {dropped} cannot be removed (its column holds data)"
        ));
    }
    if let Some(dropped) = old.fields.keys().find(|f| !new.fields.contains_key(*f)) {
        return Err(format!(
            "stream {name}: field {dropped} cannot be removed (its column holds data); keep it, optional"
        ));
    }
    Ok(added)
}

/// The channel `apply` notifies in PostgreSQL.
const CATALOG_CHANNEL: &str = "fleetgate_catalog";

async fn read_streams(db: &Db) -> Result<HashMap<String, Arc<Stream>>, String> {
    type Pairs = Vec<(String, String)>;
    let (rows, folded): (Pairs, Pairs) = with_pool!(db, pool => async {
        let rows = sqlx::query("SELECT name, definition FROM fleetgate_streams")
            .fetch_all(pool)
            .await?;
        let folded = sqlx::query(
            "SELECT stream, field FROM fleetgate_compacted_fields WHERE promoted_at IS NULL",
        )
        .fetch_all(pool)
        .await?;
        Ok::<_, sqlx::Error>((
            rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
            folded.iter().map(|r| (r.get(0), r.get(1))).collect(),
        ))
    }.await)
    .map_err(|e| format!("cannot read the stream catalog: {e}"))?;
    let mut streams = HashMap::new();
    for (name, definition) in rows {
        let def: StreamDef = serde_json::from_str(&definition)
            .map_err(|e| format!("stream catalog entry {name} is corrupt: {e}"))?;
        let compacted = folded
            .iter()
            .filter(|(stream, _)| *stream == name)
            .map(|(_, field)| field.clone())
            .collect();
        let stream = Stream::new(&name, def, compacted, db.backend());
        streams.insert(name.clone(), Arc::new(stream));
    }
    Ok(streams)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(compacted: &[&str]) -> Stream {
        let file = StreamsFile::parse(
            "[streams.meter]\nfields.kwh = { type = \"float\" }\nfields.site = { type = \"string\" }\n\
             fields.phase = { type = \"int\" }\n",
        )
        .unwrap();
        let compacted = compacted.iter().map(|f| f.to_string()).collect();
        Stream::new(
            "meter",
            file.streams["meter"].clone(),
            compacted,
            Backend::Sqlite,
        )
    }

    #[test]
    fn a_changed_key_is_refused_with_both_keys_as_declared() {
        let sales = |key: &str| {
            StreamsFile::parse(&format!(
                "[streams.sales]\n{key}fields.order_id = {{ type = \"string\", required = true }}\n\
                 fields.order_no = {{ type = \"int\", required = true }}\n"
            ))
            .unwrap()
            .streams["sales"]
                .clone()
        };
        let old = sales("key = [\"order_id\"]\n");
        let new = sales("key = [\"device_id\", \"order_no\"]\n");
        let refused = evolve(&old, &new, "sales").unwrap_err();
        assert!(
            refused.contains("the key cannot change ([order_id] -> [device_id, order_no])"),
            "{refused}"
        );
        let refused = evolve(&sales(""), &new, "sales").unwrap_err();
        assert!(
            refused.contains("(none -> [device_id, order_no])"),
            "{refused}"
        );
    }

    #[test]
    fn rows_queued_under_one_layout_are_written_in_the_next() {
        let wide = meter(&[]);
        let narrow = meter(&["site", "phase"]);
        assert_eq!(narrow.columns, ["device_id", "received_at", "kwh", "extra"]);
        let queued = vec![
            SqlValue::Text("m1".into()),
            SqlValue::Int(7),
            SqlValue::Float(0.1 + 0.2),
            SqlValue::Text("north".into()),
            SqlValue::Null,
            SqlValue::Text(r#"{"fw":"1.2"}"#.into()),
        ];
        // Compacted since it was queued: the values go into `extra` (NULLs
        // are left out, as ingest leaves them out)...
        let folded = narrow.adapt(&wide, &queued);
        assert_eq!(
            folded,
            [
                SqlValue::Text("m1".into()),
                SqlValue::Int(7),
                SqlValue::Float(0.1 + 0.2),
                SqlValue::Text(r#"{"fw":"1.2","fg.site":"north"}"#.into()),
            ]
        );
        // ...and promoted since, they come back out, typed.
        assert_eq!(wide.adapt(&narrow, &folded), queued);
        let with_phase = SqlValue::Text(r#"{"fg.phase":3}"#.into());
        let back = wide.adapt(
            &narrow,
            &[
                folded[0].clone(),
                folded[1].clone(),
                SqlValue::Null,
                with_phase,
            ],
        );
        assert_eq!(back[4], SqlValue::Int(3));
        assert_eq!(back[5], SqlValue::Null);
    }
}
