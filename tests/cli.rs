//! The `fleetgate` command line and the README's walk-through, as a user
//! runs them.

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use crate::harness::{fleetgate, mosquitto_available, Backend, Server, TEMPERATURE};

#[tokio::test]
async fn admin_commands_and_the_mosquitto_walkthrough() {
    let server = Server::start(Backend::Sqlite).await;
    let mode = std::fs::metadata(server.data_dir().join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin.token must be private");

    let streams = server.data_dir().join("streams.toml");
    std::fs::write(&streams, TEMPERATURE).unwrap();
    let (ok, out, err) = fleetgate(&server, &["stream", "apply", streams.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "temperature: created");
    let (ok, out, _) = fleetgate(&server, &["stream", "apply", streams.to_str().unwrap()]);
    assert!(ok);
    assert_eq!(out.trim(), "temperature: unchanged");

    let (ok, token, err) = fleetgate(
        &server,
        &[
            "device",
            "add",
            "sensor-1",
            "--role",
            "ingest",
            "--type",
            "thermostat",
        ],
    );
    assert!(ok, "{err}");
    let token = token.trim().to_string();
    assert!(token.starts_with("fg1."));
    let (ok, _, err) = fleetgate(&server, &["device", "add", "sensor-1", "--role", "ingest"]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = fleetgate(&server, &["device", "add", "bad id", "--role", "ingest"]);
    assert!(!ok && err.contains("invalid device id"), "{err}");
    let (ok, _, err) = fleetgate(&server, &["device", "add", "x", "--role", "root"]);
    assert!(!ok, "{err}");
    let (ok, analyst, _) = fleetgate(
        &server,
        &["device", "add", "analyst-1", "--role", "extract"],
    );
    assert!(ok);
    let (ok, fresh, _) = fleetgate(&server, &["device", "token", "sensor-1", "--ttl", "1h"]);
    assert!(ok && fresh.trim().starts_with("fg1."));
    let (ok, list, _) = fleetgate(&server, &["device", "list"]);
    assert!(
        ok && list.contains("sensor-1") && list.contains("thermostat"),
        "{list}"
    );

    if mosquitto_available() {
        let port = server.mqtt.port().to_string();
        // An analyst follows live records while the sensor publishes.
        let mut sub = Command::new("mosquitto_sub")
            .args([
                "-p",
                &port,
                "-i",
                "analyst-1",
                "-u",
                "analyst-1",
                "-P",
                analyst.trim(),
                "-t",
                "live/#",
                "-C",
                "1",
                "-v",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // mosquitto_sub prints nothing until subscribed; wait until the
        // gatekeeper counts the subscription, via the metrics endpoint.
        let deadline = std::time::Instant::now() + crate::harness::WAIT;
        while !server
            .metrics()
            .await
            .contains("fleetgate_mqtt_connections 1")
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let status = Command::new("mosquitto_pub")
            .args([
                "-p", &port, "-i", "sensor-1", "-u", "sensor-1", "-P", &token, "-q", "1",
            ])
            .args([
                "-t",
                "ingest/temperature/sensor-1",
                "-m",
                r#"{"seq": 1, "celsius": 21.5, "status": "ok"}"#,
            ])
            .status()
            .unwrap();
        assert!(status.success());
        let mut line = String::new();
        std::io::BufReader::new(sub.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("live/temperature/sensor-1 ["), "{line}");
        assert!(line.contains("21.5"));
        sub.wait().unwrap();

        let (ok, table, err) = fleetgate(
            &server,
            &[
                "query",
                "SELECT device_id, seq, celsius, status FROM temperature",
            ],
        );
        assert!(ok, "{err}");
        assert!(table.contains("sensor-1  | 1   | 21.5    | ok"), "{table}");
        assert!(table.contains("(1 row)"));
    }

    let (ok, _, err) = fleetgate(&server, &["query", "DELETE FROM temperature"]);
    assert!(!ok && err.contains("400"), "{err}");
}

#[tokio::test]
async fn a_taken_port_is_named_with_its_flag() {
    let server = Server::start(Backend::Sqlite).await;
    let other_data = server.data_dir().join("other").display().to_string();
    let pg = server.extra_addr("pg").expect("pg address");
    for (flag, taken) in [
        ("--mqtt", server.mqtt),
        ("--http", server.http),
        ("--pg", pg),
    ] {
        let address = |f: &str| {
            if f == flag {
                taken.to_string()
            } else {
                "127.0.0.1:0".to_string()
            }
        };
        let (mqtt, http, pg) = (address("--mqtt"), address("--http"), address("--pg"));
        let output = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args([
                "up",
                "--data",
                &other_data,
                "--mqtt",
                &mqtt,
                "--http",
                &http,
                "--pg",
                &pg,
            ])
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("already in use") && stderr.contains(flag),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn the_admin_token_is_printed_on_first_start_only() {
    let mut server = Server::start(Backend::Sqlite).await;
    let first_log = server.data_dir().join("admin.token");
    assert!(first_log.exists());
    server.kill9();
    let output = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args(server.up_args())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = output;
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let ready = line.starts_with("fleetgate ready:");
        printed.push(line);
        if ready {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !printed.iter().any(|l| l.contains("admin token")),
        "{printed:?}"
    );
}

/// The README's walk-through declares `temperature`; the firmware examples'
/// streams apply on top of it (adding fields, changing none), and the
/// README's other examples declare streams of other names.
#[tokio::test]
async fn the_firmware_streams_apply_on_top_of_the_walkthrough() {
    let readme = include_str!("../README.md");
    let walkthrough = readme
        .split("cat > streams.toml <<'EOF'\n")
        .nth(1)
        .and_then(|rest| rest.split("\nEOF\n").next())
        .expect("the walk-through's streams.toml in README.md");
    let server = Server::start(Backend::Sqlite).await;
    let (status, body) = server.apply_streams(walkthrough).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server
        .apply_streams(include_str!("../firmware-examples/streams.toml"))
        .await;
    assert_eq!(status, 200, "{body}");
    let applied = body.to_string();
    assert!(applied.contains("room"), "{applied}");
    // The cluster-state section's stream is not the firmware's `sales`.
    assert!(readme.contains("[streams.checkout]"));
    assert_eq!(readme.matches("[streams.sales]").count(), 0);
    // The firmware walk-through registers devices the README has not.
    let firmware = include_str!("../firmware-examples/README.md");
    for id in ["thermo-1", "till-1", "dash-1"] {
        assert!(firmware.contains(&format!("device add {id} ")), "{id}");
        assert!(!readme.contains(&format!("device add {id} ")), "{id}");
    }
}

/// `fleetgate status` shows an operator the server at a glance.
#[tokio::test]
async fn status_shows_connections_ingest_views_and_runs() {
    let server = Server::with_temperature(Backend::Sqlite).await;
    let token = server.add_device("t1", "ingest").await;
    let readings: Vec<String> = (0..20)
        .map(|seq| serde_json::json!({ "seq": seq, "celsius": 20.5 }).to_string())
        .collect();
    crate::harness::publish_acked(&server, "t1", &token, "ingest/temperature/t1", &readings).await;
    // One device stays connected while the status is taken.
    let _connected = crate::harness::connect_v5(&server, "t1", &token)
        .await
        .expect("connect");
    let (ok, out, err) = fleetgate(&server, &["status", "--interval", "200ms"]);
    assert!(ok, "{err}");
    let line = |label: &str| {
        out.lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no {label} in {out}"))
            .split('|')
            .map(|c| c.trim().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(line("devices connected")[1], "1", "{out}");
    assert_eq!(line("records stored")[2], "20", "{out}");
    assert_eq!(line("records rejected")[2], "0", "{out}");
    assert!(out.contains("store: in this process"), "{out}");
    assert!(out.contains("views: none"), "{out}");
    assert!(out.contains("newest alerts: none"), "{out}");
    assert!(out.contains("newest ETL runs: none"), "{out}");
}
