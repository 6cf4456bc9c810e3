//! Cluster membership: each store node keeps a row in `fleetgate_nodes`
//! with its address, a secret the gatekeeper must present, and a heartbeat.

use sqlx::Row;

// Heartbeats are written and judged by one clock, the database's, whatever
// the skew between the machines.
use crate::state::database_now_sql;
use crate::{with_pool, Db};

/// A node without a heartbeat for this long is out of rotation.
pub const HEARTBEAT_TIMEOUT_MS: i64 = 3_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub id: String,
    pub addr: String,
    pub secret: String,
    /// The state version the node has confirmed.
    pub state_version: u64,
}

pub async fn ddl(db: &Db) -> Result<(), String> {
    db.execute_ddl(&[
        "CREATE TABLE IF NOT EXISTS fleetgate_nodes (id TEXT PRIMARY KEY, addr TEXT NOT NULL, \
         secret TEXT NOT NULL, heartbeat_at BIGINT NOT NULL, state_version BIGINT NOT NULL DEFAULT 0, \
         reboot_reason TEXT)"
            .to_string(),
    ])
    .await
    .map_err(|e| format!("cannot create the node table: {e}"))
}

/// Announces or refreshes a node. Returns the reason of a reboot someone
/// asked of it, if any; a new secret (a new process, or a reboot done)
/// clears it.
pub async fn heartbeat(db: &Db, node: &NodeRow) -> Result<Option<String>, String> {
    let sql = format!(
        "INSERT INTO fleetgate_nodes (id, addr, secret, heartbeat_at, state_version) VALUES ($1, $2, $3, {}, $4) \
         ON CONFLICT (id) DO UPDATE SET addr = excluded.addr, secret = excluded.secret, \
         heartbeat_at = excluded.heartbeat_at, state_version = excluded.state_version, \
         reboot_reason = CASE WHEN fleetgate_nodes.secret = excluded.secret \
         THEN fleetgate_nodes.reboot_reason END \
         RETURNING reboot_reason",
        database_now_sql(db)
    );
    with_pool!(db, pool => {
        sqlx::query_scalar(&sql)
        .bind(&node.id)
        .bind(&node.addr)
        .bind(&node.secret)
        .bind(node.state_version as i64)
        .fetch_one(pool)
        .await
    })
    .map_err(|e| format!("node heartbeat failed: {e}"))
}

/// Asks a node to reboot: it sees this at its next heartbeat.
pub async fn request_reboot(db: &Db, id: &str, reason: &str) -> Result<(), String> {
    with_pool!(db, pool => {
        sqlx::query("UPDATE fleetgate_nodes SET reboot_reason = $2 WHERE id = $1")
            .bind(id)
            .bind(reason)
            .execute(pool)
            .await
            .map(|_| ())
    })
    .map_err(|e| format!("cannot ask node {id} to reboot: {e}"))
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
        "SELECT id, addr, secret, state_version FROM fleetgate_nodes WHERE heartbeat_at >= {} - $1 ORDER BY id",
        database_now_sql(db)
    );
    with_pool!(db, pool => {
        sqlx::query(&sql)
            .bind(HEARTBEAT_TIMEOUT_MS)
            .fetch_all(pool)
            .await
            .map(|rows| {
                rows.iter()
                    .map(|r| NodeRow {
                        id: r.get(0),
                        addr: r.get(1),
                        secret: r.get(2),
                        state_version: r.get::<i64, _>(3) as u64,
                    })
                    .collect()
            })
    })
    .map_err(|e| format!("cannot read the node table: {e}"))
}
