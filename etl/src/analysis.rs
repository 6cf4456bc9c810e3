//! Analyses: per-device statistics of a stream's value, bucketed in time,
//! written back to a table (`fga_<name>`) that queries and reports can
//! read, with an anomaly flag for buckets far from the device's own recent
//! history. Anomalies are also published on `live/alerts/<name>/<device>`
//! for extract clients, and kept for the dashboard.
//!
//! ```toml
//! [analyses.temperature_hourly]
//! stream = "temperature"
//! value = "celsius"
//! time = "taken_at"      # received_at when absent
//! bucket = "1h"
//! history = 24           # the device's previous buckets compared with
//! threshold = 3.0        # anomaly: |mean - their mean| > threshold × their spread
//! ```
//!
//! Every second, the buckets holding rows received since the last pass
//! (from the earliest such bucket on) are recomputed from the stream
//! (counts, sums and sums of squares, so both databases compute it alike)
//! and upserted; a bucket is judged once, when it has ended.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use fleetgate_protocol::ingest::LiveSink;
use fleetgate_protocol::schema::{check_identifier, ALERTS_STREAM, DEVICE_ID, RECEIVED_AT};
use fleetgate_protocol::topic::LIVE_PREFIX;
use fleetgate_protocol::unix_now_ms;
use fleetgate_store::compaction::FieldUse;
use fleetgate_store::query::{self, QueryLimits};
use fleetgate_store::{with_pool, Catalog, Db};

use crate::declared::Declared;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::Row as _;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysesFile {
    pub analyses: IndexMap<String, AnalysisDef>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisDef {
    pub stream: String,
    pub value: String,
    #[serde(default = "received_at")]
    pub time: String,
    #[serde(default = "one_hour")]
    pub bucket: String,
    #[serde(default = "day_of_hours")]
    pub history: u32,
    #[serde(default = "three")]
    pub threshold: f64,
}

fn received_at() -> String {
    RECEIVED_AT.into()
}
fn one_hour() -> String {
    "1h".into()
}
fn day_of_hours() -> u32 {
    24
}
fn three() -> f64 {
    3.0
}

const ANALYSES: Declared = Declared {
    kind: "analysis",
    table: "fleetgate_analyses",
};

/// Fewer earlier buckets than this and a device has no history to judge by.
const MIN_HISTORY: usize = 3;

impl AnalysesFile {
    pub fn parse(text: &str) -> Result<AnalysesFile, String> {
        let file: AnalysesFile =
            toml::from_str(text).map_err(|e| format!("invalid analyses file: {e}"))?;
        if file.analyses.is_empty() {
            return Err("the file declares no [analyses.<name>]".into());
        }
        for (name, def) in &file.analyses {
            def.check(name)
                .map_err(|e| format!("analysis {name}: {e}"))?;
        }
        Ok(file)
    }
}

impl AnalysisDef {
    fn check(&self, name: &str) -> Result<(), String> {
        check_identifier("analysis", name)?;
        self.bucket_ms()?;
        if self.history < MIN_HISTORY as u32 {
            return Err(format!("history must be at least {MIN_HISTORY} buckets"));
        }
        if !self.threshold.is_finite() || self.threshold <= 0.0 {
            return Err("threshold must be above 0".into());
        }
        Ok(())
    }

    fn bucket_ms(&self) -> Result<i64, String> {
        crate::report::ReportDef::bucket_ms(&self.bucket)
    }

    /// Its columns must be numbers of the stream.
    fn check_against(&self, catalog: &Catalog) -> Result<(), String> {
        let stream = catalog
            .get(&self.stream)
            .ok_or_else(|| format!("no stream named {:?}", self.stream))?;
        let numeric = |column: &str| {
            column == RECEIVED_AT
                || stream.def.fields.get(column).is_some_and(|f| {
                    use fleetgate_protocol::schema::FieldType::*;
                    !f.code && matches!(f.ty, Int | Float | Timestamp)
                })
        };
        for (what, column) in [("value", &self.value), ("time", &self.time)] {
            if !numeric(column) {
                return Err(format!(
                    "{what}: {column:?} is not a numeric field of stream {}",
                    self.stream
                ));
            }
        }
        Ok(())
    }
}

pub fn table(name: &str) -> String {
    format!("fga_{name}")
}

pub struct Analyses {
    db: Db,
    catalog: Catalog,
    live: Arc<dyn LiveSink>,
    /// The fields analyses read count as used, for column compaction.
    usage: FieldUse,
    /// The analyses' tables, for the query guard.
    tables: RwLock<Vec<String>>,
    /// Per analysis, the newest `received_at` already counted.
    watermarks: Mutex<HashMap<String, i64>>,
}

const WATERMARK_OVERLAP_MS: i64 = 5_000;

#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub analysis: String,
    pub device_id: String,
    pub bucket: i64,
    pub mean: f64,
    pub expected: f64,
    pub score: f64,
    pub raised_at: i64,
}

impl Analyses {
    pub async fn open(
        db: Db,
        catalog: Catalog,
        live: Arc<dyn LiveSink>,
        usage: FieldUse,
    ) -> Result<Arc<Analyses>, String> {
        db.execute_ddl(&[
            ANALYSES.ddl(),
            "CREATE TABLE IF NOT EXISTS fleetgate_alerts (analysis TEXT NOT NULL, device_id TEXT NOT NULL, bucket BIGINT NOT NULL, \
             mean DOUBLE PRECISION NOT NULL, expected DOUBLE PRECISION NOT NULL, score DOUBLE PRECISION NOT NULL, \
             raised_at BIGINT NOT NULL, PRIMARY KEY (analysis, device_id, bucket))".into(),
        ])
        .await
        .map_err(|e| format!("cannot create the analysis tables: {e}"))?;
        let analyses = Arc::new(Analyses {
            db,
            catalog,
            live,
            usage,
            tables: RwLock::default(),
            watermarks: Mutex::default(),
        });
        analyses.list().await?;
        Ok(analyses)
    }

    pub async fn apply(&self, file: &AnalysesFile) -> Result<Vec<String>, String> {
        for (name, def) in &file.analyses {
            def.check_against(&self.catalog)
                .map_err(|e| format!("analysis {name}: {e}"))?;
        }
        let now = unix_now_ms();
        let mut ddl = Vec::new();
        for name in file.analyses.keys() {
            let t = table(name);
            ddl.push(format!(
                "CREATE TABLE IF NOT EXISTS {t} ({DEVICE_ID} TEXT NOT NULL, bucket BIGINT NOT NULL, \
                 count BIGINT NOT NULL, mean DOUBLE PRECISION, stddev DOUBLE PRECISION, \
                 min DOUBLE PRECISION, max DOUBLE PRECISION, evaluated BOOLEAN NOT NULL DEFAULT FALSE, \
                 anomaly BOOLEAN, score DOUBLE PRECISION, PRIMARY KEY ({DEVICE_ID}, bucket))"
            ));
        }
        self.db
            .execute_ddl(&ddl)
            .await
            .map_err(|e| format!("cannot create the analysis tables: {e}"))?;
        ANALYSES.save(&self.db, &file.analyses, now).await?;
        Ok(file.analyses.keys().cloned().collect())
    }

    pub async fn list(&self) -> Result<Vec<(String, AnalysisDef)>, String> {
        let list: Vec<(String, AnalysisDef)> = ANALYSES
            .load(&self.db)
            .await?
            .into_iter()
            .map(|stored| (stored.name, stored.definition))
            .collect();
        *self.tables.write().expect("tables") = list.iter().map(|(name, _)| table(name)).collect();
        Ok(list)
    }

    /// The analyses' tables, for the query guard.
    pub fn tables(&self) -> Vec<String> {
        self.tables.read().expect("tables").clone()
    }

    /// The newest alerts first.
    pub async fn alerts(&self, limit: i64) -> Result<Vec<Alert>, String> {
        with_pool!(self.db, pool => {
            sqlx::query(
                "SELECT analysis, device_id, bucket, mean, expected, score, raised_at FROM fleetgate_alerts \
                 ORDER BY raised_at DESC, bucket DESC LIMIT $1",
            )
            .bind(limit)
            .fetch_all(pool).await
            .and_then(|rows| rows.iter().map(|r| Ok(Alert {
                analysis: r.try_get(0)?,
                device_id: r.try_get(1)?,
                bucket: r.try_get(2)?,
                mean: r.try_get(3)?,
                expected: r.try_get(4)?,
                score: r.try_get(5)?,
                raised_at: r.try_get(6)?,
            })).collect())
        })
        .map_err(|e| format!("cannot read alerts: {e}"))
    }

    /// Brings every analysis up to date each second.
    pub fn follow(self: &Arc<Self>) {
        let analyses = self.clone();
        tokio::spawn(async move {
            loop {
                match analyses.list().await {
                    Ok(list) => {
                        for (name, def) in list {
                            if let Err(e) = analyses.update(&name, &def, unix_now_ms()).await {
                                tracing::warn!(analysis = name, error = %e, "cannot update the analysis");
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read the analyses"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// Recomputes the buckets from the oldest unjudged one, then judges
    /// the ended ones.
    pub async fn update(&self, name: &str, def: &AnalysisDef, now: i64) -> Result<(), String> {
        let stream = self
            .catalog
            .get(&def.stream)
            .ok_or_else(|| format!("no stream named {:?}", def.stream))?;
        let width = def.bucket_ms()?;
        self.usage
            .note(&def.stream, [def.time.as_str(), def.value.as_str()]);
        let t = table(name);
        // The buckets that rows received since the last pass fall in, from
        // the earliest on (a device may send old readings late). The
        // overlap re-reads rows committed in the same millisecond.
        let seen = self
            .watermarks
            .lock()
            .expect("watermarks")
            .get(name)
            .copied();
        let since = seen.map_or(i64::MIN, |w| w - WATERMARK_OVERLAP_MS);
        let time = &def.time;
        let fresh = format!(
            "SELECT min({time}), max({RECEIVED_AT}) FROM {} WHERE {RECEIVED_AT} > {since}",
            stream.read_from_within(fleetgate_store::sql_expr::ReceivedSpan {
                from: Some(since),
                to: None,
            })
        );
        let limits = QueryLimits {
            max_rows: 1_000_000,
            timeout: Duration::from_secs(60),
            // The store's own SQL, bounded by its rows: no bound on bytes.
            max_bytes: usize::MAX,
        };
        let span = query::run(&self.db, &fresh, &limits)
            .await
            .map_err(|e| format!("{fresh}: {e}"))?
            .rows;
        let (Some(earliest), Some(received)) = (
            span.first().and_then(|r| r[0].as_i64()),
            span.first().and_then(|r| r[1].as_i64()),
        ) else {
            return self.judge(name, def, width, now).await;
        };
        let from = earliest.div_euclid(width) * width;
        let (time, value) = (&def.time, &def.value);
        let sql = format!(
            "SELECT {DEVICE_ID}, {time} / {width} * {width} AS bucket, count({value}), sum({value}), \
             sum({value} * {value}), min({value}), max({value}) FROM {} \
             WHERE {time} >= {from} AND {value} IS NOT NULL GROUP BY {DEVICE_ID}, {time} / {width} * {width}",
            stream.read_from()
        );
        let rows = query::run(&self.db, &sql, &limits)
            .await
            .map_err(|e| format!("{sql}: {e}"))?
            .rows;
        let stats: Vec<Stats> = rows.iter().filter_map(|r| Stats::from_row(r)).collect();
        let upsert = format!(
            "INSERT INTO {t} ({DEVICE_ID}, bucket, count, mean, stddev, min, max) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT ({DEVICE_ID}, bucket) DO UPDATE SET count = excluded.count, mean = excluded.mean, \
             stddev = excluded.stddev, min = excluded.min, max = excluded.max"
        );
        with_pool!(self.db, pool => async {
            let mut tx = pool.begin().await?;
            for s in &stats {
                sqlx::query(&upsert)
                    .bind(&s.device).bind(s.bucket).bind(s.count).bind(s.mean)
                    .bind(s.stddev).bind(s.min).bind(s.max)
                    .execute(&mut *tx).await?;
            }
            tx.commit().await
        }.await)
        .map_err(|e| format!("cannot write {t}: {e}"))?;
        self.watermarks
            .lock()
            .expect("watermarks")
            .insert(name.to_string(), received);
        self.judge(name, def, width, now).await
    }

    async fn judge(
        &self,
        name: &str,
        def: &AnalysisDef,
        width: i64,
        now: i64,
    ) -> Result<(), String> {
        let t = table(name);
        // Every ended, unjudged bucket with the device's history before it.
        let pending: Vec<(String, i64, f64)> = with_pool!(self.db, pool => {
            sqlx::query(&format!(
                "SELECT {DEVICE_ID}, bucket, mean FROM {t} WHERE NOT evaluated AND bucket + {width} <= $1 \
                 ORDER BY bucket"
            ))
            .bind(now)
            .fetch_all(pool).await
            .and_then(|rows| rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))).collect())
        })
        .map_err(|e| format!("cannot read {t}: {e}"))?;
        for (device, bucket, mean) in pending {
            let history: Vec<f64> = with_pool!(self.db, pool => {
                sqlx::query(&format!(
                    "SELECT mean FROM {t} WHERE {DEVICE_ID} = $1 AND bucket < $2 ORDER BY bucket DESC LIMIT $3"
                ))
                .bind(&device).bind(bucket).bind(def.history as i64)
                .fetch_all(pool).await
                .and_then(|rows| rows.iter().map(|r| r.try_get::<f64, _>(0)).collect())
            })
            .map_err(|e| format!("cannot read {t}: {e}"))?;
            let verdict = judge(mean, &history, def.threshold);
            let (anomaly, score, expected) = match verdict {
                Some((score, expected)) => {
                    (Some(score.abs() > def.threshold), Some(score), expected)
                }
                None => (None, None, 0.0),
            };
            with_pool!(self.db, pool => async {
                let mut tx = pool.begin().await?;
                sqlx::query(&format!(
                    "UPDATE {t} SET evaluated = TRUE, anomaly = $3, score = $4 WHERE {DEVICE_ID} = $1 AND bucket = $2"
                ))
                .bind(&device).bind(bucket).bind(anomaly).bind(score)
                .execute(&mut *tx).await?;
                if anomaly == Some(true) {
                    sqlx::query(
                        "INSERT INTO fleetgate_alerts (analysis, device_id, bucket, mean, expected, score, raised_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                    )
                    .bind(name).bind(&device).bind(bucket).bind(mean).bind(expected)
                    .bind(score.unwrap_or_default()).bind(now)
                    .execute(&mut *tx).await?;
                }
                tx.commit().await
            }.await)
            .map_err(|e| format!("cannot write {t}: {e}"))?;
            if anomaly == Some(true) {
                // After the commit: an alert always has its row.
                let alert = json!({
                    "analysis": name, "device_id": device, "bucket": bucket,
                    "mean": mean, "expected": expected, "score": score,
                    "stream": def.stream, "value": def.value,
                });
                self.live.publish(
                    format!("{LIVE_PREFIX}{ALERTS_STREAM}/{name}/{device}"),
                    Bytes::from(alert.to_string()),
                );
            }
        }
        Ok(())
    }
}

struct Stats {
    device: String,
    bucket: i64,
    count: i64,
    mean: f64,
    stddev: Option<f64>,
    min: f64,
    max: f64,
}

impl Stats {
    fn from_row(row: &[Value]) -> Option<Stats> {
        let count = row[2].as_i64()?;
        let (sum, squares) = (row[3].as_f64()?, row[4].as_f64()?);
        let n = count as f64;
        let mean = sum / n;
        // Sample standard deviation; rounding can take the variance a hair
        // below zero.
        let stddev = (count > 1).then(|| ((squares - sum * sum / n) / (n - 1.0)).max(0.0).sqrt());
        Some(Stats {
            device: row[0].as_str()?.to_string(),
            bucket: row[1].as_i64()?,
            count,
            mean,
            stddev,
            min: row[5].as_f64()?,
            max: row[6].as_f64()?,
        })
    }
}

/// How far `mean` lies from the history's means, in units of their
/// spread: `(score, expected)`; `None` without enough history. A flat
/// history (no spread) makes any change infinitely far.
pub fn judge(mean: f64, history: &[f64], threshold: f64) -> Option<(f64, f64)> {
    if history.len() < MIN_HISTORY {
        return None;
    }
    let n = history.len() as f64;
    let expected = history.iter().sum::<f64>() / n;
    let spread = (history.iter().map(|m| (m - expected).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let distance = mean - expected;
    let score = if spread > 0.0 {
        distance / spread
    } else if distance.abs() > f64::EPSILON * expected.abs().max(1.0) {
        distance.signum() * (threshold + 1.0) * 1e6
    } else {
        0.0
    };
    Some((score, expected))
}

#[cfg(test)]
mod tests {
    use super::judge;

    #[test]
    fn judges_by_the_devices_own_history() {
        let history = [20.0, 21.0, 19.0, 20.5, 19.5];
        let (score, expected) = judge(20.4, &history, 3.0).unwrap();
        assert!(
            (expected - 20.0).abs() < 1e-9 && score.abs() < 3.0,
            "{score}"
        );
        let (score, _) = judge(35.0, &history, 3.0).unwrap();
        assert!(score > 3.0, "{score}");
        assert!(
            judge(35.0, &history[..2], 3.0).is_none(),
            "too little history"
        );
        let (score, _) = judge(21.0, &[20.0, 20.0, 20.0], 3.0).unwrap();
        assert!(score > 3.0, "a change after a flat history is an anomaly");
    }
}
