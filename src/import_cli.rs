//! `fleetgate device import`: a CSV file of devices → one request to
//! `POST /v1/devices/import` → a tokens file of mode 0600. And the CSV
//! form of `device list`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use fleetgate_protocol::sdk::hex;
use fleetgate_protocol::Role;
use serde_json::{json, Value};

use crate::client::{error_message, Api};
use fleetgate_api::http::MAX_IMPORT_DEVICES as MAX_DEVICES;

#[derive(clap::Args)]
pub struct ImportArgs {
    /// The CSV file of devices: a header row (id,role[,type][,public_key]),
    /// then one device per row (see above).
    file: PathBuf,
    /// Where to write the tokens, as CSV (id,token,expires_at), mode 0600.
    /// Required unless --dry-run.
    #[arg(long, value_name = "FILE", required_unless_present = "dry_run")]
    tokens: Option<PathBuf>,
    /// Replace the tokens file if it exists (only once the import succeeded).
    #[arg(long)]
    force: bool,
    /// Import the valid rows and report the invalid ones, instead of
    /// importing nothing when any row is invalid.
    #[arg(long)]
    skip_invalid: bool,
    /// Check every row, here and on the server, and report; import nothing.
    #[arg(long)]
    dry_run: bool,
    /// Token lifetime, e.g. 24h or 365d; at most 10 years.
    #[arg(long, default_value = "365d", value_parser = fleetgate_protocol::duration::parse)]
    ttl: Duration,
}

/// A row ready to send, with the line it came from.
struct Row {
    line: u64,
    id: String,
    role: Role,
    device_type: Option<String>,
    /// Hex, read from the row's key file.
    public_key: Option<String>,
}

/// A row that cannot be imported: its line, its id, and why.
struct Invalid {
    line: u64,
    id: String,
    error: String,
}

const COLUMNS: &str = "id, role, type, public_key";

#[derive(Default)]
struct Header {
    id: Option<usize>,
    role: Option<usize>,
    device_type: Option<usize>,
    public_key: Option<usize>,
}

fn header(file: &Path, names: &csv::StringRecord) -> anyhow::Result<Header> {
    let mut header = Header::default();
    for (i, name) in names.iter().enumerate() {
        let slot = match name.to_ascii_lowercase().as_str() {
            "id" => &mut header.id,
            "role" => &mut header.role,
            "type" => &mut header.device_type,
            "public_key" | "public-key" => &mut header.public_key,
            _ => bail!(
                "{}: the header names a column {name:?}; the columns are {COLUMNS} \
                 (the first line must be the header, e.g. id,role,type)",
                file.display()
            ),
        };
        if slot.replace(i).is_some() {
            bail!("{}: the header names {name:?} twice", file.display());
        }
    }
    if header.id.is_none() || header.role.is_none() {
        bail!(
            "{}: the header must name the columns id and role (and may name type \
             and public_key); it names: {}",
            file.display(),
            names.iter().collect::<Vec<_>>().join(",")
        );
    }
    Ok(header)
}

/// Reads and checks the rows of `file`: what can be checked here (ids,
/// roles, types, key files, ids listed twice). The server checks them
/// all again, and whether they are already registered.
fn read_rows(file: &Path) -> anyhow::Result<(Vec<Row>, Vec<Invalid>)> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(bytes.as_slice());
    let names = reader
        .headers()
        .with_context(|| format!("{}: cannot read the header row", file.display()))?
        .clone();
    if names.iter().all(str::is_empty) {
        bail!(
            "{}: the first line must be the header, e.g. id,role,type",
            file.display()
        );
    }
    let columns = header(file, &names)?;
    let (mut rows, mut invalid) = (Vec::new(), Vec::new());
    let mut first_line: HashMap<String, u64> = HashMap::new();
    for record in reader.records() {
        let record = match record {
            Ok(record) => record,
            Err(e) => {
                invalid.push(Invalid {
                    line: e.position().map_or(0, |p| p.line()),
                    id: String::new(),
                    error: format!("not a readable CSV row: {e}"),
                });
                continue;
            }
        };
        let line = record.position().map_or(0, |p| p.line());
        let cell = |column: Option<usize>| {
            column
                .and_then(|i| record.get(i))
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let id = cell(columns.id).unwrap_or_default();
        let checked = (|| {
            // Trailing empty cells may be left out, not more.
            if record.len() > names.len() {
                return Err(format!(
                    "has {} fields, the header has {} ({})",
                    record.len(),
                    names.len(),
                    names.iter().collect::<Vec<_>>().join(",")
                ));
            }
            fleetgate_protocol::validate_device_id(&id)?;
            let role: Role = cell(columns.role)
                .ok_or("no role: use ingest, extract or admin")?
                .parse()?;
            let device_type = cell(columns.device_type);
            let public_key = match cell(columns.public_key) {
                None => None,
                Some(path) => {
                    let key = fleetgate_device_sdk::identity::read_public_key(&dir.join(&path))
                        .map_err(|e| {
                            let hint = if path.len() == 64
                                && path.bytes().all(|b| b.is_ascii_hexdigit())
                            {
                                " (public_key names the key's file, device.pub, not the key)"
                            } else {
                                ""
                            };
                            format!("public_key: {e}{hint}")
                        })?;
                    Some(key)
                }
            };
            fleetgate_admin::registry::check_registration(
                &id,
                device_type.as_deref(),
                public_key.as_deref(),
            )?;
            if let Some(first) = first_line.get(&id) {
                return Err(format!("listed twice: also on line {first}"));
            }
            Ok(Row {
                line,
                id: id.clone(),
                role,
                device_type,
                public_key: public_key.map(|k| hex(&k)),
            })
        })();
        match checked {
            Ok(row) => {
                first_line.insert(row.id.clone(), line);
                rows.push(row);
            }
            Err(error) => invalid.push(Invalid { line, id, error }),
        }
    }
    Ok((rows, invalid))
}

/// The invalid rows, one a line, in the file's order.
fn report(file: &Path, invalid: &mut [Invalid]) -> String {
    invalid.sort_by_key(|i| i.line);
    invalid
        .iter()
        .map(|i| {
            let id = if i.id.is_empty() {
                "no id".to_string()
            } else {
                format!("id {:?}", i.id)
            };
            format!("  {}:{}: {id}: {}", file.display(), i.line, i.error)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The tokens file: created (mode 0600) before anything is imported, so a
/// name taken or a directory not writable fails first. Without `--force`
/// it is the file itself, created only if absent; with it, a temporary
/// file beside it that replaces it once written. Removed if the import
/// does not happen.
struct TokensFile {
    path: PathBuf,
    writing: PathBuf,
    file: Option<File>,
}

impl TokensFile {
    fn create(path: &Path, force: bool) -> anyhow::Result<TokensFile> {
        let writing = if force {
            let name = path
                .file_name()
                .ok_or_else(|| anyhow!("--tokens {} names no file", path.display()))?;
            path.with_file_name(format!(
                ".{}.{}.partial",
                name.to_string_lossy(),
                std::process::id()
            ))
        } else {
            path.to_path_buf()
        };
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&writing)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists if !force => anyhow!(
                    "{} already exists: pass --force to replace it, or choose another \
                     --tokens file (nothing was imported)",
                    path.display()
                ),
                _ => anyhow!(
                    "cannot create {}: {e} (nothing was imported)",
                    writing.display()
                ),
            })?;
        // Exactly 0600, whatever the umask.
        file.set_permissions(Permissions::from_mode(0o600))?;
        Ok(TokensFile {
            path: path.to_path_buf(),
            writing,
            file: Some(file),
        })
    }

    fn write(mut self, devices: &[Value]) -> anyhow::Result<()> {
        let file = self.file.take().expect("written once");
        let mut out = csv::Writer::from_writer(file);
        out.write_record(["id", "token", "expires_at"])?;
        for d in devices {
            let field = |name: &str| match &d[name] {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            out.write_record([field("id"), field("token"), field("expires_at")])?;
        }
        let file = out.into_inner().map_err(|e| anyhow!("{}", e.error()))?;
        file.sync_all()?;
        if self.writing != self.path {
            std::fs::rename(&self.writing, &self.path)?;
        }
        self.writing = PathBuf::new();
        Ok(())
    }
}

impl Drop for TokensFile {
    fn drop(&mut self) {
        if !self.writing.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.writing);
        }
    }
}

pub async fn import(args: ImportArgs, api: &Api) -> anyhow::Result<()> {
    let started = Instant::now();
    let file = &args.file;
    let (rows, mut invalid) = read_rows(file)?;
    let total = rows.len() + invalid.len();
    if total == 0 {
        bail!("{}: no devices after the header row", file.display());
    }
    if total > MAX_DEVICES {
        bail!(
            "{}: {total} devices; an import holds at most {MAX_DEVICES}: split the file",
            file.display()
        );
    }
    let tokens = match (&args.tokens, args.dry_run) {
        (Some(path), false) => Some(TokensFile::create(path, args.force)?),
        _ => None,
    };
    // Invalid rows here and no --skip-invalid: nothing is imported, but the
    // server still checks the others, so that every bad row is reported at once.
    let check_only = args.dry_run || (!invalid.is_empty() && !args.skip_invalid);
    let mut devices = Vec::new();
    if !rows.is_empty() {
        let body = json!({
            "devices": rows.iter().map(|r| json!({
                "id": r.id, "role": r.role, "type": r.device_type, "public_key": r.public_key,
            })).collect::<Vec<_>>(),
            "ttl_secs": args.ttl.as_secs(),
            "skip_invalid": args.skip_invalid,
            "dry_run": check_only,
        });
        let request = api.http.post(api.url("/v1/devices/import")).json(&body);
        let (status, reply) = api.send(request).await?;
        let refused_rows =
            status == reqwest::StatusCode::UNPROCESSABLE_ENTITY && reply.get("invalid").is_some();
        if !status.is_success() && !refused_rows {
            bail!("{status}: {} (nothing was imported)", error_message(&reply));
        }
        for i in reply["invalid"].as_array().into_iter().flatten() {
            let Some(row) = i["index"].as_u64().and_then(|n| rows.get(n as usize)) else {
                continue;
            };
            invalid.push(Invalid {
                line: row.line,
                id: row.id.clone(),
                error: i["error"].as_str().unwrap_or("invalid").to_string(),
            });
        }
        devices = reply["devices"].as_array().cloned().unwrap_or_default();
    }
    let name = file.display();
    if !invalid.is_empty() && !args.skip_invalid {
        let (so, fix) = if args.dry_run {
            ("an import would import nothing", "")
        } else {
            ("so nothing was imported", "fix them, or ")
        };
        let verb = if invalid.len() == 1 { "is" } else { "are" };
        bail!(
            "{name}: {} of {total} rows {verb} invalid, {so} ({fix}pass --skip-invalid to \
             import the others):\n{}",
            invalid.len(),
            report(file, &mut invalid)
        );
    }
    if !invalid.is_empty() {
        let skipped = if args.dry_run {
            "would skip"
        } else {
            "skipped"
        };
        eprintln!(
            "{name}: {skipped} {} of {total}:\n{}",
            plural(invalid.len(), "invalid row"),
            report(file, &mut invalid)
        );
    }
    if args.dry_run {
        println!(
            "{name}: {} of {total} would be imported (dry run: nothing was imported)",
            plural(total - invalid.len(), "row")
        );
        return Ok(());
    }
    if devices.is_empty() {
        bail!("{name}: no valid rows, so nothing was imported");
    }
    if let Some(tokens) = tokens {
        let path = tokens.path.clone();
        tokens.write(&devices).map_err(|e| {
            anyhow!(
                "the {} devices were imported, but their tokens could not be written \
                 to {}: {e:#}; mint new ones with `fleetgate device token ID`",
                devices.len(),
                path.display()
            )
        })?;
        let took = started.elapsed().as_secs_f64();
        println!(
            "imported {} from {name} in {took:.2} s ({:.0} devices/s); \
             tokens in {} (mode 0600)",
            plural(devices.len(), "device"),
            devices.len() as f64 / took.max(1e-9),
            path.display()
        );
    }
    Ok(())
}

fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `device list --csv`: the devices as the API lists them.
pub fn print_devices_csv(devices: &[Value]) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = csv::Writer::from_writer(stdout.lock());
    out.write_record([
        "id",
        "role",
        "type",
        "public_key",
        "revoked_at",
        "created_at",
    ])?;
    for d in devices {
        let field = |name: &str| match &d[name] {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        out.write_record([
            field("id"),
            field("role"),
            field("device_type"),
            field("public_key"),
            field("revoked_at"),
            field("created_at"),
        ])?;
    }
    out.flush()?;
    std::io::stdout().flush()?;
    Ok(())
}
