//! Column compaction: fields no query touches are folded into `extra` and
//! their columns dropped; queries still read them by name, records that
//! arrive meanwhile keep them, and a field that queries (or a new view)
//! use again gets its column back with every value in it. Keys, booleans
//! and fields views read are never compacted; a field an analysis reads is
//! used.

use serde_json::{json, Value};

use crate::harness::{publish_acked, Backend, Server};
use crate::on_both_backends;

// Tiered and bucketed, so both tiers and the superseded table are folded
// and unfolded (and the trigger that copies late rows follows).
const CLIMATE: &str = r#"
[streams.climate]
key = ["device_id", "seq"]
hot = "1s"
bucket = { time = "received_at", width = "1h" }
fields.seq = { type = "int", required = true }
fields.celsius = { type = "float", required = true }
fields.humidity = { type = "float" }
fields.room = { type = "string" }
fields.mode = { type = "enum", values = ["idle", "heat", "cool"], code = true }
fields.note = { type = "string" }
fields.door_open = { type = "bool" }
fields.pressure = { type = "float" }
"#;

// No query reads pressure; an analysis does, which counts as use.
const PRESSURE: &str = r#"
[analyses.pressure_hourly]
stream = "climate"
value = "pressure"
"#;

const PER_DEVICE: &str = r#"
[views.per_device]
source = "climate"
group_by = ["device_id"]
aggregates = { n = "count(*)", mean = "avg(celsius)" }
"#;

const BY_ROOM: &str = r#"
[views.by_room]
source = "climate"
group_by = ["room"]
aggregates = { n = "count(*)" }
"#;

const MODES: [&str; 3] = ["idle", "heat", "cool"];

fn celsius(seq: i64) -> f64 {
    // Values with no short decimal form, which a lossy fold would change.
    seq as f64 / 3.0 + 0.1
}

fn humidity(seq: i64) -> f64 {
    seq as f64 / 7.0 + 40.0
}

fn record(seq: i64) -> Value {
    let mut record = json!({
        "seq": seq,
        "celsius": celsius(seq),
        "humidity": humidity(seq),
        "mode": MODES[seq as usize % 3],
        "door_open": seq % 2 == 0,
        "firmware": format!("1.{seq}"),
    });
    // Some records leave optional fields out: NULL, before and after.
    if seq % 5 != 0 {
        record["room"] = json!(format!("room-{}", seq % 4));
        record["note"] = json!(format!("note \"{seq}\" ünïcode"));
    }
    record
}

/// What a query of every field returns for `seq`, as the test wrote it.
fn expected_row(seq: i64) -> Value {
    let r = record(seq);
    json!([
        seq,
        celsius(seq),
        humidity(seq),
        r["room"],
        seq % 3,
        r["note"],
        seq % 2 == 0,
        { "firmware": format!("1.{seq}") },
    ])
}

const EVERY_FIELD: &str = "SELECT seq, celsius, humidity, room, mode, note, door_open, extra \
                           FROM climate WHERE device_id = 'c1' ORDER BY seq";

async fn assert_every_field(server: &Server, seqs: std::ops::RangeInclusive<i64>) {
    let mut rows = server.rows(EVERY_FIELD).await;
    for row in &mut rows {
        // `extra` is JSON text (PostgreSQL may respace it): compare it parsed.
        row[7] = serde_json::from_str(row[7].as_str().expect("extra is text")).unwrap();
    }
    let expected: Vec<Value> = seqs.map(expected_row).collect();
    assert_eq!(Value::from(rows), Value::from(expected));
}

async fn publish(server: &Server, token: &str, seqs: std::ops::RangeInclusive<i64>) {
    let payloads: Vec<String> = seqs.map(|s| record(s).to_string()).collect();
    publish_acked(server, "c1", token, "ingest/climate/c1", &payloads).await;
}

fn stored(fields: &Value) -> Vec<(String, String)> {
    fields["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let name = f["field"].as_str().unwrap().to_string();
            (name, f["stored"].as_str().unwrap().to_string())
        })
        .collect()
}

fn where_stored(fields: &Value, field: &str) -> String {
    stored(fields)
        .into_iter()
        .find(|(f, _)| f == field)
        .map(|(_, s)| s)
        .unwrap()
}

on_both_backends!(unused_fields_fold_into_extra_and_come_back_when_queried);
async fn unused_fields_fold_into_extra_and_come_back_when_queried(backend: Backend) {
    let server = Server::start_with(backend, &["--compact-after", "3s"]).await;
    let (status, body) = server.apply_streams(CLIMATE).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server
        .post_text("/v1/views", &server.admin, PER_DEVICE)
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server
        .post_text("/v1/analyses", &server.admin, PRESSURE)
        .await;
    assert_eq!(status, 200, "{body}");
    let token = server.add_device("c1", "ingest").await;
    publish(&server, &token, 1..=40).await;

    let fields_path = "/v1/streams/climate/fields";
    let fields = server
        .wait_for(
            fields_path,
            "humidity, room, mode and note to be compacted",
            |b| {
                ["humidity", "room", "mode", "note"]
                    .iter()
                    .all(|f| where_stored(b, f) == "extra")
            },
        )
        .await;
    assert_eq!(where_stored(&fields, "pressure"), "column", "{fields}");
    // The key, the boolean and the field a view reads stay columns, saying why.
    for (field, why) in [
        ("seq", "key"),
        ("door_open", "boolean"),
        ("celsius", "view per_device"),
    ] {
        let entry = fields["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["field"] == field)
            .unwrap();
        assert_eq!(entry["stored"], "column", "{field}");
        assert_eq!(entry["pinned"], why, "{field}");
    }
    let (ok, out, err) =
        crate::harness::fleetgate_async(&server, &["stream", "fields", "climate"]).await;
    assert!(ok, "{err}");
    let line = |field: &str| out.lines().find(|l| l.starts_with(field)).unwrap_or("");
    assert!(line("celsius ").contains("view per_device"), "{out}");
    assert!(line("note ").contains("extra"), "{out}");
    let (_, streams) = server
        .api("GET", "/v1/streams", Some(&server.admin), None)
        .await;
    let columns = &streams["streams"][0]["columns"];
    assert!(
        !columns.as_array().unwrap().contains(&json!("note")),
        "{columns}"
    );

    // Records arriving while compacted keep every field, rows already cold too.
    publish(&server, &token, 41..=60).await;
    // Keys where folded fields live are the platform's, not a device's.
    let (status, body) = server
        .post_text(
            "/v1/ingest/climate",
            &token,
            r#"{"seq": 999, "celsius": 1.0, "fg.note": "mine"}"#,
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["first_reason"].as_str().unwrap().contains("reserved"),
        "{body}"
    );
    let view = server
        .query("SELECT device_id, count(*), avg(celsius) FROM climate GROUP BY device_id")
        .await;
    assert_eq!(view["view"], "per_device");
    assert_eq!(view["rows"][0][1], 60);

    // A new view on a compacted field brings it back first.
    let (status, body) = server.post_text("/v1/views", &server.admin, BY_ROOM).await;
    assert_eq!(status, 200, "{body}");
    let fields = server.wait_for(fields_path, "the fields", |_| true).await;
    assert_eq!(where_stored(&fields, "room"), "column");
    let by_room = server
        .query("SELECT room, count(*) FROM climate GROUP BY room ORDER BY room")
        .await;
    assert_eq!(by_room["view"], "by_room");
    let nulls = (1..=60).filter(|s| s % 5 == 0).count();
    let null_room = by_room["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r[0].is_null());
    assert_eq!(null_room, Some(&json!([null, nulls])), "{by_room}");

    // Queried while compacted, every value reads as it was sent...
    assert_eq!(where_stored(&fields, "note"), "extra");
    assert_every_field(&server, 1..=60).await;
    let filtered = server
        .rows("SELECT count(*) FROM climate WHERE mode = 2 AND note LIKE 'note%'")
        .await;
    let cool = (1..=60).filter(|s| s % 3 == 2 && s % 5 != 0).count();
    assert_eq!(filtered, vec![vec![json!(cool)]]);

    // ...and having been used, they are columns again (until unused again).
    server
        .wait_for(fields_path, "humidity, mode and note to be promoted", |b| {
            ["humidity", "mode", "note"]
                .iter()
                .all(|f| where_stored(b, f) == "column")
        })
        .await;
    publish(&server, &token, 61..=80).await;
    assert_every_field(&server, 1..=80).await;
}
