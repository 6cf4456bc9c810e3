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
    /// Valid records newly stored by this message.
    pub stored: u32,
    /// Valid records that were not stored because a record with the same
    /// key already was (a re-send, or the same key twice in one message).
    /// They are neither stored again nor re-published on `live/`.
    #[serde(default)]
    pub duplicates: u32,
    /// Records (or whole payloads) written to the rejects table.
    pub rejected: u32,
    /// The first reject reason, for MQTT 5 reason strings and HTTP replies.
    pub first_reason: Option<String>,
    /// Set when the sender may not write this stream at all (its role, or
    /// its device type is not among the stream's `writers`). Nothing of the
    /// message was stored, not even as rejects: a refusal is not data, and
    /// transports answer it as a denied publish (MQTT 5 PUBACK 0x87, 3.1.1
    /// disconnect, HTTP 403) and count it against the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
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
