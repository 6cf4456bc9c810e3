//! Live administration: revocation and role changes take effect on open
//! sessions at once, repeated refusals ban a device, and every admin action
//! is audited.

use std::time::{Duration, Instant};

use fleetgate_protocol::Role;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, DisconnectReasonCode, Packet, SubscribeReasonCode,
};
use serde_json::json;

use crate::harness::{connect_v4, connect_v5, foreign_token, now, Backend, Server, V5};

/// Waits for the server's DISCONNECT; returns its reason and when it came.
async fn disconnected(client: &mut V5) -> (DisconnectReasonCode, Instant) {
    client
        .expect(|p| match p {
            Packet::Disconnect(d) => Some((d.reason_code, Instant::now())),
            _ => None,
        })
        .await
}

async fn revocation_is_immediate(backend: Backend) {
    let server = Server::with_temperature(backend).await;
    let sensor_token = server.add_device("sensor-1", "ingest").await;
    let analyst_token = server.add_device("analyst-1", "extract").await;
    let mut sensor = connect_v5(&server, "sensor-1", &sensor_token)
        .await
        .unwrap();
    assert!(matches!(
        sensor.subscribe("devices/sensor-1/#").await,
        SubscribeReasonCode::Success(_)
    ));
    let mut analyst = connect_v5(&server, "analyst-1", &analyst_token)
        .await
        .unwrap();
    assert!(matches!(
        analyst.subscribe("live/#").await,
        SubscribeReasonCode::Success(_)
    ));

    for (device, client, token) in [
        ("sensor-1", &mut sensor, &sensor_token),
        ("analyst-1", &mut analyst, &analyst_token),
    ] {
        let started = Instant::now();
        let (status, body) = server
            .api(
                "POST",
                &format!("/v1/devices/{device}/revoke"),
                Some(&server.admin),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let (reason, at) = disconnected(client).await;
        assert_eq!(reason, DisconnectReasonCode::NotAuthorized);
        let took = at - started;
        assert!(
            took < Duration::from_secs(1),
            "{device}'s session closed {took:?} after the revoke command"
        );
        // Its token stops working everywhere: reconnects and HTTP.
        assert_eq!(
            connect_v5(&server, device, token).await.err(),
            Some(ConnectReturnCode::NotAuthorized)
        );
        let (status, _) = server.api("GET", "/v1/streams", Some(token), None).await;
        assert_eq!(status, 401);
    }
    // And nobody can mint a new one for it.
    let (status, _) = server
        .api(
            "POST",
            "/v1/devices/sensor-1/token",
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(status, 409);
}

/// Changes `device`'s role, sees its live session end with "administrative
/// action", and reconnects it with the token it already has.
async fn change_role(
    server: &Server,
    session: &mut V5,
    device: &str,
    token: &str,
    role: &str,
) -> V5 {
    let (status, _) = server
        .api(
            "POST",
            &format!("/v1/devices/{device}/role"),
            Some(&server.admin),
            Some(json!({ "role": role })),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        disconnected(session).await.0,
        DisconnectReasonCode::AdministrativeAction
    );
    connect_v5(server, device, token).await.unwrap()
}

async fn role_changes_apply_to_live_sessions(backend: Backend) {
    let server = Server::with_temperature(backend).await;
    let analyst_token = server.add_device("analyst-1", "extract").await;
    let sensor_token = server.add_device("sensor-1", "ingest").await;
    let query = json!({"sql": "SELECT count(*) FROM temperature"});

    // Downgrade: the analyst is cut off live/# now, and its token no longer queries.
    let mut analyst = connect_v5(&server, "analyst-1", &analyst_token)
        .await
        .unwrap();
    assert!(matches!(
        analyst.subscribe("live/#").await,
        SubscribeReasonCode::Success(_)
    ));
    let mut analyst =
        change_role(&server, &mut analyst, "analyst-1", &analyst_token, "ingest").await;
    assert_eq!(
        analyst.subscribe("live/#").await,
        SubscribeReasonCode::NotAuthorized
    );
    assert_eq!(
        server
            .api(
                "POST",
                "/v1/query",
                Some(&analyst_token),
                Some(query.clone())
            )
            .await
            .0,
        403
    );

    // Upgrade: the sensor reconnects, with the token it has, as extract.
    let mut sensor = connect_v5(&server, "sensor-1", &sensor_token)
        .await
        .unwrap();
    let mut sensor = change_role(&server, &mut sensor, "sensor-1", &sensor_token, "extract").await;
    assert!(matches!(
        sensor.subscribe("live/#").await,
        SubscribeReasonCode::Success(_)
    ));
    assert_eq!(
        server
            .api("POST", "/v1/query", Some(&sensor_token), Some(query))
            .await
            .0,
        200
    );

    let (status, body) = server
        .api(
            "POST",
            "/v1/devices/sensor-1/role",
            Some(&server.admin),
            Some(json!({"role": "root"})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, _) = server
        .api(
            "POST",
            "/v1/devices/ghost/role",
            Some(&server.admin),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(status, 404);
    for ttl in [-5, 0, i64::MAX] {
        let body = json!({"id": "x", "role": "ingest", "ttl_secs": ttl});
        let (status, reply) = server
            .api("POST", "/v1/devices", Some(&server.admin), Some(body))
            .await;
        assert_eq!(status, 400, "ttl {ttl}: {reply}");
        let ttl_body = Some(json!({ "ttl_secs": ttl }));
        let (status, _) = server
            .api(
                "POST",
                "/v1/devices/sensor-1/token",
                Some(&server.admin),
                ttl_body,
            )
            .await;
        assert_eq!(status, 400, "ttl {ttl}");
    }
    let (_, devices) = server
        .api("GET", "/v1/devices", Some(&server.admin), None)
        .await;
    assert_eq!(
        devices["devices"].as_array().unwrap().len(),
        3,
        "a refused ttl creates no device"
    );
}

async fn repeated_refusals_ban_the_device(backend: Backend) {
    let mut server =
        Server::start_with(backend, &["--alert-threshold", "3", "--ban-duration", "1h"]).await;
    let token = server.add_device("sensor-1", "ingest").await;
    let mut live = connect_v5(&server, "sensor-1", &token).await.unwrap();
    // Forged tokens raise alerts but never ban: anyone could make them for
    // any device id.
    for _ in 0..5 {
        assert!(connect_v4(&server, "sensor-1", "forged").await.is_err());
    }
    let (_, body) = server
        .api("GET", "/v1/bans", Some(&server.admin), None)
        .await;
    assert_eq!(body["bans"], json!([]), "forged tokens must not ban");
    // Someone else's genuinely signed (expired) token, presented under
    // sensor-1's client id: not held against sensor-1 either.
    server.add_device("sensor-2", "ingest").await;
    let others = server.mint("sensor-2", Role::Ingest, now() - 7200, now() - 3600);
    for _ in 0..5 {
        assert!(connect_v4(&server, "sensor-1", &others).await.is_err());
    }
    let (_, body) = server
        .api("GET", "/v1/bans", Some(&server.admin), None)
        .await;
    assert_eq!(
        body["bans"],
        json!([]),
        "another device's token must not ban sensor-1"
    );
    // A genuinely signed but expired token, three times: that is the device
    // itself misbehaving.
    let expired = server.mint("sensor-1", Role::Ingest, now() - 7200, now() - 3600);
    for _ in 0..3 {
        assert!(connect_v4(&server, "sensor-1", &expired).await.is_err());
    }
    // The third bans it: its open session ends, the right token is refused.
    assert_eq!(
        disconnected(&mut live).await.0,
        DisconnectReasonCode::AdministrativeAction
    );
    assert_eq!(
        connect_v5(&server, "sensor-1", &token).await.err(),
        Some(ConnectReturnCode::Banned)
    );
    assert_eq!(
        connect_v4(&server, "sensor-1", &token).await.err(),
        Some(rumqttc::ConnectReturnCode::NotAuthorized)
    );
    let (status, body) = server
        .api("GET", "/v1/bans", Some(&server.admin), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["bans"][0]["device"], "sensor-1", "{body}");
    assert!(body["bans"][0]["until"].as_i64().unwrap() > now() + 3000);

    // A ban outlives a restart.
    server.interrupt();
    server.restart();
    assert_eq!(
        connect_v5(&server, "sensor-1", &token).await.err(),
        Some(ConnectReturnCode::Banned)
    );

    let (status, _) = server
        .api("DELETE", "/v1/bans/sensor-1", Some(&server.admin), None)
        .await;
    assert_eq!(status, 200);
    assert!(connect_v5(&server, "sensor-1", &token).await.is_ok());
    let (status, _) = server
        .api("DELETE", "/v1/bans/sensor-1", Some(&server.admin), None)
        .await;
    assert_eq!(status, 404);
}

async fn admin_actions_are_audited(backend: Backend) {
    let server = Server::start(backend).await;
    let (status, _) = server.apply_streams(crate::harness::TEMPERATURE).await;
    assert_eq!(status, 200);
    let extract = server.add_device("analyst-1", "extract").await;
    server.add_device("sensor-1", "ingest").await;
    for (method, path, body) in [
        (
            "POST",
            "/v1/devices/sensor-1/token",
            json!({"ttl_secs": 60}),
        ),
        (
            "POST",
            "/v1/devices/sensor-1/role",
            json!({"role": "extract"}),
        ),
        ("POST", "/v1/devices/sensor-1/revoke", json!({})),
    ] {
        let (status, body) = server
            .api(method, path, Some(&server.admin), Some(body))
            .await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (status, body) = server
        .api("GET", "/v1/audit", Some(&server.admin), None)
        .await;
    assert_eq!(status, 200);
    let entries = body["entries"].as_array().unwrap();
    let actions: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["target"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("device.revoke", "sensor-1"),
            ("device.role", "sensor-1"),
            ("device.token", "sensor-1"),
            ("device.add", "sensor-1"),
            ("device.add", "analyst-1"),
            ("stream.apply", "streams"),
        ]
    );
    assert!(entries.iter().all(|e| e["actor"] == "admin"));
    assert_eq!(
        entries[1]["detail"],
        json!({"from": "ingest", "to": "extract"})
    );

    // Only an admin, with a genuine and current token, may do any of it.
    let forged = foreign_token("admin");
    let expired = server.mint("admin", Role::Admin, now() - 7200, now() - 3600);
    for (token, expected) in [
        (extract.as_str(), 403),
        (forged.as_str(), 401),
        (expired.as_str(), 401),
    ] {
        for (method, path) in [
            ("GET", "/v1/audit"),
            ("GET", "/v1/devices"),
            ("POST", "/v1/devices/analyst-1/revoke"),
            ("GET", "/v1/bans"),
        ] {
            let (status, _) = server.api(method, path, Some(token), None).await;
            assert_eq!(status, expected, "{method} {path}");
        }
    }
    let (status, body) = server
        .api("GET", "/v1/audit", Some(&server.admin), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["entries"].as_array().unwrap().len(),
        6,
        "refused calls change nothing"
    );
}

/// Issue 17 I: refused actions were logged like successful ones. Each entry
/// now carries its outcome: done, or refused (or failed) with the reason.
async fn audit_entries_carry_their_outcome(backend: Backend) {
    let server = Server::start(backend).await;
    let (status, _) = server.apply_streams(crate::harness::TEMPERATURE).await;
    assert_eq!(status, 200);
    server.add_device("sensor-1", "ingest").await;
    // Refused by the store once its entry was written: a field's type
    // cannot change.
    let changed = crate::harness::TEMPERATURE.replace(
        r#"fields.label    = { type = "string" }"#,
        r#"fields.label    = { type = "int" }"#,
    );
    let (status, body) = server.apply_streams(&changed).await;
    assert_eq!(status, 400, "{body}");
    let refusal = body["error"].as_str().unwrap().to_string();
    // A view on a stream that does not exist.
    let (status, body) = server
        .post_text(
            "/v1/views",
            &server.admin,
            "[views.v]\nsource = \"nowhere\"\nkey = [\"x\"]\n",
        )
        .await;
    assert_eq!(status, 400, "{body}");

    let (status, body) = server
        .api("GET", "/v1/audit", Some(&server.admin), None)
        .await;
    assert_eq!(status, 200);
    let entries: Vec<(String, String, Option<String>)> = body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["outcome"].as_str().expect("an outcome").to_string(),
                e["reason"].as_str().map(str::to_string),
            )
        })
        .collect();
    let outcomes: Vec<(&str, &str)> = entries
        .iter()
        .map(|(action, outcome, _)| (action.as_str(), outcome.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("view.create", "refused"),
            ("stream.apply", "refused"),
            ("device.add", "done"),
            ("stream.apply", "done"),
        ]
    );
    assert_eq!(entries[1].2.as_deref(), Some(refusal.as_str()));
    assert!(
        entries[0].2.as_deref().unwrap().contains("nowhere"),
        "{body}"
    );
    assert_eq!(entries[2].2, None);
}

crate::on_both_backends!(
    revocation_is_immediate,
    role_changes_apply_to_live_sessions,
    repeated_refusals_ban_the_device,
    admin_actions_are_audited,
    audit_entries_carry_their_outcome
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_its_token_expires() {
    let server = Server::with_temperature(Backend::Sqlite).await;
    server.add_device("sensor-1", "ingest").await;
    let short = server.mint("sensor-1", Role::Ingest, now(), now() + 2);
    let mut sensor = connect_v5(&server, "sensor-1", &short).await.unwrap();
    let started = Instant::now();
    let (reason, at) = disconnected(&mut sensor).await;
    assert_eq!(reason, DisconnectReasonCode::MaximumConnectTime);
    assert!(at - started <= Duration::from_secs(3), "{:?}", at - started);
    // And the expired token cannot open another.
    assert!(connect_v5(&server, "sensor-1", &short).await.is_err());
}
