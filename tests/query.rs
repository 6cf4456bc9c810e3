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
    // Unaliased calls are named by their function on both backends, as
    // PostgreSQL names them, in a derived table too.
    for sql in [
        "SELECT device_id, count(*), MAX(seq) FROM temperature GROUP BY device_id",
        "SELECT * FROM (SELECT device_id, count(*), MAX(seq) FROM temperature GROUP BY device_id) AS t",
    ] {
        let (status, body) = server
            .api("POST", "/v1/query", Some(&analyst), Some(json!({ "sql": sql })))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["columns"], json!(["device_id", "count", "max"]), "{sql}");
        assert_eq!(body["rows"], json!([["sensor-1", 10, 9]]), "{sql}");
    }

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

/// Issue 17 A: a long flat chain (`1=1 AND 1=1 AND …`, `1 + 1 + …`) once
/// overflowed a worker's stack and aborted the whole process (MQTT too).
/// Any query text now answers or gets a 4xx, and the server keeps serving.
async fn hostile_query_text_is_refused(backend: Backend) {
    let server = Server::with_temperature(backend).await;
    let analyst = server.add_device("analyst-1", "extract").await;
    let and_chain = format!("SELECT 1 WHERE {}", vec!["1=1"; 40_000].join(" AND "));
    let bare_and_chain = format!("SELECT 1 WHERE 1{}", " AND 1".repeat(40_000));
    let plus_chain = format!("SELECT 1{}", " + 1".repeat(40_000));
    let union_chain = format!("SELECT 1{}", " UNION ALL SELECT 1".repeat(2_000));
    let nested = format!("SELECT {}1{}", "(".repeat(200), ")".repeat(200));
    let not_chain = format!("SELECT {}1 = 1", "NOT ".repeat(2_000));
    // Under the term budget, yet deeper than a tree the server walks.
    let deep_chain = format!("SELECT 1{}", " + 1".repeat(1_000));
    for (sql, expected) in [
        (&and_chain, "bytes long"),
        (&bare_and_chain, "terms"),
        (&plus_chain, "terms"),
        (&union_chain, "nests"),
        (&nested, "nests"),
        (&not_chain, "nest"),
        (&deep_chain, "nests"),
    ] {
        for path in ["/v1/query", "/v1/query/explain"] {
            let (status, body) = server
                .api("POST", path, Some(&analyst), Some(json!({ "sql": sql })))
                .await;
            let head = &sql[..40];
            assert_eq!(status, 400, "{path} {head}…: {body}");
            let message = body["error"].as_str().unwrap();
            assert!(
                message.contains(expected) && message.contains("at most"),
                "{path} {head}…: {message}"
            );
            // Still serving.
            assert_eq!(server.count("SELECT count(*) FROM temperature").await, 0);
        }
    }
    // Deep but within the limits, through every walk a query takes on a
    // worker's stack: view routing (rewrite and shape), expansion, clones.
    let views = "[views.per_device]\nsource = \"temperature\"\ngroup_by = [\"device_id\"]\n\
                 aggregates = { readings = \"count(*)\", mean = \"avg(celsius)\" }\n";
    let (status, body) = server.post_text("/v1/views", &server.admin, views).await;
    assert_eq!(status, 200, "{body}");
    let devices: Vec<String> = (0..120).map(|i| format!("device_id = 'd{i}'")).collect();
    for sql in [
        format!(
            "SELECT device_id, count(*) FROM temperature WHERE {} GROUP BY device_id",
            devices.join(" OR ")
        ),
        format!(
            "SELECT device_id, avg(celsius{}) FROM temperature GROUP BY device_id",
            " + 0".repeat(240)
        ),
    ] {
        assert_eq!(
            server.rows(&sql).await,
            Vec::<Vec<serde_json::Value>>::new()
        );
    }
    // A chain within the limits answers, on both routes.
    let fine = format!("SELECT 1{} AS n", " + 1".repeat(200));
    assert_eq!(server.rows(&fine).await, vec![vec![json!(201)]]);
    let (status, body) = server
        .api(
            "POST",
            "/v1/query/explain",
            Some(&analyst),
            Some(json!({ "sql": fine })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

crate::on_both_backends!(hostile_query_text_is_refused);

/// Issue 17 D: results are bounded in bytes, not only in rows
/// (`--query-max-bytes`), and so is any value a query builds, so a query
/// that doubles a value, or returns many fat rows, is refused with the
/// limit named instead of taking the server's memory.
async fn results_are_bounded_in_bytes(backend: Backend) {
    let server = Server::start_with(backend, &["--query-max-bytes", "1MiB"]).await;
    let (status, _) = server.apply_streams(crate::harness::TEMPERATURE).await;
    assert_eq!(status, 200);
    let fat = "x".repeat(400);
    let many_rows = |n: u32| {
        format!(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {n}) \
             SELECT x, '{fat}' AS fat FROM c"
        )
    };
    for sql in [
        // 5,000 rows of 400 bytes: 2 MB.
        many_rows(5_000),
        // A value that doubles up to 16 MiB.
        "WITH RECURSIVE d(n, s) AS (SELECT 0, CAST('x' AS TEXT) UNION ALL \
         SELECT n + 1, s || s FROM d WHERE n < 24) SELECT n, s FROM d"
            .to_string(),
        // One row over the bound, built in one go.
        "WITH RECURSIVE d(n, s) AS (SELECT 0, CAST('x' AS TEXT) UNION ALL \
         SELECT n + 1, s || s FROM d WHERE n < 22) SELECT max(s) FROM d"
            .to_string(),
    ] {
        let (status, body) = server
            .api(
                "POST",
                "/v1/query",
                Some(&server.admin),
                Some(json!({ "sql": sql })),
            )
            .await;
        assert_eq!(status, 422, "{sql}: {body}");
        let message = body["error"].as_str().unwrap();
        assert!(
            message.contains("--query-max-bytes") && message.contains("1 MiB"),
            "{sql}: {message}"
        );
    }
    // Within the bound: answered, whole and in order, even with duplicate
    // column names and a trailing semicolon and comment.
    let body = server.query(&many_rows(1_000)).await;
    assert_eq!(body["rows"].as_array().unwrap().len(), 1_000);
    let body = server
        .query("SELECT x, x FROM (SELECT 1 AS x UNION ALL SELECT 2 UNION ALL SELECT 3) t ORDER BY 1 DESC; -- newest first")
        .await;
    assert_eq!(body["columns"], json!(["x", "x"]));
    assert_eq!(body["rows"], json!([[3, 3], [2, 2], [1, 1]]));
    assert_eq!(server.count("SELECT count(*) FROM temperature").await, 0);
}

crate::on_both_backends!(results_are_bounded_in_bytes);
