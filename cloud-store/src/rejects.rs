//! The rejects table: every record or payload the pipeline refused, with
//! the device, the raw payload and every reason.

use serde::Serialize;
use sqlx::Row;

use crate::db::Db;
use crate::with_pool;

pub(crate) fn ddl(db: &Db) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS fleetgate_rejects ({}, stream TEXT NOT NULL, device_id TEXT NOT NULL, \
             received_at BIGINT NOT NULL, payload TEXT NOT NULL, reasons TEXT NOT NULL)",
            db.auto_id_column("id")
        ),
        "CREATE INDEX IF NOT EXISTS fleetgate_rejects_stream ON fleetgate_rejects (stream, id)".to_string(),
    ]
}

#[derive(Debug, Clone, Serialize)]
pub struct RejectRow {
    pub id: i64,
    pub device_id: String,
    pub received_at: i64,
    pub payload: String,
    pub reasons: Vec<String>,
}

/// The newest rejects of `stream` first; `before` pages back by id.
pub async fn list(
    db: &Db,
    stream: &str,
    limit: i64,
    before: Option<i64>,
) -> Result<Vec<RejectRow>, String> {
    let rows = with_pool!(db, pool => {
        sqlx::query(
            "SELECT id, device_id, received_at, payload, reasons FROM fleetgate_rejects \
             WHERE stream = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
        )
        .bind(stream)
        .bind(before.unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(pool)
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| RejectRow {
                    id: r.get(0),
                    device_id: r.get(1),
                    received_at: r.get(2),
                    payload: r.get(3),
                    reasons: serde_json::from_str(r.get::<&str, _>(4)).unwrap_or_default(),
                })
                .collect::<Vec<_>>()
        })
    });
    rows.map_err(|e| format!("cannot read rejects: {e}"))
}
