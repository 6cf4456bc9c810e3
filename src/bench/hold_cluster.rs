//! `fleetgate bench --hold N --hold-brokers K`: holding a fleet across a
//! cluster of brokers on this machine.
//!
//! A process may open at most 20,000 files here, so one broker holds at most
//! about 19,000 devices: a fleet of 100,000 needs six. This starts what such
//! a cluster is made of (a NATS cluster of three servers with JetStream on,
//! which brokers need for persistent sessions; a scratch database on the
//! PostgreSQL `--database` names; K `fleetgate broker --nats` processes),
//! connects N idle devices, device `i` to broker `i mod K`, from the helper
//! processes of `bench --hold`, and measures:
//!
//! 1. the connect rate, over the whole cluster and per broker;
//! 2. each broker's resident memory before the connects and with its
//!    devices connected and idle, per device;
//! 3. a reconnect storm: every connection on every broker closed at once
//!    (no DISCONNECT), then all of them reconnecting to the same broker; the
//!    time until all are back, and until the first 50,000 are (the issue's
//!    storm).
//!
//! What a cluster adds to a connect is the takeover claim: the broker tells
//! every other broker, through NATS, that the device connected to it, so
//! they end its connections there. The devices connect with clean sessions,
//! so JetStream (persistent sessions) is not on their path.

use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use tokio::io::AsyncReadExt;

use super::hold::{
    check, connect_reports, dash, mib, p50_p99, register, rss, source, stop_helpers, stopped_early,
    CheckReport, Credentials, Helper, Round, DEADLINE, FILE_LIMIT, MAX_BROKERS, SETTLE,
};
use super::{spawn_in, ScratchDatabase, Spawned};

/// Debian's nats-server; one on the PATH otherwise.
const NATS_SERVER: &str = "/usr/sbin/nats-server";
/// Three, as a production cluster would have: JetStream keeps three copies.
const NATS_SERVERS: usize = 3;
/// Longest the NATS servers may take to take clients and route to each other.
const NATS_READY: Duration = Duration::from_secs(30);
/// The storm: 50,000 devices back within 20 s.
const STORM_TARGET: usize = 50_000;

/// What `fleetgate bench --hold N --hold-brokers K` was asked for.
pub struct ClusterArgs {
    pub devices: usize,
    pub brokers: usize,
    /// Connect attempts in flight at once, over all helper processes.
    pub concurrency: usize,
    /// PostgreSQL URL; the brokers share a scratch database made there.
    pub database: String,
    /// Each device subscribes to `devices/<id>/cmd` once connected.
    pub subscribe: bool,
}

/// A broker's own counters, from its `/metrics`.
#[derive(Clone, Copy)]
struct Counters {
    connections: f64,
    refused: Option<f64>,
    /// Messages and takeover claims its fabric could not queue for NATS.
    dropped: Option<f64>,
    /// NATS subscriptions for what its sessions subscribe to.
    interest: Option<f64>,
}

/// Everything measured on one broker; a phase that did not run stays `None`.
#[derive(Default)]
struct BrokerOutcome {
    devices: usize,
    pid: Option<u32>,
    rss_before: Option<u64>,
    connect: Option<Round>,
    held: Option<CheckReport>,
    counters_held: Option<Counters>,
    rss_held: Option<u64>,
    storm: Option<Round>,
    held_after_storm: Option<CheckReport>,
    counters_after_storm: Option<Counters>,
    rss_after_storm: Option<u64>,
}

#[derive(Default)]
struct Outcome {
    registration: Option<(usize, Duration)>,
    /// From starting the first broker to the last one's ready line.
    brokers_started: Option<Duration>,
    brokers: Vec<BrokerOutcome>,
    /// The rounds over the whole cluster.
    connect: Option<Round>,
    storm: Option<Round>,
    /// Each NATS server's RSS before the connects and after the storm.
    nats_rss: Vec<(Option<u64>, Option<u64>)>,
    /// Slow consumers the NATS servers counted (a client that did not read
    /// fast enough loses messages: for a broker, claims).
    nats_slow_consumers: Option<u64>,
    /// The most connections the brokers held to the database at a check,
    /// and the server's max_connections.
    postgres: Option<(i64, i64)>,
    /// Where the CPU went during each round.
    cpu_connect: Option<CpuUse>,
    cpu_storm: Option<CpuUse>,
    /// Why the measurement stopped early, or what could not be measured.
    notes: Vec<String>,
}

pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    if args.devices == 0 || args.concurrency == 0 {
        bail!("--hold and --hold-concurrency must be above 0");
    }
    if args.brokers > MAX_BROKERS || args.devices < args.brokers {
        bail!(
            "--hold-brokers is at most {MAX_BROKERS} (loopback source addresses) and at most --hold"
        );
    }
    let nats_server = nats_server()
        .ok_or_else(|| anyhow!("nats-server is not installed (apt-get install nats-server)"))?;
    let per_broker = args.devices.div_ceil(args.brokers);
    println!(
        "hold on a cluster: {} idle devices over {} fleetgate brokers (at most {per_broker} each, \
         round-robin), {NATS_SERVERS} NATS servers with JetStream, PostgreSQL; {} connect \
         attempts at once; no fan-out, no reference broker",
        args.devices, args.brokers, args.concurrency
    );
    if per_broker + 100 > FILE_LIMIT {
        println!(
            "  note: each broker may open at most {FILE_LIMIT} files; connections beyond that \
             will be refused (use more --hold-brokers)"
        );
    }
    let deadline = Instant::now() + DEADLINE;
    // Per run, so that a second run within TIME_WAIT (60 s) uses other
    // source addresses than the first.
    let run_octet = (1 + std::process::id() % 254) as u8;
    let scratch = ScratchDatabase::create(&args.database).await?;
    let mut out = Outcome::default();
    let measured = tokio::time::timeout_at(
        deadline.into(),
        measure(
            &args,
            &nats_server,
            &scratch.url,
            run_octet,
            deadline,
            &mut out,
        ),
    )
    .await;
    out.notes.extend(stopped_early(measured));
    // Every process measure started has ended by now (dropped with it).
    scratch.drop_database().await;
    print_report(&args, &out);
    Ok(())
}

/// The processes, in the order they must end: helpers (their connections
/// close), then brokers, then NATS. Locals drop in reverse order of
/// declaration, so `nats` is declared first.
async fn measure(
    args: &ClusterArgs,
    nats_server: &Path,
    database: &str,
    run_octet: u8,
    until: Instant,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let nats = NatsCluster::start(nats_server).await?;
    let http = reqwest::Client::new();

    let started = Instant::now();
    let (devices, dirs) = register_devices(args, database, &http).await?;
    out.registration = Some((devices.len(), started.elapsed()));

    let started = Instant::now();
    let urls = nats.urls();
    // Each holds connections to PostgreSQL (9 when idle, up to 18), which
    // is what limits how many brokers one server takes: say which failed.
    let brokers = dirs
        .into_iter()
        .enumerate()
        .map(|(i, dir)| {
            spawn_in(dir, "broker", Some(database), &["--nats", &urls])
                .with_context(|| format!("broker {i} of {}", args.brokers))
        })
        .collect::<anyhow::Result<Vec<Spawned>>>()?;
    out.brokers_started = Some(started.elapsed());

    let count = brokers.len();
    let mut shares: Vec<Vec<Credentials>> = vec![Vec::new(); count];
    for (i, device) in devices.into_iter().enumerate() {
        shares[i % count].push(device);
    }
    // Helpers connect to one broker each; `groups[b]` are broker b's.
    let mut helpers = Vec::new();
    let mut groups: Vec<Range<usize>> = Vec::with_capacity(count);
    for (broker, share) in brokers.iter().zip(&shares) {
        let first = helpers.len();
        let concurrency = args.concurrency.div_ceil(count);
        helpers.extend(Helper::spawn_all(broker.mqtt, share, concurrency, args.subscribe).await?);
        groups.push(first..helpers.len());
    }
    out.brokers = brokers
        .iter()
        .zip(&shares)
        .map(|(broker, share)| BrokerOutcome {
            devices: share.len(),
            pid: Some(broker.pid()),
            rss_before: rss(Some(broker.pid())),
            ..BrokerOutcome::default()
        })
        .collect();
    let nats_before = nats.rss();
    let sources = |round: u8| -> Vec<Option<IpAddr>> {
        let mut sources = Vec::new();
        for (b, (broker, group)) in brokers.iter().zip(&groups).enumerate() {
            sources.extend(
                (0..group.len()).map(|h| source(broker.mqtt, run_octet, b as u8, round, h)),
            );
        }
        sources
    };

    let processes = Processes([
        brokers.iter().map(Spawned::pid).collect(),
        helpers.iter().filter_map(Helper::pid).collect(),
        nats.servers.iter().map(|s| s.child.id()).collect(),
        postgres_backends(database).await,
    ]);

    let before = processes.sample();
    let (reports, overflows) = connect_reports(&mut helpers, &sources(0), until).await?;
    out.cpu_connect = Some(processes.sample().since(&before));
    out.connect = Some(Round::merge(&reports, overflows));
    for (broker, group) in out.brokers.iter_mut().zip(&groups) {
        broker.connect = Some(Round::merge(&reports[group.clone()], None));
    }
    tokio::time::sleep(SETTLE).await;
    for (b, group) in groups.iter().enumerate() {
        let held = check(&mut helpers[group.clone()]).await?;
        let measured = &mut out.brokers[b];
        measured.held = Some(held);
        measured.rss_held = rss(measured.pid);
        measured.counters_held = counters(&http, &brokers[b]).await;
    }
    let pool = postgres_connections(database).await;

    let before = processes.sample();
    let (reports, overflows) = connect_reports(&mut helpers, &sources(1), until).await?;
    out.cpu_storm = Some(processes.sample().since(&before));
    out.storm = Some(Round::merge(&reports, overflows));
    for (broker, group) in out.brokers.iter_mut().zip(&groups) {
        broker.storm = Some(Round::merge(&reports[group.clone()], None));
    }
    tokio::time::sleep(SETTLE).await;
    for (b, group) in groups.iter().enumerate() {
        let held = check(&mut helpers[group.clone()]).await?;
        let measured = &mut out.brokers[b];
        measured.held_after_storm = Some(held);
        measured.rss_after_storm = rss(measured.pid);
        measured.counters_after_storm = counters(&http, &brokers[b]).await;
    }
    // Pools grow on demand: the larger of the two readings.
    out.postgres = match (pool, postgres_connections(database).await) {
        (Some((a, max)), Some((b, _))) => Some((a.max(b), max)),
        (one, other) => one.or(other),
    };
    out.nats_rss = nats_before.into_iter().zip(nats.rss()).collect();
    out.nats_slow_consumers = nats.slow_consumers().await;
    stop_helpers(helpers).await?;
    Ok(())
}

/// Registers the devices through a broker of their own (the registrar,
/// which also makes the platform key and the schema), then stops it, and
/// gives the devices and a data directory per measured broker holding the
/// platform key. The measured brokers all start alike: each loads the
/// registry from the database, and none carries the memory of the import
/// (which its allocator would hand to the connections, and so hide).
async fn register_devices(
    args: &ClusterArgs,
    database: &str,
    http: &reqwest::Client,
) -> anyhow::Result<(Vec<Credentials>, Vec<tempfile::TempDir>)> {
    let registrar = spawn_in(tempfile::tempdir()?, "broker", Some(database), &[])?;
    // Idle devices are ingest devices, as a fleet's are.
    let wanted: Vec<(String, &str)> = (0..args.devices)
        .map(|i| (format!("hold-{i}"), "ingest"))
        .collect();
    let devices = register(http, &registrar, &wanted).await?;
    let key = registrar.dir.path().join("platform.key");
    let dirs = (0..args.brokers)
        .map(|_| {
            let dir = tempfile::tempdir()?;
            // A copy keeps the key file's permissions (0600).
            std::fs::copy(&key, dir.path().join("platform.key"))?;
            anyhow::Ok(dir)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((devices, dirs))
}

/// A broker's counters from its `/metrics` (`None` if it does not answer).
async fn counters(http: &reqwest::Client, broker: &Spawned) -> Option<Counters> {
    let url = format!("{}/metrics", broker.http);
    let text = http.get(url).send().await.ok()?.text().await.ok()?;
    Some(Counters {
        connections: metric(&text, "fleetgate_mqtt_connections")?,
        refused: metric(&text, "fleetgate_mqtt_connects_refused_total"),
        dropped: metric(&text, "fleetgate_cluster_forward_dropped_total"),
        interest: metric(&text, "fleetgate_cluster_interest_subscriptions"),
    })
}

/// The sum of a metric's samples over all its labels, in OpenMetrics text.
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if rest.starts_with(' ') || rest.starts_with('{') {
            let value: f64 = rest.rsplit(' ').next()?.parse().ok()?;
            *sum.get_or_insert(0.0) += value;
        }
    }
    sum
}

/// The server processes of the connections to the brokers' database, for
/// their CPU time; none when the server is not on this machine (its pids
/// would name other processes here).
async fn postgres_backends(url: &str) -> Vec<u32> {
    use sqlx::Connection;
    use std::str::FromStr;
    let local = sqlx::postgres::PgConnectOptions::from_str(url).is_ok_and(|o| {
        let host = o.get_host();
        host.starts_with('/') || ["127.0.0.1", "localhost", "::1"].contains(&host)
    });
    if !local {
        return Vec::new();
    }
    let Ok(mut connection) = sqlx::PgConnection::connect(url).await else {
        return Vec::new();
    };
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut connection)
    .await
    .unwrap_or_default();
    pids.into_iter()
        .filter_map(|pid| u32::try_from(pid).ok())
        .collect()
}

/// Connections to the brokers' database (this one not counted), and the
/// server's max_connections: six brokers share one PostgreSQL, and each
/// has pools of its own.
async fn postgres_connections(url: &str) -> Option<(i64, i64)> {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(url).await.ok()?;
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()) - 1, \
         current_setting('max_connections')::bigint",
    )
    .fetch_one(&mut connection)
    .await
    .ok()
}

/// The kinds of process whose CPU time is accounted: on two cores they
/// compete, and which of them took the CPU says what limits a round.
const KINDS: [&str; 4] = [
    "brokers",
    "helper processes",
    "NATS",
    "PostgreSQL (the brokers' backends)",
];

/// The processes of each of [`KINDS`].
struct Processes([Vec<u32>; 4]);

/// CPU time each process has used so far (`None` if it could not be read),
/// and when.
struct CpuSample {
    at: Instant,
    used: [Vec<Option<Duration>>; 4],
}

/// CPU time each of [`KINDS`] used over `wall` (processes that could not be
/// read at both ends, such as a database connection closed meanwhile, not
/// counted).
struct CpuUse {
    wall: Duration,
    used: [Duration; 4],
}

impl Processes {
    fn sample(&self) -> CpuSample {
        CpuSample {
            at: Instant::now(),
            used: self
                .0
                .each_ref()
                .map(|pids| pids.iter().map(|&pid| cpu_time(pid)).collect()),
        }
    }
}

impl CpuSample {
    /// What was used from `earlier` to this sample.
    fn since(&self, earlier: &CpuSample) -> CpuUse {
        let mut used = [Duration::ZERO; 4];
        for (kind, total) in used.iter_mut().enumerate() {
            for (now, then) in self.used[kind].iter().zip(&earlier.used[kind]) {
                if let (Some(now), Some(then)) = (now, then) {
                    *total += now.saturating_sub(*then);
                }
            }
        }
        CpuUse {
            wall: self.at - earlier.at,
            used,
        }
    }
}

/// CPU time (user and system) a process has used: fields 14 and 15 of
/// /proc/PID/stat, in clock ticks, which /proc gives in 1/100 s on Linux
/// whatever the kernel's own tick rate.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it do not.
    let (_, fields) = stat.rsplit_once(") ")?;
    let mut fields = fields.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((user + system) * 10))
}

// ---------------------------------------------------------------------------
// NATS.

fn nats_server() -> Option<PathBuf> {
    if Path::new(NATS_SERVER).exists() {
        return Some(NATS_SERVER.into());
    }
    let found = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    found.then(|| "nats-server".into())
}

/// A NATS cluster on ephemeral ports with JetStream in a temporary
/// directory, killed when dropped (as in tests/nats_cluster.rs).
struct NatsCluster {
    servers: Vec<NatsServer>,
    _dir: tempfile::TempDir,
}

struct NatsServer {
    child: Child,
    client_port: u16,
    monitor_port: u16,
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
    }
}

impl NatsCluster {
    /// Starts [`NATS_SERVERS`] servers routed to each other, and returns once
    /// each takes clients and has its routes to all the others.
    async fn start(program: &Path) -> anyhow::Result<NatsCluster> {
        // Client, route and monitoring port for each, all bound at once so
        // no two are the same; released just before the servers take them.
        let listeners = (0..3 * NATS_SERVERS)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()?;
        let ports = listeners
            .iter()
            .map(|l| Ok(l.local_addr()?.port()))
            .collect::<std::io::Result<Vec<u16>>>()?;
        drop(listeners);
        let (clients, rest) = ports.split_at(NATS_SERVERS);
        let (routes, monitors) = rest.split_at(NATS_SERVERS);
        let all_routes = routes
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        // Dropped (the servers' JetStream files with it) after the servers.
        let mut cluster = NatsCluster {
            servers: Vec::new(),
            _dir: tempfile::tempdir()?,
        };
        for i in 0..NATS_SERVERS {
            let store = cluster._dir.path().join(format!("n{i}"));
            let child = Command::new(program)
                .args(["-a", "127.0.0.1", "-p", &clients[i].to_string()])
                .args(["-n", &format!("bench-n{i}"), "--cluster_name", "bench"])
                .args(["-cluster", &format!("nats://127.0.0.1:{}", routes[i])])
                .args(["-routes", &all_routes])
                .args(["-m", &monitors[i].to_string()])
                .arg("-js")
                .arg("-sd")
                .arg(&store)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("cannot start {}", program.display()))?;
            cluster.servers.push(NatsServer {
                child,
                client_port: clients[i],
                monitor_port: monitors[i],
            });
        }
        let deadline = Instant::now() + NATS_READY;
        for server in &cluster.servers {
            while !server.ready().await {
                if Instant::now() > deadline {
                    bail!(
                        "NATS server on port {} not clustered within {} s",
                        server.client_port,
                        NATS_READY.as_secs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(cluster)
    }

    /// All servers, as `--nats` takes them.
    fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn rss(&self) -> Vec<Option<u64>> {
        self.servers
            .iter()
            .map(|s| rss(Some(s.child.id())))
            .collect()
    }

    async fn slow_consumers(&self) -> Option<u64> {
        let mut total = 0;
        for server in &self.servers {
            total += monitor(server.monitor_port, "varz").await["slow_consumers"].as_u64()?;
        }
        Some(total)
    }
}

impl NatsServer {
    /// Whether it greets clients (INFO) and has routes to all the others.
    async fn ready(&self) -> bool {
        let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", self.client_port)).await
        else {
            return false;
        };
        let mut greeting = [0u8; 5];
        let greeted = matches!(
            tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut greeting)).await,
            Ok(Ok(_))
        ) && &greeting == b"INFO ";
        let routes = monitor(self.monitor_port, "routez").await["num_routes"].as_u64();
        greeted && routes >= Some(NATS_SERVERS as u64 - 1)
    }
}

/// A NATS monitoring endpoint's JSON (`Null` while it does not answer).
async fn monitor(port: u16, endpoint: &str) -> Value {
    match reqwest::get(format!("http://127.0.0.1:{port}/{endpoint}")).await {
        Ok(response) => response.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

// ---------------------------------------------------------------------------
// The report.

/// One column of the report: a broker, or the whole cluster (sums over the
/// brokers; `None` where any broker's figure is missing).
struct Column<'a> {
    name: String,
    devices: usize,
    connect: Option<&'a Round>,
    held: Option<usize>,
    own_held: Option<f64>,
    rss_before: Option<u64>,
    rss_held: Option<u64>,
    storm: Option<&'a Round>,
    /// The cluster only: when the first [`STORM_TARGET`] were back.
    storm_target: Option<Duration>,
    held_after_storm: Option<usize>,
    own_after_storm: Option<f64>,
    rss_after_storm: Option<u64>,
    refused: Option<f64>,
    dropped: Option<f64>,
    interest: Option<f64>,
}

impl<'a> Column<'a> {
    fn broker(index: usize, b: &'a BrokerOutcome) -> Column<'a> {
        let after = b.counters_after_storm;
        Column {
            name: format!("broker {index}"),
            devices: b.devices,
            connect: b.connect.as_ref(),
            held: b.held.as_ref().map(|c| c.open),
            own_held: b.counters_held.map(|c| c.connections),
            rss_before: b.rss_before,
            rss_held: b.rss_held,
            storm: b.storm.as_ref(),
            storm_target: None,
            held_after_storm: b.held_after_storm.as_ref().map(|c| c.open),
            own_after_storm: after.map(|c| c.connections),
            rss_after_storm: b.rss_after_storm,
            refused: after.and_then(|c| c.refused),
            dropped: after.and_then(|c| c.dropped),
            interest: after.and_then(|c| c.interest),
        }
    }

    fn cluster(out: &'a Outcome, brokers: &[Column<'a>]) -> Column<'a> {
        fn sum<T: std::iter::Sum>(values: impl Iterator<Item = Option<T>>) -> Option<T> {
            values.sum()
        }
        Column {
            name: "cluster".into(),
            devices: brokers.iter().map(|b| b.devices).sum(),
            connect: out.connect.as_ref(),
            held: sum(brokers.iter().map(|b| b.held)),
            own_held: sum(brokers.iter().map(|b| b.own_held)),
            rss_before: sum(brokers.iter().map(|b| b.rss_before)),
            rss_held: sum(brokers.iter().map(|b| b.rss_held)),
            storm: out.storm.as_ref(),
            storm_target: out
                .storm
                .as_ref()
                .and_then(|s| s.connacks.get(STORM_TARGET - 1).copied()),
            held_after_storm: sum(brokers.iter().map(|b| b.held_after_storm)),
            own_after_storm: sum(brokers.iter().map(|b| b.own_after_storm)),
            rss_after_storm: sum(brokers.iter().map(|b| b.rss_after_storm)),
            refused: sum(brokers.iter().map(|b| b.refused)),
            dropped: sum(brokers.iter().map(|b| b.dropped)),
            interest: sum(brokers.iter().map(|b| b.interest)),
        }
    }

    /// The cells, in the order of [`ROWS`].
    fn cells(&self) -> [String; 18] {
        let count = |n: Option<usize>| n.map_or_else(dash, |n| n.to_string());
        let own = |n: Option<f64>| n.map_or_else(dash, |n| format!("{n:.0}"));
        let per_device = |before: Option<u64>, after: Option<u64>, open: Option<usize>| match (
            before, after, open,
        ) {
            (Some(before), Some(after), Some(open)) if open > 0 => format!(
                "{:.1} KiB",
                (after as f64 - before as f64) / open as f64 / 1024.0
            ),
            _ => dash(),
        };
        let rate = |r: &Round| {
            let seconds = r.until_last_connack.as_secs_f64().max(1e-9);
            format!("{:.0}", r.connected as f64 / seconds)
        };
        let devices = self.devices;
        [
            devices.to_string(),
            self.connect
                .map_or_else(dash, |r| format!("{} of {devices}", r.connected)),
            self.connect.map_or_else(dash, rate),
            self.connect.map_or_else(dash, |r| p50_p99(&r.latencies)),
            count(self.held),
            own(self.own_held),
            mib(self.rss_before),
            mib(self.rss_held),
            per_device(self.rss_before, self.rss_held, self.held),
            self.storm.map_or_else(dash, |r| {
                format!(
                    "{:.2} s ({} of {devices})",
                    r.until_last_connack.as_secs_f64(),
                    r.connected
                )
            }),
            self.storm_target
                .map_or_else(dash, |t| format!("{:.2} s", t.as_secs_f64())),
            self.storm.map_or_else(dash, |r| p50_p99(&r.latencies)),
            count(self.held_after_storm),
            own(self.own_after_storm),
            mib(self.rss_after_storm),
            own(self.refused),
            own(self.dropped),
            own(self.interest),
        ]
    }
}

/// Row labels of the table, in the order [`Column::cells`] fills them.
const ROWS: [&str; 18] = [
    "devices",
    "connected (CONNACK accepted)",
    "connects/s",
    "connect -> CONNACK p50 / p99",
    "still connected after 2 s idle",
    "  connections by the broker's count",
    "RSS before the connects",
    "RSS with all connected, idle",
    "RSS per idle device",
    "storm: all closed, all back in",
    "storm: first 50,000 back in",
    "storm connect -> CONNACK p50 / p99",
    "still connected 2 s after the storm",
    "  connections by the broker's count",
    "RSS after the storm",
    "connects refused (broker's count)",
    "claims/messages dropped before NATS",
    "NATS interest subscriptions",
];

fn print_report(args: &ClusterArgs, out: &Outcome) {
    println!();
    if let Some((count, took)) = out.registration {
        println!(
            "registered {count} devices in {:.1} s (POST /v1/devices/import; not part of any rate below)",
            took.as_secs_f64()
        );
    }
    if let Some(took) = out.brokers_started {
        println!(
            "{} brokers started in {:.1} s (one after the other: each loads the registry and joins NATS and JetStream)",
            args.brokers,
            took.as_secs_f64()
        );
    }
    if !out.brokers.is_empty() {
        let brokers: Vec<Column> = out
            .brokers
            .iter()
            .enumerate()
            .map(|(i, b)| Column::broker(i, b))
            .collect();
        let mut columns = vec![Column::cluster(out, &brokers)];
        columns.extend(brokers);
        let cells: Vec<[String; 18]> = columns.iter().map(Column::cells).collect();
        let width = columns
            .iter()
            .map(|c| c.name.chars().count())
            .chain(cells.iter().flatten().map(|c| c.chars().count()))
            .max()
            .unwrap_or(0)
            + 3;
        let label_width = ROWS.iter().map(|r| r.len()).max().unwrap_or(0) + 3;
        print!("\n{:<label_width$}", "");
        for column in &columns {
            print!("{:<width$}", column.name);
        }
        println!();
        for (row, label) in ROWS.iter().enumerate() {
            print!("{label:<label_width$}");
            for column in &cells {
                print!("{:<width$}", column[row]);
            }
            println!();
        }
    }
    println!();
    let overflows = |r: &Option<Round>| {
        r.as_ref()
            .and_then(|r| r.listen_overflows)
            .map_or_else(dash, |n| n.to_string())
    };
    if out.connect.is_some() {
        println!(
            "listen queue overflows (the machine's): connect {} / storm {}",
            overflows(&out.connect),
            overflows(&out.storm)
        );
    }
    if !out.nats_rss.is_empty() {
        let servers: Vec<String> = out
            .nats_rss
            .iter()
            .map(|(before, after)| format!("{} -> {}", mib(*before), mib(*after)))
            .collect();
        println!(
            "NATS servers' RSS, before the connects -> after the storm: {}; slow consumers: {}",
            servers.join(", "),
            out.nats_slow_consumers.map_or_else(dash, |n| n.to_string())
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (what, cpu) in [("connects", &out.cpu_connect), ("storm", &out.cpu_storm)] {
        let Some(cpu) = cpu else { continue };
        // From the command to the helpers' reports (their last CONNACK, or
        // a failed attempt's end): the machine had wall x cores of CPU;
        // what these do not use went to this process, anything else
        // running, or nothing.
        let used: Vec<String> = KINDS
            .iter()
            .zip(cpu.used)
            .map(|(kind, used)| format!("{kind} {:.1} s", used.as_secs_f64()))
            .collect();
        println!(
            "CPU during the {what} ({:.1} s x {cores} cores): {}",
            cpu.wall.as_secs_f64(),
            used.join(", ")
        );
    }
    if let Some((used, max)) = out.postgres {
        println!("PostgreSQL connections held by the brokers: {used} (the server's max_connections: {max})");
    }
    let mut lines = out.notes.clone();
    for (what, round) in [("connect", &out.connect), ("storm", &out.storm)] {
        for (error, count) in round.iter().flat_map(|r| &r.errors) {
            lines.push(format!("{what}: {count} x {error}"));
        }
    }
    for line in lines {
        println!("  {line}");
    }
}
