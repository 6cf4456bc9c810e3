//! CONNECT authentication: every refusal is a CONNACK code, in both MQTT
//! versions, and repeated refusals raise an alert naming the device.

use fleetgate_protocol::Role;
use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as V5Code;
use rumqttc::ConnectReturnCode as V4Code;

use crate::harness::{
    connect_v4, connect_v4_with, connect_v5, connect_v5_with, foreign_token, mosquitto_available,
    now, v4_options, v5_options, Backend, Server,
};

async fn refusals(backend: Backend) {
    // Bans are tested on their own (admin.rs); here every refusal must be answered.
    let server = Server::start_with(backend, &["--ban-duration", "0s"]).await;
    let good = server.add_device("sensor-1", "ingest").await;
    server.add_device("gone-1", "ingest").await;
    let gone_token = server.mint("gone-1", Role::Ingest, now(), now() + 3600);
    let (status, _) = server
        .api(
            "POST",
            "/v1/devices/gone-1/revoke",
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(status, 200);

    let cases: Vec<(&str, &str, String, V4Code, V5Code)> = vec![
        (
            "garbage token",
            "sensor-1",
            "not-a-token".into(),
            V4Code::BadUserNamePassword,
            V5Code::BadUserNamePassword,
        ),
        (
            "foreign key",
            "sensor-1",
            foreign_token("sensor-1"),
            V4Code::BadUserNamePassword,
            V5Code::BadUserNamePassword,
        ),
        (
            "expired",
            "sensor-1",
            server.mint("sensor-1", Role::Ingest, now() - 7200, now() - 3600),
            V4Code::BadUserNamePassword,
            V5Code::BadUserNamePassword,
        ),
        (
            "unknown device",
            "ghost",
            server.mint("ghost", Role::Admin, now(), now() + 3600),
            V4Code::NotAuthorized,
            V5Code::NotAuthorized,
        ),
        (
            "revoked device",
            "gone-1",
            gone_token,
            V4Code::NotAuthorized,
            V5Code::NotAuthorized,
        ),
        (
            "someone else's token",
            "sensor-2",
            good.clone(),
            V4Code::BadClientId,
            V5Code::ClientIdentifierNotValid,
        ),
    ];
    for (case, id, token, v4_code, v5_code) in &cases {
        let v4 = connect_v4(&server, id, token).await.err();
        assert_eq!(v4, Some(*v4_code), "MQTT 3.1.1, {case}");
        let v5 = connect_v5(&server, id, token).await.err();
        assert_eq!(v5, Some(*v5_code), "MQTT 5, {case}");
    }
    // The right token still works, after all of that.
    let v4 = connect_v4(&server, "sensor-1", &good).await;
    assert!(v4.is_ok(), "3.1.1 with the right token: {:?}", v4.err());
    let v5 = connect_v5(&server, "sensor-1", &good).await;
    assert!(v5.is_ok(), "MQTT 5 with the right token: {:?}", v5.err());

    // Twelve refusals for sensor-1 in a minute: an alert names it, in the
    // API and in the metrics.
    let alerted = server.alerted_devices().await;
    assert!(
        alerted.iter().any(|d| d == "sensor-1"),
        "alerts: {alerted:?}"
    );
    assert!(server
        .metrics()
        .await
        .contains("fleetgate_refusal_alerts_total{device=\"sensor-1\"} 1"));
    assert!(server.log().contains("ALERT: repeated refusals"));
}

crate::on_both_backends!(refusals);

#[tokio::test]
async fn mosquitto_pub_sees_the_refusal_code() {
    if !mosquitto_available() {
        eprintln!("skipped: mosquitto_pub is not installed");
        return;
    }
    let server = Server::start(Backend::Sqlite).await;
    let port = server.mqtt.port().to_string();
    let output = std::process::Command::new("mosquitto_pub")
        .args([
            "-p",
            &port,
            "-i",
            "sensor-9",
            "-u",
            "sensor-9",
            "-P",
            "forged",
            "-t",
            "ingest/t/sensor-9",
            "-m",
            "{}",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad user name or password"),
        "mosquitto_pub said: {stderr}"
    );
}

#[tokio::test]
async fn clients_that_never_send_connect_do_not_block_others() {
    let server = Server::start(Backend::Sqlite).await;
    let token = server.add_device("sensor-1", "ingest").await;
    // Ten silent sockets, and one that sends garbage instead of CONNECT.
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(tokio::net::TcpStream::connect(server.mqtt).await.unwrap());
    }
    let mut garbage = tokio::net::TcpStream::connect(server.mqtt).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut garbage, &[0xff; 64])
        .await
        .unwrap();
    assert!(connect_v4(&server, "sensor-1", &token).await.is_ok());
}

/// Devices reconnect the moment a connection drops; every reconnect with the
/// same client id must be accepted, whichever protocol version it uses.
#[tokio::test]
async fn rapid_reconnects_with_the_same_client_id_are_accepted() {
    let server = Server::start(Backend::Sqlite).await;
    let token = server.add_device("sensor-1", "ingest").await;
    for round in 0..40 {
        let v4 = connect_v4(&server, "sensor-1", &token).await;
        assert!(v4.is_ok(), "round {round}, 3.1.1: {:?}", v4.err());
        drop(v4);
        let v5 = connect_v5(&server, "sensor-1", &token).await;
        assert!(v5.is_ok(), "round {round}, MQTT 5: {:?}", v5.err());
    }
}

/// Issue 17 J: a client id that is not the token's device, with the token's
/// device as username (`mosquitto_pub -i other -u sensor-1 -P "$SENSOR"`),
/// got *bad username or password* (4 / 0x86). It is *identifier rejected*
/// (2 / 0x85), as documented; a wrong username with the right client id
/// and token is still a bad username.
#[tokio::test]
async fn a_client_id_that_is_not_the_tokens_device_is_identifier_rejected() {
    let server = Server::start_with(Backend::Sqlite, &["--ban-duration", "0s"]).await;
    let token = server.add_device("sensor-1", "ingest").await;
    server.add_device("sensor-2", "ingest").await;
    for client_id in ["sensor-2", "nobody"] {
        let mut v4 = v4_options(&server, client_id, &token);
        v4.set_credentials("sensor-1", &token);
        let refused = connect_v4_with(v4).await.err();
        assert_eq!(refused, Some(V4Code::BadClientId), "3.1.1, {client_id}");
        let mut v5 = v5_options(&server, client_id, &token);
        v5.set_credentials("sensor-1", &token);
        let refused = connect_v5_with(v5).await.err();
        assert_eq!(
            refused,
            Some(V5Code::ClientIdentifierNotValid),
            "MQTT 5, {client_id}"
        );
    }
    let mut v4 = v4_options(&server, "sensor-1", &token);
    v4.set_credentials("sensor-2", &token);
    assert_eq!(
        connect_v4_with(v4).await.err(),
        Some(V4Code::BadUserNamePassword)
    );
    let mut v5 = v5_options(&server, "sensor-1", &token);
    v5.set_credentials("sensor-2", &token);
    assert_eq!(
        connect_v5_with(v5).await.err(),
        Some(V5Code::BadUserNamePassword)
    );
    if !mosquitto_available() {
        eprintln!("skipped the mosquitto_pub part: mosquitto_pub is not installed");
        return;
    }
    let output = std::process::Command::new("mosquitto_pub")
        .args(["-p", &server.mqtt.port().to_string()])
        .args(["-i", "sensor-2", "-u", "sensor-1", "-P", &token])
        .args(["-t", "ingest/t/sensor-1", "-m", "{}"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("identifier rejected"),
        "mosquitto_pub said: {stderr}"
    );
}
