//! The query API: who may query, and that it only ever reads stream tables.

use serde_json::json;

use crate::harness::{publish_acked, Backend, Server};

async fn permissions_and_read_only(backend: Backend) {
    let server = Server::with_temperature(backend).await;
    let sensor = server.add_device("sensor-1", "ingest").await;
    let analyst = server.add_device("analyst-1", "extract").await;
    let payloads: Vec<String> = (0..10)
        .map(|i| format!(r#"{{"seq":{i},"celsius":{}}}"#, 20 + i))
        .collect();
    publish_acked(
        &server,
        "sensor-1",
        &sensor,
        "ingest/temperature/sensor-1",
        &payloads,
    )
    .await;

    let sql = json!({"sql": "SELECT device_id, count(*) AS n, avg(celsius) AS mean FROM temperature GROUP BY device_id"});
    let (status, body) = server
        .api("POST", "/v1/query", Some(&analyst), Some(sql.clone()))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["columns"], json!(["device_id", "n", "mean"]));
    assert_eq!(body["rows"], json!([["sensor-1", 10, 24.5]]));

    let (status, body) = server
        .api("POST", "/v1/query", Some(&sensor), Some(sql.clone()))
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("needs the extract role"));
    let (status, _) = server
        .api("POST", "/v1/query", None, Some(sql.clone()))
        .await;
    assert_eq!(status, 401);
    let (status, _) = server
        .api("POST", "/v1/query", Some("fg1.garbage.garbage"), Some(sql))
        .await;
    assert_eq!(status, 401);

    // The database's own message for a query it cannot run.
    let (status, body) = server
        .api(
            "POST",
            "/v1/query",
            Some(&analyst),
            Some(json!({"sql": "SELECT nope FROM temperature"})),
        )
        .await;
    assert_eq!(status, 400);
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("nope"), "{message}");

    // Nothing that writes, attaches or reads outside the stream tables.
    for sql in [
        "DELETE FROM temperature",
        "DROP TABLE temperature",
        "UPDATE temperature SET celsius = 0",
        "INSERT INTO temperature (device_id, received_at, seq) VALUES ('x', 0, 99)",
        "ATTACH DATABASE '/tmp/evil.db' AS evil",
        "SELECT * FROM fleetgate_devices",
        "SELECT * FROM temperature; DELETE FROM temperature",
        "WITH gone AS (DELETE FROM temperature RETURNING *) SELECT * FROM gone",
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT load_extension('/tmp/evil.so')",
        "CREATE TABLE evil (x INT)",
        "PRAGMA writable_schema = ON",
    ] {
        let (status, body) = server
            .api(
                "POST",
                "/v1/query",
                Some(&analyst),
                Some(json!({"sql": sql})),
            )
            .await;
        assert_eq!(status, 400, "{sql} -> {body}");
        assert!(body["error"].is_string());
    }
    assert_eq!(server.count("SELECT count(*) FROM temperature").await, 10);

    // An empty result still names its columns.
    let (status, body) = server
        .api(
            "POST",
            "/v1/query",
            Some(&analyst),
            Some(json!({"sql": "SELECT seq, celsius FROM temperature WHERE seq > 100"})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["columns"], json!(["seq", "celsius"]));
    assert_eq!(body["rows"], json!([]));
}

crate::on_both_backends!(permissions_and_read_only);

/// A query that would run forever is stopped at the deadline, on SQLite too,
/// and runaway queries do not starve the others.
async fn runaway_queries_are_stopped(backend: Backend) {
    let server = Server::start_with(backend, &["--query-timeout", "1s"]).await;
    let (status, _) = server.apply_streams(crate::harness::TEMPERATURE).await;
    assert_eq!(status, 200);
    let forever = json!({"sql": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"});
    let started = std::time::Instant::now();
    // More runaway queries at once than there are read connections.
    let runaways: Vec<_> = (0..6)
        .map(|_| {
            server.api(
                "POST",
                "/v1/query",
                Some(&server.admin),
                Some(forever.clone()),
            )
        })
        .collect();
    for (status, body) in futures::future::join_all(runaways).await {
        assert_eq!(status, 408, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("did not finish"),
            "{body}"
        );
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(server.count("SELECT count(*) FROM temperature").await, 0);
}

crate::on_both_backends!(runaway_queries_are_stopped);
