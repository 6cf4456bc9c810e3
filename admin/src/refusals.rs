//! Every refusal (bad token, denied publish or subscribe) is counted against
//! the device it claimed to be; repeated refusals in a window raise an alert.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabel {
    device: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub device: String,
    pub refusals_in_window: usize,
    pub last_reason: String,
    pub at_unix: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceRefusals {
    pub device: String,
    pub total: u64,
    pub last_reason: String,
}

struct Entry {
    total: u64,
    recent: VecDeque<Instant>,
    /// The refusals among `recent` that may lead to a ban: failed
    /// authentication by someone holding a genuinely signed token.
    recent_bannable: VecDeque<Instant>,
    last_reason: String,
    alerted_at: Option<Instant>,
}

/// The kind of refusal that counts toward bans: failed authentication.
pub const AUTH: &str = "auth";

pub struct RefusalLedger {
    threshold: usize,
    window: Duration,
    entries: Mutex<HashMap<String, Entry>>,
    alerts: Mutex<VecDeque<Alert>>,
    refusals: Family<KindLabel, Counter>,
    alert_counter: Family<DeviceLabel, Counter>,
}

/// Garbage client ids must not grow the ledger without bound.
const MAX_TRACKED_DEVICES: usize = 10_000;
const MAX_KEPT_ALERTS: usize = 200;

impl RefusalLedger {
    pub fn new(threshold: usize, window: Duration, registry: &mut Registry) -> RefusalLedger {
        let refusals = Family::<KindLabel, Counter>::default();
        let alert_counter = Family::<DeviceLabel, Counter>::default();
        registry.register(
            "fleetgate_refusals",
            "Refused connections, publishes and subscribes, by kind",
            refusals.clone(),
        );
        registry.register(
            "fleetgate_refusal_alerts",
            "Alerts raised for devices with repeated refusals",
            alert_counter.clone(),
        );
        RefusalLedger {
            threshold: threshold.max(1),
            window,
            entries: Mutex::new(HashMap::new()),
            alerts: Mutex::new(VecDeque::new()),
            refusals,
            alert_counter,
        }
    }

    /// Records one refusal; returns the alert if this one crossed the threshold.
    /// `bannable` marks refusals that count toward a ban.
    pub fn record(&self, device: &str, kind: &str, reason: &str, bannable: bool) -> Option<Alert> {
        self.refusals
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
        tracing::info!(device, kind, reason, "refused");
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("ledger lock");
        if entries.len() >= MAX_TRACKED_DEVICES && !entries.contains_key(device) {
            let window = self.window;
            entries.retain(|_, e| {
                e.recent
                    .back()
                    .is_some_and(|t| now.duration_since(*t) < window)
            });
            if entries.len() >= MAX_TRACKED_DEVICES {
                return None;
            }
        }
        let entry = entries.entry(device.to_string()).or_insert_with(|| Entry {
            total: 0,
            recent: VecDeque::new(),
            recent_bannable: VecDeque::new(),
            last_reason: String::new(),
            alerted_at: None,
        });
        entry.total += 1;
        entry.last_reason = reason.to_string();
        entry.recent.push_back(now);
        if bannable {
            entry.recent_bannable.push_back(now);
        }
        for recent in [&mut entry.recent, &mut entry.recent_bannable] {
            while recent
                .front()
                .is_some_and(|t| now.duration_since(*t) > self.window)
            {
                recent.pop_front();
            }
        }
        // One alert per window per device, not one per refusal past the threshold.
        let quiet = entry
            .alerted_at
            .is_none_or(|t| now.duration_since(t) > self.window);
        if entry.recent.len() < self.threshold || !quiet {
            return None;
        }
        entry.alerted_at = Some(now);
        let alert = Alert {
            device: device.to_string(),
            refusals_in_window: entry.recent.len(),
            last_reason: reason.to_string(),
            at_unix: crate::unix_now(),
        };
        drop(entries);
        tracing::warn!(
            device,
            refusals = alert.refusals_in_window,
            window_secs = self.window.as_secs(),
            reason,
            "ALERT: repeated refusals for device"
        );
        self.alert_counter
            .get_or_create(&DeviceLabel {
                device: device.to_string(),
            })
            .inc();
        let mut alerts = self.alerts.lock().expect("alerts lock");
        if alerts.len() == MAX_KEPT_ALERTS {
            alerts.pop_front();
        }
        alerts.push_back(alert.clone());
        Some(alert)
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// Refusals of `device` within the window that count toward a ban.
    pub fn recent_bannable(&self, device: &str) -> usize {
        let now = Instant::now();
        self.entries
            .lock()
            .expect("ledger lock")
            .get(device)
            .map_or(0, |e| {
                e.recent_bannable
                    .iter()
                    .filter(|t| now.duration_since(**t) <= self.window)
                    .count()
            })
    }

    pub fn alerts(&self) -> Vec<Alert> {
        self.alerts
            .lock()
            .expect("alerts lock")
            .iter()
            .rev()
            .cloned()
            .collect()
    }

    pub fn by_device(&self) -> Vec<DeviceRefusals> {
        let entries = self.entries.lock().expect("ledger lock");
        let mut list: Vec<_> = entries
            .iter()
            .map(|(device, e)| DeviceRefusals {
                device: device.clone(),
                total: e.total,
                last_reason: e.last_reason.clone(),
            })
            .collect();
        list.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.device.cmp(&b.device)));
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_once_when_the_threshold_is_crossed_within_the_window() {
        let ledger = RefusalLedger::new(3, Duration::from_secs(60), &mut Registry::default());
        assert!(ledger
            .record("mallory", "auth", "bad signature", false)
            .is_none());
        assert!(ledger.record("alice", "auth", "expired", false).is_none());
        assert!(ledger
            .record("mallory", "auth", "bad signature", false)
            .is_none());
        let alert = ledger
            .record("mallory", "publish", "not her topic", false)
            .expect("third refusal alerts");
        assert_eq!(alert.device, "mallory");
        assert_eq!(alert.refusals_in_window, 3);
        assert!(
            ledger.record("mallory", "auth", "again", false).is_none(),
            "no second alert in the same window"
        );
        assert_eq!(ledger.alerts().len(), 1);
        assert_eq!(ledger.by_device()[0].device, "mallory");
        assert_eq!(ledger.by_device()[0].total, 4);
        // Only refusals marked bannable count toward a ban.
        assert_eq!(ledger.recent_bannable("mallory"), 0);
        ledger.record("alice", "auth", "expired", true);
        assert_eq!(ledger.recent_bannable("alice"), 1);
    }
}
