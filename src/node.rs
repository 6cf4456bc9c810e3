//! `fleetgate store --node ID`: a store node of a cluster. It runs the
//! ingest pipeline and group-commit writer on the shared PostgreSQL
//! database, takes messages from `fleetgate broker` over the node link
//! (`fleetgate_protocol::node`), answers each after its commit, and
//! re-publishes committed records for `live/#`: to a broker over MQTT
//! (`--mqtt`), or onto the brokers' NATS fabric (`--nats`).
//!
//! It also holds the cluster state: it loads the newest version before it
//! takes traffic, stages versions the admin service sends it, switches at
//! each activation time, tells the broker over every link which versions
//! it holds, and reboots (leaves rotation, reloads, rejoins) when asked.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use base64::Engine;
use bytes::Bytes;
use fleetgate_broker::balancer::{NodeInfo, NodeSource};
use fleetgate_broker::cluster::ClusterName;
use fleetgate_broker::router::nats::NatsFabric;
use fleetgate_protocol::ingest::{BoxFuture, LiveSink};
use fleetgate_protocol::node::{
    decode_request, read_frame, write_frame, CommandAnswer, NodeCommand, NodeFrame, NodeResponse,
    Request,
};
use fleetgate_protocol::state::{ClusterClock, StateKey, StateValue};
use fleetgate_protocol::{IngestError, IngestService, PendingCommit};
use fleetgate_store::metrics::StoreMetrics;
use fleetgate_store::nodes::{self, NodeRow};
use fleetgate_store::pipeline::{Pipeline, PublishLive};
use fleetgate_store::state::{self, FollowerFaults, StateFollower, StateStore};
use fleetgate_store::{open_catalog, Db, Store, WriterConfig};
use ring::rand::{SecureRandom, SystemRandom};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

#[derive(clap::Args)]
pub struct StoreArgs {
    /// This node's id, unique in the cluster.
    #[arg(long)]
    node: String,
    /// The cluster's PostgreSQL database.
    #[arg(long, env = "FLEETGATE_DATABASE")]
    database: String,
    /// Address the broker connects to.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The broker's MQTT address, for re-publishing committed records on
    /// live/# (needs --token of a device with the admin role).
    #[arg(long)]
    mqtt: Option<String>,
    /// Token of an admin-role device registered for this node.
    #[arg(long, env = "FLEETGATE_TOKEN")]
    token: Option<String>,
    /// The NATS servers of the brokers' cluster (nats://HOST:PORT,
    /// comma-separated), for re-publishing committed records on live/#
    /// straight to every broker, instead of through one (--mqtt).
    #[arg(long, value_delimiter = ',', value_name = "URLS", conflicts_with_all = ["mqtt", "token"])]
    nats: Vec<String>,
    /// With --nats: the brokers' --cluster-name.
    #[arg(long, default_value = ClusterName::DEFAULT)]
    cluster_name: ClusterName,
    /// Largest accepted ingest payload, in bytes (as the broker's).
    #[arg(long, default_value_t = 256 * 1024)]
    max_payload: usize,
    /// Test fault: this node's clock is off by this many milliseconds.
    #[arg(long, hide = true, default_value_t = 0, allow_hyphen_values = true)]
    clock_skew_ms: i64,
    /// Test fault: the first state activation is not confirmed.
    #[arg(long, hide = true)]
    drop_first_confirmation: bool,
}

/// The node list in the shared database, as the balancer reads it.
pub struct NodeTable(pub Db);

impl NodeSource for NodeTable {
    fn live_nodes(&self) -> BoxFuture<'_, Result<Vec<NodeInfo>, String>> {
        Box::pin(async move {
            Ok(nodes::live(&self.0)
                .await?
                .into_iter()
                .map(|n| NodeInfo {
                    id: n.id,
                    addr: n.addr,
                    secret: n.secret,
                })
                .collect())
        })
    }
}

/// Live copies go to the broker as MQTT publishes of an admin device.
struct MqttLive {
    client: AsyncClient,
    connected: Arc<AtomicBool>,
}

impl LiveSink for MqttLive {
    fn wanted(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    fn publish(&self, topic: String, payload: Bytes) {
        // Best effort, like every live copy: the tables are the record.
        let _ = self
            .client
            .try_publish(topic, QoS::AtMostOnce, false, payload);
    }
}

fn mqtt_live(address: &str, token: &str) -> anyhow::Result<MqttLive> {
    let device = fleetgate_protocol::token::claimed_subject(token)
        .ok_or_else(|| anyhow!("--token is not a fleetgate token"))?;
    let (host, port) = address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| anyhow!("--mqtt must be HOST:PORT"))?;
    let mut options = MqttOptions::new(device.clone(), host, port);
    options.set_credentials(device, token);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 4096);
    let connected = Arc::new(AtomicBool::new(false));
    let flag = connected.clone();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => flag.store(true, Ordering::Relaxed),
                Ok(_) => {}
                Err(e) => {
                    flag.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, "live feed to the broker lost; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    Ok(MqttLive { client, connected })
}

pub async fn run(args: StoreArgs) -> anyhow::Result<()> {
    crate::up::init_tracing();
    if !args.database.starts_with("postgres") {
        return Err(anyhow!(
            "a store node needs --database postgres://... (shared with the broker)"
        ));
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (change it with --listen)", args.listen))?;
    let addr = listener.local_addr()?;
    let db = Db::open(Some(&args.database), std::path::Path::new("unused"))
        .await
        .map_err(|e| anyhow!(e))?;
    let catalog = open_catalog(&db).await.map_err(|e| anyhow!(e))?;
    catalog.follow_changes();
    nodes::ddl(&db).await.map_err(|e| anyhow!(e))?;
    let mut registry = prometheus_client::registry::Registry::default();
    let live: Option<Arc<dyn LiveSink>> = match (&args.mqtt, &args.token) {
        (Some(mqtt), Some(token)) => Some(Arc::new(mqtt_live(mqtt, token)?)),
        (Some(_), None) => return Err(anyhow!("--mqtt needs --token (or FLEETGATE_TOKEN)")),
        _ if !args.nats.is_empty() => Some(
            NatsFabric::connect(&args.nats, &args.cluster_name, &mut registry)
                .await
                .map_err(|e| anyhow!(e))?,
        ),
        _ => None,
    };
    let observers: Vec<Arc<dyn fleetgate_store::pipeline::CommitObserver>> = live
        .into_iter()
        .map(|sink| Arc::new(PublishLive { sink }) as _)
        .collect();
    let states = Arc::new(StateStore::new(Arc::new(ClusterClock::new(
        args.clock_skew_ms,
    ))));
    let faults = FollowerFaults {
        drop_first_confirmation: args.drop_first_confirmation,
    };
    let follower = StateFollower::new(db.clone(), states.clone(), &args.node, faults);
    // The newest state before any traffic: a restarted node never
    // processes under a version the cluster has left.
    follower.load().await.map_err(|e| anyhow!(e))?;
    follower.follow(Duration::from_millis(500));
    let store = Arc::new(Store::start(
        db.clone(),
        catalog.clone(),
        Pipeline::standard(catalog, args.max_payload),
        WriterConfig::default(),
        observers,
        StoreMetrics::register(&mut registry),
        states.clone(),
    ));

    let mut row = NodeRow {
        id: args.node.clone(),
        addr: addr.to_string(),
        secret: new_secret()?,
        state_version: states.active_version(),
    };
    nodes::heartbeat(&db, &row).await.map_err(|e| anyhow!(e))?;
    // The secret a broker must present; a reboot changes it, which ends
    // every link made before.
    let (secret_tx, secret) = watch::channel(row.secret.clone());
    let heartbeat = tokio::spawn({
        let db = db.clone();
        let follower = follower.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                row.state_version = follower.store().held().active;
                match nodes::heartbeat(&db, &row).await {
                    Ok(Some(reason)) => {
                        reboot(&db, &follower, &mut row, &secret_tx, &reason).await;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
        }
    });
    let accept = tokio::spawn({
        let (store, db, node) = (store.clone(), db.clone(), args.node.clone());
        async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let _ = socket.set_nodelay(true);
                let link = NodeLink {
                    store: store.clone(),
                    states: states.clone(),
                    db: db.clone(),
                    node: node.clone(),
                    secret: secret.clone(),
                };
                tokio::spawn(link.serve(socket));
            }
        }
    });
    println!("fleetgate store ready: node={} listen={addr}", args.node);

    crate::up::shutdown_signal().await;
    tracing::info!("store node shutting down");
    heartbeat.abort();
    accept.abort();
    let _ = nodes::remove(&db, &args.node).await;
    store.shutdown().await;
    db.close().await;
    Ok(())
}

fn new_secret() -> anyhow::Result<String> {
    let mut secret = [0u8; 24];
    SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| anyhow!("cannot generate the node secret"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret))
}

/// Asked to reboot (it did not confirm a state version in time): out of
/// rotation, the newest state loaded, back in with a new secret, so that
/// brokers reconnect and learn what it now holds.
async fn reboot(
    db: &Db,
    follower: &StateFollower,
    row: &mut NodeRow,
    secret: &watch::Sender<String>,
    reason: &str,
) {
    tracing::warn!(node = %row.id, reason, "reboot requested: leaving rotation to reload the state");
    let _ = nodes::remove(db, &row.id).await;
    loop {
        match follower.load().await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reload the state; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    match new_secret() {
        Ok(fresh) => row.secret = fresh,
        Err(e) => tracing::error!(error = %e, "keeping the old secret"),
    }
    let _ = secret.send(row.secret.clone());
    row.state_version = follower.store().held().active;
    match nodes::heartbeat(db, row).await {
        Ok(_) => tracing::info!(node = %row.id, state = row.state_version, "rejoined after reboot"),
        Err(e) => tracing::warn!(error = %e, "cannot rejoin yet"),
    }
}

/// One connection from a broker.
struct NodeLink {
    store: Arc<Store>,
    states: Arc<StateStore>,
    db: Db,
    node: String,
    secret: watch::Receiver<String>,
}

impl NodeLink {
    /// Checks the secret, then serves one command (a control connection)
    /// or ingest: messages in, answers out in the same order, each after
    /// its commit, and the held state versions whenever they change.
    async fn serve(mut self, socket: TcpStream) {
        let (mut reader, writer) = socket.into_split();
        let secret = self.secret.borrow_and_update().clone();
        // The secret comes first, small and soon; anything else is refused
        // before it can hold the connection or make the node buffer a frame.
        let wanted = [&(secret.len() as u32).to_le_bytes()[..], secret.as_bytes()].concat();
        let mut presented = vec![0u8; wanted.len()];
        let read = tokio::time::timeout(Duration::from_secs(5), reader.read_exact(&mut presented));
        let read_ok = matches!(read.await, Ok(Ok(_)));
        // Compared without an early exit, so timing tells nothing of the secret.
        let differs = presented
            .iter()
            .zip(&wanted)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if !read_ok || differs != 0 {
            tracing::warn!("refused a node-link connection without the node's secret");
            return;
        }
        self.serve_requests(reader, writer).await;
    }

    async fn command(&self, command: NodeCommand) -> CommandAnswer {
        let result = match command {
            NodeCommand::Stage {
                version,
                key,
                value,
            } => {
                let staged = StateKey::parse(&key).and_then(|key| {
                    serde_json::from_value::<StateValue>(value)
                        .map(|value| (key, value))
                        .map_err(|e| format!("unreadable state document: {e}"))
                });
                match staged {
                    Ok((key, value)) => {
                        state::stage(&self.db, version, &key, &value, &self.node).await
                    }
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = &result {
            tracing::warn!(error = %e, "command failed");
        }
        CommandAnswer { result }
    }

    /// Requests in; answers out in the same order, each after its commit;
    /// the held state versions first and whenever they change, so a
    /// broker learns of an activation even on a link with no traffic.
    async fn serve_requests(mut self, mut reader: OwnedReadHalf, mut writer: OwnedWriteHalf) {
        let (answers, mut pending) = mpsc::channel::<Outgoing>(4096);
        let mut held = self.states.confirmed();
        let write = tokio::spawn(async move {
            let frame = |f: NodeFrame| serde_json::to_vec(&f).expect("serializes");
            let mut next = Some(frame(NodeFrame::Versions(*held.borrow_and_update())));
            loop {
                if let Some(body) = next.take() {
                    if write_frame(&mut writer, &body).await.is_err() {
                        return;
                    }
                }
                next = Some(tokio::select! {
                    biased;
                    Ok(()) = held.changed() => frame(NodeFrame::Versions(*held.borrow_and_update())),
                    outgoing = pending.recv() => match outgoing {
                        None => return,
                        Some(Outgoing::Command(answer)) => frame(NodeFrame::Command(answer)),
                        Some(Outgoing::Answer(seq, commit)) => {
                            let result = commit.await.unwrap_or(Err(IngestError::ShuttingDown));
                            frame(NodeFrame::Answer(NodeResponse { seq, result }))
                        }
                    },
                });
            }
        });
        loop {
            let body = tokio::select! {
                body = read_frame(&mut reader) => body,
                // A reboot changed the secret: links made before end.
                _ = self.secret.changed() => break,
            };
            let outgoing = match body.map(|b| b.map(decode_request)) {
                Ok(Some(Ok(Request::Command(command)))) => {
                    Outgoing::Command(self.command(command).await)
                }
                Ok(Some(Ok(Request::Ingest(seq, message)))) => {
                    let commit = match self.store.submit(message).await {
                        Ok(commit) => commit,
                        Err(e) => {
                            let (done, commit) = oneshot::channel();
                            let _ = done.send(Err(e));
                            commit
                        }
                    };
                    Outgoing::Answer(seq, commit)
                }
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "malformed node-link request; closing");
                    break;
                }
                _ => break,
            };
            if answers.send(outgoing).await.is_err() {
                break;
            }
        }
        drop(answers);
        let _ = write.await;
    }
}

/// What the link's writer sends, in order.
enum Outgoing {
    Answer(u64, PendingCommit),
    Command(CommandAnswer),
}
