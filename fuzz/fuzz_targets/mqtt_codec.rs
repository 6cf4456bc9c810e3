//! The broker's MQTT framing and packet decoding, as a connection's reader
//! uses them, with the decoded packets driving a session's queue and
//! in-flight window.
//!
//! Input: one byte of settings, then the bytes a client sends. Bit 0: the
//! version to assume when the first frame is not a CONNECT naming one;
//! bits 1-3: how many bytes each read returns (so frames arrive split);
//! bits 4-7: the PUBLISH size limit (oversized ones are skipped as they
//! arrive). Every PUBLISH that decodes is encoded again by the broker's
//! own encoder and must decode to the same packet.

#![no_main]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use fleetgate_broker::codec::{self, AckReason, Connect, Frame, FrameReader, Header, Version};
use fleetgate_broker::session::{Delivery, Message, QueueLimits, Session};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

/// A client that sends its bytes at most `chunk` at a time.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

/// Runs a future that never waits (the reader above is always ready).
fn now<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("a read from memory waited"),
    }
}

/// Reads `bytes` as exactly one whole frame.
fn one_frame(bytes: &[u8], version: Version) -> (Header, Bytes) {
    let mut reader = FrameReader::new(bytes);
    match now(reader.next(version, usize::MAX, usize::MAX)) {
        Ok(Frame::Whole(header, frame)) => {
            assert_eq!(frame.len(), bytes.len(), "encoded packet is one frame");
            (header, frame)
        }
        Ok(Frame::OversizedPublish(_)) => unreachable!("no size limit"),
        Err(e) => panic!("the broker's own packet does not frame: {e}"),
    }
}

const LIMITS: QueueLimits = QueueLimits {
    max_messages: 8,
    max_bytes: 4096,
};

fuzz_target!(|data: &[u8]| {
    let Some((&settings, bytes)) = data.split_first() else {
        return;
    };
    let chunk = 1 + ((settings >> 1) & 0b111) as usize * 7;
    let max_publish = ((settings >> 4) as usize) * 64;
    let mut reader = FrameReader::new(Chunked { data: bytes, chunk });

    // The first frame, as `connection::run` reads it.
    let mut version = if settings & 1 == 0 {
        Version::V4
    } else {
        Version::V5
    };
    match now(reader.next(Version::V4, 0, 64 * 1024)) {
        Ok(Frame::Whole(header, frame)) => {
            if let Ok(v) = codec::connect_version(&header, &frame) {
                version = v;
                if let Ok(connect) = Connect::parse(version, &header, frame) {
                    let _ = connect.check();
                    let _ = (connect.client_id(), connect.login(), connect.keep_alive());
                    let _ = (connect.clean_start(), connect.session_expiry(3600));
                    let _ = (connect.receive_maximum(), connect.maximum_packet_size());
                    let _ = connect.topic_alias_maximum();
                    let _ = connect.will();
                }
            }
        }
        Ok(Frame::OversizedPublish(_)) => {}
        Err(_) => return,
    }

    let session = Session::new("fuzz".into(), 3600);
    let mut connection = 1;
    session.attach(connection);
    let window = 1 + (settings as usize & 0b11);
    let mut out = BytesMut::new();
    loop {
        let (header, frame) = match now(reader.next(version, max_publish, 64 * 1024)) {
            Ok(Frame::Whole(header, frame)) => (header, frame),
            Ok(Frame::OversizedPublish(p)) => {
                assert!(p.size > max_publish);
                let _ = codec::publish_ack(version, p.qos, p.pkid, &AckReason::TooLarge(p.topic));
                continue;
            }
            Err(_) => break,
        };
        match header.packet_type() {
            codec::PUBLISH => {
                let Ok(publish) = codec::Publish::parse(version, &header, frame) else {
                    continue;
                };
                // The broker's encoder must say the same thing back.
                out.clear();
                codec::Outgoing {
                    topic: &publish.topic,
                    payload: &publish.payload,
                    qos: publish.qos,
                    pkid: publish.pkid,
                    retain: publish.retain,
                    dup: publish.dup,
                    alias: publish.alias,
                    expiry_secs: publish.expiry_secs,
                    properties: publish.properties.as_ref(),
                    subscription_ids: &[],
                }
                .encode(version, &mut out);
                let (h, f) = one_frame(&out, version);
                let again = codec::Publish::parse(version, &h, f).expect("re-encoded PUBLISH");
                assert_eq!(again.topic, publish.topic);
                assert_eq!(again.payload, publish.payload);
                assert_eq!(
                    (again.qos, again.pkid, again.retain, again.dup),
                    (publish.qos, publish.pkid, publish.retain, publish.dup)
                );
                assert_eq!(again.alias, publish.alias);
                assert_eq!(again.expiry_secs, publish.expiry_secs);
                assert_eq!(again.properties, publish.properties);
                let ack = codec::publish_ack(
                    version,
                    publish.qos,
                    publish.pkid,
                    &AckReason::NotAuthorized(publish.topic.clone()),
                );
                one_frame(&ack, version);

                // Routed back to this session at the QoS it was sent with.
                let message = Arc::new(Message {
                    topic: publish.topic.as_str().into(),
                    payload: publish.payload.clone(),
                    qos: publish.qos,
                    retain: publish.retain,
                    properties: publish.properties.map(Arc::new),
                    expires_at_ms: publish.expiry_secs.map(|s| i64::from(s) * 1000),
                    publisher: None,
                    durable: true,
                });
                session.enqueue(message, publish.qos, false, vec![], LIMITS, |_| {});
                assert!(session.pending() <= LIMITS.max_messages);
            }
            codec::PUBACK | codec::PUBREC | codec::PUBCOMP | codec::PUBREL => {
                let Ok((pkid, reason)) = codec::ack_fields(&header, &frame) else {
                    continue;
                };
                match header.packet_type() {
                    codec::PUBACK => {
                        let _ = session.puback(pkid);
                    }
                    codec::PUBREC => {
                        let _ = session.pubrec(pkid, reason >= 0x80);
                    }
                    codec::PUBCOMP => {
                        let _ = session.pubcomp(pkid);
                    }
                    _ => {
                        one_frame(&codec::pubcomp(version, pkid, reason == 0), version);
                    }
                }
            }
            codec::SUBSCRIBE => {
                if let Ok(subscribe) = codec::Subscribe::parse(version, &header, frame) {
                    let codes: Vec<u8> = subscribe.filters.iter().map(|f| f.options.qos).collect();
                    one_frame(&codec::suback(version, subscribe.pkid, &codes), version);
                }
            }
            codec::UNSUBSCRIBE => {
                if let Ok((pkid, filters)) = codec::unsubscribe_filters(version, &header, frame) {
                    let codes = vec![0x11; filters.len()];
                    one_frame(&codec::unsuback(version, pkid, &codes), version);
                }
            }
            // The client comes back: what was in flight is re-sent.
            codec::DISCONNECT if codec::client_disconnect(version, &header, frame).is_ok() => {
                session.detach(connection);
                connection += 1;
                for delivery in session.attach(connection) {
                    if let Delivery::Publish { queued, .. } = delivery {
                        assert!(queued.qos > 0, "only QoS 1/2 is re-sent");
                    }
                }
            }
            _ => {}
        }
        // The writer takes what the window allows.
        let mut expired = Vec::new();
        for delivery in session.take(connection, window, fleetgate_fuzz::NOW_MS, &mut expired) {
            if let Delivery::Publish { queued, pkid, .. } = delivery {
                assert_eq!(pkid == 0, queued.qos == 0);
            }
        }
        assert!(session.pending() <= LIMITS.max_messages);
    }
    // Whatever is left can be settled or drained.
    session.detach(connection);
});
