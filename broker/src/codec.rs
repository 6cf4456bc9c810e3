//! MQTT framing and the few packets the gatekeeper reads or writes itself.
//!
//! Packets are parsed with rumqttc's `mqttbytes` (3.1.1 and 5). Framing is
//! our own so that an oversized PUBLISH can be answered without buffering
//! it: its header is read, the rest of it is skipped as it arrives.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncRead, AsyncReadExt};

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
pub const PUBREL: u8 = 6;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const UNSUBSCRIBE: u8 = 10;
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
}

/// How much of an oversized PUBLISH is kept: enough for any topic name.
const OVERSIZED_HEAD: usize = 70 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(reader: R) -> Self {
        FrameReader {
            reader,
            buf: BytesMut::with_capacity(16 * 1024),
            skip: 0,
        }
    }

    async fn fill(&mut self) -> Result<(), CodecError> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        match self.reader.read_buf(&mut self.buf).await? {
            0 => Err(CodecError::Closed),
            _ => Ok(()),
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
        Ok(Frame::Whole(
            header,
            self.buf.split_to(header.frame_len()).freeze(),
        ))
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

pub struct Will {
    pub topic: String,
    pub payload: Bytes,
}

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

    pub fn will(&self) -> Option<Will> {
        match self {
            Connect::V4(c) => c.last_will.as_ref().map(|w| Will {
                topic: w.topic.clone(),
                payload: w.message.clone(),
            }),
            Connect::V5(_, w, _) => w.as_ref().map(|w| Will {
                topic: String::from_utf8_lossy(&w.topic).into_owned(),
                payload: w.message.clone(),
            }),
        }
    }

    /// The CONNECT the gatekeeper sends to the embedded broker: the device's
    /// own, under `client_id` (unique per connection), with a clean session,
    /// the internal password, a long keep-alive (the gatekeeper keeps the
    /// device to its own keep-alive), and without a will the gatekeeper
    /// handles itself.
    pub fn upstream(
        &self,
        client_id: &str,
        secret: &str,
        keep_will: bool,
    ) -> Result<Bytes, CodecError> {
        const UPSTREAM_KEEP_ALIVE: u16 = u16::MAX;
        let mut out = BytesMut::new();
        match self {
            Connect::V4(c) => {
                let mut c = c.clone();
                c.client_id = client_id.to_string();
                c.clean_session = true;
                c.keep_alive = UPSTREAM_KEEP_ALIVE;
                c.login = Some(v4::Login {
                    username: c.client_id.clone(),
                    password: secret.to_string(),
                });
                if !keep_will {
                    c.last_will = None;
                }
                c.write(&mut out).map_err(malformed)?;
            }
            Connect::V5(c, will, _) => {
                let mut c = c.clone();
                c.client_id = client_id.to_string();
                c.clean_start = true;
                c.keep_alive = UPSTREAM_KEEP_ALIVE;
                let login = Some(v5::Login {
                    username: c.client_id.clone(),
                    password: secret.to_string(),
                });
                let will = if keep_will { will.clone() } else { None };
                c.write(&will, &login, &mut out).map_err(malformed)?;
            }
        }
        Ok(out.freeze())
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
}

pub fn connack_refusal(version: Version, refusal: Refusal) -> Bytes {
    let mut out = BytesMut::new();
    match version {
        Version::V4 => {
            let code = match refusal {
                Refusal::BadCredentials => v4::ConnectReturnCode::BadUserNamePassword,
                Refusal::NotAuthorized | Refusal::Banned => v4::ConnectReturnCode::NotAuthorized,
                Refusal::BadClientId => v4::ConnectReturnCode::BadClientId,
                Refusal::Unavailable => v4::ConnectReturnCode::ServiceUnavailable,
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

/// A PUBLISH as the gatekeeper needs to see it.
pub struct Publish {
    pub topic: String,
    pub qos: u8,
    pub pkid: u16,
    pub payload: Bytes,
    /// MQTT 5 topic alias, when the publish set or used one.
    pub alias: Option<u16>,
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
                    payload: p.payload,
                    alias: None,
                })
            }
            Version::V5 => {
                let p = v5::Publish::read(header.v5(), frame).map_err(malformed)?;
                let topic = String::from_utf8(p.topic.to_vec())
                    .map_err(|_| CodecError::Malformed("topic is not UTF-8".into()))?;
                let alias = p.properties.as_ref().and_then(|props| props.topic_alias);
                Ok(Publish {
                    topic,
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    payload: p.payload,
                    alias,
                })
            }
        }
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
}

/// PUBACK (QoS 1) or PUBREC (QoS 2) for `pkid`.
pub fn publish_ack(version: Version, qos: u8, pkid: u16, reason: &AckReason) -> Bytes {
    let mut out = BytesMut::with_capacity(8);
    match version {
        Version::V4 if qos == 2 => v4::PubRec::new(pkid)
            .write(&mut out)
            .map(drop)
            .map_err(malformed),
        Version::V4 => v4::PubAck::new(pkid)
            .write(&mut out)
            .map(drop)
            .map_err(malformed),
        Version::V5 => {
            let (code, text) = match reason {
                AckReason::Success => (0x00, None),
                AckReason::NotAuthorized(t) => (0x87, Some(t)),
                AckReason::PayloadInvalid(t) => (0x99, Some(t)),
                AckReason::TooLarge(t) => (0x97, Some(t)),
            };
            let reason_string = text.map(|t| t.chars().take(200).collect::<String>());
            if qos == 2 {
                let mut ack = v5::PubRec::new(
                    pkid,
                    reason_string.map(|r| v5::PubRecProperties {
                        reason_string: Some(r),
                        user_properties: vec![],
                    }),
                );
                ack.reason = match code {
                    0x87 => v5::PubRecReason::NotAuthorized,
                    0x99 => v5::PubRecReason::PayloadFormatInvalid,
                    0x97 => v5::PubRecReason::QuotaExceeded,
                    _ => v5::PubRecReason::Success,
                };
                ack.write(&mut out).map(drop).map_err(malformed)
            } else {
                let mut ack = v5::PubAck::new(
                    pkid,
                    reason_string.map(|r| v5::PubAckProperties {
                        reason_string: Some(r),
                        user_properties: vec![],
                    }),
                );
                ack.reason = match code {
                    0x87 => v5::PubAckReason::NotAuthorized,
                    0x99 => v5::PubAckReason::PayloadFormatInvalid,
                    0x97 => v5::PubAckReason::QuotaExceeded,
                    _ => v5::PubAckReason::Success,
                };
                ack.write(&mut out).map(drop).map_err(malformed)
            }
        }
    }
    .expect("ack encodes");
    out.freeze()
}

/// PUBCOMP for `pkid`; MQTT 5 says "packet identifier not found" when the
/// exchange is unknown.
pub fn pubcomp(version: Version, pkid: u16, found: bool) -> Bytes {
    let mut out = BytesMut::with_capacity(8);
    match version {
        Version::V4 => v4::PubComp::new(pkid)
            .write(&mut out)
            .map(drop)
            .map_err(malformed),
        Version::V5 => {
            let mut comp = v5::PubComp::new(pkid, None);
            if !found {
                comp.reason = v5::PubCompReason::PacketIdentifierNotFound;
            }
            comp.write(&mut out).map(drop).map_err(malformed)
        }
    }
    .expect("pubcomp encodes");
    out.freeze()
}

pub fn pubrel_pkid(version: Version, header: &Header, frame: Bytes) -> Result<u16, CodecError> {
    match version {
        Version::V4 => v4::PubRel::read(header.v4(), frame)
            .map(|p| p.pkid)
            .map_err(malformed),
        Version::V5 => v5::PubRel::read(header.v5(), frame)
            .map(|p| p.pkid)
            .map_err(malformed),
    }
}

pub fn pingresp() -> Bytes {
    Bytes::from_static(&[PINGRESP << 4, 0])
}

pub fn pingreq() -> Bytes {
    Bytes::from_static(&[PINGREQ << 4, 0])
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

/// A SUBSCRIBE in either version.
pub enum Subscribe {
    V4(v4::Subscribe),
    V5(v5::Subscribe),
}

impl Subscribe {
    pub fn parse(version: Version, header: &Header, frame: Bytes) -> Result<Subscribe, CodecError> {
        match version {
            Version::V4 => v4::Subscribe::read(header.v4(), frame)
                .map(Subscribe::V4)
                .map_err(malformed),
            Version::V5 => v5::Subscribe::read(header.v5(), frame)
                .map(Subscribe::V5)
                .map_err(malformed),
        }
    }

    pub fn pkid(&self) -> u16 {
        match self {
            Subscribe::V4(s) => s.pkid,
            Subscribe::V5(s) => s.pkid,
        }
    }

    pub fn filters(&self) -> Vec<&str> {
        match self {
            Subscribe::V4(s) => s.filters.iter().map(|f| f.path.as_str()).collect(),
            Subscribe::V5(s) => s.filters.iter().map(|f| f.path.as_str()).collect(),
        }
    }

    /// The same SUBSCRIBE with only the filters where `keep` is true.
    pub fn retain_filters(self, keep: &[bool]) -> Bytes {
        let mut out = BytesMut::new();
        let mut k = keep.iter();
        match self {
            Subscribe::V4(mut s) => {
                s.filters.retain(|_| *k.next().unwrap_or(&false));
                s.write(&mut out).map(drop).map_err(malformed)
            }
            Subscribe::V5(mut s) => {
                s.filters.retain(|_| *k.next().unwrap_or(&false));
                s.write(&mut out).map(drop).map_err(malformed)
            }
        }
        .expect("subscribe encodes");
        out.freeze()
    }
}

/// What became of one filter of a SUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterFate {
    /// Passed to the embedded broker, which grants it.
    Forwarded,
    /// Refused by role.
    Refused,
    /// A platform topic the gatekeeper serves itself, granted at QoS 0.
    ServedHere,
}

/// A SUBACK for filters none of which went to the embedded broker.
pub fn suback_local(version: Version, pkid: u16, fates: &[FilterFate]) -> Bytes {
    merge_suback(version, pkid, fates, &[])
}

/// Builds the SUBACK the device expects from the one the embedded broker
/// sent for the forwarded filters only; forwarded filters take their codes
/// from `upstream`, in order.
pub fn merge_suback(version: Version, pkid: u16, fates: &[FilterFate], upstream: &[u8]) -> Bytes {
    let mut codes = upstream.iter();
    let mut out = BytesMut::new();
    // Failure codes: 0x80 in 3.1.1, 0x87 (not authorized) in 5.
    let refused = if version == Version::V4 { 0x80 } else { 0x87 };
    let merged: Vec<u8> = fates
        .iter()
        .map(|fate| match fate {
            FilterFate::Forwarded => *codes.next().unwrap_or(&0x80),
            FilterFate::Refused => refused,
            FilterFate::ServedHere => 0,
        })
        .collect();
    let properties = if version == Version::V5 { 1 } else { 0 };
    out.put_u8(SUBACK << 4);
    put_remaining_length(&mut out, 2 + properties + merged.len());
    out.put_u16(pkid);
    if version == Version::V5 {
        out.put_u8(0);
    }
    out.extend_from_slice(&merged);
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

/// An UNSUBACK reporting success for `count` filters.
pub fn unsuback(version: Version, pkid: u16, count: usize) -> Bytes {
    let mut out = BytesMut::new();
    match version {
        Version::V4 => v4::UnsubAck::new(pkid)
            .write(&mut out)
            .map(drop)
            .map_err(malformed),
        Version::V5 => v5::UnsubAck {
            pkid,
            reasons: vec![v5::UnsubAckReason::Success; count],
            properties: None,
        }
        .write(&mut out)
        .map(drop)
        .map_err(malformed),
    }
    .expect("unsuback encodes");
    out.freeze()
}

/// A QoS 0 PUBLISH the gatekeeper itself sends (platform topics).
pub fn publish_qos0(version: Version, topic: &str, payload: Bytes, retain: bool) -> Bytes {
    let mut out = BytesMut::new();
    match version {
        Version::V4 => {
            let mut publish =
                v4::Publish::new(topic, rumqttc::mqttbytes::QoS::AtMostOnce, payload.to_vec());
            publish.retain = retain;
            publish.write(&mut out).map(drop).map_err(malformed)
        }
        Version::V5 => {
            let mut publish = v5::Publish::new(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                payload,
                None,
            );
            publish.retain = retain;
            publish.write(&mut out).map(drop).map_err(malformed)
        }
    }
    .expect("publish encodes");
    out.freeze()
}

/// The packet id and raw return codes of a SUBACK from the embedded broker.
pub fn suback_codes(
    version: Version,
    header: &Header,
    frame: &Bytes,
) -> Result<(u16, Vec<u8>), CodecError> {
    let mut rest = frame.slice(header.len..);
    let pkid = read_u16(&mut rest)?;
    if version == Version::V5 {
        let properties = read_varint(&mut rest)?;
        if rest.len() < properties {
            return Err(CodecError::Malformed(
                "suback properties exceed the packet".into(),
            ));
        }
        rest.advance(properties);
    }
    Ok((pkid, rest.to_vec()))
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

    #[test]
    fn merged_suback_keeps_filter_order() {
        use FilterFate::*;
        let bytes = merge_suback(
            Version::V4,
            7,
            &[Forwarded, Refused, ServedHere, Forwarded],
            &[0x01, 0x00],
        );
        assert_eq!(&bytes[..], &[0x90, 6, 0, 7, 0x01, 0x80, 0x00, 0x00]);
        let bytes = suback_local(Version::V5, 7, &[Refused]);
        assert_eq!(&bytes[..], &[0x90, 4, 0, 7, 0, 0x87]);
    }

    #[test]
    fn platform_publishes_and_unsubacks_read_back() {
        let bytes = publish_qos0(
            Version::V5,
            "$fleet/state/x",
            Bytes::from_static(b"{}"),
            true,
        );
        assert_eq!(bytes[0], 0x31, "PUBLISH, QoS 0, retain");
        let bytes = publish_qos0(
            Version::V4,
            "$fleet/state/x",
            Bytes::from_static(b"{}"),
            false,
        );
        assert_eq!(bytes[0], 0x30);
        assert_eq!(&unsuback(Version::V4, 9, 2)[..], &[0xB0, 2, 0, 9]);
        assert_eq!(&unsuback(Version::V5, 9, 2)[..], &[0xB0, 5, 0, 9, 0, 0, 0]);
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
