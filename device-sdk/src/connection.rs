//! The MQTT session: drains the on-disk queue to the gatekeeper with QoS 1,
//! advances the queue only over acknowledged records, and reconnects (with
//! a fresh handshake when the token is refused). Records are sent at least
//! once; keyed streams store a resent record once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use fleetgate_protocol::topic::INGEST_PREFIX;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};

use tokio::sync::mpsc;

use crate::{handshake, LiveMessage, Shared};

/// Aborts a task when the connection that owns it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Records published but not yet acknowledged, at most.
const WINDOW: usize = 32;

/// A record sent on this connection, waiting for its PUBACK.
struct InFlight {
    end: u64,
    pkid: Option<u16>,
    acked: bool,
}

pub(crate) async fn run(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut was_connected = false;
        let Err(refusal) = connect_once(&shared, &mut was_connected).await;
        shared.status.send_modify(|s| s.connected = false);
        // A refused token, or a session the server ended (a role change, the
        // token's expiry, a revocation): handshake again, so that the token
        // and the SDK match what the registry says now. When the platform
        // cannot be reached, the current token is tried again.
        let refresh = match refusal {
            Refusal::Credentials(reason) => {
                tracing::warn!(%reason, "broker refused the token; handshaking again");
                true
            }
            Refusal::Other(reason) => {
                shared.status.send_modify(|s| s.last_error = Some(reason));
                was_connected
            }
        };
        if refresh {
            let _ = handshake::refresh(&shared).await;
        }
        if was_connected {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

enum Refusal {
    Credentials(String),
    Other(String),
}

fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut levels = topic.split('/');
    for part in filter.split('/') {
        match (part, levels.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (p, Some(level)) if p == level => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// One connection, until it fails; says why.
async fn connect_once(
    shared: &Shared,
    was_connected: &mut bool,
) -> Result<std::convert::Infallible, Refusal> {
    let (address, token) = {
        let session = shared.session.lock().expect("session lock");
        (session.mqtt.clone(), session.token.clone())
    };
    let (host, port) = address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| Refusal::Other(format!("bad MQTT address {address:?}")))?;
    let device = &shared.config.device_id;
    let mut options = MqttOptions::new(device.clone(), host, port);
    options.set_credentials(device.clone(), token);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    options.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(tls) = &shared.tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.clone(),
        )));
    }
    let (client, mut event_loop) = AsyncClient::new(options, 2 * WINDOW + 16);
    // rumqttc's `poll` must not be cancelled (a cancelled connect or write is
    // lost), so it runs in a task of its own and the loop below selects on
    // its events, which is cancel-safe.
    let (event_tx, mut events) = mpsc::channel(64);
    let poller = tokio::spawn(async move {
        loop {
            let event = event_loop.poll().await;
            let failed = event.is_err();
            if event_tx.send(event).await.is_err() || failed {
                return;
            }
        }
    });
    let _stop_poller = AbortOnDrop(poller);
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut next_send = shared.queue.lock().expect("queue lock").acked();
    let mut connected = false;
    let mut subscribed = 0usize;
    let mut sync_timer = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            // None only while the runtime shuts down (the poller dropped
            // first): the process is exiting, nothing to report.
            event = events.recv() => match event.ok_or_else(|| Refusal::Other("the MQTT poller stopped (shutting down)".into()))? {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    *was_connected = true;
                    subscribed = 0;
                    shared.status.send_modify(|s| {
                        s.connected = true;
                        s.following = 0;
                        s.last_error = None;
                    });
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(entry) = in_flight.iter_mut().find(|e| e.pkid.is_none()) {
                        entry.pkid = Some(pkid);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(entry) = in_flight.iter_mut().find(|e| e.pkid == Some(ack.pkid)) {
                        entry.acked = true;
                    }
                    advance(shared, &mut in_flight)?;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    shared.status.send_modify(|s| s.following += 1);
                }
                Ok(Event::Incoming(Packet::Publish(message))) => {
                    // `try_send` never waits, so it is done under the lock.
                    let follows = shared.follows.lock().expect("follows lock");
                    for (_, sender) in follows.iter().filter(|(f, _)| topic_matches(f, &message.topic)) {
                        let _ = sender.try_send(LiveMessage { topic: message.topic.clone(), payload: message.payload.to_vec() });
                    }
                }
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => {
                    return Err(match code {
                        ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized => {
                            Refusal::Credentials(format!("{code:?}"))
                        }
                        other => Refusal::Other(format!("broker refused the connection: {other:?}")),
                    });
                }
                Err(e) => return Err(Refusal::Other(format!("connection lost: {e}"))),
            },
            _ = shared.wake.notified() => {}
            _ = sync_timer.tick() => {
                let _ = shared.queue.lock().expect("queue lock").sync();
            }
        }
        if !connected {
            continue;
        }
        // Subscribes to follows added since the last turn (all of them
        // after a reconnect); on most turns there are none.
        while let Some(filter) = shared
            .follows
            .lock()
            .expect("follows lock")
            .get(subscribed)
            .map(|(filter, _)| filter.clone())
        {
            if client.try_subscribe(filter, QoS::AtLeastOnce).is_err() {
                break;
            }
            subscribed += 1;
        }
        if in_flight.len() < WINDOW {
            let mut queue = shared.queue.lock().expect("queue lock");
            if in_flight.is_empty() {
                // Everything sent was acknowledged (and the log may have
                // started over): the next record to send is the first unacked.
                next_send = queue.acked();
            }
            let entries = queue
                .read_from(next_send, WINDOW - in_flight.len())
                .map_err(Refusal::Other)?;
            drop(queue);
            for entry in entries {
                let topic = format!("{INGEST_PREFIX}{}/{device}", entry.stream);
                if client
                    .try_publish(topic, QoS::AtLeastOnce, false, entry.payload)
                    .is_err()
                {
                    break;
                }
                next_send = entry.end;
                in_flight.push_back(InFlight {
                    end: entry.end,
                    pkid: None,
                    acked: false,
                });
            }
        }
    }
}

/// Moves the queue's acknowledged mark over the acknowledged prefix.
fn advance(shared: &Shared, in_flight: &mut VecDeque<InFlight>) -> Result<(), Refusal> {
    let mut upto = None;
    let mut count = 0u64;
    while in_flight.front().is_some_and(|e| e.acked) {
        upto = in_flight.pop_front().map(|e| e.end);
        count += 1;
    }
    let Some(upto) = upto else {
        return Ok(());
    };
    let mut queue = shared.queue.lock().expect("queue lock");
    queue.ack(upto, count).map_err(Refusal::Other)?;
    // Under the queue's lock, like `Device::publish`: counts stay in order.
    let queued = queue.pending_entries();
    shared.status.send_modify(|s| {
        s.acked += count;
        s.queued = queued;
    });
    Ok(())
}
