//! The time-fenced state rollout across a cluster: `fleetgate broker` and
//! three `fleetgate store` processes on one PostgreSQL database, devices
//! publishing throughout. A rules push lowers `celsius`'s maximum below
//! what the devices send, so the database itself shows under which
//! version each record was processed: stored means the old rules, rejected
//! the new. Each failure case ends with every serving node on the newest
//! version and every record on the right side of the activation instant.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cluster::{cluster, connected, start_broker_with, Cluster, Process};
use crate::harness::{publish_until, TEMPERATURE, WAIT};

/// Received-at and the cluster clock are read a moment apart.
const BOUNDARY_MS: i64 = 3;
const DEVICES: usize = 4;

impl Cluster {
    async fn state(&self) -> Value {
        self.api("GET", "/v1/state", None).await
    }

    /// Waits until every listed node is up and holds `version` as active.
    async fn wait_active(&self, ids: &[&str], version: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let state = self.state().await;
            let stores = state["stores"].as_array().unwrap();
            let ready = ids.iter().all(|id| {
                stores
                    .iter()
                    .any(|s| s["node"] == *id && s["up"] == true && s["active"] == version)
            });
            if ready {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not all of {ids:?} on {version}: {state}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn push(&self, text: &str, in_ms: u64) -> Value {
        let body = json!({ "text": text, "format": "toml", "in_ms": in_ms });
        self.api("POST", "/v1/state/rules/temperature", Some(body))
            .await
    }

    /// Every record of every device is stored (old rules) or rejected (new
    /// rules) exactly once, on the side of `activate_at` its arrival says.
    async fn check_fence(&self, sent: &HashMap<String, u64>, activate_at: i64) -> (usize, usize) {
        let stored = self
            .api(
                "POST",
                "/v1/query",
                Some(json!({ "sql": "SELECT device_id, seq, received_at FROM temperature" })),
            )
            .await;
        let rejects = self
            .api("GET", "/v1/streams/temperature/rejects?limit=10000", None)
            .await;
        let mut seen: HashMap<(String, i64), &str> = HashMap::new();
        let stored_rows = stored["rows"].as_array().unwrap();
        for row in stored_rows {
            let key = (
                row[0].as_str().unwrap().to_string(),
                row[1].as_i64().unwrap(),
            );
            let at = row[2].as_i64().unwrap();
            assert!(
                at < activate_at + BOUNDARY_MS,
                "{key:?} received at {at} stored under the old rules after {activate_at}"
            );
            assert!(
                seen.insert(key.clone(), "stored").is_none(),
                "{key:?} stored twice"
            );
        }
        let rejected = rejects["rejects"].as_array().unwrap();
        for reject in rejected {
            let payload: Value = serde_json::from_str(reject["payload"].as_str().unwrap()).unwrap();
            let key = (
                reject["device_id"].as_str().unwrap().to_string(),
                payload["seq"].as_i64().unwrap(),
            );
            let at = reject["received_at"].as_i64().unwrap();
            assert!(
                at >= activate_at - BOUNDARY_MS,
                "{key:?} received at {at} rejected before {activate_at}"
            );
            assert!(
                reject["reasons"]
                    .to_string()
                    .contains("above the maximum 50"),
                "{reject}"
            );
            assert!(
                seen.insert(key.clone(), "rejected").is_none(),
                "{key:?} processed twice"
            );
        }
        for (device, count) in sent {
            for seq in 1..=*count as i64 {
                assert!(
                    seen.contains_key(&(device.clone(), seq)),
                    "{device} seq {seq} acknowledged but lost"
                );
            }
        }
        (stored_rows.len(), rejected.len())
    }
}

/// Devices publishing `celsius = 75` through the broker until `stop`.
async fn publishers(
    cluster: &Cluster,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<(String, u64)>> {
    let mut tasks = Vec::new();
    for i in 0..DEVICES {
        let id = format!("thermo-{i}");
        let added = cluster
            .api(
                "POST",
                "/v1/devices",
                Some(json!({ "id": id, "role": "ingest" })),
            )
            .await;
        let (client, mut events) =
            connected(&cluster.broker, &id, added["token"].as_str().unwrap()).await;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let topic = format!("ingest/temperature/{id}");
            let sent = publish_until(client, &mut events, &topic, stop).await;
            (id, sent)
        }));
    }
    tasks
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<(String, u64)>>) -> HashMap<String, u64> {
    let mut sent = HashMap::new();
    for task in tasks {
        let (id, count) = task.await.unwrap();
        sent.insert(id, count);
    }
    sent
}

async fn three_nodes(extra: [&[&str]; 3]) -> Option<(Cluster, Vec<Process>)> {
    let cluster = cluster().await?;
    cluster.apply(TEMPERATURE).await;
    let nodes = ["n1", "n2", "n3"]
        .iter()
        .zip(extra)
        .map(|(id, extra)| cluster.store_node(id, extra))
        .collect();
    cluster.wait_active(&["n1", "n2", "n3"], 0).await;
    Some((cluster, nodes))
}

fn skipped() {
    eprintln!("skipped: DATABASE_URL is not set, so this PostgreSQL cluster test did not run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_switches_three_nodes_together_and_fences_every_record() {
    let Some((cluster, _nodes)) = three_nodes([&[], &[], &[]]).await else {
        return skipped();
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks = publishers(&cluster, &stopped).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = cluster.push("[fields.celsius]\nmax = 50.0\n", 500).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    let sent = collect(tasks).await;

    let confirmed: Vec<&str> = report["confirmed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["node"].as_str().unwrap())
        .collect();
    assert_eq!(confirmed, ["n1", "n2", "n3"], "{report}");
    assert_eq!(report["rebooted"], json!([]), "{report}");
    let spread = report["spread_ms"].as_i64().unwrap();
    assert!(
        spread <= 50,
        "activation instants {spread} ms apart: {report}"
    );
    let (stored, rejected) = cluster
        .check_fence(&sent, report["activate_at_ms"].as_i64().unwrap())
        .await;
    assert!(
        stored > 0 && rejected > 0,
        "the push happened mid-stream: {stored} stored, {rejected} rejected"
    );
    cluster.wait_active(&["n1", "n2", "n3"], 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_confirmation_reboots_the_node_and_a_skewed_clock_still_switches_on_time() {
    let skewed: &[&str] = &["--clock-skew-ms", "5000"];
    let silent: &[&str] = &["--drop-first-confirmation"];
    let Some((cluster, _nodes)) = three_nodes([&[], skewed, silent]).await else {
        return skipped();
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks = publishers(&cluster, &stopped).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = cluster.push("[fields.celsius]\nmax = 50.0\n", 500).await;
    let activate_at = report["activate_at_ms"].as_i64().unwrap();
    // n3 activated but said nothing: after the grace period it is rebooted,
    // reloads the state and rejoins.
    assert_eq!(report["rebooted"], json!(["n3"]), "{report}");
    let confirmed: Vec<&Value> = report["confirmed"].as_array().unwrap().iter().collect();
    assert_eq!(confirmed.len(), 2, "{report}");
    // n2's clock is 5 s ahead; it corrects by the database's clock. That
    // correction is measured over a round trip to the database, so it may
    // be off by up to half of one, either way: a few ms early is on time.
    let n2 = confirmed
        .iter()
        .find(|a| a["node"] == "n2")
        .expect("n2 confirmed");
    let off = n2["activated_at_ms"].as_i64().unwrap() - activate_at;
    assert!(
        (-10..=50).contains(&off),
        "the skewed node switched {off} ms from the activation time"
    );
    cluster.wait_active(&["n1", "n2", "n3"], 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    let sent = collect(tasks).await;
    cluster.check_fence(&sent, activate_at).await;
    // Back in rotation: the rebooted node takes traffic again.
    let nodes = cluster.api("GET", "/v1/nodes", None).await;
    let n3 = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "n3")
        .unwrap();
    assert_eq!(n3["state"]["active"], 1, "{nodes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_update_rejoins_on_the_new_version() {
    let Some((cluster, mut nodes)) = three_nodes([&[], &[], &[]]).await else {
        return skipped();
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks = publishers(&cluster, &stopped).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let push = cluster.push("[fields.celsius]\nmax = 50.0\n", 800);
    let kill = async {
        // Staged and published by now, not yet active: kill -9.
        tokio::time::sleep(Duration::from_millis(500)).await;
        nodes[0].kill9();
    };
    let (report, ()) = tokio::join!(push, kill);
    let activate_at = report["activate_at_ms"].as_i64().unwrap();
    cluster.wait_active(&["n2", "n3"], 1).await;
    // It comes back and loads the newest state before it takes traffic.
    nodes[0] = cluster.store_node("n1", &[]);
    cluster.wait_active(&["n1", "n2", "n3"], 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    let sent = collect(tasks).await;
    let (_, rejected) = cluster.check_fence(&sent, activate_at).await;
    assert!(rejected > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_crash_between_steps_leaves_every_node_on_one_version() {
    let Some((mut cluster, _nodes)) = three_nodes([&[], &[], &[]]).await else {
        return skipped();
    };
    let data = cluster.dir.path().join("broker");
    let restart = |cluster: &mut Cluster, crash: Option<&str>| {
        cluster.broker.kill9();
        let crash: Vec<&str> = crash
            .map(|point| vec!["--test-crash", point])
            .unwrap_or_default();
        cluster.broker = start_broker_with(&data, &cluster.url, &crash);
    };
    let push_dies = |cluster: &Cluster| {
        let url = format!(
            "http://{}/v1/state/rules/temperature",
            cluster.broker.field("http")
        );
        let request = cluster.http.post(url).bearer_auth(&cluster.admin).json(
            &json!({ "text": "[fields.celsius]\nmax = 50.0\n", "format": "toml", "in_ms": 2000 }),
        );
        async move {
            assert!(
                request.send().await.is_err(),
                "the coordinator should have died"
            )
        }
    };

    // Dies after staging: version 1 is persisted, never published.
    restart(&mut cluster, Some("after-stage"));
    push_dies(&cluster).await;
    restart(&mut cluster, None);
    let state = cluster.state().await;
    assert_eq!(state["current"], 0, "{state}");
    assert_eq!(state["versions"][0]["status"], "staged", "{state}");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    cluster.wait_active(&["n1", "n2", "n3"], 0).await;

    // Dies right after publishing: nobody was told, yet every node finds
    // version 2 and switches; the new broker routes under it.
    restart(&mut cluster, Some("after-publish"));
    push_dies(&cluster).await;
    restart(&mut cluster, None);
    cluster.wait_active(&["n1", "n2", "n3"], 2).await;
    let state = cluster.state().await;
    assert_eq!(state["current"], 2, "{state}");
    let statuses: Vec<&str> = state["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["published", "abandoned"], "{state}");
    let activate_at = state["versions"][0]["activate_at_ms"].as_i64().unwrap();

    // The new broker announces what the dead one published, retained.
    let (watcher, mut events) = connected(&cluster.broker, "admin", &cluster.admin).await;
    watcher
        .subscribe("$fleet/state/#", rumqttc::QoS::AtMostOnce)
        .await
        .unwrap();
    let retained = loop {
        match tokio::time::timeout(WAIT, events.poll()).await.unwrap() {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => break p,
            Ok(_) => {}
            Err(e) => panic!("{e:?}"),
        }
    };
    assert_eq!(retained.topic, "$fleet/state/rules/temperature");
    assert!(retained.retain);
    let said: Value = serde_json::from_slice(&retained.payload).unwrap();
    assert_eq!(said["version"], 2, "{said}");
    assert_eq!(said["activate_at_ms"], activate_at, "{said}");

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks = publishers(&cluster, &stopped).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    let sent = collect(tasks).await;
    let (stored, rejected) = cluster.check_fence(&sent, activate_at).await;
    assert_eq!(
        stored, 0,
        "everything after the activation is judged by version 2"
    );
    assert!(rejected > 0);
}
