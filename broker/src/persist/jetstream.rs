//! The session store of a cluster, on NATS JetStream: what lets a device
//! resume its session on whichever broker it reaches, and a broker started
//! later know every retained message.
//!
//! Names start with the cluster's ([`ClusterName`], `fleetgate` here):
//!
//! - KV bucket `fleetgate-sessions`: one record per persistent session
//!   (subscriptions, expiry, when it was detached, and the broker that
//!   wrote it). Every broker watches it, so each knows the cluster's
//!   persistent subscriptions ([`Router::apply_remote_session`]).
//! - KV bucket `fleetgate-brokers`: each live broker's heartbeat, every
//!   [`HEARTBEAT`], kept for [`BROKER_TTL`]. A session record still
//!   attached to a broker whose heartbeat is gone (killed, or cut off) is
//!   marked detached by the brokers that notice, so the session expires as
//!   if its device had left when its broker stopped.
//! - KV bucket `fleetgate-retained`: one entry per retained topic, watched
//!   by every broker ([`Router::apply_remote_retained`]).
//! - Stream `FLEETGATE_QUEUES` (work queue), subject
//!   `fleetgate-queue.<session>`: a persistent session's undelivered QoS
//!   1/2 messages. The broker a message is published through writes it
//!   there for every persistent session it matches, and acknowledges the
//!   publisher once JetStream has it. A shared subscription with a
//!   persistent member is picked for by that broker too, so the message is
//!   queued before the publisher is acknowledged; the queue groups pick
//!   only for groups of connected, non-persistent sessions, which no store
//!   queues for. The broker the device is connected to
//!   reads the subject with the session's durable consumer and acknowledges
//!   each message to JetStream when the device has acknowledged it.
//!
//! So persistent sessions are fed only from JetStream in a cluster: the
//! router hands their messages here instead of queueing them
//! ([`SessionStore::feeds_sessions`]). A session's queue is bounded by
//! JetStream itself (messages per subject, discarding new ones), and a
//! publish to a full queue is not acknowledged.
//!
//! Delivery is at least once across brokers: a message in flight when its
//! broker dies is sent again, with a new packet id, by the broker the
//! device reaches next, once JetStream's ack wait has passed.
//!
//! NATS 2.9 leaves a push consumer inactive after a failed push while its
//! deliver subject has a subscriber (nats-server pull request 6807 fixed
//! it in a later release): a device that moved between brokers as a
//! message was pushed to the one it left would get nothing more. The
//! broker that subscribes checks the consumer a few times after it did
//! ([`STALL_CHECKS`]) and subscribes again if it is not bound, which
//! wakes it.
//!
//! [`Router::apply_remote_session`]: crate::router::Router::apply_remote_session
//! [`Router::apply_remote_retained`]: crate::router::Router::apply_remote_retained

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{push, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::kv::{self, Operation};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::{HeaderMap, Subject};
use base64::Engine;
use bytes::Bytes;
use fleetgate_protocol::unix_now_ms;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    Commit, CommitError, SessionRecord, SessionStore, Snapshot, StoreOp, StoredMessage, StoredMeta,
};
use crate::cluster::ClusterName;
use crate::router::Router;
use crate::session::{Message, QueueLimits, Queued, Session, SubOptions};

const QUEUED_HEADER: &str = "Fg-Queued";

/// What one cluster's store is called in JetStream (see the module docs).
struct Names {
    sessions: String,
    retained: String,
    brokers: String,
    queues: String,
    /// `<cluster>-queue.`: outside `<cluster>.>`, which the brokers' core
    /// fabric subscribes to.
    queue_prefix: String,
    /// Where a session's consumer pushes, and the queue group that receives.
    deliver_prefix: String,
    deliver_group: String,
}

impl Names {
    fn of(cluster: &ClusterName) -> Names {
        Names {
            sessions: cluster.bucket("sessions"),
            retained: cluster.bucket("retained"),
            brokers: cluster.bucket("brokers"),
            queues: cluster.stream("QUEUES"),
            queue_prefix: cluster.bucket("queue."),
            deliver_prefix: cluster.bucket("deliver."),
            deliver_group: cluster.as_str().to_string(),
        }
    }

    fn queue_subject(&self, client_id: &str) -> String {
        format!("{}{}", self.queue_prefix, session_token(client_id))
    }
}

/// How often a broker says it is up, and how long that lasts: a broker
/// silent for seven heartbeats is taken for gone. Generous, because a
/// broker wrongly taken for gone has its sessions' expiry start while
/// its devices are still on it (until it writes them back), and a
/// loaded machine can starve a heartbeat for seconds.
const HEARTBEAT: Duration = Duration::from_secs(2);
const BROKER_TTL: Duration = Duration::from_secs(15);

/// How long a message sent to a device may stay unacknowledged before
/// JetStream offers it again (to the same broker, which ignores it while
/// the device still has it, or to the broker the device moved to).
const ACK_WAIT: Duration = Duration::from_secs(10);

/// When, after subscribing to a session's queue, a broker checks that the
/// consumer pushes to it ([`Inner::stalled`]): the moments after a device
/// moved between brokers are when a push can fail.
const STALL_CHECKS: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(4),
    Duration::from_secs(10),
];

/// Sleeps until `at`, or forever if there is no `at`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Longest a broker waits, at start-up, for JetStream to answer.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a broker waits, at start-up, to read the buckets.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// What the store needs to be told at start-up.
pub struct JetStreamSettings {
    /// Copies JetStream keeps of each bucket and queue (1 to 5, and at most
    /// the NATS cluster's size).
    pub replicas: usize,
    /// Messages per session queue (JetStream refuses more).
    pub limits: QueueLimits,
    /// Longest a session may be kept: queued messages older than this go.
    pub max_session_expiry: Duration,
    /// Whose buckets and queues these are.
    pub cluster: ClusterName,
}

pub struct JetStreamStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// This broker, as its session records name it.
    broker: String,
    names: Names,
    client: async_nats::Client,
    queues: stream::Stream,
    sessions: kv::Store,
    retained: kv::Store,
    brokers: kv::Store,
    /// The broker each session record attached elsewhere names, by KV key:
    /// what to mark detached if that broker's heartbeat stops.
    held_elsewhere: Mutex<HashMap<String, String>>,
    ops: mpsc::UnboundedSender<(StoreOp, oneshot::Sender<Sent>)>,
    limits: QueueLimits,
    /// Per session attached here: the task feeding it, and the ack subjects
    /// of the messages it holds, by stream sequence.
    feeds: Mutex<HashMap<Arc<str>, Feed>>,
    /// KV keys seen, back to what they name (a deleted key carries no value).
    session_keys: Mutex<HashMap<String, Arc<str>>>,
    retained_keys: Mutex<HashMap<String, String>>,
    loaded: Mutex<Option<Loaded>>,
}

#[derive(Default)]
struct Feed {
    /// The connection the session is attached to, and its feeding task.
    attached: Option<(u64, CancellationToken)>,
    replies: HashMap<u64, Subject>,
}

/// The watches that read the buckets at start-up, continued by `follow`.
struct Loaded {
    sessions: kv::Watch,
    retained: kv::Watch,
}

/// What the writer did with one operation: the acknowledgements to wait for.
type Sent = Result<Vec<PublishAckFuture>, String>;

/// A session record as the bucket holds it.
#[derive(Serialize, Deserialize)]
struct StoredSession {
    broker: String,
    client_id: String,
    expiry_secs: u32,
    subscriptions: Vec<(String, SubOptions)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detached_at_ms: Option<i64>,
    /// Another broker marked it detached because `broker` stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    released_by: Option<String>,
}

/// What travels beside a queued or retained message's payload.
#[derive(Serialize, Deserialize)]
struct Envelope {
    topic: String,
    meta: StoredMeta,
}

impl JetStreamStore {
    /// Creates (or finds) the buckets and the queue stream, and reads the
    /// buckets. `client` is the broker's NATS connection.
    pub async fn open(
        client: async_nats::Client,
        settings: JetStreamSettings,
    ) -> Result<JetStreamStore, String> {
        let js = async_nats::jetstream::new(client.clone());
        // A NATS cluster that has just started elects its JetStream leader
        // within seconds; until then requests time out.
        let deadline = tokio::time::Instant::now() + SETUP_TIMEOUT;
        let names = Names::of(&settings.cluster);
        let (sessions, retained, brokers, queues) = loop {
            match set_up(&js, &names, &settings).await {
                Ok(parts) => break parts,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "JetStream not ready; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let (ops, queue) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            broker: crate::router::nats::broker_id(),
            names,
            client,
            queues,
            sessions,
            retained,
            brokers,
            held_elsewhere: Mutex::default(),
            ops,
            limits: settings.limits,
            feeds: Mutex::default(),
            session_keys: Mutex::default(),
            retained_keys: Mutex::default(),
            loaded: Mutex::default(),
        });
        // Up before it writes any session record, so none of its records
        // ever looks held by a stopped broker.
        inner.beat().await?;
        tokio::spawn(write_loop(Arc::downgrade(&inner), js, queue));
        tokio::spawn(heartbeat(Arc::downgrade(&inner)));
        Ok(JetStreamStore { inner })
    }

    /// Takes in what other brokers write to the buckets from now on: their
    /// session records and retained messages go to `router`.
    pub fn follow(&self, router: Arc<Router>) {
        let Some(loaded) = self.inner.loaded.lock().expect("loaded lock").take() else {
            tracing::error!("the session store was followed before it was loaded");
            return;
        };
        let inner = self.inner.clone();
        let to = router.clone();
        tokio::spawn(async move {
            let mut watch = loaded.sessions;
            while let Some(entry) = watch.next().await {
                match entry {
                    Ok(entry) => inner.session_changed(&to, entry),
                    Err(e) => tracing::warn!(error = %e, "watching the cluster's sessions"),
                }
            }
            tracing::error!("the cluster's session records are no longer followed");
        });
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut watch = loaded.retained;
            while let Some(entry) = watch.next().await {
                match entry {
                    Ok(entry) => inner.retained_changed(&router, entry),
                    Err(e) => tracing::warn!(error = %e, "watching retained messages"),
                }
            }
            tracing::error!("the cluster's retained messages are no longer followed");
        });
    }
}

impl Inner {
    fn session_changed(&self, router: &Router, entry: kv::Entry) {
        match entry.operation {
            Operation::Put => match self.decode_session(&entry) {
                // This broker's own writes: its sessions are as it left them.
                Some(stored) if stored.broker == self.broker && stored.released_by.is_none() => {}
                // Released while this broker is up (its heartbeats did not
                // get through): if the device is still here, the router
                // writes the record again as attached.
                Some(stored) => router.apply_remote_session(record_of(stored)),
                None => tracing::warn!(key = %entry.key, "ignored a malformed session record"),
            },
            Operation::Delete | Operation::Purge => {
                self.held_elsewhere
                    .lock()
                    .expect("held lock")
                    .remove(&entry.key);
                let client = self
                    .session_keys
                    .lock()
                    .expect("keys lock")
                    .remove(&entry.key);
                if let Some(client) = client {
                    router.drop_remote_session(&client);
                }
            }
        }
    }

    fn decode_session(&self, entry: &kv::Entry) -> Option<StoredSession> {
        let stored: StoredSession = serde_json::from_slice(&entry.value).ok()?;
        self.session_keys
            .lock()
            .expect("keys lock")
            .insert(entry.key.clone(), stored.client_id.as_str().into());
        let mut held = self.held_elsewhere.lock().expect("held lock");
        if stored.broker != self.broker && stored.detached_at_ms.is_none() {
            held.insert(entry.key.clone(), stored.broker.clone());
        } else {
            held.remove(&entry.key);
        }
        Some(stored)
    }

    /// Says this broker is up, for [`BROKER_TTL`].
    async fn beat(&self) -> Result<(), String> {
        self.brokers
            .put(kv_key(&self.broker), self.broker.clone().into())
            .await
            .map(|_| ())
            .map_err(|e| format!("cannot write this broker's heartbeat to JetStream: {e}"))
    }

    /// Marks detached, as of now, each session record still attached to a
    /// broker whose heartbeat has stopped. A record written again meanwhile
    /// (its device came back, or another broker released it first) is left
    /// alone: the write is conditional on the revision it was read at.
    async fn release_sessions_of_stopped_brokers(&self) {
        let brokers: std::collections::HashSet<String> = self
            .held_elsewhere
            .lock()
            .expect("held lock")
            .values()
            .cloned()
            .collect();
        let mut stopped = std::collections::HashSet::new();
        for broker in brokers {
            match self.brokers.get(kv_key(&broker)).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    stopped.insert(broker);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the brokers' heartbeats");
                    return;
                }
            }
        }
        if stopped.is_empty() {
            return;
        }
        let keys: Vec<String> = self
            .held_elsewhere
            .lock()
            .expect("held lock")
            .iter()
            .filter(|(_, broker)| stopped.contains(*broker))
            .map(|(key, _)| key.clone())
            .collect();
        for key in keys {
            let Ok(Some(entry)) = self.sessions.entry(&key).await else {
                continue;
            };
            let Ok(mut stored) = serde_json::from_slice::<StoredSession>(&entry.value) else {
                continue;
            };
            if !stopped.contains(&stored.broker) || stored.detached_at_ms.is_some() {
                continue;
            }
            stored.detached_at_ms = Some(unix_now_ms());
            stored.released_by = Some(self.broker.clone());
            let value = serde_json::to_vec(&stored).expect("a session record serializes");
            if self
                .sessions
                .update(&key, value.into(), entry.revision)
                .await
                .is_ok()
            {
                tracing::info!(
                    client = %stored.client_id,
                    broker = %stored.broker,
                    "the broker holding a session stopped: the session is detached from now on"
                );
            }
        }
    }

    fn retained_changed(&self, router: &Router, entry: kv::Entry) {
        match entry.operation {
            Operation::Put => match self.decode_retained(&entry) {
                Some(message) => {
                    router.apply_remote_retained(message.topic.to_string(), Some(Arc::new(message)))
                }
                None => tracing::warn!(key = %entry.key, "ignored a malformed retained message"),
            },
            Operation::Delete | Operation::Purge => {
                let topic = self
                    .retained_keys
                    .lock()
                    .expect("keys lock")
                    .remove(&entry.key);
                if let Some(topic) = topic {
                    router.apply_remote_retained(topic, None);
                }
            }
        }
    }

    fn decode_retained(&self, entry: &kv::Entry) -> Option<Message> {
        let (envelope, payload) = split_value(&entry.value)?;
        self.retained_keys
            .lock()
            .expect("keys lock")
            .insert(entry.key.clone(), envelope.topic.clone());
        Some(envelope.meta.message(&envelope.topic, payload.to_vec()))
    }

    /// Reads both buckets to their current end.
    async fn load(&self) -> Result<Snapshot, String> {
        let mut snapshot = Snapshot::default();
        let (watch, entries) = read_bucket(&self.sessions).await?;
        for entry in entries {
            if let Some(stored) = self.decode_session(&entry) {
                snapshot.sessions.push(record_of(stored));
            }
        }
        let sessions = watch;
        let (watch, entries) = read_bucket(&self.retained).await?;
        for entry in entries {
            if let Some(message) = self.decode_retained(&entry) {
                snapshot.retained.push(Arc::new(message));
            }
        }
        *self.loaded.lock().expect("loaded lock") = Some(Loaded {
            sessions,
            retained: watch,
        });
        Ok(snapshot)
    }

    /// Feeds `session` from its queue while `connection` has it.
    ///
    /// The session's durable consumer pushes to a subject of its own, in a
    /// queue group: whichever broker has the device subscribes to it. A
    /// push consumer delivers only while someone is subscribed, so nothing
    /// is sent to a broker that let go (a pull request, by contrast, would
    /// outlive its broker's interest and swallow messages until the ack
    /// wait passed).
    async fn feed(
        self: Arc<Self>,
        session: Arc<Session>,
        connection: u64,
        stop: CancellationToken,
    ) {
        let token = session_token(&session.client_id);
        let deliver = format!("{}{token}", self.names.deliver_prefix);
        let config = push::Config {
            durable_name: Some(format!("s{token}")),
            deliver_subject: deliver.clone(),
            deliver_group: Some(self.names.deliver_group.clone()),
            filter_subject: self.names.queue_subject(&session.client_id),
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            deliver_policy: DeliverPolicy::All,
            max_ack_pending: self.limits.max_messages as i64,
            ..Default::default()
        };
        loop {
            let subscribed = async {
                let subscriber = self
                    .client
                    .queue_subscribe(deliver.clone(), self.names.deliver_group.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                self.queues
                    .get_or_create_consumer(&format!("s{token}"), config.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(subscriber)
            };
            let mut subscriber = tokio::select! {
                _ = stop.cancelled() => return,
                subscribed = subscribed => match subscribed {
                    Ok(subscriber) => subscriber,
                    Err(e) => {
                        tracing::warn!(client = %session.client_id, error = %e, "cannot read the session's queue; trying again");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                },
            };
            let subscribed_at = tokio::time::Instant::now();
            let mut checks = STALL_CHECKS.iter();
            let mut next_check = checks.next().map(|after| subscribed_at + *after);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => {
                        self.give_back(subscriber).await;
                        return;
                    }
                    next = subscriber.next() => match next {
                        Some(message) => self.take(&session, connection, message),
                        None => break,
                    },
                    _ = sleep_until(next_check) => {
                        next_check = checks.next().map(|after| subscribed_at + *after);
                        if self.stalled(&token).await {
                            tracing::warn!(
                                client = %session.client_id,
                                "the session's JetStream consumer stopped pushing to this broker; subscribing again"
                            );
                            self.give_back(subscriber).await;
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Lets go of a session's queue: what arrived but was not taken goes
    /// back at once. A drain, not an unsubscribe: the subscription stays
    /// open until the server confirms it is gone, so what the server pushed
    /// meanwhile is received and given back too, instead of being dropped
    /// and held from the device's next broker for the whole ack wait.
    async fn give_back(&self, mut subscriber: async_nats::Subscriber) {
        let _ = subscriber.drain().await;
        let give_back = async {
            while let Some(message) = subscriber.next().await {
                if let Some(reply) = message.reply {
                    self.reply(reply, b"-NAK");
                }
            }
        };
        // Bounded: a lost connection never confirms.
        let _ = tokio::time::timeout(ACK_WAIT, give_back).await;
    }

    /// Whether the session's consumer says nobody receives its pushes
    /// although this broker subscribes. NATS 2.9 marks a push consumer
    /// inactive when a delivery fails (the previous broker's subscription
    /// closing as a message was on its way) and, while the deliver subject
    /// still has a subscriber, never makes it active again: only a change
    /// of interest does, which subscribing again makes.
    async fn stalled(&self, token: &str) -> bool {
        match self.queues.consumer_info(format!("s{token}")).await {
            Ok(info) => !info.push_bound,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read a session's consumer");
                false
            }
        }
    }

    /// One message from a session's queue, into the session.
    fn take(&self, session: &Session, connection: u64, message: async_nats::Message) {
        let Some(reply) = message.reply.clone() else {
            return;
        };
        let Some(seq) = stream_sequence(&reply) else {
            tracing::debug!(%reply, "not an ack subject");
            return;
        };
        tracing::debug!(client = %session.client_id, seq, "fed");
        let decoded = message
            .headers
            .as_ref()
            .and_then(|h| h.get(QUEUED_HEADER))
            .and_then(|h| serde_json::from_str::<Envelope>(h.as_str()).ok());
        let Some(envelope) = decoded else {
            tracing::warn!(client = %session.client_id, seq, "dropped a malformed queued message");
            self.reply(reply, b"+ACK");
            return;
        };
        let routed = envelope
            .meta
            .message(&envelope.topic, message.payload.to_vec());
        if routed.expired(unix_now_ms()) {
            self.reply(reply, b"+ACK");
            return;
        }
        let (qos, retain, subscription_ids) =
            envelope
                .meta
                .delivery
                .clone()
                .unwrap_or((routed.qos, false, Vec::new()));
        self.feeds
            .lock()
            .expect("feeds lock")
            .entry(session.client_id.clone())
            .or_default()
            .replies
            .insert(seq, reply.clone());
        let fed = session.feed(
            connection,
            Queued {
                seq,
                message: Arc::new(routed),
                qos,
                retain,
                subscription_ids,
                durable: true,
            },
        );
        if !fed {
            // The connection is gone: the next one (here or elsewhere) gets it.
            self.reply(reply, b"-NAK");
        }
    }

    fn reply(&self, subject: Subject, answer: &'static [u8]) {
        let client = self.client.clone();
        tokio::spawn(async move {
            let _ = client.publish(subject, Bytes::from_static(answer)).await;
        });
    }

    fn settled(&self, client_id: &str, seq: u64) {
        tracing::debug!(client = client_id, seq, "settled");
        let reply = self
            .feeds
            .lock()
            .expect("feeds lock")
            .get_mut(client_id)
            .and_then(|f| f.replies.remove(&seq));
        if let Some(reply) = reply {
            self.reply(reply, b"+ACK");
        }
    }
}

impl SessionStore for JetStreamStore {
    fn load(&self) -> Pin<Box<dyn Future<Output = Result<Snapshot, String>> + Send + '_>> {
        Box::pin(self.inner.load())
    }

    fn submit(&self, op: StoreOp) -> Commit {
        if let StoreOp::Settled(client_id, seq) = &op {
            // Only an acknowledgement to JetStream, which may be lost
            // harmlessly (the message comes again and is sent again).
            self.inner.settled(client_id, *seq);
            return super::committed();
        }
        let stopped = || CommitError::Failed("session store stopped".to_string());
        let (done, sent) = oneshot::channel();
        if self.inner.ops.send((op, done)).is_err() {
            return Box::pin(std::future::ready(Err(stopped())));
        }
        Box::pin(async move {
            let acks = sent
                .await
                .map_err(|_| stopped())?
                .map_err(CommitError::Failed)?;
            for ack in acks {
                ack.await.map_err(|e| {
                    // What NATS answers when `discard_new_per_subject`
                    // refuses: its generic "store failed" error (10077),
                    // which only its description tells apart.
                    if e.to_string().contains("maximum messages per subject") {
                        CommitError::QueueFull
                    } else {
                        CommitError::Failed(format!("JetStream did not store it: {e}"))
                    }
                })?;
            }
            Ok(())
        })
    }

    fn feeds_sessions(&self) -> bool {
        true
    }

    fn attached(&self, session: &Arc<Session>, connection: u64) {
        let stop = CancellationToken::new();
        let previous = self
            .inner
            .feeds
            .lock()
            .expect("feeds lock")
            .entry(session.client_id.clone())
            .or_default()
            .attached
            .replace((connection, stop.clone()));
        if let Some((_, old)) = previous {
            old.cancel();
        }
        tokio::spawn(self.inner.clone().feed(session.clone(), connection, stop));
    }

    fn detached(&self, session: &Arc<Session>, connection: u64) {
        let mut feeds = self.inner.feeds.lock().expect("feeds lock");
        let Some(feed) = feeds.get_mut(&session.client_id) else {
            return;
        };
        if feed
            .attached
            .as_ref()
            .is_some_and(|(c, _)| *c == connection)
        {
            if let Some((_, stop)) = feed.attached.take() {
                stop.cancel();
            }
            // Offered again at once, to whichever broker the device reaches
            // next; the subjects stay known, so an acknowledgement of a
            // message this broker sends again still settles it.
            for reply in feed.replies.values() {
                self.inner.reply(reply.clone(), b"-NAK");
            }
        }
    }
}

/// Says this broker is up every [`HEARTBEAT`], and releases the sessions
/// of brokers that stopped saying so.
async fn heartbeat(inner: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if let Err(e) = inner.beat().await {
            tracing::warn!("{e}");
        }
        inner.release_sessions_of_stopped_brokers().await;
    }
}

/// Applies operations in submission order: JetStream publishes (including
/// the buckets' puts and deletes, which are publishes too) are sent in
/// order and their acknowledgements awaited by whoever waits on the commit.
async fn write_loop(
    inner: std::sync::Weak<Inner>,
    js: async_nats::jetstream::Context,
    mut ops: mpsc::UnboundedReceiver<(StoreOp, oneshot::Sender<Sent>)>,
) {
    while let Some((op, done)) = ops.recv().await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let sent = write(&inner, &js, op).await;
        let _ = done.send(sent);
    }
}

async fn write(inner: &Inner, js: &async_nats::jetstream::Context, op: StoreOp) -> Sent {
    let publish = |subject: String, headers: HeaderMap, payload: Bytes| async move {
        js.publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| format!("cannot write to JetStream: {e}"))
    };
    match op {
        StoreOp::PutSession(record) => {
            let stored = StoredSession {
                broker: inner.broker.clone(),
                client_id: record.client_id.clone(),
                expiry_secs: record.expiry_secs,
                subscriptions: record.subscriptions,
                detached_at_ms: record.detached_at_ms,
                released_by: None,
            };
            let value = serde_json::to_vec(&stored).expect("a session record serializes");
            let subject = format!("$KV.{}.{}", inner.names.sessions, kv_key(&record.client_id));
            Ok(vec![
                publish(subject, HeaderMap::new(), value.into()).await?,
            ])
        }
        StoreOp::DropSession(client_id) => {
            let subject = format!("$KV.{}.{}", inner.names.sessions, kv_key(&client_id));
            let ack = publish(subject, purge_headers(), Bytes::new()).await?;
            // Its queue and consumer go before anything is written for a
            // new session of the same client.
            let token = session_token(&client_id);
            let _ = inner.queues.delete_consumer(&format!("s{token}")).await;
            let _ = inner
                .queues
                .purge()
                .filter(inner.names.queue_subject(&client_id))
                .await;
            let mut feeds = inner.feeds.lock().expect("feeds lock");
            if let Some(feed) = feeds.get_mut(client_id.as_str()) {
                feed.replies.clear();
                // A new session of the client may already be attached.
                if feed.attached.is_none() {
                    feeds.remove(client_id.as_str());
                }
            }
            Ok(vec![ack])
        }
        StoreOp::Enqueue(messages) => {
            let mut acks = Vec::with_capacity(messages.len());
            for stored in messages {
                let (subject, headers, payload) = queued(&inner.names, &stored);
                acks.push(publish(subject, headers, payload).await?);
            }
            Ok(acks)
        }
        StoreOp::Settled(..) => Ok(Vec::new()),
        StoreOp::Retain(topic, message) => {
            let subject = format!("$KV.{}.{}", inner.names.retained, kv_key(&topic));
            let ack = match message {
                Some(message) => {
                    let envelope = Envelope {
                        topic,
                        meta: StoredMeta::of(&message, None),
                    };
                    publish(
                        subject,
                        HeaderMap::new(),
                        join_value(&envelope, &message.payload),
                    )
                    .await?
                }
                None => publish(subject, purge_headers(), Bytes::new()).await?,
            };
            Ok(vec![ack])
        }
    }
}

/// The subject, headers and payload of one message queued for one session.
fn queued(names: &Names, stored: &StoredMessage) -> (String, HeaderMap, Bytes) {
    let envelope = Envelope {
        topic: stored.message.topic.to_string(),
        meta: StoredMeta::of(
            &stored.message,
            Some((stored.qos, stored.retain, stored.subscription_ids.clone())),
        ),
    };
    let mut headers = HeaderMap::new();
    // Compact JSON escapes every control character: one header line.
    headers.insert(
        QUEUED_HEADER,
        serde_json::to_string(&envelope).expect("an envelope serializes"),
    );
    (
        names.queue_subject(&stored.client_id),
        headers,
        stored.message.payload.clone(),
    )
}

/// The stream sequence in a JetStream ack subject:
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`,
/// or with a domain and account hash before the stream (12 tokens or more).
fn stream_sequence(reply: &str) -> Option<u64> {
    let tokens: Vec<&str> = reply.split('.').collect();
    let at = match tokens.len() {
        9 => 5,
        n if n >= 12 => 7,
        _ => return None,
    };
    (tokens[0] == "$JS" && tokens[1] == "ACK")
        .then(|| tokens[at].parse().ok())
        .flatten()
}

/// A KV purge: the key's earlier values go too.
fn purge_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("KV-Operation", "PURGE");
    headers.insert("Nats-Rollup", "sub");
    headers
}

/// A retained value: the envelope's length (4 bytes, big-endian), the
/// envelope as JSON, then the payload.
fn join_value(envelope: &Envelope, payload: &[u8]) -> Bytes {
    let json = serde_json::to_vec(envelope).expect("an envelope serializes");
    let mut value = Vec::with_capacity(4 + json.len() + payload.len());
    value.extend_from_slice(&(json.len() as u32).to_be_bytes());
    value.extend_from_slice(&json);
    value.extend_from_slice(payload);
    value.into()
}

fn split_value(value: &[u8]) -> Option<(Envelope, &[u8])> {
    let len = u32::from_be_bytes(value.get(..4)?.try_into().ok()?) as usize;
    let json = value.get(4..4 + len)?;
    Some((serde_json::from_slice(json).ok()?, &value[4 + len..]))
}

/// A KV key for any text: as it is where KV allows it, base64url when
/// short, a hash otherwise (the value holds the text itself). The prefixes
/// keep the three forms apart.
fn kv_key(text: &str) -> String {
    let plain = !text.is_empty()
        && text.len() <= 200
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        format!("p_{text}")
    } else if text.len() <= 600 {
        format!(
            "b_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
        )
    } else {
        format!("h_{}", session_token(text))
    }
}

/// One subject token per session (and its consumer's name): a hash, since
/// client ids may hold anything.
fn session_token(client_id: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, client_id.as_bytes());
    digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn record_of(stored: StoredSession) -> SessionRecord {
    SessionRecord {
        client_id: stored.client_id,
        expiry_secs: stored.expiry_secs,
        subscriptions: stored.subscriptions,
        detached_at_ms: stored.detached_at_ms,
    }
}

/// The buckets and the queue stream, found or created.
async fn set_up(
    js: &async_nats::jetstream::Context,
    names: &Names,
    settings: &JetStreamSettings,
) -> Result<(kv::Store, kv::Store, kv::Store, stream::Stream), String> {
    let sessions = bucket(js, &names.sessions, settings.replicas, Duration::ZERO)
        .await
        .map_err(|e| jetstream_error("the session bucket", e))?;
    let retained = bucket(js, &names.retained, settings.replicas, Duration::ZERO)
        .await
        .map_err(|e| jetstream_error("the retained-message bucket", e))?;
    let brokers = bucket(js, &names.brokers, settings.replicas, BROKER_TTL)
        .await
        .map_err(|e| jetstream_error("the broker heartbeat bucket", e))?;
    let queues = js
        .get_or_create_stream(stream::Config {
            name: names.queues.clone(),
            subjects: vec![format!("{}*", names.queue_prefix)],
            retention: RetentionPolicy::WorkQueue,
            max_messages_per_subject: settings.limits.max_messages as i64,
            discard: DiscardPolicy::New,
            discard_new_per_subject: true,
            max_age: settings.max_session_expiry,
            num_replicas: settings.replicas,
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| jetstream_error("the session queue stream", e))?;
    Ok((sessions, retained, brokers, queues))
}

/// Finds or creates a KV bucket that keeps each key's latest value (for
/// `max_age`, if not zero). Made as a stream (what a bucket is) because
/// async-nats's own bucket creation first reads account fields that NATS
/// 2.9 does not send.
async fn bucket(
    js: &async_nats::jetstream::Context,
    name: &str,
    replicas: usize,
    max_age: Duration,
) -> Result<kv::Store, String> {
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: DiscardPolicy::New,
        num_replicas: replicas,
        storage: StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    js.get_key_value(name).await.map_err(|e| e.to_string())
}

/// Every key's latest entry, and the watch that goes on from there.
async fn read_bucket(store: &kv::Store) -> Result<(kv::Watch, Vec<kv::Entry>), String> {
    let holds = store
        .status()
        .await
        .map_err(|e| format!("cannot read a JetStream bucket: {e}"))?
        .values();
    let mut watch = store
        .watch_with_history(">")
        .await
        .map_err(|e| format!("cannot watch a JetStream bucket: {e}"))?;
    let mut entries = Vec::new();
    if holds == 0 {
        return Ok((watch, entries));
    }
    let deadline = tokio::time::Instant::now() + LOAD_TIMEOUT;
    loop {
        let entry = tokio::time::timeout_at(deadline, watch.next())
            .await
            .map_err(|_| "timed out reading a JetStream bucket".to_string())?
            .ok_or("a JetStream bucket's watch ended")?
            .map_err(|e| format!("cannot read a JetStream bucket: {e}"))?;
        let current = entry.delta == 0;
        if entry.operation == Operation::Put {
            entries.push(entry);
        }
        if current {
            return Ok((watch, entries));
        }
    }
}

fn jetstream_error(what: &str, e: impl std::fmt::Display) -> String {
    format!("cannot set up {what} in JetStream (is JetStream enabled on the NATS servers, with enough of them for the replicas?): {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_kv_keys_and_distinct() {
        let texts = [
            "dev-1",
            "a/b/c",
            "with space",
            "ünï",
            "p_x",
            &"x".repeat(700),
        ];
        let keys: Vec<String> = texts.iter().map(|t| kv_key(t)).collect();
        for key in &keys {
            assert!(key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_=/".contains(&b)));
        }
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len());
    }

    #[test]
    fn the_stream_sequence_is_read_from_ack_subjects() {
        assert_eq!(
            stream_sequence("$JS.ACK.FLEETGATE_QUEUES.s1.1.42.7.1700000000.0"),
            Some(42)
        );
        assert_eq!(
            stream_sequence("$JS.ACK.dom.hash.FLEETGATE_QUEUES.s1.1.43.7.1700000000.0.tok"),
            Some(43)
        );
        assert_eq!(stream_sequence("_INBOX.abc"), None);
    }

    #[test]
    fn a_retained_value_comes_back_as_written() {
        let envelope = Envelope {
            topic: "a/b".into(),
            meta: StoredMeta {
                qos: 1,
                retain: true,
                expires_at_ms: Some(5),
                publisher: Some("p".into()),
                properties: None,
                delivery: None,
            },
        };
        let value = join_value(&envelope, b"\x00payload\n");
        let (back, payload) = split_value(&value).unwrap();
        assert_eq!(back.topic, "a/b");
        assert_eq!(back.meta.expires_at_ms, Some(5));
        assert_eq!(payload, b"\x00payload\n");
        assert!(split_value(&value[..3]).is_none());
    }
}
