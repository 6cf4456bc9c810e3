//! Loading: the transformed rows into the job's batch table, in one
//! transaction that also marks the run succeeded — a failed or killed run
//! leaves the table as the previous run left it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use fleetgate_store::bulk::{bind_row, chunk_sizes};
use fleetgate_store::catalog::sql_type;
use fleetgate_store::db::Backend;
use fleetgate_store::values::ColumnKind;
use fleetgate_store::values::SqlValue;
use fleetgate_store::{with_pool, Db};
use sqlx::Row as _;

use crate::job::{LoadDef, LoadMode};
use crate::run::{insert_rejects, Progress, RejectRecord, SUCCEEDED};
use crate::schema::Schema;
use crate::transform::Row;

/// The column recording which run loaded a row.
pub const RUN_COLUMN: &str = "etl_run";

/// What one run loads.
pub struct Load<'a> {
    pub def: &'a LoadDef,
    pub schema: &'a Schema,
    pub run: i64,
    /// The time window the run covers (end excluded).
    pub window: Option<(i64, i64)>,
}

impl Load<'_> {
    fn columns(&self) -> Vec<String> {
        let mut columns: Vec<String> = self.schema.names().map(str::to_string).collect();
        columns.push(RUN_COLUMN.into());
        columns
    }

    fn kinds(&self) -> Vec<ColumnKind> {
        let mut kinds: Vec<ColumnKind> = self
            .schema
            .columns()
            .iter()
            .map(|(_, t)| t.kind())
            .collect();
        kinds.push(ColumnKind::Int);
        kinds
    }

    fn create_table(&self) -> Vec<String> {
        let mut columns: Vec<String> = self
            .schema
            .columns()
            .iter()
            .map(|(name, ty)| format!("{name} {}", sql_type(ty.kind())))
            .collect();
        columns.push(format!("{RUN_COLUMN} BIGINT NOT NULL"));
        if let Some(key) = &self.def.key {
            columns.push(format!("PRIMARY KEY ({})", key.join(", ")));
        }
        let mut statements = vec![format!(
            "CREATE TABLE IF NOT EXISTS {} ({})",
            self.def.table,
            columns.join(", ")
        )];
        statements.extend(self.create_index());
        statements
    }

    /// The index on the time column that reports and windows read by.
    fn create_index(&self) -> Option<String> {
        let table = &self.def.table;
        self.def
            .time
            .as_ref()
            .map(|time| format!("CREATE INDEX IF NOT EXISTS {table}_{time} ON {table} ({time})"))
    }

    fn drop_index(&self) -> Option<String> {
        let table = &self.def.table;
        self.def
            .time
            .as_ref()
            .map(|time| format!("DROP INDEX IF EXISTS {table}_{time}"))
    }

    fn insert_head(&self) -> String {
        format!(
            "INSERT INTO {} ({}) ",
            self.def.table,
            self.columns().join(", ")
        )
    }

    fn insert_tail(&self) -> String {
        match (&self.def.key, self.def.mode) {
            (Some(key), LoadMode::Upsert) => {
                let set: Vec<String> = self
                    .columns()
                    .iter()
                    .filter(|c| !key.contains(c))
                    .map(|c| format!("{c} = excluded.{c}"))
                    .collect();
                format!(
                    " ON CONFLICT ({}) DO UPDATE SET {}",
                    key.join(", "),
                    set.join(", ")
                )
            }
            _ => String::new(),
        }
    }

    fn clear(&self) -> Option<String> {
        if self.def.mode != LoadMode::Overwrite {
            return None;
        }
        let table = &self.def.table;
        Some(match (&self.def.time, self.window) {
            (Some(time), Some((from, to))) => {
                format!("DELETE FROM {table} WHERE {time} >= {from} AND {time} < {to}")
            }
            _ => format!("DELETE FROM {table}"),
        })
    }
}

/// Keeps the last row of each key: an export may list an order twice, and
/// one statement may not update a row twice.
pub fn last_per_key(rows: Vec<Row>, key: &[usize]) -> Vec<Row> {
    let mut position: HashMap<Vec<String>, usize> = HashMap::new();
    let mut kept: Vec<Option<Row>> = Vec::with_capacity(rows.len());
    for row in rows {
        let k: Vec<String> = key
            .iter()
            .map(|&i| format!("{:?}", row.values[i]))
            .collect();
        if let Some(&earlier) = position.get(&k) {
            kept[earlier] = None;
        }
        position.insert(k, kept.len());
        kept.push(Some(row));
    }
    kept.into_iter().flatten().collect()
}

/// Columns the table lacks (the job gained fields since the first run).
async fn missing_columns(db: &Db, load: &Load<'_>) -> Result<Vec<String>, sqlx::Error> {
    let sql = match db.backend() {
        Backend::Sqlite => "SELECT name FROM pragma_table_info($1)",
        Backend::Postgres => {
            "SELECT column_name::TEXT FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1"
        }
    };
    let existing: Vec<String> = with_pool!(db, pool => {
        sqlx::query(sql).bind(&load.def.table).fetch_all(pool).await?
            .iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<_, _>>()?
    });
    Ok(load
        .schema
        .columns()
        .iter()
        .filter(|(name, _)| !existing.iter().any(|e| e == name))
        .map(|(name, ty)| {
            format!(
                "ALTER TABLE {} ADD COLUMN {name} {}",
                load.def.table,
                sql_type(ty.kind())
            )
        })
        .collect())
}

/// Loads `rows` and closes the run as succeeded, in one transaction.
pub async fn load(
    db: &Db,
    load: &Load<'_>,
    mut rows: Vec<Row>,
    progress: &Progress,
    finished_at: impl Fn() -> i64,
) -> Result<u64, String> {
    prepare_table(db, load).await?;
    for row in &mut rows {
        row.values.push(SqlValue::Int(load.run));
    }
    let clear = load.clear();
    let existing = row_count(db, load).await?;
    // Loading more rows than the table holds, building the index once
    // afterwards (a sort) beats updating it row by row at random places.
    // Inside the transaction, so a failed load keeps the index too.
    let rebuild_index = (rows.len() as i64 > existing)
        .then(|| load.drop_index().zip(load.create_index()))
        .flatten();
    let result = with_pool!(db, pool => {
        async {
            let mut tx = pool.begin().await?;
            if let Some(clear) = &clear {
                sqlx::query(clear).execute(&mut *tx).await?;
            }
            if let Some((drop, _)) = &rebuild_index {
                sqlx::query(drop).execute(&mut *tx).await?;
            }
            WriteRows::write_rows(&mut *tx, load, &rows, progress).await?;
            if let Some((_, create)) = &rebuild_index {
                sqlx::query(create).execute(&mut *tx).await?;
            }
            let [read, transformed, loaded, rejected] = progress.counts();
            let (from, to) = load.window.unzip();
            sqlx::query(SUCCEEDED)
                .bind(load.run).bind(finished_at()).bind(read).bind(transformed)
                .bind(loaded).bind(rejected).bind(from).bind(to)
                .execute(&mut *tx).await?;
            tx.commit().await
        }.await
    });
    result
        .map(|()| rows.len() as u64)
        .map_err(|e| format!("cannot load into {}: {e}", load.def.table))
}

/// A table holding fewer rows than this has its time index rebuilt after
/// a streamed load (which does not know in advance how many it loads).
const REBUILD_INDEX_BELOW: i64 = 100_000;

/// What a streamed run knows once every row has been sent: its window and
/// its rejects.
pub struct StreamEnd {
    pub window: Option<(i64, i64)>,
    pub rejects: Vec<RejectRecord>,
}

/// Loads rows as they arrive on `rows`, while they are still being read
/// and transformed, then (once `end` gives the window and the rejects)
/// clears what an overwrite replaces, records the rejects and closes the
/// run as succeeded, all in one transaction: a run that fails anywhere,
/// or is killed, leaves the table as it was. For append and overwrite
/// without a key (an upsert needs every row first); `load.window` is
/// what `end` gives.
pub async fn load_streamed(
    db: &Db,
    mut load: Load<'_>,
    mut rows: tokio::sync::mpsc::Receiver<Vec<Row>>,
    progress: &Progress,
    end: impl std::future::Future<Output = Result<StreamEnd, String>>,
    finished_at: impl Fn() -> i64,
) -> Result<u64, String> {
    let (def, run) = (load.def, load.run);
    prepare_table(db, &load).await?;
    let existing = row_count(db, &load).await?;
    // On PostgreSQL dropping the index locks the table against readers
    // for the whole run: only worth it while there is nothing to read.
    let small = match db.backend() {
        Backend::Sqlite => existing < REBUILD_INDEX_BELOW,
        Backend::Postgres => existing == 0,
    };
    let rebuild_index = small
        .then(|| load.drop_index().zip(load.create_index()))
        .flatten();
    let table = &def.table;
    let result: Result<u64, String> = with_pool!(db, pool => async {
        let failed = |e: sqlx::Error| format!("cannot load into {table}: {e}");
        let mut tx = pool.begin().await.map_err(failed)?;
        if let Some((drop, _)) = &rebuild_index {
            sqlx::query(drop).execute(&mut *tx).await.map_err(failed)?;
        }
        let mut loaded = 0;
        while let Some(mut batch) = rows.recv().await {
            for row in &mut batch {
                row.values.push(SqlValue::Int(run));
            }
            WriteRows::write_rows(&mut *tx, &load, &batch, progress).await.map_err(failed)?;
            loaded += batch.len() as u64;
        }
        let StreamEnd { window, rejects } = end.await?;
        load.window = window;
        // The rows of earlier runs the new ones replace.
        if let Some(clear) = load.clear() {
            let earlier = if clear.contains(" WHERE ") { " AND" } else { " WHERE" };
            let clear = format!("{clear}{earlier} {RUN_COLUMN} <> {run}");
            sqlx::query(&clear).execute(&mut *tx).await.map_err(failed)?;
        }
        if let Some((_, create)) = &rebuild_index {
            sqlx::query(create).execute(&mut *tx).await.map_err(failed)?;
        }
        insert_rejects!(tx, run, &rejects).map_err(|e| format!("cannot record rejects: {e}"))?;
        let [read, transformed, _, rejected] = progress.counts();
        let (from, to) = window.unzip();
        sqlx::query(SUCCEEDED)
            .bind(run).bind(finished_at()).bind(read).bind(transformed)
            .bind(loaded as i64).bind(rejected).bind(from).bind(to)
            .execute(&mut *tx).await.map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        Ok(loaded)
    }.await);
    result
}

async fn prepare_table(db: &Db, load: &Load<'_>) -> Result<(), String> {
    db.execute_ddl(&load.create_table())
        .await
        .map_err(|e| format!("cannot create table {}: {e}", load.def.table))?;
    let alter = missing_columns(db, load)
        .await
        .map_err(|e| format!("cannot read the columns of {}: {e}", load.def.table))?;
    db.execute_ddl(&alter)
        .await
        .map_err(|e| format!("cannot add columns to {}: {e}", load.def.table))
}

async fn row_count(db: &Db, load: &Load<'_>) -> Result<i64, String> {
    with_pool!(db, pool => {
        sqlx::query(&format!("SELECT count(*) FROM {}", load.def.table))
            .fetch_one(pool).await.and_then(|r| r.try_get(0))
    })
    .map_err(|e| format!("cannot count the rows of {}: {e}", load.def.table))
}

/// How rows reach the table inside the load's transaction: the fastest
/// way each database offers.
trait WriteRows {
    async fn write_rows(
        &mut self,
        load: &Load<'_>,
        rows: &[Row],
        progress: &Progress,
    ) -> Result<(), sqlx::Error>;
}

/// SQLite: prepared multi-row INSERTs (it has no COPY).
impl WriteRows for sqlx::SqliteConnection {
    async fn write_rows(
        &mut self,
        load: &Load<'_>,
        rows: &[Row],
        progress: &Progress,
    ) -> Result<(), sqlx::Error> {
        let (head, tail, kinds) = (load.insert_head(), load.insert_tail(), load.kinds());
        let mut rest = rows;
        for chunk in chunk_sizes(rows.len(), kinds.len()) {
            let (now, later) = rest.split_at(chunk);
            rest = later;
            let mut insert = sqlx::QueryBuilder::new(&head);
            insert.push_values(now, |mut row, r| bind_row(&mut row, &r.values, &kinds));
            insert.push(&tail);
            insert.build().persistent(true).execute(&mut *self).await?;
            progress.loaded.fetch_add(chunk as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Rows per COPY message.
const COPY_CHUNK: usize = 20_000;

/// PostgreSQL: COPY, straight into the table, or for an upsert into a
/// staging table merged with `INSERT … ON CONFLICT`.
impl WriteRows for sqlx::PgConnection {
    async fn write_rows(
        &mut self,
        load: &Load<'_>,
        rows: &[Row],
        progress: &Progress,
    ) -> Result<(), sqlx::Error> {
        let columns = load.columns().join(", ");
        let upsert = load.def.mode == LoadMode::Upsert;
        let target = if upsert {
            sqlx::query(&format!(
                "CREATE TEMP TABLE fleetgate_etl_stage ON COMMIT DROP AS SELECT {columns} FROM {} WITH NO DATA",
                load.def.table
            ))
            .execute(&mut *self)
            .await?;
            "fleetgate_etl_stage".to_string()
        } else {
            load.def.table.clone()
        };
        let mut copy = self
            .copy_in_raw(&format!("COPY {target} ({columns}) FROM STDIN"))
            .await?;
        let mut text = String::new();
        for chunk in rows.chunks(COPY_CHUNK) {
            text.clear();
            for row in chunk {
                copy_line(&mut text, &row.values);
            }
            copy.send(text.as_bytes()).await?;
            progress
                .loaded
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        copy.finish().await?;
        if upsert {
            sqlx::query(&format!(
                "{}SELECT {columns} FROM fleetgate_etl_stage{}",
                load.insert_head(),
                load.insert_tail()
            ))
            .execute(&mut *self)
            .await?;
        }
        Ok(())
    }
}

/// One row in COPY's text format: tab-separated, `\N` for NULL, and
/// backslash, tab, newline and carriage return escaped in text.
fn copy_line(out: &mut String, values: &[SqlValue]) {
    use std::fmt::Write;
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            out.push('\t');
        }
        match value {
            SqlValue::Null => out.push_str("\\N"),
            SqlValue::Int(v) => {
                let _ = write!(out, "{v}");
            }
            SqlValue::Float(v) => {
                let _ = write!(out, "{v:?}");
            }
            SqlValue::Bool(v) => out.push(if *v { 't' } else { 'f' }),
            SqlValue::Text(text) => {
                for c in text.chars() {
                    match c {
                        '\\' => out.push_str("\\\\"),
                        '\t' => out.push_str("\\t"),
                        '\n' => out.push_str("\\n"),
                        '\r' => out.push_str("\\r"),
                        c => out.push(c),
                    }
                }
            }
        }
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_lines_escape_what_copy_would_misread() {
        let mut out = String::new();
        copy_line(
            &mut out,
            &[
                SqlValue::Text("a\tb\\c\nd\re".into()),
                SqlValue::Null,
                SqlValue::Int(-3),
                SqlValue::Float(2.5),
                SqlValue::Bool(true),
            ],
        );
        assert_eq!(out, "a\\tb\\\\c\\nd\\re\t\\N\t-3\t2.5\tt\n");
    }
}
