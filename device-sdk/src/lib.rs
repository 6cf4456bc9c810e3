//! fleetgate device SDK: the library firmware links.
//!
//! [`Device::start`] performs the signed handshake, verifies the platform's
//! manifest and the artifact's hash before anything is deserialized, runs
//! the role's module in wasmtime ([`runtime`]), and keeps an MQTT connection
//! to the gatekeeper with the short-lived token it was given, renewing it by
//! handshaking again before it expires. [`Device::publish`] has the module
//! validate and encode a record, then queues it on disk ([`queue`]) until
//! the broker acknowledges it, so records survive being offline.
//!
//! - [`identity`]: the device's Ed25519 key pair.
//! - [`handshake`]: the handshake and every check on its answer.
//! - [`runtime`]: the module in wasmtime, with fuel and memory limits.
//! - [`queue`]: the bounded on-disk queue.
//! - [`connection`]: the MQTT session that drains the queue.
//! - [`tls`]: HTTPS and MQTT over TLS for devices that can do secure transfer.

pub mod connection;
pub mod handshake;
pub mod identity;
pub mod queue;
pub mod runtime;
pub mod tls;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetgate_protocol::record::FieldValue;
use fleetgate_protocol::sdk::abi::{self, ModuleSchema};
use fleetgate_protocol::sdk::Target;
use fleetgate_protocol::Role;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

pub use handshake::{verify_bundle, Expected, Session};
pub use identity::DeviceKey;
pub use runtime::{HostRequest, RuntimeLimits, SdkModule};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdkError {
    /// The server refused the handshake or a request.
    #[error("refused by the server: {0}")]
    Refused(String),
    /// A manifest, artifact or token failed a check; nothing was loaded.
    #[error("SDK verification failed: {0}")]
    Verify(String),
    /// The module trapped, ran out of fuel or memory, or is malformed.
    #[error("SDK module error: {0}")]
    Module(String),
    /// The record or argument was refused by the module's checks.
    #[error("invalid: {0}")]
    Invalid(String),
    /// This SDK's role does not include the operation.
    #[error("not in this SDK's role: {0}")]
    NotInRole(String),
    #[error("network: {0}")]
    Network(String),
    #[error("offline queue: {0}")]
    Queue(String),
}

/// How a device reaches the platform and what it says about itself.
#[derive(Clone)]
pub struct DeviceConfig {
    /// Base URL of the platform's HTTP API, e.g. `http://10.0.0.1:8080`.
    pub server: String,
    pub device_id: String,
    pub device_type: String,
    pub key: Arc<DeviceKey>,
    /// The platform's Ed25519 public key (`<data>/platform.pub`), flashed
    /// with the firmware: the root of trust for manifests and tokens.
    pub platform_key: Vec<u8>,
    pub fingerprint: String,
    /// `None`: native code for this CPU (Pulley where Cranelift has no backend).
    pub target: Option<Target>,
    /// MQTT broker `host:port`; `None` takes the server's host and the MQTT
    /// port the handshake reports.
    pub mqtt: Option<String>,
    /// PEM CA certificate(s) to trust. With an `https://` server the device
    /// can do secure transfer: it says so in its handshake and then uses
    /// HTTPS and MQTT over TLS only.
    pub ca_pem: Option<Vec<u8>>,
    pub queue_dir: PathBuf,
    pub queue_capacity: u64,
    pub limits: RuntimeLimits,
}

impl DeviceConfig {
    pub fn new(
        server: &str,
        device_id: &str,
        device_type: &str,
        key: DeviceKey,
        platform_key: Vec<u8>,
        queue_dir: PathBuf,
    ) -> DeviceConfig {
        DeviceConfig {
            server: server.trim_end_matches('/').to_string(),
            device_id: device_id.to_string(),
            device_type: device_type.to_string(),
            key: Arc::new(key),
            platform_key,
            fingerprint: format!("fleetgate-device-sdk/{}", env!("CARGO_PKG_VERSION")),
            target: None,
            mqtt: None,
            ca_pem: None,
            queue_dir,
            queue_capacity: 64 << 20,
            limits: RuntimeLimits::default(),
        }
    }
}

/// What a device's owner can watch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub connected: bool,
    /// Subscriptions of [`Device::follow`] the broker has granted on this connection.
    pub following: usize,
    pub handshakes: u64,
    /// Records the broker acknowledged since start.
    pub acked: u64,
    /// Records waiting on disk (unsent or unacknowledged).
    pub queued: u64,
    pub last_error: Option<String>,
}

/// A message on a followed topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveMessage {
    pub topic: String,
    pub payload: Vec<u8>,
}

pub(crate) struct Shared {
    pub config: DeviceConfig,
    pub http: reqwest::Client,
    /// Set for devices that use TLS.
    pub tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    pub session: Mutex<Session>,
    pub queue: Mutex<queue::DiskQueue>,
    /// Wakes the connection for new records or new subscriptions.
    pub wake: Notify,
    pub status: watch::Sender<Status>,
    pub follows: Mutex<Vec<(String, mpsc::Sender<LiveMessage>)>>,
}

/// A running device: its SDK module, MQTT connection and queue.
pub struct Device {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Device {
    /// Handshakes, verifies and loads the SDK, then connects in the background.
    pub async fn start(config: DeviceConfig) -> Result<Device, SdkError> {
        let tls = tls::for_device(&config)?;
        let http = tls::http_client(&config)?;
        let session = handshake::handshake(&config, &http).await?;
        let queue = queue::DiskQueue::open(&config.queue_dir, config.queue_capacity)
            .map_err(SdkError::Queue)?;
        let (status, _) = watch::channel(Status {
            handshakes: 1,
            queued: queue.pending_entries(),
            ..Status::default()
        });
        let shared = Arc::new(Shared {
            config,
            http,
            tls,
            session: Mutex::new(session),
            queue: Mutex::new(queue),
            wake: Notify::new(),
            status,
            follows: Mutex::new(Vec::new()),
        });
        let tasks = vec![
            tokio::spawn(connection::run(shared.clone())),
            tokio::spawn(handshake::renew(shared.clone())),
        ];
        Ok(Device { shared, tasks })
    }

    pub fn role(&self) -> Role {
        self.shared
            .session
            .lock()
            .expect("session lock")
            .manifest
            .role
    }

    /// The broker address in use, and whether it is MQTT over TLS.
    pub fn broker(&self) -> (String, bool) {
        let session = self.shared.session.lock().expect("session lock");
        (session.mqtt.clone(), self.shared.tls.is_some())
    }

    pub fn target(&self) -> Target {
        self.shared
            .session
            .lock()
            .expect("session lock")
            .manifest
            .target
    }

    /// The streams this SDK can encode, as its module describes them.
    pub fn schema(&self) -> ModuleSchema {
        self.shared
            .session
            .lock()
            .expect("session lock")
            .module
            .schema()
            .clone()
    }

    /// The current token (for HTTP calls of the device's own).
    pub fn token(&self) -> String {
        self.shared
            .session
            .lock()
            .expect("session lock")
            .token
            .clone()
    }

    pub fn status(&self) -> watch::Receiver<Status> {
        self.shared.status.subscribe()
    }

    /// Validates and encodes `fields` in the SDK module, then queues the
    /// record on disk; it is sent as soon as the broker is reachable and
    /// kept until acknowledged.
    pub fn publish(&self, stream: &str, fields: &[(&str, FieldValue)]) -> Result<(), SdkError> {
        let (stream, payload) = self
            .shared
            .session
            .lock()
            .expect("session lock")
            .module
            .publish(stream, fields)?;
        let mut queue = self.shared.queue.lock().expect("queue lock");
        queue.push(&stream, &payload).map_err(SdkError::Queue)?;
        // Under the queue's lock, so that a stale count never overwrites a
        // newer one (flush waits on it).
        let queued = queue.pending_entries();
        self.shared.status.send_modify(|s| s.queued = queued);
        drop(queue);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Waits until every queued record is acknowledged, or `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<(), SdkError> {
        let mut status = self.status();
        let drained = tokio::time::timeout(timeout, status.wait_for(|s| s.queued == 0)).await;
        match drained {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(SdkError::Network("device stopped".into())),
            Err(_) => Err(SdkError::Network(format!(
                "records still queued after {timeout:?}"
            ))),
        }
    }

    fn ask(
        &self,
        call: impl FnOnce(&mut SdkModule) -> Result<HostRequest, SdkError>,
    ) -> Result<(HostRequest, String), SdkError> {
        let mut session = self.shared.session.lock().expect("session lock");
        let request = call(&mut session.module)?;
        Ok((request, session.token.clone()))
    }

    /// Runs a read-only SQL query (extract and admin roles).
    pub async fn query(&self, sql: &str) -> Result<serde_json::Value, SdkError> {
        let (request, token) = self.ask(|m| m.query(sql))?;
        let HostRequest::Query(sql) = request else {
            return Err(SdkError::Module(format!("fg_query asked for {request:?}")));
        };
        self.call_api("/v1/query", &token, serde_json::json!({ "sql": sql }))
            .await
    }

    /// Follows live records on an MQTT topic filter (extract and admin roles).
    pub fn follow(&self, filter: &str) -> Result<mpsc::Receiver<LiveMessage>, SdkError> {
        let (request, _) = self.ask(|m| m.follow(filter))?;
        let HostRequest::Follow(filter) = request else {
            return Err(SdkError::Module(format!("fg_follow asked for {request:?}")));
        };
        let (sender, receiver) = mpsc::channel(1024);
        self.shared
            .follows
            .lock()
            .expect("follows lock")
            .push((filter, sender));
        // The connection subscribes on its next turn, and after every reconnect.
        self.shared.wake.notify_one();
        Ok(receiver)
    }

    /// Revokes a device (admin role).
    pub async fn revoke(&self, device: &str) -> Result<serde_json::Value, SdkError> {
        let (request, token) = self.ask(|m| m.admin(abi::ADMIN_REVOKE, device))?;
        let HostRequest::Admin { arg, .. } = request else {
            return Err(SdkError::Module(format!("fg_admin asked for {request:?}")));
        };
        self.call_api(
            &format!("/v1/devices/{arg}/revoke"),
            &token,
            serde_json::json!({}),
        )
        .await
    }

    /// Changes a device's role (admin role).
    pub async fn set_role(&self, device: &str, role: Role) -> Result<serde_json::Value, SdkError> {
        let op = match role {
            Role::Ingest => abi::ADMIN_ROLE_INGEST,
            Role::Extract => abi::ADMIN_ROLE_EXTRACT,
            Role::Admin => abi::ADMIN_ROLE_ADMIN,
        };
        let (request, token) = self.ask(|m| m.admin(op, device))?;
        let HostRequest::Admin { arg, .. } = request else {
            return Err(SdkError::Module(format!("fg_admin asked for {request:?}")));
        };
        self.call_api(
            &format!("/v1/devices/{arg}/role"),
            &token,
            serde_json::json!({ "role": role }),
        )
        .await
    }

    async fn call_api(
        &self,
        path: &str,
        token: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, SdkError> {
        let response = self
            .shared
            .http
            .post(format!("{}{path}", self.shared.config.server))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .map_err(|e| SdkError::Network(e.to_string()))?;
        let status = response.status();
        let value: serde_json::Value = response
            .json()
            .await
            .map_err(|e| SdkError::Network(e.to_string()))?;
        if status.is_success() {
            Ok(value)
        } else {
            Err(SdkError::Refused(format!(
                "{status}: {}",
                value["error"].as_str().unwrap_or("no reason given")
            )))
        }
    }

    /// Stops the connection and renewal; queued records stay on disk.
    pub async fn stop(mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
        let _ = self.shared.queue.lock().expect("queue lock").sync();
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
