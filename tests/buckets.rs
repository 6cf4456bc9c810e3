//! Time-bucketed real-time keys: a bucketed stream stores a record sent
//! twice once, lists its buckets oldest first and reads one in time order;
//! when a batch run covers a period, that period's real-time rows move, in
//! whole buckets, to the superseded table (where late records for it go
//! too), and views over the stream still answer as the stream does.

use serde_json::{json, Value};

use crate::harness::{nightly_orders_job, Backend, Server};
use crate::on_both_backends;

const DAY: i64 = 1_795_132_800_000; // 2026-11-20T00:00:00Z
const HOUR: i64 = 3_600_000;

const STREAMS: &str = r#"
[streams.purchases]
key = ["event_id"]
bucket = { time = "ordered_at", width = "1h" }
fields.event_id = { type = "string", required = true }
fields.order_id = { type = "string", required = true }
fields.amount = { type = "float", required = true }
fields.ordered_at = { type = "timestamp", required = true }
"#;

const VIEWS: &str = r#"
[views.hourly]
source = "purchases"
bucket = { column = "ordered_at", width = "1h" }
aggregates = { n = "count(*)", total = "sum(amount)" }

[views.by_order]
source = "purchases"
key = ["order_id"]
fields = ["amount"]
"#;

const REPORTS: &str = r#"
[reports.sales]
value = "sum(amount)"
bucket = "1d"
batch = { table = "orders_batch", time = "ordered_at" }
realtime = { stream = "purchases", time = "ordered_at" }
reconcile = { key = "order_id", compare = ["amount"] }
"#;

fn purchase(event: &str, order: &str, amount: f64, at: i64) -> Value {
    json!({ "event_id": event, "order_id": order, "amount": amount, "ordered_at": at })
}

async fn ingest(server: &Server, token: &str, records: Vec<Value>) {
    let (status, body) = server
        .post_text(
            "/v1/ingest/purchases",
            token,
            &Value::Array(records).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

/// (bucket, rows, superseded rows, superseding run) per bucket.
async fn buckets(server: &Server) -> Vec<(i64, i64, i64, Value)> {
    let (status, body) = server
        .api(
            "GET",
            "/v1/streams/purchases/buckets",
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["bucket"].as_i64().unwrap(),
                b["rows"].as_i64().unwrap(),
                b["superseded_rows"].as_i64().unwrap(),
                b["superseded_by"].clone(),
            )
        })
        .collect()
}

on_both_backends!(a_batch_swaps_out_the_real_time_buckets_it_supersedes);
async fn a_batch_swaps_out_the_real_time_buckets_it_supersedes(backend: Backend) {
    let server = Server::start(backend).await;
    for bad in [
        STREAMS.replace("key = [\"event_id\"]\n", ""),
        STREAMS.replace(
            "ordered_at = { type = \"timestamp\", required = true }",
            "ordered_at = { type = \"timestamp\" }",
        ),
        STREAMS.replace("width = \"1h\"", "width = \"soon\""),
    ] {
        let (status, body) = server.apply_streams(&bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, body) = server.apply_streams(STREAMS).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.post_text("/v1/views", &server.admin, VIEWS).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server
        .post_text("/v1/reports", &server.admin, REPORTS)
        .await;
    assert_eq!(status, 200, "{body}");
    let shop = server.add_device("shop-web", "ingest").await;

    // The day, out of order: e2 is sent twice (stored once), order o3 is
    // submitted twice as two events, e1c happened before e1.
    let at = |hour: i64, minute: i64| DAY + hour * HOUR + minute * 60_000;
    ingest(
        &server,
        &shop,
        vec![
            purchase("e5", "o5", 15.0, at(5, 0)),
            purchase("e1", "o1", 11.0, at(1, 30)),
            purchase("e1c", "o1c", 21.0, at(1, 10)),
            purchase("e0", "o0", 10.0, at(0, 0)),
            purchase("e2", "o2", 12.0, at(2, 0)),
            purchase("e3", "o3", 13.0, at(3, 0)),
            purchase("e3b", "o3", 13.0, at(3, 1)),
            purchase("e4", "o4", 14.0, at(4, 0)),
            purchase("e9", "o9", 99.0, at(25, 0)),
        ],
    )
    .await;
    ingest(&server, &shop, vec![purchase("e2", "o2", 12.0, at(2, 0))]).await;
    assert_eq!(server.count("SELECT count(*) FROM purchases").await, 9);

    let listed = buckets(&server).await;
    let hours: Vec<(i64, i64)> = listed.iter().map(|b| ((b.0 - DAY) / HOUR, b.1)).collect();
    assert_eq!(
        hours,
        [(0, 1), (1, 2), (2, 1), (3, 2), (4, 1), (5, 1), (25, 1)]
    );
    let in_order = server
        .rows(&format!(
            "SELECT event_id FROM purchases WHERE fg_bucket = {} ORDER BY ordered_at",
            at(1, 0)
        ))
        .await;
    assert_eq!(in_order, [[json!("e1c")], [json!("e1")]]);

    // The nightly export: o3 once, and o6, which real time never saw.
    let export = server.etl_dir().join("orders.csv");
    let mut csv = String::from("order_id,amount,ordered_at\n");
    for (order, amount, hour, minute) in [
        ("o0", 10.0, 0, 0),
        ("o1", 11.0, 1, 30),
        ("o1c", 21.0, 1, 10),
        ("o2", 12.0, 2, 0),
        ("o3", 13.0, 3, 0),
        ("o4", 14.0, 4, 0),
        ("o5", 15.0, 5, 0),
        ("o6", 16.0, 6, 0),
    ] {
        csv.push_str(&format!("{order},{amount},{}\n", at(hour, minute)));
    }
    std::fs::write(&export, csv).unwrap();
    let columns = r#"order_id = "text", amount = "float", ordered_at = "timestamp""#;
    let job = nightly_orders_job("nightly", &export, columns);
    let run = server.start_job(&job, "nightly").await;

    // The reconciliation saw the real-time rows before they moved.
    let listed = server
        .wait_for(
            "/v1/reconciliations?report=sales",
            "the reconciliation",
            |b| !b["reconciliations"].as_array().unwrap().is_empty(),
        )
        .await;
    let d = &listed["reconciliations"][0]["differences"];
    assert_eq!(d["duplicates"], json!([{ "key": "o3", "times": 2 }]), "{d}");
    assert_eq!(d["missing_in_realtime"], json!(["o6"]), "{d}");

    // Then the day's buckets left the stream, whole, marked with the run.
    server
        .wait_for("/v1/streams/purchases/buckets", "the swap", |b| {
            b["buckets"]
                .as_array()
                .unwrap()
                .iter()
                .all(|b| b["bucket"].as_i64().unwrap() >= DAY + 24 * HOUR || b["rows"] == 0)
        })
        .await;
    let listed = buckets(&server).await;
    for (bucket, rows, superseded, by) in &listed {
        if *bucket < DAY + 24 * HOUR {
            assert_eq!((*rows, by), (0, &json!(run)), "{listed:?}");
            assert!(*superseded > 0);
        } else {
            assert_eq!((*rows, *superseded), (1, 0), "{listed:?}");
        }
    }
    assert_eq!(server.count("SELECT count(*) FROM purchases").await, 1);
    let kept = format!("SELECT count(*) FROM fgs_purchases WHERE fg_superseded_by = {run}");
    assert_eq!(server.count(&kept).await, 8);
    // Superseded details join the batch rows by the common key.
    let joined = server
        .count(
            "SELECT count(*) FROM fgs_purchases s JOIN orders_batch b ON b.order_id = s.order_id",
        )
        .await;
    assert_eq!(joined, 8);

    // The view was rebuilt with the swap: it answers as the stream does.
    let through_view = server
        .query("SELECT count(*), sum(amount) FROM purchases")
        .await;
    assert_eq!(through_view["view"], "hourly", "{through_view}");
    assert_eq!(through_view["rows"], json!([[1, 99.0]]));
    for (order, rows) in [("o9", json!([[99.0]])), ("o3", json!([]))] {
        let sql = format!("SELECT amount FROM purchases WHERE order_id = '{order}'");
        let by_order = server.query(&sql).await;
        assert_eq!(
            (&by_order["view"], &by_order["rows"]),
            (&json!("by_order"), &rows),
            "{sql}"
        );
    }

    // A late record of a superseded day joins the superseded rows, once.
    for _ in 0..2 {
        ingest(&server, &shop, vec![purchase("e7", "o7", 17.0, at(2, 30))]).await;
    }
    assert_eq!(server.count("SELECT count(*) FROM purchases").await, 1);
    assert_eq!(server.count(&kept).await, 9);

    // The report takes that day from the batch.
    let body = crate::reports::series(&server).await;
    let points: Vec<(i64, f64, String)> = body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let source = p["source"].as_str().unwrap().to_string();
            (
                p["bucket"].as_i64().unwrap(),
                p["value"].as_f64().unwrap(),
                source,
            )
        })
        .collect();
    assert_eq!(
        points,
        [
            (DAY, 112.0, "batch".to_string()),
            (DAY + 24 * HOUR, 99.0, "realtime".to_string())
        ]
    );

    // By hand, for the next day; a stream without buckets cannot.
    let (status, body) = server
        .api(
            "POST",
            "/v1/streams/purchases/buckets/swap?from=2026-11-21&to=2026-11-22",
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rows"], 1);
    assert_eq!(server.count("SELECT count(*) FROM purchases").await, 0);
    let (status, body) = server
        .apply_streams("[streams.plain]\nfields.x = { type = \"int\" }\n")
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server
        .api(
            "POST",
            "/v1/streams/plain/buckets/swap?from=2026-11-21&to=2026-11-22",
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("not bucketed"),
        "{body}"
    );
}
