//! The router: sessions by client id, the subscription index, retained
//! messages, and the delivery of each published message to the sessions
//! whose subscriptions match it.
//!
//! It is in-process and synchronous: publishing takes a few locks and
//! queues the message on each matching session; what has to be durable
//! (messages for persistent sessions, retained messages) is submitted to
//! the [`SessionStore`] under the same locks, so the store sees operations
//! in the order they happened, and the caller awaits the returned
//! [`Commit`] before acknowledging the publisher.

pub mod index;
pub mod interest;
pub mod nats;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use fleetgate_protocol::ingest::LiveSink;
use fleetgate_protocol::unix_now_ms;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::persist::{Commit, CommitError, SessionRecord, SessionStore, StoreOp, StoredMessage};
use crate::session::{Delivery, Enqueued, Message, QueueLimits, Queued, Session, SubOptions};
use index::{split_shared, Subscriber, TopicIndex};

/// The other brokers of a cluster, as the router sees them. `fleetgate up`
/// has none; brokers of a cluster join one (NATS).
pub trait Fabric: Send + Sync {
    /// Hands a message published through this broker to the others, which
    /// route it to their own sessions ([`Router::publish_remote`]), and says
    /// who picks the member of each shared subscription it matches: this
    /// broker if `sender_picks`, else the fabric if it can.
    fn forward(&self, message: &Message, sender_picks: bool) -> SharedChoice;
    /// A client connected here at `connected_at_us` (µs since the epoch):
    /// the other brokers end its connections older than that.
    fn claim(&self, client_id: &str, connected_at_us: i64);
    /// Whether this broker holds members of the shared subscription
    /// `filter` (`$share/<group>/<filter>`), said when that changes. While
    /// it does, the fabric hands it the group's messages that the cluster
    /// picked it for ([`Router::publish_to_group`]). Resolves once that is
    /// in place, or could not be: a new member's SUBACK waits for it.
    fn share(&self, filter: &Arc<str>, held: bool) -> Commit;
    /// Whether sessions held here subscribe to the plain filter `filter`,
    /// said when that changes. While they do, the fabric hands this broker
    /// what other brokers publish on topics it matches (and may hand it
    /// more: the routing filters it again). Resolves once that is in place,
    /// or could not be: the first subscriber's SUBACK waits for it.
    fn interest(&self, filter: &Arc<str>, held: bool) -> Commit;
}

/// Who picks the member of each shared subscription a message matches, so
/// that a group with members on several brokers gets it once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedChoice {
    /// This broker, among the members it knows: there is no fabric, or it
    /// could not hand the message to the others' shared subscriptions (cut
    /// off from NATS, or its queue to NATS full).
    Here,
    /// The fabric picks one broker per group, which gets the message
    /// through [`Router::publish_to_group`]; routing leaves groups alone.
    Fabric,
}

/// Session expiry that means "never": MQTT 5's 0xFFFFFFFF.
pub const NEVER_EXPIRES: u32 = u32::MAX;

#[derive(Clone, Default)]
struct RouterMetrics {
    sessions: Gauge,
    queued: Gauge,
    queue_full: Counter,
    retained: Gauge,
}

pub struct Router {
    index: RwLock<TopicIndex>,
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    retained: RwLock<BTreeMap<String, Arc<Message>>>,
    store: Arc<dyn SessionStore>,
    pub limits: QueueLimits,
    next_connection: AtomicU64,
    /// Picks the member of a shared subscription that gets a message.
    shared_turn: AtomicUsize,
    /// Subscriptions that can match `live/...`; while there are none, the
    /// store skips re-publishing.
    live_readers: AtomicUsize,
    /// Shared subscriptions in the index (members here and persistent
    /// members elsewhere); while there are none, a publish skips looking
    /// for them ([`Router::must_pick_here`]).
    shared_subscriptions: AtomicUsize,
    metrics: RouterMetrics,
    fabric: OnceLock<Arc<dyn Fabric>>,
    /// Subscriptions of the sessions held here (see [`Router::hold`]), by
    /// filter: the shared ones are this broker's members of their groups,
    /// the plain ones what it needs from other brokers. For the fabric.
    /// Taken before any session's lock.
    held_filters: Mutex<HashMap<Arc<str>, usize>>,
    /// The store holds persistent sessions' queues (a cluster's JetStream):
    /// see [`SessionStore::feeds_sessions`].
    store_feeds: bool,
}

/// Where a message being routed was published.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Through this broker: what must be durable is written here.
    Here,
    /// Through another broker of the cluster, which wrote it.
    Elsewhere,
}

/// Who picks the member of each shared subscription a routing matches.
#[derive(Clone, Copy)]
enum Pick<'a> {
    /// This broker, for every group ([`SharedChoice::Here`]).
    Here,
    /// The fabric: this routing leaves every group alone.
    Fabric,
    /// The fabric picked this broker for the shared subscription `filter`:
    /// one member of it gets the message, and nobody else here.
    Group(&'a str),
}

impl From<SharedChoice> for Pick<'_> {
    fn from(choice: SharedChoice) -> Self {
        match choice {
            SharedChoice::Here => Pick::Here,
            SharedChoice::Fabric => Pick::Fabric,
        }
    }
}

/// A session as a connection gets it.
pub struct Opened {
    pub session: Arc<Session>,
    /// CONNACK's session present flag.
    pub present: bool,
    /// This connection's number in the session.
    pub connection: u64,
    /// What was in flight when the previous connection ended.
    pub resend: Vec<Delivery>,
}

/// What became of one published message.
pub struct Published {
    /// Sessions it was queued for.
    pub queued: usize,
    /// Sessions whose queue was full, so they did not get it.
    pub refused: usize,
    /// Resolves when what must be durable is.
    pub commit: Commit,
}

impl Router {
    /// Loads what `store` kept and starts the expiry sweep.
    pub async fn start(
        store: Arc<dyn SessionStore>,
        limits: QueueLimits,
        registry: &mut Registry,
    ) -> Result<Arc<Router>, String> {
        let metrics = RouterMetrics::default();
        registry.register(
            "fleetgate_mqtt_sessions",
            "MQTT sessions held, connected or not",
            metrics.sessions.clone(),
        );
        registry.register(
            "fleetgate_mqtt_messages_queued",
            "Messages queued or in flight to MQTT sessions",
            metrics.queued.clone(),
        );
        registry.register(
            "fleetgate_mqtt_queue_full",
            "Deliveries refused because the session's queue was full",
            metrics.queue_full.clone(),
        );
        registry.register(
            "fleetgate_mqtt_retained_messages",
            "Retained messages held",
            metrics.retained.clone(),
        );
        let store_feeds = store.feeds_sessions();
        let router = Arc::new(Router {
            store_feeds,
            index: RwLock::default(),
            sessions: Mutex::default(),
            retained: RwLock::default(),
            store,
            limits,
            next_connection: AtomicU64::new(1),
            shared_turn: AtomicUsize::new(0),
            live_readers: AtomicUsize::new(0),
            shared_subscriptions: AtomicUsize::new(0),
            metrics,
            fabric: OnceLock::new(),
            held_filters: Mutex::default(),
        });
        router.restore().await?;
        tokio::spawn(sweep(Arc::downgrade(&router)));
        Ok(router)
    }

    async fn restore(&self) -> Result<(), String> {
        let snapshot = self.store.load().await?;
        let now = unix_now_ms();
        {
            let mut retained = self.retained.write().expect("retained lock");
            for message in snapshot.retained {
                if !message.expired(now) {
                    retained.insert(message.topic.to_string(), message);
                }
            }
        }
        let mut sessions = HashMap::new();
        for record in snapshot.sessions {
            let session = Session::new(record.client_id.as_str().into(), record.expiry_secs);
            {
                let mut state = session.lock();
                // A cluster's record without a detach time is held by a
                // broker that is up (or died holding it): it does not
                // expire until a broker records the device gone.
                state.detached_at_ms = match record.detached_at_ms {
                    None if self.store_feeds => None,
                    at => Some(at.unwrap_or(now)),
                };
                state.stored = true;
                // A cluster's device may come back to any broker; alone,
                // this broker is where it comes back.
                state.held_here = !self.store_feeds;
            }
            for (filter, options) in record.subscriptions {
                let _ = self.add_subscription(&session, &filter, options);
            }
            sessions.insert(session.client_id.clone(), session);
        }
        for stored in snapshot.queued {
            match sessions.get(&stored.client_id) {
                Some(session) => session.restore(Queued {
                    seq: stored.seq,
                    message: stored.message,
                    qos: stored.qos,
                    retain: stored.retain,
                    subscription_ids: stored.subscription_ids,
                    durable: true,
                }),
                None => {
                    self.tell(StoreOp::Settled(stored.client_id, stored.seq));
                }
            }
        }
        *self.sessions.lock().expect("sessions lock") = sessions;
        self.expire(now);
        Ok(())
    }

    /// Opens `client_id`'s session for a new connection: the one it has,
    /// unless `clean_start` asks for a new one. Subscriptions the client
    /// may no longer hold (`allowed` says no: its role changed) are
    /// dropped. The commit covers the session's record.
    pub fn open(
        &self,
        client_id: &str,
        clean_start: bool,
        expiry_secs: u32,
        allowed: impl Fn(&str) -> bool,
    ) -> (Opened, Commit) {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let existing = sessions.get(client_id).cloned();
        let (session, present) = match existing {
            Some(session) if !clean_start => (session, true),
            existing => {
                if let Some(old) = existing {
                    self.destroy(&mut sessions, &old);
                }
                let session = Session::new(client_id.into(), expiry_secs);
                sessions.insert(session.client_id.clone(), session.clone());
                (session, false)
            }
        };
        drop(sessions);
        let refused: Vec<String> = {
            let mut state = session.lock();
            state.expiry_secs = expiry_secs;
            state
                .subscriptions
                .keys()
                .filter(|f| !allowed(f))
                .cloned()
                .collect()
        };
        for filter in refused {
            self.remove_subscription(&session, &filter);
        }
        let connection = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let resend = session.attach(connection);
        self.hold(&session, true);
        let commit = if expiry_secs > 0 {
            session.lock().stored = true;
            let commit = self.store.submit(StoreOp::PutSession(record(&session)));
            if self.store_feeds {
                self.store.attached(&session, connection);
            }
            commit
        } else {
            crate::persist::committed()
        };
        (
            Opened {
                session,
                present,
                connection,
                resend,
            },
            commit,
        )
    }

    /// The connection ended. A session that ends with its connection goes;
    /// one with an expiry is kept (and its detach time recorded).
    pub fn close(&self, session: &Arc<Session>, connection: u64) {
        if !session.detach(connection) {
            // A newer connection has it.
            return;
        }
        if self.store_feeds {
            self.store.detached(session, connection);
        }
        if session.lock().expiry_secs == 0 {
            let mut sessions = self.sessions.lock().expect("sessions lock");
            if sessions
                .get(&session.client_id)
                .is_some_and(|s| Arc::ptr_eq(s, session))
            {
                self.destroy(&mut sessions, session);
            }
        } else {
            session.lock().stored = true;
            self.tell(StoreOp::PutSession(record(session)));
            if self.store_feeds {
                // Its queue is the store's: this broker need not be picked
                // for it, nor hear the others for it, until it is back.
                self.hold(session, false);
            }
        }
    }

    /// Sets how long `session` outlives its connection (MQTT 5 DISCONNECT).
    pub fn set_expiry(&self, session: &Arc<Session>, expiry_secs: u32) {
        session.lock().expiry_secs = expiry_secs;
    }

    fn destroy(&self, sessions: &mut HashMap<Arc<str>, Arc<Session>>, session: &Arc<Session>) {
        self.forget(sessions, session);
        if session.lock().stored {
            self.tell(StoreOp::DropSession(session.client_id.to_string()));
        }
    }

    /// Removes `session` from this broker only.
    fn forget(&self, sessions: &mut HashMap<Arc<str>, Arc<Session>>, session: &Arc<Session>) {
        sessions.remove(&session.client_id);
        let filters: Vec<String> = session.lock().subscriptions.keys().cloned().collect();
        for filter in filters {
            self.remove_subscription(session, &filter);
        }
        self.hold(session, false);
        session.drain();
    }

    /// Whether this broker holds `session` (`held`: a connection here has
    /// it, or, alone, had it last) or no longer does (it went, or another
    /// broker of the cluster took it up). The shared subscriptions of a session held
    /// here are this broker's members of those groups: while it has one,
    /// it takes part in picking the group's member for each message. Its
    /// plain subscriptions are this broker's interest: what the fabric must
    /// bring it from the others.
    ///
    /// In a cluster (the store feeds sessions) a persistent session whose
    /// device left is held by no broker: its QoS 1/2 messages are queued in
    /// the store by the broker they are published on, which knows every
    /// persistent session, so a group's QoS 0 messages and live copies go
    /// only to brokers with a member connected. Alone, a broker keeps
    /// holding it: it is where the device comes back.
    fn hold(&self, session: &Arc<Session>, held: bool) {
        let mut held_filters = self.held_filters.lock().expect("held filters lock");
        let filters: Vec<String> = {
            let mut state = session.lock();
            if state.held_here == held {
                return;
            }
            state.held_here = held;
            state.subscriptions.keys().cloned().collect()
        };
        for filter in filters {
            drop(self.count_held(&mut held_filters, &filter, held));
        }
    }

    /// Counts a subscription on `filter` of a session held here joining or
    /// leaving, and tells the fabric when the first joins or the last
    /// leaves: one queue subscription per group a broker has members of,
    /// and one interest per plain filter, however many sessions share it.
    fn count_held(
        &self,
        held_filters: &mut HashMap<Arc<str>, usize>,
        filter: &str,
        joined: bool,
    ) -> Option<Commit> {
        let changed = if joined {
            match held_filters.get_mut(filter) {
                Some(count) => {
                    *count += 1;
                    None
                }
                None => {
                    let filter: Arc<str> = filter.into();
                    held_filters.insert(filter.clone(), 1);
                    Some(filter)
                }
            }
        } else {
            let count = held_filters.get_mut(filter)?;
            *count -= 1;
            if *count > 0 {
                return None;
            }
            held_filters.remove_entry(filter).map(|(filter, _)| filter)
        };
        let fabric = self.fabric.get()?;
        changed.map(|filter| tell_fabric(&**fabric, &filter, joined))
    }

    /// Another broker of the cluster wrote `record`: the device is there
    /// now, or was last. This broker learns the session's subscriptions (so
    /// that what is published here is queued for it), and lets go of
    /// anything it still held for it: its queue is the store's.
    pub fn apply_remote_session(&self, record: SessionRecord) {
        let session = {
            let mut sessions = self.sessions.lock().expect("sessions lock");
            sessions
                .entry(record.client_id.as_str().into())
                .or_insert_with(|| Session::new(record.client_id.as_str().into(), 0))
                .clone()
        };
        if session.lock().attached != 0 {
            // Connected here after the other broker had it. If that broker
            // has since recorded the device gone, this broker's record
            // must be the last word.
            if record.detached_at_ms.is_some() {
                self.tell(StoreOp::PutSession(self::record(&session)));
            }
            return;
        }
        session.drain();
        // The device is on that broker now, or was last: its groups are
        // that broker's to take part in.
        self.hold(&session, false);
        {
            let mut state = session.lock();
            state.expiry_secs = record.expiry_secs;
            state.detached_at_ms = record.detached_at_ms;
            state.stored = true;
        }
        let wanted: HashMap<&str, SubOptions> = record
            .subscriptions
            .iter()
            .map(|(f, o)| (f.as_str(), *o))
            .collect();
        let gone: Vec<String> = session
            .lock()
            .subscriptions
            .keys()
            .filter(|f| !wanted.contains_key(f.as_str()))
            .cloned()
            .collect();
        for filter in gone {
            self.remove_subscription(&session, &filter);
        }
        for (filter, options) in wanted {
            let _ = self.add_subscription(&session, filter, options);
        }
    }

    /// Another broker of the cluster ended the session `client_id`.
    pub fn drop_remote_session(&self, client_id: &str) {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if let Some(session) = sessions.get(client_id).cloned() {
            // A connection here has a newer session of the client.
            if session.lock().attached == 0 {
                self.forget(&mut sessions, &session);
            }
        }
    }

    /// Another broker of the cluster retained `message` on `topic` (or
    /// cleared it).
    pub fn apply_remote_retained(&self, topic: String, message: Option<Arc<Message>>) {
        let mut retained = self.retained.write().expect("retained lock");
        match message {
            Some(message) => retained.insert(topic, message),
            None => retained.remove(&topic),
        };
    }

    /// Ends sessions whose expiry passed while no connection had them.
    fn expire(&self, now_ms: i64) {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let expired: Vec<Arc<Session>> = sessions
            .values()
            .filter(|s| {
                let state = s.lock();
                state.attached == 0
                    && state.expiry_secs != NEVER_EXPIRES
                    && state
                        .detached_at_ms
                        .is_some_and(|at| at + state.expiry_secs as i64 * 1000 <= now_ms)
            })
            .cloned()
            .collect();
        for session in expired {
            self.destroy(&mut sessions, &session);
        }
        self.metrics.sessions.set(sessions.len() as i64);
        let queued: usize = sessions.values().map(|s| s.pending()).sum();
        self.metrics.queued.set(queued as i64);
        drop(sessions);
        // Expired retained messages leave memory here; the store keeps them
        // until their topic is next written, and restore skips them.
        let mut retained = self.retained.write().expect("retained lock");
        retained.retain(|_, m| !m.expired(now_ms));
        self.metrics.retained.set(retained.len() as i64);
    }

    /// Adds or replaces a subscription; true if the session already had
    /// one on this filter (MQTT 5 retain handling 1 needs to know).
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        filter: &str,
        options: SubOptions,
    ) -> (bool, Commit) {
        let (existed, joined) = self.add_subscription(session, filter, options);
        let saved = self.save(session);
        let commit = match joined {
            // The first member here of a shared subscription: acknowledged
            // once the fabric hands this broker its share of the group's
            // messages, so none published after the SUBACK misses it.
            Some(joined) => Box::pin(async move {
                saved.await?;
                joined.await
            }),
            None => saved,
        };
        (existed, commit)
    }

    /// Removes a subscription; true if it existed.
    pub fn unsubscribe(&self, session: &Arc<Session>, filter: &str) -> (bool, Commit) {
        let existed = self.remove_subscription(session, filter);
        (existed, self.save(session))
    }

    fn save(&self, session: &Arc<Session>) -> Commit {
        if session.persistent() {
            session.lock().stored = true;
            self.store.submit(StoreOp::PutSession(record(session)))
        } else {
            crate::persist::committed()
        }
    }

    /// Adds a subscription; true if the session had one on `filter`
    /// already. For the first member held here of a shared subscription,
    /// also what resolves once the fabric knows.
    fn add_subscription(
        &self,
        session: &Arc<Session>,
        filter: &str,
        options: SubOptions,
    ) -> (bool, Option<Commit>) {
        let shared = split_shared(filter).0.map(|_| Arc::from(filter));
        // Under this lock, so that the session's held flag cannot change
        // between reading it and counting the subscription.
        let mut held_filters = self.held_filters.lock().expect("held filters lock");
        let (existed, held) = {
            let mut state = session.lock();
            let existed = state
                .subscriptions
                .insert(filter.to_string(), options)
                .is_some();
            (existed, state.held_here)
        };
        if !existed && can_receive_live(filter) {
            self.live_readers.fetch_add(1, Ordering::Relaxed);
        }
        if !existed && shared.is_some() {
            self.shared_subscriptions.fetch_add(1, Ordering::Relaxed);
        }
        self.index.write().expect("index lock").insert(
            filter,
            Subscriber {
                session: session.clone(),
                options,
                shared,
            },
        );
        let joined = if held && !existed {
            self.count_held(&mut held_filters, filter, true)
        } else {
            None
        };
        (existed, joined)
    }

    fn remove_subscription(&self, session: &Arc<Session>, filter: &str) -> bool {
        let mut held_filters = self.held_filters.lock().expect("held filters lock");
        let (existed, held) = {
            let mut state = session.lock();
            (
                state.subscriptions.remove(filter).is_some(),
                state.held_here,
            )
        };
        if existed {
            self.index
                .write()
                .expect("index lock")
                .remove(filter, &session.client_id);
            if can_receive_live(filter) {
                self.live_readers.fetch_sub(1, Ordering::Relaxed);
            }
            if split_shared(filter).0.is_some() {
                self.shared_subscriptions.fetch_sub(1, Ordering::Relaxed);
            }
            if held {
                drop(self.count_held(&mut held_filters, filter, false));
            }
        }
        existed
    }

    /// The retained messages a new subscription to `filter` gets.
    pub fn retained_for(&self, filter: &str) -> Vec<Arc<Message>> {
        let now = unix_now_ms();
        let (shared, inner) = split_shared(filter);
        if shared.is_some() {
            // MQTT 4.8.2: retained messages are not sent to shared subscriptions.
            return Vec::new();
        }
        self.retained
            .read()
            .expect("retained lock")
            .values()
            .filter(|m| {
                !m.expired(now) && fleetgate_protocol::topic::filter_matches(inner, &m.topic)
            })
            .cloned()
            .collect()
    }

    /// Queues a retained message for a session that just subscribed.
    pub fn deliver_retained(
        &self,
        session: &Arc<Session>,
        message: Arc<Message>,
        options: SubOptions,
    ) {
        let qos = message.qos.min(options.qos);
        let ids: Vec<u32> = options.id.into_iter().collect();
        // A store that feeds persistent sessions (JetStream) queues the copy
        // and feeds it to the session, like every message routed to them.
        // Not queued here as well: the store's copy would be a second one,
        // which the device's acknowledgement of the first settles only if
        // their sequence numbers (the session's, the stream's) happen to
        // agree and the store's was fed first. Otherwise it is delivered
        // twice and holds a place in the session's queue meanwhile, for good
        // if this broker dies first: the device's next broker then refuses
        // commands (0x97) to a queue that is not full. And a session number
        // equal to another message's stream sequence makes the feed skip it.
        if self.store_feeds && qos > 0 && message.durable && session.persistent() {
            self.tell(StoreOp::Enqueue(vec![StoredMessage {
                client_id: session.client_id.clone(),
                seq: 0,
                qos,
                // Sent because of a subscription: RETAIN is set (MQTT 3.3.1.3).
                retain: true,
                subscription_ids: ids,
                message,
            }]));
            return;
        }
        // Sent because of a subscription: RETAIN is set (MQTT 3.3.1.3).
        let _ = self.enqueue(session, message, qos, true, ids);
    }

    fn enqueue(
        &self,
        session: &Arc<Session>,
        message: Arc<Message>,
        qos: u8,
        retain: bool,
        ids: Vec<u32>,
    ) -> (Enqueued, Option<Commit>) {
        let mut commit = None;
        let outcome = session.enqueue(message, qos, retain, ids, self.limits, |queued| {
            // Submitted under the session's lock: its settlement cannot
            // reach the store first.
            commit = Some(self.store.submit(StoreOp::Enqueue(vec![StoredMessage {
                client_id: session.client_id.clone(),
                seq: queued.seq,
                qos: queued.qos,
                retain: queued.retain,
                subscription_ids: queued.subscription_ids.clone(),
                message: queued.message.clone(),
            }])));
        });
        if outcome == Enqueued::Full {
            self.metrics.queue_full.inc();
        }
        (outcome, commit)
    }

    /// Joins a cluster: from now on publishes go to `fabric` too, and it
    /// learns which shared subscriptions this broker has members of, and
    /// which plain filters its sessions subscribe to. Once.
    pub fn join(&self, fabric: Arc<dyn Fabric>) {
        let held_filters = self.held_filters.lock().expect("held filters lock");
        if self.fabric.set(fabric.clone()).is_ok() {
            for filter in held_filters.keys() {
                drop(tell_fabric(&*fabric, filter, true));
            }
        }
    }

    /// Tells the cluster's other brokers that `client_id` connected here.
    pub fn claim(&self, client_id: &str, connected_at_us: i64) {
        if let Some(fabric) = self.fabric.get() {
            fabric.claim(client_id, connected_at_us);
        }
    }

    /// Routes a message published through this broker: to this broker's
    /// sessions, and through the fabric to the others'. Shared
    /// subscriptions are left to the fabric while it can pick their members
    /// cluster-wide, so this broker takes its share like any other
    /// ([`Router::publish_to_group`]); otherwise it picks them itself.
    pub fn publish(&self, message: Message) -> Published {
        let choice = match self.fabric.get() {
            Some(fabric) => fabric.forward(&message, self.must_pick_here(&message)),
            None => SharedChoice::Here,
        };
        self.route(message, Origin::Here, choice.into())
    }

    /// Whether this broker, not the fabric, must pick the shared members of
    /// a message published here: when a persistent session may be picked
    /// and the message must be durable before its publisher is
    /// acknowledged. The fabric's pick crosses core NATS (at most once) and
    /// is queued after the PUBACK, so this broker picks, among the members
    /// it knows (its own, and every persistent session of the cluster), and
    /// queues the message in the store before acknowledging. Members held
    /// by other brokers without persistent sessions get no share of such
    /// messages.
    fn must_pick_here(&self, message: &Message) -> bool {
        if !self.store_feeds
            || !message.durable
            || message.qos == 0
            || self.shared_subscriptions.load(Ordering::Relaxed) == 0
        {
            return false;
        }
        let mut matches = Vec::new();
        self.index
            .read()
            .expect("index lock")
            .matches(&message.topic, &mut matches);
        matches
            .iter()
            .any(|s| s.shared.is_some() && s.session.persistent())
    }

    /// Routes a message to this broker's sessions only: one another broker
    /// of the cluster forwarded. `choice` is who picks shared
    /// subscriptions' members, as the sending broker decided.
    pub fn publish_remote(&self, message: Message, choice: SharedChoice) -> Published {
        self.route(message, Origin::Elsewhere, choice.into())
    }

    /// Routes a message to one member of the shared subscription `filter`
    /// and to nobody else: the fabric picked this broker for that group
    /// (and routed the message to the rest through [`Router::publish`] or
    /// [`Router::publish_remote`]).
    pub fn publish_to_group(&self, message: Message, filter: &str) -> Published {
        self.route(message, Origin::Elsewhere, Pick::Group(filter))
    }

    fn route(&self, message: Message, origin: Origin, pick: Pick<'_>) -> Published {
        let message = Arc::new(message);
        let mut commits: Vec<Commit> = Vec::new();
        let for_group = matches!(pick, Pick::Group(_));
        // This broker writes what must be durable for the sessions it
        // routes a message it was given to: anything published here, and
        // the member it picks of a group the cluster picked it for (no other
        // broker routes the message to that group).
        let writes_store = origin == Origin::Here || for_group;
        // With a shared store, other brokers' retained messages arrive
        // through it, in the order it holds them. A group's copy was
        // routed here already, or elsewhere.
        if !for_group && message.retain && (origin == Origin::Here || !self.store_feeds) {
            let mut retained = self.retained.write().expect("retained lock");
            let topic = message.topic.to_string();
            let stored = if message.payload.is_empty() {
                retained.remove(&topic);
                None
            } else {
                retained.insert(topic.clone(), message.clone());
                Some(message.clone())
            };
            if message.durable && origin == Origin::Here {
                commits.push(self.store.submit(StoreOp::Retain(topic, stored)));
            }
        }
        let mut matches = Vec::new();
        self.index
            .read()
            .expect("index lock")
            .matches(&message.topic, &mut matches);
        let publisher = message.publisher.as_deref();
        // One delivery per session for its plain subscriptions (the
        // highest QoS, every subscription id), one per shared subscription.
        let mut plain: HashMap<*const Session, Target> = HashMap::new();
        let mut shared: HashMap<Arc<str>, Vec<Subscriber>> = HashMap::new();
        for subscriber in matches {
            let options = subscriber.options;
            if options.no_local && publisher == Some(&*subscriber.session.client_id) {
                continue;
            }
            if let Some(key) = subscriber.shared.clone() {
                if matches!(pick, Pick::Group(filter) if filter != &*key) {
                    continue;
                }
                shared.entry(key).or_default().push(subscriber);
                continue;
            }
            if for_group {
                continue;
            }
            let target = plain
                .entry(Arc::as_ptr(&subscriber.session))
                .or_insert_with(|| Target {
                    session: subscriber.session.clone(),
                    granted: 0,
                    retain: false,
                    ids: Vec::new(),
                });
            target.granted = target.granted.max(options.qos);
            target.retain |= options.retain_as_published && message.retain;
            target.ids.extend(options.id);
        }
        let mut targets: Vec<Target> = plain.into_values().collect();
        let (mut queued, mut refused) = (0, 0);
        if matches!(pick, Pick::Fabric) {
            // Handed to the cluster: one member somewhere gets it.
            queued += shared.len();
        } else {
            for members in shared.into_values() {
                // Picking for the whole cluster (published here, the
                // fabric left the choice to this broker): members connected
                // anywhere take turns alike.
                let cluster_wide = matches!(pick, Pick::Here) && self.fabric.get().is_some();
                let chosen = self.pick_member(&members, &message, writes_store, cluster_wide);
                let options = chosen.options;
                targets.push(Target {
                    session: chosen.session.clone(),
                    granted: options.qos,
                    retain: options.retain_as_published && message.retain,
                    ids: options.id.into_iter().collect(),
                });
            }
        }
        for target in targets {
            let qos = message.qos.min(target.granted);
            if self.store_feeds {
                if qos > 0 && message.durable && target.session.persistent() {
                    // The store queues it, once, through the broker it was
                    // published on (or, for a shared subscription, the one
                    // the cluster picked); the device's broker feeds it
                    // from there.
                    if writes_store {
                        commits.push(self.store.submit(StoreOp::Enqueue(vec![StoredMessage {
                            client_id: target.session.client_id.clone(),
                            seq: 0,
                            qos,
                            retain: target.retain,
                            subscription_ids: target.ids,
                            message: message.clone(),
                        }])));
                        queued += 1;
                    }
                    continue;
                }
                if target.session.lock().attached == 0 {
                    // Known here only as another broker's (or an absent
                    // device's) persistent session.
                    continue;
                }
            }
            let (outcome, commit) = self.enqueue(
                &target.session,
                message.clone(),
                qos,
                target.retain,
                target.ids,
            );
            match outcome {
                Enqueued::Queued => queued += 1,
                Enqueued::Full => refused += 1,
                Enqueued::Skipped => {}
            }
            commits.extend(commit);
        }
        let commit: Commit = Box::pin(async move {
            for commit in commits {
                commit.await?;
            }
            Ok::<(), CommitError>(())
        });
        Published {
            queued,
            refused,
            commit,
        }
    }

    /// The member of a shared subscription that gets `message`, taking
    /// turns: one whose device is connected here (or, `cluster_wide`, a
    /// persistent one connected to another broker), if any. Else, if this
    /// broker writes the message to a store that queues it for persistent
    /// sessions (QoS 1/2, durable), a persistent member, those whose device
    /// is connected to another broker first. Else any member, as one broker
    /// alone would do (queued for an absent persistent session).
    fn pick_member<'m>(
        &self,
        members: &'m [Subscriber],
        message: &Message,
        writes_store: bool,
        cluster_wide: bool,
    ) -> &'m Subscriber {
        let queued_by_store = |s: &Subscriber| {
            self.store_feeds
                && writes_store
                && message.durable
                && message.qos.min(s.options.qos) > 0
                && s.session.persistent()
        };
        let connected_here = |s: &Subscriber| s.session.lock().attached != 0;
        // A cluster's record without a detach time: its device is connected
        // to another broker.
        let connected_elsewhere =
            |s: &Subscriber| queued_by_store(s) && s.session.lock().detached_at_ms.is_none();
        let connected =
            |s: &Subscriber| connected_here(s) || (cluster_wide && connected_elsewhere(s));
        let tiers: [&dyn Fn(&Subscriber) -> bool; 3] =
            [&connected, &connected_elsewhere, &queued_by_store];
        let pool: Vec<&Subscriber> = tiers
            .iter()
            .map(|tier| members.iter().filter(|s| tier(s)).collect::<Vec<_>>())
            .find(|pool| !pool.is_empty())
            .unwrap_or_else(|| members.iter().collect());
        let turn = self.shared_turn.fetch_add(1, Ordering::Relaxed);
        pool[turn % pool.len()]
    }

    /// A message left `session`'s queue for good (delivered, expired, or
    /// too large for the client): forget it in the store too.
    pub fn settle(&self, session: &Session, queued: &Queued) {
        if queued.durable {
            self.tell(StoreOp::Settled(session.client_id.clone(), queued.seq));
        }
    }

    /// Submits `op` without waiting for it: it is applied in order all the
    /// same, and nothing acknowledged depends on it.
    fn tell(&self, op: StoreOp) {
        drop(self.store.submit(op));
    }

    /// Resolves once everything submitted to the store so far is durable.
    pub async fn flush(&self) -> Result<(), String> {
        self.store
            .submit(StoreOp::Enqueue(Vec::new()))
            .await
            .map_err(|e| e.to_string())
    }
}

/// One session a message goes to, and how.
struct Target {
    session: Arc<Session>,
    /// The highest QoS its matching subscriptions granted.
    granted: u8,
    retain: bool,
    ids: Vec<u32>,
}

fn record(session: &Session) -> SessionRecord {
    let state = session.lock();
    SessionRecord {
        client_id: session.client_id.to_string(),
        expiry_secs: state.expiry_secs,
        subscriptions: state
            .subscriptions
            .iter()
            .map(|(f, o)| (f.clone(), *o))
            .collect(),
        detached_at_ms: state.detached_at_ms,
    }
}

/// Filters that may match `live/...` topics.
fn can_receive_live(filter: &str) -> bool {
    let (_, inner) = split_shared(filter);
    let first = inner.split('/').next().unwrap_or("");
    matches!(first, "live" | "+" | "#")
}

async fn sweep(router: std::sync::Weak<Router>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(router) = router.upgrade() else {
            return;
        };
        router.expire(unix_now_ms());
    }
}

/// Tells `fabric` that sessions held here hold subscriptions on `filter`
/// (`held`), or no longer do.
fn tell_fabric(fabric: &dyn Fabric, filter: &Arc<str>, held: bool) -> Commit {
    if split_shared(filter).0.is_some() {
        fabric.share(filter, held)
    } else {
        fabric.interest(filter, held)
    }
}

impl LiveSink for Router {
    fn wanted(&self) -> bool {
        // In a cluster, readers may be on other brokers: only NATS knows.
        self.live_readers.load(Ordering::Relaxed) > 0 || self.fabric.get().is_some()
    }

    fn publish(&self, topic: String, payload: Bytes) {
        let _ = self.publish(Message::live_copy(topic, payload));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::MemoryStore;

    async fn router() -> Arc<Router> {
        Router::start(
            Arc::new(MemoryStore),
            QueueLimits::default(),
            &mut Registry::default(),
        )
        .await
        .unwrap()
    }

    fn message(topic: &str, qos: u8, publisher: &str) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"m"),
            qos,
            retain: false,
            properties: None,
            expires_at_ms: None,
            publisher: Some(publisher.into()),
            durable: true,
        }
    }

    fn delivered(session: &Session) -> Vec<(u8, Vec<u32>)> {
        let connection = session.lock().attached;
        session
            .take(connection, 100, 0, &mut vec![])
            .into_iter()
            .filter_map(|d| match d {
                Delivery::Publish { queued, .. } => Some((queued.qos, queued.subscription_ids)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn delivery_qos_is_the_lower_of_published_and_granted() {
        let router = router().await;
        let (opened, _) = router.open("s", true, 0, |_| true);
        let sub = |qos, id| SubOptions {
            qos,
            id: Some(id),
            ..Default::default()
        };
        let _ = router.subscribe(&opened.session, "a/+", sub(2, 1));
        let _ = router.subscribe(&opened.session, "a/b", sub(1, 2));
        router.publish(message("a/b", 0, "p"));
        router.publish(message("a/b", 2, "p"));
        let got = delivered(&opened.session);
        // One delivery per message for overlapping subscriptions, at the
        // highest granted QoS, naming both subscriptions.
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, 0);
        assert_eq!(got[1].0, 2);
        let mut ids = got[1].1.clone();
        ids.sort();
        assert_eq!(ids, vec![1, 2]);
    }

    #[tokio::test]
    async fn no_local_skips_the_publishers_own_session() {
        let router = router().await;
        let (opened, _) = router.open("me", true, 0, |_| true);
        let options = SubOptions {
            qos: 1,
            no_local: true,
            ..Default::default()
        };
        let _ = router.subscribe(&opened.session, "t", options);
        assert_eq!(router.publish(message("t", 1, "me")).queued, 0);
        assert_eq!(router.publish(message("t", 1, "other")).queued, 1);
    }

    #[tokio::test]
    async fn a_shared_group_gets_each_message_once() {
        let router = router().await;
        let a = router.open("a", true, 0, |_| true).0.session;
        let b = router.open("b", true, 0, |_| true).0.session;
        for s in [&a, &b] {
            let _ = router.subscribe(
                s,
                "$share/g/t",
                SubOptions {
                    qos: 1,
                    ..Default::default()
                },
            );
        }
        for _ in 0..10 {
            assert_eq!(router.publish(message("t", 1, "p")).queued, 1);
        }
        assert_eq!(delivered(&a).len() + delivered(&b).len(), 10);
    }

    /// A fabric that records what the router tells it, up or cut off.
    #[derive(Default)]
    struct RecordingFabric {
        cut_off: std::sync::atomic::AtomicBool,
        shares: Mutex<Vec<(String, bool)>>,
        interests: Mutex<Vec<(String, bool)>>,
    }

    impl Fabric for RecordingFabric {
        fn forward(&self, _: &Message, sender_picks: bool) -> SharedChoice {
            if sender_picks || self.cut_off.load(Ordering::Relaxed) {
                SharedChoice::Here
            } else {
                SharedChoice::Fabric
            }
        }

        fn claim(&self, _: &str, _: i64) {}

        fn share(&self, filter: &Arc<str>, held: bool) -> Commit {
            self.shares.lock().unwrap().push((filter.to_string(), held));
            crate::persist::committed()
        }

        fn interest(&self, filter: &Arc<str>, held: bool) -> Commit {
            self.interests
                .lock()
                .unwrap()
                .push((filter.to_string(), held));
            crate::persist::committed()
        }
    }

    impl RecordingFabric {
        fn shares(&self) -> Vec<(String, bool)> {
            std::mem::take(&mut *self.shares.lock().unwrap())
        }

        fn interests(&self) -> Vec<(String, bool)> {
            std::mem::take(&mut *self.interests.lock().unwrap())
        }
    }

    /// The fabric hears of each plain filter once, when the first session
    /// held here subscribes to it and when the last one here lets go;
    /// sessions another broker holds add no interest here.
    #[tokio::test]
    async fn plain_filters_held_here_are_the_fabrics_interest() {
        let (router, fabric) = router_in_cluster().await;
        let a = router.open("a", true, 0, |_| true).0.session;
        let b = router.open("b", true, 0, |_| true).0.session;
        let _ = router.subscribe(&a, "live/#", qos1());
        let _ = router.subscribe(&b, "live/#", qos1());
        let _ = router.subscribe(&b, "devices/b/cmd", qos1());
        assert_eq!(
            fabric.interests(),
            [
                ("live/#".to_string(), true),
                ("devices/b/cmd".to_string(), true)
            ]
        );
        let _ = router.unsubscribe(&a, "live/#");
        assert!(fabric.interests().is_empty(), "b still reads live/#");
        // b's connection ends: its session goes, and with it the interest.
        let b_connection = router.open("b", false, 0, |_| true).0.connection;
        assert!(fabric.interests().is_empty(), "taken up here again");
        router.close(&b, b_connection);
        let mut gone = fabric.interests();
        gone.sort();
        assert_eq!(
            gone,
            [
                ("devices/b/cmd".to_string(), false),
                ("live/#".to_string(), false)
            ]
        );
        // Another broker's persistent session: known here, held there.
        router.apply_remote_session(SessionRecord {
            client_id: "c".into(),
            expiry_secs: 3600,
            subscriptions: vec![("remote/#".into(), qos1())],
            detached_at_ms: None,
        });
        assert!(fabric.interests().is_empty());
        assert!(fabric.shares().is_empty());
    }

    async fn router_in_cluster() -> (Arc<Router>, Arc<RecordingFabric>) {
        let router = router().await;
        let fabric = Arc::new(RecordingFabric::default());
        router.join(fabric.clone());
        (router, fabric)
    }

    fn qos1() -> SubOptions {
        SubOptions {
            qos: 1,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_shared_group_spanning_brokers_is_left_to_the_fabric() {
        let (router, fabric) = router_in_cluster().await;
        let group = "$share/g/t/#";
        let a = router.open("a", true, 0, |_| true).0;
        let b = router.open("b", true, 0, |_| true).0;
        let plain = router.open("p", true, 0, |_| true).0.session;
        for member in [&a, &b] {
            let _ = router.subscribe(&member.session, group, qos1());
        }
        let _ = router.subscribe(&plain, "t/#", qos1());
        // One queue subscription for the group, however many members.
        assert_eq!(fabric.shares(), [(group.to_string(), true)]);

        // Published here or elsewhere: plain subscribers only; the group's
        // copy is the fabric's to hand to one broker (counted as queued).
        assert_eq!(router.publish(message("t/1", 1, "x")).queued, 2);
        let _ = router.publish_remote(message("t/2", 1, "x"), SharedChoice::Fabric);
        assert_eq!(delivered(&plain).len(), 2);
        assert_eq!(delivered(&a.session).len() + delivered(&b.session).len(), 0);

        // Picked by the fabric: one member gets it, and nobody else.
        for i in 0..10 {
            let to_group = router.publish_to_group(message(&format!("t/{i}"), 1, "x"), group);
            assert_eq!(to_group.queued, 1);
        }
        let (got_a, got_b) = (delivered(&a.session).len(), delivered(&b.session).len());
        assert_eq!(got_a + got_b, 10);
        assert!(got_a > 0 && got_b > 0, "members take turns");
        assert!(delivered(&plain).is_empty());
        // Another group's pick does not reach this one.
        let other = router.publish_to_group(message("t/1", 1, "x"), "$share/h/t/#");
        assert_eq!(other.queued, 0);

        // The queue subscription goes with the last member here.
        let _ = router.unsubscribe(&a.session, group);
        assert!(fabric.shares().is_empty());
        router.close(&b.session, b.connection);
        assert_eq!(fabric.shares(), [(group.to_string(), false)]);
    }

    #[tokio::test]
    async fn a_broker_cut_off_from_the_fabric_picks_shared_members_itself() {
        let (router, fabric) = router_in_cluster().await;
        fabric.cut_off.store(true, Ordering::Relaxed);
        let a = router.open("a", true, 0, |_| true).0.session;
        let b = router.open("b", true, 0, |_| true).0.session;
        for member in [&a, &b] {
            let _ = router.subscribe(member, "$share/g/t", qos1());
        }
        for _ in 0..4 {
            assert_eq!(router.publish(message("t", 1, "x")).queued, 1);
        }
        assert_eq!(delivered(&a).len() + delivered(&b).len(), 4);
        // Heard from another broker that picked for itself: left alone.
        let _ = router.publish_remote(message("t", 1, "x"), SharedChoice::Fabric);
        assert_eq!(delivered(&a).len() + delivered(&b).len(), 0);
    }

    #[tokio::test]
    async fn groups_held_before_joining_are_told_to_the_fabric() {
        let router = router().await;
        let a = router.open("a", true, 0, |_| true).0.session;
        let _ = router.subscribe(&a, "$share/g/t", qos1());
        let fabric = Arc::new(RecordingFabric::default());
        router.join(fabric.clone());
        assert_eq!(fabric.shares(), [("$share/g/t".to_string(), true)]);
    }

    /// A cluster's store (JetStream, as the router sees it): it queues
    /// persistent sessions' messages, recorded here by client id.
    #[derive(Default)]
    struct FeedingStore {
        queued_for: Mutex<Vec<String>>,
    }

    impl SessionStore for FeedingStore {
        fn load(
            &self,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<Output = Result<crate::persist::Snapshot, String>>
                    + Send
                    + '_,
            >,
        > {
            Box::pin(async { Ok(Default::default()) })
        }

        fn submit(&self, op: StoreOp) -> Commit {
            if let StoreOp::Enqueue(messages) = op {
                let mut queued = self.queued_for.lock().unwrap();
                queued.extend(messages.iter().map(|m| m.client_id.to_string()));
            }
            crate::persist::committed()
        }

        fn feeds_sessions(&self) -> bool {
            true
        }
    }

    /// A broker of a cluster: its store feeds persistent sessions, and its
    /// fabric records what it is told.
    async fn clustered() -> (Arc<FeedingStore>, Arc<Router>, Arc<RecordingFabric>) {
        let store = Arc::new(FeedingStore::default());
        let router = Router::start(
            store.clone(),
            QueueLimits::default(),
            &mut Registry::default(),
        )
        .await
        .unwrap();
        let fabric = Arc::new(RecordingFabric::default());
        router.join(fabric.clone());
        (store, router, fabric)
    }

    #[tokio::test]
    async fn a_persistent_member_elsewhere_is_queued_once_by_the_broker_picked() {
        let (store, router, fabric) = clustered().await;
        let group = "$share/g/t";
        // A worker with a persistent session, connected to another broker.
        router.apply_remote_session(SessionRecord {
            client_id: "w".into(),
            expiry_secs: 3600,
            subscriptions: vec![(group.into(), qos1())],
            detached_at_ms: None,
        });
        // Its broker holds the group's queue subscription, not this one.
        assert!(fabric.shares().is_empty());
        let queued_for = || std::mem::take(&mut *store.queued_for.lock().unwrap());

        // A durable QoS 1 message: the publishing broker picks and queues,
        // once, before its PUBACK (the fabric would cross core NATS first);
        // a broker hearing it leaves the group alone.
        let _ = router.publish(message("t", 1, "x"));
        assert_eq!(queued_for(), ["w"]);
        let _ = router.publish_remote(message("t", 1, "x"), SharedChoice::Fabric);
        assert!(queued_for().is_empty());
        // QoS 0 is left to the fabric; the broker it picks queues for the
        // persistent member.
        let _ = router.publish(message("t", 0, "x"));
        assert!(queued_for().is_empty());
        let _ = router.publish_to_group(message("t", 1, "x"), group);
        assert_eq!(queued_for(), ["w"]);

        // A member connected here comes first.
        let here = router.open("h", true, 0, |_| true).0.session;
        let _ = router.subscribe(&here, group, qos1());
        assert_eq!(fabric.shares(), [(group.to_string(), true)]);
        let _ = router.publish_to_group(message("t", 1, "x"), group);
        assert!(queued_for().is_empty());
        assert_eq!(delivered(&here).len(), 1);
    }

    #[tokio::test]
    async fn a_persistent_member_is_held_while_its_device_is_connected_here() {
        let (store, router, fabric) = clustered().await;
        let group = "$share/g/t";
        let opened = router.open("w", false, 3600, |_| true).0;
        let _ = router.subscribe(&opened.session, group, qos1());
        assert_eq!(fabric.shares(), [(group.to_string(), true)]);
        // Away: no longer a member the fabric may pick this broker for (a
        // QoS 0 message would be lost on it), but the broker a durable
        // message is published on queues it for the session.
        router.close(&opened.session, opened.connection);
        assert_eq!(fabric.shares(), [(group.to_string(), false)]);
        let _ = router.publish(message("t", 1, "x"));
        assert_eq!(*store.queued_for.lock().unwrap(), ["w"]);
        // The device reconnected to another broker, which holds it now.
        router.apply_remote_session(SessionRecord {
            client_id: "w".into(),
            expiry_secs: 3600,
            subscriptions: vec![(group.into(), qos1())],
            detached_at_ms: None,
        });
        assert!(fabric.shares().is_empty());
        // And back here.
        let again = router.open("w", false, 3600, |_| true).0;
        assert!(again.present);
        assert_eq!(fabric.shares(), [(group.to_string(), true)]);
    }

    #[tokio::test]
    async fn a_retained_message_for_a_persistent_session_is_queued_by_the_feeding_store_only() {
        let store = Arc::new(FeedingStore::default());
        let router = Router::start(
            store.clone(),
            QueueLimits::default(),
            &mut Registry::default(),
        )
        .await
        .unwrap();
        let mut retained = message("devices/d/config", 1, "admin");
        retained.retain = true;
        let retained = Arc::new(retained);
        // Persistent: one copy, the store's, which feeds it to the session.
        let persistent = router.open("d", false, 3600, |_| true).0.session;
        router.deliver_retained(&persistent, retained.clone(), qos1());
        assert_eq!(*store.queued_for.lock().unwrap(), ["d"]);
        assert!(delivered(&persistent).is_empty());
        // Gone with its connection: queued here, as the store keeps nothing.
        let passing = router.open("p", true, 0, |_| true).0.session;
        router.deliver_retained(&passing, retained, qos1());
        assert_eq!(*store.queued_for.lock().unwrap(), ["d"]);
        assert_eq!(delivered(&passing).len(), 1);
    }

    #[tokio::test]
    async fn a_session_kept_open_gets_what_came_while_it_was_away() {
        let router = router().await;
        let (opened, _) = router.open("d", false, 3600, |_| true);
        let _ = router.subscribe(
            &opened.session,
            "devices/d/cmd",
            SubOptions {
                qos: 1,
                ..Default::default()
            },
        );
        router.close(&opened.session, opened.connection);
        assert_eq!(
            router.publish(message("devices/d/cmd", 1, "admin")).queued,
            1
        );
        let (again, _) = router.open("d", false, 3600, |_| true);
        assert!(again.present);
        assert_eq!(delivered(&again.session).len(), 1);
        // A clean start throws the session away.
        router.close(&again.session, again.connection);
        let (fresh, _) = router.open("d", true, 0, |_| true);
        assert!(!fresh.present);
        assert_eq!(
            router.publish(message("devices/d/cmd", 1, "admin")).queued,
            0
        );
    }

    #[tokio::test]
    async fn subscriptions_the_role_no_longer_allows_are_dropped_on_resume() {
        let router = router().await;
        let (opened, _) = router.open("d", false, 3600, |_| true);
        let _ = router.subscribe(&opened.session, "#", SubOptions::default());
        router.close(&opened.session, opened.connection);
        let (again, _) = router.open("d", false, 3600, |f| f != "#");
        assert!(again.session.lock().subscriptions.is_empty());
        assert_eq!(router.publish(message("x", 1, "p")).queued, 0);
    }
}
