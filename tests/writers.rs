//! A stream names the device types that may write it (`writers`): others
//! are refused on every way in (MQTT 5 PUBACK 0x87, 3.1.1 disconnect, HTTP
//! 403, a UDP error), nothing of theirs is stored, not even as rejects, and
//! their SDK has no encoder for it. And ingest answers and `live/` report
//! exactly what was stored: a re-sent key is a duplicate, not a second row
//! or a second live copy.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use serde_json::{json, Value};

use crate::harness::{connect_v4, connect_v5, fleetgate, Backend, Server, V5};
use crate::ingest::publish;
use crate::on_both_backends;

const STREAMS: &str = r#"
[streams.orders]
key = ["order_id"]
writers = ["pos"]
fields.order_id = { type = "string", required = true }
fields.amount   = { type = "float", required = true }

[streams.temperature]
key = ["device_id", "seq"]
fields.seq     = { type = "int", required = true }
fields.celsius = { type = "float", required = true }
"#;

async fn add_typed(server: &Server, id: &str, role: &str, device_type: Option<&str>) -> String {
    let mut body = json!({ "id": id, "role": role });
    if let Some(t) = device_type {
        body["type"] = json!(t);
    }
    let (status, body) = server
        .api("POST", "/v1/devices", Some(&server.admin), Some(body))
        .await;
    assert_eq!(status, 201, "add device {id}: {body}");
    body["token"].as_str().unwrap().to_string()
}

/// Every live copy that arrives within `quiet`, as (topic, records).
async fn live_copies(client: &mut V5, quiet: Duration) -> Vec<(String, Value)> {
    let mut copies = Vec::new();
    let deadline = tokio::time::Instant::now() + quiet;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, client.events.recv()).await {
        if let Ok(Packet::Publish(p)) = event {
            let topic = String::from_utf8_lossy(&p.topic).into_owned();
            copies.push((topic, serde_json::from_slice(&p.payload).unwrap()));
        }
    }
    copies
}

on_both_backends!(a_stream_takes_ingest_only_from_its_writers);
async fn a_stream_takes_ingest_only_from_its_writers(backend: Backend) {
    let server = Server::start_with(backend, &["--udp", "127.0.0.1:0"]).await;
    let (status, body) = server.apply_streams(STREAMS).await;
    assert_eq!(status, 200, "{body}");
    let thermo = add_typed(&server, "thermo-1", "ingest", Some("thermostat")).await;
    let pos = add_typed(&server, "pos-1", "ingest", Some("pos")).await;
    let untyped = add_typed(&server, "web-1", "ingest", None).await;
    let analyst = add_typed(&server, "analyst-1", "extract", None).await;
    let mut live = connect_v5(&server, "analyst-1", &analyst).await.unwrap();
    live.subscribe("live/orders/#").await;

    // MQTT 5: the thermostat's order is refused as not authorized (0x87),
    // with the reason, and the connection stays up.
    let mut thermostat = connect_v5(&server, "thermo-1", &thermo).await.unwrap();
    let order = r#"{"order_id": "x-1", "amount": 99999}"#;
    let (reason, text) = publish(&mut thermostat, "ingest/orders/thermo-1", order).await;
    assert_eq!(reason, PubAckReason::NotAuthorized, "{text:?}");
    let text = text.unwrap_or_default();
    assert!(
        text.contains("\"thermostat\" may not write stream \"orders\""),
        "{text}"
    );
    // A stream without writers takes any ingest device's records.
    let (reason, text) = publish(
        &mut thermostat,
        "ingest/temperature/thermo-1",
        r#"{"seq": 1, "celsius": 20}"#,
    )
    .await;
    assert_eq!(reason, PubAckReason::Success, "{text:?}");
    // A writer's order is stored.
    let mut till = connect_v5(&server, "pos-1", &pos).await.unwrap();
    let (reason, text) = publish(
        &mut till,
        "ingest/orders/pos-1",
        r#"{"order_id": "p-1", "amount": 12.5}"#,
    )
    .await;
    assert_eq!(reason, PubAckReason::Success, "{text:?}");

    // HTTP: 403 for the thermostat and for a device without a type; the
    // writer and an admin (who may write any stream) get 200.
    let (status, body) = server
        .post_text(
            "/v1/ingest/orders",
            &thermo,
            r#"{"order_id": "x-2", "amount": 1}"#,
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("may not write"),
        "{body}"
    );
    let (status, body) = server
        .post_text(
            "/v1/ingest/orders",
            &untyped,
            r#"{"order_id": "x-3", "amount": 1}"#,
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = server
        .post_text(
            "/v1/ingest/orders",
            &pos,
            r#"{"order_id": "p-2", "amount": 2}"#,
        )
        .await;
    assert_eq!((status, &body["stored"]), (200, &json!(1)), "{body}");
    let (status, body) = server
        .post_text(
            "/v1/ingest/orders?device=pos-1",
            &server.admin,
            r#"{"order_id": "p-3", "amount": 3}"#,
        )
        .await;
    assert_eq!((status, &body["stored"]), (200, &json!(1)), "{body}");

    // UDP: an error, nothing stored.
    let udp = server.extra_addr("udp").expect("udp address");
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let datagram = json!({ "token": thermo, "stream": "orders",
                           "record": { "order_id": "x-4", "amount": 1 } });
    socket
        .send_to(datagram.to_string().as_bytes(), udp)
        .await
        .unwrap();
    let mut buffer = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), socket.recv_from(&mut buffer))
        .await
        .expect("an answer")
        .unwrap();
    let answer: Value = serde_json::from_slice(&buffer[..n]).unwrap();
    assert!(
        answer["error"].as_str().unwrap().contains("may not write"),
        "{answer}"
    );

    // MQTT 3.1.1 has no refusal code: the connection closes, unacknowledged.
    let (client, mut eventloop) = connect_v4(&server, "thermo-1", &thermo).await.unwrap();
    client
        .publish(
            "ingest/orders/thermo-1",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"order_id": "x-5", "amount": 1}"#,
        )
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(crate::harness::WAIT, eventloop.poll())
            .await
            .expect("disconnect in time")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                panic!("a refused publish was acknowledged")
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }

    // Only the writer's and the admin's orders are stored; a refusal is not
    // data, so the stream's rejects hold none of the intruder's payloads,
    // and no live copy was published for them.
    assert_eq!(
        server
            .rows("SELECT order_id FROM orders ORDER BY order_id")
            .await,
        vec![vec![json!("p-1")], vec![json!("p-2")], vec![json!("p-3")]]
    );
    let (_, rejects) = server
        .api(
            "GET",
            "/v1/streams/orders/rejects",
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(rejects["rejects"], json!([]), "{rejects}");
    let copies = live_copies(&mut live, Duration::from_millis(1500)).await;
    let ids: Vec<&Value> = copies
        .iter()
        .map(|(_, records)| &records[0]["order_id"])
        .collect();
    assert_eq!(
        ids,
        [&json!("p-1"), &json!("p-2"), &json!("p-3")],
        "{copies:?}"
    );
    // Each refusal counts against the device, like a denied publish.
    let (_, refusals) = server
        .api("GET", "/v1/refusals", Some(&server.admin), None)
        .await;
    let thermo_refusals = refusals["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == "thermo-1")
        .unwrap_or_else(|| panic!("no refusals for thermo-1: {refusals}"));
    assert_eq!(thermo_refusals["total"], 4, "{refusals}");
}

/// An SDK holds encoders only for the streams its device's type may write,
/// both when fetched by handshake and when built offline for flashing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_carries_only_the_streams_its_type_may_write() {
    let server = Server::start(Backend::Sqlite).await;
    let (status, body) = server.apply_streams(STREAMS).await;
    assert_eq!(status, 200, "{body}");
    let dir = tempfile::tempdir().unwrap();
    let platform = server.data_dir().join("platform.pub");
    let platform = platform.to_str().unwrap();
    let mut streams_of = Vec::new();
    for (id, device_type) in [("thermo-1", "thermostat"), ("pos-1", "pos")] {
        let keys = dir.path().join(id);
        let keys = keys.to_str().unwrap();
        let (ok, _, err) = fleetgate(&server, &["device", "keygen", "--out", keys]);
        assert!(ok, "{err}");
        let public = format!("{keys}/device.pub");
        let (ok, _, err) = fleetgate(
            &server,
            &[
                "device",
                "add",
                id,
                "--role",
                "ingest",
                "--type",
                device_type,
                "--public-key",
                &public,
            ],
        );
        assert!(ok, "{err}");
        // By handshake.
        let fetched = dir.path().join(format!("{id}.sdk.json"));
        let fetched = fetched.to_str().unwrap();
        let (ok, out, err) = fleetgate(
            &server,
            &[
                "sdk",
                "fetch",
                "--id",
                id,
                "--type",
                device_type,
                "--key-dir",
                keys,
                "--platform-key",
                platform,
                "--target",
                "wasm",
                "--out",
                fetched,
            ],
        );
        assert!(ok, "{err}");
        let summary: Value = serde_json::from_str(&out).unwrap();
        // Offline, for flashing.
        let built = dir.path().join(format!("{id}.built.json"));
        let built = built.to_str().unwrap();
        let (ok, _, err) = fleetgate(
            &server,
            &[
                "sdk", "build", "--device", id, "--target", "wasm", "--out", built,
            ],
        );
        assert!(ok, "{err}");
        for file in [fetched, built] {
            let (ok, out, err) = fleetgate(
                &server,
                &["sdk", "inspect", file, "--platform-key", platform],
            );
            assert!(ok, "{err}");
            let report: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(report["streams"], summary["streams"], "{file}");
        }
        streams_of.push(summary["streams"].clone());
    }
    assert_eq!(
        streams_of[0],
        json!(["temperature"]),
        "the thermostat's SDK"
    );
    assert_eq!(
        streams_of[1],
        json!(["orders", "temperature"]),
        "the till's SDK"
    );
}

on_both_backends!(a_resent_record_is_a_duplicate_not_a_second_live_copy);
async fn a_resent_record_is_a_duplicate_not_a_second_live_copy(backend: Backend) {
    let server = Server::start_with(backend, &["--udp", "127.0.0.1:0"]).await;
    let (status, body) = server.apply_streams(STREAMS).await;
    assert_eq!(status, 200, "{body}");
    let sensor = add_typed(&server, "sensor-1", "ingest", Some("thermostat")).await;
    let analyst = add_typed(&server, "analyst-1", "extract", None).await;
    let mut live = connect_v5(&server, "analyst-1", &analyst).await.unwrap();
    live.subscribe("live/temperature/#").await;
    let post = |body: &'static str| server.post_text("/v1/ingest/temperature", &sensor, body);
    let answer = |body: &Value| {
        (
            body["stored"].clone(),
            body["duplicates"].clone(),
            body["rejected"].clone(),
        )
    };

    // HTTP: stored, then re-sent with other content: a duplicate.
    let (status, body) = post(r#"{"seq": 1, "celsius": 20.5}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(answer(&body), (json!(1), json!(0), json!(0)), "{body}");
    let (status, body) = post(r#"{"seq": 1, "celsius": 99.0}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(answer(&body), (json!(0), json!(1), json!(0)), "{body}");
    // One message holding a new key twice and an old one: one stored.
    let (status, body) = post(
        r#"[{"seq": 2, "celsius": 1.0}, {"seq": 2, "celsius": 2.0}, {"seq": 1, "celsius": 3.0}]"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(answer(&body), (json!(1), json!(2), json!(0)), "{body}");

    // MQTT: the re-send is acknowledged (it is stored, once).
    let mut device = connect_v5(&server, "sensor-1", &sensor).await.unwrap();
    for _ in 0..2 {
        let (reason, text) = publish(
            &mut device,
            "ingest/temperature/sensor-1",
            r#"{"seq": 3, "celsius": 3.5}"#,
        )
        .await;
        assert_eq!(reason, PubAckReason::Success, "{text:?}");
    }

    // UDP: the same counts.
    let udp = server.extra_addr("udp").expect("udp address");
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut answers = Vec::new();
    for _ in 0..2 {
        let datagram = json!({ "token": sensor, "stream": "temperature",
                               "record": { "seq": 4, "celsius": 4.5 } });
        socket
            .send_to(datagram.to_string().as_bytes(), udp)
            .await
            .unwrap();
        let mut buffer = vec![0u8; 4096];
        let (n, _) = tokio::time::timeout(Duration::from_secs(10), socket.recv_from(&mut buffer))
            .await
            .expect("an answer")
            .unwrap();
        answers.push(answer(&serde_json::from_slice(&buffer[..n]).unwrap()));
    }
    assert_eq!(
        answers,
        [
            (json!(1), json!(0), json!(0)),
            (json!(0), json!(1), json!(0))
        ]
    );

    // The table holds each key once, with its first content, and `live/`
    // carried exactly those rows: no second copy, no re-sent content.
    assert_eq!(
        server
            .rows("SELECT seq, celsius FROM temperature ORDER BY seq")
            .await,
        vec![
            vec![json!(1), json!(20.5)],
            vec![json!(2), json!(1.0)],
            vec![json!(3), json!(3.5)],
            vec![json!(4), json!(4.5)],
        ]
    );
    let copies = live_copies(&mut live, Duration::from_millis(1500)).await;
    let carried: Vec<(i64, f64)> = copies
        .iter()
        .flat_map(|(_, records)| records.as_array().unwrap().clone())
        .map(|r| (r["seq"].as_i64().unwrap(), r["celsius"].as_f64().unwrap()))
        .collect();
    assert_eq!(
        carried,
        [(1, 20.5), (2, 1.0), (3, 3.5), (4, 4.5)],
        "{copies:?}"
    );
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("fleetgate_records_duplicate_total 5"),
        "{metrics}"
    );
}

on_both_backends!(a_late_record_of_a_superseded_bucket_is_counted_where_it_is_stored);
async fn a_late_record_of_a_superseded_bucket_is_counted_where_it_is_stored(backend: Backend) {
    const DAY: i64 = 1_795_219_200_000; // 2026-11-21T00:00:00Z
    let server = Server::start(backend).await;
    let (status, body) = server
        .apply_streams(
            r#"
[streams.purchases]
key = ["event_id"]
bucket = { time = "ordered_at", width = "1h" }
fields.event_id = { type = "string", required = true }
fields.amount = { type = "float", required = true }
fields.ordered_at = { type = "timestamp", required = true }
"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let shop = add_typed(&server, "shop-1", "ingest", None).await;
    let analyst = add_typed(&server, "analyst-1", "extract", None).await;
    let mut live = connect_v5(&server, "analyst-1", &analyst).await.unwrap();
    live.subscribe("live/purchases/#").await;
    let post = |event: &str, amount: f64| {
        let body = json!({ "event_id": event, "amount": amount, "ordered_at": DAY + 3_600_000 });
        let shop = shop.clone();
        let server = &server;
        async move {
            let (status, body) = server
                .post_text("/v1/ingest/purchases", &shop, &body.to_string())
                .await;
            assert_eq!(status, 200, "{body}");
            (body["stored"].clone(), body["duplicates"].clone())
        }
    };
    assert_eq!(post("e1", 1.0).await, (json!(1), json!(0)));
    let (status, body) = server
        .api(
            "POST",
            "/v1/streams/purchases/buckets/swap?from=2026-11-21&to=2026-11-22",
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!((status, &body["rows"]), (200, &json!(1)), "{body}");
    // A late record for the superseded day is stored with the superseded
    // rows; sent again, it is a duplicate there; the swapped one too.
    assert_eq!(post("e2", 2.0).await, (json!(1), json!(0)));
    assert_eq!(post("e2", 9.0).await, (json!(0), json!(1)));
    assert_eq!(post("e1", 9.0).await, (json!(0), json!(1)));
    assert_eq!(server.count("SELECT count(*) FROM purchases").await, 0);
    assert_eq!(
        server
            .rows("SELECT event_id, amount FROM fgs_purchases ORDER BY event_id")
            .await,
        vec![vec![json!("e1"), json!(1.0)], vec![json!("e2"), json!(2.0)]]
    );
    let copies = live_copies(&mut live, Duration::from_millis(1500)).await;
    let carried: Vec<&Value> = copies.iter().map(|(_, r)| &r[0]["event_id"]).collect();
    assert_eq!(carried, [&json!("e1"), &json!("e2")], "{copies:?}");
}
