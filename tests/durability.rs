//! Nothing acknowledged is lost: not on kill -9, not on Ctrl-C; and a store
//! that falls behind stops the gatekeeper reading instead of buffering.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rumqttc::{Event, Incoming, Outgoing, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{connect_v4, put_remaining_length, raw_mqtt311, Backend, Server, WAIT};

/// Publishes seq 0.. at QoS 1 until the connection breaks or `total` is
/// reached, calling `at_acks` once when `trigger` PUBACKs have arrived.
/// Returns the acknowledged seqs.
async fn publish_until_broken(
    server: &mut Server,
    token: &str,
    total: i64,
    trigger: usize,
    at_acks: impl FnOnce(&mut Server),
) -> HashSet<i64> {
    let (client, mut eventloop) = connect_v4(server, "sensor-1", token).await.unwrap();
    tokio::spawn(async move {
        for seq in 0..total {
            let payload = format!(r#"{{"seq":{seq},"celsius":20.5}}"#);
            if client
                .publish(
                    "ingest/temperature/sensor-1",
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .is_err()
            {
                break;
            }
        }
    });
    // rumqttc sends publishes in request order; the n-th outgoing PUBLISH
    // carries seq n, so its packet id tells which seq a PUBACK acknowledges.
    let mut next_seq = 0;
    let mut in_flight: HashMap<u16, i64> = HashMap::new();
    let mut acked = HashSet::new();
    let mut at_acks = Some(at_acks);
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                in_flight.insert(pkid, next_seq);
                next_seq += 1;
            }
            Ok(Ok(Event::Incoming(Incoming::PubAck(ack)))) => {
                acked.insert(in_flight.remove(&ack.pkid).expect("ack for a sent publish"));
                if acked.len() == trigger {
                    (at_acks.take().unwrap())(server);
                }
                if acked.len() as i64 == total {
                    break;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    acked
}

async fn stored_seqs(server: &Server) -> HashSet<i64> {
    server
        .rows("SELECT seq FROM temperature")
        .await
        .iter()
        .map(|r| r[0].as_i64().unwrap())
        .collect()
}

async fn kill9_loses_nothing_acknowledged(backend: Backend) {
    let mut server = Server::with_temperature(backend).await;
    let token = server.add_device("sensor-1", "ingest").await;
    let acked = publish_until_broken(&mut server, &token, 1_000_000, 2_000, |s| s.kill9()).await;
    assert!(acked.len() >= 2_000);
    server.restart();
    let stored = stored_seqs(&server).await;
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged records lost after kill -9, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    eprintln!(
        "kill -9 after {} acks: {} stored, none lost",
        acked.len(),
        stored.len()
    );
}

async fn ctrl_c_commits_in_flight_batches(backend: Backend) {
    let mut server = Server::with_temperature(backend).await;
    let token = server.add_device("sensor-1", "ingest").await;
    let mut status = None;
    let acked = publish_until_broken(&mut server, &token, 1_000_000, 1_000, |s| {
        status = Some(s.interrupt())
    })
    .await;
    assert!(
        status.expect("interrupted").success(),
        "Ctrl-C must exit cleanly"
    );
    server.restart();
    let stored = stored_seqs(&server).await;
    assert!(
        acked.is_subset(&stored),
        "acknowledged records lost on Ctrl-C"
    );
}

/// Holds the store's write lock from outside the server.
enum Blocker {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl Blocker {
    async fn lock(server: &Server) -> Blocker {
        use sqlx::Connection;
        match server.backend {
            Backend::Sqlite => {
                let url = format!("sqlite://{}", server.data_dir().join("store.db").display());
                let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
                sqlx::query("BEGIN EXCLUSIVE")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                Blocker::Sqlite(conn)
            }
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&server.database_url().unwrap())
                    .await
                    .unwrap();
                sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
                sqlx::query("LOCK TABLE temperature IN ACCESS EXCLUSIVE MODE")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                Blocker::Postgres(conn)
            }
        }
    }

    async fn release(self) {
        match self {
            Blocker::Sqlite(mut c) => sqlx::query("COMMIT")
                .execute(&mut c)
                .await
                .map(drop)
                .unwrap(),
            Blocker::Postgres(mut c) => sqlx::query("COMMIT")
                .execute(&mut c)
                .await
                .map(drop)
                .unwrap(),
        }
    }
}

fn encode_publish(out: &mut Vec<u8>, pkid: u16, payload: &[u8]) {
    let topic = b"ingest/temperature/sensor-1";
    out.push(0x32);
    put_remaining_length(out, 2 + topic.len() + 2 + payload.len());
    out.extend((topic.len() as u16).to_be_bytes());
    out.extend(topic);
    out.extend(pkid.to_be_bytes());
    out.extend(payload);
}

async fn back_pressure_instead_of_buffering(backend: Backend) {
    let server = Server::with_temperature(backend).await;
    let token = server.add_device("sensor-1", "ingest").await;
    let blocker = Blocker::lock(&server).await;

    // A raw MQTT 3.1.1 publisher that writes as fast as the socket takes it.
    let socket = raw_mqtt311(&server, "sensor-1", &token).await;

    const TOTAL: usize = 20_000;
    let padding = "x".repeat(900);
    let mut packets = Vec::new();
    for seq in 0..TOTAL {
        let payload = format!(r#"{{"seq":{seq},"celsius":1,"label":"{padding}"}}"#);
        encode_publish(&mut packets, (seq % 65535 + 1) as u16, payload.as_bytes());
    }
    let (mut read_half, mut write_half) = socket.into_split();
    let writer = tokio::spawn(async move {
        write_half.write_all(&packets).await.unwrap();
        write_half
    });

    // While the store cannot commit: no PUBACK, and the publisher is stuck
    // because the gatekeeper stopped reading its ~20 MB.
    let mut first = [0u8; 4];
    let early =
        tokio::time::timeout(Duration::from_secs(2), read_half.read_exact(&mut first)).await;
    assert!(
        early.is_err(),
        "a PUBACK arrived before its record could be committed"
    );
    assert!(
        !writer.is_finished(),
        "the gatekeeper kept reading while the store was blocked"
    );

    blocker.release().await;
    let _write_half = tokio::time::timeout(Duration::from_secs(120), writer)
        .await
        .expect("publisher unblocked")
        .unwrap();
    let mut acks = vec![0u8; 4 * TOTAL];
    tokio::time::timeout(Duration::from_secs(120), read_half.read_exact(&mut acks))
        .await
        .expect("every PUBACK")
        .unwrap();
    assert!(acks.chunks(4).all(|a| a[0] == 0x40 && a[1] == 0x02));
    assert_eq!(
        server.count("SELECT count(*) FROM temperature").await,
        TOTAL as i64
    );
}

crate::on_both_backends!(
    kill9_loses_nothing_acknowledged,
    ctrl_c_commits_in_flight_batches,
    back_pressure_instead_of_buffering
);
