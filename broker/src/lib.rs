//! fleetgate's gatekeeper: the MQTT 3.1.1 and 5 broker every device
//! connects to.
//!
//! It authenticates each CONNECT by its token, checks every PUBLISH,
//! SUBSCRIBE and will against the device's role, acknowledges ingest only
//! after the store committed it, and routes everything else itself. The
//! layers, each a module:
//!
//! - [`codec`]: framing and every packet read or written.
//! - `connection`: one client connection (authorization, QoS flows,
//!   the writer).
//! - [`session`]: what outlives a connection (subscriptions, queue,
//!   in-flight window).
//! - [`router`]: sessions by client id, the subscription index, retained
//!   messages, and delivery.
//! - [`persist`]: the session store (persistent sessions and retained
//!   messages across restarts).
//! - [`sessions`]: live connections by device (revocation, takeover, shutdown).
//! - [`tls`]: MQTT over TLS (and the HTTP API's), handshakes off the accept loop.
//! - [`balancer`]: cluster mode, ingest spread over store nodes.
//! - [`cluster`]: the name a cluster's brokers share on NATS.
//! - [`platform_topics`]: the retained `$fleet/...` topics served here.

pub mod balancer;
pub mod cluster;
pub mod codec;
mod connection;
pub mod persist;
pub mod platform_topics;
pub mod router;
pub mod session;
pub mod sessions;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleetgate_protocol::{Authenticate, IngestService};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use platform_topics::PlatformTopics;
pub use router::Router;
pub use sessions::EndReason;
use sessions::Sessions;

#[derive(Debug, Clone)]
pub struct GatekeeperConfig {
    /// Largest ingest payload; larger ones are rejected with a reason.
    pub max_payload: usize,
    /// Publishes awaiting commit per connection before it is no longer
    /// read; also the Receive Maximum announced to MQTT 5 clients.
    pub max_inflight: usize,
    /// Time a new connection has to send its CONNECT.
    pub connect_timeout: Duration,
    /// Longest a session outlives its connection, in seconds; also what a
    /// 3.1.1 session without clean session gets.
    pub max_session_expiry: u32,
    /// Keep alive an MQTT 5 client gets when it asks for none or more.
    pub max_keep_alive: u16,
}

impl Default for GatekeeperConfig {
    fn default() -> Self {
        GatekeeperConfig {
            max_payload: 256 * 1024,
            max_inflight: 1024,
            connect_timeout: Duration::from_secs(10),
            max_session_expiry: 7 * 24 * 3600,
            max_keep_alive: 1200,
        }
    }
}

impl GatekeeperConfig {
    /// The Maximum Packet Size announced: any packet but a PUBLISH larger
    /// than this ends the connection. A larger PUBLISH is answered with a
    /// reason code instead (its records go to the rejects), more leniently
    /// than MQTT requires.
    pub fn maximum_packet_size(&self) -> usize {
        (self.max_payload + 64 * 1024).max(1024 * 1024)
    }
}

#[derive(Clone)]
pub(crate) struct GatekeeperMetrics {
    pub connections: Gauge,
    pub connects_refused: Counter,
    pub publishes_denied: Counter,
    pub subscribes_denied: Counter,
}

pub(crate) struct Shared {
    pub config: GatekeeperConfig,
    pub auth: Arc<dyn Authenticate>,
    pub ingest: Arc<dyn IngestService>,
    pub router: Arc<Router>,
    pub sessions: Sessions,
    pub metrics: GatekeeperMetrics,
    pub platform: PlatformTopics,
}

pub struct Gatekeeper {
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
    tls_accept: std::sync::Mutex<Vec<JoinHandle<()>>>,
    local_addr: SocketAddr,
}

impl Gatekeeper {
    /// Serves MQTT on `listener` (bound by the caller, so that a taken port is
    /// reported before anything starts).
    pub fn start(
        listener: TcpListener,
        config: GatekeeperConfig,
        auth: Arc<dyn Authenticate>,
        ingest: Arc<dyn IngestService>,
        router: Arc<Router>,
        platform: PlatformTopics,
        registry: &mut Registry,
    ) -> std::io::Result<Gatekeeper> {
        let metrics = GatekeeperMetrics {
            connections: Gauge::default(),
            connects_refused: Counter::default(),
            publishes_denied: Counter::default(),
            subscribes_denied: Counter::default(),
        };
        registry.register(
            "fleetgate_mqtt_connections",
            "Open device connections",
            metrics.connections.clone(),
        );
        registry.register(
            "fleetgate_mqtt_connects_refused",
            "CONNECTs refused",
            metrics.connects_refused.clone(),
        );
        registry.register(
            "fleetgate_mqtt_publishes_denied",
            "PUBLISHes refused by role",
            metrics.publishes_denied.clone(),
        );
        registry.register(
            "fleetgate_mqtt_subscribes_denied",
            "Subscription filters refused by role",
            metrics.subscribes_denied.clone(),
        );
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            auth,
            ingest,
            router,
            sessions: Sessions::default(),
            metrics,
            platform,
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Gatekeeper {
            shared,
            accept,
            tls_accept: std::sync::Mutex::new(Vec::new()),
            local_addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Also serves MQTT over TLS on the connections `incoming` completes.
    pub fn serve_tls(&self, mut incoming: tls::TlsIncoming) {
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            while let Some((stream, _peer)) = incoming.accept().await {
                let (read, write) = tokio::io::split(stream);
                tokio::spawn(connection::run(
                    Box::new(read),
                    Box::new(write),
                    shared.clone(),
                ));
            }
        });
        self.tls_accept.lock().expect("tls accept lock").push(task);
    }

    /// Disconnects every live session of `device` now.
    pub fn disconnect_device(&self, device: &str, reason: EndReason) -> usize {
        self.shared.sessions.end_device(device, reason)
    }

    /// Disconnects the sessions of a device that connected to another
    /// broker since they did ([`sessions::Claim::ends`]).
    pub fn disconnect_claimed(&self, claim: &sessions::Claim) -> usize {
        self.shared.sessions.end_claimed(claim)
    }

    /// Stops accepting, ends every session after its pending acknowledgements
    /// are written, and returns when they are gone (or after `grace`).
    pub async fn shutdown(&self, grace: Duration) {
        self.accept.abort();
        for task in self.tls_accept.lock().expect("tls accept lock").drain(..) {
            task.abort();
        }
        self.shared.sessions.end_all(EndReason::ShuttingDown);
        let deadline = tokio::time::Instant::now() + grace;
        while self.shared.sessions.count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // What the sessions' ends wrote is on disk before the process goes.
        if let Err(e) = self.shared.router.flush().await {
            tracing::error!(error = %e, "MQTT session store did not flush");
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            // Each connection is its own task from the first byte, so a slow
            // or silent client never holds up anyone else's CONNECT.
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                let (read, write) = stream.into_split();
                tokio::spawn(connection::run(
                    Box::new(read),
                    Box::new(write),
                    shared.clone(),
                ));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
