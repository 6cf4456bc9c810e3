//! Cluster mode: `fleetgate broker` and `fleetgate store --node` processes
//! sharing one PostgreSQL database. Devices (on the device SDK) publish
//! through the broker; a node is killed mid-stream; every acknowledged
//! record is stored exactly once, and live copies and stream changes reach
//! every process.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleetgate_device_sdk::identity::{read_public_key, DeviceKey};
use fleetgate_device_sdk::{Device, DeviceConfig};
use fleetgate_firmware_examples::{thermostat, Cadence};
use fleetgate_protocol::sdk::Target;
use serde_json::{json, Value};

use crate::harness::{postgres_url, TestDatabase, WAIT};

/// A fleetgate process, killed when dropped.
pub(crate) struct Process {
    child: Child,
    ready: String,
}

impl Process {
    pub(crate) fn start(args: &[&str]) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(args)
            // FG_CHILD_LOG=fleetgate_broker=debug,... to see more of a failing run.
            .env(
                "RUST_LOG",
                std::env::var("FG_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = loop {
            let line = lines
                .next()
                .expect("process exited before it was ready")
                .unwrap();
            if line.contains("ready:") {
                break line;
            }
        };
        // Keep draining stdout so the process never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Process { child, ready }
    }

    pub(crate) fn field(&self, name: &str) -> String {
        self.ready
            .split_whitespace()
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.ready))
            .to_string()
    }

    /// The MQTT host and port of a broker.
    pub(crate) fn mqtt(&self) -> (String, u16) {
        let addr: std::net::SocketAddr = self.field("mqtt").parse().unwrap();
        (addr.ip().to_string(), addr.port())
    }

    pub(crate) fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub(crate) struct Cluster {
    pub(crate) broker: Process,
    pub(crate) url: String,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) admin: String,
    pub(crate) http: reqwest::Client,
    /// Last, so the database outlives the processes using it.
    _database: TestDatabase,
}

/// An MQTT 3.1.1 session of `id` on `broker`, once its CONNACK arrived.
pub(crate) async fn connected(
    broker: &Process,
    id: &str,
    token: &str,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let (host, port) = broker.mqtt();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut options = rumqttc::MqttOptions::new(id, host.clone(), port);
        options.set_credentials(id, token);
        let (client, mut events) = rumqttc::AsyncClient::new(options, 10);
        loop {
            match tokio::time::timeout_at(deadline, events.poll())
                .await
                .unwrap()
            {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    return (client, events)
                }
                Ok(_) => {}
                Err(e) => {
                    // The broker may not have heard of the device yet.
                    assert!(tokio::time::Instant::now() < deadline, "{e:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    break;
                }
            }
        }
    }
}

impl Cluster {
    /// A second broker of the same cluster: same database, same platform key.
    fn second_broker(&self) -> Process {
        self.second_broker_with(&[])
    }

    /// `second_broker` with more command-line arguments.
    pub(crate) fn second_broker_with(&self, extra: &[&str]) -> Process {
        let data = self.dir.path().join("second");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::copy(
            self.dir.path().join("broker/platform.key"),
            data.join("platform.key"),
        )
        .unwrap();
        start_broker_with(&data, &self.url, extra)
    }

    pub(crate) async fn api(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("http://{}{path}", self.broker.field("http"));
        let mut request = self
            .http
            .request(method.parse().unwrap(), url)
            .bearer_auth(&self.admin);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            panic!("{method} {path}: {status}: {text}");
        }
        response.json().await.unwrap()
    }

    pub(crate) async fn apply(&self, streams: &str) {
        let response = self
            .http
            .post(format!("http://{}/v1/streams", self.broker.field("http")))
            .bearer_auth(&self.admin)
            .body(streams.to_string())
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
    }

    /// A store node whose live copies go to `self.broker`.
    pub(crate) fn node(&self, id: &str, token: &str) -> Process {
        let broker = self.broker.field("mqtt");
        self.store_node(id, &["--mqtt", &broker, "--token", token])
    }

    /// A store node that sends live copies onto the brokers' NATS fabric.
    pub(crate) fn node_on_nats(&self, id: &str, nats: &str) -> Process {
        self.store_node(id, &["--nats", nats])
    }

    /// A store node `id` of this cluster, with more arguments.
    pub(crate) fn store_node(&self, id: &str, extra: &[&str]) -> Process {
        let mut args = vec!["store", "--node", id, "--database", &self.url];
        args.extend_from_slice(extra);
        Process::start(&args)
    }

    async fn count(&self, sql: &str) -> i64 {
        let body = self
            .api("POST", "/v1/query", Some(json!({ "sql": sql })))
            .await;
        body["rows"][0][0].as_i64().unwrap()
    }

    pub(crate) async fn wait_nodes_up(&self, ids: &[&str]) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let body = self.api("GET", "/v1/nodes", None).await;
            let up: Vec<&str> = body["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["up"] == true)
                .map(|n| n["id"].as_str().unwrap())
                .collect();
            if ids.iter().all(|id| up.contains(id)) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "nodes up: {up:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn device(&self, id: &str) -> Device {
        let dir = self.dir.path().join(id);
        let key = DeviceKey::generate(&dir).unwrap();
        self.api(
            "POST",
            "/v1/devices",
            Some(json!({ "id": id, "role": "ingest", "type": "thermostat", "public_key": key.public_hex() })),
        )
        .await;
        let platform = read_public_key(&self.dir.path().join("broker/platform.pub")).unwrap();
        let mut config = DeviceConfig::new(
            &format!("http://{}", self.broker.field("http")),
            id,
            "thermostat",
            DeviceKey::load(&dir).unwrap(),
            platform,
            dir.join("queue"),
        );
        config.target = Some(Target::X86_64);
        Device::start(config).await.unwrap()
    }
}

pub(crate) fn start_broker_with(data: &Path, url: &str, extra: &[&str]) -> Process {
    let data = data.to_str().unwrap();
    let mut args = vec!["broker", "--mqtt", "127.0.0.1:0", "--http", "127.0.0.1:0"];
    args.extend(["--data", data, "--database", url]);
    args.extend_from_slice(extra);
    Process::start(&args)
}

pub(crate) async fn cluster() -> Option<Cluster> {
    cluster_with(&[]).await
}

/// `cluster` with more command-line arguments for its broker.
pub(crate) async fn cluster_with(extra: &[&str]) -> Option<Cluster> {
    postgres_url()?;
    let database = TestDatabase::create().await;
    let url = database.url();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("broker");
    let broker = start_broker_with(&data, &url, extra);
    let admin = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    Some(Cluster {
        broker,
        url,
        dir,
        admin,
        http: reqwest::Client::new(),
        _database: database,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_stream_loses_nothing_acknowledged() {
    let Some(cluster) = cluster().await else {
        eprintln!("skipped: DATABASE_URL is not set, so this PostgreSQL cluster test did not run");
        return;
    };
    cluster
        .apply(include_str!("../firmware-examples/streams.toml"))
        .await;
    // Each node re-publishes live copies as an admin device of its own.
    let mut feeds = Vec::new();
    for id in ["feed-n1", "feed-n2"] {
        let body = json!({ "id": id, "role": "admin" });
        let feed = cluster.api("POST", "/v1/devices", Some(body)).await;
        feeds.push(feed["token"].as_str().unwrap().to_string());
    }
    let mut first = cluster.node("n1", &feeds[0]);
    let _second = cluster.node("n2", &feeds[1]);
    cluster.wait_nodes_up(&["n1", "n2"]).await;

    // An analyst follows live copies, which nodes send back through the broker.
    let analyst = cluster
        .api(
            "POST",
            "/v1/devices",
            Some(json!({ "id": "analyst", "role": "extract" })),
        )
        .await;
    let (host, port) = cluster.broker.mqtt();
    let mut options = rumqttc::MqttOptions::new("analyst", host, port);
    options.set_credentials("analyst", analyst["token"].as_str().unwrap());
    let (live, mut live_events) = rumqttc::AsyncClient::new(options, 100);
    live.subscribe("live/temperature/#", rumqttc::QoS::AtMostOnce)
        .await
        .unwrap();
    let (seen, mut seen_rx) = tokio::sync::watch::channel(0usize);
    tokio::spawn(async move {
        while let Ok(event) = live_events.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(_)) = event {
                seen.send_modify(|n| *n += 1);
            }
        }
    });

    let readings = 150u64;
    let mut devices = Vec::new();
    for i in 0..4 {
        devices.push(cluster.device(&format!("thermo-{i}")).await);
    }
    let publishers: Vec<_> = devices
        .into_iter()
        .map(|device| {
            tokio::spawn(async move {
                let cadence = Cadence {
                    count: readings,
                    every: Duration::from_millis(2),
                };
                let sent = thermostat::run(&device, "hall", &cadence).await.unwrap();
                (device, sent)
            })
        })
        .collect();
    // Both nodes take traffic, then n1 dies without warning.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let nodes = cluster.api("GET", "/v1/nodes", None).await;
        let busy = nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["routed"].as_u64().unwrap() >= 20);
        if busy {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{nodes}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill9();
    for publisher in publishers {
        let (device, sent) = tokio::time::timeout(Duration::from_secs(60), publisher)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sent, readings);
        assert_eq!(device.status().borrow().queued, 0);
    }
    // Every reading of every device is stored, once.
    assert_eq!(
        cluster.count("SELECT count(*) FROM temperature").await,
        4 * readings as i64
    );
    assert_eq!(
        cluster
            .count("SELECT count(*) FROM (SELECT DISTINCT device_id, seq FROM temperature) d")
            .await,
        4 * readings as i64
    );
    tokio::time::timeout(WAIT, seen_rx.wait_for(|n| *n > 0))
        .await
        .expect("live copies from the store nodes")
        .unwrap();
    let nodes = cluster.api("GET", "/v1/nodes", None).await;
    let n2 = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "n2")
        .unwrap()
        .clone();
    assert_eq!(n2["up"], true, "{nodes}");

    // A stream applied through the broker reaches the surviving node.
    cluster
        .apply("[streams.door]\nfields.open = { type = \"bool\", required = true }\n")
        .await;
    let door = cluster.device("door-1").await;
    door.publish("door", &[("open", true.into())]).unwrap();
    door.flush(WAIT).await.unwrap();
    assert_eq!(cluster.count("SELECT count(*) FROM door").await, 1);
}

/// Two brokers of one cluster, and a device the first registered, connected
/// to the second (which learned of it from the first).
struct TwoBrokers {
    cluster: Cluster,
    second: Process,
    token: String,
    _client: rumqttc::AsyncClient,
    events: rumqttc::EventLoop,
}

async fn two_brokers(device: &str, role: &str) -> Option<TwoBrokers> {
    let Some(cluster) = cluster().await else {
        eprintln!("skipped: DATABASE_URL is not set, so this PostgreSQL cluster test did not run");
        return None;
    };
    let second = cluster.second_broker();
    let body = json!({ "id": device, "role": role });
    let added = cluster.api("POST", "/v1/devices", Some(body)).await;
    let token = added["token"].as_str().unwrap().to_string();
    let (_client, events) = connected(&second, device, &token).await;
    Some(TwoBrokers {
        cluster,
        second,
        token,
        _client,
        events,
    })
}

/// Polls (pings keep coming) until the broker closes the connection.
async fn until_closed(events: &mut rumqttc::EventLoop) {
    while tokio::time::timeout(WAIT, events.poll())
        .await
        .unwrap()
        .is_ok()
    {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_broker_ends_sessions_on_another() {
    let Some(TwoBrokers {
        cluster,
        second,
        token,
        _client,
        mut events,
    }) = two_brokers("sensor-9", "extract").await
    else {
        return;
    };
    let query = |token: String| {
        let url = format!("http://{}/v1/query", second.field("http"));
        async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .json(&json!({ "sql": "SELECT 1" }))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(query(token.clone()).await, 200);

    // Revoked through the first broker: the second ends the session at once.
    let revoked_at = tokio::time::Instant::now();
    cluster
        .api("POST", "/v1/devices/sensor-9/revoke", None)
        .await;
    until_closed(&mut events).await;
    let took = revoked_at.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "session ended after {took:?}"
    );
    assert_eq!(query(token).await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_on_one_broker_holds_on_another() {
    let Some(TwoBrokers {
        cluster,
        second,
        token: _,
        _client,
        mut events,
    }) = two_brokers("sensor-b", "ingest").await
    else {
        return;
    };

    // Five failures with the device's own (expired) token on the first
    // broker ban it there...
    let pkcs8 = std::fs::read(cluster.dir.path().join("broker/platform.key")).unwrap();
    let signer = fleetgate_protocol::TokenSigner::from_pkcs8(&pkcs8).unwrap();
    let now = crate::harness::now();
    let expired = signer.sign(&fleetgate_protocol::Claims {
        sub: "sensor-b".into(),
        role: fleetgate_protocol::Role::Ingest,
        iat: now - 7200,
        exp: now - 3600,
    });
    let (host, port) = cluster.broker.mqtt();
    for _ in 0..5 {
        let mut options = rumqttc::MqttOptions::new("sensor-b", host.clone(), port);
        options.set_credentials("sensor-b", expired.as_str());
        let (_client, mut attempt) = rumqttc::AsyncClient::new(options, 10);
        until_closed(&mut attempt).await;
    }
    // ...and on the second: its session there ends, and the ban is listed.
    until_closed(&mut events).await;
    let admin = std::fs::read_to_string(cluster.dir.path().join("second/admin.token")).unwrap();
    let bans: Value = reqwest::Client::new()
        .get(format!("http://{}/v1/bans", second.field("http")))
        .bearer_auth(admin.trim())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(bans["bans"][0]["device"], "sensor-b", "{bans}");
}
