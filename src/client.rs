//! The admin CLI: commands that call a running server's HTTP API.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Subcommand;
use serde_json::{json, Value};

use crate::ServerArgs;
use fleetgate_device_sdk::identity::{self, DeviceKey};
use fleetgate_protocol::sdk::{hex, SdkBundle, Target};

/// A device's role. Roles are hierarchical: admin ⊃ extract ⊃ ingest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleArg {
    /// Publish its own records (ingest/<stream>/<own id>), subscribe to devices/<own id>/#.
    Ingest,
    /// Ingest's rights, plus queries, streams, rejects and following live/#.
    Extract,
    /// Everything: devices, streams, views, ETL, state, SDK builds.
    Admin,
}

impl RoleArg {
    pub fn as_str(self) -> &'static str {
        match self {
            RoleArg::Ingest => "ingest",
            RoleArg::Extract => "extract",
            RoleArg::Admin => "admin",
        }
    }
}

/// `device add`'s id: checked here, as the server checks it.
fn device_id(id: &str) -> Result<String, String> {
    fleetgate_protocol::validate_device_id(id).map(|()| id.to_string())
}

#[derive(Subcommand)]
pub enum DeviceCommand {
    /// Register a device and print its token.
    Add {
        /// Device id: 1-64 characters from A-Z a-z 0-9 - _ . (it is the MQTT
        /// client id and username, and the last level of its ingest topic).
        #[arg(value_parser = device_id)]
        id: String,
        /// What the device may do.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Device type, 1-64 characters (e.g. thermostat): a stream's
        /// `writers` name the types that may write it. Default: none.
        #[arg(long = "type", value_name = "TYPE")]
        device_type: Option<String>,
        /// The device's public key file (`device.pub` from `device keygen`),
        /// needed for SDK handshakes. Default: none.
        #[arg(long, value_name = "FILE")]
        public_key: Option<std::path::PathBuf>,
        /// Token lifetime, e.g. 24h or 365d; at most 10 years. Default: 365d.
        #[arg(long, value_parser = fleetgate_protocol::duration::parse)]
        ttl: Option<Duration>,
    },
    /// Register many devices from a CSV file, in one transaction, and write
    /// their tokens to a file.
    #[command(long_about = IMPORT_ABOUT)]
    Import(crate::import_cli::ImportArgs),
    /// Mint a new token for a registered device.
    Token {
        /// Id of a registered, unrevoked device.
        id: String,
        /// Token lifetime, e.g. 1h or 30d; at most 10 years.
        #[arg(long, default_value = "24h", value_parser = fleetgate_protocol::duration::parse)]
        ttl: Duration,
    },
    /// List registered devices, as a table or as CSV.
    List {
        /// Only devices of this type (as given to `device add --type`).
        #[arg(long = "type", value_name = "TYPE")]
        device_type: Option<String>,
        /// Only devices with this role.
        #[arg(long, value_enum)]
        role: Option<RoleArg>,
        /// Print CSV with a header row
        /// (id,role,type,public_key,revoked_at,created_at; times in Unix
        /// seconds, empty when none) instead of a table.
        #[arg(long)]
        csv: bool,
    },
    /// Revoke a device: its tokens stop working and its connections close.
    Revoke {
        /// Id of a registered device.
        id: String,
    },
    /// Change a device's role; its connections close and reconnect under the new role.
    Role {
        /// Id of a registered, unrevoked device.
        id: String,
        /// The new role.
        #[arg(value_enum)]
        role: RoleArg,
    },
    /// List devices banned after repeated authentication failures.
    Bans,
    /// Lift a device's ban.
    Unban {
        /// Id of a banned device.
        id: String,
    },
    /// Register or replace a device's public key (for SDK handshakes).
    Key {
        /// Id of a registered device.
        id: String,
        /// The device's public key file (`device.pub` from `device keygen`).
        #[arg(long, value_name = "FILE")]
        public_key: std::path::PathBuf,
    },
    /// Make a device key pair (device.key, device.pub) in a directory; no server needed.
    Keygen {
        /// Directory to write device.key (mode 0600) and device.pub to; made if missing.
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

const IMPORT_ABOUT: &str = "\
Register many devices from a CSV file, in one transaction, and write their
tokens to a file.

FILE starts with a header row naming its columns, in any order:
  id          required: 1-64 characters from A-Z a-z 0-9 - _ .
  role        required: ingest, extract or admin
  type        optional: 1-64 characters; empty for none
  public_key  optional: the device's public key file (device.pub from
              `device keygen`), relative to FILE's directory; empty for none
A row may leave out trailing empty cells. Blank lines and lines starting
with # are skipped.

Every row is checked first: here (CSV, key files, ids listed twice), and
then by the server (ids, roles, types, keys, ids already registered). If
any row is invalid, each one is reported by its line, id, what is wrong and
what is allowed, nothing is imported and the exit status is 1. With
--skip-invalid the valid rows are imported and the invalid ones reported.

The tokens go to --tokens as CSV (id,token,expires_at; Unix seconds),
written with mode 0600 once the import succeeds; an existing file is
refused before anything is imported, unless --force. A lost tokens file is
not fatal: `fleetgate device token ID` mints a new token.";

#[derive(Subcommand)]
pub enum StreamCommand {
    /// Create or evolve the streams declared in a TOML file.
    Apply {
        /// TOML file of [streams.<name>] tables.
        file: std::path::PathBuf,
    },
    /// List streams.
    List,
    /// A stream's declared fields: stored as a column or compacted into
    /// `extra`, when queries last used each, and why some stay columns.
    Fields {
        /// The stream.
        name: String,
    },
}

pub(crate) struct Api {
    pub(crate) http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    pub(crate) fn new(server: &ServerArgs) -> anyhow::Result<Api> {
        let token = match std::env::var("FLEETGATE_TOKEN") {
            Ok(token) if !token.trim().is_empty() => token.trim().to_string(),
            _ => {
                let path = server.data.join("admin.token");
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!("no FLEETGATE_TOKEN and cannot read {}", path.display())
                    })?
                    .trim()
                    .to_string()
            }
        };
        Ok(Api {
            http: reqwest::Client::new(),
            base: server.server.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// The server's base URL.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    pub(crate) async fn call(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let (status, body) = self.send(request).await?;
        if !status.is_success() {
            bail!("{status}: {}", error_message(&body));
        }
        Ok(body)
    }

    /// Sends a request and returns its status and body (JSON, or the text
    /// as a string), whatever the status.
    pub(crate) async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<(reqwest::StatusCode, Value)> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| {
                format!(
                    "cannot reach the fleetgate server at {} (is `fleetgate up` running?)",
                    self.base
                )
            })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, body))
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// What an error answer says: its `error`, or its text if it is not the
/// API's JSON (a proxy's page, say).
pub(crate) fn error_message(body: &Value) -> String {
    if let Some(message) = body.get("error").and_then(Value::as_str) {
        return message.to_string();
    }
    match body {
        Value::String(text) if !text.trim().is_empty() => text.trim().chars().take(500).collect(),
        Value::Null | Value::String(_) => "the server gave no reason".to_string(),
        other => other.to_string(),
    }
}

pub async fn device(command: DeviceCommand, server: &ServerArgs) -> anyhow::Result<()> {
    if let DeviceCommand::Keygen { out } = &command {
        let key = DeviceKey::generate(out).map_err(|e| anyhow!(e))?;
        println!("{}", key.public_hex());
        eprintln!(
            "wrote {} and {}",
            out.join(identity::PRIVATE_FILE).display(),
            out.join(identity::PUBLIC_FILE).display()
        );
        return Ok(());
    }
    let api = Api::new(server)?;
    match command {
        DeviceCommand::Keygen { .. } => unreachable!("handled above"),
        DeviceCommand::Key { id, public_key } => {
            let key = identity::read_public_key(&public_key).map_err(|e| anyhow!(e))?;
            let url = api.url(&format!("/v1/devices/{id}/key"));
            api.call(api.http.post(url).json(&json!({ "public_key": hex(&key) })))
                .await?;
            println!("{id} now signs handshakes with {}", hex(&key));
        }
        DeviceCommand::Add {
            id,
            role,
            device_type,
            public_key,
            ttl,
        } => {
            let public_key = public_key
                .map(|path| identity::read_public_key(&path).map(|k| hex(&k)))
                .transpose()
                .map_err(|e| anyhow!(e))?;
            let body = json!({ "id": id, "role": role.as_str(), "type": device_type, "public_key": public_key, "ttl_secs": ttl.map(|t| t.as_secs()) });
            let reply = api
                .call(api.http.post(api.url("/v1/devices")).json(&body))
                .await?;
            println!(
                "{}",
                reply["token"]
                    .as_str()
                    .ok_or_else(|| anyhow!("reply has no token"))?
            );
        }
        DeviceCommand::Token { id, ttl } => {
            let body = json!({ "ttl_secs": ttl.as_secs() });
            let reply = api
                .call(
                    api.http
                        .post(api.url(&format!("/v1/devices/{id}/token")))
                        .json(&body),
                )
                .await?;
            println!(
                "{}",
                reply["token"]
                    .as_str()
                    .ok_or_else(|| anyhow!("reply has no token"))?
            );
        }
        DeviceCommand::Import(args) => crate::import_cli::import(args, &api).await?,
        DeviceCommand::List {
            device_type,
            role,
            csv,
        } => {
            let mut query = Vec::new();
            if let Some(t) = &device_type {
                query.push(("type", t.as_str()));
            }
            if let Some(role) = role {
                query.push(("role", role.as_str()));
            }
            let request = api.http.get(api.url("/v1/devices")).query(&query);
            let reply = api.call(request).await?;
            let devices = reply["devices"].as_array().cloned().unwrap_or_default();
            if csv {
                crate::import_cli::print_devices_csv(&devices)?;
                return Ok(());
            }
            let rows: Vec<Vec<Value>> = devices
                .iter()
                .map(|d| {
                    vec![
                        d["id"].clone(),
                        d["role"].clone(),
                        d["device_type"].clone(),
                        json!(d["revoked_at"].is_number()),
                    ]
                })
                .collect();
            print_table(&["id", "role", "type", "revoked"], &rows);
        }
        DeviceCommand::Revoke { id } => {
            api.call(api.http.post(api.url(&format!("/v1/devices/{id}/revoke"))))
                .await?;
            println!("revoked {id}");
        }
        DeviceCommand::Role { id, role } => {
            let url = api.url(&format!("/v1/devices/{id}/role"));
            let reply = api
                .call(api.http.post(url).json(&json!({ "role": role.as_str() })))
                .await?;
            println!(
                "{id} is now {}",
                reply["device"]["role"].as_str().unwrap_or("?")
            );
        }
        DeviceCommand::Bans => {
            let reply = api.call(api.http.get(api.url("/v1/bans"))).await?;
            let rows: Vec<Vec<Value>> = reply["bans"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| vec![b["device"].clone(), b["until"].clone(), b["reason"].clone()])
                .collect();
            print_table(&["device", "until (unix)", "reason"], &rows);
        }
        DeviceCommand::Unban { id } => {
            api.call(api.http.delete(api.url(&format!("/v1/bans/{id}"))))
                .await?;
            println!("unbanned {id}");
        }
    }
    Ok(())
}

pub async fn stream(command: StreamCommand, server: &ServerArgs) -> anyhow::Result<()> {
    let api = Api::new(server)?;
    match command {
        StreamCommand::Apply { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let reply = api
                .call(api.http.post(api.url("/v1/streams")).body(text))
                .await?;
            for applied in reply["applied"].as_array().into_iter().flatten() {
                let added = applied["added_fields"]
                    .as_array()
                    .map(|a| a.len())
                    .unwrap_or(0);
                let suffix = if added > 0 {
                    format!(" (+{added} fields)")
                } else {
                    String::new()
                };
                println!(
                    "{}: {}{suffix}",
                    applied["stream"].as_str().unwrap_or("?"),
                    applied["action"].as_str().unwrap_or("?")
                );
            }
        }
        StreamCommand::List => {
            let reply = api.call(api.http.get(api.url("/v1/streams"))).await?;
            let rows: Vec<Vec<Value>> = reply["streams"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    vec![
                        s["name"].clone(),
                        s["key"].clone(),
                        json!(s["columns"].as_array().map(|c| c.len()).unwrap_or(0)),
                    ]
                })
                .collect();
            print_table(&["stream", "key", "columns"], &rows);
        }
        StreamCommand::Fields { name } => {
            let path = format!("/v1/streams/{name}/fields");
            let reply = api.call(api.http.get(api.url(&path))).await?;
            let rows: Vec<Vec<Value>> = reply["fields"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|f| {
                    vec![
                        f["field"].clone(),
                        f["stored"].clone(),
                        time(&f["last_used_at"]),
                        time(&f["compacted_at"]),
                        f["pinned"].clone(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "field",
                    "stored",
                    "last used",
                    "compacted",
                    "never compacted",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum StateCommand {
    /// Roll out a state document (rules/<stream> in TOML, lookup/<table> in
    /// CSV or TOML) to every store at one instant.
    Push {
        /// rules/<stream> or lookup/<table>.
        key: String,
        /// The document: TOML for rules; CSV (header row, key first) or TOML for a lookup table.
        file: std::path::PathBuf,
        /// Activation time: RFC 3339 (2026-11-22T10:00:00Z) or from now (+30s).
        /// Default: as soon as the cluster can switch together.
        #[arg(long)]
        at: Option<String>,
        /// Return once the version is published, without waiting for the
        /// stores' confirmations.
        #[arg(long)]
        no_wait: bool,
    },
    /// Show state versions, and which version each store holds.
    Show,
}

pub async fn state(command: StateCommand, server: &ServerArgs) -> anyhow::Result<()> {
    let api = Api::new(server)?;
    match command {
        StateCommand::Push {
            key,
            file,
            at,
            no_wait,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let csv = file
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
            let mut body = json!({
                "text": text,
                "format": if csv { "csv" } else { "toml" },
                "wait": !no_wait,
            });
            match at.as_deref() {
                None => {}
                Some(relative) if relative.starts_with('+') => {
                    let wait = fleetgate_protocol::duration::parse(&relative[1..])
                        .map_err(|e| anyhow!("--at {relative}: {e} (expected e.g. +30s)"))?;
                    body["in_ms"] = json!(fleetgate_protocol::duration::millis(wait));
                }
                Some(time) => {
                    let at = humantime::parse_rfc3339_weak(time)
                        .with_context(|| format!("--at {time}: expected RFC 3339 or +DURATION"))?;
                    let at_ms = at
                        .duration_since(std::time::UNIX_EPOCH)
                        .context("--at is before 1970")?
                        .as_millis();
                    body["at_ms"] = json!(at_ms as i64);
                }
            }
            if !no_wait {
                // The answer comes once every store switched: say why it waits.
                eprintln!(
                    "pushing {key}{}; waiting until every store has switched to it (--no-wait returns at once)",
                    at.as_deref()
                        .map(|at| format!(", to activate at {at}"))
                        .unwrap_or_default()
                );
            }
            let reply = api
                .call(
                    api.http
                        .post(api.url(&format!("/v1/state/{key}")))
                        .json(&body),
                )
                .await?;
            println!("{}", serde_json::to_string_pretty(&reply)?);
        }
        StateCommand::Show => {
            let reply = api.call(api.http.get(api.url("/v1/state"))).await?;
            println!("current version: {}", reply["current"]);
            let stores: Vec<Vec<Value>> = reply["stores"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    vec![
                        s["node"].clone(),
                        s["up"].clone(),
                        s["active"].clone(),
                        s["previous"].clone(),
                    ]
                })
                .collect();
            print_table(&["store", "up", "active", "previous"], &stores);
            let versions: Vec<Vec<Value>> = reply["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| {
                    vec![
                        v["version"].clone(),
                        v["key"].clone(),
                        v["status"].clone(),
                        utc_time(&v["activate_at_ms"]),
                        v["staged_by"].clone(),
                    ]
                })
                .collect();
            print_table(
                &["version", "key", "status", "activates (UTC)", "staged_on"],
                &versions,
            );
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum ViewCommand {
    /// Create the views declared in a TOML file ([views.<name>] tables).
    Create {
        /// TOML file of [views.<name>] tables.
        file: std::path::PathBuf,
    },
    /// List views, their refresh and their size.
    List,
    /// Drop a view (queries go back to the primary table).
    Drop {
        /// The view.
        name: String,
    },
    /// The query shapes the store has seen, and what it decided for each
    /// (automatic views).
    Shapes,
}

pub async fn view(command: ViewCommand, server: &ServerArgs) -> anyhow::Result<()> {
    let api = Api::new(server)?;
    match command {
        ViewCommand::Create { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let reply = api
                .call(api.http.post(api.url("/v1/views")).body(text))
                .await?;
            for name in reply["created"].as_array().into_iter().flatten() {
                println!("{}: created", name.as_str().unwrap_or("?"));
            }
        }
        ViewCommand::List => {
            let reply = api.call(api.http.get(api.url("/v1/views"))).await?;
            let rows: Vec<Vec<Value>> = reply["views"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| {
                    // A view over a view reads from that view, not its stream.
                    let source = match v["built_on"].as_str() {
                        Some(view) => json!(format!("view {view}")),
                        None => v["source"].clone(),
                    };
                    vec![
                        v["name"].clone(),
                        v["kind"].clone(),
                        source,
                        v["refresh"].clone(),
                        v["origin"].clone(),
                        v["rows"].clone(),
                        v["unfolded"].clone(),
                        v["bytes"].clone(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "view", "kind", "source", "refresh", "origin", "rows", "unfolded", "bytes",
                ],
                &rows,
            );
        }
        ViewCommand::Shapes => {
            let reply = api.call(api.http.get(api.url("/v1/views/shapes"))).await?;
            let rows: Vec<Vec<Value>> = reply["shapes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    let mean = s["primary_mean_ms"]
                        .as_f64()
                        .map_or(Value::Null, |ms| json!(format!("{ms:.1}")));
                    vec![
                        s["shape"].clone(),
                        s["queries"].clone(),
                        mean,
                        s["decision"].clone(),
                    ]
                })
                .collect();
            print_table(&["shape", "queries", "mean ms", "decision"], &rows);
        }
        ViewCommand::Drop { name } => {
            api.call(api.http.delete(api.url(&format!("/v1/views/{name}"))))
                .await?;
            println!("dropped {name}");
        }
    }
    Ok(())
}

pub async fn query(sql: &str, explain: bool, server: &ServerArgs) -> anyhow::Result<()> {
    let api = Api::new(server)?;
    let path = if explain {
        "/v1/query/explain"
    } else {
        "/v1/query"
    };
    let reply = api
        .call(api.http.post(api.url(path)).json(&json!({ "sql": sql })))
        .await?;
    if explain {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    let columns: Vec<String> = reply["columns"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c.as_str().unwrap_or("").to_string())
        .collect();
    let rows: Vec<Vec<Value>> = reply["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r.as_array().cloned().unwrap_or_default())
        .collect();
    let headers: Vec<&str> = columns.iter().map(String::as_str).collect();
    print_table(&headers, &rows);
    if reply["truncated"].as_bool() == Some(true) {
        eprintln!("(result truncated)");
    }
    if let Some(view) = reply["view"].as_str() {
        eprintln!("(answered by view {view})");
    }
    Ok(())
}

fn cell(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Unix milliseconds as a UTC time for a table cell.
/// Posts a TOML file of declarations (jobs, reports, analyses) and prints
/// what was applied.
pub(crate) async fn apply_declarations(
    api: &Api,
    path: &str,
    file: &std::path::Path,
) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let reply = api.call(api.http.post(api.url(path)).body(text)).await?;
    for name in reply["applied"].as_array().into_iter().flatten() {
        println!("{}: applied", name.as_str().unwrap_or("?"));
    }
    Ok(reply)
}

pub(crate) fn time(ms: &Value) -> Value {
    ms.as_i64()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or(Value::Null, |t| {
            Value::from(t.format("%Y-%m-%d %H:%M:%S").to_string())
        })
}

/// An epoch-milliseconds value as RFC 3339 UTC (as it is when not a number).
pub(crate) fn utc_time(ms: &Value) -> Value {
    match ms.as_u64() {
        Some(ms) => Value::String(
            humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
            .to_string(),
        ),
        None => ms.clone(),
    }
}

pub(crate) fn print_table(headers: &[&str], rows: &[Vec<Value>]) {
    let cells: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(cell).collect()).collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (i, c) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |values: Vec<String>| {
        let padded: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{v:<w$}", w = widths[i]))
            .collect();
        println!("{}", padded.join(" | ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    println!(
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-+-")
    );
    for row in cells {
        line(row);
    }
    println!(
        "({} row{})",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    );
}

#[derive(Subcommand)]
pub enum SdkCommand {
    /// Build a device's SDK offline (for flashing before shipping): writes
    /// the platform-signed manifest with the artifact inside.
    Build {
        /// The registered device to build for (its role and type decide what the SDK holds).
        #[arg(long)]
        device: String,
        /// wasm, x86_64, aarch64, riscv64, pulley32 or pulley64.
        #[arg(long)]
        target: Target,
        /// Where to write the signed manifest (JSON, artifact inside).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Manifest lifetime.
        #[arg(long, default_value = "365d", value_parser = fleetgate_protocol::duration::parse)]
        ttl: Duration,
    },
    /// As the device: handshake with its key, verify and load the SDK, and
    /// write the bundle; prints the role, target and token.
    Fetch {
        /// Device id.
        #[arg(long)]
        id: String,
        /// Device type as registered.
        #[arg(long = "type")]
        device_type: String,
        /// Directory holding device.key.
        #[arg(long)]
        key_dir: std::path::PathBuf,
        /// The platform's public key (<data>/platform.pub of the server).
        #[arg(long)]
        platform_key: std::path::PathBuf,
        /// Artifact to ask for; default: native code for this machine.
        #[arg(long)]
        target: Option<Target>,
        /// CA certificate (PEM) to trust when --server is https://.
        #[arg(long)]
        ca: Option<std::path::PathBuf>,
        /// Where to write the verified bundle (JSON).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Verify a bundle with the platform key and print its manifest, and for
    /// WebAssembly its imports, exports and the streams it can encode.
    Inspect {
        /// A bundle written by `sdk build` or `sdk fetch`.
        file: std::path::PathBuf,
        /// The platform's public key (<data>/platform.pub of the server).
        #[arg(long)]
        platform_key: std::path::PathBuf,
    },
}

pub async fn sdk(command: SdkCommand, server: &ServerArgs) -> anyhow::Result<()> {
    match command {
        SdkCommand::Build {
            device,
            target,
            out,
            ttl,
        } => {
            let api = Api::new(server)?;
            let body = json!({ "device": device, "target": target, "ttl_secs": ttl.as_secs() });
            let reply = api
                .call(api.http.post(api.url("/v1/sdk/build")).json(&body))
                .await?;
            std::fs::write(&out, serde_json::to_vec_pretty(&reply["sdk"])?)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("wrote {}", out.display());
        }
        SdkCommand::Fetch {
            id,
            device_type,
            key_dir,
            platform_key,
            target,
            ca,
            out,
        } => {
            let key = DeviceKey::load(&key_dir).map_err(|e| anyhow!(e))?;
            let platform_key = identity::read_public_key(&platform_key).map_err(|e| anyhow!(e))?;
            let mut config = fleetgate_device_sdk::DeviceConfig::new(
                &server.server,
                &id,
                &device_type,
                key,
                platform_key,
                key_dir.join("queue"),
            );
            config.target = target;
            config.ca_pem = ca
                .map(|path| {
                    std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
                })
                .transpose()?;
            let http = fleetgate_device_sdk::tls::http_client(&config)?;
            let session = fleetgate_device_sdk::handshake::handshake(&config, &http).await?;
            std::fs::write(&out, serde_json::to_vec_pretty(&session.bundle)?)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "{}",
                json!({
                    "device": id,
                    "role": session.manifest.role,
                    "target": session.manifest.target,
                    "artifact_bytes": session.manifest.artifact_len,
                    "streams": session.module.schema().streams.iter().map(|s| &s.name).collect::<Vec<_>>(),
                    "token": session.token,
                    "token_expires_at": session.token_expires_at,
                    "bundle": out,
                })
            );
        }
        SdkCommand::Inspect { file, platform_key } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let platform_key = identity::read_public_key(&platform_key).map_err(|e| anyhow!(e))?;
            let (manifest, artifact) = SdkBundle::from_json(&bytes)
                .and_then(|b| b.open(&platform_key))
                .map_err(|e| anyhow!(e))?;
            let mut report = json!({ "manifest": manifest });
            if manifest.target == Target::Wasm {
                let (imports, exports) =
                    fleetgate_sdk_builder::interface(&artifact).map_err(|e| anyhow!(e))?;
                report["imports"] = json!(imports);
                report["exports"] = json!(exports);
                // The streams it has encoders for: those the device's type
                // may write.
                let schema =
                    fleetgate_sdk_builder::module_schema_of(&artifact).map_err(|e| anyhow!(e))?;
                report["streams"] =
                    json!(schema.streams.iter().map(|s| &s.name).collect::<Vec<_>>());
            }
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }
    Ok(())
}
