//! The dashboard in a real browser: headless Chromium (Debian's
//! `chromium`) loads the page signed in by an extract token, and the test
//! reads the numbers it rendered and saves a screenshot.

use std::process::Command;

use crate::harness::{Backend, Server};

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// Runs headless Chromium on `url` with `args`; its stdout.
async fn browse(browser: &str, url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        // Lets the page's fetches and rendering finish before the dump.
        .arg("--virtual-time-budget=15000")
        .args(args)
        .arg(url)
        .output()
        .await
        .expect("chromium runs");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The text of the element with `id` (or `data-test`) in dumped HTML.
fn text_of(dom: &str, attribute: &str) -> Option<String> {
    let at = dom.find(attribute)?;
    let open = at + dom[at..].find('>')? + 1;
    let close = open + dom[open..].find('<')?;
    Some(dom[open..close].trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_report_counters_alerts_and_reconciliation() {
    let Some(browser) = chromium() else {
        eprintln!("skipped: no chromium on this machine (apt-get install chromium)");
        return;
    };
    let server = Server::with_temperature(Backend::Sqlite).await;
    crate::reports::declare_story(&server).await;
    crate::reports::feed_the_day(&server).await;
    crate::reports::load_the_nightly_export(&server).await;
    crate::analysis::plant_anomaly(&server).await;
    server
        .wait_for("/v1/alerts", "the alert", |b| {
            !b["alerts"].as_array().unwrap().is_empty()
        })
        .await;
    let analyst = server.add_device("analyst", "extract").await;
    let url = format!(
        "http://{}/#token={analyst}&report=sales&from=2026-11-20&to=2026-11-22",
        server.http
    );

    let dom = browse(browser, &url, &["--dump-dom"]).await;
    let read = |attribute: &str| {
        text_of(&dom, attribute).unwrap_or_else(|| panic!("no {attribute} in the page:\n{dom}"))
    };
    assert!(
        read("id=\"status\"").starts_with("updated"),
        "{}",
        read("id=\"status\"")
    );
    // The nightly batch: the day's 20 orders, 10+1 … 10+20.
    assert_eq!(read("id=\"total-batch\""), "410.00");
    // After the boundary, the next day's one real-time order.
    assert_eq!(read("id=\"total-realtime\""), "99.00");
    assert_eq!(read("id=\"boundary\""), "2026-11-21 00:00");
    assert_eq!(read("id=\"count-orders\""), "20");
    assert_eq!(read("data-test=\"recon-missing-realtime\""), "2");
    assert_eq!(read("data-test=\"recon-duplicates\""), "1");
    assert_eq!(read("data-test=\"recon-different\""), "1");
    assert_eq!(read("data-test=\"alert-device\""), "d1");
    assert!(
        read("data-test=\"etl-run\"").starts_with("succeeded: 20 loaded"),
        "{dom}"
    );
    assert!(
        dom.contains("id=\"boundary-line\""),
        "the chart marks the boundary"
    );
    assert_eq!(
        dom.matches("data-source=\"batch\"").count(),
        3,
        "one bar per region"
    );

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    browse(
        browser,
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,1000",
        ],
    )
    .await;
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    eprintln!("dashboard screenshot: {}", shot.display());
}
