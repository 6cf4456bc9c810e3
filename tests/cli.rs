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
    for (flag, taken) in [("--mqtt", server.mqtt), ("--http", server.http)] {
        let (mqtt, http) = if flag == "--mqtt" {
            (taken.to_string(), "127.0.0.1:0".to_string())
        } else {
            ("127.0.0.1:0".to_string(), taken.to_string())
        };
        let output = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args([
                "up",
                "--data",
                &other_data,
                "--mqtt",
                &mqtt,
                "--http",
                &http,
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
