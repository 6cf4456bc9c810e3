//! `fleetgate bench --etl N`: what a batch job costs against the ceiling
//! of a plain bulk load of the same file into the same database, and how
//! fast a year-long hourly report answers with a fresh real-time tail.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::{api, ms, percentile, spawn_server, ScratchDatabase, Spawned};

/// 2025-11-22T00:00:00Z: the orders span the year before the bench's "now".
const YEAR_START_MS: i64 = 1_763_769_600_000;
const YEAR_MS: i64 = 365 * 86_400_000;
const CUSTOMERS: usize = 1000;
const REPORT_QUERIES: usize = 50;

fn write_files(dir: &std::path::Path, rows: usize) -> anyhow::Result<()> {
    use std::io::Write;
    let mut orders = std::io::BufWriter::new(std::fs::File::create(dir.join("orders.csv"))?);
    writeln!(orders, "order_id,customer,gender,amount,ordered_at")?;
    for n in 0..rows {
        let at = YEAR_START_MS + (n as i64 * 7_919 * 1000) % YEAR_MS;
        let time = chrono::DateTime::from_timestamp_millis(at).expect("in range");
        writeln!(
            orders,
            "o{n},c{},{},{}.{:02},{}",
            n % CUSTOMERS,
            if n % 2 == 0 { "F" } else { "M" },
            n % 500,
            n % 100,
            time.format("%Y-%m-%d %H:%M:%S")
        )?;
    }
    orders.flush()?;
    let mut customers = std::io::BufWriter::new(std::fs::File::create(dir.join("customers.csv"))?);
    writeln!(customers, "customer,region")?;
    for c in 0..CUSTOMERS {
        writeln!(
            customers,
            "c{c},{}",
            ["north", "south", "east", "west"][c % 4]
        )?;
    }
    customers.flush()?;
    Ok(())
}

fn job(dir: &std::path::Path) -> String {
    format!(
        r#"
[jobs.bench_orders.sources.orders]
csv = "{dir}/orders.csv"
columns = {{ order_id = "text", customer = "text", gender = "text", amount = "float", ordered_at = "timestamp" }}
[jobs.bench_orders.sources.customers]
csv = "{dir}/customers.csv"
columns = {{ customer = "text", region = "text" }}
[[jobs.bench_orders.rules]]
translate = "gender"
map = {{ F = 1, M = 2 }}
[[jobs.bench_orders.rules]]
join = "customers"
on = "customer"
[jobs.bench_orders.load]
table = "orders_batch"
mode = "append"
time = "ordered_at"
covers = "1h"
"#,
        dir = dir.display()
    )
}

async fn get(
    http: &reqwest::Client,
    server: &Spawned,
    token: &str,
    path: &str,
) -> anyhow::Result<Value> {
    let response = http
        .get(format!("{}{path}", server.http))
        .bearer_auth(token)
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    if !status.is_success() {
        bail!("{path}: {status} {body}");
    }
    Ok(body)
}

/// The same file into a plain table of the same database: PostgreSQL's
/// COPY, or (SQLite) multi-row INSERTs in one transaction.
async fn bulk_load(dir: &std::path::Path, database: Option<&str>) -> anyhow::Result<Duration> {
    use sqlx::Connection;
    let file = dir.join("etl-sources").join("orders.csv");
    let create = "CREATE TABLE plain_orders (order_id TEXT, customer TEXT, gender TEXT, amount DOUBLE PRECISION, ordered_at TEXT)";
    let started = Instant::now();
    match database {
        Some(url) => {
            let mut conn = sqlx::PgConnection::connect(url).await?;
            sqlx::query(create).execute(&mut conn).await?;
            let mut copy = conn
                .copy_in_raw("COPY plain_orders FROM STDIN WITH (FORMAT csv, HEADER true)")
                .await?;
            copy.send(tokio::fs::read(&file).await?).await?;
            copy.finish().await?;
        }
        None => {
            let url = format!("sqlite://{}", dir.join("store.db").display());
            let mut conn = sqlx::SqliteConnection::connect(&url).await?;
            sqlx::query(create).execute(&mut conn).await?;
            let mut reader = csv::Reader::from_path(&file)?;
            let records: Vec<csv::StringRecord> = reader.records().collect::<Result<_, _>>()?;
            let mut tx = conn.begin().await?;
            for chunk in records.chunks(512) {
                let mut insert = sqlx::QueryBuilder::new(
                    "INSERT INTO plain_orders (order_id, customer, gender, amount, ordered_at) ",
                );
                insert.push_values(chunk, |mut row, r| {
                    row.push_bind(&r[0])
                        .push_bind(&r[1])
                        .push_bind(&r[2])
                        .push_bind(r[3].parse::<f64>().unwrap_or_default())
                        .push_bind(&r[4]);
                });
                insert.build().persistent(true).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
    }
    Ok(started.elapsed())
}

pub async fn run(rows: usize, database: Option<&str>) -> anyhow::Result<()> {
    let scratch = match database {
        Some(url) => Some(ScratchDatabase::create(url).await?),
        None => None,
    };
    let url = scratch.as_ref().map(|s| s.url.clone());
    let server = spawn_server(url.as_deref(), &["--auto-views-budget", "0"])?;
    let dir = server.dir.path().to_path_buf();
    let backend = if url.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    println!(
        "ETL of {rows} orders (join with {CUSTOMERS} customers, gender translated) on {backend}"
    );
    // Under the server's --etl-dir (its default, <data>/etl-sources):
    // sources are read nowhere else.
    let sources = dir.join("etl-sources");
    write_files(&sources, rows)?;
    let http = reqwest::Client::new();
    let token = std::fs::read_to_string(dir.join("admin.token"))?
        .trim()
        .to_string();
    api(&http, &server, "/v1/etl/jobs", job(&sources).into(), false).await?;

    let started = Instant::now();
    let reply = api(
        &http,
        &server,
        "/v1/etl/jobs/bench_orders/run",
        reqwest::Body::from(""),
        false,
    )
    .await?;
    let id = reply["run"].as_i64().context("no run id")?;
    let run = loop {
        let run = get(&http, &server, &token, &format!("/v1/etl/runs/{id}")).await?;
        if run["status"] != "running" {
            break run;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let etl = started.elapsed();
    if run["status"] != "succeeded" {
        bail!("the run failed: {run}");
    }
    let loaded = run["rows_loaded"].as_u64().unwrap_or(0);
    let ceiling = bulk_load(&dir, url.as_deref()).await?;
    let rate = |d: Duration| rows as f64 / d.as_secs_f64();
    println!(
        "  ETL run:   {loaded} rows in {:.2} s = {:.0} rows/s",
        etl.as_secs_f64(),
        rate(etl)
    );
    println!(
        "  bulk load: {rows} rows in {:.2} s = {:.0} rows/s ({})",
        ceiling.as_secs_f64(),
        rate(ceiling),
        if url.is_some() {
            "COPY"
        } else {
            "multi-row INSERT, one transaction"
        }
    );
    println!(
        "  ETL / bulk load: {:.0}%",
        100.0 * rate(etl) / rate(ceiling)
    );

    // A year of hourly batch data, and a fresh real-time tail after it.
    api(
        &http,
        &server,
        "/v1/streams",
        "[streams.orders.fields]\norder_id = { type = \"string\" }\nregion = { type = \"string\" }\namount = { type = \"float\" }\nordered_at = { type = \"timestamp\" }\n".into(),
        false,
    )
    .await?;
    let tail_start = YEAR_START_MS + YEAR_MS;
    let tail: Vec<Value> = (0..1000)
        .map(|i| json!({"order_id": format!("rt{i}"), "region": "north", "amount": 1.5, "ordered_at": tail_start + i * 3_600})
        )
        .collect();
    api(
        &http,
        &server,
        "/v1/ingest/orders",
        Value::Array(tail).to_string().into(),
        true,
    )
    .await?;
    let report = "[reports.sales]\nvalue = \"sum(amount)\"\ngroup_by = \"region\"\nbucket = \"1h\"\nbatch = { table = \"orders_batch\", time = \"ordered_at\" }\nrealtime = { stream = \"orders\", time = \"ordered_at\" }\n";
    api(&http, &server, "/v1/reports", report.into(), false).await?;
    let path = format!(
        "/v1/reports/sales?from={YEAR_START_MS}&to={}",
        tail_start + 3_600_000
    );
    // Until the whole answer has arrived (what the client then does with
    // it is the client's time).
    let mut times = Vec::new();
    let mut body = bytes::Bytes::new();
    for _ in 0..REPORT_QUERIES {
        let started = Instant::now();
        let response = http
            .get(format!("{}{path}", server.http))
            .bearer_auth(&token)
            .send()
            .await?
            .error_for_status()?;
        body = response.bytes().await?;
        times.push(started.elapsed());
    }
    let body: Value = serde_json::from_slice(&body)?;
    let points = body["points"].as_array().map_or(0, Vec::len);
    times.sort();
    println!(
        "  report over a year, hourly by region ({points} points, real-time tail of 1000 records): p50 {} p99 {}",
        ms(percentile(&times, 0.50)),
        ms(percentile(&times, 0.99))
    );
    drop(server);
    if let Some(scratch) = scratch {
        scratch.drop_database().await;
    }
    Ok(())
}
