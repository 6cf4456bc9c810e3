//! Cluster state in one process (`fleetgate up`): `fleetgate state push`
//! changes validation rules from an activation instant on, lookup tables
//! enrich records, conversions apply, and bad documents or callers are
//! refused before anything changes.

use std::time::Duration;

use fleetgate_protocol::Role;
use serde_json::{json, Value};

use crate::harness::{
    connect_v4, connect_v5, fleetgate, fleetgate_async, mosquitto_available, now, publish_acked,
    publish_until, Backend, Server,
};
use crate::on_both_backends;

/// Records whose arrival is this close to the activation time may fall on
/// either side: received-at and the cluster clock are read a moment apart.
const BOUNDARY_MS: i64 = 2;

/// Seq → received_at of stored and of rejected records.
async fn split_by_outcome(server: &Server) -> (Vec<(i64, i64)>, Vec<(i64, i64, String)>) {
    let stored = server
        .rows("SELECT seq, received_at FROM temperature ORDER BY seq")
        .await
        .into_iter()
        .map(|r| (r[0].as_i64().unwrap(), r[1].as_i64().unwrap()))
        .collect();
    let (status, body) = server
        .api(
            "GET",
            "/v1/streams/temperature/rejects?limit=1000",
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let rejected = body["rejects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let payload: Value = serde_json::from_str(r["payload"].as_str().unwrap()).unwrap();
            (
                payload["seq"].as_i64().unwrap(),
                r["received_at"].as_i64().unwrap(),
                r["reasons"].to_string(),
            )
        })
        .collect();
    (stored, rejected)
}

on_both_backends!(a_rules_push_changes_what_is_rejected_from_its_activation_instant);
async fn a_rules_push_changes_what_is_rejected_from_its_activation_instant(backend: Backend) {
    let mut server = Server::with_temperature(backend).await;
    let token = server.add_device("t1", "ingest").await;
    let rules = server.data_dir().join("cooler.toml");
    std::fs::write(&rules, "[fields.celsius]\nmax = 50.0\n").unwrap();

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let rules = rules.display().to_string();
    let push = async {
        // Let the stream run a moment under the declared rules first.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let pushed = fleetgate_async(
            &server,
            &["state", "push", "rules/temperature", &rules, "--at", "+2s"],
        )
        .await;
        // Keep publishing a while past the activation, then stop.
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.send(true).unwrap();
        pushed
    };
    let (client, mut events) = connect_v4(&server, "t1", &token).await.expect("connect");
    let publish = publish_until(client, &mut events, "ingest/temperature/t1", stopped);
    let (sent, (ok, out, err)) = tokio::join!(publish, push);
    assert!(ok, "state push failed: {err}");
    // A push that waits says what it waits for.
    assert!(
        err.contains("to activate at +2s; waiting until every store has switched"),
        "{err}"
    );
    let report: Value = serde_json::from_str(&out).unwrap();
    let activate_at = report["activate_at_ms"].as_i64().unwrap();
    assert_eq!(report["confirmed"][0]["node"], "local", "{report}");
    assert_eq!(report["rebooted"], json!([]));
    let sent = sent as usize;

    let (stored, rejected) = split_by_outcome(&server).await;
    assert_eq!(
        stored.len() + rejected.len(),
        sent,
        "every record stored or rejected, once"
    );
    assert!(
        !stored.is_empty() && !rejected.is_empty(),
        "the push happened mid-stream"
    );
    for (seq, received_at) in &stored {
        assert!(
            *received_at < activate_at + BOUNDARY_MS,
            "seq {seq} at {received_at} stored under the old rules after {activate_at}"
        );
    }
    for (seq, received_at, reasons) in &rejected {
        assert!(
            *received_at >= activate_at - BOUNDARY_MS,
            "seq {seq} at {received_at} rejected before {activate_at}"
        );
        assert!(reasons.contains("above the maximum 50"), "{reasons}");
    }

    // The version survives a restart: loaded before the first record.
    server.interrupt();
    server.restart();
    let (ok, out, _) = fleetgate(&server, &["state", "show"]);
    assert!(ok);
    assert!(out.contains("current version: 1"), "{out}");
    assert!(out.contains("local") && out.contains("published"), "{out}");
    // Activation times read as times, not epoch milliseconds.
    let activates = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_millis(activate_at as u64),
    )
    .to_string();
    assert!(out.contains(&activates), "{activates} in {out}");
    publish_acked(
        &server,
        "t1",
        &token,
        "ingest/temperature/t1",
        &[json!({"seq": 100000, "celsius": 75.0}).to_string()],
    )
    .await;
    assert_eq!(
        server
            .count("SELECT count(*) FROM temperature WHERE seq = 100000")
            .await,
        0
    );
}

const SALES: &str = r#"
[streams.sales]
key = ["device_id", "order_no"]
fields.order_no = { type = "int", required = true }
fields.sku      = { type = "string", required = true }
fields.ip       = { type = "string" }
fields.channel  = { type = "enum", values = ["web", "store", "phone"], code = true }
fields.temp_f   = { type = "float", min = -40.0, max = 140.0, scale = 0.5555555555555556, offset = -17.77777777777778 }
enrich.price  = { lookup = "prices", from = "sku", column = "price", type = "float" }
enrich.title  = { lookup = "prices", from = "sku", column = "title", type = "string" }
enrich.region = { lookup = "regions", from = "ip", column = "region", type = "string", match = "network" }
"#;

on_both_backends!(lookups_enrich_records_and_conversions_store_compactly);
async fn lookups_enrich_records_and_conversions_store_compactly(backend: Backend) {
    let server = Server::start(backend).await;
    let (status, body) = server.apply_streams(SALES).await;
    assert_eq!(status, 200, "{body}");
    let token = server.add_device("pos-1", "ingest").await;
    let order = |n: i64, sku: &str, ip: &str| {
        json!({ "order_no": n, "sku": sku, "ip": ip, "channel": "store", "temp_f": 98.6 })
            .to_string()
    };
    // Before any table is pushed, enrich columns are NULL.
    publish_acked(
        &server,
        "pos-1",
        &token,
        "ingest/sales/pos-1",
        &[order(1, "A1", "10.1.2.3")],
    )
    .await;

    let dir = server.data_dir();
    std::fs::write(
        dir.join("prices.csv"),
        "sku,price,title\nA1,9.5,Widget\nB2,12,\"Big, gadget\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("regions.toml"),
        "key = \"network\"\n[rows.\"10.0.0.0/8\"]\nregion = \"campus\"\n[rows.\"10.1.0.0/16\"]\nregion = \"north\"\n",
    )
    .unwrap();
    for (key, file) in [
        ("lookup/prices", "prices.csv"),
        ("lookup/regions", "regions.toml"),
    ] {
        let path = dir.join(file).display().to_string();
        let (ok, out, err) = fleetgate(&server, &["state", "push", key, &path]);
        assert!(ok, "{key}: {err}");
        assert!(out.contains("\"confirmed\""), "{out}");
    }
    publish_acked(
        &server,
        "pos-1",
        &token,
        "ingest/sales/pos-1",
        &[
            order(2, "A1", "10.1.2.3"),
            order(3, "B2", "10.9.0.1"),
            order(4, "Z9", "192.168.1.1"),
        ],
    )
    .await;
    let rows = server
        .rows("SELECT order_no, price, title, region, channel, round(temp_f) FROM sales ORDER BY order_no")
        .await;
    assert_eq!(
        rows,
        vec![
            vec![
                json!(1),
                Value::Null,
                Value::Null,
                Value::Null,
                json!(1),
                json!(37.0)
            ],
            vec![
                json!(2),
                json!(9.5),
                json!("Widget"),
                json!("north"),
                json!(1),
                json!(37.0)
            ],
            vec![
                json!(3),
                json!(12.0),
                json!("Big, gadget"),
                json!("campus"),
                json!(1),
                json!(37.0)
            ],
            vec![
                json!(4),
                Value::Null,
                Value::Null,
                Value::Null,
                json!(1),
                json!(37.0)
            ],
        ]
    );
    let (ok, out, _) = fleetgate(&server, &["state", "show"]);
    assert!(ok && out.contains("current version: 2"), "{out}");
}

on_both_backends!(bad_state_and_bad_callers_are_refused_before_anything_changes);
async fn bad_state_and_bad_callers_are_refused_before_anything_changes(backend: Backend) {
    let server = Server::start(backend).await;
    let (status, body) = server.apply_streams(SALES).await;
    assert_eq!(status, 200, "{body}");
    let analyst = server.add_device("analyst-1", "extract").await;
    let push = |key: &str, text: &str, format: &str, extra: Value| {
        let mut body = json!({ "text": text, "format": format, "wait": true });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        (format!("/v1/state/{key}"), body)
    };
    let refused = [
        (
            push("rules/sales", "[fields.temp_f\nmax = 1", "toml", json!({})),
            "invalid rules file",
        ),
        (
            push("rules/nope", "[fields.x]\nmax = 1.0", "toml", json!({})),
            "no stream",
        ),
        (
            push("rules/sales", "[fields.sku]\nmax = 1.0", "toml", json!({})),
            "only to int and float",
        ),
        (
            push(
                "rules/sales",
                "[fields.channel]\nvalues = [\"fax\"]",
                "toml",
                json!({}),
            ),
            "can only narrow",
        ),
        (
            push("rules/sales", "max = 1.0", "csv", json!({})),
            "written in TOML",
        ),
        (
            push("lookup/prices", "sku,cost\nA1,1\n", "csv", json!({})),
            "which it lacks",
        ),
        (
            push(
                "lookup/regions",
                "net,region\nnot-a-net,x\n",
                "csv",
                json!({}),
            ),
            "not an IP network",
        ),
        (
            push(
                "lookup/prices",
                "sku,price,title\nA1,1,x\nA1,2,y\n",
                "csv",
                json!({}),
            ),
            "appears twice",
        ),
        (
            push("views/x", "a", "toml", json!({})),
            "rules/<stream> or lookup/<table>",
        ),
        (
            push(
                "rules/sales",
                "[fields.temp_f]\nmax = 100.0",
                "toml",
                json!({ "at_ms": 1000 }),
            ),
            "at least",
        ),
        (
            push(
                "rules/sales",
                "[fields.temp_f]\nmax = 100.0",
                "toml",
                json!({ "in_ms": u64::MAX }),
            ),
            "more than 100 years ahead",
        ),
    ];
    for ((path, body), expected) in refused {
        let (status, reply) = server
            .api("POST", &path, Some(&server.admin), Some(body))
            .await;
        assert_eq!(status, 400, "{path}: {reply}");
        assert!(
            reply["error"].as_str().unwrap().contains(expected),
            "{path}: {reply}"
        );
    }
    let good = json!({ "text": "[fields.temp_f]\nmax = 100.0", "format": "toml" });
    let expired = server.mint("fleetgate-admin", Role::Admin, now() - 7200, now() - 3600);
    let forged = crate::harness::foreign_token("fleetgate-admin");
    for (token, expected) in [
        (analyst.as_str(), 403),
        (expired.as_str(), 401),
        (forged.as_str(), 401),
    ] {
        let (status, reply) = server
            .api(
                "POST",
                "/v1/state/rules/sales",
                Some(token),
                Some(good.clone()),
            )
            .await;
        assert_eq!(status, expected, "{reply}");
        let (status, _) = server.api("GET", "/v1/state", Some(token), None).await;
        assert_eq!(status, expected);
    }
    let (status, state) = server
        .api("GET", "/v1/state", Some(&server.admin), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(state["current"], 0, "{state}");
    assert_eq!(state["versions"], json!([]), "nothing was staged: {state}");
    // The audit log names only what was done.
    let (_, audit) = server
        .api("GET", "/v1/audit", Some(&server.admin), None)
        .await;
    assert!(!audit.to_string().contains("state.push"), "{audit}");
}

/// What a `$fleet/state/<key>` message says.
fn announcement(payload: &[u8]) -> Value {
    serde_json::from_slice(payload).expect("state announcements are JSON")
}

on_both_backends!(state_versions_are_announced_on_retained_platform_topics);
async fn state_versions_are_announced_on_retained_platform_topics(backend: Backend) {
    use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
    use rumqttc::v5::mqttbytes::QoS;

    let mut server = Server::with_temperature(backend).await;
    let analyst = server.add_device("a1", "extract").await;
    let sensor = server.add_device("t1", "ingest").await;

    let mut watcher = connect_v5(&server, "a1", &analyst).await.unwrap();
    assert!(matches!(
        watcher.subscribe("$fleet/state/#").await,
        SubscribeReasonCode::Success(_)
    ));
    let mut device = connect_v5(&server, "t1", &sensor).await.unwrap();
    assert_eq!(
        device.subscribe("$fleet/state/#").await,
        SubscribeReasonCode::NotAuthorized,
        "state topics are not for ingest-only devices"
    );

    let rules = server.data_dir().join("cooler.toml");
    std::fs::write(&rules, "[fields.celsius]\nmax = 50.0\n").unwrap();
    let rules = rules.display().to_string();
    let (ok, out, err) = fleetgate_async(
        &server,
        &[
            "state",
            "push",
            "rules/temperature",
            &rules,
            "--at",
            "+2s",
            "--no-wait",
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    let pushed: Value = serde_json::from_str(&out).unwrap();

    // Announced as soon as it is published, before it takes effect.
    let (topic, live) = watcher
        .expect(|p| match p {
            Packet::Publish(p) => Some((p.topic.clone(), p.clone())),
            _ => None,
        })
        .await;
    assert_eq!(topic, "$fleet/state/rules/temperature");
    assert!(
        !live.retain,
        "a message to an existing subscriber is not flagged retained"
    );
    let said = announcement(&live.payload);
    assert_eq!(said["version"], pushed["version"], "{said} vs {pushed}");
    assert_eq!(said["key"], "rules/temperature");
    assert_eq!(said["activate_at_ms"], pushed["activate_at_ms"]);
    assert_eq!(
        said["value"]["rules"]["fields"]["celsius"]["max"], 50.0,
        "{said}"
    );

    // Nobody publishes under $fleet/, admins included.
    let mut admin = connect_v5(&server, "admin", &server.admin).await.unwrap();
    admin
        .client
        .publish(
            "$fleet/state/rules/temperature",
            QoS::AtLeastOnce,
            true,
            "{\"version\": 999}",
        )
        .await
        .unwrap();
    let refused = admin.puback_reason().await;
    assert_eq!(
        format!("{refused:?}"),
        "NotAuthorized",
        "a publish under $fleet/ is refused"
    );
    watcher
        .assert_silent(Duration::from_millis(300), "after a refused publish")
        .await;

    // A later subscriber, after a restart, gets the retained message, from a
    // real client too.
    drop((watcher, device, admin));
    assert!(server.interrupt().success());
    server.restart();
    let check_retained = |said: Value| {
        assert_eq!(said["version"], pushed["version"]);
        assert_eq!(said["value"]["rules"]["fields"]["celsius"]["max"], 50.0);
    };
    let mut late = connect_v5(&server, "a1", &analyst).await.unwrap();
    late.client
        .subscribe("$fleet/state/+/temperature", QoS::AtMostOnce)
        .await
        .unwrap();
    let retained = late
        .expect(|p| match p {
            Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await;
    assert!(retained.retain, "sent on subscribe, so flagged retained");
    check_retained(announcement(&retained.payload));
    drop(late);
    if mosquitto_available() {
        let port = server.mqtt.port().to_string();
        let analyst = analyst.clone();
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new("mosquitto_sub")
                .args(["-p", &port, "-i", "a1", "-u", "a1", "-P", &analyst])
                .args([
                    "-t",
                    "$fleet/state/#",
                    "-C",
                    "1",
                    "-W",
                    "10",
                    "-F",
                    "%r %t %p",
                ])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let line = String::from_utf8_lossy(&output.stdout).to_string();
        let (flags, payload) = line
            .split_once(" $fleet/state/rules/temperature ")
            .unwrap_or_else(|| {
                let err = String::from_utf8_lossy(&output.stderr);
                panic!("mosquitto_sub printed {line:?}, {err:?}")
            });
        assert_eq!(flags, "1", "retained flag as mosquitto_sub sees it");
        check_retained(announcement(payload.trim().as_bytes()));
    } else {
        eprintln!("mosquitto_sub is not installed; only rumqttc read the retained topic");
    }
}
