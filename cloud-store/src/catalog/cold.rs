//! The cold tier's SQL. Rows older than a stream's `hot` live in
//! `fgc_<stream>` as compressed chunks of up to [`CHUNK_ROWS`] rows: each
//! chunk is a JSON array of rows as declared (every field under its own
//! name, whether or not it was compacted at the time), so chunks never
//! change with the hot table's layout. SQLite compresses a chunk with
//! `fg_compress` (LZ4, [`crate::sqlite_functions`]); PostgreSQL keeps it
//! as JSONB, which TOAST compresses (lz4 where the server has it). Each chunk records the span of
//! `received_at` (and of `fg_bucket`) it holds, so expiry and swaps unpack
//! only the chunks they touch.
//!
//! A keyed stream also keeps its cold rows' keys, uncompressed (only the
//! key columns, as the primary key), in `fgc_<stream>_keys`: the hot
//! table's trigger drops a re-sent record whose key went cold, so a record
//! is stored once whatever its tier. Keys leave with their rows.
//!
//! Chunk rows are read as `r.value` in every statement here.

use std::collections::BTreeSet;

use fleetgate_protocol::schema::{BUCKET_COLUMN, EXTRA, RECEIVED_AT};

use super::{compacted, sql_type, Stream};
use crate::db::Backend;
use crate::sql_expr::ReceivedSpan;
use crate::values::ColumnKind;

/// Rows per chunk: what one move packs at most, and so what a delete or a
/// swap unpacks to reach one row.
pub const CHUNK_ROWS: i64 = 10_000;

/// The chunk columns every statement names, in this order.
const CHUNK_COLUMNS: &str = "row_count, first_at, last_at, first_bucket, last_bucket, rows";

/// Name-value pairs per JSON object call: SQLite takes at most 127
/// arguments, PostgreSQL 100.
const MAX_PAIRS: usize = 40;

/// How a move hands rows to the cold tier: `pack` (which returns the
/// number of rows packed, or no row when none), then `after`, in one
/// transaction whose `$1` is the condition's bound.
pub struct ColdMove {
    pub pack: String,
    pub after: Vec<String>,
}

impl Stream {
    /// The keys of a keyed stream's cold rows.
    pub fn cold_keys_table(&self) -> String {
        format!("fgc_{}_keys", self.name)
    }

    /// The cold tier's tables, and the hot table's trigger that drops a
    /// record whose key is cold already. `chunk_id`: how the chunk table's
    /// id column is declared.
    pub(crate) fn cold_tier_ddl(&self, chunk_id: String) -> Vec<String> {
        let (name, cold) = (&self.name, self.cold_table());
        let rows = match self.backend {
            Backend::Sqlite => "BLOB NOT NULL",
            Backend::Postgres => "JSONB NOT NULL",
        };
        let mut ddl = vec![
            format!(
                "CREATE TABLE {cold} ({chunk_id}, row_count BIGINT NOT NULL, \
                 first_at BIGINT NOT NULL, last_at BIGINT NOT NULL, \
                 first_bucket BIGINT, last_bucket BIGINT, rows {rows})"
            ),
            format!("CREATE INDEX {cold}_first_at ON {cold} (first_at)"),
        ];
        if self.backend == Backend::Postgres {
            // lz4 where the server has it (14 and later, built with lz4),
            // else TOAST's default (pglz).
            ddl.push(format!(
                "DO $lz4$ BEGIN EXECUTE 'ALTER TABLE {cold} ALTER COLUMN rows SET COMPRESSION lz4'; \
                 EXCEPTION WHEN OTHERS THEN NULL; END $lz4$"
            ));
        }
        if self.def.key.is_none() {
            return ddl;
        }
        let keys = self.cold_keys_table();
        let key = self.primary_key();
        let columns: Vec<String> = key
            .iter()
            .map(|c| {
                let kind = self.column_kind(c).unwrap_or(ColumnKind::Text);
                format!("{c} {} NOT NULL", sql_type(kind))
            })
            .collect();
        // On SQLite the key is the table (no rowid table beside its index).
        let without_rowid = match self.backend {
            Backend::Sqlite => " WITHOUT ROWID",
            Backend::Postgres => "",
        };
        ddl.push(format!(
            "CREATE TABLE {keys} ({}, PRIMARY KEY ({})){without_rowid}",
            columns.join(", "),
            key.join(", ")
        ));
        let matches = key
            .iter()
            .map(|c| format!("{keys}.{c} = NEW.{c}"))
            .collect::<Vec<_>>()
            .join(" AND ");
        let trigger = format!("{cold}_once");
        match self.backend {
            Backend::Sqlite => ddl.push(format!(
                "CREATE TRIGGER {trigger} BEFORE INSERT ON {name} \
                 WHEN EXISTS (SELECT 1 FROM {keys} WHERE {matches}) BEGIN SELECT RAISE(IGNORE); END"
            )),
            Backend::Postgres => {
                ddl.push(format!(
                    "CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $fgc$ \
                     BEGIN IF EXISTS (SELECT 1 FROM {keys} WHERE {matches}) THEN RETURN NULL; END IF; \
                     RETURN NEW; END $fgc$"
                ));
                ddl.push(format!(
                    "CREATE TRIGGER {trigger} BEFORE INSERT ON {name} FOR EACH ROW EXECUTE FUNCTION {trigger}()"
                ));
            }
        }
        ddl
    }

    /// Earlier versions kept the cold tier as a plain table in the hot
    /// table's layout. These statements set that table aside (as
    /// [`Self::plain_cold_table`]) and make the chunked tier in its place;
    /// [`Self::pack_plain_cold_sql`] then moves its rows.
    pub fn replace_plain_cold_ddl(&self, chunk_id: String) -> Vec<String> {
        let (name, cold, plain) = (&self.name, self.cold_table(), self.plain_cold_table());
        let trigger = format!("{cold}_once");
        let mut ddl = vec![format!("ALTER TABLE {cold} RENAME TO {plain}")];
        match self.backend {
            Backend::Sqlite => ddl.push(format!("DROP TRIGGER IF EXISTS {trigger}")),
            Backend::Postgres => ddl.extend([
                // The new table's key would take the old one's name.
                format!("ALTER INDEX IF EXISTS {cold}_pkey RENAME TO {plain}_pkey"),
                format!("DROP TRIGGER IF EXISTS {trigger} ON {name}"),
                format!("DROP FUNCTION IF EXISTS {trigger}()"),
            ]),
        }
        ddl.extend(self.cold_tier_ddl(chunk_id));
        ddl
    }

    /// Where [`Self::replace_plain_cold_ddl`] sets an old cold table aside.
    pub fn plain_cold_table(&self) -> String {
        format!("{}_plain", self.cold_table())
    }

    /// Packs the set-aside plain cold table's rows matching `condition`.
    pub fn pack_plain_cold_sql(
        &self,
        physical: &[String],
        condition: &str,
    ) -> Result<ColdMove, String> {
        self.pack_sql(&self.plain_cold_table(), physical, condition)
    }

    /// The declared fields a table with these `physical` columns keeps in
    /// `extra`.
    fn compacted_in(&self, physical: &[String]) -> BTreeSet<String> {
        self.def
            .fields
            .keys()
            .filter(|f| !physical.contains(f))
            .cloned()
            .collect()
    }

    /// Moves the hot rows matching `condition` into one new chunk, their
    /// keys into the keys table, and deletes them from the hot table.
    /// `physical`: the hot table's columns, read in the transaction, so a
    /// layout another process changed is read as it is; a column this
    /// declaration does not know (added by a process this one has not
    /// heard from yet) is refused rather than left out of the chunk.
    pub fn move_to_cold_sql(
        &self,
        physical: &[String],
        condition: &str,
    ) -> Result<ColdMove, String> {
        self.pack_sql(&self.name, physical, condition)
    }

    /// Packs the rows of `source` (the hot table, or a cold tier an earlier
    /// version kept as a plain table) that match `condition`, as
    /// [`Self::move_to_cold_sql`] does. A row whose key is cold already
    /// (a re-send that raced a move) is deleted, not packed twice.
    fn pack_sql(
        &self,
        name: &str,
        physical: &[String],
        condition: &str,
    ) -> Result<ColdMove, String> {
        let columns = self.logical_column_list(&self.compacted_in(physical));
        if let Some(unknown) = physical
            .iter()
            .find(|c| !columns.iter().any(|(column, _)| column == *c))
        {
            return Err(format!(
                "{name} has a column {unknown} that stream {} does not declare here yet",
                self.name
            ));
        }
        let cold = self.cold_table();
        let logical: Vec<String> = columns
            .iter()
            .map(|(column, read)| format!("{read} AS {column}"))
            .collect();
        let logical = logical.join(", ");
        let (first_bucket, last_bucket) = match self.bucket() {
            Some(_) => (
                format!("min({BUCKET_COLUMN})"),
                format!("max({BUCKET_COLUMN})"),
            ),
            None => ("CAST(NULL AS BIGINT)".into(), "CAST(NULL AS BIGINT)".into()),
        };
        let spans = format!(
            "count(*), min({RECEIVED_AT}), max({RECEIVED_AT}), {first_bucket}, {last_bucket}"
        );
        let key_columns = self.primary_key();
        let key = key_columns.join(", ");
        let keys = self.cold_keys_table();
        let keyed = self.def.key.is_some();
        Ok(match self.backend {
            Backend::Sqlite => {
                let object = sqlite_object(columns.iter().map(|(column, _)| {
                    let kind = self.column_kind(column).unwrap_or(ColumnKind::Text);
                    (column.as_str(), kind)
                }));
                let (not_cold, mut after) = if keyed {
                    let matches: Vec<String> = key_columns
                        .iter()
                        .map(|c| format!("{keys}.{c} = {name}.{c}"))
                        .collect();
                    (
                        format!(
                            " AND NOT EXISTS (SELECT 1 FROM {keys} WHERE {})",
                            matches.join(" AND ")
                        ),
                        vec![format!(
                            "INSERT INTO {keys} ({key}) SELECT {key} \
                             FROM {name} WHERE {condition} ON CONFLICT DO NOTHING"
                        )],
                    )
                } else {
                    (String::new(), Vec::new())
                };
                after.push(format!("DELETE FROM {name} WHERE {condition}"));
                ColdMove {
                    pack: format!(
                        "INSERT INTO {cold} ({CHUNK_COLUMNS}) \
                         SELECT {spans}, fg_compress(json_group_array({object})) \
                         FROM (SELECT {logical} FROM {name} WHERE {condition}{not_cold}) AS moved \
                         HAVING count(*) > 0 RETURNING row_count"
                    ),
                    after,
                }
            }
            // One statement: the rows packed are exactly those this
            // transaction deleted, even if another process moves at once,
            // and only those whose key it made cold.
            Backend::Postgres => {
                let (keys_cte, newly_cold) = if keyed {
                    (
                        format!(
                            ", cold_keys AS (INSERT INTO {keys} ({key}) \
                             SELECT {key} FROM moved ON CONFLICT DO NOTHING RETURNING {key})"
                        ),
                        format!(" JOIN cold_keys USING ({key})"),
                    )
                } else {
                    (String::new(), String::new())
                };
                ColdMove {
                    pack: format!(
                        "WITH moved AS (DELETE FROM {name} WHERE {condition} RETURNING {logical}){keys_cte} \
                         INSERT INTO {cold} ({CHUNK_COLUMNS}) \
                         SELECT {spans}, jsonb_agg(to_jsonb(moved)) FROM moved{newly_cold} \
                         HAVING count(*) > 0 RETURNING row_count"
                    ),
                    after: Vec::new(),
                }
            }
        })
    }

    /// A column of the chunk row `r.value`, with its type.
    pub fn cold_value(&self, column: &str) -> String {
        let kind = self.column_kind(column).unwrap_or(ColumnKind::Text);
        let raw = format!("(r.value ->> '{column}')");
        match (self.backend, kind) {
            // `->>` gives SQLite's integer, real or text as stored.
            (Backend::Sqlite, _) | (Backend::Postgres, ColumnKind::Text) => raw,
            (Backend::Postgres, kind) => format!("CAST({raw} AS {})", sql_type(kind)),
        }
    }

    /// A FROM list of every cold row, each as `r.value`.
    pub fn cold_rows(&self) -> String {
        format!(
            "{} AS fgc, {}",
            self.cold_table(),
            unpack(self.backend, "fgc.rows")
        )
    }

    /// The cold rows as declared, columns in the order of
    /// [`Stream::read_from`]'s hot side; of the chunks overlapping `span`.
    pub(super) fn read_cold(&self, span: ReceivedSpan) -> String {
        let columns: Vec<String> = self
            .logical_column_list(&BTreeSet::new())
            .into_iter()
            .map(|(column, _)| format!("{} AS {column}", self.cold_value(&column)))
            .collect();
        let mut overlaps = Vec::new();
        if let Some(from) = span.from {
            overlaps.push(format!("fgc.last_at >= {from}"));
        }
        if let Some(to) = span.to {
            overlaps.push(format!("fgc.first_at <= {to}"));
        }
        let within = if overlaps.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", overlaps.join(" AND "))
        };
        format!(
            "SELECT {} FROM {}{within}",
            columns.join(", "),
            self.cold_rows()
        )
    }

    /// The cold rows in the stored layout of a table with these `physical`
    /// columns (a superseded table): the fields it compacts go into
    /// `extra` as folding puts them there.
    pub fn cold_as_stored(&self, physical: &[String]) -> String {
        let extra = self.folded_extra(&self.compacted_in(physical));
        let columns: Vec<String> = physical
            .iter()
            .map(|column| {
                if column == EXTRA {
                    extra.clone()
                } else {
                    self.cold_value(column)
                }
            })
            .collect();
        columns.join(", ")
    }

    /// The chunk row's `extra` with the `compacted` fields folded in as
    /// folding puts them: no NULLs (a patch leaves them out, as does
    /// jsonb_strip_nulls), in objects of at most MAX_PAIRS pairs, since
    /// calls take a bounded number of arguments.
    fn folded_extra(&self, compacted: &BTreeSet<String>) -> String {
        let extra = format!("(r.value ->> '{EXTRA}')");
        if compacted.is_empty() {
            return extra;
        }
        let pairs: Vec<String> = compacted
            .iter()
            .map(|f| {
                let key = compacted::folded_key(f);
                match self.backend {
                    Backend::Sqlite => format!("'{key}', json(r.value -> '{f}')"),
                    Backend::Postgres => format!("'{key}', r.value -> '{f}'"),
                }
            })
            .collect();
        let objects = pairs.chunks(MAX_PAIRS).map(|pairs| pairs.join(", "));
        match self.backend {
            Backend::Sqlite => {
                let patched = objects
                    .fold(format!("COALESCE({extra}, '{{}}')"), |merged, pairs| {
                        format!("json_patch({merged}, json_object({pairs}))")
                    });
                format!("NULLIF({patched}, '{{}}')")
            }
            Backend::Postgres => {
                let objects: Vec<String> = objects
                    .map(|pairs| format!("jsonb_build_object({pairs})"))
                    .collect();
                format!(
                    "NULLIF(CAST(COALESCE(CAST({extra} AS JSONB), '{{}}'::jsonb) \
                     || jsonb_strip_nulls({}) AS TEXT), '{{}}')",
                    objects.join(" || ")
                )
            }
        }
    }

    /// Takes the cold rows matching `row_condition` (on `r.value`) out of
    /// the chunks matching `chunk_condition` (on the chunk's spans, which
    /// must include every chunk holding such a row): those chunks are
    /// repacked without them, and chunks left empty are deleted. Keys are
    /// the caller's to delete.
    pub fn remove_from_cold_sql(&self, chunk_condition: &str, row_condition: &str) -> Vec<String> {
        let cold = self.cold_table();
        let received = self.cold_value(RECEIVED_AT);
        let (first_bucket, last_bucket) = match self.bucket() {
            Some(_) => {
                let bucket = self.cold_value(BUCKET_COLUMN);
                (format!("min({bucket})"), format!("max({bucket})"))
            }
            None => ("CAST(NULL AS BIGINT)".into(), "CAST(NULL AS BIGINT)".into()),
        };
        let repack = match self.backend {
            Backend::Sqlite => "fg_compress(json_group_array(json(r.value)))",
            Backend::Postgres => "COALESCE(jsonb_agg(r.value), '[]'::jsonb)",
        };
        vec![
            format!(
                "UPDATE {cold} SET ({CHUNK_COLUMNS}) = (SELECT count(*), \
                 COALESCE(min({received}), 0), COALESCE(max({received}), 0), {first_bucket}, {last_bucket}, {repack} \
                 FROM {} WHERE NOT ({row_condition})) WHERE {chunk_condition}",
                unpack(self.backend, &format!("{cold}.rows"))
            ),
            format!("DELETE FROM {cold} WHERE row_count = 0"),
        ]
    }

    /// Deletes the keys of the cold rows matching `row_condition` (on
    /// `r.value`) in the chunks matching `chunk_condition`: run before the
    /// rows are taken out.
    pub fn forget_cold_keys_sql(
        &self,
        chunk_condition: &str,
        row_condition: &str,
    ) -> Option<String> {
        self.def.key.as_ref()?;
        let key = self.primary_key();
        let values: Vec<String> = key.iter().map(|c| self.cold_value(c)).collect();
        Some(format!(
            "DELETE FROM {} WHERE ({}) IN (SELECT {} FROM {} WHERE {chunk_condition} AND {row_condition})",
            self.cold_keys_table(),
            key.join(", "),
            values.join(", "),
            self.cold_rows()
        ))
    }

    /// Rows, chunks and stored bytes of the cold tier, and its span of
    /// `received_at`.
    pub fn cold_stats_sql(&self) -> String {
        let size = match self.backend {
            Backend::Sqlite => "length(rows)",
            Backend::Postgres => "pg_column_size(rows)",
        };
        format!(
            "SELECT CAST(COALESCE(sum(row_count), 0) AS BIGINT), min(first_at), max(last_at), \
             count(*), CAST(COALESCE(sum({size}), 0) AS BIGINT) FROM {}",
            self.cold_table()
        )
    }
}

/// A chunk's rows in a FROM list, each as `r.value`.
fn unpack(backend: Backend, rows: &str) -> String {
    match backend {
        Backend::Sqlite => format!("json_each(fg_decompress({rows})) AS r"),
        Backend::Postgres => format!("jsonb_array_elements({rows}) AS r(value)"),
    }
}

/// A JSON object of the named columns, for SQLite: floats with 17
/// significant digits, which round-trip every `f64` (SQLite's own JSON
/// rendering of a real may not), `extra` as a string; objects of more
/// columns than one call takes are merged (a merge leaves out NULLs,
/// which read back as NULL all the same).
fn sqlite_object<'a>(columns: impl Iterator<Item = (&'a str, ColumnKind)>) -> String {
    let pairs: Vec<String> = columns
        .map(|(column, kind)| match kind {
            ColumnKind::Float => format!(
                "'{column}', json(CASE WHEN {column} IS NULL THEN 'null' ELSE printf('%!.17g', {column}) END)"
            ),
            // Concatenation makes `extra` plain text, never a JSON value
            // (json_remove's result would otherwise go in as an object).
            _ if column == EXTRA => format!("'{column}', '' || {column}"),
            _ => format!("'{column}', {column}"),
        })
        .collect();
    let objects: Vec<String> = pairs
        .chunks(MAX_PAIRS)
        .map(|pairs| format!("json_object({})", pairs.join(", ")))
        .collect();
    objects
        .into_iter()
        .reduce(|merged, next| format!("json_patch({merged}, {next})"))
        .unwrap_or_else(|| "json_object()".to_string())
}
