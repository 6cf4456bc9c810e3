//! Brokers of one cluster routing to each other through NATS: a 3-node NATS
//! cluster started here, two `fleetgate broker --nats ...` on one PostgreSQL
//! database, store nodes (one sending live copies onto NATS, one to a
//! broker over MQTT), and real MQTT 5 clients on both brokers. Live
//! copies, commands and takeovers cross brokers, and keep crossing after
//! the NATS server a broker is connected to is killed.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{
    DisconnectReasonCode, Packet, PubAckReason, Publish, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::MqttOptions;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

use crate::cluster::{cluster_with, Cluster, Process};
use crate::harness::{connect_v5_with, postgres_url, V5, WAIT};

const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// A NATS cluster of three servers on ephemeral ports, killed when dropped.
struct Nats {
    nodes: Vec<NatsNode>,
    _dir: tempfile::TempDir,
}

struct NatsNode {
    /// `None` once killed.
    child: Option<Child>,
    client_port: u16,
    monitor_port: u16,
}

impl Drop for Nats {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill9(i);
        }
    }
}

impl Nats {
    /// The nats-server to run: Debian's, or one on the PATH.
    fn server() -> Option<PathBuf> {
        if std::path::Path::new(NATS_SERVER).exists() {
            return Some(NATS_SERVER.into());
        }
        let found = Command::new("nats-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        found.then(|| "nats-server".into())
    }

    /// Starts three servers routed to each other (the recipe in
    /// shared/notes/nats.md), and returns once each takes clients and has
    /// its routes to the other two.
    async fn start(server: PathBuf) -> Nats {
        // Client, route and monitoring port for each, all bound at once so
        // no two are the same; released just before the servers take them.
        let listeners: Vec<std::net::TcpListener> = (0..9)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        drop(listeners);
        let routes = (0..3)
            .map(|i| format!("nats://127.0.0.1:{}", ports[3 + i]))
            .collect::<Vec<_>>()
            .join(",");
        let dir = tempfile::tempdir().unwrap();
        let nodes = (0..3)
            .map(|i| {
                let store = dir.path().join(format!("n{i}"));
                let child = Command::new(&server)
                    .args(["-a", "127.0.0.1", "-p", &ports[i].to_string()])
                    .args(["-n", &format!("fg-n{i}"), "--cluster_name", "fg"])
                    .args(["-cluster", &format!("nats://127.0.0.1:{}", ports[3 + i])])
                    .args(["-routes", &routes])
                    .args(["-m", &ports[6 + i].to_string()])
                    .args(["-js", "-sd", store.to_str().unwrap()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start nats-server");
                NatsNode {
                    child: Some(child),
                    client_port: ports[i],
                    monitor_port: ports[6 + i],
                }
            })
            .collect();
        let nats = Nats { nodes, _dir: dir };
        let deadline = tokio::time::Instant::now() + WAIT;
        for node in &nats.nodes {
            loop {
                if greets(node.client_port).await {
                    let routez = monitor(node.monitor_port, "routez").await;
                    // JetStream answers once its servers elected a leader.
                    let jsz = monitor(node.monitor_port, "jsz").await;
                    if routez["num_routes"].as_u64().unwrap_or(0) >= 2
                        && jsz["meta_cluster"]["leader"].as_str().is_some()
                    {
                        break;
                    }
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "NATS server on {} not clustered in time",
                    node.client_port
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        nats
    }

    /// All three servers, as `--nats` takes them.
    fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// How many fleetgate brokers each server has as clients (0 once killed).
    async fn brokers_per_node(&self) -> Vec<usize> {
        let mut counts = Vec::new();
        for node in &self.nodes {
            if node.child.is_none() {
                counts.push(0);
                continue;
            }
            let connz = monitor(node.monitor_port, "connz").await;
            let brokers = connz["connections"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .filter(|c| {
                            c["name"]
                                .as_str()
                                .is_some_and(|n| n.starts_with("fleetgate-broker"))
                        })
                        .count()
                })
                .unwrap_or(0);
            counts.push(brokers);
        }
        counts
    }

    /// Waits until the session queues hold `n` messages, as the stream
    /// `FLEETGATE_QUEUES`'s leader reports them: the leader is the replica
    /// that takes publishes and enforces the queue limit. (A follower's
    /// count may lag, and on NATS 2.9 one sometimes keeps an acknowledged
    /// work-queue message for good.)
    async fn wait_queued(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut held = Vec::new();
            let mut leader_holds = None;
            for (i, node) in self.nodes.iter().enumerate() {
                if node.child.is_none() {
                    continue;
                }
                let jsz = monitor(node.monitor_port, "jsz?streams=true").await;
                let stream = jsz["account_details"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
                    .find(|s| s["name"] == "FLEETGATE_QUEUES")
                    .cloned()
                    .unwrap_or_default();
                let messages = stream["state"]["messages"].as_u64();
                // Servers are named `fg-n<i>` by `start`.
                if stream["cluster"]["leader"] == format!("fg-n{i}").as_str() {
                    leader_holds = messages;
                }
                held.push(messages);
            }
            if leader_holds == Some(n) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "session queues hold {held:?} messages (per server; leader {leader_holds:?}), not {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether a NATS server accepts a client on `port` (it greets with INFO).
async fn greets(port: u16) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let mut greeting = [0u8; 5];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut greeting)).await,
        Ok(Ok(_))
    ) && &greeting == b"INFO "
}

/// A NATS monitoring endpoint's JSON (`Null` while it does not answer).
async fn monitor(port: u16, endpoint: &str) -> Value {
    let url = format!("http://127.0.0.1:{port}/{endpoint}");
    match reqwest::get(url).await {
        Ok(response) => response.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// What a test needs before it starts: PostgreSQL and nats-server.
fn prerequisites() -> Option<PathBuf> {
    if postgres_url().is_none() {
        eprintln!("skipped: DATABASE_URL is not set, so this PostgreSQL cluster test did not run");
        return None;
    }
    let server = Nats::server();
    if server.is_none() {
        eprintln!("skipped: nats-server is not installed (apt-get install nats-server)");
    }
    server
}

/// A NATS cluster, and two brokers of one fleetgate cluster on it.
async fn two_brokers(server: PathBuf) -> (Nats, Cluster, Process) {
    two_brokers_with(server, &[]).await
}

/// `two_brokers`, each broker with more command-line arguments.
async fn two_brokers_with(server: PathBuf, extra: &[&str]) -> (Nats, Cluster, Process) {
    let nats = Nats::start(server).await;
    let urls = nats.urls();
    let mut args = vec!["--nats", &urls];
    args.extend_from_slice(extra);
    let cluster = cluster_with(&args).await.expect("DATABASE_URL was checked");
    let second = cluster.second_broker_with(&args);
    (nats, cluster, second)
}

async fn add_device(cluster: &Cluster, id: &str, role: &str) -> String {
    let added = cluster
        .api(
            "POST",
            "/v1/devices",
            Some(json!({ "id": id, "role": role })),
        )
        .await;
    added["token"].as_str().unwrap().to_string()
}

/// An MQTT 5 session of `id` on `broker`. A broker that has not yet heard
/// of the device (it learns through the database) refuses it; try again.
async fn connect(broker: &Process, id: &str, token: &str) -> V5 {
    let (host, port) = broker.mqtt();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut options = MqttOptions::new(id, host.clone(), port);
        options.set_credentials(id, token);
        options.set_keep_alive(Duration::from_secs(30));
        match connect_v5_with(options).await {
            Ok((client, _)) => return client,
            Err(code) => {
                assert!(tokio::time::Instant::now() < deadline, "{id}: {code:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn subscribed(broker: &Process, id: &str, token: &str, filter: &str) -> V5 {
    let mut client = connect(broker, id, token).await;
    assert_eq!(
        client.subscribe(filter).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    client
}

/// The next PUBLISH `pick` accepts within `within`, skipping other packets.
async fn next_publish(
    client: &mut V5,
    mut pick: impl FnMut(&Publish) -> bool,
    within: Duration,
) -> Option<Publish> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, client.events.recv()).await {
            Err(_) => return None,
            Ok(Some(Ok(Packet::Publish(publish)))) if pick(&publish) => return Some(publish),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => panic!("connection ended while waiting: {e}"),
            Ok(None) => panic!("connection ended while waiting"),
        }
    }
}

fn on(topic: &str) -> impl FnMut(&Publish) -> bool + '_ {
    move |p| p.topic == topic.as_bytes()
}

/// Publishes on `topic` from `from` until `to` (subscribed to it on another
/// broker) receives one: until the fabric carries that way. NATS spreads
/// a subscription to the other servers of its cluster shortly after it is
/// made, and core NATS drops what is published before. Returns how long
/// it took.
async fn carried(from: &V5, to: &mut V5, topic: &str) -> Duration {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        from.client
            .publish(topic, QoS::AtMostOnce, false, "ping")
            .await
            .unwrap();
        if next_publish(to, on(topic), Duration::from_millis(200))
            .await
            .is_some()
        {
            return start.elapsed();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing published on {topic} crossed the fabric within {WAIT:?}"
        );
    }
}

/// Publishes a reading through `sensor` and waits for its PUBACK (sent
/// after the store node committed it).
async fn ingest(sensor: &mut V5, id: &str, seq: u64) {
    let record = json!({ "seq": seq, "celsius": 21.5 });
    sensor
        .client
        .publish(
            format!("ingest/temperature/{id}"),
            QoS::AtLeastOnce,
            false,
            record.to_string(),
        )
        .await
        .unwrap();
    let reason = sensor.puback_reason().await;
    assert_eq!(reason, PubAckReason::Success);
}

/// Waits for the live copy of reading `seq` of `id`.
async fn live_copy(analyst: &mut V5, id: &str, seq: u64) {
    let topic = format!("live/temperature/{id}");
    let copy = next_publish(
        analyst,
        |p| {
            p.topic == topic.as_bytes()
                && serde_json::from_slice::<Value>(&p.payload)
                    .is_ok_and(|records| records[0]["seq"] == seq)
        },
        WAIT,
    )
    .await;
    assert!(
        copy.is_some(),
        "no live copy of reading {seq} on the other broker"
    );
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_copies_and_commands_cross_brokers_and_survive_a_nats_node_dying() {
    let Some(server) = prerequisites() else {
        return;
    };
    let (mut nats, cluster, second) = two_brokers(server).await;
    let first = &cluster.broker;
    cluster
        .apply(include_str!("../firmware-examples/streams.toml"))
        .await;
    // Two store nodes, one after the other: n2 sends live copies onto
    // NATS, n1 to the first broker over MQTT.
    let feed = add_device(&cluster, "feed-n1", "admin").await;
    let probe_a = add_device(&cluster, "probe-a", "admin").await;
    let probe_b = add_device(&cluster, "probe-b", "admin").await;
    let analyst = add_device(&cluster, "analyst", "extract").await;
    let sensor = add_device(&cluster, "sensor-a", "ingest").await;
    let valve = add_device(&cluster, "valve-b", "ingest").await;
    let n2 = cluster.node_on_nats("n2", &nats.urls());
    cluster.wait_nodes_up(&["n2"]).await;

    let mut probe_a = connect(first, "probe-a", &probe_a).await;
    let mut analyst = subscribed(&second, "analyst", &analyst, "live/#").await;
    let mut valve = subscribed(&second, "valve-b", &valve, "devices/valve-b/cmd").await;
    // Subscribed last: NATS spreads a broker's subscriptions to the other
    // servers in the order it made them, so once the probe's crosses, the
    // analyst's and the valve's have too.
    let mut probe_b = subscribed(&second, "probe-b", &probe_b, "probe/#").await;
    let mut sensor = connect(first, "sensor-a", &sensor).await;
    let took = carried(&probe_a, &mut probe_b, "probe/ready").await;
    println!("fabric carried first broker → second after {took:?}");

    // (a) A reading ingested through the first broker: its live copy
    // reaches a subscriber on the second, from a node that sends it onto
    // NATS, and from one that sends it to the first broker over MQTT.
    ingest(&mut sensor, "sensor-a", 1).await;
    live_copy(&mut analyst, "sensor-a", 1).await;
    let _n1 = cluster.node("n1", &feed);
    cluster.wait_nodes_up(&["n1", "n2"]).await;
    drop(n2);
    ingest(&mut sensor, "sensor-a", 2).await;
    live_copy(&mut analyst, "sensor-a", 2).await;

    // (b) An admin's QoS 1 command on the first broker reaches the device on
    // the second, with its MQTT 5 properties.
    let properties = PublishProperties {
        content_type: Some("text/plain".into()),
        response_topic: Some("devices/valve-b/reply".into()),
        correlation_data: Some(Bytes::from_static(b"\x00req\xff")),
        user_properties: vec![("by".into(), "ops team".into())],
        message_expiry_interval: Some(60),
        ..Default::default()
    };
    probe_a
        .client
        .publish_with_properties(
            "devices/valve-b/cmd",
            QoS::AtLeastOnce,
            false,
            "open",
            properties.clone(),
        )
        .await
        .unwrap();
    let reason = probe_a.puback_reason().await;
    assert!(
        matches!(
            reason,
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
        ),
        "{reason:?}"
    );
    let command = next_publish(&mut valve, on("devices/valve-b/cmd"), WAIT)
        .await
        .expect("the command on the other broker");
    assert_eq!(&command.payload[..], b"open");
    assert_eq!(command.qos, QoS::AtLeastOnce);
    let got = command.properties.expect("MQTT 5 properties");
    assert_eq!(got.content_type, properties.content_type);
    assert_eq!(got.response_topic, properties.response_topic);
    assert_eq!(got.correlation_data, properties.correlation_data);
    assert_eq!(got.user_properties, properties.user_properties);
    let left = got.message_expiry_interval.expect("expiry");
    assert!(left > 0 && left <= 60, "{left}");

    // Latency across brokers: publish on the first, received on the second,
    // one message at a time.
    let mut latencies = Vec::new();
    for i in 0..200 {
        let payload = i.to_string();
        let sent = Instant::now();
        probe_a
            .client
            .publish("probe/latency", QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
        let arrived = next_publish(
            &mut probe_b,
            |p| p.topic == "probe/latency".as_bytes() && p.payload == payload.as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert!(arrived.is_some(), "message {i} did not cross");
        latencies.push(sent.elapsed());
    }
    latencies.sort();
    println!(
        "cross-broker delivery over NATS ({} messages, QoS 1): p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        percentile(&latencies, 50),
        percentile(&latencies, 99),
        latencies.last().unwrap()
    );

    // (d) Kill -9 a NATS server that has a broker as client: its brokers
    // reconnect to the others (async-nats does that by itself), and
    // delivery resumes.
    let counts = nats.brokers_per_node().await;
    assert_eq!(counts.iter().sum::<usize>(), 2, "{counts:?}");
    let victim = (0..counts.len()).max_by_key(|&i| counts[i]).unwrap();
    nats.kill9(victim);
    println!(
        "killed NATS server {victim}, which had {} broker(s)",
        counts[victim]
    );
    let took = carried(&probe_a, &mut probe_b, "probe/resumed").await;
    println!("fabric carried again {took:?} after the kill");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let counts = nats.brokers_per_node().await;
        if counts.iter().sum::<usize>() == 2 {
            assert_eq!(counts[victim], 0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "brokers connected to surviving servers: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ingest(&mut sensor, "sensor-a", 3).await;
    live_copy(&mut analyst, "sensor-a", 3).await;
    assert!(
        sent_across(&probe_a, &mut valve, "devices/valve-b/cmd", "close").await,
        "no command after the NATS server died"
    );
}

/// Publishes `payload` on `topic` at QoS 1 through `from`; whether `to`
/// receives it.
async fn sent_across(from: &V5, to: &mut V5, topic: &str, payload: &str) -> bool {
    from.client
        .publish(topic, QoS::AtLeastOnce, false, payload.to_string())
        .await
        .unwrap();
    let wanted = |p: &Publish| p.topic == topic.as_bytes() && p.payload == payload.as_bytes();
    next_publish(to, wanted, WAIT).await.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_connecting_to_another_broker_is_taken_over_from_the_first() {
    let Some(server) = prerequisites() else {
        return;
    };
    let (_nats, cluster, second) = two_brokers(server).await;
    let first = &cluster.broker;
    // Registered first, so a broker that knows the probes knows it too.
    let twin = add_device(&cluster, "twin", "ingest").await;
    let probe_a = add_device(&cluster, "probe-a", "admin").await;
    let probe_b = add_device(&cluster, "probe-b", "admin").await;
    let mut probe_a = subscribed(first, "probe-a", &probe_a, "probe/#").await;
    let probe_b = connect(&second, "probe-b", &probe_b).await;
    // Claims go from the broker a device connects to, to the others.
    carried(&probe_b, &mut probe_a, "probe/ready").await;

    let mut on_first = connect(first, "twin", &twin).await;
    let mut on_second = connect(&second, "twin", &twin).await;
    let reason = on_first
        .expect(|p| match p {
            Packet::Disconnect(d) => Some(d.reason_code),
            _ => None,
        })
        .await;
    assert_eq!(reason, DisconnectReasonCode::SessionTakenOver);

    // The connection on the second broker is the device's now: it was not
    // ended by its own claim, and commands from the first broker reach it.
    assert_eq!(
        on_second.subscribe("devices/twin/cmd").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    carried(&probe_a, &mut on_second, "devices/twin/cmd").await;
    assert!(
        sent_across(&probe_a, &mut on_second, "devices/twin/cmd", "hello").await,
        "the command"
    );
}

/// Interest-based routing: a broker is sent only what its sessions
/// subscribe to. What another broker publishes on other topics does not
/// cross to it (its `fleetgate_cluster_received_total` does not move), and
/// a filter its last session lets go of stops crossing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_is_sent_only_what_its_sessions_subscribe_to() {
    let Some(server) = prerequisites() else {
        return;
    };
    let (_nats, cluster, second) = two_brokers(server).await;
    let first = &cluster.broker;
    let publisher = add_device(&cluster, "publisher", "admin").await;
    let reader = add_device(&cluster, "reader", "admin").await;
    let publisher = connect(first, "publisher", &publisher).await;
    let mut reader = subscribed(&second, "reader", &reader, "watched/#").await;
    carried(&publisher, &mut reader, "watched/ready").await;

    // 100 messages nobody on the second broker reads, then one it does:
    // NATS keeps one publisher's order, so had the 100 crossed, they would
    // have arrived first.
    let sent_on = |topic: &'static str| {
        let client = publisher.client.clone();
        async move {
            client
                .publish(topic, QoS::AtMostOnce, false, "x")
                .await
                .unwrap()
        }
    };
    let before = received(&second).await;
    for _ in 0..100 {
        sent_on("unwatched/x").await;
    }
    sent_on("watched/last").await;
    assert!(next_publish(&mut reader, on("watched/last"), WAIT)
        .await
        .is_some());
    let heard = received(&second).await - before;
    // The last message, and perhaps a late "watched/ready" probe.
    assert!(
        (1.0..=3.0).contains(&heard),
        "the second broker took in {heard}"
    );
    let subscriptions = metric(&second, "fleetgate_cluster_interest_subscriptions").await;
    assert_eq!(subscriptions, Some(2.0), "watched and watched.>");

    // Let go of it: the reader now follows another topic only, and what is
    // published on the first no longer crosses.
    reader.client.unsubscribe("watched/#").await.unwrap();
    reader
        .expect(|p| matches!(p, Packet::UnsubAck(_)).then_some(()))
        .await;
    assert_eq!(
        reader.subscribe("other/#").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    carried(&publisher, &mut reader, "other/ready").await;
    let before = received(&second).await;
    for _ in 0..100 {
        sent_on("watched/x").await;
    }
    sent_on("other/last").await;
    assert!(next_publish(&mut reader, on("other/last"), WAIT)
        .await
        .is_some());
    let heard = received(&second).await - before;
    assert!(
        (1.0..=3.0).contains(&heard),
        "the second broker took in {heard}"
    );
}

/// A broker's metric `name` (unlabelled); `None` if the broker does not
/// answer or has no such metric.
async fn metric(broker: &Process, name: &str) -> Option<f64> {
    let url = format!("http://{}/metrics", broker.field("http"));
    let text = reqwest::get(url).await.ok()?.text().await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse().ok())
}

async fn received(broker: &Process) -> f64 {
    metric(broker, "fleetgate_cluster_received_total")
        .await
        .expect("fleetgate_cluster_received_total")
}

/// An MQTT 5 connection of `id` to `broker` that keeps its session for an
/// hour (clean start off); returns it with CONNACK's session present flag.
async fn connect_persistent(broker: &Process, id: &str, token: &str) -> (V5, bool) {
    let (host, port) = broker.mqtt();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut options = MqttOptions::new(id, host.clone(), port);
        options.set_credentials(id, token);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some(3600));
        match connect_v5_with(options).await {
            Ok((client, connack)) => return (client, connack.session_present),
            Err(code) => {
                assert!(tokio::time::Instant::now() < deadline, "{id}: {code:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Publishes a QoS 1 `payload` on `topic` until the broker acknowledges it
/// as queued for a subscriber (a broker learns another broker's persistent
/// subscriptions through JetStream, a moment after the SUBACK).
async fn publish_queued(admin: &mut V5, topic: &str, payload: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        admin
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_string())
            .await
            .unwrap();
        match admin.puback_reason().await {
            PubAckReason::Success => return,
            PubAckReason::NoMatchingSubscribers => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{topic}: no broker ever knew the subscription"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // The device's acknowledgements of earlier commands have not
            // reached JetStream yet (a loaded machine): as a publisher
            // would, send it again a moment later.
            PubAckReason::QuotaExceeded => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{topic}: the session's queue stayed full"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("{topic}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_follows_its_device_across_brokers_and_a_kill_9() {
    let Some(server) = prerequisites() else {
        return;
    };
    // Queues of three messages, to see a full one refused.
    let (nats, cluster, mut second) =
        two_brokers_with(server, &["--session-queue-messages", "3"]).await;
    let urls = nats.urls();
    let first = &cluster.broker;
    let valve = add_device(&cluster, "valve-p", "ingest").await;
    let admin = add_device(&cluster, "ops", "admin").await;
    let cmd = "devices/valve-p/cmd";
    let config = "devices/valve-p/config";

    // The device subscribes on the first broker with a session that
    // outlives its connection, and goes away cleanly.
    let (mut device, present) = connect_persistent(first, "valve-p", &valve).await;
    assert!(!present);
    assert_eq!(
        device.subscribe(cmd).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    device.client.disconnect().await.unwrap();

    // Commands published through the second broker while it is away are
    // acknowledged as queued, and a retained configuration too.
    let mut ops = connect(&second, "ops", &admin).await;
    publish_queued(&mut ops, cmd, "cmd-1").await;
    ops.client
        .publish(config, QoS::AtLeastOnce, true, "mode=eco")
        .await
        .unwrap();
    assert_eq!(ops.puback_reason().await, PubAckReason::Success);

    // It comes back through the second broker: same session, the command
    // without subscribing again, and the retained message of the cluster.
    let (mut device, present) = connect_persistent(&second, "valve-p", &valve).await;
    assert!(present, "the session was not found on the other broker");
    let got = next_publish(&mut device, on(cmd), WAIT)
        .await
        .expect("the command queued while away");
    assert_eq!(&got.payload[..], b"cmd-1");
    assert_eq!(got.qos, QoS::AtLeastOnce);
    assert_eq!(
        device.subscribe(config).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let got = next_publish(&mut device, on(config), WAIT)
        .await
        .expect("the retained message");
    assert_eq!(&got.payload[..], b"mode=eco");
    assert!(got.retain);
    // Once: JetStream's copy is the only one, so the device has it only
    // once JetStream does, and the wait below covers it. (A second copy
    // the broker also queued came back from JetStream after the device
    // had acknowledged the first; killed before that, the broker left it
    // in the queue, and a command below found the queue full.)
    device
        .assert_silent(Duration::from_millis(500), "the retained message once")
        .await;

    // Once the device has acknowledged it, the command leaves JetStream.
    nats.wait_queued(0).await;

    // The broker it is on is killed with -9. Commands published through
    // the first broker meanwhile are acknowledged, and none is lost: the
    // device resumes its session there and gets each once.
    drop(ops);
    second.kill9();
    let mut ops = connect(first, "ops", &admin).await;
    for i in 2..=4 {
        publish_queued(&mut ops, cmd, &format!("cmd-{i}")).await;
    }
    // The queue is full: the fourth is refused, not acknowledged.
    ops.client
        .publish(cmd, QoS::AtLeastOnce, false, "cmd-5")
        .await
        .unwrap();
    assert_eq!(ops.puback_reason().await, PubAckReason::QuotaExceeded);
    let (mut device, present) = connect_persistent(first, "valve-p", &valve).await;
    assert!(present, "the session did not survive its broker");
    let mut got = Vec::new();
    while got.len() < 3 {
        let publish = next_publish(&mut device, on(cmd), WAIT)
            .await
            .unwrap_or_else(|| panic!("after the kill, only {got:?}"));
        got.push(String::from_utf8_lossy(&publish.payload).to_string());
    }
    assert_eq!(got, ["cmd-2", "cmd-3", "cmd-4"]);
    device
        .assert_silent(Duration::from_millis(500), "nothing delivered twice")
        .await;

    // A broker started after all this knows the retained message.
    let third = cluster.second_broker_with(&["--nats", &urls]);
    let reader = add_device(&cluster, "reader-p", "admin").await;
    let mut reader = connect(&third, "reader-p", &reader).await;
    assert_eq!(
        reader.subscribe(config).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let got = next_publish(&mut reader, on(config), WAIT)
        .await
        .expect("the retained message on a broker started later");
    assert_eq!(&got.payload[..], b"mode=eco");

    // And a command published there reaches the device, connected to the
    // first broker, through its JetStream queue (empty again: acknowledged).
    nats.wait_queued(0).await;
    publish_queued(&mut reader, cmd, "cmd-6").await;
    let got = next_publish(&mut device, on(cmd), WAIT)
        .await
        .expect("a command from the third broker");
    assert_eq!(&got.payload[..], b"cmd-6");

    // Latency through JetStream, one command at a time: PUBACK on the third
    // broker once JetStream holds it, delivery by the first.
    let mut latencies = Vec::new();
    for i in 0..100 {
        let payload = format!("lat-{i}");
        // The queue holds three: the device's acknowledgements of the
        // previous commands reach JetStream first.
        nats.wait_queued(0).await;
        let sent = Instant::now();
        publish_queued(&mut reader, cmd, &payload).await;
        let arrived = next_publish(
            &mut device,
            |p| p.topic == cmd.as_bytes() && p.payload == payload.as_bytes(),
            WAIT,
        )
        .await;
        assert!(arrived.is_some(), "command {i} did not arrive");
        latencies.push(sent.elapsed());
    }
    latencies.sort();
    println!(
        "persistent-session command across brokers through JetStream (R3, 100 QoS 1): p50 {:?}, p99 {:?}, max {:?}",
        percentile(&latencies, 50),
        percentile(&latencies, 99),
        latencies.last().unwrap()
    );
}

/// `fleetgate_mqtt_sessions` on a broker: the sessions it knows of, its
/// own and the cluster's persistent ones.
async fn sessions_known(broker: &Process) -> Option<i64> {
    let known = metric(broker, "fleetgate_mqtt_sessions").await?;
    Some(known as i64)
}

async fn wait_sessions_known(broker: &Process, n: i64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let known = sessions_known(broker).await;
        if known == Some(n) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broker knows {known:?} sessions, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A broker killed while it holds a device's persistent session cannot
/// record the device gone. The other brokers notice its heartbeat stopped,
/// mark the session detached, and it expires on schedule instead of
/// lingering until the device comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_held_by_a_killed_broker_expires_on_schedule() {
    let Some(server) = prerequisites() else {
        return;
    };
    let (_nats, cluster, mut second) = two_brokers(server).await;
    let first = &cluster.broker;
    let token = add_device(&cluster, "valve-k", "ingest").await;
    let (host, port) = second.mqtt();
    let persistent = |expiry: u32| {
        let mut options = MqttOptions::new("valve-k", host.clone(), port);
        options.set_credentials("valve-k", token.clone());
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some(expiry));
        options
    };
    let mut device = loop {
        match connect_v5_with(persistent(2)).await {
            Ok((client, _)) => break client,
            // The second broker learns of the device through the database.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(
        device.subscribe("devices/valve-k/cmd").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    // The first broker learns the session from JetStream.
    wait_sessions_known(first, 1, WAIT).await;

    second.kill9();
    let killed = Instant::now();
    // Heartbeats last 15 s, brokers look every 2 s, the session 2 s more.
    wait_sessions_known(first, 0, Duration::from_secs(45)).await;
    eprintln!(
        "the killed broker's session was released and expired {:?} after the kill",
        killed.elapsed()
    );
    drop(device);

    // The device, back through the first broker, finds no session.
    let (host, port) = first.mqtt();
    let mut options = MqttOptions::new("valve-k", host, port);
    options.set_credentials("valve-k", token.clone());
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(2));
    let (_device, connack) = connect_v5_with(options).await.expect("connect");
    assert!(!connack.session_present, "the session outlived its expiry");
}

/// Whether `publish` is one of the numbered jobs, not a warm-up message.
fn is_job(publish: &Publish) -> bool {
    publish.topic.starts_with(b"jobs/") && publish.topic.ends_with(b"/run")
}

/// What each of `clients` receives of the numbered jobs until `expected`
/// arrived in all, and then during a quiet second (a copy sent twice would
/// arrive within it): the payloads, per client.
async fn jobs_received(clients: &mut [&mut V5], expected: usize) -> Vec<Vec<String>> {
    let mut got: Vec<Vec<String>> = vec![Vec::new(); clients.len()];
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut quiet_until = None;
    loop {
        for (i, client) in clients.iter_mut().enumerate() {
            if let Some(publish) = next_publish(client, is_job, Duration::from_millis(20)).await {
                got[i].push(String::from_utf8_lossy(&publish.payload).to_string());
            }
        }
        let total: usize = got.iter().map(Vec::len).sum();
        match quiet_until {
            None if total >= expected => {
                quiet_until = Some(tokio::time::Instant::now() + Duration::from_secs(1))
            }
            Some(until) if tokio::time::Instant::now() >= until => return got,
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {total} of {expected} jobs arrived: {got:?}"
        );
    }
}

/// MQTT 5 shared subscriptions span brokers: `$share/g/jobs/#` with one
/// member on each broker gets each message once in all, whichever broker
/// it is published through, and both members get some (NATS queue groups
/// pick a broker at random per message, so 40 messages all going one way
/// has a chance of 2 in 2^40). A plain subscription still gets every
/// message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_group_with_members_on_two_brokers_gets_each_message_once() {
    shared_group_across_brokers(false).await;
}

/// The same with a persistent member, whose QoS 1 messages go through its
/// JetStream queue: the publishing broker picks (members take turns) and
/// queues before the PUBACK, so the member is neither skipped nor served
/// twice, and nothing acknowledged rides on core NATS alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_group_with_a_persistent_member_on_another_broker_gets_each_message_once() {
    shared_group_across_brokers(true).await;
}

async fn shared_group_across_brokers(persistent_member: bool) {
    let Some(server) = prerequisites() else {
        return;
    };
    let (_nats, cluster, second) = two_brokers(server).await;
    let first = &cluster.broker;
    let worker_a = add_device(&cluster, "worker-a", "admin").await;
    let worker_b = add_device(&cluster, "worker-b", "admin").await;
    let watcher = add_device(&cluster, "watcher", "admin").await;
    let boss_a = add_device(&cluster, "boss-a", "admin").await;
    let boss_b = add_device(&cluster, "boss-b", "admin").await;

    let group = "$share/g/jobs/#";
    let mut worker_a = subscribed(first, "worker-a", &worker_a, group).await;
    let mut worker_b = if persistent_member {
        let (mut worker_b, _) = connect_persistent(&second, "worker-b", &worker_b).await;
        assert_eq!(
            worker_b.subscribe(group).await,
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        );
        worker_b
    } else {
        subscribed(&second, "worker-b", &worker_b, group).await
    };
    let mut watcher = subscribed(&second, "watcher", &watcher, "jobs/#").await;
    let mut bosses = [
        connect(first, "boss-a", &boss_a).await,
        connect(&second, "boss-b", &boss_b).await,
    ];

    // Until each publisher's NATS server knows both brokers' interest (NATS
    // spreads it shortly after it is made), warm up: until each member got
    // something published through each broker.
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < 4 {
        for (from, boss) in bosses.iter().enumerate() {
            boss.client
                .publish("jobs/warmup", QoS::AtMostOnce, false, from.to_string())
                .await
                .unwrap();
        }
        for (to, worker) in [&mut worker_a, &mut worker_b].into_iter().enumerate() {
            while let Some(p) =
                next_publish(worker, on("jobs/warmup"), Duration::from_millis(100)).await
            {
                seen.insert((to, p.payload.to_vec()));
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "warm-up reached only {seen:?}"
        );
    }

    // One job in four on a topic too long for a NATS subject: it crosses
    // on `fleetgate.long`, where the group still gets it once.
    let long_level = "x".repeat(1100);
    let jobs = 40;
    for i in 0..jobs {
        let boss = &mut bosses[i % 2];
        let kind = match i % 4 {
            3 => long_level.clone(),
            kind => kind.to_string(),
        };
        boss.client
            .publish(
                format!("jobs/{kind}/run"),
                QoS::AtLeastOnce,
                false,
                format!("job-{i}"),
            )
            .await
            .unwrap();
        assert_eq!(boss.puback_reason().await, PubAckReason::Success);
    }
    let got = jobs_received(&mut [&mut worker_a, &mut worker_b], jobs).await;
    let mut all: Vec<&String> = got.iter().flatten().collect();
    all.sort();
    let mut expected: Vec<String> = (0..jobs).map(|i| format!("job-{i}")).collect();
    expected.sort();
    assert_eq!(
        all,
        expected.iter().collect::<Vec<_>>(),
        "each job exactly once across the group (worker-a {:?}, worker-b {:?})",
        got[0],
        got[1]
    );
    assert!(
        !got[0].is_empty() && !got[1].is_empty(),
        "one member got every job: {got:?}"
    );
    println!(
        "shared group across brokers: worker-a {} jobs, worker-b {} jobs",
        got[0].len(),
        got[1].len()
    );
    let watched = jobs_received(&mut [&mut watcher], jobs).await;
    let mut watched = watched[0].clone();
    watched.sort();
    assert_eq!(
        watched, expected,
        "the plain subscription gets every job once"
    );
}

/// A persistent member whose device left is no broker's member of its
/// group: the QoS 0 messages the group gets go to the member connected to
/// another broker, not to the broker the absent one was on, where nobody
/// could take them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_persistent_member_leaves_a_groups_qos0_messages_to_connected_ones() {
    let Some(server) = prerequisites() else {
        return;
    };
    let (_nats, cluster, second) = two_brokers(server).await;
    let first = &cluster.broker;
    let absent = add_device(&cluster, "worker-away", "admin").await;
    let present = add_device(&cluster, "worker-here", "admin").await;
    let boss = add_device(&cluster, "boss", "admin").await;
    let group = "$share/g/jobs/#";
    let (mut away, _) = connect_persistent(first, "worker-away", &absent).await;
    assert_eq!(
        away.subscribe(group).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    away.client.disconnect().await.unwrap();
    let mut here = subscribed(&second, "worker-here", &present, group).await;
    let boss = connect(&second, "boss", &boss).await;

    // NATS learns that the first broker left the group moments after it
    // did: wait until five messages in a row reached the member here.
    let publish = |i: usize| {
        let client = boss.client.clone();
        async move {
            client
                .publish(
                    format!("jobs/{i}/run"),
                    QoS::AtMostOnce,
                    false,
                    i.to_string(),
                )
                .await
                .unwrap()
        }
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let (mut in_a_row, mut i) = (0, 0);
    while in_a_row < 5 {
        publish(i).await;
        let got = next_publish(&mut here, is_job, Duration::from_millis(200)).await;
        in_a_row = if got.is_some() { in_a_row + 1 } else { 0 };
        i += 1;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connected member never got five in a row"
        );
    }
    for i in 100..140 {
        publish(i).await;
    }
    let got = jobs_received(&mut [&mut here], 40).await;
    let expected: Vec<String> = (100..140).map(|i| i.to_string()).collect();
    assert_eq!(got[0], expected, "every QoS 0 job to the connected member");
}
