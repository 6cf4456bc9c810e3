use chrono::DateTime;
use fleetgate_protocol::schema::{FieldDef, FieldType, DEVICE_ID};
use fleetgate_protocol::state::FieldRule;
use serde_json::{Map, Value};

use super::{Reject, Stage, Work};
use crate::catalog::compacted::{folded_key, FOLDED_PREFIX};
use crate::values::SqlValue;

/// Checks each record against its stream's declaration (types, required,
/// bounds, enum members), with the bounds and members the cluster state's
/// rules set in their place, and converts it to column values (enum codes,
/// unit conversions). Undeclared fields are kept, as JSON, in the `extra`
/// column. A bad record is rejected with
/// every reason, and never stops the rest of the message.
pub struct Validate;

impl Stage for Validate {
    fn process(&self, work: &mut Work) -> Result<(), String> {
        let stream = work.stream.clone().expect("Authorize runs before Validate");
        let device = work.message.device_id.as_str();
        let records = std::mem::take(&mut work.records);
        for mut record in records {
            let mut reasons = Vec::new();
            let mut values = Vec::with_capacity(stream.columns.len());
            values.extend([SqlValue::Null, SqlValue::Null]);
            // Compacted fields are checked alike, and stored in `extra`.
            let mut folded = Map::new();
            for (name, def) in &stream.def.fields {
                let rule = work.state.rule(&stream.name, name);
                match convert(name, def, rule, record.raw.get(name.as_str())) {
                    Ok(SqlValue::Null) if stream.compacted.contains(name) => {}
                    Ok(value) if stream.compacted.contains(name) => {
                        folded.insert(folded_key(name), value.to_json());
                    }
                    Ok(value) => values.push(value),
                    Err(reason) => reasons.push(reason),
                }
            }
            if let Some(reserved) = record.raw.keys().find(|k| k.starts_with(FOLDED_PREFIX)) {
                reasons.push(format!(
                    "{reserved}: field names starting with {FOLDED_PREFIX:?} are reserved"
                ));
            }
            match record.raw.get(DEVICE_ID) {
                None => {}
                Some(Value::String(claimed)) if claimed == device => {}
                Some(claimed) => reasons.push(format!(
                    "device_id {claimed} does not match the publishing device {device:?}"
                )),
            }
            if reasons.is_empty() {
                values.push(extra_column(&record.raw, &stream.def.fields, folded));
                record.values = values;
                work.records.push(record);
            } else {
                work.rejects.push(Reject {
                    payload: Value::Object(record.raw).to_string(),
                    reasons,
                });
            }
        }
        Ok(())
    }
}

/// Undeclared fields as sent, and `folded` (compacted fields, as stored).
fn extra_column(
    raw: &Map<String, Value>,
    declared: &indexmap::IndexMap<String, FieldDef>,
    folded: Map<String, Value>,
) -> SqlValue {
    let mut extra: Map<String, Value> = raw
        .iter()
        .filter(|(k, _)| !declared.contains_key(k.as_str()) && k.as_str() != DEVICE_ID)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    extra.extend(folded);
    if extra.is_empty() {
        SqlValue::Null
    } else {
        SqlValue::Text(Value::Object(extra).to_string())
    }
}

fn convert(
    name: &str,
    def: &FieldDef,
    rule: Option<&FieldRule>,
    value: Option<&Value>,
) -> Result<SqlValue, String> {
    let value = match value {
        None | Some(Value::Null) if def.required => {
            return Err(format!("{name}: required field is missing"))
        }
        None | Some(Value::Null) => return Ok(SqlValue::Null),
        Some(v) => v,
    };
    let wrong_type = || {
        format!(
            "{name}: expected {}, got {}",
            type_name(def.ty),
            describe(value)
        )
    };
    let converted = match def.ty {
        FieldType::Int => SqlValue::Int(as_integer(value).ok_or_else(wrong_type)?),
        FieldType::Float => SqlValue::Float(value.as_f64().ok_or_else(wrong_type)?),
        FieldType::Bool => SqlValue::Bool(value.as_bool().ok_or_else(wrong_type)?),
        FieldType::String => {
            let text = value.as_str().ok_or_else(wrong_type)?;
            // PostgreSQL cannot store NUL in text; refuse it on every backend
            // so a record means the same wherever it is stored.
            if text.contains('\0') {
                return Err(format!("{name}: text contains a NUL character"));
            }
            SqlValue::Text(text.to_string())
        }
        FieldType::Enum => {
            let text = value.as_str().ok_or_else(wrong_type)?;
            let allowed = rule
                .and_then(|r| r.values.as_deref())
                .or(def.values.as_deref())
                .unwrap_or_default();
            if !allowed.iter().any(|v| v == text) {
                return Err(format!("{name}: {text:?} is not one of {allowed:?}"));
            }
            if def.code {
                // Rules can only narrow a coded enum, so the member is declared.
                let declared = def.values.as_deref().unwrap_or_default();
                SqlValue::Int(declared.iter().position(|v| v == text).unwrap_or_default() as i64)
            } else {
                SqlValue::Text(text.to_string())
            }
        }
        FieldType::Timestamp => SqlValue::Int(match value {
            Value::String(text) => DateTime::parse_from_rfc3339(text)
                .map_err(|e| format!("{name}: {text:?} is not an RFC 3339 timestamp ({e})"))?
                .timestamp_millis(),
            _ => as_integer(value).ok_or_else(wrong_type)?,
        }),
    };
    let min = rule.and_then(|r| r.min).or(def.min);
    let max = rule.and_then(|r| r.max).or(def.max);
    check_bounds(name, def.ty, min, max, &converted)?;
    Ok(match converted {
        SqlValue::Float(v) if def.scale.is_some() || def.offset.is_some() => {
            SqlValue::Float(v * def.scale.unwrap_or(1.0) + def.offset.unwrap_or(0.0))
        }
        other => other,
    })
}

/// JSON has one number type; `3.0` is accepted as the integer 3.
fn as_integer(value: &Value) -> Option<i64> {
    value.as_i64().or_else(|| {
        let f = value.as_f64()?;
        (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
    })
}

fn check_bounds(
    name: &str,
    ty: FieldType,
    min: Option<f64>,
    max: Option<f64>,
    value: &SqlValue,
) -> Result<(), String> {
    let number = match value {
        SqlValue::Int(i) if ty == FieldType::Int => *i as f64,
        SqlValue::Float(f) => *f,
        _ => return Ok(()),
    };
    if let Some(min) = min.filter(|min| number < *min) {
        return Err(format!("{name}: {number} is below the minimum {min}"));
    }
    if let Some(max) = max.filter(|max| number > *max) {
        return Err(format!("{name}: {number} is above the maximum {max}"));
    }
    Ok(())
}

fn type_name(ty: FieldType) -> &'static str {
    match ty {
        FieldType::Int => "an integer",
        FieldType::Float => "a number",
        FieldType::Bool => "true or false",
        FieldType::String | FieldType::Enum => "a string",
        FieldType::Timestamp => "an RFC 3339 string or epoch milliseconds",
    }
}

fn describe(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 40 {
        format!("{}...", &text[..text.floor_char_boundary(40)])
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetgate_protocol::schema::StreamsFile;

    fn temperature() -> indexmap::IndexMap<String, FieldDef> {
        StreamsFile::parse(
            r#"[streams.t]
            fields.seq      = { type = "int", required = true }
            fields.celsius  = { type = "float", min = -40.0, max = 125.0, required = true }
            fields.status   = { type = "enum", values = ["ok", "warn"] }
            fields.taken_at = { type = "timestamp" }"#,
        )
        .unwrap()
        .streams["t"]
            .fields
            .clone()
    }

    #[test]
    fn converts_each_type() {
        let f = temperature();
        assert_eq!(
            convert("seq", &f["seq"], None, Some(&Value::from(3.0))),
            Ok(SqlValue::Int(3))
        );
        assert_eq!(
            convert("celsius", &f["celsius"], None, Some(&Value::from(21))),
            Ok(SqlValue::Float(21.0))
        );
        assert_eq!(
            convert(
                "taken_at",
                &f["taken_at"],
                None,
                Some(&Value::from("2026-01-01T00:00:01Z"))
            ),
            Ok(SqlValue::Int(1_767_225_601_000))
        );
        assert_eq!(
            convert("taken_at", &f["taken_at"], None, Some(&Value::from(5))),
            Ok(SqlValue::Int(5))
        );
        assert_eq!(
            convert("status", &f["status"], None, None),
            Ok(SqlValue::Null)
        );
    }

    #[test]
    fn explains_each_failure() {
        let f = temperature();
        let err =
            |name: &str, v: Option<Value>| convert(name, &f[name], None, v.as_ref()).unwrap_err();
        assert!(err("seq", None).contains("required"));
        assert!(err("seq", Some(Value::from(1.5))).contains("expected an integer"));
        assert!(err("celsius", Some(Value::from(200.0))).contains("above the maximum 125"));
        assert!(err("celsius", Some(Value::from(-41))).contains("below the minimum -40"));
        assert!(err("status", Some(Value::from("fault"))).contains("not one of"));
        assert!(err("taken_at", Some(Value::from("yesterday"))).contains("RFC 3339"));
    }

    #[test]
    fn rules_replace_bounds_and_members_and_conversions_apply() {
        let f = temperature();
        let rule = FieldRule {
            max: Some(50.0),
            values: Some(vec!["ok".into(), "new".into()]),
            ..FieldRule::default()
        };
        let celsius =
            |v: f64| convert("celsius", &f["celsius"], Some(&rule), Some(&Value::from(v)));
        assert!(celsius(60.0).unwrap_err().contains("above the maximum 50"));
        // The declared minimum still holds where the rule sets none.
        assert!(celsius(-41.0)
            .unwrap_err()
            .contains("below the minimum -40"));
        let status = |v: &str| convert("status", &f["status"], Some(&rule), Some(&Value::from(v)));
        assert_eq!(status("new"), Ok(SqlValue::Text("new".into())));
        assert!(status("warn").unwrap_err().contains("not one of"));

        let declared = StreamsFile::parse(
            r#"[streams.t]
            fields.mode = { type = "enum", values = ["idle", "heat", "cool"], code = true }
            fields.temp = { type = "float", max = 212.0, scale = 0.5, offset = -16.0 }"#,
        )
        .unwrap()
        .streams["t"]
            .fields
            .clone();
        let mode = convert("mode", &declared["mode"], None, Some(&Value::from("cool")));
        assert_eq!(mode, Ok(SqlValue::Int(2)));
        // Bounds apply to the value as sent; the stored value is converted.
        let temp = |v: f64| convert("temp", &declared["temp"], None, Some(&Value::from(v)));
        assert_eq!(temp(212.0), Ok(SqlValue::Float(90.0)));
        assert!(temp(213.0).is_err());
    }
}
