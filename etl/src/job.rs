//! Job declarations (TOML) and their checks.
//!
//! ```toml
//! [jobs.orders_nightly]
//! cron = "0 2 * * *"                      # or every = "1d"
//!
//! [jobs.orders_nightly.sources.orders]    # the first source is the main one
//! csv = "exports/orders-*.csv"
//! columns = { order_id = "text", region = "text", amount = "float", ordered_at = "timestamp" }
//!
//! [[jobs.orders_nightly.rules]]
//! discard = "amount < 0"
//!
//! [jobs.orders_nightly.load]
//! table = "orders_batch"
//! mode = "upsert"
//! key = ["order_id"]
//! time = "ordered_at"
//! covers = "1d"
//! ```

use std::time::Duration;

use fleetgate_protocol::schema::check_identifier;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::schema::{Schema, ValueType};
use crate::transform::{self, Pipeline};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsFile {
    pub jobs: IndexMap<String, JobDef>,
}

impl JobsFile {
    /// Parses and checks every job.
    pub fn parse(text: &str) -> Result<JobsFile, String> {
        let file: JobsFile = toml::from_str(text).map_err(|e| format!("invalid jobs file: {e}"))?;
        if file.jobs.is_empty() {
            return Err("the file declares no [jobs.<name>]".into());
        }
        for (name, job) in &file.jobs {
            job.check(name).map_err(|e| format!("job {name}: {e}"))?;
        }
        Ok(file)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobDef {
    /// Runs at every multiple of this period (UTC), e.g. "1d" at midnight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    /// Runs at the times of a five-field cron expression (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Where rows come from; the first is the main source, the others
    /// are joined into it.
    pub sources: IndexMap<String, SourceDef>,
    /// Applied in order to the main source's rows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<toml::Table>,
    pub load: LoadDef,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceDef {
    /// A CSV file or glob (with a header line), under the operator's ETL
    /// directory (`--etl-dir`): relative to it, or absolute inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csv: Option<String>,
    /// A JSON-lines file or glob: one object per line (under `--etl-dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jsonl: Option<String>,
    /// A query on `database`: one SELECT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    /// The name of a database the operator configured (`fleetgate up
    /// --etl-database NAME=URL`), for `sql`. Jobs never give a URL: they
    /// are declared over the API, and must not reach a database the
    /// operator did not choose (such as the store's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// The CSV field separator; `,` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delimiter: Option<char>,
    /// The columns read, and their types; others are ignored.
    pub columns: IndexMap<String, ValueType>,
}

/// Where a source's rows come from.
pub enum SourceKind<'a> {
    Csv(&'a str),
    Jsonl(&'a str),
    Sql { query: &'a str, database: &'a str },
}

impl SourceDef {
    pub fn kind(&self) -> Result<SourceKind<'_>, String> {
        match (&self.csv, &self.jsonl, &self.sql, &self.database) {
            (Some(path), None, None, None) => Ok(SourceKind::Csv(path)),
            (None, Some(path), None, None) => Ok(SourceKind::Jsonl(path)),
            (None, None, Some(query), Some(database)) => Ok(SourceKind::Sql { query, database }),
            (None, None, Some(_), None) => Err(
                "sql needs database = NAME, a database configured with fleetgate up --etl-database NAME=URL"
                    .into(),
            ),
            _ => Err(
                "give exactly one of csv = PATH, jsonl = PATH or sql = QUERY (with database)"
                    .into(),
            ),
        }
    }

    pub fn schema(&self) -> Schema {
        Schema::from_pairs(self.columns.iter().map(|(n, t)| (n.clone(), *t)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadMode {
    /// Adds the rows.
    #[default]
    Append,
    /// Replaces what the table holds for the run's time window (the whole
    /// table when the load has no `time`).
    Overwrite,
    /// Inserts rows, or replaces those with the same `key`.
    Upsert,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadDef {
    /// The batch table, created on the first run.
    pub table: String,
    #[serde(default)]
    pub mode: LoadMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Vec<String>>,
    /// The column placing each row in time: a run covers the window from
    /// its earliest to its latest row, widened to whole `covers` periods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covers: Option<String>,
}

impl LoadDef {
    pub fn covers(&self) -> Result<Option<Duration>, String> {
        self.covers.as_deref().map(period).transpose()
    }
}

/// When a job runs by itself.
#[derive(Debug, Clone)]
pub enum Schedule {
    Every(Duration),
    Cron(Box<croner::Cron>),
}

impl Schedule {
    /// The first time the job is due after `after_ms`.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        match self {
            Schedule::Every(period) => {
                let period = fleetgate_protocol::duration::millis(*period);
                Some((after_ms.div_euclid(period) + 1) * period)
            }
            Schedule::Cron(cron) => {
                let after = chrono::DateTime::from_timestamp_millis(after_ms)?;
                cron.find_next_occurrence(&after, false)
                    .ok()
                    .map(|t| t.timestamp_millis())
            }
        }
    }
}

fn period(text: &str) -> Result<Duration, String> {
    let d = fleetgate_protocol::duration::parse(text).map_err(|e| format!("{text:?}: {e}"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("{text:?} is shorter than a second"));
    }
    Ok(d)
}

impl JobDef {
    pub fn schedule(&self) -> Result<Option<Schedule>, String> {
        match (&self.every, &self.cron) {
            (Some(_), Some(_)) => Err("give every or cron, not both".into()),
            (Some(every), None) => Ok(Some(Schedule::Every(
                period(every).map_err(|e| format!("every: {e}"))?,
            ))),
            (None, Some(cron)) => croner::Cron::new(cron)
                .parse()
                .map(|c| Some(Schedule::Cron(Box::new(c))))
                .map_err(|e| format!("cron {cron:?}: {e}")),
            (None, None) => Ok(None),
        }
    }

    /// The main source's name.
    pub fn main_source(&self) -> &str {
        self.sources.keys().next().map(String::as_str).unwrap_or("")
    }

    /// The rules compiled against the sources' columns: every column a
    /// rule names exists where the rule runs.
    pub fn pipeline(&self) -> Result<Pipeline, String> {
        let sources: IndexMap<String, Schema> = self
            .sources
            .iter()
            .map(|(name, s)| (name.clone(), s.schema()))
            .collect();
        transform::compile(&self.rules, self.main_source(), &sources)
    }

    pub fn check(&self, name: &str) -> Result<(), String> {
        check_identifier("job", name)?;
        self.schedule()?;
        if self.sources.is_empty() {
            return Err("declare at least one [sources.<name>]".into());
        }
        for (source, def) in &self.sources {
            check_identifier("source", source)?;
            def.kind().map_err(|e| format!("source {source}: {e}"))?;
            if def.columns.is_empty() {
                return Err(format!("source {source}: declare its columns"));
            }
        }
        let pipeline = self.pipeline()?;
        let output = pipeline.output();
        let load = &self.load;
        check_identifier("table", &load.table)?;
        if load.table.starts_with("fleetgate_") || load.table.starts_with("fg") {
            return Err(format!(
                "load: table {:?} is a name fleetgate keeps for itself",
                load.table
            ));
        }
        for column in output.names() {
            check_identifier("column", column).map_err(|e| format!("the loaded rows' {e}"))?;
        }
        if output.position(crate::load::RUN_COLUMN).is_some() {
            return Err(format!(
                "load: column {} is set by fleetgate",
                crate::load::RUN_COLUMN
            ));
        }
        match (&load.key, load.mode) {
            (None, LoadMode::Upsert) => return Err("load: upsert needs a key".into()),
            (Some(_), LoadMode::Append | LoadMode::Overwrite) => {
                return Err("load: a key is for upsert only".into())
            }
            (Some(key), LoadMode::Upsert) => {
                for column in key {
                    output
                        .require(column)
                        .map_err(|e| format!("load key: {e}"))?;
                }
            }
            (None, _) => {}
        }
        if let Some(time) = &load.time {
            let i = output
                .require(time)
                .map_err(|e| format!("load time: {e}"))?;
            if !matches!(output.type_at(i), ValueType::Timestamp | ValueType::Int) {
                return Err(format!("load time: {time} is not a timestamp"));
            }
        }
        if load.covers.is_some() && load.time.is_none() {
            return Err("load: covers needs a time column".into());
        }
        load.covers().map_err(|e| format!("load covers: {e}"))?;
        Ok(())
    }
}
