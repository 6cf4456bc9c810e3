//! `fleetgate up`: every part in one process, on embedded defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use fleetgate_admin::platform::{ADMIN_DEVICE, ADMIN_TOKEN_TTL_SECS};
use fleetgate_admin::rollout::{CrashPoint, Rollout, RolloutSettings, StateTransport};
use fleetgate_admin::Handshakes;
use fleetgate_admin::{
    unix_now, AuditLog, Bans, Platform, RefusalLedger, Registry, RegistryEvent, TokenAuthenticator,
};
use fleetgate_broker::balancer::Balancer;
use fleetgate_broker::cluster::ClusterName;
use fleetgate_broker::persist::jetstream::{JetStreamSettings, JetStreamStore};
use fleetgate_broker::persist::{sql::SqlStore, MemoryStore, SessionStore};
use fleetgate_broker::router::nats::NatsFabric;
use fleetgate_broker::session::QueueLimits;
use fleetgate_broker::{EndReason, Gatekeeper, GatekeeperConfig, PlatformTopics, Router};
use fleetgate_protocol::schema::StreamsFile;
use fleetgate_protocol::state::ClusterClock;
use fleetgate_protocol::IngestService;
use fleetgate_protocol::Role;
use fleetgate_sdk_builder::Builder;
use fleetgate_store::buckets::Buckets;
use fleetgate_store::compaction::{Compaction, CompactionSettings};
use fleetgate_store::metrics::StoreMetrics;
use fleetgate_store::pipeline::{Pipeline, PublishLive};
use fleetgate_store::state::{StateFollower, StateStore, LOCAL_NODE};
use fleetgate_store::tiers::Tiers;
use fleetgate_store::views::{self, AutoSettings, Views};
use fleetgate_store::{nodes, open_catalog, Db, Store, WriterConfig};
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::net::TcpListener;

#[derive(clap::Args)]
pub struct UpArgs {
    /// Data directory: platform key, admin token, SQLite database.
    #[arg(long, default_value = "fleetgate-data")]
    data: PathBuf,
    /// MQTT listen address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// HTTP API listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// PostgreSQL wire protocol listen address (psql, psycopg): the same
    /// queries as /v1/query, the user a device id and the password its
    /// token. Default 127.0.0.1:5433 for `up`; `broker` serves it only
    /// when given.
    #[arg(long, value_name = "ADDR")]
    pg: Option<SocketAddr>,
    /// MQTT over TLS listen address (default 127.0.0.1:8883 when TLS is on).
    #[arg(long)]
    mqtts: Option<SocketAddr>,
    /// HTTPS listen address (default 127.0.0.1:8443 when TLS is on).
    #[arg(long)]
    https: Option<SocketAddr>,
    /// UDP address taking one record per datagram (best-effort; off when
    /// absent).
    #[arg(long)]
    udp: Option<SocketAddr>,
    /// PEM certificate chain for MQTT over TLS and HTTPS.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key for --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Serve TLS with a generated development CA and certificate (in <data>/dev-tls/).
    #[arg(long, conflicts_with_all = ["cert", "key"])]
    dev_tls: bool,
    /// Time a client has to complete its TLS handshake.
    /// A TLS client that has not finished its handshake by then is dropped.
    #[arg(long, default_value = "10s", value_parser = fleetgate_protocol::duration::parse)]
    tls_handshake_timeout: Duration,
    /// TLS handshakes in progress at once, per listener; connections beyond
    /// are closed at once.
    #[arg(long, default_value_t = 1024)]
    tls_max_handshakes: usize,
    /// PostgreSQL URL (postgres://...). Required by `broker`; for `up`,
    /// SQLite at <data>/store.db when absent.
    #[arg(long, env = "FLEETGATE_DATABASE")]
    database: Option<String>,
    /// The directory ETL file sources (csv, jsonl) are read under; a job
    /// naming a file outside it (after resolving `..` and symlinks) is
    /// refused. Default: <data>/etl-sources (created if missing).
    #[arg(long)]
    etl_dir: Option<PathBuf>,
    /// A database ETL sql sources may read, by the name jobs give it
    /// (`database = "shop"`): NAME=postgres://... or NAME=sqlite:PATH.
    /// Repeat for several. Never the store's own database.
    #[arg(long = "etl-database", value_name = "NAME=URL", value_parser = parse_etl_database)]
    etl_databases: Vec<(String, String)>,
    /// Streams file to apply at start.
    #[arg(long)]
    streams: Option<PathBuf>,
    /// Largest accepted ingest payload, in bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    max_payload: usize,
    /// Messages one MQTT session may hold queued or in flight; beyond,
    /// deliveries to it are refused (and counted).
    #[arg(long, default_value_t = 1000)]
    session_queue_messages: usize,
    /// Bytes one MQTT session may hold queued or in flight.
    #[arg(long, default_value_t = 1024 * 1024)]
    session_queue_bytes: usize,
    /// Longest an MQTT session outlives its connection (also what a 3.1.1
    /// session without clean session gets).
    #[arg(long, default_value = "7d", value_parser = fleetgate_protocol::duration::parse)]
    max_session_expiry: Duration,
    /// Refusals within --alert-window that raise an alert for a device.
    #[arg(long, default_value_t = 5)]
    alert_threshold: usize,
    /// Window for --alert-threshold, e.g. 60s or 5m.
    #[arg(long, default_value = "60s", value_parser = fleetgate_protocol::duration::parse)]
    alert_window: Duration,
    /// Longest a query may run before it is stopped.
    #[arg(long, default_value = "30s", value_parser = fleetgate_protocol::duration::parse)]
    query_timeout: Duration,
    /// Most bytes a query's result may hold (e.g. 64MiB), and the longest
    /// value a query may build; beyond, the query is refused with 422. On
    /// SQLite a query may also take at most twice this in memory.
    #[arg(long, default_value = "64MiB", value_parser = parse_query_max_bytes)]
    query_max_bytes: usize,
    /// Lifetime of the token a device gets with its SDK; devices renew it
    /// by handshaking again before it runs out.
    #[arg(long, default_value = "1h", value_parser = fleetgate_protocol::duration::parse)]
    sdk_token_ttl: Duration,
    /// Lifetime of the SDK manifest a handshake answers with.
    #[arg(long, default_value = "24h", value_parser = fleetgate_protocol::duration::parse)]
    sdk_manifest_ttl: Duration,
    /// Built SDK artifacts kept for identical requests (0: no cache).
    #[arg(long, default_value_t = 256)]
    sdk_cache: usize,
    /// How long a handshake nonce stays good (at most 10m). Brokers of a
    /// cluster honour the lifetime of the broker that issued a nonce.
    #[arg(long, default_value = "60s", value_parser = fleetgate_protocol::duration::parse)]
    nonce_ttl: Duration,
    /// Requests per second each client address may make, on average, to the
    /// routes that take no token (handshake nonce and handshake, /metrics,
    /// /healthz, the dashboard page); beyond, 429 with Retry-After. 0 turns
    /// the limit off.
    #[arg(long, default_value_t = 20.0, value_parser = parse_rate)]
    unauth_rate: f64,
    /// Requests a client address may make at once to those routes.
    #[arg(long, default_value_t = 40)]
    unauth_burst: u32,
    /// How long repeated authentication failures ban the device (0s: no bans).
    #[arg(long, default_value = "15m", value_parser = fleetgate_protocol::duration::parse)]
    ban_duration: Duration,
    /// Least time between publishing a state version and its activation
    /// (more is taken when delivery or clock uncertainty need it).
    #[arg(long, default_value = "300ms", value_parser = fleetgate_protocol::duration::parse)]
    state_lead: Duration,
    /// How long after a state version's activation a store may take to
    /// confirm it before it is rebooted.
    #[arg(long, default_value = "1s", value_parser = fleetgate_protocol::duration::parse)]
    state_grace: Duration,
    #[command(flatten)]
    auto_views: AutoViewArgs,
    /// A declared field that no query touches for this long is folded into
    /// its stream's `extra` column (its column dropped) until a query uses
    /// it again; "off" never compacts.
    #[arg(long, default_value = "30d", value_parser = parse_compact_after)]
    compact_after: OptionalDuration,
    /// Test fault: the process dies at this step of a state push.
    #[arg(long, hide = true)]
    test_crash: Option<CrashPoint>,
}

/// Automatic views: created for query shapes that recur and cost enough,
/// dropped when unused.
#[derive(clap::Args, Debug, Clone)]
pub struct AutoViewArgs {
    /// Space all automatic views may take together (e.g. 256MiB); 0 turns
    /// automatic views off.
    #[arg(long, default_value = "256MiB", value_parser = views::auto::parse_bytes)]
    auto_views_budget: u64,
    /// Runs of one query shape costing at least --auto-views-min-cost, on
    /// the primary table or through a view keeping far more rows than its
    /// own would, within --auto-views-window, that earn it a view.
    #[arg(long, default_value_t = 5)]
    auto_views_after: usize,
    /// The period in which --auto-views-after runs of a shape must fall.
    #[arg(long, default_value = "10m", value_parser = fleetgate_protocol::duration::parse)]
    auto_views_window: Duration,
    /// Queries faster than this are left alone: a dashboard query answers
    /// within 10 ms from a view that fits it.
    #[arg(long, default_value = "10ms", value_parser = fleetgate_protocol::duration::parse)]
    auto_views_min_cost: Duration,
    /// How many times fewer rows a view must hold than its stream.
    #[arg(long, default_value_t = 10.0)]
    auto_views_min_gain: f64,
    /// An automatic view that answers no query for this long is dropped.
    #[arg(long, default_value = "1h", value_parser = fleetgate_protocol::duration::parse)]
    auto_views_unused: Duration,
}

impl AutoViewArgs {
    fn settings(&self) -> AutoSettings {
        AutoSettings {
            budget_bytes: self.auto_views_budget,
            recurrences: self.auto_views_after.max(1),
            window: self.auto_views_window,
            min_cost: self.auto_views_min_cost,
            min_gain: self.auto_views_min_gain,
            unused_after: self.auto_views_unused,
        }
    }
}

/// A size for `--query-max-bytes`: at least 64 KiB, so that any query can
/// answer something.
fn parse_query_max_bytes(text: &str) -> Result<usize, String> {
    match views::auto::parse_bytes(text)? {
        bytes if bytes < 64 << 10 => Err(format!("{text} is below the least, 64KiB")),
        bytes => Ok(usize::try_from(bytes).unwrap_or(usize::MAX)),
    }
}

/// A duration, or "off".
#[derive(Debug, Clone, Copy)]
pub struct OptionalDuration(Option<Duration>);

fn parse_compact_after(text: &str) -> Result<OptionalDuration, String> {
    if text == "off" {
        return Ok(OptionalDuration(None));
    }
    fleetgate_protocol::duration::parse(text)
        .map(|d| OptionalDuration(Some(d)))
        .map_err(|e| format!("{e} (a duration such as 30d, or off)"))
}

async fn bind(addr: SocketAddr, flag: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow!("{what} address {addr} is already in use; choose another with {flag} ADDR (e.g. {flag} 127.0.0.1:0)")
        } else {
            anyhow!("cannot listen for {what} on {addr}: {e} (change it with {flag} ADDR)")
        }
    })
}

/// How `fleetgate broker` differs from `up`: ingest goes to store nodes.
#[derive(clap::Args)]
pub struct BrokerArgs {
    #[command(flatten)]
    up: UpArgs,
    /// How long an ingest message waits for a store node to take it (while
    /// nodes join, fail or restart) before its connection is closed.
    #[arg(long, default_value = "10s", value_parser = fleetgate_protocol::duration::parse)]
    hold: Duration,
    /// NATS servers (nats://HOST:PORT, comma-separated) through which the
    /// cluster's brokers route messages and session takeovers to each
    /// other. Without it this broker routes only among its own connections.
    #[arg(long, value_delimiter = ',', value_name = "URLS")]
    nats: Vec<String>,
    /// Copies JetStream keeps of persistent sessions, their queues and
    /// retained messages (1-5; at most the number of NATS servers with
    /// JetStream). Default: the number of --nats URLs, at most 3.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=5))]
    nats_replicas: Option<u8>,
    /// The cluster this broker belongs to: every NATS subject, bucket and
    /// stream its brokers use is named from it, so clusters sharing NATS
    /// servers stay apart (1-32 of a-z 0-9 - _, starting with a letter).
    #[arg(long, default_value = ClusterName::DEFAULT)]
    cluster_name: ClusterName,
}

/// Where ingest goes: the store in this process, or the cluster's nodes.
enum Ingest {
    Local(Arc<Store>),
    Cluster(Balancer),
}

/// `NAME=URL` of `--etl-database`.
fn parse_etl_database(text: &str) -> Result<(String, String), String> {
    let (name, url) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected NAME=URL"))?;
    Ok((name.to_string(), url.to_string()))
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    serve(args, None, &Fabric::default()).await
}

/// The cluster fabric a broker joins (`fleetgate broker --nats`).
#[derive(Default)]
struct Fabric {
    nats: Vec<String>,
    replicas: usize,
    name: ClusterName,
}

pub async fn run_broker(args: BrokerArgs) -> anyhow::Result<()> {
    if !args
        .up
        .database
        .as_deref()
        .is_some_and(|url| url.starts_with("postgres"))
    {
        return Err(anyhow!(
            "fleetgate broker needs --database postgres://... (shared with the store nodes)"
        ));
    }
    let fabric = Fabric {
        replicas: args
            .nats_replicas
            .map(usize::from)
            .unwrap_or(args.nats.len().clamp(1, 3)),
        nats: args.nats,
        name: args.cluster_name,
    };
    serve(args.up, Some(args.hold), &fabric).await
}

/// `cluster`: the cluster fabric (`fleetgate broker --nats`); none for
/// `up`, and for a broker that routes only among its own connections.
async fn serve(
    args: UpArgs,
    cluster_hold: Option<Duration>,
    cluster: &Fabric,
) -> anyhow::Result<()> {
    init_tracing();

    // Ports first: a taken port is the most common start-up failure, and
    // nothing should be created before it is known.
    let mqtt_listener = bind(args.mqtt, "--mqtt", "MQTT").await?;
    let http_listener = bind(args.http, "--http", "HTTP").await?;
    let pg_addr = match (args.pg, cluster_hold) {
        (Some(addr), _) => Some(addr),
        (None, None) => Some("127.0.0.1:5433".parse().expect("literal")),
        (None, Some(_)) => None,
    };
    let pg_listener = match pg_addr {
        Some(addr) => Some(bind(addr, "--pg", "PostgreSQL wire").await?),
        None => None,
    };
    let udp_socket = match args.udp {
        Some(addr) => Some(
            tokio::net::UdpSocket::bind(addr)
                .await
                .map_err(|e| anyhow!("cannot bind UDP address {addr} (--udp): {e}"))?,
        ),
        None => None,
    };
    let tls_on = args.dev_tls || args.cert.is_some();
    if !tls_on && (args.mqtts.is_some() || args.https.is_some()) {
        return Err(anyhow!(
            "--mqtts and --https need --cert and --key, or --dev-tls"
        ));
    }
    let tls_listeners = if tls_on {
        let mqtts = args
            .mqtts
            .unwrap_or_else(|| "127.0.0.1:8883".parse().expect("literal"));
        let https = args
            .https
            .unwrap_or_else(|| "127.0.0.1:8443".parse().expect("literal"));
        Some((
            bind(mqtts, "--mqtts", "MQTT over TLS").await?,
            bind(https, "--https", "HTTPS").await?,
        ))
    } else {
        None
    };

    let (platform, _) = Platform::open(&args.data).map_err(|e| anyhow!(e))?;
    platform.save_public_key().map_err(|e| anyhow!(e))?;
    // ETL sources read only where the operator said: a job is declared
    // over the API, but runs with this process's file and network access.
    // Checked before the store is opened, so a refused configuration
    // (the store named as a source) changes nothing.
    let etl_access = fleetgate_etl::confine::SourceAccess::new(
        &args
            .etl_dir
            .clone()
            .unwrap_or_else(|| args.data.join("etl-sources")),
        &args.etl_databases,
        fleetgate_etl::confine::Store {
            data_dir: &args.data,
            database_url: args.database.as_deref(),
        },
    )
    .map_err(|e| anyhow!(e))?;
    let identity = tls::identity_from_flags(
        args.cert.as_deref(),
        args.key.as_deref(),
        args.dev_tls,
        &args.data,
    )?;
    let acceptor = match &identity {
        Some(identity) => Some(
            fleetgate_broker::tls::acceptor_from_pem(&identity.cert, &identity.key)
                .map_err(|e| anyhow!(e))?,
        ),
        None => None,
    };
    let db = Db::open(args.database.as_deref(), &args.data.join("store.db"))
        .await
        .map_err(|e| anyhow!(e))?;
    let catalog = open_catalog(&db).await.map_err(|e| anyhow!(e))?;
    let views = Arc::new(
        Views::open(db.clone(), catalog.clone(), args.auto_views.settings())
            .await
            .map_err(|e| anyhow!(e))?,
    );
    views.follow();
    let compaction = Arc::new(
        Compaction::open(
            db.clone(),
            catalog.clone(),
            views.clone(),
            CompactionSettings {
                unused_after: args.compact_after.0,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| anyhow!(e))?,
    );
    compaction.clone().follow();
    let tiers = Arc::new(Tiers::new(db.clone(), catalog.clone(), views.clone()));
    tiers
        .pack_plain_cold_tiers()
        .await
        .map_err(|e| anyhow!(e))?;
    let etl = fleetgate_etl::Etl::open(db.clone(), &args.data, etl_access)
        .await
        .map_err(|e| anyhow!(e))?;
    etl.schedule();
    let buckets = Arc::new(Buckets::new(db.clone(), catalog.clone(), views.clone()));
    let reports = fleetgate_etl::reports::Reports::open(
        db.clone(),
        catalog.clone(),
        buckets.clone(),
        compaction.usage(),
    )
    .await
    .map_err(|e| anyhow!(e))?;
    reports.follow_runs(&etl);
    tiers.clone().follow();
    let registry = Registry::load(db.clone()).await.map_err(|e| anyhow!(e))?;
    // Other brokers sharing the database revoke and change roles too.
    registry.follow_changes();
    let bans = Bans::load(db.clone(), unix_now())
        .await
        .map_err(|e| anyhow!(e))?;
    let audit = AuditLog::open(db.clone()).await.map_err(|e| anyhow!(e))?;
    // Bans made by other brokers sharing the database end sessions here too.
    bans.follow_changes({
        let registry = registry.clone();
        move |device| registry.announce_ban(device)
    });
    bootstrap_admin(&platform, &registry).await?;
    if let Some(path) = &args.streams {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let file = StreamsFile::parse(&text).map_err(|e| anyhow!(e))?;
        catalog.apply(&file).await.map_err(|e| anyhow!(e))?;
    }

    let mut metrics = MetricsRegistry::default();
    // What the dashboard's event stream pushes: told of commits, alerts
    // and ETL runs below.
    let events = http::Events::new(&mut metrics);
    etl.observe(events.run_observer());
    let ledger = Arc::new(RefusalLedger::new(
        args.alert_threshold,
        args.alert_window,
        &mut metrics,
    ));
    let auth = Arc::new(TokenAuthenticator::new(
        platform.signer.verifier(),
        registry.clone(),
        ledger.clone(),
        bans.clone(),
        args.ban_duration.as_secs() as i64,
    ));
    let queue_limits = QueueLimits {
        max_messages: args.session_queue_messages,
        max_bytes: args.session_queue_bytes,
    };
    let fabric = if cluster.nats.is_empty() {
        None
    } else {
        Some(
            NatsFabric::connect(&cluster.nats, &cluster.name, &mut metrics)
                .await
                .map_err(|e| anyhow!("{e} (--nats)"))?,
        )
    };
    // `up` keeps MQTT sessions in its own database. Brokers of a cluster
    // keep them in JetStream, where any broker finds them; without NATS, in
    // memory (each would otherwise load every broker's sessions from the
    // shared database).
    let jetstream = match &fabric {
        Some(fabric) => Some(Arc::new(
            JetStreamStore::open(
                fabric.client(),
                JetStreamSettings {
                    replicas: cluster.replicas,
                    limits: queue_limits,
                    max_session_expiry: args.max_session_expiry,
                    cluster: cluster.name.clone(),
                },
            )
            .await
            .map_err(|e| anyhow!("{e} (--nats)"))?,
        )),
        None => None,
    };
    let session_store: Arc<dyn SessionStore> = match (&jetstream, cluster_hold) {
        (Some(jetstream), _) => jetstream.clone(),
        (None, None) => SqlStore::open(db.clone()).await.map_err(|e| anyhow!(e))?,
        (None, Some(_)) => Arc::new(MemoryStore),
    };
    let router = Router::start(session_store, queue_limits, &mut metrics)
        .await
        .map_err(|e| anyhow!(e))?;
    if let Some(jetstream) = &jetstream {
        jetstream.follow(router.clone());
    }
    // Joined before anything can publish, so nothing routed here misses the
    // other brokers; what they send is taken in once the gatekeeper exists.
    if let Some(fabric) = &fabric {
        router.join(fabric.clone());
    }
    // Anomaly alerts go out on live/alerts/... like live copies.
    let analyses = fleetgate_etl::analysis::Analyses::open(
        db.clone(),
        catalog.clone(),
        events.live_tap(router.clone()),
        compaction.usage(),
    )
    .await
    .map_err(|e| anyhow!(e))?;
    analyses.follow();
    let clock = Arc::new(ClusterClock::new(0));
    let rollout_settings = RolloutSettings {
        min_lead: args.state_lead,
        grace: args.state_grace,
        fault: args.test_crash,
    };
    let platform_topics = PlatformTopics::default();
    let feed = crate::state::StateTopicFeed {
        db: db.clone(),
        topics: platform_topics.clone(),
    };
    // What was published before this start, read before any client can
    // subscribe: a subscriber must get it as a retained message, not as a
    // live one moments later. Later versions come through the coordinator's
    // announcements (and, in a cluster, the schedule).
    feed.refresh_or_warn().await;
    let (ingest, transport, local_state): (_, Arc<dyn StateTransport>, _) = match cluster_hold {
        None => {
            let states = Arc::new(StateStore::new(clock.clone()));
            let follower =
                StateFollower::new(db.clone(), states.clone(), LOCAL_NODE, Default::default());
            // The state in force before the first record is taken.
            follower.load().await.map_err(|e| anyhow!(e))?;
            follower.follow(Duration::from_secs(1));
            let store = Store::start(
                db.clone(),
                catalog.clone(),
                Pipeline::standard(catalog.clone(), args.max_payload),
                WriterConfig::default(),
                vec![
                    Arc::new(PublishLive {
                        sink: router.clone(),
                    }),
                    events.commit_observer(),
                ],
                StoreMetrics::register(&mut metrics),
                states.clone(),
            );
            let transport = crate::state::LocalStores {
                db: db.clone(),
                follower,
                feed,
            };
            (
                Ingest::Local(Arc::new(store)),
                Arc::new(transport) as _,
                Some(states),
            )
        }
        Some(hold) => {
            nodes::ddl(&db).await.map_err(|e| anyhow!(e))?;
            catalog.follow_changes();
            let source = Arc::new(crate::node::NodeTable(db.clone()));
            let balancer = Balancer::start(
                source,
                Duration::from_millis(500),
                hold,
                clock.clone(),
                args.state_grace,
            );
            crate::state::follow_schedule(
                db.clone(),
                balancer.clone(),
                clock.clone(),
                feed.clone(),
            );
            let transport = crate::state::ClusterStores {
                db: db.clone(),
                balancer: balancer.clone(),
                feed,
            };
            (Ingest::Cluster(balancer), Arc::new(transport) as _, None)
        }
    };
    let rollout = Arc::new(Rollout::new(
        db.clone(),
        catalog.clone(),
        transport,
        clock,
        rollout_settings,
    ));
    rollout.watch(Duration::from_millis(500));
    let ingest_service: Arc<dyn IngestService> = match &ingest {
        Ingest::Local(store) => store.clone(),
        Ingest::Cluster(balancer) => Arc::new(balancer.clone()),
    };
    let gatekeeper = Arc::new(Gatekeeper::start(
        mqtt_listener,
        GatekeeperConfig {
            max_payload: args.max_payload,
            max_session_expiry: args.max_session_expiry.as_secs().min(u32::MAX as u64) as u32,
            ..Default::default()
        },
        auth.clone(),
        ingest_service.clone(),
        router.clone(),
        platform_topics,
        &mut metrics,
    )?);
    spawn_revocation_follower(&registry, gatekeeper.clone());
    if let Some(fabric) = &fabric {
        // A device that connects to another broker ends its connections
        // here, as a second connection to this broker would.
        let gatekeeper = gatekeeper.clone();
        fabric
            .serve(router, move |claim| {
                let ended = gatekeeper.disconnect_claimed(claim);
                if ended > 0 {
                    tracing::info!(
                        device = %claim.device,
                        sessions = ended,
                        "device connected to another broker; sessions here closed"
                    );
                }
            })
            .await
            .map_err(|e| anyhow!(e))?;
    }

    let http_addr = http_listener.local_addr()?;
    let sdk = http::SdkSettings {
        handshakes: Arc::new(
            Handshakes::open(
                registry.clone(),
                bans.clone(),
                auth.clone(),
                platform.nonce_key(),
                args.nonce_ttl.as_millis().min(i64::MAX as u128) as i64,
                db.clone(),
            )
            .await
            .map_err(|e| anyhow!(e))?,
        ),
        builder: Arc::new(Builder::new(args.sdk_cache)),
        token_ttl: args.sdk_token_ttl,
        manifest_ttl: args.sdk_manifest_ttl,
        mqtt_port: gatekeeper.local_addr().port(),
        mqtts_port: match &tls_listeners {
            Some((mqtts, _)) => Some(mqtts.local_addr()?.port()),
            None => None,
        },
    };
    let queries = fleetgate_api::QueryService {
        db: db.clone(),
        catalog: catalog.clone(),
        views: views.clone(),
        compaction: compaction.clone(),
        etl: etl.clone(),
        analyses: analyses.clone(),
        auth: auth.clone(),
        timeout: args.query_timeout,
        max_bytes: args.query_max_bytes,
    };
    let pg_server = Arc::new(fleetgate_api::pg::PgServer {
        queries: queries.clone(),
        auth: auth.clone(),
        registry: registry.clone(),
        tls: acceptor.as_ref().map(fleetgate_api::pg::acceptor),
        cancels: Default::default(),
    });
    let state = http::AppState {
        db: db.clone(),
        catalog,
        registry,
        platform: Arc::new(platform),
        auth: auth.clone(),
        ledger,
        bans,
        audit,
        metrics: Arc::new(metrics),
        sdk,
        balancer: match &ingest {
            Ingest::Cluster(balancer) => Some(balancer.clone()),
            Ingest::Local(_) => None,
        },
        rollout,
        local_state,
        views,
        tiers,
        compaction,
        buckets,
        etl,
        reports,
        analyses,
        ingest: ingest_service.clone(),
        unauth_limit: http::RateLimit::new(args.unauth_rate, args.unauth_burst),
        queries,
        events: events.clone(),
    };
    events.start(state.clone());
    let (stop_http, http_stopped) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut ready = format!(
        "fleetgate ready: mqtt={} http={}",
        gatekeeper.local_addr(),
        http_addr
    );
    if let Some(listener) = pg_listener {
        ready.push_str(&format!(" pg={}", listener.local_addr()?));
        pg_server.serve(listener);
    }
    if let Some(socket) = udp_socket {
        let socket = Arc::new(socket);
        ready.push_str(&format!(" udp={}", socket.local_addr()?));
        crate::udp_ingest::UdpIngest {
            socket,
            auth: auth.clone(),
            ingest: ingest_service.clone(),
        }
        .serve();
    }
    let mut servers = Vec::new();
    if let (Some((mqtts, https)), Some(acceptor)) = (tls_listeners, acceptor) {
        let (timeout, max) = (args.tls_handshake_timeout, args.tls_max_handshakes);
        let mqtts = TlsIncoming::start(mqtts, acceptor.clone(), timeout, max)?;
        let https = TlsIncoming::start(https, acceptor, timeout, max)?;
        ready.push_str(&format!(
            " mqtts={} https={}",
            mqtts.local_addr(),
            https.local_addr()
        ));
        gatekeeper.serve_tls(mqtts);
        let stop = stopped(http_stopped.clone());
        servers.push(tokio::spawn(http::serve_tls(https, state.clone(), stop)));
        if let Some(ca) = identity.and_then(|i| i.ca) {
            println!(
                "development TLS: clients trust {} (e.g. mosquitto_pub --cafile)",
                ca.display()
            );
        }
    }
    let stop = stopped(http_stopped.clone());
    servers.push(tokio::spawn(http::serve(http_listener, state, stop)));
    // Tests and scripts read this line to learn the bound addresses.
    println!("{ready}");

    shutdown_signal().await;
    tracing::info!("shutting down: finishing in-flight commits");
    gatekeeper.shutdown(Duration::from_secs(15)).await;
    if let Ingest::Local(store) = &ingest {
        store.shutdown().await;
    }
    // Event streams never end by themselves: ended here, so the HTTP
    // server's graceful shutdown need not wait them out.
    events.close();
    let _ = stop_http.send(true);
    for server in servers {
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    }
    db.close().await;
    tracing::info!("stopped");
    Ok(())
}

use crate::tls;
use fleetgate_api::http;
use fleetgate_broker::tls::TlsIncoming;

/// A rate in requests per second: finite and not negative (0: no limit).
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 0.0 => Ok(rate),
        _ => Err(format!(
            "{text:?} is not a rate: give requests per second, 0 or more"
        )),
    }
}

/// The built-in admin device and, on first start, its token (printed once).
async fn bootstrap_admin(platform: &Platform, registry: &Registry) -> anyhow::Result<()> {
    let now = unix_now();
    if registry.get(ADMIN_DEVICE).is_none() {
        registry
            .add(
                ADMIN_DEVICE,
                Role::Admin,
                Some("fleetgate-admin"),
                None,
                now,
            )
            .await?;
    }
    if !platform.admin_token_path().exists() {
        let token = platform.mint(ADMIN_DEVICE, Role::Admin, ADMIN_TOKEN_TTL_SECS, now);
        platform.save_admin_token(&token).map_err(|e| anyhow!(e))?;
        println!(
            "admin token (saved to {}, shown once):\n{token}",
            platform.admin_token_path().display()
        );
    }
    Ok(())
}

/// Revocations, role changes and bans end the device's live sessions at once.
fn spawn_revocation_follower(registry: &Registry, gatekeeper: Arc<Gatekeeper>) {
    let mut events = registry.subscribe();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(RegistryEvent::Revoked(device)) => {
                    let ended = gatekeeper.disconnect_device(&device, EndReason::Revoked);
                    tracing::info!(device, sessions = ended, "device revoked; sessions closed");
                }
                Ok(RegistryEvent::RoleChanged(device, role)) => {
                    let ended = gatekeeper.disconnect_device(&device, EndReason::RoleChanged);
                    tracing::info!(device, %role, sessions = ended, "role changed; sessions closed to reconnect");
                }
                Ok(RegistryEvent::Banned(device)) => {
                    let ended = gatekeeper.disconnect_device(&device, EndReason::Banned);
                    tracing::info!(device, sessions = ended, "device banned; sessions closed");
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
    });
}

pub(crate) async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

pub(crate) fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,sqlx=warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
