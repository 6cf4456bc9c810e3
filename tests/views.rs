//! Declared views: a query over a stream is answered from a view when one
//! can answer it exactly, and then gives what the primary table gives, on
//! randomized records (late, duplicated, NULLs) and randomized queries, for
//! each refresh cycle. Bad declarations change nothing.

use serde_json::{json, Value};

use crate::harness::{fleetgate, publish_acked, Backend, Server};
use crate::on_both_backends;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
/// A Monday, midnight UTC: buckets of every width start here.
const START: i64 = 1_795_046_400_000;

const VIEWS: &str = r#"
[views.hourly]
source = "temperature"
group_by = ["device_id"]
bucket = { column = "taken_at", width = "1h" }
aggregates = { readings = "count(*)", mean = "avg(celsius)", low = "min(celsius)", high = "max(celsius)" }
refresh = "realtime"

[views.daily_status]
source = "temperature"
group_by = ["status"]
bucket = { column = "taken_at", width = "1d" }
aggregates = { readings = "count(*)", wettest = "max(humidity)", total = "sum(humidity)" }
refresh = { every = "1s" }

[views.per_device]
source = "temperature"
group_by = ["device_id", "status"]
aggregates = { readings = "count(*)", mean = "avg(humidity)", first_seq = "min(seq)" }
refresh = "on_demand"
"#;

/// splitmix64: reproducible randomness from a printed seed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const DEVICES: [&str; 3] = ["t1", "t2", "t3"];

/// Records for `device`, seq `from..to`: taken over three days in random
/// order (late ones included), some without humidity or status.
fn records(random: &mut Random, from: i64, to: i64) -> Vec<String> {
    (from..to)
        .map(|seq| {
            let mut record = json!({
                "seq": seq,
                "celsius": (random.below(1300) as f64) / 10.0 - 10.0,
                "taken_at": START + random.below(3 * DAY as u64) as i64,
            });
            if random.chance(80) {
                record["humidity"] = json!(random.below(1000) as f64 / 10.0);
            }
            if random.chance(90) {
                record["status"] = json!(random.pick(&["ok", "warn", "fault"]));
            }
            record.to_string()
        })
        .collect()
}

async fn ingest(server: &Server, tokens: &[String], random: &mut Random, from: i64, to: i64) {
    for (device, token) in DEVICES.iter().zip(tokens) {
        let batch = records(random, from, to);
        publish_acked(
            server,
            device,
            token,
            &format!("ingest/temperature/{device}"),
            &batch,
        )
        .await;
        // A device re-sends some records after a reconnect: stored once,
        // and counted once by every view.
        publish_acked(
            server,
            device,
            token,
            &format!("ingest/temperature/{device}"),
            &batch[..batch.len() / 5],
        )
        .await;
    }
}

/// A random aggregate query some view may answer, and one no view can.
fn random_query(random: &mut Random) -> String {
    let bucket = *random.pick(&[HOUR, 2 * HOUR, 6 * HOUR, DAY]);
    let bucket_expr = format!("(taken_at / {bucket}) * {bucket}");
    let groupings: &[&[&str]] = &[
        &["device_id"],
        &["status"],
        &["device_id", "status"],
        &[],
        &["device_id", "@bucket"],
        &["status", "@bucket"],
        &["@bucket"],
    ];
    let group: Vec<String> = random
        .pick(groupings)
        .iter()
        .map(|g| {
            if *g == "@bucket" {
                bucket_expr.clone()
            } else {
                g.to_string()
            }
        })
        .collect();
    let aggregates = [
        "count(*)",
        "avg(celsius)",
        "min(celsius)",
        "max(celsius)",
        "sum(humidity)",
        "max(humidity)",
        "count(humidity)",
        "avg(humidity)",
        "min(seq)",
        "max(celsius) - min(celsius)",
    ];
    let mut select: Vec<String> = group.clone();
    let chosen = 1 + random.below(3);
    for i in 0..chosen {
        select.push(format!("{} AS a{i}", random.pick(&aggregates)));
    }
    let mut filters = Vec::new();
    if random.chance(40) {
        filters.push(format!("device_id = '{}'", random.pick(&DEVICES)));
    }
    if random.chance(40) {
        let day = START + DAY * random.below(3) as i64;
        filters.push(format!("taken_at >= {day}"));
        filters.push(format!("taken_at < {}", day + DAY));
    }
    if random.chance(20) {
        filters.push("status IN ('ok', 'warn')".to_string());
    }
    let mut sql = format!("SELECT {} FROM temperature", select.join(", "));
    if !filters.is_empty() {
        sql.push_str(&format!(" WHERE {}", filters.join(" AND ")));
    }
    if !group.is_empty() {
        sql.push_str(&format!(" GROUP BY {}", group.join(", ")));
    }
    sql
}

/// Rows as comparable text, floats to 9 significant digits: the view sums
/// in a different order than a scan of the table.
fn normalized(body: &Value) -> Vec<String> {
    let mut rows: Vec<String> = body["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("no rows in {body}"))
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| match v.as_f64() {
                    Some(f) if v.is_f64() => format!("{f:.9e}"),
                    _ => v.to_string(),
                })
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect();
    rows.sort();
    rows
}

/// The same query on the primary table: views never answer a subquery.
async fn on_primary(server: &Server, sql: &str) -> Value {
    let body = server
        .query(&format!("SELECT * FROM ({sql}) AS primary_only"))
        .await;
    assert_eq!(body["view"], Value::Null);
    body
}

async fn compare_random_queries(server: &Server, random: &mut Random, rounds: usize) -> usize {
    compare_queries_of(server, random, rounds, random_query).await
}

/// Runs `rounds` queries `generate` makes, each routed and on the primary
/// table, and checks they agree; returns how many went through a view.
async fn compare_queries_of(
    server: &Server,
    random: &mut Random,
    rounds: usize,
    generate: fn(&mut Random) -> String,
) -> usize {
    let mut through_views = 0;
    for _ in 0..rounds {
        let sql = generate(random);
        let routed = server.query(&sql).await;
        let primary = on_primary(server, &sql).await;
        assert_eq!(routed["columns"], primary["columns"], "{sql}");
        assert_eq!(
            normalized(&routed),
            normalized(&primary),
            "{sql} through {} differs from the primary table",
            routed["view"]
        );
        if !routed["view"].is_null() {
            through_views += 1;
        }
    }
    through_views
}

/// A server with the temperature stream and an ingest token per device,
/// and randomness from a printed seed.
async fn seeded_server(backend: Backend) -> (Server, Vec<String>, Random) {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("random seed {seed}");
    let server = Server::with_temperature(backend).await;
    let tokens = add_devices(&server).await;
    (server, tokens, Random(seed))
}

on_both_backends!(views_answer_random_queries_exactly_as_the_primary_table);
async fn views_answer_random_queries_exactly_as_the_primary_table(backend: Backend) {
    let (server, tokens, mut random) = seeded_server(backend).await;
    // Rows before the views exist are taken in when they are created;
    // rows after, by each refresh cycle.
    ingest(&server, &tokens, &mut random, 1, 120).await;
    let views = server.data_dir().join("views.toml");
    std::fs::write(&views, VIEWS).unwrap();
    let (ok, out, err) = fleetgate(&server, &["view", "create", views.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("hourly: created"), "{out}");

    let mut through_views = compare_random_queries(&server, &mut random, 30).await;
    ingest(&server, &tokens, &mut random, 120, 240).await;
    // Straight after ingest: the periodic view's tail is not folded yet,
    // and the on-demand view has not been asked.
    through_views += compare_random_queries(&server, &mut random, 30).await;
    // About a fifth fit a view; the rest prove the routing refuses what a
    // view cannot answer exactly.
    assert!(
        through_views >= 5,
        "only {through_views} of 60 random queries went through a view"
    );

    // Each refresh cycle answers the queries made for it.
    for (sql, view) in [
        (
            "SELECT device_id, (taken_at / 3600000) * 3600000 AS hour, avg(celsius) FROM temperature GROUP BY device_id, (taken_at / 3600000) * 3600000",
            "hourly",
        ),
        (
            "SELECT status, max(humidity) FROM temperature WHERE taken_at >= 1795046400000 GROUP BY status",
            "daily_status",
        ),
        (
            "SELECT device_id, count(*), avg(humidity) FROM temperature GROUP BY device_id",
            "per_device",
        ),
    ] {
        let routed = server.query(sql).await;
        assert_eq!(routed["view"], view, "{sql}");
        assert_eq!(normalized(&routed), normalized(&on_primary(&server, sql).await));
    }
    let listed = server
        .api("GET", "/v1/views", Some(&server.admin), None)
        .await
        .1;
    let stored = server.count("SELECT count(*) FROM temperature").await;
    assert_eq!(stored, 3 * 239, "duplicates are stored once");

    // The periodic view's folder empties its tail while ingest goes on,
    // and the realtime view's folds take in the rows after its watermark;
    // folded, they still answer as the primary table does (every row
    // counted once, late ones included).
    for view in ["daily_status", "hourly"] {
        wait_until_folded(&server, view).await;
    }
    let daily = "SELECT status, (taken_at / 86400000) * 86400000 AS day, count(*), max(humidity), sum(humidity) FROM temperature GROUP BY status, (taken_at / 86400000) * 86400000";
    let hourly = "SELECT device_id, (taken_at / 3600000) * 3600000 AS hour, count(*), min(celsius), max(celsius), avg(celsius) FROM temperature GROUP BY device_id, (taken_at / 3600000) * 3600000";
    for (sql, view) in [(daily, "daily_status"), (hourly, "hourly")] {
        let routed = server.query(sql).await;
        assert_eq!(routed["view"], view);
        assert_eq!(
            normalized(&routed),
            normalized(&on_primary(&server, sql).await)
        );
    }
    // More rows after the fold, late ones among them: queries straight
    // after see them (unfolded), and the next fold takes them in.
    ingest(&server, &tokens, &mut random, 240, 300).await;
    let routed = server.query(hourly).await;
    assert_eq!(routed["view"], "hourly");
    assert_eq!(
        normalized(&routed),
        normalized(&on_primary(&server, hourly).await)
    );
    compare_random_queries(&server, &mut random, 20).await;
    for view in listed["views"].as_array().unwrap() {
        assert!(view["rows"].as_i64().unwrap() > 0, "{view}");
        assert!(view["bytes"].as_i64().unwrap() > 0, "{view}");
        assert_eq!(view["origin"], "declared");
    }
}

on_both_backends!(explain_names_the_view_and_why_the_others_do_not_fit);
async fn explain_names_the_view_and_why_the_others_do_not_fit(backend: Backend) {
    let server = Server::with_temperature(backend).await;
    let token = server.add_device("t1", "ingest").await;
    let mut random = Random(7);
    publish_acked(
        &server,
        "t1",
        &token,
        "ingest/temperature/t1",
        &records(&mut random, 1, 50),
    )
    .await;
    let (status, body) = server.post_text("/v1/views", &server.admin, VIEWS).await;
    assert_eq!(status, 200, "{body}");

    let sql = "SELECT device_id, max(celsius) FROM temperature GROUP BY device_id";
    let (status, explained) = server
        .api(
            "POST",
            "/v1/query/explain",
            Some(&server.admin),
            Some(json!({ "sql": sql })),
        )
        .await;
    assert_eq!(status, 200, "{explained}");
    assert_eq!(explained["view"], "hourly", "{explained}");
    let reasons: Vec<(String, bool, String)> = explained["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["view"].as_str().unwrap().to_string(),
                c["usable"].as_bool().unwrap(),
                c["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        reasons
            .iter()
            .any(|(v, usable, why)| v == "daily_status" && !usable && why.contains("device_id")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|(v, usable, why)| v == "per_device" && !usable && why.contains("celsius")),
        "{reasons:?}"
    );
    let (ok, out, _) = fleetgate(&server, &["query", "--explain", sql]);
    assert!(ok && out.contains("\"view\": \"hourly\""), "{out}");

    // Rows are not aggregates, and a filter off a bucket boundary would
    // split buckets: both stay on the primary table.
    for sql in [
        "SELECT * FROM temperature",
        "SELECT device_id, count(*) FROM temperature WHERE taken_at >= 1795046400001 GROUP BY device_id",
        "SELECT device_id, count(*) FROM temperature WHERE celsius > 20 GROUP BY device_id",
    ] {
        let body = server.query(sql).await;
        assert_eq!(body["view"], Value::Null, "{sql}");
    }

    // Dropped, the query goes back to the primary table, with the same answer.
    let before = server.query(sql).await;
    assert_eq!(before["view"], "hourly");
    let (ok, _, err) = fleetgate(&server, &["view", "drop", "hourly"]);
    assert!(ok, "{err}");
    let after = server.query(sql).await;
    assert_eq!(after["view"], Value::Null);
    assert_eq!(normalized(&before), normalized(&after));
    let (ok, out, _) = fleetgate(&server, &["view", "list"]);
    assert!(
        ok && !out.contains("hourly") && out.contains("per_device"),
        "{out}"
    );
}

on_both_backends!(bad_views_are_refused_and_change_nothing);
async fn bad_views_are_refused_and_change_nothing(backend: Backend) {
    let server = Server::with_temperature(backend).await;
    let good = "[views.v1]\nsource = \"temperature\"\ngroup_by = [\"device_id\"]\naggregates = { n = \"count(*)\" }\n";
    let (status, body) = server.post_text("/v1/views", &server.admin, good).await;
    assert_eq!(status, 200, "{body}");
    let cases = [
        ("not toml [", "invalid views TOML"),
        ("[views.v2]\nsource = \"nope\"\naggregates = { n = \"count(*)\" }\n", "unknown source \\\"nope\\\" (neither a stream nor a view)"),
        ("[views.v2]\nsource = \"v1\"\ngroup_by = [\"status\"]\naggregates = { n = \"count(*)\" }\n", "is not grouped by \\\"status\\\""),
        ("[views.v2]\nsource = \"temperature\"\ngroup_by = [\"nope\"]\naggregates = { n = \"count(*)\" }\n", "\\\"nope\\\" is not a column"),
        ("[views.v2]\nsource = \"temperature\"\naggregates = { m = \"median(celsius)\" }\n", "cannot be maintained incrementally"),
        ("[views.v2]\nsource = \"temperature\"\naggregates = { m = \"count(distinct device_id)\" }\n", "distinct"),
        ("[views.v2]\nsource = \"temperature\"\naggregates = { m = \"avg(label)\" }\n", "does not fit"),
        ("[views.v2]\nsource = \"temperature\"\nbucket = { column = \"label\", width = \"1h\" }\naggregates = { n = \"count(*)\" }\n", "bucket column"),
        ("[views.v2]\nsource = \"temperature\"\naggregates = { n = \"count(*)\" }\nrefresh = \"sometimes\"\n", "refresh"),
        ("[views.v2]\nsource = \"temperature\"\naggregates = {}\n", "declare aggregates"),
        // Rows views and views over views.
        ("[views.v2]\nsource = \"temperature\"\nkey = [\"status\"]\nfields = [\"nope\"]\n", "\\\"nope\\\" is not a column"),
        ("[views.v2]\nsource = \"temperature\"\nkey = [\"status\"]\naggregates = { n = \"count(*)\" }\n", "not both"),
        ("[views.v2]\nsource = \"temperature\"\nkey = [\"status\"]\nderived = { x = \"pg_sleep(celsius)\" }\n", "not supported in derived"),
        ("[views.v2]\nsource = \"temperature\"\nkey = [\"status\"]\nderived = { x = \"celsius + label\" }\n", "needs numbers"),
        ("[views.v2]\nsource = \"v1\"\nkey = [\"device_id\"]\n", "must aggregate too"),
        ("[views.v2]\nsource = \"temperature\"\nkey = [\"status\"]\nderived = { x = \"celsius / humidity\" }\n", "zero divisor"),
        ("[views.v2]\nsource = \"temperature\"\nkey = [\"status\"]\nderived = { x = \"round(celsius, 2)\" }\n", "takes 1 argument"),
        ("[views.v2]\nsource = \"v3\"\naggregates = { n = \"count(*)\" }\n[views.v3]\nsource = \"v2\"\naggregates = { n = \"count(*)\" }\n", "cycle"),
        ("[views.v2]\nsource = \"v1\"\naggregates = { m = \"max(celsius)\" }\n", "keeps no partials of \\\"celsius\\\""),
    ];
    for (toml, expected) in cases {
        let (status, body) = server.post_text("/v1/views", &server.admin, toml).await;
        assert_eq!(status, 400, "{toml}: {body}");
        assert!(body.to_string().contains(expected), "{toml}: {body}");
    }
    // A taken name is not a bad declaration: a conflict.
    let taken = "[views.v1]\nsource = \"temperature\"\naggregates = { n = \"count(*)\" }\n";
    let (status, body) = server.post_text("/v1/views", &server.admin, taken).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("view v1 exists"), "{body}");
    let listed = server
        .api("GET", "/v1/views", Some(&server.admin), None)
        .await
        .1;
    let names: Vec<&str> = listed["views"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["v1"]);

    let analyst = server.add_device("a1", "extract").await;
    let (status, _) = server
        .post_text("/v1/views", &analyst, &good.replace("v1", "v3"))
        .await;
    assert_eq!(status, 403, "only admins declare views");
    let (status, _) = server
        .api("DELETE", "/v1/views/v1", Some(&analyst), None)
        .await;
    assert_eq!(status, 403);
    let (status, _) = server
        .api("DELETE", "/v1/views/nope", Some(&server.admin), None)
        .await;
    assert_eq!(status, 404);
    // A view others are built on stays until they go.
    let over = "[views.v4]\nsource = \"v1\"\naggregates = { n = \"count(*)\" }\n";
    let (status, body) = server.post_text("/v1/views", &server.admin, over).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server
        .api("DELETE", "/v1/views/v1", Some(&server.admin), None)
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("v4 is built on v1"), "{body}");
    let (status, _) = server
        .api("DELETE", "/v1/views/v4", Some(&server.admin), None)
        .await;
    assert_eq!(status, 200);
    let (status, body) = server
        .api(
            "POST",
            "/v1/query/explain",
            Some(&analyst),
            Some(json!({ "sql": "SELEC nothing" })),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    // The view still works.
    let body = server
        .query("SELECT device_id, count(*) FROM temperature GROUP BY device_id")
        .await;
    assert_eq!(body["view"], "v1");
}

fn shape_decision<'a>(shapes: &'a Value, measured: &str) -> Option<&'a str> {
    shapes["shapes"]
        .as_array()?
        .iter()
        .find(|s| s["shape"].as_str().is_some_and(|k| k.contains(measured)))?["decision"]
        .as_str()
}

/// A server with the temperature stream whose automatic views come after
/// 3 runs of any cost, for a view keeping `min_gain` times fewer rows.
async fn auto_views_server(backend: Backend, min_gain: &str, extra: &[&str]) -> Server {
    let mut args = vec![
        "--auto-views-budget",
        "10MiB",
        "--auto-views-after",
        "3",
        "--auto-views-min-cost",
        "0ms",
        "--auto-views-min-gain",
        min_gain,
    ];
    args.extend_from_slice(extra);
    let server = Server::start_with(backend, &args).await;
    let (status, body) = server.apply_streams(crate::harness::TEMPERATURE).await;
    assert_eq!(status, 200, "{body}");
    server
}

/// Registers [`DEVICES`] as ingest devices; their tokens, in order.
async fn add_devices(server: &Server) -> Vec<String> {
    let mut tokens = Vec::new();
    for device in DEVICES {
        tokens.push(server.add_device(device, "ingest").await);
    }
    tokens
}

on_both_backends!(recurring_queries_get_an_automatic_view_that_is_dropped_when_unused);
async fn recurring_queries_get_an_automatic_view_that_is_dropped_when_unused(backend: Backend) {
    let server = auto_views_server(backend, "5", &["--auto-views-unused", "3s"]).await;
    let tokens = add_devices(&server).await;
    let mut random = Random(11);
    ingest(&server, &tokens, &mut random, 1, 301).await;

    // A dashboard asks the same thing again and again, for one device or
    // another: one shape. The primary table answers until a view exists.
    let recurring = |device: &str| {
        format!(
            "SELECT device_id, avg(celsius), max(celsius), count(*) FROM temperature \
             WHERE device_id = '{device}' GROUP BY device_id"
        )
    };
    // Grouped by seq, a view would keep 300 rows for 900: not worth it.
    let unprofitable = "SELECT seq, sum(humidity) FROM temperature GROUP BY seq";
    for device in DEVICES {
        assert_eq!(server.query(&recurring(device)).await["view"], Value::Null);
        assert_eq!(server.query(unprofitable).await["view"], Value::Null);
    }

    let shapes = server
        .wait_for("/v1/views/shapes", "decisions on both shapes", |b| {
            shape_decision(b, "measured[celsius]").is_some_and(|d| d.starts_with("created"))
                && shape_decision(b, "measured[humidity]")
                    .is_some_and(|d| !d.starts_with("watching"))
        })
        .await;
    let decision = shape_decision(&shapes, "measured[humidity]").unwrap();
    assert!(decision.contains("300 rows for 900"), "{decision}");
    let listed = server
        .api("GET", "/v1/views", Some(&server.admin), None)
        .await
        .1;
    let views = listed["views"].as_array().unwrap();
    assert_eq!(
        views.len(),
        1,
        "only the profitable shape earns a view: {listed}"
    );
    let auto = &views[0];
    assert_eq!(auto["origin"], "auto", "{auto}");
    // Its queries read rows that had just arrived.
    assert_eq!(auto["refresh"], "realtime", "{auto}");
    assert_eq!(auto["rows"], 3, "one row per device: {auto}");
    assert!(auto["bytes"].as_i64().unwrap() > 0, "{auto}");
    let name = auto["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("auto_temperature_"), "{name}");

    // Routed to it from now on, for any device, with what the table says,
    // also for rows that arrive after it was made.
    ingest(&server, &tokens, &mut random, 301, 341).await;
    for device in DEVICES {
        let sql = recurring(device);
        let routed = server.query(&sql).await;
        assert_eq!(routed["view"], name.as_str(), "{sql}");
        assert_eq!(
            normalized(&routed),
            normalized(&on_primary(&server, &sql).await)
        );
    }
    let (ok, out, err) = fleetgate(&server, &["view", "shapes"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains(&format!("created view {name}")), "{out}");
    // A shape seen once says what would earn it a view.
    server.query("SELECT max(seq) FROM temperature").await;
    let shapes = server
        .wait_for("/v1/views/shapes", "the new shape", |b| {
            shape_decision(b, "bucket[] measured[seq]").is_some()
        })
        .await;
    let decision = shape_decision(&shapes, "bucket[] measured[seq]").unwrap();
    assert!(
        decision.starts_with(
            "watching: a view is considered once this shape runs on the primary table"
        ),
        "{decision}"
    );

    // Nobody asks any more: dropped after --auto-views-unused, and the
    // query goes back to the primary table with the same answer.
    server
        .wait_for("/v1/views", "the unused automatic view to go", |b| {
            b["views"].as_array().is_some_and(|v| v.is_empty())
        })
        .await;
    let sql = recurring("t2");
    let routed = server.query(&sql).await;
    assert_eq!(routed["view"], Value::Null);
    assert_eq!(
        normalized(&routed),
        normalized(&on_primary(&server, &sql).await)
    );
    assert!(
        server.log().contains("automatic view dropped"),
        "{}",
        server.log()
    );
}

on_both_backends!(a_fleet_wide_query_summing_a_per_device_view_earns_a_fleet_level_view);
/// A dashboard's fleet-wide hourly average, answered by summing a
/// per-device view's partials, reads a row per device and hour; recurring,
/// it earns a view of its own with a row per hour.
async fn a_fleet_wide_query_summing_a_per_device_view_earns_a_fleet_level_view(backend: Backend) {
    let server = auto_views_server(backend, "2", &[]).await;
    let hourly = r#"
[views.hourly]
source = "temperature"
group_by = ["device_id"]
bucket = { column = "taken_at", width = "1h" }
aggregates = { readings = "count(*)", mean = "avg(celsius)" }
refresh = "realtime"
"#;
    let (status, body) = server.post_text("/v1/views", &server.admin, hourly).await;
    assert_eq!(status, 200, "{body}");
    let tokens = add_devices(&server).await;
    let mut random = Random(23);
    ingest(&server, &tokens, &mut random, 1, 301).await;

    let fleet = format!(
        "SELECT taken_at / {HOUR} * {HOUR} AS hour, avg(celsius) AS mean, count(*) AS n \
         FROM temperature GROUP BY taken_at / {HOUR} * {HOUR} ORDER BY hour"
    );
    for _ in 0..3 {
        assert_eq!(server.query(&fleet).await["view"], "hourly");
    }
    let shapes = server
        .wait_for(
            "/v1/views/shapes",
            "a decision on the fleet-wide shape",
            |b| {
                b["shapes"].as_array().is_some_and(|shapes| {
                    shapes.iter().any(|s| {
                        s["view_runs"].as_i64() >= Some(3)
                            && s["decision"]
                                .as_str()
                                .is_some_and(|d| !d.starts_with("watching"))
                    })
                })
            },
        )
        .await;
    let decision = shapes["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|s| {
            s["decision"]
                .as_str()
                .filter(|d| !d.starts_with("watching"))
        })
        .unwrap();
    assert!(
        decision.starts_with("created view auto_temperature_"),
        "{decision}"
    );
    let listed = server
        .api("GET", "/v1/views", Some(&server.admin), None)
        .await
        .1;
    let auto = listed["views"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["origin"] == "auto")
        .unwrap_or_else(|| panic!("an automatic view: {listed}"));
    let per_device = listed["views"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "hourly")
        .unwrap();
    assert!(
        auto["rows"].as_i64().unwrap() * 2 <= per_device["rows"].as_i64().unwrap(),
        "a row per hour, not per device and hour: {listed}"
    );

    // From now on the fleet-level view answers, with what the table says,
    // rows that arrived after it was made included.
    ingest(&server, &tokens, &mut random, 301, 341).await;
    let routed = server.query(&fleet).await;
    assert_eq!(routed["view"], auto["name"], "{routed}");
    assert_eq!(
        normalized(&routed),
        normalized(&on_primary(&server, &fleet).await)
    );
}

on_both_backends!(the_automatic_view_budget_bounds_and_turns_off_automatic_views);
async fn the_automatic_view_budget_bounds_and_turns_off_automatic_views(backend: Backend) {
    let flags = |budget: &'static str| {
        [
            "--auto-views-budget",
            budget,
            "--auto-views-after",
            "2",
            "--auto-views-min-cost",
            "0ms",
            "--auto-views-min-gain",
            "2",
        ]
    };
    let sql = "SELECT device_id, min(celsius) FROM temperature GROUP BY device_id";
    for budget in ["100B", "0"] {
        let server = Server::start_with(backend, &flags(budget)).await;
        let (status, body) = server.apply_streams(crate::harness::TEMPERATURE).await;
        assert_eq!(status, 200, "{body}");
        let token = server.add_device("t1", "ingest").await;
        let mut random = Random(5);
        publish_acked(
            &server,
            "t1",
            &token,
            "ingest/temperature/t1",
            &records(&mut random, 1, 100),
        )
        .await;
        for _ in 0..3 {
            assert_eq!(server.query(sql).await["view"], Value::Null);
        }
        if budget == "0" {
            // Off: not even logged.
            let shapes = server
                .api("GET", "/v1/views/shapes", Some(&server.admin), None)
                .await
                .1;
            assert_eq!(shapes["shapes"], json!([]), "{shapes}");
        } else {
            let shapes = server
                .wait_for("/v1/views/shapes", "the budget decision", |b| {
                    shape_decision(b, "measured[celsius]")
                        .is_some_and(|d| !d.starts_with("watching"))
                })
                .await;
            let decision = shape_decision(&shapes, "measured[celsius]").unwrap();
            assert!(decision.starts_with("over budget"), "{decision}");
        }
        let listed = server
            .api("GET", "/v1/views", Some(&server.admin), None)
            .await
            .1;
        assert_eq!(listed["views"], json!([]), "{listed}");
    }
}

const ROW_VIEWS: &str = r#"
[views.by_status]
source = "temperature"
key = ["status"]
fields = ["celsius", "taken_at", "humidity"]
derived = { tag = "concat(device_id, '/', status)", fahrenheit = "celsius * 1.8 + 32" }

[views.status_index]
source = "temperature"
key = ["status", "taken_at"]
refresh = { every = "1s" }

[views.by_tag]
source = "by_status"
key = ["tag"]
fields = ["fahrenheit"]
refresh = "on_demand"

[views.hourly_by_status]
source = "temperature"
group_by = ["device_id", "status"]
bucket = { column = "taken_at", width = "1h" }
aggregates = { n = "count(*)", high = "max(celsius)", total = "sum(humidity)" }

[views.daily_by_device]
source = "hourly_by_status"
group_by = ["device_id"]
bucket = { column = "taken_at", width = "1d" }
aggregates = { n = "count(*)", high = "max(celsius)" }
refresh = "on_demand"
"#;

/// A random query a rows view may answer (it filters on status), or not.
fn random_row_query(random: &mut Random) -> String {
    let filter = random.pick(&[
        "status = 'ok'",
        "status IN ('ok', 'fault')",
        "status > 'ok'",
        "status LIKE 'w%'",
        "status = 'warn' AND taken_at >= 1795100000000",
        "celsius > 20",
    ]);
    let (select, tail) = *random.pick(&[
        (
            "device_id, seq, celsius",
            " ORDER BY device_id, seq LIMIT 7",
        ),
        (
            "concat(device_id, '/', status) AS tag, celsius * 1.8 + 32",
            "",
        ),
        ("count(*), avg(celsius), max(humidity)", ""),
        ("seq, taken_at", ""),
        ("status, count(*)", " GROUP BY status"),
        ("device_id, label", ""),
    ]);
    format!("SELECT {select} FROM temperature WHERE {filter}{tail}")
}

on_both_backends!(rows_views_and_views_over_views_answer_as_the_primary_table);
async fn rows_views_and_views_over_views_answer_as_the_primary_table(backend: Backend) {
    let (server, tokens, mut random) = seeded_server(backend).await;
    ingest(&server, &tokens, &mut random, 1, 80).await;
    let (status, body) = server
        .post_text("/v1/views", &server.admin, ROW_VIEWS)
        .await;
    assert_eq!(status, 200, "{body}");
    ingest(&server, &tokens, &mut random, 80, 160).await;

    let through_views = compare_queries_of(&server, &mut random, 40, random_row_query).await;
    assert!(
        through_views >= 10,
        "only {through_views} of 40 went through a view"
    );

    // Each kind answers what it is for: the narrowest that can.
    for (sql, view) in [
        ("SELECT seq, taken_at FROM temperature WHERE status = 'warn'", "status_index"),
        ("SELECT device_id, humidity FROM temperature WHERE status = 'ok'", "by_status"),
        (
            "SELECT celsius * 1.8 + 32 FROM temperature WHERE concat(device_id, '/', status) = 't1/ok'",
            "by_tag",
        ),
        (
            "SELECT device_id, (taken_at / 86400000) * 86400000 AS day, count(*), max(celsius) FROM temperature \
             GROUP BY device_id, (taken_at / 86400000) * 86400000",
            "daily_by_device",
        ),
    ] {
        let routed = server.query(sql).await;
        assert_eq!(routed["view"], view, "{sql}: {routed}");
        assert!(!routed["rows"].as_array().unwrap().is_empty(), "{sql}");
        assert_eq!(normalized(&routed), normalized(&on_primary(&server, sql).await), "{sql}");
    }
    // Without a filter on its key, a rows view would read every row: the
    // table answers, and explain says why.
    let (status, body) = server
        .api(
            "POST",
            "/v1/query/explain",
            Some(&server.admin),
            Some(json!({ "sql": "SELECT device_id, celsius FROM temperature WHERE celsius > 20" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["view"], Value::Null, "{body}");
    let reason = body["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["view"] == "by_status")
        .unwrap()["reason"]
        .to_string();
    assert!(reason.contains("does not filter on status"), "{reason}");
    let (_, listed) = server
        .api("GET", "/v1/views", Some(&server.admin), None)
        .await;
    let by_tag = listed["views"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "by_tag")
        .unwrap();
    assert_eq!(
        (&by_tag["kind"], &by_tag["built_on"]),
        (&json!("rows"), &json!("by_status"))
    );
    assert_eq!(by_tag["source"], "temperature");
    // The command line names the view it is built on.
    let (ok, out, err) = fleetgate(&server, &["view", "list"]);
    assert!(ok, "{err}");
    let line = out.lines().find(|l| l.starts_with("by_tag ")).unwrap();
    assert!(
        line.contains("| rows ") && line.contains("| view by_status "),
        "{out}"
    );
}

/// How many rows a view's folder has yet to take in, as `GET /v1/views`
/// lists it.
async fn unfolded(server: &Server, view: &str) -> i64 {
    let listed = server
        .api("GET", "/v1/views", Some(&server.admin), None)
        .await
        .1;
    let view = listed["views"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == view)
        .unwrap_or_else(|| panic!("{view} not listed: {listed}"))
        .clone();
    view["unfolded"].as_i64().unwrap()
}

async fn wait_until_folded(server: &Server, view: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while unfolded(server, view).await > 0 {
        assert!(std::time::Instant::now() < deadline, "{view} never folded");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// PostgreSQL commits transactions out of the order of their ids: a
/// transaction that took its id before others may commit its rows after
/// the view has folded theirs. A realtime view takes those rows in too,
/// once: through the view a query answers as the primary table does
/// straight after the late commit and after the next fold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_realtime_view_takes_in_a_commit_made_out_of_xid_order() {
    use sqlx::Connection;
    if crate::harness::postgres_url().is_none() {
        eprintln!("skipped: DATABASE_URL is not set, so this PostgreSQL test did not run");
        return;
    }
    let server = Server::with_temperature(Backend::Postgres).await;
    let token = server.add_device("t1", "ingest").await;
    let hourly = VIEWS.split("[views.daily_status]").next().unwrap();
    let (status, body) = server.post_text("/v1/views", &server.admin, hourly).await;
    assert_eq!(status, 200, "{body}");

    // A writer takes its transaction id now and commits last.
    let mut early = sqlx::PgConnection::connect(&server.database_url().unwrap())
        .await
        .unwrap();
    let mut late = early.begin().await.unwrap();
    let xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *late)
        .await
        .unwrap();

    let mut random = Random(11);
    let topic = "ingest/temperature/t1";
    publish_acked(&server, "t1", &token, topic, &records(&mut random, 1, 60)).await;
    wait_until_folded(&server, "hourly").await;
    let committed_after: String = sqlx::query_scalar(
        "SELECT fg_insert_xid::text FROM temperature ORDER BY fg_insert_xid DESC LIMIT 1",
    )
    .fetch_one(&mut *late)
    .await
    .unwrap();
    assert!(
        committed_after.parse::<i64>().unwrap() > xid.parse::<i64>().unwrap(),
        "the ingest commits took later ids ({committed_after}) than the early writer ({xid})"
    );

    for seq in 1000..1020 {
        sqlx::query(
            "INSERT INTO temperature (device_id, received_at, seq, celsius, taken_at) \
             VALUES ('t1', $1, $2, $3, $4)",
        )
        .bind(START + seq)
        .bind(seq)
        .bind(seq as f64 / 100.0)
        .bind(START + (seq % 48) * HOUR)
        .execute(&mut *late)
        .await
        .unwrap();
    }
    late.commit().await.unwrap();

    let sql = "SELECT device_id, (taken_at / 3600000) * 3600000 AS hour, count(*), min(celsius), max(celsius), avg(celsius) FROM temperature GROUP BY device_id, (taken_at / 3600000) * 3600000";
    let check = || async {
        let routed = server.query(sql).await;
        assert_eq!(routed["view"], "hourly");
        assert_eq!(
            normalized(&routed),
            normalized(&on_primary(&server, sql).await)
        );
        let total = "SELECT count(*) FROM temperature";
        let counted = server.query(total).await;
        assert_eq!(counted["view"], "hourly", "{counted}");
        assert_eq!(counted["rows"][0][0], 59 + 20, "{counted}");
    };
    // Folded or not yet (the folder runs every second): the same answer.
    eprintln!(
        "unfolded after the late commit: {}",
        unfolded(&server, "hourly").await
    );
    check().await;
    wait_until_folded(&server, "hourly").await;
    check().await;
}
