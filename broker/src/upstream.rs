//! The embedded rumqttd: routing, subscriptions and fan-out for everything
//! that is not ingest. It listens on loopback ports only the gatekeeper
//! knows, and accepts only the gatekeeper's per-process secret, so every
//! packet that reaches it has passed the gatekeeper's checks.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fleetgate_protocol::ingest::LiveSink;
use prometheus_client::metrics::counter::Counter;
use ring::rand::{SecureRandom, SystemRandom};
use rumqttd::local::LinkTx;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

pub struct Upstream {
    pub v4: SocketAddr,
    pub v5: SocketAddr,
    pub secret: String,
    live: Mutex<LinkTx>,
    /// Subscriptions (live and wildcard) that can receive `live/...`
    /// messages; while there are none, re-publishing is skipped.
    pub(crate) live_readers: AtomicUsize,
    live_dropped: Counter,
}

/// A free loopback port. rumqttd binds by address and cannot report the port
/// it got for port 0, so one is picked here; the window in which another
/// process could take it is the few microseconds until rumqttd binds.
fn free_port() -> std::io::Result<SocketAddr> {
    StdListener::bind("127.0.0.1:0")?.local_addr()
}

impl Upstream {
    pub async fn start(max_payload: usize, live_dropped: Counter) -> Result<Arc<Upstream>, String> {
        let mut secret_bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut secret_bytes)
            .map_err(|_| "no randomness for the broker secret")?;
        let secret: String = secret_bytes.iter().map(|b| format!("{b:02x}")).collect();
        let v4 =
            free_port().map_err(|e| format!("no loopback port for the embedded broker: {e}"))?;
        let v5 =
            free_port().map_err(|e| format!("no loopback port for the embedded broker: {e}"))?;
        let server = |name: &str, listen: SocketAddr| {
            let expected = secret.clone();
            let mut settings = ServerSettings {
                name: name.to_string(),
                listen,
                tls: None,
                next_connection_delay_ms: 0,
                connections: ConnectionSettings {
                    connection_timeout_ms: 10_000,
                    max_payload_size: max_payload + 64 * 1024,
                    max_inflight_count: 100,
                    auth: None,
                    external_auth: None,
                    dynamic_filters: true,
                },
            };
            settings.set_auth_handler(move |_client, _user, pass: String| {
                let ok = pass == expected;
                async move { ok }
            });
            HashMap::from([(name.to_string(), settings)])
        };
        let config = Config {
            id: 0,
            router: RouterConfig {
                max_connections: 1_000_000,
                max_outgoing_packet_count: 200,
                max_segment_size: 16 * 1024 * 1024,
                max_segment_count: 10,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
            v4: Some(server("fleetgate-v4", v4)),
            v5: Some(server("fleetgate-v5", v5)),
            ..Default::default()
        };
        let mut broker = Broker::new(config);
        let (live, live_rx) = broker
            .link("fleetgate-live")
            .map_err(|e| format!("embedded broker link: {e:?}"))?;
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                // The link's receive half must stay alive for the router to
                // keep the link; nothing is ever subscribed on it.
                let _live_rx = live_rx;
                if let Err(e) = broker.start() {
                    tracing::error!(error = ?e, "embedded broker stopped");
                }
            })
            .map_err(|e| format!("cannot start the embedded broker: {e}"))?;
        for addr in [v4, v5] {
            wait_listening(addr).await?;
        }
        Ok(Arc::new(Upstream {
            v4,
            v5,
            secret,
            live: Mutex::new(live),
            live_readers: AtomicUsize::new(0),
            live_dropped,
        }))
    }
}

async fn wait_listening(addr: SocketAddr) -> Result<(), String> {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!(
        "the embedded broker did not start listening on {addr}"
    ))
}

impl LiveSink for Upstream {
    fn wanted(&self) -> bool {
        self.live_readers.load(Ordering::Relaxed) > 0
    }

    fn publish(&self, topic: String, payload: Bytes) {
        // try_publish: a full router queue drops this live copy (the record is
        // already committed); it never blocks the store's writer.
        if self
            .live
            .lock()
            .expect("live link lock")
            .try_publish(topic, payload)
            .is_err()
        {
            self.live_dropped.inc();
        }
    }
}
