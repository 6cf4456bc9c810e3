//! The name a cluster's brokers share on NATS. Every subject, bucket and
//! stream they use is named from it, so two clusters (production and
//! staging, say) can share NATS servers without hearing each other's
//! messages, sessions or retained messages.

use std::fmt;
use std::str::FromStr;

/// A cluster's name: 1-32 characters, `a-z 0-9 - _`, starting with a
/// letter (it goes into subject tokens, KV bucket and stream names, which
/// allow no more).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterName(String);

impl ClusterName {
    /// What a broker uses unless told otherwise; the names it gives are
    /// the ones fleetgate always used.
    pub const DEFAULT: &'static str = "fleetgate";

    pub fn new(name: &str) -> Result<ClusterName, String> {
        let valid = (1..=32).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if valid {
            Ok(ClusterName(name.to_string()))
        } else {
            Err(format!(
                "cluster name {name:?}: use 1-32 characters from a-z 0-9 - _, starting with a letter"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Core NATS subjects: `<name>.mqtt.<topic>`, `<name>.long`, `<name>.claim`.
    pub fn subject(&self, rest: &str) -> String {
        format!("{}.{rest}", self.0)
    }

    /// A JetStream KV bucket: `<name>-<what>`.
    pub fn bucket(&self, what: &str) -> String {
        format!("{}-{what}", self.0)
    }

    /// A JetStream stream: `<NAME>_<WHAT>` (upper case, `-` as `_`, as
    /// stream names are conventionally written).
    pub fn stream(&self, what: &str) -> String {
        format!("{}_{what}", self.0.replace('-', "_")).to_ascii_uppercase()
    }
}

impl Default for ClusterName {
    fn default() -> ClusterName {
        ClusterName(ClusterName::DEFAULT.to_string())
    }
}

impl FromStr for ClusterName {
    type Err = String;
    fn from_str(s: &str) -> Result<ClusterName, String> {
        ClusterName::new(s)
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::ClusterName;

    #[test]
    fn the_default_keeps_the_names_fleetgate_always_used() {
        let name = ClusterName::default();
        assert_eq!(name.subject("mqtt."), "fleetgate.mqtt.");
        assert_eq!(name.bucket("sessions"), "fleetgate-sessions");
        assert_eq!(name.stream("QUEUES"), "FLEETGATE_QUEUES");
        assert_eq!(
            ClusterName::new("eu-west_2").unwrap().stream("QUEUES"),
            "EU_WEST_2_QUEUES"
        );
    }

    #[test]
    fn names_that_would_break_a_subject_or_bucket_are_refused() {
        for bad in [
            "",
            "Prod",
            "a.b",
            "a b",
            "a*",
            "a>",
            "9lives",
            "-x",
            &"x".repeat(33),
        ] {
            let error = ClusterName::new(bad).unwrap_err();
            assert!(error.contains("a-z 0-9 - _"), "{bad:?}: {error}");
        }
    }
}
