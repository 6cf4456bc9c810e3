//! The cluster's [`Fabric`] over core NATS: brokers of one cluster hand
//! each other what is published through them, and say which devices
//! connected, so that subscribers, commands and takeovers work across
//! brokers.
//!
//! Subjects, under the cluster's name ([`ClusterName`], `fleetgate` unless
//! told otherwise):
//!
//! - `<cluster>.mqtt.<topic>`: one message, its topic mapped to subject
//!   tokens the way NATS's own MQTT gateway maps topics
//!   ([`topic_to_subject`]), so the traffic reads naturally in `nats sub`.
//! - `<cluster>.long`: a message whose mapped topic would not fit a NATS
//!   control line; its topic travels in the envelope instead.
//! - `<cluster>.claim`: a device id (the payload) that just connected to the
//!   sending broker; the others end its connections there.
//!
//! Every message carries the sending broker's id in the `Fg-Broker` header
//! (a broker ignores its own), and routed messages carry the rest of what
//! the router needs (QoS, retain, expiry as an absolute time, publisher,
//! MQTT 5 properties) as compact JSON in `Fg-Envelope`. The payload is the
//! MQTT payload, unchanged.
//!
//! # Interest
//!
//! A broker hears `<cluster>.claim` and `<cluster>.long`, and of
//! `<cluster>.mqtt.>` only what its sessions subscribe to: the plain
//! filters of the sessions it holds, mapped to subject patterns
//! ([`filter_to_subjects`]), one NATS subscription per pattern. NATS then
//! sends a message only to the brokers that want it, so a live feed read
//! on one broker does not cross to the others. A fleet's per-device
//! filters (`devices/<id>/cmd`) would be one subscription per device, so
//! beyond [`MAX_INTEREST_SUBJECTS`] the patterns are widened to their
//! first levels ([`Interest`]): routing drops what no session here
//! matches. Overlapping patterns must not bring a message twice, so
//! they are queue subscriptions in a queue group of the broker's own: NATS
//! hands each message to one member of a group. A new filter's SUBACK
//! waits until this broker's NATS server has its subscription; the
//! server's peers learn of it a moment later (NATS spreads interest
//! between servers by itself), and what another broker publishes before
//! that is not delivered here, as core NATS drops what nobody subscribes
//! to.
//!
//! Core NATS delivers at most once. A message published while the fabric is
//! down reaches only the publishing broker's own sessions; persistent
//! sessions and retained messages stay with the broker that holds them
//! (JetStream is where they would go).
//!
//! # Shared subscriptions
//!
//! An MQTT 5 shared subscription `$share/<group>/<filter>` gets each
//! message once, whichever brokers its members are on. Several brokers
//! may hear a message (any with a plain subscription to its topic), so
//! picking a member cannot be left to each: NATS queue groups pick
//! instead. A broker holding members of a
//! shared subscription (sessions of its own, connected or kept for their
//! absent device, subscribed to it) holds one queue subscription for it
//! (two for a filter ending in `/#`), on the subjects its topics go on
//! ([`filter_to_subjects`]), in a queue group
//! named after the cluster and a hash of the shared filter
//! ([`queue_group`]). NATS hands each message to one broker of the queue
//! group, which routes it to one of its own members only
//! ([`Router::publish_to_group`]); what arrives on the interest
//! subscriptions goes to plain subscriptions only. The publishing broker leaves shared
//! subscriptions alone and takes its share like the others, through a
//! second NATS connection: the first is `no_echo`, so the server would
//! never hand a broker its own messages.
//!
//! While a broker is cut off from NATS, it picks the members of the
//! groups it knows itself, among its own sessions and the cluster's
//! persistent ones, as a broker alone does. The envelope of such a message
//! says so (`chosen_by_sender`): once it reaches the others (async-nats
//! sends what waited for a reconnect), their queue subscriptions leave it.
//! Every group's queue subscription also listens on `<cluster>.long`:
//! NATS hands each of those messages to one broker per group, which routes
//! it to a member only if the group's filter matches the topic in the
//! envelope.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{Event, HeaderMap};
use bytes::Bytes;
use fleetgate_protocol::ingest::LiveSink;
use fleetgate_protocol::unix_now_ms;
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use super::index::split_shared;
use super::interest::Interest;
use super::{Fabric, Router, SharedChoice};
use crate::cluster::ClusterName;
use crate::persist::Commit;
use crate::session::{Message, Properties};
use crate::sessions::Claim;

/// The subjects of one cluster (see the module docs).
#[derive(Clone)]
struct Subjects {
    /// `<cluster>.mqtt.`, before a mapped topic.
    message: String,
    long: String,
    claim: String,
    /// `<cluster>-share-`, before a hash of a shared filter: a queue group.
    share: String,
    /// `<cluster>-broker-`, before a broker's id: the queue group of its
    /// interest subscriptions.
    interest: String,
}

impl Subjects {
    fn of(cluster: &ClusterName) -> Subjects {
        Subjects {
            message: cluster.subject("mqtt."),
            long: cluster.subject("long"),
            claim: cluster.subject("claim"),
            share: format!("{}-share-", cluster.as_str()),
            interest: format!("{}-broker-", cluster.as_str()),
        }
    }
}

const BROKER_HEADER: &str = "Fg-Broker";
const ENVELOPE_HEADER: &str = "Fg-Envelope";
/// On a claim: when the device's connection was registered (µs since the
/// epoch, the sending broker's clock), so that a broker ends only older
/// connections ([`Claim::ends`]).
const CONNECTED_AT_HEADER: &str = "Fg-Connected-At";

/// Longest subject a message is sent on. A NATS server closes a connection
/// whose protocol line exceeds its `max_control_line` (4 KiB by default),
/// which would cost every message in flight; longer topics go on
/// `<cluster>.long` instead.
pub(crate) const MAX_SUBJECT: usize = 1024;

/// Forwards waiting for the NATS connection, by count and by bytes: beyond
/// either, [`Fabric::forward`] drops (and counts) rather than block the
/// publisher or hold memory without bound. async-nats queues up to 2048
/// more itself.
const QUEUE_MESSAGES: usize = 8192;
const QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// A dead server (no TCP reset, e.g. a partition) is noticed after two
/// unanswered pings; the default minute is too long to forward into a void.
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// Drops are logged at most this often; the counter has every one.
const DROP_LOG_EVERY_MS: i64 = 10_000;

/// Longest a SUBACK waits for the NATS server to confirm the subscription
/// that brings its messages from other brokers (a server that does not
/// answer is being left: async-nats subscribes again on the next).
const SUBSCRIBED_WAIT: Duration = Duration::from_secs(5);

/// Most NATS subscriptions a broker holds for its interest. Each costs a
/// channel in async-nats and an entry in the server's subject index, so a
/// fleet whose every device subscribes to its own command topic must not
/// become one subscription per device: beyond this, [`Interest`] widens
/// them.
pub const MAX_INTEREST_SUBJECTS: usize = 256;

/// Maps an MQTT topic to NATS subject tokens, as NATS's MQTT gateway does
/// and reversibly ([`subject_to_topic`]): levels become tokens (`/` → `.`),
/// an empty level becomes the token `/`, and a `.` inside a level becomes
/// `//`. What a subject cannot hold but the gateway refuses (space and
/// other ASCII control characters, the wildcards `*` and `>`) is
/// percent-escaped, and so is `%` itself. Everything else, including
/// non-ASCII text, is kept as it is.
pub fn topic_to_subject(topic: &str) -> String {
    let mut subject = String::with_capacity(topic.len() + 8);
    for (i, level) in topic.split('/').enumerate() {
        if i > 0 {
            subject.push('.');
        }
        if level.is_empty() {
            subject.push('/');
            continue;
        }
        for c in level.chars() {
            if c == '.' {
                subject.push_str("//");
            } else if escaped(c) {
                subject.push_str(&format!("%{:02X}", c as u32));
            } else {
                subject.push(c);
            }
        }
    }
    subject
}

/// The topic [`topic_to_subject`] mapped to `subject`; `None` for anything
/// it would not have produced, so the mapping is one-to-one both ways.
pub fn subject_to_topic(subject: &str) -> Option<String> {
    let mut topic = String::with_capacity(subject.len());
    for (i, token) in subject.split('.').enumerate() {
        if i > 0 {
            topic.push('/');
        }
        if token == "/" {
            continue;
        }
        if token.is_empty() {
            return None;
        }
        let mut chars = token.chars();
        while let Some(c) = chars.next() {
            match c {
                '/' if chars.next() == Some('/') => topic.push('.'),
                '%' => {
                    let hex: String = chars.by_ref().take(2).collect();
                    // Uppercase hex only, and only what must be escaped.
                    let code = u8::from_str_radix(&hex, 16).ok()?;
                    let c = char::from(code);
                    if hex.len() != 2 || hex != format!("{code:02X}") || !escaped(c) {
                        return None;
                    }
                    topic.push(c);
                }
                c if c == '/' || escaped(c) => return None,
                c => topic.push(c),
            }
        }
    }
    Some(topic)
}

fn escaped(c: char) -> bool {
    matches!(c, ' ' | '*' | '>' | '%') || c.is_ascii_control()
}

/// The subject patterns that the topics an MQTT topic filter (without its
/// `$share/<group>/`) matches go on, mapped as [`topic_to_subject`] maps
/// them: `+` is `*`, a literal level the token its topics have, and `#`
/// is `>`, except that `a/#` also matches `a` itself (MQTT 4.7.1.2), which
/// `a.>` does not: it takes `a` and `a.>`.
///
/// Wider than MQTT in one way: a wildcard as first level does not match
/// `$` topics in MQTT (4.7.2), and does in NATS. The broker that receives
/// such a message finds none of its members' filters matching it, as every
/// broker would, so no member gets it either way.
pub fn filter_to_subjects(filter: &str) -> Vec<String> {
    let (levels, multi) = match filter.strip_suffix('#') {
        Some("") => return vec![">".to_string()],
        Some(rest) => match rest.strip_suffix('/') {
            Some(levels) => (levels, true),
            // Not a filter `check_filter` accepts; mapped as a topic.
            None => (filter, false),
        },
        None => (filter, false),
    };
    let tokens: Vec<String> = levels
        .split('/')
        .map(|level| match level {
            "+" => "*".to_string(),
            level => topic_to_subject(level),
        })
        .collect();
    let exact = tokens.join(".");
    if multi {
        let below = format!("{exact}.>");
        vec![exact, below]
    } else {
        vec![exact]
    }
}

/// The subjects of a shared subscription's queue subscription (`filter` is
/// `$share/<group>/<filter>`): those its topics go on, and `<cluster>.long`
/// for those too long for a subject. The group hears every message on
/// `.long`, and the broker NATS picks routes it to the group only if the
/// filter matches its topic.
fn group_subjects(subjects: &Subjects, filter: &str) -> Vec<String> {
    let (_, inner) = split_shared(filter);
    let patterns = filter_to_subjects(inner);
    // The first is the shortest, and no matching topic maps shorter: `*`
    // stands for one token of at least one character.
    let fits = subjects.message.len() + patterns[0].len() <= MAX_SUBJECT;
    let mut subjects_of_group: Vec<String> = patterns
        .into_iter()
        .filter(|_| fits)
        .map(|pattern| format!("{}{pattern}", subjects.message))
        .collect();
    subjects_of_group.push(subjects.long.clone());
    subjects_of_group
}

/// The queue group of the shared subscription `filter` (whole, with its
/// `$share/<group>/`): the group and the filter together name it, and a
/// hash keeps the name to the characters queue names allow. 128 bits, so
/// two groups never share one (they would share their messages too).
pub fn queue_group(cluster: &ClusterName, filter: &str) -> String {
    group_name(&Subjects::of(cluster), filter)
}

fn group_name(subjects: &Subjects, filter: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, filter.as_bytes());
    let hash: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{}{hash}", subjects.share)
}

/// What travels beside the payload. Fields at their default are left out.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Envelope<'a> {
    qos: u8,
    #[serde(default, skip_serializing_if = "is_false")]
    retain: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    durable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<i64>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    publisher: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    properties: Option<Cow<'a, Properties>>,
    /// Only on `<cluster>.long`.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    topic: Option<Cow<'a, str>>,
    /// The sending broker picked the members of the shared subscriptions
    /// the message matches (NATS was out of its reach when it was
    /// published): queue subscriptions leave it.
    #[serde(default, skip_serializing_if = "is_false")]
    chosen_by_sender: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The subject and headers `message` is sent with (its payload as it is),
/// and who picks the members of the shared subscriptions it matches: the
/// cluster's queue groups if they `may_pick` (the fabric is up, and the
/// router does not need to pick itself); else this broker.
fn encode(
    subjects: &Subjects,
    broker: &str,
    message: &Message,
    may_pick: bool,
) -> (String, HeaderMap, SharedChoice) {
    let mapped = topic_to_subject(&message.topic);
    let long = subjects.message.len() + mapped.len() > MAX_SUBJECT;
    let choice = if may_pick {
        SharedChoice::Fabric
    } else {
        SharedChoice::Here
    };
    let envelope = Envelope {
        qos: message.qos,
        retain: message.retain,
        durable: message.durable,
        expires_at_ms: message.expires_at_ms,
        publisher: message.publisher.as_deref().map(Cow::Borrowed),
        properties: message.properties.as_deref().map(Cow::Borrowed),
        topic: long.then(|| Cow::Borrowed(&*message.topic)),
        chosen_by_sender: choice == SharedChoice::Here,
    };
    let mut headers = HeaderMap::new();
    headers.insert(BROKER_HEADER, broker);
    // Compact JSON escapes every control character, so it is one header line.
    headers.insert(
        ENVELOPE_HEADER,
        serde_json::to_string(&envelope).expect("an envelope serializes"),
    );
    let subject = if long {
        subjects.long.clone()
    } else {
        format!("{}{mapped}", subjects.message)
    };
    (subject, headers, choice)
}

/// What another broker sent.
#[derive(Debug, PartialEq)]
enum Incoming {
    /// A message, and who picks its shared subscriptions' members.
    Message(Message, Picker),
    /// A device connected to the sending broker, at the time it says.
    Claim(String, Option<i64>),
}

/// Who picks the members of the shared subscriptions a message matches.
/// Never the brokers that hear it through their interest: they leave
/// shared subscriptions alone.
#[derive(Debug, PartialEq, Clone, Copy)]
enum Picker {
    /// The queue groups: a broker gets it through a queue subscription.
    QueueGroups,
    /// The broker that sent it, cut off from NATS when it was published.
    Sender,
}

fn decode(
    subjects: &Subjects,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: Bytes,
) -> Result<Incoming, String> {
    if subject == subjects.claim {
        let device = String::from_utf8(payload.to_vec())
            .map_err(|_| "a claim's client id is not UTF-8".to_string())?;
        let connected_at_us = match headers.and_then(|h| h.get(CONNECTED_AT_HEADER)) {
            Some(at) => Some(
                at.as_str()
                    .parse()
                    .map_err(|_| "a claim's connect time is not a number")?,
            ),
            None => None,
        };
        return Ok(Incoming::Claim(device, connected_at_us));
    }
    let envelope = headers
        .and_then(|h| h.get(ENVELOPE_HEADER))
        .ok_or("no envelope")?;
    let envelope: Envelope =
        serde_json::from_str(envelope.as_str()).map_err(|e| format!("bad envelope: {e}"))?;
    if envelope.qos > 2 {
        return Err(format!("QoS {}", envelope.qos));
    }
    let topic = match (subject.strip_prefix(&subjects.message), envelope.topic) {
        (Some(mapped), None) => subject_to_topic(mapped).ok_or("not a mapped topic")?,
        (None, Some(topic)) if subject == subjects.long => topic.into_owned(),
        _ => return Err("not a fleetgate message subject".into()),
    };
    let picker = if envelope.chosen_by_sender {
        Picker::Sender
    } else {
        Picker::QueueGroups
    };
    let message = Message {
        topic: topic.into(),
        payload,
        qos: envelope.qos,
        retain: envelope.retain,
        properties: envelope.properties.map(|p| Arc::new(p.into_owned())),
        expires_at_ms: envelope.expires_at_ms,
        publisher: envelope.publisher.map(|p| p.as_ref().into()),
        durable: envelope.durable,
    };
    Ok(Incoming::Message(message, picker))
}

enum Outgoing {
    /// Encoded by the publisher's thread, which needs to know where it goes.
    Message {
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    },
    Claim {
        device: String,
        connected_at_us: i64,
    },
}

impl Outgoing {
    /// Bytes it holds while queued (the payload is shared with local
    /// deliveries, but kept alive by the queue all the same).
    fn cost(&self) -> usize {
        match self {
            Outgoing::Message {
                subject, payload, ..
            } => subject.len() + payload.len() + 128,
            Outgoing::Claim { device, .. } => device.len() + 64,
        }
    }
}

/// Forwards not made, counted, and logged now and then.
struct Drops {
    counter: Counter,
    last_logged_ms: AtomicI64,
}

impl Drops {
    fn one(&self, why: &str) {
        self.counter.inc();
        let now = unix_now_ms();
        let last = self.last_logged_ms.load(Ordering::Relaxed);
        if now - last >= DROP_LOG_EVERY_MS
            && self
                .last_logged_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                dropped_total = self.counter.get(),
                "not forwarded to the cluster's other brokers: {why}"
            );
        }
    }
}

/// This broker's link to the others of its cluster. See the module docs.
pub struct NatsFabric {
    /// Random per process: a restarted broker is a new sender.
    id: String,
    subjects: Subjects,
    client: async_nats::Client,
    /// The connection of the shared subscriptions' queue subscriptions:
    /// unlike `client`, it hears this broker's own messages.
    groups_client: async_nats::Client,
    changes: Arc<FilterChanges>,
    queue: mpsc::Sender<Outgoing>,
    queued_bytes: Arc<AtomicUsize>,
    drops: Arc<Drops>,
    received: Counter,
    interest_subscriptions: Gauge,
}

/// What the router said about the filters of the sessions held here that
/// the task keeping the subscriptions has not done yet: the latest word per
/// filter (whether this broker holds it), and the SUBACKs waiting for it.
#[derive(Default)]
struct FilterChanges {
    pending: Mutex<HashMap<Arc<str>, FilterChange>>,
    changed: Notify,
}

struct FilterChange {
    held: bool,
    waiting: Vec<oneshot::Sender<()>>,
}

impl FilterChanges {
    /// Notes the router's word on `filter`; when held, what resolves once
    /// the subscription bringing its messages is in place.
    fn note(&self, filter: &Arc<str>, held: bool) -> Commit {
        let (ready, confirmed) = oneshot::channel();
        {
            let mut pending = self.pending.lock().expect("filter changes lock");
            let change = pending.entry(filter.clone()).or_insert(FilterChange {
                held,
                waiting: Vec::new(),
            });
            change.held = held;
            if held {
                change.waiting.push(ready);
            }
        }
        self.changed.notify_one();
        if !held {
            return crate::persist::committed();
        }
        Box::pin(async move {
            // Not an error for the SUBACK if it did not come: the session is
            // subscribed here, and async-nats subscribes again on reconnect.
            let _ = tokio::time::timeout(SUBSCRIBED_WAIT, confirmed).await;
            Ok(())
        })
    }
}

impl NatsFabric {
    /// Connects to NATS at any of `urls` (nats://HOST:PORT; async-nats
    /// reconnects to any of them, and to servers the cluster announces, by
    /// itself) and starts the task that sends forwards. Fails if no server
    /// answers: a broker that cannot reach its cluster should not take
    /// devices as if it were alone.
    pub async fn connect(
        urls: &[String],
        cluster: &ClusterName,
        registry: &mut Registry,
    ) -> Result<Arc<NatsFabric>, String> {
        let id = broker_id();
        let client = async_nats::ConnectOptions::new()
            .name(format!("fleetgate-broker {id}"))
            // The server does not send this connection its own messages back.
            .no_echo()
            .ping_interval(PING_INTERVAL)
            .event_callback(|event| async move { log_event(event) })
            .connect(urls)
            .await
            .map_err(|e| format!("cannot reach NATS at {}: {e}", urls.join(",")))?;
        // Echo on: this broker takes part in the queue groups of its shared
        // subscriptions for its own messages too. Named apart, so what
        // counts brokers by their connections counts this one once.
        let groups_client = async_nats::ConnectOptions::new()
            .name(format!("fleetgate-groups {id}"))
            .ping_interval(PING_INTERVAL)
            .event_callback(|event| async move { log_groups_event(event) })
            .connect(urls)
            .await
            .map_err(|e| format!("cannot reach NATS at {}: {e}", urls.join(",")))?;
        let drops = Arc::new(Drops {
            counter: Counter::default(),
            last_logged_ms: AtomicI64::new(0),
        });
        registry.register(
            "fleetgate_cluster_forward_dropped",
            "Messages and takeover claims not sent to the cluster's other brokers (NATS behind, down or refusing)",
            drops.counter.clone(),
        );
        let received = Counter::default();
        registry.register(
            "fleetgate_cluster_received",
            "Messages and takeover claims taken in from the cluster's other brokers",
            received.clone(),
        );
        let interest_subscriptions = Gauge::default();
        registry.register(
            "fleetgate_cluster_interest_subscriptions",
            "NATS subscriptions that bring this broker what other brokers publish on topics its sessions subscribe to",
            interest_subscriptions.clone(),
        );
        let (queue, outgoing) = mpsc::channel(QUEUE_MESSAGES);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let subjects = Subjects::of(cluster);
        tokio::spawn(send(
            client.clone(),
            subjects.clone(),
            id.clone(),
            outgoing,
            queued_bytes.clone(),
            drops.clone(),
        ));
        tracing::info!(broker = %id, %cluster, "joined the cluster fabric (NATS)");
        Ok(Arc::new(NatsFabric {
            id,
            subjects,
            client,
            groups_client,
            changes: Arc::default(),
            queue,
            queued_bytes,
            drops,
            received,
            interest_subscriptions,
        }))
    }

    /// The NATS connection, for what else the broker keeps in NATS
    /// (JetStream).
    pub fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    /// Takes in what the other brokers send: their messages on topics
    /// `router`'s sessions subscribe to go to those sessions
    /// ([`Router::publish_remote`], so they are not forwarded again), and
    /// their claims to `on_claim`. From now on it also
    /// holds the queue subscriptions of the shared subscriptions `router`
    /// has members of ([`Router::publish_to_group`]). Returns once the
    /// claims' subscription is in place at the server.
    pub async fn serve<F>(&self, router: Arc<Router>, on_claim: F) -> Result<(), String>
    where
        F: Fn(&Claim) + Send + Sync + 'static,
    {
        let inbound = Arc::new(Inbound {
            broker: self.id.clone(),
            subjects: self.subjects.clone(),
            router,
            on_claim: Box::new(on_claim),
            received: self.received.clone(),
        });
        for subject in [&self.subjects.claim, &self.subjects.long] {
            let subscriber = self
                .client
                .subscribe(subject.clone())
                .await
                .map_err(|e| format!("cannot subscribe on NATS: {e}"))?;
            tokio::spawn(hear(inbound.clone(), subscriber));
        }
        // The server has the subscriptions once it answered a ping sent
        // after them.
        self.client
            .flush()
            .await
            .map_err(|e| format!("NATS did not confirm the subscription: {e}"))?;
        let keeper = Keeper {
            client: self.client.clone(),
            groups_client: self.groups_client.clone(),
            interest_group: format!("{}{}", self.subjects.interest, self.id),
            inbound,
            groups: HashMap::new(),
            interest: Interest::new(
                MAX_INTEREST_SUBJECTS,
                MAX_SUBJECT - self.subjects.message.len(),
            ),
            interest_held: HashMap::new(),
            interest_subscriptions: self.interest_subscriptions.clone(),
        };
        tokio::spawn(keeper.run(self.changes.clone()));
        Ok(())
    }

    /// Queues `outgoing` for the sending task; false if it was dropped.
    fn enqueue(&self, outgoing: Outgoing) -> bool {
        let cost = outgoing.cost();
        if self.queued_bytes.fetch_add(cost, Ordering::Relaxed) + cost > QUEUE_BYTES {
            self.queued_bytes.fetch_sub(cost, Ordering::Relaxed);
            self.drops.one("the queue to NATS is full");
            return false;
        }
        if self.queue.try_send(outgoing).is_err() {
            self.queued_bytes.fetch_sub(cost, Ordering::Relaxed);
            self.drops.one("the queue to NATS is full");
            return false;
        }
        true
    }

    /// Whether both connections are up, so that a message sent now reaches
    /// the queue groups, this broker's own included. A connection that
    /// drops after this said yes loses the message for the groups only if
    /// async-nats cannot send it after the reconnect either.
    fn up(&self) -> bool {
        self.client.connection_state() == State::Connected
            && self.groups_client.connection_state() == State::Connected
    }
}

impl Fabric for NatsFabric {
    fn forward(&self, message: &Message, sender_picks: bool) -> SharedChoice {
        let fabric_may_pick = self.up() && !sender_picks;
        let (subject, headers, choice) = encode(&self.subjects, &self.id, message, fabric_may_pick);
        let queued = self.enqueue(Outgoing::Message {
            subject,
            headers,
            // Cheap: shared, not copied.
            payload: message.payload.clone(),
        });
        if queued {
            choice
        } else {
            SharedChoice::Here
        }
    }

    fn claim(&self, client_id: &str, connected_at_us: i64) {
        self.enqueue(Outgoing::Claim {
            device: client_id.to_string(),
            connected_at_us,
        });
    }

    fn share(&self, filter: &Arc<str>, held: bool) -> Commit {
        self.changes.note(filter, held)
    }

    fn interest(&self, filter: &Arc<str>, held: bool) -> Commit {
        self.changes.note(filter, held)
    }
}

/// A store node's live copies (`fleetgate store --nats`): straight onto
/// the fabric, as a broker forwards what is published through it, so that
/// subscribers on every broker get them with no broker in between. A node
/// joins the fabric only to send: it never [`NatsFabric::serve`]s.
impl LiveSink for NatsFabric {
    fn wanted(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    fn publish(&self, topic: String, payload: Bytes) {
        self.forward(&Message::live_copy(topic, payload), false);
    }
}

/// Where what other brokers send goes.
struct Inbound {
    broker: String,
    subjects: Subjects,
    router: Arc<Router>,
    on_claim: Box<dyn Fn(&Claim) + Send + Sync>,
    received: Counter,
}

impl Inbound {
    fn take_in(&self, message: async_nats::Message) {
        let from = message.headers.as_ref().and_then(|h| h.get(BROKER_HEADER));
        let sender = match from.map(|f| f.as_str()) {
            // no_echo already keeps them away; this holds if a server or a
            // future option did not.
            Some(from) if from == self.broker => return,
            Some(from) => from,
            None => {
                tracing::warn!(subject = %message.subject, "ignored a message on the cluster fabric without a sending broker");
                return;
            }
        };
        self.received.inc();
        match decode(
            &self.subjects,
            &message.subject,
            message.headers.as_ref(),
            message.payload,
        ) {
            Ok(Incoming::Claim(device, connected_at_us)) => (self.on_claim)(&Claim {
                device,
                connected_at_us,
                wins_ties: sender > self.broker.as_str(),
            }),
            Ok(Incoming::Message(routed, _)) => {
                if !routed.expired(unix_now_ms()) {
                    // Sessions here keep remote messages in memory (cluster
                    // mode), so nothing waits on the commit.
                    let _ = self.router.publish_remote(routed, SharedChoice::Fabric);
                }
            }
            Err(e) => {
                tracing::warn!(subject = %message.subject, error = %e, "ignored a malformed message on the cluster fabric")
            }
        }
    }
}

/// Hands what `subscriber` receives to `inbound`, until it is dropped.
async fn hear(inbound: Arc<Inbound>, mut subscriber: async_nats::Subscriber) {
    while let Some(message) = subscriber.next().await {
        inbound.take_in(message);
    }
}

/// Keeps the NATS subscriptions that follow the filters of the sessions
/// held here, as the router tells them ([`Fabric::share`],
/// [`Fabric::interest`]): a queue subscription per shared subscription this
/// broker has members of, and the interest subscriptions that bring it
/// what other brokers publish on its plain filters' topics. The latter are
/// queue subscriptions too, in a queue group of this broker alone: NATS
/// hands a message to one member of a group, so patterns that overlap
/// (`live.>` and `live.temperature.*`) still bring it once.
struct Keeper {
    client: async_nats::Client,
    groups_client: async_nats::Client,
    /// `<cluster>-broker-<id>`.
    interest_group: String,
    inbound: Arc<Inbound>,
    /// Shared filter → the task of its queue subscriptions.
    groups: HashMap<Arc<str>, JoinHandle<()>>,
    /// The plain filters held here, and the patterns that cover them.
    interest: Interest,
    /// Subject pattern (after `<cluster>.mqtt.`) → the task of its
    /// subscription.
    interest_held: HashMap<String, JoinHandle<()>>,
    interest_subscriptions: Gauge,
}

impl Keeper {
    async fn run(mut self, changes: Arc<FilterChanges>) {
        loop {
            changes.changed.notified().await;
            let batch = std::mem::take(&mut *changes.pending.lock().expect("filter changes lock"));
            let mut waiting = Vec::new();
            let mut interest_changed = false;
            let mut new_groups = false;
            for (filter, change) in batch {
                if split_shared(&filter).0.is_some() {
                    new_groups |= self.keep_group(filter, change.held).await;
                } else if change.held {
                    interest_changed |= self.interest.add(filter);
                } else {
                    interest_changed |= self.interest.remove(&filter);
                }
                waiting.extend(change.waiting);
            }
            let (new_interest, widened) = if interest_changed {
                self.keep_interest().await
            } else {
                (false, Vec::new())
            };
            // The server has the subscriptions once it answered a ping sent
            // after them. Subscriptions a wider one replaces go only then,
            // so nothing falls between the two.
            if new_groups && !waiting.is_empty() {
                let _ = tokio::time::timeout(SUBSCRIBED_WAIT, self.groups_client.flush()).await;
            }
            if new_interest {
                let _ = tokio::time::timeout(SUBSCRIBED_WAIT, self.client.flush()).await;
            }
            for task in widened {
                // Dropping the subscription unsubscribes it.
                task.abort();
            }
            for ready in waiting {
                let _ = ready.send(());
            }
        }
    }

    /// Subscribes to the queue group of the shared subscription `filter`,
    /// or leaves it; true if it subscribed.
    async fn keep_group(&mut self, filter: Arc<str>, held: bool) -> bool {
        match (held, self.groups.contains_key(&filter)) {
            (true, false) => {
                let subjects = &self.inbound.subjects;
                match subscribe_group(&self.groups_client, subjects, &filter, &self.inbound.router)
                    .await
                {
                    Ok(task) => {
                        self.groups.insert(filter, task);
                        return true;
                    }
                    Err(e) => tracing::error!(
                        %filter,
                        error = %e,
                        "cannot subscribe to a shared subscription's queue group: its members here get none of its messages from other brokers"
                    ),
                }
            }
            (false, true) => {
                if let Some(task) = self.groups.remove(&filter) {
                    // Dropping the subscriptions unsubscribes them.
                    task.abort();
                }
            }
            _ => {}
        }
        false
    }

    /// Subscribes to the interest patterns the held filters need now;
    /// returns whether it subscribed to any, and the tasks of the patterns
    /// no longer needed, to stop once the new ones are in place.
    async fn keep_interest(&mut self) -> (bool, Vec<JoinHandle<()>>) {
        let subjects = &self.inbound.subjects;
        let new: Vec<String> = self
            .interest
            .subjects()
            .filter(|pattern| !self.interest_held.contains_key(*pattern))
            .cloned()
            .collect();
        let mut subscribed = false;
        for pattern in new {
            let subject = format!("{}{pattern}", subjects.message);
            match self
                .client
                .queue_subscribe(subject, self.interest_group.clone())
                .await
            {
                Ok(subscriber) => {
                    let task = tokio::spawn(hear(self.inbound.clone(), subscriber));
                    self.interest_held.insert(pattern, task);
                    subscribed = true;
                }
                Err(e) => tracing::error!(
                    %pattern,
                    error = %e,
                    "cannot subscribe on NATS: sessions here miss what other brokers publish on these topics"
                ),
            }
        }
        let unwanted: Vec<String> = self
            .interest_held
            .keys()
            .filter(|pattern| !self.interest.contains(pattern))
            .cloned()
            .collect();
        let stopped = unwanted
            .iter()
            .filter_map(|pattern| self.interest_held.remove(pattern))
            .collect();
        self.interest_subscriptions
            .set(self.interest_held.len() as i64);
        (subscribed, stopped)
    }
}

/// Subscribes to the queue group of the shared subscription `filter`, and
/// starts the task that hands what it receives to `router`.
async fn subscribe_group(
    client: &async_nats::Client,
    subjects: &Subjects,
    filter: &Arc<str>,
    router: &Arc<Router>,
) -> Result<JoinHandle<()>, String> {
    let group = group_name(subjects, filter);
    let mut subscribers = Vec::new();
    for subject in group_subjects(subjects, filter) {
        let subscriber = client
            .queue_subscribe(subject, group.clone())
            .await
            .map_err(|e| e.to_string())?;
        subscribers.push(subscriber);
    }
    let (subjects, filter, router) = (subjects.clone(), filter.clone(), router.clone());
    Ok(tokio::spawn(async move {
        let mut received = futures::stream::select_all(subscribers);
        while let Some(message) = received.next().await {
            match decode(
                &subjects,
                &message.subject,
                message.headers.as_ref(),
                message.payload,
            ) {
                Ok(Incoming::Message(routed, Picker::QueueGroups)) => {
                    if !routed.expired(unix_now_ms()) {
                        // What must be durable goes to the store; nobody
                        // waits for it (core NATS is at most once).
                        let _ = router.publish_to_group(routed, &filter);
                    }
                }
                // Its sender picked the group's member already.
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(subject = %message.subject, error = %e, "ignored a malformed message on a shared subscription's queue group")
                }
            }
        }
    }))
}

/// Sends the queue in order. Waits while async-nats's own queue is full
/// (during a reconnect), which is what fills the fabric's queue and makes
/// `forward` drop instead of blocking.
async fn send(
    client: async_nats::Client,
    subjects: Subjects,
    broker: String,
    mut outgoing: mpsc::Receiver<Outgoing>,
    queued_bytes: Arc<AtomicUsize>,
    drops: Arc<Drops>,
) {
    while let Some(next) = outgoing.recv().await {
        let cost = next.cost();
        let sent = match next {
            Outgoing::Message {
                subject,
                headers,
                payload,
            } => client.publish_with_headers(subject, headers, payload).await,
            Outgoing::Claim {
                device,
                connected_at_us,
            } => {
                let mut headers = HeaderMap::new();
                headers.insert(BROKER_HEADER, broker.as_str());
                headers.insert(CONNECTED_AT_HEADER, connected_at_us.to_string());
                client
                    .publish_with_headers(subjects.claim.clone(), headers, device.into())
                    .await
            }
        };
        queued_bytes.fetch_sub(cost, Ordering::Relaxed);
        if let Err(e) = sent {
            // A payload over the server's max_payload, or the client gone.
            drops.one(&e.to_string());
        }
    }
}

fn log_event(event: Event) {
    match event {
        Event::Connected => tracing::info!("cluster fabric (NATS) connected"),
        Event::Disconnected => tracing::warn!(
            "cluster fabric (NATS) down: other brokers' messages and takeovers are missed until it reconnects"
        ),
        Event::SlowConsumer(_) => tracing::warn!(
            "NATS dropped messages from other brokers: this broker did not take them in fast enough"
        ),
        Event::Closed => tracing::error!("cluster fabric (NATS) closed for good"),
        other => tracing::warn!(event = %other, "cluster fabric (NATS)"),
    }
}

fn log_groups_event(event: Event) {
    match event {
        Event::Connected => tracing::info!("shared subscriptions' NATS connection up"),
        Event::Disconnected => tracing::warn!(
            "shared subscriptions' NATS connection down: this broker picks the members of its shared subscriptions itself until it reconnects"
        ),
        Event::SlowConsumer(_) => tracing::warn!(
            "NATS dropped shared subscriptions' messages: this broker did not take them in fast enough"
        ),
        Event::Closed => {
            tracing::error!("shared subscriptions' NATS connection closed for good")
        }
        other => tracing::warn!(event = %other, "shared subscriptions' NATS connection"),
    }
}

/// A random id for this process, as other brokers know it.
pub(crate) fn broker_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random source");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(topic: &str) -> String {
        let subject = topic_to_subject(topic);
        assert_eq!(
            subject_to_topic(&subject).as_deref(),
            Some(topic),
            "{topic:?} → {subject:?}"
        );
        subject
    }

    #[test]
    fn plain_topics_map_like_the_nats_mqtt_gateway() {
        assert_eq!(roundtrip("devices/d-1/cmd"), "devices.d-1.cmd");
        assert_eq!(
            roundtrip("live/temperature/sensor_1"),
            "live.temperature.sensor_1"
        );
        assert_eq!(roundtrip("a"), "a");
        assert_eq!(roundtrip("$fleet/state/x"), "$fleet.state.x");
    }

    #[test]
    fn empty_levels_become_slash_tokens() {
        assert_eq!(roundtrip("a//b"), "a./.b");
        assert_eq!(roundtrip("/a"), "/.a");
        assert_eq!(roundtrip("a/"), "a./");
        assert_eq!(roundtrip("/"), "/./");
        assert_eq!(roundtrip("//"), "/././");
        assert_eq!(roundtrip(""), "/");
    }

    #[test]
    fn dots_become_double_slashes() {
        assert_eq!(roundtrip("v1.2/x"), "v1//2.x");
        assert_eq!(roundtrip("."), "//");
        assert_eq!(roundtrip(".."), "////");
        assert_eq!(roundtrip("a/./b"), "a.//.b");
        assert_eq!(roundtrip("/./"), "/.//./");
    }

    #[test]
    fn what_subjects_cannot_hold_is_escaped() {
        assert_eq!(roundtrip("a b"), "a%20b");
        assert_eq!(roundtrip("tab\there"), "tab%09here");
        assert_eq!(roundtrip("cr\r\nlf"), "cr%0D%0Alf");
        assert_eq!(roundtrip("*"), "%2A");
        assert_eq!(roundtrip(">"), "%3E");
        assert_eq!(roundtrip("a*b>c"), "a%2Ab%3Ec");
        assert_eq!(roundtrip("100%"), "100%25");
        assert_eq!(roundtrip("%2A"), "%252A");
        assert_eq!(roundtrip("del\u{7f}"), "del%7F");
        for subject in [roundtrip("a b/*/>/ ."), roundtrip("x\u{1}y")] {
            assert!(!subject.contains([' ', '\t', '\r', '\n']), "{subject:?}");
            assert!(subject
                .split('.')
                .all(|t| !t.is_empty() && t != "*" && t != ">"));
        }
    }

    #[test]
    fn unicode_is_kept() {
        assert_eq!(
            roundtrip("capteurs/température/é"),
            "capteurs.température.é"
        );
        assert_eq!(roundtrip("温度/センサー"), "温度.センサー");
        assert_eq!(roundtrip("emoji/🌡️"), "emoji.🌡️");
        // Non-ASCII spaces are not NATS delimiters.
        assert_eq!(roundtrip("a\u{3000}b"), "a\u{3000}b");
    }

    #[test]
    fn only_mapped_subjects_map_back() {
        for subject in [
            "a..b", ".a", "a.", "a/b", "a///b", "a%2a", "a%41", "a%2", "a%zz", "a b", "*", ">",
            "a.*", "%",
        ] {
            assert_eq!(subject_to_topic(subject), None, "{subject:?}");
        }
    }

    fn message(topic: &str) -> Message {
        Message::live_copy(topic.into(), Bytes::from_static(b"\x00payload\xff"))
    }

    fn subjects() -> Subjects {
        Subjects::of(&ClusterName::default())
    }

    fn through(message: &Message) -> (String, Incoming) {
        let (subject, headers, _) = encode(&subjects(), "b1", message, true);
        assert_eq!(headers.get(BROKER_HEADER).unwrap().as_str(), "b1");
        let incoming = decode(
            &subjects(),
            &subject,
            Some(&headers),
            message.payload.clone(),
        )
        .unwrap();
        (subject, incoming)
    }

    #[test]
    fn a_message_crosses_with_everything_the_router_needs() {
        let mut full = message("devices/d 1/cmd");
        full.qos = 2;
        full.retain = true;
        full.durable = true;
        full.expires_at_ms = Some(1_900_000_000_123);
        full.publisher = Some("admin\nwith odd \"id\"".into());
        full.properties = Some(Arc::new(Properties {
            payload_format: Some(1),
            content_type: Some("application/json".into()),
            response_topic: Some("devices/d 1/reply".into()),
            correlation_data: Some(vec![0, 1, 255, b'\r', b'\n']),
            user_properties: vec![("k".into(), "v\r\nw".into()), ("k".into(), "".into())],
        }));
        let (subject, incoming) = through(&full);
        assert_eq!(subject, "fleetgate.mqtt.devices.d%201.cmd");
        assert_eq!(incoming, Incoming::Message(full, Picker::QueueGroups));

        let plain = message("live/t/s");
        let (subject, headers, _) = encode(&subjects(), "b1", &plain, true);
        assert_eq!(subject, "fleetgate.mqtt.live.t.s");
        // Defaults are left out of the envelope.
        assert_eq!(
            headers.get(ENVELOPE_HEADER).unwrap().as_str(),
            r#"{"qos":1}"#
        );
        assert_eq!(
            through(&plain).1,
            Incoming::Message(plain, Picker::QueueGroups)
        );
    }

    #[test]
    fn a_topic_too_long_for_a_subject_travels_in_the_envelope() {
        let long = message(&format!("t/{}", "x.".repeat(600)));
        let (subject, incoming) = through(&long);
        assert_eq!(subject, "fleetgate.long");
        assert_eq!(incoming, Incoming::Message(long, Picker::QueueGroups));
        let fits = MAX_SUBJECT - subjects().message.len();
        let (subject, _) = through(&message(&"y".repeat(fits)));
        assert_ne!(subject, "fleetgate.long");
    }

    #[test]
    fn malformed_messages_are_refused() {
        let s = subjects();
        let (_, headers, _) = encode(&subjects(), "b1", &message("a"), true);
        let payload = Bytes::new();
        assert!(decode(&s, "fleetgate.mqtt.a", None, payload.clone()).is_err());
        assert!(decode(&s, "fleetgate.mqtt.a..b", Some(&headers), payload.clone()).is_err());
        assert!(decode(&s, &s.long, Some(&headers), payload.clone()).is_err());
        assert!(decode(&s, "fleetgate.other", Some(&headers), payload.clone()).is_err());
        let mut bad = HeaderMap::new();
        bad.insert(ENVELOPE_HEADER, r#"{"qos":3}"#);
        assert!(decode(&s, "fleetgate.mqtt.a", Some(&bad), payload.clone()).is_err());
        bad.insert(ENVELOPE_HEADER, "not json");
        assert!(decode(&s, "fleetgate.mqtt.a", Some(&bad), payload).is_err());
        assert_eq!(
            decode(&s, &s.claim, None, Bytes::from_static(b"d-1")),
            Ok(Incoming::Claim("d-1".into(), None))
        );
        let mut at = HeaderMap::new();
        at.insert(CONNECTED_AT_HEADER, "1765000000123456");
        assert_eq!(
            decode(&s, &s.claim, Some(&at), Bytes::from_static(b"d-1")),
            Ok(Incoming::Claim("d-1".into(), Some(1765000000123456)))
        );
        at.insert(CONNECTED_AT_HEADER, "soon");
        assert!(decode(&s, &s.claim, Some(&at), Bytes::from_static(b"d-1")).is_err());
        assert!(decode(&s, &s.claim, None, Bytes::from_static(b"\xff")).is_err());
    }

    #[test]
    fn another_cluster_is_not_heard() {
        let (subject, headers, _) = encode(&subjects(), "b1", &message("devices/d1/cmd"), true);
        let staging = Subjects::of(&ClusterName::new("staging").unwrap());
        assert_eq!(subject, "fleetgate.mqtt.devices.d1.cmd");
        assert!(decode(&staging, &subject, Some(&headers), Bytes::new()).is_err());
        let (subject, _, _) = encode(&staging, "b1", &message("devices/d1/cmd"), true);
        assert_eq!(subject, "staging.mqtt.devices.d1.cmd");
        assert_eq!(staging.claim, "staging.claim");
        assert_eq!(staging.interest, "staging-broker-");
    }

    #[test]
    fn shared_filters_map_to_the_subjects_of_their_topics() {
        let cases: [(&str, &[&str]); 11] = [
            ("jobs/#", &["jobs", "jobs.>"]),
            ("#", &[">"]),
            ("+", &["*"]),
            ("a/+/c", &["a.*.c"]),
            ("+/#", &["*", "*.>"]),
            ("a/b", &["a.b"]),
            ("a//b/#", &["a./.b", "a./.b.>"]),
            ("/#", &["/", "/.>"]),
            ("v1.2/+", &["v1//2.*"]),
            ("a b/*/#", &["a%20b.%2A", "a%20b.%2A.>"]),
            ("$fleet/state/+", &["$fleet.state.*"]),
        ];
        for (filter, subjects) in cases {
            assert_eq!(filter_to_subjects(filter), subjects, "{filter:?}");
        }
    }

    /// Whether the NATS subject pattern `pattern` matches `subject`.
    fn nats_matches(pattern: &str, subject: &str) -> bool {
        let (mut pattern, mut subject) = (pattern.split('.'), subject.split('.'));
        loop {
            match (pattern.next(), subject.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(p), Some(s)) if p == s => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    #[test]
    fn a_filters_subjects_match_what_its_topics_are_sent_on() {
        use fleetgate_protocol::topic::filter_matches;
        let filters = [
            "#", "+", "a", "a/#", "a/+", "a/b", "a/+/c", "+/b/#", "a/b/c/#", "+/+", "a//b", "/a",
            "+/", "/#", "v1.2/#", "x y/+", "$SYS/#",
        ];
        let topics = [
            "a", "a/b", "a/b/c", "a/x/c", "b/b/b", "/a", "a//b", "/", "x/", "a/b/c/d", "v1.2",
            "v1.2/x", "v1/2", "x y/z", "$SYS/x", "$SYS", "$fleet/s",
        ];
        for filter in filters {
            let patterns = filter_to_subjects(filter);
            for topic in topics {
                let subject = topic_to_subject(topic);
                let nats = patterns.iter().any(|p| nats_matches(p, &subject));
                let case = format!("{filter:?} on {topic:?} ({subject:?})");
                if filter_matches(filter, topic) {
                    assert!(nats, "{case}: the subscription misses it");
                } else if nats {
                    // Wider only where a first-level wildcard meets a `$` topic.
                    assert!(
                        topic.starts_with('$') && filter.starts_with(['+', '#']),
                        "{case}: the subscription gets it"
                    );
                }
            }
        }
    }

    #[test]
    fn a_shared_subscription_has_a_queue_group_of_its_own() {
        let s = subjects();
        let group = group_name(&s, "$share/g/jobs/#");
        assert!(group.starts_with("fleetgate-share-"), "{group}");
        assert_eq!(group.len(), "fleetgate-share-".len() + 32);
        assert!(!group.contains([' ', '\t', '\r', '\n', '.']));
        assert_eq!(
            group,
            queue_group(&ClusterName::default(), "$share/g/jobs/#")
        );
        // Another group, another filter, another cluster: another queue.
        let staging = ClusterName::new("staging").unwrap();
        for other in [
            group_name(&s, "$share/h/jobs/#"),
            group_name(&s, "$share/g/jobs/+"),
            queue_group(&staging, "$share/g/jobs/#"),
        ] {
            assert_ne!(other, group);
        }
        // Only topics too long for a subject match: its queue subscription
        // is on `.long` alone, where their messages go.
        let long = format!("$share/g/{}/#", "x".repeat(MAX_SUBJECT));
        assert_eq!(group_subjects(&s, &long), ["fleetgate.long"]);
        assert_eq!(
            group_subjects(&s, "$share/g/jobs/#"),
            [
                "fleetgate.mqtt.jobs",
                "fleetgate.mqtt.jobs.>",
                "fleetgate.long"
            ]
        );
    }

    #[test]
    fn the_sender_says_who_picks_shared_members() {
        let s = subjects();
        let short = message("jobs/1");
        let (_, headers, choice) = encode(&s, "b1", &short, true);
        assert_eq!(choice, SharedChoice::Fabric);
        let decoded = decode(&s, "fleetgate.mqtt.jobs.1", Some(&headers), Bytes::new());
        assert!(matches!(
            decoded,
            Ok(Incoming::Message(_, Picker::QueueGroups))
        ));
        // Cut off: this broker picks, and tells the others it did.
        let (_, headers, choice) = encode(&s, "b1", &short, false);
        assert_eq!(choice, SharedChoice::Here);
        let decoded = decode(&s, "fleetgate.mqtt.jobs.1", Some(&headers), Bytes::new());
        assert!(matches!(decoded, Ok(Incoming::Message(_, Picker::Sender))));
        // Too long for a subject: the queue groups pick all the same.
        let long = message(&format!("jobs/{}", "x".repeat(MAX_SUBJECT)));
        for (may_pick, choice, picker) in [
            (true, SharedChoice::Fabric, Picker::QueueGroups),
            (false, SharedChoice::Here, Picker::Sender),
        ] {
            let (subject, headers, chosen) = encode(&s, "b1", &long, may_pick);
            assert_eq!(subject, s.long);
            assert_eq!(chosen, choice);
            let decoded = decode(&s, &subject, Some(&headers), Bytes::new());
            assert!(matches!(decoded, Ok(Incoming::Message(_, p)) if p == picker));
        }
    }

    #[test]
    fn broker_ids_differ() {
        let (a, b) = (broker_id(), broker_id());
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
    }
}
