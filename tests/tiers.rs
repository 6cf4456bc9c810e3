//! Retention and tiering: rows older than a stream's `hot` move to its cold
//! tier and queries still see them; a re-sent record whose key went cold is
//! not stored again; rows older than its `ttl` are deleted, from its views
//! too, which still answer as the primary table does.

use serde_json::{json, Value};

use crate::harness::{publish_acked, Backend, Server};
use crate::on_both_backends;

const METER: &str = r#"
[streams.meter]
key = ["device_id", "seq"]
hot = "2s"
ttl = "12s"
fields.seq = { type = "int", required = true }
fields.kwh = { type = "float", required = true }
"#;

const VIEWS: &str = r#"
[views.per_second]
source = "meter"
group_by = ["device_id"]
bucket = { column = "received_at", width = "1s" }
aggregates = { n = "count(*)", used = "sum(kwh)" }

[views.per_device]
source = "meter"
group_by = ["device_id"]
aggregates = { n = "count(*)", peak = "max(kwh)" }
refresh = { every = "1s" }

[views.by_kwh]
source = "meter"
key = ["kwh"]

# Kept longer than the rows: answers for periods whose rows expired.
[views.lowest]
source = "meter"
group_by = ["device_id"]
bucket = { column = "received_at", width = "1s" }
aggregates = { n = "count(*)", first = "min(seq)" }
ttl = "20s"
"#;

/// Rows per device and the first sequence number, through the view that
/// keeps them longer than the stream does.
const LOWEST: &str =
    "SELECT device_id, count(*), min(seq) FROM meter WHERE received_at >= 0 GROUP BY device_id ORDER BY device_id";

const DEVICES: [&str; 2] = ["m1", "m2"];

fn readings(seqs: std::ops::Range<i64>) -> Vec<String> {
    seqs.map(|seq| json!({ "seq": seq, "kwh": seq as f64 * 0.5 }).to_string())
        .collect()
}

async fn publish(server: &Server, tokens: &[String], seqs: std::ops::Range<i64>) {
    for (device, token) in DEVICES.iter().zip(tokens) {
        let topic = format!("ingest/meter/{device}");
        publish_acked(server, device, token, &topic, &readings(seqs.clone())).await;
    }
}

/// The query through whatever view answers it, and on the primary tables.
async fn assert_views_match_primary(server: &Server, sql: &str, view: &str) {
    let routed = server.query(sql).await;
    assert_eq!(routed["view"], view, "{sql}");
    let primary = server
        .query(&format!("SELECT * FROM ({sql}) AS primary_only"))
        .await;
    assert_eq!(primary["view"], Value::Null);
    let sorted = |body: &Value| {
        let mut rows: Vec<String> = body["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.to_string())
            .collect();
        rows.sort();
        rows
    };
    assert_eq!(sorted(&routed), sorted(&primary), "{sql}");
}

async fn assert_views_answer_as_the_tables(server: &Server) {
    assert_views_match_primary(
        server,
        "SELECT device_id, count(*), max(kwh) FROM meter GROUP BY device_id",
        "per_device",
    )
    .await;
    assert_views_match_primary(
        server,
        "SELECT device_id, sum(kwh) FROM meter WHERE received_at >= 0 GROUP BY device_id",
        "per_second",
    )
    .await;
    assert_views_match_primary(
        server,
        "SELECT device_id, seq FROM meter WHERE kwh >= 10",
        "by_kwh",
    )
    .await;
}

fn tier_rows(body: &Value) -> (i64, i64) {
    (
        body["hot_rows"].as_i64().unwrap(),
        body["cold_rows"].as_i64().unwrap(),
    )
}

on_both_backends!(old_rows_move_cold_stay_queryable_and_expire_with_their_views);
async fn old_rows_move_cold_stay_queryable_and_expire_with_their_views(backend: Backend) {
    let server = Server::start(backend).await;
    let (status, body) = server.apply_streams(METER).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.post_text("/v1/views", &server.admin, VIEWS).await;
    assert_eq!(status, 200, "{body}");
    let mut tokens = Vec::new();
    for device in DEVICES {
        tokens.push(server.add_device(device, "ingest").await);
    }
    let tiers = "/v1/streams/meter/tiers";

    publish(&server, &tokens, 1..101).await;
    server
        .wait_for(tiers, "the first batch to go cold", |b| {
            tier_rows(b) == (0, 200)
        })
        .await;
    publish(&server, &tokens, 101..151).await;

    // Every row, whichever tier holds it: by scan, by key, under an alias.
    let all = server
        .query("SELECT count(*), sum(kwh) FROM meter WHERE seq >= 0")
        .await;
    assert_eq!(all["view"], Value::Null);
    assert_eq!(
        all["rows"],
        json!([[300, 2.0 * 0.5 * (150.0 * 151.0 / 2.0)]])
    );
    let seqs = server.query(
        "SELECT m.seq FROM meter AS m WHERE m.device_id = 'm1' AND m.seq IN (1, 100, 101, 150) ORDER BY m.seq",
    )
    .await;
    assert_eq!(seqs["rows"], json!([[1], [100], [101], [150]]));
    let (status, explained) = server
        .api(
            "POST",
            "/v1/query/explain",
            Some(&server.admin),
            Some(json!({ "sql": "SELECT seq FROM meter WHERE seq > 70" })),
        )
        .await;
    assert_eq!(status, 200, "{explained}");
    assert!(
        explained["sql"].as_str().unwrap().contains("fgc_meter"),
        "the primary table is both tiers: {explained}"
    );
    assert_views_answer_as_the_tables(&server).await;

    // A device re-sends records whose keys went cold: stored once.
    publish(&server, &tokens, 1..21).await;
    let counted = server
        .query("SELECT count(*) FROM meter WHERE kwh >= 0")
        .await;
    assert_eq!(counted["rows"], json!([[300]]));
    assert_views_answer_as_the_tables(&server).await;

    // The first batch passes its ttl: gone from both tiers and every view;
    // the second is still there.
    let stats = server
        // (It may take two rounds: the batch may straddle a second.)
        .wait_for(tiers, "the first batch to expire", |b| {
            let (hot, cold) = tier_rows(b);
            hot + cold == 100
        })
        .await;
    let (hot, cold) = tier_rows(&stats);
    assert_eq!(hot + cold, 100, "{stats}");
    let left = server
        .query("SELECT min(seq), max(seq), count(*) FROM meter WHERE kwh >= 0")
        .await;
    assert_eq!(left["rows"], json!([[101, 150, 100]]));
    assert_views_answer_as_the_tables(&server).await;

    // The view with a ttl of its own still holds the expired rows' buckets
    // (the primary table no longer can), until its own ttl passes.
    let kept = server.query(LOWEST).await;
    assert_eq!(kept["view"], "lowest");
    assert_eq!(kept["rows"], json!([["m1", 150, 1], ["m2", 150, 1]]));
    let primary = server
        .query(&format!("SELECT * FROM ({LOWEST}) AS primary_only"))
        .await;
    assert_eq!(primary["rows"], json!([["m1", 50, 101], ["m2", 50, 101]]));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    loop {
        let kept = server.query(LOWEST).await;
        if kept["rows"] == primary["rows"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the view's ttl never passed: {kept}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(server.log().contains("expired view buckets deleted"));
    assert!(
        server.log().contains("expired rows deleted"),
        "{}",
        server.log()
    );
}

on_both_backends!(bad_tier_settings_are_refused);
async fn bad_tier_settings_are_refused(backend: Backend) {
    let server = Server::start(backend).await;
    let stream = |extra: &str| {
        format!(
            "[streams.meter]\nkey = [\"device_id\", \"seq\"]\n{extra}\nfields.seq = {{ type = \"int\", required = true }}\n"
        )
    };
    for (extra, says) in [
        ("hot = \"soon\"", "hot = \"soon\""),
        ("hot = \"10ms\"", "at least 1s"),
        ("hot = \"2d\"\nttl = \"1d\"", "must be shorter than ttl"),
        // Would wrap to a negative age in milliseconds, and expiry would
        // then delete every row.
        (
            "ttl = \"1000000000y\"",
            "longer than the longest supported duration",
        ),
        (
            "hot = \"600000000y\"",
            "longer than the longest supported duration",
        ),
    ] {
        let (status, body) = server.apply_streams(&stream(extra)).await;
        assert_eq!(status, 400, "{extra}: {body}");
        assert!(body["error"].as_str().unwrap().contains(says), "{body}");
    }
    let (status, body) = server.apply_streams(&stream("hot = \"1h\"")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.apply_streams(&stream("")).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("hot cannot be removed"),
        "{body}"
    );
    // A view's own ttl: only for an aggregate view bucketed on
    // received_at, longer than its stream's; and no cold tier for views.
    let view = |extra: &str| {
        format!(
            "[views.kept]\nsource = \"meter\"\ngroup_by = [\"device_id\"]\naggregates = {{ n = \"count(*)\" }}\n{extra}\n"
        )
    };
    for (extra, says) in [
        (
            "bucket = { column = \"received_at\", width = \"1m\" }\nttl = \"30d\"",
            "keeps its rows for good",
        ),
        (
            "ttl = \"30d\"",
            "only an aggregate view bucketed on received_at",
        ),
        (
            "bucket = { column = \"seq\", width = \"10\" }\nttl = \"30d\"",
            "only an aggregate view bucketed on received_at",
        ),
        (
            "bucket = { column = \"received_at\", width = \"1m\" }\nttl = \"soon\"",
            "ttl = \"soon\"",
        ),
        (
            "bucket = { column = \"received_at\", width = \"1m\" }\nttl = \"1000000000y\"",
            "longer than the longest supported duration",
        ),
        (
            "bucket = { column = \"received_at\", width = \"1000000000y\" }",
            "longer than the longest supported duration",
        ),
        (
            "refresh = { every = \"1000000000y\" }",
            "longer than the longest supported duration",
        ),
        (
            "bucket = { column = \"received_at\", width = \"1m\" }\nhot = \"1h\"",
            "no cold tier",
        ),
    ] {
        let (status, body) = server
            .post_text("/v1/views", &server.admin, &view(extra))
            .await;
        assert_eq!(status, 400, "{extra}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(says),
            "{extra}: {body}"
        );
    }
    let (status, body) = server
        .apply_streams(&stream("hot = \"1h\"\nttl = \"2d\""))
        .await;
    assert_eq!(status, 200, "{body}");
    let shorter = view("bucket = { column = \"received_at\", width = \"1m\" }\nttl = \"1d\"");
    let (status, body) = server.post_text("/v1/views", &server.admin, &shorter).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("must be longer than stream meter's ttl (2d)"),
        "{body}"
    );
    let (status, body) = server
        .post_text(
            "/v1/views",
            &server.admin,
            &shorter.replace("\"1d\"", "\"365d\""),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server
        .api(
            "GET",
            "/v1/streams/nothing/tiers",
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(status, 404, "{body}");
}

const CHUNKED: &str = r#"
[streams.meter]
key = ["device_id", "seq"]
hot = "1s"
ttl = "15s"
bucket = { time = "read_at", width = "1s" }
fields.seq = { type = "int", required = true }
fields.read_at = { type = "timestamp", required = true }
fields.kwh = { type = "float" }
fields.note = { type = "string" }
fields.ok = { type = "bool" }
"#;

const CHUNKED_ROWS: i64 = 25_000;

/// Row `i` of the chunked stream as a query gives it back: received and
/// read at `i` ms, floats with no short decimal form, quotes and
/// non-ASCII text, NULLs, `extra` on some rows.
fn chunked_row(i: i64) -> Value {
    let note = (i % 7 != 0).then(|| format!("n\"{i}\" ü"));
    let extra = (i % 5 == 0).then(|| json!({ "fw": format!("1.{i}") }));
    json!([
        format!("m{}", i % 3),
        i,
        i,
        i,
        i as f64 / 3.0,
        note,
        i64::from(i % 2 == 0),
        extra
    ])
}

/// Every row of the stream (both tiers, compacted fields by name), or of
/// its superseded rows, ordered by `seq`; booleans as 0/1 on both backends,
/// `extra` parsed.
async fn chunked_rows(db: &fleetgate_store::Db, from: &str) -> Vec<Value> {
    let sql = format!(
        "SELECT device_id, received_at, seq, read_at, kwh, note, \
         CASE WHEN ok THEN 1 ELSE 0 END, extra FROM {from} ORDER BY seq"
    );
    chunked_rows_of(db, &sql).await
}

async fn chunked_rows_of(db: &fleetgate_store::Db, sql: &str) -> Vec<Value> {
    let limits = fleetgate_store::query::QueryLimits {
        max_rows: 100_000,
        ..Default::default()
    };
    let result = fleetgate_store::query::run(db, sql, &limits)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    // `extra` as JSON: its text is the database's to format.
    result
        .rows
        .into_iter()
        .map(|mut row| {
            if let Some(text) = row[7].as_str() {
                row[7] = serde_json::from_str(text).expect("extra is JSON");
            }
            Value::from(row)
        })
        .collect()
}

/// The rows are the expected ones; else the first that differs.
fn same_rows(actual: Vec<Value>, expected: Vec<Value>, line: u32) {
    if let Some((i, (a, e))) = actual
        .iter()
        .zip(&expected)
        .enumerate()
        .find(|(_, (a, e))| a != e)
    {
        panic!("line {line}: row {i} is {a}, expected {e}");
    }
    assert_eq!(actual.len(), expected.len(), "line {line}: row count");
}

/// The chunked stream on a store of its own, driven at a controlled clock.
struct Chunked {
    db: fleetgate_store::Db,
    catalog: fleetgate_store::Catalog,
    tiers: fleetgate_store::tiers::Tiers,
    buckets: fleetgate_store::buckets::Buckets,
    _dir: tempfile::TempDir,
    _pg: Option<crate::harness::TestDatabase>,
}

impl Chunked {
    async fn open(backend: Backend) -> Chunked {
        use fleetgate_store::views::{auto::AutoSettings, Views};
        let dir = tempfile::tempdir().unwrap();
        let pg = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(crate::harness::TestDatabase::create().await),
        };
        let url = pg.as_ref().map(|pg| pg.url());
        let db = fleetgate_store::Db::open(url.as_deref(), &dir.path().join("store.db"))
            .await
            .unwrap();
        let catalog = fleetgate_store::open_catalog(&db).await.unwrap();
        let file = fleetgate_protocol::schema::StreamsFile::parse(CHUNKED).unwrap();
        catalog.apply(&file).await.unwrap();
        let views = std::sync::Arc::new(
            Views::open(db.clone(), catalog.clone(), AutoSettings::off())
                .await
                .unwrap(),
        );
        Chunked {
            tiers: fleetgate_store::tiers::Tiers::new(db.clone(), catalog.clone(), views.clone()),
            buckets: fleetgate_store::buckets::Buckets::new(db.clone(), catalog.clone(), views),
            db,
            catalog,
            _dir: dir,
            _pg: pg,
        }
    }

    fn stream(&self) -> std::sync::Arc<fleetgate_store::catalog::Stream> {
        self.catalog.get("meter").unwrap()
    }

    /// Inserts rows `seqs` into the hot table as ingest would store them.
    async fn insert(&self, seqs: std::ops::RangeInclusive<i64>) {
        let seqs: Vec<i64> = seqs.collect();
        for batch in seqs.chunks(500) {
            let values: Vec<String> = (0..batch.len())
                .map(|r| {
                    let p: Vec<String> = (1..=9).map(|c| format!("${}", r * 9 + c)).collect();
                    format!("({})", p.join(", "))
                })
                .collect();
            let sql = format!(
                "INSERT INTO meter (device_id, received_at, seq, read_at, kwh, note, ok, extra, fg_bucket) \
                 VALUES {} ON CONFLICT DO NOTHING",
                values.join(", ")
            );
            fleetgate_store::with_pool!(self.db, pool => {
                let mut query = sqlx::query(&sql);
                for &i in batch {
                    let row = chunked_row(i);
                    query = query
                        .bind(row[0].as_str().unwrap().to_string())
                        .bind(i)
                        .bind(i)
                        .bind(i)
                        .bind(row[4].as_f64())
                        .bind(row[5].as_str().map(String::from))
                        .bind(i % 2 == 0)
                        .bind((!row[7].is_null()).then(|| row[7].to_string()))
                        .bind(i / 1000 * 1000);
                }
                query.execute(pool).await.unwrap();
            });
        }
    }
}

fn expected(seqs: &mut dyn Iterator<Item = i64>) -> Vec<Value> {
    seqs.map(chunked_row).collect()
}

// The cold tier's mechanics at a controlled clock, straight on the store:
// chunks keep every value exactly through compaction, promotion, a swap
// and an expiry that cuts a chunk in two, and they are smaller than the
// rows they hold.
on_both_backends!(cold_chunks_keep_rows_exactly_through_compaction_swaps_and_expiry);
async fn cold_chunks_keep_rows_exactly_through_compaction_swaps_and_expiry(backend: Backend) {
    let store = Chunked::open(backend).await;
    let (db, catalog, tiers, buckets) = (&store.db, &store.catalog, &store.tiers, &store.buckets);
    let stream = || store.stream();
    let insert = |seqs| store.insert(seqs);
    let read = || stream().read_from();
    insert(1..=CHUNKED_ROWS).await;

    // Rows received before 20,000 go cold: two chunks.
    let moved = tiers.move_cold(&stream(), 21_000).await.unwrap();
    assert_eq!(moved, 19_999);
    let stats = tiers.stats(&stream()).await.unwrap();
    assert_eq!(
        (stats.hot_rows, stats.cold_rows, stats.cold_chunks),
        (5_001, 19_999, 2)
    );
    assert_eq!(stats.cold_span, Some((1, 19_999)));
    let all = chunked_rows(db, &read()).await;
    same_rows(all.clone(), expected(&mut (1..=CHUNKED_ROWS)), line!());
    let raw: usize = all[..19_999].iter().map(|r| r.to_string().len()).sum();
    assert!(
        (stats.cold_bytes as usize) * 2 < raw,
        "{} bytes stored for {raw} bytes of rows",
        stats.cold_bytes
    );

    // A query bounded on received_at reads only the chunks it needs, and
    // the same rows: across the chunks' boundary, and in the hot tier.
    let tables = ["meter".to_string()].into_iter().collect();
    let bounded = |from: i64, to: i64| {
        let sql = format!(
            "SELECT device_id, received_at, seq, read_at, kwh, note, \
             CASE WHEN ok THEN 1 ELSE 0 END, extra FROM meter \
             WHERE received_at >= {from} AND received_at <= {to} ORDER BY seq"
        );
        let parsed = fleetgate_store::query::check(&sql, &tables, db.backend()).unwrap();
        fleetgate_store::expand::expand(&parsed, catalog, db.backend())
            .unwrap()
            .unwrap()
    };
    for (from, to) in [(9_990, 10_010), (19_990, 20_010), (1, 3), (24_000, 30_000)] {
        let sql = bounded(from, to);
        let chunks_read = if from > 20_000 {
            "fgc.last_at >= 24000"
        } else {
            "fgc.first_at <="
        };
        assert!(sql.contains(chunks_read), "{sql}");
        let rows = chunked_rows_of(db, &sql).await;
        same_rows(rows, expected(&mut (from..=to.min(CHUNKED_ROWS))), line!());
    }

    // Compacted while rows are cold, and more rows go cold meanwhile.
    assert!(catalog.compact("meter", "kwh").await.unwrap());
    same_rows(chunked_rows(db, &read()).await, all.clone(), line!());
    assert_eq!(tiers.move_cold(&stream(), 24_000).await.unwrap(), 3_000);
    same_rows(chunked_rows(db, &read()).await, all, line!());

    // A batch supersedes read_at 5,000 to 7,000: out of the first chunk,
    // into the superseded rows (kwh still compacted there).
    let swap = buckets.swap("meter", 5_000, 7_000, 42).await.unwrap();
    assert_eq!(swap.rows, 2_000);
    let superseded = chunked_rows(db, &stream().read_superseded()).await;
    same_rows(superseded.clone(), expected(&mut (5_000..7_000)), line!());
    // Reports read both, fields by name.
    same_rows(
        chunked_rows(db, &stream().read_with_superseded()).await,
        expected(&mut (1..=CHUNKED_ROWS)),
        line!(),
    );
    assert!(catalog.promote("meter", "kwh").await.unwrap());
    let kept = || (1..5_000).chain(7_000..=CHUNKED_ROWS);
    same_rows(
        chunked_rows(db, &read()).await,
        expected(&mut kept()),
        line!(),
    );
    same_rows(
        chunked_rows(db, &stream().read_superseded()).await,
        superseded,
        line!(),
    );

    // Re-sent: a cold key is stored once; one of a swapped bucket goes
    // to the superseded rows, once.
    insert(15_000..=15_000).await;
    insert(6_000..=6_000).await;
    same_rows(
        chunked_rows(db, &read()).await,
        expected(&mut kept()),
        line!(),
    );
    assert_eq!(
        chunked_rows(db, &stream().read_superseded()).await.len(),
        2_000
    );

    // The ttl (15s) at 30,000 cuts the second chunk at 15,000.
    let expired = tiers.expire(&stream(), 30_000).await.unwrap();
    assert_eq!(expired, 15_000 - 1 - 2_000);
    same_rows(
        chunked_rows(db, &read()).await,
        expected(&mut (15_000..=CHUNKED_ROWS)),
        line!(),
    );
    let stats = tiers.stats(&stream()).await.unwrap();
    assert_eq!(
        (stats.hot_rows, stats.cold_rows, stats.cold_chunks),
        (2_001, 8_000, 2)
    );
    assert_eq!(stats.cold_span, Some((15_000, 22_999)));
    // An expired key is free again: a record sent now is stored.
    insert(3..=3).await;
    assert_eq!(chunked_rows(db, &read()).await[0], chunked_row(3));
}

// A cold tier an earlier version kept as a plain table (the hot table's
// columns, and a trigger reading it) is packed into chunks at start-up,
// its rows and keys intact.
on_both_backends!(a_plain_cold_tier_from_an_earlier_version_is_packed_at_start);
async fn a_plain_cold_tier_from_an_earlier_version_is_packed_at_start(backend: Backend) {
    let store = Chunked::open(backend).await;
    store.insert(1..=12_000).await;
    let key = "fg_bucket, device_id, seq";
    let matches = "fgc_meter.fg_bucket = NEW.fg_bucket AND fgc_meter.device_id = NEW.device_id \
                   AND fgc_meter.seq = NEW.seq";
    let mut earlier = vec![
        "DROP TRIGGER IF EXISTS fgc_meter_once".to_string(),
        "DROP TABLE fgc_meter_keys".to_string(),
        "DROP TABLE fgc_meter".to_string(),
    ];
    match backend {
        Backend::Sqlite => earlier.extend([
            "CREATE TABLE fgc_meter AS SELECT * FROM meter WHERE 0".to_string(),
            format!("CREATE UNIQUE INDEX fgc_meter_key ON fgc_meter ({key})"),
            format!(
                "CREATE TRIGGER fgc_meter_once BEFORE INSERT ON meter \
                 WHEN EXISTS (SELECT 1 FROM fgc_meter WHERE {matches}) BEGIN SELECT RAISE(IGNORE); END"
            ),
        ]),
        Backend::Postgres => {
            earlier[0] = "DROP TRIGGER IF EXISTS fgc_meter_once ON meter".to_string();
            earlier.extend([
                "DROP FUNCTION IF EXISTS fgc_meter_once()".to_string(),
                "CREATE TABLE fgc_meter (LIKE meter INCLUDING ALL)".to_string(),
                format!(
                    "CREATE FUNCTION fgc_meter_once() RETURNS trigger LANGUAGE plpgsql AS $f$ \
                     BEGIN IF EXISTS (SELECT 1 FROM fgc_meter WHERE {matches}) THEN RETURN NULL; END IF; \
                     RETURN NEW; END $f$"
                ),
                "CREATE TRIGGER fgc_meter_once BEFORE INSERT ON meter FOR EACH ROW EXECUTE FUNCTION fgc_meter_once()".to_string(),
            ]);
        }
    }
    earlier.extend([
        "INSERT INTO fgc_meter SELECT * FROM meter WHERE received_at < 11000".to_string(),
        "DELETE FROM meter WHERE received_at < 11000".to_string(),
    ]);
    store.db.execute_ddl(&earlier).await.unwrap();

    let packed = store.tiers.pack_plain_cold_tiers().await.unwrap();
    assert_eq!(packed, 10_999);
    let stats = store.tiers.stats(&store.stream()).await.unwrap();
    assert_eq!(
        (stats.hot_rows, stats.cold_rows, stats.cold_chunks),
        (1_001, 10_999, 2)
    );
    same_rows(
        chunked_rows(&store.db, &store.stream().read_from()).await,
        expected(&mut (1..=12_000)),
        line!(),
    );
    // The keys came along: a re-sent cold record is still stored once.
    store.insert(5..=5).await;
    assert_eq!(
        chunked_rows(&store.db, &store.stream().read_from())
            .await
            .len(),
        12_000
    );
    // Nothing is left to pack, and the tier keeps moving. A hot row whose
    // key is cold already (as after a re-send that raced a move: here the
    // key is planted) is deleted, not packed a second time.
    assert_eq!(store.tiers.pack_plain_cold_tiers().await.unwrap(), 0);
    store
        .db
        .execute_ddl(&[
            "INSERT INTO fgc_meter_keys (fg_bucket, device_id, seq) VALUES (11000, 'm2', 11111)"
                .to_string(),
        ])
        .await
        .unwrap();
    assert_eq!(
        store
            .tiers
            .move_cold(&store.stream(), 12_500)
            .await
            .unwrap(),
        499
    );
    let stats = store.tiers.stats(&store.stream()).await.unwrap();
    assert_eq!((stats.hot_rows, stats.cold_rows), (501, 11_498));
}
