//! Hybrid reports: one series over batch and real-time data. A bucket a
//! succeeded batch run covers comes from the batch table; any other bucket
//! from the real-time stream. Each point says which side it came from.
//!
//! ```toml
//! [reports.sales_by_region]
//! value = "sum(amount)"          # count(*), sum, avg, min, max of a column
//! group_by = "region"            # optional: one series per value
//! bucket = "1h"                  # the default; ?bucket= overrides it
//! batch = { table = "orders_batch", time = "ordered_at" }
//! realtime = { stream = "orders", time = "ordered_at" }
//! reconcile = { key = "order_id", compare = ["amount", "region"] }   # optional
//! ```
//!
//! The report only writes SQL: the caller runs it through the query
//! router, so the real-time half is served by a view when one fits and
//! reads every tier of a tiered stream.

use std::time::Duration;

use fleetgate_protocol::schema::check_identifier;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::transform::AggregateCall;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportsFile {
    pub reports: IndexMap<String, ReportDef>,
}

impl ReportsFile {
    pub fn parse(text: &str) -> Result<ReportsFile, String> {
        let file: ReportsFile =
            toml::from_str(text).map_err(|e| format!("invalid reports file: {e}"))?;
        if file.reports.is_empty() {
            return Err("the file declares no [reports.<name>]".into());
        }
        for (name, def) in &file.reports {
            def.check(name).map_err(|e| format!("report {name}: {e}"))?;
        }
        Ok(file)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportDef {
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_by: Option<String>,
    #[serde(default = "default_bucket")]
    pub bucket: String,
    pub batch: BatchSide,
    pub realtime: RealtimeSide,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile: Option<ReconcileDef>,
}

fn default_bucket() -> String {
    "1h".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSide {
    pub table: String,
    pub time: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RealtimeSide {
    pub stream: String,
    pub time: String,
}

/// How a batch run is compared with the real-time rows of its window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileDef {
    /// The key both sides share (an order number).
    pub key: String,
    /// Columns whose values must agree.
    #[serde(default)]
    pub compare: Vec<String>,
}

impl ReportDef {
    /// The stream columns the real-time side reads: its time, the value's
    /// column, the grouping, and what a reconciliation compares.
    pub fn realtime_fields(&self) -> Vec<String> {
        let mut fields = vec![self.realtime.time.clone()];
        fields.extend(self.value().ok().and_then(|call| call.column));
        fields.extend(self.group_by.clone());
        if let Some(reconcile) = &self.reconcile {
            fields.push(reconcile.key.clone());
            fields.extend(reconcile.compare.iter().cloned());
        }
        fields
    }

    pub fn value(&self) -> Result<AggregateCall, String> {
        let call = AggregateCall::parse(&self.value).map_err(|e| format!("value: {e}"))?;
        if let Some(column) = &call.column {
            check_identifier("column", column)?;
        }
        Ok(call)
    }

    pub fn bucket_ms(bucket: &str) -> Result<i64, String> {
        let d = fleetgate_protocol::duration::parse(bucket)
            .map_err(|e| format!("bucket {bucket:?}: {e}"))?;
        if d < Duration::from_secs(1) {
            return Err(format!("bucket {bucket:?} is shorter than a second"));
        }
        Ok(fleetgate_protocol::duration::millis(d))
    }

    fn check(&self, name: &str) -> Result<(), String> {
        check_identifier("report", name)?;
        self.value()?;
        Self::bucket_ms(&self.bucket)?;
        for (what, column) in [
            ("batch table", &self.batch.table),
            ("batch time", &self.batch.time),
            ("realtime stream", &self.realtime.stream),
            ("realtime time", &self.realtime.time),
        ] {
            check_identifier(what, column)?;
        }
        if let Some(group) = &self.group_by {
            check_identifier("group_by", group)?;
        }
        if let Some(reconcile) = &self.reconcile {
            check_identifier("reconcile key", &reconcile.key)?;
            for column in &reconcile.compare {
                check_identifier("reconcile column", column)?;
            }
        }
        Ok(())
    }

    /// The query for one side over `[from, to)`: bucket, group, value.
    pub fn side_sql(&self, table: &str, time: &str, from: i64, to: i64, bucket: i64) -> String {
        let value = self.value().expect("checked");
        let aggregate = match &value.column {
            None => "count(*)".to_string(),
            Some(c) => format!("{}({c})", value.fold.name()),
        };
        let bucket_expr = format!("{time} / {bucket} * {bucket}");
        let (group_select, group_by) = match &self.group_by {
            Some(g) => (format!(", {g} AS series"), format!(", {g}")),
            None => (String::new(), String::new()),
        };
        format!(
            "SELECT {bucket_expr} AS bucket{group_select}, {aggregate} AS value FROM {table} \
             WHERE {time} >= {from} AND {time} < {to} GROUP BY {bucket_expr}{group_by}"
        )
    }
}

/// Which side a point came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Batch,
    Realtime,
}

#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub bucket: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub series: Option<Value>,
    pub value: Value,
    pub source: Side,
}

/// Merges overlapping or touching windows into disjoint ones, in order.
pub fn merge_windows(mut windows: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    windows.sort_unstable();
    let mut merged: Vec<(i64, i64)> = Vec::new();
    for (from, to) in windows {
        match merged.last_mut() {
            Some(last) if from <= last.1 => last.1 = last.1.max(to),
            _ => merged.push((from, to)),
        }
    }
    merged
}

/// Whether a batch covers the whole bucket `[start, start + width)`.
pub fn covered(windows: &[(i64, i64)], start: i64, width: i64) -> bool {
    windows
        .iter()
        .any(|(from, to)| *from <= start && start + width <= *to)
}

/// The series: batch points for covered buckets, real-time points for the
/// rest. Rows are `[bucket, (series,) value]` as the side queries return.
pub fn combine(
    grouped: bool,
    windows: &[(i64, i64)],
    width: i64,
    batch: &[Vec<Value>],
    realtime: Vec<Vec<Value>>,
) -> Vec<Point> {
    let mut points = Vec::with_capacity(batch.len() + realtime.len());
    for (side, rows) in [(Side::Batch, batch), (Side::Realtime, realtime.as_slice())] {
        for row in rows {
            let Some(bucket) = row.first().and_then(Value::as_i64) else {
                continue;
            };
            let use_batch = covered(windows, bucket, width);
            if use_batch != (side == Side::Batch) {
                continue;
            }
            points.push(Point {
                bucket,
                series: grouped.then(|| row.get(1).cloned().unwrap_or(Value::Null)),
                value: row.last().cloned().unwrap_or(Value::Null),
                source: side,
            });
        }
    }
    // Each side has one row per bucket and series, and a bucket comes from
    // one side only: sorting is all that is left.
    points.sort_unstable_by(|a, b| {
        a.bucket
            .cmp(&b.bucket)
            .then_with(|| series_order(&a.series).cmp(&series_order(&b.series)))
    });
    points
}

/// A series' place in order: by its text (numbers and others by their JSON).
fn series_order(series: &Option<Value>) -> std::borrow::Cow<'_, str> {
    match series {
        None => "".into(),
        Some(Value::String(s)) => s.as_str().into(),
        Some(other) => other.to_string().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn covered_buckets_come_from_the_batch_and_the_rest_from_real_time() {
        let windows = merge_windows(vec![(100, 200), (0, 100)]);
        assert_eq!(windows, vec![(0, 200)]);
        let batch = vec![vec![json!(0), json!(5)], vec![json!(100), json!(6)]];
        let realtime = vec![
            vec![json!(0), json!(4)],
            vec![json!(100), json!(9)],
            vec![json!(200), json!(7)],
        ];
        let points = combine(false, &windows, 100, &batch, realtime);
        let got: Vec<(i64, Value, Side)> = points
            .into_iter()
            .map(|p| (p.bucket, p.value, p.source))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, json!(5), Side::Batch),
                (100, json!(6), Side::Batch),
                (200, json!(7), Side::Realtime),
            ]
        );
        // A bucket only partly covered is real-time: batch data for part
        // of a bucket would under-count it.
        assert!(!covered(&windows, 150, 100));
    }
}
