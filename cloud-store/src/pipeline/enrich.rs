use fleetgate_protocol::schema::FieldType;
use serde_json::Value;

use super::{Stage, Work};
use crate::values::SqlValue;

/// Adds what the platform knows and the device does not say: which device
/// sent the record, when it arrived (the two leading columns), and each
/// `enrich` column of the stream, looked up in the cluster state's tables
/// (after `extra`, in declaration order).
pub struct Enrich;

impl Stage for Enrich {
    fn process(&self, work: &mut Work) -> Result<(), String> {
        let device = &work.message.device_id;
        let received_at = work.message.received_at_ms;
        let stream = work.stream.clone().expect("Authorize runs before Enrich");
        for record in &mut work.records {
            record.values[0] = SqlValue::Text(device.clone());
            record.values[1] = SqlValue::Int(received_at);
            for def in stream.def.enrich.values() {
                let key = match record.raw.get(&def.from) {
                    Some(Value::String(text)) => text.clone(),
                    Some(Value::Number(n)) => n.to_string(),
                    Some(Value::Bool(b)) => b.to_string(),
                    _ => {
                        record.values.push(SqlValue::Null);
                        continue;
                    }
                };
                let found = work
                    .state
                    .lookup(&def.lookup)
                    .and_then(|table| table.find(&key, def.matching, &def.column));
                record
                    .values
                    .push(found.map_or(SqlValue::Null, |v| typed(v, def.ty)));
            }
        }
        Ok(())
    }
}

/// A table cell as the enrich column's type; a cell of another type is
/// NULL rather than a guess.
fn typed(value: &Value, ty: FieldType) -> SqlValue {
    let converted = match ty {
        FieldType::Int => value.as_i64().map(SqlValue::Int),
        FieldType::Float => value.as_f64().map(SqlValue::Float),
        FieldType::Bool => value.as_bool().map(SqlValue::Bool),
        FieldType::String => match value {
            Value::String(s) => Some(SqlValue::Text(s.clone())),
            Value::Null => None,
            other => Some(SqlValue::Text(other.to_string())),
        },
        FieldType::Enum | FieldType::Timestamp => None,
    };
    converted.unwrap_or(SqlValue::Null)
}
