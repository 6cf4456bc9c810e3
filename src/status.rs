//! `fleetgate status`: one screen for an operator, from the running
//! server's HTTP API: connections and sessions, ingest and rejects per
//! second, views, store nodes, and the newest alerts and ETL runs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{json, Value};

use crate::client::{print_table, Api};
use crate::ServerArgs;

/// Newest alerts and runs shown.
const NEWEST: usize = 5;

pub async fn run(server: &ServerArgs, interval: Duration) -> anyhow::Result<()> {
    let api = Api::new(server)?;
    // Two readings of the counters give the rates.
    let (first, first_at) = (metrics(&api).await?, Instant::now());
    tokio::time::sleep(interval).await;
    let (second, elapsed) = (metrics(&api).await?, first_at.elapsed().as_secs_f64());
    let rate = |name: &str| {
        let delta = second.get(name).unwrap_or(&0.0) - first.get(name).unwrap_or(&0.0);
        format!("{:.0}/s", delta.max(0.0) / elapsed)
    };
    let value = |name: &str| format!("{:.0}", second.get(name).unwrap_or(&0.0));

    println!("fleetgate at {}", api.base());
    print_table(
        &["", "now", "total"],
        &[
            vec![
                json!("devices connected"),
                json!(value("fleetgate_mqtt_connections")),
                json!(""),
            ],
            vec![
                json!("MQTT sessions held"),
                json!(value("fleetgate_mqtt_sessions")),
                json!(""),
            ],
            vec![
                json!("messages queued for sessions"),
                json!(value("fleetgate_mqtt_messages_queued")),
                json!(""),
            ],
            vec![
                json!("records stored"),
                json!(rate("fleetgate_records_accepted_total")),
                json!(value("fleetgate_records_accepted_total")),
            ],
            vec![
                json!("records rejected"),
                json!(rate("fleetgate_records_rejected_total")),
                json!(value("fleetgate_records_rejected_total")),
            ],
            vec![
                json!("connects refused"),
                json!(rate("fleetgate_mqtt_connects_refused_total")),
                json!(value("fleetgate_mqtt_connects_refused_total")),
            ],
        ],
    );

    let views = api.call(api.http.get(api.url("/v1/views"))).await?;
    println!();
    section(
        "views",
        &["view", "kind", "refresh", "origin", "rows"],
        &views["views"],
        usize::MAX,
        |v| {
            vec![
                v["name"].clone(),
                v["kind"].clone(),
                v["refresh"].clone(),
                v["origin"].clone(),
                v["rows"].clone(),
            ]
        },
    );

    let nodes = api.call(api.http.get(api.url("/v1/nodes"))).await?;
    if nodes["nodes"].as_array().is_some_and(|n| n.is_empty()) {
        println!("\nstore: in this process (fleetgate up)");
    } else {
        println!();
        section(
            "store nodes",
            &["node", "address", "up", "routed", "failed over"],
            &nodes["nodes"],
            usize::MAX,
            |n| {
                vec![
                    n["id"].clone(),
                    n["addr"].clone(),
                    n["up"].clone(),
                    n["routed"].clone(),
                    n["failed_over"].clone(),
                ]
            },
        );
    }

    let alerts = api
        .call(api.http.get(api.url("/v1/alerts?limit=5")))
        .await?;
    println!();
    section(
        "newest alerts",
        &[
            "raised (UTC)",
            "analysis",
            "device",
            "mean",
            "expected",
            "score",
        ],
        &alerts["alerts"],
        NEWEST,
        |a| {
            vec![
                crate::client::utc_time(&a["raised_at"]),
                a["analysis"].clone(),
                a["device_id"].clone(),
                a["mean"].clone(),
                a["expected"].clone(),
                a["score"].clone(),
            ]
        },
    );

    let runs = api
        .call(api.http.get(api.url("/v1/etl/runs?limit=5")))
        .await?;
    println!();
    section(
        "newest ETL runs",
        &[
            "run",
            "job",
            "status",
            "started (UTC)",
            "loaded",
            "rejected",
        ],
        &runs["runs"],
        NEWEST,
        |r| {
            vec![
                r["id"].clone(),
                r["job"].clone(),
                r["status"].clone(),
                crate::client::utc_time(&r["started_at"]),
                r["rows_loaded"].clone(),
                r["rows_rejected"].clone(),
            ]
        },
    );
    Ok(())
}

/// A titled table of at most `limit` items, or a line saying there are none.
fn section(
    title: &str,
    headers: &[&str],
    items: &Value,
    limit: usize,
    row: impl Fn(&Value) -> Vec<Value>,
) {
    let rows: Vec<Vec<Value>> = items
        .as_array()
        .into_iter()
        .flatten()
        .take(limit)
        .map(row)
        .collect();
    if rows.is_empty() {
        println!("{title}: none");
        return;
    }
    println!("{title}:");
    print_table(headers, &rows);
}

/// The server's metrics, each summed over its labels.
async fn metrics(api: &Api) -> anyhow::Result<HashMap<String, f64>> {
    let (status, body) = api.send(api.http.get(api.url("/metrics"))).await?;
    let Some(text) = body.as_str().filter(|_| status.is_success()) else {
        bail!("{status}: the server did not answer /metrics");
    };
    Ok(parse_metrics(text))
}

/// OpenMetrics text: `name{labels} value` per sample, `#` lines skipped.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut sums = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        if let Ok(value) = value.parse::<f64>() {
            *sums.entry(name.to_string()).or_insert(0.0) += value;
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_summed_over_their_labels() {
        let text = "# HELP x y\n# TYPE fleetgate_records_accepted counter\n\
                    fleetgate_records_accepted_total{stream=\"a\"} 3\n\
                    fleetgate_records_accepted_total{stream=\"b\"} 4\n\
                    fleetgate_mqtt_connections 7\n# EOF\n";
        let sums = parse_metrics(text);
        assert_eq!(sums["fleetgate_records_accepted_total"], 7.0);
        assert_eq!(sums["fleetgate_mqtt_connections"], 7.0);
    }
}
