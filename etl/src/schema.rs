//! Column types and the columns a rule sees.

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use fleetgate_store::values::ColumnKind;
use fleetgate_store::values::SqlValue;
use serde::{Deserialize, Serialize};

/// A column's type in a job: what its values are parsed and stored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    Int,
    Float,
    Bool,
    #[serde(alias = "string")]
    Text,
    /// RFC 3339, `YYYY-MM-DD[ HH:MM:SS]` (UTC) or epoch milliseconds;
    /// kept as epoch milliseconds, like stream timestamps.
    Timestamp,
}

impl ValueType {
    pub fn kind(self) -> ColumnKind {
        match self {
            ValueType::Int | ValueType::Timestamp => ColumnKind::Int,
            ValueType::Float => ColumnKind::Float,
            ValueType::Bool => ColumnKind::Bool,
            ValueType::Text => ColumnKind::Text,
        }
    }

    /// A field as files carry it: text. Empty text is NULL.
    pub fn parse_text(self, text: &str) -> Result<SqlValue, String> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Ok(SqlValue::Null);
        }
        let wrong = || format!("{text:?} is not {}", self.described());
        Ok(match self {
            ValueType::Text => SqlValue::Text(text.to_string()),
            ValueType::Int => SqlValue::Int(trimmed.parse().map_err(|_| wrong())?),
            ValueType::Float => SqlValue::Float(
                trimmed
                    .parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite())
                    .ok_or_else(wrong)?,
            ),
            ValueType::Bool => SqlValue::Bool(match trimmed.to_ascii_lowercase().as_str() {
                "true" | "t" | "1" | "yes" | "y" => true,
                "false" | "f" | "0" | "no" | "n" => false,
                _ => return Err(wrong()),
            }),
            ValueType::Timestamp => SqlValue::Int(parse_timestamp(trimmed).ok_or_else(wrong)?),
        })
    }

    /// A value from JSON or from a database row.
    pub fn from_json(self, value: &serde_json::Value) -> Result<SqlValue, String> {
        use serde_json::Value;
        match value {
            Value::Null => Ok(SqlValue::Null),
            Value::String(s) => self.parse_text(s),
            Value::Bool(b) => self.coerce(SqlValue::Bool(*b)),
            Value::Number(n) => match n.as_i64() {
                Some(i) => self.coerce(SqlValue::Int(i)),
                None => self.coerce(SqlValue::Float(n.as_f64().unwrap_or(f64::NAN))),
            },
            other => Err(format!("{other} is not {}", self.described())),
        }
    }

    /// Converts a computed value to this type, where that loses nothing.
    pub fn coerce(self, value: SqlValue) -> Result<SqlValue, String> {
        let wrong = |v: &SqlValue| format!("{v:?} is not {}", self.described());
        Ok(match (self, value) {
            (_, SqlValue::Null) => SqlValue::Null,
            (ValueType::Int | ValueType::Timestamp, SqlValue::Int(i)) => SqlValue::Int(i),
            (ValueType::Int | ValueType::Timestamp, SqlValue::Float(f))
                if f.fract() == 0.0 && f.abs() < 9.0e15 =>
            {
                SqlValue::Int(f as i64)
            }
            (ValueType::Float, SqlValue::Int(i)) => SqlValue::Float(i as f64),
            (ValueType::Float, SqlValue::Float(f)) => SqlValue::Float(f),
            (ValueType::Bool, SqlValue::Bool(b)) => SqlValue::Bool(b),
            (ValueType::Bool, SqlValue::Int(i @ (0 | 1))) => SqlValue::Bool(i == 1),
            (ValueType::Text, SqlValue::Text(t)) => SqlValue::Text(t),
            (ValueType::Text, other) => SqlValue::Text(crate::expr::text(&other)),
            (_, SqlValue::Text(t)) => self.parse_text(&t)?,
            (_, other) => return Err(wrong(&other)),
        })
    }

    fn described(self) -> &'static str {
        match self {
            ValueType::Int => "an integer",
            ValueType::Float => "a number",
            ValueType::Bool => "true or false",
            ValueType::Text => "text",
            ValueType::Timestamp => "a timestamp",
        }
    }
}

/// Epoch milliseconds from the spellings exports use.
pub fn parse_timestamp(text: &str) -> Option<i64> {
    if let Some(ms) = plain_utc(text) {
        return Some(ms);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_millis());
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Some(t.and_utc().timestamp_millis());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Some(d.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis());
    }
    text.parse::<i64>().ok()
}

/// `YYYY-MM-DD HH:MM:SS` or `YYYY-MM-DDTHH:MM:SS[Z]`, the spellings
/// exports use most, read without a format parser (a million of them are a
/// noticeable part of a load). Anything else: `None`, for the general path.
fn plain_utc(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if !(b.len() == 19 || (b.len() == 20 && b[19] == b'Z')) {
        return None;
    }
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b' ' | b'T')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let number = |from: usize, to: usize| -> Option<u32> {
        b[from..to].iter().try_fold(0u32, |n, d| {
            d.is_ascii_digit().then(|| n * 10 + (d - b'0') as u32)
        })
    };
    let date = NaiveDate::from_ymd_opt(number(0, 4)? as i32, number(5, 7)?, number(8, 10)?)?;
    let time = date.and_hms_opt(number(11, 13)?, number(14, 16)?, number(17, 19)?)?;
    Some(time.and_utc().timestamp_millis())
}

/// The columns of the rows at one point of a job: names in order, typed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Schema {
    columns: Vec<(String, ValueType)>,
}

impl Schema {
    pub fn from_pairs<S: Into<String>>(pairs: impl IntoIterator<Item = (S, ValueType)>) -> Schema {
        Schema {
            columns: pairs.into_iter().map(|(n, t)| (n.into(), t)).collect(),
        }
    }

    pub fn position(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|(n, _)| n == name)
    }

    /// The position of a column a rule names, or an error that lists the
    /// columns there are.
    pub fn require(&self, name: &str) -> Result<usize, String> {
        self.position(name).ok_or_else(|| {
            format!(
                "no column {name:?} (there are: {})",
                self.names().collect::<Vec<_>>().join(", ")
            )
        })
    }

    pub fn type_at(&self, i: usize) -> ValueType {
        self.columns[i].1
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|(n, _)| n.as_str())
    }

    pub fn columns(&self) -> &[(String, ValueType)] {
        &self.columns
    }

    pub fn len(&self) -> usize {
        self.columns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// Adds a column, or retypes it where it exists (a derive that
    /// replaces its input). Returns its position.
    pub fn set(&mut self, name: &str, ty: ValueType) -> usize {
        match self.position(name) {
            Some(i) => {
                self.columns[i].1 = ty;
                i
            }
            None => {
                self.columns.push((name.to_string(), ty));
                self.columns.len() - 1
            }
        }
    }

    pub fn remove(&mut self, i: usize) {
        self.columns.remove(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spellings_exports_use() {
        let ts = ValueType::Timestamp;
        assert_eq!(
            ts.parse_text("2026-03-01T10:00:00Z"),
            Ok(SqlValue::Int(1_772_359_200_000))
        );
        assert_eq!(
            ts.parse_text("2026-03-01 10:00:00"),
            Ok(SqlValue::Int(1_772_359_200_000))
        );
        assert_eq!(
            ts.parse_text("2026-03-01"),
            Ok(SqlValue::Int(1_772_323_200_000))
        );
        assert_eq!(
            ts.parse_text("2026-03-01T10:00:00.5Z"),
            Ok(SqlValue::Int(1_772_359_200_500))
        );
        assert!(ts.parse_text("2026-02-30 10:00:00").is_err());
        assert_eq!(ValueType::Int.parse_text(" "), Ok(SqlValue::Null));
        assert!(ValueType::Float
            .parse_text("12,5")
            .unwrap_err()
            .contains("not a number"));
        assert!(ValueType::Float.parse_text("NaN").is_err());
        assert_eq!(ValueType::Bool.parse_text("Y"), Ok(SqlValue::Bool(true)));
    }
}
