//! The role matrix: each role against each allowed and denied publish and
//! subscribe. Denied publishes are neither stored nor delivered.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;

use crate::harness::{connect_v4, connect_v5, Backend, Server, V5};

async fn publish_reason(client: &mut V5, topic: &str, payload: &str) -> PubAckReason {
    client
        .client
        .publish(topic, QoS::AtLeastOnce, false, payload.to_string())
        .await
        .unwrap();
    client.puback_reason().await
}

fn granted(code: SubscribeReasonCode) -> bool {
    matches!(code, SubscribeReasonCode::Success(_))
}

async fn role_matrix(backend: Backend) {
    let server = Server::with_temperature(backend).await;
    let tokens = [
        ("sensor-1", server.add_device("sensor-1", "ingest").await),
        ("analyst-1", server.add_device("analyst-1", "extract").await),
        ("ops-1", server.add_device("ops-1", "admin").await),
    ];
    // An admin watching everything sees whatever is delivered.
    let watcher_token = server.add_device("watcher", "admin").await;
    let mut watcher = connect_v5(&server, "watcher", &watcher_token)
        .await
        .unwrap();
    assert!(granted(watcher.subscribe("#").await));

    //                 filter                    ingest  extract admin
    let subscribes = [
        ("devices/{me}/#", true, true, true),
        ("devices/{me}/cmd", true, true, true),
        ("devices/other/#", false, false, true),
        ("live/#", false, true, true),
        ("live/temperature/+", false, true, true),
        ("$share/g/live/#", false, true, true),
        ("ingest/#", false, false, true),
        ("#", false, false, true),
    ];
    for (i, (device, token)) in tokens.iter().enumerate() {
        let mut client = connect_v5(&server, device, token).await.unwrap();
        for (filter, ingest, extract, admin) in subscribes {
            let filter = filter.replace("{me}", device);
            let expected = [ingest, extract, admin][i];
            let code = client.subscribe(&filter).await;
            assert_eq!(
                granted(code),
                expected,
                "{device} subscribing to {filter}: {code:?}"
            );
            if !expected {
                assert_eq!(code, SubscribeReasonCode::NotAuthorized);
            }
        }
    }

    //                 topic                            ingest  extract admin
    let publishes = [
        ("ingest/temperature/{me}", true, true, true),
        ("ingest/temperature/sensor-9", false, false, true),
        ("ingest/temperature/{me}/extra", false, false, false),
        ("devices/sensor-1/cmd", false, false, true),
        ("live/temperature/{me}", false, false, true),
    ];
    let mut seq = 0;
    for (i, (device, token)) in tokens.iter().enumerate() {
        let mut client = connect_v5(&server, device, token).await.unwrap();
        for (topic, ingest, extract, admin) in publishes {
            seq += 1;
            let topic = topic.replace("{me}", device);
            let expected = [ingest, extract, admin][i];
            let reason = publish_reason(
                &mut client,
                &topic,
                &format!(r#"{{"seq":{seq},"celsius":20}}"#),
            )
            .await;
            if expected {
                assert_ne!(
                    reason,
                    PubAckReason::NotAuthorized,
                    "{device} publishing to {topic}"
                );
            } else {
                assert_eq!(
                    reason,
                    PubAckReason::NotAuthorized,
                    "{device} publishing to {topic}"
                );
            }
        }
    }
    // Denied publishes never reached the embedded broker: the watcher got
    // the admin's command and live topic, and the store's live copies of the
    // four allowed ingest publishes, and nothing else.
    let mut delivered = Vec::new();
    while delivered.len() < 6 {
        let topic = watcher
            .expect(|p| match p {
                Packet::Publish(p) => Some(String::from_utf8_lossy(&p.topic).into_owned()),
                _ => None,
            })
            .await;
        delivered.push(topic);
    }
    watcher
        .assert_silent(Duration::from_millis(300), "after the allowed publishes")
        .await;
    delivered.sort();
    assert_eq!(
        delivered,
        [
            "devices/sensor-1/cmd",
            "live/temperature/analyst-1",
            "live/temperature/ops-1",
            "live/temperature/ops-1",
            "live/temperature/sensor-1",
            "live/temperature/sensor-9",
        ]
    );
    // Only allowed ingest publishes were stored: each device's own, and the
    // admin's on behalf of sensor-9.
    let stored = server
        .rows("SELECT device_id FROM temperature ORDER BY device_id")
        .await;
    let stored: Vec<&str> = stored.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(stored, ["analyst-1", "ops-1", "sensor-1", "sensor-9"]);
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("fleetgate_mqtt_publishes_denied_total 9"),
        "{metrics}"
    );
}

crate::on_both_backends!(role_matrix);

#[tokio::test]
async fn mqtt311_denied_publish_closes_the_connection() {
    let server = Server::with_temperature(Backend::Sqlite).await;
    let token = server.add_device("sensor-1", "ingest").await;
    let (client, mut eventloop) = connect_v4(&server, "sensor-1", &token).await.unwrap();
    client
        .publish(
            "ingest/temperature/sensor-2",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"seq":1,"celsius":1}"#,
        )
        .await
        .unwrap();
    let ended = loop {
        match tokio::time::timeout(crate::harness::WAIT, eventloop.poll())
            .await
            .expect("disconnect in time")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                panic!("a denied publish was acknowledged")
            }
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(
        !matches!(ended, rumqttc::ConnectionError::ConnectionRefused(_)),
        "{ended:?}"
    );
    assert_eq!(server.count("SELECT count(*) FROM temperature").await, 0);
}

#[tokio::test]
async fn commands_reach_the_device_and_live_records_reach_extract_clients() {
    let server = Server::with_temperature(Backend::Sqlite).await;
    let sensor_token = server.add_device("sensor-1", "ingest").await;
    let analyst_token = server.add_device("analyst-1", "extract").await;
    let ops_token = server.add_device("ops-1", "admin").await;

    let mut sensor = connect_v5(&server, "sensor-1", &sensor_token)
        .await
        .unwrap();
    assert!(granted(sensor.subscribe("devices/sensor-1/#").await));
    let mut analyst = connect_v5(&server, "analyst-1", &analyst_token)
        .await
        .unwrap();
    assert!(granted(analyst.subscribe("live/temperature/#").await));

    let mut ops = connect_v5(&server, "ops-1", &ops_token).await.unwrap();
    assert_eq!(
        publish_reason(&mut ops, "devices/sensor-1/cmd", "reboot").await,
        PubAckReason::Success
    );
    let command = sensor
        .expect(|p| match p {
            Packet::Publish(p) => Some(p.payload.clone()),
            _ => None,
        })
        .await;
    assert_eq!(&command[..], b"reboot");

    assert_eq!(
        publish_reason(
            &mut sensor,
            "ingest/temperature/sensor-1",
            r#"{"seq":1,"celsius":19.5,"note":"x"}"#
        )
        .await,
        PubAckReason::Success
    );
    let (topic, live) = analyst
        .expect(|p| match p {
            Packet::Publish(p) => Some((
                String::from_utf8_lossy(&p.topic).into_owned(),
                p.payload.clone(),
            )),
            _ => None,
        })
        .await;
    assert_eq!(topic, "live/temperature/sensor-1");
    let records: serde_json::Value = serde_json::from_slice(&live).unwrap();
    assert_eq!(records[0]["celsius"], 19.5);
    assert_eq!(records[0]["device_id"], "sensor-1");
    assert!(records[0]["received_at"].is_i64());
    // An invalid record is not re-published.
    assert_eq!(
        publish_reason(
            &mut sensor,
            "ingest/temperature/sensor-1",
            r#"{"seq":2,"celsius":999}"#
        )
        .await,
        PubAckReason::PayloadFormatInvalid
    );
    analyst
        .assert_silent(Duration::from_millis(300), "invalid record")
        .await;
}

#[tokio::test]
async fn wills_are_checked_at_connect() {
    let server = Server::with_temperature(Backend::Sqlite).await;
    let token = server.add_device("sensor-1", "ingest").await;
    let mut options =
        rumqttc::MqttOptions::new("sensor-1", server.mqtt.ip().to_string(), server.mqtt.port());
    options.set_credentials("sensor-1", token.clone());
    options.set_last_will(rumqttc::LastWill::new(
        "devices/sensor-2/cmd",
        "x",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    match eventloop.poll().await {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::NotAuthorized)
        }
        other => panic!("a will on a foreign topic must be refused, got {other:?}"),
    }

    // A will on the device's own ingest topic is a record, stored when the
    // connection dies without DISCONNECT.
    let mut options =
        rumqttc::MqttOptions::new("sensor-1", server.mqtt.ip().to_string(), server.mqtt.port());
    options.set_credentials("sensor-1", token);
    options.set_last_will(rumqttc::LastWill::new(
        "ingest/temperature/sensor-1",
        r#"{"seq":99,"celsius":0,"status":"fault"}"#,
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    assert!(matches!(
        eventloop.poll().await,
        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))
    ));
    drop(client);
    drop(eventloop); // the socket closes without DISCONNECT
    assert_eq!(
        server
            .wait_count("SELECT count(*) FROM temperature WHERE seq = 99", 1)
            .await,
        1
    );
}

/// Issue 17 J: an admin's SUBSCRIBE to `$SYS/#` dropped the connection
/// (rumqttd refused every `$` filter but `$share`). The broker answers it
/// with a SUBACK, in both versions, and the connection stays up.
#[tokio::test]
async fn an_admin_subscribing_to_sys_gets_a_suback_and_stays_connected() {
    let server = Server::start(Backend::Sqlite).await;
    let token = server.add_device("ops-1", "admin").await;

    let mut v5 = connect_v5(&server, "ops-1", &token).await.unwrap();
    // Granted or a failure code: either way an answer, not a disconnect.
    v5.subscribe("$SYS/#").await;
    assert!(granted(v5.subscribe("devices/ops-1/#").await));
    assert_eq!(
        publish_reason(&mut v5, "devices/ops-1/ping", "1").await,
        PubAckReason::Success
    );
    v5.expect(|p| match p {
        Packet::Publish(publish) if publish.topic == "devices/ops-1/ping" => Some(()),
        _ => None,
    })
    .await;
    v5.drop_connection().await;

    let (client, mut events) = connect_v4(&server, "ops-1", &token).await.unwrap();
    client
        .subscribe("$SYS/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .subscribe("devices/ops-1/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut codes = Vec::new();
    while codes.len() < 2 {
        match tokio::time::timeout(crate::harness::WAIT, events.poll())
            .await
            .expect("SUBACKs in time")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack))) => {
                codes.extend(ack.return_codes)
            }
            Ok(_) => {}
            Err(e) => panic!("the connection ended after SUBSCRIBE $SYS/#: {e:?}"),
        }
    }
    assert!(
        matches!(codes[1], rumqttc::SubscribeReasonCode::Success(_)),
        "{codes:?}"
    );
    // Still connected: its own command comes back to it.
    client
        .publish("devices/ops-1/ping", rumqttc::QoS::AtLeastOnce, false, "1")
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(crate::harness::WAIT, events.poll())
            .await
            .expect("the publish back in time")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))
                if p.topic == "devices/ops-1/ping" =>
            {
                break
            }
            Ok(_) => {}
            Err(e) => panic!("the connection ended after SUBSCRIBE $SYS/#: {e:?}"),
        }
    }
}
