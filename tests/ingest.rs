//! Validation, rejects, duplicate keys and bad input over MQTT.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{connect_v5, publish_acked, raw_mqtt311, Backend, Server, V5};

pub(crate) async fn publish(
    client: &mut V5,
    topic: &str,
    payload: impl Into<Vec<u8>>,
) -> (PubAckReason, Option<String>) {
    client
        .client
        .publish(topic, QoS::AtLeastOnce, false, payload.into())
        .await
        .unwrap();
    client
        .expect(|p| match p {
            Packet::PubAck(ack) => Some((
                ack.reason,
                ack.properties
                    .as_ref()
                    .and_then(|props| props.reason_string.clone()),
            )),
            _ => None,
        })
        .await
}

async fn rejects(server: &Server, stream: &str) -> Vec<Value> {
    let (status, body) = server
        .api(
            "GET",
            &format!("/v1/streams/{stream}/rejects"),
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["rejects"].as_array().unwrap().clone()
}

async fn validation_and_rejects(backend: Backend) {
    let server = Server::with_temperature(backend).await;
    let token = server.add_device("sensor-1", "ingest").await;
    let mut client = connect_v5(&server, "sensor-1", &token).await.unwrap();
    let topic = "ingest/temperature/sensor-1";

    let good = json!({"seq": 1, "celsius": 21.5, "humidity": 40, "status": "ok", "door_open": true,
                      "label": "hall", "taken_at": "2026-11-22T10:00:00.250Z", "firmware": "1.2.3"});
    assert_eq!(
        publish(&mut client, topic, good.to_string()).await.0,
        PubAckReason::Success
    );

    // One array: two valid records, a duplicate of seq 1, and three bad ones
    // that must not stop the rest.
    let batch = json!([
        {"seq": 2, "celsius": -40, "taken_at": 1_795_000_000_000i64},
        {"seq": 3, "celsius": 125.0, "status": "warn"},
        {"seq": 1, "celsius": 99.0},
        {"seq": 4, "celsius": 126, "humidity": -1, "status": "melting"},
        {"celsius": "warm", "door_open": "yes"},
        {"seq": 5.5, "celsius": 1, "taken_at": "yesterday", "device_id": "sensor-2"}
    ]);
    assert_eq!(
        publish(&mut client, topic, batch.to_string()).await.0,
        PubAckReason::Success
    );

    let rows = server
        .rows("SELECT seq, celsius, humidity, status, door_open, label, taken_at, extra FROM temperature ORDER BY seq")
        .await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(
        rows[0],
        vec![
            json!(1),
            json!(21.5),
            json!(40.0),
            json!("ok"),
            json!(true),
            json!("hall"),
            json!(1_795_341_600_250i64),
            json!("{\"firmware\":\"1.2.3\"}")
        ]
    );
    assert_eq!(rows[1][6], json!(1_795_000_000_000i64));
    // The re-sent seq 1 was stored once, with its first values.
    assert_eq!(
        server
            .count("SELECT count(*) FROM temperature WHERE seq = 1")
            .await,
        1
    );

    let rejects = rejects(&server, "temperature").await;
    let reasons: Vec<Vec<String>> = rejects
        .iter()
        .rev()
        .map(|r| serde_json::from_value(r["reasons"].clone()).unwrap())
        .collect();
    assert_eq!(reasons.len(), 3, "{rejects:?}");
    let joined = |i: usize| reasons[i].join("; ");
    assert!(
        joined(0).contains("celsius: 126 is above the maximum 125"),
        "{}",
        joined(0)
    );
    assert!(joined(0).contains("humidity: -1 is below the minimum 0"));
    assert!(joined(0).contains("status: \"melting\" is not one of"));
    assert!(joined(1).contains("seq: required field is missing"));
    assert!(joined(1).contains("celsius: expected a number"));
    assert!(joined(1).contains("door_open: expected true or false"));
    assert!(joined(2).contains("seq: expected an integer"));
    assert!(joined(2).contains("RFC 3339"));
    assert!(joined(2).contains("does not match the publishing device"));
    assert!(rejects.iter().all(|r| r["device_id"] == "sensor-1"));
    assert!(rejects[0]["payload"].as_str().unwrap().contains("5.5"));

    // A payload with no valid record is answered with MQTT 5's
    // "payload format invalid" and the first reason.
    let (reason, text) = publish(&mut client, topic, r#"{"seq":9,"celsius":1000}"#).await;
    assert_eq!(reason, PubAckReason::PayloadFormatInvalid);
    assert!(text.unwrap().contains("above the maximum"));
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("fleetgate_records_accepted_total 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleetgate_records_duplicate_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleetgate_records_rejected_total 4"),
        "{metrics}"
    );
}

async fn bad_payloads_keep_the_connection(backend: Backend) {
    let server = Server::with_temperature(backend).await;
    let token = server.add_device("sensor-1", "ingest").await;
    let mut client = connect_v5(&server, "sensor-1", &token).await.unwrap();
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let huge = format!(
        r#"{{"seq":1,"celsius":1,"blob":"{}"}}"#,
        "x".repeat(300 * 1024)
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "ingest/nope/sensor-1",
            br#"{"seq":1}"#.to_vec(),
            "unknown stream \"nope\"",
        ),
        (
            "ingest/temperature/sensor-1",
            b"not json".to_vec(),
            "not valid JSON",
        ),
        (
            "ingest/temperature/sensor-1",
            vec![0xff, 0xfe, 0x00],
            "not valid JSON",
        ),
        (
            "ingest/temperature/sensor-1",
            b"42".to_vec(),
            "JSON object or an array",
        ),
        (
            "ingest/temperature/sensor-1",
            br#"{"seq":1,"celsius":1,"label":"a\u0000b"}"#.to_vec(),
            "NUL character",
        ),
        (
            "ingest/temperature/sensor-1",
            deep.into_bytes(),
            "recursion limit",
        ),
        (
            "ingest/temperature/sensor-1",
            huge.into_bytes(),
            "exceeds the 262144-byte limit",
        ),
    ];
    for (topic, payload, expected) in cases {
        let (reason, text) = publish(&mut client, topic, payload).await;
        assert_eq!(reason, PubAckReason::PayloadFormatInvalid, "{expected}");
        let text = text.unwrap_or_default();
        assert!(text.contains(expected), "expected {expected:?} in {text:?}");
    }
    // Still connected and still storing.
    assert_eq!(
        publish(
            &mut client,
            "ingest/temperature/sensor-1",
            r#"{"seq":7,"celsius":7}"#
        )
        .await
        .0,
        PubAckReason::Success
    );
    assert_eq!(server.count("SELECT count(*) FROM temperature").await, 1);
    let unknown = rejects(&server, "nope").await;
    assert_eq!(unknown.len(), 1);
    let oversized = rejects(&server, "temperature").await;
    assert!(
        oversized[0]["payload"].as_str().unwrap().len() <= 70 * 1024,
        "only the head of an oversized payload is kept"
    );
}

crate::on_both_backends!(validation_and_rejects, bad_payloads_keep_the_connection);

/// Bytes that are not MQTT close that connection only.
#[tokio::test]
async fn malformed_packets_close_only_their_connection() {
    let server = Server::with_temperature(Backend::Sqlite).await;
    let token = server.add_device("sensor-1", "ingest").await;
    let mut well_behaved = connect_v5(&server, "sensor-1", &token).await.unwrap();

    let attacks: Vec<Vec<u8>> = vec![
        vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x7f], // remaining length of 5 bytes
        vec![0x10, 0x04, 0x00, 0x04, b'M', b'Q'], // truncated CONNECT, then nothing
        vec![0x30, 0x05, 0x00, 0x01, b'a', b'b', b'c'], // PUBLISH before CONNECT
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![
            0x10, 0x0a, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x00,
        ], // MQTT 3.1
    ];
    for attack in attacks {
        let mut socket = tokio::net::TcpStream::connect(server.mqtt).await.unwrap();
        socket.write_all(&attack).await.unwrap();
        socket.shutdown().await.unwrap();
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), socket.read_to_end(&mut reply)).await;
        // MQTT 3.1 gets "unacceptable protocol version"; the rest nothing.
        assert!(
            reply.is_empty() || reply == [0x20, 0x02, 0x00, 0x01],
            "{reply:?}"
        );
    }

    // After a good CONNECT, a corrupt packet ends that session only.
    let token = server.add_device("sensor-2", "ingest").await;
    let mut raw = raw_mqtt311(&server, "sensor-2", &token).await;
    raw.write_all(&[0x82, 0x03, 0x00, 0x01, 0x00])
        .await
        .unwrap(); // SUBSCRIBE with a cut filter
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), raw.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "a corrupt packet must close the connection");

    // The first client never noticed any of it.
    well_behaved
        .client
        .publish(
            "ingest/temperature/sensor-1",
            QoS::AtLeastOnce,
            false,
            r#"{"seq":1,"celsius":1}"#,
        )
        .await
        .unwrap();
    let reason = well_behaved
        .expect(|p| match p {
            Packet::PubAck(a) => Some(a.reason),
            _ => None,
        })
        .await;
    assert_eq!(reason, PubAckReason::Success);
}

#[tokio::test]
async fn mqtt311_bad_payloads_are_acknowledged_as_rejects() {
    let server = Server::with_temperature(Backend::Sqlite).await;
    let token = server.add_device("sensor-1", "ingest").await;
    let payloads = vec![
        "not json".to_string(),
        r#"{"seq":1,"celsius":1}"#.to_string(),
    ];
    publish_acked(
        &server,
        "sensor-1",
        &token,
        "ingest/temperature/sensor-1",
        &payloads,
    )
    .await;
    assert_eq!(server.count("SELECT count(*) FROM temperature").await, 1);
    assert_eq!(rejects(&server, "temperature").await.len(), 1);
}

#[tokio::test]
async fn qos2_and_topic_aliases_work_and_stay_in_bounds() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let server = Server::with_temperature(Backend::Sqlite).await;
    let token = server.add_device("sensor-1", "ingest").await;
    let mut client = connect_v5(&server, "sensor-1", &token).await.unwrap();

    // QoS 2: PUBREC after the commit, then PUBCOMP for our PUBREL.
    client
        .client
        .publish(
            "ingest/temperature/sensor-1",
            QoS::ExactlyOnce,
            false,
            r#"{"seq":1,"celsius":1}"#,
        )
        .await
        .unwrap();
    client
        .expect(|p| matches!(p, Packet::PubRec(_)).then_some(()))
        .await;
    client
        .expect(|p| matches!(p, Packet::PubComp(_)).then_some(()))
        .await;

    // A topic alias set once, then used alone.
    let alias = |n| PublishProperties {
        topic_alias: Some(n),
        ..Default::default()
    };
    client
        .client
        .publish_with_properties(
            "ingest/temperature/sensor-1",
            QoS::AtLeastOnce,
            false,
            r#"{"seq":2,"celsius":2}"#,
            alias(1),
        )
        .await
        .unwrap();
    assert_eq!(client.puback_reason().await, PubAckReason::Success);
    client
        .client
        .publish_with_properties(
            "",
            QoS::AtLeastOnce,
            false,
            r#"{"seq":3,"celsius":3}"#,
            alias(1),
        )
        .await
        .unwrap();
    assert_eq!(client.puback_reason().await, PubAckReason::Success);
    assert_eq!(server.count("SELECT count(*) FROM temperature").await, 3);

    assert_eq!(server.count("SELECT count(*) FROM temperature").await, 3);
}

/// rumqttc will not send an alias beyond the announced maximum, so this
/// speaks MQTT 5 by hand: the gatekeeper must treat it as a protocol error.
#[tokio::test]
async fn an_out_of_range_topic_alias_ends_the_connection() {
    let server = Server::with_temperature(Backend::Sqlite).await;
    let token = server.add_device("sensor-1", "ingest").await;
    let mut body = vec![
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0xc2, 0x00, 0x3c, 0x00,
    ];
    for field in [
        b"sensor-1".as_slice(),
        b"sensor-1".as_slice(),
        token.as_bytes(),
    ] {
        body.extend((field.len() as u16).to_be_bytes());
        body.extend(field);
    }
    let mut connect = vec![0x10];
    crate::harness::put_remaining_length(&mut connect, body.len());
    connect.extend(body);
    let mut raw = tokio::net::TcpStream::connect(server.mqtt).await.unwrap();
    raw.write_all(&connect).await.unwrap();
    let mut header = [0u8; 2];
    raw.read_exact(&mut header).await.unwrap();
    assert_eq!(header[0], 0x20, "CONNACK");
    let mut connack = vec![0u8; header[1] as usize];
    raw.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack[1], 0, "CONNACK reason");
    // PUBLISH QoS 1, topic alias 5000 (the server announced 32).
    let topic = b"ingest/temperature/sensor-1";
    let payload = br#"{"seq":9,"celsius":1}"#;
    let mut variable = Vec::new();
    variable.extend((topic.len() as u16).to_be_bytes());
    variable.extend(topic);
    variable.extend([0x00, 0x01, 0x03, 0x23, 0x13, 0x88]);
    variable.extend(payload);
    let mut publish = vec![0x32];
    crate::harness::put_remaining_length(&mut publish, variable.len());
    publish.extend(variable);
    raw.write_all(&publish).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(crate::harness::WAIT, raw.read_to_end(&mut reply))
        .await
        .expect("closed")
        .unwrap();
    assert_eq!(
        reply,
        [0xe0, 0x02, 0x94, 0x00],
        "DISCONNECT with 0x94 topic alias invalid (MQTT 3.3.2.3.4)"
    );
    assert_eq!(server.count("SELECT count(*) FROM temperature").await, 0);
}

#[tokio::test]
async fn an_unknown_pubrel_is_completed_not_relayed() {
    let server = Server::with_temperature(Backend::Sqlite).await;
    let token = server.add_device("sensor-1", "ingest").await;
    let mut raw = raw_mqtt311(&server, "sensor-1", &token).await;
    // PUBREL for packet id 7, which this connection never used (as after a
    // reconnect): completed here, and the connection stays up.
    raw.write_all(&[0x62, 0x02, 0x00, 0x07]).await.unwrap();
    let mut pubcomp = [0u8; 4];
    raw.read_exact(&mut pubcomp).await.unwrap();
    assert_eq!(pubcomp, [0x70, 0x02, 0x00, 0x07]);
    let payload = br#"{"seq":1,"celsius":1}"#;
    let topic = b"ingest/temperature/sensor-1";
    let mut publish = vec![
        0x32,
        (2 + topic.len() + 2 + payload.len()) as u8,
        0x00,
        topic.len() as u8,
    ];
    publish.extend(topic);
    publish.extend([0x00, 0x08]);
    publish.extend(payload);
    raw.write_all(&publish).await.unwrap();
    let mut puback = [0u8; 4];
    raw.read_exact(&mut puback).await.unwrap();
    assert_eq!(puback, [0x40, 0x02, 0x00, 0x08]);
}

#[tokio::test]
async fn a_message_may_hold_at_most_ten_thousand_records() {
    let server = Server::with_temperature(Backend::Sqlite).await;
    let token = server.add_device("sensor-1", "ingest").await;
    let mut client = connect_v5(&server, "sensor-1", &token).await.unwrap();
    let too_many = format!("[{}]", vec!["{}"; 10_001].join(","));
    let (reason, text) = publish(&mut client, "ingest/temperature/sensor-1", too_many).await;
    assert_eq!(reason, PubAckReason::PayloadFormatInvalid);
    assert!(text.unwrap().contains("at most 10000 per message"));
    let many: Vec<String> = (0..10_000)
        .map(|i| format!(r#"{{"seq":{i},"celsius":1}}"#))
        .collect();
    let (reason, _) = publish(
        &mut client,
        "ingest/temperature/sensor-1",
        format!("[{}]", many.join(",")),
    )
    .await;
    assert_eq!(reason, PubAckReason::Success);
    assert_eq!(
        server.count("SELECT count(*) FROM temperature").await,
        10_000
    );
}

crate::on_both_backends!(records_posted_over_http_are_stored_like_published_ones);
async fn records_posted_over_http_are_stored_like_published_ones(backend: Backend) {
    let server = Server::with_temperature(backend).await;
    let token = server.add_device("web-1", "ingest").await;
    let post = |body: &'static str| server.post_text("/v1/ingest/temperature", &token, body);

    let (status, body) =
        post(r#"[{"seq": 1, "celsius": 20.5}, {"seq": 2, "celsius": 21.0}]"#).await;
    assert_eq!(
        (status, &body["stored"], &body["rejected"]),
        (200, &json!(2), &json!(0)),
        "{body}"
    );
    // Same validation as MQTT: the bad record is rejected with its reason,
    // the good one beside it stored.
    let (status, body) = post(r#"[{"seq": 3, "celsius": 500}, {"seq": 4, "celsius": 1}]"#).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        (&body["stored"], &body["rejected"]),
        (&json!(1), &json!(1)),
        "{body}"
    );
    assert!(
        body["first_reason"].as_str().unwrap().contains("celsius"),
        "{body}"
    );
    let (status, body) = post("not json").await;
    assert_eq!((status, &body["rejected"]), (422, &json!(1)), "{body}");
    // Same keys: a beacon sent twice is stored once.
    let (status, _) = post(r#"{"seq": 1, "celsius": 20.5}"#).await;
    assert_eq!(status, 200);
    assert_eq!(
        server
            .rows("SELECT seq FROM temperature WHERE device_id = 'web-1' ORDER BY seq")
            .await,
        vec![vec![json!(1)], vec![json!(2)], vec![json!(4)]]
    );
    let rejects = server
        .api(
            "GET",
            "/v1/streams/temperature/rejects",
            Some(&server.admin),
            None,
        )
        .await
        .1;
    assert_eq!(rejects["rejects"].as_array().unwrap().len(), 2, "{rejects}");

    // Only one's own records, except for admins forwarding for a device.
    let (status, body) = server
        .post_text(
            "/v1/ingest/temperature?device=web-2",
            &token,
            r#"{"seq": 9, "celsius": 1}"#,
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = server
        .post_text(
            "/v1/ingest/temperature?device=web-2",
            &server.admin,
            r#"{"seq": 9, "celsius": 1}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        server
            .count("SELECT count(*) FROM temperature WHERE device_id = 'web-2'")
            .await,
        1
    );
    let (status, body) = server.post_text("/v1/ingest/nowhere", &token, "{}").await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["first_reason"].as_str().unwrap().contains("nowhere"),
        "{body}"
    );
    let (status, _) = server
        .post_text(
            "/v1/ingest/temperature",
            "forged",
            r#"{"seq": 5, "celsius": 1}"#,
        )
        .await;
    assert_eq!(status, 401);
}

crate::on_both_backends!(udp_datagrams_carry_one_record_each_and_are_answered_after_the_commit);
async fn udp_datagrams_carry_one_record_each_and_are_answered_after_the_commit(backend: Backend) {
    let server = Server::start_with(backend, &["--udp", "127.0.0.1:0"]).await;
    let (status, body) = server.apply_streams(crate::harness::TEMPERATURE).await;
    assert_eq!(status, 200, "{body}");
    let token = server.add_device("beacon-1", "ingest").await;
    let udp = server
        .extra_addr("udp")
        .expect("udp address on the ready line");
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let exchange = |datagram: String| {
        let socket = &socket;
        async move {
            socket.send_to(datagram.as_bytes(), udp).await.unwrap();
            let mut buffer = vec![0u8; 4096];
            let (n, _) =
                tokio::time::timeout(Duration::from_secs(10), socket.recv_from(&mut buffer))
                    .await
                    .expect("an answer")
                    .unwrap();
            serde_json::from_slice::<Value>(&buffer[..n]).unwrap()
        }
    };
    let datagram = |token: &str, record: Value| {
        json!({ "token": token, "stream": "temperature", "record": record }).to_string()
    };

    let answer = exchange(datagram(&token, json!({ "seq": 1, "celsius": 19.5 }))).await;
    assert_eq!(
        (&answer["stored"], &answer["rejected"]),
        (&json!(1), &json!(0)),
        "{answer}"
    );
    // Re-sent after a lost answer: stored once.
    exchange(datagram(&token, json!({ "seq": 1, "celsius": 19.5 }))).await;
    let answer = exchange(datagram(&token, json!({ "seq": 2, "celsius": 900 }))).await;
    assert_eq!(answer["rejected"], 1, "{answer}");
    assert!(
        answer["first_reason"].as_str().unwrap().contains("celsius"),
        "{answer}"
    );
    assert_eq!(
        server
            .rows("SELECT seq, celsius FROM temperature WHERE device_id = 'beacon-1'")
            .await,
        vec![vec![json!(1), json!(19.5)]]
    );

    for (bad, says) in [
        ("garbage".to_string(), "expected"),
        (
            datagram("forged", json!({ "seq": 3, "celsius": 1 })),
            "token",
        ),
    ] {
        let answer = exchange(bad).await;
        assert!(answer["error"].as_str().unwrap().contains(says), "{answer}");
    }
    assert_eq!(server.count("SELECT count(*) FROM temperature").await, 1);
}
