//! An MQTT session: the state that outlives a connection.
//!
//! A session holds its subscriptions, the messages queued for it and the
//! QoS 1/2 messages sent but not yet acknowledged (its outbound in-flight
//! window). The router pushes messages in; the connection that has the
//! session attached pulls them out as its client's Receive Maximum allows,
//! and settles them as acknowledgements arrive. A session whose connection
//! is gone keeps queueing until it expires.
//!
//! Invariant: a queue never grows past its [`QueueLimits`]. What does not
//! fit is refused here, and the router reports that to the publisher.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use fleetgate_protocol::unix_now_ms;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// What a SUBSCRIBE asked for one filter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubOptions {
    /// Granted QoS, the most a delivery on this subscription gets.
    pub qos: u8,
    /// MQTT 5: never deliver this session's own publishes to it.
    #[serde(default)]
    pub no_local: bool,
    /// MQTT 5: keep the publisher's RETAIN flag on deliveries.
    #[serde(default)]
    pub retain_as_published: bool,
    /// MQTT 5: 0 send retained messages at subscribe, 1 only for a new
    /// subscription, 2 never.
    #[serde(default)]
    pub retain_handling: u8,
    /// MQTT 5 subscription identifier.
    #[serde(default)]
    pub id: Option<u32>,
}

/// MQTT 5 publish properties that travel with a message unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Properties {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_format: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_data: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_properties: Vec<(String, String)>,
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }
}

/// An application message as the router carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub properties: Option<Arc<Properties>>,
    /// From the MQTT 5 message expiry interval, as an absolute time.
    pub expires_at_ms: Option<i64>,
    /// The publishing session, for noLocal.
    pub publisher: Option<Arc<str>>,
    /// Whether queueing it for a persistent session must be durable before
    /// the publisher is acknowledged. Live copies are not: the store's
    /// tables are their record.
    pub durable: bool,
}

impl Message {
    /// A live copy of committed records on `topic` (`live/...`): QoS 1 (a
    /// QoS 1 subscriber acknowledges each) but kept only in memory, the
    /// tables being their durable record.
    pub fn live_copy(topic: String, payload: Bytes) -> Message {
        Message {
            topic: topic.into(),
            payload,
            qos: 1,
            retain: false,
            properties: None,
            expires_at_ms: None,
            publisher: None,
            durable: false,
        }
    }

    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= now_ms)
    }

    /// Bytes a queue counts for this message.
    fn cost(&self) -> usize {
        self.topic.len() + self.payload.len() + 64
    }
}

/// One message queued for one session, as it will be delivered.
#[derive(Debug, Clone)]
pub struct Queued {
    /// Position in the session's queue; the durable store's key.
    pub seq: u64,
    pub message: Arc<Message>,
    /// min(published, granted).
    pub qos: u8,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    /// Written to the session store (so settled there too).
    pub durable: bool,
}

/// Per-session bounds on what waits for a device.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_messages: usize,
    pub max_bytes: usize,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            max_messages: 1000,
            max_bytes: 1024 * 1024,
        }
    }
}

/// Where an outbound QoS 1/2 message is in its exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Sent,
    /// PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Debug)]
struct Inflight {
    queued: Queued,
    stage: Stage,
}

/// What the connection writes for one delivery.
#[derive(Debug)]
pub enum Delivery {
    Publish {
        queued: Queued,
        pkid: u16,
        dup: bool,
    },
    Release {
        pkid: u16,
    },
}

/// What [`Session::enqueue`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Queued,
    /// QoS 0 for a session with no connection: not kept.
    Skipped,
    /// The queue is at its limit.
    Full,
}

/// An acknowledgement for a packet id this session never used (or no
/// longer waits on): a protocol error.
#[derive(Debug, PartialEq, Eq)]
pub struct UnknownPacketId(pub u16);

pub struct Session {
    pub client_id: Arc<str>,
    state: Mutex<State>,
    /// Wakes the attached connection when there is something to send.
    pub wake: Notify,
}

pub(crate) struct State {
    /// Seconds the session outlives its connection (0: it ends with it;
    /// u32::MAX: never expires).
    pub expiry_secs: u32,
    pub subscriptions: BTreeMap<String, SubOptions>,
    queue: VecDeque<Queued>,
    inflight: HashMap<u16, Inflight>,
    queued_bytes: usize,
    next_seq: u64,
    next_pkid: u16,
    /// The attached connection's number (0: none).
    pub attached: u64,
    /// When the last connection ended, while none is attached.
    pub detached_at_ms: Option<i64>,
    /// Whether the session store holds a record of this session.
    pub stored: bool,
    /// Whether this broker holds the session: a connection here has it, or
    /// had it last. A cluster's other brokers know it from its record only.
    /// Its shared subscriptions count as this broker's members (see
    /// `Router::hold`).
    pub held_here: bool,
}

impl Session {
    pub fn new(client_id: Arc<str>, expiry_secs: u32) -> Arc<Session> {
        Arc::new(Session {
            client_id,
            state: Mutex::new(State {
                expiry_secs,
                subscriptions: BTreeMap::new(),
                queue: VecDeque::new(),
                inflight: HashMap::new(),
                queued_bytes: 0,
                next_seq: 1,
                next_pkid: 1,
                attached: 0,
                detached_at_ms: Some(unix_now_ms()),
                stored: false,
                held_here: false,
            }),
            wake: Notify::new(),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("session lock")
    }

    pub fn persistent(&self) -> bool {
        self.lock().expiry_secs > 0
    }

    /// Messages queued or in flight.
    pub fn pending(&self) -> usize {
        let state = self.lock();
        state.queue.len() + state.inflight.len()
    }

    /// Queues `message` for delivery at `qos`. `durable` is called with a
    /// message that must be written to the session store, under this
    /// session's lock, so the write is submitted before anything can
    /// settle it.
    pub fn enqueue(
        &self,
        message: Arc<Message>,
        qos: u8,
        retain: bool,
        subscription_ids: Vec<u32>,
        limits: QueueLimits,
        durable: impl FnOnce(&Queued),
    ) -> Enqueued {
        let mut state = self.lock();
        // QoS 0 is at most once: an absent client does not keep it.
        if qos == 0 && state.attached == 0 {
            return Enqueued::Skipped;
        }
        let cost = message.cost();
        let held = state.queue.len() + state.inflight.len();
        if held >= limits.max_messages || state.queued_bytes + cost > limits.max_bytes {
            return Enqueued::Full;
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        let queued = Queued {
            seq,
            durable: message.durable && qos > 0 && state.expiry_secs > 0,
            message,
            qos,
            retain,
            subscription_ids,
        };
        if queued.durable {
            durable(&queued);
        }
        state.queued_bytes += cost;
        state.queue.push_back(queued);
        drop(state);
        self.wake.notify_one();
        Enqueued::Queued
    }

    /// Puts back a message read from the session store at start-up.
    pub(crate) fn restore(&self, queued: Queued) {
        let mut state = self.lock();
        state.next_seq = state.next_seq.max(queued.seq + 1);
        state.queued_bytes += queued.message.cost();
        state.queue.push_back(queued);
    }

    /// Takes a message the session store holds for this session (a
    /// cluster's shared queue), while `connection` has the session. One the
    /// session already holds (offered again by the store) is not queued
    /// twice. False if `connection` no longer has the session.
    pub fn feed(&self, connection: u64, queued: Queued) -> bool {
        let mut state = self.lock();
        if state.attached != connection {
            return false;
        }
        let held = |q: &Queued| q.durable && q.seq == queued.seq;
        if state.queue.iter().any(held) || state.inflight.values().any(|f| held(&f.queued)) {
            return true;
        }
        state.next_seq = state.next_seq.max(queued.seq + 1);
        state.queued_bytes += queued.message.cost();
        state.queue.push_back(queued);
        drop(state);
        self.wake.notify_one();
        true
    }

    /// Attaches connection `connection`: what was in flight goes out again
    /// first (PUBLISH with DUP, or PUBREL), in the order it was first sent.
    pub fn attach(&self, connection: u64) -> Vec<Delivery> {
        let mut state = self.lock();
        state.attached = connection;
        state.detached_at_ms = None;
        let mut resend: Vec<(&u16, &Inflight)> = state.inflight.iter().collect();
        resend.sort_by_key(|(_, f)| f.queued.seq);
        resend
            .into_iter()
            .map(|(pkid, f)| match f.stage {
                Stage::Sent => Delivery::Publish {
                    queued: f.queued.clone(),
                    pkid: *pkid,
                    dup: true,
                },
                Stage::Released => Delivery::Release { pkid: *pkid },
            })
            .collect()
    }

    /// Detaches `connection` if it is still the attached one; false if a
    /// newer connection took the session meanwhile.
    pub fn detach(&self, connection: u64) -> bool {
        let mut state = self.lock();
        if state.attached != connection {
            return false;
        }
        state.attached = 0;
        state.detached_at_ms = Some(unix_now_ms());
        // QoS 0 messages are not kept for an absent client.
        let mut freed = 0;
        state.queue.retain(|q| {
            let keep = q.qos > 0;
            if !keep {
                freed += q.message.cost();
            }
            keep
        });
        state.queued_bytes -= freed;
        true
    }

    /// Takes what `connection` may send now: QoS 0 freely, QoS 1/2 while
    /// fewer than `window` are unacknowledged. Nothing if another
    /// connection has the session (a taken-over one may still be writing).
    /// Expired messages are dropped and returned in `expired` (to be
    /// settled in the store).
    pub fn take(
        &self,
        connection: u64,
        window: usize,
        now_ms: i64,
        expired: &mut Vec<Queued>,
    ) -> Vec<Delivery> {
        let mut state = self.lock();
        let mut out = Vec::new();
        if state.attached != connection {
            return out;
        }
        while let Some(front) = state.queue.front() {
            if front.message.expired(now_ms) {
                let gone = state.queue.pop_front().expect("front exists");
                state.queued_bytes -= gone.message.cost();
                expired.push(gone);
                continue;
            }
            if front.qos > 0 && state.inflight.len() >= window {
                break;
            }
            let queued = state.queue.pop_front().expect("front exists");
            if queued.qos == 0 {
                state.queued_bytes -= queued.message.cost();
                out.push(Delivery::Publish {
                    queued,
                    pkid: 0,
                    dup: false,
                });
                continue;
            }
            let pkid = state.free_pkid();
            state.inflight.insert(
                pkid,
                Inflight {
                    queued: queued.clone(),
                    stage: Stage::Sent,
                },
            );
            out.push(Delivery::Publish {
                queued,
                pkid,
                dup: false,
            });
        }
        out
    }

    /// PUBACK from the client: the QoS 1 exchange is done.
    pub fn puback(&self, pkid: u16) -> Result<Queued, UnknownPacketId> {
        self.finish(pkid, |f| f.stage == Stage::Sent && f.queued.qos == 1)
    }

    /// PUBREC from the client. A success code moves the exchange on to
    /// PUBREL (and returns the message, which needs no re-sending any
    /// more); a failure code ends it.
    pub fn pubrec(&self, pkid: u16, failed: bool) -> Result<Queued, UnknownPacketId> {
        let mut state = self.lock();
        match state.inflight.get_mut(&pkid) {
            Some(f) if f.stage == Stage::Sent && f.queued.qos == 2 => {
                if failed {
                    drop(state);
                    return self.finish(pkid, |_| true);
                }
                f.stage = Stage::Released;
                Ok(f.queued.clone())
            }
            _ => Err(UnknownPacketId(pkid)),
        }
    }

    /// PUBCOMP from the client: the QoS 2 exchange is done.
    pub fn pubcomp(&self, pkid: u16) -> Result<Queued, UnknownPacketId> {
        self.finish(pkid, |f| f.stage == Stage::Released)
    }

    fn finish(
        &self,
        pkid: u16,
        expected: impl Fn(&Inflight) -> bool,
    ) -> Result<Queued, UnknownPacketId> {
        let mut state = self.lock();
        if !state.inflight.get(&pkid).is_some_and(expected) {
            return Err(UnknownPacketId(pkid));
        }
        let done = state.inflight.remove(&pkid).expect("checked");
        state.queued_bytes -= done.queued.message.cost();
        drop(state);
        // A slot in the window opened.
        self.wake.notify_one();
        Ok(done.queued)
    }

    /// A message the client cannot take (larger than its Maximum Packet
    /// Size) is settled as if delivered, as MQTT 5 says.
    pub fn discard(&self, pkid: u16) {
        let _ = self.finish(pkid, |_| true);
    }

    /// Everything queued or in flight, leaving the session empty.
    pub(crate) fn drain(&self) -> Vec<Queued> {
        let mut state = self.lock();
        state.queued_bytes = 0;
        let mut all: Vec<Queued> = state.inflight.drain().map(|(_, f)| f.queued).collect();
        all.extend(state.queue.drain(..));
        all
    }
}

impl State {
    fn free_pkid(&mut self) -> u16 {
        loop {
            let pkid = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&pkid) {
                return pkid;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(qos: u8) -> Arc<Message> {
        Arc::new(Message {
            topic: "t".into(),
            payload: Bytes::from_static(b"x"),
            qos,
            retain: false,
            properties: None,
            expires_at_ms: None,
            publisher: None,
            durable: true,
        })
    }

    fn pkids(deliveries: &[Delivery]) -> Vec<u16> {
        deliveries
            .iter()
            .map(|d| match d {
                Delivery::Publish { pkid, .. } | Delivery::Release { pkid } => *pkid,
            })
            .collect()
    }

    #[test]
    fn the_window_holds_back_qos1_until_acknowledged() {
        let session = Session::new("c".into(), 60);
        session.attach(1);
        for _ in 0..5 {
            session.enqueue(message(1), 1, false, vec![], QueueLimits::default(), |_| {});
        }
        let first = session.take(1, 2, 0, &mut vec![]);
        assert_eq!(pkids(&first), vec![1, 2]);
        assert!(session.take(1, 2, 0, &mut vec![]).is_empty());
        session.puback(1).unwrap();
        assert_eq!(pkids(&session.take(1, 2, 0, &mut vec![])), vec![3]);
        assert_eq!(
            session.puback(1).unwrap_err(),
            UnknownPacketId(1),
            "acked twice"
        );
        assert_eq!(
            session.puback(77).unwrap_err(),
            UnknownPacketId(77),
            "never sent"
        );
    }

    #[test]
    fn qos2_goes_through_release_and_a_reattach_resends_in_order() {
        let session = Session::new("c".into(), 60);
        session.attach(1);
        for _ in 0..2 {
            session.enqueue(message(2), 2, false, vec![], QueueLimits::default(), |_| {});
        }
        assert_eq!(pkids(&session.take(1, 10, 0, &mut vec![])), vec![1, 2]);
        assert!(session.pubcomp(1).is_err(), "PUBCOMP before PUBREC");
        session.pubrec(1, false).unwrap();
        assert!(session.puback(1).is_err(), "PUBACK for a QoS 2 message");
        assert!(session.detach(1));
        let resent = session.attach(2);
        assert!(matches!(resent[0], Delivery::Release { pkid: 1 }));
        assert!(matches!(
            resent[1],
            Delivery::Publish {
                pkid: 2,
                dup: true,
                ..
            }
        ));
        assert_eq!(resent.len(), 2);
        session.pubcomp(1).unwrap();
        session.pubrec(2, true).unwrap();
        assert_eq!(session.pending(), 0);
    }

    #[test]
    fn queues_are_bounded_and_offline_sessions_skip_qos0() {
        let session = Session::new("c".into(), 60);
        let limits = QueueLimits {
            max_messages: 2,
            max_bytes: 1 << 20,
        };
        let put = |qos, limits| session.enqueue(message(qos), qos, false, vec![], limits, |_| {});
        assert_eq!(put(0, limits), Enqueued::Skipped);
        assert_eq!(put(1, limits), Enqueued::Queued);
        assert_eq!(put(1, limits), Enqueued::Queued);
        assert_eq!(put(1, limits), Enqueued::Full);
        let tiny = QueueLimits {
            max_messages: 10,
            max_bytes: 10,
        };
        let other = Session::new("d".into(), 60);
        assert_eq!(
            other.enqueue(message(1), 1, false, vec![], tiny, |_| {}),
            Enqueued::Full
        );
    }

    #[test]
    fn expired_messages_are_dropped_not_sent() {
        let session = Session::new("c".into(), 60);
        session.attach(1);
        let mut old = (*message(1)).clone();
        old.expires_at_ms = Some(1000);
        session.enqueue(
            Arc::new(old),
            1,
            false,
            vec![],
            QueueLimits::default(),
            |_| {},
        );
        let mut expired = vec![];
        assert!(session.take(1, 10, 2000, &mut expired).is_empty());
        assert_eq!(expired.len(), 1);
        assert_eq!(session.pending(), 0);
    }
}
