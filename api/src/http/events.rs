//! `GET /v1/events`: what the dashboard shows live, pushed as server-sent
//! events instead of polled. Each part is sent when a client connects and
//! again whenever it changes:
//!
//! - `counters`: `{"counters": {"<stream>": rows, ...}}`, the answer to
//!   `SELECT count(*) FROM <stream>` on the query path `/v1/query` takes;
//! - `alerts`: `{"alerts": [...]}`, the newest anomaly alerts, as
//!   `/v1/alerts` lists them;
//! - `rejects`: `{"rejects": {"<stream>": [...]}}`, each stream's newest
//!   rejects, as `/v1/streams/{name}/rejects`;
//! - `runs`: `{"runs": [...]}`, the newest ETL runs, as `/v1/etl/runs`;
//! - `reconciliations`: `{"reconciliations": [...]}`, as
//!   `/v1/reconciliations`;
//! - `end`: `{"status": 401, "error": "..."}`, the last event of a stream
//!   whose token no longer reads (revoked, banned, expired, role lowered).
//!
//! and a `: heartbeat` comment every 15 s of silence.
//!
//! One task (the hub) reads these for all clients, and only while at least
//! one is connected: after a commit to a stream (the local store's commit
//! observer) it counts that stream again, after an alert (the analyses'
//! live sink) or an ETL run it reads the lists again; every [`TICK`] it
//! reads the lists, and every [`RECOUNT`] (every tick without a local
//! store, in a cluster's broker) counts every stream. It pauses at least
//! [`MIN_PAUSE`] between reads, longer when reading took long. A client
//! holds a receiver of the hub's snapshot and one of the registry's events
//! (to end at once when its device is revoked), nothing else; its stream
//! ends when the client goes away.

use std::collections::HashSet;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use fleetgate_admin::{unix_now, RegistryEvent};
use fleetgate_protocol::ingest::LiveSink;
use fleetgate_protocol::{Principal, Role};
use fleetgate_store::pipeline::{CommitObserver, Work};
use fleetgate_store::rejects;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::{json, Map, Value};
use tokio::sync::{broadcast, watch, Notify};

use super::{bearer_token, ApiError, AppState, Caller};

/// Silence after which a heartbeat comment is sent.
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// How often the lists (alerts, runs, reconciliations) are read at least.
const TICK: Duration = Duration::from_secs(5);
/// How often every stream is counted at least, with a local store.
const RECOUNT: Duration = Duration::from_secs(30);
/// The shortest pause between two reads.
const MIN_PAUSE: Duration = Duration::from_secs(1);
/// Alerts, ETL runs, reconciliations and rejects per stream sent.
const NEWEST_ALERTS: i64 = 10;
const NEWEST_RUNS: i64 = 5;
const NEWEST_RECONCILIATIONS: i64 = 5;
const NEWEST_REJECTS: i64 = 5;

/// The parts of a snapshot, in the order a new client gets them.
const PARTS: [&str; 5] = ["counters", "alerts", "rejects", "runs", "reconciliations"];

/// What the hub publishes to the clients.
#[derive(Clone)]
enum Hub {
    /// Nobody was listening: no snapshot yet; a client waits for one.
    Idle,
    /// Each part's JSON, as in [`PARTS`].
    Ready(Arc<[Arc<str>; PARTS.len()]>),
    /// The server is shutting down: every stream ends.
    Closed,
}

/// The hub: the newest snapshot, and what changed since it was read.
pub struct Events {
    snapshot: watch::Sender<Hub>,
    /// Wakes the hub: a client arrived, or something changed.
    wake: Notify,
    dirty: Mutex<Dirty>,
    /// Set once a local store reports its commits.
    commits_observed: AtomicBool,
    /// Open `/v1/events` streams.
    open: Gauge,
}

#[derive(Default)]
struct Dirty {
    /// Streams to count again.
    streams: HashSet<String>,
}

impl Events {
    pub fn new(metrics: &mut prometheus_client::registry::Registry) -> Arc<Events> {
        let open = Gauge::default();
        metrics.register(
            "fleetgate_http_event_streams",
            "Open /v1/events streams (dashboards following live changes)",
            open.clone(),
        );
        Arc::new(Events {
            snapshot: watch::channel(Hub::Idle).0,
            wake: Notify::new(),
            dirty: Mutex::default(),
            commits_observed: AtomicBool::new(false),
            open,
        })
    }

    /// Whether anyone is listening; nothing is noted while nobody is.
    fn listened(&self) -> bool {
        self.snapshot.receiver_count() > 0
    }

    /// The observer a local store calls after each commit.
    pub fn commit_observer(self: &Arc<Self>) -> Arc<dyn CommitObserver> {
        self.commits_observed.store(true, Ordering::Relaxed);
        Arc::new(CommitSignal(self.clone()))
    }

    /// `inner`, telling the hub of what goes through it (the analyses'
    /// alerts).
    pub fn live_tap(self: &Arc<Self>, inner: Arc<dyn LiveSink>) -> Arc<dyn LiveSink> {
        Arc::new(LiveTap {
            inner,
            events: self.clone(),
        })
    }

    /// The observer of ETL runs: a run's end changes the runs listed.
    pub fn run_observer(self: &Arc<Self>) -> fleetgate_etl::RunObserver {
        let events = self.clone();
        Arc::new(move |_: &fleetgate_etl::run::RunRecord| events.changed())
    }

    /// Something the lists show changed.
    fn changed(&self) {
        if self.listened() {
            self.wake.notify_one();
        }
    }

    /// Ends every stream (at shutdown, so the HTTP server can finish).
    pub fn close(&self) {
        self.snapshot.send_replace(Hub::Closed);
    }

    /// Starts the hub, which reads through `state`.
    pub fn start(self: &Arc<Self>, state: AppState) {
        let events = self.clone();
        tokio::spawn(async move { events.run(state).await });
    }

    async fn run(&self, state: AppState) {
        // Every client holds the extract role at least, which is all that
        // reading these takes; the query path takes a principal only to
        // check that role.
        let reader = Principal {
            device_id: "fleetgate-dashboard-events".into(),
            role: Role::Extract,
            device_type: None,
            expires_at: i64::MAX,
        };
        let mut read = Read::default();
        loop {
            if matches!(*self.snapshot.borrow(), Hub::Closed) {
                return;
            }
            if !self.listened() {
                // Forgotten, so the next client waits for a fresh read.
                self.snapshot.send_if_modified(|hub| match hub {
                    Hub::Closed => false,
                    _ => {
                        *hub = Hub::Idle;
                        false
                    }
                });
                read = Read::default();
                self.wake.notified().await;
                continue;
            }
            let started = Instant::now();
            let recount_all = !self.commits_observed.load(Ordering::Relaxed)
                || read.counted_all.is_none_or(|at| at.elapsed() >= RECOUNT);
            let dirty = std::mem::take(&mut self.dirty.lock().expect("dirty").streams);
            let parts = read.next(&state, &reader, recount_all, &dirty).await;
            self.snapshot.send_if_modified(|hub| match hub {
                Hub::Ready(old) if *old == parts => false,
                Hub::Closed => false,
                _ => {
                    *hub = Hub::Ready(parts);
                    true
                }
            });
            let pause = MIN_PAUSE.max(started.elapsed() * 4);
            tokio::time::sleep(pause).await;
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(TICK.saturating_sub(pause)) => {}
            }
        }
    }
}

/// The hub's reads, kept between passes so that a stream nothing was
/// committed to is not counted again.
#[derive(Default)]
struct Read {
    /// Per stream: rows and newest rejects, in catalog order.
    streams: Vec<(String, Value, Value)>,
    counted_all: Option<Instant>,
    /// The parts last published, so that an unreadable part keeps its
    /// value, and an unchanged one its allocation.
    parts: Option<Arc<[Arc<str>; PARTS.len()]>>,
}

impl Read {
    async fn next(
        &mut self,
        state: &AppState,
        reader: &Principal,
        recount_all: bool,
        dirty: &HashSet<String>,
    ) -> Arc<[Arc<str>; PARTS.len()]> {
        let mut streams = Vec::new();
        for stream in state.catalog.list() {
            let name = &stream.name;
            let known = self.streams.iter().find(|(n, ..)| n == name);
            match known {
                Some(known) if !recount_all && !dirty.contains(name) => {
                    streams.push(known.clone());
                    continue;
                }
                _ => {}
            }
            let sql = format!("SELECT count(*) FROM {name}");
            let answer = match state.queries.answer(reader, "dashboard", &sql).await {
                Ok(answer) => answer.collect(&state.queries).await,
                Err(e) => Err(e),
            };
            let rows = match answer {
                Ok(result) => result
                    .rows
                    .first()
                    .and_then(|row| row.first())
                    .cloned()
                    .unwrap_or(Value::Null),
                Err(e) => {
                    tracing::warn!(stream = name, error = %e, "events: cannot count the stream");
                    known.map_or(Value::Null, |k| k.1.clone())
                }
            };
            let newest = match rejects::list(&state.db, name, NEWEST_REJECTS, None).await {
                Ok(list) => json!(list),
                Err(e) => {
                    tracing::warn!(stream = name, error = %e, "events: cannot read rejects");
                    known.map_or(json!([]), |k| k.2.clone())
                }
            };
            streams.push((name.clone(), rows, newest));
        }
        self.streams = streams;
        if recount_all {
            self.counted_all = Some(Instant::now());
        }
        let counters: Map<String, Value> = self
            .streams
            .iter()
            .map(|(name, rows, _)| (name.clone(), rows.clone()))
            .collect();
        let rejected: Map<String, Value> = self
            .streams
            .iter()
            .map(|(name, _, rejects)| (name.clone(), rejects.clone()))
            .collect();
        let fresh: [Option<Value>; PARTS.len()] = [
            Some(json!({ "counters": counters })),
            state
                .analyses
                .alerts(NEWEST_ALERTS)
                .await
                .map(|alerts| json!({ "alerts": alerts }))
                .map_err(|e| tracing::warn!(error = %e, "events: cannot read alerts"))
                .ok(),
            Some(json!({ "rejects": rejected })),
            state
                .etl
                .runs(None, NEWEST_RUNS)
                .await
                .map(|runs| json!({ "runs": runs }))
                .map_err(|e| tracing::warn!(error = %e, "events: cannot read ETL runs"))
                .ok(),
            state
                .reports
                .reconciliations(None, NEWEST_RECONCILIATIONS)
                .await
                .map(|list| json!({ "reconciliations": list }))
                .map_err(|e| tracing::warn!(error = %e, "events: cannot read reconciliations"))
                .ok(),
        ];
        let previous = self.parts.take();
        let parts: [Arc<str>; PARTS.len()] = std::array::from_fn(|i| {
            let old = previous.as_ref().map(|p| p[i].clone());
            match (&fresh[i], old) {
                (Some(value), Some(old)) if *old == *value.to_string() => old,
                (Some(value), _) => Arc::from(value.to_string()),
                (None, Some(old)) => old,
                // Unreadable from the start: the part's empty form.
                (None, None) => Arc::from(json!({ (PARTS[i]): [] }).to_string()),
            }
        });
        let parts = Arc::new(parts);
        self.parts = Some(parts.clone());
        parts
    }
}

/// Notes the streams a commit wrote to (stored records or rejects).
struct CommitSignal(Arc<Events>);

impl CommitObserver for CommitSignal {
    fn committed(&self, works: &[Work]) {
        if !self.0.listened() {
            return;
        }
        let mut noted = false;
        {
            let mut dirty = self.0.dirty.lock().expect("dirty");
            for work in works {
                let Some(stream) = &work.stream else { continue };
                if work.records.is_empty() && work.rejects.is_empty() {
                    continue;
                }
                if !dirty.streams.contains(&stream.name) {
                    dirty.streams.insert(stream.name.clone());
                }
                noted = true;
            }
        }
        if noted {
            self.0.wake.notify_one();
        }
    }
}

struct LiveTap {
    inner: Arc<dyn LiveSink>,
    events: Arc<Events>,
}

impl LiveSink for LiveTap {
    fn wanted(&self) -> bool {
        self.inner.wanted()
    }

    fn publish(&self, topic: String, payload: Bytes) {
        self.inner.publish(topic, payload);
        self.events.changed();
    }
}

/// `GET /v1/events`: extract or admin, by the `Authorization` header as
/// every route (so the token never lands in a URL or a log).
pub async fn stream(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = caller.require(Role::Extract, &state)?.clone();
    let token = bearer_token(&headers)?.to_string();
    // Subscribed before the first snapshot is read, so no revocation
    // between them is missed.
    let registry = state.registry.subscribe();
    let snapshot = state.events.snapshot.subscribe();
    state.events.wake.notify_one();
    state.events.open.inc();
    let client = Client {
        snapshot,
        registry: Some(registry),
        expires: Box::pin(tokio::time::sleep(until(principal.expires_at))),
        sent: Default::default(),
        pending: Vec::new(),
        ended: false,
        token,
        device: principal.device_id,
        state,
    };
    let events = futures::stream::unfold(client, |mut client| async move {
        let event = client.next().await?;
        Some((Ok::<_, Infallible>(event), client))
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(HEARTBEAT).text("heartbeat"))
        .into_response();
    // Proxies that buffer responses would hold the events back.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// How long until a token expiring at `expires_at` (Unix seconds) does.
fn until(expires_at: i64) -> Duration {
    // A day at most: the check runs again then, and a far deadline
    // cannot overflow the timer.
    Duration::from_secs(expires_at.saturating_sub(unix_now()).clamp(1, 86_400) as u64)
}

/// The next registry event; never, once the channel is gone.
async fn registry_event(
    registry: &mut Option<broadcast::Receiver<RegistryEvent>>,
) -> Option<Result<RegistryEvent, broadcast::error::RecvError>> {
    match registry {
        Some(events) => Some(events.recv().await),
        None => std::future::pending().await,
    }
}

/// One client's stream.
struct Client {
    snapshot: watch::Receiver<Hub>,
    /// `None` once the registry's channel is gone.
    registry: Option<broadcast::Receiver<RegistryEvent>>,
    expires: Pin<Box<tokio::time::Sleep>>,
    /// What this client was last sent of each part.
    sent: [Option<Arc<str>>; PARTS.len()],
    /// Events to send before waiting again, the next last.
    pending: Vec<Event>,
    ended: bool,
    token: String,
    device: String,
    state: AppState,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.state.events.open.dec();
    }
}

impl Client {
    /// The next event, or `None` when the stream ends.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop() {
                return Some(event);
            }
            if self.ended {
                return None;
            }
            let hub = self.snapshot.borrow_and_update().clone();
            match hub {
                Hub::Closed => return None,
                Hub::Ready(parts) => {
                    // Reversed: `pending` is popped from the end.
                    for (i, part) in parts.iter().enumerate().rev() {
                        if self.sent[i].as_deref() != Some(&**part) {
                            self.sent[i] = Some(part.clone());
                            self.pending
                                .push(Event::default().event(PARTS[i]).data(&**part));
                        }
                    }
                    if !self.pending.is_empty() {
                        continue;
                    }
                }
                Hub::Idle => {}
            }
            tokio::select! {
                changed = self.snapshot.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                event = registry_event(&mut self.registry) => match event {
                    Some(Ok(
                        RegistryEvent::Revoked(device)
                        | RegistryEvent::RoleChanged(device, _)
                        | RegistryEvent::Banned(device),
                    )) if device == self.device => self.check(),
                    Some(Ok(_)) => {}
                    Some(Err(broadcast::error::RecvError::Lagged(_))) => self.check(),
                    Some(Err(broadcast::error::RecvError::Closed)) | None => self.registry = None,
                },
                _ = self.expires.as_mut() => self.check(),
            }
        }
    }

    /// Checks the token again as a new request would be; if it may no
    /// longer read, the stream ends with an `end` event saying why.
    fn check(&mut self) {
        let checked = Caller::authenticate(&self.state, &self.token).and_then(|caller| {
            caller
                .require(Role::Extract, &self.state)
                .map(|p| p.expires_at)
        });
        match checked {
            Ok(expires_at) => {
                self.expires
                    .as_mut()
                    .reset(tokio::time::Instant::now() + until(expires_at));
            }
            Err(ApiError(status, error)) => {
                tracing::info!(device = self.device, error, "events: stream ended");
                let end = json!({ "status": status.as_u16(), "error": error });
                self.pending = vec![Event::default().event("end").data(end.to_string())];
                self.ended = true;
            }
        }
    }
}
