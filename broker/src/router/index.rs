//! The subscription index: which sessions' filters match a topic.
//!
//! A trie over topic levels, so matching costs the depth of the topic and
//! the number of wildcard branches, not the number of subscriptions: a
//! fleet of 100,000 devices each subscribed to `devices/<id>/#` is matched
//! by one lookup per level.

use std::collections::HashMap;
use std::sync::Arc;

use crate::session::{Session, SubOptions};

/// One subscription as the index holds it.
#[derive(Clone)]
pub struct Subscriber {
    pub session: Arc<Session>,
    pub options: SubOptions,
    /// For `$share/<group>/<filter>`, that whole filter: one member of the
    /// group gets each message.
    pub shared: Option<Arc<str>>,
}

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    /// Subscribers whose filter ends here.
    here: Vec<Subscriber>,
    /// Subscribers whose filter ends here with `/#` (matching this level too).
    rest: Vec<Subscriber>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.here.is_empty() && self.rest.is_empty()
    }
}

#[derive(Default)]
pub struct TopicIndex {
    root: Node,
    len: usize,
}

/// A filter split into its shared group and the filter proper.
pub fn split_shared(filter: &str) -> (Option<&str>, &str) {
    match filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
    {
        Some((group, inner)) => (Some(group), inner),
        None => (None, filter),
    }
}

/// Checks a topic filter's syntax as MQTT defines it; the error says why.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("empty topic filter".into());
    }
    if filter.contains('\0') {
        return Err("topic filter contains NUL".into());
    }
    let inner = if let Some(rest) = filter.strip_prefix("$share/") {
        let Some((group, inner)) = rest.split_once('/') else {
            return Err(format!("shared subscription {filter:?} has no filter"));
        };
        if group.is_empty() || group.contains(['+', '#']) {
            return Err(format!("shared subscription group {group:?} is not valid"));
        }
        if inner.is_empty() {
            return Err(format!("shared subscription {filter:?} has no filter"));
        }
        inner
    } else {
        filter
    };
    let levels: Vec<&str> = inner.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(format!(
                "'#' must be a whole level and the last one, in {filter:?}"
            ));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("'+' must be a whole level, in {filter:?}"));
        }
    }
    Ok(())
}

impl TopicIndex {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces `session`'s subscription to `filter` (checked).
    pub fn insert(&mut self, filter: &str, subscriber: Subscriber) {
        let (_, inner) = split_shared(filter);
        let (node, multi) = self.node_mut(inner);
        let list = if multi {
            &mut node.rest
        } else {
            &mut node.here
        };
        let id = &subscriber.session.client_id;
        match list
            .iter_mut()
            .find(|s| &s.session.client_id == id && s.shared == subscriber.shared)
        {
            Some(existing) => *existing = subscriber,
            None => {
                list.push(subscriber);
                self.len += 1;
            }
        }
    }

    fn node_mut(&mut self, inner: &str) -> (&mut Node, bool) {
        let mut node = &mut self.root;
        let mut levels = inner.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                return (node, true);
            }
            node = node.children.entry(level.into()).or_default();
        }
        (node, false)
    }

    /// Removes `client_id`'s subscription to `filter`; true if it existed.
    pub fn remove(&mut self, filter: &str, client_id: &str) -> bool {
        let (group, inner) = split_shared(filter);
        let shared = group.map(|_| filter);
        let levels: Vec<&str> = inner.split('/').collect();
        let removed = remove_at(&mut self.root, &levels, shared, client_id);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Every subscription matching `topic`, shared ones included.
    pub fn matches(&self, topic: &str, out: &mut Vec<Subscriber>) {
        let levels: Vec<&str> = topic.split('/').collect();
        // Wildcards at the first level do not match `$` topics (MQTT 4.7.2).
        let dollar = topic.starts_with('$');
        collect(&self.root, &levels, dollar, out);
    }
}

fn remove_at(node: &mut Node, levels: &[&str], shared: Option<&str>, client_id: &str) -> bool {
    let same = |s: &Subscriber| &*s.session.client_id == client_id && s.shared.as_deref() == shared;
    match levels {
        ["#"] => {
            let before = node.rest.len();
            node.rest.retain(|s| !same(s));
            before != node.rest.len()
        }
        [] => {
            let before = node.here.len();
            node.here.retain(|s| !same(s));
            before != node.here.len()
        }
        [level, rest @ ..] => {
            let Some(child) = node.children.get_mut(*level) else {
                return false;
            };
            let removed = remove_at(child, rest, shared, client_id);
            if child.is_empty() {
                node.children.remove(*level);
            }
            removed
        }
    }
}

fn collect(node: &Node, levels: &[&str], dollar_first: bool, out: &mut Vec<Subscriber>) {
    // `a/#` matches `a` too (MQTT 4.7.1.2).
    if !dollar_first {
        out.extend(node.rest.iter().cloned());
    }
    let Some((level, rest)) = levels.split_first() else {
        out.extend(node.here.iter().cloned());
        return;
    };
    if let Some(child) = node.children.get(*level) {
        collect(child, rest, false, out);
    }
    if !dollar_first {
        if let Some(child) = node.children.get("+") {
            collect(child, rest, false, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Session;
    use fleetgate_protocol::topic::filter_matches;

    fn subscriber(id: &str) -> Subscriber {
        Subscriber {
            session: Session::new(id.into(), 0),
            options: SubOptions::default(),
            shared: None,
        }
    }

    fn matching(index: &TopicIndex, topic: &str) -> Vec<String> {
        let mut out = Vec::new();
        index.matches(topic, &mut out);
        let mut ids: Vec<String> = out
            .iter()
            .map(|s| s.session.client_id.to_string())
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn the_trie_agrees_with_the_reference_matcher() {
        let filters = [
            "#", "+", "a", "a/#", "a/+", "a/b", "a/+/c", "+/b/#", "a/b/c/#", "+/+", "$SYS/#",
            "$fleet/+", "a//b", "/a", "+/",
        ];
        let topics = [
            "a", "a/b", "a/b/c", "a/x/c", "b/b/b", "/a", "a//b", "$SYS/x", "$fleet/s", "", "x/",
            "a/b/c/d",
        ];
        let mut index = TopicIndex::default();
        for (i, filter) in filters.iter().enumerate() {
            check_filter(filter).unwrap();
            index.insert(filter, subscriber(&format!("{i:02}")));
        }
        for topic in topics {
            let expected: Vec<String> = filters
                .iter()
                .enumerate()
                .filter(|(_, f)| filter_matches(f, topic))
                .map(|(i, _)| format!("{i:02}"))
                .collect();
            assert_eq!(matching(&index, topic), expected, "topic {topic:?}");
        }
        for (i, filter) in filters.iter().enumerate() {
            assert!(index.remove(filter, &format!("{i:02}")), "{filter}");
        }
        assert!(index.is_empty());
        assert!(index.root.is_empty(), "removal prunes empty branches");
    }

    #[test]
    fn shared_and_plain_subscriptions_of_one_session_are_apart() {
        let mut index = TopicIndex::default();
        let mut shared = subscriber("s");
        shared.shared = Some("$share/g/a/+".into());
        index.insert("$share/g/a/+", shared);
        index.insert("a/+", subscriber("s"));
        assert_eq!(index.len(), 2);
        assert_eq!(matching(&index, "a/b").len(), 2);
        assert!(index.remove("$share/g/a/+", "s"));
        assert_eq!(matching(&index, "a/b"), vec!["s"]);
    }

    #[test]
    fn filters_are_checked_as_mqtt_says() {
        for good in ["#", "a/#", "+/+", "$share/g/a/#", "/", "a//+"] {
            assert!(check_filter(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a#",
            "a/#/b",
            "a+/b",
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g/",
        ] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
    }
}
