//! `$fleet/...`: topics the platform itself publishes, retained, and the
//! gatekeeper serves to subscribers directly. The embedded broker refuses
//! every `$` filter but `$share`, and no client may publish under `$`, so
//! these never pass through it.
//!
//! Each retained topic holds one payload with a revision (a state version);
//! several feeders may offer the same revision again, and an older one never
//! replaces a newer one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use fleetgate_protocol::topic::filter_matches;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use crate::codec::{self, Version};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained {
    pub topic: String,
    pub revision: u64,
    pub payload: Bytes,
}

/// The retained platform topics of one gatekeeper.
#[derive(Clone)]
pub struct PlatformTopics {
    inner: Arc<Inner>,
}

struct Inner {
    retained: RwLock<BTreeMap<String, Arc<Retained>>>,
    updates: broadcast::Sender<Arc<Retained>>,
}

impl Default for PlatformTopics {
    fn default() -> Self {
        PlatformTopics {
            inner: Arc::new(Inner {
                retained: RwLock::default(),
                updates: broadcast::channel(64).0,
            }),
        }
    }
}

impl PlatformTopics {
    /// Retains `payload` on `topic` and delivers it to subscribers, unless
    /// the topic already holds this revision or a newer one.
    pub fn retain(&self, topic: &str, revision: u64, payload: Bytes) -> bool {
        let message = Arc::new(Retained {
            topic: topic.to_string(),
            revision,
            payload,
        });
        {
            let mut retained = self.inner.retained.write().expect("retained lock");
            if retained
                .get(topic)
                .is_some_and(|held| held.revision >= revision)
            {
                return false;
            }
            retained.insert(topic.to_string(), message.clone());
        }
        // Nobody subscribed is not an error.
        let _ = self.inner.updates.send(message);
        true
    }

    /// The revision `topic` holds, if any.
    pub fn revision(&self, topic: &str) -> Option<u64> {
        let retained = self.inner.retained.read().expect("retained lock");
        retained.get(topic).map(|m| m.revision)
    }

    fn matching(&self, filter: &str) -> Vec<Arc<Retained>> {
        let retained = self.inner.retained.read().expect("retained lock");
        retained
            .values()
            .filter(|m| filter_matches(filter, &m.topic))
            .cloned()
            .collect()
    }
}

enum Command {
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
}

/// One session's subscriptions to platform topics: a task that writes their
/// retained messages on subscribe, and later revisions as they come, into
/// the session's outgoing queue.
pub(crate) struct PlatformSubscriber {
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
}

impl PlatformSubscriber {
    pub fn start(topics: PlatformTopics, version: Version, out: mpsc::Sender<Bytes>) -> Self {
        let (commands, receiver) = mpsc::unbounded_channel();
        let task = tokio::spawn(deliver(topics, version, receiver, out));
        PlatformSubscriber { commands, task }
    }

    pub fn subscribe(&self, filters: Vec<String>) {
        let _ = self.commands.send(Command::Subscribe(filters));
    }

    pub fn unsubscribe(&self, filters: Vec<String>) {
        let _ = self.commands.send(Command::Unsubscribe(filters));
    }
}

impl Drop for PlatformSubscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn deliver(
    topics: PlatformTopics,
    version: Version,
    mut commands: mpsc::UnboundedReceiver<Command>,
    out: mpsc::Sender<Bytes>,
) {
    // Subscribed before any snapshot is read, so no revision falls between.
    let mut updates = topics.inner.updates.subscribe();
    let mut filters: Vec<String> = Vec::new();
    // Revision last sent per topic: a snapshot and an update may carry the
    // same one, and a device should see each once.
    let mut sent: HashMap<String, u64> = HashMap::new();
    loop {
        let (batch, retain) = tokio::select! {
            // Commands first: an unsubscribe takes effect before any update
            // that came after it.
            biased;
            command = commands.recv() => match command {
                Some(Command::Subscribe(new)) => {
                    let mut batch = Vec::new();
                    for filter in new {
                        // A repeated SUBSCRIBE re-sends retained messages, as MQTT says.
                        batch.extend(topics.matching(&filter));
                        if !filters.contains(&filter) {
                            filters.push(filter);
                        }
                    }
                    (batch, true)
                }
                Some(Command::Unsubscribe(gone)) => {
                    filters.retain(|f| !gone.contains(f));
                    continue;
                }
                None => return,
            },
            update = updates.recv() => match update {
                Ok(message) => {
                    let wanted = filters.iter().any(|f| filter_matches(f, &message.topic));
                    let fresh = sent.get(&message.topic).is_none_or(|r| *r < message.revision);
                    if !(wanted && fresh) {
                        continue;
                    }
                    (vec![message], false)
                }
                // Missed some: catch up from the retained set.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let batch = filters.iter().flat_map(|f| topics.matching(f)).collect();
                    (batch, false)
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        for message in batch {
            if !retain
                && sent
                    .get(&message.topic)
                    .is_some_and(|r| *r >= message.revision)
            {
                continue;
            }
            sent.insert(message.topic.clone(), message.revision);
            let bytes =
                codec::publish_qos0(version, &message.topic, message.payload.clone(), retain);
            if out.send(bytes).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_revision_never_replaces_a_newer_one() {
        let topics = PlatformTopics::default();
        assert!(topics.retain("$fleet/state/rules/t", 2, Bytes::from_static(b"two")));
        assert!(!topics.retain("$fleet/state/rules/t", 1, Bytes::from_static(b"one")));
        assert!(!topics.retain("$fleet/state/rules/t", 2, Bytes::from_static(b"two")));
        assert_eq!(topics.revision("$fleet/state/rules/t"), Some(2));
        assert_eq!(topics.matching("$fleet/state/#").len(), 1);
        assert!(topics.matching("$fleet/state/lookup/#").is_empty());
    }

    #[tokio::test]
    async fn subscribers_get_the_retained_message_then_each_new_revision_once() {
        let topics = PlatformTopics::default();
        topics.retain("$fleet/state/rules/t", 1, Bytes::from_static(b"one"));
        let (out, mut written) = mpsc::channel(16);
        let subscriber = PlatformSubscriber::start(topics.clone(), Version::V4, out);
        subscriber.subscribe(vec!["$fleet/state/#".into()]);
        let first = written.recv().await.unwrap();
        assert_eq!(first[0], 0x31, "retained on subscribe");
        assert!(first.ends_with(b"one"));
        topics.retain("$fleet/state/rules/t", 2, Bytes::from_static(b"two"));
        topics.retain("$fleet/state/rules/t", 2, Bytes::from_static(b"two"));
        let second = written.recv().await.unwrap();
        assert_eq!(second[0], 0x30, "a live update is not flagged retained");
        assert!(second.ends_with(b"two"));
        subscriber.unsubscribe(vec!["$fleet/state/#".into()]);
        topics.retain("$fleet/state/rules/t", 3, Bytes::from_static(b"three"));
        // An unrelated subscription afterwards proves the third never came.
        topics.retain("$fleet/state/lookup/x", 1, Bytes::from_static(b"x"));
        subscriber.subscribe(vec!["$fleet/state/lookup/x".into()]);
        let third = written.recv().await.unwrap();
        assert!(third.ends_with(b"x"), "{third:?}");
    }
}
