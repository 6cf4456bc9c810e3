//! MQTT over TLS and HTTPS with the development CA, with real TLS clients
//! (rumqttc on rustls, mosquitto_pub, curl); slow clients cannot hold up
//! anyone else's handshake.

use std::process::Command;
use std::time::{Duration, Instant};

use rumqttc::{Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};
use tokio::io::AsyncWriteExt;

use crate::harness::{mosquitto_available, Backend, Server, DEV_TLS, TEMPERATURE};

fn addr(server: &Server, name: &str) -> std::net::SocketAddr {
    server
        .extra_addr(name)
        .unwrap_or_else(|| panic!("no {name} address in the ready line"))
}

#[tokio::test]
async fn mqtt_and_http_over_tls_with_silent_clients_around() {
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let server = Server::start_with(
        Backend::Sqlite,
        &[&DEV_TLS[..], &["--tls-handshake-timeout", "2s"]].concat(),
    )
    .await;
    let (status, _) = server.apply_streams(TEMPERATURE).await;
    assert_eq!(status, 200);
    let token = server.add_device("sensor-1", "ingest").await;
    let mqtts = addr(&server, "mqtts");
    let https = addr(&server, "https");
    let ca_path = server.data_dir().join("dev-tls/ca.pem");
    let ca = std::fs::read(&ca_path).unwrap();

    // Twenty sockets that never start a handshake, and one that sends garbage.
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(tokio::net::TcpStream::connect(mqtts).await.unwrap());
    }
    let mut garbage = tokio::net::TcpStream::connect(mqtts).await.unwrap();
    garbage
        .write_all(b"\x10\x0cnot a TLS record at all")
        .await
        .unwrap();

    // A rustls client still connects, at once.
    let started = Instant::now();
    let mut options = MqttOptions::new("sensor-1", "localhost", mqtts.port());
    options.set_credentials("sensor-1", token.clone());
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca,
        alpn: None,
        client_auth: None,
    }));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    client
        .publish(
            "ingest/temperature/sensor-1",
            QoS::AtLeastOnce,
            false,
            r#"{"seq":1,"celsius":20}"#,
        )
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(crate::harness::WAIT, eventloop.poll())
            .await
            .expect("PUBACK in time")
        {
            Ok(Event::Incoming(Incoming::PubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("MQTT over TLS failed: {e:?}"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "TLS publish took {:?} behind silent clients",
        started.elapsed()
    );

    if mosquitto_available() {
        let output = Command::new("mosquitto_pub")
            .args([
                "-h",
                "localhost",
                "-p",
                &mqtts.port().to_string(),
                "--cafile",
                ca_path.to_str().unwrap(),
            ])
            .args(["-i", "sensor-1", "-u", "sensor-1", "-P", &token, "-q", "1"])
            .args([
                "-t",
                "ingest/temperature/sensor-1",
                "-m",
                r#"{"seq":2,"celsius":21}"#,
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        // Without the CA, the certificate is refused.
        let output = Command::new("mosquitto_pub")
            .args([
                "-h",
                "localhost",
                "-p",
                &mqtts.port().to_string(),
                "--capath",
                "/nonexistent",
            ])
            .args([
                "-i",
                "sensor-1",
                "-u",
                "sensor-1",
                "-P",
                &token,
                "-t",
                "ingest/temperature/sensor-1",
                "-m",
                "{}",
            ])
            .output()
            .unwrap();
        assert!(!output.status.success());
    }

    // HTTPS: the same API, with the same token rules.
    let output = Command::new("curl")
        .args([
            "-s",
            "--cacert",
            ca_path.to_str().unwrap(),
            "-H",
            &format!("Authorization: Bearer {}", server.admin),
        ])
        .args([
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"sql":"SELECT count(*) FROM temperature"}"#,
        ])
        .arg(format!("https://localhost:{}/v1/query", https.port()))
        .output()
        .expect("curl");
    let body: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    let expected = if mosquitto_available() { 2 } else { 1 };
    assert_eq!(
        body["rows"][0][0],
        expected,
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );

    // Silent clients are dropped after the handshake deadline.
    let mut closed = 0;
    for mut socket in silent {
        let mut buf = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut socket, &mut buf),
        )
        .await
        {
            closed += 1;
        }
    }
    assert_eq!(
        closed, 20,
        "silent TLS clients must be dropped at the handshake deadline"
    );
}

#[tokio::test]
async fn tls_flags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    // `fleetgate up` on ephemeral ports with `extra`; its stderr, if it failed.
    let up_fails = |extra: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args([
                "up",
                "--data",
                data,
                "--mqtt",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--pg",
                "127.0.0.1:0",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    assert!(up_fails(&["--mqtts", "127.0.0.1:0"]).contains("need --cert and --key, or --dev-tls"));
    std::fs::write(dir.path().join("not-a-cert.pem"), "hello").unwrap();
    let bad = dir.path().join("not-a-cert.pem");
    let bad = bad.to_str().unwrap();
    let stderr = up_fails(&[
        "--mqtts",
        "127.0.0.1:0",
        "--https",
        "127.0.0.1:0",
        "--cert",
        bad,
        "--key",
        bad,
    ]);
    assert!(stderr.contains("no PEM certificate"), "{stderr}");
}

#[tokio::test]
async fn concurrent_handshakes_are_capped_and_the_cap_frees_up() {
    use tokio::io::AsyncReadExt;
    let server = Server::start_with(
        Backend::Sqlite,
        &[&DEV_TLS[..], &["--tls-max-handshakes", "2"]].concat(),
    )
    .await;
    let mqtts = addr(&server, "mqtts");
    // Two silent clients hold both handshake slots...
    let silent: Vec<tokio::net::TcpStream> =
        futures::future::join_all((0..2).map(|_| tokio::net::TcpStream::connect(mqtts)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    // ...so a third connection is closed at once, not left waiting.
    let mut third = tokio::net::TcpStream::connect(mqtts).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the third connection should be closed: {read:?}"
    );
    // Once the silent ones leave, a new connection gets its handshake slot
    // (it stays open, waiting for a ClientHello).
    drop(silent);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut next = tokio::net::TcpStream::connect(mqtts).await.unwrap();
        let read = tokio::time::timeout(Duration::from_millis(300), next.read(&mut byte)).await;
        if read.is_err() {
            break; // still open after 300 ms: it holds a slot
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slots were not freed"
        );
    }
}
