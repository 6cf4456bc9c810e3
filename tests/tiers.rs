//! Retention and tiering: rows older than a stream's `hot` move to its cold
//! tier and queries still see them; a re-sent record whose key went cold is
//! not stored again; rows older than its `ttl` are deleted, from its views
//! too, which still answer as the primary table does.

use serde_json::{json, Value};

use crate::harness::{publish_acked, Backend, Server};
use crate::on_both_backends;

const METER: &str = r#"
[streams.meter]
key = ["device_id", "seq"]
hot = "2s"
ttl = "12s"
fields.seq = { type = "int", required = true }
fields.kwh = { type = "float", required = true }
"#;

const VIEWS: &str = r#"
[views.per_second]
source = "meter"
group_by = ["device_id"]
bucket = { column = "received_at", width = "1s" }
aggregates = { n = "count(*)", used = "sum(kwh)" }

[views.per_device]
source = "meter"
group_by = ["device_id"]
aggregates = { n = "count(*)", peak = "max(kwh)" }
refresh = { every = "1s" }

[views.by_kwh]
source = "meter"
key = ["kwh"]
"#;

const DEVICES: [&str; 2] = ["m1", "m2"];

fn readings(seqs: std::ops::Range<i64>) -> Vec<String> {
    seqs.map(|seq| json!({ "seq": seq, "kwh": seq as f64 * 0.5 }).to_string())
        .collect()
}

async fn publish(server: &Server, tokens: &[String], seqs: std::ops::Range<i64>) {
    for (device, token) in DEVICES.iter().zip(tokens) {
        let topic = format!("ingest/meter/{device}");
        publish_acked(server, device, token, &topic, &readings(seqs.clone())).await;
    }
}

/// The query through whatever view answers it, and on the primary tables.
async fn assert_views_match_primary(server: &Server, sql: &str, view: &str) {
    let routed = server.query(sql).await;
    assert_eq!(routed["view"], view, "{sql}");
    let primary = server
        .query(&format!("SELECT * FROM ({sql}) AS primary_only"))
        .await;
    assert_eq!(primary["view"], Value::Null);
    let sorted = |body: &Value| {
        let mut rows: Vec<String> = body["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.to_string())
            .collect();
        rows.sort();
        rows
    };
    assert_eq!(sorted(&routed), sorted(&primary), "{sql}");
}

async fn assert_views_answer_as_the_tables(server: &Server) {
    assert_views_match_primary(
        server,
        "SELECT device_id, count(*), max(kwh) FROM meter GROUP BY device_id",
        "per_device",
    )
    .await;
    assert_views_match_primary(
        server,
        "SELECT device_id, sum(kwh) FROM meter WHERE received_at >= 0 GROUP BY device_id",
        "per_second",
    )
    .await;
    assert_views_match_primary(
        server,
        "SELECT device_id, seq FROM meter WHERE kwh >= 10",
        "by_kwh",
    )
    .await;
}

fn tier_rows(body: &Value) -> (i64, i64) {
    (
        body["hot_rows"].as_i64().unwrap(),
        body["cold_rows"].as_i64().unwrap(),
    )
}

on_both_backends!(old_rows_move_cold_stay_queryable_and_expire_with_their_views);
async fn old_rows_move_cold_stay_queryable_and_expire_with_their_views(backend: Backend) {
    let server = Server::start(backend).await;
    let (status, body) = server.apply_streams(METER).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.post_text("/v1/views", &server.admin, VIEWS).await;
    assert_eq!(status, 200, "{body}");
    let mut tokens = Vec::new();
    for device in DEVICES {
        tokens.push(server.add_device(device, "ingest").await);
    }
    let tiers = "/v1/streams/meter/tiers";

    publish(&server, &tokens, 1..101).await;
    server
        .wait_for(tiers, "the first batch to go cold", |b| {
            tier_rows(b) == (0, 200)
        })
        .await;
    publish(&server, &tokens, 101..151).await;

    // Every row, whichever tier holds it: by scan, by key, under an alias.
    let all = server
        .query("SELECT count(*), sum(kwh) FROM meter WHERE seq >= 0")
        .await;
    assert_eq!(all["view"], Value::Null);
    assert_eq!(
        all["rows"],
        json!([[300, 2.0 * 0.5 * (150.0 * 151.0 / 2.0)]])
    );
    let seqs = server.query(
        "SELECT m.seq FROM meter AS m WHERE m.device_id = 'm1' AND m.seq IN (1, 100, 101, 150) ORDER BY m.seq",
    )
    .await;
    assert_eq!(seqs["rows"], json!([[1], [100], [101], [150]]));
    let (status, explained) = server
        .api(
            "POST",
            "/v1/query/explain",
            Some(&server.admin),
            Some(json!({ "sql": "SELECT seq FROM meter WHERE seq > 70" })),
        )
        .await;
    assert_eq!(status, 200, "{explained}");
    assert!(
        explained["sql"].as_str().unwrap().contains("fgc_meter"),
        "the primary table is both tiers: {explained}"
    );
    assert_views_answer_as_the_tables(&server).await;

    // A device re-sends records whose keys went cold: stored once.
    publish(&server, &tokens, 1..21).await;
    let counted = server
        .query("SELECT count(*) FROM meter WHERE kwh >= 0")
        .await;
    assert_eq!(counted["rows"], json!([[300]]));
    assert_views_answer_as_the_tables(&server).await;

    // The first batch passes its ttl: gone from both tiers and every view;
    // the second is still there.
    let stats = server
        .wait_for(tiers, "the first batch to expire", |b| {
            let (hot, cold) = tier_rows(b);
            hot + cold < 300
        })
        .await;
    let (hot, cold) = tier_rows(&stats);
    assert_eq!(hot + cold, 100, "{stats}");
    let left = server
        .query("SELECT min(seq), max(seq), count(*) FROM meter WHERE kwh >= 0")
        .await;
    assert_eq!(left["rows"], json!([[101, 150, 100]]));
    assert_views_answer_as_the_tables(&server).await;
    assert!(
        server.log().contains("expired rows deleted"),
        "{}",
        server.log()
    );
}

on_both_backends!(bad_tier_settings_are_refused);
async fn bad_tier_settings_are_refused(backend: Backend) {
    let server = Server::start(backend).await;
    let stream = |extra: &str| {
        format!(
            "[streams.meter]\nkey = [\"device_id\", \"seq\"]\n{extra}\nfields.seq = {{ type = \"int\", required = true }}\n"
        )
    };
    for (extra, says) in [
        ("hot = \"soon\"", "hot = \"soon\""),
        ("hot = \"10ms\"", "at least 1s"),
        ("hot = \"2d\"\nttl = \"1d\"", "must be shorter than ttl"),
    ] {
        let (status, body) = server.apply_streams(&stream(extra)).await;
        assert_eq!(status, 400, "{extra}: {body}");
        assert!(body["error"].as_str().unwrap().contains(says), "{body}");
    }
    let (status, body) = server.apply_streams(&stream("hot = \"1h\"")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.apply_streams(&stream("")).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("hot cannot be removed"),
        "{body}"
    );
    let (status, body) = server
        .api(
            "GET",
            "/v1/streams/nothing/tiers",
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(status, 404, "{body}");
}
