//! `fleetgate store --node ID`: a store node of a cluster. It runs the
//! ingest pipeline and group-commit writer on the shared PostgreSQL
//! database, takes messages from `fleetgate broker` over the node link
//! (`fleetgate_protocol::node`), answers each after its commit, and
//! re-publishes committed records to the broker over MQTT for `live/#`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use base64::Engine;
use bytes::Bytes;
use fleetgate_broker::balancer::{NodeInfo, NodeSource};
use fleetgate_protocol::ingest::{BoxFuture, LiveSink};
use fleetgate_protocol::node::{decode_request, read_frame, write_frame, NodeResponse};
use fleetgate_protocol::{IngestError, IngestService, PendingCommit};
use fleetgate_store::metrics::StoreMetrics;
use fleetgate_store::nodes::{self, NodeRow};
use fleetgate_store::pipeline::{Pipeline, PublishLive};
use fleetgate_store::{open_catalog, Db, Store, WriterConfig};
use ring::rand::{SecureRandom, SystemRandom};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

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
    /// Largest accepted ingest payload, in bytes (as the broker's).
    #[arg(long, default_value_t = 256 * 1024)]
    max_payload: usize,
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
    let observers: Vec<Arc<dyn fleetgate_store::pipeline::CommitObserver>> =
        match (&args.mqtt, &args.token) {
            (Some(mqtt), Some(token)) => vec![Arc::new(PublishLive {
                sink: Arc::new(mqtt_live(mqtt, token)?),
            })],
            (Some(_), None) => return Err(anyhow!("--mqtt needs --token (or FLEETGATE_TOKEN)")),
            _ => Vec::new(),
        };
    let mut registry = prometheus_client::registry::Registry::default();
    let store = Arc::new(Store::start(
        db.clone(),
        Pipeline::standard(catalog, args.max_payload),
        WriterConfig::default(),
        observers,
        StoreMetrics::register(&mut registry),
    ));

    let mut secret = [0u8; 24];
    SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| anyhow!("cannot generate the node secret"))?;
    let row = NodeRow {
        id: args.node.clone(),
        addr: addr.to_string(),
        secret: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
    };
    nodes::heartbeat(&db, &row).await.map_err(|e| anyhow!(e))?;
    let heartbeat = tokio::spawn({
        let (db, row) = (db.clone(), row.clone());
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Err(e) = nodes::heartbeat(&db, &row).await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
            }
        }
    });
    let accept = tokio::spawn({
        let (store, secret) = (store.clone(), row.secret.clone());
        async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let _ = socket.set_nodelay(true);
                tokio::spawn(serve_broker(socket, store.clone(), secret.clone()));
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

/// One broker connection: messages in, answers out in the same order, each
/// after its commit.
async fn serve_broker(socket: TcpStream, store: Arc<Store>, secret: String) {
    let (mut reader, mut writer) = socket.into_split();
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
    let (answers, mut pending) = mpsc::channel::<(u64, PendingCommit)>(4096);
    let write = tokio::spawn(async move {
        while let Some((seq, commit)) = pending.recv().await {
            let result = commit.await.unwrap_or(Err(IngestError::ShuttingDown));
            let body = serde_json::to_vec(&NodeResponse { seq, result }).expect("serializes");
            if write_frame(&mut writer, &body).await.is_err() {
                return;
            }
        }
    });
    loop {
        let body = match read_frame(&mut reader).await {
            Ok(Some(body)) => body,
            _ => break,
        };
        let (seq, message) = match decode_request(body) {
            Ok(request) => request,
            Err(e) => {
                tracing::warn!(error = %e, "malformed node-link request; closing");
                break;
            }
        };
        let commit = match store.submit(message).await {
            Ok(commit) => commit,
            Err(e) => {
                let (done, commit) = oneshot::channel();
                let _ = done.send(Err(e));
                commit
            }
        };
        if answers.send((seq, commit)).await.is_err() {
            break;
        }
    }
    drop(answers);
    let _ = write.await;
}
