//! Starts the real `fleetgate` binary on ephemeral ports and talks to it
//! with real clients: rumqttc (3.1.1 and 5), HTTP, the mosquitto tools.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fleetgate_protocol::{Claims, Role, TokenSigner};
use rumqttc::v5;
use serde_json::{json, Value};
use tokio::sync::mpsc;

pub const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs a test body on SQLite, and on PostgreSQL when `DATABASE_URL` is set
/// (saying so when it is not).
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::harness::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if $crate::harness::postgres_url().is_some() {
                    super::$name($crate::harness::Backend::Postgres).await
                } else {
                    eprintln!("skipped: DATABASE_URL is not set, so this PostgreSQL test did not run");
                }
            }
        }
    )*};
}

pub fn postgres_url() -> Option<String> {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| u.starts_with("postgres"))
}

/// A PostgreSQL database of its own for one test, dropped afterwards.
pub struct TestDatabase {
    admin_url: String,
    name: String,
}

impl TestDatabase {
    pub async fn create() -> TestDatabase {
        use sqlx::Connection;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let admin_url = postgres_url().expect("DATABASE_URL");
        let name = format!(
            "fleetgate_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut conn = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("connect to DATABASE_URL");
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        TestDatabase { admin_url, name }
    }

    pub fn url(&self) -> String {
        let (base, _) = self.admin_url.rsplit_once('/').expect("URL has a database");
        format!("{base}/{}", self.name)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime; use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                use sqlx::Connection;
                if let Ok(mut conn) = sqlx::PgConnection::connect(&url).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            })
        })
        .join();
    }
}

pub struct Server {
    child: Option<Child>,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    pub dir: tempfile::TempDir,
    pub admin: String,
    pub backend: Backend,
    /// Every `name=address` of the ready line (mqtt, http, pg, mqtts, https).
    ready: Vec<(String, SocketAddr)>,
    database: Option<TestDatabase>,
    extra_args: Vec<String>,
    http_client: reqwest::Client,
}

/// `fleetgate up` flags for TLS with the development CA on ephemeral ports.
pub const DEV_TLS: [&str; 5] = [
    "--dev-tls",
    "--mqtts",
    "127.0.0.1:0",
    "--https",
    "127.0.0.1:0",
];

pub const TEMPERATURE: &str = r#"
[streams.temperature]
key = ["device_id", "seq"]
fields.seq      = { type = "int", required = true }
fields.celsius  = { type = "float", min = -40.0, max = 125.0, required = true }
fields.humidity = { type = "float", min = 0.0, max = 100.0 }
fields.status   = { type = "enum", values = ["ok", "warn", "fault"] }
fields.taken_at = { type = "timestamp" }
fields.door_open = { type = "bool" }
fields.label    = { type = "string" }
"#;

impl Server {
    pub async fn start(backend: Backend) -> Server {
        Self::start_with(backend, &[]).await
    }

    pub async fn start_with(backend: Backend, extra_args: &[&str]) -> Server {
        let database = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(TestDatabase::create().await),
        };
        let mut server = Server {
            child: None,
            mqtt: "127.0.0.1:0".parse().unwrap(),
            http: "127.0.0.1:0".parse().unwrap(),
            dir: tempfile::tempdir().unwrap(),
            admin: String::new(),
            backend,
            ready: Vec::new(),
            database,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            http_client: reqwest::Client::new(),
        };
        server.launch();
        server.admin = std::fs::read_to_string(server.dir.path().join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        server
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Where ETL file sources must be: the server's default `--etl-dir`.
    pub fn etl_dir(&self) -> PathBuf {
        self.dir.path().join("etl-sources")
    }

    pub fn database_url(&self) -> Option<String> {
        self.database.as_ref().map(TestDatabase::url)
    }

    /// The command line of `fleetgate up` for this server, on ephemeral ports.
    pub fn up_args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "up",
            "--mqtt",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--pg",
            "127.0.0.1:0",
            "--data",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(self.dir.path().display().to_string());
        if let Some(url) = self.database_url() {
            args.extend(["--database".to_string(), url]);
        }
        // Automatic views would add views of their own to the ones a test
        // declares; only the tests about them turn them on.
        if !self.extra_args.iter().any(|a| a == "--auto-views-budget") {
            args.extend(["--auto-views-budget".to_string(), "0".to_string()]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(self.up_args())
            .env("RUST_LOG", "info,sqlx=warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start fleetgate");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let ready = loop {
            match lines.next() {
                Some(Ok(line)) if line.starts_with("fleetgate ready:") => break line,
                Some(Ok(_)) => continue,
                _ => panic!("fleetgate exited before it was ready; log:\n{}", self.log()),
            }
        };
        self.ready = ready
            .split_whitespace()
            .filter_map(|part| part.split_once('='))
            .filter_map(|(name, addr)| Some((name.to_string(), addr.parse().ok()?)))
            .collect();
        self.mqtt = self.extra_addr("mqtt").expect("mqtt address");
        self.http = self.extra_addr("http").expect("http address");
        self.child = Some(child);
    }

    /// An address from the ready line, by name.
    pub fn extra_addr(&self, name: &str) -> Option<SocketAddr> {
        self.ready.iter().find(|(n, _)| n == name).map(|(_, a)| *a)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGINT (Ctrl-C), then wait for the process to exit; returns its status.
    pub fn interrupt(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        Command::new("kill").args(["-INT", &pid]).status().unwrap();
        child.wait().unwrap()
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server first");
        self.launch();
    }

    pub async fn api(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("http://{}{path}", self.http);
        let mut request = self.http_client.request(method.parse().unwrap(), url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("HTTP request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn add_device(&self, id: &str, role: &str) -> String {
        let (status, body) = self
            .api(
                "POST",
                "/v1/devices",
                Some(&self.admin),
                Some(json!({"id": id, "role": role})),
            )
            .await;
        assert_eq!(status, 201, "add device {id}: {body}");
        body["token"].as_str().unwrap().to_string()
    }

    pub async fn apply_streams(&self, toml: &str) -> (u16, Value) {
        self.post_text("/v1/streams", &self.admin, toml).await
    }

    /// POSTs a plain-text body (TOML declarations).
    pub async fn post_text(&self, path: &str, token: &str, text: &str) -> (u16, Value) {
        let response = self
            .http_client
            .post(format!("http://{}{path}", self.http))
            .bearer_auth(token)
            .body(text.to_string())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn with_temperature(backend: Backend) -> Server {
        let server = Server::start(backend).await;
        let (status, body) = server.apply_streams(TEMPERATURE).await;
        assert_eq!(status, 200, "{body}");
        server
    }

    /// Polls `GET path` as admin until `done` holds for its body (for what
    /// the server does on its own clock: automatic views, tier moves), or
    /// fails after 30 s with the last body.
    pub async fn wait_for(&self, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.api("GET", path, Some(&self.admin), None).await;
            assert_eq!(status, 200, "{body}");
            if done(&body) {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gave up waiting for {what}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Declares ETL jobs (TOML) and starts a run of `job`; returns its id.
    pub async fn start_job(&self, jobs: &str, job: &str) -> i64 {
        let (status, body) = self.post_text("/v1/etl/jobs", &self.admin, jobs).await;
        assert_eq!(status, 200, "{body}");
        let path = format!("/v1/etl/jobs/{job}/run");
        let (status, body) = self.api("POST", &path, Some(&self.admin), None).await;
        assert_eq!(status, 202, "{body}");
        body["run"].as_i64().expect("a run id")
    }

    /// The answer to a query run as admin (`rows`, `columns`, `view`);
    /// panics on an error.
    pub async fn query(&self, sql: &str) -> Value {
        let (status, body) = self
            .api(
                "POST",
                "/v1/query",
                Some(&self.admin),
                Some(json!({ "sql": sql })),
            )
            .await;
        assert_eq!(status, 200, "{sql}: {body}");
        body
    }

    /// Rows of a query run as admin; panics on an error.
    pub async fn rows(&self, sql: &str) -> Vec<Vec<Value>> {
        serde_json::from_value(self.query(sql).await["rows"].clone()).unwrap()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.rows(sql).await[0][0].as_i64().unwrap()
    }

    /// Waits until `sql` (a single count) returns at least `n`.
    pub async fn wait_count(&self, sql: &str, n: i64) -> i64 {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let count = self.count(sql).await;
            if count >= n || tokio::time::Instant::now() > deadline {
                return count;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Devices named by the repeated-refusal alerts.
    pub async fn alerted_devices(&self) -> Vec<String> {
        let (status, body) = self
            .api("GET", "/v1/refusals", Some(&self.admin), None)
            .await;
        assert_eq!(status, 200, "{body}");
        body["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["device"].as_str().unwrap().to_string())
            .collect()
    }

    pub async fn metrics(&self) -> String {
        self.http_client
            .get(format!("http://{}/metrics", self.http))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Signs a token with this server's platform key, with any claims.
    pub fn mint(&self, sub: &str, role: Role, iat: i64, exp: i64) -> String {
        let pkcs8 = std::fs::read(self.dir.path().join("platform.key")).unwrap();
        TokenSigner::from_pkcs8(&pkcs8).unwrap().sign(&Claims {
            sub: sub.into(),
            role,
            iat,
            exp,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", self.log());
        }
    }
}

/// Runs the `fleetgate` binary as a client of `server`: (success, stdout, stderr).
pub fn fleetgate(server: &Server, args: &[&str]) -> (bool, String, String) {
    outcome(fleetgate_command(server, args).output().unwrap())
}

/// The same, without blocking the async runtime.
pub async fn fleetgate_async(server: &Server, args: &[&str]) -> (bool, String, String) {
    let mut command = tokio::process::Command::from(fleetgate_command(server, args));
    outcome(command.output().await.unwrap())
}

fn fleetgate_command(server: &Server, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fleetgate"));
    command
        .args(args)
        .args([
            "--server",
            &format!("http://{}", server.http),
            "--data",
            &server.data_dir().display().to_string(),
        ])
        .env_remove("FLEETGATE_TOKEN");
    command
}

fn outcome(output: std::process::Output) -> (bool, String, String) {
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A job `name` that upserts the orders in the CSV file `csv` (of
/// `columns`, TOML) into `orders_batch` by order id, covering whole days.
pub fn nightly_orders_job(name: &str, csv: &std::path::Path, columns: &str) -> String {
    format!(
        r#"
[jobs.{name}.sources.orders]
csv = "{}"
columns = {{ {columns} }}
[jobs.{name}.load]
table = "orders_batch"
mode = "upsert"
key = ["order_id"]
time = "ordered_at"
covers = "1d"
"#,
        csv.display()
    )
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An MQTT 5 client whose events arrive on a channel.
pub struct V5 {
    pub client: v5::AsyncClient,
    pub events: mpsc::UnboundedReceiver<Result<v5::mqttbytes::v5::Packet, String>>,
    /// The task polling the event loop. Dropping a `V5` does not close its
    /// connection (the event loop keeps a sender of its own); `drop_connection` does.
    task: tokio::task::JoinHandle<()>,
}

/// The options `connect_v5` uses, for a test to adjust before `connect_v5_with`.
pub fn v5_options(server: &Server, id: &str, token: &str) -> v5::MqttOptions {
    let mut options = v5::MqttOptions::new(id, server.mqtt.ip().to_string(), server.mqtt.port());
    options.set_credentials(id, token);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(Some(2 * 1024 * 1024));
    options
}

/// Connects with MQTT 5; `Err` carries the CONNACK refusal code.
pub async fn connect_v5(
    server: &Server,
    id: &str,
    token: &str,
) -> Result<V5, v5::mqttbytes::v5::ConnectReturnCode> {
    let (client, _) = connect_v5_with(v5_options(server, id, token)).await?;
    Ok(client)
}

/// Connects with MQTT 5 with the given options; returns the client and the
/// CONNACK (session present, properties). `Err` carries the refusal code.
pub async fn connect_v5_with(
    options: v5::MqttOptions,
) -> Result<(V5, v5::mqttbytes::v5::ConnAck), v5::mqttbytes::v5::ConnectReturnCode> {
    let (client, mut eventloop) = v5::AsyncClient::new(options, 1000);
    let connack = loop {
        match tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .expect("CONNACK in time")
        {
            Ok(v5::Event::Incoming(v5::Incoming::ConnAck(connack))) => break connack,
            Ok(_) => continue,
            Err(v5::ConnectionError::ConnectionRefused(code)) => return Err(code),
            Err(e) => panic!("MQTT 5 connect failed: {e:?}"),
        }
    };
    let (tx, events) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(v5::Event::Incoming(packet)) => {
                    if tx.send(Ok(packet)).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                // rumqttc reports a server's DISCONNECT as an error; hand it
                // to the test as the packet it was.
                Err(v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect {
                    reason_code,
                    ..
                })) => {
                    let disconnect = v5::mqttbytes::v5::Disconnect {
                        reason_code,
                        properties: None,
                    };
                    let _ = tx.send(Ok(v5::mqttbytes::v5::Packet::Disconnect(disconnect)));
                    break;
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:?}")));
                    break;
                }
            }
        }
    });
    Ok((
        V5 {
            client,
            events,
            task,
        },
        connack,
    ))
}

impl V5 {
    /// Closes the socket without DISCONNECT, as a device that loses its
    /// network does; returns once it is closed.
    pub async fn drop_connection(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Subscribes to one filter and returns the SUBACK's code for it.
    pub async fn subscribe(&mut self, filter: &str) -> v5::mqttbytes::v5::SubscribeReasonCode {
        self.client
            .subscribe(filter, v5::mqttbytes::QoS::AtLeastOnce)
            .await
            .unwrap();
        self.expect(|p| match p {
            v5::mqttbytes::v5::Packet::SubAck(ack) => Some(ack.return_codes[0]),
            _ => None,
        })
        .await
    }
    /// The next incoming packet matching `pick`, skipping others.
    pub async fn expect<T>(
        &mut self,
        mut pick: impl FnMut(&v5::mqttbytes::v5::Packet) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("expected packet in time");
            match event {
                Some(Ok(packet)) => {
                    if let Some(found) = pick(&packet) {
                        return found;
                    }
                }
                Some(Err(e)) => panic!("connection ended while waiting: {e}"),
                None => panic!("connection ended while waiting"),
            }
        }
    }

    /// The reason code of the next PUBACK.
    pub async fn puback_reason(&mut self) -> v5::mqttbytes::v5::PubAckReason {
        self.expect(|p| match p {
            v5::mqttbytes::v5::Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await
    }

    /// Nothing but pings for `quiet`: asserts no packet of interest arrived.
    pub async fn assert_silent(&mut self, quiet: Duration, what: &str) {
        let deadline = tokio::time::Instant::now() + quiet;
        while let Ok(event) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            if let Some(Ok(v5::mqttbytes::v5::Packet::Publish(p))) = event {
                panic!("{what}: unexpectedly received a publish on {:?}", p.topic);
            }
        }
    }
}

/// The options `connect_v4` uses, for a test to adjust before `connect_v4_with`.
pub fn v4_options(server: &Server, id: &str, token: &str) -> rumqttc::MqttOptions {
    let mut options =
        rumqttc::MqttOptions::new(id, server.mqtt.ip().to_string(), server.mqtt.port());
    options.set_credentials(id, token);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
    options
}

/// An MQTT 3.1.1 client; `Err` carries the CONNACK refusal code.
pub async fn connect_v4(
    server: &Server,
    id: &str,
    token: &str,
) -> Result<(rumqttc::AsyncClient, rumqttc::EventLoop), rumqttc::ConnectReturnCode> {
    let (client, eventloop, _) = connect_v4_with(v4_options(server, id, token)).await?;
    Ok((client, eventloop))
}

/// Connects with MQTT 3.1.1 with the given options; returns the client, its
/// event loop and the CONNACK (session present). `Err` carries the refusal code.
pub async fn connect_v4_with(
    options: rumqttc::MqttOptions,
) -> Result<(rumqttc::AsyncClient, rumqttc::EventLoop, rumqttc::ConnAck), rumqttc::ConnectReturnCode>
{
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .expect("CONNACK in time")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(connack))) => {
                return Ok((client, eventloop, connack))
            }
            Ok(_) => continue,
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return Err(code),
            Err(e) => panic!("MQTT 3.1.1 connect failed: {e:?}"),
        }
    }
}

/// Publishes `payloads` at QoS 1 over MQTT 3.1.1 and returns once every
/// PUBACK arrived.
pub async fn publish_acked(
    server: &Server,
    id: &str,
    token: &str,
    topic: &str,
    payloads: &[String],
) {
    let (client, mut eventloop) = connect_v4(server, id, token).await.expect("connect");
    for payload in payloads {
        client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < payloads.len() {
        match tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .expect("PUBACK in time")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => panic!("connection failed after {acked} acks: {e:?}"),
        }
    }
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), eventloop.poll()).await;
}

pub fn mosquitto_available() -> bool {
    Command::new("mosquitto_pub").arg("--help").output().is_ok()
}

pub use fleetgate_broker::codec::put_remaining_length;

/// A raw TCP connection that has sent an MQTT 3.1.1 CONNECT (clean session,
/// 60 s keep-alive) and received a successful CONNACK, for tests that write
/// bytes no client library would.
pub async fn raw_mqtt311(server: &Server, id: &str, token: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut payload = Vec::new();
    for field in [id.as_bytes(), id.as_bytes(), token.as_bytes()] {
        payload.extend((field.len() as u16).to_be_bytes());
        payload.extend(field);
    }
    let mut connect = vec![0x10];
    put_remaining_length(&mut connect, 10 + payload.len());
    connect.extend([0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xc2, 0x00, 0x3c]);
    connect.extend(payload);
    let mut socket = tokio::net::TcpStream::connect(server.mqtt).await.unwrap();
    socket.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    socket.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "CONNACK");
    socket
}

/// A well-formed admin-role token signed by a key that is not the platform's.
pub fn foreign_token(sub: &str) -> String {
    use ring::signature::Ed25519KeyPair;
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    TokenSigner::from_pkcs8(pkcs8.as_ref())
        .unwrap()
        .sign(&Claims {
            sub: sub.into(),
            role: Role::Admin,
            iat: now(),
            exp: now() + 3600,
        })
}

/// Publishes `{"seq": n, "celsius": 75}` with rising `n` every few ms on
/// `topic` until `stop` flips; returns once every one sent is
/// acknowledged, with their number.
pub async fn publish_until(
    client: rumqttc::AsyncClient,
    events: &mut rumqttc::EventLoop,
    topic: &str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> u64 {
    let (total_tx, mut total_rx) = tokio::sync::oneshot::channel();
    let topic = topic.to_string();
    tokio::spawn(async move {
        let mut seq = 0u64;
        while !*stop.borrow() {
            seq += 1;
            let payload = json!({ "seq": seq, "celsius": 75.0 }).to_string();
            client
                .publish(&topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        let _ = total_tx.send(seq);
    });
    let (mut acked, mut total) = (0u64, None);
    while total != Some(acked) {
        tokio::select! {
            event = events.poll() => {
                if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = event.expect("connection stays up") {
                    acked += 1;
                }
            }
            sent = &mut total_rx, if total.is_none() => total = Some(sent.unwrap()),
        }
    }
    acked
}
