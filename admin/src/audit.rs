//! The audit log: every admin action, who did it, to what, when, and how
//! it ended.
//!
//! An action writes its entry *before* it takes effect, with the outcome
//! `pending`; if that write fails, the action is not performed, so nothing
//! an admin changes goes unrecorded. Once the action has run, the entry is
//! finished with its outcome: `done`, `refused` (the platform said no, and
//! nothing changed; with the reason) or `failed` (the server's own error;
//! with the reason). An entry still `pending` means the server stopped
//! before the action finished; `interrupted`, that the request was
//! cancelled (its client went away) while the action ran. Either may or may
//! not have taken effect. Refusals before an action's own checks pass
//! (wrong role, unknown device, malformed request) write no entry: they
//! change nothing, and the refusal ledger (`/v1/refusals`) counts them.

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
    /// `pending`, `done`, `refused`, `failed` or `interrupted`; `unrecorded`
    /// for entries written before outcomes were kept.
    pub outcome: String,
    /// Why it was refused or failed.
    pub reason: Option<String>,
}

/// How an audited action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Refused by the platform's checks or the store (a 4xx): nothing changed.
    Refused(String),
    /// The server's own error (a 5xx).
    Failed(String),
    /// Cancelled while it ran (its request was dropped).
    Interrupted,
}

impl Outcome {
    fn parts(&self) -> (&'static str, Option<&str>) {
        match self {
            Outcome::Done => ("done", None),
            Outcome::Refused(reason) => ("refused", Some(reason)),
            Outcome::Failed(reason) => ("failed", Some(reason)),
            Outcome::Interrupted => (
                "interrupted",
                Some("the request was cancelled while the action ran; it may or may not have taken effect"),
            ),
        }
    }
}

pub const PENDING: &str = "pending";

impl AuditLog {
    pub async fn open(db: Db) -> Result<AuditLog, String> {
        db.execute_ddl(&[format!(
            "CREATE TABLE IF NOT EXISTS fleetgate_audit ({}, at BIGINT NOT NULL, actor TEXT NOT NULL, \
             action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL, outcome TEXT, reason TEXT)",
            db.auto_id_column("id")
        )])
        .await
        .map_err(|e| format!("cannot create the audit log: {e}"))?;
        add_outcome_columns(&db).await?;
        Ok(AuditLog { db })
    }

    /// Writes an entry for an action about to be performed, as `pending`,
    /// and returns its id for [`AuditLog::finish`]. The caller performs the
    /// action only if this succeeds, so the log has no gaps.
    pub async fn begin(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: Value,
    ) -> Result<i64, String> {
        let at = crate::unix_now_ms();
        with_pool!(self.db, pool => {
            sqlx::query_scalar(
                "INSERT INTO fleetgate_audit (at, actor, action, target, detail, outcome) \
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            )
            .bind(at)
            .bind(actor)
            .bind(action)
            .bind(target)
            .bind(detail.to_string())
            .bind(PENDING)
            .fetch_one(pool)
            .await
        })
        .map_err(|e| format!("cannot write the audit log: {e}"))
    }

    /// Records how the action of entry `id` ended. Only a pending entry
    /// changes: an outcome, once written, is final.
    pub async fn finish(&self, id: i64, outcome: &Outcome) -> Result<(), String> {
        let (outcome, reason) = outcome.parts();
        with_pool!(self.db, pool => {
            sqlx::query("UPDATE fleetgate_audit SET outcome = $1, reason = $2 WHERE id = $3 AND outcome = $4")
                .bind(outcome)
                .bind(reason)
                .bind(id)
                .bind(PENDING)
                .execute(pool)
                .await
                .map(|_| ())
        })
        .map_err(|e| format!("cannot finish audit entry {id}: {e}"))
    }

    /// Newest first; `before` pages back by id.
    pub async fn list(&self, limit: i64, before: Option<i64>) -> Result<Vec<AuditEntry>, String> {
        with_pool!(self.db, pool => {
            sqlx::query(
                "SELECT id, at, actor, action, target, detail, outcome, reason FROM fleetgate_audit \
                 WHERE id < $1 ORDER BY id DESC LIMIT $2",
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
                        outcome: r
                            .get::<Option<String>, _>(6)
                            .unwrap_or_else(|| "unrecorded".to_string()),
                        reason: r.get(7),
                    })
                    .collect()
            })
        })
        .map_err(|e| format!("cannot read the audit log: {e}"))
    }
}

/// Audit logs written before outcomes were kept lack the two columns;
/// their entries read as `unrecorded`.
async fn add_outcome_columns(db: &Db) -> Result<(), String> {
    let has_columns = with_pool!(db, pool => {
        sqlx::query("SELECT outcome, reason FROM fleetgate_audit LIMIT 1")
            .fetch_all(pool)
            .await
            .map(|_| ())
    });
    if has_columns.is_ok() {
        return Ok(());
    }
    // IF NOT EXISTS (PostgreSQL): brokers sharing a database may start
    // together. SQLite has one process per database.
    let if_not_exists = match db.backend() {
        fleetgate_store::db::Backend::Postgres => "IF NOT EXISTS ",
        fleetgate_store::db::Backend::Sqlite => "",
    };
    db.execute_ddl(&[
        format!("ALTER TABLE fleetgate_audit ADD COLUMN {if_not_exists}outcome TEXT"),
        format!("ALTER TABLE fleetgate_audit ADD COLUMN {if_not_exists}reason TEXT"),
    ])
    .await
    .map_err(|e| format!("cannot add outcomes to the audit log: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn entries_are_pending_until_finished_and_outcomes_are_final() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(None, &dir.path().join("t.db")).await.unwrap();
        let log = AuditLog::open(db).await.unwrap();
        let done = log
            .begin("admin", "device.add", "s1", json!({}))
            .await
            .unwrap();
        let refused = log
            .begin("admin", "stream.apply", "streams", json!({}))
            .await
            .unwrap();
        let pending = log
            .begin("admin", "device.revoke", "s1", json!({}))
            .await
            .unwrap();
        log.finish(done, &Outcome::Done).await.unwrap();
        log.finish(refused, &Outcome::Refused("type change".into()))
            .await
            .unwrap();
        // A second outcome does not overwrite the first.
        log.finish(done, &Outcome::Failed("late".into()))
            .await
            .unwrap();
        let entries = log.list(10, None).await.unwrap();
        let outcome = |id: i64| {
            let e = entries.iter().find(|e| e.id == id).unwrap();
            (e.outcome.clone(), e.reason.clone())
        };
        assert_eq!(outcome(done), ("done".into(), None));
        assert_eq!(
            outcome(refused),
            ("refused".into(), Some("type change".into()))
        );
        assert_eq!(outcome(pending), ("pending".into(), None));
    }

    #[tokio::test]
    async fn a_log_from_before_outcomes_gains_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(None, &dir.path().join("t.db")).await.unwrap();
        db.execute_ddl(&[
            "CREATE TABLE fleetgate_audit (id INTEGER PRIMARY KEY, at BIGINT NOT NULL, actor TEXT NOT NULL, \
             action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL)"
                .to_string(),
            "INSERT INTO fleetgate_audit (at, actor, action, target, detail) VALUES (1, 'admin', 'device.add', 's1', '{}')"
                .to_string(),
        ])
        .await
        .unwrap();
        let log = AuditLog::open(db).await.unwrap();
        let id = log
            .begin("admin", "device.revoke", "s1", json!({}))
            .await
            .unwrap();
        log.finish(id, &Outcome::Done).await.unwrap();
        let outcomes: Vec<String> = log
            .list(10, None)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.outcome)
            .collect();
        assert_eq!(outcomes, ["done", "unrecorded"]);
    }
}
