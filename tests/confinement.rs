//! What a declaration or a query can reach. ETL file sources read only
//! under `--etl-dir`, and `sql` sources only databases the operator
//! configured, never the store (refused when the job is applied, at start,
//! or when a run connects); extract tokens cannot read internal catalog
//! names, on either backend.

use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::harness::{Backend, Server};
use crate::on_both_backends;

fn csv_job(name: &str, path: &str) -> String {
    format!(
        r#"
[jobs.{name}.sources.rows]
csv = "{path}"
columns = {{ line = "text" }}
[jobs.{name}.load]
table = "{name}_batch"
"#
    )
}

fn sql_job(name: &str, database: &str) -> String {
    format!(
        r#"
[jobs.{name}.sources.rows]
sql = "SELECT id AS line FROM fleetgate_devices"
database = "{database}"
columns = {{ line = "text" }}
[jobs.{name}.load]
table = "{name}_batch"
"#
    )
}

async fn refused(server: &Server, job: &str, reason: &str) {
    let (status, body) = server.post_text("/v1/etl/jobs", &server.admin, job).await;
    assert_eq!(status, 400, "expected a refusal ({reason}): {body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains(reason), "expected {reason:?} in {error:?}");
}

on_both_backends!(etl_sources_read_only_what_the_operator_allows);
async fn etl_sources_read_only_what_the_operator_allows(backend: Backend) {
    // Another fleetgate platform's database (it holds fleetgate_* tables),
    // configured by mistake under an innocent name.
    let other = tempfile::tempdir().unwrap();
    let other_db = other.path().join("other.db");
    {
        use sqlx::Connection;
        let url = format!("sqlite://{}?mode=rwc", other_db.display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("CREATE TABLE fleetgate_devices (id TEXT)")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query("INSERT INTO fleetgate_devices VALUES ('secret-device')")
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let configured = format!("shop=sqlite:{}", other_db.display());
    let server = Server::start_with(backend, &["--etl-database", &configured]).await;
    let data = server.data_dir();
    let sources = server.etl_dir();

    // Files outside --etl-dir, however they are named: refused at apply.
    let key = data.join("platform.key");
    std::os::unix::fs::symlink(&key, sources.join("key.csv")).unwrap();
    std::os::unix::fs::symlink("/etc", sources.join("etc")).unwrap();
    let outside = "outside the ETL directory";
    for (job, path) in [
        ("passwd", "/etc/passwd".to_string()),
        ("key_by_path", key.display().to_string()),
        ("climbing", "../platform.key".to_string()),
        ("climbing_glob", "exports/../../*.key".to_string()),
        ("through_a_link", "key.csv".to_string()),
        ("through_a_dir_link", "etc/passwd".to_string()),
        ("token", data.join("admin.token").display().to_string()),
    ] {
        refused(&server, &csv_job(job, &path), outside).await;
    }
    // SQL sources name a configured database: never a URL, never the store.
    let store = match server.database_url() {
        Some(url) => url,
        None => format!("sqlite:{}", data.join("store.db").display()),
    };
    refused(
        &server,
        &sql_job("store_url", &store),
        "not one the operator configured",
    )
    .await;
    refused(
        &server,
        &sql_job("unknown", "warehouse"),
        "not one the operator configured",
    )
    .await;
    let (_, jobs) = server
        .api("GET", "/v1/etl/jobs", Some(&server.admin), None)
        .await;
    assert_eq!(jobs["jobs"], json!([]), "nothing was declared");

    // A configured database that turns out to be a fleetgate store: the run
    // fails with the reason, and copies nothing.
    let (status, body) = server
        .post_text(
            "/v1/etl/jobs",
            &server.admin,
            &sql_job("other_store", "shop"),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let run = run_job(&server, "other_store").await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["error"]
            .as_str()
            .unwrap()
            .contains("fleetgate store is never an ETL source"),
        "{run}"
    );

    // A file swapped for a link after the job was applied: the run refuses
    // it, and nothing of the key reaches a reject.
    std::fs::create_dir_all(sources.join("exports")).unwrap();
    let export = sources.join("exports/lines.csv");
    std::fs::write(&export, "line\nhello\n").unwrap();
    let (status, body) = server
        .post_text(
            "/v1/etl/jobs",
            &server.admin,
            &csv_job("lines", "exports/*.csv"),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(run_job(&server, "lines").await["status"], "succeeded");
    std::fs::remove_file(&export).unwrap();
    std::os::unix::fs::symlink(&key, &export).unwrap();
    let run = run_job(&server, "lines").await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(run["error"].as_str().unwrap().contains(outside), "{run}");
    let (_, rejects) = server
        .api(
            "GET",
            &format!("/v1/etl/runs/{}/rejects", run["id"]),
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(rejects["rejects"], json!([]), "{rejects}");
    assert_eq!(
        server.rows("SELECT line FROM lines_batch").await,
        vec![vec![json!("hello")]]
    );
}

async fn run_job(server: &Server, job: &str) -> Value {
    let (status, body) = server
        .api(
            "POST",
            &format!("/v1/etl/jobs/{job}/run"),
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["run"].as_i64().unwrap();
    server
        .wait_for(&format!("/v1/etl/runs/{id}"), "the run's end", |r| {
            r["status"] != "running"
        })
        .await
}

/// `fleetgate up` refuses, before it serves, an `--etl-database` that is
/// its own store and an `--etl-dir` that holds its data directory.
#[tokio::test]
async fn the_store_is_never_a_configured_etl_source() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut cases = vec![
        (
            vec![
                "--etl-database".to_string(),
                format!("own=sqlite:{}", data.join("store.db").display()),
            ],
            "never an ETL source",
        ),
        (
            vec!["--etl-dir".to_string(), dir.path().display().to_string()],
            "holds the data directory",
        ),
    ];
    if let Some(url) = crate::harness::postgres_url() {
        cases.push((
            vec![
                "--database".to_string(),
                url.clone(),
                "--etl-database".to_string(),
                format!("own={url}"),
            ],
            "never an ETL source",
        ));
    }
    for (args, reason) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args([
                "up",
                "--mqtt",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--pg",
                "127.0.0.1:0",
                "--data",
            ])
            .arg(&data)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} started");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
}

on_both_backends!(queries_cannot_read_catalog_names);
async fn queries_cannot_read_catalog_names(backend: Backend) {
    let server = Server::with_temperature(backend).await;
    let analyst = server.add_device("analyst-1", "extract").await;
    let query = |sql: &str| {
        server.api(
            "POST",
            "/v1/query",
            Some(&analyst),
            Some(json!({ "sql": sql })),
        )
    };
    for sql in [
        "SELECT 'public.fleetgate_devices'::regclass FROM temperature",
        "SELECT 'fleetgate_devices'::regclass",
        "SELECT CAST('fleetgate_devices' AS regclass)",
        "SELECT regclass 'fleetgate_devices'",
        "SELECT 'fleetgate_devices'::text::regclass",
        "SELECT 'fleetgate_devices'::pg_catalog.regclass",
        "SELECT '{fleetgate_devices}'::regclass[]",
        "SELECT 'fleetgate_devices'::regtype",
        "SELECT 'pg_catalog.now()'::regprocedure",
        "SELECT 'now'::regproc",
        "SELECT '1259'::oid",
        "SELECT NULL::fleetgate_devices",
        "SELECT to_regclass('fleetgate_devices')",
        "SELECT count(*) FROM temperature WHERE 'fleetgate_devices'::regclass IS NOT NULL",
    ] {
        let (status, body) = query(sql).await;
        assert_eq!(status, 400, "{sql}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            !error.contains("does not exist") && !error.contains("fleetgate_devices\""),
            "the refusal must not come from the catalog: {sql}: {error}"
        );
    }
    // Ordinary casts still answer.
    let (status, body) =
        query("SELECT CAST(count(*) AS text), CAST('1' AS int) FROM temperature").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rows"], json!([["0", 1]]), "{body}");
}
