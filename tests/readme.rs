//! README.md, run as written: every shell block in order, in one shell, on
//! a fresh `fleetgate up`, with only ports and the cluster's database
//! name substituted. A README change that breaks a command fails here.

pub mod runner;

use std::path::Path;
use std::time::Duration;

use runner::{free_port, mosquitto_on, Run, Up};

#[test]
fn every_command_of_the_readme_runs_as_written() {
    if !crate::harness::mosquitto_available() {
        eprintln!("skipped: the README's walk-through needs mosquitto_pub and mosquitto_sub (apt-get install mosquitto-clients)");
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    // What a fresh clone has where the README looks: the binary it built,
    // and the examples.
    std::fs::create_dir_all(dir.join("target/release")).unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_fleetgate"),
        dir.join("target/release/fleetgate"),
    )
    .unwrap();
    for shipped in ["examples", "firmware-examples"] {
        std::os::unix::fs::symlink(repo.join(shipped), dir.join(shipped)).unwrap();
    }
    let up = Up::start(
        Path::new(env!("CARGO_BIN_EXE_fleetgate")),
        dir,
        &[
            "--dev-tls",
            "--mqtts",
            "127.0.0.1:0",
            "--https",
            "127.0.0.1:0",
        ],
    );
    let (mqtt, http, pg) = (up.port("mqtt"), up.port("http"), up.port("pg"));
    let (mqtts, https) = (up.port("mqtts"), up.port("https"));

    let postgres = crate::harness::postgres_url();
    let cluster_db = format!("fleetgate_readme_{}", std::process::id());
    let mut substitute = vec![
        (":8080".to_string(), format!(":{http}")),
        ("-p 5433".to_string(), format!("-p {pg}")),
        ("port=5433".to_string(), format!("port={pg}")),
        ("-p 8883".to_string(), format!("-p {mqtts}")),
        (":8443".to_string(), format!(":{https}")),
    ];
    // The cluster section's broker and store nodes, on ports of their own.
    for fixed in ["1884", "8081", "7001", "7002"] {
        substitute.push((
            format!("127.0.0.1:{fixed}"),
            format!("127.0.0.1:{}", free_port()),
        ));
    }
    if let Some(url) = &postgres {
        let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
        substitute.push((
            "postgres://postgres@127.0.0.1:5432/fleet".to_string(),
            format!("{base}/{cluster_db}"),
        ));
        substitute.push((
            "createdb -h 127.0.0.1 -U postgres fleet".to_string(),
            format!("psql {url} -qc 'CREATE DATABASE {cluster_db}'"),
        ));
    }
    let run = Run {
        doc: repo.join("README.md"),
        workdir: dir.to_path_buf(),
        env: vec![
            (
                "FLEETGATE_SERVER".into(),
                format!("http://127.0.0.1:{http}"),
            ),
            ("NO_COLOR".into(), "1".into()),
        ],
        substitute,
        prelude: mosquitto_on(mqtt),
        with_postgres: postgres.is_some(),
        timeout: Duration::from_secs(600),
        transcript: Path::new(env!("CARGO_TARGET_TMPDIR")).join("README.md.out"),
    };
    let outcome = std::panic::catch_unwind(|| run.check());
    if let Some(url) = &postgres {
        let _ = std::process::Command::new("psql")
            .args([url.as_str(), "-qc"])
            .arg(format!("DROP DATABASE IF EXISTS {cluster_db} WITH (FORCE)"))
            .status();
    }
    if let Err(panic) = outcome {
        eprintln!("fleetgate up's log:\n{}", up.log());
        std::panic::resume_unwind(panic);
    }
}
