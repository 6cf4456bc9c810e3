//! Cluster membership: each store node keeps a row in `fleetgate_nodes`
//! with its address, a secret the gatekeeper must present, and a heartbeat.

use sqlx::Row;

use crate::{with_pool, Db};

/// A node without a heartbeat for this long is out of rotation.
pub const HEARTBEAT_TIMEOUT_MS: i64 = 3_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub id: String,
    pub addr: String,
    pub secret: String,
}

/// The database's clock, in Unix milliseconds: heartbeats are written and
/// judged by one clock, whatever the skew between the machines.
fn database_now_ms(db: &Db) -> &'static str {
    match db.backend() {
        crate::db::Backend::Postgres => "(extract(epoch from clock_timestamp()) * 1000)::bigint",
        crate::db::Backend::Sqlite => "CAST(unixepoch('subsec') * 1000 AS INTEGER)",
    }
}

pub async fn ddl(db: &Db) -> Result<(), String> {
    db.execute_ddl(&[
        "CREATE TABLE IF NOT EXISTS fleetgate_nodes (id TEXT PRIMARY KEY, addr TEXT NOT NULL, \
         secret TEXT NOT NULL, heartbeat_at BIGINT NOT NULL)"
            .to_string(),
    ])
    .await
    .map_err(|e| format!("cannot create the node table: {e}"))
}

/// Announces or refreshes a node.
pub async fn heartbeat(db: &Db, node: &NodeRow) -> Result<(), String> {
    let sql = format!(
        "INSERT INTO fleetgate_nodes (id, addr, secret, heartbeat_at) VALUES ($1, $2, $3, {}) \
         ON CONFLICT (id) DO UPDATE SET addr = excluded.addr, secret = excluded.secret, \
         heartbeat_at = excluded.heartbeat_at",
        database_now_ms(db)
    );
    with_pool!(db, pool => {
        sqlx::query(&sql)
        .bind(&node.id)
        .bind(&node.addr)
        .bind(&node.secret)
        .execute(pool)
        .await
        .map(|_| ())
    })
    .map_err(|e| format!("node heartbeat failed: {e}"))
}

/// Takes a node out at once (a clean shutdown).
pub async fn remove(db: &Db, id: &str) -> Result<(), String> {
    with_pool!(db, pool => {
        sqlx::query("DELETE FROM fleetgate_nodes WHERE id = $1")
            .bind(id)
            .execute(pool)
            .await
            .map(|_| ())
    })
    .map_err(|e| e.to_string())
}

/// Nodes whose heartbeat is recent.
pub async fn live(db: &Db) -> Result<Vec<NodeRow>, String> {
    let sql = format!(
        "SELECT id, addr, secret FROM fleetgate_nodes WHERE heartbeat_at >= {} - $1 ORDER BY id",
        database_now_ms(db)
    );
    with_pool!(db, pool => {
        sqlx::query(&sql)
            .bind(HEARTBEAT_TIMEOUT_MS)
            .fetch_all(pool)
            .await
            .map(|rows| {
                rows.iter()
                    .map(|r| NodeRow { id: r.get(0), addr: r.get(1), secret: r.get(2) })
                    .collect()
            })
    })
    .map_err(|e| format!("cannot read the node table: {e}"))
}
