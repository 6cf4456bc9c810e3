//! The PostgreSQL wire endpoint, driven by real clients: psql (simple
//! protocol, `\dt`, `\d`) and psycopg (extended protocol, parameters).
//! Each test says it was skipped, and why, when a client is missing.

use std::process::{Command, Output};

use serde_json::json;

use crate::harness::{publish_acked, Backend, Server};

fn psql_available() -> bool {
    let found = Command::new("psql")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: psql is not installed (apt-get install postgresql-client)");
    }
    found
}

pub(crate) fn psycopg_available() -> bool {
    let found = Command::new("python3")
        .args(["-c", "import psycopg"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!(
            "skipped: python3 with psycopg is not installed (apt-get install python3-psycopg, or pip install psycopg[binary])"
        );
    }
    found
}

pub(crate) fn pg_port(server: &Server) -> String {
    server
        .extra_addr("pg")
        .expect("pg address on the ready line")
        .port()
        .to_string()
}

/// `psql -c` for each command, as `user` with `password`; unaligned,
/// tuples only unless `-P` says otherwise.
fn psql(server: &Server, user: &str, password: &str, commands: &[&str]) -> Output {
    let port = pg_port(server);
    let mut command = Command::new("psql");
    command
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            user,
            "-d",
            "fleetgate",
        ])
        .args(["-X", "-A", "-F", "|", "-v", "ON_ERROR_STOP=1"])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10");
    for c in commands {
        command.args(["-c", c]);
    }
    command.output().expect("run psql")
}

pub(crate) fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs a Python script with `PG_DSN` set for `user`/`password`.
pub(crate) fn python(server: &Server, user: &str, password: &str, script: &str) -> Output {
    let dsn = format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname=fleetgate connect_timeout=10",
        pg_port(server)
    );
    Command::new("python3")
        .args(["-c", script])
        .env("PG_DSN", dsn)
        .output()
        .expect("run python3")
}

async fn with_readings(backend: Backend) -> (Server, String, String) {
    let server = Server::with_temperature(backend).await;
    let sensor = server.add_device("sensor-1", "ingest").await;
    let analyst = server.add_device("analyst-1", "extract").await;
    let payloads: Vec<String> = (1..=5)
        .map(|i| {
            format!(
                r#"{{"seq":{i},"celsius":{}.5,"status":"ok","door_open":{},"taken_at":"2026-03-01T10:00:0{i}Z","label":"it's {i}"}}"#,
                20 + i,
                i % 2 == 0
            )
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

crate::on_both_backends!(psycopg_queries_with_parameters_and_types);
async fn psycopg_queries_with_parameters_and_types(backend: Backend) {
    if !psycopg_available() {
        return;
    }
    let (server, _, analyst) = with_readings(backend).await;
    let script = r#"
import os, json, datetime, psycopg
with psycopg.connect(os.environ["PG_DSN"]) as conn:
    cur = conn.execute(
        "SELECT seq, celsius, door_open, label, taken_at, device_id FROM temperature "
        "WHERE seq >= %s AND label <> %s AND taken_at >= %s ORDER BY seq",
        (2, "nothing", datetime.datetime(2026, 3, 1, 10, 0, 3, tzinfo=datetime.timezone.utc)),
    )
    rows = cur.fetchall()
    types = [type(v).__name__ for v in rows[0]]
    names = [d.name for d in cur.description]
    count = conn.execute("SELECT count(*) AS n FROM temperature WHERE label = %s", ("it's 4",)).fetchone()[0]
    print(json.dumps({
        "names": names,
        "types": types,
        "seqs": [r[0] for r in rows],
        "first": [rows[0][0], rows[0][1], rows[0][2], rows[0][3], rows[0][4].isoformat(), rows[0][5]],
        "count": count,
    }))
"#;
    let output = python(&server, "analyst-1", &analyst, script);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let answer: serde_json::Value = serde_json::from_str(stdout.trim()).expect(&stdout);
    assert_eq!(
        answer["names"],
        json!([
            "seq",
            "celsius",
            "door_open",
            "label",
            "taken_at",
            "device_id"
        ])
    );
    assert_eq!(
        answer["types"],
        json!(["int", "float", "bool", "str", "datetime", "str"])
    );
    assert_eq!(answer["seqs"], json!([3, 4, 5]));
    assert_eq!(
        answer["first"],
        json!([
            3,
            23.5,
            false,
            "it's 3",
            "2026-03-01T10:00:03+00:00",
            "sensor-1"
        ])
    );
    assert_eq!(answer["count"], 1);
}

crate::on_both_backends!(large_answers_stream_whole_and_stop_at_the_byte_bound);
/// A large answer arrives whole and in order across the batches it streams
/// in; one that outgrows `--query-max-bytes` after rows were already sent
/// ends with PostgreSQL's "program limit exceeded" error, and the session
/// goes on.
async fn large_answers_stream_whole_and_stop_at_the_byte_bound(backend: Backend) {
    if !psycopg_available() {
        return;
    }
    let server = Server::start_with(backend, &["--query-max-bytes", "8MiB"]).await;
    let analyst = server.add_device("analyst-1", "extract").await;
    let script = r#"
import os, json, psycopg
rows_of = lambda n, pad: (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < %d) "
    "SELECT x, x * 0.5 AS half, 'row ' || x || '%s' AS label FROM c ORDER BY x" % (n, pad))
with psycopg.connect(os.environ["PG_DSN"], autocommit=True) as conn:
    rows = conn.execute(rows_of(20000, "")).fetchall()
    whole = {
        "count": len(rows),
        "in_order": [r[0] for r in rows] == list(range(1, 20001)),
        "last": [rows[-1][0], rows[-1][1], rows[-1][2]],
        "types": [type(v).__name__ for v in rows[0]],
    }
    try:
        cur = conn.execute(rows_of(20000, "." * 300))
        cur.fetchall()
        bound = {"error": None}
    except psycopg.Error as e:
        bound = {"sqlstate": e.sqlstate, "error": str(e)}
    after = conn.execute(rows_of(3, "")).fetchall()
    print(json.dumps({"whole": whole, "bound": bound, "after": len(after)}))
"#;
    let output = python(&server, "analyst-1", &analyst, script);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let answer: serde_json::Value = serde_json::from_str(stdout.trim()).expect(&stdout);
    assert_eq!(answer["whole"]["count"], 20000, "{answer}");
    assert_eq!(answer["whole"]["in_order"], true, "{answer}");
    assert_eq!(
        answer["whole"]["last"],
        json!([20000, 10000.0, "row 20000"]),
        "{answer}"
    );
    assert_eq!(answer["whole"]["types"], json!(["int", "float", "str"]));
    assert_eq!(answer["bound"]["sqlstate"], "54000", "{answer}");
    let message = answer["bound"]["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("--query-max-bytes 8 MiB"),
        "the refusal names the limit: {message}"
    );
    assert_eq!(answer["after"], 3, "the session goes on after the refusal");
}

crate::on_both_backends!(a_cancel_request_stops_the_running_query);
/// A client's cancel request (psycopg's `cancel()`, psql's Ctrl-C: a
/// CancelRequest on a connection of its own with the session's key) stops
/// the query it names with PostgreSQL's 57014 long before the timeout
/// would, in the database too, and the session goes on.
async fn a_cancel_request_stops_the_running_query(backend: Backend) {
    if !psycopg_available() {
        return;
    }
    let server = Server::start_with(backend, &["--query-timeout", "60s"]).await;
    let analyst = server.add_device("analyst-1", "extract").await;
    let script = r#"
import os, json, threading, time, psycopg
runaway = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
with psycopg.connect(os.environ["PG_DSN"], autocommit=True) as conn:
    outcomes = []
    started = time.monotonic()
    # More than the server's read connections: a cancelled query that went
    # on running in the database would leave none for the query after.
    for _ in range(10):
        threading.Timer(0.5, conn.cancel).start()
        try:
            conn.execute(runaway).fetchall()
            outcomes.append(None)
        except psycopg.Error as e:
            outcomes.append(e.sqlstate)
            message = str(e)
    elapsed = time.monotonic() - started
    started = time.monotonic()
    after = conn.execute(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3) "
        "SELECT count(*) FROM c").fetchone()[0]
    print(json.dumps({"sqlstates": sorted(set(outcomes), key=str), "message": message,
                      "elapsed": elapsed, "after": after, "after_took": time.monotonic() - started}))
"#;
    let output = python(&server, "analyst-1", &analyst, script);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let answer: serde_json::Value = serde_json::from_str(stdout.trim()).expect(&stdout);
    assert_eq!(answer["sqlstates"], json!(["57014"]), "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap_or_default()
            .contains("canceling statement due to user request"),
        "{answer}"
    );
    let elapsed = answer["elapsed"].as_f64().unwrap_or(f64::MAX);
    assert!(
        elapsed < 30.0,
        "10 queries cancelled in {elapsed} s, not at once"
    );
    assert_eq!(answer["after"], 3, "the session goes on after the cancel");
    let after_took = answer["after_took"].as_f64().unwrap_or(f64::MAX);
    assert!(
        after_took < 5.0,
        "the next query waited {after_took} s: cancelled queries held the database"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_lists_and_describes_streams_and_refuses_writes() {
    if !psql_available() {
        return;
    }
    let (server, _, analyst) = with_readings(Backend::Sqlite).await;

    let output = psql(&server, "analyst-1", &analyst, &["\\dt"]);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("public|temperature|table|fleetgate"),
        "{stdout}"
    );

    let output = psql(&server, "analyst-1", &analyst, &["\\d temperature"]);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for column in [
        "device_id|text",
        "received_at|timestamp with time zone",
        "seq|bigint",
        "celsius|double precision",
        "door_open|boolean",
        "taken_at|timestamp with time zone",
        "label|text",
    ] {
        assert!(stdout.contains(column), "{column}: {stdout}");
    }
    // Nothing but what the caller may query: no internal tables.
    let output = psql(&server, "analyst-1", &analyst, &["\\dt fleetgate*"]);
    let (stdout, _) = text(&output);
    assert!(!stdout.contains("fleetgate_"), "{stdout}");

    let output = psql(
        &server,
        "analyst-1",
        &analyst,
        &[
            "SELECT version()",
            "SHOW server_version",
            "SET application_name = 'x'",
            "SELECT seq, celsius, door_open FROM temperature WHERE seq = 2",
        ],
    );
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("fleetgate"), "{stdout}");
    assert!(stdout.contains("2|22.5|t"), "{stdout}");

    // The same guard as /v1/query: a write is refused, with its reason.
    let insert = "INSERT INTO temperature (device_id, seq, celsius) VALUES ('x', 9, 1.0)";
    let output = psql(&server, "analyst-1", &analyst, &[insert]);
    let (stdout, stderr) = text(&output);
    assert!(!output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("only SELECT queries are allowed"),
        "{stderr}"
    );
    let (status, body) = server
        .api(
            "POST",
            "/v1/query",
            Some(&analyst),
            Some(json!({ "sql": insert })),
        )
        .await;
    assert_eq!(status, 400);
    assert!(stderr.contains(body["error"].as_str().unwrap()), "{body}");
    // Internal tables are no more reachable than over HTTP.
    let output = psql(
        &server,
        "analyst-1",
        &analyst,
        &["SELECT * FROM fleetgate_devices"],
    );
    assert!(!output.status.success());
    assert_eq!(server.count("SELECT count(*) FROM temperature").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_valid_query_tokens_get_in() {
    if !psql_available() {
        return;
    }
    let (server, sensor, analyst) = with_readings(Backend::Sqlite).await;
    // An ingest device may not query.
    let output = psql(&server, "sensor-1", &sensor, &["SELECT 1"]);
    let (stdout, stderr) = text(&output);
    assert!(!output.status.success(), "{stdout}");
    assert!(
        stderr.contains("FATAL") && stderr.contains("needs the extract role"),
        "{stderr}"
    );
    // A bad password, and another device's token.
    let output = psql(&server, "analyst-1", "fg1.garbage.garbage", &["SELECT 1"]);
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(
        stderr.contains("password authentication failed for user \"analyst-1\""),
        "{stderr}"
    );
    let output = psql(&server, "sensor-1", &analyst, &["SELECT 1"]);
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );
    // A revoked device.
    let (status, body) = server
        .api(
            "POST",
            "/v1/devices/analyst-1/revoke",
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let output = psql(&server, "analyst-1", &analyst, &["SELECT 1"]);
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(stderr.contains("FATAL"), "{stderr}");
    assert!(stderr.contains("not authorized"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_an_open_session() {
    if !psycopg_available() {
        return;
    }
    let (server, _, analyst) = with_readings(Backend::Sqlite).await;
    let script = r#"
import os, sys, time, psycopg
conn = psycopg.connect(os.environ["PG_DSN"], autocommit=True)
print(conn.execute("SELECT count(*) FROM temperature").fetchone()[0], flush=True)
sys.stdin.readline()
try:
    conn.execute("SELECT count(*) FROM temperature").fetchone()
    print("still open", flush=True)
except psycopg.OperationalError as e:
    print("closed:", str(e).replace("\n", " "), flush=True)
"#;
    let dsn = format!(
        "host=127.0.0.1 port={} user=analyst-1 password={analyst} dbname=fleetgate",
        pg_port(&server)
    );
    let mut child = Command::new("python3")
        .args(["-c", script])
        .env("PG_DSN", dsn)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::{BufRead, Write};
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "5");
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
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    let after = lines.next().unwrap().unwrap();
    let _ = child.wait();
    assert!(after.starts_with("closed:"), "{after}");
    // Closed by the revocation itself, not only refused at the next query.
    assert!(
        server.log().contains("pg: registry change; session closed"),
        "{}",
        server.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_a_password_needs_tls() {
    if !psql_available() {
        return;
    }
    let server = Server::start_with(Backend::Sqlite, &crate::harness::DEV_TLS).await;
    let analyst = server.add_device("analyst-1", "extract").await;
    let ca = server.data_dir().join("dev-tls").join("ca.pem");
    let connect = |sslmode: &str| {
        Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={} user=analyst-1 dbname=fleetgate sslmode={sslmode} sslrootcert={}",
                pg_port(&server),
                ca.display()
            ))
            .args(["-X", "-A", "-t", "-c", "SELECT version()"])
            .env("PGPASSWORD", &analyst)
            .output()
            .unwrap()
    };
    let output = connect("verify-full");
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("fleetgate"), "{stdout}");
    let output = connect("disable");
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(stderr.contains("only over TLS"), "{stderr}");
}
