//! Cluster state: what every store node must change at the same instant.
//!
//! A state document is one key's value. Keys are
//! - `rules/<stream>`: the stream's validation rules, overriding the bounds
//!   and enum members of its declaration (TOML, `[fields.<name>] min = …`);
//! - `lookup/<table>`: an enrichment table (CSV with a header row, or TOML),
//!   which streams name in their `enrich` declarations.
//!
//! Every change gets the next cluster-wide version number; the state at
//! version `v` is, for each key, its newest document at or below `v`.
//! Documents are checked here, before any node sees them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::schema::{check_identifier, FieldType, StreamDef};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StateKey {
    Rules(String),
    Lookup(String),
}

impl StateKey {
    pub fn parse(key: &str) -> Result<StateKey, String> {
        let (kind, name) = key
            .split_once('/')
            .ok_or_else(|| format!("state key {key:?} must be rules/<stream> or lookup/<table>"))?;
        match kind {
            "rules" => check_identifier("stream", name).map(|_| StateKey::Rules(name.into())),
            "lookup" => {
                check_identifier("lookup table", name).map(|_| StateKey::Lookup(name.into()))
            }
            _ => Err(format!(
                "state key {key:?} must be rules/<stream> or lookup/<table>"
            )),
        }
    }
}

impl std::fmt::Display for StateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateKey::Rules(stream) => write!(f, "rules/{stream}"),
            StateKey::Lookup(table) => write!(f, "lookup/{table}"),
        }
    }
}

/// One key's document, parsed and checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateValue {
    Rules(StreamRules),
    Lookup(LookupTable),
}

/// How a pushed file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateFormat {
    Toml,
    Csv,
}

impl StateValue {
    pub fn parse(key: &StateKey, text: &str, format: StateFormat) -> Result<StateValue, String> {
        match (key, format) {
            (StateKey::Rules(_), StateFormat::Toml) => StreamRules::parse(text).map(Self::Rules),
            (StateKey::Rules(_), StateFormat::Csv) => {
                Err("rules are written in TOML ([fields.<name>] min = …)".into())
            }
            (StateKey::Lookup(_), StateFormat::Toml) => {
                LookupTable::parse_toml(text).map(Self::Lookup)
            }
            (StateKey::Lookup(_), StateFormat::Csv) => {
                LookupTable::parse_csv(text).map(Self::Lookup)
            }
        }
    }
}

/// A stream's validation rules: new bounds or enum members per field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamRules {
    #[serde(default)]
    pub fields: IndexMap<String, FieldRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
}

impl StreamRules {
    fn parse(text: &str) -> Result<StreamRules, String> {
        let rules: StreamRules =
            toml::from_str(text).map_err(|e| format!("invalid rules file: {e}"))?;
        if rules.fields.is_empty() {
            return Err("rules file sets no [fields.<name>] rule".into());
        }
        Ok(rules)
    }

    /// Checks the rules against the stream they are for: only declared
    /// fields, bounds only on numbers, members only on enums.
    pub fn check(&self, stream: &str, def: &StreamDef) -> Result<(), String> {
        for (name, rule) in &self.fields {
            let field = def
                .fields
                .get(name)
                .ok_or_else(|| format!("rules/{stream}: stream {stream} has no field {name:?}"))?;
            let numeric = matches!(field.ty, FieldType::Int | FieldType::Float);
            if !numeric && (rule.min.is_some() || rule.max.is_some()) {
                return Err(format!(
                    "rules/{stream}, field {name}: min and max apply only to int and float fields"
                ));
            }
            if let (Some(min), Some(max)) = (rule.min, rule.max) {
                if min > max {
                    return Err(format!(
                        "rules/{stream}, field {name}: min {min} is greater than max {max}"
                    ));
                }
            }
            if let Some(values) = &rule.values {
                if field.ty != FieldType::Enum {
                    return Err(format!(
                        "rules/{stream}, field {name}: values apply only to enum fields"
                    ));
                }
                if values.is_empty() {
                    return Err(format!(
                        "rules/{stream}, field {name}: an enum needs at least one value"
                    ));
                }
                // A field stored as a code keeps the declaration's numbering,
                // so a rule can only narrow its members.
                let declared = field.values.as_deref().unwrap_or_default();
                if field.code {
                    if let Some(new) = values.iter().find(|v| !declared.contains(v)) {
                        return Err(format!(
                            "rules/{stream}, field {name}: {new:?} is not declared, and a field stored as a code can only narrow its values"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// An enrichment table: rows by key, each with the same columns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LookupTable {
    /// What the key column is called in the file (for people; lookups go
    /// by the record field a stream's `enrich` entry names).
    pub key: String,
    pub columns: Vec<String>,
    pub rows: BTreeMap<String, Vec<Value>>,
}

/// Rows per table at most: tables live in every node's memory.
pub const MAX_LOOKUP_ROWS: usize = 1_000_000;

impl LookupTable {
    /// CSV with a header row; the first column is the key. Cells that read
    /// as integers, numbers or booleans become those; anything else is text.
    fn parse_csv(text: &str) -> Result<LookupTable, String> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_reader(text.as_bytes());
        let header = reader
            .headers()
            .map_err(|e| format!("invalid CSV header: {e}"))?
            .clone();
        let mut names = header.iter().map(str::trim);
        let key = names
            .next()
            .filter(|k| !k.is_empty())
            .ok_or("the CSV header names no columns")?
            .to_string();
        let columns: Vec<String> = names.map(str::to_string).collect();
        let mut table = LookupTable {
            key,
            columns,
            rows: BTreeMap::new(),
        };
        for (i, record) in reader.records().enumerate() {
            let line = i + 2;
            let record = record.map_err(|e| format!("CSV line {line}: {e}"))?;
            let mut cells = record.iter();
            let row_key = cells.next().unwrap_or_default().trim().to_string();
            let values: Vec<Value> = cells.map(csv_cell).collect();
            table.insert(row_key, values, line)?;
        }
        table.check()?;
        Ok(table)
    }

    /// TOML: `key = "sku"`, then one `[rows.<key>]` table per row.
    fn parse_toml(text: &str) -> Result<LookupTable, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            key: String,
            rows: IndexMap<String, IndexMap<String, toml::Value>>,
        }
        let file: File = toml::from_str(text).map_err(|e| format!("invalid lookup file: {e}"))?;
        let mut columns: Vec<String> = Vec::new();
        for row in file.rows.values() {
            for name in row.keys() {
                if !columns.contains(name) {
                    columns.push(name.clone());
                }
            }
        }
        let mut table = LookupTable {
            key: file.key,
            columns,
            rows: BTreeMap::new(),
        };
        for (i, (row_key, row)) in file.rows.into_iter().enumerate() {
            let values = table
                .columns
                .iter()
                .map(|c| row.get(c).map_or(Value::Null, toml_to_json))
                .collect();
            table.insert(row_key, values, i + 1)?;
        }
        table.check()?;
        Ok(table)
    }

    fn insert(&mut self, key: String, values: Vec<Value>, line: usize) -> Result<(), String> {
        if key.is_empty() {
            return Err(format!("row {line}: the key is empty"));
        }
        if values.len() != self.columns.len() {
            return Err(format!(
                "row {line}: {} values for {} columns",
                values.len(),
                self.columns.len()
            ));
        }
        if self.rows.insert(key.clone(), values).is_some() {
            return Err(format!("row {line}: key {key:?} appears twice"));
        }
        if self.rows.len() > MAX_LOOKUP_ROWS {
            return Err(format!(
                "a lookup table holds at most {MAX_LOOKUP_ROWS} rows"
            ));
        }
        Ok(())
    }

    fn check(&self) -> Result<(), String> {
        if self.columns.is_empty() {
            return Err("a lookup table needs at least one column besides its key".into());
        }
        for (i, column) in self.columns.iter().enumerate() {
            check_identifier("lookup column", column)?;
            if self.columns[..i].contains(column) {
                return Err(format!("lookup column {column:?} appears twice"));
            }
        }
        if self.rows.is_empty() {
            return Err("a lookup table needs at least one row".into());
        }
        Ok(())
    }

    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }

    /// Checks that every key is a network (`10.0.0.0/8`, `2001:db8::/32`)
    /// or an address, for tables that streams match by address.
    pub fn check_networks(&self) -> Result<(), String> {
        match self.rows.keys().find(|k| parse_network(k).is_none()) {
            Some(bad) => Err(format!("{bad:?} is not an IP network like 10.0.0.0/8")),
            None => Ok(()),
        }
    }
}

fn csv_cell(cell: &str) -> Value {
    let cell = cell.trim();
    if let Ok(i) = cell.parse::<i64>() {
        Value::from(i)
    } else if let Some(f) = cell.parse::<f64>().ok().filter(|f| f.is_finite()) {
        Value::from(f)
    } else if let Ok(b) = cell.parse::<bool>() {
        Value::from(b)
    } else if cell.is_empty() {
        Value::Null
    } else {
        Value::from(cell)
    }
}

fn toml_to_json(value: &toml::Value) -> Value {
    match value {
        toml::Value::String(s) => Value::from(s.as_str()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => Value::from(*f),
        toml::Value::Boolean(b) => Value::from(*b),
        other => Value::from(other.to_string()),
    }
}

/// `addr/len` or a bare address (a network of one).
pub fn parse_network(text: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => (addr.parse::<IpAddr>().ok()?, len.parse::<u8>().ok()?),
        None => {
            let addr: IpAddr = text.parse().ok()?;
            (addr, if addr.is_ipv4() { 32 } else { 128 })
        }
    };
    let bits = if addr.is_ipv4() { 32 } else { 128 };
    (len <= bits).then_some((addr, len))
}

/// Whether `addr` lies in the network `(net, len)`.
pub fn network_contains((net, len): (IpAddr, u8), addr: IpAddr) -> bool {
    let (net, addr, bits) = match (net, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => (u32::from(n) as u128, u32::from(a) as u128, 32),
        (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(n), u128::from(a), 128),
        _ => return false,
    };
    if len == 0 {
        return true;
    }
    let shift = bits - len as u32;
    (net >> shift) == (addr >> shift)
}

/// What the coordinator publishes, retained, on `$fleet/state/<key>`, and
/// what nodes and brokers act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateAnnouncement {
    pub version: u64,
    pub key: String,
    /// Unix milliseconds on the cluster clock (the database's).
    pub activate_at_ms: i64,
    /// SHA-256 of the document as stored, hex.
    pub sha256: String,
}

/// This process's view of the cluster clock (the shared database's):
/// local time plus an offset measured by round trips to the database.
/// Activation times are on the cluster clock, so machines whose clocks
/// disagree still switch together.
#[derive(Debug, Default)]
pub struct ClusterClock {
    offset_ms: std::sync::atomic::AtomicI64,
    /// Half the round trip of the sample the offset came from: how far off
    /// the offset may be.
    uncertainty_ms: std::sync::atomic::AtomicI64,
    /// Added to the system clock: a test's stand-in for a machine whose
    /// clock is wrong.
    skew_ms: i64,
}

impl ClusterClock {
    pub fn new(skew_ms: i64) -> ClusterClock {
        ClusterClock {
            skew_ms,
            uncertainty_ms: std::sync::atomic::AtomicI64::new(i64::MAX),
            ..ClusterClock::default()
        }
    }

    /// This machine's clock, in Unix milliseconds.
    pub fn local_ms(&self) -> i64 {
        crate::unix_now_ms() + self.skew_ms
    }

    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn uncertainty_ms(&self) -> i64 {
        self.uncertainty_ms
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Cluster time now.
    pub fn now_ms(&self) -> i64 {
        self.local_ms() + self.offset_ms()
    }

    /// A reading of the cluster clock taken between local times `sent` and
    /// `received`. A sample is kept unless it is much less certain than the
    /// current one (a slow round trip says little about the offset).
    pub fn observe(&self, sent_ms: i64, cluster_ms: i64, received_ms: i64) {
        use std::sync::atomic::Ordering::Relaxed;
        let half_trip = ((received_ms - sent_ms).max(0) + 1) / 2;
        let current = self.uncertainty_ms.load(Relaxed);
        if half_trip <= current.saturating_mul(2).max(5) {
            self.offset_ms
                .store(cluster_ms - (sent_ms + half_trip), Relaxed);
            self.uncertainty_ms.store(half_trip, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::StreamsFile;

    fn stream() -> StreamDef {
        StreamsFile::parse(
            r#"[streams.t]
            fields.celsius = { type = "float", min = -40.0, max = 125.0 }
            fields.status  = { type = "enum", values = ["ok", "warn"] }
            fields.mode    = { type = "enum", values = ["a", "b"], code = true }"#,
        )
        .unwrap()
        .streams["t"]
            .clone()
    }

    #[test]
    fn rules_are_checked_against_their_stream() {
        let key = StateKey::parse("rules/t").unwrap();
        let rules = |text: &str| match StateValue::parse(&key, text, StateFormat::Toml)? {
            StateValue::Rules(r) => r.check("t", &stream()),
            _ => unreachable!(),
        };
        assert_eq!(rules("[fields.celsius]\nmax = 50.0"), Ok(()));
        assert_eq!(rules("[fields.status]\nvalues = [\"ok\", \"new\"]"), Ok(()));
        let cases = [
            ("[fields.nope]\nmax = 1.0", "has no field"),
            ("[fields.status]\nmax = 1.0", "only to int and float"),
            ("[fields.celsius]\nmin = 5.0\nmax = 1.0", "greater than max"),
            ("[fields.celsius]\nvalues = [\"x\"]", "only to enum"),
            ("[fields.mode]\nvalues = [\"c\"]", "can only narrow"),
            ("[fields.celsius]\nmaximum = 1.0", "unknown field"),
            ("", "sets no"),
        ];
        for (text, expected) in cases {
            let err = rules(text).unwrap_err();
            assert!(err.contains(expected), "{text:?} gave {err:?}");
        }
    }

    #[test]
    fn lookup_tables_parse_from_csv_and_toml_alike() {
        let key = StateKey::parse("lookup/prices").unwrap();
        let csv = StateValue::parse(
            &key,
            "sku,price,name\nA1,9.5,Widget\nB2,12,\"Big, gadget\"\n",
            StateFormat::Csv,
        )
        .unwrap();
        let toml = StateValue::parse(
            &key,
            "key = \"sku\"\n[rows.A1]\nprice = 9.5\nname = \"Widget\"\n[rows.B2]\nprice = 12\nname = \"Big, gadget\"\n",
            StateFormat::Toml,
        )
        .unwrap();
        assert_eq!(csv, toml);
        let StateValue::Lookup(table) = csv else {
            unreachable!()
        };
        assert_eq!(
            table.rows["B2"],
            vec![Value::from(12), Value::from("Big, gadget")]
        );
        for (text, expected) in [
            ("sku,price\nA1,1\nA1,2\n", "appears twice"),
            ("sku,price\nA1,1,3\n", "CSV line 2"),
            ("sku\nA1\n", "at least one column"),
            ("sku,price\n", "at least one row"),
            ("sku,Price\nA1,1\n", "invalid lookup column"),
        ] {
            let err = StateValue::parse(&key, text, StateFormat::Csv).unwrap_err();
            assert!(err.contains(expected), "{text:?} gave {err:?}");
        }
        assert!(StateKey::parse("views/x").is_err());
        assert!(StateKey::parse("lookup/Bad").is_err());
    }

    #[test]
    fn a_skewed_clock_is_corrected_by_its_round_trips() {
        let clock = ClusterClock::new(5_000);
        let sent = clock.local_ms();
        // The database answered with the true time, 4 ms into the trip.
        clock.observe(sent, sent - 5_000 + 4, sent + 8);
        assert!((clock.now_ms() - (clock.local_ms() - 5_000)).abs() <= 1);
        assert_eq!(clock.uncertainty_ms(), 4);
        // A slow sample does not replace a good one.
        clock.observe(sent, sent + 60_000, sent + 2_000);
        assert_eq!(clock.offset_ms(), -5_000);
    }

    #[test]
    fn networks_match_by_prefix() {
        let net = parse_network("10.1.0.0/16").unwrap();
        assert!(network_contains(net, "10.1.200.3".parse().unwrap()));
        assert!(!network_contains(net, "10.2.0.1".parse().unwrap()));
        assert!(network_contains(
            parse_network("2001:db8::/32").unwrap(),
            "2001:db8::1".parse().unwrap()
        ));
        assert!(!network_contains(net, "::1".parse().unwrap()));
        assert!(parse_network("10.0.0.0/33").is_none());
        assert!(parse_network("0.0.0.0/0").is_some());
    }
}
