//! `fleetgate bench --hold N`: what holding many idle devices costs a broker.
//!
//! For a fresh `fleetgate up` and then for the reference broker (Mosquitto)
//! in the same run, it measures:
//!
//! 1. the connect rate of N devices (MQTT 3.1.1 CONNECT → CONNACK, a bounded
//!    number of attempts in flight at once) and each attempt's latency;
//! 2. the broker process's resident memory before the connects and with all
//!    N connected and idle, per idle device;
//! 3. a reconnect storm: every connection closed at once, then all of them
//!    reconnecting; the time until all are connected again;
//! 4. QoS 1 fan-out: one publisher, many subscribers of one topic,
//!    deliveries per second and publish → delivery latency.
//!
//! A process may open at most 20,000 files on this machine, so the idle
//! connections live in helper processes (this binary, `bench --hold-client`)
//! of up to [`PER_HELPER`] connections each, driven by JSON lines over their
//! stdin and stdout. Each connection round binds its sockets to a loopback
//! source address of its own (Linux routes all of 127.0.0.0/8 to `lo`), so
//! neither the ~28k ephemeral ports of one address nor the previous round's
//! TIME_WAIT sockets limit a round. A held connection is only its socket:
//! no task, no buffer, no client library.
//!
//! `hold_cluster` (`--hold-brokers K`) drives the same helpers and
//! rounds against a cluster of K brokers.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use fleetgate_broker::codec::put_remaining_length;
use futures::{StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{api, ms, percentile, spawn_server, Spawned};

/// Connections per helper process: below the 20,000-file limit with room
/// for the runtime's own descriptors.
const PER_HELPER: usize = 15_000;
/// The whole run, both brokers, ends by then, measured or not.
pub(crate) const DEADLINE: Duration = Duration::from_secs(600);
/// Kept for the reference broker when fleetgate is slow to finish.
const REFERENCE_RESERVE: Duration = Duration::from_secs(120);
/// Longer than the whole run, so an idle client never has to send PINGREQ:
/// what is measured is a device that sends nothing at all.
const KEEP_ALIVE_SECS: u16 = 900;
/// One connect attempt (TCP handshake, CONNECT, CONNACK) gives up after this.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after the connects before reading memory, so the broker has
/// finished whatever it does after sending CONNACK.
pub(crate) const SETTLE: Duration = Duration::from_secs(2);
/// Device registrations in flight at once.
const REGISTER_CONCURRENCY: usize = 32;
/// The file limit every process has here, the broker's included.
pub(crate) const FILE_LIMIT: usize = 20_000;
/// Brokers that have loopback source addresses of their own ([`source`]).
pub(crate) const MAX_BROKERS: usize = 64;
const FANOUT_TOPIC: &str = "devices/fanout/cmd";
/// QoS 1 publishes the fan-out publisher has unacknowledged at once.
const FANOUT_WINDOW: usize = 10;
/// Fan-out payload: the message's sequence number (4 bytes) and filler.
const FANOUT_PAYLOAD: usize = 32;
/// The fan-out ends when every delivery arrived, or nothing arrived for this long.
const FANOUT_IDLE: Duration = Duration::from_secs(10);

/// What `fleetgate bench --hold` was asked for.
pub struct HoldArgs {
    pub devices: usize,
    /// Connect attempts in flight at once, over all helper processes.
    pub concurrency: usize,
    pub subscribers: usize,
    pub messages: usize,
    /// Reference broker HOST:PORT, or "none".
    pub reference: String,
    /// Each device subscribes to `devices/<id>/cmd` (QoS 1) once connected.
    pub subscribe: bool,
}

/// A client id and, for fleetgate, the password (the device's token).
pub(crate) type Credentials = (String, Option<String>);

// ---------------------------------------------------------------------------
// Coordinator ⇄ helper protocol: one JSON object per line.

/// The first line a helper reads: who it connects, where, how fast.
#[derive(Serialize, Deserialize)]
struct Setup {
    target: SocketAddr,
    concurrency: usize,
    devices: Vec<Credentials>,
    /// Each device subscribes to its command topic after CONNACK.
    #[serde(default)]
    subscribe: bool,
}

#[derive(Serialize, Deserialize)]
struct Ready {
    devices: usize,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum Request {
    /// Close every held connection, then connect every device from
    /// `source` (the first round closes nothing), starting no attempt
    /// after `budget_ms`.
    Connect {
        source: Option<IpAddr>,
        budget_ms: u64,
    },
    /// Count the held connections the broker has not closed.
    Check,
    Exit,
}

#[derive(Serialize, Deserialize, Default, Clone)]
pub(crate) struct ConnectReport {
    connected: usize,
    failed: usize,
    /// Failure reasons (without device ids) and how often each happened.
    errors: BTreeMap<String, usize>,
    /// From the command (closes included) to the last successful CONNACK.
    last_connack_us: u64,
    /// Each successful attempt, from socket creation to CONNACK.
    latencies_us: Vec<u32>,
    /// Each successful attempt, from the command to its CONNACK: how many
    /// devices were back by when (a storm's first 50,000, say).
    connacks_us: Vec<u32>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct CheckReport {
    pub(crate) open: usize,
    pub(crate) closed: usize,
}

// ---------------------------------------------------------------------------
// Results.

/// One connect round over every helper (or some of them).
pub(crate) struct Round {
    pub(crate) connected: usize,
    pub(crate) errors: BTreeMap<String, usize>,
    /// From the round's start (closes included) to its last successful
    /// CONNACK: attempts that failed afterwards do not stretch it.
    pub(crate) until_last_connack: Duration,
    /// Sorted.
    pub(crate) latencies: Vec<Duration>,
    /// From the round's start to each successful CONNACK, sorted.
    pub(crate) connacks: Vec<Duration>,
    /// Handshakes the kernel dropped during the round because a listen
    /// queue was full (each costs its client a 1 s retransmission).
    pub(crate) listen_overflows: Option<u64>,
}

struct Fanout {
    subscribed: usize,
    subscribe_failures: BTreeMap<String, usize>,
    messages: usize,
    delivered: usize,
    duplicates: usize,
    /// Subscribers that stopped reading early, by reason.
    receive_failures: BTreeMap<String, usize>,
    /// First publish written to last delivery read.
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// Everything measured on one broker; a phase that did not run stays `None`.
#[derive(Default)]
struct Outcome {
    name: String,
    registration: Option<(usize, Duration)>,
    rss_before: Option<u64>,
    connect: Option<Round>,
    held: Option<CheckReport>,
    rss_held: Option<u64>,
    /// Mosquitto's own heap count before the connects and with all idle.
    heap_before: Option<u64>,
    heap_held: Option<u64>,
    storm: Option<Round>,
    held_after_storm: Option<CheckReport>,
    rss_after_storm: Option<u64>,
    fanout: Option<Fanout>,
    /// Why the measurement stopped early, or what could not be measured.
    notes: Vec<String>,
}

/// A broker to measure and the devices it is measured with.
struct Broker {
    target: SocketAddr,
    pid: Option<u32>,
    hold: Vec<Credentials>,
    subscribers: Vec<Credentials>,
    publisher: Credentials,
    /// Selects this broker's loopback source addresses.
    index: u8,
    /// Also read Mosquitto's `$SYS` heap count.
    mosquitto_heap: bool,
}

pub async fn run(args: HoldArgs) -> anyhow::Result<()> {
    if args.devices == 0 || args.concurrency == 0 {
        bail!("--hold and --hold-concurrency must be above 0");
    }
    if args.messages > usize::from(u16::MAX) {
        bail!(
            "--fanout-messages is at most {} (one packet id each)",
            u16::MAX
        );
    }
    let helpers = args.devices.div_ceil(PER_HELPER);
    println!(
        "hold: {} idle devices per broker over {helpers} client process(es), {} connect attempts at once, \
         keep-alive {KEEP_ALIVE_SECS} s; fan-out: {} QoS 1 subscribers x {} QoS 1 messages",
        args.devices, args.concurrency, args.subscribers, args.messages
    );
    if args.devices + 100 > FILE_LIMIT {
        println!(
            "  note: each broker may open at most {FILE_LIMIT} files; connections beyond that will be refused"
        );
    }
    let deadline = Instant::now() + DEADLINE;
    // Per run, so that a second run within TIME_WAIT (60 s) uses other
    // source addresses than the first.
    let run_octet = (1 + std::process::id() % 254) as u8;

    let mut fleetgate = Outcome {
        name: "fleetgate (SQLite)".into(),
        ..Outcome::default()
    };
    let until = if args.reference == "none" {
        deadline
    } else {
        deadline - REFERENCE_RESERVE
    };
    let measured = tokio::time::timeout_at(
        until.into(),
        measure_fleetgate(&args, run_octet, until, &mut fleetgate),
    )
    .await;
    note_end(&mut fleetgate, measured);

    let mut outcomes = vec![fleetgate];
    if args.reference != "none" {
        let mut reference = Outcome {
            name: format!("reference {}", args.reference),
            ..Outcome::default()
        };
        let measured = tokio::time::timeout_at(
            deadline.into(),
            measure_reference(&args, run_octet, deadline, &mut reference),
        )
        .await;
        note_end(&mut reference, measured);
        outcomes.push(reference);
    }
    print_table(&args, &outcomes);
    Ok(())
}

/// Notes in `outcome` why its measurement stopped early, if it did; what
/// was measured before stays in `outcome`.
fn note_end(
    outcome: &mut Outcome,
    measured: Result<anyhow::Result<()>, tokio::time::error::Elapsed>,
) {
    outcome.notes.extend(stopped_early(measured));
}

/// Why a measurement bounded by [`DEADLINE`] stopped early, if it did.
pub(crate) fn stopped_early(
    measured: Result<anyhow::Result<()>, tokio::time::error::Elapsed>,
) -> Option<String> {
    match measured {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("stopped: {e:#}")),
        Err(_) => Some(format!("stopped at the {} s deadline", DEADLINE.as_secs())),
    }
}

/// Registers `wanted` (id, role) one request each, [`REGISTER_CONCURRENCY`]
/// at once. Not through the import, on purpose: `up` would reuse the
/// memory an import of 20,000 devices frees for the connections, and its
/// RSS per device read 7.5 KiB instead of 12.0 (the cluster's registrar
/// avoids it by stopping, which `up` cannot do here without changing what
/// earlier runs measured).
async fn register_one_by_one(
    http: &reqwest::Client,
    server: &Spawned,
    wanted: Vec<(String, &str)>,
) -> anyhow::Result<Vec<Credentials>> {
    futures::stream::iter(wanted)
        .map(|(id, role)| async move {
            let reply = api(
                http,
                server,
                "/v1/devices",
                json!({ "id": id, "role": role }).to_string().into(),
                true,
            )
            .await?;
            let token = reply["token"]
                .as_str()
                .ok_or_else(|| anyhow!("registering {id} answered {reply}"))?
                .to_string();
            anyhow::Ok((id, Some(token)))
        })
        .buffered(REGISTER_CONCURRENCY)
        .try_collect()
        .await
}

/// Registers `wanted` (id, role) through `POST /v1/devices/import`, in as
/// few requests as it allows, and gives each device's credentials in the
/// same order. One request per 100,000 devices rather than one per device,
/// so that registering a fleet of 100,000 takes seconds (about 6 here).
pub(crate) async fn register(
    http: &reqwest::Client,
    server: &Spawned,
    wanted: &[(String, &str)],
) -> anyhow::Result<Vec<Credentials>> {
    let mut registered = Vec::with_capacity(wanted.len());
    for part in wanted.chunks(fleetgate_api::http::MAX_IMPORT_DEVICES) {
        let devices: Vec<_> = part
            .iter()
            .map(|(id, role)| json!({ "id": id, "role": role }))
            .collect();
        let body = json!({ "devices": devices }).to_string();
        let reply = api(http, server, "/v1/devices/import", body.into(), true).await?;
        let answered = reply["devices"].as_array().map_or(&[][..], Vec::as_slice);
        if answered.len() != part.len() {
            bail!(
                "importing {} devices registered {}: {}",
                part.len(),
                answered.len(),
                reply["invalid"]
            );
        }
        for device in answered {
            match (device["id"].as_str(), device["token"].as_str()) {
                (Some(id), Some(token)) => registered.push((id.to_string(), Some(token.into()))),
                _ => bail!("an import answered {device} for a device"),
            }
        }
    }
    Ok(registered)
}

async fn measure_fleetgate(
    args: &HoldArgs,
    run_octet: u8,
    until: Instant,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let server = spawn_server(None, &[])?;
    let http = reqwest::Client::new();
    // Idle devices are ingest devices, as a fleet's are; the fan-out's
    // subscribers and publisher are admins, the one role that may
    // subscribe to and publish on any device's command topic.
    let mut wanted: Vec<(String, &str)> = (0..args.devices)
        .map(|i| (format!("hold-{i}"), "ingest"))
        .collect();
    wanted.extend((0..args.subscribers).map(|i| (format!("fan-{i}"), "admin")));
    wanted.push(("fan-pub".into(), "admin"));
    let started = Instant::now();
    let registered = register_one_by_one(&http, &server, wanted).await?;
    out.registration = Some((registered.len(), started.elapsed()));
    let mut registered = registered.into_iter();
    let hold = registered.by_ref().take(args.devices).collect();
    let subscribers = registered.by_ref().take(args.subscribers).collect();
    let publisher = registered.next().context("publisher")?;
    let broker = Broker {
        target: server.mqtt,
        pid: Some(server.pid()),
        hold,
        subscribers,
        publisher,
        index: 0,
        mosquitto_heap: false,
    };
    measure(&broker, args, run_octet, until, out).await
}

async fn measure_reference(
    args: &HoldArgs,
    run_octet: u8,
    until: Instant,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let target = tokio::net::lookup_host(&args.reference)
        .await
        .with_context(|| format!("--reference {}", args.reference))?
        .min_by_key(|a| a.is_ipv6())
        .ok_or_else(|| anyhow!("--reference {} resolves to nothing", args.reference))?;
    let pid = mosquitto_pid();
    match pid {
        Some(pid) => {
            out.name = format!("Mosquitto {} (pid {pid})", args.reference);
            out.notes.push(
                "RSS: a long-running Mosquitto reuses the pages earlier clients freed, so its RSS \
                 barely grows after an earlier run as large; compare its $SYS heap count"
                    .into(),
            );
        }
        None => out.notes.push(
            "memory not measured: no Mosquitto pid (/run/mosquitto/mosquitto.pid, pidof)".into(),
        ),
    }
    // The same client ids as on fleetgate, anonymous.
    let broker = Broker {
        target,
        pid,
        hold: (0..args.devices)
            .map(|i| (format!("hold-{i}"), None))
            .collect(),
        subscribers: (0..args.subscribers)
            .map(|i| (format!("fan-{i}"), None))
            .collect(),
        publisher: ("fan-pub".into(), None),
        index: 1,
        mosquitto_heap: pid.is_some(),
    };
    measure(&broker, args, run_octet, until, out).await
}

/// The reference broker's process, for its memory.
fn mosquitto_pid() -> Option<u32> {
    if let Ok(text) = std::fs::read_to_string("/run/mosquitto/mosquitto.pid") {
        if let Ok(pid) = text.trim().parse() {
            return Some(pid);
        }
    }
    let output = std::process::Command::new("pidof")
        .arg("mosquitto")
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A process's resident set (VmRSS), in bytes.
pub(crate) fn rss(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The kernel's count of connections dropped because a listen queue was
/// full (TcpExt ListenOverflows). It covers every listener in this network
/// namespace, so other activity on the machine may add to it.
pub(crate) fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut tcp_ext = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (tcp_ext.next()?, tcp_ext.next()?);
    let (_, value) = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ListenOverflows")?;
    value.parse().ok()
}

/// The loopback source address of connection round `round` of helper
/// `helper` on broker `broker`: 127.<run>.<broker*4+round>.<helper+2>, or
/// none (the kernel's choice) for a broker that is not on IPv4 loopback.
/// `broker` is at most [`MAX_BROKERS`] - 1 and `round` at most 3.
pub(crate) fn source(
    target: SocketAddr,
    run_octet: u8,
    broker: u8,
    round: u8,
    helper: usize,
) -> Option<IpAddr> {
    let on_loopback = matches!(target.ip(), IpAddr::V4(ip) if ip.is_loopback());
    on_loopback.then(|| {
        IpAddr::V4(Ipv4Addr::new(
            127,
            run_octet,
            broker * 4 + round,
            2 + (helper % 250) as u8,
        ))
    })
}

/// Measures `broker`; `until` is when its share of the run ends.
async fn measure(
    broker: &Broker,
    args: &HoldArgs,
    run_octet: u8,
    until: Instant,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let mut helpers = Helper::spawn_all(
        broker.target,
        &broker.hold,
        args.concurrency,
        args.subscribe,
    )
    .await?;
    out.rss_before = rss(broker.pid);
    if broker.mosquitto_heap {
        out.heap_before = heap_or_note(broker.target, out).await;
    }

    let count = helpers.len();
    let sources = |round| {
        (0..count)
            .map(|h| source(broker.target, run_octet, broker.index, round, h))
            .collect::<Vec<_>>()
    };
    let first = sources(0);
    out.connect = Some(connect_round(&mut helpers, &first, until).await?);
    tokio::time::sleep(SETTLE).await;
    out.held = Some(check(&mut helpers).await?);
    out.rss_held = rss(broker.pid);
    if broker.mosquitto_heap {
        out.heap_held = heap_or_note(broker.target, out).await;
    }

    let storm = sources(1);
    out.storm = Some(connect_round(&mut helpers, &storm, until).await?);
    tokio::time::sleep(SETTLE).await;
    out.held_after_storm = Some(check(&mut helpers).await?);
    out.rss_after_storm = rss(broker.pid);

    stop_helpers(helpers).await?;
    // The broker sees the held connections close; give it time to drop
    // them before the fan-out's connections arrive (its file limit).
    tokio::time::sleep(SETTLE).await;

    if args.subscribers > 0 && args.messages > 0 {
        out.fanout = Some(
            fanout(
                broker,
                source(broker.target, run_octet, broker.index, 2, 0),
                args,
            )
            .await?,
        );
    }
    Ok(())
}

async fn heap_or_note(target: SocketAddr, out: &mut Outcome) -> Option<u64> {
    match mosquitto_heap(target).await {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            out.notes.push(format!("Mosquitto heap not read: {e:#}"));
            None
        }
    }
}

/// One connect round on every helper at once, reporting before `until`.
async fn connect_round(
    helpers: &mut [Helper],
    sources: &[Option<IpAddr>],
    until: Instant,
) -> anyhow::Result<Round> {
    let (reports, overflows) = connect_reports(helpers, sources, until).await?;
    Ok(Round::merge(&reports, overflows))
}

/// One connect round on every helper at once (helper `i` binding to
/// `sources[i]`): each helper's report, in order, and the listen queue
/// overflows during the round. Reports before `until`.
pub(crate) async fn connect_reports(
    helpers: &mut [Helper],
    sources: &[Option<IpAddr>],
    until: Instant,
) -> anyhow::Result<(Vec<ConnectReport>, Option<u64>)> {
    // Attempts end by the deadline, so the round reports before it.
    let budget = until
        .saturating_duration_since(Instant::now())
        .saturating_sub(ATTEMPT_TIMEOUT + Duration::from_secs(5));
    let overflows_before = listen_overflows();
    for (helper, source) in helpers.iter_mut().zip(sources) {
        let request = Request::Connect {
            source: *source,
            budget_ms: budget.as_millis() as u64,
        };
        helper.send(&request).await?;
    }
    let reports = futures::future::try_join_all(helpers.iter_mut().map(|h| h.recv())).await?;
    let overflows = overflows_before
        .zip(listen_overflows())
        .map(|(before, after)| after.saturating_sub(before));
    Ok((reports, overflows))
}

impl Round {
    /// The round as the helpers behind `reports` saw it together.
    pub(crate) fn merge(reports: &[ConnectReport], listen_overflows: Option<u64>) -> Round {
        let mut round = Round {
            connected: 0,
            errors: BTreeMap::new(),
            until_last_connack: Duration::ZERO,
            latencies: Vec::new(),
            connacks: Vec::new(),
            listen_overflows,
        };
        let micros = |us: &u32| Duration::from_micros(u64::from(*us));
        for report in reports {
            round.connected += report.connected;
            for (error, count) in &report.errors {
                *round.errors.entry(error.clone()).or_default() += count;
            }
            // The helpers start together; the round lasts as long as the slowest.
            round.until_last_connack = round
                .until_last_connack
                .max(Duration::from_micros(report.last_connack_us));
            round
                .latencies
                .extend(report.latencies_us.iter().map(micros));
            round.connacks.extend(report.connacks_us.iter().map(micros));
        }
        round.latencies.sort();
        round.connacks.sort();
        round
    }
}

/// How many of the helpers' connections are still open.
pub(crate) async fn check(helpers: &mut [Helper]) -> anyhow::Result<CheckReport> {
    for helper in helpers.iter_mut() {
        helper.send(&Request::Check).await?;
    }
    let reports: Vec<CheckReport> =
        futures::future::try_join_all(helpers.iter_mut().map(|h| h.recv())).await?;
    Ok(CheckReport {
        open: reports.iter().map(|r| r.open).sum(),
        closed: reports.iter().map(|r| r.closed).sum(),
    })
}

/// Ends the helpers (their connections close with them), killing any that
/// does not exit within 10 s.
pub(crate) async fn stop_helpers(mut helpers: Vec<Helper>) -> anyhow::Result<()> {
    for helper in &mut helpers {
        helper.send(&Request::Exit).await?;
    }
    for helper in &mut helpers {
        if tokio::time::timeout(Duration::from_secs(10), helper.child.wait())
            .await
            .is_err()
        {
            helper.child.kill().await?;
        }
    }
    Ok(())
}

/// A `fleetgate bench --hold-client` process (killed if dropped).
pub(crate) struct Helper {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Helper {
    /// One helper per [`PER_HELPER`] devices, each set up and ready,
    /// sharing `concurrency` attempts in flight.
    pub(crate) async fn spawn_all(
        target: SocketAddr,
        devices: &[Credentials],
        concurrency: usize,
        subscribe: bool,
    ) -> anyhow::Result<Vec<Helper>> {
        let count = devices.len().div_ceil(PER_HELPER);
        let per_helper = devices.len().div_ceil(count);
        let mut helpers = Vec::with_capacity(count);
        for part in devices.chunks(per_helper) {
            let mut child = tokio::process::Command::new(std::env::current_exe()?)
                .args(["bench", "--hold-client"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start a --hold-client process")?;
            let mut helper = Helper {
                stdin: child.stdin.take().expect("piped"),
                lines: BufReader::new(child.stdout.take().expect("piped")).lines(),
                child,
            };
            helper
                .send(&Setup {
                    target,
                    concurrency: concurrency.div_ceil(count),
                    devices: part.to_vec(),
                    subscribe,
                })
                .await?;
            helpers.push(helper);
        }
        for helper in &mut helpers {
            let _: Ready = helper.recv().await?;
        }
        Ok(helpers)
    }

    /// The process, for its CPU time (`None` once it exited).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    async fn send<T: Serialize>(&mut self, message: &T) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(message)?;
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn recv<T: DeserializeOwned>(&mut self) -> anyhow::Result<T> {
        let line = self
            .lines
            .next_line()
            .await?
            .ok_or_else(|| anyhow!("a --hold-client process exited"))?;
        serde_json::from_str(&line).with_context(|| format!("from --hold-client: {line}"))
    }
}

// ---------------------------------------------------------------------------
// The helper process.

/// `fleetgate bench --hold-client`: holds connections for the coordinator,
/// which drives it over stdin (one [`Setup`], then [`Request`]s) and reads
/// one JSON line per request on stdout. Ends at `exit` or end of input.
pub async fn client() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let setup: Setup = serde_json::from_str(&lines.next_line().await?.context("no setup line")?)?;
    let devices = Arc::new(setup.devices);
    reply(&Ready {
        devices: devices.len(),
    })?;
    let mut held: Vec<TcpStream> = Vec::new();
    while let Some(line) = lines.next_line().await? {
        match serde_json::from_str(&line)? {
            Request::Connect { source, budget_ms } => {
                let started = Instant::now();
                // Dropping closes: every connection goes at once, without
                // DISCONNECT, as when a network drops a fleet.
                held.clear();
                let (sockets, report) = connect_all(
                    devices.clone(),
                    Attempts {
                        target: setup.target,
                        source,
                        concurrency: setup.concurrency,
                        started,
                        budget: Duration::from_millis(budget_ms),
                        subscribe: setup.subscribe,
                    },
                )
                .await;
                held = sockets;
                reply(&report)?;
            }
            Request::Check => {
                // A socket the broker closed is readable (end of file); one
                // still open has nothing to read, since an idle broker sends
                // nothing. try_read only reads when the reactor saw readiness.
                let before = held.len();
                let mut buf = [0u8; 64];
                held.retain(|socket| match socket.try_read(&mut buf) {
                    Ok(0) => false,
                    Ok(_) => true,
                    Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                });
                reply(&CheckReport {
                    open: held.len(),
                    closed: before - held.len(),
                })?;
            }
            Request::Exit => break,
        }
    }
    Ok(())
}

fn reply<T: Serialize>(message: &T) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, message)?;
    stdout.write_all(b"\n")?;
    stdout.flush()?;
    Ok(())
}

/// How a helper's connect round runs.
struct Attempts {
    target: SocketAddr,
    source: Option<IpAddr>,
    concurrency: usize,
    /// When the round began (before closing what was held).
    started: Instant,
    /// No attempt starts after this much time from `started`.
    budget: Duration,
    /// Each device subscribes to its command topic: an attempt ends at its
    /// SUBACK.
    subscribe: bool,
}

/// Connects every device, `concurrency` attempts at a time (workers taking
/// the next device from a shared counter, so no task waits per device).
///
/// It stops starting attempts once the round's budget is spent, or once
/// `2 x concurrency` attempts in a row failed: a broker that stopped
/// accepting (out of files, say) would otherwise cost every remaining
/// device an [`ATTEMPT_TIMEOUT`]. Devices not attempted are counted.
async fn connect_all(
    devices: Arc<Vec<Credentials>>,
    attempts: Attempts,
) -> (Vec<TcpStream>, ConnectReport) {
    let Attempts {
        target,
        source,
        concurrency,
        started,
        budget,
        subscribe: subscribes,
    } = attempts;
    let workers_count = concurrency.clamp(1, devices.len().max(1));
    let streak_limit = 2 * workers_count;
    let next = Arc::new(AtomicUsize::new(0));
    let failed_in_a_row = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..workers_count {
        let (devices, next, failed_in_a_row) =
            (devices.clone(), next.clone(), failed_in_a_row.clone());
        workers.spawn(async move {
            let mut sockets = Vec::new();
            let mut report = ConnectReport::default();
            loop {
                if started.elapsed() >= budget
                    || failed_in_a_row.load(Ordering::Relaxed) >= streak_limit
                {
                    break;
                }
                let Some((id, password)) = devices.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    break;
                };
                let began = Instant::now();
                let attempt = async {
                    let stream = mqtt_connect(source, target, id, password.as_deref()).await?;
                    if subscribes {
                        subscribe(stream, &format!("devices/{id}/cmd"), 1).await
                    } else {
                        Ok(stream)
                    }
                };
                let error = match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
                    Ok(Ok(socket)) => {
                        report.latencies_us.push(began.elapsed().as_micros() as u32);
                        report.last_connack_us = started.elapsed().as_micros() as u64;
                        report.connacks_us.push(report.last_connack_us as u32);
                        sockets.push(socket);
                        failed_in_a_row.store(0, Ordering::Relaxed);
                        continue;
                    }
                    Ok(Err(e)) => format!("{e:#}"),
                    Err(_) => format!("no CONNACK within {} s", ATTEMPT_TIMEOUT.as_secs()),
                };
                report.failed += 1;
                *report.errors.entry(error).or_default() += 1;
                failed_in_a_row.fetch_add(1, Ordering::Relaxed);
            }
            (sockets, report)
        });
    }
    let mut all = Vec::with_capacity(devices.len());
    let mut total = ConnectReport::default();
    while let Some(done) = workers.join_next().await {
        let (sockets, report) = match done {
            Ok(done) => done,
            Err(e) => {
                *total.errors.entry(format!("worker: {e}")).or_default() += 1;
                continue;
            }
        };
        all.extend(sockets);
        total.last_connack_us = total.last_connack_us.max(report.last_connack_us);
        total.failed += report.failed;
        total.latencies_us.extend(report.latencies_us);
        total.connacks_us.extend(report.connacks_us);
        for (error, count) in report.errors {
            *total.errors.entry(error).or_default() += count;
        }
    }
    total.connected = all.len();
    let skipped = devices.len().saturating_sub(total.connected + total.failed);
    if skipped > 0 {
        let why = if failed_in_a_row.load(Ordering::Relaxed) >= streak_limit {
            format!("not attempted: the last {streak_limit} attempts in a row failed")
        } else {
            format!(
                "not attempted: the round's {} s were spent",
                budget.as_secs()
            )
        };
        total.errors.insert(why, skipped);
    }
    (all, total)
}

/// MQTT 3.1.1 CONNECT (clean session; username = client id when there is a
/// password; keep-alive [`KEEP_ALIVE_SECS`]) from `source`, and its CONNACK.
/// Error texts name no device, so the same failure counts once.
async fn mqtt_connect(
    source: Option<IpAddr>,
    target: SocketAddr,
    id: &str,
    password: Option<&str>,
) -> anyhow::Result<TcpStream> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(source) = source {
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|e| anyhow!("bind: {e}"))?;
    }
    let mut stream = socket
        .connect(target)
        .await
        .map_err(|e| anyhow!("TCP connect: {e}"))?;
    stream.set_nodelay(true)?;
    let mut fields = vec![id];
    let mut flags = 0x02;
    if let Some(password) = password {
        fields.extend([id, password]);
        flags |= 0xc0;
    }
    let [ka_high, ka_low] = KEEP_ALIVE_SECS.to_be_bytes();
    let mut body = vec![
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, flags, ka_high, ka_low,
    ];
    for field in fields {
        body.extend((field.len() as u16).to_be_bytes());
        body.extend(field.as_bytes());
    }
    let mut connect = Vec::with_capacity(body.len() + 5);
    connect.push(0x10);
    put_remaining_length(&mut connect, body.len());
    connect.extend(body);
    stream
        .write_all(&connect)
        .await
        .map_err(|e| anyhow!("writing CONNECT: {e}"))?;
    let mut connack = [0u8; 4];
    stream
        .read_exact(&mut connack)
        .await
        .map_err(|e| anyhow!("reading CONNACK: {e}"))?;
    match connack {
        [0x20, 0x02, _, 0] => Ok(stream),
        [0x20, 0x02, _, code] => bail!("CONNACK return code {code}"),
        other => bail!("not a CONNACK: {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Fan-out.

/// Subscribers of [`FANOUT_TOPIC`] at QoS 1, then one publisher sending
/// `args.messages` QoS 1 messages with [`FANOUT_WINDOW`] in flight; every
/// subscriber acknowledges each delivery. Runs in this process (about a
/// thousand sockets), so publish and delivery instants share one clock.
async fn fanout(
    broker: &Broker,
    source: Option<IpAddr>,
    args: &HoldArgs,
) -> anyhow::Result<Fanout> {
    let target = broker.target;
    let attempts: Vec<anyhow::Result<TcpStream>> = futures::stream::iter(&broker.subscribers)
        .map(|(id, password)| async move {
            let attempt = async {
                let stream = mqtt_connect(source, target, id, password.as_deref()).await?;
                subscribe(stream, FANOUT_TOPIC, 1).await
            };
            tokio::time::timeout(ATTEMPT_TIMEOUT, attempt)
                .await
                .unwrap_or_else(|_| {
                    bail!(
                        "no CONNACK and SUBACK within {} s",
                        ATTEMPT_TIMEOUT.as_secs()
                    )
                })
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let mut subscribe_failures = BTreeMap::new();
    let base = Instant::now();
    let delivered = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let mut subscribers = JoinSet::new();
    for attempt in attempts {
        match attempt {
            Ok(stream) => {
                subscribers.spawn(receive(
                    stream,
                    args.messages,
                    base,
                    delivered.clone(),
                    stop.clone(),
                ));
            }
            Err(e) => *subscribe_failures.entry(format!("{e:#}")).or_default() += 1,
        }
    }
    let subscribed = subscribers.len();
    if subscribed == 0 {
        bail!("no fan-out subscriber could subscribe: {subscribe_failures:?}");
    }
    let expected = subscribed * args.messages;

    let (id, password) = &broker.publisher;
    let stream = mqtt_connect(source, target, id, password.as_deref())
        .await
        .context("fan-out publisher")?;
    let mut publisher = tokio::spawn(publish(stream, args.messages, base));
    let (mut seen, mut progress) = (0, Instant::now());
    while seen < expected && progress.elapsed() < FANOUT_IDLE {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = delivered.load(Ordering::Relaxed);
        if now > seen {
            (seen, progress) = (now, Instant::now());
        }
    }
    stop.cancel();
    // Its last PUBACKs may come after the last delivery.
    let sent = match tokio::time::timeout(FANOUT_IDLE, &mut publisher).await {
        Ok(joined) => joined??,
        Err(_) => {
            publisher.abort();
            bail!(
                "fan-out publisher still waiting for PUBACKs {} s after the last delivery",
                FANOUT_IDLE.as_secs()
            );
        }
    };

    let mut latencies = Vec::with_capacity(expected);
    let (mut duplicates, mut receive_failures) = (0, BTreeMap::new());
    let mut last = Duration::ZERO;
    while let Some(received) = subscribers.join_next().await {
        let received = received?;
        duplicates += received.duplicates;
        for (seq, at) in received.got {
            last = last.max(at);
            latencies.push(at.saturating_sub(sent[seq as usize]));
        }
        if let Some(error) = received.error {
            *receive_failures.entry(error).or_default() += 1;
        }
    }
    latencies.sort();
    Ok(Fanout {
        subscribed,
        subscribe_failures,
        messages: args.messages,
        delivered: latencies.len(),
        duplicates,
        receive_failures,
        elapsed: last.saturating_sub(sent.first().copied().unwrap_or_default()),
        latencies,
    })
}

/// SUBSCRIBE to `topic` at `qos` and its SUBACK (which brokers send
/// before any retained message).
async fn subscribe(mut stream: TcpStream, topic: &str, qos: u8) -> anyhow::Result<TcpStream> {
    let mut packet = vec![0x82];
    put_remaining_length(&mut packet, 2 + 2 + topic.len() + 1);
    packet.extend([0x00, 0x01]);
    packet.extend((topic.len() as u16).to_be_bytes());
    packet.extend(topic.as_bytes());
    packet.push(qos);
    stream.write_all(&packet).await?;
    let mut suback = [0u8; 5];
    stream
        .read_exact(&mut suback)
        .await
        .map_err(|e| anyhow!("reading SUBACK: {e}"))?;
    match suback {
        [0x90, 0x03, 0x00, 0x01, granted] if granted == qos => Ok(stream),
        [0x90, 0x03, 0x00, 0x01, code] => bail!("SUBACK granted {code:#04x}, not QoS {qos}"),
        other => bail!("not a SUBACK: {other:?}"),
    }
}

/// Mosquitto's own count of the heap it uses (`$SYS/broker/heap/current`).
///
/// Unlike its RSS, it falls again when clients leave: a long-running
/// Mosquitto keeps the pages earlier clients used, so after an earlier run
/// its RSS hardly grows with new clients. Mosquitto publishes the value
/// every `sys_interval` (10 s by default) when it changed, and the retained
/// one may be that old: this waits for a fresh one, and takes the retained
/// one if none comes (the value did not change).
async fn mosquitto_heap(target: SocketAddr) -> anyhow::Result<u64> {
    let stream = mqtt_connect(None, target, "fleetgate-bench-heap", None).await?;
    let mut stream = subscribe(stream, "$SYS/broker/heap/current", 0).await?;
    let (mut pending, mut chunk) = (Vec::new(), [0u8; 512]);
    let mut retained = None;
    let fresh = tokio::time::timeout(Duration::from_secs(12), async {
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("Mosquitto closed the $SYS subscription");
            }
            pending.extend_from_slice(&chunk[..n]);
            let mut used = 0;
            while let Some((first, body)) = frame(&pending[used..]) {
                let packet = &pending[used + body.start..used + body.end];
                used += body.end;
                if first >> 4 != 3 || packet.len() < 2 {
                    continue;
                }
                let topic_len = usize::from(u16::from_be_bytes([packet[0], packet[1]]));
                let payload = packet.get(2 + topic_len..).unwrap_or_default();
                let value: u64 = std::str::from_utf8(payload)?
                    .trim()
                    .parse()
                    .with_context(|| format!("heap/current {payload:?}"))?;
                if first & 0x01 == 0 {
                    return Ok(value);
                }
                retained = Some(value);
            }
            pending.drain(..used);
        }
    })
    .await;
    match fresh {
        Ok(value) => value,
        Err(_) => retained.ok_or_else(|| anyhow!("no $SYS/broker/heap/current within 12 s")),
    }
}

/// What one subscriber read: (message sequence number, when, since the
/// fan-out's base instant), first delivery of each only; and why it stopped
/// reading early, if it did.
#[derive(Default)]
struct Received {
    got: Vec<(u32, Duration)>,
    duplicates: usize,
    error: Option<String>,
}

/// Reads deliveries until every message came or `stop`, acknowledging each
/// QoS 1 PUBLISH (one write per read). What came before an error counts.
async fn receive(
    stream: TcpStream,
    messages: usize,
    base: Instant,
    delivered: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> Received {
    let mut received = Received::default();
    let reading = read_deliveries(stream, messages, base, &delivered, &stop, &mut received);
    if let Err(e) = reading.await {
        received.error = Some(format!("{e:#}"));
    }
    received
}

async fn read_deliveries(
    mut stream: TcpStream,
    messages: usize,
    base: Instant,
    delivered: &AtomicUsize,
    stop: &CancellationToken,
    received: &mut Received,
) -> anyhow::Result<()> {
    let mut seen = vec![false; messages];
    let (mut pending, mut chunk, mut acks) = (Vec::new(), vec![0u8; 4096], Vec::new());
    while received.got.len() < messages {
        let n = tokio::select! {
            _ = stop.cancelled() => break,
            n = stream.read(&mut chunk) => n?,
        };
        if n == 0 {
            bail!("the broker closed the connection");
        }
        let at = base.elapsed();
        pending.extend_from_slice(&chunk[..n]);
        let mut used = 0;
        while let Some((first, body)) = frame(&pending[used..]) {
            let packet = &pending[used + body.start..used + body.end];
            used += body.end;
            if first >> 4 != 3 {
                continue;
            }
            let qos = (first >> 1) & 3;
            let (pkid, seq) = publish_fields(packet, qos)
                .ok_or_else(|| anyhow!("malformed PUBLISH: {packet:?}"))?;
            if let Some(pkid) = pkid {
                acks.extend([0x40, 0x02]);
                acks.extend(pkid);
            }
            match seen.get_mut(seq as usize) {
                Some(seen) if !*seen => {
                    *seen = true;
                    received.got.push((seq, at));
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
                Some(_) => received.duplicates += 1,
                None => bail!("delivery of message {seq}, which was never sent"),
            }
        }
        pending.drain(..used);
        if !acks.is_empty() {
            stream.write_all(&acks).await?;
            acks.clear();
        }
    }
    Ok(())
}

/// A fan-out PUBLISH body's packet id (QoS 1 and 2) and the sequence
/// number at the start of its payload.
fn publish_fields(packet: &[u8], qos: u8) -> Option<(Option<[u8; 2]>, u32)> {
    let topic_len = usize::from(u16::from_be_bytes(packet.get(..2)?.try_into().ok()?));
    let mut at = 2 + topic_len;
    let pkid = if qos > 0 {
        at += 2;
        Some(packet.get(at - 2..at)?.try_into().ok()?)
    } else {
        None
    };
    let seq = u32::from_be_bytes(packet.get(at..at + 4)?.try_into().ok()?);
    Some((pkid, seq))
}

/// The first complete MQTT packet in `buf`: its first byte and where its
/// body is.
fn frame(buf: &[u8]) -> Option<(u8, std::ops::Range<usize>)> {
    let first = *buf.first()?;
    let mut length = 0usize;
    for (i, byte) in buf.iter().enumerate().skip(1).take(4) {
        length |= usize::from(byte & 0x7f) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            let body = i + 1..i + 1 + length;
            return (buf.len() >= body.end).then_some((first, body));
        }
    }
    None
}

/// Publishes `messages` QoS 1 messages to [`FANOUT_TOPIC`], at most
/// [`FANOUT_WINDOW`] unacknowledged; returns when each was written (since
/// `base`), by sequence number.
async fn publish(
    mut stream: TcpStream,
    messages: usize,
    base: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let (mut reader, mut writer) = stream.split();
    let window = Semaphore::new(FANOUT_WINDOW);
    let send = async {
        let mut sent = Vec::with_capacity(messages);
        let mut packet = Vec::with_capacity(64);
        for seq in 0..messages {
            window.acquire().await?.forget();
            packet.clear();
            packet.push(0x32);
            put_remaining_length(&mut packet, 2 + FANOUT_TOPIC.len() + 2 + FANOUT_PAYLOAD);
            packet.extend((FANOUT_TOPIC.len() as u16).to_be_bytes());
            packet.extend(FANOUT_TOPIC.as_bytes());
            packet.extend((seq as u16 + 1).to_be_bytes());
            packet.extend((seq as u32).to_be_bytes());
            packet.resize(packet.len() + FANOUT_PAYLOAD - 4, b'.');
            sent.push(base.elapsed());
            writer.write_all(&packet).await?;
        }
        anyhow::Ok(sent)
    };
    let acks = async {
        let (mut acked, mut pending, mut chunk) = (0, Vec::new(), [0u8; 1024]);
        while acked < messages {
            let n = reader.read(&mut chunk).await?;
            if n == 0 {
                bail!("publisher connection closed after {acked} PUBACKs");
            }
            pending.extend_from_slice(&chunk[..n]);
            let mut used = 0;
            while let Some((first, body)) = frame(&pending[used..]) {
                used += body.end;
                if first == 0x40 {
                    acked += 1;
                    window.add_permits(1);
                }
            }
            pending.drain(..used);
        }
        Ok(())
    };
    let (sent, acked) = tokio::join!(send, acks);
    acked?;
    sent
}

// ---------------------------------------------------------------------------
// The table.

pub(crate) fn dash() -> String {
    "—".to_string()
}

pub(crate) fn mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(dash, |b| format!("{:.1} MiB", b as f64 / 1_048_576.0))
}

pub(crate) fn p50_p99(sorted: &[Duration]) -> String {
    if sorted.is_empty() {
        return dash();
    }
    format!(
        "{} / {}",
        ms(percentile(sorted, 0.50)),
        ms(percentile(sorted, 0.99))
    )
}

/// Row labels of the table, in the order [`cells`] fills them.
const ROWS: [&str; 17] = [
    "connected (CONNACK accepted)",
    "connects/s",
    "connect -> CONNACK p50 / p99",
    "still connected after 2 s idle",
    "RSS before the connects",
    "RSS with all connected, idle",
    "RSS per idle device",
    "heap per idle device (Mosquitto $SYS)",
    "storm: all closed, all back in",
    "storm connect -> CONNACK p50 / p99",
    "listen queue overflows: connect / storm",
    "still connected 2 s after the storm",
    "RSS after the storm",
    "fan-out subscribers (SUBACK QoS 1)",
    "fan-out deliveries/s",
    "fan-out delivered",
    "fan-out publish -> delivery p50 / p99",
];

/// One broker's column; "—" where a phase did not run.
fn cells(o: &Outcome, devices: usize) -> [String; 17] {
    let connect = o.connect.as_ref();
    let storm = o.storm.as_ref();
    let fanout = o.fanout.as_ref();
    let rate = |count: usize, took: Duration| {
        format!("{:.0}", count as f64 / took.as_secs_f64().max(1e-9))
    };
    [
        connect.map_or_else(dash, |r| format!("{} of {devices}", r.connected)),
        connect.map_or_else(dash, |r| rate(r.connected, r.until_last_connack)),
        connect.map_or_else(dash, |r| p50_p99(&r.latencies)),
        o.held.as_ref().map_or_else(dash, |c| c.open.to_string()),
        mib(o.rss_before),
        mib(o.rss_held),
        match (o.rss_before, o.rss_held, &o.held) {
            (Some(before), Some(held), Some(c)) if c.open > 0 => format!(
                "{:.1} KiB",
                (held as f64 - before as f64) / c.open as f64 / 1024.0
            ),
            _ => dash(),
        },
        match (o.heap_before, o.heap_held, &o.held) {
            (Some(before), Some(held), Some(c)) if c.open > 0 => format!(
                "{:.2} KiB",
                (held as f64 - before as f64) / c.open as f64 / 1024.0
            ),
            _ => dash(),
        },
        storm.map_or_else(dash, |r| {
            format!(
                "{:.2} s ({} of {devices})",
                r.until_last_connack.as_secs_f64(),
                r.connected,
            )
        }),
        storm.map_or_else(dash, |r| p50_p99(&r.latencies)),
        {
            let overflows = |r: Option<&Round>| {
                r.and_then(|r| r.listen_overflows)
                    .map_or_else(dash, |n| n.to_string())
            };
            format!("{} / {}", overflows(connect), overflows(storm))
        },
        o.held_after_storm
            .as_ref()
            .map_or_else(dash, |c| c.open.to_string()),
        mib(o.rss_after_storm),
        fanout.map_or_else(dash, |f| {
            format!(
                "{} of {}",
                f.subscribed,
                f.subscribed + f.subscribe_failures.values().sum::<usize>()
            )
        }),
        fanout.map_or_else(dash, |f| rate(f.delivered, f.elapsed)),
        fanout.map_or_else(dash, |f| {
            format!(
                "{} of {} in {:.2} s",
                f.delivered,
                f.subscribed * f.messages,
                f.elapsed.as_secs_f64()
            )
        }),
        fanout.map_or_else(dash, |f| p50_p99(&f.latencies)),
    ]
}

fn print_table(args: &HoldArgs, outcomes: &[Outcome]) {
    println!();
    for outcome in outcomes {
        if let Some((count, took)) = outcome.registration {
            println!(
                "{}: registered {count} devices in {:.1} s ({REGISTER_CONCURRENCY} requests at once; not part of any rate below)",
                outcome.name,
                took.as_secs_f64()
            );
        }
    }
    let columns: Vec<[String; 17]> = outcomes.iter().map(|o| cells(o, args.devices)).collect();
    let width = outcomes
        .iter()
        .map(|o| o.name.chars().count())
        .chain(columns.iter().flatten().map(|c| c.chars().count()))
        .max()
        .unwrap_or(0)
        + 3;
    let label_width = ROWS.iter().map(|r| r.len()).max().unwrap_or(0) + 3;
    print!("\n{:<label_width$}", "");
    for outcome in outcomes {
        print!("{:<width$}", outcome.name);
    }
    println!();
    for (row, label) in ROWS.iter().enumerate() {
        print!("{label:<label_width$}");
        for column in &columns {
            print!("{:<width$}", column[row]);
        }
        println!();
    }
    for outcome in outcomes {
        let mut lines = outcome.notes.clone();
        for (what, round) in [("connect", &outcome.connect), ("storm", &outcome.storm)] {
            for (error, count) in round.iter().flat_map(|r| &r.errors) {
                lines.push(format!("{what}: {count} x {error}"));
            }
        }
        if let Some(fanout) = &outcome.fanout {
            for (error, count) in &fanout.subscribe_failures {
                lines.push(format!("fan-out subscribe: {count} x {error}"));
            }
            for (error, count) in &fanout.receive_failures {
                lines.push(format!(
                    "fan-out subscribers stopped early: {count} x {error}"
                ));
            }
            if fanout.duplicates > 0 {
                lines.push(format!(
                    "fan-out: {} duplicate deliveries (not counted)",
                    fanout.duplicates
                ));
            }
        }
        if !lines.is_empty() {
            println!("\n{}:", outcome.name);
            for line in lines {
                println!("  {line}");
            }
        }
    }
}
