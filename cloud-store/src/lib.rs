//! fleetgate's cloud store: validates and enriches records, keeps them in
//! primary tables with group commit, and answers read-only queries.
//!
//! - [`db`]: the SQLite / PostgreSQL handle; [`sqlite_functions`]: the SQL
//!   functions it adds to SQLite (chunk compression).
//! - [`bulk`]: multi-row INSERT chunking and binding.
//! - [`catalog`]: stream declarations and their tables.
//! - [`pipeline`]: the synchronous ingest stages.
//! - [`writer`]: the store stage (group commit, back-pressure) — [`Store`].
//! - [`query`]: the read-only query guard and runner.
//! - [`rejects`]: refused records.
//! - [`nodes`]: cluster membership (store nodes and their heartbeats).
//! - [`state`]: versioned cluster state (rules, lookup tables) and its
//!   time-fenced activation.
//! - [`views`]: declared aggregate views, maintained in the database, and
//!   the query routing that answers from them.
//! - [`tiers`]: retention (hot and compressed cold tiers, ttl).
//! - [`buckets`]: time-bucketed streams, and swapping out the periods a
//!   batch supersedes.
//! - [`compaction`]: folding unused fields into `extra`, and back.
//! - [`expand`]: queries read tiered and compacted streams as declared.

pub mod buckets;
pub mod bulk;
pub mod catalog;
pub mod compaction;
pub mod db;
pub mod expand;
pub mod metrics;
pub mod nodes;
pub mod pipeline;
pub mod query;
pub mod rejects;
pub mod row_stream;
pub mod sql_expr;
pub mod sqlite_functions;
pub mod sqlite_limits;
pub mod sqlite_query;
pub mod state;
pub mod tiers;
pub mod timestamp_sql;
pub mod values;
pub mod views;
pub mod writer;

pub use catalog::Catalog;
pub use db::Db;
pub use writer::{Store, WriterConfig};

/// Creates the store's own tables (idempotent) and loads the stream catalog.
pub async fn open_catalog(db: &Db) -> Result<Catalog, String> {
    db.execute_ddl(&rejects::ddl(db))
        .await
        .map_err(|e| format!("cannot create the rejects table: {e}"))?;
    state::ddl(db).await?;
    Catalog::load(db.clone()).await
}
