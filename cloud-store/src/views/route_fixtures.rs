//! Fixtures for the query router's rewrite rules: views declared as users
//! write them, a query over their stream, and the SQL run instead (or why
//! the view must not answer), on SQLite and PostgreSQL. In expected SQL,
//! `{name}` stands for what aggregate view `name` is read from
//! ([`ViewPlan::read_from`], spelled out in `what_views_are_read_from`),
//! and line breaks are single spaces.

use std::collections::HashSet;

use sqlparser::ast::{Query, SelectItem, SetExpr};

use super::{rewrite, rows, AutoSettings, ViewPlan, Views, ViewsFile};
use crate::db::{Backend, Db};
use crate::{query, Catalog};

const STREAM: &str = r#"
[streams.climate]
key = ["device_id", "seq"]
ttl = "30d"
fields.seq = { type = "int", required = true }
fields.celsius = { type = "float" }
fields.humidity = { type = "float" }
fields.room = { type = "string" }
fields.altitude_m = { type = "int" }
"#;

const HOURLY: &str = r#"
[views.hourly]
source = "climate"
group_by = ["device_id", "room"]
bucket = { column = "received_at", width = "1h" }
aggregates = { n = "count(*)", total = "sum(celsius)", mean = "avg(celsius)", low = "min(celsius)", high = "max(celsius)" }
"#;

const DAILY: &str = r#"
[views.daily]
source = "hourly"
group_by = ["device_id"]
bucket = { column = "received_at", width = "1d" }
aggregates = { n = "count(*)", high = "max(celsius)" }
"#;

/// Bucketed on an int field that may be negative (a width is a duration:
/// 100ms is 100).
const BY_ALTITUDE: &str = r#"
[views.by_altitude]
source = "climate"
bucket = { column = "altitude_m", width = "100ms" }
aggregates = { n = "count(*)" }
"#;

const BY_ROOM: &str = r#"
[views.by_room]
source = "climate"
key = ["room"]
fields = ["celsius"]
derived = { label = "concat(room, '/', device_id)" }
"#;

#[derive(Debug)]
enum Expect {
    /// The SQL run instead.
    Sql(&'static str),
    /// The view does not answer; its reason contains this.
    Refused(&'static str),
    /// (PostgreSQL) as on SQLite.
    Same,
}
use Expect::{Refused, Same, Sql};

/// The last view of `views` is asked to answer `query`.
struct Case {
    views: &'static [&'static str],
    query: &'static str,
    sqlite: Expect,
    postgres: Expect,
}

async fn climate() -> (tempfile::TempDir, Db, Catalog) {
    crate::catalog::scratch_store(STREAM).await
}

/// Plans each view in order, as [`Views::create`] does, for `backend`
/// (the catalog's own database is SQLite).
fn plans(catalog: &Catalog, views: &[&str], backend: Backend) -> Vec<ViewPlan> {
    let mut plans: Vec<ViewPlan> = Vec::new();
    for (name, def) in ViewsFile::parse(&views.concat()).unwrap().views {
        let over = plans.iter().find(|p| p.name == def.source).cloned();
        let stream = catalog.get(over.as_ref().map_or(&def.source, |o| &o.stream));
        let mut plan = ViewPlan::new(&name, &def, &stream.unwrap(), over.as_ref()).unwrap();
        plan.backend = backend;
        plans.push(plan);
    }
    plans
}

/// The query as the query guard parses it, and its result column names.
fn parse(sql: &str, backend: Backend) -> (Box<Query>, Vec<String>) {
    let query = query::check(sql, &HashSet::from(["climate".to_string()]), backend).unwrap();
    let SetExpr::Select(select) = query.body.as_ref() else {
        panic!("{sql}: not a SELECT")
    };
    let names = select.projection.iter().map(|item| match item {
        SelectItem::ExprWithAlias { alias, .. } => alias.value.clone(),
        other => other.to_string(),
    });
    let names = names.collect();
    (query, names)
}

/// `sql` with an aggregate view's [`ViewPlan::read_from`] as `{name}`.
fn placeholder(sql: String, plan: &ViewPlan) -> String {
    match plan.rows {
        Some(_) => sql,
        None => sql.replace(&plan.read_from(), &format!("{{{}}}", plan.name)),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

async fn check(cases: &[Case]) {
    let (_dir, _db, catalog) = climate().await;
    let leads = rows::table_leads(&catalog.get("climate").unwrap());
    let mut failures = Vec::new();
    for case in cases {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let expect = match (backend, &case.postgres) {
                (Backend::Sqlite, _) | (_, Same) => &case.sqlite,
                (_, postgres) => postgres,
            };
            let plans = plans(&catalog, case.views, backend);
            let asked = plans.last().unwrap();
            let (query, names) = parse(case.query, backend);
            let got = rewrite::rewrite(&query, asked, &names, backend, &leads)
                .map(|sql| placeholder(sql, asked));
            let fits = match (expect, &got) {
                (Sql(want), Ok(sql)) => *sql == one_line(want),
                (Refused(why), Err(reason)) => reason.contains(why),
                _ => false,
            };
            if !fits {
                failures.push(format!(
                    "{backend:?}, view {}: {}\n  expected {expect:?}\n  got      {got:?}",
                    asked.name,
                    one_line(case.query)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

#[tokio::test]
async fn aggregate_views_answer_what_their_partials_hold() {
    check(&[
        // The view's own groups and buckets.
        Case {
            views: &[HOURLY],
            query: "SELECT device_id, room, received_at / 3600000 * 3600000 AS hour, count(*) AS n,
                    avg(celsius) AS mean FROM climate
                    GROUP BY device_id, room, received_at / 3600000 * 3600000",
            sqlite: Sql(r#"SELECT device_id AS "device_id", room AS "room", fg_bucket AS "hour",
                COALESCE(CAST(sum(fg_rows) AS BIGINT), 0) AS "n",
                CASE WHEN sum(celsius__n) > 0 THEN CAST(sum(celsius__sum) AS REAL) / sum(celsius__n) END AS "mean"
                FROM {hourly} GROUP BY device_id, room, fg_bucket"#),
            postgres: Sql(r#"SELECT device_id AS "device_id", room AS "room", fg_bucket AS "hour",
                COALESCE(CAST(sum(fg_rows) AS BIGINT), 0) AS "n",
                CASE WHEN sum(celsius__n) > 0 THEN sum(celsius__sum) / sum(celsius__n) END AS "mean"
                FROM {hourly} GROUP BY device_id, room, fg_bucket"#),
        },
        // Coarser buckets: days of hours.
        Case {
            views: &[HOURLY],
            query: "SELECT device_id, received_at / 86400000 * 86400000 AS day, sum(celsius) AS total,
                    min(celsius) AS low, max(celsius) AS high FROM climate
                    GROUP BY device_id, received_at / 86400000 * 86400000",
            sqlite: Sql(r#"SELECT device_id AS "device_id", (fg_bucket / 86400000) * 86400000 AS "day",
                CASE WHEN sum(celsius__n) > 0 THEN sum(celsius__sum) END AS "total",
                min(celsius__min) AS "low", max(celsius__max) AS "high"
                FROM {hourly} GROUP BY device_id, (fg_bucket / 86400000) * 86400000"#),
            postgres: Same,
        },
        // Fewer groups: the whole fleet per hour.
        Case {
            views: &[HOURLY],
            query: "SELECT received_at / 3600000 * 3600000 AS hour, count(celsius) AS readings
                    FROM climate GROUP BY received_at / 3600000 * 3600000 ORDER BY hour",
            sqlite: Sql(r#"SELECT fg_bucket AS "hour", COALESCE(CAST(sum(celsius__n) AS BIGINT), 0) AS "readings"
                FROM {hourly} GROUP BY fg_bucket ORDER BY "hour""#),
            postgres: Same,
        },
        // A filter on a group, and a time range on bucket boundaries (either way round).
        Case {
            views: &[HOURLY],
            query: "SELECT device_id, count(*) AS n FROM climate WHERE room = 'lab'
                    AND 1767225600000 <= received_at AND received_at < 1767312000000
                    GROUP BY device_id",
            sqlite: Sql(r#"SELECT device_id AS "device_id", COALESCE(CAST(sum(fg_rows) AS BIGINT), 0) AS "n"
                FROM {hourly} WHERE (room = 'lab') AND fg_bucket >= 1767225600000
                AND fg_bucket < 1767312000000 GROUP BY device_id"#),
            postgres: Same,
        },
        // HAVING, ORDER BY a result's name, LIMIT.
        Case {
            views: &[HOURLY],
            query: "SELECT room, max(celsius) AS high FROM climate WHERE device_id IN ('t1', 't2')
                    GROUP BY room HAVING count(*) > 10 ORDER BY high DESC LIMIT 3",
            sqlite: Sql(r#"SELECT room AS "room", max(celsius__max) AS "high" FROM {hourly}
                WHERE (device_id IN ('t1', 't2')) GROUP BY room
                HAVING (COALESCE(CAST(sum(fg_rows) AS BIGINT), 0) > 10) ORDER BY "high" DESC LIMIT 3"#),
            postgres: Same,
        },
        // Positive bounds on a column that may be negative: whole buckets.
        Case {
            views: &[BY_ALTITUDE],
            query: "SELECT count(*) AS n FROM climate WHERE altitude_m >= 100 AND altitude_m < 1000",
            sqlite: Sql(r#"SELECT COALESCE(CAST(sum(fg_rows) AS BIGINT), 0) AS "n" FROM {by_altitude}
                WHERE fg_bucket >= 100 AND fg_bucket < 1000"#),
            postgres: Same,
        },
    ])
    .await;
}

#[tokio::test]
async fn aggregate_views_refuse_what_their_partials_do_not_hold() {
    let refused = |query, why| Case {
        views: &[HOURLY],
        query,
        sqlite: Refused(why),
        postgres: Same,
    };
    check(&[
        refused(
            "SELECT device_id, count(*) AS n FROM climate WHERE humidity > 50 GROUP BY device_id",
            "column humidity is not one the view groups by (device_id, room)",
        ),
        refused(
            "SELECT count(*) AS n FROM climate WHERE received_at >= 1767225660000",
            "1767225660000 is not on a 3600000 ms bucket boundary",
        ),
        refused(
            "SELECT count(*) AS n FROM climate WHERE received_at <= 1767225600000",
            "only >= and < bounds on received_at keep whole buckets",
        ),
        refused(
            "SELECT device_id, max(humidity) AS wettest FROM climate GROUP BY device_id",
            "the view keeps no partials of humidity",
        ),
        refused(
            "SELECT received_at / 60000 * 60000 AS minute, count(*) AS n FROM climate
             GROUP BY received_at / 60000 * 60000",
            "the query's bucket 60000 is not a multiple of the view's 3600000",
        ),
    ])
    .await;
}

/// Integer division truncates towards zero, so bucket 0 holds -99..=99:
/// `altitude_m >= 0` as `fg_bucket >= 0` counts -99..=-1 too (and `< 0`
/// misses them), on both databases.
#[tokio::test]
async fn a_bound_of_zero_splits_bucket_zero() {
    let altitude = |query, expect| Case {
        views: &[BY_ALTITUDE],
        query,
        sqlite: expect,
        postgres: Same,
    };
    check(&[
        altitude(
            "SELECT count(*) AS n FROM climate WHERE altitude_m >= 0",
            Refused("altitude_m >= 0: altitude_m may be negative"),
        ),
        altitude(
            "SELECT count(*) AS n FROM climate WHERE altitude_m < 0",
            Refused("bucket 0 holds -99 to 99"),
        ),
        altitude(
            "SELECT count(*) AS n FROM climate WHERE 0 <= altitude_m",
            Refused("only a bound above 0 keeps whole buckets"),
        ),
        // Below 0, bucket -100 holds -199..=-100: -100 is inside it.
        altitude(
            "SELECT count(*) AS n FROM climate WHERE altitude_m >= -100",
            Refused("altitude_m >= -100: altitude_m may be negative"),
        ),
        altitude(
            "SELECT count(*) AS n FROM climate WHERE altitude_m < -200",
            Refused("only a bound above 0 keeps whole buckets"),
        ),
        altitude(
            "SELECT count(*) AS n FROM climate WHERE altitude_m > -100",
            Refused("only >= and < bounds on altitude_m keep whole buckets"),
        ),
        altitude(
            "SELECT count(*) AS n FROM climate WHERE altitude_m <= 0",
            Refused("only >= and < bounds on altitude_m keep whole buckets"),
        ),
        altitude(
            "SELECT count(*) AS n FROM climate WHERE altitude_m BETWEEN -100 AND 99",
            Refused("column altitude_m is not one the view groups by"),
        ),
        altitude(
            "SELECT count(*) AS n FROM climate WHERE altitude_m >= 150",
            Refused("150 is not on a 100 ms bucket boundary"),
        ),
        // Still answered: bounds above 0 on boundaries, either way round...
        altitude(
            "SELECT count(*) AS n FROM climate WHERE 200 <= altitude_m AND altitude_m < 300",
            Sql(
                r#"SELECT COALESCE(CAST(sum(fg_rows) AS BIGINT), 0) AS "n" FROM {by_altitude}
                WHERE fg_bucket >= 200 AND fg_bucket < 300"#,
            ),
        ),
        // ...a filter on the bucket itself (it compares what the view holds)...
        altitude(
            "SELECT count(*) AS n FROM climate WHERE altitude_m / 100 * 100 >= 0",
            Sql(
                r#"SELECT COALESCE(CAST(sum(fg_rows) AS BIGINT), 0) AS "n" FROM {by_altitude}
                WHERE (fg_bucket >= 0)"#,
            ),
        ),
        // ...and 0 on received_at, which is never negative.
        Case {
            views: &[HOURLY],
            query: "SELECT count(*) AS n FROM climate WHERE received_at >= 0",
            sqlite: Sql(
                r#"SELECT COALESCE(CAST(sum(fg_rows) AS BIGINT), 0) AS "n" FROM {hourly}
                WHERE fg_bucket >= 0"#,
            ),
            postgres: Same,
        },
    ])
    .await;
}

#[tokio::test]
async fn rows_views_answer_filters_on_their_key() {
    const ROOM_INDEX: &str = r#"
[views.room_index]
source = "climate"
key = ["room"]
refresh = { every = "30s" }
"#;
    check(&[
        Case {
            views: &[BY_ROOM],
            query: "SELECT device_id, seq, celsius * 1.8 + 32 AS f FROM climate WHERE room = 'lab'
                    ORDER BY f DESC LIMIT 10",
            sqlite: Sql(
                r#"SELECT device_id AS "device_id", seq AS "seq", celsius * 1.8 + 32 AS "f"
                FROM fgv_by_room AS climate WHERE room = 'lab' ORDER BY f DESC LIMIT 10"#,
            ),
            postgres: Same,
        },
        // A derived expression, written as declared, is read from its column.
        Case {
            views: &[BY_ROOM],
            query: "SELECT concat(room, '/', device_id) AS label, avg(celsius) AS mean FROM climate
                    WHERE room IN ('lab', 'hall') GROUP BY concat(room, '/', device_id)",
            sqlite: Sql(
                r#"SELECT label AS "label", avg(celsius) AS "mean" FROM fgv_by_room AS climate
                WHERE room IN ('lab', 'hall') GROUP BY label"#,
            ),
            postgres: Same,
        },
        // An index: the rows' keys by room (periodic: its tail too).
        Case {
            views: &[ROOM_INDEX],
            query: "SELECT device_id, seq FROM climate WHERE room = 'lab'",
            sqlite: Sql(
                r#"SELECT device_id AS "device_id", seq AS "seq" FROM (SELECT * FROM fgv_room_index
                UNION ALL SELECT * FROM fgv_room_index_tail) AS climate WHERE room = 'lab'"#,
            ),
            postgres: Same,
        },
        Case {
            views: &[BY_ROOM],
            query: "SELECT celsius FROM climate WHERE device_id = 't1'",
            sqlite: Refused("does not filter on room, the view's leading key"),
            postgres: Same,
        },
        Case {
            views: &[BY_ROOM],
            query: "SELECT humidity FROM climate WHERE room = 'lab'",
            sqlite: Refused("column humidity is not in the view"),
            postgres: Same,
        },
    ])
    .await;
}

/// A result alias counts as a column of the view everywhere, not only in
/// ORDER BY: the view then reads the alias (SQLite, in WHERE) or fails.
#[tokio::test]
async fn rows_views_do_not_take_aliases_for_columns_they_lack() {
    check(&[
        // Run: the table gives the humid rows; the view's WHERE reads
        // `room > 50`, true of every text: all of lab's rows.
        Case {
            views: &[BY_ROOM],
            query: "SELECT room AS humidity FROM climate WHERE room = 'lab' AND humidity > 50",
            sqlite: Refused("column humidity is not in the view"),
            postgres: Same,
        },
        // Run on the view: "no such column: humidity".
        Case {
            views: &[BY_ROOM],
            query: "SELECT max(humidity) AS humidity FROM climate WHERE room = 'lab'",
            sqlite: Refused("column humidity is not in the view"),
            postgres: Same,
        },
        // The table groups by its humidity, the view would by the alias.
        Case {
            views: &[BY_ROOM],
            query: "SELECT room AS humidity, count(*) AS n FROM climate WHERE room = 'lab'
                    GROUP BY humidity",
            sqlite: Refused("only as an ORDER BY key"),
            postgres: Same,
        },
        // Within an ORDER BY expression SQLite reads the table's column.
        Case {
            views: &[BY_ROOM],
            query: "SELECT room AS humidity FROM climate WHERE room = 'lab' ORDER BY humidity + 0",
            sqlite: Refused("column humidity is not in the view"),
            postgres: Same,
        },
        // A whole ORDER BY key names the result on both: still answered.
        Case {
            views: &[BY_ROOM],
            query: "SELECT room AS humidity, celsius FROM climate WHERE room = 'lab'
                    ORDER BY humidity DESC, celsius",
            sqlite: Sql(
                r#"SELECT room AS "humidity", celsius AS "celsius" FROM fgv_by_room AS climate
                WHERE room = 'lab' ORDER BY humidity DESC, celsius"#,
            ),
            postgres: Same,
        },
    ])
    .await;
}

#[tokio::test]
async fn views_over_views_answer_as_their_stream() {
    const BY_LABEL: &str = r#"
[views.by_label]
source = "by_room"
key = ["label"]
fields = ["celsius"]
"#;
    check(&[
        Case {
            views: &[HOURLY, DAILY],
            query: "SELECT device_id, received_at / 604800000 * 604800000 AS week,
                    max(celsius) AS high FROM climate
                    GROUP BY device_id, received_at / 604800000 * 604800000",
            sqlite: Sql(
                r#"SELECT device_id AS "device_id", (fg_bucket / 604800000) * 604800000 AS "week",
                max(celsius__max) AS "high" FROM {daily}
                GROUP BY device_id, (fg_bucket / 604800000) * 604800000"#,
            ),
            postgres: Same,
        },
        Case {
            views: &[HOURLY, DAILY],
            query: "SELECT device_id, received_at / 3600000 * 3600000 AS hour, count(*) AS n
                    FROM climate GROUP BY device_id, received_at / 3600000 * 3600000",
            sqlite: Refused("the query's bucket 3600000 is not a multiple of the view's 86400000"),
            postgres: Same,
        },
        // A rows view keyed on its source view's derived column.
        Case {
            views: &[BY_ROOM, BY_LABEL],
            query: "SELECT seq, celsius FROM climate WHERE concat(room, '/', device_id) = 'lab/t1'",
            sqlite: Sql(
                r#"SELECT seq AS "seq", celsius AS "celsius" FROM fgv_by_label AS climate
                WHERE label = 'lab/t1'"#,
            ),
            postgres: Same,
        },
    ])
    .await;
}

#[tokio::test]
async fn what_views_are_read_from() {
    let (_dir, _db, catalog) = climate().await;
    let read_from = |views: &str, backend| plans(&catalog, &[views], backend)[0].read_from();
    // Realtime on SQLite: the table up to the watermark, and the rows after
    // it less those a sweep under way merged (device_id is the first key).
    let watermark = "(SELECT * FROM fgv_hourly UNION ALL SELECT device_id, room,
        (received_at / 3600000) * 3600000, count(*), count(celsius), COALESCE(sum(celsius), 0),
        min(celsius), max(celsius) FROM climate
        WHERE rowid > (SELECT upto FROM fleetgate_view_marks WHERE name = 'hourly')
        AND NOT (rowid <= COALESCE((SELECT sweep_to FROM fleetgate_view_marks WHERE name = 'hourly'), -1)
        AND (device_id IS NULL
        OR COALESCE(device_id <= (SELECT swept_through FROM fleetgate_view_marks WHERE name = 'hourly'), 0)))
        GROUP BY 1, 2, 3) AS fgv";
    assert_eq!(read_from(HOURLY, Backend::Sqlite), one_line(watermark));
    // Realtime on PostgreSQL: the table up to the cut, and the rows of
    // transactions the cut does not see.
    let cut = "(SELECT * FROM fgv_hourly UNION ALL SELECT device_id, room,
        (received_at / 3600000) * 3600000, count(*), count(celsius), COALESCE(sum(celsius), 0),
        min(celsius), max(celsius) FROM climate
        WHERE fg_insert_xid >= fleetgate_view_floor('hourly')
        AND (fg_insert_xid >= (SELECT fleetgate_view_ceiling('hourly'))
        OR fg_insert_xid = ANY ((SELECT fleetgate_view_in_progress('hourly'))::bigint[]))
        GROUP BY 1, 2, 3) AS fgv";
    assert_eq!(read_from(HOURLY, Backend::Postgres), one_line(cut));
    let tally = "[views.tally]\nsource = \"climate\"\naggregates = { n = \"count(*)\" }\n";
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let every = format!("{tally}refresh = {{ every = \"30s\" }}\n");
        let periodic = "(SELECT * FROM fgv_tally UNION ALL SELECT * FROM fgv_tally_tail) AS fgv";
        assert_eq!(read_from(&every, backend), periodic);
        let on_demand = format!("{tally}refresh = \"on_demand\"\n");
        assert_eq!(read_from(&on_demand, backend), "fgv_tally");
    }
}

/// Creates `views` in a store (SQLite) and routes `query` as the API does:
/// the view picked (`None`: the primary table), the SQL run, and why each
/// view answers or not.
async fn route(views: &[&str], query: &str) -> (Option<String>, String, Vec<String>) {
    let (_dir, db, catalog) = climate().await;
    let store = Views::open(db, catalog, AutoSettings::off()).await.unwrap();
    let file = ViewsFile::parse(&views.concat()).unwrap();
    store.create(&file).await.unwrap();
    let (parsed, names) = parse(query, Backend::Sqlite);
    let route = store.route(query, &parsed, &names);
    let picked = store
        .plans()
        .into_iter()
        .find(|p| Some(&p.name) == route.view.as_ref());
    let sql = picked.map_or(route.sql.clone(), |plan| placeholder(route.sql, &plan));
    let reasons = route
        .candidates
        .iter()
        .map(|c| format!("{}: {}", c.view, c.reason));
    (route.view, sql, reasons.collect())
}

const BY_DAY: &str = "SELECT device_id, received_at / 86400000 * 86400000 AS day, count(*) AS n
                      FROM climate GROUP BY device_id, received_at / 86400000 * 86400000";

#[tokio::test]
async fn route_picks_the_cheapest_view_that_answers() {
    let (view, sql, reasons) = route(&[HOURLY, DAILY], BY_DAY).await;
    assert_eq!(view.as_deref(), Some("daily"));
    assert_eq!(
        sql,
        one_line(
            r#"SELECT device_id AS "device_id", fg_bucket AS "day",
               COALESCE(CAST(sum(fg_rows) AS BIGINT), 0) AS "n" FROM {daily} GROUP BY device_id, fg_bucket"#
        )
    );
    assert_eq!(
        reasons,
        [
            "daily: answers the query exactly",
            "hourly: answers the query, but daily is cheaper"
        ]
    );
    // None answers: the query runs on the stream as written.
    let wettest = "SELECT device_id, max(humidity) AS wettest FROM climate GROUP BY device_id";
    let (view, sql, reasons) = route(&[HOURLY, DAILY], wettest).await;
    assert_eq!((view, sql.as_str()), (None, wettest));
    assert_eq!(
        reasons,
        [
            "daily: the view keeps no partials of humidity, so not max(humidity)",
            "hourly: the view keeps no partials of humidity, so not max(humidity)"
        ]
    );
}

#[tokio::test]
async fn route_picks_a_view_with_its_own_ttl_first() {
    const ARCHIVE: &str = r#"
[views.archive]
source = "climate"
group_by = ["device_id", "room"]
bucket = { column = "received_at", width = "1h" }
aggregates = { n = "count(*)" }
ttl = "400d"
"#;
    let (view, sql, reasons) = route(&[HOURLY, DAILY, ARCHIVE], BY_DAY).await;
    assert_eq!(view.as_deref(), Some("archive"));
    assert_eq!(
        sql,
        one_line(
            r#"SELECT device_id AS "device_id", (fg_bucket / 86400000) * 86400000 AS "day",
               COALESCE(CAST(sum(fg_rows) AS BIGINT), 0) AS "n" FROM {archive}
               GROUP BY device_id, (fg_bucket / 86400000) * 86400000"#
        )
    );
    assert_eq!(
        reasons,
        [
            "archive: answers the query, with the buckets it keeps for 400d (after the stream's rows expire)",
            "daily: answers the query, but archive keeps more history",
            "hourly: answers the query, but archive keeps more history"
        ]
    );
}
