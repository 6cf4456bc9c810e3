//! The session store: where persistent sessions, their queued messages and
//! retained messages are kept so that they survive a restart.
//!
//! The router submits operations in the order they happen and gets a
//! [`Commit`] for each; an implementation applies them in that order (so a
//! message's settlement never overtakes its insertion) and resolves the
//! commit once the operation is durable. Nothing is acknowledged to a
//! publisher before the commit of what its message queued.

pub mod jetstream;
pub mod sql;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::session::{Message, Properties, Session, SubOptions};

/// Resolves when the operation is durable (or failed to be).
pub type Commit = Pin<Box<dyn Future<Output = Result<(), CommitError>> + Send>>;

/// Why a [`Commit`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitError {
    /// The store refused a message because a subscribed session's queue
    /// there is full (a cluster's shared queue): it was not queued.
    QueueFull,
    /// The store could not make the operation durable.
    Failed(String),
}

impl std::fmt::Display for CommitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommitError::QueueFull => f.write_str("a subscribed session's queue is full"),
            CommitError::Failed(reason) => f.write_str(reason),
        }
    }
}

pub fn committed() -> Commit {
    Box::pin(std::future::ready(Ok(())))
}

/// A persistent session's own record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub client_id: String,
    pub expiry_secs: u32,
    pub subscriptions: Vec<(String, SubOptions)>,
    /// Set while no connection has the session.
    pub detached_at_ms: Option<i64>,
}

/// One queued message of one session.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub client_id: Arc<str>,
    pub seq: u64,
    pub qos: u8,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    pub message: Arc<Message>,
}

pub enum StoreOp {
    PutSession(SessionRecord),
    DropSession(String),
    Enqueue(Vec<StoredMessage>),
    /// The message left the queue: delivered, expired or discarded.
    Settled(Arc<str>, u64),
    /// Retains a message on its topic, or clears the topic.
    Retain(String, Option<Arc<Message>>),
}

/// What a store held at start-up.
#[derive(Default)]
pub struct Snapshot {
    pub sessions: Vec<SessionRecord>,
    /// Ordered by session, then sequence.
    pub queued: Vec<StoredMessage>,
    pub retained: Vec<Arc<Message>>,
}

pub trait SessionStore: Send + Sync {
    fn load(&self) -> Pin<Box<dyn Future<Output = Result<Snapshot, String>> + Send + '_>>;
    fn submit(&self, op: StoreOp) -> Commit;

    /// Whether persistent sessions' queues live in the store, shared by
    /// the brokers of a cluster, rather than in the router. Then the
    /// router hands such messages to the store ([`StoreOp::Enqueue`]) and
    /// queues none itself, and the store feeds a session ([`Session::feed`])
    /// while a connection of this broker has it.
    fn feeds_sessions(&self) -> bool {
        false
    }

    /// `connection` attached the persistent `session` here: feed it.
    fn attached(&self, _session: &Arc<Session>, _connection: u64) {}

    /// `connection` let go of `session`: stop feeding it, and give what it
    /// had not delivered back to the store for the next connection.
    fn detached(&self, _session: &Arc<Session>, _connection: u64) {}
}

/// Keeps nothing: sessions live as long as the process.
pub struct MemoryStore;

impl SessionStore for MemoryStore {
    fn load(&self) -> Pin<Box<dyn Future<Output = Result<Snapshot, String>> + Send + '_>> {
        Box::pin(async { Ok(Snapshot::default()) })
    }

    fn submit(&self, _op: StoreOp) -> Commit {
        committed()
    }
}

/// A message's fields other than topic and payload, as stored.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StoredMeta {
    pub qos: u8,
    #[serde(default)]
    pub retain: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<Properties>,
    /// Of the queued copy: its delivery QoS, retain flag and subscription ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<(u8, bool, Vec<u32>)>,
}

impl StoredMeta {
    pub fn of(message: &Message, delivery: Option<(u8, bool, Vec<u32>)>) -> StoredMeta {
        StoredMeta {
            qos: message.qos,
            retain: message.retain,
            expires_at_ms: message.expires_at_ms,
            publisher: message.publisher.as_deref().map(str::to_string),
            properties: message.properties.as_deref().cloned(),
            delivery,
        }
    }

    pub fn message(&self, topic: &str, payload: Vec<u8>) -> Message {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            qos: self.qos,
            retain: self.retain,
            properties: self.properties.clone().map(Arc::new),
            expires_at_ms: self.expires_at_ms,
            publisher: self.publisher.as_deref().map(Into::into),
            durable: true,
        }
    }
}
