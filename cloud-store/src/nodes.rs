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

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
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
    with_pool!(db, pool => {
        sqlx::query(
            "INSERT INTO fleetgate_nodes (id, addr, secret, heartbeat_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET addr = excluded.addr, secret = excluded.secret, \
             heartbeat_at = excluded.heartbeat_at",
        )
        .bind(&node.id)
        .bind(&node.addr)
        .bind(&node.secret)
        .bind(now_ms())
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
    let since = now_ms() - HEARTBEAT_TIMEOUT_MS;
    with_pool!(db, pool => {
        sqlx::query("SELECT id, addr, secret FROM fleetgate_nodes WHERE heartbeat_at >= $1 ORDER BY id")
            .bind(since)
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
