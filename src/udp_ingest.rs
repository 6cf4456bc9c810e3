//! `--udp ADDR`: one record per datagram, for devices that cannot hold a
//! connection. A datagram is a JSON object
//! `{"token": "<device token>", "stream": "<stream>", "record": {...}}`:
//! the platform-signed token authenticates it, and the record goes to the
//! same `IngestService` as an MQTT publish. After the commit the sender gets
//! `{"stored": n, "duplicates": n, "rejected": n, "first_reason": ...}`
//! back; a refused datagram (bad token, a stream its device type may not
//! write) gets `{"error": ...}`.
//!
//! UDP is best-effort: a datagram or its answer may be lost, and nothing
//! tells the sender which. A device that must not lose records uses MQTT
//! or HTTP; one that re-sends an unanswered datagram is safe on a keyed
//! stream, where the re-send is stored once.

use std::sync::Arc;

use bytes::Bytes;
use fleetgate_admin::unix_now_ms;
use fleetgate_protocol::auth::Authenticate;
use fleetgate_protocol::ingest::{IngestMessage, IngestService};
use fleetgate_protocol::topic::may_publish;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::UdpSocket;

/// The largest datagram taken (the largest a UDP datagram can be).
const MAX_DATAGRAM: usize = 65_507;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    token: String,
    stream: String,
    record: Value,
}

pub struct UdpIngest {
    pub socket: Arc<UdpSocket>,
    pub auth: Arc<dyn Authenticate>,
    pub ingest: Arc<dyn IngestService>,
}

impl UdpIngest {
    /// Serves datagrams until the process ends; each is answered from a
    /// task of its own, so a slow commit does not stop the reading.
    pub fn serve(self) {
        let this = Arc::new(self);
        tokio::spawn(async move {
            let mut buffer = vec![0u8; MAX_DATAGRAM];
            loop {
                let (n, peer) = match this.socket.recv_from(&mut buffer).await {
                    Ok(received) => received,
                    Err(e) => {
                        tracing::warn!(error = %e, "UDP receive failed");
                        continue;
                    }
                };
                let datagram = Bytes::copy_from_slice(&buffer[..n]);
                let this = this.clone();
                tokio::spawn(async move {
                    let answer = match this.take(&datagram).await {
                        Ok(answer) => answer,
                        Err(error) => json!({ "error": error }),
                    };
                    let _ = this
                        .socket
                        .send_to(answer.to_string().as_bytes(), peer)
                        .await;
                });
            }
        });
    }

    async fn take(&self, datagram: &[u8]) -> Result<Value, String> {
        let envelope: Envelope = serde_json::from_slice(datagram)
            .map_err(|e| format!("expected {{\"token\", \"stream\", \"record\"}} as JSON: {e}"))?;
        let principal = self
            .auth
            .authenticate(None, &envelope.token)
            .map_err(|e| e.to_string())?;
        let device = principal.device_id.clone();
        let topic = format!("ingest/{}/{device}", envelope.stream);
        if let Err(denied) = may_publish(principal.role, &device, &topic) {
            self.auth
                .record_refusal(&device, &format!("udp: {}", denied.0));
            return Err(denied.0);
        }
        let message = IngestMessage {
            principal,
            stream: envelope.stream,
            device_id: device.clone(),
            payload: Bytes::from(envelope.record.to_string()),
            truncated_from: None,
            received_at_ms: unix_now_ms(),
            state_version: None,
        };
        let pending = self
            .ingest
            .submit(message)
            .await
            .map_err(|e| format!("not stored: {e}"))?;
        match pending.await {
            Ok(Ok(outcome)) if outcome.refused.is_some() => {
                let reason = outcome.refused.unwrap_or_default();
                self.auth.record_refusal(&device, &format!("udp: {reason}"));
                Err(reason)
            }
            Ok(Ok(outcome)) => Ok(json!({
                "stored": outcome.stored,
                "duplicates": outcome.duplicates,
                "rejected": outcome.rejected,
                "first_reason": outcome.first_reason,
            })),
            Ok(Err(e)) => Err(format!("not stored: {e}")),
            Err(_) => Err("not stored: the store stopped".into()),
        }
    }
}
