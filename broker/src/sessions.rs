//! Live connections by device, so that a device can be disconnected now
//! (revocation), all of them at shutdown, and an older connection when the
//! device connects again (takeover).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

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

#[derive(Clone)]
pub struct SessionHandle {
    id: u64,
    device: String,
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
