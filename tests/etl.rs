//! Batch ETL: jobs declared in TOML, run from the command line and on a
//! schedule, reading CSV, JSON lines and a SQL database.

use std::path::Path;

use serde_json::{json, Value};

use crate::harness::{fleetgate_async, Backend, Server};
use crate::on_both_backends;

/// The nightly export: a CSV of orders and a JSON-lines customer list.
/// Planted problems, by line: 4 has a field too many, 5 an amount that
/// is not a number, 6 a gender code without translation, 7 a negative
/// amount (discarded by rule, not rejected), 8 re-states order o2 (the
/// later line wins); customers' line 3 is not JSON.
const ORDERS_CSV: &str = "\
order_id,customer,gender,amount,ordered_at,note
o1,c1,F,10.50,2026-11-20T09:00:00Z,first
o2,c2,M,20.00,2026-11-20 10:30:00,
o3,c1,F,7.25,2026-11-20T11:00:00Z,x,extra
o4,c2,M,abc,2026-11-20T12:00:00Z,
o5,c1,X,3.00,2026-11-20T13:00:00Z,
o6,c2,F,-1,2026-11-20T14:00:00Z,refund
o2,c2,M,22.00,2026-11-20T10:30:00Z,corrected
o7,c3,M,5.00,2026-11-20T23:59:59Z,
";

const CUSTOMERS_JSONL: &str = r#"{"customer": "c1", "region": "north", "born": "1990-11-21"}
{"customer": "c2", "region": "south", "born": "1985-01-01"}
{"customer": "c3", "region": "east"
"#;

fn orders_job(dir: &Path) -> String {
    format!(
        r#"
[jobs.orders_nightly]

[jobs.orders_nightly.sources.orders]
csv = "{dir}/export/orders-*.csv"
columns = {{ order_id = "text", customer = "text", gender = "text", amount = "float", ordered_at = "timestamp" }}

[jobs.orders_nightly.sources.customers]
jsonl = "{dir}/export/customers.jsonl"
columns = {{ customer = "text", region = "text", born = "timestamp" }}

[[jobs.orders_nightly.rules]]
discard = "amount < 0"

[[jobs.orders_nightly.rules]]
translate = "gender"
map = {{ F = 1, M = 2 }}

[[jobs.orders_nightly.rules]]
join = "customers"
on = "customer"

[[jobs.orders_nightly.rules]]
derive = "age"
expr = "age(born, ordered_at)"

[[jobs.orders_nightly.rules]]
drop = ["born"]

[jobs.orders_nightly.load]
table = "orders_batch"
mode = "upsert"
key = ["order_id"]
time = "ordered_at"
covers = "1d"
"#,
        dir = dir.display()
    )
}

fn write_export(dir: &Path) {
    let export = dir.join("export");
    std::fs::create_dir_all(&export).unwrap();
    std::fs::write(export.join("orders-2026-11-20.csv"), ORDERS_CSV).unwrap();
    std::fs::write(export.join("customers.jsonl"), CUSTOMERS_JSONL).unwrap();
}

async fn get(server: &Server, path: &str) -> Value {
    let (status, body) = server.api("GET", path, Some(&server.admin), None).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

on_both_backends!(a_job_extracts_transforms_and_loads_with_rejects_per_row);
async fn a_job_extracts_transforms_and_loads_with_rejects_per_row(backend: Backend) {
    let server = Server::start(backend).await;
    let dir = server.etl_dir();
    write_export(&dir);
    let file = dir.join("jobs.toml");
    std::fs::write(&file, orders_job(&dir)).unwrap();
    let (ok, out, err) = fleetgate_async(&server, &["etl", "apply", file.to_str().unwrap()]).await;
    assert!(ok, "{out}{err}");

    let (ok, out, err) = fleetgate_async(&server, &["etl", "run", "orders_nightly"]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("3 rows loaded, 4 rejected"), "{out}");
    assert!(err.contains("read "), "the run shows its progress: {err}");

    let rows = server
        .rows("SELECT order_id, customer, gender, amount, region, age FROM orders_batch ORDER BY order_id")
        .await;
    assert_eq!(
        rows,
        vec![
            vec![
                json!("o1"),
                json!("c1"),
                json!(1),
                json!(10.5),
                json!("north"),
                json!(35)
            ],
            vec![
                json!("o2"),
                json!("c2"),
                json!(2),
                json!(22.0),
                json!("south"),
                json!(41)
            ],
            // c3's customer line is unreadable: a left join keeps the order.
            vec![
                json!("o7"),
                json!("c3"),
                json!(2),
                json!(5.0),
                Value::Null,
                Value::Null
            ],
        ]
    );

    let runs = get(&server, "/v1/etl/runs?job=orders_nightly").await;
    let run = &runs["runs"][0];
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["rows_read"], 6 + 2, "{run}");
    assert_eq!(run["rows_loaded"], 3, "{run}");
    // The run covers the whole day of its orders.
    assert_eq!(run["window_from"], 1_795_132_800_000i64, "{run}");
    assert_eq!(run["window_to"], 1_795_219_200_000i64, "{run}");
    // The export was copied, unchanged, into the run's interim area.
    let interim = Path::new(run["interim"].as_str().unwrap());
    let copy = std::fs::read_to_string(interim.join("orders/0000-orders-2026-11-20.csv")).unwrap();
    assert_eq!(copy, ORDERS_CSV);

    let id = run["id"].as_i64().unwrap();
    // A run that does not exist is an error, not an empty list.
    let (ok, _, err) =
        fleetgate_async(&server, &["etl", "rejects", &(id + 1000).to_string()]).await;
    assert!(
        !ok && err.contains(&format!("no run {}", id + 1000)),
        "{err}"
    );
    let rejects = get(&server, &format!("/v1/etl/runs/{id}/rejects")).await;
    let found: Vec<(String, i64, String)> = rejects["rejects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["source"].as_str().unwrap().to_string(),
                r["line"].as_i64().unwrap(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expect = [
        ("customers", 3, "malformed JSON"),
        ("orders", 4, "malformed CSV"),
        ("orders", 5, "amount: \"abc\" is not a number"),
        ("orders", 6, "gender: code X has no translation"),
    ];
    assert_eq!(found.len(), expect.len(), "{found:?}");
    for ((source, line, reason), (s, l, r)) in found.iter().zip(expect) {
        assert_eq!((source.as_str(), *line), (s, l), "{found:?}");
        assert!(reason.contains(r), "line {line}: {reason}");
    }
    assert_eq!(rejects["rejects"][0]["file"], "customers.jsonl");

    // A source that is gone fails the run with the reason; the table keeps
    // the previous load.
    std::fs::remove_file(dir.join("export/orders-2026-11-20.csv")).unwrap();
    let (ok, out, err) = fleetgate_async(&server, &["etl", "run", "orders_nightly"]).await;
    assert!(!ok, "{out}");
    assert!(err.contains("source orders: no file matches"), "{err}");
    assert_eq!(server.count("SELECT count(*) FROM orders_batch").await, 3);
    let runs = get(&server, "/v1/etl/runs?job=orders_nightly").await;
    assert_eq!(runs["runs"][0]["status"], "failed");
    assert_eq!(runs["runs"][1]["status"], "succeeded");
}

on_both_backends!(bad_jobs_are_refused_with_the_reason);
async fn bad_jobs_are_refused_with_the_reason(backend: Backend) {
    let server = Server::start(backend).await;
    let dir = server.etl_dir();
    let good = orders_job(&dir);
    let cases = [
        (
            good.replace("discard = \"amount < 0\"", "discard = \"price < 0\""),
            "rule 1 (discard): in \"price < 0\": no column \"price\"",
        ),
        (
            good.replace("drop = [\"born\"]", "drop = [\"born\"]\n[[jobs.orders_nightly.rules]]\nderive = \"x\"\nexpr = \"age(born, ordered_at)\""),
            "rule 6 (derive)",
        ),
        (good.replace("key = [\"order_id\"]", "key = [\"order\"]"), "load key: no column \"order\""),
        (good.replace("mode = \"upsert\"", "mode = \"merge\""), "unknown variant `merge`"),
        (good.replace("[jobs.orders_nightly]", "[jobs.orders_nightly]\ncron = \"61 * * * *\""), "cron"),
        (good.replace("table = \"orders_batch\"", "table = \"fleetgate_devices\""), "keeps for itself"),
        (good.replace("join = \"customers\"", "join = \"suppliers\""), "no source named \"suppliers\""),
        // A period that would truncate to 0 ms divided by zero when scheduled.
        (
            good.replace("[jobs.orders_nightly]", "[jobs.orders_nightly]\nevery = \"1000000000y\""),
            "longer than the longest supported duration",
        ),
    ];
    for (text, reason) in cases {
        let (status, body) = server.post_text("/v1/etl/jobs", &server.admin, &text).await;
        assert_eq!(status, 400, "{reason}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(reason), "expected {reason:?} in {error:?}");
    }
    let (_, jobs) = server
        .api("GET", "/v1/etl/jobs", Some(&server.admin), None)
        .await;
    assert_eq!(jobs["jobs"], json!([]), "nothing was declared");

    // Running a job that does not exist, and as a non-admin.
    let (status, _) = server
        .api("POST", "/v1/etl/jobs/nope/run", Some(&server.admin), None)
        .await;
    assert_eq!(status, 404);
    let reader = server.add_device("analyst", "extract").await;
    let (status, _) = server.post_text("/v1/etl/jobs", &reader, &good).await;
    assert_eq!(status, 403);
}

// A rollup from a SQL database, replaced per day on each run, and run by
// its schedule.
on_both_backends!(a_scheduled_rollup_from_a_database_overwrites_its_window);
async fn a_scheduled_rollup_from_a_database_overwrites_its_window(backend: Backend) {
    use sqlx::Connection;
    // The shop's database, which the operator lets jobs read by name.
    let shop_dir = tempfile::tempdir().unwrap();
    let shop = shop_dir.path().join("shop.db");
    let configured = format!("shop=sqlite:{}", shop.display());
    let server = Server::start_with(backend, &["--etl-database", &configured]).await;
    let url = format!("sqlite://{}?mode=rwc", shop.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE sales (region TEXT, amount REAL, sold_at TEXT)")
        .execute(&mut conn)
        .await
        .unwrap();
    for (region, amount, at) in [
        ("north", 10.0, "2026-11-20 09:00:00"),
        ("north", 5.0, "2026-11-20 18:00:00"),
        ("south", 7.5, "2026-11-20 12:00:00"),
        ("south", 1.0, "2026-11-21 01:00:00"),
    ] {
        sqlx::query("INSERT INTO sales VALUES ($1, $2, $3)")
            .bind(region)
            .bind(amount)
            .bind(at)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let job = r#"
[jobs.daily_sales]
every = "1s"
[jobs.daily_sales.sources.sales]
sql = "SELECT region, amount, sold_at FROM sales"
database = "shop"
columns = { region = "text", amount = "float", sold_at = "timestamp" }
[[jobs.daily_sales.rules]]
derive = "day"
expr = "date(sold_at)"
[[jobs.daily_sales.rules]]
aggregate = ["day", "region"]
values = { total = "sum(amount)", sales = "count(*)" }
[[jobs.daily_sales.rules]]
sort = ["day", "region"]
[jobs.daily_sales.load]
table = "daily_sales"
mode = "overwrite"
time = "day"
covers = "1d"
"#;
    let (status, body) = server.post_text("/v1/etl/jobs", &server.admin, job).await;
    assert_eq!(status, 200, "{body}");
    // The schedule runs it twice on its own; each run replaces its days.
    server
        .wait_for("/v1/etl/runs?job=daily_sales", "two scheduled runs", |b| {
            let runs = b["runs"].as_array().unwrap();
            runs.iter()
                .filter(|r| r["status"] == "succeeded" && r["trigger"] == "schedule")
                .count()
                >= 2
        })
        .await;
    let rows = server
        .rows("SELECT region, total, sales FROM daily_sales ORDER BY day, region")
        .await;
    assert_eq!(
        rows,
        vec![
            vec![json!("north"), json!(15.0), json!(2)],
            vec![json!("south"), json!(7.5), json!(1)],
            vec![json!("south"), json!(1.0), json!(1)],
        ]
    );
}

// Text that COPY's format and CSV quoting must carry intact: tabs,
// newlines, backslashes, quotes and delimiters inside fields.
on_both_backends!(awkward_text_arrives_unchanged);
async fn awkward_text_arrives_unchanged(backend: Backend) {
    let server = Server::start(backend).await;
    let dir = server.etl_dir();
    let notes = [
        "tab\there",
        "line\nbreak",
        "back\\slash \\N",
        "quote \" and, comma",
        "carriage\rreturn",
    ];
    let mut csv = String::from("id,note\n");
    for (i, note) in notes.iter().enumerate() {
        csv.push_str(&format!("{i},\"{}\"\n", note.replace('"', "\"\"")));
    }
    std::fs::write(dir.join("notes.csv"), csv).unwrap();
    let job = format!(
        r#"
[jobs.notes.sources.notes]
csv = "{}/notes.csv"
columns = {{ id = "int", note = "text" }}
[jobs.notes.load]
table = "notes"
mode = "upsert"
key = ["id"]
"#,
        dir.display()
    );
    let (status, body) = server.post_text("/v1/etl/jobs", &server.admin, &job).await;
    assert_eq!(status, 200, "{body}");
    for _ in 0..2 {
        let (ok, out, err) = fleetgate_async(&server, &["etl", "run", "notes"]).await;
        assert!(ok, "{out}{err}");
    }
    let rows = server.rows("SELECT id, note FROM notes ORDER BY id").await;
    let expected: Vec<Vec<Value>> = notes
        .iter()
        .enumerate()
        .map(|(i, n)| vec![json!(i), json!(n)])
        .collect();
    assert_eq!(rows, expected, "upserted twice, each note once and intact");
}

/// `rows` readings at one a minute from `start_minute`, with a malformed
/// line after every 10,000th.
fn readings_csv(rows: usize, start_minute: i64, value: f64) -> String {
    let mut csv = String::from("sensor,reading,at\n");
    for n in 0..rows {
        let at = 1_795_132_800_000 + (start_minute + n as i64) * 60_000;
        csv.push_str(&format!("s{},{value},{at}\n", n % 7));
        if n % 10_000 == 9_999 {
            csv.push_str("s1,1.5\n");
        }
    }
    csv
}

fn readings_job(name: &str, dir: &Path, mode: &str) -> String {
    format!(
        r#"
[jobs.{name}.sources.readings]
csv = "{}/parts/*.csv"
columns = {{ sensor = "text", reading = "float", at = "timestamp" }}
[[jobs.{name}.rules]]
discard = "reading < 0"
[jobs.{name}.load]
table = "{name}_batch"
mode = "{mode}"
time = "at"
covers = "1d"
"#,
        dir.display()
    )
}

async fn run_to_end(server: &Server, job: &str) -> Value {
    let (ok, out, err) = fleetgate_async(server, &["etl", "run", job]).await;
    let runs = get(server, &format!("/v1/etl/runs?job={job}")).await;
    let run = runs["runs"][0].clone();
    assert_eq!(ok, run["status"] == "succeeded", "{out}{err}{run}");
    run
}

// Runs without sort, aggregate or a key load batch by batch while they
// read: tens of thousands of rows arrive in several batches, and a run
// that fails after some were written leaves the table as it was.
on_both_backends!(a_large_run_loads_while_it_reads_and_fails_whole);
async fn a_large_run_loads_while_it_reads_and_fails_whole(backend: Backend) {
    let server = Server::start(backend).await;
    let dir = server.etl_dir();
    let parts = dir.join("parts");
    std::fs::create_dir_all(&parts).unwrap();
    std::fs::write(parts.join("1.csv"), readings_csv(30_000, 0, 1.5)).unwrap();
    std::fs::write(parts.join("2.csv"), readings_csv(15_000, 30_000, 1.5)).unwrap();
    let jobs = readings_job("append", &dir, "append") + &readings_job("replace", &dir, "overwrite");
    let (status, body) = server.post_text("/v1/etl/jobs", &server.admin, &jobs).await;
    assert_eq!(status, 200, "{body}");

    let run = run_to_end(&server, "append").await;
    assert_eq!(
        (&run["rows_loaded"], &run["rows_rejected"]),
        (&json!(45_000), &json!(4)),
        "{run}"
    );
    assert_eq!(run["rows_read"], 45_000, "{run}");
    // 45,000 minutes from the day's start: the days they fall in.
    assert_eq!(run["window_from"], 1_795_132_800_000i64, "{run}");
    assert_eq!(
        run["window_to"],
        1_795_132_800_000i64 + 32 * 86_400_000,
        "{run}"
    );
    let id = run["id"].as_i64().unwrap();
    let rejects = get(&server, &format!("/v1/etl/runs/{id}/rejects")).await;
    let lines: Vec<(String, i64)> = rejects["rejects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["file"].as_str().unwrap().to_string(),
                r["line"].as_i64().unwrap(),
            )
        })
        .collect();
    // Each malformed line follows the 10,000th row before it (+1 header line).
    let expected = [
        ("1.csv", 10_002),
        ("1.csv", 20_003),
        ("1.csv", 30_004),
        ("2.csv", 10_002),
    ]
    .map(|(f, l)| (f.to_string(), l));
    assert_eq!(lines, expected);
    let count = "SELECT count(*), sum(reading) FROM append_batch";
    assert_eq!(server.rows(count).await, [[json!(45_000), json!(67_500.0)]]);

    // Overwrite twice: the second run's rows replace the first's.
    run_to_end(&server, "replace").await;
    std::fs::write(parts.join("1.csv"), readings_csv(30_000, 0, 2.0)).unwrap();
    std::fs::write(parts.join("2.csv"), readings_csv(15_000, 30_000, 2.0)).unwrap();
    run_to_end(&server, "replace").await;
    let replaced = "SELECT count(*), sum(reading) FROM replace_batch";
    assert_eq!(
        server.rows(replaced).await,
        [[json!(45_000), json!(90_000.0)]]
    );

    // A third file that cannot be read fails the run after the first two
    // were loaded: nothing of it stays.
    std::fs::write(parts.join("3.csv"), "sensor,value\ns1,1\n").unwrap();
    let run = run_to_end(&server, "append").await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["error"]
            .as_str()
            .unwrap()
            .contains("no column \"reading\""),
        "{run}"
    );
    assert_eq!(server.rows(count).await, [[json!(45_000), json!(67_500.0)]]);
}
