//! The stream catalog: which streams exist, their fields, and their tables.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use fleetgate_protocol::schema::{
    EnrichDef, FieldDef, FieldType, StreamDef, StreamsFile, DEVICE_ID, EXTRA, RECEIVED_AT, ROW_ID,
};
use sqlx::Row;

use crate::db::Db;
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    Int,
    Float,
    Bool,
    Text,
}

impl From<FieldType> for ColumnKind {
    fn from(ty: FieldType) -> Self {
        match ty {
            FieldType::Int | FieldType::Timestamp => ColumnKind::Int,
            FieldType::Float => ColumnKind::Float,
            FieldType::Bool => ColumnKind::Bool,
            FieldType::String | FieldType::Enum => ColumnKind::Text,
        }
    }
}

impl ColumnKind {
    pub(crate) fn of_field(def: &FieldDef) -> ColumnKind {
        if def.code {
            ColumnKind::Int
        } else {
            ColumnKind::from(def.ty)
        }
    }
}

impl Stream {
    fn new(name: &str, def: StreamDef) -> Stream {
        let mut columns = vec![DEVICE_ID.to_string(), RECEIVED_AT.to_string()];
        columns.extend(def.fields.keys().cloned());
        columns.push(EXTRA.to_string());
        columns.extend(def.enrich.keys().cloned());
        let insert_head = format!("INSERT INTO {name} ({}) ", columns.join(", "));
        let insert_tail = if def.key.is_some() {
            " ON CONFLICT DO NOTHING"
        } else {
            ""
        };
        let mut kinds = vec![ColumnKind::Text, ColumnKind::Int];
        kinds.extend(def.fields.values().map(ColumnKind::of_field));
        kinds.push(ColumnKind::Text);
        kinds.extend(def.enrich.values().map(|e| ColumnKind::from(e.ty)));
        Stream {
            name: name.to_string(),
            def,
            columns,
            insert_head,
            insert_tail,
            kinds,
        }
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

    /// What reads all of the stream's rows, whichever tier holds them: the
    /// table, or both tiers under the stream's name. Columns are listed,
    /// since the tiers' column orders may differ.
    pub fn read_from(&self) -> String {
        if !self.tiered() {
            return self.name.clone();
        }
        let columns = self.stored_columns().join(", ");
        format!(
            "(SELECT {columns} FROM {} UNION ALL SELECT {columns} FROM {}) AS {}",
            self.name,
            self.cold_table(),
            self.name
        )
    }
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
}

/// What `apply` did, per stream, for the CLI and API to report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AppliedStream {
    pub stream: String,
    pub action: &'static str,
    pub added_fields: Vec<String>,
}

impl Catalog {
    pub async fn load(db: Db) -> Result<Catalog, String> {
        db.execute_ddl(&[
            "CREATE TABLE IF NOT EXISTS fleetgate_streams (name TEXT PRIMARY KEY, definition TEXT NOT NULL, updated_at BIGINT NOT NULL)".to_string(),
        ])
        .await
        .map_err(|e| format!("cannot create the stream catalog: {e}"))?;
        let streams = read_streams(&db).await?;
        Ok(Catalog {
            db,
            streams: Arc::new(RwLock::new(streams)),
        })
    }

    /// Reads the catalog again, for changes another process applied.
    pub async fn reload(&self) -> Result<(), String> {
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

    /// Creates or evolves every stream in `file` in one transaction: either
    /// all of it takes effect or none. Adding fields is allowed; changing a
    /// field's type or the key is refused, since stored rows would no longer
    /// mean what they meant.
    pub async fn apply(&self, file: &StreamsFile) -> Result<Vec<AppliedStream>, String> {
        let mut ddl = Vec::new();
        let mut report = Vec::new();
        for (name, def) in &file.streams {
            def.check(name)?;
            match self.get(name) {
                None => {
                    ddl.extend(self.create_table_ddl(name, def));
                    if def.hot.is_some() {
                        ddl.extend(self.cold_tier_ddl(name, def));
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
                        if existing.tiered() {
                            ddl.push(format!(
                                "ALTER TABLE {} ADD COLUMN {column}",
                                existing.cold_table()
                            ));
                        }
                    }
                    if !existing.tiered() && def.hot.is_some() {
                        ddl.extend(self.cold_tier_ddl(name, def));
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
            streams.insert(name.clone(), Arc::new(Stream::new(name, def.clone())));
        }
        Ok(report)
    }

    fn create_table_ddl(&self, name: &str, def: &StreamDef) -> Vec<String> {
        table_ddl(name, def, self.db.auto_id_column(ROW_ID))
    }

    /// The cold tier: the same columns (ids are copied, not assigned), and
    /// for a keyed stream a trigger that keeps a re-sent record whose key
    /// already went cold out of the hot table, so it stays stored once.
    fn cold_tier_ddl(&self, name: &str, def: &StreamDef) -> Vec<String> {
        let cold = format!("fgc_{name}");
        let mut ddl = table_ddl(&cold, def, format!("{ROW_ID} BIGINT PRIMARY KEY"));
        let Some(key) = &def.key else { return ddl };
        let matches = key
            .iter()
            .map(|c| format!("{cold}.{c} = NEW.{c}"))
            .collect::<Vec<_>>()
            .join(" AND ");
        let trigger = format!("{cold}_once");
        match self.db.backend() {
            crate::db::Backend::Sqlite => ddl.push(format!(
                "CREATE TRIGGER {trigger} BEFORE INSERT ON {name} \
                 WHEN EXISTS (SELECT 1 FROM {cold} WHERE {matches}) BEGIN SELECT RAISE(IGNORE); END"
            )),
            crate::db::Backend::Postgres => {
                ddl.push(format!(
                    "CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $fgc$ \
                     BEGIN IF EXISTS (SELECT 1 FROM {cold} WHERE {matches}) THEN RETURN NULL; END IF; \
                     RETURN NEW; END $fgc$"
                ));
                ddl.push(format!(
                    "CREATE TRIGGER {trigger} BEFORE INSERT ON {name} FOR EACH ROW EXECUTE FUNCTION {trigger}()"
                ));
            }
        }
        ddl
    }
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
    if let Some(key) = &def.key {
        columns.push(format!("PRIMARY KEY ({})", key.join(", ")));
    }
    vec![
        format!("CREATE TABLE {name} ({})", columns.join(", ")),
        format!("CREATE INDEX {name}_received_at ON {name} ({RECEIVED_AT})"),
    ]
}

/// Fields `new` adds to `old`, or why `new` cannot replace `old`.
fn evolve(old: &StreamDef, new: &StreamDef, name: &str) -> Result<Vec<String>, String> {
    if old.hot.is_some() && new.hot.is_none() {
        return Err(format!(
            "stream {name}: hot cannot be removed (rows live in its cold tier); set a longer hot instead"
        ));
    }
    if old.key != new.key {
        return Err(format!(
            "stream {name}: the key cannot change ({:?} -> {:?}); declare a new stream instead",
            old.key, new.key
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
    let rows: Vec<(String, String)> = with_pool!(db, pool => {
        sqlx::query("SELECT name, definition FROM fleetgate_streams")
            .fetch_all(pool)
            .await
            .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    })
    .map_err(|e| format!("cannot read the stream catalog: {e}"))?;
    let mut streams = HashMap::new();
    for (name, definition) in rows {
        let def: StreamDef = serde_json::from_str(&definition)
            .map_err(|e| format!("stream catalog entry {name} is corrupt: {e}"))?;
        streams.insert(name.clone(), Arc::new(Stream::new(&name, def)));
    }
    Ok(streams)
}
