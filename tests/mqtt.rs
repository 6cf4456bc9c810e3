//! What the MQTT 3.1.1 and 5 specifications say a server must do, checked
//! with clients written by others (rumqttc, mosquitto_pub and mosquitto_sub)
//! and, where an exact byte-level assertion is needed, a raw socket.
//!
//! Publishers are `admin` devices on `t/...` or `devices/<id>/...` topics:
//! `ingest/...` goes to the data store, not to subscribers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnectReturnCode, Filter, LastWill, LastWillProperties, Packet, PubAckReason,
    PubRecReason, Publish, PublishProperties, RetainForwardRule, SubscribeProperties,
    SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::MqttOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::harness::{
    connect_v4_with, connect_v5, connect_v5_with, mosquitto_available, publish_acked,
    put_remaining_length, raw_mqtt311, v4_options, v5_options, Backend, Server, V5, WAIT,
};

/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------
// Server

/// Stops the server with Ctrl-C and starts it again on the same data
/// directory. It listens on new ports afterwards (`server.mqtt` is updated).
fn restart(server: &mut Server) {
    assert!(server.interrupt().success(), "fleetgate stops cleanly");
    server.restart();
}

// ---------------------------------------------------------------------------
// MQTT 5 with rumqttc

/// Options of a session that outlives its connection by an hour.
fn persistent_v5(server: &Server, id: &str, token: &str) -> MqttOptions {
    let mut options = v5_options(server, id, token);
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(3600));
    options
}

async fn open_v5(options: MqttOptions) -> (V5, ConnAck) {
    let id = options.client_id();
    connect_v5_with(options)
        .await
        .unwrap_or_else(|code| panic!("{id}: CONNACK refused with {code:?}"))
}

/// Subscribes to `filters` in one SUBSCRIBE; returns the SUBACK's codes.
async fn subscribe_filters(
    client: &mut V5,
    filters: Vec<Filter>,
    id: Option<usize>,
) -> Vec<SubscribeReasonCode> {
    match id {
        Some(id) => {
            let properties = SubscribeProperties {
                id: Some(id),
                user_properties: Vec::new(),
            };
            client
                .client
                .subscribe_many_with_properties(filters, properties)
                .await
        }
        None => client.client.subscribe_many(filters).await,
    }
    .unwrap();
    let mut early = Vec::new();
    let codes = client
        .expect(|p| match p {
            Packet::SubAck(ack) => Some(ack.return_codes.clone()),
            Packet::Publish(_) => {
                early.push(p.clone());
                None
            }
            _ => None,
        })
        .await;
    requeue(&mut client.events, early);
    codes
}

/// Puts `packets` back ahead of the events still to come. A server may send
/// a subscription's retained messages before its SUBACK.
fn requeue<P: Send + 'static>(
    events: &mut mpsc::UnboundedReceiver<Result<P, String>>,
    packets: Vec<P>,
) {
    if packets.is_empty() {
        return;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    for packet in packets {
        tx.send(Ok(packet)).unwrap();
    }
    let mut rest = std::mem::replace(events, rx);
    tokio::spawn(async move {
        while let Some(event) = rest.recv().await {
            if tx.send(event).is_err() {
                break;
            }
        }
    });
}

/// Subscribes to one filter and asserts the server granted `qos`.
async fn subscribe(client: &mut V5, filter: &str, qos: QoS) {
    let codes = subscribe_filters(client, vec![Filter::new(filter, qos)], None).await;
    assert_eq!(
        codes,
        [SubscribeReasonCode::Success(qos)],
        "SUBACK for {filter}"
    );
}

fn filter(path: &str, qos: QoS) -> Filter {
    Filter::new(path, qos)
}

/// Publishes and waits for the end of its flow: nothing (QoS 0), PUBACK
/// (QoS 1), or PUBREC then PUBCOMP (QoS 2), asserting success. Returns
/// false when the server answered "no matching subscribers".
async fn publish_v5(
    client: &mut V5,
    topic: &str,
    qos: QoS,
    retain: bool,
    payload: impl Into<Bytes>,
    properties: Option<PublishProperties>,
) -> bool {
    let payload: Bytes = payload.into();
    match properties {
        Some(properties) => {
            client
                .client
                .publish_with_properties(topic, qos, retain, payload, properties)
                .await
        }
        None => client.client.publish(topic, qos, retain, payload).await,
    }
    .unwrap();
    match qos {
        QoS::AtMostOnce => true,
        QoS::AtLeastOnce => {
            let reason = client.puback_reason().await;
            assert!(
                matches!(
                    reason,
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                ),
                "PUBACK for {topic}: {reason:?}"
            );
            reason == PubAckReason::Success
        }
        QoS::ExactlyOnce => {
            let first = client
                .expect(|p| match p {
                    Packet::PubRec(rec) => Some(Ok(rec.reason)),
                    Packet::PubComp(_) => Some(Err("PUBCOMP before PUBREC")),
                    _ => None,
                })
                .await;
            let reason = first.unwrap_or_else(|e| panic!("{topic}: {e}"));
            assert!(
                matches!(
                    reason,
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                ),
                "PUBREC for {topic}: {reason:?}"
            );
            let matched = reason == PubRecReason::Success;
            client
                .expect(|p| match p {
                    Packet::PubComp(_) => Some(()),
                    _ => None,
                })
                .await;
            matched
        }
    }
}

/// Publishes without retain or properties, as `publish_v5`.
async fn send(client: &mut V5, topic: &str, qos: QoS, payload: impl Into<Bytes>) -> bool {
    publish_v5(client, topic, qos, false, payload, None).await
}

/// Publishes a retained message without properties, as `publish_v5`.
async fn retain(client: &mut V5, topic: &str, qos: QoS, payload: impl Into<Bytes>) -> bool {
    publish_v5(client, topic, qos, true, payload, None).await
}

fn expiring(seconds: u32) -> PublishProperties {
    PublishProperties {
        message_expiry_interval: Some(seconds),
        ..Default::default()
    }
}

fn aliased(alias: u16) -> PublishProperties {
    PublishProperties {
        topic_alias: Some(alias),
        ..Default::default()
    }
}

async fn next_publish(client: &mut V5) -> Publish {
    client
        .expect(|p| match p {
            Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
}

fn topic_of(publish: &Publish) -> String {
    String::from_utf8_lossy(&publish.topic).into_owned()
}

fn text(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

/// Sends DISCONNECT and waits until the server closed the connection, so
/// that what the test does next happens while the client is offline.
async fn disconnect_v5(mut client: V5) {
    client.client.disconnect().await.unwrap();
    closed(&mut client.events).await;
}

async fn closed<T>(events: &mut mpsc::UnboundedReceiver<Result<T, String>>) {
    loop {
        match tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("connection closed in time after DISCONNECT")
        {
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return,
        }
    }
}

// ---------------------------------------------------------------------------
// MQTT 3.1.1 with rumqttc

/// An MQTT 3.1.1 client whose incoming packets arrive on a channel.
struct V4 {
    client: rumqttc::AsyncClient,
    events: mpsc::UnboundedReceiver<Result<rumqttc::Packet, String>>,
}

impl V4 {
    /// Connects; returns the client and the CONNACK's session present flag.
    async fn connect(server: &Server, id: &str, token: &str, clean_session: bool) -> (V4, bool) {
        let mut options = v4_options(server, id, token);
        options.set_clean_session(clean_session);
        let (client, mut eventloop, connack) = connect_v4_with(options)
            .await
            .unwrap_or_else(|code| panic!("{id}: CONNACK refused with {code:?}"));
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(packet)) => {
                        if tx.send(Ok(packet)).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:?}")));
                        break;
                    }
                }
            }
        });
        (V4 { client, events }, connack.session_present)
    }

    async fn expect<T>(&mut self, mut pick: impl FnMut(&rumqttc::Packet) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("expected packet in time")
            {
                Some(Ok(packet)) => {
                    if let Some(found) = pick(&packet) {
                        return found;
                    }
                }
                Some(Err(e)) => panic!("connection ended while waiting: {e}"),
                None => panic!("connection ended while waiting"),
            }
        }
    }

    async fn next_publish(&mut self) -> rumqttc::Publish {
        self.expect(|p| match p {
            rumqttc::Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    async fn assert_silent(&mut self, quiet: Duration, what: &str) {
        let deadline = tokio::time::Instant::now() + quiet;
        while let Ok(event) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            match event {
                Some(Ok(rumqttc::Packet::Publish(p))) => {
                    panic!(
                        "{what}: unexpectedly received {:?} on {}",
                        p.payload, p.topic
                    )
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    }

    /// Subscribes to `filters` in one SUBSCRIBE and asserts each was granted
    /// the QoS asked for.
    async fn subscribe(&mut self, filters: &[(&str, rumqttc::QoS)]) {
        let wanted: Vec<_> = filters
            .iter()
            .map(|(path, qos)| rumqttc::SubscribeFilter::new(path.to_string(), *qos))
            .collect();
        self.client.subscribe_many(wanted).await.unwrap();
        let mut early = Vec::new();
        let codes = self
            .expect(|p| match p {
                rumqttc::Packet::SubAck(ack) => Some(ack.return_codes.clone()),
                rumqttc::Packet::Publish(_) => {
                    early.push(p.clone());
                    None
                }
                _ => None,
            })
            .await;
        requeue(&mut self.events, early);
        let granted: Vec<_> = filters
            .iter()
            .map(|(_, qos)| rumqttc::SubscribeReasonCode::Success(*qos))
            .collect();
        assert_eq!(codes, granted, "SUBACK for {filters:?}");
    }

    /// Publishes and waits for PUBACK (QoS 1) or PUBREC then PUBCOMP (QoS 2).
    async fn publish(&mut self, topic: &str, qos: rumqttc::QoS, retain: bool, payload: &str) {
        self.client
            .publish(topic, qos, retain, payload.as_bytes().to_vec())
            .await
            .unwrap();
        match qos {
            rumqttc::QoS::AtMostOnce => {}
            rumqttc::QoS::AtLeastOnce => {
                self.expect(|p| matches!(p, rumqttc::Packet::PubAck(_)).then_some(()))
                    .await
            }
            rumqttc::QoS::ExactlyOnce => {
                let first = self
                    .expect(|p| match p {
                        rumqttc::Packet::PubRec(_) => Some(true),
                        rumqttc::Packet::PubComp(_) => Some(false),
                        _ => None,
                    })
                    .await;
                assert!(first, "{topic}: PUBREC comes before PUBCOMP");
                self.expect(|p| matches!(p, rumqttc::Packet::PubComp(_)).then_some(()))
                    .await
            }
        }
    }

    async fn disconnect(mut self) {
        self.client.disconnect().await.unwrap();
        closed(&mut self.events).await;
    }
}

// ---------------------------------------------------------------------------
// Raw sockets, for exact assertions on what the server sends

const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBACK: u8 = 9;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;

/// One packet off the wire.
#[derive(Debug)]
struct Frame {
    first: u8,
    body: Vec<u8>,
}

impl Frame {
    fn kind(&self) -> u8 {
        self.first >> 4
    }

    /// Its size on the wire: what Maximum Packet Size counts.
    fn size(&self) -> usize {
        let mut header = Vec::new();
        put_remaining_length(&mut header, self.body.len());
        1 + header.len() + self.body.len()
    }
}

/// A complete frame at the start of `buffer`, and how many bytes it takes.
fn split_frame(buffer: &[u8]) -> Option<(Frame, usize)> {
    let mut length = 0usize;
    let mut at = 1;
    loop {
        let byte = *buffer.get(at)?;
        length += ((byte & 0x7f) as usize) << (7 * (at - 1));
        at += 1;
        if byte & 0x80 == 0 {
            break;
        }
        assert!(at <= 4, "remaining length longer than 4 bytes");
    }
    let body = buffer.get(at..at + length)?.to_vec();
    Some((
        Frame {
            first: buffer[0],
            body,
        },
        at + length,
    ))
}

enum Read {
    Packet(Frame),
    Closed,
    Quiet,
}

/// A PUBLISH as the server sent it.
#[derive(Debug)]
struct RawPublish {
    qos: u8,
    topic: String,
    pkid: u16,
    payload: Vec<u8>,
    size: usize,
}

impl RawPublish {
    fn parse(frame: &Frame, v5: bool) -> RawPublish {
        let body = &frame.body;
        let qos = (frame.first >> 1) & 0x03;
        let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
        let topic = String::from_utf8(body[2..2 + topic_len].to_vec()).expect("UTF-8 topic");
        let mut at = 2 + topic_len;
        let mut pkid = 0;
        if qos > 0 {
            pkid = u16::from_be_bytes([body[at], body[at + 1]]);
            at += 2;
        }
        if v5 {
            let (length, used) = varint(&body[at..]);
            at += used + length as usize;
        }
        RawPublish {
            qos,
            topic,
            pkid,
            payload: body[at..].to_vec(),
            size: frame.size(),
        }
    }
}

fn varint(bytes: &[u8]) -> (u32, usize) {
    let mut value = 0u32;
    for (i, byte) in bytes.iter().enumerate().take(4) {
        value |= ((byte & 0x7f) as u32) << (7 * i);
        if byte & 0x80 == 0 {
            return (value, i + 1);
        }
    }
    panic!("malformed variable byte integer");
}

/// An MQTT 5 CONNECT with the properties a test needs (clean start,
/// 60 s keep-alive, username = client id).
struct Connect5 {
    id: String,
    token: String,
    properties: Vec<u8>,
}

impl Connect5 {
    fn new(id: &str, token: &str) -> Connect5 {
        Connect5 {
            id: id.to_string(),
            token: token.to_string(),
            properties: Vec::new(),
        }
    }

    fn receive_maximum(mut self, n: u16) -> Connect5 {
        self.properties.push(0x21);
        self.properties.extend(n.to_be_bytes());
        self
    }

    fn maximum_packet_size(mut self, n: u32) -> Connect5 {
        self.properties.push(0x27);
        self.properties.extend(n.to_be_bytes());
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0xc2, 0x00, 0x3c];
        put_remaining_length(&mut body, self.properties.len());
        body.extend(&self.properties);
        for field in [
            self.id.as_bytes(),
            self.id.as_bytes(),
            self.token.as_bytes(),
        ] {
            body.extend((field.len() as u16).to_be_bytes());
            body.extend(field);
        }
        let mut packet = vec![0x10];
        put_remaining_length(&mut packet, body.len());
        packet.extend(body);
        packet
    }

    /// Connects and asserts a successful CONNACK.
    async fn open(&self, server: &Server) -> Raw {
        let mut raw = Raw {
            socket: TcpStream::connect(server.mqtt).await.unwrap(),
            buffer: Vec::new(),
            v5: true,
        };
        raw.send(&self.bytes()).await;
        match raw.read(WAIT).await {
            Read::Packet(f) if f.kind() == CONNACK => {
                assert_eq!(f.body[1], 0x00, "{}: CONNACK reason code", self.id)
            }
            Read::Packet(f) => panic!("{}: expected CONNACK, got {f:?}", self.id),
            Read::Closed => panic!("{}: closed instead of CONNACK", self.id),
            Read::Quiet => panic!("{}: no CONNACK in time", self.id),
        }
        raw
    }
}

/// An MQTT 3.1.1 CONNECT (clean session, 60 s keep-alive).
fn connect311(id: &str, token: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xc2, 0x00, 0x3c];
    for field in [id.as_bytes(), id.as_bytes(), token.as_bytes()] {
        body.extend((field.len() as u16).to_be_bytes());
        body.extend(field);
    }
    let mut packet = vec![0x10];
    put_remaining_length(&mut packet, body.len());
    packet.extend(body);
    packet
}

fn subscribe_packet(v5: bool, pkid: u16, filter: &str, options: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if v5 {
        body.push(0x00);
    }
    body.extend((filter.len() as u16).to_be_bytes());
    body.extend(filter.as_bytes());
    body.push(options);
    let mut packet = vec![0x82];
    put_remaining_length(&mut packet, body.len());
    packet.extend(body);
    packet
}

fn publish_packet(v5: bool, qos: u8, dup: bool, topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend(topic.as_bytes());
    if qos > 0 {
        body.extend(pkid.to_be_bytes());
    }
    if v5 {
        body.push(0x00);
    }
    body.extend(payload);
    let mut packet = vec![0x30 | (qos << 1) | if dup { 0x08 } else { 0 }];
    put_remaining_length(&mut packet, body.len());
    packet.extend(body);
    packet
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP (success, no properties).
fn ack_packet(kind: u8, pkid: u16) -> Vec<u8> {
    let flags = if kind == PUBREL { 0x02 } else { 0x00 };
    let [high, low] = pkid.to_be_bytes();
    vec![(kind << 4) | flags, 0x02, high, low]
}

/// A TCP connection to the MQTT listener, read packet by packet.
struct Raw {
    socket: TcpStream,
    buffer: Vec<u8>,
    v5: bool,
}

impl Raw {
    fn from_mqtt311(socket: TcpStream) -> Raw {
        Raw {
            socket,
            buffer: Vec::new(),
            v5: false,
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.socket.write_all(bytes).await.unwrap();
    }

    /// The next packet, or `Closed`, or `Quiet` when nothing came `within`.
    async fn read(&mut self, within: Duration) -> Read {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some((frame, used)) = split_frame(&self.buffer) {
                self.buffer.drain(..used);
                return Read::Packet(frame);
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.socket.read(&mut chunk)).await {
                Err(_) => return Read::Quiet,
                Ok(Ok(0)) | Ok(Err(_)) => return Read::Closed,
                Ok(Ok(n)) => self.buffer.extend(&chunk[..n]),
            }
        }
    }

    async fn expect_publish(&mut self) -> RawPublish {
        loop {
            match self.read(WAIT).await {
                Read::Packet(f) if f.kind() == PUBLISH => return RawPublish::parse(&f, self.v5),
                Read::Packet(f) if f.kind() == PINGRESP => continue,
                Read::Packet(f) => panic!("expected PUBLISH, got {f:?}"),
                Read::Closed => panic!("connection closed while waiting for a PUBLISH"),
                Read::Quiet => panic!("no PUBLISH in time"),
            }
        }
    }

    async fn assert_no_publish(&mut self, what: &str) {
        match self.read(QUIET).await {
            Read::Quiet => {}
            Read::Packet(f) if f.kind() == PUBLISH => {
                panic!("{what}: got {:?}", RawPublish::parse(&f, self.v5))
            }
            Read::Packet(f) => panic!("{what}: got {f:?}"),
            Read::Closed => panic!("{what}: the connection was closed"),
        }
    }

    /// Subscribes to one filter; returns the SUBACK's reason code.
    async fn subscribe(&mut self, pkid: u16, filter: &str, options: u8) -> u8 {
        let packet = subscribe_packet(self.v5, pkid, filter, options);
        self.send(&packet).await;
        match self.read(WAIT).await {
            Read::Packet(f) if f.kind() == SUBACK => {
                assert_eq!(&f.body[..2], pkid.to_be_bytes(), "SUBACK packet id");
                *f.body.last().unwrap()
            }
            Read::Packet(f) => panic!("expected SUBACK, got {f:?}"),
            _ => panic!("no SUBACK"),
        }
    }

    /// Every packet the server sends until it closes the connection.
    async fn until_closed(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        loop {
            match self.read(WAIT).await {
                Read::Packet(f) => frames.push(f),
                Read::Closed => return frames,
                Read::Quiet => panic!("the server kept the connection open; it sent {frames:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// mosquitto_pub / mosquitto_sub

/// Runs `mosquitto_pub` or `mosquitto_sub` as device `id`, with `args`
/// after the connection options.
async fn mosquitto(
    server: &Server,
    program: &str,
    id: &str,
    token: &str,
    args: &[&str],
) -> std::process::Output {
    let port = server.mqtt.port().to_string();
    let run = tokio::process::Command::new(program)
        .args(["-p", &port, "-i", id, "-u", id, "-P", token])
        .args(args)
        .output();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish"))
        .unwrap()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn skipped(what: &str) -> bool {
    if mosquitto_available() {
        return false;
    }
    eprintln!("skipped: mosquitto_pub/mosquitto_sub are not installed, so {what} did not run");
    true
}

/// A reproducible pseudo-random sequence (xorshift64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

// ===========================================================================
// 1. Persistent sessions

#[tokio::test]
async fn mqtt311_persistent_session_keeps_subscription_and_queued_commands_across_restart() {
    let mut server = Server::start(Backend::Sqlite).await;
    let valve = server.add_device("valve-311", "ingest").await;
    let ops = server.add_device("ops-311", "admin").await;
    let topic = "devices/valve-311/cmd";

    let (mut device, present) = V4::connect(&server, "valve-311", &valve, false).await;
    assert!(!present, "first connect: no session to resume");
    device
        .subscribe(&[(topic, rumqttc::QoS::AtLeastOnce)])
        .await;
    device.disconnect().await;

    // The PUBACK means the server has taken the command for the offline device.
    publish_acked(&server, "ops-311", &ops, topic, &["open".into()]).await;
    let (mut device, present) = V4::connect(&server, "valve-311", &valve, false).await;
    assert!(present, "CONNACK session present after reconnecting");
    let command = device.next_publish().await;
    assert_eq!(
        (command.topic.as_str(), &command.payload[..]),
        (topic, &b"open"[..])
    );
    assert_eq!(command.qos, rumqttc::QoS::AtLeastOnce);
    device.disconnect().await;

    publish_acked(&server, "ops-311", &ops, topic, &["close".into()]).await;
    restart(&mut server);
    let (mut device, present) = V4::connect(&server, "valve-311", &valve, false).await;
    assert!(present, "CONNACK session present after a server restart");
    let command = device.next_publish().await;
    assert_eq!(&command.payload[..], b"close", "queued before the restart");
    // The subscription itself survived: no SUBSCRIBE since the restart.
    publish_acked(&server, "ops-311", &ops, topic, &["status".into()]).await;
    assert_eq!(&device.next_publish().await.payload[..], b"status");
    device
        .assert_silent(QUIET, "each command is delivered once")
        .await;
}

#[tokio::test]
async fn mqtt311_clean_session_starts_empty_and_discards_the_old_one() {
    let server = Server::start(Backend::Sqlite).await;
    let valve = server.add_device("valve-c311", "ingest").await;
    let ops = server.add_device("ops-c311", "admin").await;
    let topic = "devices/valve-c311/cmd";

    let (mut device, _) = V4::connect(&server, "valve-c311", &valve, false).await;
    device
        .subscribe(&[(topic, rumqttc::QoS::AtLeastOnce)])
        .await;
    device.disconnect().await;
    publish_acked(&server, "ops-c311", &ops, topic, &["queued".into()]).await;

    let (mut device, present) = V4::connect(&server, "valve-c311", &valve, true).await;
    assert!(!present, "clean session: CONNACK session present is 0");
    device
        .assert_silent(QUIET, "a clean session gets nothing queued for the old one")
        .await;
    publish_acked(&server, "ops-c311", &ops, topic, &["later".into()]).await;
    device
        .assert_silent(QUIET, "the old session's subscription is gone")
        .await;
    device.disconnect().await;

    // A clean session ends with its connection: nothing is left to resume.
    let (mut device, present) = V4::connect(&server, "valve-c311", &valve, false).await;
    assert!(!present, "no session survives a clean one");
    device.assert_silent(QUIET, "nothing to resume").await;
}

#[tokio::test]
async fn mqtt5_persistent_session_keeps_subscription_and_queued_commands_across_restart() {
    let mut server = Server::start(Backend::Sqlite).await;
    let valve = server.add_device("valve-5", "ingest").await;
    let ops_token = server.add_device("ops-5", "admin").await;
    let topic = "devices/valve-5/cmd";

    let (mut device, connack) = open_v5(persistent_v5(&server, "valve-5", &valve)).await;
    assert!(
        !connack.session_present,
        "first connect: no session to resume"
    );
    subscribe(&mut device, topic, QoS::ExactlyOnce).await;
    disconnect_v5(device).await;

    let mut ops = connect_v5(&server, "ops-5", &ops_token).await.unwrap();
    let matched = send(&mut ops, topic, QoS::AtLeastOnce, "open").await;
    assert!(
        matched,
        "PUBACK success, not \"no matching subscribers\": the offline session matches"
    );
    send(&mut ops, topic, QoS::ExactlyOnce, "close").await;

    let (mut device, connack) = open_v5(persistent_v5(&server, "valve-5", &valve)).await;
    assert!(
        connack.session_present,
        "CONNACK session present after reconnecting"
    );
    let mut queued = Vec::new();
    for _ in 0..2 {
        let p = next_publish(&mut device).await;
        if p.qos == QoS::ExactlyOnce {
            // Finish the QoS 2 flow before disconnecting: a fresh rumqttc
            // client cannot answer a PUBREL re-sent for the old connection.
            let pkid = p.pkid;
            device
                .expect(|packet| {
                    matches!(packet, Packet::PubRel(r) if r.pkid == pkid).then_some(())
                })
                .await;
        }
        queued.push((topic_of(&p), text(&p.payload), p.qos));
    }
    // Order is kept per topic and QoS only, so compare as a set.
    queued.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        queued,
        [
            (topic.to_string(), "close".to_string(), QoS::ExactlyOnce),
            (topic.to_string(), "open".to_string(), QoS::AtLeastOnce),
        ],
        "queued commands, each at the QoS it was published with"
    );
    disconnect_v5(device).await;

    send(&mut ops, topic, QoS::AtLeastOnce, "lock").await;
    drop(ops);
    restart(&mut server);
    let (mut device, connack) = open_v5(persistent_v5(&server, "valve-5", &valve)).await;
    assert!(
        connack.session_present,
        "CONNACK session present after a server restart"
    );
    assert_eq!(text(&next_publish(&mut device).await.payload), "lock");
    // The subscription itself survived: no SUBSCRIBE since the restart.
    let mut ops = connect_v5(&server, "ops-5", &ops_token).await.unwrap();
    send(&mut ops, topic, QoS::AtLeastOnce, "status").await;
    assert_eq!(text(&next_publish(&mut device).await.payload), "status");
    device
        .assert_silent(QUIET, "each command is delivered once")
        .await;
}

#[tokio::test]
async fn mqtt5_clean_start_starts_empty_and_discards_the_old_session() {
    let server = Server::start(Backend::Sqlite).await;
    let valve = server.add_device("valve-c5", "ingest").await;
    let ops_token = server.add_device("ops-c5", "admin").await;
    let topic = "devices/valve-c5/cmd";

    let (mut device, _) = open_v5(persistent_v5(&server, "valve-c5", &valve)).await;
    subscribe(&mut device, topic, QoS::AtLeastOnce).await;
    disconnect_v5(device).await;
    let mut ops = connect_v5(&server, "ops-c5", &ops_token).await.unwrap();
    send(&mut ops, topic, QoS::AtLeastOnce, "queued").await;

    let (mut device, connack) = open_v5(v5_options(&server, "valve-c5", &valve)).await;
    assert!(
        !connack.session_present,
        "clean start: CONNACK session present is 0"
    );
    device
        .assert_silent(
            QUIET,
            "a clean start gets nothing queued for the old session",
        )
        .await;
    send(&mut ops, topic, QoS::AtLeastOnce, "later").await;
    device
        .assert_silent(QUIET, "the old session's subscription is gone")
        .await;
}

/// The user story with mosquitto's own clients: a device subscribes once
/// with a persistent session, goes away, and gets the command sent while it
/// was offline, also after a server restart.
#[tokio::test]
async fn mosquitto_persistent_sessions_receive_commands_sent_while_offline() {
    if skipped("the mosquitto persistent-session test") {
        return;
    }
    let mut server = Server::start(Backend::Sqlite).await;
    let ops = server.add_device("ops-mq", "admin").await;
    let versions: [(&str, &[&str]); 2] = [
        ("valve-mq311", &["-V", "mqttv311"]),
        ("valve-mq5", &["-V", "mqttv5", "-x", "3600"]),
    ];
    let mut tokens = HashMap::new();
    for (device, _) in versions {
        tokens.insert(device, server.add_device(device, "ingest").await);
    }
    let topic = |device: &str| format!("devices/{device}/cmd");
    // A persistent session subscribed at QoS 1, in the protocol version given.
    fn session<'a>(topic: &'a str, version: &[&'a str]) -> Vec<&'a str> {
        [&["-c", "-q", "1", "-t", topic][..], version].concat()
    }
    // mosquitto_pub takes the version, not the session expiry.
    fn command<'a>(topic: &'a str, version: &[&'a str], payload: &'a str) -> Vec<&'a str> {
        [&["-q", "1", "-t", topic, "-m", payload][..], &version[..2]].concat()
    }

    for (device, version) in versions {
        let (token, topic) = (&tokens[device], topic(device));
        let session = session(&topic, version);
        // -E: subscribe, wait for the SUBACK, disconnect.
        let args = [&session[..], &["-E"]].concat();
        let output = mosquitto(&server, "mosquitto_sub", device, token, &args).await;
        assert!(output.status.success(), "{device} subscribes: {output:?}");
        let args = command(&topic, version, "open");
        let output = mosquitto(&server, "mosquitto_pub", "ops-mq", &ops, &args).await;
        assert!(output.status.success(), "command to {device}: {output:?}");
        let args = [&session[..], &["-C", "1", "-W", "10"]].concat();
        let output = mosquitto(&server, "mosquitto_sub", device, token, &args).await;
        let said = stdout(&output);
        assert_eq!(said, "open", "{device} after reconnecting: {output:?}");
        let args = command(&topic, version, "close");
        let output = mosquitto(&server, "mosquitto_pub", "ops-mq", &ops, &args).await;
        assert!(output.status.success(), "command to {device}: {output:?}");
    }
    restart(&mut server);
    for (device, version) in versions {
        let (token, topic) = (&tokens[device], topic(device));
        let args = [&session(&topic, version)[..], &["-C", "1", "-W", "10"]].concat();
        let output = mosquitto(&server, "mosquitto_sub", device, token, &args).await;
        let said = stdout(&output);
        assert_eq!(said, "close", "{device} after a restart: {output:?}");
    }
}

// ===========================================================================
// 2. Delivered QoS = min(published, granted)

#[tokio::test]
async fn mqtt5_delivered_qos_is_the_lower_of_published_and_granted() {
    let server = Server::start(Backend::Sqlite).await;
    let pub_token = server.add_device("qos5-pub", "admin").await;
    let sub_token = server.add_device("qos5-sub", "admin").await;
    let mut publisher = connect_v5(&server, "qos5-pub", &pub_token).await.unwrap();
    // Retained first: QoS 0 then QoS 2, in order on one connection.
    retain(&mut publisher, "t/qos/r0", QoS::AtMostOnce, "r0").await;
    retain(&mut publisher, "t/qos/r2", QoS::ExactlyOnce, "r2").await;

    let mut subscriber = connect_v5(&server, "qos5-sub", &sub_token).await.unwrap();
    let codes = subscribe_filters(
        &mut subscriber,
        vec![
            filter("t/qos/r0", QoS::ExactlyOnce),
            filter("t/qos/r2", QoS::AtLeastOnce),
            filter("t/qos/l0", QoS::ExactlyOnce),
            filter("t/qos/l2", QoS::AtLeastOnce),
        ],
        None,
    )
    .await;
    assert_eq!(
        codes,
        [
            SubscribeReasonCode::Success(QoS::ExactlyOnce),
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::ExactlyOnce),
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
        ]
    );
    let mut retained = HashMap::new();
    for _ in 0..2 {
        let p = next_publish(&mut subscriber).await;
        assert!(p.retain, "sent because it is retained: {p:?}");
        retained.insert(topic_of(&p), p.qos);
    }
    assert_eq!(
        retained["t/qos/r0"],
        QoS::AtMostOnce,
        "retained QoS 0 on a QoS 2 subscription"
    );
    assert_eq!(
        retained["t/qos/r2"],
        QoS::AtLeastOnce,
        "retained QoS 2 on a QoS 1 subscription"
    );

    send(&mut publisher, "t/qos/l0", QoS::AtMostOnce, "l0").await;
    let p = next_publish(&mut subscriber).await;
    assert_eq!(
        (topic_of(&p).as_str(), p.qos),
        ("t/qos/l0", QoS::AtMostOnce)
    );
    send(&mut publisher, "t/qos/l2", QoS::ExactlyOnce, "l2").await;
    let p = next_publish(&mut subscriber).await;
    assert_eq!(
        (topic_of(&p).as_str(), p.qos),
        ("t/qos/l2", QoS::AtLeastOnce)
    );
}

#[tokio::test]
async fn mqtt311_delivered_qos_is_the_lower_of_published_and_granted() {
    use rumqttc::QoS as Q;
    let server = Server::start(Backend::Sqlite).await;
    let pub_token = server.add_device("qos4-pub", "admin").await;
    let sub_token = server.add_device("qos4-sub", "admin").await;
    let (mut publisher, _) = V4::connect(&server, "qos4-pub", &pub_token, true).await;
    publisher
        .publish("t/qos/r0", Q::AtMostOnce, true, "r0")
        .await;
    publisher
        .publish("t/qos/r2", Q::ExactlyOnce, true, "r2")
        .await;

    let (mut subscriber, _) = V4::connect(&server, "qos4-sub", &sub_token, true).await;
    subscriber
        .subscribe(&[
            ("t/qos/r0", Q::ExactlyOnce),
            ("t/qos/r2", Q::AtLeastOnce),
            ("t/qos/l0", Q::ExactlyOnce),
            ("t/qos/l2", Q::AtLeastOnce),
        ])
        .await;
    let mut retained = HashMap::new();
    for _ in 0..2 {
        let p = subscriber.next_publish().await;
        assert!(p.retain, "sent because it is retained: {p:?}");
        retained.insert(p.topic.clone(), p.qos);
    }
    assert_eq!(
        retained["t/qos/r0"],
        Q::AtMostOnce,
        "retained QoS 0 on a QoS 2 subscription"
    );
    assert_eq!(
        retained["t/qos/r2"],
        Q::AtLeastOnce,
        "retained QoS 2 on a QoS 1 subscription"
    );

    publisher
        .publish("t/qos/l0", Q::AtMostOnce, false, "l0")
        .await;
    let p = subscriber.next_publish().await;
    assert_eq!((p.topic.as_str(), p.qos), ("t/qos/l0", Q::AtMostOnce));
    publisher
        .publish("t/qos/l2", Q::ExactlyOnce, false, "l2")
        .await;
    let p = subscriber.next_publish().await;
    assert_eq!((p.topic.as_str(), p.qos), ("t/qos/l2", Q::AtLeastOnce));
}

// ===========================================================================
// 3. Receive Maximum

#[tokio::test]
async fn receive_maximum_limits_unacknowledged_publishes_to_the_client() {
    let server = Server::start(Backend::Sqlite).await;
    let sub_token = server.add_device("rm-sub", "admin").await;
    let pub_token = server.add_device("rm-pub", "admin").await;
    let mut sub = Connect5::new("rm-sub", &sub_token)
        .receive_maximum(2)
        .open(&server)
        .await;
    assert_eq!(sub.subscribe(1, "t/rm", 0x01).await, 0x01, "granted QoS 1");

    let mut publisher = connect_v5(&server, "rm-pub", &pub_token).await.unwrap();
    for n in 1..=5 {
        send(&mut publisher, "t/rm", QoS::AtLeastOnce, format!("m{n}")).await;
    }

    let mut got = vec![sub.expect_publish().await, sub.expect_publish().await];
    sub.assert_no_publish("a third publish while two are unacknowledged (Receive Maximum 2)")
        .await;
    sub.send(&ack_packet(PUBACK, got[0].pkid)).await;
    got.push(sub.expect_publish().await);
    sub.assert_no_publish("a publish beyond Receive Maximum after one PUBACK")
        .await;
    sub.send(&ack_packet(PUBACK, got[1].pkid)).await;
    sub.send(&ack_packet(PUBACK, got[2].pkid)).await;
    got.push(sub.expect_publish().await);
    got.push(sub.expect_publish().await);
    sub.send(&ack_packet(PUBACK, got[3].pkid)).await;
    sub.send(&ack_packet(PUBACK, got[4].pkid)).await;
    sub.assert_no_publish("every message was delivered once")
        .await;

    let payloads: Vec<String> = got.iter().map(|p| text(&p.payload)).collect();
    assert_eq!(payloads, ["m1", "m2", "m3", "m4", "m5"]);
    assert!(
        got.iter().all(|p| p.qos == 1 && p.topic == "t/rm"),
        "{got:?}"
    );
}

// ===========================================================================
// 4. Maximum Packet Size

#[tokio::test]
async fn maximum_packet_size_drops_only_the_publishes_too_large_for_the_client() {
    let server = Server::start(Backend::Sqlite).await;
    let sub_token = server.add_device("mps-sub", "admin").await;
    let pub_token = server.add_device("mps-pub", "admin").await;
    let mut sub = Connect5::new("mps-sub", &sub_token)
        .maximum_packet_size(512)
        .open(&server)
        .await;
    assert_eq!(sub.subscribe(1, "t/mps/#", 0x01).await, 0x01);

    let mut publisher = connect_v5(&server, "mps-pub", &pub_token).await.unwrap();
    send(
        &mut publisher,
        "t/mps/big",
        QoS::AtLeastOnce,
        vec![b'x'; 1000],
    )
    .await;
    send(
        &mut publisher,
        "t/mps/fits",
        QoS::AtLeastOnce,
        vec![b'y'; 400],
    )
    .await;

    let p = sub.expect_publish().await;
    assert_eq!(
        p.topic, "t/mps/fits",
        "the 1000-byte publish must not be sent"
    );
    assert!(p.size <= 512, "a {}-byte packet was sent", p.size);
    assert_eq!(p.payload.len(), 400);
    sub.send(&ack_packet(PUBACK, p.pkid)).await;
    sub.assert_no_publish("only the publish that fits").await;
}

// ===========================================================================
// 5. Subscription options

#[tokio::test]
async fn no_local_subscriptions_do_not_get_their_own_publishes_back() {
    let server = Server::start(Backend::Sqlite).await;
    let a_token = server.add_device("nl-a", "admin").await;
    let b_token = server.add_device("nl-b", "admin").await;
    let mut a = connect_v5(&server, "nl-a", &a_token).await.unwrap();
    let mut b = connect_v5(&server, "nl-b", &b_token).await.unwrap();
    let no_local = Filter {
        nolocal: true,
        ..filter("t/nl", QoS::AtLeastOnce)
    };
    let codes = subscribe_filters(&mut a, vec![no_local], None).await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    subscribe(&mut b, "t/nl", QoS::AtLeastOnce).await;

    // QoS 0, so that `a` waits for no acknowledgement while watching.
    send(&mut a, "t/nl", QoS::AtMostOnce, "from-a").await;
    assert_eq!(text(&next_publish(&mut b).await.payload), "from-a");
    a.assert_silent(QUIET, "noLocal: a's own publish").await;

    // Without noLocal a client does get its own publish, and others' reach `a`.
    send(&mut b, "t/nl", QoS::AtMostOnce, "from-b").await;
    assert_eq!(text(&next_publish(&mut b).await.payload), "from-b");
    assert_eq!(text(&next_publish(&mut a).await.payload), "from-b");
}

#[tokio::test]
async fn retain_as_published_keeps_the_retain_flag_and_its_absence_clears_it() {
    let server = Server::start(Backend::Sqlite).await;
    let keep_token = server.add_device("rap-keep", "admin").await;
    let clear_token = server.add_device("rap-clear", "admin").await;
    let pub_token = server.add_device("rap-pub", "admin").await;
    let mut keep = connect_v5(&server, "rap-keep", &keep_token).await.unwrap();
    let mut clear = connect_v5(&server, "rap-clear", &clear_token)
        .await
        .unwrap();
    let as_published = Filter {
        preserve_retain: true,
        ..filter("t/rap", QoS::AtLeastOnce)
    };
    let codes = subscribe_filters(&mut keep, vec![as_published], None).await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    subscribe(&mut clear, "t/rap", QoS::AtLeastOnce).await;

    let mut publisher = connect_v5(&server, "rap-pub", &pub_token).await.unwrap();
    retain(&mut publisher, "t/rap", QoS::AtLeastOnce, "retained").await;
    let kept = next_publish(&mut keep).await;
    assert_eq!(text(&kept.payload), "retained");
    assert!(kept.retain, "retainAsPublished = 1: RETAIN as published");
    let cleared = next_publish(&mut clear).await;
    assert_eq!(text(&cleared.payload), "retained");
    assert!(
        !cleared.retain,
        "retainAsPublished = 0: RETAIN cleared when forwarded"
    );

    send(&mut publisher, "t/rap", QoS::AtLeastOnce, "plain").await;
    let kept = next_publish(&mut keep).await;
    assert_eq!(
        (text(&kept.payload).as_str(), kept.retain),
        ("plain", false)
    );
    let cleared = next_publish(&mut clear).await;
    assert_eq!(
        (text(&cleared.payload).as_str(), cleared.retain),
        ("plain", false)
    );
}

#[tokio::test]
async fn retain_handling_sends_retained_messages_always_on_new_subscriptions_only_or_never() {
    let server = Server::start(Backend::Sqlite).await;
    let pub_token = server.add_device("rh-pub", "admin").await;
    let mut publisher = connect_v5(&server, "rh-pub", &pub_token).await.unwrap();
    retain(&mut publisher, "t/rh", QoS::AtLeastOnce, "kept").await;
    let with_rule = |rule| Filter {
        retain_forward_rule: rule,
        ..filter("t/rh", QoS::AtLeastOnce)
    };
    let mut clients = Vec::new();
    for id in ["rh-0", "rh-1", "rh-2"] {
        let token = server.add_device(id, "admin").await;
        clients.push(connect_v5(&server, id, &token).await.unwrap());
    }
    let [always, new_only, never] = &mut clients[..] else {
        unreachable!()
    };
    let granted = [SubscribeReasonCode::Success(QoS::AtLeastOnce)];

    for round in ["new", "existing"] {
        let rule = RetainForwardRule::OnEverySubscribe;
        assert_eq!(
            subscribe_filters(always, vec![with_rule(rule)], None).await,
            granted
        );
        let p = next_publish(always).await;
        assert_eq!(
            (text(&p.payload).as_str(), p.retain),
            ("kept", true),
            "retainHandling 0, {round} subscription"
        );
    }

    let rule = RetainForwardRule::OnNewSubscribe;
    assert_eq!(
        subscribe_filters(new_only, vec![with_rule(rule.clone())], None).await,
        granted
    );
    let p = next_publish(new_only).await;
    assert_eq!(
        (text(&p.payload).as_str(), p.retain),
        ("kept", true),
        "retainHandling 1, new"
    );
    assert_eq!(
        subscribe_filters(new_only, vec![with_rule(rule)], None).await,
        granted
    );

    let rule = RetainForwardRule::Never;
    assert_eq!(
        subscribe_filters(never, vec![with_rule(rule)], None).await,
        granted
    );

    // A live message after the SUBACKs: anything retained would have come first.
    send(&mut publisher, "t/rh", QoS::AtLeastOnce, "live").await;
    for (client, what) in [
        (new_only, "retainHandling 1, existing subscription"),
        (never, "retainHandling 2"),
    ] {
        let p = next_publish(client).await;
        assert_eq!(text(&p.payload), "live", "{what}: got the retained message");
        client.assert_silent(QUIET, what).await;
    }
}

// ===========================================================================
// 6. Message expiry

#[tokio::test]
async fn expired_messages_are_not_delivered_and_the_expiry_counts_down() {
    let server = Server::start(Backend::Sqlite).await;
    let sub_token = server.add_device("exp-sub", "admin").await;
    let live_token = server.add_device("exp-live", "admin").await;
    let pub_token = server.add_device("exp-pub", "admin").await;
    let (mut sub, _) = open_v5(persistent_v5(&server, "exp-sub", &sub_token)).await;
    subscribe(&mut sub, "t/exp", QoS::AtLeastOnce).await;
    disconnect_v5(sub).await;
    let mut live = connect_v5(&server, "exp-live", &live_token).await.unwrap();
    subscribe(&mut live, "t/exp", QoS::AtLeastOnce).await;

    let mut publisher = connect_v5(&server, "exp-pub", &pub_token).await.unwrap();
    let props = Some(expiring(1));
    publish_v5(
        &mut publisher,
        "t/exp",
        QoS::AtLeastOnce,
        false,
        "short",
        props,
    )
    .await;
    let props = Some(expiring(60));
    publish_v5(
        &mut publisher,
        "t/exp",
        QoS::AtLeastOnce,
        false,
        "long",
        props,
    )
    .await;
    let published = Instant::now();

    // A subscriber online gets the expiry forwarded ("short" may already
    // have expired on a slow machine).
    let long = live
        .expect(|p| match p {
            Packet::Publish(p) if &p.payload[..] == b"long" => Some(p.clone()),
            _ => None,
        })
        .await;
    let forwarded = long.properties.and_then(|p| p.message_expiry_interval);
    assert!(
        matches!(forwarded, Some(1..=60)),
        "message expiry interval forwarded: {forwarded:?}"
    );

    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(published.elapsed())).await;
    let (mut sub, connack) = open_v5(persistent_v5(&server, "exp-sub", &sub_token)).await;
    assert!(connack.session_present);
    let first = next_publish(&mut sub).await;
    assert_eq!(
        text(&first.payload),
        "long",
        "the message that expired after 1 s was delivered 2.5 s later"
    );
    // It waited 2.5 s in the server: the interval it carries is the rest.
    let remaining = first.properties.and_then(|p| p.message_expiry_interval);
    assert!(
        matches!(remaining, Some(1..=59)),
        "after 2.5 s queued, a 60 s expiry must have counted down: {remaining:?}"
    );
    sub.assert_silent(QUIET, "the expired message").await;
}

#[tokio::test]
async fn expired_retained_messages_are_not_sent_to_new_subscribers() {
    let server = Server::start(Backend::Sqlite).await;
    let pub_token = server.add_device("rexp-pub", "admin").await;
    let sub_token = server.add_device("rexp-sub", "admin").await;
    let mut publisher = connect_v5(&server, "rexp-pub", &pub_token).await.unwrap();
    let props = Some(expiring(2));
    publish_v5(
        &mut publisher,
        "t/rexp/stale",
        QoS::AtLeastOnce,
        true,
        "stale",
        props,
    )
    .await;
    retain(&mut publisher, "t/rexp/fresh", QoS::AtLeastOnce, "fresh").await;
    let published = Instant::now();

    let mut sub = connect_v5(&server, "rexp-sub", &sub_token).await.unwrap();
    subscribe(&mut sub, "t/rexp/#", QoS::AtLeastOnce).await;
    let mut topics = vec![topic_of(&next_publish(&mut sub).await)];
    topics.push(topic_of(&next_publish(&mut sub).await));
    topics.sort();
    assert_eq!(
        topics,
        ["t/rexp/fresh", "t/rexp/stale"],
        "both retained while fresh"
    );

    tokio::time::sleep(Duration::from_millis(3500).saturating_sub(published.elapsed())).await;
    let mut sub = connect_v5(&server, "rexp-sub", &sub_token).await.unwrap();
    subscribe(&mut sub, "t/rexp/#", QoS::AtLeastOnce).await;
    let p = next_publish(&mut sub).await;
    assert_eq!(
        topic_of(&p),
        "t/rexp/fresh",
        "the expired retained message was sent"
    );
    sub.assert_silent(QUIET, "the expired retained message")
        .await;
}

// ===========================================================================
// 7. CONNACK properties

#[tokio::test]
async fn connack_advertises_the_servers_limits_and_features() {
    let server = Server::start(Backend::Sqlite).await;
    let token = server.add_device("ack-1", "admin").await;
    let (_client, connack) = open_v5(v5_options(&server, "ack-1", &token)).await;
    assert_eq!(connack.code, ConnectReturnCode::Success);
    assert!(!connack.session_present);
    let p = connack.properties.expect("CONNACK properties");
    assert!(
        matches!(p.receive_max, Some(1..)),
        "receive maximum: {:?}",
        p.receive_max
    );
    assert!(
        matches!(p.max_packet_size, Some(1..)),
        "maximum packet size: {:?}",
        p.max_packet_size
    );
    assert!(
        matches!(p.topic_alias_max, Some(1..)),
        "topic alias maximum: {:?}",
        p.topic_alias_max
    );
    // Absent means available; the server supports QoS 2, so Maximum QoS is
    // absent too (2 is not a value it may send).
    for (name, flag) in [
        ("retain available", p.retain_available),
        (
            "wildcard subscription available",
            p.wildcard_subscription_available,
        ),
        (
            "subscription identifiers available",
            p.subscription_identifiers_available,
        ),
        (
            "shared subscription available",
            p.shared_subscription_available,
        ),
    ] {
        assert!(matches!(flag, None | Some(1)), "{name}: {flag:?}");
    }
    assert_eq!(p.max_qos, None, "maximum QoS");
}

// ===========================================================================
// 8. Retained messages

#[tokio::test]
async fn retained_messages_are_set_replaced_cleared_and_survive_a_restart() {
    let mut server = Server::start(Backend::Sqlite).await;
    let pub_token = server.add_device("ret-pub", "admin").await;
    let sub_token = server.add_device("ret-sub", "admin").await;
    let topic = "t/ret/lamp";
    let mut publisher = connect_v5(&server, "ret-pub", &pub_token).await.unwrap();

    retain(&mut publisher, topic, QoS::AtLeastOnce, "on").await;
    let mut sub = connect_v5(&server, "ret-sub", &sub_token).await.unwrap();
    subscribe(&mut sub, "t/ret/#", QoS::AtLeastOnce).await;
    let p = next_publish(&mut sub).await;
    assert_eq!(
        (topic_of(&p).as_str(), text(&p.payload).as_str(), p.retain),
        (topic, "on", true)
    );
    disconnect_v5(sub).await;

    retain(&mut publisher, topic, QoS::AtLeastOnce, "off").await;
    let mut sub = connect_v5(&server, "ret-sub", &sub_token).await.unwrap();
    subscribe(&mut sub, "t/ret/#", QoS::AtLeastOnce).await;
    let p = next_publish(&mut sub).await;
    assert_eq!(
        (text(&p.payload).as_str(), p.retain),
        ("off", true),
        "replaced"
    );
    sub.assert_silent(QUIET, "only the latest retained message")
        .await;
    disconnect_v5(sub).await;
    drop(publisher);

    restart(&mut server);
    let mut sub = connect_v5(&server, "ret-sub", &sub_token).await.unwrap();
    subscribe(&mut sub, "t/ret/#", QoS::AtLeastOnce).await;
    let p = next_publish(&mut sub).await;
    assert_eq!(
        (text(&p.payload).as_str(), p.retain),
        ("off", true),
        "after a restart"
    );
    disconnect_v5(sub).await;
    if !skipped("mosquitto_sub's look at the retained message") {
        let args = ["-t", topic, "-C", "1", "-W", "10", "-F", "%r %p"];
        let output = mosquitto(&server, "mosquitto_sub", "ret-sub", &sub_token, &args).await;
        assert_eq!(
            stdout(&output),
            "1 off",
            "retained flag and payload: {output:?}"
        );
    }

    // An empty retained payload clears it.
    let mut publisher = connect_v5(&server, "ret-pub", &pub_token).await.unwrap();
    retain(&mut publisher, topic, QoS::AtLeastOnce, Bytes::new()).await;
    let mut sub = connect_v5(&server, "ret-sub", &sub_token).await.unwrap();
    subscribe(&mut sub, "t/ret/#", QoS::AtLeastOnce).await;
    // Anything retained would be sent before a message published after the SUBACK.
    send(&mut publisher, topic, QoS::AtLeastOnce, "marker").await;
    let p = next_publish(&mut sub).await;
    assert_eq!(
        (text(&p.payload).as_str(), p.retain),
        ("marker", false),
        "the cleared retained message was still sent"
    );
}

// ===========================================================================
// 9. Shared subscriptions

#[tokio::test]
async fn shared_subscription_members_split_the_messages_and_get_each_once() {
    let server = Server::start(Backend::Sqlite).await;
    let mut members = Vec::new();
    for id in ["share-1", "share-2"] {
        let token = server.add_device(id, "admin").await;
        let mut member = connect_v5(&server, id, &token).await.unwrap();
        subscribe(&mut member, "$share/workers/t/jobs/#", QoS::AtLeastOnce).await;
        members.push(member);
    }
    let token = server.add_device("share-all", "admin").await;
    let mut everything = connect_v5(&server, "share-all", &token).await.unwrap();
    subscribe(&mut everything, "t/jobs/#", QoS::AtLeastOnce).await;

    let token = server.add_device("share-pub", "admin").await;
    let mut publisher = connect_v5(&server, "share-pub", &token).await.unwrap();
    let sent: Vec<String> = (1..=20).map(|n| format!("job-{n}")).collect();
    for (n, job) in sent.iter().enumerate() {
        let topic = format!("t/jobs/{}", n % 3);
        send(&mut publisher, &topic, QoS::AtLeastOnce, job.clone()).await;
    }

    let mut expected = sent.clone();
    expected.sort();
    let mut all = Vec::new();
    for _ in 0..sent.len() {
        all.push(text(&next_publish(&mut everything).await.payload));
    }
    all.sort();
    assert_eq!(all, expected, "a non-shared subscriber gets every message");
    everything
        .assert_silent(QUIET, "non-shared: more than each message once")
        .await;

    let [one, two] = &mut members[..] else {
        unreachable!()
    };
    let (mut got_one, mut got_two) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + WAIT;
    while got_one.len() + got_two.len() < sent.len() {
        tokio::select! {
            p = next_publish(one) => got_one.push(text(&p.payload)),
            p = next_publish(two) => got_two.push(text(&p.payload)),
            _ = tokio::time::sleep_until(deadline) => panic!(
                "the group got {} of {} messages: {got_one:?} {got_two:?}",
                got_one.len() + got_two.len(),
                sent.len()
            ),
        }
    }
    one.assert_silent(QUIET, "shared: more than each message once")
        .await;
    two.assert_silent(QUIET, "shared: more than each message once")
        .await;
    assert!(
        !got_one.is_empty() && !got_two.is_empty(),
        "both members get part: {got_one:?} {got_two:?}"
    );
    let mut together: Vec<String> = got_one.into_iter().chain(got_two).collect();
    together.sort();
    assert_eq!(
        together, expected,
        "the group gets each message exactly once"
    );
}

// ===========================================================================
// 10. Subscription identifiers

#[tokio::test]
async fn publishes_carry_the_identifier_of_the_subscription_they_matched() {
    let server = Server::start(Backend::Sqlite).await;
    let sub_token = server.add_device("sid-sub", "admin").await;
    let pub_token = server.add_device("sid-pub", "admin").await;
    let mut sub = connect_v5(&server, "sid-sub", &sub_token).await.unwrap();
    let granted = [SubscribeReasonCode::Success(QoS::AtLeastOnce)];
    let codes =
        subscribe_filters(&mut sub, vec![filter("t/sid/#", QoS::AtLeastOnce)], Some(7)).await;
    assert_eq!(codes, granted);
    // Above 127: a multi-byte variable byte integer.
    let codes = subscribe_filters(
        &mut sub,
        vec![filter("t/other/+", QoS::AtLeastOnce)],
        Some(300),
    )
    .await;
    assert_eq!(codes, granted);
    subscribe(&mut sub, "t/plain/#", QoS::AtLeastOnce).await;

    let mut publisher = connect_v5(&server, "sid-pub", &pub_token).await.unwrap();
    for topic in ["t/sid/a", "t/other/b", "t/plain/c"] {
        send(&mut publisher, topic, QoS::AtLeastOnce, "x").await;
    }
    let mut ids = HashMap::new();
    for _ in 0..3 {
        let p = next_publish(&mut sub).await;
        let carried = p.properties.clone().map(|p| p.subscription_identifiers);
        ids.insert(topic_of(&p), carried.unwrap_or_default());
    }
    assert_eq!(ids["t/sid/a"], [7]);
    assert_eq!(ids["t/other/b"], [300]);
    assert_eq!(
        ids["t/plain/c"],
        Vec::<usize>::new(),
        "a subscription without an identifier"
    );
}

// ===========================================================================
// 11. Topic aliases

/// rumqttc 0.25 hands the application the PUBLISH before it resolves an
/// incoming alias (the event's topic is empty), so the test resolves them
/// the way a client must.
#[tokio::test]
async fn topic_aliases_from_the_server_resolve_to_the_right_topics() {
    let server = Server::start(Backend::Sqlite).await;
    let sub_token = server.add_device("alias-sub", "admin").await;
    let plain_token = server.add_device("alias-plain", "admin").await;
    let pub_token = server.add_device("alias-pub", "admin").await;
    let mut options = v5_options(&server, "alias-sub", &sub_token);
    options.set_topic_alias_max(Some(4));
    let (mut sub, _) = open_v5(options).await;
    subscribe(&mut sub, "t/alias/#", QoS::AtLeastOnce).await;
    // It announces no Topic Alias Maximum: the server must send no aliases.
    let mut plain = connect_v5(&server, "alias-plain", &plain_token)
        .await
        .unwrap();
    subscribe(&mut plain, "t/alias/#", QoS::AtLeastOnce).await;

    let mut publisher = connect_v5(&server, "alias-pub", &pub_token).await.unwrap();
    // Six topics, four aliases: the server must also reassign them.
    let sent: Vec<(String, String)> = (0..24)
        .map(|n| {
            (
                format!("t/alias/{}", ["a", "b", "c", "d", "e", "f"][n % 6]),
                format!("m{n}"),
            )
        })
        .collect();
    for (topic, payload) in &sent {
        send(&mut publisher, topic, QoS::AtLeastOnce, payload.clone()).await;
    }

    // Aliases are resolved in the order packets arrive; messages on
    // different topics may be delivered in any order, so they are compared
    // as sets.
    let mut aliases: HashMap<u16, String> = HashMap::new();
    let (mut resolved_all, mut plain_all) = (Vec::new(), Vec::new());
    for _ in &sent {
        let p = next_publish(&mut sub).await;
        let alias = p.properties.as_ref().and_then(|p| p.topic_alias);
        let resolved = match alias {
            Some(alias) => {
                assert!(
                    (1..=4).contains(&alias),
                    "alias {alias} beyond the announced 4"
                );
                if !p.topic.is_empty() {
                    aliases.insert(alias, topic_of(&p));
                }
                aliases
                    .get(&alias)
                    .unwrap_or_else(|| panic!("alias {alias} used before it was set"))
                    .clone()
            }
            None => topic_of(&p),
        };
        resolved_all.push((resolved, text(&p.payload)));

        let p = next_publish(&mut plain).await;
        let alias = p.properties.as_ref().and_then(|p| p.topic_alias);
        assert_eq!(alias, None, "an alias sent to a client that allows none");
        plain_all.push((topic_of(&p), text(&p.payload)));
    }
    let mut expected = sent.clone();
    expected.sort();
    resolved_all.sort();
    plain_all.sort();
    assert_eq!(
        resolved_all, expected,
        "topics as resolved through the aliases"
    );
    assert_eq!(plain_all, expected, "topics without aliases");
}

#[tokio::test]
async fn topic_aliases_from_the_client_are_understood() {
    let server = Server::start(Backend::Sqlite).await;
    let sub_token = server.add_device("calias-sub", "admin").await;
    let pub_token = server.add_device("calias-pub", "admin").await;
    let mut sub = connect_v5(&server, "calias-sub", &sub_token).await.unwrap();
    subscribe(&mut sub, "t/calias/#", QoS::AtLeastOnce).await;
    let (mut publisher, connack) = open_v5(v5_options(&server, "calias-pub", &pub_token)).await;
    let maximum = connack.properties.and_then(|p| p.topic_alias_max);
    assert!(
        matches!(maximum, Some(1..)),
        "topic alias maximum: {maximum:?}"
    );

    // Set alias 1, use it, move it to another topic, use it again.
    for (topic, payload) in [
        ("t/calias/x", "first"),
        ("", "second"),
        ("t/calias/y", "third"),
        ("", "fourth"),
    ] {
        let alias = Some(aliased(1));
        let matched = publish_v5(
            &mut publisher,
            topic,
            QoS::AtLeastOnce,
            false,
            payload,
            alias,
        )
        .await;
        assert!(matched, "PUBACK for {payload}: a subscriber matches");
    }
    let mut got = Vec::new();
    for _ in 0..4 {
        let p = next_publish(&mut sub).await;
        got.push((topic_of(&p), text(&p.payload)));
    }
    let expected = [
        ("t/calias/x", "first"),
        ("t/calias/x", "second"),
        ("t/calias/y", "third"),
        ("t/calias/y", "fourth"),
    ]
    .map(|(t, p)| (t.to_string(), p.to_string()));
    assert_eq!(got, expected);
}

// ===========================================================================
// 12. Abuse

/// A bystander subscribed to `t/by`, and a publisher to prove it still works.
async fn bystander(server: &Server) -> (V5, V5) {
    let token = server.add_device("by-sub", "admin").await;
    let mut sub = connect_v5(server, "by-sub", &token).await.unwrap();
    subscribe(&mut sub, "t/by", QoS::AtLeastOnce).await;
    let token = server.add_device("by-pub", "admin").await;
    (sub, connect_v5(server, "by-pub", &token).await.unwrap())
}

async fn still_served(sub: &mut V5, publisher: &mut V5, what: &str) {
    send(publisher, "t/by", QoS::AtLeastOnce, what.to_string()).await;
    let p = next_publish(sub).await;
    assert_eq!(text(&p.payload), what, "the bystander after {what}");
}

#[tokio::test]
async fn mqtt5_unsolicited_acks_end_the_connection_with_a_protocol_error() {
    let server = Server::start(Backend::Sqlite).await;
    let token = server.add_device("rogue-5", "admin").await;
    let (mut by_sub, mut by_pub) = bystander(&server).await;
    for (kind, name) in [(PUBACK, "PUBACK"), (PUBREC, "PUBREC"), (PUBCOMP, "PUBCOMP")] {
        let mut rogue = Connect5::new("rogue-5", &token).open(&server).await;
        rogue.send(&ack_packet(kind, 4242)).await;
        let frames = rogue.until_closed().await;
        let kinds: Vec<(u8, Option<u8>)> = frames
            .iter()
            .map(|f| (f.kind(), f.body.first().copied()))
            .collect();
        assert_eq!(
            kinds,
            [(DISCONNECT, Some(0x82))],
            "{name} for a packet id never used: DISCONNECT 0x82 (protocol error), then close"
        );
        still_served(&mut by_sub, &mut by_pub, name).await;
    }
}

#[tokio::test]
async fn mqtt311_unsolicited_acks_close_the_connection() {
    let server = Server::start(Backend::Sqlite).await;
    let token = server.add_device("rogue-311", "admin").await;
    let (mut by_sub, mut by_pub) = bystander(&server).await;
    for (kind, name) in [(PUBACK, "PUBACK"), (PUBREC, "PUBREC"), (PUBCOMP, "PUBCOMP")] {
        let mut rogue = Raw::from_mqtt311(raw_mqtt311(&server, "rogue-311", &token).await);
        rogue.send(&ack_packet(kind, 4242)).await;
        let frames = rogue.until_closed().await;
        assert!(
            frames.is_empty(),
            "{name} for a packet id never used: closed without a reply, got {frames:?}"
        );
        still_served(&mut by_sub, &mut by_pub, name).await;
    }
}

/// Unsolicited acknowledgements with random packet ids, and QoS 2 publishes
/// sent twice and released twice.
fn abuse(rng: &mut Rng, v5: bool, n: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    for _ in 0..4 + rng.below(6) {
        let pkid = 1 + rng.below(65535) as u16;
        match rng.below(5) {
            0 => bytes.extend(ack_packet(PUBACK, pkid)),
            1 => bytes.extend(ack_packet(PUBREC, pkid)),
            2 => bytes.extend(ack_packet(PUBREL, pkid)),
            3 => bytes.extend(ack_packet(PUBCOMP, pkid)),
            _ => {
                let topic = format!("t/storm/{n}");
                bytes.extend(publish_packet(v5, 2, false, &topic, pkid, b"once"));
                bytes.extend(publish_packet(v5, 2, true, &topic, pkid, b"once"));
                bytes.extend(ack_packet(PUBREL, pkid));
                bytes.extend(ack_packet(PUBREL, pkid));
            }
        }
    }
    bytes
}

/// One storm connection: CONNECT, abuse, read for a while, drop. Returns
/// whether its CONNECT was answered with a successful CONNACK.
async fn storm_connection(
    addr: std::net::SocketAddr,
    connect: Vec<u8>,
    script: Vec<u8>,
    v5: bool,
) -> bool {
    let Ok(Ok(socket)) = tokio::time::timeout(WAIT, TcpStream::connect(addr)).await else {
        return false;
    };
    let mut raw = Raw {
        socket,
        buffer: Vec::new(),
        v5,
    };
    if raw.socket.write_all(&connect).await.is_err() {
        return false;
    }
    let accepted = match raw.read(WAIT).await {
        Read::Packet(f) => f.kind() == CONNACK && f.body.get(1) == Some(&0),
        _ => false,
    };
    let _ = raw.socket.write_all(&script).await;
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Read::Packet(_) = raw
        .read(until.saturating_duration_since(tokio::time::Instant::now()))
        .await
    {}
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_abusive_connections_leaves_every_listener_accepting() {
    let server = Server::start(Backend::Sqlite).await;
    let ids = ["storm-0", "storm-1", "storm-2", "storm-3"];
    let mut tokens = Vec::new();
    for id in ids {
        tokens.push(server.add_device(id, "admin").await);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut storm = tokio::task::JoinSet::new();
    for n in 0..200 {
        // Half of them share one client id, so they also take over each other's sessions.
        let who = if n % 2 == 0 { 0 } else { 1 + n % 3 };
        let v5 = rng.below(2) == 0;
        let connect = if v5 {
            Connect5::new(ids[who], &tokens[who]).bytes()
        } else {
            connect311(ids[who], &tokens[who])
        };
        let script = abuse(&mut rng, v5, n);
        storm.spawn(storm_connection(server.mqtt, connect, script, v5));
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let mut accepted = 0;
    while let Some(outcome) = storm.join_next().await {
        accepted += outcome.unwrap() as usize;
    }
    assert_eq!(
        accepted, 200,
        "CONNECTs answered with a successful CONNACK during the storm"
    );

    let (status, body) = server.api("GET", "/healthz", None, None).await;
    assert_eq!((status, body.as_str()), (200, Some("ok\n")), "/healthz");
    // raw_mqtt311 asserts the CONNACK is a success.
    drop(raw_mqtt311(&server, "storm-0", &tokens[0]).await);
    drop(Connect5::new("storm-1", &tokens[1]).open(&server).await);
    // And messages still flow, 3.1.1 to 5.
    let token = server.add_device("calm-sub", "admin").await;
    let mut sub = connect_v5(&server, "calm-sub", &token).await.unwrap();
    subscribe(&mut sub, "t/calm", QoS::AtLeastOnce).await;
    let token = server.add_device("calm-pub", "admin").await;
    publish_acked(
        &server,
        "calm-pub",
        &token,
        "t/calm",
        &["after the storm".into()],
    )
    .await;
    assert_eq!(
        text(&next_publish(&mut sub).await.payload),
        "after the storm"
    );
}

// ===========================================================================
// 13. Will delay

/// Options with a will on `t/will/<id>` delayed by 1 s, in a session that
/// lasts a minute (so the delay, not the session's end, decides).
fn with_delayed_will(server: &Server, id: &str, token: &str) -> MqttOptions {
    let mut options = v5_options(server, id, token);
    options.set_session_expiry_interval(Some(60));
    let properties = LastWillProperties {
        delay_interval: Some(1),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    };
    let topic = format!("t/will/{id}");
    options.set_last_will(LastWill::new(
        topic,
        "gone",
        QoS::AtLeastOnce,
        false,
        Some(properties),
    ));
    options
}

async fn will_watcher(server: &Server) -> V5 {
    let token = server.add_device("will-watch", "admin").await;
    let mut watcher = connect_v5(server, "will-watch", &token).await.unwrap();
    subscribe(&mut watcher, "t/will/#", QoS::AtLeastOnce).await;
    watcher
}

#[tokio::test]
async fn a_delayed_will_is_published_after_its_delay() {
    let server = Server::start(Backend::Sqlite).await;
    let token = server.add_device("will-1", "admin").await;
    let mut watcher = will_watcher(&server).await;
    let (client, _) = open_v5(with_delayed_will(&server, "will-1", &token)).await;

    let dropped = Instant::now();
    client.drop_connection().await;
    let will = next_publish(&mut watcher).await;
    let after = dropped.elapsed();
    assert_eq!(
        (topic_of(&will).as_str(), text(&will.payload).as_str()),
        ("t/will/will-1", "gone")
    );
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(5),
        "will published {after:?} after the connection dropped; its delay is 1 s"
    );
    watcher.assert_silent(QUIET, "the will once").await;
}

#[tokio::test]
async fn a_delayed_will_is_not_published_when_the_client_returns_in_time() {
    let server = Server::start(Backend::Sqlite).await;
    let token = server.add_device("will-2", "admin").await;
    let mut watcher = will_watcher(&server).await;
    let (client, _) = open_v5(with_delayed_will(&server, "will-2", &token)).await;
    client.drop_connection().await;
    let mut options = with_delayed_will(&server, "will-2", &token);
    options.set_clean_start(false);
    let (client, connack) = open_v5(options).await;
    assert!(
        connack.session_present,
        "the session is resumed within its expiry"
    );
    watcher
        .assert_silent(
            Duration::from_secs(2),
            "a will whose client came back within the delay",
        )
        .await;

    // The watcher would have seen it: this time the client stays away.
    let dropped = Instant::now();
    client.drop_connection().await;
    let will = next_publish(&mut watcher).await;
    assert_eq!(topic_of(&will), "t/will/will-2");
    assert!(
        dropped.elapsed() >= Duration::from_millis(900),
        "{:?}",
        dropped.elapsed()
    );
}

// ===========================================================================
// 14. QoS 2 end to end

#[tokio::test]
async fn mqtt5_qos2_is_delivered_exactly_once_both_ways() {
    let server = Server::start(Backend::Sqlite).await;
    let sub_token = server.add_device("q2-sub", "admin").await;
    let pub_token = server.add_device("q2-pub", "admin").await;
    let mut sub = connect_v5(&server, "q2-sub", &sub_token).await.unwrap();
    subscribe(&mut sub, "t/q2", QoS::ExactlyOnce).await;
    let mut publisher = connect_v5(&server, "q2-pub", &pub_token).await.unwrap();
    for n in 1..=3 {
        // publish_v5 asserts PUBREC, then PUBCOMP.
        send(
            &mut publisher,
            "t/q2",
            QoS::ExactlyOnce,
            format!("once-{n}"),
        )
        .await;
        let p = next_publish(&mut sub).await;
        assert_eq!(
            (text(&p.payload), p.qos),
            (format!("once-{n}"), QoS::ExactlyOnce)
        );
        // rumqttc answered PUBREC; the server must release with PUBREL.
        let released = sub
            .expect(|packet| match packet {
                Packet::PubRel(rel) => Some(rel.pkid),
                Packet::Publish(p) => panic!("got {p:?} before the PUBREL"),
                _ => None,
            })
            .await;
        assert_eq!(released, p.pkid, "PUBREL for the publish");
    }
    sub.assert_silent(QUIET, "each QoS 2 message once").await;
}

#[tokio::test]
async fn mqtt311_qos2_is_delivered_exactly_once_both_ways() {
    use rumqttc::QoS as Q;
    let server = Server::start(Backend::Sqlite).await;
    let sub_token = server.add_device("q2v4-sub", "admin").await;
    let pub_token = server.add_device("q2v4-pub", "admin").await;
    let (mut sub, _) = V4::connect(&server, "q2v4-sub", &sub_token, true).await;
    sub.subscribe(&[("t/q2", Q::ExactlyOnce)]).await;
    let (mut publisher, _) = V4::connect(&server, "q2v4-pub", &pub_token, true).await;
    for n in 1..=3 {
        // V4::publish asserts PUBREC, then PUBCOMP.
        publisher
            .publish("t/q2", Q::ExactlyOnce, false, &format!("once-{n}"))
            .await;
        let p = sub.next_publish().await;
        assert_eq!(
            (p.payload.to_vec(), p.qos),
            (format!("once-{n}").into_bytes(), Q::ExactlyOnce)
        );
        let released = sub
            .expect(|packet| match packet {
                rumqttc::Packet::PubRel(rel) => Some(rel.pkid),
                rumqttc::Packet::Publish(p) => panic!("got {p:?} before the PUBREL"),
                _ => None,
            })
            .await;
        assert_eq!(released, p.pkid, "PUBREL for the publish");
    }
    sub.assert_silent(QUIET, "each QoS 2 message once").await;
}

#[tokio::test]
async fn mosquitto_qos2_is_delivered_exactly_once_both_ways() {
    if skipped("the mosquitto QoS 2 test") {
        return;
    }
    use tokio::io::AsyncBufReadExt;
    let server = Server::start(Backend::Sqlite).await;
    let sub_token = server.add_device("mq2-sub", "admin").await;
    let pub_token = server.add_device("mq2-pub", "admin").await;
    let port = server.mqtt.port().to_string();
    for version in ["mqttv311", "mqttv5"] {
        // Line-buffered, so that each line can be read as it is printed.
        let mut sub = tokio::process::Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args([
                "-p", &port, "-i", "mq2-sub", "-u", "mq2-sub", "-P", &sub_token,
            ])
            .args([
                "-V", version, "-q", "2", "-t", "t/mq2", "-C", "1", "-W", "15",
            ])
            .args(["-d", "-F", "message %q %p"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(sub.stdout.take().unwrap()).lines();
        // -d prints the protocol exchange; publish once the SUBACK is in.
        let mut seen = Vec::new();
        while !seen.iter().any(|l: &String| l.contains("received SUBACK")) {
            let line = tokio::time::timeout(WAIT, lines.next_line())
                .await
                .expect("SUBACK");
            let Some(line) = line.unwrap() else {
                panic!("mosquitto_sub ended before its SUBACK: {seen:#?}")
            };
            seen.push(line);
        }
        let args = [
            "-V", version, "-q", "2", "-t", "t/mq2", "-m", "exactly", "-d",
        ];
        let output = mosquitto(&server, "mosquitto_pub", "mq2-pub", &pub_token, &args).await;
        assert!(
            output.status.success(),
            "{version} mosquitto_pub: {output:?}"
        );
        let said = stdout(&output);
        let rec = said
            .find("received PUBREC")
            .unwrap_or_else(|| panic!("no PUBREC: {said}"));
        let comp = said
            .find("received PUBCOMP")
            .unwrap_or_else(|| panic!("no PUBCOMP: {said}"));
        assert!(rec < comp, "{version}: PUBREC before PUBCOMP: {said}");

        while let Some(line) = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("mosquitto_sub ends after one message")
            .unwrap()
        {
            seen.push(line);
        }
        let messages: Vec<&String> = seen.iter().filter(|l| l.starts_with("message ")).collect();
        assert_eq!(messages, ["message 2 exactly"], "{version}: {seen:#?}");
        assert!(
            seen.iter().any(|l| l.contains("received PUBREL")),
            "{version}: {seen:#?}"
        );
        assert!(sub.wait().await.unwrap().success(), "{version}: {seen:#?}");
    }
}
