//! `fleetgate bench`: durable ingest throughput and latency over real MQTT,
//! with a plain Mosquitto broker measured under the same load as reference.
//!
//! It starts its own `fleetgate up` (this binary) on ephemeral ports with a
//! fresh data directory, so the figures are reproducible with one command.
//! The other measurements are submodules: `sdk` (`--sdk`), `etl`
//! (`--etl`), `cold` (`--cold`), `hold` (`--hold`) and `hold_cluster`
//! (`--hold --hold-brokers`).

mod cold;
mod etl;
mod hold;
mod hold_cluster;
mod sdk;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex as StdMutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use fleetgate_broker::codec::put_remaining_length;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Concurrent device connections.
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// Messages each connection publishes.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Records per message (a JSON array when more than one).
    #[arg(long, default_value_t = 1)]
    records_per_message: usize,
    /// QoS 1 publishes in flight per connection.
    #[arg(long, default_value_t = 100)]
    inflight: u16,
    /// Reference broker to run the same load against; "none" to skip.
    #[arg(long, default_value = "127.0.0.1:1883")]
    reference: String,
    /// PostgreSQL URL for the store; SQLite when absent.
    #[arg(long)]
    database: Option<String>,
    /// Devices to revoke one by one while connected, timing command to closed
    /// connection (0 skips it).
    #[arg(long, default_value_t = 100)]
    revocations: usize,
    /// Run `fleetgate broker` and this many `fleetgate store` nodes instead
    /// of `up` (needs --database).
    #[arg(long, default_value_t = 0)]
    cluster_nodes: usize,
    /// Measure SDK delivery instead: handshake + build (cold and cached) per
    /// target, and encoding one record inside the module.
    #[arg(long)]
    sdk: bool,
    /// Handshakes per measurement with --sdk.
    #[arg(long, default_value_t = 50)]
    handshakes: usize,
    /// State rollouts (rules pushes that change no outcome) during the load,
    /// one every 1.5 s, to measure the ingest pause around each activation.
    #[arg(long, default_value_t = 0)]
    rollouts: usize,
    /// Measure batch ETL instead: a CSV of this many orders (over a year)
    /// extracted, joined, translated and loaded, against a plain bulk load
    /// of the same file; then a year-long hourly report with a real-time tail.
    #[arg(long, default_value_t = 0)]
    etl: usize,
    /// Measure the compressed cold tier instead: this many readings moved
    /// from the hot table into chunks; sizes, move rate, and queries
    /// before and after.
    #[arg(long, default_value_t = 0)]
    cold: usize,
    /// Realtime views on the bench stream during the load (per device, in
    /// buckets of 1..N hours of `taken_at`, which records then spread over a
    /// week); afterwards, the hourly average per device is timed through
    /// the view and on the primary table.
    #[arg(long, default_value_t = 0)]
    views: usize,
    /// With --views: each device's records are taken in time order over
    /// the week (as devices report), instead of spread out of order.
    #[arg(long)]
    in_time_order: bool,
    /// With --views: also a fleet-level view (all devices, hourly), the
    /// one a fleet dashboard's hourly average reads.
    #[arg(long)]
    fleet_view: bool,
    /// Measure connection scale instead: this many idle devices connect to
    /// a fresh fleetgate and to the reference broker (connect rate, memory
    /// per idle device, reconnect storm), then a QoS 1 fan-out.
    #[arg(long, default_value_t = 0)]
    hold: usize,
    /// With --hold: connect attempts in flight at once (over all client
    /// processes). Above a broker's listen backlog (Mosquitto's is 100),
    /// the kernel drops handshakes and clients retry after 1 s, so the
    /// connect rate then times that retry; the table counts such drops.
    #[arg(long, default_value_t = 100)]
    hold_concurrency: usize,
    /// With --hold: hold the devices on a cluster of this many `fleetgate
    /// broker --nats` processes instead of one `fleetgate up`, round-robin,
    /// with a 3-server NATS cluster (JetStream on) and a scratch database
    /// on --database's PostgreSQL, all started and removed by the bench.
    /// Measures the connect rate, each broker's memory per device and a
    /// reconnect storm; no fan-out and no reference broker.
    #[arg(long, default_value_t = 0)]
    hold_brokers: usize,
    /// With --hold: each device also subscribes to its command topic
    /// (`devices/<id>/cmd`, QoS 1) once connected, as a fleet reachable
    /// with commands does; a connect then ends at its SUBACK.
    #[arg(long)]
    hold_subscribe: bool,
    /// With --hold: QoS 1 subscribers of the fan-out topic.
    #[arg(long, default_value_t = 1000)]
    fanout_subscribers: usize,
    /// With --hold: QoS 1 messages the fan-out publisher sends.
    #[arg(long, default_value_t = 200)]
    fanout_messages: usize,
    /// A --hold client process, driven by `bench --hold` over stdin/stdout.
    #[arg(long, hide = true)]
    hold_client: bool,
}

struct Load {
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// Each message's publish instant and its latency, in no order.
    timeline: Vec<(Instant, Duration)>,
    acked: usize,
}

struct Target {
    addr: String,
    port: u16,
    /// (client id, password) per connection; `None` for an open broker.
    credentials: Vec<Option<(String, String)>>,
    topic_prefix: String,
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// A database created for one benchmark run on the server `--database`
/// names, so the run neither sees nor leaves anything in the user's own.
pub(crate) struct ScratchDatabase {
    admin_url: String,
    name: String,
    pub(crate) url: String,
}

impl ScratchDatabase {
    pub(crate) async fn create(admin_url: &str) -> anyhow::Result<ScratchDatabase> {
        use sqlx::Connection;
        let name = format!("fleetgate_bench_{}", std::process::id());
        let mut conn = sqlx::PgConnection::connect(admin_url)
            .await
            .context("cannot connect to --database")?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(&mut conn)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await?;
        let (base, _) = admin_url
            .rsplit_once('/')
            .ok_or_else(|| anyhow!("--database URL names no database"))?;
        Ok(ScratchDatabase {
            admin_url: admin_url.to_string(),
            url: format!("{base}/{name}"),
            name,
        })
    }

    pub(crate) async fn drop_database(self) {
        use sqlx::Connection;
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn)
            .await;
        }
    }
}

pub(crate) struct Spawned {
    child: Child,
    /// Store nodes, in cluster mode.
    nodes: Vec<Child>,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) http: String,
    pub(crate) mqtt: std::net::SocketAddr,
    admin: String,
}

fn interrupt(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

impl Spawned {
    /// The server process, for its memory.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        interrupt(&mut self.child);
        for node in &mut self.nodes {
            interrupt(node);
        }
    }
}

/// Starts `fleetgate store --node` processes for a cluster benchmark.
fn spawn_nodes(database: &str, count: usize) -> anyhow::Result<Vec<Child>> {
    (0..count)
        .map(|i| {
            let mut child = Command::new(std::env::current_exe()?)
                .args([
                    "store",
                    "--node",
                    &format!("bench-n{i}"),
                    "--database",
                    database,
                ])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("cannot start fleetgate store")?;
            let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
            match lines.next() {
                Some(Ok(line)) if line.starts_with("fleetgate store ready:") => Ok(child),
                _ => bail!("fleetgate store exited before it was ready"),
            }
        })
        .collect()
}

pub(crate) fn spawn_server(database: Option<&str>, extra: &[&str]) -> anyhow::Result<Spawned> {
    spawn("up", database, extra)
}

fn spawn(mode: &str, database: Option<&str>, extra: &[&str]) -> anyhow::Result<Spawned> {
    spawn_in(tempfile::tempdir()?, mode, database, extra)
}

/// `fleetgate <mode>` with `dir` as its data directory, which may already
/// hold what the process should start with (a cluster's platform key).
pub(crate) fn spawn_in(
    dir: tempfile::TempDir,
    mode: &str,
    database: Option<&str>,
    extra: &[&str],
) -> anyhow::Result<Spawned> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args([
            mode,
            "--mqtt",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--pg",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(url) = database {
        command.args(["--database", url]);
    }
    command.args(extra);
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start fleetgate {mode}"))?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let ready = loop {
        match lines.next() {
            Some(Ok(line)) if line.starts_with("fleetgate ready:") => break line,
            Some(Ok(_)) => continue,
            _ => bail!("fleetgate {mode} exited before it was ready"),
        }
    };
    let field = |name: &str| {
        ready
            .split_whitespace()
            .find_map(|p| p.strip_prefix(name))
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no {name}"))
    };
    let admin = std::fs::read_to_string(dir.path().join("admin.token"))?
        .trim()
        .to_string();
    Ok(Spawned {
        mqtt: field("mqtt=")?.parse()?,
        http: format!("http://{}", field("http=")?),
        child,
        nodes: Vec::new(),
        dir,
        admin,
    })
}

pub(crate) async fn api(
    http: &reqwest::Client,
    server: &Spawned,
    path: &str,
    body: reqwest::Body,
    json_body: bool,
) -> anyhow::Result<Value> {
    let mut request = http
        .post(format!("{}{path}", server.http))
        .bearer_auth(&server.admin)
        .body(body);
    if json_body {
        request = request.header("content-type", "application/json");
    }
    let response = request.send().await?;
    let status = response.status();
    let value: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{path}: {status} {value}");
    }
    Ok(value)
}

pub(crate) const STREAM: &str = r#"
[streams.bench]
key = ["device_id", "seq"]
fields.seq    = { type = "int", required = true }
fields.value  = { type = "float", min = -1000.0, max = 1000.0, required = true }
fields.status = { type = "enum", values = ["ok", "warn", "fault"] }
fields.taken_at = { type = "timestamp" }
"#;

/// Monday 2026-11-16 00:00 UTC: `--views` records are taken over the week
/// from here.
const WEEK_START_MS: usize = 1_795_046_400_000;
const WEEK_SECONDS: usize = 7 * 24 * 3600;

/// When in the week a device's record `s` was taken, if records say.
#[derive(Clone, Copy)]
pub(crate) enum Taken {
    /// Records carry no time of their own.
    Untimed,
    /// Spread evenly over the week, out of order.
    Spread,
    /// In order over the week, `per_device` records in all.
    InOrder { per_device: usize },
}

/// A message of `records` records, each saying when it was taken.
pub(crate) fn payload(seq: usize, records: usize, taken: Taken) -> String {
    let record = |s: usize| {
        let value = s % 900;
        let second = match taken {
            Taken::Untimed => None,
            Taken::Spread => Some(s * 7_919 % WEEK_SECONDS),
            Taken::InOrder { per_device } => Some(s * WEEK_SECONDS / per_device.max(1)),
        };
        match second {
            Some(second) => {
                let taken_at = WEEK_START_MS + second * 1000;
                format!(r#"{{"seq":{s},"value":{value}.25,"status":"ok","taken_at":{taken_at}}}"#)
            }
            None => format!(r#"{{"seq":{s},"value":{value}.25,"status":"ok"}}"#),
        }
    };
    if records == 1 {
        record(seq)
    } else {
        let items: Vec<String> = (0..records).map(|r| record(seq * records + r)).collect();
        format!("[{}]", items.join(","))
    }
}

/// Waits until the broker has connected to `count` store nodes.
async fn wait_for_nodes(server: &Spawned, count: usize) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    for _ in 0..200 {
        let nodes: Value = http
            .get(format!("{}/v1/nodes", server.http))
            .bearer_auth(&server.admin)
            .send()
            .await?
            .json()
            .await?;
        let up = nodes["nodes"]
            .as_array()
            .map_or(0, |n| n.iter().filter(|n| n["up"] == true).count());
        if up >= count {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("store nodes did not come up")
}

/// Every connection publishes `messages` QoS 1 messages as fast as its
/// in-flight window allows; returns the wall time until the last PUBACK and
/// each message's publish-to-PUBACK latency.
///
/// The publisher is a lean MQTT 3.1.1 client over raw TCP (pre-encoded
/// packets, coalesced writes) rather than a general client library, so the
/// load generator, which shares the two cores, is not what is measured.
async fn run_load(target: &Target, args: &BenchArgs) -> anyhow::Result<Load> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, credentials) in target.credentials.iter().enumerate() {
        let id = credentials
            .as_ref()
            .map_or_else(|| format!("bench-ref-{i}"), |(id, _)| id.clone());
        let socket = TcpStream::connect((target.addr.as_str(), target.port)).await?;
        socket.set_nodelay(true)?;
        let mut socket =
            mqtt_connect(socket, &id, credentials.as_ref().map(|(_, p)| p.as_str())).await?;
        let topic = format!("{}{id}", target.topic_prefix);
        let taken = match (args.views > 0, args.in_time_order) {
            (false, _) => Taken::Untimed,
            (true, false) => Taken::Spread,
            (true, true) => Taken::InOrder {
                per_device: args.messages * args.records_per_message,
            },
        };
        let (messages, records, inflight) = (
            args.messages,
            args.records_per_message,
            args.inflight as usize,
        );
        tasks.push(tokio::spawn(async move {
            let (mut reader, mut writer) = socket.split();
            let window = Semaphore::new(inflight);
            let sent: StdMutex<VecDeque<(u16, Instant)>> =
                StdMutex::new(VecDeque::with_capacity(inflight));
            let publish = async {
                let mut out = Vec::with_capacity(64 * 1024);
                let mut seq = 0;
                while seq < messages {
                    window.acquire().await?.forget();
                    let mut batch = Vec::new();
                    loop {
                        let pkid = (seq % 65_535 + 1) as u16;
                        let body = payload(seq, records, taken);
                        encode_publish(&mut out, &topic, pkid, body.as_bytes());
                        batch.push(pkid);
                        seq += 1;
                        if seq == messages || out.len() > 32 * 1024 {
                            break;
                        }
                        match window.try_acquire() {
                            Ok(permit) => permit.forget(),
                            Err(_) => break,
                        }
                    }
                    let now = Instant::now();
                    sent.lock()
                        .expect("sent lock")
                        .extend(batch.into_iter().map(|p| (p, now)));
                    writer.write_all(&out).await?;
                    out.clear();
                }
                anyhow::Ok(())
            };
            let acks = async {
                let mut latencies = Vec::with_capacity(messages);
                let mut buf = vec![0u8; 64 * 1024];
                let mut pending = Vec::new();
                while latencies.len() < messages {
                    let n = reader.read(&mut buf).await?;
                    if n == 0 {
                        bail!("connection closed after {} acks", latencies.len());
                    }
                    pending.extend_from_slice(&buf[..n]);
                    let whole = pending.len() / 4 * 4;
                    let mut sent = sent.lock().expect("sent lock");
                    for ack in pending[..whole].chunks(4) {
                        if ack[0] != 0x40 || ack[1] != 2 {
                            bail!("expected PUBACK, got {ack:?}");
                        }
                        let pkid = u16::from_be_bytes([ack[2], ack[3]]);
                        let (expected, at) = sent
                            .pop_front()
                            .ok_or_else(|| anyhow!("PUBACK {pkid} for nothing sent"))?;
                        if expected != pkid {
                            bail!("PUBACK {pkid} out of order (expected {expected})");
                        }
                        latencies.push((at, at.elapsed()));
                    }
                    drop(sent);
                    window.add_permits(whole / 4);
                    pending.drain(..whole);
                }
                Ok(latencies)
            };
            let (published, latencies) = tokio::join!(publish, acks);
            published?;
            latencies
        }));
    }
    let mut timeline = Vec::new();
    for task in tasks {
        timeline.extend(task.await??);
    }
    let elapsed = started.elapsed();
    let mut latencies: Vec<Duration> = timeline.iter().map(|(_, l)| *l).collect();
    latencies.sort();
    Ok(Load {
        elapsed,
        acked: latencies.len(),
        latencies,
        timeline,
    })
}

/// `count` realtime views over the bench stream: per device, in buckets of
/// 1 to `count` hours of the time each record was taken; and, with
/// `fleet`, one for the whole fleet, hourly.
fn bench_views(count: usize, fleet: bool) -> String {
    let fleet = if fleet {
        "[views.fleet_1h]\nsource = \"bench\"\n\
         bucket = { column = \"taken_at\", width = \"1h\" }\n\
         aggregates = { n = \"count(*)\", mean = \"avg(value)\" }\n"
    } else {
        ""
    };
    let per_device: String = (1..=count)
        .map(|hours| {
            format!(
                "[views.per_device_{hours}h]\nsource = \"bench\"\ngroup_by = [\"device_id\"]\n\
                 bucket = {{ column = \"taken_at\", width = \"{hours}h\" }}\n\
                 aggregates = {{ n = \"count(*)\", mean = \"avg(value)\", peak = \"max(value)\" }}\n"
            )
        })
        .collect();
    per_device + fleet
}

/// How long after the load the folder took to fold every view
/// (queries meanwhile read the unfolded rows too), and how many rows
/// there were when the load ended.
async fn wait_for_folds(
    http: &reqwest::Client,
    server: &Spawned,
) -> anyhow::Result<(Duration, i64)> {
    let started = Instant::now();
    let mut at_end = None;
    loop {
        let listed = list_views(http, server).await?;
        let unfolded: i64 = listed["views"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["unfolded"].as_i64())
            .sum();
        let at_end = *at_end.get_or_insert(unfolded);
        if unfolded == 0 {
            return Ok((started.elapsed(), at_end));
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("views still have {unfolded} unfolded rows after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /v1/views`, as admin.
async fn list_views(http: &reqwest::Client, server: &Spawned) -> anyhow::Result<Value> {
    Ok(http
        .get(format!("{}/v1/views", server.http))
        .bearer_auth(&server.admin)
        .send()
        .await?
        .json()
        .await?)
}

/// The hourly average per device over the week, through the view the
/// router picks and on the primary table (a subquery, which no view
/// answers).
async fn time_view_queries(
    http: &reqwest::Client,
    server: &Spawned,
    views: usize,
) -> anyhow::Result<()> {
    let hourly = "SELECT device_id, (taken_at / 3600000) * 3600000 AS hour, avg(value), count(*) \
                  FROM bench";
    let by_hour = "GROUP BY device_id, (taken_at / 3600000) * 3600000";
    // The fleet's hourly average is 168 rows: the dashboard query, summed
    // from the device-level partials. Every device's week is 168 rows per
    // device in the answer, which JSON and HTTP then carry; one device's
    // week shows the view itself.
    let fleet = "SELECT (taken_at / 3600000) * 3600000 AS hour, avg(value), count(*) FROM bench \
                 GROUP BY (taken_at / 3600000) * 3600000";
    for (what, sql) in [
        ("the whole fleet", fleet.to_string()),
        ("every device", format!("{hourly} {by_hour}")),
        (
            "one device",
            format!("{hourly} WHERE device_id = 'bench-0' {by_hour}"),
        ),
    ] {
        let primary = format!("SELECT * FROM ({sql}) AS primary_only");
        time_query(http, server, what, views, &[(&sql, 50), (&primary, 10)]).await?;
    }
    // A fleet-wide query summed from device-level partials recurs and
    // costs: the store may make it a view of its own meanwhile.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        let listed = list_views(http, server).await?;
        let automatic = listed["views"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| v["origin"] == "auto");
        if automatic {
            let what = "the whole fleet, once automatic views were made";
            time_query(http, server, what, views, &[(fleet, 50)]).await?;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// Runs each query its number of times and prints the timings by the view
/// that answered (the router may pick another view between runs).
async fn time_query(
    http: &reqwest::Client,
    server: &Spawned,
    what: &str,
    views: usize,
    queries: &[(&str, usize)],
) -> anyhow::Result<()> {
    let mut timings: Vec<(Value, Vec<Duration>)> = Vec::new();
    let mut answer_rows = 0;
    for (query, runs) in queries {
        for _ in 0..*runs {
            let started = Instant::now();
            let reply = api(
                http,
                server,
                "/v1/query",
                json!({ "sql": query }).to_string().into(),
                true,
            )
            .await?;
            let took = started.elapsed();
            answer_rows = reply["rows"].as_array().map_or(0, Vec::len);
            let view = reply["view"].clone();
            match timings.iter_mut().find(|(v, _)| *v == view) {
                Some((_, times)) => times.push(took),
                None => timings.push((view, vec![took])),
            }
        }
    }
    println!(
        "  hourly average over the week, {what} ({answer_rows} result rows), with {views} realtime view(s), HTTP round trip included:"
    );
    for (view, took) in &mut timings {
        took.sort();
        println!(
            "    {}: p50 {}  p99 {}  ({} runs)",
            match view.as_str() {
                Some(name) => format!("through view {name}"),
                None => "primary table".to_string(),
            },
            ms(percentile(took, 0.50)),
            ms(percentile(took, 0.99)),
            took.len()
        );
    }
    Ok(())
}

/// Pushes `count` rules documents for the bench stream while the load runs,
/// 1.5 s apart, each waiting for every store's confirmation. They move
/// `value`'s maximum about above anything the load sends, so they change
/// no outcome: what they cost is the pause. Returns each activation instant
/// (Unix ms on the cluster clock, which on one machine is this clock).
async fn push_rollouts(
    http: &reqwest::Client,
    server: &Spawned,
    count: usize,
    stop: &AtomicBool,
) -> anyhow::Result<Vec<i64>> {
    let mut activations = Vec::new();
    for i in 0..count {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        if stop.load(Ordering::Relaxed) {
            bail!("the load ended after {i} of {count} rollouts; give it more --messages");
        }
        let body = json!({
            "text": format!("[fields.value]\nmax = {}.0\n", 950 + i),
            "format": "toml",
        });
        let report = api(
            http,
            server,
            "/v1/state/rules/bench",
            body.to_string().into(),
            true,
        )
        .await?;
        let at = report["activate_at_ms"]
            .as_i64()
            .ok_or_else(|| anyhow!("push answered {report}"))?;
        activations.push(at);
    }
    Ok(activations)
}

/// Publish → PUBACK latency of messages published just after an activation
/// instant (which wait for their store's confirmation) against the rest.
fn report_rollout_pause(load: &Load, activations: &[i64]) {
    let (now_instant, now_ms) = (Instant::now(), fleetgate_protocol::unix_now_ms());
    let instant_of = |ms: i64| {
        let back = Duration::from_millis((now_ms - ms).max(0) as u64);
        now_instant.checked_sub(back).unwrap_or(now_instant)
    };
    let fences: Vec<Instant> = activations.iter().map(|ms| instant_of(*ms)).collect();
    let window = Duration::from_millis(100);
    let (mut after, mut elsewhere) = (Vec::new(), Vec::new());
    for (sent, latency) in &load.timeline {
        let near = |fence: &Instant| {
            sent.checked_duration_since(*fence)
                .is_some_and(|d| d < window)
        };
        let far = fences
            .iter()
            .all(|f| sent.duration_since(*f).max(f.duration_since(*sent)) > Duration::from_secs(1));
        if fences.iter().any(near) {
            after.push(*latency);
        } else if far {
            elsewhere.push(*latency);
        }
    }
    after.sort();
    elsewhere.sort();
    println!(
        "  state rollouts during the load: {} (each confirmed by every store)",
        activations.len()
    );
    println!(
        "    published in the {} ms after an activation ({} messages): p50 {}  p99 {}  max {}",
        window.as_millis(),
        after.len(),
        ms(percentile(&after, 0.50)),
        ms(percentile(&after, 0.99)),
        ms(*after.last().unwrap_or(&Duration::ZERO))
    );
    println!(
        "    published over 1 s from any activation ({} messages): p50 {}  p99 {}  max {}",
        elsewhere.len(),
        ms(percentile(&elsewhere, 0.50)),
        ms(percentile(&elsewhere, 0.99)),
        ms(*elsewhere.last().unwrap_or(&Duration::ZERO))
    );
}

fn encode_publish(out: &mut Vec<u8>, topic: &str, pkid: u16, payload: &[u8]) {
    out.push(0x32); // PUBLISH, QoS 1
    put_remaining_length(out, 2 + topic.len() + 2 + payload.len());
    out.extend((topic.len() as u16).to_be_bytes());
    out.extend(topic.as_bytes());
    out.extend(pkid.to_be_bytes());
    out.extend(payload);
}

/// MQTT 3.1.1 CONNECT (clean session; username = client id when a password
/// is given) and its CONNACK.
async fn mqtt_connect(
    mut socket: TcpStream,
    id: &str,
    password: Option<&str>,
) -> anyhow::Result<TcpStream> {
    let mut fields = vec![id];
    let mut flags = 0x02;
    if let Some(password) = password {
        fields.extend([id, password]);
        flags |= 0xc0;
    }
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, flags, 0x00, 0x3c];
    for field in fields {
        body.extend((field.len() as u16).to_be_bytes());
        body.extend(field.as_bytes());
    }
    let mut connect = vec![0x10];
    put_remaining_length(&mut connect, body.len());
    connect.extend(body);
    socket.write_all(&connect).await?;
    let mut connack = [0u8; 4];
    socket.read_exact(&mut connack).await?;
    if connack != [0x20, 0x02, 0x00, 0x00] {
        bail!("{id}: CONNECT refused: {connack:?}");
    }
    Ok(socket)
}

/// While the load runs: publish one record every 20 ms from a probe device
/// and poll the query API until it is visible.
async fn probe_queryable(
    server: &Spawned,
    token: String,
    stop: &AtomicBool,
) -> anyhow::Result<Vec<Duration>> {
    let http = reqwest::Client::new();
    let mut options = MqttOptions::new(
        "bench-probe",
        server.mqtt.ip().to_string(),
        server.mqtt.port(),
    );
    options.set_credentials("bench-probe", token);
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let mut samples = Vec::new();
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let published = Instant::now();
        client
            .publish(
                "ingest/bench/bench-probe",
                QoS::AtLeastOnce,
                false,
                payload(seq, 1, Taken::Untimed),
            )
            .await?;
        let sql = json!({ "sql": format!("SELECT count(*) FROM bench WHERE device_id = 'bench-probe' AND seq = {seq}") });
        loop {
            let reply: Value = http
                .post(format!("{}/v1/query", server.http))
                .bearer_auth(&server.admin)
                .json(&sql)
                .send()
                .await?
                .json()
                .await?;
            if reply["rows"][0][0].as_i64() == Some(1) {
                samples.push(published.elapsed());
                break;
            }
            if published.elapsed() > Duration::from_secs(10) {
                bail!("probe record {seq} not queryable after 10 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    samples.sort();
    Ok(samples)
}

/// Connects `count` devices, then revokes them one at a time, timing from
/// sending the revoke command to the device's connection being closed.
async fn measure_revocations(
    http: &reqwest::Client,
    server: &Spawned,
    count: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut connected = Vec::with_capacity(count);
    for i in 0..count {
        let id = format!("revokee-{i}");
        let reply = api(
            http,
            server,
            "/v1/devices",
            json!({ "id": id, "role": "ingest" }).to_string().into(),
            true,
        )
        .await?;
        let token = reply["token"].as_str().unwrap_or_default().to_string();
        let socket = TcpStream::connect(server.mqtt).await?;
        connected.push((id.clone(), mqtt_connect(socket, &id, Some(&token)).await?));
    }
    let mut latencies = Vec::with_capacity(count);
    for (id, mut socket) in connected {
        let started = Instant::now();
        api(
            http,
            server,
            &format!("/v1/devices/{id}/revoke"),
            reqwest::Body::from(""),
            false,
        )
        .await?;
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => bail!("{id} still connected 5 s after its revocation"),
            }
        }
        latencies.push(started.elapsed());
    }
    latencies.sort();
    Ok(latencies)
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.sdk {
        return sdk::run(args.handshakes).await;
    }
    if args.etl > 0 {
        return etl::run(args.etl, args.database.as_deref()).await;
    }
    if args.cold > 0 {
        return cold::run(args.cold, args.database.as_deref()).await;
    }
    if args.hold_client {
        return hold::client().await;
    }
    if args.hold > 0 && args.hold_brokers > 0 {
        let Some(database) = args.database else {
            bail!(
                "--hold-brokers needs --database postgres://... (a scratch database is made there)"
            );
        };
        return hold_cluster::run(hold_cluster::ClusterArgs {
            devices: args.hold,
            brokers: args.hold_brokers,
            concurrency: args.hold_concurrency,
            database,
            subscribe: args.hold_subscribe,
        })
        .await;
    }
    if args.hold > 0 {
        return hold::run(hold::HoldArgs {
            devices: args.hold,
            concurrency: args.hold_concurrency,
            subscribers: args.fanout_subscribers,
            messages: args.fanout_messages,
            reference: args.reference,
            subscribe: args.hold_subscribe,
        })
        .await;
    }
    let total = args.connections * args.messages;
    let records_total = total * args.records_per_message;
    println!(
        "load: {} connections x {} QoS 1 messages x {} record(s), in-flight window {}",
        args.connections, args.messages, args.records_per_message, args.inflight
    );

    // A PostgreSQL benchmark runs in a database of its own, dropped after.
    let scratch = match &args.database {
        Some(url) => Some(ScratchDatabase::create(url).await?),
        None => None,
    };
    let database = scratch.as_ref().map(|s| s.url.as_str());
    let server = match (args.cluster_nodes, database) {
        (0, _) => spawn_server(database, &[])?,
        (count, Some(url)) => {
            let mut server = spawn("broker", database, &[])?;
            server.nodes = spawn_nodes(url, count)?;
            wait_for_nodes(&server, count).await?;
            server
        }
        (_, None) => bail!("--cluster-nodes needs --database postgres://..."),
    };
    let http = reqwest::Client::new();
    api(
        &http,
        &server,
        "/v1/streams",
        STREAM.to_string().into(),
        false,
    )
    .await?;
    if args.views > 0 {
        api(
            &http,
            &server,
            "/v1/views",
            bench_views(args.views, args.fleet_view).into(),
            false,
        )
        .await?;
    }
    let mut credentials = Vec::new();
    for i in 0..args.connections {
        let id = format!("bench-{i}");
        let reply = api(
            &http,
            &server,
            "/v1/devices",
            json!({ "id": id, "role": "ingest" }).to_string().into(),
            true,
        )
        .await?;
        credentials.push(Some((
            id,
            reply["token"].as_str().unwrap_or_default().to_string(),
        )));
    }
    let probe = api(
        &http,
        &server,
        "/v1/devices",
        json!({ "id": "bench-probe", "role": "ingest" })
            .to_string()
            .into(),
        true,
    )
    .await?;
    let target = Target {
        addr: server.mqtt.ip().to_string(),
        port: server.mqtt.port(),
        credentials,
        topic_prefix: "ingest/bench/".into(),
    };
    let stop = AtomicBool::new(false);
    let probe_token = probe["token"].as_str().unwrap_or_default().to_string();
    let (load, probes, activations) = tokio::join!(
        async {
            let load = run_load(&target, &args).await;
            stop.store(true, Ordering::Relaxed);
            load
        },
        probe_queryable(&server, probe_token, &stop),
        push_rollouts(&http, &server, args.rollouts, &stop)
    );
    let (load, probes, activations) = (load?, probes?, activations?);
    let caught_up = if args.views > 0 {
        Some(wait_for_folds(&http, &server).await?)
    } else {
        None
    };
    let revocations = measure_revocations(&http, &server, args.revocations).await?;

    let count = api(
        &http,
        &server,
        "/v1/query",
        json!({ "sql": "SELECT count(*) FROM bench WHERE device_id <> 'bench-probe'" })
            .to_string()
            .into(),
        true,
    )
    .await?;
    let stored = count["rows"][0][0].as_i64().unwrap_or(-1);
    if stored != records_total as i64 {
        bail!("{stored} records stored, expected {records_total}");
    }
    let rate = records_total as f64 / load.elapsed.as_secs_f64();
    println!(
        "\nfleetgate ({}), durable validated ingest:",
        match (args.cluster_nodes, args.database.is_some()) {
            (0, true) => "PostgreSQL".to_string(),
            (0, false) => "SQLite".to_string(),
            (n, _) => format!("broker + {n} store nodes, PostgreSQL"),
        }
    );
    println!(
        "  {} messages ({} records) committed in {:.2} s: {:.0} records/s, {:.0} messages/s",
        load.acked,
        records_total,
        load.elapsed.as_secs_f64(),
        rate,
        load.acked as f64 / load.elapsed.as_secs_f64()
    );
    println!(
        "  publish -> PUBACK (= committed, queryable): p50 {}  p99 {}  max {}",
        ms(percentile(&load.latencies, 0.50)),
        ms(percentile(&load.latencies, 0.99)),
        ms(*load.latencies.last().unwrap_or(&Duration::ZERO))
    );
    println!(
        "  publish -> seen by the query API ({} probes under load): p50 {}  p99 {}",
        probes.len(),
        ms(percentile(&probes, 0.50)),
        ms(percentile(&probes, 0.99))
    );
    if !activations.is_empty() {
        report_rollout_pause(&load, &activations);
    }
    if let Some((after, unfolded)) = caught_up {
        println!(
            "  views: {unfolded} rows unfolded when the load ended, all folded {} later; \
             counting that time, {:.0} records/s",
            ms(after),
            records_total as f64 / (load.elapsed + after).as_secs_f64()
        );
        time_view_queries(&http, &server, args.views).await?;
    }
    if !revocations.is_empty() {
        println!(
            "  revocation, command -> connection closed ({} devices): p50 {}  p99 {}",
            revocations.len(),
            ms(percentile(&revocations, 0.50)),
            ms(percentile(&revocations, 0.99))
        );
    }
    drop(server);
    if let Some(scratch) = scratch {
        scratch.drop_database().await;
    }

    if args.reference != "none" {
        let (host, port) = args
            .reference
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("--reference HOST:PORT"))?;
        let reference = Target {
            addr: host.to_string(),
            port: port.parse()?,
            credentials: vec![None; args.connections],
            topic_prefix: "bench/".into(),
        };
        match run_load(&reference, &args).await {
            Ok(load) => {
                println!(
                    "\nreference broker at {} (accepts QoS 1; stores and validates nothing):",
                    args.reference
                );
                println!(
                    "  {} messages acknowledged in {:.2} s: {:.0} messages/s",
                    load.acked,
                    load.elapsed.as_secs_f64(),
                    load.acked as f64 / load.elapsed.as_secs_f64()
                );
                println!(
                    "  publish -> PUBACK: p50 {}  p99 {}",
                    ms(percentile(&load.latencies, 0.50)),
                    ms(percentile(&load.latencies, 0.99))
                );
            }
            Err(e) => println!("\nreference broker at {} not measured: {e}", args.reference),
        }
    }
    Ok(())
}
