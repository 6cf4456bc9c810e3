//! One device connection: authenticate at CONNECT, check every packet,
//! hand ingest to the store and relay the rest through the embedded broker.
//!
//! Three tasks per connection:
//! - this reader: client packets in, decisions, writes to the embedded broker;
//! - the writer: acknowledgements (in the order the publishes arrived, each
//!   sent only once its commit is done) and relayed upstream packets out;
//! - the upstream reader: the embedded broker's packets for the device.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleetgate_protocol::topic::{is_platform_filter, may_publish, may_subscribe, IngestTopic};
use fleetgate_protocol::{unix_now_ms, AuthError, IngestMessage, IngestOutcome, Principal};
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::codec::{
    self, connack_refusal, connect_version, publish_ack, AckReason, CodecError, Connect,
    DisconnectReasonCode, FilterFate, Frame, FrameReader, Header, Refusal, Subscribe, Version,
};
use crate::platform_topics::PlatformSubscriber;
use crate::sessions::{EndReason, SessionHandle};
use crate::Shared;

type AckFuture = Pin<Box<dyn Future<Output = Outgoing> + Send>>;
/// Bounded: a device that sends faster than it reads its acknowledgements
/// is no longer read (each entry is small, but a flood of PINGREQs or
/// refused publishes must not grow without limit).
type AckSender = mpsc::Sender<AckFuture>;
/// Acknowledgements waiting in the writer, at most.
const MAX_PENDING_ACKS: usize = 4096;
/// The topic alias maximum the embedded broker announces in its CONNACK.
const MAX_TOPIC_ALIAS: u16 = 4096;
/// Longest a write to a device may take before the device is given up on.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the writer sends for one entry of the ordered acknowledgement queue.
enum Outgoing {
    Bytes(Bytes),
    Nothing,
    /// The store could not commit: close without acknowledging, so the
    /// device re-sends after it reconnects.
    Abort,
}

fn ready(bytes: Bytes) -> AckFuture {
    Box::pin(std::future::ready(Outgoing::Bytes(bytes)))
}

/// Reads the CONNECT, authenticates, and then runs the connection.
/// The device's side of a connection, plain TCP or TLS.
pub(crate) type ClientRead = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type ClientWrite = Box<dyn AsyncWrite + Send + Unpin>;

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
    let Ok(connect) = Connect::parse(version, &header, frame) else {
        return;
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
    let handle = shared.sessions.register(&principal.device_id);
    let expiry = tokio::spawn(end_at_token_expiry(handle.clone(), principal.expires_at));
    let upstream_id = handle.upstream_client_id();
    let Some(upstream) =
        connect_upstream(&shared, version, &connect, &upstream_id, &mut write_half).await
    else {
        shared.sessions.unregister(&handle);
        expiry.abort();
        return;
    };
    shared.metrics.connections.inc();
    let will = connect
        .will()
        .filter(|w| IngestTopic::parse(&w.topic).is_some());
    let session = Session {
        shared: shared.clone(),
        version,
        principal,
        keep_alive: connect.keep_alive(),
        handle,
        aliases: HashMap::new(),
        local_qos2: HashSet::new(),
        forwarded_qos2: HashSet::new(),
        pending_subacks: Arc::new(Mutex::new(HashMap::new())),
        inflight: Arc::new(Semaphore::new(shared.config.max_inflight)),
        live_readers: 0,
        relay: None,
        platform: None,
        upstream_holds_will: false,
    };
    session.serve(reader, write_half, upstream, will).await;
    expiry.abort();
    shared.metrics.connections.dec();
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
    if username != client_id {
        return refuse(
            "auth: username differs from client id",
            Refusal::BadCredentials,
        );
    }
    let principal = shared
        .auth
        .authenticate(Some(client_id), password)
        .map_err(|e| match e {
            AuthError::BadCredentials(_) => Refusal::BadCredentials,
            AuthError::ClientIdMismatch { .. } => Refusal::BadClientId,
            AuthError::NotAuthorized(..) => Refusal::NotAuthorized,
            AuthError::Banned { .. } => Refusal::Banned,
        })?;
    if let Some(will) = connect.will() {
        if let Err(denied) = may_publish(principal.role, &principal.device_id, &will.topic) {
            return refuse(&format!("will: {}", denied.0), Refusal::NotAuthorized);
        }
    }
    Ok(principal)
}

struct UpstreamLink {
    reader: FrameReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// Whether the embedded broker holds the device's will (a DISCONNECT
    /// there is then what keeps it from being published).
    holds_will: bool,
}

/// Opens the device's session on the embedded broker and relays its CONNACK.
async fn connect_upstream(
    shared: &Shared,
    version: Version,
    connect: &Connect,
    upstream_id: &str,
    client: &mut ClientWrite,
) -> Option<UpstreamLink> {
    let addr = match version {
        Version::V4 => shared.upstream.v4,
        Version::V5 => shared.upstream.v5,
    };
    let keep_will = connect
        .will()
        .is_some_and(|w| IngestTopic::parse(&w.topic).is_none());
    let attempt = || async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (read_half, mut writer) = stream.into_split();
        let connect_bytes = connect
            .upstream(upstream_id, &shared.upstream.secret, keep_will)
            .map_err(|e| e.to_string())?;
        writer
            .write_all(&connect_bytes)
            .await
            .map_err(|e| format!("send CONNECT: {e}"))?;
        let mut reader = FrameReader::new(read_half);
        match reader
            .next(version, usize::MAX, 64 * 1024)
            .await
            .map_err(|e| format!("read CONNACK: {e}"))?
        {
            Frame::Whole(header, connack) if header.packet_type() == 2 => {
                Ok((reader, writer, header, connack))
            }
            Frame::Whole(header, _) => Err(format!(
                "expected CONNACK, got packet type {}",
                header.packet_type()
            )),
            Frame::OversizedPublish(_) => Err("expected CONNACK, got a PUBLISH".to_string()),
        }
    };
    // A refused or dropped attempt (the embedded broker momentarily busy) is
    // worth a second try before telling the device to go away.
    let mut accepted = None;
    for delay_ms in [0, 50, 250, 1000] {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        match tokio::time::timeout(Duration::from_secs(5), attempt()).await {
            Ok(Ok(link)) => {
                accepted = Some(link);
                break;
            }
            Ok(Err(e)) => {
                tracing::warn!(device = connect.client_id(), error = %e, "embedded broker session attempt failed")
            }
            Err(_) => tracing::warn!(
                device = connect.client_id(),
                "embedded broker session attempt timed out"
            ),
        }
    }
    let Some((reader, writer, header, connack)) = accepted else {
        tracing::error!(
            device = connect.client_id(),
            "embedded broker did not accept the session"
        );
        let _ = client
            .write_all(&connack_refusal(version, Refusal::Unavailable))
            .await;
        return None;
    };
    client.write_all(&connack).await.ok()?;
    // Byte 1 after the fixed header is the return/reason code; 0 is success.
    (connack.get(header.len + 1) == Some(&0)).then_some(UpstreamLink {
        reader,
        writer,
        holds_will: keep_will,
    })
}

struct Session {
    shared: Arc<Shared>,
    version: Version,
    principal: Principal,
    keep_alive: u16,
    handle: SessionHandle,
    /// MQTT 5 topic aliases the device has set.
    aliases: HashMap<u16, String>,
    /// QoS 2 ingest publishes answered here, whose PUBREL is ours to complete.
    local_qos2: HashSet<u16>,
    /// QoS 2 publishes relayed to the embedded broker, whose PUBREL is its.
    forwarded_qos2: HashSet<u16>,
    /// SUBSCRIBEs forwarded with some filters removed: pkid → what became
    /// of each filter.
    pending_subacks: PendingSubacks,
    /// Bounds publishes awaiting commit on this connection.
    inflight: Arc<Semaphore>,
    /// Live-capable subscriptions this session added to the shared count.
    live_readers: usize,
    /// The writer's queue for packets that are not acknowledgements.
    relay: Option<mpsc::Sender<Bytes>>,
    /// Started at the first subscription to a platform topic.
    platform: Option<PlatformSubscriber>,
    /// See [`Session::end_upstream`].
    upstream_holds_will: bool,
}

type PendingSubacks = Arc<Mutex<HashMap<u16, Vec<FilterFate>>>>;

/// How the reader loop ended.
enum End {
    /// The device sent DISCONNECT: no will.
    Graceful,
    /// Network error, keep-alive timeout, protocol violation: the will fires.
    Abnormal,
    /// Revoked, taken over or shutting down.
    Ended(EndReason),
}

impl Session {
    async fn serve(
        mut self,
        mut reader: FrameReader<ClientRead>,
        client: ClientWrite,
        upstream: UpstreamLink,
        will: Option<codec::Will>,
    ) {
        self.upstream_holds_will = upstream.holds_will;
        let (acks, ack_queue) = mpsc::channel::<AckFuture>(MAX_PENDING_ACKS);
        let (relay, relay_queue) = mpsc::channel::<Bytes>(1024);
        let writer = tokio::spawn(write_loop(client, ack_queue, relay_queue));
        self.relay = Some(relay.clone());
        let upstream_task = tokio::spawn(relay_upstream(
            upstream.reader,
            self.version,
            relay,
            self.pending_subacks.clone(),
            self.handle.clone(),
        ));
        let mut up = upstream.writer;
        let end = self.read_loop(&mut reader, &mut up, &acks).await;

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
        // Acknowledgements still waiting for commits are written before close.
        drop(acks);
        let mut writer = writer;
        if tokio::time::timeout(Duration::from_secs(30), &mut writer)
            .await
            .is_err()
        {
            // A device that stopped reading: give up on it.
            writer.abort();
        }
        upstream_task.abort();
        self.platform = None;
        if let End::Ended(reason) = &end {
            if *reason != EndReason::TakenOver {
                // The platform ended it (revoked, banned, re-roled, shutting
                // down): a normal DISCONNECT, so the embedded broker does not
                // publish the device's will.
                self.end_upstream(&mut up, &[codec::DISCONNECT << 4, 0])
                    .await;
            }
        }
        let _ = up.shutdown().await;
        self.shared
            .upstream
            .live_readers
            .fetch_sub(self.live_readers, Ordering::Relaxed);
        self.shared.sessions.unregister(&self.handle);
        // A will is for an unplanned end: not for DISCONNECT, and not when the
        // platform itself ended the session (revoked, banned, shutting down).
        if let (End::Abnormal | End::Ended(EndReason::TakenOver), Some(will)) = (end, will) {
            self.fire_ingest_will(will);
        }
    }

    /// Sends the embedded broker a DISCONNECT before the connection closes,
    /// but only when it holds a will that must not be published: rumqttd
    /// handles a DISCONNECT followed by the close as two disconnections,
    /// and when the connection's slot has meanwhile gone to a new
    /// connection, the second one ends that one (a device reconnecting at
    /// once lost its new session). Without a will, a close alone means the
    /// same to it.
    async fn end_upstream(&self, up: &mut OwnedWriteHalf, disconnect: &[u8]) {
        if self.upstream_holds_will {
            let _ = forward(up, disconnect).await;
        }
    }

    async fn read_loop(
        &mut self,
        reader: &mut FrameReader<ClientRead>,
        up: &mut OwnedWriteHalf,
        acks: &AckSender,
    ) -> End {
        // The device's keep-alive, enforced here (1.5x, as MQTT says); the
        // embedded broker's session is kept alive by our own pings.
        let idle_limit = match self.keep_alive {
            0 => Duration::from_secs(u32::MAX as u64),
            k => Duration::from_millis(k as u64 * 1500),
        };
        let mut upstream_ping = tokio::time::interval(Duration::from_secs(1800));
        upstream_ping.tick().await;
        let max_publish = self.shared.config.max_payload;
        let max_other = 1024 * 1024;
        loop {
            let next = tokio::select! {
                biased;
                reason = self.handle.ended() => return End::Ended(reason),
                // The writer gave up on this device (it stopped reading).
                _ = acks.closed() => return End::Abnormal,
                _ = upstream_ping.tick() => {
                    if up.write_all(&codec::pingreq()).await.is_err() {
                        return End::Abnormal;
                    }
                    continue;
                }
                next = tokio::time::timeout(idle_limit, reader.next(self.version, max_publish, max_other)) => next,
            };
            let frame = match next {
                Ok(Ok(frame)) => frame,
                Ok(Err(CodecError::Closed)) => return End::Abnormal,
                Ok(Err(e)) => {
                    tracing::info!(device = %self.principal.device_id, error = %e, "closing connection");
                    let code = match e {
                        CodecError::TooLarge(_) => Some(DisconnectReasonCode::PacketTooLarge),
                        CodecError::Malformed(_) => Some(DisconnectReasonCode::MalformedPacket),
                        _ => None,
                    };
                    if let Some(bytes) =
                        code.and_then(|c| codec::server_disconnect(self.version, c))
                    {
                        let _ = acks.send(ready(bytes)).await;
                    }
                    return End::Abnormal;
                }
                Err(_) => {
                    tracing::info!(device = %self.principal.device_id, "keep-alive expired");
                    if let Some(bytes) = codec::server_disconnect(
                        self.version,
                        DisconnectReasonCode::KeepAliveTimeout,
                    ) {
                        let _ = acks.send(ready(bytes)).await;
                    }
                    return End::Abnormal;
                }
            };
            let step = match frame {
                Frame::OversizedPublish(p) => {
                    let message = Incoming {
                        topic: p.topic,
                        qos: p.qos,
                        pkid: p.pkid,
                        payload: p.head,
                        truncated_from: Some(p.size),
                        raw: None,
                    };
                    self.on_publish(message, up, acks).await
                }
                Frame::Whole(header, bytes) => self.on_packet(header, bytes, up, acks).await,
            };
            match step {
                Ok(None) => {}
                Ok(Some(end)) => return end,
                Err(e) => {
                    tracing::info!(device = %self.principal.device_id, error = %e, "closing connection");
                    if let Some(bytes) =
                        codec::server_disconnect(self.version, DisconnectReasonCode::ProtocolError)
                    {
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
        up: &mut OwnedWriteHalf,
        acks: &AckSender,
    ) -> Result<Option<End>, CodecError> {
        match header.packet_type() {
            codec::PUBLISH => {
                let publish = codec::Publish::parse(self.version, &header, bytes.clone())?;
                let topic = match (publish.topic.is_empty(), publish.alias) {
                    (false, Some(alias)) => {
                        if alias == 0 || alias > MAX_TOPIC_ALIAS {
                            return Err(CodecError::Malformed(format!(
                                "topic alias {alias} out of range"
                            )));
                        }
                        // Only topics this device may publish to are worth
                        // remembering: a refused one must not cost memory.
                        let Principal {
                            role, device_id, ..
                        } = &self.principal;
                        if may_publish(*role, device_id, &publish.topic).is_ok() {
                            self.aliases.insert(alias, publish.topic.clone());
                        } else {
                            // The device re-set this alias; its old meaning is gone.
                            self.aliases.remove(&alias);
                        }
                        publish.topic
                    }
                    (false, None) => publish.topic,
                    (true, Some(alias)) => self.aliases.get(&alias).cloned().ok_or_else(|| {
                        CodecError::Malformed(format!("unknown topic alias {alias}"))
                    })?,
                    (true, None) => {
                        return Err(CodecError::Malformed("publish without a topic".into()))
                    }
                };
                let message = Incoming {
                    topic,
                    qos: publish.qos,
                    pkid: publish.pkid,
                    payload: publish.payload,
                    truncated_from: None,
                    raw: Some(bytes),
                };
                self.on_publish(message, up, acks).await
            }
            codec::SUBSCRIBE => {
                let subscribe = Subscribe::parse(self.version, &header, bytes.clone())?;
                self.on_subscribe(subscribe, bytes, up, acks).await?;
                Ok(None)
            }
            codec::UNSUBSCRIBE => {
                let (pkid, filters) =
                    codec::unsubscribe_filters(self.version, &header, bytes.clone())?;
                let platform: Vec<String> = filters
                    .iter()
                    .filter(|f| is_platform_filter(f))
                    .cloned()
                    .collect();
                let all_platform = platform.len() == filters.len();
                if let Some(subscriber) = &self.platform {
                    subscriber.unsubscribe(platform);
                }
                if all_platform {
                    let _ = acks
                        .send(ready(codec::unsuback(self.version, pkid, filters.len())))
                        .await;
                } else {
                    // The embedded broker skips filters it never had.
                    forward(up, &bytes).await?;
                }
                Ok(None)
            }
            codec::PUBREL => {
                let pkid = codec::pubrel_pkid(self.version, &header, bytes.clone())?;
                if self.forwarded_qos2.remove(&pkid) {
                    forward(up, &bytes).await?;
                } else {
                    // Ours, or unknown (e.g. re-sent after a reconnect, when
                    // the embedded broker's session is new): answered here, as
                    // forwarding an unknown PUBREL makes rumqttd drop the link.
                    let found = self.local_qos2.remove(&pkid);
                    let _ = acks
                        .send(ready(codec::pubcomp(self.version, pkid, found)))
                        .await;
                }
                Ok(None)
            }
            codec::PINGREQ => {
                let _ = acks.send(ready(codec::pingresp())).await;
                Ok(None)
            }
            codec::DISCONNECT => {
                self.end_upstream(up, &bytes).await;
                Ok(Some(End::Graceful))
            }
            codec::CONNECT => Err(CodecError::Malformed(
                "second CONNECT on one connection".into(),
            )),
            // PUBACK, PUBREC, PUBCOMP for deliveries, AUTH.
            4 | 5 | 7 | 15 => {
                forward(up, &bytes).await?;
                Ok(None)
            }
            // CONNACK, SUBACK, UNSUBACK, PINGRESP and type 0 are never sent by clients.
            other => Err(CodecError::Malformed(format!(
                "packet type {other} is not sent by clients"
            ))),
        }
    }

    async fn on_publish(
        &mut self,
        message: Incoming,
        up: &mut OwnedWriteHalf,
        acks: &AckSender,
    ) -> Result<Option<End>, CodecError> {
        let Principal {
            role, device_id, ..
        } = &self.principal;
        if let Err(denied) = may_publish(*role, device_id, &message.topic) {
            return Ok(self
                .deny_publish(&message, AckReason::NotAuthorized(denied.0), acks)
                .await);
        }
        let ingest = match IngestTopic::parse(&message.topic) {
            Some(Ok(topic)) => Some((topic.stream.to_string(), topic.device.to_string())),
            _ => None,
        };
        let Some((stream, device)) = ingest else {
            // Any other topic goes to the embedded broker, whole.
            if let Some(size) = message.truncated_from {
                let reason = format!(
                    "publish of {size} bytes exceeds the {}-byte limit",
                    self.shared.config.max_payload
                );
                return Ok(self
                    .deny_publish(&message, AckReason::TooLarge(reason), acks)
                    .await);
            }
            if message.qos == 2 {
                // This packet id's PUBREL now belongs to the embedded broker.
                self.local_qos2.remove(&message.pkid);
                self.forwarded_qos2.insert(message.pkid);
            }
            forward(up, message.raw.as_deref().unwrap_or_default()).await?;
            return Ok(None);
        };
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
            self.forwarded_qos2.remove(&message.pkid);
            self.local_qos2.insert(message.pkid);
        }
        let (version, qos, pkid) = (self.version, message.qos, message.pkid);
        let _ = acks
            .send(Box::pin(async move {
                let outcome = pending.await;
                drop::<OwnedSemaphorePermit>(permit);
                match outcome {
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

    /// A refused publish is never stored or delivered. MQTT 5 answers with a
    /// reason code; MQTT 3.1.1 has none, so the connection is closed.
    async fn deny_publish(
        &self,
        message: &Incoming,
        reason: AckReason,
        acks: &AckSender,
    ) -> Option<End> {
        let text = match &reason {
            AckReason::NotAuthorized(t) | AckReason::TooLarge(t) | AckReason::PayloadInvalid(t) => {
                t.clone()
            }
            AckReason::Success => String::new(),
        };
        self.shared.metrics.publishes_denied.inc();
        self.shared
            .auth
            .record_refusal(&self.principal.device_id, &format!("publish: {text}"));
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
        raw: Bytes,
        up: &mut OwnedWriteHalf,
        acks: &AckSender,
    ) -> Result<(), CodecError> {
        let Principal {
            role, device_id, ..
        } = &self.principal;
        let mut fates = Vec::new();
        let mut served_here = Vec::new();
        for filter in subscribe.filters() {
            match may_subscribe(*role, device_id, filter) {
                Ok(()) if is_platform_filter(filter) => {
                    fates.push(FilterFate::ServedHere);
                    served_here.push(filter.to_string());
                }
                Ok(()) => {
                    fates.push(FilterFate::Forwarded);
                    if can_receive_live(filter) {
                        self.live_readers += 1;
                        self.shared
                            .upstream
                            .live_readers
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(denied) => {
                    fates.push(FilterFate::Refused);
                    self.shared.metrics.subscribes_denied.inc();
                    self.shared
                        .auth
                        .record_refusal(device_id, &format!("subscribe: {}", denied.0));
                }
            }
        }
        if !served_here.is_empty() {
            let relay = self.relay.clone().expect("relay queue set before reading");
            let (topics, version) = (self.shared.platform.clone(), self.version);
            self.platform
                .get_or_insert_with(|| PlatformSubscriber::start(topics, version, relay))
                .subscribe(served_here);
        }
        let pkid = subscribe.pkid();
        let forwarded: Vec<bool> = fates.iter().map(|f| *f == FilterFate::Forwarded).collect();
        if forwarded.iter().all(|f| *f) {
            forward(up, &raw).await
        } else if !forwarded.contains(&true) {
            // MQTT lets retained messages arrive before the SUBACK.
            let _ = acks
                .send(ready(codec::suback_local(self.version, pkid, &fates)))
                .await;
            Ok(())
        } else {
            self.pending_subacks
                .lock()
                .expect("suback lock")
                .insert(pkid, fates);
            forward(up, &subscribe.retain_filters(&forwarded)).await
        }
    }

    /// A will on an ingest topic is a record like any other: it goes through
    /// the pipeline, not through the embedded broker.
    fn fire_ingest_will(&self, will: codec::Will) {
        let Some(Ok(topic)) = IngestTopic::parse(&will.topic) else {
            return;
        };
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
    }
}

struct Incoming {
    topic: String,
    qos: u8,
    pkid: u16,
    payload: Bytes,
    truncated_from: Option<usize>,
    /// The packet as received, for forwarding unchanged.
    raw: Option<Bytes>,
}

fn ack_reason(outcome: &IngestOutcome) -> AckReason {
    match (&outcome.first_reason, outcome.stored) {
        (Some(reason), 0) => AckReason::PayloadInvalid(reason.clone()),
        _ => AckReason::Success,
    }
}

/// Filters that may match `live/...` topics (for skipping live re-publishing
/// while nobody listens).
fn can_receive_live(filter: &str) -> bool {
    let inner = filter
        .strip_prefix("$share/")
        .and_then(|r| r.split_once('/'))
        .map_or(filter, |(_, f)| f);
    let first = inner.split('/').next().unwrap_or("");
    matches!(first, "live" | "+" | "#")
}

/// Writes to the embedded broker; a broker that stops reading ends the
/// session rather than hanging it.
async fn forward(up: &mut OwnedWriteHalf, bytes: &[u8]) -> Result<(), CodecError> {
    match tokio::time::timeout(WRITE_TIMEOUT, up.write_all(bytes)).await {
        Ok(result) => result.map_err(CodecError::Io),
        Err(_) => Err(CodecError::Io(std::io::ErrorKind::TimedOut.into())),
    }
}

/// Writes acknowledgements in arrival order (each once its commit is done)
/// and relayed packets as they come, coalescing whatever is ready into one
/// write.
async fn write_loop(
    client: ClientWrite,
    mut ack_queue: mpsc::Receiver<AckFuture>,
    mut relay_queue: mpsc::Receiver<Bytes>,
) {
    let mut client = BufWriter::with_capacity(64 * 1024, client);
    let mut pending: FuturesOrdered<AckFuture> = FuturesOrdered::new();
    let mut acks_open = true;
    let mut relay_open = true;
    let mut out = BytesMut::new();
    loop {
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
        while let Ok(bytes) = relay_queue.try_recv() {
            out.extend_from_slice(&bytes);
        }
        if !out.is_empty() {
            let write = async { client.write_all(&out).await.and(client.flush().await) };
            // A peer that stops reading (a zero TCP window) must not hold
            // this task and its buffers forever.
            if !matches!(tokio::time::timeout(WRITE_TIMEOUT, write).await, Ok(Ok(()))) {
                break;
            }
            out.clear();
        }
        if aborted {
            break;
        }
    }
    // Let the reader see at once that nobody writes to this device any more
    // (its sends fail, its permits return), then make a last, bounded attempt.
    drop((ack_queue, relay_queue, pending));
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        client.write_all(&out).await?;
        client.flush().await?;
        client.into_inner().shutdown().await
    })
    .await;
}

/// Adds an ack's bytes to `out`; false when the connection must close.
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

/// The embedded broker's packets for the device: relayed unchanged, except
/// SUBACKs for filtered SUBSCRIBEs (merged with the refused filters) and our
/// own keep-alive PINGRESPs.
async fn relay_upstream(
    mut reader: FrameReader<OwnedReadHalf>,
    version: Version,
    relay: mpsc::Sender<Bytes>,
    pending_subacks: PendingSubacks,
    handle: SessionHandle,
) {
    loop {
        let Ok(Frame::Whole(header, bytes)) = reader.next(version, usize::MAX, usize::MAX).await
        else {
            break;
        };
        let bytes = match header.packet_type() {
            codec::PINGRESP => continue,
            codec::SUBACK => match codec::suback_codes(version, &header, &bytes) {
                Ok((pkid, codes)) => {
                    match pending_subacks.lock().expect("suback lock").remove(&pkid) {
                        Some(fates) => codec::merge_suback(version, pkid, &fates, &codes),
                        None => bytes,
                    }
                }
                Err(_) => bytes,
            },
            _ => bytes,
        };
        let last = header.packet_type() == codec::DISCONNECT;
        if relay.send(bytes).await.is_err() || last {
            break;
        }
    }
    // The embedded broker ended the session (e.g. the same client id
    // connected again): end this connection too.
    handle.end(EndReason::TakenOver);
}

/// Ends the session when the token that opened it expires. Short-lived
/// tokens (those SDK handshakes hand out) thereby bound a connection's life;
/// the device reconnects with its renewed token.
async fn end_at_token_expiry(handle: SessionHandle, expires_at: i64) {
    loop {
        let left_ms = expires_at.saturating_mul(1000) - unix_now_ms();
        if left_ms <= 0 {
            handle.end(EndReason::TokenExpired);
            return;
        }
        // Sleeps are capped at a day: tokio's timer does not take years.
        tokio::time::sleep(Duration::from_millis(left_ms.min(86_400_000) as u64)).await;
    }
}
