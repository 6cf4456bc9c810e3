//! Topic names and the role rules for publishing and subscribing.
//!
//! - `ingest/<stream>/<device>`: records a device publishes; the store takes them.
//! - `live/<stream>/<device>`: validated records the store re-publishes.
//! - `devices/<device>/...`: commands and notices for one device.

use crate::Role;

pub const INGEST_PREFIX: &str = "ingest/";
pub const LIVE_PREFIX: &str = "live/";

/// A parsed `ingest/<stream>/<device>` topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestTopic<'a> {
    pub stream: &'a str,
    pub device: &'a str,
}

impl<'a> IngestTopic<'a> {
    /// `None` when the topic is not in the ingest namespace at all;
    /// `Some(Err)` when it is, but malformed.
    pub fn parse(topic: &'a str) -> Option<Result<Self, String>> {
        let rest = topic.strip_prefix(INGEST_PREFIX)?;
        let mut parts = rest.split('/');
        let parsed = match (parts.next(), parts.next(), parts.next()) {
            (Some(stream), Some(device), None) if !stream.is_empty() && !device.is_empty() => {
                Ok(IngestTopic { stream, device })
            }
            _ => Err(format!(
                "ingest topic {topic:?} must have the form ingest/<stream>/<device>"
            )),
        };
        Some(parsed)
    }
}

pub fn live_topic(stream: &str, device: &str) -> String {
    format!("{LIVE_PREFIX}{stream}/{device}")
}

/// Why a publish or subscribe was refused; the text goes to logs, MQTT 5
/// reason strings and HTTP error bodies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied(pub String);

/// May `device` holding `role` publish to `topic`?
pub fn may_publish(role: Role, device: &str, topic: &str) -> Result<(), Denied> {
    if topic.contains(['+', '#']) {
        return Err(Denied(format!("topic {topic:?} contains a wildcard")));
    }
    match IngestTopic::parse(topic) {
        // Malformed ingest topics are refused for every role: nothing could
        // store them, and relaying them would only confuse subscribers.
        Some(Err(e)) => Err(Denied(e)),
        _ if role.allows(Role::Admin) => Ok(()),
        Some(Ok(t)) if t.device == device => Ok(()),
        Some(Ok(t)) => Err(Denied(format!(
            "{device} may publish only its own records, not {}'s",
            t.device
        ))),
        _ => Err(Denied(format!(
            "role {role} may publish only to ingest/<stream>/{device}, not {topic:?}"
        ))),
    }
}

/// May `device` holding `role` subscribe to `filter`? A filter is allowed when
/// every topic it can match is one the role may read.
pub fn may_subscribe(role: Role, device: &str, filter: &str) -> Result<(), Denied> {
    if role.allows(Role::Admin) {
        return Ok(());
    }
    let inner = strip_shared_prefix(filter);
    let mut levels = inner.split('/');
    let first = levels.next().unwrap_or("");
    let own_commands = first == "devices" && levels.next() == Some(device);
    let live = first == "live" && role.allows(Role::Extract);
    if own_commands || live {
        Ok(())
    } else if role.allows(Role::Extract) {
        Err(Denied(format!(
            "role {role} may subscribe only to live/# and devices/{device}/#, not {filter:?}"
        )))
    } else {
        Err(Denied(format!(
            "role {role} may subscribe only to devices/{device}/#, not {filter:?}"
        )))
    }
}

/// `$share/<group>/<filter>` is checked as `<filter>`.
fn strip_shared_prefix(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_, inner)| inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_devices_publish_only_their_own_ingest_topics() {
        assert!(may_publish(Role::Ingest, "s1", "ingest/temperature/s1").is_ok());
        assert!(may_publish(Role::Ingest, "s1", "ingest/temperature/s2").is_err());
        assert!(may_publish(Role::Ingest, "s1", "live/temperature/s1").is_err());
        assert!(may_publish(Role::Ingest, "s1", "ingest/temperature/s1/x").is_err());
        assert!(may_publish(Role::Extract, "s1", "devices/s1/cmd").is_err());
        assert!(may_publish(Role::Admin, "root", "devices/s1/cmd").is_ok());
        assert!(may_publish(Role::Admin, "root", "devices/+/cmd").is_err());
        assert!(may_publish(Role::Admin, "root", "ingest/temperature").is_err());
    }

    #[test]
    fn subscriptions_follow_the_role_matrix() {
        assert!(may_subscribe(Role::Ingest, "s1", "devices/s1/#").is_ok());
        assert!(may_subscribe(Role::Ingest, "s1", "devices/s1/cmd").is_ok());
        assert!(may_subscribe(Role::Ingest, "s1", "devices/+/cmd").is_err());
        assert!(may_subscribe(Role::Ingest, "s1", "devices/#").is_err());
        assert!(may_subscribe(Role::Ingest, "s1", "live/#").is_err());
        assert!(may_subscribe(Role::Ingest, "s1", "#").is_err());
        assert!(may_subscribe(Role::Extract, "a1", "live/#").is_ok());
        assert!(may_subscribe(Role::Extract, "a1", "live/temperature/+").is_ok());
        assert!(may_subscribe(Role::Extract, "a1", "$share/g/live/#").is_ok());
        assert!(may_subscribe(Role::Extract, "a1", "$share/g/#").is_err());
        assert!(may_subscribe(Role::Extract, "a1", "+/temperature/s1").is_err());
        assert!(may_subscribe(Role::Admin, "root", "#").is_ok());
    }
}
