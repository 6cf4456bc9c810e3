//! Topic names and the role rules for publishing and subscribing.
//!
//! - `ingest/<stream>/<device>`: records a device publishes; the store takes them.
//! - `live/<stream>/<device>`: validated records the store re-publishes.
//! - `devices/<device>/...`: commands and notices for one device.
//! - `$fleet/state/<key>`: the platform's retained announcements of cluster
//!   state versions; only the platform publishes under `$`.

use crate::Role;

pub const INGEST_PREFIX: &str = "ingest/";
pub const LIVE_PREFIX: &str = "live/";
/// Topics the platform itself publishes; clients may only read them.
pub const PLATFORM_PREFIX: &str = "$fleet/";
pub const STATE_TOPIC_PREFIX: &str = "$fleet/state/";

/// The retained topic announcing a state key's newest version.
pub fn state_topic(key: &str) -> String {
    format!("{STATE_TOPIC_PREFIX}{key}")
}

/// Is `filter` one the gatekeeper serves itself (the embedded broker refuses
/// every `$` filter but `$share`)?
pub fn is_platform_filter(filter: &str) -> bool {
    filter.starts_with(PLATFORM_PREFIX)
}

/// MQTT topic matching: `+` is one level, a trailing `#` any remainder
/// (including none), and wildcards at the start do not match `$` topics.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        if level == "#" {
            return true;
        }
        match topic_levels.next() {
            Some(t) if level == "+" || level == t => continue,
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

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
    if topic.starts_with('$') {
        return Err(Denied(format!(
            "topics starting with $ are the platform's; {topic:?} cannot be published to"
        )));
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
    if let Some(platform) = filter.strip_prefix(PLATFORM_PREFIX) {
        // State versions are for operators and analytics clients (lookup
        // tables may hold business data); devices get theirs in their SDK.
        let state = platform == "#" || platform.starts_with("state/") || platform == "+/#";
        return match (state, role.allows(Role::Extract)) {
            (true, true) => Ok(()),
            (true, false) => Err(Denied(format!(
                "role {role} may not read the platform's state topics ({filter:?})"
            ))),
            (false, _) => Err(Denied(format!(
                "{filter:?} is not a platform topic; the platform publishes only under {STATE_TOPIC_PREFIX}"
            ))),
        };
    }
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
        assert!(may_subscribe(Role::Extract, "a1", "$fleet/state/#").is_ok());
        assert!(may_subscribe(Role::Admin, "root", "$fleet/state/rules/+").is_ok());
        assert!(may_subscribe(Role::Ingest, "s1", "$fleet/state/#").is_err());
        assert!(may_subscribe(Role::Admin, "root", "$fleet/secrets").is_err());
    }

    #[test]
    fn nobody_publishes_platform_topics() {
        assert!(may_publish(Role::Admin, "root", "$fleet/state/rules/t").is_err());
        assert!(may_publish(Role::Admin, "root", "$SYS/x").is_err());
    }

    #[test]
    fn filters_match_as_mqtt_says() {
        assert!(filter_matches("$fleet/state/#", "$fleet/state/rules/t"));
        assert!(filter_matches("$fleet/state/+/t", "$fleet/state/rules/t"));
        assert!(filter_matches("$fleet/state/rules/#", "$fleet/state/rules"));
        assert!(!filter_matches("$fleet/state/+", "$fleet/state/rules/t"));
        assert!(!filter_matches("#", "$fleet/state/rules/t"));
        assert!(!filter_matches("+/state/rules/t", "$fleet/state/rules/t"));
        assert!(!filter_matches(
            "$fleet/state/rules/t/x",
            "$fleet/state/rules/t"
        ));
    }
}
