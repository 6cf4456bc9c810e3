//! MQTT framing, and every packet the broker reads or writes.
//!
//! Client packets are parsed with rumqttc's `mqttbytes` (3.1.1 and 5).
//! Framing is our own, so that an oversized PUBLISH can be answered without
//! buffering it (its header is read, the rest skipped as it arrives), and so
//! is the encoding of what the broker sends most (PUBLISH, acknowledgements),
//! which writes straight into the connection's output buffer.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::session::{Properties, SubOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V4,
    V5,
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("connection closed by peer")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("packet of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocol(u8),
}

pub const CONNECT: u8 = 1;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const UNSUBSCRIBE: u8 = 10;
pub const UNSUBACK: u8 = 11;
pub const PINGREQ: u8 = 12;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;

#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub byte1: u8,
    /// Bytes of the fixed header (type byte + remaining length).
    pub len: usize,
    pub remaining: usize,
}

impl Header {
    pub fn packet_type(&self) -> u8 {
        self.byte1 >> 4
    }
    pub fn frame_len(&self) -> usize {
        self.len + self.remaining
    }
    fn v4(&self) -> rumqttc::mqttbytes::FixedHeader {
        rumqttc::mqttbytes::FixedHeader::new(self.byte1, self.len - 1, self.remaining)
    }
    fn v5(&self) -> v5::FixedHeader {
        v5::FixedHeader::new(self.byte1, self.len - 1, self.remaining)
    }
}

/// Parses a fixed header; `Ok(None)` means more bytes are needed.
fn parse_header(buf: &[u8]) -> Result<Option<Header>, CodecError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some(Header {
                byte1,
                len: 2 + i,
                remaining,
            }));
        }
    }
    Err(CodecError::Malformed(
        "remaining length longer than 4 bytes".into(),
    ))
}

pub enum Frame {
    /// A whole packet, fixed header included.
    Whole(Header, Bytes),
    /// A PUBLISH larger than the limit: its header fields and first payload
    /// bytes; the rest was read and dropped.
    OversizedPublish(OversizedPublish),
}

pub struct OversizedPublish {
    pub topic: String,
    pub qos: u8,
    pub pkid: u16,
    pub size: usize,
    pub head: Bytes,
}

pub struct FrameReader<R> {
    reader: R,
    buf: BytesMut,
    /// Bytes of an oversized PUBLISH still to be dropped. Kept here, not in
    /// a local, so that a `next` cancelled mid-skip resumes in step.
    skip: usize,
    /// The last read filled all the room there was.
    busy: bool,
}

/// How much of an oversized PUBLISH is kept: enough for any topic name.
const OVERSIZED_HEAD: usize = 70 * 1024;
/// Bytes read at a time. Small, because an idle device's connection keeps
/// its buffer: a fleet of them must cost little.
const READ_CHUNK: usize = 1024;
/// Bytes read at a time by a connection that keeps its buffer full.
const BUSY_READ_CHUNK: usize = 16 * 1024;
/// A buffer grown past this by a large packet is given back once empty.
const KEEP_CAPACITY: usize = 8 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(reader: R) -> Self {
        FrameReader {
            reader,
            buf: BytesMut::new(),
            skip: 0,
            busy: false,
        }
    }

    async fn fill(&mut self) -> Result<(), CodecError> {
        // A connection whose last read filled the buffer is busy: it reads
        // in large chunks (one syscall for many publishes). An idle one
        // keeps a small buffer, given back below once drained.
        let chunk = if self.busy {
            BUSY_READ_CHUNK
        } else {
            READ_CHUNK
        };
        if self.buf.capacity() - self.buf.len() < chunk / 2 {
            self.buf.reserve(chunk);
        }
        let spare = self.buf.capacity() - self.buf.len();
        match self.reader.read_buf(&mut self.buf).await? {
            0 => Err(CodecError::Closed),
            n => {
                self.busy = n == spare;
                Ok(())
            }
        }
    }

    /// Reads the next frame. PUBLISH packets over `max_publish` bytes come back
    /// as [`Frame::OversizedPublish`]; other packets over `max_other` are an error.
    pub async fn next(
        &mut self,
        version: Version,
        max_publish: usize,
        max_other: usize,
    ) -> Result<Frame, CodecError> {
        while self.skip > 0 {
            if self.buf.is_empty() {
                self.fill().await?;
            }
            let n = self.skip.min(self.buf.len());
            self.buf.advance(n);
            self.skip -= n;
        }
        let header = loop {
            if let Some(header) = parse_header(&self.buf)? {
                break header;
            }
            self.fill().await?;
        };
        let is_publish = header.packet_type() == PUBLISH;
        if is_publish && header.remaining > max_publish {
            return self
                .skip_oversized(version, header)
                .await
                .map(Frame::OversizedPublish);
        }
        if !is_publish && header.remaining > max_other {
            return Err(CodecError::TooLarge(header.frame_len()));
        }
        while self.buf.len() < header.frame_len() {
            self.buf.reserve(header.frame_len() - self.buf.len());
            self.fill().await?;
        }
        let frame = self.buf.split_to(header.frame_len()).freeze();
        if self.buf.is_empty() && !self.busy && self.buf.capacity() > KEEP_CAPACITY {
            self.buf = BytesMut::new();
        }
        Ok(Frame::Whole(header, frame))
    }

    async fn skip_oversized(
        &mut self,
        version: Version,
        header: Header,
    ) -> Result<OversizedPublish, CodecError> {
        let keep = header.frame_len().min(header.len + OVERSIZED_HEAD);
        while self.buf.len() < keep {
            self.fill().await?;
        }
        let head = self.buf.split_to(keep).freeze();
        // The rest is dropped as it arrives, by the next call to `next`.
        self.skip = header.frame_len() - keep;
        let qos = (header.byte1 >> 1) & 0b11;
        let mut rest = head.slice(header.len..);
        let topic = read_string(&mut rest)?;
        let pkid = if qos > 0 { read_u16(&mut rest)? } else { 0 };
        if version == Version::V5 {
            let properties = read_varint(&mut rest)?;
            if rest.len() < properties {
                return Err(CodecError::Malformed(
                    "publish properties exceed the packet".into(),
                ));
            }
            rest.advance(properties);
        }
        Ok(OversizedPublish {
            topic,
            qos,
            pkid,
            size: header.remaining,
            head: rest,
        })
    }
}

fn read_u16(buf: &mut Bytes) -> Result<u16, CodecError> {
    if buf.len() < 2 {
        return Err(CodecError::Malformed("truncated packet".into()));
    }
    Ok(buf.get_u16())
}

fn read_string(buf: &mut Bytes) -> Result<String, CodecError> {
    let len = read_u16(buf)? as usize;
    if buf.len() < len {
        return Err(CodecError::Malformed("truncated string".into()));
    }
    String::from_utf8(buf.split_to(len).to_vec())
        .map_err(|_| CodecError::Malformed("string is not UTF-8".into()))
}

fn read_varint(buf: &mut Bytes) -> Result<usize, CodecError> {
    let mut value = 0usize;
    for i in 0..4 {
        if buf.is_empty() {
            return Err(CodecError::Malformed("truncated length".into()));
        }
        let byte = buf.get_u8();
        value |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(CodecError::Malformed("length longer than 4 bytes".into()))
}

fn malformed(e: impl std::fmt::Debug) -> CodecError {
    CodecError::Malformed(format!("{e:?}"))
}

/// Reads the protocol level of a CONNECT frame without parsing the rest.
pub fn connect_version(header: &Header, frame: &Bytes) -> Result<Version, CodecError> {
    if header.packet_type() != CONNECT {
        return Err(CodecError::Malformed(
            "the first packet must be CONNECT".into(),
        ));
    }
    let mut rest = frame.slice(header.len..);
    let name = read_string(&mut rest)?;
    if rest.is_empty() {
        return Err(CodecError::Malformed("truncated CONNECT".into()));
    }
    match (name.as_str(), rest[0]) {
        ("MQTT", 4) => Ok(Version::V4),
        ("MQTT", 5) => Ok(Version::V5),
        (_, level) => Err(CodecError::UnsupportedProtocol(level)),
    }
}

/// A parsed CONNECT in either version.
// One per connection, alive only while it is admitted: size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Connect {
    V4(v4::Connect),
    V5(v5::Connect, Option<v5::LastWill>, Option<v5::Login>),
}

/// A CONNECT's will, in either version.
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 will delay interval, in seconds.
    pub delay_secs: u32,
    pub expiry_secs: Option<u32>,
    pub properties: Option<Properties>,
}

/// How many QoS 1/2 messages a 3.1.1 client may have unacknowledged at
/// once: 3.1.1 has no Receive Maximum, so the server picks, as Mosquitto's
/// `max_inflight_messages` does.
pub const V4_WINDOW: u16 = 100;

impl Connect {
    pub fn parse(version: Version, header: &Header, frame: Bytes) -> Result<Connect, CodecError> {
        match version {
            Version::V4 => v4::Connect::read(header.v4(), frame)
                .map(Connect::V4)
                .map_err(malformed),
            Version::V5 => v5::Connect::read(header.v5(), frame)
                .map(|(c, w, l)| Connect::V5(c, w, l))
                .map_err(malformed),
        }
    }

    pub fn client_id(&self) -> &str {
        match self {
            Connect::V4(c) => &c.client_id,
            Connect::V5(c, ..) => &c.client_id,
        }
    }

    /// (username, password)
    pub fn login(&self) -> Option<(&str, &str)> {
        match self {
            Connect::V4(c) => c
                .login
                .as_ref()
                .map(|l| (l.username.as_str(), l.password.as_str())),
            Connect::V5(_, _, l) => l
                .as_ref()
                .map(|l| (l.username.as_str(), l.password.as_str())),
        }
    }

    pub fn keep_alive(&self) -> u16 {
        match self {
            Connect::V4(c) => c.keep_alive,
            Connect::V5(c, ..) => c.keep_alive,
        }
    }

    /// Clean session (3.1.1) or clean start (5).
    pub fn clean_start(&self) -> bool {
        match self {
            Connect::V4(c) => c.clean_session,
            Connect::V5(c, ..) => c.clean_start,
        }
    }

    fn properties(&self) -> Option<&v5::ConnectProperties> {
        match self {
            Connect::V4(_) => None,
            Connect::V5(c, ..) => c.properties.as_ref(),
        }
    }

    /// Seconds the session should outlive the connection, as asked: MQTT 5's
    /// property (absent: 0); in 3.1.1 a session without clean session
    /// lasts until the server's maximum.
    pub fn session_expiry(&self, v4_persistent: u32) -> u32 {
        match self {
            Connect::V4(c) if c.clean_session => 0,
            Connect::V4(_) => v4_persistent,
            Connect::V5(..) => self
                .properties()
                .and_then(|p| p.session_expiry_interval)
                .unwrap_or(0),
        }
    }

    /// The client's Receive Maximum: QoS 1/2 messages it takes unacknowledged.
    pub fn receive_maximum(&self) -> u16 {
        match self {
            Connect::V4(_) => V4_WINDOW,
            Connect::V5(..) => self
                .properties()
                .and_then(|p| p.receive_maximum)
                .unwrap_or(u16::MAX),
        }
    }

    /// The largest packet the client takes, if it said.
    pub fn maximum_packet_size(&self) -> Option<u32> {
        self.properties().and_then(|p| p.max_packet_size)
    }

    /// Topic aliases the client accepts from the server.
    pub fn topic_alias_maximum(&self) -> u16 {
        self.properties()
            .and_then(|p| p.topic_alias_max)
            .unwrap_or(0)
    }

    /// Protocol errors MQTT 5 names for CONNECT properties.
    pub fn check(&self) -> Result<(), CodecError> {
        if let Some(p) = self.properties() {
            if p.receive_maximum == Some(0) {
                return Err(CodecError::Malformed("receive maximum of 0".into()));
            }
            if p.max_packet_size == Some(0) {
                return Err(CodecError::Malformed("maximum packet size of 0".into()));
            }
        }
        Ok(())
    }

    pub fn will(&self) -> Option<Will> {
        match self {
            Connect::V4(c) => c.last_will.as_ref().map(|w| Will {
                topic: w.topic.clone(),
                payload: w.message.clone(),
                qos: w.qos as u8,
                retain: w.retain,
                delay_secs: 0,
                expiry_secs: None,
                properties: None,
            }),
            Connect::V5(_, w, _) => w.as_ref().map(|w| {
                let p = w.properties.as_ref();
                let properties = p.map(|p| Properties {
                    payload_format: p.payload_format_indicator,
                    content_type: p.content_type.clone(),
                    response_topic: p.response_topic.clone(),
                    correlation_data: p.correlation_data.as_ref().map(|d| d.to_vec()),
                    user_properties: p.user_properties.clone(),
                });
                Will {
                    topic: String::from_utf8_lossy(&w.topic).into_owned(),
                    payload: w.message.clone(),
                    qos: w.qos as u8,
                    retain: w.retain,
                    delay_secs: p.and_then(|p| p.delay_interval).unwrap_or(0),
                    expiry_secs: p.and_then(|p| p.message_expiry_interval),
                    properties: properties.filter(|p| !p.is_empty()),
                }
            }),
        }
    }
}

/// Why a CONNECT was refused; each maps to a CONNACK code in both versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadCredentials,
    NotAuthorized,
    BadClientId,
    Banned,
    Unavailable,
    UnsupportedProtocol,
    /// MQTT 5 only (3.1.1 says "unavailable"): a malformed or disallowed CONNECT.
    ProtocolError,
}

pub fn connack_refusal(version: Version, refusal: Refusal) -> Bytes {
    let mut out = BytesMut::new();
    match version {
        Version::V4 => {
            let code = match refusal {
                Refusal::BadCredentials => v4::ConnectReturnCode::BadUserNamePassword,
                Refusal::NotAuthorized | Refusal::Banned => v4::ConnectReturnCode::NotAuthorized,
                Refusal::BadClientId => v4::ConnectReturnCode::BadClientId,
                Refusal::Unavailable | Refusal::ProtocolError => {
                    v4::ConnectReturnCode::ServiceUnavailable
                }
                Refusal::UnsupportedProtocol => v4::ConnectReturnCode::RefusedProtocolVersion,
            };
            v4::ConnAck::new(code, false)
                .write(&mut out)
                .expect("connack encodes");
        }
        Version::V5 => {
            let code = match refusal {
                Refusal::BadCredentials => v5::ConnectReturnCode::BadUserNamePassword,
                Refusal::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
                Refusal::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
                Refusal::Banned => v5::ConnectReturnCode::Banned,
                Refusal::Unavailable => v5::ConnectReturnCode::ServerUnavailable,
                Refusal::UnsupportedProtocol => v5::ConnectReturnCode::UnsupportedProtocolVersion,
                Refusal::ProtocolError => v5::ConnectReturnCode::ProtocolError,
            };
            v5::ConnAck {
                session_present: false,
                code,
                properties: None,
            }
            .write(&mut out)
            .expect("connack encodes");
        }
    }
    out.freeze()
}

/// What the server tells an MQTT 5 client in a successful CONNACK.
#[derive(Debug, Clone, Default)]
pub struct ServerLimits {
    pub receive_maximum: u16,
    pub maximum_packet_size: u32,
    pub topic_alias_maximum: u16,
    /// Set when the server shortens the client's session expiry.
    pub session_expiry: Option<u32>,
    /// Set when the server overrides the client's keep alive.
    pub keep_alive: Option<u16>,
}

pub fn connack_success(version: Version, session_present: bool, limits: &ServerLimits) -> Bytes {
    match version {
        Version::V4 => Bytes::from(vec![0x20, 2, session_present as u8, 0]),
        Version::V5 => {
            let mut out = BytesMut::new();
            v5::ConnAck {
                session_present,
                code: v5::ConnectReturnCode::Success,
                properties: Some(v5::ConnAckProperties {
                    session_expiry_interval: limits.session_expiry,
                    receive_max: Some(limits.receive_maximum),
                    max_qos: None,
                    retain_available: Some(1),
                    max_packet_size: Some(limits.maximum_packet_size),
                    assigned_client_identifier: None,
                    topic_alias_max: Some(limits.topic_alias_maximum),
                    reason_string: None,
                    user_properties: vec![],
                    wildcard_subscription_available: Some(1),
                    subscription_identifiers_available: Some(1),
                    shared_subscription_available: Some(1),
                    server_keep_alive: limits.keep_alive,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                }),
            }
            .write(&mut out)
            .expect("connack encodes");
            out.freeze()
        }
    }
}

/// A client's PUBLISH.
pub struct Publish {
    pub topic: String,
    pub qos: u8,
    pub pkid: u16,
    pub retain: bool,
    /// Set on a re-sent QoS 1/2 publish.
    pub dup: bool,
    pub payload: Bytes,
    /// MQTT 5 topic alias, when the publish set or used one.
    pub alias: Option<u16>,
    pub expiry_secs: Option<u32>,
    pub properties: Option<Properties>,
    /// A client must not send subscription identifiers (MQTT 3.3.4).
    pub has_subscription_ids: bool,
}

impl Publish {
    pub fn parse(version: Version, header: &Header, frame: Bytes) -> Result<Publish, CodecError> {
        match version {
            Version::V4 => {
                let p = v4::Publish::read(header.v4(), frame).map_err(malformed)?;
                Ok(Publish {
                    topic: p.topic,
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    retain: p.retain,
                    dup: p.dup,
                    payload: p.payload,
                    alias: None,
                    expiry_secs: None,
                    properties: None,
                    has_subscription_ids: false,
                })
            }
            Version::V5 => {
                let p = v5::Publish::read(header.v5(), frame).map_err(malformed)?;
                let topic = String::from_utf8(p.topic.to_vec())
                    .map_err(|_| CodecError::Malformed("topic is not UTF-8".into()))?;
                let props = p.properties.as_ref();
                let properties = props
                    .map(|p| Properties {
                        payload_format: p.payload_format_indicator,
                        content_type: p.content_type.clone(),
                        response_topic: p.response_topic.clone(),
                        correlation_data: p.correlation_data.as_ref().map(|d| d.to_vec()),
                        user_properties: p.user_properties.clone(),
                    })
                    .filter(|p| !p.is_empty());
                Ok(Publish {
                    topic,
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    retain: p.retain,
                    dup: p.dup,
                    alias: props.and_then(|p| p.topic_alias),
                    expiry_secs: props.and_then(|p| p.message_expiry_interval),
                    has_subscription_ids: props
                        .is_some_and(|p| !p.subscription_identifiers.is_empty()),
                    properties,
                    payload: p.payload,
                })
            }
        }
    }
}

/// A PUBLISH the broker sends.
pub struct Outgoing<'a> {
    /// Empty when `alias` names a topic the client already knows.
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: u8,
    pub pkid: u16,
    pub retain: bool,
    pub dup: bool,
    pub alias: Option<u16>,
    pub expiry_secs: Option<u32>,
    pub properties: Option<&'a Properties>,
    pub subscription_ids: &'a [u32],
}

impl Outgoing<'_> {
    /// Appends the encoded PUBLISH to `out`; returns its size.
    pub fn encode(&self, version: Version, out: &mut BytesMut) -> usize {
        let mut props = BytesMut::new();
        if version == Version::V5 {
            if let Some(p) = self.properties {
                if let Some(format) = p.payload_format {
                    props.put_u8(0x01);
                    props.put_u8(format);
                }
                if let Some(t) = &p.content_type {
                    props.put_u8(0x03);
                    put_str(&mut props, t.as_bytes());
                }
                if let Some(t) = &p.response_topic {
                    props.put_u8(0x08);
                    put_str(&mut props, t.as_bytes());
                }
                if let Some(d) = &p.correlation_data {
                    props.put_u8(0x09);
                    put_str(&mut props, d);
                }
                for (k, v) in &p.user_properties {
                    props.put_u8(0x26);
                    put_str(&mut props, k.as_bytes());
                    put_str(&mut props, v.as_bytes());
                }
            }
            if let Some(expiry) = self.expiry_secs {
                props.put_u8(0x02);
                props.put_u32(expiry);
            }
            if let Some(alias) = self.alias {
                props.put_u8(0x23);
                props.put_u16(alias);
            }
            for id in self.subscription_ids {
                props.put_u8(0x0B);
                put_remaining_length(&mut props, *id as usize);
            }
        }
        let mut remaining = 2 + self.topic.len() + self.payload.len();
        if self.qos > 0 {
            remaining += 2;
        }
        if version == Version::V5 {
            remaining += varint_len(props.len()) + props.len();
        }
        let start = out.len();
        out.reserve(5 + remaining);
        out.put_u8((PUBLISH << 4) | ((self.dup as u8) << 3) | (self.qos << 1) | self.retain as u8);
        put_remaining_length(out, remaining);
        put_str(out, self.topic.as_bytes());
        if self.qos > 0 {
            out.put_u16(self.pkid);
        }
        if version == Version::V5 {
            put_remaining_length(out, props.len());
            out.extend_from_slice(&props);
        }
        out.extend_from_slice(self.payload);
        out.len() - start
    }
}

fn put_str(out: &mut impl BufMut, bytes: &[u8]) {
    out.put_u16(bytes.len() as u16);
    out.put_slice(bytes);
}

fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// How a publish is answered: success, or a refusal with a reason (MQTT 5
/// carries both; MQTT 3.1.1 can only acknowledge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckReason {
    Success,
    NotAuthorized(String),
    PayloadInvalid(String),
    TooLarge(String),
    QuotaExceeded(String),
    TopicInvalid(String),
}

impl AckReason {
    fn code(&self) -> u8 {
        match self {
            AckReason::Success => 0x00,
            AckReason::NotAuthorized(_) => 0x87,
            AckReason::PayloadInvalid(_) => 0x99,
            AckReason::TooLarge(_) | AckReason::QuotaExceeded(_) => 0x97,
            AckReason::TopicInvalid(_) => 0x90,
        }
    }

    pub fn text(&self) -> &str {
        match self {
            AckReason::Success => "",
            AckReason::NotAuthorized(t)
            | AckReason::PayloadInvalid(t)
            | AckReason::TooLarge(t)
            | AckReason::QuotaExceeded(t)
            | AckReason::TopicInvalid(t) => t,
        }
    }
}

/// PUBACK (QoS 1) or PUBREC (QoS 2) for `pkid`.
pub fn publish_ack(version: Version, qos: u8, pkid: u16, reason: &AckReason) -> Bytes {
    let kind = if qos == 2 { PUBREC } else { PUBACK };
    match (version, reason) {
        (Version::V4, _) | (Version::V5, AckReason::Success) => ack(kind, pkid, None),
        (Version::V5, reason) => {
            let text: String = reason.text().chars().take(200).collect();
            let mut out = BytesMut::with_capacity(8 + text.len());
            let props = 3 + text.len();
            out.put_u8(kind << 4);
            put_remaining_length(&mut out, 3 + varint_len(props) + props);
            out.put_u16(pkid);
            out.put_u8(reason.code());
            put_remaining_length(&mut out, props);
            out.put_u8(0x1F);
            put_str(&mut out, text.as_bytes());
            out.freeze()
        }
    }
}

/// A PUBACK/PUBREC/PUBREL/PUBCOMP: the packet id, and a reason code when
/// it is not success (MQTT 5).
fn ack(kind: u8, pkid: u16, reason: Option<u8>) -> Bytes {
    // PUBREL's fixed header flags are 0010 (MQTT 3.6.1).
    let byte1 = (kind << 4) | if kind == PUBREL { 0b0010 } else { 0 };
    let [hi, lo] = pkid.to_be_bytes();
    match reason {
        None => Bytes::from(vec![byte1, 2, hi, lo]),
        Some(code) => Bytes::from(vec![byte1, 3, hi, lo, code]),
    }
}

/// PUBCOMP for `pkid`; MQTT 5 says "packet identifier not found" when the
/// exchange is unknown.
pub fn pubcomp(version: Version, pkid: u16, found: bool) -> Bytes {
    let reason = (version == Version::V5 && !found).then_some(0x92);
    ack(PUBCOMP, pkid, reason)
}

/// PUBREL for an outbound QoS 2 message.
pub fn pubrel(pkid: u16) -> Bytes {
    ack(PUBREL, pkid, None)
}

/// The packet id and reason code (0 when absent) of a PUBACK, PUBREC,
/// PUBREL or PUBCOMP.
pub fn ack_fields(header: &Header, frame: &Bytes) -> Result<(u16, u8), CodecError> {
    let expected_flags = if header.packet_type() == PUBREL {
        0b0010
    } else {
        0
    };
    if header.byte1 & 0x0f != expected_flags {
        return Err(CodecError::Malformed(
            "reserved flags are not as MQTT says".into(),
        ));
    }
    let mut rest = frame.slice(header.len..);
    let pkid = read_u16(&mut rest)?;
    if pkid == 0 {
        return Err(CodecError::Malformed("packet identifier 0".into()));
    }
    Ok((pkid, rest.first().copied().unwrap_or(0)))
}

pub fn pingresp() -> Bytes {
    Bytes::from_static(&[PINGRESP << 4, 0])
}

/// MQTT 5 DISCONNECT from the server with a reason code; nothing for 3.1.1,
/// where the server can only close the connection.
pub fn server_disconnect(version: Version, reason: v5::DisconnectReasonCode) -> Option<Bytes> {
    // Encoded by hand: rumqttc 0.25's `Disconnect::write` without properties
    // declares one byte of remaining length but writes two, which clients
    // (rumqttc's own reader included) reject as malformed.
    (version == Version::V5).then(|| Bytes::from(vec![DISCONNECT << 4, 2, reason as u8, 0]))
}

pub use v5::DisconnectReasonCode;

/// A client's DISCONNECT: its reason code and new session expiry (MQTT 5).
pub fn client_disconnect(
    version: Version,
    header: &Header,
    frame: Bytes,
) -> Result<(u8, Option<u32>), CodecError> {
    if version == Version::V4 || header.remaining == 0 {
        return Ok((0, None));
    }
    let d = v5::Disconnect::read(header.v5(), frame).map_err(malformed)?;
    Ok((
        d.reason_code as u8,
        d.properties.and_then(|p| p.session_expiry_interval),
    ))
}

/// One filter of a SUBSCRIBE with what it asked for.
pub struct Requested {
    pub filter: String,
    pub options: SubOptions,
}

/// A SUBSCRIBE in either version.
pub struct Subscribe {
    pub pkid: u16,
    pub filters: Vec<Requested>,
}

impl Subscribe {
    pub fn parse(version: Version, header: &Header, frame: Bytes) -> Result<Subscribe, CodecError> {
        match version {
            Version::V4 => {
                let s = v4::Subscribe::read(header.v4(), frame).map_err(malformed)?;
                Ok(Subscribe {
                    pkid: s.pkid,
                    filters: s
                        .filters
                        .into_iter()
                        .map(|f| Requested {
                            filter: f.path,
                            options: SubOptions {
                                qos: f.qos as u8,
                                ..Default::default()
                            },
                        })
                        .collect(),
                })
            }
            Version::V5 => {
                let s = v5::Subscribe::read(header.v5(), frame).map_err(malformed)?;
                let id = s.properties.as_ref().and_then(|p| p.id);
                if id == Some(0) {
                    return Err(CodecError::Malformed("subscription identifier 0".into()));
                }
                let id = id.map(|id| id as u32);
                Ok(Subscribe {
                    pkid: s.pkid,
                    filters: s
                        .filters
                        .into_iter()
                        .map(|f| Requested {
                            options: SubOptions {
                                qos: f.qos as u8,
                                no_local: f.nolocal,
                                retain_as_published: f.preserve_retain,
                                retain_handling: f.retain_forward_rule as u8,
                                id,
                            },
                            filter: f.path,
                        })
                        .collect(),
                })
            }
        }
    }
}

/// SUBACK with one return code per filter.
pub fn suback(version: Version, pkid: u16, codes: &[u8]) -> Bytes {
    acks_with_codes(SUBACK, version, pkid, codes)
}

/// UNSUBACK; 3.1.1's carries no codes.
pub fn unsuback(version: Version, pkid: u16, codes: &[u8]) -> Bytes {
    match version {
        Version::V4 => ack(UNSUBACK, pkid, None),
        Version::V5 => acks_with_codes(UNSUBACK, version, pkid, codes),
    }
}

fn acks_with_codes(kind: u8, version: Version, pkid: u16, codes: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    let properties = usize::from(version == Version::V5);
    out.put_u8(kind << 4);
    put_remaining_length(&mut out, 2 + properties + codes.len());
    out.put_u16(pkid);
    if version == Version::V5 {
        out.put_u8(0);
    }
    out.extend_from_slice(codes);
    out.freeze()
}

/// An UNSUBSCRIBE's packet id and filters.
pub fn unsubscribe_filters(
    version: Version,
    header: &Header,
    frame: Bytes,
) -> Result<(u16, Vec<String>), CodecError> {
    match version {
        Version::V4 => v4::Unsubscribe::read(header.v4(), frame)
            .map(|u| (u.pkid, u.topics))
            .map_err(malformed),
        Version::V5 => v5::Unsubscribe::read(header.v5(), frame)
            .map(|u| (u.pkid, u.filters))
            .map_err(malformed),
    }
}

/// A QoS 0 PUBLISH the gatekeeper itself sends (platform topics).
pub fn publish_qos0(version: Version, topic: &str, payload: Bytes, retain: bool) -> Bytes {
    let mut out = BytesMut::new();
    Outgoing {
        topic,
        payload: &payload,
        qos: 0,
        pkid: 0,
        retain,
        dup: false,
        alias: None,
        expiry_secs: None,
        properties: None,
        subscription_ids: &[],
    }
    .encode(version, &mut out);
    out.freeze()
}

/// Appends an MQTT variable-length integer (the remaining length).
pub fn put_remaining_length(out: &mut impl BufMut, mut value: usize) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reparse_v5(bytes: Bytes) -> v5::Publish {
        let header = parse_header(&bytes).unwrap().unwrap();
        assert_eq!(header.frame_len(), bytes.len(), "length as declared");
        v5::Publish::read(header.v5(), bytes).unwrap()
    }

    #[test]
    fn outgoing_publishes_read_back_with_every_property() {
        let properties = Properties {
            payload_format: Some(1),
            content_type: Some("application/json".into()),
            response_topic: Some("r/t".into()),
            correlation_data: Some(vec![1, 2, 3]),
            user_properties: vec![("k".into(), "v".into())],
        };
        let mut out = BytesMut::new();
        let size = Outgoing {
            topic: "a/b",
            payload: b"hello",
            qos: 2,
            pkid: 7,
            retain: true,
            dup: true,
            alias: Some(3),
            expiry_secs: Some(60),
            properties: Some(&properties),
            subscription_ids: &[5, 300],
        }
        .encode(Version::V5, &mut out);
        assert_eq!(size, out.len());
        let p = reparse_v5(out.freeze());
        assert_eq!((p.qos as u8, p.pkid, p.retain, p.dup), (2, 7, true, true));
        assert_eq!(&p.topic[..], b"a/b");
        assert_eq!(&p.payload[..], b"hello");
        let props = p.properties.unwrap();
        assert_eq!(props.subscription_identifiers, vec![5, 300]);
        assert_eq!(props.topic_alias, Some(3));
        assert_eq!(props.message_expiry_interval, Some(60));
        assert_eq!(
            props.user_properties,
            vec![("k".to_string(), "v".to_string())]
        );
        assert_eq!(props.correlation_data.as_deref(), Some(&[1u8, 2, 3][..]));
        assert_eq!(props.content_type.as_deref(), Some("application/json"));

        let bytes = publish_qos0(
            Version::V4,
            "$fleet/state/x",
            Bytes::from_static(b"{}"),
            true,
        );
        assert_eq!(bytes[0], 0x31, "PUBLISH, QoS 0, retain");
        let header = parse_header(&bytes).unwrap().unwrap();
        let p = v4::Publish::read(header.v4(), bytes).unwrap();
        assert_eq!(p.topic, "$fleet/state/x");
    }

    #[test]
    fn acknowledgements_are_well_formed() {
        assert_eq!(
            &suback(Version::V4, 7, &[1, 0x80])[..],
            &[0x90, 4, 0, 7, 1, 0x80]
        );
        assert_eq!(
            &suback(Version::V5, 7, &[0x87])[..],
            &[0x90, 4, 0, 7, 0, 0x87]
        );
        assert_eq!(&unsuback(Version::V4, 9, &[0, 0])[..], &[0xB0, 2, 0, 9]);
        assert_eq!(
            &unsuback(Version::V5, 9, &[0, 0x11])[..],
            &[0xB0, 5, 0, 9, 0, 0, 0x11]
        );
        assert_eq!(&pubrel(5)[..], &[0x62, 2, 0, 5]);
        assert_eq!(&pubcomp(Version::V5, 5, false)[..], &[0x70, 3, 0, 5, 0x92]);
        let nack = publish_ack(Version::V5, 1, 4, &AckReason::QuotaExceeded("full".into()));
        let header = parse_header(&nack).unwrap().unwrap();
        let parsed = v5::PubAck::read(header.v5(), nack).unwrap();
        assert_eq!(parsed.reason, v5::PubAckReason::QuotaExceeded);
        assert_eq!(
            parsed.properties.unwrap().reason_string.as_deref(),
            Some("full")
        );
        let connack = connack_success(
            Version::V5,
            true,
            &ServerLimits {
                receive_maximum: 10,
                maximum_packet_size: 1000,
                topic_alias_maximum: 5,
                session_expiry: None,
                keep_alive: Some(60),
            },
        );
        let header = parse_header(&connack).unwrap().unwrap();
        let parsed = v5::ConnAck::read(header.v5(), connack).unwrap();
        assert!(parsed.session_present);
        let props = parsed.properties.unwrap();
        assert_eq!(props.receive_max, Some(10));
        assert_eq!(props.server_keep_alive, Some(60));
    }

    #[test]
    fn server_disconnect_is_well_formed_mqtt5() {
        let bytes = server_disconnect(Version::V5, DisconnectReasonCode::NotAuthorized).unwrap();
        let header = parse_header(&bytes).unwrap().unwrap();
        assert_eq!(header.frame_len(), bytes.len());
        let parsed = v5::Disconnect::read(header.v5(), bytes).unwrap();
        assert_eq!(parsed.reason_code, DisconnectReasonCode::NotAuthorized);
        assert!(server_disconnect(Version::V4, DisconnectReasonCode::NotAuthorized).is_none());
    }

    #[test]
    fn headers_need_all_length_bytes() {
        assert!(parse_header(&[0x30]).unwrap().is_none());
        assert!(parse_header(&[0x30, 0x80]).unwrap().is_none());
        let h = parse_header(&[0x30, 0x80, 0x01]).unwrap().unwrap();
        assert_eq!((h.len, h.remaining), (3, 128));
        assert!(parse_header(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
    }
}
