//! Writes the fuzz targets' seed corpus, `fuzz/corpus/<target>/<name>`,
//! with the encoders the platform and its clients really use. Each seed
//! starts with the byte its target reads first (see each target's doc).
//! Run from the repository root; it replaces the files it writes and
//! leaves others (found inputs kept as regressions) alone.

use std::fs;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use bytes::BytesMut;
use fleetgate_protocol::record;
use fleetgate_protocol::sdk::{
    sha256_hex, HandshakeClaims, Manifest, SdkBundle, SignedHandshake, Target,
};
use fleetgate_protocol::{Claims, Role, TokenSigner};
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;
use rumqttc::mqttbytes::{v4, QoS};
use rumqttc::v5::mqttbytes::{v5, QoS as QoS5};
use serde_json::json;

/// The targets' fixed time (`fleetgate_fuzz::NOW_MS`).
const NOW_MS: i64 = 1_800_000_000_000;
const NOW: i64 = NOW_MS / 1000;

fn main() {
    let root = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    let signer = TokenSigner::from_pkcs8(pkcs8.as_ref()).unwrap();
    let token = signer.sign(&Claims {
        sub: "sensor-1".into(),
        role: Role::Ingest,
        iat: NOW - 60,
        exp: NOW + 3600,
    });
    mqtt(&root.join("mqtt_codec"), &token);
    tokens(&root.join("token"), &signer, &token);
    handshakes(&root.join("handshake_manifest"), &signer);
    fgb1(&root.join("fgb1"));
    sql(&root.join("sql_guard"));
    toml(&root.join("toml_decl"));
}

fn write(dir: &Path, name: &str, first: u8, bytes: &[u8]) {
    fs::create_dir_all(dir).unwrap();
    let mut seed = vec![first];
    seed.extend_from_slice(bytes);
    fs::write(dir.join(name), seed).unwrap();
}

/// The mqtt_codec settings byte: fallback version, read size, PUBLISH limit.
fn settings(v5: bool, chunk: u8, max_publish: u8) -> u8 {
    u8::from(v5) | (chunk & 0b111) << 1 | (max_publish & 0xf) << 4
}

fn mqtt(dir: &Path, token: &str) {
    // 3.1.1: a session from CONNECT to DISCONNECT.
    let mut connect = v4::Connect::new("sensor-1");
    connect.keep_alive = 60;
    connect.clean_session = false;
    connect.login = Some(v4::Login::new("sensor-1", token));
    connect.last_will = Some(v4::LastWill::new(
        "ingest/temperature/sensor-1",
        "{\"seq\":0}",
        QoS::AtLeastOnce,
        false,
    ));
    let mut connect4 = BytesMut::new();
    connect.write(&mut connect4).unwrap();
    write(dir, "v4-connect", settings(false, 7, 15), &connect4);

    let mut session = connect4.clone();
    let mut subscribe = v4::Subscribe::new("live/#", QoS::ExactlyOnce);
    subscribe.pkid = 1;
    subscribe.write(&mut session).unwrap();
    v4::Publish::new("cmd/sensor-1", QoS::AtMostOnce, "on")
        .write(&mut session)
        .unwrap();
    let mut qos1 = v4::Publish::new(
        "ingest/temperature/sensor-1",
        QoS::AtLeastOnce,
        "{\"seq\":1,\"celsius\":21.5}",
    );
    qos1.pkid = 1;
    qos1.write(&mut session).unwrap();
    let mut qos2 = v4::Publish::new("status/sensor-1", QoS::ExactlyOnce, "ok");
    qos2.pkid = 2;
    qos2.retain = true;
    qos2.write(&mut session).unwrap();
    v4::PubAck::new(1).write(&mut session).unwrap();
    v4::PubRec::new(2).write(&mut session).unwrap();
    v4::PubRel::new(2).write(&mut session).unwrap();
    v4::PubComp::new(2).write(&mut session).unwrap();
    let mut unsubscribe = v4::Unsubscribe::new("live/#");
    unsubscribe.pkid = 3;
    unsubscribe.write(&mut session).unwrap();
    v4::PingReq.write(&mut session).unwrap();
    v4::Disconnect.write(&mut session).unwrap();
    write(dir, "v4-session", settings(false, 7, 15), &session);
    write(dir, "v4-session-bytewise", settings(false, 0, 15), &session);

    // A publish over the limit: skipped as it arrives, then a ping.
    let mut oversized = connect4.clone();
    let mut big = v4::Publish::new(
        "ingest/temperature/sensor-1",
        QoS::AtLeastOnce,
        vec![b'x'; 300],
    );
    big.pkid = 9;
    big.write(&mut oversized).unwrap();
    v4::PingReq.write(&mut oversized).unwrap();
    write(
        dir,
        "v4-oversized-publish",
        settings(false, 3, 1),
        &oversized,
    );

    // MQTT 3 (protocol level 3): refused as unsupported.
    let mut old = connect4.to_vec();
    let level = old.windows(6).position(|w| w == b"\0\x04MQTT").unwrap() + 6;
    old[level] = 3;
    write(dir, "v4-protocol-level-3", settings(false, 7, 15), &old);

    // MQTT 5.
    let connect = v5::Connect {
        keep_alive: 30,
        client_id: "sensor-1".into(),
        clean_start: false,
        properties: Some(v5::ConnectProperties {
            session_expiry_interval: Some(3600),
            receive_maximum: Some(2),
            max_packet_size: Some(65_536),
            topic_alias_max: Some(4),
            ..v5::ConnectProperties::new()
        }),
    };
    let will = v5::LastWill::new(
        "ingest/temperature/sensor-1",
        "{\"seq\":0}",
        QoS5::AtLeastOnce,
        false,
        Some(v5::LastWillProperties {
            delay_interval: Some(5),
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            content_type: Some("application/json".into()),
            response_topic: None,
            correlation_data: None,
            user_properties: vec![("k".into(), "v".into())],
        }),
    );
    let login = v5::Login::new("sensor-1", token);
    let mut connect5 = BytesMut::new();
    connect
        .write(&Some(will), &Some(login), &mut connect5)
        .unwrap();
    write(dir, "v5-connect", settings(true, 7, 15), &connect5);

    let mut session = connect5.clone();
    let filters = vec![
        v5::Filter {
            path: "live/#".into(),
            qos: QoS5::ExactlyOnce,
            nolocal: true,
            preserve_retain: true,
            retain_forward_rule: v5::RetainForwardRule::OnNewSubscribe,
        },
        v5::Filter::new("$share/g/cmd/sensor-1", QoS5::AtLeastOnce),
    ];
    let mut subscribe = v5::Subscribe::new_many(
        filters,
        Some(v5::SubscribeProperties {
            id: Some(7),
            user_properties: vec![],
        }),
    );
    subscribe.pkid = 1;
    subscribe.write(&mut session).unwrap();
    let properties = v5::PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(120),
        topic_alias: Some(1),
        response_topic: Some("reply/sensor-1".into()),
        correlation_data: Some(b"c-1".to_vec().into()),
        user_properties: vec![("unit".into(), "C".into())],
        subscription_identifiers: vec![],
        content_type: Some("application/json".into()),
    };
    let mut qos1 = v5::Publish::new(
        "ingest/temperature/sensor-1",
        QoS5::AtLeastOnce,
        "{\"seq\":1,\"celsius\":21.5}",
        Some(properties),
    );
    qos1.pkid = 1;
    qos1.write(&mut session).unwrap();
    // The same topic again through its alias alone.
    let mut aliased = v5::Publish::new(
        "",
        QoS5::ExactlyOnce,
        "{\"seq\":2,\"celsius\":22}",
        Some(v5::PublishProperties {
            topic_alias: Some(1),
            ..Default::default()
        }),
    );
    aliased.pkid = 2;
    aliased.write(&mut session).unwrap();
    v5::PubAck::new(1, None).write(&mut session).unwrap();
    let mut failed = v5::PubRec::new(2, None);
    failed.reason = v5::PubRecReason::UnspecifiedError;
    failed.write(&mut session).unwrap();
    v5::PubRel::new(2, None).write(&mut session).unwrap();
    v5::PubComp::new(2, None).write(&mut session).unwrap();
    let mut unsubscribe = v5::Unsubscribe::new("live/#", None);
    unsubscribe.pkid = 3;
    unsubscribe.write(&mut session).unwrap();
    v5::PingReq::write(&mut session).unwrap();
    let mut disconnect = v5::Disconnect::new(v5::DisconnectReasonCode::DisconnectWithWillMessage);
    disconnect.properties = Some(v5::DisconnectProperties {
        session_expiry_interval: Some(60),
        reason_string: None,
        user_properties: vec![],
        server_reference: None,
    });
    disconnect.write(&mut session).unwrap();
    write(dir, "v5-session", settings(true, 7, 15), &session);
    write(
        dir,
        "v5-session-small-reads",
        settings(true, 1, 15),
        &session,
    );

    // A session that resumes: publish QoS 1 and 2, reconnect, settle.
    let mut resume = connect5.clone();
    for (pkid, qos) in [
        (1, QoS5::AtLeastOnce),
        (2, QoS5::ExactlyOnce),
        (3, QoS5::AtLeastOnce),
    ] {
        let mut p = v5::Publish::new("status/sensor-1", qos, "x", None);
        p.pkid = pkid;
        p.write(&mut resume).unwrap();
    }
    resume.extend_from_slice(&[0xE0, 0]); // DISCONNECT, no reason: normal
    v5::PubAck::new(1, None).write(&mut resume).unwrap();
    v5::PubRec::new(2, None).write(&mut resume).unwrap();
    v5::PubComp::new(2, None).write(&mut resume).unwrap();
    v5::PubAck::new(3, None).write(&mut resume).unwrap();
    write(dir, "v5-resume", settings(true, 7, 15), &resume);

    // No CONNECT at all: packets read as the settings' version says.
    let mut bare = BytesMut::new();
    let mut p = v5::Publish::new("a/b", QoS5::AtLeastOnce, "x", None);
    p.pkid = 5;
    p.write(&mut bare).unwrap();
    write(dir, "v5-no-connect", settings(true, 7, 15), &bare);
}

fn tokens(dir: &Path, signer: &TokenSigner, token: &str) {
    // Mode 0: a token as presented (signed by another key than the target's).
    write(dir, "presented-token", 0, token.as_bytes());
    write(dir, "presented-garbage", 0, b"fg1.e30.AAAA");
    write(dir, "presented-no-prefix", 0, b"Bearer abc.def");
    // Mode 1: claims the target signs.
    let claims = |sub: &str, role: &str, iat: i64, exp: i64| {
        json!({"sub": sub, "role": role, "iat": iat, "exp": exp}).to_string()
    };
    write(
        dir,
        "signed-valid",
        1,
        claims("sensor-1", "ingest", NOW - 60, NOW + 3600).as_bytes(),
    );
    write(
        dir,
        "signed-admin",
        1,
        claims("admin-1", "admin", NOW - 60, NOW + 60).as_bytes(),
    );
    write(
        dir,
        "signed-expired",
        1,
        claims("sensor-1", "extract", NOW - 7200, NOW - 3600).as_bytes(),
    );
    write(
        dir,
        "signed-future",
        1,
        claims("sensor-1", "ingest", NOW + 3600, NOW + 7200).as_bytes(),
    );
    write(
        dir,
        "signed-bad-subject",
        1,
        claims("../x", "ingest", NOW, NOW + 60).as_bytes(),
    );
    write(dir, "signed-not-claims", 1, b"[1,2,3]");
    // Mode 3: the claims part as text (base64url of a valid claims JSON).
    let body = B64URL.encode(claims("sensor-1", "ingest", NOW - 60, NOW + 3600));
    write(dir, "signed-raw-part", 3, body.as_bytes());
    write(dir, "signed-raw-dots", 3, b"e30.e30");
    let _ = signer;
}

fn handshakes(dir: &Path, signer: &TokenSigner) {
    let claims = HandshakeClaims {
        device_id: "t1".into(),
        device_type: "thermostat".into(),
        fingerprint: "fw-2.1".into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        secure_transfer: true,
        sdk_version: "1.0".into(),
        target: Some(Target::Wasm),
        nonce: "AQAAAZ0tIlAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
        timestamp_ms: NOW_MS,
    };
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let signed = SignedHandshake::sign(&claims, &key);
    write(dir, "http-body", 0, &serde_json::to_vec(&signed).unwrap());
    write(
        dir,
        "http-body-not-base64",
        0,
        br#"{"claims":"!","signature":"?"}"#,
    );
    // Mode 1 (5: with a fresh nonce): claims the target signs with t1's key.
    let json = serde_json::to_vec(&claims).unwrap();
    write(dir, "claims-fresh-nonce", 5, &json);
    write(dir, "claims-unknown-nonce", 1, &json);
    let variants = [
        (
            "claims-native-target",
            json!({"target": null, "arch": "aarch64"}),
        ),
        ("claims-other-type", json!({"device_type": "till"})),
        ("claims-old-sdk", json!({"sdk_version": "0.9"})),
        (
            "claims-clock-skew",
            json!({"timestamp_ms": NOW_MS - 3_600_000}),
        ),
        ("claims-unknown-device", json!({"device_id": "t2"})),
    ];
    for (name, change) in variants {
        let mut value = serde_json::to_value(&claims).unwrap();
        for (k, v) in change.as_object().unwrap() {
            value[k] = v.clone();
        }
        write(dir, name, 5, &serde_json::to_vec(&value).unwrap());
    }
    // Mode 2: a bundle as a device receives it.
    let artifact = b"\0asm\x01\0\0\0";
    let manifest = Manifest {
        device_id: "t1".into(),
        role: Role::Ingest,
        sdk_version: "1.0".into(),
        target: Target::Wasm,
        artifact_sha256: sha256_hex(artifact),
        artifact_len: artifact.len() as u64,
        wasmtime_compat: None,
        schema_sha256: sha256_hex(b"{}"),
        nonce: Some(claims.nonce.clone()),
        issued_at: NOW,
        expires_at: NOW + 600,
    };
    let bundle = SdkBundle::seal(&manifest, artifact, signer);
    write(dir, "bundle", 2, &serde_json::to_vec(&bundle).unwrap());
    // Mode 3 (7: length and hash made to match): manifest, NUL, artifact.
    let mut sealed = serde_json::to_vec(&manifest).unwrap();
    sealed.push(0);
    sealed.extend_from_slice(artifact);
    write(dir, "manifest", 3, &sealed);
    let mut native = serde_json::to_value(&manifest).unwrap();
    native["target"] = json!("x86_64");
    native["wasmtime_compat"] = json!("00ff");
    native["nonce"] = json!(null);
    let mut sealed = serde_json::to_vec(&native).unwrap();
    sealed.push(0);
    sealed.extend_from_slice(b"native code");
    write(dir, "manifest-native-fixed-hash", 7, &sealed);
}

fn fgb1(dir: &Path) {
    // The first byte picks the stream (sorted: orders, plain, temperature)
    // and the sender: bits 4-5, 0 an ingest till, 1 an ingest device
    // without a type, 2 an extract thermostat, 3 an admin.
    let (orders, plain, temperature) = (0u8, 1u8, 2u8);
    let full = record::encode(&[
        ("seq", 7.into()),
        ("celsius", 21.5.into()),
        ("humidity", 40.0.into()),
        ("status", "ok".into()),
        ("level", "high".into()),
        ("taken_at", 1_800_000_000_000i64.into()),
        ("fahrenheit", 70.25.into()),
        ("room", "hall".into()),
        ("ok", true.into()),
    ])
    .unwrap();
    write(dir, "temperature-every-field", 0x10 | temperature, &full);
    let minimal = record::encode(&[("seq", 1.into()), ("celsius", (-3.0).into())]).unwrap();
    write(dir, "temperature-minimal", 0x10 | temperature, &minimal);
    let rejected = record::encode(&[
        ("seq", 2.into()),
        ("celsius", 300.0.into()),
        ("status", "melting".into()),
        ("device_id", "sensor-2".into()),
        ("fg.seq", 1.into()),
        ("firmware", "2.1".into()),
    ])
    .unwrap();
    write(dir, "temperature-rejected", 0x10 | temperature, &rejected);
    let taken_as_text = record::encode(&[
        ("seq", 3.into()),
        ("celsius", 1.0.into()),
        ("taken_at", "2027-01-15T08:00:00Z".into()),
    ])
    .unwrap();
    write(
        dir,
        "temperature-rfc3339",
        0x30 | temperature,
        &taken_as_text,
    );
    let order = record::encode(&[
        ("order_id", "o-1".into()),
        ("ordered_at", 1_800_000_000_000i64.into()),
        ("amount", 12.5.into()),
        ("region", "eu".into()),
    ])
    .unwrap();
    write(dir, "orders-till", orders, &order);
    write(dir, "orders-untyped-refused", 0x10 | orders, &order);
    let reading = record::encode(&[("kwh", 3.25.into()), ("note", "compacted".into())]).unwrap();
    write(dir, "plain-compacted-note", 0x10 | plain, &reading);
    write(dir, "plain-extract-refused", 0x20 | plain, &reading);
    write(
        dir,
        "temperature-json",
        0x10 | temperature,
        br#"[{"seq": 2, "celsius": 22.0}, {"seq": 3, "celsius": 300}, 5]"#,
    );
    write(
        dir,
        "truncated",
        0x10 | temperature,
        &full[..full.len() - 3],
    );
}

fn sql(dir: &Path) {
    let queries = [
        "SELECT device_id, seq, celsius, extra FROM temperature ORDER BY seq",
        "SELECT device_id, (received_at / 86400000) * 86400000 AS day, avg(celsius) FROM temperature GROUP BY device_id, (received_at / 86400000) * 86400000",
        "SELECT device_id, count(*), max(celsius) FROM temperature WHERE received_at >= 1800000000000 AND received_at < 1800003600000 GROUP BY device_id HAVING count(*) > 1 ORDER BY 2 DESC LIMIT 10",
        "SELECT celsius, taken_at FROM temperature WHERE status = 'ok' AND taken_at > 5",
        "SELECT concat(device_id, '/', status) AS tag, celsius * 1.8 + 32 FROM temperature WHERE concat(device_id, '/', status) LIKE 's%'",
        "SELECT region, sum(amount), count(*) FROM orders WHERE region IN ('eu', 'us') GROUP BY region",
        "SELECT region, (ordered_at / 86400000) * 86400000 AS d, sum(amount) FROM orders WHERE ordered_at >= 0 GROUP BY region, (ordered_at / 86400000) * 86400000",
        "SELECT order_id, amount FROM fgs_orders UNION ALL SELECT order_id, amount FROM orders",
        "SELECT kwh, note FROM plain WHERE note IS NOT NULL",
        "SELECT p.device_id, sum(p.kwh), min(p.kwh) FROM plain AS p GROUP BY p.device_id",
        "WITH t AS (SELECT * FROM temperature) SELECT count(*) FROM t",
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 5) SELECT * FROM c",
        "SELECT a.seq FROM temperature AS a JOIN plain AS p ON a.device_id = p.device_id WHERE a.received_at BETWEEN 5 AND 9",
        "SELECT CAST(celsius AS INTEGER), json_extract(extra, '$.firmware'), coalesce(humidity, 0) FROM temperature",
        "SELECT device_id, row_number() OVER (PARTITION BY device_id ORDER BY seq) FROM temperature",
        "SELECT ok, level FROM temperature WHERE ok AND level = 1",
        "SELECT * FROM temperature",
        "DELETE FROM temperature",
        "SELECT 1; DROP TABLE temperature",
        "SELECT * FROM fleetgate_devices",
        "SELECT load_extension('x')",
        "SELECT 'temperature'::regclass",
        "SELECT (SELECT count(*) FROM fleetgate_rejects)",
        "SELECT 1 /* /* */ , (SELECT count(*) FROM fleetgate_devices) -- */",
        "SELECT ((((((((1 + 2) * 3)))))))",
    ];
    for (i, q) in queries.iter().enumerate() {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join(format!("query-{i:02}")), q).unwrap();
    }
}

fn toml(dir: &Path) {
    let (streams, views, jobs) = (0u8, 1u8, 2u8);
    write(
        dir,
        "streams-readme",
        streams,
        br#"[streams.temperature]
key = ["device_id", "seq"]            # optional; default: a server-assigned id
fields.seq      = { type = "int", required = true }
fields.celsius  = { type = "float", min = -40.0, max = 125.0, required = true }
fields.humidity = { type = "float", min = 0.0, max = 100.0 }
fields.status   = { type = "enum", values = ["ok", "warn", "fault"] }
fields.taken_at = { type = "timestamp" }
"#,
    );
    write(
        dir,
        "streams-tiered-bucketed",
        streams,
        br#"[streams.temperature]
key = ["device_id", "seq"]
hot = "3h"
ttl = "30d"
writers = ["thermostat"]
fields.seq = { type = "int", required = true }
fields.level = { type = "enum", values = ["low", "high"], code = true }
fields.f = { type = "float", scale = 0.5555555555555556, offset = -17.77777777777778 }

[streams.orders]
key = ["order_id"]
bucket = { time = "ordered_at", width = "1h" }
fields.order_id = { type = "string", required = true }
fields.ordered_at = { type = "timestamp", required = true }
fields.sku = { type = "string" }
enrich.price = { lookup = "prices", from = "sku", column = "price", type = "float" }
enrich.country = { lookup = "geo", from = "ip", column = "country", type = "string", match = "network" }
"#,
    );
    write(
        dir,
        "views-readme",
        views,
        br#"[views.hourly2]
source = "temperature"
group_by = ["device_id"]
bucket = { column = "received_at", width = "1h" }      # or an int/timestamp field
aggregates = { readings = "count(*)", mean = "avg(celsius)", peak = "max(celsius)" }
refresh = "realtime"            # or { every = "30s" }, or "on_demand"

[views.by_status2]
source = "temperature"
key = ["status"]
fields = ["celsius", "taken_at"]
derived = { tag = "concat(device_id, '/', status)", fahrenheit2 = "celsius * 1.8 + 32" }

[views.status_index2]                 # an index: status -> (device_id, seq)
source = "temperature"
key = ["status", "taken_at"]
"#,
    );
    write(
        dir,
        "views-over-views",
        views,
        br#"[views.by_tag2]
source = "by_status"
key = ["tag"]
fields = ["warm"]

[views.weekly]
source = "hourly"
group_by = ["device_id"]
bucket = { column = "received_at", width = "7d" }
aggregates = { readings = "count(*)" }
refresh = { every = "30s" }

[views.hourly_kept]
source = "temperature"
group_by = ["device_id"]
bucket = { column = "received_at", width = "1h" }
aggregates = { readings = "count(*)", mean = "avg(celsius)" }
ttl = "365d"

[views.sales]
source = "orders"
group_by = ["region"]
bucket = { column = "ordered_at", width = "1d" }
aggregates = { total = "sum(amount)", low = "min(amount)" }
refresh = "on_demand"
"#,
    );
    write(
        dir,
        "jobs-readme",
        jobs,
        br#"[jobs.orders_nightly]
cron = "0 2 * * *"                  # or every = "1d"; neither: by hand only

[jobs.orders_nightly.sources.orders]          # the first source is the main one
csv = "orders-*.csv"
columns = { order_id = "text", customer = "text", gender = "text", amount = "float", ordered_at = "timestamp" }

[jobs.orders_nightly.sources.customers]
sql = "SELECT customer, region, born FROM customers"
database = "shop"
columns = { customer = "text", region = "text", born = "timestamp" }

[[jobs.orders_nightly.rules]]
discard = "amount < 0"
[[jobs.orders_nightly.rules]]
translate = "gender"
map = { F = 1, M = 2 }
[[jobs.orders_nightly.rules]]
join = "customers"
on = "customer"
[[jobs.orders_nightly.rules]]
derive = "age"
expr = "age(born, ordered_at)"
[[jobs.orders_nightly.rules]]
drop = ["born"]

[jobs.orders_nightly.load]
table = "orders_batch"
mode = "upsert"
key = ["order_id"]
time = "ordered_at"
covers = "1d"
"#,
    );
    write(
        dir,
        "jobs-aggregate",
        jobs,
        br#"[jobs.totals]
every = "1h"

[jobs.totals.sources.sales]
jsonl = "sales/*.jsonl"
columns = { region = "text", amount = "float", qty = "int", at = "timestamp", ok = "bool" }

[[jobs.totals.rules]]
discard = "amount IS NULL OR NOT ok"
fields = ["qty"]
[[jobs.totals.rules]]
derive = "net"
expr = "CASE WHEN qty > 0 THEN amount * qty - 1 ELSE amount / 2 END"
type = "float"
[[jobs.totals.rules]]
derive = "tag"
expr = "lower(trim(region)) || '-' || CAST(qty AS TEXT)"
[[jobs.totals.rules]]
sort = ["region", "amount desc"]
[[jobs.totals.rules]]
aggregate = ["region"]
values = { total = "sum(net)", n = "count(*)", top = "max(amount)" }

[jobs.totals.load]
table = "region_totals"
mode = "overwrite"
"#,
    );
}
