//! Reconciliation: what the real-time data of a period got wrong, by the
//! batch that now covers it — per common key (missing on either side,
//! different values, duplicates) and per bucket (row counts and values).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};

/// Listed differences kept per kind; beyond this they are only counted.
const KEPT: usize = 1000;

/// One side's rows: `[key, time, compared columns..., value?]`.
pub struct SideRows {
    pub rows: Vec<Vec<Value>>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Differences {
    pub batch_rows: usize,
    pub realtime_rows: usize,
    /// Keys the batch has and real-time lost.
    pub missing_in_realtime: Vec<Value>,
    /// Keys real-time has and the batch does not.
    pub missing_in_batch: Vec<Value>,
    /// Keys real-time holds more than once, with how often.
    pub duplicates: Vec<Value>,
    /// `{key, column, batch, realtime}` where the two disagree.
    pub different: Vec<Value>,
    /// Per bucket: rows and the value's sum on each side, where they differ.
    pub buckets: Vec<Value>,
    pub counts: Counts,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    pub missing_in_realtime: usize,
    pub missing_in_batch: usize,
    pub duplicates: usize,
    pub different: usize,
    pub buckets: usize,
}

fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        _ => a == b,
    }
}

fn push(list: &mut Vec<Value>, count: &mut usize, item: Value) {
    *count += 1;
    if list.len() < KEPT {
        list.push(item);
    }
}

/// Compares the two sides. `compare` names the compared columns (rows
/// carry them from position 2); with `has_value`, the row's last column
/// is the value summed per bucket of `width` ms.
pub fn compare(
    compare: &[String],
    has_value: bool,
    width: i64,
    batch: SideRows,
    realtime: SideRows,
) -> Differences {
    let mut d = Differences {
        batch_rows: batch.rows.len(),
        realtime_rows: realtime.rows.len(),
        ..Default::default()
    };
    type ByKey = BTreeMap<String, Vec<Vec<Value>>>;
    let by_key = |rows: Vec<Vec<Value>>| {
        let mut map: ByKey = BTreeMap::new();
        for row in rows {
            let key = row.first().map(Value::to_string).unwrap_or_default();
            map.entry(key).or_default().push(row);
        }
        map
    };
    // Per bucket: (batch rows, batch sum, realtime rows, realtime sum).
    let mut buckets: BTreeMap<i64, (i64, f64, i64, f64)> = BTreeMap::new();
    for (rows, is_batch) in [(&batch.rows, true), (&realtime.rows, false)] {
        for row in rows {
            let Some(time) = row.get(1).and_then(Value::as_i64) else {
                continue;
            };
            let entry = buckets.entry(time.div_euclid(width) * width).or_default();
            let value = if has_value {
                row.last().and_then(Value::as_f64).unwrap_or(0.0)
            } else {
                0.0
            };
            if is_batch {
                entry.0 += 1;
                entry.1 += value;
            } else {
                entry.2 += 1;
                entry.3 += value;
            }
        }
    }
    let batch = by_key(batch.rows);
    let realtime = by_key(realtime.rows);
    for (key, rows) in &realtime {
        let id = rows[0][0].clone();
        if rows.len() > 1 {
            push(
                &mut d.duplicates,
                &mut d.counts.duplicates,
                json!({ "key": id, "times": rows.len() }),
            );
        }
        let Some(truth) = batch.get(key) else {
            push(&mut d.missing_in_batch, &mut d.counts.missing_in_batch, id);
            continue;
        };
        for (i, column) in compare.iter().enumerate() {
            let (b, r) = (&truth[0][i + 2], &rows[0][i + 2]);
            if !same(b, r) {
                push(
                    &mut d.different,
                    &mut d.counts.different,
                    json!({ "key": id, "column": column, "batch": b, "realtime": r }),
                );
            }
        }
    }
    for (key, rows) in &batch {
        if !realtime.contains_key(key) {
            push(
                &mut d.missing_in_realtime,
                &mut d.counts.missing_in_realtime,
                rows[0][0].clone(),
            );
        }
    }
    for (bucket, (b_rows, b_sum, r_rows, r_sum)) in buckets {
        if b_rows != r_rows || !same(&json!(b_sum), &json!(r_sum)) {
            let mut item =
                json!({ "bucket": bucket, "batch_rows": b_rows, "realtime_rows": r_rows });
            if has_value {
                item["batch_value"] = json!(b_sum);
                item["realtime_value"] = json!(r_sum);
            }
            push(&mut d.buckets, &mut d.counts.buckets, item);
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_each_kind_of_difference() {
        let row =
            |k: &str, t: i64, amount: f64| vec![json!(k), json!(t), json!(amount), json!(amount)];
        let batch = SideRows {
            rows: vec![row("a", 0, 1.0), row("b", 10, 2.0), row("c", 20, 3.0)],
        };
        let realtime = SideRows {
            rows: vec![
                row("a", 0, 1.0),
                row("a", 1, 1.0),
                row("c", 20, 3.5),
                row("z", 30, 9.0),
            ],
        };
        let d = compare(&["amount".into()], true, 100, batch, realtime);
        assert_eq!(d.missing_in_realtime, vec![json!("b")]);
        assert_eq!(d.missing_in_batch, vec![json!("z")]);
        assert_eq!(d.duplicates, vec![json!({"key": "a", "times": 2})]);
        assert_eq!(
            d.different,
            vec![json!({"key": "c", "column": "amount", "batch": 3.0, "realtime": 3.5})]
        );
        assert_eq!(d.buckets.len(), 1);
        assert_eq!(d.buckets[0]["batch_rows"], 3);
        assert_eq!(d.buckets[0]["realtime_rows"], 4);
    }
}
