//! One handle over the two supported databases.
//!
//! SQLite is the embedded default; PostgreSQL is for servers and clusters.
//! Code that must run on both is written once inside [`with_pool!`], which
//! compiles the same body against each backend's concrete pool type.

use std::future::Future;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, PgPool, SqlitePool};

#[derive(Clone)]
pub enum Pools {
    Sqlite {
        /// The single writer: SQLite serializes writes anyway, and one
        /// connection keeps group commits from fighting over the lock.
        write: SqlitePool,
        /// Opened read-only, so no query can write whatever its text says.
        read: SqlitePool,
    },
    Postgres {
        /// Ingest commits and administration.
        write: PgPool,
        /// Analytics queries, kept apart so that slow queries cannot take
        /// the connections group commits need.
        read: PgPool,
        /// `LISTEN` connections: each follower holds one for good, so they
        /// must not come out of the write pool.
        listen: PgPool,
    },
}

/// SQLite page caches, in KiB (a negative `cache_size`): the writer's and
/// each of the four readers'.
const WRITER_CACHE_KIB: &str = "-65536";
const READER_CACHE_KIB: &str = "-32768";

#[derive(Clone)]
pub struct Db {
    pub pools: Pools,
}

/// Runs `$body` with `$pool` bound to the write pool of whichever backend `$db` is.
#[macro_export]
macro_rules! with_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match &$db.pools {
            $crate::db::Pools::Sqlite { write: $pool, .. } => $body,
            $crate::db::Pools::Postgres { write: $pool, .. } => $body,
        }
    };
}

/// Runs `$body` with `$pool` bound to a pool for the store's own reads
/// that must not hold up ingest: SQLite's readers (its one writer is
/// ingest's), PostgreSQL's write pool (its readers carry the query API's
/// limits, and its writes do not wait for reads).
#[macro_export]
macro_rules! with_reading_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match &$db.pools {
            $crate::db::Pools::Sqlite { read: $pool, .. } => $body,
            $crate::db::Pools::Postgres { write: $pool, .. } => $body,
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Db {
    /// Tells the other processes following `channel` (see [`Db::follow`]);
    /// nothing to do on SQLite. A failure is logged: followers resync when
    /// they reconnect, and the change itself is already committed.
    pub async fn notify(&self, channel: &str, payload: &str) {
        let Pools::Postgres { write, .. } = &self.pools else {
            return;
        };
        let sent = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload)
            .execute(write)
            .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, channel, payload, "cannot notify other processes");
        }
    }

    /// Follows a PostgreSQL notification channel, so that processes
    /// sharing the database hear of each other's changes. `on` gets `None`
    /// after every (re)subscription (whatever was sent while not listening
    /// is lost: read everything again) and `Some(payload)` per
    /// notification. Reconnects until the pool closes. Does nothing on
    /// SQLite, which one process uses alone.
    pub fn follow<F, Fut>(&self, channel: &'static str, on: F)
    where
        F: Fn(Option<String>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let Pools::Postgres { listen, .. } = &self.pools else {
            return;
        };
        let pool = listen.clone();
        tokio::spawn(async move {
            loop {
                let followed = async {
                    let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
                    listener.listen(channel).await?;
                    on(None).await;
                    loop {
                        // `None`: the listener reconnected on its own.
                        let payload = listener.try_recv().await?.map(|n| n.payload().to_string());
                        on(payload).await;
                    }
                    #[allow(unreachable_code)]
                    Ok::<(), sqlx::Error>(())
                };
                let lost = followed.await;
                if pool.is_closed() {
                    return; // shutting down
                }
                if let Err(e) = lost {
                    tracing::warn!(error = %e, channel, "notification listener lost; reconnecting");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// `database` is a `postgres://` URL, or `None` for SQLite at `sqlite_path`.
    pub async fn open(database: Option<&str>, sqlite_path: &Path) -> Result<Db, String> {
        match database {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Self::open_postgres(url).await
            }
            Some(url) if url.starts_with("sqlite:") => {
                let path = url
                    .trim_start_matches("sqlite://")
                    .trim_start_matches("sqlite:");
                Self::open_sqlite(Path::new(path)).await
            }
            Some(other) => Err(format!(
                "unsupported database {other:?}: use postgres://... or sqlite:PATH"
            )),
            None => Self::open_sqlite(sqlite_path).await,
        }
    }

    async fn open_sqlite(path: &Path) -> Result<Db, String> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk, not only in the OS cache, before any
            // PUBACK goes out, so acknowledged records survive power loss too.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        // SQLite's default page cache is 2 MB, which is also as much as a
        // sort may take before it spills to temporary files: a view's
        // partials table at fleet scale (168,000 groups) and the sort of a
        // sweep's batch (up to 1,000,000 rows) outgrow it many times over.
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .after_connect(|connection, _| Box::pin(crate::sqlite_functions::register(connection)))
            .connect_with(options.clone().pragma("cache_size", WRITER_CACHE_KIB))
            .await
            .map_err(|e| format!("cannot open SQLite database {}: {e}", path.display()))?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .after_connect(|connection, _| Box::pin(crate::sqlite_functions::register(connection)))
            .connect_with(
                options
                    .read_only(true)
                    .create_if_missing(false)
                    .pragma("cache_size", READER_CACHE_KIB)
                    // The store's own reads (a sweep's batch of a million
                    // rows) take seconds by design, and a query's time is
                    // in its answer: no warning each time.
                    .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1)),
            )
            .await
            .map_err(|e| {
                format!(
                    "cannot open SQLite database {} for reading: {e}",
                    path.display()
                )
            })?;
        Ok(Db {
            pools: Pools::Sqlite { write, read },
        })
    }

    async fn open_postgres(url: &str) -> Result<Db, String> {
        let options =
            PgConnectOptions::from_str(url).map_err(|e| format!("invalid PostgreSQL URL: {e}"))?;
        let connect = |size: u32| {
            PgPoolOptions::new()
                .max_connections(size)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options.clone())
        };
        let write = connect(4)
            .await
            .map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
        let read = PgPoolOptions::new()
            .max_connections(6)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(|connection, _| Box::pin(limit_query_session(connection)))
            .connect_with(options.clone())
            .await
            .map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
        let listen = PgPoolOptions::new()
            .max_connections(8)
            .connect_lazy_with(options);
        Ok(Db {
            pools: Pools::Postgres {
                write,
                read,
                listen,
            },
        })
    }

    pub fn backend(&self) -> Backend {
        match self.pools {
            Pools::Sqlite { .. } => Backend::Sqlite,
            Pools::Postgres { .. } => Backend::Postgres,
        }
    }

    /// Column definition of a server-assigned, auto-incrementing key.
    pub fn auto_id_column(&self, name: &str) -> String {
        match self.backend() {
            Backend::Sqlite => format!("{name} INTEGER PRIMARY KEY"),
            Backend::Postgres => {
                format!("{name} BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
            }
        }
    }

    /// Runs DDL statements in one transaction.
    pub async fn execute_ddl(&self, statements: &[String]) -> Result<(), sqlx::Error> {
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for statement in statements {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            tx.commit().await
        })
    }

    pub async fn close(&self) {
        match &self.pools {
            Pools::Sqlite { write, read } => {
                read.close().await;
                write.close().await;
            }
            Pools::Postgres {
                write,
                read,
                listen,
            } => {
                listen.close().await;
                read.close().await;
                write.close().await;
            }
        }
    }
}

/// `work_mem` of query sessions: what each sort or hash of a query may
/// hold in the database's memory before it spills to disk.
pub const QUERY_WORK_MEM: &str = "8MB";
/// `temp_file_limit` of query sessions: what one may spill to disk.
pub const QUERY_TEMP_FILE_LIMIT: &str = "1GB";

/// Settings of every session of the PostgreSQL read pool, which runs only
/// queries (`statement_timeout` is set per query, from `--query-timeout`).
/// `temp_file_limit` takes a superuser, or a role granted SET on it: when
/// the store's role may not set it, that is said once and queries run
/// without it (the DBA can set it on the role instead).
async fn limit_query_session(connection: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    use sqlx::Executor;
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    connection
        .execute(format!("SET work_mem = '{QUERY_WORK_MEM}'").as_str())
        .await?;
    let temp = format!("SET temp_file_limit = '{QUERY_TEMP_FILE_LIMIT}'");
    if let Err(e) = connection.execute(temp.as_str()).await {
        let denied =
            matches!(&e, sqlx::Error::Database(db) if db.code().as_deref() == Some("42501"));
        if !denied {
            return Err(e);
        }
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                error = %e,
                "queries run without temp_file_limit: this database role may not set it \
                 (ALTER ROLE ... SET temp_file_limit = '{QUERY_TEMP_FILE_LIMIT}' as a superuser)"
            );
        }
    }
    Ok(())
}

/// Whether a statement failed for naming a column the table no longer has
/// (or not yet): a stream's layout changed under the statement.
pub fn is_layout_change(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else {
        return false;
    };
    match db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        Some(pg) => pg.code() == "42703",
        None => {
            let message = db.message();
            message.contains("has no column named") || message.contains("no such column")
        }
    }
}

/// True for errors worth retrying as they are (lock contention, lost
/// connections, SQLite's heap limit); false for errors in the statement or
/// data themselves.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => match db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        {
            // Serialization failure, deadlock, lock timeout, shutdown,
            // connection and insufficient-resources classes.
            Some(pg) => {
                let code = pg.code();
                matches!(
                    code,
                    "40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03"
                ) || code.starts_with("08")
                    || code.starts_with("53")
            }
            // SQLite: the primary result code is the low byte of the
            // extended one. BUSY, LOCKED, NOMEM, IOERR, FULL. NOMEM is the
            // heap limit (`sqlite_limits`) met while queries hold memory:
            // it passes when they finish or fail.
            None => {
                let code = db.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(0);
                matches!(code & 0xff, 5 | 6 | 7 | 10 | 13)
            }
        },
        _ => false,
    }
}
