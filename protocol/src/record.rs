//! The compact binary record: what generated SDK modules publish.
//!
//! JSON needs float formatting and string escaping, which a generated
//! WebAssembly module would have to carry as code; this format needs only
//! copies, and it is smaller on the air. The store accepts it next to JSON
//! and validates it the same way: the device's own checks are a courtesy,
//! never trusted.
//!
//! ```text
//! "FGB1"  magic (4 bytes)
//! u8      number of fields
//! per field:
//!   u8    name length, then the name (ASCII)
//!   u8    tag: 1 int (i64 LE) | 2 float (f64 LE) | 3 bool (u8 0/1) | 4 text (u32 LE length, UTF-8)
//!   the value
//! ```

use serde_json::{Map, Number, Value};

pub const MAGIC: &[u8; 4] = b"FGB1";
pub const TAG_INT: u8 = 1;
pub const TAG_FLOAT: u8 = 2;
pub const TAG_BOOL: u8 = 3;
pub const TAG_TEXT: u8 = 4;

/// A field value as the binary format carries it.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
}

impl From<i64> for FieldValue {
    fn from(v: i64) -> Self {
        FieldValue::Int(v)
    }
}
impl From<f64> for FieldValue {
    fn from(v: f64) -> Self {
        FieldValue::Float(v)
    }
}
impl From<bool> for FieldValue {
    fn from(v: bool) -> Self {
        FieldValue::Bool(v)
    }
}
impl From<&str> for FieldValue {
    fn from(v: &str) -> Self {
        FieldValue::Text(v.to_string())
    }
}
impl From<String> for FieldValue {
    fn from(v: String) -> Self {
        FieldValue::Text(v)
    }
}

pub fn is_binary_record(payload: &[u8]) -> bool {
    payload.starts_with(MAGIC)
}

/// Encodes one record; the reference the generated modules are tested against.
pub fn encode(fields: &[(&str, FieldValue)]) -> Result<Vec<u8>, String> {
    if fields.len() > u8::MAX as usize {
        return Err(format!("{} fields; at most 255", fields.len()));
    }
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(MAGIC);
    out.push(fields.len() as u8);
    for (name, value) in fields {
        if name.is_empty() || name.len() > u8::MAX as usize {
            return Err(format!("field name {name:?} must be 1-255 bytes"));
        }
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        match value {
            FieldValue::Int(v) => {
                out.push(TAG_INT);
                out.extend_from_slice(&v.to_le_bytes());
            }
            FieldValue::Float(v) => {
                out.push(TAG_FLOAT);
                out.extend_from_slice(&v.to_le_bytes());
            }
            FieldValue::Bool(v) => out.extend_from_slice(&[TAG_BOOL, *v as u8]),
            FieldValue::Text(v) => {
                out.push(TAG_TEXT);
                let len = u32::try_from(v.len()).map_err(|_| "text longer than 4 GiB")?;
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(v.as_bytes());
            }
        }
    }
    Ok(out)
}

/// Decodes one record into the JSON object the rest of the pipeline checks.
pub fn decode(payload: &[u8]) -> Result<Map<String, Value>, String> {
    let mut input = Reader {
        bytes: payload,
        at: 0,
    };
    if input.take(4)? != MAGIC {
        return Err("binary record does not start with FGB1".into());
    }
    let count = input.u8()?;
    let mut record = Map::new();
    for i in 0..count {
        let name_len = input.u8()? as usize;
        let name = std::str::from_utf8(input.take(name_len)?)
            .map_err(|_| format!("field {i}: name is not UTF-8"))?
            .to_string();
        let value = match input.u8()? {
            TAG_INT => Value::from(i64::from_le_bytes(input.array()?)),
            TAG_FLOAT => {
                let v = f64::from_le_bytes(input.array()?);
                Value::Number(
                    Number::from_f64(v)
                        .ok_or_else(|| format!("field {name}: {v} is not a finite number"))?,
                )
            }
            TAG_BOOL => match input.u8()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("field {name}: bool byte {b} is neither 0 nor 1")),
            },
            TAG_TEXT => {
                let len = u32::from_le_bytes(input.array()?) as usize;
                let text = std::str::from_utf8(input.take(len)?)
                    .map_err(|_| format!("field {name}: text is not UTF-8"))?;
                Value::String(text.to_string())
            }
            tag => return Err(format!("field {name}: unknown type tag {tag}")),
        };
        if record.insert(name.clone(), value).is_some() {
            return Err(format!("field {name} appears twice"));
        }
    }
    if input.at != payload.len() {
        return Err(format!(
            "{} bytes after the last field",
            payload.len() - input.at
        ));
    }
    Ok(record)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| format!("binary record truncated at byte {}", self.bytes.len()))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("length taken"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_type() {
        let bytes = encode(&[
            ("seq", 7.into()),
            ("celsius", 21.5.into()),
            ("ok", true.into()),
            ("room", "hall".into()),
        ])
        .unwrap();
        let record = decode(&bytes).unwrap();
        assert_eq!(
            Value::Object(record),
            serde_json::json!({"seq": 7, "celsius": 21.5, "ok": true, "room": "hall"})
        );
    }

    #[test]
    fn refuses_truncated_trailing_and_bad_values() {
        let bytes = encode(&[("room", "hall".into())]).unwrap();
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode(&trailing)
            .unwrap_err()
            .contains("after the last field"));
        let nan = encode(&[("x", f64::NAN.into())]).unwrap();
        assert!(decode(&nan).unwrap_err().contains("not a finite number"));
        let twice = encode(&[("x", 1.into()), ("x", 2.into())]).unwrap();
        assert!(decode(&twice).unwrap_err().contains("twice"));
    }
}
