//! The hand-off from whatever received records (MQTT, HTTP) to the store.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::Principal;

/// One publish as it arrived, before any decoding.
#[derive(Debug, Clone)]
pub struct IngestMessage {
    /// Who sent it (already authenticated).
    pub principal: Principal,
    pub stream: String,
    /// The device the records belong to (from the topic).
    pub device_id: String,
    /// The payload, or its first bytes when it was larger than the limit.
    pub payload: Bytes,
    /// Set when the payload was larger than the limit: its full size. The
    /// receiver discarded the rest without buffering it.
    pub truncated_from: Option<usize>,
    pub received_at_ms: i64,
    /// The cluster state version the message was routed under. A store
    /// node processes it under exactly that version or refuses it; `None`
    /// (one process, no balancer) means the version in force at
    /// `received_at_ms`.
    pub state_version: Option<u64>,
}

/// What became of a message once it is committed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IngestOutcome {
    /// Valid records committed; re-sends of an already stored key count
    /// here too (they are counted apart only in aggregate, by the
    /// `fleetgate_records_duplicate` metric).
    pub stored: u32,
    /// Records (or whole payloads) written to the rejects table.
    pub rejected: u32,
    /// The first reject reason, for MQTT 5 reason strings and HTTP replies.
    pub first_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum IngestError {
    #[error("the store is shutting down")]
    ShuttingDown,
    #[error("the store could not commit: {0}")]
    Unavailable(String),
    /// The message was routed under a state version this node does not
    /// hold (it was not, or no longer is, active or previous here).
    #[error("state version {stamped} is not held here (active: {active})")]
    StateVersion { stamped: u64, active: u64 },
}

/// Resolves once the message and its rejects are durably committed.
pub type PendingCommit = oneshot::Receiver<Result<IngestOutcome, IngestError>>;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The store's front door. `submit` resolves when the store has taken the
/// message into its commit queue; waiting there is the back-pressure that
/// stops a gatekeeper from reading more from its publishers. The returned
/// `PendingCommit` resolves after the commit.
pub trait IngestService: Send + Sync {
    fn submit(&self, message: IngestMessage) -> BoxFuture<'_, Result<PendingCommit, IngestError>>;
}

/// Where committed records are re-published for `live/#` subscribers. Live
/// delivery is a best-effort tail; the tables are the record of truth.
pub trait LiveSink: Send + Sync {
    /// False while nobody could receive a live message, to skip the work.
    fn wanted(&self) -> bool;
    fn publish(&self, topic: String, payload: Bytes);
}
