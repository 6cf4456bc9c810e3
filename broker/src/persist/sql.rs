//! The session store on the platform's database (SQLite for `up`,
//! PostgreSQL otherwise): three tables, written by one task that applies
//! operations in submission order, grouping whatever queued meanwhile into
//! one transaction.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use fleetgate_store::db::Backend;
use fleetgate_store::{with_pool, Db};
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

use super::{
    Commit, CommitError, SessionRecord, SessionStore, Snapshot, StoreOp, StoredMessage, StoredMeta,
};
use crate::session::SubOptions;

/// Operations grouped into one transaction, at most.
const MAX_BATCH: usize = 512;

pub struct SqlStore {
    db: Db,
    ops: mpsc::UnboundedSender<(StoreOp, Option<Waiter>)>,
}

impl SqlStore {
    pub async fn open(db: Db) -> Result<Arc<SqlStore>, String> {
        let blob = match db.backend() {
            Backend::Sqlite => "BLOB",
            Backend::Postgres => "BYTEA",
        };
        db.execute_ddl(&[
            "CREATE TABLE IF NOT EXISTS fleetgate_mqtt_sessions (client_id TEXT PRIMARY KEY, \
             expiry_secs BIGINT NOT NULL, subscriptions TEXT NOT NULL, detached_at_ms BIGINT)"
                .to_string(),
            format!(
                "CREATE TABLE IF NOT EXISTS fleetgate_mqtt_queue (client_id TEXT NOT NULL, \
                 seq BIGINT NOT NULL, topic TEXT NOT NULL, payload {blob} NOT NULL, \
                 meta TEXT NOT NULL, PRIMARY KEY (client_id, seq))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS fleetgate_mqtt_retained (topic TEXT PRIMARY KEY, \
                 payload {blob} NOT NULL, meta TEXT NOT NULL)"
            ),
        ])
        .await
        .map_err(|e| format!("cannot create the MQTT session tables: {e}"))?;
        let (ops, queue) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(db.clone(), queue));
        Ok(Arc::new(SqlStore { db, ops }))
    }
}

impl SessionStore for SqlStore {
    fn load(&self) -> Pin<Box<dyn Future<Output = Result<Snapshot, String>> + Send + '_>> {
        Box::pin(async move {
            load(&self.db)
                .await
                .map_err(|e| format!("cannot read MQTT sessions: {e}"))
        })
    }

    fn submit(&self, op: StoreOp) -> Commit {
        let stopped = || CommitError::Failed("session store stopped".to_string());
        let (done, committed) = oneshot::channel();
        if self.ops.send((op, Some(done))).is_err() {
            return Box::pin(std::future::ready(Err(stopped())));
        }
        Box::pin(async move {
            committed
                .await
                .map_err(|_| stopped())?
                .map_err(CommitError::Failed)
        })
    }
}

async fn load(db: &Db) -> Result<Snapshot, sqlx::Error> {
    let mut snapshot = Snapshot::default();
    with_pool!(db, pool => {
        let rows = sqlx::query(
            "SELECT client_id, expiry_secs, subscriptions, detached_at_ms FROM fleetgate_mqtt_sessions",
        )
        .fetch_all(pool)
        .await?;
        for row in rows {
            let subscriptions: String = row.get(2);
            let subscriptions: Vec<(String, SubOptions)> =
                serde_json::from_str(&subscriptions).unwrap_or_default();
            snapshot.sessions.push(SessionRecord {
                client_id: row.get(0),
                expiry_secs: row.get::<i64, _>(1).clamp(0, u32::MAX as i64) as u32,
                subscriptions,
                detached_at_ms: row.get(3),
            });
        }
        let rows = sqlx::query(
            "SELECT client_id, seq, topic, payload, meta FROM fleetgate_mqtt_queue ORDER BY client_id, seq",
        )
        .fetch_all(pool)
        .await?;
        for row in rows {
            let Ok(meta) = serde_json::from_str::<StoredMeta>(row.get::<&str, _>(4)) else {
                continue;
            };
            let (qos, retain, subscription_ids) = meta.delivery.clone().unwrap_or((meta.qos, false, vec![]));
            let client_id: String = row.get(0);
            snapshot.queued.push(StoredMessage {
                client_id: client_id.into(),
                seq: row.get::<i64, _>(1) as u64,
                qos,
                retain,
                subscription_ids,
                message: Arc::new(meta.message(row.get(2), row.get(3))),
            });
        }
        let rows = sqlx::query("SELECT topic, payload, meta FROM fleetgate_mqtt_retained")
            .fetch_all(pool)
            .await?;
        for row in rows {
            if let Ok(meta) = serde_json::from_str::<StoredMeta>(row.get::<&str, _>(2)) {
                snapshot.retained.push(Arc::new(meta.message(row.get(0), row.get(1))));
            }
        }
        Ok::<_, sqlx::Error>(())
    })?;
    Ok(snapshot)
}

type Waiter = oneshot::Sender<Result<(), String>>;

async fn write_loop(db: Db, mut queue: mpsc::UnboundedReceiver<(StoreOp, Option<Waiter>)>) {
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (ops, waiters): (Vec<StoreOp>, Vec<Option<Waiter>>) = batch.drain(..).unzip();
        // A failed transaction is retried op by op once: one bad op (say,
        // a payload the database refuses) must not fail the others.
        let result = match apply(&db, &ops).await {
            Ok(()) => vec![Ok(()); ops.len()],
            Err(e) if ops.len() == 1 => vec![Err(e.to_string())],
            Err(_) => {
                let mut results = Vec::with_capacity(ops.len());
                for op in &ops {
                    results.push(
                        apply(&db, std::slice::from_ref(op))
                            .await
                            .map_err(|e| e.to_string()),
                    );
                }
                results
            }
        };
        for (waiter, result) in waiters.into_iter().zip(result) {
            if let Err(e) = &result {
                tracing::error!(error = %e, "MQTT session store write failed");
            }
            if let Some(waiter) = waiter {
                let _ = waiter.send(result);
            }
        }
    }
}

async fn apply(db: &Db, ops: &[StoreOp]) -> Result<(), sqlx::Error> {
    with_pool!(db, pool => {
        let mut tx = pool.begin().await?;
        for op in ops {
            match op {
                StoreOp::PutSession(record) => {
                    let subscriptions = serde_json::to_string(&record.subscriptions).expect("serializable");
                    sqlx::query(
                        "INSERT INTO fleetgate_mqtt_sessions (client_id, expiry_secs, subscriptions, detached_at_ms) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (client_id) DO UPDATE SET \
                         expiry_secs = excluded.expiry_secs, subscriptions = excluded.subscriptions, \
                         detached_at_ms = excluded.detached_at_ms",
                    )
                    .bind(&record.client_id)
                    .bind(record.expiry_secs as i64)
                    .bind(subscriptions)
                    .bind(record.detached_at_ms)
                    .execute(&mut *tx)
                    .await?;
                }
                StoreOp::DropSession(client_id) => {
                    sqlx::query("DELETE FROM fleetgate_mqtt_sessions WHERE client_id = $1")
                        .bind(client_id)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("DELETE FROM fleetgate_mqtt_queue WHERE client_id = $1")
                        .bind(client_id)
                        .execute(&mut *tx)
                        .await?;
                }
                StoreOp::Enqueue(messages) => {
                    for m in messages {
                        let meta = StoredMeta::of(&m.message, Some((m.qos, m.retain, m.subscription_ids.clone())));
                        sqlx::query(
                            "INSERT INTO fleetgate_mqtt_queue (client_id, seq, topic, payload, meta) \
                             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (client_id, seq) DO NOTHING",
                        )
                        .bind(&*m.client_id)
                        .bind(m.seq as i64)
                        .bind(&*m.message.topic)
                        .bind(m.message.payload.as_ref())
                        .bind(serde_json::to_string(&meta).expect("serializable"))
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                StoreOp::Settled(client_id, seq) => {
                    sqlx::query("DELETE FROM fleetgate_mqtt_queue WHERE client_id = $1 AND seq = $2")
                        .bind(&**client_id)
                        .bind(*seq as i64)
                        .execute(&mut *tx)
                        .await?;
                }
                StoreOp::Retain(topic, Some(message)) => {
                    let meta = StoredMeta::of(message, None);
                    sqlx::query(
                        "INSERT INTO fleetgate_mqtt_retained (topic, payload, meta) VALUES ($1, $2, $3) \
                         ON CONFLICT (topic) DO UPDATE SET payload = excluded.payload, meta = excluded.meta",
                    )
                    .bind(topic)
                    .bind(message.payload.as_ref())
                    .bind(serde_json::to_string(&meta).expect("serializable"))
                    .execute(&mut *tx)
                    .await?;
                }
                StoreOp::Retain(topic, None) => {
                    sqlx::query("DELETE FROM fleetgate_mqtt_retained WHERE topic = $1")
                        .bind(topic)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        tx.commit().await
    })
}
