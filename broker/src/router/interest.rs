//! The subject patterns a broker subscribes to on NATS for the plain
//! filters of the sessions it holds (see `router::nats`, "Interest"), kept
//! one filter at a time: a fleet subscribes a filter per device, and its
//! connect storms must not pay for every filter on each new one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::nats::filter_to_subjects;

/// The plain filters held here, and the subject patterns (after
/// `<cluster>.mqtt.`) that cover them: each filter's own
/// ([`filter_to_subjects`]) while they are at most `max`; beyond, every
/// pattern cut to its first levels and `>`, keeping as many levels as the
/// limit allows (`devices.d-1.cmd` × 10,000 becomes `devices.>`), and at
/// worst everything (`>`). Wider patterns only bring messages no session
/// here wants, which routing drops.
///
/// A change costs a few map updates; only crossing `max` (which changes
/// how patterns are cut) goes over every pattern again. Once cut, the cut
/// stays as coarse as it became until the patterns are `max` or fewer
/// again, when each is its own once more.
pub struct Interest {
    max: usize,
    /// Longer patterns are left out: the topics they match are too long
    /// for a subject and go on `<cluster>.long`, which every broker hears.
    longest: usize,
    filters: HashSet<Arc<str>>,
    /// The filters' patterns, each with how many filters need it.
    exact: HashMap<String, usize>,
    /// How patterns are cut: not at all (`None`), to their first `n`
    /// levels, or to everything (`Some(0)`).
    levels: Option<usize>,
    /// What to subscribe to, each with how many exact patterns it covers.
    subjects: HashMap<String, usize>,
}

impl Interest {
    pub fn new(max: usize, longest: usize) -> Interest {
        Interest {
            max: max.max(1),
            longest,
            filters: HashSet::new(),
            exact: HashMap::new(),
            levels: None,
            subjects: HashMap::new(),
        }
    }

    /// Holds `filter`; false if it was held already.
    pub fn add(&mut self, filter: Arc<str>) -> bool {
        if !self.filters.insert(filter.clone()) {
            return false;
        }
        for pattern in self.patterns(&filter) {
            let needed = self.exact.entry(pattern.clone()).or_insert(0);
            *needed += 1;
            if *needed == 1 {
                self.cover(&pattern);
            }
        }
        if self.subjects.len() > self.max {
            self.recut();
        }
        true
    }

    /// Lets go of `filter`; false if it was not held.
    pub fn remove(&mut self, filter: &str) -> bool {
        if !self.filters.remove(filter) {
            return false;
        }
        for pattern in self.patterns(filter) {
            let Some(needed) = self.exact.get_mut(&pattern) else {
                continue;
            };
            *needed -= 1;
            if *needed == 0 {
                self.exact.remove(&pattern);
                self.uncover(&pattern);
            }
        }
        if self.levels.is_some() && self.exact.len() <= self.max {
            self.recut();
        }
        true
    }

    /// The subject patterns to subscribe to: at most `max`.
    pub fn subjects(&self) -> impl Iterator<Item = &String> {
        self.subjects.keys()
    }

    pub fn contains(&self, subject: &str) -> bool {
        self.subjects.contains_key(subject)
    }

    fn patterns(&self, filter: &str) -> Vec<String> {
        let mut patterns = filter_to_subjects(filter);
        // The shortest topic a pattern matches maps no shorter than it.
        patterns.retain(|pattern| pattern.len() <= self.longest);
        patterns
    }

    fn cut(&self, pattern: &str) -> String {
        match self.levels {
            None => pattern.to_string(),
            Some(0) => ">".to_string(),
            Some(levels) => cut_to(pattern, levels),
        }
    }

    fn cover(&mut self, pattern: &str) {
        *self.subjects.entry(self.cut(pattern)).or_insert(0) += 1;
    }

    fn uncover(&mut self, pattern: &str) {
        let subject = self.cut(pattern);
        if let Some(covered) = self.subjects.get_mut(&subject) {
            *covered -= 1;
            if *covered == 0 {
                self.subjects.remove(&subject);
            }
        }
    }

    /// Cuts every pattern again, as finely as `max` allows.
    fn recut(&mut self) {
        self.levels = self.finest_cut();
        self.subjects.clear();
        let patterns: Vec<String> = self.exact.keys().cloned().collect();
        for pattern in patterns {
            self.cover(&pattern);
        }
    }

    fn finest_cut(&self) -> Option<usize> {
        if self.exact.len() <= self.max {
            return None;
        }
        let deepest = self
            .exact
            .keys()
            .map(|p| p.split('.').count())
            .max()
            .unwrap_or(1);
        (1..deepest)
            .rev()
            .find(|&levels| {
                let cut: HashSet<String> = self.exact.keys().map(|p| cut_to(p, levels)).collect();
                cut.len() <= self.max
            })
            .or(Some(0))
    }
}

/// `pattern` with only its first `levels` tokens, the rest matched by `>`.
fn cut_to(pattern: &str, levels: usize) -> String {
    match pattern.match_indices('.').nth(levels - 1) {
        // A `>` is always last, so it is never cut off.
        Some((dot, _)) => format!("{}.>", &pattern[..dot]),
        None => pattern.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::nats::{topic_to_subject, MAX_SUBJECT};

    /// What a broker of the cluster `fleetgate` subscribes to for `filters`.
    fn interest(filters: &[&str], max: usize) -> Vec<String> {
        let mut interest = held(max);
        for filter in filters {
            interest.add((*filter).into());
        }
        sorted(&interest)
    }

    fn held(max: usize) -> Interest {
        Interest::new(max, MAX_SUBJECT - "fleetgate.mqtt.".len())
    }

    fn sorted(interest: &Interest) -> Vec<String> {
        let mut subjects: Vec<String> = interest.subjects().cloned().collect();
        subjects.sort();
        subjects
    }

    #[test]
    fn interest_is_each_filters_own_patterns_while_they_are_few() {
        assert_eq!(
            interest(&["live/#", "devices/d-1/cmd", "+/status", "live/#"], 10),
            ["*.status", "devices.d-1.cmd", "live", "live.>"]
        );
        assert_eq!(interest(&["#"], 10), [">"]);
        assert!(interest(&[], 10).is_empty());
    }

    #[test]
    fn many_filters_widen_to_their_first_levels() {
        let commands: Vec<String> = (0..1000).map(|i| format!("devices/d-{i}/cmd")).collect();
        let mut filters: Vec<&str> = commands.iter().map(String::as_str).collect();
        filters.extend(["live/temperature/#", "$fleet/state/x"]);
        // Two levels would still be 1,000 patterns: one level it is.
        assert_eq!(interest(&filters, 256), ["$fleet.>", "devices.>", "live.>"]);
        // Devices with two topics each: two levels make one per device.
        let both: Vec<String> = (0..100)
            .flat_map(|i| [format!("devices/d-{i}/cmd"), format!("devices/d-{i}/ota")])
            .collect();
        let widened = interest(&both.iter().map(String::as_str).collect::<Vec<_>>(), 150);
        assert_eq!(widened.len(), 100);
        assert!(
            widened.contains(&"devices.d-7.>".to_string()),
            "{widened:?}"
        );
    }

    #[test]
    fn too_many_first_levels_hear_everything() {
        let topics: Vec<String> = (0..300).map(|i| format!("t{i}/x")).collect();
        let filters: Vec<&str> = topics.iter().map(String::as_str).collect();
        assert_eq!(interest(&filters, 256), [">"]);
    }

    #[test]
    fn every_topic_a_filter_matches_is_heard() {
        let filters = [
            "a/+/c/#",
            "a/b",
            "+/+",
            "x/#",
            "sport/tennis/+",
            "y/+/z",
            "deep/1/2/3/4",
        ];
        let topics = [
            "a/b/c",
            "a/b/c/d/e",
            "a/b",
            "q/r",
            "x",
            "x/1/2",
            "sport/tennis/p1",
            "y/1/z",
            "deep/1/2/3/4",
        ];
        for max in [100, 6, 4, 2, 1] {
            let patterns = interest(&filters, max);
            assert!(patterns.len() <= max.max(1), "{max}: {patterns:?}");
            for topic in topics {
                let subject = topic_to_subject(topic);
                assert!(
                    patterns.iter().any(|p| subject_matches(p, &subject)),
                    "{max}: {topic} not heard through {patterns:?}"
                );
            }
        }
    }

    #[test]
    fn patterns_too_long_for_a_subject_are_left_to_the_long_subject() {
        let long = format!("a/{}", "x".repeat(MAX_SUBJECT));
        assert_eq!(interest(&[&long, "b"], 10), ["b"]);
    }

    /// NATS's subject matching: `*` one token, `>` one or more at the end.
    fn subject_matches(pattern: &str, subject: &str) -> bool {
        let mut tokens = subject.split('.');
        for want in pattern.split('.') {
            match (want, tokens.next()) {
                (">", Some(_)) => return true,
                ("*", Some(_)) => {}
                (want, Some(token)) if want == token => {}
                _ => return false,
            }
        }
        tokens.next().is_none()
    }

    #[test]
    fn letting_go_narrows_again() {
        let commands: Vec<String> = (0..300).map(|i| format!("devices/d-{i}/cmd")).collect();
        let mut interest = held(256);
        for filter in &commands {
            assert!(interest.add(filter.as_str().into()));
        }
        assert!(!interest.add("devices/d-1/cmd".into()), "held already");
        assert!(interest.add("live/#".into()));
        assert_eq!(sorted(&interest), ["devices.>", "live", "live.>"]);
        // The live reader leaves: its subject goes although the cut stays.
        assert!(interest.remove("live/#"));
        assert!(!interest.remove("live/#"));
        assert_eq!(sorted(&interest), ["devices.>"]);
        // Back to 256 filters: each its own subject again.
        for filter in &commands[..44] {
            interest.remove(filter);
        }
        let subjects = sorted(&interest);
        assert_eq!(subjects.len(), 256);
        assert!(subjects.contains(&"devices.d-299.cmd".to_string()));
        for filter in &commands[44..] {
            interest.remove(filter);
        }
        assert!(sorted(&interest).is_empty());
    }

    /// Filters come and go in any order: every held filter's topics stay
    /// covered, never by more than `max` subjects.
    #[test]
    fn every_held_filter_stays_covered_as_filters_come_and_go() {
        let filters: Vec<String> = (0..60)
            .map(|i| match i % 4 {
                0 => format!("devices/d-{i}/cmd"),
                1 => format!("live/s-{}/#", i % 7),
                2 => format!("+/x-{i}"),
                _ => format!("a/b-{}/c/d-{i}", i % 5),
            })
            .collect();
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        for max in [1, 3, 10, 40] {
            let mut interest = held(max);
            let mut holding = std::collections::HashSet::new();
            for _ in 0..2000 {
                let filter = &filters[next() % filters.len()];
                if holding.contains(filter) {
                    interest.remove(filter);
                    holding.remove(filter);
                } else {
                    interest.add(filter.as_str().into());
                    holding.insert(filter.clone());
                }
                let subjects = sorted(&interest);
                assert!(subjects.len() <= max, "{max}: {subjects:?}");
                for filter in &holding {
                    for pattern in filter_to_subjects(filter) {
                        let example = pattern.replace('*', "x").replace('>', "y");
                        assert!(
                            subjects.iter().any(|s| subject_matches(s, &example)),
                            "{max}: {filter} ({example}) not covered by {subjects:?}"
                        );
                    }
                }
                if holding.is_empty() {
                    assert!(subjects.is_empty());
                }
            }
        }
    }
}
