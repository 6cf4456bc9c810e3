//! The dashboard in a real browser: headless Chromium (Debian's
//! `chromium`), driven over the DevTools protocol, loads the page signed
//! in by an extract token; the tests read what it rendered, use its
//! pickers, watch a record ingested after the page loaded arrive in its
//! counters, and save screenshots. Without Chromium those tests are
//! skipped; the event stream's own test (`/v1/events` with reqwest) is not.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::harness::{Backend, Server};
use crate::on_both_backends;

const DAY: i64 = 1_795_132_800_000; // 2026-11-20T00:00:00Z
const HOUR: i64 = 3_600_000;

/// A second report on the same data, hourly and without groups.
const HOURLY: &str = r#"
[reports.sales_hourly]
value = "sum(amount)"
bucket = "1h"
batch = { table = "orders_batch", time = "ordered_at" }
realtime = { stream = "orders", time = "ordered_at" }
"#;

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

/// Headless Chromium, driven over the DevTools protocol on a pipe
/// (`--remote-debugging-pipe`: commands in on its fd 3, answers out on
/// fd 4, each a JSON message ending in a NUL byte), attached to its page.
struct Browser {
    _child: tokio::process::Child,
    input: tokio::process::ChildStdin,
    output: BufReader<tokio::process::ChildStdout>,
    next_id: u64,
    session: String,
    _profile: tempfile::TempDir,
}

const WIDTH: i64 = 1280;
const HEIGHT: i64 = 1000;

impl Browser {
    async fn start(binary: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            // The shell hands our pipes to Chromium as fds 3 and 4.
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null"#)
            .arg(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--window-size={WIDTH},{HEIGHT}"))
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts");
        let mut browser = Browser {
            input: child.stdin.take().unwrap(),
            output: BufReader::new(child.stdout.take().unwrap()),
            _child: child,
            next_id: 0,
            session: String::new(),
            _profile: profile,
        };
        let targets = browser.send(None, "Target.getTargets", json!({})).await;
        let page = targets["targetInfos"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .unwrap_or_else(|| panic!("no page: {targets}"))["targetId"]
            .clone();
        let attached = browser
            .send(
                None,
                "Target.attachToTarget",
                json!({ "targetId": page, "flatten": true }),
            )
            .await;
        browser.session = attached["sessionId"].as_str().unwrap().to_string();
        browser.resize(HEIGHT).await;
        browser
    }

    async fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.input.write_all(&bytes).await.unwrap();
        let output = &mut self.output;
        let answer = async {
            loop {
                let mut reply = Vec::new();
                let n = output.read_until(0, &mut reply).await.unwrap();
                assert!(n > 0, "chromium closed the pipe");
                reply.pop();
                let reply: Value = serde_json::from_slice(&reply).unwrap();
                // Anything else is an event nobody asked for.
                if reply["id"] == id {
                    return reply;
                }
            }
        };
        let reply = tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .unwrap_or_else(|_| panic!("chromium did not answer {method}"));
        assert!(reply.get("error").is_none(), "{method}: {reply}");
        reply["result"].clone()
    }

    /// A command to the page.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(Some(&session), method, params).await
    }

    async fn resize(&mut self, height: i64) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await;
    }

    /// Loads `url` afresh (not as a fragment change of the page shown).
    async fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": "about:blank" }))
            .await;
        self.call("Page.navigate", json!({ "url": url })).await;
        self.wait(
            "document.readyState === 'complete' && location.href.startsWith('http')",
            "the page to load",
        )
        .await;
    }

    /// The value of a JavaScript expression (promises awaited).
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        assert!(
            result.get("exceptionDetails").is_none(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy (15 s at most); its value.
    async fn wait(&mut self, expression: &str, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let value = self.eval(expression).await;
            if !matches!(value, Value::Null | Value::Bool(false))
                && value != json!(0)
                && value != json!("")
            {
                return value;
            }
            assert!(Instant::now() < deadline, "gave up waiting for {what}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The trimmed text of the element `selector` picks ("" if none).
    async fn text(&mut self, selector: &str) -> String {
        let js = format!(
            "(document.querySelector({}) || {{ textContent: '' }}).textContent.trim()",
            json!(selector)
        );
        self.eval(&js).await.as_str().unwrap().to_string()
    }

    /// Waits until the element `selector` reads `expected`.
    async fn wait_text(&mut self, selector: &str, expected: &str) {
        let js = format!(
            "(document.querySelector({}) || {{ textContent: '' }}).textContent.trim() === {}",
            json!(selector),
            json!(expected)
        );
        let what = format!("{selector} to read {expected:?}");
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.eval(&js).await != json!(true) {
            assert!(
                Instant::now() < deadline,
                "gave up waiting for {what}; it reads {:?}",
                self.text(selector).await
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Picks `value` in the `<select>` or `<input>` with `id`, as a person
    /// would (the page hears the change).
    async fn pick(&mut self, id: &str, value: &str) {
        let js = format!(
            "(() => {{ const el = document.getElementById({}); el.value = {}; \
             el.dispatchEvent(new Event('change')); return el.value; }})()",
            json!(id),
            json!(value)
        );
        assert_eq!(self.eval(&js).await, json!(value), "{id} has no {value:?}");
    }

    /// Saves a screenshot of the whole page to `target/tmp/<name>`.
    async fn screenshot(&mut self, name: &str) -> PathBuf {
        let height = self
            .eval("document.documentElement.scrollHeight")
            .await
            .as_i64()
            .unwrap();
        self.resize(height.max(HEIGHT)).await;
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        self.resize(HEIGHT).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{} bytes",
            png.len()
        );
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::write(&path, png).unwrap();
        eprintln!("dashboard screenshot: {}", path.display());
        path
    }

    /// The chart's bars: (bucket, x, source).
    async fn bars(&mut self) -> Vec<(i64, f64, String)> {
        let bars = self
            .eval(
                "[...document.querySelectorAll('#chart rect')].map((r) => \
                 [Number(r.dataset.bucket), Number(r.getAttribute('x')), r.dataset.source])",
            )
            .await;
        serde_json::from_value(bars).unwrap()
    }
}

/// Every bar's x is proportional to its bucket's start: one scale from the
/// first bar to each other (bars of one bucket side by side aside).
fn assert_linear_in_time(bars: &[(i64, f64, String)]) {
    let mut starts: Vec<(i64, f64)> = Vec::new();
    for (bucket, x, _) in bars {
        match starts.iter_mut().find(|(b, _)| b == bucket) {
            Some(start) => start.1 = start.1.min(*x),
            None => starts.push((*bucket, *x)),
        }
    }
    starts.sort_by_key(|s| s.0);
    assert!(starts.len() >= 3, "{bars:?}");
    let (b0, x0) = starts[0];
    let (b1, x1) = starts[starts.len() - 1];
    let scale = (x1 - x0) / (b1 - b0) as f64;
    for (b, x) in &starts {
        let expected = x0 + (b - b0) as f64 * scale;
        assert!(
            (x - expected).abs() < 0.6,
            "bucket {b} at x={x}, not {expected}: {starts:?}"
        );
    }
}

/// The time axis' tick labels (text, left, right), checked not to
/// overlap.
async fn tick_labels(page: &mut Browser) -> Vec<(String, f64, f64)> {
    let ticks = page
        .eval(
            "[...document.querySelectorAll('#chart text[data-tick]')].map((t) => { \
             const b = t.getBBox(); return [t.textContent, b.x, b.x + b.width]; })",
        )
        .await;
    let ticks: Vec<(String, f64, f64)> = serde_json::from_value(ticks).unwrap();
    for pair in ticks.windows(2) {
        assert!(pair[0].2 + 4.0 <= pair[1].1, "overlapping ticks: {pair:?}");
    }
    ticks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_report_counters_alerts_and_reconciliation() {
    let Some(binary) = chromium() else {
        eprintln!("skipped: no chromium on this machine (apt-get install chromium)");
        return;
    };
    let server = Server::with_temperature(Backend::Sqlite).await;
    crate::reports::declare_story(&server).await;
    let (status, body) = server.post_text("/v1/reports", &server.admin, HOURLY).await;
    assert_eq!(status, 200, "{body}");
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

    let mut page = Browser::start(binary).await;
    page.open(&url).await;
    page.wait(
        "document.getElementById('status').textContent.startsWith('live')",
        "the live stream",
    )
    .await;
    // The nightly batch: the day's 20 orders, 10+1 … 10+20.
    page.wait_text("#total-batch", "410.00").await;
    // After the boundary, the next day's one real-time order.
    assert_eq!(page.text("#total-realtime").await, "99.00");
    assert_eq!(page.text("#boundary").await, "2026-11-21 00:00");
    // Pushed by /v1/events.
    page.wait_text("#count-orders", "20").await;
    page.wait_text("[data-test=recon-missing-realtime]", "2")
        .await;
    assert_eq!(page.text("[data-test=recon-duplicates]").await, "1");
    assert_eq!(page.text("[data-test=recon-different]").await, "1");
    assert_eq!(page.text("[data-test=alert-device]").await, "d1");
    let run = page.text("[data-test=etl-run]").await;
    assert!(run.starts_with("succeeded: 20 loaded"), "{run}");
    assert_eq!(
        page.eval("!!document.getElementById('boundary-line')")
            .await,
        json!(true),
        "the chart marks the boundary"
    );
    let bars = page.bars().await;
    assert_eq!(
        bars.iter().filter(|b| b.2 == "batch").count(),
        3,
        "one bar per region: {bars:?}"
    );

    // The pickers: every declared report, and the fragment's period.
    assert_eq!(
        page.eval("[...document.querySelectorAll('#report-picker option')].map((o) => o.value)")
            .await,
        json!(["sales", "sales_hourly"])
    );
    assert_eq!(
        page.eval("document.getElementById('report-picker').value")
            .await,
        json!("sales")
    );
    assert_eq!(
        page.eval("document.getElementById('from').value").await,
        json!("2026-11-20")
    );
    assert_eq!(
        page.eval("document.getElementById('to').value").await,
        json!("2026-11-22")
    );
    page.screenshot("dashboard.png").await;

    // Nothing from another origin: the policy forbids it, and the page
    // names none.
    let response = reqwest::get(format!("http://{}/", server.http))
        .await
        .unwrap();
    let policy = response.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        policy.contains("default-src 'none'") && policy.contains("connect-src 'self'"),
        "{policy}"
    );
    let html = response.text().await.unwrap();
    assert_eq!(
        html.matches("http").count(),
        html.matches("http://www.w3.org/2000/svg").count(),
        "only the SVG namespace is a URL"
    );
    // Live: a record ingested now reaches the counter without a reload,
    // pushed (the page polls nothing; it used to every 5 s).
    assert!(
        !html.contains("setInterval") && !html.contains("5000"),
        "the page polls"
    );
    page.eval("window.notReloaded = true").await;
    let shop = server.add_device("late-shop", "ingest").await;
    let order = json!({ "order_id": "o22", "region": "east", "amount": 1.0, "ordered_at": DAY + 26 * HOUR });
    let sent = Instant::now();
    let (status, body) = server
        .post_text("/v1/ingest/orders", &shop, &order.to_string())
        .await;
    assert_eq!(status, 200, "{body}");
    page.wait_text("#count-orders", "21").await;
    let pushed_in = sent.elapsed();
    assert!(
        pushed_in < Duration::from_secs(3),
        "the counter took {pushed_in:?}"
    );
    eprintln!("a new record reached the page's counter in {pushed_in:?}");
    // The chart follows its stream's changes too.
    page.wait_text("#total-realtime", "100.00").await;
    assert_eq!(page.eval("window.notReloaded").await, json!(true));

    // Another report: hourly, on a time axis with the night's gap in it.
    page.pick("report-picker", "sales_hourly").await;
    page.wait_text("#report-name", "sales_hourly").await;
    page.wait_text("#point-count", "22").await;
    let hash = page.eval("location.hash").await;
    assert!(
        hash.as_str().unwrap().contains("report=sales_hourly")
            && hash.as_str().unwrap().contains(&format!("token={analyst}")),
        "{hash}"
    );
    let bars = page.bars().await;
    assert_eq!(bars.iter().filter(|b| b.2 == "batch").count(), 20);
    assert_eq!(bars.iter().filter(|b| b.2 == "realtime").count(), 2);
    assert_linear_in_time(&bars);
    // Labelled ticks, none overlapping the next.
    let ticks = tick_labels(&mut page).await;
    assert!(ticks.len() >= 4, "{ticks:?}");
    assert!(ticks.iter().any(|t| t.0 == "00:00"), "{ticks:?}");
    page.screenshot("dashboard-hourly.png").await;

    // Another period: the day after the batch, real time only.
    page.pick("from", "2026-11-21").await;
    page.wait_text("#total-batch", "0.00").await;
    assert_eq!(page.text("#total-realtime").await, "100.00");
    let hash = page.eval("location.hash").await;
    assert!(
        hash.as_str()
            .unwrap()
            .contains("report=sales_hourly&from=2026-11-21&to=2026-11-22"),
        "{hash}"
    );
    let bars = page.bars().await;
    assert_eq!(bars.len(), 2, "{bars:?}");
    // 01:00 and 02:00 of a 24-hour axis: a 24th of the width apart.
    let plot = page
        .eval("document.getElementById('chart').clientWidth - 52 - 14")
        .await
        .as_f64()
        .unwrap();
    assert!(
        ((bars[1].1 - bars[0].1) - plot / 24.0).abs() < 0.6,
        "{bars:?} on {plot}px"
    );

    // A quarter of hourly buckets: thin bars, and ticks a week apart that
    // still do not overlap.
    page.pick("from", "2026-09-01").await;
    page.pick("to", "2026-12-01").await;
    page.wait("location.hash.includes('to=2026-12-01') && document.getElementById('point-count').textContent === '22'", "the quarter")
        .await;
    let ticks = tick_labels(&mut page).await;
    assert!(ticks.len() >= 8, "{ticks:?}");
    page.screenshot("dashboard-quarter.png").await;
    page.pick("from", "2026-11-21").await;
    page.pick("to", "2026-11-22").await;

    // The fragment brings the same view back.
    let shared = page.eval("location.href").await;
    page.open(shared.as_str().unwrap()).await;
    page.wait_text("#total-realtime", "100.00").await;
    assert_eq!(
        page.eval("document.getElementById('report-picker').value")
            .await,
        json!("sales_hourly")
    );
    assert_eq!(
        page.eval("document.getElementById('from').value").await,
        json!("2026-11-21")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_says_why_a_token_cannot_sign_in() {
    let Some(binary) = chromium() else {
        eprintln!("skipped: no chromium on this machine (apt-get install chromium)");
        return;
    };
    let server = Server::with_temperature(Backend::Sqlite).await;
    let sensor = server.add_device("sensor", "ingest").await;
    let former = server.add_device("former", "extract").await;
    let (status, body) = server
        .api(
            "POST",
            "/v1/devices/former/revoke",
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let forged = crate::harness::foreign_token("analyst");

    let mut page = Browser::start(binary).await;
    for (token, title) in [
        ("not-a-token", "The server refused this token"),
        (forged.as_str(), "The server refused this token"),
        (former.as_str(), "The server refused this token"),
        (sensor.as_str(), "This token may not read the dashboard"),
    ] {
        let (_, refusal) = server.api("GET", "/v1/reports", Some(token), None).await;
        let error = refusal["error"].as_str().unwrap();
        page.open(&format!("http://{}/#token={token}", server.http))
            .await;
        page.wait_text("#signin-error", error).await;
        assert_eq!(page.text("#problem-title").await, title);
        assert_eq!(
            page.eval("document.getElementById('app').hidden").await,
            json!(true),
            "no empty panels"
        );
        if token == sensor {
            assert!(error.contains("extract role"), "{error}");
            page.screenshot("dashboard-signin-error.png").await;
        }
    }

    // A token revoked while the page is open: the stream ends, saying so.
    let watcher = server.add_device("watcher", "extract").await;
    page.open(&format!("http://{}/#token={watcher}", server.http))
        .await;
    page.wait_text("#count-temperature", "0").await;
    // Without a period in the fragment: the last 7 days, today included.
    let today = chrono::Utc::now().date_naive();
    assert_eq!(
        page.eval("[document.getElementById('from').value, document.getElementById('to').value]")
            .await,
        json!([
            (today - chrono::Days::new(7)).to_string(),
            (today + chrono::Days::new(1)).to_string()
        ])
    );
    let (status, body) = server
        .api(
            "POST",
            "/v1/devices/watcher/revoke",
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    page.wait(
        "!document.getElementById('problem').hidden && \
         document.getElementById('signin-error').textContent.includes('revoked')",
        "the revocation to show",
    )
    .await;
}

/// A `/v1/events` response read as server-sent events.
struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl EventStream {
    /// The next event (name, data), skipping heartbeats; `None` when the
    /// stream ends. Fails after `within`.
    async fn next(&mut self, within: Duration) -> Option<(String, Value)> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(cut) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..cut + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        name = value.trim().to_string();
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.strip_prefix(' ').unwrap_or(value));
                    }
                }
                if !data.is_empty() {
                    return Some((name, serde_json::from_str(&data).unwrap()));
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .expect("an event in time")
                .expect("the stream reads");
            self.buffer.push_str(std::str::from_utf8(&chunk?).unwrap());
        }
    }

    /// The next event named `name`.
    async fn next_named(&mut self, name: &str, within: Duration) -> Value {
        loop {
            match self.next(within).await {
                Some((n, data)) if n == name => return data,
                Some(_) => continue,
                None => panic!("the stream ended before a {name} event"),
            }
        }
    }
}

async fn events(server: &Server, token: Option<&str>) -> reqwest::Response {
    events_at(&server.http.to_string(), token).await
}

/// `GET /v1/events` of the HTTP API at `address`.
async fn events_at(address: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(format!("http://{address}/v1/events"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

async fn open_streams(server: &Server) -> i64 {
    let metrics = server.metrics().await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("fleetgate_http_event_streams "))
        .unwrap_or_else(|| panic!("no event stream gauge:\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

on_both_backends!(the_event_stream_takes_a_reading_token_and_pushes_what_changes);
async fn the_event_stream_takes_a_reading_token_and_pushes_what_changes(backend: Backend) {
    let server = Server::with_temperature(backend).await;
    let sensor = server.add_device("sensor", "ingest").await;
    let analyst = server.add_device("analyst", "extract").await;

    // Refused as every route refuses: no token, a bad one, a role that
    // may not read.
    for (token, status, says) in [
        (None, 401, "missing Authorization"),
        (Some("fg1.bad.token"), 401, "bad credentials"),
        (Some(sensor.as_str()), 403, "needs the extract role"),
    ] {
        let response = events(&server, token).await;
        assert_eq!(response.status().as_u16(), status);
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains(says), "{body}");
    }

    let response = events(&server, Some(&analyst)).await;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut stream = EventStream {
        response,
        buffer: String::new(),
    };
    // First, everything as it is.
    let first = stream.next_named("counters", Duration::from_secs(10)).await;
    assert_eq!(first, json!({ "counters": { "temperature": 0 } }));
    assert_eq!(
        stream.next_named("alerts", Duration::from_secs(5)).await,
        json!({ "alerts": [] })
    );
    // Then what changes: a record stored, and one rejected.
    let record = json!({ "seq": 1, "celsius": 21.5 });
    let sent = Instant::now();
    let (status, body) = server
        .post_text("/v1/ingest/temperature", &sensor, &record.to_string())
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        stream.next_named("counters", Duration::from_secs(5)).await,
        json!({ "counters": { "temperature": 1 } })
    );
    eprintln!("the stored record was pushed in {:?}", sent.elapsed());
    let (status, body) = server
        .post_text(
            "/v1/ingest/temperature",
            &sensor,
            &json!({ "seq": 2, "celsius": 900.0 }).to_string(),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let rejects = stream.next_named("rejects", Duration::from_secs(5)).await;
    assert_eq!(
        rejects["rejects"]["temperature"].as_array().unwrap().len(),
        1,
        "{rejects}"
    );

    // Admin reads too; each open stream is counted, and one whose client
    // went away is let go.
    let admin = events(&server, Some(&server.admin)).await;
    assert_eq!(admin.status().as_u16(), 200);
    let mut admin = EventStream {
        response: admin,
        buffer: String::new(),
    };
    admin.next_named("counters", Duration::from_secs(10)).await;
    assert_eq!(open_streams(&server).await, 2);
    drop(admin);
    // At the latest, the next heartbeat finds the connection closed.
    let deadline = Instant::now() + Duration::from_secs(15 + 5);
    while open_streams(&server).await != 1 {
        assert!(Instant::now() < deadline, "the closed stream was kept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A revoked token ends the stream at once, saying why.
    let (status, body) = server
        .api(
            "POST",
            "/v1/devices/analyst/revoke",
            Some(&server.admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let end = stream.next_named("end", Duration::from_secs(5)).await;
    assert_eq!(end["status"], 401, "{end}");
    assert!(end["error"].as_str().unwrap().contains("revoked"), "{end}");
    assert!(
        stream.next(Duration::from_secs(5)).await.is_none(),
        "the stream ends"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_broker_pushes_the_counts_of_what_its_nodes_commit() {
    let Some(cluster) = crate::cluster::cluster().await else {
        eprintln!("skipped: DATABASE_URL is not set, so this PostgreSQL cluster test did not run");
        return;
    };
    cluster.apply(crate::harness::TEMPERATURE).await;
    let feed = cluster
        .api(
            "POST",
            "/v1/devices",
            Some(json!({ "id": "feed-n1", "role": "admin" })),
        )
        .await;
    let _node = cluster.node("n1", feed["token"].as_str().unwrap());
    cluster.wait_nodes_up(&["n1"]).await;

    let http = cluster.broker.field("http");
    let response = events_at(&http, Some(&cluster.admin)).await;
    assert_eq!(response.status().as_u16(), 200);
    let mut stream = EventStream {
        response,
        buffer: String::new(),
    };
    assert_eq!(
        stream.next_named("counters", Duration::from_secs(10)).await,
        json!({ "counters": { "temperature": 0 } })
    );
    // The broker sees no commits (its nodes make them): it counts again
    // every few seconds while someone listens.
    let response = cluster
        .http
        .post(format!("http://{http}/v1/ingest/temperature?device=d1"))
        .bearer_auth(&cluster.admin)
        .body(json!({ "seq": 1, "celsius": 20.5 }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        stream.next_named("counters", Duration::from_secs(10)).await,
        json!({ "counters": { "temperature": 1 } })
    );
}
