//! firmware-examples/README.md, run as written against a fresh `fleetgate
//! up`: the walk-through's commands in order, the example devices included.

#[path = "../../tests/readme/runner.rs"]
mod runner;

use std::path::Path;
use std::time::Duration;

use runner::{mosquitto_on, Run, Up};

#[test]
fn the_firmware_walkthrough_runs_as_written() {
    let firmware = Path::new(env!("CARGO_BIN_EXE_fleetgate-firmware"));
    // `cargo test --workspace` builds the platform's binary beside this one.
    let fleetgate = firmware.with_file_name("fleetgate");
    if !fleetgate.exists() {
        eprintln!(
            "skipped: {} is not built; `cargo test --workspace` builds it",
            fleetgate.display()
        );
        return;
    }
    let examples = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    std::fs::create_dir_all(dir.join("target/release")).unwrap();
    for (binary, name) in [
        (fleetgate.as_path(), "fleetgate"),
        (firmware, "fleetgate-firmware"),
    ] {
        std::os::unix::fs::symlink(binary, dir.join("target/release").join(name)).unwrap();
    }
    std::os::unix::fs::symlink(examples, dir.join("firmware-examples")).unwrap();
    let up = Up::start(&fleetgate, dir, &[]);
    let http = up.port("http");
    let run = Run {
        doc: examples.join("README.md"),
        workdir: dir.to_path_buf(),
        env: vec![(
            "FLEETGATE_SERVER".into(),
            format!("http://127.0.0.1:{http}"),
        )],
        substitute: vec![(
            // Built already, in the test profile, by the test run itself.
            "cargo build --release -p fleetgate-firmware-examples".into(),
            "ls target/release/fleetgate-firmware".into(),
        )],
        prelude: mosquitto_on(up.port("mqtt")),
        with_postgres: false,
        timeout: Duration::from_secs(300),
        transcript: Path::new(env!("CARGO_TARGET_TMPDIR")).join("firmware-README.md.out"),
    };
    if let Err(panic) = std::panic::catch_unwind(|| run.check()) {
        eprintln!("fleetgate up's log:\n{}", up.log());
        std::panic::resume_unwind(panic);
    }
}
