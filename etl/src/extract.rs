//! Extraction: each source's data is first copied, unchanged, into the
//! run's interim area; the rows are then read from that copy. A run thus
//! works on a snapshot (a file rewritten mid-run cannot mix two versions),
//! and what a run saw stays on disk for inspection. What a source may
//! reach (files under `--etl-dir`, configured databases that are not a
//! fleetgate store) is checked here again, as the run reads it: see
//! [`crate::confine`].

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::Ordering;

use futures::TryStreamExt;
use sqlx::{Column, Row as _};

use crate::confine::{self, SourceAccess, SourceDatabase};
use crate::job::{SourceDef, SourceKind};
use crate::run::Progress;
use crate::transform::{Origin, Row};

/// A row a source could not give: unreadable, or a field of the wrong type.
#[derive(Debug, Clone)]
pub struct ExtractReject {
    pub origin: Origin,
    pub reason: String,
    /// The line as the file holds it.
    pub raw: String,
}

/// Copies `source` into `dir`; returns the copied files in read order.
pub async fn dump(
    name: &str,
    source: &SourceDef,
    dir: &Path,
    access: &SourceAccess,
) -> Result<Vec<PathBuf>, String> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    match source.kind()? {
        SourceKind::Csv(pattern) | SourceKind::Jsonl(pattern) => {
            // By their real paths, each checked to lie under --etl-dir
            // now (a symlink may have changed since the job was applied).
            let files = access
                .files(pattern)
                .map_err(|e| format!("source {name}: {e}"))?;
            if files.is_empty() {
                return Err(format!("source {name}: no file matches {pattern:?}"));
            }
            let mut copies = Vec::new();
            for (i, file) in files.iter().enumerate() {
                let base = file.file_name().map(|n| n.to_string_lossy().into_owned());
                let copy = dir.join(format!("{i:04}-{}", base.unwrap_or_default()));
                tokio::fs::copy(file, &copy)
                    .await
                    .map_err(|e| format!("source {name}: cannot read {}: {e}", file.display()))?;
                copies.push(copy);
            }
            Ok(copies)
        }
        SourceKind::Sql { query, database } => {
            let copy = dir.join("rows.jsonl");
            let database = access
                .database(database)
                .map_err(|e| format!("source {name}: {e}"))?;
            confine::check_source_query(query, database)
                .map_err(|e| format!("source {name}: {e}"))?;
            dump_query(database, query, &copy)
                .await
                .map_err(|e| format!("source {name}: {e}"))?;
            Ok(vec![copy])
        }
    }
}

/// Writes a query's rows as JSON lines, one object per row. The query
/// runs read-only, and only once the database is known not to be a
/// fleetgate store.
async fn dump_query(database: &SourceDatabase, query: &str, to: &Path) -> Result<(), String> {
    let mut out = BufWriter::new(File::create(to).map_err(|e| e.to_string())?);
    let mut write = |row: serde_json::Map<String, serde_json::Value>| {
        serde_json::to_writer(&mut out, &row)
            .map_err(|e| e.to_string())
            .and_then(|_| out.write_all(b"\n").map_err(|e| e.to_string()))
    };
    let failed = |e: sqlx::Error| format!("the query failed: {e}");
    let store_check = confine::fleetgate_tables_sql(database);
    match database {
        SourceDatabase::Postgres(url) => {
            let options = sqlx::postgres::PgConnectOptions::from_str(url)
                .map_err(|e| format!("bad database URL: {e}"))?;
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .map_err(|e| format!("cannot connect: {e}"))?;
            let mut tx = pool
                .begin()
                .await
                .map_err(|e| format!("cannot begin: {e}"))?;
            // Whatever the query is, it cannot change the source.
            sqlx::query("SET TRANSACTION READ ONLY")
                .execute(&mut *tx)
                .await
                .map_err(|e| format!("cannot begin a read-only transaction: {e}"))?;
            let (is_store,): (bool,) = sqlx::query_as(store_check)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| format!("cannot inspect the database: {e}"))?;
            if is_store {
                return Err(confine::FLEETGATE_DATABASE.into());
            }
            let mut rows = sqlx::query(query).fetch(&mut *tx);
            while let Some(row) = rows.try_next().await.map_err(failed)? {
                write(
                    (0..row.len())
                        .map(|i| {
                            (
                                row.column(i).name().to_string(),
                                fleetgate_store::query::postgres_value(&row, i),
                            )
                        })
                        .collect(),
                )?;
            }
        }
        SourceDatabase::Sqlite(path) => {
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(path)
                .read_only(true);
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let (is_store,): (bool,) = sqlx::query_as(store_check)
                .fetch_one(&pool)
                .await
                .map_err(|e| format!("cannot inspect the database: {e}"))?;
            if is_store {
                return Err(confine::FLEETGATE_DATABASE.into());
            }
            let mut rows = sqlx::query(query).fetch(&pool);
            while let Some(row) = rows.try_next().await.map_err(failed)? {
                write(
                    (0..row.len())
                        .map(|i| {
                            (
                                row.column(i).name().to_string(),
                                fleetgate_store::query::sqlite_value(&row, i),
                            )
                        })
                        .collect(),
                )?;
            }
        }
    }
    out.flush().map_err(|e| e.to_string())
}

/// Reads the rows of a source's copied files. Rows that cannot be read go
/// to `rejects`; a file that cannot be read at all fails the run.
pub fn read(
    source_index: u16,
    source: &SourceDef,
    files: &[PathBuf],
    progress: &Progress,
    rejects: &mut Vec<ExtractReject>,
) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    read_each(
        source_index,
        source,
        files,
        progress,
        rejects,
        usize::MAX,
        &mut |batch| {
            rows.extend(batch);
            Ok(())
        },
    )?;
    Ok(rows)
}

/// Like [`read`], but hands rows on `batch` at a time as they are read,
/// for a run that loads while it reads.
pub fn read_each(
    source_index: u16,
    source: &SourceDef,
    files: &[PathBuf],
    progress: &Progress,
    rejects: &mut Vec<ExtractReject>,
    batch: usize,
    on_batch: &mut dyn FnMut(Vec<Row>) -> Result<(), String>,
) -> Result<(), String> {
    let mut out = RowSink {
        rows: Vec::new(),
        batch,
        on_batch,
        progress,
    };
    for (file_index, path) in files.iter().enumerate() {
        let origin = |line: u64| Origin {
            source: source_index,
            file: file_index as u16,
            line,
        };
        let file = File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        match source.kind()? {
            SourceKind::Csv(_) => read_csv(source, file, &origin, &mut out, rejects)
                .map_err(|e| format!("{}: {e}", path.display()))?,
            _ => read_jsonl(source, file, &origin, &mut out, rejects)
                .map_err(|e| format!("{}: {e}", path.display()))?,
        }
    }
    out.flush()
}

/// Where read rows go: handed on in batches.
struct RowSink<'a> {
    rows: Vec<Row>,
    batch: usize,
    on_batch: &'a mut dyn FnMut(Vec<Row>) -> Result<(), String>,
    progress: &'a Progress,
}

impl RowSink<'_> {
    fn push(&mut self, row: Row) -> Result<(), String> {
        self.rows.push(row);
        self.progress.read.fetch_add(1, Ordering::Relaxed);
        if self.rows.len() >= self.batch {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        if self.rows.is_empty() {
            return Ok(());
        }
        (self.on_batch)(std::mem::take(&mut self.rows))
    }
}

fn read_csv(
    source: &SourceDef,
    file: File,
    origin: &dyn Fn(u64) -> Origin,
    rows: &mut RowSink,
    rejects: &mut Vec<ExtractReject>,
) -> Result<(), String> {
    let delimiter = source.delimiter.unwrap_or(',');
    if !delimiter.is_ascii() {
        return Err(format!("delimiter {delimiter:?} is not a single byte"));
    }
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter as u8)
        .from_reader(BufReader::with_capacity(1 << 20, file));
    let header = reader
        .byte_headers()
        .map_err(|e| format!("cannot read the header line: {e}"))?
        .clone();
    let positions = source
        .columns
        .keys()
        .map(|column| {
            header
                .iter()
                .position(|h| h == column.as_bytes())
                .ok_or_else(|| format!("the header has no column {column:?}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let types: Vec<_> = source.columns.iter().collect();
    let mut record = csv::ByteRecord::new();
    loop {
        let line = reader.position().line();
        match reader.read_byte_record(&mut record) {
            Ok(false) => return Ok(()),
            Ok(true) => {}
            Err(e) if matches!(e.kind(), csv::ErrorKind::Io(_)) => {
                return Err(format!("read failed at line {line}: {e}"))
            }
            Err(e) => {
                let line = e.position().map_or(line, |p| p.line());
                rejects.push(ExtractReject {
                    origin: origin(line),
                    reason: format!("malformed CSV: {e}"),
                    raw: String::new(),
                });
                continue;
            }
        }
        let line = record.position().map_or(line, |p| p.line());
        let mut values = Vec::with_capacity(positions.len());
        let mut problem = None;
        for (&position, (name, ty)) in positions.iter().zip(&types) {
            let field = record.get(position).unwrap_or_default();
            let parsed = std::str::from_utf8(field)
                .map_err(|_| "not UTF-8".to_string())
                .and_then(|text| ty.parse_text(text));
            match parsed {
                Ok(value) => values.push(value),
                Err(e) => {
                    problem = Some(format!("{name}: {e}"));
                    break;
                }
            }
        }
        match problem {
            None => rows.push(Row {
                values,
                origin: origin(line),
            })?,
            Some(reason) => rejects.push(ExtractReject {
                origin: origin(line),
                reason,
                raw: raw_csv(&record, delimiter),
            }),
        }
    }
}

fn raw_csv(record: &csv::ByteRecord, delimiter: char) -> String {
    record
        .iter()
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect::<Vec<_>>()
        .join(&delimiter.to_string())
}

fn read_jsonl(
    source: &SourceDef,
    file: File,
    origin: &dyn Fn(u64) -> Origin,
    rows: &mut RowSink,
    rejects: &mut Vec<ExtractReject>,
) -> Result<(), String> {
    let reader = BufReader::with_capacity(1 << 20, file);
    for (n, line) in reader.split(b'\n').enumerate() {
        let line = line.map_err(|e| format!("read failed at line {}: {e}", n + 1))?;
        let text = String::from_utf8_lossy(&line);
        if text.trim().is_empty() {
            continue;
        }
        let object = match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Object(object)) => object,
            Ok(_) => {
                rejects.push(ExtractReject {
                    origin: origin(n as u64 + 1),
                    reason: "not a JSON object".into(),
                    raw: text.into_owned(),
                });
                continue;
            }
            Err(e) => {
                rejects.push(ExtractReject {
                    origin: origin(n as u64 + 1),
                    reason: format!("malformed JSON: {e}"),
                    raw: text.into_owned(),
                });
                continue;
            }
        };
        let values = source
            .columns
            .iter()
            .map(|(name, ty)| {
                ty.from_json(object.get(name).unwrap_or(&serde_json::Value::Null))
                    .map_err(|e| format!("{name}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>();
        match values {
            Ok(values) => rows.push(Row {
                values,
                origin: origin(n as u64 + 1),
            })?,
            Err(reason) => rejects.push(ExtractReject {
                origin: origin(n as u64 + 1),
                reason,
                raw: text.into_owned(),
            }),
        }
    }
    Ok(())
}
