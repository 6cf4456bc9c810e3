//! The PostgreSQL wire endpoint, driven by the clients people query it
//! with besides psql and psycopg (tests/pgwire.rs): node-postgres,
//! SQLAlchemy with pandas, and Grafana's PostgreSQL data source (its SQL
//! replayed with psycopg). Each test says it was skipped, and why, when a
//! client is missing; `.ci/run` installs them all.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

use crate::harness::{publish_acked, Backend, Server, TEMPERATURE};
use crate::pgwire::{pg_port, psycopg_available, text};

/// A write, which the guard refuses.
const WRITE: &str = "INSERT INTO temperature (device_id, seq, celsius) VALUES ('x', 9, 1.0)";
/// A query that never ends on its own: stopped at `--query-timeout`.
const RUNAWAY: &str =
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";

/// A server (with `extra_args`) holding `temperature` and six readings 40 s
/// apart, `taken_at` from 10:00:40 UTC on 2026-03-01; returns it with the
/// tokens of `sensor-1` (ingest) and `analyst-1` (extract).
async fn readings(backend: Backend, extra_args: &[&str]) -> (Server, String, String) {
    let server = Server::start_with(backend, extra_args).await;
    let (status, body) = server.apply_streams(TEMPERATURE).await;
    assert_eq!(status, 200, "{body}");
    let sensor = server.add_device("sensor-1", "ingest").await;
    let analyst = server.add_device("analyst-1", "extract").await;
    let payloads: Vec<String> = (1..=6)
        .map(|i| {
            let taken_at = chrono::DateTime::from_timestamp(1_772_359_200 + 40 * i, 0).unwrap();
            json!({
                "seq": i, "celsius": 20.5 + i as f64, "status": "ok", "door_open": i % 2 == 0,
                "taken_at": taken_at.to_rfc3339(), "label": format!("it's {i}"),
            })
            .to_string()
        })
        .collect();
    publish_acked(
        &server,
        "sensor-1",
        &sensor,
        "ingest/temperature/sensor-1",
        &payloads,
    )
    .await;
    (server, sensor, analyst)
}

/// Checks what `refusals` (a client's JSON answer) says each refused
/// attempt got: the write, the runaway query and the ingest device's login.
fn assert_refused(refusals: &Value) {
    let write = &refusals["write"];
    assert_eq!(write["code"], "42000", "{refusals}");
    assert!(
        write["message"]
            .as_str()
            .unwrap()
            .contains("only SELECT queries are allowed"),
        "{refusals}"
    );
    let runaway = &refusals["runaway"];
    assert_eq!(runaway["code"], "57014", "{refusals}");
    assert!(
        runaway["message"]
            .as_str()
            .unwrap()
            .contains("did not finish"),
        "{refusals}"
    );
    assert!(
        refusals["ingest"]["message"]
            .as_str()
            .unwrap()
            .contains("needs the extract role"),
        "{refusals}"
    );
}

/// Runs `client`, which prints the row count of `temperature` on its open
/// session, waits for a line on stdin, queries again and prints `closed: …`
/// or `still open`; revokes the analyst in between.
async fn assert_revocation_closes_session(server: &Server, mut client: Command) {
    let mut child = client
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next_line = |child: &mut std::process::Child| match lines.next() {
        Some(Ok(line)) => line,
        _ => {
            let mut stderr = String::new();
            let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr);
            panic!("the client printed nothing more: {stderr}");
        }
    };
    assert_eq!(next_line(&mut child), "6");
    let (status, body) = server
        .api(
            "POST",
            "/v1/devices/analyst-1/revoke",
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let after = next_line(&mut child);
    let _ = child.wait();
    assert!(after.starts_with("closed:"), "{after}");
    // Closed by the revocation itself, not only refused at the next query.
    assert!(
        server.log().contains("pg: registry change; session closed"),
        "{}",
        server.log()
    );
}

fn json_of(output: &Output) -> Value {
    let (stdout, stderr) = text(output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"))
}

// node-postgres

/// Where `.ci/run` installs node-postgres (`npm ci` of package-lock.json).
fn node_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/node")
}

fn node_postgres_available() -> bool {
    let found = Command::new("node")
        .args(["-e", "require('pg')"])
        .current_dir(node_dir())
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!(
            "skipped: node or node-postgres is missing (install Node.js, then npm ci --prefix tests/clients/node)"
        );
    }
    found
}

/// `node -e script` with node-postgres at hand and its connection settings
/// in the environment (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE), as `user`.
fn node(server: &Server, user: &str, password: &str, script: &str) -> Command {
    let mut command = Command::new("node");
    command
        .args(["-e", script])
        .current_dir(node_dir())
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg_port(server))
        .env("PGUSER", user)
        .env("PGPASSWORD", password)
        .env("PGDATABASE", "fleetgate");
    command
}

crate::on_both_backends!(node_postgres_binds_parameters_and_reads_typed_rows);
async fn node_postgres_binds_parameters_and_reads_typed_rows(backend: Backend) {
    if !node_postgres_available() {
        return;
    }
    let (server, _, analyst) = readings(backend, &[]).await;
    // node-postgres sends parameters untyped, as text: a time goes as epoch
    // milliseconds, as stored (a Date would go as text).
    let script = r#"
const { Client } = require('pg');
(async () => {
  const client = new Client();
  await client.connect();
  const result = await client.query(
    'SELECT seq, celsius, door_open, label, taken_at, device_id FROM temperature ' +
    'WHERE seq >= $1 AND label <> $2 AND taken_at >= $3 ORDER BY seq',
    [2, 'nothing', Date.UTC(2026, 2, 1, 10, 2, 0)]);
  const first = result.rows[0];
  console.log(JSON.stringify({
    oids: result.fields.map(f => f.dataTypeID),
    types: Object.values(first).map(v => v instanceof Date ? 'Date' : typeof v),
    seqs: result.rows.map(r => Number(r.seq)),
    first: { ...first, taken_at: first.taken_at.toISOString() },
  }));
  await client.end();
})().catch(e => { console.error(e); process.exit(1); });
"#;
    let answer = json_of(
        &node(&server, "analyst-1", &analyst, script)
            .output()
            .unwrap(),
    );
    // int8, float8, bool, text, timestamptz, text; node-postgres gives an
    // int8 as a string (as it does from PostgreSQL itself).
    assert_eq!(
        answer["oids"],
        json!([20, 701, 16, 25, 1184, 25]),
        "{answer}"
    );
    assert_eq!(
        answer["types"],
        json!(["string", "number", "boolean", "string", "Date", "string"])
    );
    assert_eq!(answer["seqs"], json!([3, 4, 5, 6]));
    assert_eq!(
        answer["first"],
        json!({"seq": "3", "celsius": 23.5, "door_open": false, "label": "it's 3",
               "taken_at": "2026-03-01T10:02:00.000Z", "device_id": "sensor-1"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_is_refused_writes_ingest_tokens_and_overlong_queries() {
    if !node_postgres_available() {
        return;
    }
    let (server, sensor, analyst) = readings(Backend::Sqlite, &["--query-timeout", "1s"]).await;
    let script = r#"
const { Client } = require('pg');
async function refusal(config, sql) {
  const client = new Client(config);
  try {
    await client.connect();
    await client.query(sql);
    return null;
  } catch (e) {
    return { code: e.code, message: e.message };
  } finally {
    await client.end().catch(() => {});
  }
}
(async () => {
  console.log(JSON.stringify({
    write: await refusal({}, process.env.WRITE),
    runaway: await refusal({}, process.env.RUNAWAY),
    ingest: await refusal({ user: 'sensor-1', password: process.env.SENSOR }, 'SELECT 1'),
  }));
})();
"#;
    let started = std::time::Instant::now();
    let output = node(&server, "analyst-1", &analyst, script)
        .env("WRITE", WRITE)
        .env("RUNAWAY", RUNAWAY)
        .env("SENSOR", &sensor)
        .output()
        .unwrap();
    assert_refused(&json_of(&output));
    assert!(started.elapsed().as_secs() < 10, "{:?}", started.elapsed());
    assert_eq!(server.count("SELECT count(*) FROM temperature").await, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_session_ends_when_the_device_is_revoked() {
    if !node_postgres_available() {
        return;
    }
    let (server, _, analyst) = readings(Backend::Sqlite, &[]).await;
    let script = r#"
const { Client } = require('pg');
(async () => {
  const client = new Client();
  client.on('error', () => {}); // the next query reports the session's end
  await client.connect();
  console.log((await client.query('SELECT count(*) AS n FROM temperature')).rows[0].n);
  await new Promise(resolve => process.stdin.once('data', resolve));
  try {
    await client.query('SELECT count(*) FROM temperature');
    console.log('still open');
  } catch (e) {
    console.log('closed: ' + e.message.replace(/\n/g, ' '));
  }
  process.exit(0);
})();
"#;
    assert_revocation_closes_session(&server, node(&server, "analyst-1", &analyst, script)).await;
}

// SQLAlchemy (with psycopg) and pandas

fn sqlalchemy_available() -> bool {
    let found = Command::new("python3")
        .args([
            "-c",
            "import pandas, sqlalchemy.dialects.postgresql.psycopg",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!(
            "skipped: python3 with SQLAlchemy 2, pandas and psycopg is not installed (pip install 'sqlalchemy>=2' pandas 'psycopg[binary]', or apt-get install python3-sqlalchemy python3-pandas python3-psycopg)"
        );
    }
    found
}

/// `python3 -c script` with `PG_URL` the SQLAlchemy URL for `user`.
fn sqlalchemy(server: &Server, user: &str, password: &str, script: &str) -> Command {
    let mut command = Command::new("python3");
    command.args(["-c", script]).env(
        "PG_URL",
        format!(
            "postgresql+psycopg://{user}:{password}@127.0.0.1:{}/fleetgate?connect_timeout=10",
            pg_port(server)
        ),
    );
    command
}

crate::on_both_backends!(sqlalchemy_pandas_read_sql_binds_parameters_and_types_columns);
async fn sqlalchemy_pandas_read_sql_binds_parameters_and_types_columns(backend: Backend) {
    if !sqlalchemy_available() {
        return;
    }
    let (server, _, analyst) = readings(backend, &[]).await;
    // Connecting runs SQLAlchemy's own introspection (version, schema,
    // isolation level, hstore type) first.
    let script = r#"
import os, json
import pandas as pd
from sqlalchemy import create_engine, inspect, text

engine = create_engine(os.environ["PG_URL"])
with engine.connect() as conn:
    frame = pd.read_sql(
        text("SELECT seq, celsius, door_open, label, taken_at FROM temperature "
             "WHERE seq >= :low AND label <> :label ORDER BY seq"),
        conn, params={"low": 3, "label": "it's 4"})
    kinds = {"int": pd.api.types.is_integer_dtype, "float": pd.api.types.is_float_dtype,
             "bool": pd.api.types.is_bool_dtype, "datetime": pd.api.types.is_datetime64_any_dtype,
             "string": pd.api.types.is_string_dtype}
    try:
        inspect(conn).get_columns("fleetgate_devices")
        hidden = "listed"
    except Exception as e:
        hidden = type(e).__name__
    print(json.dumps({
        "dtypes": {c: [k for k, is_kind in kinds.items() if is_kind(t)][0] for c, t in frame.dtypes.items()},
        "timezone": str(frame["taken_at"].dt.tz),
        "seqs": frame["seq"].tolist(),
        "celsius": frame["celsius"].tolist(),
        "first_taken_at": frame["taken_at"].iloc[0].isoformat(),
        "tables": inspect(conn).get_table_names(),
        "has_temperature": inspect(conn).has_table("temperature"),
        "has_devices": inspect(conn).has_table("fleetgate_devices"),
        "columns": {c["name"]: [str(c["type"]), c["nullable"]]
                    for c in inspect(conn).get_columns("temperature")},
        "hidden_columns": hidden,
    }))
"#;
    let answer = json_of(
        &sqlalchemy(&server, "analyst-1", &analyst, script)
            .output()
            .unwrap(),
    );
    assert_eq!(
        answer["dtypes"],
        json!({"seq": "int", "celsius": "float", "door_open": "bool", "label": "string", "taken_at": "datetime"})
    );
    assert_eq!(answer["timezone"], "UTC");
    assert_eq!(answer["seqs"], json!([3, 5, 6]));
    assert_eq!(answer["celsius"], json!([23.5, 25.5, 26.5]));
    assert_eq!(answer["first_taken_at"], "2026-03-01T10:02:00+00:00");
    // SQLAlchemy's table listing: what the caller may query, nothing internal.
    assert_eq!(answer["tables"], json!(["temperature"]));
    assert_eq!(answer["has_temperature"], true);
    assert_eq!(answer["has_devices"], false);
    // Its column listing: the stream's columns with their SQL types.
    assert_eq!(
        answer["columns"],
        json!({
            "device_id": ["TEXT", true],
            "received_at": ["TIMESTAMP", true],
            "seq": ["BIGINT", true],
            "celsius": ["DOUBLE PRECISION", true],
            "humidity": ["DOUBLE PRECISION", true],
            "status": ["TEXT", true],
            "door_open": ["BOOLEAN", true],
            "taken_at": ["TIMESTAMP", true],
            "label": ["TEXT", true],
            "extra": ["TEXT", true],
        })
    );
    assert_eq!(answer["hidden_columns"], "NoSuchTableError");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlalchemy_is_refused_writes_ingest_tokens_and_overlong_queries() {
    if !sqlalchemy_available() {
        return;
    }
    let (server, sensor, analyst) = readings(Backend::Sqlite, &["--query-timeout", "1s"]).await;
    let ingest_url = format!(
        "postgresql+psycopg://sensor-1:{sensor}@127.0.0.1:{}/fleetgate",
        pg_port(&server)
    );
    let script = r#"
import os, json
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

def refusal(url, sql):
    try:
        with create_engine(url).connect() as conn:
            conn.execute(text(sql))
    except DBAPIError as e:
        return {"code": getattr(e.orig, "sqlstate", None), "message": str(e.orig)}

print(json.dumps({
    "write": refusal(os.environ["PG_URL"], os.environ["WRITE"]),
    "runaway": refusal(os.environ["PG_URL"], os.environ["RUNAWAY"]),
    "ingest": refusal(os.environ["INGEST_URL"], "SELECT 1"),
}))
"#;
    let output = sqlalchemy(&server, "analyst-1", &analyst, script)
        .env("WRITE", WRITE)
        .env("RUNAWAY", RUNAWAY)
        .env("INGEST_URL", ingest_url)
        .output()
        .unwrap();
    assert_refused(&json_of(&output));
    assert_eq!(server.count("SELECT count(*) FROM temperature").await, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlalchemy_session_ends_when_the_device_is_revoked() {
    if !sqlalchemy_available() {
        return;
    }
    let (server, _, analyst) = readings(Backend::Sqlite, &[]).await;
    let script = r#"
import os, sys
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

with create_engine(os.environ["PG_URL"]).connect() as conn:
    print(conn.execute(text("SELECT count(*) FROM temperature")).scalar(), flush=True)
    sys.stdin.readline()
    try:
        conn.execute(text("SELECT count(*) FROM temperature"))
        print("still open", flush=True)
    except OperationalError as e:
        print("closed:", str(e.orig).replace("\n", " "), flush=True)
"#;
    assert_revocation_closes_session(&server, sqlalchemy(&server, "analyst-1", &analyst, script))
        .await;
}

// Grafana's PostgreSQL data source, replayed: the SQL its query editor and
// backend send (public/app/plugins/datasource/grafana-postgresql-datasource/
// postgresMetaQuery.ts and pkg/tsdb/grafana-postgresql-datasource/macros.go).

/// `buildSchemaConstraint()`: the table is in a schema on the search path.
const GRAFANA_SCHEMA_CONSTRAINT: &str = r#"
          quote_ident(table_schema) IN (
          SELECT
            CASE WHEN trim(s[i]) = '"$user"' THEN user ELSE trim(s[i]) END
          FROM
            generate_series(
              array_lower(string_to_array(current_setting('search_path'),','),1),
              array_upper(string_to_array(current_setting('search_path'),','),1)
            ) as i,
            string_to_array(current_setting('search_path'),',') s
          )"#;

/// `showTables()`: the table picker.
fn grafana_tables() -> String {
    let constraint = GRAFANA_SCHEMA_CONSTRAINT;
    format!(
        r#"SELECT
    CASE WHEN {constraint}
      THEN quote_ident(table_name)
      ELSE quote_ident(table_schema) || '.' || quote_ident(table_name)
    END AS "table"
    FROM information_schema.tables
    WHERE quote_ident(table_schema) NOT IN ('information_schema',
                             'pg_catalog',
                             '_timescaledb_cache',
                             '_timescaledb_catalog',
                             '_timescaledb_internal',
                             '_timescaledb_config',
                             'timescaledb_information',
                             'timescaledb_experimental')
    ORDER BY CASE WHEN {constraint} THEN 0 ELSE 1 END, 1"#
    )
}

/// `showTables(schema)`: the table picker once a schema is chosen.
fn grafana_tables_in(schema: &str) -> String {
    format!(
        r#"SELECT quote_ident(table_name) AS "table"
      FROM information_schema.tables
      WHERE quote_ident(table_schema) = '{schema}'
      ORDER BY 1"#
    )
}

/// `getSchema(table)`: the column picker.
fn grafana_columns(table: &str) -> String {
    let (constraint, table) = (GRAFANA_SCHEMA_CONSTRAINT, format!("'{table}'"));
    format!(
        r#"SELECT quote_ident(column_name) AS "column", data_type AS "type"
    FROM information_schema.columns
    WHERE
      CASE WHEN array_length(parse_ident({table}),1) = 2
        THEN quote_ident(table_schema) = (parse_ident({table}))[1]
          AND quote_ident(table_name) = (parse_ident({table}))[2]
        ELSE quote_ident(table_name) = {table}
          AND {constraint}
      END"#
    )
}

/// Runs each query with psycopg (autocommit, no parameters, as Grafana's
/// backend does) and answers, per query, its column names and rows.
fn grafana(server: &Server, analyst: &str, queries: &[String]) -> Vec<Value> {
    let script = r#"
import os, json, psycopg
with psycopg.connect(os.environ["PG_DSN"], autocommit=True) as conn:
    answers = []
    for sql in json.loads(os.environ["QUERIES"]):
        cursor = conn.execute(sql)
        answers.append({"columns": [d.name for d in cursor.description],
                        "rows": [list(row) for row in cursor.fetchall()]})
    print(json.dumps(answers))
"#;
    let output = Command::new("python3")
        .args(["-c", script])
        .env(
            "PG_DSN",
            format!(
                "host=127.0.0.1 port={} user=analyst-1 password={analyst} dbname=fleetgate connect_timeout=10",
                pg_port(server)
            ),
        )
        .env("QUERIES", serde_json::to_string(queries).unwrap())
        .output()
        .unwrap();
    serde_json::from_value(json_of(&output)).unwrap()
}

crate::on_both_backends!(grafana_pickers_list_only_readable_tables_and_typed_columns);
async fn grafana_pickers_list_only_readable_tables_and_typed_columns(backend: Backend) {
    if !psycopg_available() {
        return;
    }
    let (server, _, analyst) = readings(backend, &[]).await;
    let pressure =
        format!("{TEMPERATURE}\n[streams.pressure]\nfields.hpa = {{ type = \"float\" }}\n");
    let (status, body) = server.apply_streams(&pressure).await;
    assert_eq!(status, 200, "{body}");
    let answers = grafana(
        &server,
        &analyst,
        &[
            // The settings page's version detection.
            "SELECT current_setting('server_version_num')::int/100 as version".into(),
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'".into(),
            grafana_tables(),
            grafana_tables_in("public"),
            grafana_tables_in("other"),
            grafana_columns("temperature"),
            grafana_columns("public.pressure"),
            grafana_columns("fleetgate_devices"),
        ],
    );
    let rows = |i: usize| answers[i]["rows"].clone();
    assert_eq!(
        answers[0],
        json!({"columns": ["version"], "rows": [[1600]]})
    );
    assert_eq!(answers[1], json!({"columns": ["extversion"], "rows": []}));
    // Exactly the tables the caller may query: the two streams.
    assert_eq!(answers[2]["columns"], json!(["table"]));
    assert_eq!(rows(2), json!([["pressure"], ["temperature"]]));
    assert_eq!(rows(3), rows(2));
    assert_eq!(rows(4), json!([]));
    assert_eq!(answers[5]["columns"], json!(["column", "type"]));
    assert_eq!(
        rows(5),
        json!([
            ["device_id", "text"],
            ["received_at", "timestamp with time zone"],
            ["seq", "bigint"],
            ["celsius", "double precision"],
            ["humidity", "double precision"],
            ["status", "text"],
            ["taken_at", "timestamp with time zone"],
            ["door_open", "boolean"],
            ["label", "text"],
            ["extra", "text"],
        ])
    );
    assert!(
        rows(6)
            .as_array()
            .unwrap()
            .contains(&json!(["hpa", "double precision"])),
        "{}",
        rows(6)
    );
    // Internal tables have no columns to show.
    assert_eq!(rows(7), json!([]));
}

/// Numbers as floats, so that `60.0` and `60` compare equal.
fn as_floats(value: &Value) -> Value {
    match value {
        Value::Number(n) => json!(n.as_f64().unwrap()),
        Value::Array(items) => Value::Array(items.iter().map(as_floats).collect()),
        other => other.clone(),
    }
}

/// `sql` as Grafana's replay gets it over the wire, checked to be the same
/// columns and rows as `/v1/query` answers.
async fn grafana_series_as_over_http(server: &Server, analyst: &str, sql: &str) -> Value {
    let mut answers = grafana(server, analyst, &[sql.to_string()]);
    let (status, http) = server
        .api(
            "POST",
            "/v1/query",
            Some(analyst),
            Some(json!({ "sql": sql })),
        )
        .await;
    assert_eq!(status, 200, "{http}");
    assert_eq!(answers[0]["columns"], http["columns"]);
    assert_eq!(as_floats(&answers[0]["rows"]), as_floats(&http["rows"]));
    answers.swap_remove(0)
}

crate::on_both_backends!(grafana_time_series_query_answers_as_the_http_api);
async fn grafana_time_series_query_answers_as_the_http_api(backend: Backend) {
    if !psycopg_available() {
        return;
    }
    let (server, _, analyst) = readings(backend, &[]).await;
    // fleetgate's times are epoch milliseconds in SQL (timestamptz only on
    // the wire), so a panel groups with Grafana's epoch macros:
    //   SELECT $__unixEpochGroupAlias(taken_at/1000, '1m'), avg(celsius) AS celsius,
    //          count(*) AS readings
    //   FROM temperature WHERE $__unixEpochFilter(taken_at/1000) GROUP BY 1 ORDER BY 1
    // here as Grafana expands it for 10:00:00 to 10:03:00 UTC, 2026-03-01.
    let sql = "SELECT floor((taken_at/1000)/60)*60 AS \"time\", avg(celsius) AS celsius, count(*) AS readings\n\
               FROM temperature\n\
               WHERE taken_at/1000 >= 1772359200 AND taken_at/1000 <= 1772359380\n\
               GROUP BY 1\n\
               ORDER BY 1";
    let answer = grafana_series_as_over_http(&server, &analyst, sql).await;
    // One bucket per minute: 10:00 (seq 1), 10:01 (seq 2), 10:02 (seqs 3, 4).
    assert_eq!(
        as_floats(&answer["rows"]),
        as_floats(&json!([
            [1_772_359_200, 21.5, 1],
            [1_772_359_260, 22.5, 1],
            [1_772_359_320, 24.0, 2]
        ]))
    );
}

crate::on_both_backends!(grafana_timestamp_macros_read_the_millisecond_fields);
/// A panel written with Grafana's timestamp macros, as for any PostgreSQL
/// table with a timestamptz column:
///   SELECT $__timeGroupAlias(taken_at, '1m'), avg(celsius) AS celsius,
///          count(*) AS readings
///   FROM temperature WHERE $__timeFilter(taken_at) GROUP BY 1 ORDER BY 1
/// here as Grafana expands them for 10:00:00 to 10:03:00 UTC, 2026-03-01:
/// the filter compares the field with timestamp literals and the group
/// takes its epoch, which fleetgate reads as the milliseconds it stores.
/// Same answer over the wire and over HTTP.
async fn grafana_timestamp_macros_read_the_millisecond_fields(backend: Backend) {
    if !psycopg_available() {
        return;
    }
    let (server, _, analyst) = readings(backend, &[]).await;
    let sql = "SELECT floor(extract(epoch from taken_at)/60)*60 AS \"time\", avg(celsius) AS celsius, count(*) AS readings\n\
               FROM temperature\n\
               WHERE taken_at BETWEEN '2026-03-01T10:00:00Z' AND '2026-03-01T10:03:00Z'\n\
               GROUP BY 1\n\
               ORDER BY 1";
    let answer = grafana_series_as_over_http(&server, &analyst, sql).await;
    assert_eq!(answer["columns"], json!(["time", "celsius", "readings"]));
    assert_eq!(
        as_floats(&answer["rows"]),
        as_floats(&json!([
            [1_772_359_200, 21.5, 1],
            [1_772_359_260, 22.5, 1],
            [1_772_359_320, 24.0, 2]
        ]))
    );
}
