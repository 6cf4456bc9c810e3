//! What ETL sources may reach. A job is declared over the HTTP API by an
//! admin token, but runs with the server's own file and network access:
//! unconfined, a `csv` source could read `/etc/passwd` or the platform key
//! into a run's rejects (which extract tokens read), and a `sql` source
//! could copy `fleetgate_devices` out of the store's own database. So:
//!
//! - files are read only under one directory the operator names
//!   (`--etl-dir`), checked after resolving `..` and symlinks, when a job
//!   is applied and again for every file a run reads;
//! - a `sql` source names a database the operator configured
//!   (`--etl-database NAME=URL`), never a URL of its own; none may be the
//!   store's database, or any database holding `fleetgate_*` tables
//!   (checked at start and on every connection), and a source query is one
//!   read-only SELECT.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use fleetgate_protocol::schema::check_identifier;
use sqlparser::ast::Statement;
use sqlparser::dialect::{Dialect, PostgreSqlDialect, SQLiteDialect};
use sqlparser::parser::Parser;

use crate::job::{JobDef, SourceKind};

/// Source queries longer than this are refused: parsing and checking cost
/// grows with them, and a real extraction query is far shorter.
pub const MAX_SOURCE_QUERY: usize = 64 * 1024;

/// A configured source database.
#[derive(Debug, Clone)]
pub enum SourceDatabase {
    Postgres(String),
    /// The SQLite file, as configured (opened read-only).
    Sqlite(PathBuf),
}

/// Where ETL sources may read from.
#[derive(Debug, Clone)]
pub struct SourceAccess {
    /// `--etl-dir`, canonical (symlinks and `..` resolved).
    root: PathBuf,
    /// `--etl-dir` as configured, made absolute: absolute patterns may be
    /// written under either.
    given_root: PathBuf,
    /// `--etl-database NAME=URL`.
    databases: BTreeMap<String, SourceDatabase>,
}

/// What the platform's own store is, so that no source can be it.
pub struct Store<'a> {
    /// The data directory (platform key, admin token, SQLite store).
    pub data_dir: &'a Path,
    /// `--database`, when the store is on PostgreSQL.
    pub database_url: Option<&'a str>,
}

impl SourceAccess {
    /// Checks the operator's configuration; `root` is created if missing.
    pub fn new(
        root: &Path,
        databases: &[(String, String)],
        store: Store<'_>,
    ) -> Result<SourceAccess, String> {
        std::fs::create_dir_all(root)
            .map_err(|e| format!("cannot create --etl-dir {}: {e}", root.display()))?;
        let given_root = std::path::absolute(root)
            .ok()
            .and_then(|r| normalize(&r))
            .unwrap_or_else(|| root.to_path_buf());
        let root = root
            .canonicalize()
            .map_err(|e| format!("--etl-dir {}: {e}", root.display()))?;
        let data_dir = store
            .data_dir
            .canonicalize()
            .map_err(|e| format!("data directory {}: {e}", store.data_dir.display()))?;
        if data_dir.starts_with(&root) {
            return Err(format!(
                "--etl-dir {} holds the data directory {} (the platform key, the admin token, the store): \
                 name a directory of its own",
                root.display(),
                data_dir.display()
            ));
        }
        let mut configured = BTreeMap::new();
        for (name, url) in databases {
            check_identifier("ETL database", name).map_err(|e| format!("--etl-database: {e}"))?;
            let database =
                parse_database(url).map_err(|e| format!("--etl-database {name}: {e}"))?;
            not_the_store(&database, &data_dir, &root, store.database_url)
                .map_err(|e| format!("--etl-database {name}: {e}"))?;
            if configured.insert(name.clone(), database).is_some() {
                return Err(format!("--etl-database {name} is given twice"));
            }
        }
        Ok(SourceAccess {
            root,
            given_root,
            databases: configured,
        })
    }

    /// The directory files are read under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Checks every source of `job` as `apply` must: files under the
    /// directory (those that exist now, by their real path), databases
    /// configured, queries one SELECT.
    pub fn check_job(&self, job: &JobDef) -> Result<(), String> {
        for (name, source) in &job.sources {
            let checked = match source.kind()? {
                SourceKind::Csv(pattern) | SourceKind::Jsonl(pattern) => {
                    self.files(pattern).map(|_| ())
                }
                SourceKind::Sql { query, database } => self
                    .database(database)
                    .and_then(|db| check_source_query(query, db)),
            };
            checked.map_err(|e| format!("source {name}: {e}"))?;
        }
        Ok(())
    }

    /// A configured database by name.
    pub fn database(&self, name: &str) -> Result<&SourceDatabase, String> {
        self.databases.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.databases.keys().map(String::as_str).collect();
            format!(
                "database {name:?} is not one the operator configured (fleetgate up --etl-database NAME=URL); configured: {}",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            )
        })
    }

    /// The files `pattern` (a path or glob, relative to the directory or
    /// absolute inside it) matches now, by their real paths, sorted; an
    /// error names the first that lies outside the directory.
    pub fn files(&self, pattern: &str) -> Result<Vec<PathBuf>, String> {
        let glob_pattern = self.pattern(pattern)?;
        let mut files = Vec::new();
        for entry in
            glob::glob(&glob_pattern).map_err(|e| format!("bad path pattern {pattern:?}: {e}"))?
        {
            let path = entry.map_err(|e| format!("cannot list {pattern:?}: {e}"))?;
            let real = path
                .canonicalize()
                .map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
            if !real.starts_with(&self.root) {
                return Err(format!(
                    "{} resolves to {}, outside the ETL directory {} (--etl-dir)",
                    path.display(),
                    real.display(),
                    self.root.display()
                ));
            }
            if real.is_file() {
                files.push(real);
            }
        }
        files.sort();
        files.dedup();
        Ok(files)
    }

    /// `pattern` as a glob pattern under the (canonical) directory, or why
    /// it names a place outside it.
    fn pattern(&self, pattern: &str) -> Result<String, String> {
        let outside = || {
            format!(
                "{pattern:?} is outside the ETL directory {} (--etl-dir); name files inside it, \
                 relative to it or by absolute path",
                self.root.display()
            )
        };
        let given = Path::new(pattern);
        // `..` is resolved by the text first: a pattern that climbs out is
        // refused whatever exists there.
        let normalized = normalize(given).ok_or_else(outside)?;
        let relative = if normalized.is_absolute() {
            // Written as the directory's real or configured path.
            let inside = normalized
                .strip_prefix(&self.root)
                .or_else(|_| normalized.strip_prefix(&self.given_root));
            inside.map(Path::to_path_buf).map_err(|_| outside())?
        } else {
            normalized
        };
        let root = glob::Pattern::escape(&self.root.to_string_lossy());
        let rest = relative.to_string_lossy();
        Ok(if rest.is_empty() {
            root
        } else {
            format!("{root}/{rest}")
        })
    }
}

/// `path` with `.` removed and `..` applied to what precedes it; `None`
/// when `..` climbs above where the path starts.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    let mut depth = 0usize;
    for component in path.components() {
        match component {
            Component::Prefix(_) | Component::RootDir => out.push(component.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth == 0 {
                    return None;
                }
                out.pop();
                depth -= 1;
            }
            Component::Normal(part) => {
                out.push(part);
                depth += 1;
            }
        }
    }
    Some(out)
}

fn parse_database(url: &str) -> Result<SourceDatabase, String> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        sqlx::postgres::PgConnectOptions::from_str(url)
            .map_err(|e| format!("bad database URL: {e}"))?;
        Ok(SourceDatabase::Postgres(url.to_string()))
    } else if let Some(path) = url.strip_prefix("sqlite:") {
        let path = path.trim_start_matches("//");
        if path.is_empty() || path.starts_with(':') || path.contains('?') {
            return Err("sqlite: needs the path of a database file".into());
        }
        Ok(SourceDatabase::Sqlite(PathBuf::from(path)))
    } else {
        Err(format!(
            "unsupported database {url:?}: use postgres://... or sqlite:PATH"
        ))
    }
}

/// Refuses the platform's own store by its address: a PostgreSQL URL
/// naming the store's server and database, or a SQLite file in the data
/// directory. (Another address of the same database is caught when a run
/// connects: see [`refuse_fleetgate_database`].)
fn not_the_store(
    database: &SourceDatabase,
    data_dir: &Path,
    etl_root: &Path,
    store_url: Option<&str>,
) -> Result<(), String> {
    match database {
        SourceDatabase::Sqlite(path) => {
            // The data directory holds the store (store.db and its WAL);
            // a file there is not a source, unless under --etl-dir.
            let real = path.canonicalize().unwrap_or_else(|_| path.clone());
            if real.starts_with(data_dir) && !real.starts_with(etl_root) {
                return Err(format!(
                    "{} is in the data directory, where the store's own database is: never an ETL source",
                    path.display()
                ));
            }
        }
        SourceDatabase::Postgres(url) => {
            let Some(store) = store_url else {
                return Ok(());
            };
            let (Ok(source), Ok(store)) = (
                sqlx::postgres::PgConnectOptions::from_str(url),
                sqlx::postgres::PgConnectOptions::from_str(store),
            ) else {
                return Ok(());
            };
            let same_host = source.get_host() == store.get_host()
                || [source.get_host(), store.get_host()]
                    .iter()
                    .all(|h| matches!(*h, "localhost" | "127.0.0.1" | "::1"));
            if same_host
                && source.get_port() == store.get_port()
                && source.get_database() == store.get_database()
            {
                return Err(
                    "it names the store's own database (--database): never an ETL source".into(),
                );
            }
        }
    }
    Ok(())
}

/// A source query must be exactly one SELECT (a `WITH` query included):
/// nothing that writes, `ATTACH`es another file, sets `PRAGMA`s or runs a
/// second statement (SQLite runs every statement of a string).
pub fn check_source_query(query: &str, database: &SourceDatabase) -> Result<(), String> {
    if query.len() > MAX_SOURCE_QUERY {
        return Err(format!(
            "the query is {} bytes; at most {MAX_SOURCE_QUERY}",
            query.len()
        ));
    }
    // As for queries on the store (`fleetgate_store::query::check`): SQLite
    // stops reading at a NUL, and sqlx never gets past one, so a run would
    // hang; PostgreSQL refuses NUL anyway.
    if query.contains('\0') {
        return Err("the query contains a NUL character".into());
    }
    let postgres = matches!(database, SourceDatabase::Postgres(_));
    let query = query.to_string();
    // A long chain of operators nests deeply; parse (and drop the tree) on
    // a thread with room for it, not on an async worker's small stack.
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(move || {
            let dialect: &dyn Dialect = if postgres {
                &PostgreSqlDialect {}
            } else {
                &SQLiteDialect {}
            };
            let statements = Parser::parse_sql(dialect, &query)
                .map_err(|e| format!("the query does not parse: {e}"))?;
            match statements.as_slice() {
                [Statement::Query(_)] => Ok(()),
                [_] => Err("the query must be a SELECT".to_string()),
                _ => Err("the query must be exactly one SELECT statement".to_string()),
            }
        })
        .map_err(|e| format!("cannot check the query: {e}"))?
        .join()
        .map_err(|_| "the query could not be checked".to_string())?
}

/// Whether the connected database holds fleetgate's tables (one boolean
/// column): the store's own database under another address (a host
/// alias, a symlinked file), or another fleetgate platform's. A run
/// refuses such a database with [`FLEETGATE_DATABASE`].
pub fn fleetgate_tables_sql(database: &SourceDatabase) -> &'static str {
    match database {
        SourceDatabase::Postgres(_) => {
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE relname LIKE 'fleetgate\\_%')"
        }
        SourceDatabase::Sqlite(_) => {
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name LIKE 'fleetgate\\_%' ESCAPE '\\')"
        }
    }
}

pub const FLEETGATE_DATABASE: &str =
    "the database holds fleetgate_* tables: a fleetgate store is never an ETL source";

#[cfg(test)]
mod tests {
    use super::*;

    fn access(databases: &[(&str, &str)]) -> (tempfile::TempDir, SourceAccess) {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let root = dir.path().join("sources");
        let databases: Vec<(String, String)> = databases
            .iter()
            .map(|(n, u)| (n.to_string(), u.to_string()))
            .collect();
        let access = SourceAccess::new(
            &root,
            &databases,
            Store {
                data_dir: &data,
                database_url: Some("postgres://postgres@127.0.0.1:5432/store"),
            },
        )
        .unwrap();
        (dir, access)
    }

    #[test]
    fn files_are_read_only_under_the_directory() {
        let (dir, access) = access(&[]);
        let root = access.root().to_path_buf();
        std::fs::create_dir_all(root.join("exports")).unwrap();
        std::fs::write(root.join("exports/a.csv"), "x\n1\n").unwrap();
        std::fs::write(dir.path().join("secret.csv"), "x\n1\n").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.csv"), root.join("link.csv")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();

        let found = access.files("exports/*.csv").unwrap();
        assert_eq!(found, [root.join("exports/a.csv")]);
        let absolute = format!("{}/exports/a.csv", root.display());
        assert_eq!(access.files(&absolute).unwrap().len(), 1);
        assert_eq!(access.files("exports/./x/../a.csv").unwrap().len(), 1);
        for outside in [
            "/etc/passwd",
            "../secret.csv",
            "exports/../../secret.csv",
            "link.csv",
            "etc/passwd",
            "*.csv",
        ] {
            let err = access.files(outside).unwrap_err();
            assert!(
                err.contains("outside the ETL directory"),
                "{outside}: {err}"
            );
        }
        // Nothing there yet is not an error at apply: files may come later.
        assert!(access.files("later/*.csv").unwrap().is_empty());
    }

    #[test]
    fn the_directory_may_not_hold_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        for root in [dir.path().to_path_buf(), data.clone()] {
            let err = SourceAccess::new(
                &root,
                &[],
                Store {
                    data_dir: &data,
                    database_url: None,
                },
            )
            .unwrap_err();
            assert!(err.contains("holds the data directory"), "{err}");
        }
    }

    #[test]
    fn databases_are_named_configured_and_never_the_store() {
        let (_dir, access) = access(&[("shop", "postgres://shop@db:5432/shop")]);
        assert!(access.database("shop").is_ok());
        let err = access.database("postgres://x@y/z").unwrap_err();
        assert!(err.contains("not one the operator configured"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let store = |url| Store {
            data_dir: &data,
            database_url: url,
        };
        let root = dir.path().join("sources");
        let own_file = format!("sqlite:{}", data.join("store.db").display());
        for (url, store_url) in [
            (own_file.as_str(), None),
            (
                "postgres://other@localhost:5432/store",
                Some("postgres://postgres@127.0.0.1:5432/store"),
            ),
        ] {
            let err = SourceAccess::new(&root, &[("own".into(), url.into())], store(store_url))
                .unwrap_err();
            assert!(err.contains("never an ETL source"), "{url}: {err}");
        }
    }

    #[test]
    fn a_source_query_is_one_select() {
        let db = SourceDatabase::Sqlite("x.db".into());
        assert!(check_source_query("WITH a AS (SELECT 1) SELECT * FROM a", &db).is_ok());
        for bad in [
            "ATTACH DATABASE 'store.db' AS s",
            "SELECT 1; SELECT * FROM s.fleetgate_devices",
            "PRAGMA table_info(x)",
            "DELETE FROM orders",
            // Parses as one SELECT; SQLite reads up to the NUL, and sqlx
            // preparing the rest never returned.
            "SELECT 1 /* \0 */ WHERE 1",
        ] {
            assert!(check_source_query(bad, &db).is_err(), "{bad}");
        }
        let long = format!("SELECT 1 WHERE {}1=1", "1=1 AND ".repeat(9000));
        assert!(check_source_query(&long, &db).is_err());
        let chain = format!("SELECT 1 WHERE {}1=1", "1=1 AND ".repeat(7000));
        assert!(check_source_query(&chain, &db).is_ok());
    }
}
