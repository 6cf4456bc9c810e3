//! One client connection: authenticate the CONNECT, check every packet
//! against the device's role, hand ingest to the store, route everything
//! else, and deliver the session's messages.
//!
//! Two tasks per connection:
//! - the reader (this module): client packets in, decisions;
//! - the writer (`writer`): everything out. A PUBACK for ingest leaves only
//!   after the store committed, one for a routed message only after the
//!   persistent sessions it was queued for hold it durably.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetgate_protocol::topic::{is_platform_filter, may_publish, may_subscribe, IngestTopic};
use fleetgate_protocol::{unix_now_ms, AuthError, IngestMessage, IngestOutcome, Principal};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::codec::{
    self, connack_refusal, connect_version, publish_ack, AckReason, CodecError, Connect,
    DisconnectReasonCode, Frame, FrameReader, Header, Refusal, ServerLimits, Subscribe, Version,
    Will,
};
use crate::persist::CommitError;
use crate::platform_topics::PlatformSubscriber;
use crate::router::index::{check_filter, split_shared};
use crate::session::{Delivery, Message, Session};
use crate::sessions::{EndReason, SessionHandle};
use crate::Shared;
use writer::{write_loop, DeliveryState};

mod writer;

pub(crate) type AckFuture = Pin<Box<dyn Future<Output = Outgoing> + Send>>;
/// Bounded: a device that sends faster than it reads its acknowledgements
/// is no longer read (each entry is small, but a flood of PINGREQs or
/// refused publishes must not grow without limit).
type AckSender = mpsc::Sender<AckFuture>;
/// Acknowledgements waiting in the writer, at most.
pub(crate) const MAX_PENDING_ACKS: usize = 4096;
/// Topic aliases a client may set (each holds a topic name in memory).
pub(crate) const MAX_TOPIC_ALIAS: u16 = 32;
/// Subscriptions one session may hold: each costs memory in the index,
/// and a device may otherwise subscribe to endless variants of its own
/// command topics.
const MAX_SUBSCRIPTIONS: usize = 256;
/// Longest a write to a device may take before the device is given up on.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new connection waits for the one it takes over to let go
/// of the session.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// What the writer sends for one entry of the ordered answer queue.
pub(crate) enum Outgoing {
    Bytes(Bytes),
    Nothing,
    /// Not acknowledged (a commit failed, or 3.1.1 has no way to refuse):
    /// close without it, so the device re-sends after it reconnects.
    Abort,
}

fn ready(bytes: Bytes) -> AckFuture {
    Box::pin(std::future::ready(Outgoing::Bytes(bytes)))
}

/// The device's side of a connection, plain TCP or TLS.
pub(crate) type ClientRead = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type ClientWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Reads the CONNECT, authenticates, opens the session and runs the
/// connection until it ends.
pub(crate) async fn run(read_half: ClientRead, mut write_half: ClientWrite, shared: Arc<Shared>) {
    let mut reader = FrameReader::new(read_half);
    let max_connect = shared.config.max_payload + 64 * 1024;
    let first = tokio::time::timeout(
        shared.config.connect_timeout,
        reader.next(Version::V4, 0, max_connect),
    )
    .await;
    let Ok(Ok(Frame::Whole(header, frame))) = first else {
        return;
    };
    let version = match connect_version(&header, &frame) {
        Ok(version) => version,
        Err(CodecError::UnsupportedProtocol(_)) => {
            let _ = write_half
                .write_all(&connack_refusal(Version::V4, Refusal::UnsupportedProtocol))
                .await;
            return;
        }
        Err(_) => return,
    };
    let connect = match Connect::parse(version, &header, frame).and_then(|c| c.check().map(|_| c)) {
        Ok(connect) => connect,
        Err(e) => {
            tracing::debug!(error = %e, "malformed CONNECT");
            let _ = write_half
                .write_all(&connack_refusal(version, Refusal::ProtocolError))
                .await;
            return;
        }
    };
    let principal = match admit(&shared, &connect) {
        Ok(principal) => principal,
        Err(refusal) => {
            shared.metrics.connects_refused.inc();
            let _ = write_half
                .write_all(&connack_refusal(version, refusal))
                .await;
            let _ = write_half.shutdown().await;
            return;
        }
    };

    // MQTT session takeover: the device's older connections end, and
    // this one waits (briefly) until they have let go of the session.
    let (handle, previous) = shared.sessions.register(&principal.device_id);
    shared
        .router
        .claim(&principal.device_id, handle.registered_at_us());
    for old in previous {
        let _ = tokio::time::timeout(TAKEOVER_WAIT, old.finished()).await;
    }
    let config = &shared.config;
    let asked_expiry = connect.session_expiry(config.max_session_expiry);
    let expiry_secs = asked_expiry.min(config.max_session_expiry);
    let (opened, commit) = {
        let (role, device) = (principal.role, principal.device_id.clone());
        shared.router.open(
            connect.client_id(),
            connect.clean_start(),
            expiry_secs,
            move |filter| {
                is_platform_filter(filter) || may_subscribe(role, &device, filter).is_ok()
            },
        )
    };
    if let Err(e) = commit.await {
        tracing::error!(device = %principal.device_id, error = %e, "cannot store the session");
        let _ = write_half
            .write_all(&connack_refusal(version, Refusal::Unavailable))
            .await;
        shared.router.close(&opened.session, opened.connection);
        shared.sessions.unregister(&handle);
        return;
    }
    let keep_alive = match connect.keep_alive() {
        k if version == Version::V5 && (k == 0 || k > config.max_keep_alive) => {
            config.max_keep_alive
        }
        k => k,
    };
    let limits = ServerLimits {
        receive_maximum: config.max_inflight.min(u16::MAX as usize) as u16,
        maximum_packet_size: config.maximum_packet_size() as u32,
        topic_alias_maximum: MAX_TOPIC_ALIAS,
        session_expiry: (expiry_secs != asked_expiry).then_some(expiry_secs),
        keep_alive: (keep_alive != connect.keep_alive()).then_some(keep_alive),
    };
    let connack = codec::connack_success(version, opened.present, &limits);
    shared.metrics.connections.inc();
    let delivery = DeliveryState::new(
        version,
        connect.receive_maximum(),
        connect.maximum_packet_size(),
        connect.topic_alias_maximum(),
    );
    let connection = Connection {
        shared: shared.clone(),
        version,
        principal,
        keep_alive,
        handle: handle.clone(),
        session: opened.session.clone(),
        connection: opened.connection,
        session_expiry: expiry_secs,
        will: connect.will(),
        aliases: HashMap::new(),
        inbound_qos2: HashSet::new(),
        inflight: Arc::new(Semaphore::new(config.max_inflight)),
        relay: None,
        platform: None,
    };
    drop(connect);
    connection
        .serve(reader, write_half, connack, opened.resend, delivery)
        .await;
    shared.metrics.connections.dec();
    shared.sessions.unregister(&handle);
}

/// Authenticates the CONNECT and checks its will; the error is the CONNACK code.
fn admit(shared: &Shared, connect: &Connect) -> Result<Principal, Refusal> {
    let client_id = connect.client_id();
    let refuse = |what: &str, refusal: Refusal| {
        shared.auth.record_refusal(
            if client_id.is_empty() {
                "(empty client id)"
            } else {
                client_id
            },
            what,
        );
        Err(refusal)
    };
    if client_id.is_empty() {
        return refuse("auth: empty client id", Refusal::BadClientId);
    }
    let Some((username, password)) = connect.login() else {
        return refuse("auth: no username and token", Refusal::BadCredentials);
    };
    // The token is checked against the client id before the username is:
    // a client id that is not the token's device is *identifier rejected*
    // (3.1.1 code 2, MQTT 5 0x85) whatever the username says. Checking the
    // username first answered that case *bad username or password* whenever
    // the username named the token's device.
    let principal = shared
        .auth
        .authenticate(Some(client_id), password)
        .map_err(|e| match e {
            AuthError::BadCredentials(_) => Refusal::BadCredentials,
            AuthError::ClientIdMismatch { .. } => Refusal::BadClientId,
            AuthError::NotAuthorized(..) => Refusal::NotAuthorized,
            AuthError::Banned { .. } => Refusal::Banned,
        })?;
    // The token is this client id's; a username naming anyone else is a
    // bad username.
    if username != client_id {
        return refuse(
            "auth: username differs from client id",
            Refusal::BadCredentials,
        );
    }
    if let Some(will) = connect.will() {
        if let Err(denied) = may_publish(principal.role, &principal.device_id, &will.topic) {
            return refuse(&format!("will: {}", denied.0), Refusal::NotAuthorized);
        }
    }
    Ok(principal)
}

struct Connection {
    shared: Arc<Shared>,
    version: Version,
    principal: Principal,
    keep_alive: u16,
    handle: SessionHandle,
    session: Arc<Session>,
    /// This connection's number in the session.
    connection: u64,
    /// Seconds the session outlives this connection (a DISCONNECT may change it).
    session_expiry: u32,
    will: Option<Will>,
    /// MQTT 5 topic aliases the device has set.
    aliases: HashMap<u16, String>,
    /// QoS 2 publishes received and answered with PUBREC, until PUBREL.
    inbound_qos2: HashSet<u16>,
    /// Bounds publishes awaiting commit on this connection.
    inflight: Arc<Semaphore>,
    /// The writer's queue for platform topics' publishes.
    relay: Option<mpsc::Sender<Bytes>>,
    /// Started at the first subscription to a platform topic.
    platform: Option<PlatformSubscriber>,
}

/// How the reader loop ended.
enum End {
    /// The device sent DISCONNECT: no will.
    Graceful,
    /// Network error, keep-alive timeout, protocol violation, or a
    /// DISCONNECT asking for the will: the will is published.
    Abnormal,
    /// Revoked, taken over, shutting down or token expired.
    Ended(EndReason),
}

/// A violation the connection ends for, with its MQTT 5 reason code.
struct Violation(DisconnectReasonCode, String);

impl From<CodecError> for Violation {
    fn from(e: CodecError) -> Self {
        let code = match e {
            CodecError::TooLarge(_) => DisconnectReasonCode::PacketTooLarge,
            _ => DisconnectReasonCode::MalformedPacket,
        };
        Violation(code, e.to_string())
    }
}

fn protocol_error(text: impl Into<String>) -> Violation {
    Violation(DisconnectReasonCode::ProtocolError, text.into())
}

impl Connection {
    async fn serve(
        mut self,
        mut reader: FrameReader<ClientRead>,
        client: ClientWrite,
        connack: Bytes,
        resend: Vec<Delivery>,
        delivery: DeliveryState,
    ) {
        let (acks, ack_queue) = mpsc::channel::<AckFuture>(MAX_PENDING_ACKS);
        let (relay, relay_queue) = mpsc::channel::<Bytes>(256);
        self.relay = Some(relay);
        let mut writer = tokio::spawn(write_loop(
            client,
            connack,
            ack_queue,
            relay_queue,
            delivery,
            resend,
            (self.session.clone(), self.connection),
            self.shared.router.clone(),
        ));
        let end = self.read_loop(&mut reader, &acks).await;

        if let End::Ended(reason) = &end {
            let code = match reason {
                EndReason::Revoked => DisconnectReasonCode::NotAuthorized,
                EndReason::RoleChanged | EndReason::Banned => {
                    DisconnectReasonCode::AdministrativeAction
                }
                EndReason::ShuttingDown => DisconnectReasonCode::ServerShuttingDown,
                EndReason::TakenOver => DisconnectReasonCode::SessionTakenOver,
                EndReason::TokenExpired => DisconnectReasonCode::MaximumConnectTime,
            };
            if let Some(bytes) = codec::server_disconnect(self.version, code) {
                let _ = acks.try_send(ready(bytes));
            }
        }
        // Answers still waiting for commits are written before the close;
        // a device that took its session elsewhere is not waited for long.
        drop(acks);
        let grace = match end {
            End::Ended(EndReason::TakenOver) => Duration::from_secs(1),
            _ => WRITE_TIMEOUT,
        };
        if tokio::time::timeout(grace, &mut writer).await.is_err() {
            writer.abort();
        }
        self.platform = None;
        self.shared.router.close(&self.session, self.connection);
        // A will is for an unplanned end: not for DISCONNECT, and not when
        // the platform itself ended the session (revoked, banned, shutting
        // down, token expired).
        if matches!(end, End::Abnormal | End::Ended(EndReason::TakenOver)) {
            if let Some(will) = self.will.take() {
                self.publish_will(will);
            }
        }
    }

    async fn read_loop(&mut self, reader: &mut FrameReader<ClientRead>, acks: &AckSender) -> End {
        // The device's keep-alive, enforced at 1.5 times (MQTT 3.1.2.10).
        let idle_limit = match self.keep_alive {
            0 => Duration::from_secs(u32::MAX as u64),
            k => Duration::from_millis(k as u64 * 1500),
        };
        let max_publish = self.shared.config.max_payload;
        let max_other = self.shared.config.maximum_packet_size();
        // No session outlives its token.
        let token_left_ms = (self.principal.expires_at.saturating_mul(1000) - unix_now_ms())
            .clamp(0, 86_400_000 * 365);
        let token_expiry = tokio::time::sleep(Duration::from_millis(token_left_ms as u64));
        tokio::pin!(token_expiry);
        let handle = self.handle.clone();
        loop {
            let next = tokio::select! {
                biased;
                reason = handle.ended() => return End::Ended(reason),
                // The writer gave up on this device (it stopped reading).
                _ = acks.closed() => return End::Abnormal,
                _ = &mut token_expiry => return End::Ended(EndReason::TokenExpired),
                next = tokio::time::timeout(idle_limit, reader.next(self.version, max_publish, max_other)) => next,
            };
            let step = match next {
                Ok(Ok(Frame::OversizedPublish(p))) => {
                    let message = Incoming {
                        topic: p.topic,
                        qos: p.qos,
                        pkid: p.pkid,
                        retain: false,
                        dup: false,
                        payload: p.head,
                        truncated_from: Some(p.size),
                        expiry_secs: None,
                        properties: None,
                    };
                    self.on_publish(message, acks).await
                }
                Ok(Ok(Frame::Whole(header, bytes))) => self.on_packet(header, bytes, acks).await,
                Ok(Err(CodecError::Closed)) => return End::Abnormal,
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(Violation(
                    DisconnectReasonCode::KeepAliveTimeout,
                    "keep-alive expired".into(),
                )),
            };
            match step {
                Ok(None) => {}
                Ok(Some(end)) => return end,
                Err(Violation(code, text)) => {
                    tracing::info!(device = %self.principal.device_id, reason = %text, "closing connection");
                    if let Some(bytes) = codec::server_disconnect(self.version, code) {
                        let _ = acks.send(ready(bytes)).await;
                    }
                    return End::Abnormal;
                }
            }
        }
    }

    async fn on_packet(
        &mut self,
        header: Header,
        bytes: Bytes,
        acks: &AckSender,
    ) -> Result<Option<End>, Violation> {
        match header.packet_type() {
            codec::PUBLISH => {
                let publish = codec::Publish::parse(self.version, &header, bytes)?;
                if publish.has_subscription_ids {
                    return Err(protocol_error("a client sent a subscription identifier"));
                }
                let topic = self.resolve_alias(&publish)?;
                let message = Incoming {
                    topic,
                    qos: publish.qos,
                    pkid: publish.pkid,
                    retain: publish.retain,
                    dup: publish.dup,
                    payload: publish.payload,
                    truncated_from: None,
                    expiry_secs: publish.expiry_secs,
                    properties: publish.properties,
                };
                self.on_publish(message, acks).await
            }
            codec::PUBACK => {
                let (pkid, _) = codec::ack_fields(&header, &bytes)?;
                let done = self.session.puback(pkid).map_err(|e| {
                    protocol_error(format!("PUBACK for packet id {} not in flight", e.0))
                })?;
                self.shared.router.settle(&self.session, &done);
                Ok(None)
            }
            codec::PUBREC => {
                let (pkid, reason) = codec::ack_fields(&header, &bytes)?;
                let failed = reason >= 0x80;
                let received = self.session.pubrec(pkid, failed).map_err(|e| {
                    protocol_error(format!("PUBREC for packet id {} not in flight", e.0))
                })?;
                // The client has the message: nothing to send again after a
                // restart, only the PUBREL, which may be lost harmlessly.
                self.shared.router.settle(&self.session, &received);
                if !failed {
                    let _ = acks.send(ready(codec::pubrel(pkid))).await;
                }
                Ok(None)
            }
            codec::PUBCOMP => {
                let (pkid, _) = codec::ack_fields(&header, &bytes)?;
                self.session.pubcomp(pkid).map_err(|e| {
                    protocol_error(format!("PUBCOMP for packet id {} not released", e.0))
                })?;
                Ok(None)
            }
            codec::PUBREL => {
                let (pkid, _) = codec::ack_fields(&header, &bytes)?;
                // Unknown is not an error: the exchange may predate a
                // reconnect (MQTT 5 answers "packet identifier not found").
                let found = self.inbound_qos2.remove(&pkid);
                let _ = acks
                    .send(ready(codec::pubcomp(self.version, pkid, found)))
                    .await;
                Ok(None)
            }
            codec::SUBSCRIBE => {
                let subscribe = Subscribe::parse(self.version, &header, bytes)?;
                self.on_subscribe(subscribe, acks).await?;
                Ok(None)
            }
            codec::UNSUBSCRIBE => {
                let (pkid, filters) = codec::unsubscribe_filters(self.version, &header, bytes)?;
                self.on_unsubscribe(pkid, filters, acks).await;
                Ok(None)
            }
            codec::PINGREQ => {
                let _ = acks.send(ready(codec::pingresp())).await;
                Ok(None)
            }
            codec::DISCONNECT => {
                let (reason, expiry) = codec::client_disconnect(self.version, &header, bytes)?;
                if let Some(expiry) = expiry {
                    if self.session_expiry == 0 && expiry != 0 {
                        return Err(protocol_error(
                            "DISCONNECT sets a session expiry the CONNECT did not have",
                        ));
                    }
                    self.session_expiry = expiry.min(self.shared.config.max_session_expiry);
                    self.shared
                        .router
                        .set_expiry(&self.session, self.session_expiry);
                }
                // 0x04: "disconnect with will message".
                Ok(Some(if reason == 0x04 {
                    End::Abnormal
                } else {
                    End::Graceful
                }))
            }
            codec::CONNECT => Err(protocol_error("second CONNECT on one connection")),
            // AUTH: no enhanced authentication was negotiated.
            15 => Err(protocol_error("AUTH without an authentication method")),
            other => Err(Violation(
                DisconnectReasonCode::MalformedPacket,
                format!("packet type {other} is not sent by clients"),
            )),
        }
    }

    /// The topic a PUBLISH is for, through its MQTT 5 topic alias.
    fn resolve_alias(&mut self, publish: &codec::Publish) -> Result<String, Violation> {
        match (publish.topic.is_empty(), publish.alias) {
            (false, Some(alias)) => {
                if alias == 0 || alias > MAX_TOPIC_ALIAS {
                    return Err(Violation(
                        DisconnectReasonCode::TopicAliasInvalid,
                        format!("topic alias {alias} out of range"),
                    ));
                }
                // Only topics this device may publish to are worth
                // remembering: a refused one must not cost memory.
                let Principal {
                    role, device_id, ..
                } = &self.principal;
                if may_publish(*role, device_id, &publish.topic).is_ok() {
                    self.aliases.insert(alias, publish.topic.clone());
                } else {
                    self.aliases.remove(&alias);
                }
                Ok(publish.topic.clone())
            }
            (false, None) => Ok(publish.topic.clone()),
            (true, Some(alias)) => self.aliases.get(&alias).cloned().ok_or_else(|| {
                Violation(
                    DisconnectReasonCode::TopicAliasInvalid,
                    format!("unknown topic alias {alias}"),
                )
            }),
            (true, None) => Err(protocol_error("publish without a topic")),
        }
    }

    async fn on_publish(
        &mut self,
        message: Incoming,
        acks: &AckSender,
    ) -> Result<Option<End>, Violation> {
        let Principal {
            role, device_id, ..
        } = &self.principal;
        if let Err(denied) = may_publish(*role, device_id, &message.topic) {
            return Ok(self
                .deny_publish(&message, AckReason::NotAuthorized(denied.0), acks)
                .await);
        }
        if let Some(size) = message.truncated_from {
            if IngestTopic::parse(&message.topic).is_none() {
                let reason = format!(
                    "publish of {size} bytes exceeds the {}-byte limit",
                    self.shared.config.max_payload
                );
                return Ok(self
                    .deny_publish(&message, AckReason::TooLarge(reason), acks)
                    .await);
            }
        }
        let open = message.qos == 2 && self.inbound_qos2.contains(&message.pkid);
        if open && message.dup {
            // A re-sent QoS 2 publish (its PUBREL has not come): it was
            // taken once, so it is answered, not taken again.
            let (version, pkid) = (self.version, message.pkid);
            let _ = acks
                .send(ready(publish_ack(version, 2, pkid, &AckReason::Success)))
                .await;
            return Ok(None);
        }
        // Without DUP, an open packet id is a new message: its exchange
        // ended with a failure PUBREC, which frees the id (MQTT 4.3.3).
        if message.qos == 2 && !open && self.inbound_qos2.len() >= self.shared.config.max_inflight {
            return Err(Violation(
                DisconnectReasonCode::ReceiveMaximumExceeded,
                "too many QoS 2 exchanges open".into(),
            ));
        }
        match IngestTopic::parse(&message.topic) {
            Some(Ok(topic)) => {
                let (stream, device) = (topic.stream.to_string(), topic.device.to_string());
                self.ingest(message, stream, device, acks).await
            }
            _ => {
                self.route(message, acks).await;
                Ok(None)
            }
        }
    }

    async fn ingest(
        &mut self,
        message: Incoming,
        stream: String,
        device: String,
        acks: &AckSender,
    ) -> Result<Option<End>, Violation> {
        // Waiting here for a permit, then for room in the store's queue, is
        // the back-pressure: this connection is not read until the store
        // catches up.
        let permit = self
            .inflight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closes");
        let ingest_message = IngestMessage {
            principal: self.principal.clone(),
            stream,
            device_id: device,
            payload: message.payload,
            truncated_from: message.truncated_from,
            received_at_ms: unix_now_ms(),
            state_version: None,
        };
        let Ok(pending) = self.shared.ingest.submit(ingest_message).await else {
            return Ok(Some(End::Ended(EndReason::ShuttingDown)));
        };
        if message.qos == 2 {
            self.inbound_qos2.insert(message.pkid);
        }
        let (version, qos, pkid) = (self.version, message.qos, message.pkid);
        let (shared, device) = (self.shared.clone(), self.principal.device_id.clone());
        let _ = acks
            .send(Box::pin(async move {
                let outcome = pending.await;
                drop::<OwnedSemaphorePermit>(permit);
                match outcome {
                    // The store refused the sender (its device type may not
                    // write the stream): a denied publish like any other,
                    // counted against the device; 3.1.1 has no code for it,
                    // so the connection closes, whatever the QoS.
                    Ok(Ok(IngestOutcome {
                        refused: Some(reason),
                        ..
                    })) => {
                        shared.metrics.publishes_denied.inc();
                        shared
                            .auth
                            .record_refusal(&device, &format!("publish: {reason}"));
                        match version {
                            Version::V5 if qos > 0 => Outgoing::Bytes(publish_ack(
                                version,
                                qos,
                                pkid,
                                &AckReason::NotAuthorized(reason),
                            )),
                            Version::V5 => Outgoing::Nothing,
                            Version::V4 => Outgoing::Abort,
                        }
                    }
                    Ok(Ok(outcome)) if qos > 0 => {
                        Outgoing::Bytes(publish_ack(version, qos, pkid, &ack_reason(&outcome)))
                    }
                    Ok(Ok(_)) => Outgoing::Nothing,
                    _ => Outgoing::Abort,
                }
            }))
            .await;
        Ok(None)
    }

    /// Routes a non-ingest publish to the sessions subscribed to it; its
    /// acknowledgement waits until those that keep messages durably have it.
    async fn route(&mut self, message: Incoming, acks: &AckSender) {
        let (version, qos, pkid) = (self.version, message.qos, message.pkid);
        let published = self.shared.router.publish(Message {
            topic: message.topic.into(),
            payload: message.payload,
            qos,
            retain: message.retain,
            properties: message.properties.map(Arc::new),
            expires_at_ms: message
                .expiry_secs
                .map(|secs| unix_now_ms() + secs as i64 * 1000),
            publisher: Some(self.session.client_id.clone()),
            durable: true,
        });
        if qos == 0 {
            return;
        }
        // Nobody could take it: that is not acknowledged as delivered.
        let reason = (published.queued == 0 && published.refused > 0).then(|| {
            AckReason::QuotaExceeded(format!(
                "the queues of all {} subscribed sessions are full",
                published.refused
            ))
        });
        if qos == 2 && reason.is_none() {
            self.inbound_qos2.insert(pkid);
        }
        let commit = published.commit;
        let _ = acks
            .send(Box::pin(async move {
                match commit.await {
                    Ok(()) => {}
                    // A cluster's shared queue (JetStream) refused it for a
                    // full session queue: like a full queue here. QoS 2 closes
                    // instead, so no failed exchange keeps its packet id.
                    Err(e @ CommitError::QueueFull) if version == Version::V5 && qos == 1 => {
                        let reason = AckReason::QuotaExceeded(e.to_string());
                        return Outgoing::Bytes(publish_ack(version, qos, pkid, &reason));
                    }
                    Err(_) => return Outgoing::Abort,
                }
                match reason {
                    None => Outgoing::Bytes(publish_ack(version, qos, pkid, &AckReason::Success)),
                    Some(reason) if version == Version::V5 => {
                        Outgoing::Bytes(publish_ack(version, qos, pkid, &reason))
                    }
                    // 3.1.1 cannot refuse: no PUBACK, and the close tells
                    // the device to send again.
                    Some(_) => Outgoing::Abort,
                }
            }))
            .await;
    }

    /// A refused publish is never stored or delivered. MQTT 5 answers with a
    /// reason code; MQTT 3.1.1 has none, so the connection is closed.
    async fn deny_publish(
        &self,
        message: &Incoming,
        reason: AckReason,
        acks: &AckSender,
    ) -> Option<End> {
        self.shared.metrics.publishes_denied.inc();
        self.shared.auth.record_refusal(
            &self.principal.device_id,
            &format!("publish: {}", reason.text()),
        );
        match self.version {
            Version::V5 if message.qos > 0 => {
                let _ = acks
                    .send(ready(publish_ack(
                        self.version,
                        message.qos,
                        message.pkid,
                        &reason,
                    )))
                    .await;
                None
            }
            Version::V5 => None,
            Version::V4 => {
                let _ = acks
                    .send(Box::pin(std::future::ready(Outgoing::Abort)))
                    .await;
                Some(End::Abnormal)
            }
        }
    }

    async fn on_subscribe(
        &mut self,
        subscribe: Subscribe,
        acks: &AckSender,
    ) -> Result<(), Violation> {
        let Principal {
            role, device_id, ..
        } = &self.principal;
        let refused = if self.version == Version::V4 {
            0x80
        } else {
            0x87
        };
        let invalid = if self.version == Version::V4 {
            0x80
        } else {
            0x8F
        };
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut commits = Vec::new();
        let mut retained = Vec::new();
        let mut platform = Vec::new();
        for requested in subscribe.filters {
            let filter = requested.filter;
            let options = requested.options;
            if let Err(e) = check_filter(&filter) {
                tracing::debug!(device = %device_id, error = %e, "invalid topic filter");
                codes.push(invalid);
                continue;
            }
            if let Err(denied) = may_subscribe(*role, device_id, &filter) {
                codes.push(refused);
                self.shared.metrics.subscribes_denied.inc();
                self.shared
                    .auth
                    .record_refusal(device_id, &format!("subscribe: {}", denied.0));
                continue;
            }
            let shared_subscription = split_shared(&filter).0.is_some();
            if shared_subscription && options.no_local {
                return Err(protocol_error("noLocal on a shared subscription"));
            }
            if is_platform_filter(&filter) {
                // Served by the platform topics, at QoS 0.
                platform.push(filter);
                codes.push(0);
                continue;
            }
            let full = {
                let state = self.session.lock();
                state.subscriptions.len() >= MAX_SUBSCRIPTIONS
                    && !state.subscriptions.contains_key(&filter)
            };
            if full {
                // 0x97 quota exceeded (MQTT 5); 3.1.1 has only "failure".
                codes.push(if self.version == Version::V4 {
                    0x80
                } else {
                    0x97
                });
                continue;
            }
            let (existed, commit) = self
                .shared
                .router
                .subscribe(&self.session, &filter, options);
            commits.push(commit);
            codes.push(options.qos);
            let send_retained = match options.retain_handling {
                0 => true,
                1 => !existed,
                _ => false,
            };
            if send_retained {
                retained.push((filter, options));
            }
        }
        if !platform.is_empty() {
            let relay = self.relay.clone().expect("relay queue set before reading");
            let (topics, version) = (self.shared.platform.clone(), self.version);
            self.platform
                .get_or_insert_with(|| PlatformSubscriber::start(topics, version, relay))
                .subscribe(platform);
        }
        let suback = codec::suback(self.version, subscribe.pkid, &codes);
        let (router, session) = (self.shared.router.clone(), self.session.clone());
        let _ = acks
            .send(Box::pin(async move {
                for commit in commits {
                    if commit.await.is_err() {
                        return Outgoing::Abort;
                    }
                }
                // Queued now, so that they follow the SUBACK out.
                for (filter, options) in retained {
                    for message in router.retained_for(&filter) {
                        router.deliver_retained(&session, message, options);
                    }
                }
                Outgoing::Bytes(suback)
            }))
            .await;
        Ok(())
    }

    async fn on_unsubscribe(&mut self, pkid: u16, filters: Vec<String>, acks: &AckSender) {
        let mut codes = Vec::with_capacity(filters.len());
        let mut commits = Vec::new();
        let mut platform = Vec::new();
        for filter in filters {
            if is_platform_filter(&filter) {
                platform.push(filter);
                codes.push(0x00);
                continue;
            }
            let (existed, commit) = self.shared.router.unsubscribe(&self.session, &filter);
            commits.push(commit);
            // 0x11: no subscription existed (MQTT 5).
            codes.push(if existed { 0x00 } else { 0x11 });
        }
        if let Some(subscriber) = &self.platform {
            subscriber.unsubscribe(platform);
        }
        let unsuback = codec::unsuback(self.version, pkid, &codes);
        let _ = acks
            .send(Box::pin(async move {
                for commit in commits {
                    if commit.await.is_err() {
                        return Outgoing::Abort;
                    }
                }
                Outgoing::Bytes(unsuback)
            }))
            .await;
    }

    /// Publishes the will: an ingest will is a record like any other, and
    /// goes through the pipeline; any other is routed, after its MQTT 5
    /// delay unless the session has a connection again by then.
    fn publish_will(&self, will: Will) {
        if let Some(Ok(topic)) = IngestTopic::parse(&will.topic) {
            let message = IngestMessage {
                principal: self.principal.clone(),
                stream: topic.stream.to_string(),
                device_id: topic.device.to_string(),
                payload: will.payload,
                truncated_from: None,
                received_at_ms: unix_now_ms(),
                state_version: None,
            };
            let ingest = self.shared.ingest.clone();
            tokio::spawn(async move {
                if let Ok(pending) = ingest.submit(message).await {
                    let _ = pending.await;
                }
            });
            return;
        }
        let delay = will.delay_secs.min(self.session_expiry);
        let message = Message {
            topic: will.topic.into(),
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            properties: will.properties.map(Arc::new),
            expires_at_ms: will.expiry_secs.map(|s| unix_now_ms() + s as i64 * 1000),
            publisher: Some(self.session.client_id.clone()),
            durable: true,
        };
        let (router, session) = (self.shared.router.clone(), self.session.clone());
        if delay == 0 {
            let _ = router.publish(message);
            return;
        }
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(delay as u64)).await;
            // MQTT 3.1.3.2.2: not sent if the session was resumed meanwhile.
            if session.lock().attached == 0 {
                let _ = router.publish(message);
            }
        });
    }
}

struct Incoming {
    topic: String,
    qos: u8,
    pkid: u16,
    retain: bool,
    dup: bool,
    payload: Bytes,
    truncated_from: Option<usize>,
    expiry_secs: Option<u32>,
    properties: Option<crate::session::Properties>,
}

fn ack_reason(outcome: &IngestOutcome) -> AckReason {
    if let Some(reason) = &outcome.refused {
        return AckReason::NotAuthorized(reason.clone());
    }
    // Duplicates are a success: the record is stored (once), which is
    // what the device needs to know to stop re-sending it.
    match (&outcome.first_reason, outcome.stored + outcome.duplicates) {
        (Some(reason), 0) => AckReason::PayloadInvalid(reason.clone()),
        _ => AckReason::Success,
    }
}
