//! Bulk provisioning and the device commands, as a fleet admin runs them:
//! `device import` (a CSV file → one transaction → a 0600 tokens file),
//! `device list --type/--role/--csv`, and refusals that say what was wrong
//! and what is allowed (issue 18).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use crate::harness::{connect_v5, fleetgate_async, Backend, Server};

/// The rows of a CSV file written by `device import --tokens` or printed
/// by `device list --csv`, header first.
fn csv_rows(text: &str) -> Vec<Vec<String>> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(text.as_bytes())
        .records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect()
}

/// id → token, from a tokens file.
fn tokens(path: &Path) -> Vec<(String, String)> {
    let rows = csv_rows(&std::fs::read_to_string(path).unwrap());
    assert_eq!(rows[0], ["id", "token", "expires_at"]);
    rows[1..]
        .iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

async fn device_ids(server: &Server) -> Vec<String> {
    let (status, body) = server
        .api("GET", "/v1/devices", Some(&server.admin), None)
        .await;
    assert_eq!(status, 200, "{body}");
    body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect()
}

async fn import_registers_every_row_and_writes_private_tokens(backend: Backend) {
    let server = Server::with_temperature(backend).await;
    let fleet = server.data_dir().join("fleet");
    let keys = fleet.join("keys/thermo-3");
    let (ok, public_key, err) = fleetgate_async(
        &server,
        &["device", "keygen", "--out", keys.to_str().unwrap()],
    )
    .await;
    assert!(ok, "{err}");
    let devices_csv = fleet.join("devices.csv");
    std::fs::write(
        &devices_csv,
        "# the first shipment\n\
         id,role,type,public_key\n\
         thermo-1,ingest,thermostat,\n\
         thermo-2, ingest ,thermostat,\n\
         \n\
         thermo-3,ingest,thermostat,keys/thermo-3/device.pub\n\
         analyst-1,extract\n",
    )
    .unwrap();
    let tokens_csv = fleet.join("tokens.csv");
    let (csv_arg, tokens_arg) = (devices_csv.to_str().unwrap(), tokens_csv.to_str().unwrap());
    let (ok, out, err) = fleetgate_async(
        &server,
        &["device", "import", csv_arg, "--tokens", tokens_arg],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("imported 4 devices"), "{out}");
    assert_eq!(mode(&tokens_csv), 0o600, "the tokens file must be private");
    let issued = tokens(&tokens_csv);
    let ids: Vec<&str> = issued.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["thermo-1", "thermo-2", "thermo-3", "analyst-1"]);

    let (_, body) = server
        .api("GET", "/v1/devices", Some(&server.admin), None)
        .await;
    let thermo_3 = body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "thermo-3")
        .expect("thermo-3 registered");
    assert_eq!(thermo_3["role"], "ingest");
    assert_eq!(thermo_3["device_type"], "thermostat");
    assert_eq!(thermo_3["public_key"], public_key.trim());

    // The tokens work: MQTT, HTTP ingest (thermostats may write), queries.
    let token = |id: &str| issued.iter().find(|(i, _)| i == id).unwrap().1.clone();
    let session = connect_v5(&server, "thermo-1", &token("thermo-1"))
        .await
        .expect("an imported token connects");
    session.drop_connection().await;
    let (status, body) = server
        .post_text(
            "/v1/ingest/temperature",
            &token("thermo-2"),
            r#"{"seq": 1, "celsius": 20.5}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let sql = json!({ "sql": "SELECT device_id FROM temperature" });
    let (status, body) = server
        .api("POST", "/v1/query", Some(&token("analyst-1")), Some(sql))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rows"], json!([["thermo-2"]]));

    // The tokens file is never overwritten unasked, and nothing is imported then.
    std::fs::write(
        &devices_csv,
        "id,role\nthermo-4,ingest\n", // a header naming only the required columns
    )
    .unwrap();
    let (ok, _, err) = fleetgate_async(
        &server,
        &["device", "import", csv_arg, "--tokens", tokens_arg],
    )
    .await;
    assert!(
        !ok && err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert!(!device_ids(&server).await.contains(&"thermo-4".to_string()));
    assert_eq!(tokens(&tokens_csv).len(), 4);

    // `device list` filters by type and role, and prints CSV.
    let (ok, out, err) = fleetgate_async(
        &server,
        &["device", "list", "--type", "thermostat", "--csv"],
    )
    .await;
    assert!(ok, "{err}");
    let rows = csv_rows(&out);
    assert_eq!(
        rows[0],
        [
            "id",
            "role",
            "type",
            "public_key",
            "revoked_at",
            "created_at"
        ]
    );
    let listed: Vec<(&str, &str, &str)> = rows[1..]
        .iter()
        .map(|r| (r[0].as_str(), r[1].as_str(), r[2].as_str()))
        .collect();
    assert_eq!(
        listed,
        [
            ("thermo-1", "ingest", "thermostat"),
            ("thermo-2", "ingest", "thermostat"),
            ("thermo-3", "ingest", "thermostat"),
        ]
    );
    assert_eq!(rows[3][3], public_key.trim());
    assert_eq!(rows[1][4], "", "not revoked");
    let (ok, out, err) = fleetgate_async(&server, &["device", "list", "--role", "extract"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("analyst-1") && !out.contains("thermo-1"),
        "{out}"
    );
    assert!(out.contains("(1 row)"), "{out}");

    // A fleet at once: one request, one transaction, many statements.
    let mut big = String::from("id,role,type\n");
    for n in 0..2_000 {
        big.push_str(&format!("meter-{n:04},ingest,meter\n"));
    }
    std::fs::write(&devices_csv, big).unwrap();
    // --force replaces the old file, private again.
    std::fs::set_permissions(&tokens_csv, std::fs::Permissions::from_mode(0o644)).unwrap();
    let started = Instant::now();
    let (ok, out, err) = fleetgate_async(
        &server,
        &[
            "device", "import", csv_arg, "--tokens", tokens_arg, "--force",
        ],
    )
    .await;
    assert!(ok, "{err}");
    eprintln!("2,000 devices imported in {:?}: {out}", started.elapsed());
    assert_eq!(mode(&tokens_csv), 0o600);
    let issued = tokens(&tokens_csv);
    assert_eq!(issued.len(), 2_000);
    assert_eq!(issued[1_999].0, "meter-1999");
    let (ok, out, _) =
        fleetgate_async(&server, &["device", "list", "--type", "meter", "--csv"]).await;
    assert!(ok);
    assert_eq!(csv_rows(&out).len(), 2_001);
    let session = connect_v5(&server, "meter-1999", &issued[1_999].1)
        .await
        .expect("the last token connects");
    session.drop_connection().await;

    // Each import is one audited action.
    let (_, body) = server
        .api("GET", "/v1/audit?limit=2", Some(&server.admin), None)
        .await;
    let entries = body["entries"].as_array().unwrap();
    assert_eq!(entries[0]["action"], "device.import");
    assert_eq!(entries[0]["outcome"], "done");
    assert_eq!(entries[0]["detail"]["count"], 2_000);
    assert_eq!(
        entries[1]["detail"]["ids"],
        json!(["thermo-1", "thermo-2", "thermo-3", "analyst-1"])
    );
}

async fn an_invalid_row_imports_nothing(backend: Backend) {
    let server = Server::start(backend).await;
    server.add_device("thermo-9", "ingest").await;
    let before = device_ids(&server).await;
    let devices_csv = server.data_dir().join("devices.csv");
    std::fs::write(
        &devices_csv,
        "id,role,type\n\
         good-1,ingest,thermostat\n\
         x-1,ingestor,thermostat\n\
         bad id,ingest,\n\
         thermo-9,ingest,thermostat\n\
         good-1,extract,\n\
         good-2,admin,\n",
    )
    .unwrap();
    let tokens_csv = server.data_dir().join("tokens.csv");
    let (csv_arg, tokens_arg) = (devices_csv.to_str().unwrap(), tokens_csv.to_str().unwrap());
    let (ok, _, err) = fleetgate_async(
        &server,
        &["device", "import", csv_arg, "--tokens", tokens_arg],
    )
    .await;
    assert!(!ok, "an invalid row fails the import");
    for expected in [
        "4 of 6 rows are invalid, so nothing was imported",
        "--skip-invalid",
        "devices.csv:3: id \"x-1\": unknown role \"ingestor\": expected ingest, extract or admin",
        "devices.csv:4: id \"bad id\": invalid device id \"bad id\": use 1-64 characters from A-Z a-z 0-9 - _ .",
        "devices.csv:5: id \"thermo-9\": device \"thermo-9\" already exists",
        "devices.csv:6: id \"good-1\": listed twice: also on line 2",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(
        !err.contains("devices.csv:2:") && !err.contains("devices.csv:7:"),
        "{err}"
    );
    assert_eq!(device_ids(&server).await, before, "nothing was imported");
    assert!(!tokens_csv.exists(), "no tokens file for a failed import");

    // Rows only the server can judge fail the import just the same.
    std::fs::write(&devices_csv, "id,role\ngood-1,ingest\nthermo-9,extract\n").unwrap();
    let (ok, _, err) = fleetgate_async(
        &server,
        &["device", "import", csv_arg, "--tokens", tokens_arg],
    )
    .await;
    assert!(!ok);
    assert!(
        err.contains("1 of 2 rows is invalid")
            && err.contains("devices.csv:3: id \"thermo-9\": device \"thermo-9\" already exists"),
        "{err}"
    );
    assert_eq!(device_ids(&server).await, before);
    assert!(!tokens_csv.exists());
    let body = json!({ "devices": [
        { "id": "ok-1", "role": "ingest" },
        { "id": "x-1", "role": "ingestor" },
        { "role": "ingest" },
    ] });
    let (status, reply) = server
        .api(
            "POST",
            "/v1/devices/import",
            Some(&server.admin),
            Some(body),
        )
        .await;
    assert_eq!(status, 422, "{reply}");
    assert_eq!(
        reply["error"],
        "2 of 3 devices are invalid; nothing was imported"
    );
    assert_eq!(
        reply["invalid"],
        json!([
            { "index": 1, "id": "x-1", "error": "unknown role \"ingestor\": expected ingest, extract or admin" },
            { "index": 2, "id": "", "error": "invalid device id \"\": use 1-64 characters from A-Z a-z 0-9 - _ ." },
        ])
    );
    assert_eq!(device_ids(&server).await, before);

    // With --skip-invalid the valid rows are imported, the others reported.
    std::fs::write(
        &devices_csv,
        "id,role,type\n\
         good-1,ingest,thermostat\n\
         x-1,ingestor,thermostat\n\
         thermo-9,ingest,thermostat\n\
         good-2,admin,\n",
    )
    .unwrap();
    let (ok, out, err) = fleetgate_async(
        &server,
        &[
            "device",
            "import",
            csv_arg,
            "--tokens",
            tokens_arg,
            "--skip-invalid",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("imported 2 devices"), "{out}");
    assert!(
        err.contains("skipped 2 invalid rows of 4")
            && err.contains("devices.csv:3: id \"x-1\": unknown role")
            && err.contains("devices.csv:4: id \"thermo-9\": device \"thermo-9\" already exists"),
        "{err}"
    );
    let ids: Vec<String> = tokens(&tokens_csv).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["good-1", "good-2"]);
    let mut expected = before.clone();
    expected.extend(["good-1".to_string(), "good-2".to_string()]);
    expected.sort();
    assert_eq!(device_ids(&server).await, expected);
}

crate::on_both_backends!(
    import_registers_every_row_and_writes_private_tokens,
    an_invalid_row_imports_nothing,
);

/// Issue 18 B: `device add x-1 --role ingestor` printed
/// `422 Unprocessable Entity: no error message`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_what_was_wrong_and_what_is_allowed() {
    let server = Server::start(Backend::Sqlite).await;
    server.add_device("d1", "ingest").await;
    for args in [
        &["device", "add", "x-1", "--role", "ingestor"][..],
        &["device", "role", "d1", "superuser"][..],
        &["device", "list", "--role", "root"][..],
    ] {
        let (ok, _, err) = fleetgate_async(&server, args).await;
        assert!(!ok, "{args:?}");
        assert!(
            err.contains("[possible values: ingest, extract, admin]"),
            "{args:?}: {err}"
        );
    }
    let (ok, _, err) =
        fleetgate_async(&server, &["device", "add", "bad/id", "--role", "ingest"]).await;
    assert!(!ok);
    assert!(
        err.contains("invalid device id \"bad/id\": use 1-64 characters from A-Z a-z 0-9 - _ ."),
        "{err}"
    );
    let (ok, _, err) = fleetgate_async(
        &server,
        &[
            "device",
            "add",
            "x-2",
            "--role",
            "ingest",
            "--type",
            &"t".repeat(65),
        ],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("use 1-64 characters, or none"), "{err}");

    // The API says it too, in its JSON error body, whatever refuses the call.
    // method, path, body, status, what the error says
    type Refusal<'a> = (&'a str, &'a str, Option<Value>, u16, &'a [&'a str]);
    let refusals: [Refusal; 5] = [
        (
            "POST",
            "/v1/devices",
            Some(json!({ "id": "x-1", "role": "ingestor" })),
            422,
            &["role: unknown role \"ingestor\": expected ingest, extract or admin"],
        ),
        (
            "POST",
            "/v1/devices/d1/role",
            Some(json!({ "role": "superuser" })),
            422,
            &["unknown role \"superuser\": expected ingest, extract or admin"],
        ),
        (
            "POST",
            "/v1/devices",
            Some(json!({ "role": "ingest" })),
            422,
            &["missing field `id`"],
        ),
        (
            "GET",
            "/v1/devices?role=root",
            None,
            400,
            &["unknown role \"root\": expected ingest, extract or admin"],
        ),
        ("GET", "/v1/etl/runs/latest", None, 400, &["latest"]),
    ];
    for (method, path, body, status, words) in refusals {
        let (got, reply) = server.api(method, path, Some(&server.admin), body).await;
        assert_eq!(got, status, "{method} {path}: {reply}");
        let message = reply["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: no JSON error: {reply}"));
        for word in words {
            assert!(message.contains(word), "{path}: {message}");
        }
    }
    // A body that is not JSON at all.
    let (status, reply) = server
        .post_text("/v1/devices", &server.admin, "id=x-1&role=ingest")
        .await;
    assert_eq!(status, 415);
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("application/json"),
        "{reply}"
    );

    // Every argument and option is described, with its allowed values.
    for (args, words) in [
        (
            &["device", "add", "--help"][..],
            &[
                "A-Z a-z 0-9 - _ .",
                "ingest",
                "extract",
                "admin",
                "--type",
                "--public-key",
                "--ttl",
            ][..],
        ),
        (
            &["device", "role", "--help"][..],
            &["ingest", "extract", "admin"][..],
        ),
        (
            &["device", "import", "--help"][..],
            &[
                "public_key",
                "--tokens",
                "0600",
                "--force",
                "--skip-invalid",
                "--dry-run",
                "nothing is imported",
            ][..],
        ),
        (
            &["device", "list", "--help"][..],
            &["--type", "--role", "--csv", "ingest"][..],
        ),
    ] {
        let (ok, out, err) = fleetgate_async(&server, args).await;
        assert!(ok, "{args:?}: {err}");
        for word in words {
            assert!(out.contains(word), "{args:?} lacks {word:?}:\n{out}");
        }
    }
}
