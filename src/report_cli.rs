//! `fleetgate report ...` and `fleetgate analysis ...`: hybrid reports,
//! their reconciliations, and anomaly analyses, as clients of `/v1/reports`,
//! `/v1/reconciliations`, `/v1/analyses` and `/v1/alerts`.

use serde_json::Value;

use crate::client::{apply_declarations as apply, print_table, time, Api};
use crate::ServerArgs;

/// A period as the server takes it: RFC 3339, YYYY-MM-DD (midnight UTC) or
/// epoch milliseconds.
#[derive(clap::Args)]
pub struct Period {
    /// Start of the period (RFC 3339, YYYY-MM-DD or epoch ms).
    #[arg(long)]
    from: String,
    /// End of the period, exclusive (RFC 3339, YYYY-MM-DD or epoch ms).
    #[arg(long)]
    to: String,
}

#[derive(clap::Subcommand)]
pub enum ReportCommand {
    /// Declare (or replace) the reports of a TOML file.
    Apply {
        /// TOML file of [reports.<name>] tables.
        file: std::path::PathBuf,
    },
    /// The declared reports: their batch table and real-time stream.
    List,
    /// A report's series: one row per bucket (and group), from the batch
    /// table where a succeeded run covers the bucket, else from real time.
    Show {
        /// The report.
        name: String,
        /// Start of the series (RFC 3339, YYYY-MM-DD or epoch ms); default: 7 days ago.
        #[arg(long, requires = "to")]
        from: Option<String>,
        /// End of the series, exclusive; default: now.
        #[arg(long, requires = "from")]
        to: Option<String>,
        /// Bucket width instead of the report's (e.g. 1h, 1d).
        #[arg(long)]
        bucket: Option<String>,
    },
    /// Compare batch and real time over a period now (admin), and print the result.
    Reconcile {
        /// The report.
        name: String,
        #[command(flatten)]
        period: Period,
    },
    /// The latest reconciliations (of one report, or all).
    Reconciliations {
        /// Only this report's.
        report: Option<String>,
        /// How many, newest first (1-1000).
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
}

#[derive(clap::Subcommand)]
pub enum AnalysisCommand {
    /// Declare (or replace) the analyses of a TOML file.
    Apply {
        /// TOML file of [analyses.<name>] tables.
        file: std::path::PathBuf,
    },
    /// The declared analyses and the table each writes.
    List,
    /// The newest anomaly alerts.
    Alerts {
        /// How many, newest first (1-1000).
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
}

pub async fn report(command: ReportCommand, server: &ServerArgs) -> anyhow::Result<()> {
    let api = Api::new(server)?;
    match command {
        ReportCommand::Apply { file } => {
            let reply = apply(&api, "/v1/reports", &file).await?;
            for warning in reply["warnings"].as_array().into_iter().flatten() {
                eprintln!("warning: {}", warning.as_str().unwrap_or_default());
            }
        }
        ReportCommand::List => {
            let reply = api.call(api.http.get(api.url("/v1/reports"))).await?;
            let rows: Vec<Vec<Value>> = reply["reports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    let def = &r["definition"];
                    vec![
                        r["name"].clone(),
                        def["value"].clone(),
                        def["group_by"].clone(),
                        def["bucket"].clone(),
                        def["batch"]["table"].clone(),
                        def["realtime"]["stream"].clone(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "report",
                    "value",
                    "group by",
                    "bucket",
                    "batch",
                    "real time",
                ],
                &rows,
            );
        }
        ReportCommand::Show {
            name,
            from,
            to,
            bucket,
        } => {
            let mut query = Vec::new();
            if let (Some(from), Some(to)) = (from, to) {
                query.extend([("from", from), ("to", to)]);
            }
            if let Some(bucket) = bucket {
                query.push(("bucket", bucket));
            }
            let reply = api
                .call(
                    api.http
                        .get(api.url(&format!("/v1/reports/{name}")))
                        .query(&query),
                )
                .await?;
            let grouped = reply["points"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p.get("series").is_some());
            let rows: Vec<Vec<Value>> = reply["points"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    let mut row = vec![time(&p["bucket"])];
                    if grouped {
                        row.push(p["series"].clone());
                    }
                    row.extend([p["value"].clone(), p["source"].clone()]);
                    row
                })
                .collect();
            let headers: &[&str] = if grouped {
                &["bucket", "series", "value", "source"]
            } else {
                &["bucket", "value", "source"]
            };
            print_table(headers, &rows);
            match reply["boundary"].as_i64() {
                Some(_) => println!(
                    "batch up to {} UTC; real time after it",
                    time(&reply["boundary"]).as_str().unwrap_or_default()
                ),
                None => println!("no batch run covers this report's table yet: real time only"),
            }
        }
        ReportCommand::Reconcile { name, period } => {
            let reply = api
                .call(
                    api.http
                        .post(api.url(&format!("/v1/reports/{name}/reconcile")))
                        .query(&[("from", &period.from), ("to", &period.to)]),
                )
                .await?;
            print_reconciliation(&reply);
        }
        ReportCommand::Reconciliations { report, limit } => {
            let mut request = api
                .http
                .get(api.url("/v1/reconciliations"))
                .query(&[("limit", limit)]);
            if let Some(report) = &report {
                request = request.query(&[("report", report)]);
            }
            let reply = api.call(request).await?;
            let rows: Vec<Vec<Value>> = reply["reconciliations"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    let counts = &r["differences"]["counts"];
                    vec![
                        r["id"].clone(),
                        r["report"].clone(),
                        r["run"].clone(),
                        time(&r["window_from"]),
                        time(&r["window_to"]),
                        counts["missing_in_realtime"].clone(),
                        counts["missing_in_batch"].clone(),
                        counts["duplicates"].clone(),
                        counts["different"].clone(),
                        counts["buckets"].clone(),
                        r["superseded"].clone(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "id",
                    "report",
                    "run",
                    "from",
                    "to",
                    "missing in real time",
                    "missing in batch",
                    "duplicates",
                    "different",
                    "buckets",
                    "superseded",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

pub async fn analysis(command: AnalysisCommand, server: &ServerArgs) -> anyhow::Result<()> {
    let api = Api::new(server)?;
    match command {
        AnalysisCommand::Apply { file } => {
            apply(&api, "/v1/analyses", &file).await?;
        }
        AnalysisCommand::List => {
            let reply = api.call(api.http.get(api.url("/v1/analyses"))).await?;
            let rows: Vec<Vec<Value>> = reply["analyses"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| {
                    let def = &a["definition"];
                    vec![
                        a["name"].clone(),
                        def["stream"].clone(),
                        def["value"].clone(),
                        def["bucket"].clone(),
                        a["table"].clone(),
                    ]
                })
                .collect();
            print_table(&["analysis", "stream", "value", "bucket", "table"], &rows);
        }
        AnalysisCommand::Alerts { limit } => {
            let reply = api
                .call(
                    api.http
                        .get(api.url("/v1/alerts"))
                        .query(&[("limit", limit)]),
                )
                .await?;
            let rows: Vec<Vec<Value>> = reply["alerts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| {
                    vec![
                        time(&a["raised_at"]),
                        a["analysis"].clone(),
                        a["device_id"].clone(),
                        time(&a["bucket"]),
                        a["mean"].clone(),
                        a["expected"].clone(),
                        a["score"].clone(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "raised", "analysis", "device", "bucket", "mean", "expected", "score",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

/// One reconciliation: the counts, then each difference.
fn print_reconciliation(r: &Value) {
    let d = &r["differences"];
    println!(
        "reconciliation {} of {}, {} to {} UTC: {} batch rows, {} real-time rows, {} real-time rows superseded",
        r["id"],
        r["report"].as_str().unwrap_or("?"),
        time(&r["window_from"]).as_str().unwrap_or("?"),
        time(&r["window_to"]).as_str().unwrap_or("?"),
        d["batch_rows"],
        d["realtime_rows"],
        r["superseded"],
    );
    for (label, field) in [
        ("missing in real time", "missing_in_realtime"),
        ("missing in batch", "missing_in_batch"),
        ("held twice or more in real time", "duplicates"),
        ("values that differ", "different"),
        ("buckets that differ", "buckets"),
    ] {
        let items = d[field].as_array().cloned().unwrap_or_default();
        let shown: Vec<String> = items.iter().map(Value::to_string).collect();
        println!("{label}: {}", items.len());
        for item in shown {
            println!("  {item}");
        }
    }
}
