//! The audit log: every admin action, who did it, to what, and when.

use fleetgate_store::{with_pool, Db};
use serde::Serialize;
use serde_json::Value;
use sqlx::Row;

#[derive(Clone)]
pub struct AuditLog {
    db: Db,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    /// Unix milliseconds.
    pub at: i64,
    /// The device id of the admin who acted.
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: Value,
}

impl AuditLog {
    pub async fn open(db: Db) -> Result<AuditLog, String> {
        db.execute_ddl(&[format!(
            "CREATE TABLE IF NOT EXISTS fleetgate_audit ({}, at BIGINT NOT NULL, actor TEXT NOT NULL, \
             action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL)",
            db.auto_id_column("id")
        )])
        .await
        .map_err(|e| format!("cannot create the audit log: {e}"))?;
        Ok(AuditLog { db })
    }

    /// Appends one entry. An action is reported as done only once its entry
    /// is written, so the log has no gaps.
    pub async fn record(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: Value,
    ) -> Result<(), String> {
        let at = crate::unix_now_ms();
        with_pool!(self.db, pool => {
            sqlx::query("INSERT INTO fleetgate_audit (at, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5)")
                .bind(at)
                .bind(actor)
                .bind(action)
                .bind(target)
                .bind(detail.to_string())
                .execute(pool)
                .await
                .map(|_| ())
        })
        .map_err(|e| format!("cannot write the audit log: {e}"))
    }

    /// Newest first; `before` pages back by id.
    pub async fn list(&self, limit: i64, before: Option<i64>) -> Result<Vec<AuditEntry>, String> {
        with_pool!(self.db, pool => {
            sqlx::query(
                "SELECT id, at, actor, action, target, detail FROM fleetgate_audit WHERE id < $1 ORDER BY id DESC LIMIT $2",
            )
            .bind(before.unwrap_or(i64::MAX))
            .bind(limit)
            .fetch_all(pool)
            .await
            .map(|rows| {
                rows.iter()
                    .map(|r| AuditEntry {
                        id: r.get(0),
                        at: r.get(1),
                        actor: r.get(2),
                        action: r.get(3),
                        target: r.get(4),
                        detail: serde_json::from_str(r.get::<&str, _>(5)).unwrap_or(Value::Null),
                    })
                    .collect()
            })
        })
        .map_err(|e| format!("cannot read the audit log: {e}"))
    }
}
