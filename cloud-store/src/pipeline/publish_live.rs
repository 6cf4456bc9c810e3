use std::sync::Arc;

use bytes::Bytes;
use fleetgate_protocol::ingest::LiveSink;
use fleetgate_protocol::schema::{DEVICE_ID, RECEIVED_AT};
use fleetgate_protocol::topic::live_topic;
use serde_json::Value;

use super::{CommitObserver, Work};

/// Re-publishes each committed message's valid records on
/// `live/<stream>/<device>` as a JSON array, with `device_id` and
/// `received_at` added. Runs after the commit, so a live reader never sees a
/// record the tables do not have.
pub struct PublishLive {
    pub sink: Arc<dyn LiveSink>,
}

impl CommitObserver for PublishLive {
    fn committed(&self, works: &[Work]) {
        if !self.sink.wanted() {
            return;
        }
        for work in works {
            let Some(stream) = &work.stream else { continue };
            if work.records.is_empty() {
                continue;
            }
            let records: Vec<Value> = work
                .records
                .iter()
                .map(|record| {
                    let mut object = record.raw.clone();
                    object.insert(
                        DEVICE_ID.into(),
                        Value::from(work.message.device_id.as_str()),
                    );
                    object.insert(RECEIVED_AT.into(), Value::from(work.message.received_at_ms));
                    // Enrich columns are the last values, in declaration order.
                    let enriched = record.values.len() - stream.def.enrich.len();
                    for (name, value) in stream.def.enrich.keys().zip(&record.values[enriched..]) {
                        object.insert(name.clone(), value.to_json());
                    }
                    Value::Object(object)
                })
                .collect();
            let payload = serde_json::to_vec(&records).expect("records serialize");
            self.sink.publish(
                live_topic(&stream.name, &work.message.device_id),
                Bytes::from(payload),
            );
        }
    }
}
