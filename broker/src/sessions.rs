//! Live sessions by device, so that a device can be disconnected now
//! (revocation) and all of them at shutdown.

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
}

impl SessionHandle {
    /// Ends the session; the first reason given is the one reported.
    pub fn end(&self, reason: EndReason) {
        let _ = self.reason.set(reason);
        self.end.cancel();
    }

    /// The embedded broker's client id for this connection: unique, so the
    /// embedded broker never sees one client id twice (its own takeover path
    /// races and can poison its listener; see ARCHITECTURE.md).
    pub fn upstream_client_id(&self) -> String {
        format!("{}~{}", self.device, self.id)
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
    /// Registers a new session of `device`, ending the ones it already has:
    /// MQTT's session takeover, done here rather than in the embedded broker.
    pub fn register(&self, device: &str) -> SessionHandle {
        let handle = SessionHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            device: device.to_string(),
            end: CancellationToken::new(),
            reason: Arc::new(OnceLock::new()),
        };
        let mut by_device = self.by_device.lock().expect("sessions lock");
        let sessions = by_device.entry(device.to_string()).or_default();
        for previous in sessions.iter() {
            previous.end(EndReason::TakenOver);
        }
        sessions.push(handle.clone());
        handle
    }

    pub fn unregister(&self, handle: &SessionHandle) {
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
