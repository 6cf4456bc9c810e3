use fleetgate_protocol::record;
use serde_json::Value;

use super::{Record, Reject, Stage, Work};

/// More records than this in one message are refused: the store's queue is
/// budgeted in records, and one message must fit comfortably in it.
pub const MAX_RECORDS_PER_MESSAGE: usize = 10_000;

/// Bytes → records. A payload is one JSON object, an array of them, or one
/// binary record (`fleetgate_protocol::record`, what generated SDKs send).
pub struct Decode {
    pub max_payload: usize,
}

impl Stage for Decode {
    fn process(&self, work: &mut Work) -> Result<(), String> {
        let message = &work.message;
        if let Some(size) = message.truncated_from {
            return Err(format!(
                "payload of {size} bytes exceeds the {}-byte limit",
                self.max_payload
            ));
        }
        if message.payload.len() > self.max_payload {
            return Err(format!(
                "payload of {} bytes exceeds the {}-byte limit",
                message.payload.len(),
                self.max_payload
            ));
        }
        if record::is_binary_record(&message.payload) {
            let raw = record::decode(&message.payload)?;
            work.records.push(Record {
                raw,
                values: Vec::new(),
            });
            return Ok(());
        }
        // serde_json refuses nesting deeper than 128 levels, so a hostile
        // payload cannot exhaust the stack.
        let value: Value = serde_json::from_slice(&message.payload)
            .map_err(|e| format!("payload is not valid JSON: {e}"))?;
        match value {
            Value::Object(raw) => work.records.push(Record {
                raw,
                values: Vec::new(),
            }),
            Value::Array(items) if items.len() > MAX_RECORDS_PER_MESSAGE => {
                return Err(format!(
                    "payload holds {} records; at most {MAX_RECORDS_PER_MESSAGE} per message",
                    items.len()
                ))
            }
            Value::Array(items) => {
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        Value::Object(raw) => work.records.push(Record {
                            raw,
                            values: Vec::new(),
                        }),
                        other => work.rejects.push(Reject {
                            payload: other.to_string(),
                            reasons: vec![format!("array element {i} is not a JSON object")],
                        }),
                    }
                }
            }
            _ => return Err("payload must be a JSON object or an array of objects".into()),
        }
        Ok(())
    }
}
