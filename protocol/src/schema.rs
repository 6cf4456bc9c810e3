//! Stream declarations: the TOML a user applies with `fleetgate stream apply`.
//!
//! ```toml
//! [streams.temperature]
//! key = ["device_id", "seq"]
//! fields.seq     = { type = "int", required = true }
//! fields.celsius = { type = "float", min = -40.0, max = 125.0, required = true }
//! ```

use std::time::Duration;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::Role;

/// Columns every stream table has besides its declared fields.
pub const DEVICE_ID: &str = "device_id";
pub const RECEIVED_AT: &str = "received_at";
pub const EXTRA: &str = "extra";
/// The server-assigned key column of streams that declare no key.
pub const ROW_ID: &str = "id";
/// The time bucket column of a stream declared with `bucket`.
pub const BUCKET_COLUMN: &str = "fg_bucket";
/// The live topic level of anomaly alerts, which no stream may take.
pub const ALERTS_STREAM: &str = "alerts";
const RESERVED_COLUMNS: [&str; 5] = [DEVICE_ID, RECEIVED_AT, EXTRA, ROW_ID, BUCKET_COLUMN];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamsFile {
    pub streams: IndexMap<String, StreamDef>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamDef {
    /// Columns forming the primary key; `None` means a server-assigned id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Vec<String>>,
    #[serde(default)]
    pub fields: IndexMap<String, FieldDef>,
    /// Columns filled from lookup tables (cluster state) as records arrive.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub enrich: IndexMap<String, EnrichDef>,
    /// Rows received longer ago than this (e.g. "3h") move from the hot
    /// table to the stream's cold tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot: Option<String>,
    /// Rows received longer ago than this (e.g. "30d") are deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// Keeps rows under (time bucket, key): see [`StreamBucket`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<StreamBucket>,
    /// The device types (the registry's `type`) that may ingest into the
    /// stream. `None`: any device that may ingest at all; `Some([])`: only
    /// admins. A stolen device then writes only what its type may, whatever
    /// its role; see [`StreamDef::may_write`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writers: Option<Vec<String>>,
}

/// `bucket = { time = "ordered_at", width = "1h" }`: each row is stored
/// under its time bucket and key (`fg_bucket` leads the primary key), so a
/// bucket reads in time order, a record sent twice is stored once, and a
/// period can be swapped out wholesale when a batch supersedes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamBucket {
    /// `received_at`, or a required int or timestamp field.
    pub time: String,
    pub width: String,
}

/// `enrich.price = { lookup = "prices", from = "sku", column = "price", type = "float" }`:
/// the record's `from` field is looked up in the table, and the row's
/// `column` is stored in a column of its own. No row, no table yet, or a
/// value of another type: NULL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichDef {
    pub lookup: String,
    pub from: String,
    pub column: String,
    #[serde(rename = "type")]
    pub ty: FieldType,
    /// `exact` (the default) or `network`: the table's keys are IP networks
    /// and the longest one holding the record's address wins.
    #[serde(default, rename = "match", skip_serializing_if = "MatchKind::is_exact")]
    pub matching: MatchKind,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatchKind {
    #[default]
    Exact,
    Network,
}

impl MatchKind {
    fn is_exact(&self) -> bool {
        *self == MatchKind::Exact
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    Int,
    Float,
    Bool,
    String,
    Enum,
    /// RFC 3339 text or epoch milliseconds; stored as epoch milliseconds.
    Timestamp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldDef {
    #[serde(rename = "type")]
    pub ty: FieldType,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
    /// Enum only: store the member's position in `values` (an integer
    /// column) instead of its text.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub code: bool,
    /// Float only: store `value * scale + offset` (a unit conversion, e.g.
    /// Fahrenheit to Celsius: scale = 0.5555555555555556, offset = -17.77777777777778).
    /// Bounds apply to the value as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<f64>,
}

impl StreamsFile {
    /// Parses and checks a whole file; the error names the offending part.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: StreamsFile =
            toml::from_str(text).map_err(|e| format!("invalid streams file: {e}"))?;
        if file.streams.is_empty() {
            return Err("streams file declares no [streams.<name>] table".into());
        }
        for (name, def) in &file.streams {
            def.check(name)?;
        }
        Ok(file)
    }
}

/// Names become SQL identifiers and topic levels, so they are kept to
/// lower-case ASCII that needs no quoting anywhere.
pub fn check_identifier(kind: &str, name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let starts_ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase());
    let rest_ok = bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if starts_ok && rest_ok && name.len() <= 48 {
        Ok(())
    } else {
        Err(format!(
            "invalid {kind} name {name:?}: use 1-48 characters a-z 0-9 _, starting with a letter"
        ))
    }
}

impl StreamDef {
    /// Whether a device of `role` and `device_type` may ingest into this
    /// stream (named `name`, for the reason). Admins may write any stream,
    /// as they may publish anywhere; everyone else needs a type the stream
    /// lists when it lists any. Role rules on the topic (`may_publish`) are
    /// checked separately and first.
    pub fn may_write(
        &self,
        name: &str,
        role: Role,
        device_type: Option<&str>,
    ) -> Result<(), String> {
        let Some(writers) = &self.writers else {
            return Ok(());
        };
        if role == Role::Admin || device_type.is_some_and(|t| writers.iter().any(|w| w == t)) {
            return Ok(());
        }
        let who = match device_type {
            Some(t) => format!("device type {t:?}"),
            None => "a device without a type".to_string(),
        };
        Err(format!(
            "{who} may not write stream {name:?} (writers: {})",
            writers.join(", ")
        ))
    }

    pub fn check(&self, name: &str) -> Result<(), String> {
        check_identifier("stream", name)?;
        for writer in self.writers.iter().flatten() {
            // The registry's rule for a type: anything else could never match.
            if writer.is_empty() || writer.len() > 64 {
                return Err(format!(
                    "stream {name}: writers entry {writer:?} is not a device type (1-64 characters)"
                ));
            }
        }
        // fgv_ tables hold views, fgc_ cold tiers, fga_ analyses, fgs_
        // superseded real-time rows, fgf_ fences.
        if [
            "fleetgate_",
            "sqlite_",
            "pg_",
            "fgv_",
            "fgc_",
            "fga_",
            "fgs_",
            "fgf_",
        ]
        .iter()
        .any(|p| name.starts_with(p))
        {
            return Err(format!("stream name {name:?} uses a reserved prefix"));
        }
        // `live/alerts/...` carries the analyses' anomaly alerts.
        if name == ALERTS_STREAM {
            return Err(format!(
                "stream name {name:?} is reserved: live/{name}/ carries anomaly alerts"
            ));
        }
        for (field, def) in &self.fields {
            check_identifier("field", field).map_err(|e| format!("stream {name}: {e}"))?;
            if RESERVED_COLUMNS.contains(&field.as_str()) {
                return Err(format!(
                    "stream {name}: field {field:?} is a column every stream already has"
                ));
            }
            def.check()
                .map_err(|e| format!("stream {name}, field {field}: {e}"))?;
        }
        for (column, def) in &self.enrich {
            check_identifier("enrich column", column).map_err(|e| format!("stream {name}: {e}"))?;
            if RESERVED_COLUMNS.contains(&column.as_str()) || self.fields.contains_key(column) {
                return Err(format!(
                    "stream {name}: enrich column {column:?} is already a column of the stream"
                ));
            }
            check_identifier("lookup table", &def.lookup)
                .and_then(|_| check_identifier("lookup column", &def.column))
                .map_err(|e| format!("stream {name}, enrich {column}: {e}"))?;
            if def.from.is_empty() {
                return Err(format!(
                    "stream {name}, enrich {column}: from names no field"
                ));
            }
            if matches!(def.ty, FieldType::Enum | FieldType::Timestamp) {
                return Err(format!(
                    "stream {name}, enrich {column}: type must be int, float, bool or string"
                ));
            }
        }
        if let Some(key) = &self.key {
            if key.is_empty() {
                return Err(format!("stream {name}: key must name at least one column"));
            }
            for (i, column) in key.iter().enumerate() {
                if key[..i].contains(column) {
                    return Err(format!("stream {name}: key names {column:?} twice"));
                }
                if column == DEVICE_ID {
                    continue;
                }
                match self.fields.get(column) {
                    None => {
                        return Err(format!(
                            "stream {name}: key column {column:?} is neither device_id nor a declared field"
                        ))
                    }
                    Some(def) if !def.required => {
                        return Err(format!(
                            "stream {name}: key field {column:?} must be required = true"
                        ))
                    }
                    Some(def) if def.ty == FieldType::Float => {
                        return Err(format!(
                            "stream {name}: key field {column:?} is a float; floats make unreliable keys"
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        if let Some(bucket) = &self.bucket {
            if self.key.is_none() {
                return Err(format!(
                    "stream {name}: a bucketed stream needs a key (what makes a record the same record)"
                ));
            }
            let time_ok = bucket.time == RECEIVED_AT
                || self.fields.get(&bucket.time).is_some_and(|f| {
                    f.required && matches!(f.ty, FieldType::Int | FieldType::Timestamp)
                });
            if !time_ok {
                return Err(format!(
                    "stream {name}: bucket time {:?} must be received_at or a required int or timestamp field",
                    bucket.time
                ));
            }
            self.bucket_width_ms()
                .map_err(|e| format!("stream {name}: {e}"))?;
        }
        let hot = self
            .hot_after()
            .map_err(|e| format!("stream {name}: {e}"))?;
        let ttl = self.ttl().map_err(|e| format!("stream {name}: {e}"))?;
        if let (Some(hot), Some(ttl)) = (hot, ttl) {
            if hot >= ttl {
                return Err(format!(
                    "stream {name}: hot ({hot:?}) must be shorter than ttl ({ttl:?}), or rows expire before they turn cold"
                ));
            }
        }
        Ok(())
    }

    /// Age at which rows move to the cold tier.
    pub fn hot_after(&self) -> Result<Option<Duration>, String> {
        parse_age("hot", self.hot.as_deref())
    }

    /// Age at which rows are deleted.
    pub fn ttl(&self) -> Result<Option<Duration>, String> {
        parse_age("ttl", self.ttl.as_deref())
    }

    /// The bucket's time column and width in its unit (ms), if bucketed.
    pub fn bucket_width_ms(&self) -> Result<Option<(&str, i64)>, String> {
        let Some(bucket) = &self.bucket else {
            return Ok(None);
        };
        let width = parse_age("bucket width", Some(&bucket.width))?.expect("given");
        Ok(Some((bucket.time.as_str(), crate::duration::millis(width))))
    }
}

fn parse_age(what: &str, text: Option<&str>) -> Result<Option<Duration>, String> {
    let Some(text) = text else { return Ok(None) };
    let age = crate::duration::parse(text)
        .map_err(|e| format!("{what} = {text:?}: {e} (e.g. \"3h\", \"30d\")"))?;
    if age < Duration::from_secs(1) {
        return Err(format!("{what} = {text:?}: must be at least 1s"));
    }
    Ok(Some(age))
}

impl FieldDef {
    fn check(&self) -> Result<(), String> {
        let numeric = matches!(self.ty, FieldType::Int | FieldType::Float);
        if !numeric && (self.min.is_some() || self.max.is_some()) {
            return Err("min and max apply only to int and float fields".into());
        }
        if let (Some(min), Some(max)) = (self.min, self.max) {
            if min > max {
                return Err(format!("min {min} is greater than max {max}"));
            }
        }
        match (&self.values, self.ty) {
            (Some(values), FieldType::Enum) => {
                if values.is_empty() {
                    return Err("an enum needs at least one value".into());
                }
                if values
                    .iter()
                    .enumerate()
                    .any(|(i, v)| values[..i].contains(v))
                {
                    return Err("enum values must be distinct".into());
                }
            }
            (None, FieldType::Enum) => return Err("an enum field needs values = [...]".into()),
            (Some(_), _) => return Err("values applies only to enum fields".into()),
            (None, _) => {}
        }
        if self.code && self.ty != FieldType::Enum {
            return Err("code applies only to enum fields".into());
        }
        if (self.scale.is_some() || self.offset.is_some()) && self.ty != FieldType::Float {
            return Err("scale and offset apply only to float fields".into());
        }
        if [self.scale, self.offset]
            .iter()
            .flatten()
            .any(|v| !v.is_finite())
        {
            return Err("scale and offset must be finite numbers".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        [streams.temperature]
        key = ["device_id", "seq"]
        fields.seq      = { type = "int", required = true }
        fields.celsius  = { type = "float", min = -40.0, max = 125.0, required = true }
        fields.humidity = { type = "float", min = 0.0, max = 100.0 }
        fields.status   = { type = "enum", values = ["ok", "warn", "fault"] }
        fields.taken_at = { type = "timestamp" }
    "#;

    #[test]
    fn parses_the_documented_example_in_declaration_order() {
        let file = StreamsFile::parse(EXAMPLE).unwrap();
        let stream = &file.streams["temperature"];
        let names: Vec<_> = stream.fields.keys().map(String::as_str).collect();
        assert_eq!(names, ["seq", "celsius", "humidity", "status", "taken_at"]);
        assert_eq!(stream.fields["celsius"].max, Some(125.0));
    }

    #[test]
    fn writers_name_the_device_types_that_may_ingest() {
        let file = StreamsFile::parse(
            "[streams.orders]\nwriters = [\"pos\"]\nfields.amount = { type = \"float\" }\n\
             [streams.open]\nfields.a = { type = \"int\" }\n\
             [streams.admins_only]\nwriters = []\nfields.a = { type = \"int\" }",
        )
        .unwrap();
        let orders = &file.streams["orders"];
        assert!(orders
            .may_write("orders", Role::Ingest, Some("pos"))
            .is_ok());
        let err = orders
            .may_write("orders", Role::Ingest, Some("thermostat"))
            .unwrap_err();
        assert!(err.contains("\"thermostat\" may not write"), "{err}");
        assert!(orders.may_write("orders", Role::Extract, None).is_err());
        assert!(orders.may_write("orders", Role::Admin, None).is_ok());
        let open = &file.streams["open"];
        assert!(open.may_write("open", Role::Ingest, None).is_ok());
        let admins = &file.streams["admins_only"];
        assert!(admins
            .may_write("admins_only", Role::Ingest, Some("pos"))
            .is_err());
        assert!(admins.may_write("admins_only", Role::Admin, None).is_ok());
        let err =
            StreamsFile::parse("[streams.t]\nwriters = [\"\"]\nfields.a = { type = \"int\" }")
                .unwrap_err();
        assert!(err.contains("not a device type"), "{err}");
    }

    #[test]
    fn refuses_bad_declarations_with_a_reason() {
        let cases = [
            (
                "[streams.Bad]\nfields.a = { type = \"int\" }",
                "invalid stream name",
            ),
            (
                "[streams.t]\nfields.extra = { type = \"int\" }",
                "every stream already has",
            ),
            (
                "[streams.t]\nkey = [\"nope\"]\nfields.a = { type = \"int\" }",
                "neither device_id",
            ),
            (
                "[streams.t]\nkey = [\"a\"]\nfields.a = { type = \"int\" }",
                "required = true",
            ),
            (
                "[streams.t]\nfields.a = { type = \"enum\" }",
                "needs values",
            ),
            (
                "[streams.t]\nfields.a = { type = \"string\", min = 1.0 }",
                "only to int and float",
            ),
            (
                "[streams.t]\nfields.a = { type = \"int\", min = 5.0, max = 1.0 }",
                "greater than max",
            ),
            (
                "[streams.t]\nfields.a = { type = \"decimal\" }",
                "unknown variant",
            ),
            (
                "[streams.t]\nfields.a = { type = \"int\", colour = 1 }",
                "unknown field",
            ),
        ];
        for (text, expected) in cases {
            let err = StreamsFile::parse(text).unwrap_err();
            assert!(
                err.contains(expected),
                "{text:?} gave {err:?}, expected {expected:?}"
            );
        }
    }
}
