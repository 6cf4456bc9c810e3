//! Live connections by device, so that a device can be disconnected now
//! (revocation), all of them at shutdown, and an older connection when the
//! device connects again (takeover).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use fleetgate_protocol::unix_now_us;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Revoked,
    RoleChanged,
    Banned,
    TakenOver,
    ShuttingDown,
    /// The token the session was opened with has expired.
    TokenExpired,
}

/// A device that connected to another broker of the cluster, as that
/// broker said ([`crate::router::Fabric::claim`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub device: String,
    /// When its connection there was registered, in µs since the epoch by
    /// that broker's clock; `None` if it did not say.
    pub connected_at_us: Option<i64>,
    /// Whether the claim wins over a connection registered here in the
    /// same microsecond (brokers break ties by their ids).
    pub wins_ties: bool,
}

impl Claim {
    /// Whether the claim ends a connection registered here at
    /// `connected_at_us`: one older than the claiming one. Both brokers
    /// compare the same two times, so of two connections of one device on
    /// two brokers exactly one survives, the newer, however late either
    /// broker hears of the other. Clocks apart by more than the time
    /// between the two connects decide which one, never whether one.
    pub fn ends(&self, connected_at_us: i64) -> bool {
        match self.connected_at_us {
            None => true,
            Some(at) => at > connected_at_us || (at == connected_at_us && self.wins_ties),
        }
    }
}

#[derive(Clone)]
pub struct SessionHandle {
    id: u64,
    device: String,
    /// µs since the epoch: what a takeover claim is compared with.
    registered_at_us: i64,
    end: CancellationToken,
    reason: Arc<OnceLock<EndReason>>,
    /// Cancelled once the connection is gone.
    done: CancellationToken,
}

impl SessionHandle {
    /// Ends the session; the first reason given is the one reported.
    pub fn end(&self, reason: EndReason) {
        let _ = self.reason.set(reason);
        self.end.cancel();
    }

    /// Resolves once the connection has ended and let go of its session.
    pub async fn finished(&self) {
        self.done.cancelled().await
    }

    /// When the connection was registered, in µs since the epoch.
    pub fn registered_at_us(&self) -> i64 {
        self.registered_at_us
    }

    pub async fn ended(&self) -> EndReason {
        self.end.cancelled().await;
        *self.reason.get().unwrap_or(&EndReason::ShuttingDown)
    }
}

#[derive(Default)]
pub struct Sessions {
    next_id: AtomicU64,
    by_device: Mutex<HashMap<String, Vec<SessionHandle>>>,
}

impl Sessions {
    /// Registers a new connection of `device`, ending the ones it already
    /// has (MQTT's session takeover); returns them too, so the new one can
    /// wait until they let go of the session.
    pub fn register(&self, device: &str) -> (SessionHandle, Vec<SessionHandle>) {
        let handle = SessionHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            device: device.to_string(),
            registered_at_us: unix_now_us(),
            end: CancellationToken::new(),
            reason: Arc::new(OnceLock::new()),
            done: CancellationToken::new(),
        };
        let mut by_device = self.by_device.lock().expect("sessions lock");
        let sessions = by_device.entry(device.to_string()).or_default();
        let previous = sessions.clone();
        for old in &previous {
            old.end(EndReason::TakenOver);
        }
        sessions.push(handle.clone());
        (handle, previous)
    }

    pub fn unregister(&self, handle: &SessionHandle) {
        handle.done.cancel();
        let mut by_device = self.by_device.lock().expect("sessions lock");
        if let Some(list) = by_device.get_mut(&handle.device) {
            list.retain(|h| h.id != handle.id);
            if list.is_empty() {
                by_device.remove(&handle.device);
            }
        }
    }

    /// Ends every session of `device`; returns how many there were.
    pub fn end_device(&self, device: &str, reason: EndReason) -> usize {
        let handles = self
            .by_device
            .lock()
            .expect("sessions lock")
            .get(device)
            .cloned()
            .unwrap_or_default();
        for handle in &handles {
            handle.end(reason);
        }
        handles.len()
    }

    /// Ends the connections of the device that `claim` says connected to
    /// another broker, those older than its connection there.
    pub fn end_claimed(&self, claim: &Claim) -> usize {
        let handles = self
            .by_device
            .lock()
            .expect("sessions lock")
            .get(&claim.device)
            .cloned()
            .unwrap_or_default();
        let older: Vec<&SessionHandle> = handles
            .iter()
            .filter(|h| claim.ends(h.registered_at_us))
            .collect();
        for handle in &older {
            handle.end(EndReason::TakenOver);
        }
        older.len()
    }

    pub fn end_all(&self, reason: EndReason) {
        let all: Vec<SessionHandle> = self
            .by_device
            .lock()
            .expect("sessions lock")
            .values()
            .flatten()
            .cloned()
            .collect();
        for handle in all {
            handle.end(reason);
        }
    }

    pub fn count(&self) -> usize {
        self.by_device
            .lock()
            .expect("sessions lock")
            .values()
            .map(Vec::len)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(at: Option<i64>, wins_ties: bool) -> Claim {
        Claim {
            device: "d".into(),
            connected_at_us: at,
            wins_ties,
        }
    }

    /// Two connections of one device on two brokers, each broker hearing of
    /// the other's late: exactly one ends, the older, whichever clock says
    /// what.
    #[test]
    fn of_two_connections_on_two_brokers_exactly_one_survives() {
        for (a, b) in [(100, 200), (200, 100), (150, 150)] {
            // Broker 1 (id "1") had a at `a`, broker 2 (id "2") b at `b`.
            let a_ends = claim(Some(b), "2" > "1").ends(a);
            let b_ends = claim(Some(a), "1" > "2").ends(b);
            assert!(a_ends != b_ends, "a at {a}, b at {b}: {a_ends} {b_ends}");
            if a != b {
                assert_eq!(a_ends, a < b, "the older ends");
            }
        }
        // A broker that does not say when: every connection here ends.
        assert!(claim(None, false).ends(i64::MAX));
    }

    #[test]
    fn a_claim_ends_only_the_connections_before_it() {
        let sessions = Sessions::default();
        let (older, _) = sessions.register("d");
        let cut = older.registered_at_us() + 1;
        std::thread::sleep(std::time::Duration::from_millis(2));
        let (newer, previous) = sessions.register("d");
        assert_eq!(previous.len(), 1, "a second connection here ends the first");
        sessions.unregister(&older);
        // A claim from another broker, registered before `newer`: stale.
        assert_eq!(sessions.end_claimed(&claim(Some(cut), true)), 0);
        assert!(!newer.end.is_cancelled());
        let later = claim(Some(newer.registered_at_us() + 1), false);
        assert_eq!(sessions.end_claimed(&later), 1);
        assert!(newer.end.is_cancelled());
    }
}
