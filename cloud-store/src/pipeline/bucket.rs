use fleetgate_protocol::schema::{BUCKET_COLUMN, RECEIVED_AT};

use serde_json::Value;

use super::{Reject, Stage, Work};
use crate::values::SqlValue;

/// Files each record of a bucketed stream under its time bucket: the start
/// of the `width`-long period its time falls in (the last column).
pub struct Bucket;

impl Stage for Bucket {
    fn process(&self, work: &mut Work) -> Result<(), String> {
        let stream = work.stream.clone().expect("Authorize runs before Bucket");
        let Some((time, width)) = stream.bucket() else {
            return Ok(());
        };
        let at = stream
            .columns
            .iter()
            .position(|c| c == time)
            .expect("a bucket's time field stays a column");
        debug_assert_eq!(
            stream.columns.last().map(String::as_str),
            Some(BUCKET_COLUMN)
        );
        let mut kept = Vec::with_capacity(work.records.len());
        for mut record in std::mem::take(&mut work.records) {
            let t = match (&record.values[at], time) {
                (SqlValue::Int(t), _) => *t,
                // Validate refuses a record without its required time; the
                // receive time is filled in by Enrich.
                (other, RECEIVED_AT) => unreachable!("received_at is {other:?}"),
                (other, _) => unreachable!("required {time} is {other:?}"),
            };
            // A time within a width of i64::MIN has no bucket start an i64
            // can hold: the multiplication overflowed (a panic, or in a
            // release build a bucket far in the future). Found while writing
            // the fgb1 fuzz target.
            match t
                .checked_div_euclid(width)
                .and_then(|b| b.checked_mul(width))
            {
                Some(start) => {
                    record.values.push(SqlValue::Int(start));
                    kept.push(record);
                }
                None => work.rejects.push(Reject {
                    payload: Value::Object(record.raw).to_string(),
                    reasons: vec![format!(
                        "{time}: {t} is out of range for its {width} ms time bucket"
                    )],
                }),
            }
        }
        work.records = kept;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use fleetgate_protocol::schema::StreamsFile;
    use fleetgate_protocol::{record, IngestMessage, Principal, Role};

    use super::*;
    use crate::db::Db;
    use crate::pipeline::Pipeline;
    use crate::state::StateSet;
    use crate::Catalog;

    /// `fuzz/corpus/fgb1/found-bucket-time-min`: an order placed at
    /// i64::MIN ms overflowed its hour's start.
    #[tokio::test]
    async fn a_time_without_a_bucket_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(None, &dir.path().join("store.db")).await.unwrap();
        let catalog = Catalog::load(db).await.unwrap();
        let file = StreamsFile::parse(
            "[streams.orders]\nkey = [\"order_id\"]\n\
             bucket = { time = \"ordered_at\", width = \"1h\" }\n\
             fields.order_id = { type = \"string\", required = true }\n\
             fields.ordered_at = { type = \"timestamp\", required = true }\n",
        )
        .unwrap();
        catalog.apply(&file).await.unwrap();
        let pipeline = Pipeline::standard(catalog, 1 << 20);
        let send = |ordered_at: i64| {
            let payload = record::encode(&[
                ("order_id", "o-1".into()),
                ("ordered_at", ordered_at.into()),
            ])
            .unwrap();
            let message = IngestMessage {
                principal: Principal {
                    device_id: "till-1".into(),
                    role: Role::Ingest,
                    device_type: None,
                    expires_at: i64::MAX,
                },
                stream: "orders".into(),
                device_id: "till-1".into(),
                payload: Bytes::from(payload),
                truncated_from: None,
                received_at_ms: 1_800_000_000_000,
                state_version: None,
            };
            pipeline.run(message, Arc::new(StateSet::default()))
        };
        for out_of_range in [i64::MIN, i64::MIN + 775_807] {
            let work = send(out_of_range);
            assert!(work.records.is_empty(), "{out_of_range}");
            assert!(
                work.rejects[0].reasons[0].contains("out of range for its 3600000 ms time bucket"),
                "{:?}",
                work.rejects
            );
        }
        // The earliest bucket an i64 holds still takes its times.
        let first = i64::MIN / 3_600_000 * 3_600_000;
        for t in [first, first + 1, -1, 0, i64::MAX] {
            let work = send(t);
            let expected = t.div_euclid(3_600_000) * 3_600_000;
            assert_eq!(
                work.records[0].values.last(),
                Some(&SqlValue::Int(expected)),
                "{t}"
            );
        }
    }
}
