//! Runs a README's shell blocks in order, in one bash session, as a reader
//! following it would, and checks the output it shows.
//!
//! What the README may say to the runner, all invisible when rendered:
//! - `<!-- readme-test: skip: REASON -->` right before a block: not run
//!   (the reason is printed), for commands such as `cargo test` itself;
//! - `<!-- readme-test: postgres -->`: run only when a PostgreSQL URL is
//!   given, and skipped with a message otherwise;
//! - `<!-- readme-test: needs: COMMAND -->`: run only when the shell
//!   command succeeds (a client the README tells the reader to install).
//!
//! What it reads from the blocks themselves, which a reader sees too:
//! - a ```` ```toml ```` block whose first line is `# NAME.toml` is that
//!   file, written into the working directory when the run reaches it;
//! - a `# → TEXT` line after a command is output the command must print
//!   (a whole line; `…` stands for any text). A command may fail only when
//!   the README shows what it prints.
//!
//! Ports and paths that differ in a test are substituted in the text
//! before it runs (see [`Run::substitute`]).

// Each README test uses part of it.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One command of a shell block: its lines and the output the README shows.
#[derive(Debug)]
struct Step {
    line: usize,
    text: String,
    expected: Vec<String>,
}

#[derive(Debug)]
enum Block {
    Shell { line: usize, steps: Vec<Step> },
    File { name: String, text: String },
}

#[derive(Debug, PartialEq)]
enum Annotation {
    None,
    Skip(String),
    Postgres,
    Needs(String),
}

const OUTPUT: &str = "# → ";

/// The blocks of a markdown document, in order, with what the runner must
/// skip already left out (and reported).
fn parse(doc: &str, with_postgres: bool, skipped: &mut Vec<String>) -> Vec<Block> {
    let lines: Vec<&str> = doc.lines().collect();
    let mut blocks = Vec::new();
    let mut annotation = Annotation::None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_end();
        if let Some(note) = line
            .trim()
            .strip_prefix("<!-- readme-test:")
            .and_then(|rest| rest.strip_suffix("-->"))
        {
            let note = note.trim();
            annotation = if let Some(reason) = note.strip_prefix("skip:") {
                Annotation::Skip(reason.trim().to_string())
            } else if let Some(command) = note.strip_prefix("needs:") {
                Annotation::Needs(command.trim().to_string())
            } else if note == "postgres" {
                Annotation::Postgres
            } else {
                panic!("line {}: unknown readme-test annotation {note:?}", i + 1)
            };
            i += 1;
            continue;
        }
        let Some(info) = line.strip_prefix("```") else {
            if !line.trim().is_empty() {
                annotation = Annotation::None;
            }
            i += 1;
            continue;
        };
        let start = i + 1;
        let mut end = start;
        while end < lines.len() && !lines[end].trim_end().starts_with("```") {
            end += 1;
        }
        let body = &lines[start..end];
        let first_line = start + 1;
        match (info.trim(), &annotation) {
            ("sh", Annotation::Skip(reason)) => {
                skipped.push(format!("line {first_line}: {reason}"));
            }
            ("sh", Annotation::Postgres) if !with_postgres => skipped.push(format!(
                "line {first_line}: needs PostgreSQL (DATABASE_URL is not set)"
            )),
            ("sh", Annotation::Needs(command)) if !succeeds(command) => skipped.push(format!(
                "line {first_line}: needs `{command}`, which failed here"
            )),
            ("sh", _) => blocks.push(Block::Shell {
                line: first_line,
                steps: steps(body, first_line),
            }),
            ("toml", _) => {
                let name = body
                    .first()
                    .and_then(|l| l.strip_prefix("# "))
                    .map(str::trim)
                    .filter(|n| n.ends_with(".toml") && !n.contains(' '));
                if let Some(name) = name {
                    let mut text = body[1..].join("\n");
                    text.push('\n');
                    blocks.push(Block::File {
                        name: name.to_string(),
                        text,
                    });
                }
            }
            _ => {}
        }
        annotation = Annotation::None;
        i = end + 1;
    }
    blocks
}

/// Splits a shell block into commands: a line with its `\` continuations
/// and its here-document, followed by the `# → ` lines it prints.
fn steps(body: &[&str], first_line: usize) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut i = 0;
    while i < body.len() {
        let line = body[i];
        let trimmed = line.trim();
        if let Some(output) = trimmed.strip_prefix(OUTPUT.trim_end()) {
            let step = steps
                .last_mut()
                .unwrap_or_else(|| panic!("line {}: output before any command", first_line + i));
            step.expected.push(output.trim().to_string());
            i += 1;
            continue;
        }
        if trimmed.is_empty() || trimmed.starts_with('#') {
            i += 1;
            continue;
        }
        let line_no = first_line + i;
        let mut text = String::new();
        loop {
            let current = body[i];
            text.push_str(current);
            text.push('\n');
            i += 1;
            if let Some(terminator) = heredoc_terminator(current) {
                while i < body.len() && body[i].trim() != terminator {
                    text.push_str(body[i]);
                    text.push('\n');
                    i += 1;
                }
                if i < body.len() {
                    text.push_str(body[i]);
                    text.push('\n');
                    i += 1;
                }
            }
            if !current.trim_end().ends_with('\\') || i >= body.len() {
                break;
            }
        }
        steps.push(Step {
            line: line_no,
            text,
            expected: Vec::new(),
        });
    }
    steps
}

fn succeeds(command: &str) -> bool {
    Command::new("sh")
        .args(["-c", command])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn heredoc_terminator(line: &str) -> Option<String> {
    let rest = &line[line.find("<<")? + 2..];
    let rest = rest.trim_start_matches('-').trim_start();
    let word: String = rest
        .chars()
        .filter(|c| *c != '\'' && *c != '"')
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!word.is_empty()).then_some(word)
}

/// Whether an output line is what the README shows: the same text, where
/// `…` in the README stands for any text.
fn shows(expected: &str, actual: &str) -> bool {
    let actual = actual.trim();
    let parts: Vec<&str> = expected.split('…').collect();
    if parts.len() == 1 {
        return actual == expected;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !actual.starts_with(first) || !actual[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &actual[first.len()..actual.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// A run of one document in one working directory.
pub struct Run {
    pub doc: PathBuf,
    pub workdir: PathBuf,
    pub env: Vec<(String, String)>,
    /// Text replaced before anything runs: ports and paths a test cannot
    /// share with a reader's machine.
    pub substitute: Vec<(String, String)>,
    /// Shell functions and settings before the first block.
    pub prelude: String,
    pub with_postgres: bool,
    pub timeout: Duration,
    /// Where the whole session's output is kept, to read after a run.
    pub transcript: PathBuf,
}

impl Run {
    /// Runs every block; panics naming each command that failed or did not
    /// print what the README shows.
    pub fn check(&self) {
        let mut doc = std::fs::read_to_string(&self.doc)
            .unwrap_or_else(|e| panic!("{}: {e}", self.doc.display()));
        for (from, to) in &self.substitute {
            doc = doc.replace(from.as_str(), to);
        }
        let mut skipped = Vec::new();
        let blocks = parse(&doc, self.with_postgres, &mut skipped);
        for skip in &skipped {
            eprintln!("{}: skipped the block at {skip}", self.doc.display());
        }
        let mut script = String::from("exec 2>&1\nshopt -s expand_aliases\n");
        script.push_str(&self.prelude);
        let mut steps = Vec::new();
        for block in &blocks {
            match block {
                Block::File { name, text } => {
                    // Written when the run reaches it, as a reader would save it.
                    let _ = writeln!(
                        script,
                        "cat > {name} <<'README_TEST_EOF'\n{text}README_TEST_EOF"
                    );
                }
                Block::Shell {
                    steps: block_steps, ..
                } => {
                    for step in block_steps {
                        let id = steps.len();
                        let _ = write!(
                            script,
                            "echo '@@readme-test {id} start'\n{}echo \"@@readme-test {id} status $?\"\n",
                            step.text
                        );
                        steps.push(step);
                    }
                }
            }
        }
        // The background commands (`mosquitto_sub … &`) end with the session.
        script.push_str("kill -KILL 0\n");
        let (output, timed_out) = self.run_bash(&script);
        let _ = std::fs::write(&self.transcript, &output);
        let mut failures = Vec::new();
        let mut reached = 0;
        for (id, step) in steps.iter().enumerate() {
            let start = format!("@@readme-test {id} start");
            let Some(begin) = output.find(&start) else {
                break;
            };
            reached = id + 1;
            let after = &output[begin + start.len()..];
            let status_marker = format!("@@readme-test {id} status ");
            let (printed, status) = match after.find(&status_marker) {
                Some(end) => {
                    let status: i32 = after[end + status_marker.len()..]
                        .lines()
                        .next()
                        .and_then(|s| s.trim().parse().ok())
                        .unwrap_or(-1);
                    (&after[..end], Some(status))
                }
                None => (after, None),
            };
            let where_ = format!("{}:{}", self.doc.display(), step.line);
            let command = step.text.lines().next().unwrap_or("").trim();
            match status {
                None => failures.push(format!(
                    "{where_}: `{command}` did not finish{}\n{printed}",
                    if timed_out { " (timed out)" } else { "" }
                )),
                Some(status) if status != 0 && step.expected.is_empty() => failures.push(format!(
                    "{where_}: `{command}` exited with {status}:\n{printed}"
                )),
                _ => {}
            }
            for expected in &step.expected {
                if !printed.lines().any(|line| shows(expected, line)) {
                    failures.push(format!(
                        "{where_}: `{command}` did not print `{expected}`; it printed:\n{printed}"
                    ));
                }
            }
        }
        if reached < steps.len() && failures.is_empty() {
            failures.push(format!(
                "only {reached} of {} commands ran{}:\n{}",
                steps.len(),
                if timed_out { " (timed out)" } else { "" },
                output
            ));
        }
        eprintln!(
            "{}: {} commands run, {} blocks skipped; the session's output is in {}",
            self.doc.display(),
            reached,
            skipped.len(),
            self.transcript.display()
        );
        assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
    }

    /// Runs the script in a process group of its own, so the background
    /// commands it starts (`mosquitto_sub … &`, servers) end with it.
    fn run_bash(&self, script: &str) -> (String, bool) {
        use std::os::unix::process::CommandExt;
        let script_path = self.workdir.join(".readme-test.sh");
        std::fs::write(&script_path, script).unwrap();
        let mut child = Command::new("bash")
            .arg(&script_path)
            .current_dir(&self.workdir)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("bash");
        let group = child.id();
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = stdout.read_to_end(&mut all);
            String::from_utf8_lossy(&all).into_owned()
        });
        let started = Instant::now();
        let mut timed_out = false;
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if started.elapsed() > self.timeout {
                timed_out = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The background commands keep the pipe open: end the group.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{group}")])
            .stderr(Stdio::null())
            .status();
        let _ = child.wait();
        (reader.join().unwrap(), timed_out)
    }
}

/// A free loopback port, for a server the README starts on a fixed one.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `fleetgate up` started in `workdir` with its default data directory
/// (`./fleetgate-data`), on ephemeral ports; killed when dropped.
pub struct Up {
    child: std::process::Child,
    /// Every `name=address` of its ready line.
    pub addrs: Vec<(String, std::net::SocketAddr)>,
    log: PathBuf,
}

impl Up {
    pub fn start(binary: &Path, workdir: &Path, extra: &[&str]) -> Up {
        use std::io::BufRead;
        let log = workdir.join("fleetgate-up.log");
        let mut child = Command::new(binary)
            .args(["up", "--mqtt", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .args(["--pg", "127.0.0.1:0"])
            .args(extra)
            .current_dir(workdir)
            .env("RUST_LOG", "info,sqlx=warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("start fleetgate up");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = loop {
            match lines.next() {
                Some(Ok(line)) if line.starts_with("fleetgate ready:") => break line,
                Some(Ok(_)) => continue,
                _ => panic!(
                    "fleetgate up exited before it was ready:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            }
        };
        // Keep reading, so a full pipe never blocks the server.
        std::thread::spawn(move || for _ in lines {});
        let addrs = ready
            .split_whitespace()
            .filter_map(|part| part.split_once('='))
            .filter_map(|(name, addr)| Some((name.to_string(), addr.parse().ok()?)))
            .collect();
        Up { child, addrs, log }
    }

    pub fn port(&self, name: &str) -> u16 {
        self.addrs
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no {name} address in the ready line"))
            .1
            .port()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shell functions that point the mosquitto tools at the test's MQTT
/// port, as the README tells a reader whose port 1883 is taken.
pub fn mosquitto_on(port: u16) -> String {
    format!(
        "mosquitto_pub() {{ command mosquitto_pub -p {port} \"$@\"; }}\n\
         mosquitto_sub() {{ command mosquitto_sub -p {port} \"$@\"; }}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_steps_outputs_and_annotations() {
        let doc = "text\n\n<!-- readme-test: skip: builds itself -->\n```sh\ncargo test\n```\n\n\
                   ```sh\nA=$(echo 1)\necho a \\\n  b\n# → a b\ncat > f <<'EOF'\nx\nEOF\n# a comment\n```\n\
                   ```toml\n# v.toml\n[x]\n```\n```toml\n[fragment]\n```\n";
        let mut skipped = Vec::new();
        let blocks = parse(doc, false, &mut skipped);
        assert_eq!(skipped.len(), 1);
        assert_eq!(blocks.len(), 2);
        let Block::Shell { steps, .. } = &blocks[0] else {
            panic!("{blocks:?}")
        };
        assert_eq!(steps.len(), 3);
        assert_eq!(steps[1].text, "echo a \\\n  b\n");
        assert_eq!(steps[1].expected, ["a b"]);
        assert_eq!(steps[2].text, "cat > f <<'EOF'\nx\nEOF\n");
        let Block::File { name, text } = &blocks[1] else {
            panic!("{blocks:?}")
        };
        assert_eq!((name.as_str(), text.as_str()), ("v.toml", "[x]\n"));
    }

    #[test]
    fn an_ellipsis_stands_for_any_text() {
        assert!(shows(
            "imported 4 devices in … s",
            "imported 4 devices in 0.01 s"
        ));
        assert!(shows("a…c…e", "abcde"));
        assert!(!shows("a…c…e", "abde"));
        assert!(!shows("exact", "exactly"));
    }
}
