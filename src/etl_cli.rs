//! `fleetgate etl ...`: the batch ETL commands, as clients of `/v1/etl`.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::client::{apply_declarations, print_table, time, Api};
use crate::ServerArgs;

#[derive(clap::Subcommand)]
pub enum EtlCommand {
    /// Declare (or replace) the jobs of a TOML file ([jobs.<name>] tables).
    Apply {
        /// TOML file of [jobs.<name>] tables.
        file: std::path::PathBuf,
    },
    /// Run a job now, showing its progress until it ends.
    Run {
        /// The job.
        job: String,
        /// The window the run covers (RFC 3339, YYYY-MM-DD or epoch ms);
        /// rows outside it are rejected. Default: the rows' own span.
        #[arg(long, requires = "to")]
        from: Option<String>,
        /// End of the window, exclusive (as --from).
        #[arg(long, requires = "from")]
        to: Option<String>,
        /// Start the run and return; follow it with `etl runs`.
        #[arg(long)]
        detach: bool,
    },
    /// List the jobs and when each runs next.
    List,
    /// The latest runs (of one job, or all).
    Runs {
        /// Only this job's runs.
        job: Option<String>,
    },
    /// The rows a run refused, and why.
    Rejects {
        /// The run's id (as `etl run` and `etl runs` show it).
        run: i64,
    },
    /// Forget a job (its table and runs stay).
    Delete {
        /// The job.
        job: String,
    },
}

pub async fn etl(command: EtlCommand, server: &ServerArgs) -> anyhow::Result<()> {
    let api = Api::new(server)?;
    match command {
        EtlCommand::Apply { file } => {
            apply_declarations(&api, "/v1/etl/jobs", &file).await?;
        }
        EtlCommand::Run {
            job,
            from,
            to,
            detach,
        } => {
            let mut request = api.http.post(api.url(&format!("/v1/etl/jobs/{job}/run")));
            if let (Some(from), Some(to)) = (&from, &to) {
                request = request.query(&[("from", from), ("to", to)]);
            }
            let reply = api.call(request).await?;
            let id = reply["run"].as_i64().context("the server named no run")?;
            println!("run {id} of {job} started");
            if !detach {
                follow(&api, id).await?;
            }
        }
        EtlCommand::List => {
            let reply = api.call(api.http.get(api.url("/v1/etl/jobs"))).await?;
            let rows: Vec<Vec<Value>> = reply["jobs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|j| {
                    let def = &j["definition"];
                    let schedule = def["cron"].as_str().or(def["every"].as_str());
                    vec![
                        j["name"].clone(),
                        def["load"]["table"].clone(),
                        def["load"]["mode"].clone(),
                        schedule.map_or(Value::from("by hand"), Value::from),
                        time(&j["next_run_at"]),
                    ]
                })
                .collect();
            print_table(&["job", "table", "mode", "schedule", "next run"], &rows);
        }
        EtlCommand::Runs { job } => {
            let mut request = api.http.get(api.url("/v1/etl/runs"));
            if let Some(job) = &job {
                request = request.query(&[("job", job)]);
            }
            let reply = api.call(request).await?;
            let rows: Vec<Vec<Value>> = reply["runs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        r["id"].clone(),
                        r["job"].clone(),
                        r["status"].clone(),
                        time(&r["started_at"]),
                        r["rows_read"].clone(),
                        r["rows_loaded"].clone(),
                        r["rows_rejected"].clone(),
                        time(&r["window_from"]),
                        time(&r["window_to"]),
                        r["error"].clone(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "run", "job", "status", "started", "read", "loaded", "rejected", "from", "to",
                    "error",
                ],
                &rows,
            );
        }
        EtlCommand::Rejects { run } => {
            let reply = api
                .call(
                    api.http
                        .get(api.url(&format!("/v1/etl/runs/{run}/rejects"))),
                )
                .await?;
            let rows: Vec<Vec<Value>> = reply["rejects"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        r["source"].clone(),
                        r["file"].clone(),
                        r["line"].clone(),
                        r["reason"].clone(),
                        r["data"].clone(),
                    ]
                })
                .collect();
            print_table(&["source", "file", "line", "reason", "data"], &rows);
        }
        EtlCommand::Delete { job } => {
            api.call(api.http.delete(api.url(&format!("/v1/etl/jobs/{job}"))))
                .await?;
            println!("deleted {job}");
        }
    }
    Ok(())
}

/// Prints the run's counts as they change (in place on a terminal), then
/// its outcome; fails when the run failed.
async fn follow(api: &Api, id: i64) -> anyhow::Result<()> {
    let url = api.url(&format!("/v1/etl/runs/{id}"));
    let mut last = String::new();
    let terminal = std::io::stderr().is_terminal();
    let run = loop {
        let run = api.call(api.http.get(&url)).await?;
        let line = format!(
            "read {}  transformed {}  loaded {}  rejected {}",
            run["rows_read"], run["rows_transformed"], run["rows_loaded"], run["rows_rejected"]
        );
        if line != last {
            // In place on a terminal; one line per change in a log or pipe.
            if terminal {
                eprint!("\r{line}");
                let _ = std::io::stderr().flush();
            } else {
                eprintln!("{line}");
            }
            last = line;
        }
        if run["status"] != "running" {
            if terminal {
                eprintln!();
            }
            break run;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    match run["status"].as_str() {
        Some("succeeded") => {
            println!(
                "run {id} succeeded: {} rows loaded, {} rejected (fleetgate etl rejects {id})",
                run["rows_loaded"], run["rows_rejected"]
            );
            Ok(())
        }
        _ => bail!(
            "run {id} failed: {}",
            run["error"].as_str().unwrap_or("no reason recorded")
        ),
    }
}
