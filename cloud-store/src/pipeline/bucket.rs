use fleetgate_protocol::schema::{BUCKET_COLUMN, RECEIVED_AT};

use super::{SqlValue, Stage, Work};

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
        for record in &mut work.records {
            let bucket = match (&record.values[at], time) {
                (SqlValue::Int(t), _) => SqlValue::Int(t.div_euclid(width) * width),
                // Validate refuses a record without its required time; the
                // receive time is filled in by Enrich.
                (other, RECEIVED_AT) => unreachable!("received_at is {other:?}"),
                (other, _) => unreachable!("required {time} is {other:?}"),
            };
            record.values.push(bucket);
        }
        Ok(())
    }
}
