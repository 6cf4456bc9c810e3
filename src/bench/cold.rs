//! `fleetgate bench --cold N`: what the compressed cold tier saves and
//! costs. N sensor readings over 1,000 devices go into a tiered stream's
//! hot table; then the table's size against the cold tier's after every
//! row moved, the move rate, and a fleet-wide aggregate and a query for
//! the newest 1% of receive times, before (hot) and after (cold).

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use fleetgate_store::db::Backend;
use fleetgate_store::{query, with_pool, Db};

use super::{ms, percentile, ScratchDatabase};

const STREAM: &str = r#"
[streams.reading]
key = ["device_id", "seq"]
hot = "1h"
fields.seq = { type = "int", required = true }
fields.celsius = { type = "float", required = true }
fields.status = { type = "string" }
fields.site = { type = "string" }
"#;
const DEVICES: i64 = 1_000;
const RUNS: usize = 5;
/// One reading a second per device, ending an hour before "now".
const NOW_MS: i64 = 1_800_000_000_000;

pub async fn run(rows: usize, database: Option<&str>) -> anyhow::Result<()> {
    let scratch = match database {
        Some(url) => Some(ScratchDatabase::create(url).await?),
        None => None,
    };
    let dir = tempfile::tempdir()?;
    let db = Db::open(
        scratch.as_ref().map(|s| s.url.as_str()),
        &dir.path().join("bench.db"),
    )
    .await
    .map_err(|e| anyhow!(e))?;
    let result = measure(&db, rows as i64).await;
    if let Some(scratch) = scratch {
        scratch.drop_database().await;
    }
    result
}

async fn measure(db: &Db, rows: i64) -> anyhow::Result<()> {
    let catalog = fleetgate_store::open_catalog(db)
        .await
        .map_err(|e| anyhow!(e))?;
    let file = fleetgate_protocol::schema::StreamsFile::parse(STREAM).map_err(|e| anyhow!(e))?;
    catalog.apply(&file).await.map_err(|e| anyhow!(e))?;
    let views = std::sync::Arc::new(
        fleetgate_store::views::Views::open(
            db.clone(),
            catalog.clone(),
            fleetgate_store::views::auto::AutoSettings::off(),
        )
        .await
        .map_err(|e| anyhow!(e))?,
    );
    let tiers = fleetgate_store::tiers::Tiers::new(db.clone(), catalog.clone(), views);
    let stream = catalog.get("reading").context("stream")?;
    let first_ms = NOW_MS - 3_600_000 - rows / DEVICES * 1000;
    println!(
        "cold tier: {rows} readings of {DEVICES} devices ({})",
        match db.backend() {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    );
    let started = Instant::now();
    insert(db, rows, first_ms).await?;
    println!("  inserted in {:.1} s", started.elapsed().as_secs_f64());

    let newest = NOW_MS - 3_600_000 - rows / DEVICES * 10;
    let fleet = "SELECT device_id, count(*), avg(celsius) FROM reading GROUP BY device_id";
    let recent = format!(
        "SELECT device_id, max(celsius) FROM reading WHERE received_at >= {newest} GROUP BY device_id"
    );
    let hot_bytes = table_bytes(db, &["reading"]).await?;
    let hot_fleet = time_query(db, &catalog, fleet).await?;
    let hot_recent = time_query(db, &catalog, &recent).await?;

    let started = Instant::now();
    let moved = tiers
        .move_cold(&stream, NOW_MS)
        .await
        .map_err(|e| anyhow!(e))?;
    let move_time = started.elapsed();
    let stats = tiers.stats(&stream).await.map_err(|e| anyhow!(e))?;
    let cold = stream.cold_table();
    let keys = stream.cold_keys_table();
    let cold_bytes = table_bytes(db, &[&cold]).await?;
    let keys_bytes = table_bytes(db, &[&keys]).await?;
    let cold_fleet = time_query(db, &catalog, fleet).await?;
    let cold_recent = time_query(db, &catalog, &recent).await?;

    println!(
        "  moved {moved} rows into {} chunks in {:.1} s ({:.0} rows/s)",
        stats.cold_chunks,
        move_time.as_secs_f64(),
        moved as f64 / move_time.as_secs_f64()
    );
    let mb = |b: i64| b as f64 / 1e6;
    println!(
        "  hot table with its indexes: {:.1} MB; cold chunks: {:.1} MB ({:.1}x smaller; \
         chunk payload {:.1} MB), plus {:.1} MB of keys",
        mb(hot_bytes),
        mb(cold_bytes),
        hot_bytes as f64 / cold_bytes.max(1) as f64,
        mb(stats.cold_bytes),
        mb(keys_bytes)
    );
    for (what, hot, cold) in [
        ("fleet-wide aggregate", hot_fleet, cold_fleet),
        ("newest 1% of receive times", hot_recent, cold_recent),
    ] {
        println!(
            "  {what}: hot p50 {} p99 {}; cold p50 {} p99 {}",
            ms(percentile(&hot, 0.5)),
            ms(percentile(&hot, 0.99)),
            ms(percentile(&cold, 0.5)),
            ms(percentile(&cold, 0.99)),
        );
    }
    Ok(())
}

/// The rows, in multi-row INSERTs in one transaction per 100,000.
async fn insert(db: &Db, rows: i64, first_ms: i64) -> anyhow::Result<()> {
    const PER_STATEMENT: i64 = 1_000;
    let mut n = 0;
    while n < rows {
        let mut statements = Vec::new();
        for _ in 0..100 {
            if n >= rows {
                break;
            }
            let values: Vec<String> = (n..(n + PER_STATEMENT).min(rows))
                .map(|i| {
                    let device = i % DEVICES;
                    let second = i / DEVICES;
                    let celsius = 18.0 + (i % 997) as f64 / 97.0;
                    let status = [
                        "ok", "ok", "ok", "warn", "ok", "ok", "ok", "ok", "fault", "ok",
                    ][(i % 10) as usize];
                    let site = if i % 13 != 0 {
                        format!("'site-{}'", device % 40)
                    } else {
                        "NULL".into()
                    };
                    format!(
                        "('d{device}', {}, {second}, {celsius:?}, '{status}', {site})",
                        first_ms + second * 1000
                    )
                })
                .collect();
            n += PER_STATEMENT;
            statements.push(format!(
                "INSERT INTO reading (device_id, received_at, seq, celsius, status, site) VALUES {}",
                values.join(", ")
            ));
        }
        db.execute_ddl(&statements).await?;
    }
    Ok(())
}

/// Bytes `tables` take with their indexes (and PostgreSQL's TOAST).
async fn table_bytes(db: &Db, tables: &[&str]) -> anyhow::Result<i64> {
    let mut total = 0;
    for table in tables {
        let bytes: i64 = match db.backend() {
            Backend::Sqlite => {
                let sql = "SELECT CAST(COALESCE(sum(pgsize), 0) AS BIGINT) FROM dbstat \
                           WHERE name = $1 OR name IN (SELECT name FROM sqlite_master WHERE tbl_name = $1)";
                with_pool!(db, pool => sqlx::query_scalar(sql).bind(table).fetch_one(pool).await)?
            }
            Backend::Postgres => {
                let sql = "SELECT pg_total_relation_size($1::regclass)";
                with_pool!(db, pool => sqlx::query_scalar(sql).bind(table).fetch_one(pool).await)?
            }
        };
        total += bytes;
    }
    Ok(total)
}

/// `sql` run as the query API runs it, RUNS times after one warm-up; the
/// sorted times.
async fn time_query(
    db: &Db,
    catalog: &fleetgate_store::Catalog,
    sql: &str,
) -> anyhow::Result<Vec<Duration>> {
    let tables = ["reading".to_string()].into_iter().collect();
    let parsed = query::check(sql, &tables, db.backend()).map_err(|e| anyhow!(e.to_string()))?;
    let expanded = fleetgate_store::expand::expand(&parsed, catalog, db.backend())
        .map_err(|e| anyhow!(e))?
        .unwrap_or_else(|| sql.to_string());
    let limits = query::QueryLimits {
        timeout: Duration::from_secs(600),
        ..Default::default()
    };
    let mut times = Vec::new();
    for run in 0..=RUNS {
        let started = Instant::now();
        let result = query::run(db, &expanded, &limits)
            .await
            .map_err(|e| anyhow!("{sql}: {e}"))?;
        anyhow::ensure!(
            result.rows.len() as i64 == DEVICES,
            "{sql}: {} rows",
            result.rows.len()
        );
        if run > 0 {
            times.push(started.elapsed());
        }
    }
    times.sort();
    Ok(times)
}
