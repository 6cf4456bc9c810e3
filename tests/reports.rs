//! The e-commerce story: purchases arrive in real time over HTTP during the
//! day; the nightly CSV export of the same orders is loaded; the report
//! switches to the batch for that day, and the reconciliation lists
//! exactly the differences planted in the real-time feed.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::harness::{nightly_orders_job, Backend, Server};
use crate::on_both_backends;

const DAY: i64 = 1_795_132_800_000; // 2026-11-20T00:00:00Z
const HOUR: i64 = 3_600_000;

const STREAMS: &str = r#"
[streams.orders.fields]
order_id = { type = "string", required = true }
region = { type = "string", required = true }
amount = { type = "float", required = true }
ordered_at = { type = "timestamp", required = true }
"#;

const REPORTS: &str = r#"
[reports.sales]
value = "sum(amount)"
group_by = "region"
bucket = "1d"
batch = { table = "orders_batch", time = "ordered_at" }
realtime = { stream = "orders", time = "ordered_at" }
reconcile = { key = "order_id", compare = ["amount", "region"] }
"#;

/// The day's true orders: (id, region, amount, hour).
fn true_orders() -> Vec<(String, &'static str, f64, i64)> {
    (1..=20)
        .map(|n| {
            let region = ["north", "south", "east"][n % 3];
            (format!("o{n:02}"), region, 10.0 + n as f64, (n as i64) % 24)
        })
        .collect()
}

fn order_json(id: &str, region: &str, amount: f64, at: i64) -> Value {
    json!({ "order_id": id, "region": region, "amount": amount, "ordered_at": at })
}

pub async fn series(server: &Server) -> Value {
    let (status, body) = server
        .api(
            "GET",
            "/v1/reports/sales?from=2026-11-20&to=2026-11-22",
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// (day, region) → (value, source).
fn points(body: &Value) -> BTreeMap<(i64, String), (f64, String)> {
    body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                (
                    p["bucket"].as_i64().unwrap(),
                    p["series"].as_str().unwrap().to_string(),
                ),
                (
                    p["value"].as_f64().unwrap(),
                    p["source"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

/// Declares the orders stream and the sales report.
pub async fn declare_story(server: &Server) {
    let (status, body) = server.apply_streams(STREAMS).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server
        .post_text("/v1/reports", &server.admin, REPORTS)
        .await;
    assert_eq!(status, 200, "{body}");
}

/// The day's purchases over HTTP, as the shop's web pages send them.
pub async fn feed_the_day(server: &Server) {
    let shop = server.add_device("shop-web", "ingest").await;

    // The day's real-time feed: o05 and o12 are lost, o07 arrives twice,
    // o09 carries a wrong amount, o14 arrives late (after the next day's
    // first order), and one order of the next day.
    let mut feed = Vec::new();
    let mut late = None;
    for (id, region, amount, hour) in true_orders() {
        let at = DAY + hour * HOUR;
        match id.as_str() {
            "o05" | "o12" => continue,
            "o07" => feed.extend([
                order_json(&id, region, amount, at),
                order_json(&id, region, amount, at),
            ]),
            "o09" => feed.push(order_json(&id, region, amount - 5.0, at)),
            "o14" => late = Some(order_json(&id, region, amount, at)),
            _ => feed.push(order_json(&id, region, amount, at)),
        }
    }
    let next_day = order_json("o21", "north", 99.0, DAY + 24 * HOUR + HOUR);
    let (status, body) = server
        .post_text("/v1/ingest/orders", &shop, &Value::Array(feed).to_string())
        .await;
    assert_eq!(status, 200, "{body}");
    for record in [next_day, late.unwrap()] {
        let (status, body) = server
            .post_text("/v1/ingest/orders", &shop, &record.to_string())
            .await;
        assert_eq!(status, 200, "{body}");
    }
}

/// The nightly export loaded by a job; returns the reconciliation that
/// follows the run.
pub async fn load_the_nightly_export(server: &Server) -> Value {
    // The nightly export of the same orders, loaded by a job.
    let export = server.etl_dir().join("orders-2026-11-20.csv");
    let mut csv = String::from("order_id,region,amount,ordered_at\n");
    for (id, region, amount, hour) in true_orders() {
        csv.push_str(&format!("{id},{region},{amount},{}\n", DAY + hour * HOUR));
    }
    std::fs::write(&export, csv).unwrap();
    let columns =
        r#"order_id = "text", region = "text", amount = "float", ordered_at = "timestamp""#;
    let job = nightly_orders_job("orders_nightly", &export, columns);
    server.start_job(&job, "orders_nightly").await;

    // The reconciliation follows the run by itself.
    let listed = server
        .wait_for(
            "/v1/reconciliations?report=sales",
            "the reconciliation",
            |b| !b["reconciliations"].as_array().unwrap().is_empty(),
        )
        .await;
    listed["reconciliations"][0].clone()
}

on_both_backends!(the_report_switches_to_the_nightly_batch_and_reconciles_it);
async fn the_report_switches_to_the_nightly_batch_and_reconciles_it(backend: Backend) {
    let server = Server::start(backend).await;
    declare_story(&server).await;
    feed_the_day(&server).await;

    // Before the batch: every point is real-time.
    let before = series(&server).await;
    assert_eq!(before["boundary"], Value::Null);
    let expected_realtime_north: f64 = true_orders()
        .iter()
        .filter(|o| o.1 == "north" && o.0 != "o05" && o.0 != "o12")
        .map(|o| {
            if o.0 == "o07" {
                2.0 * o.2
            } else if o.0 == "o09" {
                o.2 - 5.0
            } else {
                o.2
            }
        })
        .sum();
    let p = points(&before);
    assert_eq!(
        p[&(DAY, "north".into())],
        (expected_realtime_north, "realtime".into())
    );
    assert_eq!(
        p[&(DAY + 24 * HOUR, "north".into())],
        (99.0, "realtime".into())
    );

    let r = &load_the_nightly_export(&server).await;
    assert_eq!(
        (r["window_from"].as_i64(), r["window_to"].as_i64()),
        (Some(DAY), Some(DAY + 24 * HOUR))
    );
    let d = &r["differences"];
    assert_eq!(d["missing_in_realtime"], json!(["o05", "o12"]), "{d}");
    assert_eq!(d["missing_in_batch"], json!([]), "{d}");
    assert_eq!(
        d["duplicates"],
        json!([{ "key": "o07", "times": 2 }]),
        "{d}"
    );
    assert_eq!(
        d["different"],
        json!([{ "key": "o09", "column": "amount", "batch": 19.0, "realtime": 14.0 }]),
        "{d}"
    );
    assert_eq!(d["batch_rows"], 20);
    assert_eq!(d["realtime_rows"], 19);
    assert!(r["run"].is_i64(), "{r}");

    // After the batch: the day comes from the batch, the next from real time.
    let after = series(&server).await;
    assert_eq!(after["boundary"], DAY + 24 * HOUR);
    let p = points(&after);
    let true_north: f64 = true_orders()
        .iter()
        .filter(|o| o.1 == "north")
        .map(|o| o.2)
        .sum();
    assert_eq!(p[&(DAY, "north".into())], (true_north, "batch".into()));
    assert_eq!(
        p[&(DAY + 24 * HOUR, "north".into())],
        (99.0, "realtime".into())
    );
    for ((bucket, _), (_, source)) in &p {
        assert_eq!(source, if *bucket == DAY { "batch" } else { "realtime" });
    }
    // The real-time rows are kept (acknowledged data is never deleted).
    assert_eq!(server.count("SELECT count(*) FROM orders").await, 20);

    // On demand, for any period; a report without reconcile settings or
    // a bad period is refused.
    let (status, body) = server
        .api(
            "POST",
            "/v1/reports/sales/reconcile?from=2026-11-21&to=2026-11-22",
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["differences"]["missing_in_batch"], json!(["o21"]));
    let (status, _) = server
        .api(
            "POST",
            "/v1/reports/sales/reconcile",
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(status, 400);
    let (status, body) = server
        .post_text(
            "/v1/reports",
            &server.admin,
            &REPORTS.replace("stream = \"orders\"", "stream = \"nope\""),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("no stream named"),
        "{body}"
    );
    // A batch table no job loads is accepted (the job may come later) but
    // said, so a misspelling does not silently serve real-time data only.
    let misspelled = REPORTS.replace("table = \"orders_batch\"", "table = \"orders_btach\"");
    let (status, body) = server
        .post_text("/v1/reports", &server.admin, &misspelled)
        .await;
    assert_eq!(status, 200, "{body}");
    let warning = body["warnings"][0].as_str().unwrap_or_default();
    assert!(
        warning
            .contains("no ETL job loads a table named \"orders_btach\" (jobs load: orders_batch)"),
        "{body}"
    );
    let (status, body) = server
        .post_text("/v1/reports", &server.admin, REPORTS)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["warnings"], json!([]), "{body}");
}
