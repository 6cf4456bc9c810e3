//! The connection's writer: everything sent to the client, in one buffer
//! per write. Answers to the client's packets leave in the order the
//! packets arrived, each once its commit is done; between them go platform
//! publishes and the session's queued messages, as the client's Receive
//! Maximum, Maximum Packet Size and Topic Alias Maximum allow.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use fleetgate_protocol::unix_now_ms;
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{AckFuture, ClientWrite, Outgoing, MAX_PENDING_ACKS, WRITE_TIMEOUT};
use crate::codec::{self, Version};
use crate::router::Router;
use crate::session::{Delivery, Queued, Session};

/// What the writer needs to send a session's messages to this client.
pub(crate) struct DeliveryState {
    version: Version,
    /// The client's Receive Maximum.
    window: usize,
    maximum_packet_size: Option<usize>,
    alias_maximum: u16,
    /// Topics given an alias on this connection.
    aliases: HashMap<Arc<str>, u16>,
}

impl DeliveryState {
    pub(super) fn new(
        version: Version,
        receive_maximum: u16,
        maximum_packet_size: Option<u32>,
        alias_maximum: u16,
    ) -> DeliveryState {
        DeliveryState {
            version,
            window: receive_maximum.max(1) as usize,
            maximum_packet_size: maximum_packet_size.map(|m| m as usize),
            alias_maximum,
            aliases: HashMap::new(),
        }
    }
}

impl DeliveryState {
    /// Encodes one delivery into `out`. A PUBLISH larger than the client
    /// takes is not sent, and settled as if it had been (MQTT 3.1.2.11.4).
    fn encode(
        &mut self,
        delivery: Delivery,
        out: &mut BytesMut,
        session: &Session,
        router: &Router,
    ) {
        let (queued, pkid, dup) = match delivery {
            Delivery::Release { pkid } => {
                out.extend_from_slice(&codec::pubrel(pkid));
                return;
            }
            Delivery::Publish { queued, pkid, dup } => (queued, pkid, dup),
        };
        let message = &queued.message;
        let now = unix_now_ms();
        let expiry_secs = message
            .expires_at_ms
            .map(|at| ((at - now).max(0) as u64).div_ceil(1000) as u32);
        let known = self.aliases.get(&message.topic).copied();
        let assigned = match known {
            None if (self.aliases.len() as u16) < self.alias_maximum => {
                let alias = self.aliases.len() as u16 + 1;
                self.aliases.insert(message.topic.clone(), alias);
                Some(alias)
            }
            _ => None,
        };
        let start = out.len();
        let size = codec::Outgoing {
            topic: if known.is_some() { "" } else { &message.topic },
            payload: &message.payload,
            qos: queued.qos,
            pkid,
            retain: queued.retain,
            dup,
            alias: known.or(assigned),
            expiry_secs,
            properties: message.properties.as_deref(),
            subscription_ids: &queued.subscription_ids,
        }
        .encode(self.version, out);
        if self.maximum_packet_size.is_some_and(|max| size > max) {
            out.truncate(start);
            if assigned.is_some() {
                self.aliases.remove(&message.topic);
            }
            if queued.qos > 0 {
                session.discard(pkid);
            }
            router.settle(session, &queued);
        }
    }
}

/// Writes, in one buffer per round: the CONNACK and what was in flight
/// first, then answers in arrival order (each once its commit is done),
/// platform publishes, and the session's queued messages as the window
/// allows.
#[allow(clippy::too_many_arguments)]
pub(super) async fn write_loop(
    mut client: ClientWrite,
    connack: Bytes,
    mut ack_queue: mpsc::Receiver<AckFuture>,
    mut relay_queue: mpsc::Receiver<Bytes>,
    mut delivery: DeliveryState,
    resend: Vec<Delivery>,
    (session, connection): (Arc<Session>, u64),
    router: Arc<Router>,
) {
    let mut pending: FuturesOrdered<AckFuture> = FuturesOrdered::new();
    let mut acks_open = true;
    let mut relay_open = true;
    let mut out = BytesMut::from(&connack[..]);
    // What was in flight goes again first, then what queued while away.
    let mut expired: Vec<Queued> = Vec::new();
    let queued = session.take(connection, delivery.window, unix_now_ms(), &mut expired);
    for d in resend.into_iter().chain(queued) {
        delivery.encode(d, &mut out, &session, &router);
    }
    loop {
        if !out.is_empty() {
            // A peer that stops reading (a zero TCP window) must not hold
            // this task and its buffers forever.
            let write = async { client.write_all(&out).await.and(client.flush().await) };
            if !matches!(tokio::time::timeout(WRITE_TIMEOUT, write).await, Ok(Ok(()))) {
                break;
            }
            out.clear();
            // A burst's buffer is not kept by an idle connection.
            if out.capacity() > 64 * 1024 {
                out = BytesMut::new();
            }
        }
        if !acks_open && pending.is_empty() {
            break;
        }
        tokio::select! {
            Some(outgoing) = pending.next(), if !pending.is_empty() => {
                if !take(&mut out, outgoing) {
                    break;
                }
            }
            ack = ack_queue.recv(), if acks_open && pending.len() < MAX_PENDING_ACKS => match ack {
                Some(ack) => pending.push_back(ack),
                None => acks_open = false,
            },
            relayed = relay_queue.recv(), if relay_open => match relayed {
                Some(bytes) => out.extend_from_slice(&bytes),
                None => relay_open = false,
            },
            _ = session.wake.notified() => {}
        }
        // Take everything else that is ready without waiting.
        while pending.len() < MAX_PENDING_ACKS {
            match ack_queue.try_recv() {
                Ok(ack) => pending.push_back(ack),
                Err(_) => break,
            }
        }
        let mut aborted = false;
        while let Some(Some(outgoing)) = pending.next().now_or_never() {
            if !take(&mut out, outgoing) {
                aborted = true;
                break;
            }
        }
        if aborted {
            break;
        }
        while let Ok(bytes) = relay_queue.try_recv() {
            out.extend_from_slice(&bytes);
        }
        for d in session.take(connection, delivery.window, unix_now_ms(), &mut expired) {
            delivery.encode(d, &mut out, &session, &router);
        }
        for gone in expired.drain(..) {
            router.settle(&session, &gone);
        }
    }
    // Let the reader see at once that nobody writes to this device any more
    // (its sends fail, its permits return), then make a last, bounded attempt.
    drop((ack_queue, relay_queue, pending));
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        client.write_all(&out).await?;
        client.flush().await?;
        client.shutdown().await
    })
    .await;
}

/// Adds an answer's bytes to `out`; false when the connection must close.
fn take(out: &mut BytesMut, outgoing: Outgoing) -> bool {
    match outgoing {
        Outgoing::Bytes(bytes) => {
            out.extend_from_slice(&bytes);
            true
        }
        Outgoing::Nothing => true,
        Outgoing::Abort => false,
    }
}
