//! Cluster mode: the gatekeeper as load balancer. Ingest goes to store
//! nodes by rendezvous hashing of the device id, so each device's records go
//! to one node, in order. Each node gets one pipelined connection whose
//! answers come back in order after the node's commit. A node that fails is
//! taken out of rotation and everything it had not answered is sent to the
//! next node; a message whose first node committed it but died before
//! answering is stored again (keyed streams store it once). While no node
//! can take a message, submit waits up to the hold time: the device's
//! connection is simply not read meanwhile.
//!
//! Every message is stamped with the cluster state version in force when
//! it was received (the [`Schedule`] of published versions), and goes only
//! to a node that holds that version, as the node tells over its link. A
//! message received after an activation time therefore waits until its
//! node confirms the new version; a node that has not confirmed within the
//! grace period is passed over. A node refuses a message stamped with a
//! version it does not hold, and the message is routed again.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fleetgate_protocol::ingest::BoxFuture;
use fleetgate_protocol::node::{encode_request, read_frame, write_frame, HeldVersions, NodeFrame};
use fleetgate_protocol::state::ClusterClock;
use fleetgate_protocol::{IngestError, IngestMessage, IngestOutcome, IngestService, PendingCommit};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};

/// A store node as the cluster's database lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub addr: String,
    pub secret: String,
}

/// Where the balancer learns which nodes are alive (their heartbeats).
pub trait NodeSource: Send + Sync + 'static {
    fn live_nodes(&self) -> BoxFuture<'_, Result<Vec<NodeInfo>, String>>;
}

/// A node's state, for `GET /v1/nodes`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub id: String,
    pub addr: String,
    pub up: bool,
    pub state: HeldVersions,
    pub routed: u64,
    pub failed_over: u64,
}

/// A message on its way, with where its answer goes.
struct Job {
    message: IngestMessage,
    reply: oneshot::Sender<Result<IngestOutcome, IngestError>>,
    attempts: u32,
}

/// Attempts before a message is refused (the device then re-sends it).
const MAX_ATTEMPTS: u32 = 5;
/// A node that has not answered its oldest message for this long is taken
/// out, and its messages go to the others: it may be frozen, or its host
/// gone without closing the connection.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Messages written to a node and not yet answered, oldest first.
type InFlight = Arc<Mutex<VecDeque<(tokio::time::Instant, Job)>>>;

struct Link {
    info: NodeInfo,
    jobs: mpsc::Sender<Job>,
    up: Arc<AtomicBool>,
    versions: Arc<Mutex<HeldVersions>>,
    routed: Arc<AtomicU64>,
    failed_over: Arc<AtomicU64>,
}

struct Inner {
    links: RwLock<HashMap<String, Link>>,
    changed: Notify,
    hold: Duration,
    schedule: RwLock<Schedule>,
    clock: Arc<ClusterClock>,
}

/// Published state versions and their activation times (cluster clock).
#[derive(Debug, Default)]
pub struct Schedule {
    versions: BTreeMap<u64, i64>,
    /// How long after an activation a node that has not confirmed it is
    /// still waited for.
    grace_ms: i64,
}

impl Schedule {
    /// The version in force at cluster time `at`.
    fn version_at(&self, at: i64) -> u64 {
        self.versions
            .iter()
            .rev()
            .find(|(_, activate_at)| **activate_at <= at)
            .map_or(0, |(version, _)| *version)
    }

    /// Whether a node that does not hold `version` yet may still confirm it
    /// in time to be waited for.
    fn waiting_for(&self, version: u64, now: i64) -> bool {
        self.versions
            .get(&version)
            .is_some_and(|at| now < at + self.grace_ms)
    }
}

#[derive(Clone)]
pub struct Balancer {
    inner: Arc<Inner>,
}

impl Balancer {
    /// Follows `source` (polled every `poll`) and routes over its nodes.
    pub fn start(
        source: Arc<dyn NodeSource>,
        poll: Duration,
        hold: Duration,
        clock: Arc<ClusterClock>,
        grace: Duration,
    ) -> Balancer {
        let balancer = Balancer {
            inner: Arc::new(Inner {
                links: RwLock::new(HashMap::new()),
                changed: Notify::new(),
                hold,
                schedule: RwLock::new(Schedule {
                    versions: BTreeMap::new(),
                    grace_ms: grace.as_millis() as i64,
                }),
                clock,
            }),
        };
        let follower = balancer.clone();
        tokio::spawn(async move {
            loop {
                match source.live_nodes().await {
                    Ok(nodes) => follower.update(nodes),
                    Err(e) => tracing::warn!(error = %e, "cannot read the node list"),
                }
                tokio::time::sleep(poll).await;
            }
        });
        balancer
    }

    /// A published state version: messages received from `activate_at_ms`
    /// on are stamped with it.
    pub fn announce(&self, version: u64, activate_at_ms: i64) {
        let mut schedule = self.inner.schedule.write().expect("schedule lock");
        schedule.versions.insert(version, activate_at_ms);
        // Versions far behind every node are of no more use.
        while schedule.versions.len() > 64 {
            schedule.versions.pop_first();
        }
        drop(schedule);
        self.inner.changed.notify_waiters();
    }

    fn update(&self, nodes: Vec<NodeInfo>) {
        let mut links = self.inner.links.write().expect("links lock");
        let before = links.len();
        links.retain(|id, link| nodes.iter().any(|n| n.id == *id && *n == link.info));
        for node in nodes {
            if links.contains_key(&node.id) {
                continue;
            }
            tracing::info!(node = %node.id, addr = %node.addr, "store node joined");
            let (jobs, queue) = mpsc::channel(1024);
            let link = Link {
                info: node.clone(),
                jobs,
                up: Arc::new(AtomicBool::new(false)),
                versions: Arc::default(),
                routed: Arc::new(AtomicU64::new(0)),
                failed_over: Arc::new(AtomicU64::new(0)),
            };
            tokio::spawn(run_link(
                self.clone(),
                node.clone(),
                queue,
                LinkState {
                    up: link.up.clone(),
                    versions: link.versions.clone(),
                },
                link.failed_over.clone(),
            ));
            links.insert(node.id, link);
        }
        if links.len() != before {
            self.inner.changed.notify_waiters();
        }
    }

    pub fn nodes(&self) -> Vec<NodeStatus> {
        let links = self.inner.links.read().expect("links lock");
        let mut list: Vec<NodeStatus> = links
            .values()
            .map(|l| NodeStatus {
                id: l.info.id.clone(),
                addr: l.info.addr.clone(),
                up: l.up.load(Ordering::Relaxed),
                state: *l.versions.lock().expect("versions lock"),
                routed: l.routed.load(Ordering::Relaxed),
                failed_over: l.failed_over.load(Ordering::Relaxed),
            })
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    /// The device's node: the highest rendezvous score among up nodes that
    /// hold the message's state version, or may still confirm it. `None`
    /// while that node has yet to confirm (the message waits).
    fn pick(&self, device: &str, version: u64) -> Option<(mpsc::Sender<Job>, Arc<AtomicU64>)> {
        let waiting = self
            .inner
            .schedule
            .read()
            .expect("schedule lock")
            .waiting_for(version, self.inner.clock.now_ms());
        let links = self.inner.links.read().expect("links lock");
        let (link, holds) = links
            .values()
            .filter(|l| l.up.load(Ordering::Relaxed))
            .filter_map(|l| {
                let held = *l.versions.lock().expect("versions lock");
                let holds = held.holds(version);
                (holds || (waiting && held.active < version)).then_some((l, holds))
            })
            .max_by_key(|(l, _)| {
                let mut hasher = std::hash::DefaultHasher::new();
                (&l.info.id, device).hash(&mut hasher);
                hasher.finish()
            })?;
        holds.then(|| (link.jobs.clone(), link.routed.clone()))
    }

    /// Hands the job to its node, waiting up to the hold time for one.
    async fn route(&self, mut job: Job) {
        let deadline = tokio::time::Instant::now() + self.inner.hold;
        loop {
            let changed = self.inner.changed.notified();
            let version = job.message.state_version.unwrap_or(0);
            if let Some((queue, routed)) = self.pick(&job.message.device_id, version) {
                match queue.send(job).await {
                    Ok(()) => {
                        routed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(mpsc::error::SendError(returned)) => {
                        job = returned;
                        continue;
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = job.reply.send(Err(IngestError::Unavailable(format!(
                    "no store node holding state version {version} could take the message within {:?}",
                    self.inner.hold
                ))));
                return;
            }
            let _ = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(100)),
                changed,
            )
            .await;
        }
    }

    /// Sends jobs a failed node did not answer to the next node.
    fn fail_over(&self, jobs: Vec<Job>) {
        for mut job in jobs {
            job.attempts += 1;
            if job.attempts >= MAX_ATTEMPTS {
                let _ = job.reply.send(Err(IngestError::Unavailable(
                    "store nodes failed repeatedly".into(),
                )));
                continue;
            }
            let balancer = self.clone();
            tokio::spawn(async move { balancer.route(job).await });
        }
    }
}

impl IngestService for Balancer {
    fn submit(
        &self,
        mut message: IngestMessage,
    ) -> BoxFuture<'_, Result<PendingCommit, IngestError>> {
        Box::pin(async move {
            // Received-at is this machine's clock; activation times are the
            // cluster's.
            let received = message.received_at_ms + self.inner.clock.offset_ms();
            let version = self
                .inner
                .schedule
                .read()
                .expect("schedule lock")
                .version_at(received);
            message.state_version = Some(version);
            let (reply, pending) = oneshot::channel();
            self.route(Job {
                message,
                reply,
                attempts: 0,
            })
            .await;
            Ok(pending)
        })
    }
}

/// One node's connection: reconnects while the node is listed, and on every
/// failure hands what the node had not answered to the others.
/// What the router reads of a link: whether it is up, and which state
/// versions its node holds.
struct LinkState {
    up: Arc<AtomicBool>,
    versions: Arc<Mutex<HeldVersions>>,
}

async fn run_link(
    balancer: Balancer,
    node: NodeInfo,
    mut queue: mpsc::Receiver<Job>,
    state: LinkState,
    failed_over: Arc<AtomicU64>,
) {
    loop {
        let in_flight: InFlight = Arc::default();
        let outcome = serve_link(&node, &mut queue, &state, &balancer, in_flight.clone()).await;
        state.up.store(false, Ordering::Relaxed);
        balancer.inner.changed.notify_waiters();
        let mut unanswered: Vec<Job> = in_flight
            .lock()
            .expect("in-flight lock")
            .drain(..)
            .map(|(_, job)| job)
            .collect();
        while let Ok(job) = queue.try_recv() {
            unanswered.push(job);
        }
        failed_over.fetch_add(unanswered.len() as u64, Ordering::Relaxed);
        match outcome {
            LinkEnd::Removed => {
                balancer.fail_over(unanswered);
                return;
            }
            LinkEnd::Failed(reason) => {
                if !unanswered.is_empty() || up_before(&reason) {
                    tracing::warn!(node = %node.id, %reason, resent = unanswered.len(), "store node failed; its messages go to the others");
                }
                balancer.fail_over(unanswered);
            }
        }
        if queue.is_closed() {
            // Anything queued after the drain above goes on too.
            let mut late = Vec::new();
            while let Ok(job) = queue.try_recv() {
                late.push(job);
            }
            balancer.fail_over(late);
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn up_before(reason: &str) -> bool {
    !reason.starts_with("cannot connect")
}

enum LinkEnd {
    /// The node left the list; nothing more will be queued to it.
    Removed,
    Failed(String),
}

async fn serve_link(
    node: &NodeInfo,
    queue: &mut mpsc::Receiver<Job>,
    state: &LinkState,
    balancer: &Balancer,
    in_flight: InFlight,
) -> LinkEnd {
    let connect = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&node.addr));
    let stream = match connect.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return LinkEnd::Failed(format!("cannot connect: {e}")),
        Err(_) => return LinkEnd::Failed("cannot connect: timed out".into()),
    };
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    if let Err(e) = write_frame(&mut writer, node.secret.as_bytes()).await {
        return LinkEnd::Failed(format!("cannot connect: {e}"));
    }
    // The node first says which state versions it holds; until then
    // nothing could be routed to it correctly.
    let first = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut reader)).await;
    let held = match first.map(|r| r.map(|body| body.map(|b| serde_json::from_slice(&b)))) {
        Ok(Ok(Some(Ok(NodeFrame::Versions(held))))) => held,
        _ => {
            return LinkEnd::Failed(
                "cannot connect: the node did not say its state versions".into(),
            )
        }
    };
    *state.versions.lock().expect("versions lock") = held;
    state.up.store(true, Ordering::Relaxed);
    balancer.inner.changed.notify_waiters();
    tracing::info!(node = %node.id, state = held.active, "store node connected");

    let answers = {
        let in_flight = in_flight.clone();
        let balancer = balancer.clone();
        let versions = state.versions.clone();
        async move {
            loop {
                let body = match read_frame(&mut reader).await {
                    Ok(Some(body)) => body,
                    Ok(None) => return "the node closed the connection".to_string(),
                    Err(e) => return format!("reading from the node: {e}"),
                };
                let response = match serde_json::from_slice(&body) {
                    Ok(NodeFrame::Answer(r)) => r,
                    Ok(NodeFrame::Versions(held)) => {
                        // The node confirmed an activation (or rebooted).
                        *versions.lock().expect("versions lock") = held;
                        balancer.inner.changed.notify_waiters();
                        continue;
                    }
                    Ok(NodeFrame::Command(_)) => {
                        return "a command answer on an ingest link".into()
                    }
                    Err(e) => return format!("unreadable answer: {e}"),
                };
                let job = in_flight.lock().expect("in-flight lock").pop_front();
                match (job, response.result) {
                    // A node that is stopping has not stored the message,
                    // nor has one that does not hold its state version:
                    // another node takes it.
                    (
                        Some((_, job)),
                        Err(IngestError::ShuttingDown | IngestError::StateVersion { .. }),
                    ) => balancer.fail_over(vec![job]),
                    // Answers come in the order messages were sent.
                    (Some((_, job)), result) => {
                        let _ = job.reply.send(result);
                    }
                    (None, _) => return format!("answer {} to nothing", response.seq),
                }
            }
        }
    };
    let sends = async {
        let mut seq = 0u64;
        loop {
            // `None`: the node left the list and its queue closed.
            let job = queue.recv().await?;
            seq += 1;
            let body = encode_request(seq, &job.message);
            // In flight before it is written, so an answer always finds it.
            in_flight
                .lock()
                .expect("in-flight lock")
                .push_back((tokio::time::Instant::now(), job));
            if let Err(e) = write_frame(&mut writer, &body).await {
                return Some(format!("writing to the node: {e}"));
            }
        }
    };
    let watchdog = async {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let oldest = in_flight
                .lock()
                .expect("in-flight lock")
                .front()
                .map(|(sent, _)| sent.elapsed());
            if oldest.is_some_and(|age| age > ANSWER_TIMEOUT) {
                return format!("no answer for {ANSWER_TIMEOUT:?}");
            }
        }
    };
    tokio::select! {
        reason = answers => LinkEnd::Failed(reason),
        reason = watchdog => LinkEnd::Failed(reason),
        ended = sends => match ended {
            Some(reason) => LinkEnd::Failed(reason),
            None => LinkEnd::Removed,
        },
    }
}
