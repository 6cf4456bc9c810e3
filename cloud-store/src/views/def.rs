//! What a declared view is, checked against its source stream, and the SQL
//! that creates and maintains it.
//!
//! ```toml
//! [views.hourly_temperature]
//! source = "temperature"
//! group_by = ["device_id"]
//! bucket = { column = "received_at", width = "1h" }
//! aggregates = { readings = "count(*)", mean = "avg(celsius)", peak = "max(celsius)" }
//! refresh = "realtime"        # or { every = "30s" }, or "on_demand"
//! ttl = "365d"                # optional: keep buckets after the rows expire
//! ```
//!
//! An aggregate view keeps *partials* per group and bucket (row count, and
//! per measured column its non-null count, sum, min and max), never
//! finished averages: partials merge by addition, so late rows, several
//! commits and a coarser query bucket all fold into the same answer the
//! primary table gives.
//!
//! A *rows* view declares a `key` instead of aggregates: one row per source
//! row, ordered by that key, holding a subset of the source's `fields` and
//! `derived` columns (see [`super::rows`]). With no fields it is an index:
//! key value → the source rows' keys.
//!
//! A view's `source` may be another view: the new view is checked against
//! what that view holds (it can only use its columns, group by its groups,
//! and bucket by multiples of its bucket) and is maintained from the same
//! stream, so it answers exactly what rolling the source view up would.

use std::time::Duration;

use fleetgate_protocol::duration;
use fleetgate_protocol::schema::{check_identifier, FieldType, DEVICE_ID, RECEIVED_AT};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use super::rows::RowsPlan;
use crate::catalog::{sql_type, Stream, INSERT_XID};
use crate::db::Backend;
use crate::values::ColumnKind;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewsFile {
    pub views: IndexMap<String, ViewDef>,
}

impl ViewsFile {
    pub fn parse(text: &str) -> Result<ViewsFile, String> {
        let file: ViewsFile =
            toml::from_str(text).map_err(|e| format!("invalid views TOML: {e}"))?;
        if file.views.is_empty() {
            return Err("the file declares no views ([views.<name>] tables)".into());
        }
        Ok(file)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewDef {
    pub source: String,
    #[serde(default)]
    pub group_by: Vec<String>,
    #[serde(default)]
    pub bucket: Option<BucketDef>,
    #[serde(default)]
    pub aggregates: IndexMap<String, String>,
    /// A rows view's leading key (the source rows' own key follows it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key: Vec<String>,
    /// A rows view's columns copied from the source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
    /// A rows view's columns computed from the source's, e.g.
    /// `label = "concat(site, '/', room)"`.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub derived: IndexMap<String, String>,
    #[serde(default)]
    pub refresh: RefreshDef,
    /// How long the view keeps a bucket: longer than its stream keeps rows,
    /// so the view still answers for periods whose rows have expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// Refused with a reason: views have no cold tier.
    #[serde(default, skip_serializing)]
    pub hot: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketDef {
    pub column: String,
    pub width: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RefreshDef {
    Named(String),
    Every { every: String },
}

impl Default for RefreshDef {
    fn default() -> Self {
        RefreshDef::Named("realtime".into())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Updated inside each ingest commit.
    Realtime,
    /// Commits append to a tail that is folded in this often; queries read
    /// both.
    Every(Duration),
    /// Commits append to the tail; a query folds it first.
    OnDemand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggFn {
    Count,
    Sum,
    Avg,
    Min,
    Max,
}

impl AggFn {
    pub fn parse_name(name: &str) -> Option<AggFn> {
        Some(match name {
            "count" => AggFn::Count,
            "sum" => AggFn::Sum,
            "avg" => AggFn::Avg,
            "min" => AggFn::Min,
            "max" => AggFn::Max,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    pub name: String,
    pub func: AggFn,
    /// `None` for `count(*)`.
    pub column: Option<String>,
}

/// A source column the view keeps partials of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measured {
    pub column: String,
    pub kind: ColumnKind,
}

/// A view checked against its source stream.
#[derive(Debug, Clone)]
pub struct ViewPlan {
    pub name: String,
    pub def: ViewDef,
    /// The stream whose rows the view holds (its source, or its source
    /// view's stream).
    pub stream: String,
    /// Set for a rows view; an aggregate view's parts are the fields below.
    pub rows: Option<RowsPlan>,
    pub group_by: Vec<(String, ColumnKind)>,
    /// The bucketed source column and the bucket width in its unit (ms).
    pub bucket: Option<(String, i64)>,
    pub aggregates: Vec<Aggregate>,
    pub measured: Vec<Measured>,
    pub refresh: Refresh,
    /// The view's own retention (see [`ViewDef::ttl`]); `None`: it loses
    /// rows as its stream does.
    pub ttl: Option<Duration>,
    /// A realtime aggregate view: no trigger; its table holds the partials
    /// of the source rows up to a watermark, queries add the rows after it,
    /// and folds move it on. On SQLite the watermark is a rowid, kept in
    /// [`MARKS`] and moved by sweeps (see [`super::sweep`]); on PostgreSQL a
    /// snapshot, kept in [`CUTS`]. Maintained inside every ingest commit,
    /// such a view cost half of ingest or more; this costs ingest nothing.
    pub watermark: bool,
    /// The database the view lives in (that of its stream).
    pub backend: Backend,
    /// PostgreSQL 15 or later: a fold writes its partials with `MERGE`, a
    /// join the planner may run as one pass over the table, instead of
    /// `INSERT … ON CONFLICT`, which probes the key index for every group
    /// (see [`Self::fold_cut_sql`]). Set by [`super::Views`], which knows
    /// the server.
    pub merge_statement: bool,
}

/// Each PostgreSQL watermark view's cut: the snapshot whose rows the
/// table holds. A row is in the table exactly when the cut sees the
/// transaction that inserted it ([`INSERT_XID`]): rows stored before that
/// column existed (NULL) are. Rows commit out of xid order, so no single
/// xid could be the watermark; a snapshot is what a statement saw. A fold
/// merges the rows its own statement sees and the cut does not, and sets
/// the cut to its statement's snapshot, in one statement.
pub const CUTS: &str = "fleetgate_view_cuts";
pub const CUTS_DDL: [&str; 4] = [
    "CREATE TABLE IF NOT EXISTS fleetgate_view_cuts (name TEXT PRIMARY KEY, cut pg_snapshot NOT NULL)",
    // The oldest xid a view's cut does not see: the unfolded rows' bound,
    // a function so that the planner (which runs stable functions to
    // estimate) knows it and reads only the newest rows through the index.
    "CREATE OR REPLACE FUNCTION fleetgate_view_floor(view_name TEXT) RETURNS BIGINT \
     LANGUAGE sql STABLE AS $$ SELECT (pg_snapshot_xmin(cut)::text)::bigint \
     FROM fleetgate_view_cuts WHERE name = view_name $$",
    // The first xid the cut does not see for having started after it, and
    // those it does not see for having been in progress when it was taken:
    // with these (as bigints, once per statement) a row is tested with two
    // comparisons, where `pg_visible_in_snapshot` needed its bigint turned
    // into text and then xid8, a tenth of a fold's time.
    "CREATE OR REPLACE FUNCTION fleetgate_view_ceiling(view_name TEXT) RETURNS BIGINT \
     LANGUAGE sql STABLE AS $$ SELECT (pg_snapshot_xmax(cut)::text)::bigint \
     FROM fleetgate_view_cuts WHERE name = view_name $$",
    "CREATE OR REPLACE FUNCTION fleetgate_view_in_progress(view_name TEXT) RETURNS BIGINT[] \
     LANGUAGE sql STABLE AS $$ SELECT COALESCE(array_agg((xip::text)::bigint), '{}') \
     FROM fleetgate_view_cuts, pg_snapshot_xip(cut) AS xip WHERE name = view_name $$",
];

/// Each watermark view's watermark (SQLite only). The table holds the
/// source rows up to `upto`; while a sweep is under way, also those up to
/// `sweep_to` whose first grouping value sorts at or before
/// `swept_through` (untyped: it holds whatever that column holds).
/// `generation` moves on with every change, so a sweep that read its batch
/// before another change (a removal, a rebuild) finds out and stops.
pub const MARKS: &str = "fleetgate_view_marks";
pub const MARKS_DDL: &str =
    "CREATE TABLE IF NOT EXISTS fleetgate_view_marks (name TEXT PRIMARY KEY, \
     upto BIGINT NOT NULL, sweep_to BIGINT, swept_through, generation BIGINT NOT NULL DEFAULT 0)";
/// What an earlier version's marks table lacks.
pub const MARKS_SWEEP_COLUMNS: [&str; 3] = [
    "ALTER TABLE fleetgate_view_marks ADD COLUMN sweep_to BIGINT",
    "ALTER TABLE fleetgate_view_marks ADD COLUMN swept_through",
    "ALTER TABLE fleetgate_view_marks ADD COLUMN generation BIGINT NOT NULL DEFAULT 0",
];

/// One column of a view table: what it holds of the source.
enum Part<'a> {
    Group(&'a str, ColumnKind),
    Bucket,
    Rows,
    Count(&'a str),
    Sum(&'a str, ColumnKind),
    Min(&'a str, ColumnKind),
    Max(&'a str, ColumnKind),
}

/// A PostgreSQL aggregate view's table leaves 30% of each page free. A fold
/// rewrites most groups it touches, and an update whose new version fits
/// in its page writes no index entry (a HOT update): at 100% every update
/// also wrote the key index. 70% made a fold of 50,000 groups out of
/// 168,000 about a third faster, every update HOT (BENCHMARKS.md).
pub const VIEW_TABLE_FILLFACTOR: &str = "fillfactor = 70";

/// Column names the view tables use for themselves.
pub const BUCKET: &str = "fg_bucket";
pub const ROWS: &str = "fg_rows";

pub fn partial(column: &str, part: &str) -> String {
    format!("{column}__{part}")
}

impl ViewPlan {
    /// Checks `def` against `source` (the stream it reads), and against
    /// `over`, the view its source names, if it names one.
    pub fn new(
        name: &str,
        def: &ViewDef,
        source: &Stream,
        over: Option<&ViewPlan>,
    ) -> Result<ViewPlan, String> {
        check_identifier("view", name)?;
        let problem = |what: String| format!("view {name}: {what}");
        let refresh = parse_refresh(&def.refresh).map_err(problem)?;
        if def.hot.is_some() {
            return Err(problem(
                "a view has no cold tier (its aggregates are small and stay where queries read them); \
                 declare ttl to keep them longer than the stream's rows"
                    .into(),
            ));
        }
        let ttl = check_view_ttl(def, source).map_err(problem)?;
        if !def.key.is_empty() || !def.fields.is_empty() || !def.derived.is_empty() {
            if !def.aggregates.is_empty() || !def.group_by.is_empty() || def.bucket.is_some() {
                return Err(problem(
                    "declare either a key (with fields or derived columns) or aggregates (with group_by or bucket), not both".into(),
                ));
            }
            let rows = RowsPlan::new(def, source, over).map_err(problem)?;
            return Ok(ViewPlan {
                name: name.to_string(),
                def: def.clone(),
                stream: source.name.clone(),
                rows: Some(rows),
                group_by: Vec::new(),
                bucket: None,
                aggregates: Vec::new(),
                measured: Vec::new(),
                refresh,
                ttl,
                watermark: false,
                backend: source.backend(),
                merge_statement: false,
            });
        }
        if let Some(over) = over {
            check_rollup(def, over).map_err(problem)?;
        }
        // A column's storage kind, and the declared type it holds.
        let kind_of = |column: &str| -> Option<(ColumnKind, FieldType)> {
            match column {
                DEVICE_ID => Some((ColumnKind::Text, FieldType::String)),
                RECEIVED_AT => Some((ColumnKind::Int, FieldType::Timestamp)),
                _ => source
                    .def
                    .fields
                    .get(column)
                    .map(|f| (ColumnKind::of_field(f), f.ty))
                    .or_else(|| {
                        let e = source.def.enrich.get(column)?;
                        Some((ColumnKind::from(e.ty), e.ty))
                    }),
            }
        };
        let unknown = |column: &str| problem(source.unknown_column(column));

        let mut group_by = Vec::new();
        for column in &def.group_by {
            let (kind, _) = kind_of(column).ok_or_else(|| unknown(column))?;
            if group_by.iter().any(|(c, _)| c == column) {
                return Err(problem(format!("{column:?} is grouped by twice")));
            }
            group_by.push((column.clone(), kind));
        }
        let bucket = match &def.bucket {
            None => None,
            Some(b) => {
                let (kind, ty) = kind_of(&b.column).ok_or_else(|| unknown(&b.column))?;
                if kind != ColumnKind::Int || !matches!(ty, FieldType::Timestamp | FieldType::Int) {
                    return Err(problem(format!(
                        "bucket column {:?} must be received_at or an int or timestamp field",
                        b.column
                    )));
                }
                let width = duration::parse(&b.width)
                    .map_err(|e| problem(format!("bucket width {:?}: {e}", b.width)))?;
                let width_ms = duration::millis(width);
                if width_ms < 1 {
                    return Err(problem("bucket width must be at least 1ms".into()));
                }
                if group_by.iter().any(|(c, _)| *c == b.column) {
                    return Err(problem(format!(
                        "{:?} is both grouped by and bucketed",
                        b.column
                    )));
                }
                Some((b.column.clone(), width_ms))
            }
        };

        if def.aggregates.is_empty() {
            return Err(problem(
                "declare aggregates (e.g. aggregates = { n = \"count(*)\" }), or a key for a rows view".into(),
            ));
        }
        let mut aggregates = Vec::new();
        let mut measured: Vec<Measured> = Vec::new();
        for (alias, text) in &def.aggregates {
            check_identifier("aggregate", alias).map_err(problem)?;
            if alias.starts_with("fg_") || alias.contains("__") {
                return Err(problem(format!(
                    "aggregate name {alias:?} is reserved (fg_ prefix or a double underscore)"
                )));
            }
            let aggregate = parse_aggregate(alias, text).map_err(problem)?;
            if let Some(column) = &aggregate.column {
                let (kind, ty) = kind_of(column).ok_or_else(|| unknown(column))?;
                let numeric = matches!(kind, ColumnKind::Int | ColumnKind::Float);
                let fits = match aggregate.func {
                    AggFn::Count => true,
                    AggFn::Sum | AggFn::Avg => numeric && ty != FieldType::Timestamp,
                    AggFn::Min | AggFn::Max => kind != ColumnKind::Bool,
                };
                if !fits {
                    return Err(problem(format!(
                        "{text} does not fit column {column:?} ({kind:?})"
                    )));
                }
                if !measured.iter().any(|m| m.column == *column) {
                    measured.push(Measured {
                        column: column.clone(),
                        kind,
                    });
                }
            }
            aggregates.push(aggregate);
        }

        Ok(ViewPlan {
            name: name.to_string(),
            def: def.clone(),
            stream: source.name.clone(),
            rows: None,
            group_by,
            bucket,
            aggregates,
            measured,
            watermark: refresh == Refresh::Realtime,
            backend: source.backend(),
            merge_statement: false,
            refresh,
            ttl,
        })
    }

    /// The stream the view's rows come from.
    pub fn source(&self) -> &str {
        &self.stream
    }

    /// The view this one is declared over, if any.
    pub fn built_on(&self) -> Option<&str> {
        (self.def.source != self.stream).then_some(self.def.source.as_str())
    }

    /// The stream columns the view reads (its trigger names them).
    pub fn source_columns(&self) -> Box<dyn Iterator<Item = &str> + Send + '_> {
        if let Some(rows) = &self.rows {
            return Box::new(rows.reads());
        }
        let grouped = self.group_by.iter().map(|(c, _)| c.as_str());
        let bucketed = self.bucket.iter().map(|(c, _)| c.as_str());
        Box::new(
            grouped
                .chain(bucketed)
                .chain(self.measured.iter().map(|m| m.column.as_str())),
        )
    }

    /// The columns the view holds under their own names, for views built
    /// on it: an aggregate view's groups and bucketed column, and a rows
    /// view's columns.
    pub fn holds(&self, column: &str) -> bool {
        match &self.rows {
            Some(rows) => rows.column_kind(column).is_some(),
            None => self.group_by.iter().any(|(c, _)| c == column),
        }
    }

    /// The materialized table.
    pub fn table(&self) -> String {
        format!("fgv_{}", self.name)
    }

    /// Partials of commits not yet folded into the table (periodic and
    /// on-demand views).
    pub fn tail(&self) -> String {
        format!("fgv_{}_tail", self.name)
    }

    pub(super) fn trigger(&self) -> String {
        format!("fgv_{}_maintain", self.name)
    }

    /// The view table's columns, in order: each grouping column, the
    /// bucket, the row count, then each measured column's partials.
    fn parts(&self) -> Vec<Part<'_>> {
        let mut parts: Vec<Part> = self
            .group_by
            .iter()
            .map(|(c, k)| Part::Group(c, *k))
            .collect();
        parts.push(Part::Bucket);
        parts.push(Part::Rows);
        for m in &self.measured {
            parts.push(Part::Count(&m.column));
            if matches!(m.kind, ColumnKind::Int | ColumnKind::Float) {
                parts.push(Part::Sum(&m.column, m.kind));
            }
            if m.kind != ColumnKind::Bool {
                parts.push(Part::Min(&m.column, m.kind));
                parts.push(Part::Max(&m.column, m.kind));
            }
        }
        parts
    }

    /// The view table's columns with their SQL types.
    fn columns(&self) -> Vec<(String, &'static str)> {
        self.parts()
            .iter()
            .map(|part| match part {
                Part::Group(c, kind) => (c.to_string(), sql_type(*kind)),
                Part::Bucket => (BUCKET.into(), "BIGINT"),
                Part::Rows => (ROWS.into(), "BIGINT"),
                Part::Count(c) => (partial(c, "n"), "BIGINT"),
                Part::Sum(c, ColumnKind::Int) => (partial(c, "sum"), "BIGINT"),
                Part::Sum(c, _) => (partial(c, "sum"), "DOUBLE PRECISION"),
                Part::Min(c, kind) => (partial(c, "min"), sql_type(*kind)),
                Part::Max(c, kind) => (partial(c, "max"), sql_type(*kind)),
            })
            .collect()
    }

    /// Roughly what one row of the view table and its index take on disk,
    /// to weigh a view before it exists.
    pub fn row_bytes_estimate(&self) -> i64 {
        let columns = self.columns().len() as i64;
        let key = self.group_by.len() as i64 + 1;
        // A row header, 9 bytes a column, and the index entry.
        24 + 9 * columns + 16 + 9 * key
    }

    fn column_list(&self) -> String {
        let names: Vec<String> = self.columns().into_iter().map(|(c, _)| c).collect();
        names.join(", ")
    }

    fn key_list(&self) -> String {
        let mut key: Vec<&str> = self.group_by.iter().map(|(c, _)| c.as_str()).collect();
        key.push(BUCKET);
        key.join(", ")
    }

    /// The bucket of a source row (`row` prefixes its columns: "" or "NEW.").
    pub fn bucket_sql(&self, row: &str) -> String {
        match &self.bucket {
            Some((column, width)) => format!("({row}{column} / {width}) * {width}"),
            None => "0".into(),
        }
    }

    /// Partials of a set of source rows, grouped (a SELECT list matching
    /// [`Self::columns`]).
    fn partials_of_rows(&self) -> String {
        self.select_parts(|part| match part {
            Part::Group(c, _) => c.to_string(),
            Part::Bucket => self.bucket_sql(""),
            Part::Rows => "count(*)".into(),
            Part::Count(c) => format!("count({c})"),
            Part::Sum(c, _) => format!("COALESCE(sum({c}), 0)"),
            Part::Min(c, _) => format!("min({c})"),
            Part::Max(c, _) => format!("max({c})"),
        })
    }

    /// Partials of one source row (a VALUES list matching [`Self::columns`]).
    fn partials_of_new_row(&self) -> String {
        self.select_parts(|part| match part {
            Part::Group(c, _) => format!("NEW.{c}"),
            Part::Bucket => self.bucket_sql("NEW."),
            Part::Rows => "1".into(),
            Part::Count(c) => format!("(NEW.{c} IS NOT NULL)"),
            Part::Sum(c, _) => format!("COALESCE(NEW.{c}, 0)"),
            Part::Min(c, _) | Part::Max(c, _) => format!("NEW.{c}"),
        })
    }

    /// Partials of partials: what folding the tail groups by.
    fn partials_of_partials(&self) -> String {
        self.select_parts(|part| match part {
            Part::Group(c, _) => c.to_string(),
            Part::Bucket => BUCKET.into(),
            Part::Rows => format!("sum({ROWS})"),
            Part::Count(c) => format!("sum({})", partial(c, "n")),
            Part::Sum(c, _) => format!("sum({})", partial(c, "sum")),
            Part::Min(c, _) => format!("min({})", partial(c, "min")),
            Part::Max(c, _) => format!("max({})", partial(c, "max")),
        })
    }

    fn select_parts(&self, item: impl Fn(&Part) -> String) -> String {
        self.parts().iter().map(item).collect::<Vec<_>>().join(", ")
    }

    fn group_positions(&self) -> String {
        (1..=self.group_by.len() + 1)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `INSERT … ON CONFLICT` merging `rows` (partials) into the table.
    fn merge_into_table(&self, rows: &str) -> String {
        // Unaliased: SQLite takes no `AS` alias in a trigger's INSERT.
        format!(
            "INSERT INTO {} ({}) {rows} ON CONFLICT ({}) DO UPDATE SET {}",
            self.table(),
            self.column_list(),
            self.key_list(),
            self.merged_assignments("excluded").join(", ")
        )
    }

    /// PostgreSQL's `MERGE` of `rows` (partials) into the table: the same
    /// result as [`Self::merge_into_table`] (a NULL group matches nothing
    /// there either), for one writer at a time: two inserting one new group
    /// at once would both insert it, and the key index would refuse one.
    fn merge_by_join(&self, rows: &str) -> String {
        let (table, columns) = (self.table(), self.column_list());
        let matched: Vec<String> = self
            .key_list()
            .split(", ")
            .map(|c| format!("{table}.{c} = fg_new.{c}"))
            .collect();
        let values: Vec<String> = columns.split(", ").map(|c| format!("fg_new.{c}")).collect();
        format!(
            "MERGE INTO {table} USING (SELECT * FROM ({rows}) AS fg_partials ({columns})) AS fg_new \
             ON {} WHEN MATCHED THEN UPDATE SET {} \
             WHEN NOT MATCHED THEN INSERT ({columns}) VALUES ({})",
            matched.join(" AND "),
            self.merged_assignments("fg_new").join(", "),
            values.join(", ")
        )
    }

    /// `column = <its value merged with new.column>` for each partial.
    fn merged_assignments(&self, new: &str) -> Vec<String> {
        let table = self.table();
        self.parts()
            .iter()
            .zip(self.columns())
            .filter_map(|(part, (c, _))| {
                let (old, new) = (format!("{table}.{c}"), format!("{new}.{c}"));
                let merged = match (part, self.backend) {
                    (Part::Group(..) | Part::Bucket, _) => return None,
                    (Part::Min(..), Backend::Postgres) => format!("LEAST({old}, {new})"),
                    (Part::Max(..), Backend::Postgres) => format!("GREATEST({old}, {new})"),
                    // SQLite's two-argument min/max are NULL if either is.
                    (Part::Min(..), Backend::Sqlite) => {
                        format!("COALESCE(min({old}, {new}), {old}, {new})")
                    }
                    (Part::Max(..), Backend::Sqlite) => {
                        format!("COALESCE(max({old}, {new}), {old}, {new})")
                    }
                    _ => format!("{old} + {new}"),
                };
                Some(format!("{c} = {merged}"))
            })
            .collect()
    }

    /// Creates the tables and the trigger that maintains them; then
    /// [`Self::backfill_sql`] takes in the rows already there. Run in one
    /// transaction, nothing committed in between is missed or counted twice.
    pub fn create_sql(&self) -> Vec<String> {
        if let Some(rows) = &self.rows {
            return rows.create_sql(self);
        }
        let columns: Vec<String> = self
            .columns()
            .into_iter()
            .map(|(c, t)| format!("{c} {t}"))
            .collect();
        let (table, tail, source, trigger) =
            (self.table(), self.tail(), self.source(), self.trigger());
        let storage = match self.backend {
            Backend::Postgres => format!(" WITH ({VIEW_TABLE_FILLFACTOR})"),
            Backend::Sqlite => String::new(),
        };
        let mut sql = vec![
            format!("CREATE TABLE {table} ({}){storage}", columns.join(", ")),
            // Not a primary key: a NULL group is a group too, and NULLs never
            // conflict, so such rows may repeat; queries merge them anyway.
            format!(
                "CREATE UNIQUE INDEX {table}_key ON {table} ({})",
                self.key_list()
            ),
            format!("CREATE TABLE {tail} ({})", columns.join(", ")),
        ];
        match self.backend {
            // Keeps expiry and swaps out while the backfill reads, as
            // creating a trigger would.
            Backend::Postgres if self.watermark => sql.insert(
                0,
                format!("LOCK TABLE {source} IN SHARE ROW EXCLUSIVE MODE"),
            ),
            Backend::Postgres => {
                let body = match self.refresh {
                    Refresh::Realtime => self.merge_into_table(&format!(
                        // In key order: two commits merging into the
                        // same groups lock them in one order, and wait
                        // for each other instead of deadlocking.
                        "SELECT {} FROM fgv_new WHERE true GROUP BY {} ORDER BY {}",
                        self.partials_of_rows(),
                        self.group_positions(),
                        self.group_positions()
                    )),
                    Refresh::Every(_) | Refresh::OnDemand => format!(
                        "INSERT INTO {tail} ({}) SELECT {} FROM fgv_new GROUP BY {}",
                        self.column_list(),
                        self.partials_of_rows(),
                        self.group_positions()
                    ),
                };
                sql.extend(self.statement_trigger_sql(&body));
            }
            Backend::Sqlite if self.watermark => sql.extend(self.mark_sql()),
            Backend::Sqlite => {
                let values = format!("VALUES ({})", self.partials_of_new_row());
                let body = match self.refresh {
                    Refresh::Realtime => self.merge_into_table(&values),
                    Refresh::Every(_) | Refresh::OnDemand => {
                        format!("INSERT INTO {tail} ({}) {values}", self.column_list())
                    }
                };
                sql.push(format!(
                    "CREATE TRIGGER {trigger} AFTER INSERT ON {source} BEGIN {body}; END"
                ));
            }
        }
        sql
    }

    /// PostgreSQL: the trigger that runs `body` once per insert statement
    /// on the source, over the inserted rows as `fgv_new`.
    pub(super) fn statement_trigger_sql(&self, body: &str) -> [String; 2] {
        let (trigger, source) = (self.trigger(), self.source());
        [
            format!(
                "CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $fgv$ \
                 BEGIN {body}; RETURN NULL; END $fgv$"
            ),
            format!(
                "CREATE TRIGGER {trigger} AFTER INSERT ON {source} \
                 REFERENCING NEW TABLE AS fgv_new FOR EACH STATEMENT EXECUTE FUNCTION {trigger}()"
            ),
        ]
    }

    /// Takes in the source rows present when the view is created; `from`
    /// reads all of them (both tiers of a tiered stream).
    pub fn backfill_sql(&self, from: &str) -> String {
        if let Some(rows) = &self.rows {
            return rows.insert_sql(&self.table(), from);
        }
        let merge = self.merge_into_table(&format!(
            "SELECT {} FROM {from} WHERE true GROUP BY {}",
            self.partials_of_rows(),
            self.group_positions()
        ));
        match self.backend {
            // The cut is the snapshot the backfill read.
            Backend::Postgres if self.watermark => format!(
                "WITH fg_cut AS (INSERT INTO {CUTS} (name, cut) VALUES ('{}', pg_current_snapshot()) \
                 ON CONFLICT (name) DO UPDATE SET cut = excluded.cut) {merge}",
                self.name
            ),
            _ => merge,
        }
    }

    /// Empties the view and takes in every row `from` reads again: after
    /// rows left the source in a way partials cannot take back (min and
    /// max cannot be undone).
    pub fn rebuild_sql(&self, from: &str) -> Vec<String> {
        let mut sql = vec![
            format!("DELETE FROM {}", self.table()),
            format!("DELETE FROM {}", self.tail()),
            self.backfill_sql(from),
        ];
        sql.extend(self.mark_sql());
        sql
    }

    /// The source's rows the table does not hold yet. SQLite: after the
    /// watermark, less those a sweep under way has merged (see [`MARKS`]);
    /// NULL sorts first, as in the sweep's `ORDER BY`. PostgreSQL: those
    /// of transactions its cut does not see (see [`CUTS`]).
    fn unfolded_rows(&self) -> String {
        if self.backend == Backend::Postgres {
            // Not seen by the cut: at or after its ceiling, or in progress
            // when it was taken (all of which are at or after its floor).
            return format!(
                "{INSERT_XID} >= fleetgate_view_floor('{name}') \
                 AND ({INSERT_XID} >= (SELECT fleetgate_view_ceiling('{name}')) \
                 OR {INSERT_XID} = ANY ((SELECT fleetgate_view_in_progress('{name}'))::bigint[]))",
                name = self.name
            );
        }
        let mark = |column: &str| {
            format!(
                "(SELECT {column} FROM {MARKS} WHERE name = '{}')",
                self.name
            )
        };
        let first = self.first_group_sql();
        format!(
            "rowid > {} AND NOT (rowid <= COALESCE({}, -1) AND ({first} IS NULL OR COALESCE({first} <= {}, 0)))",
            mark("upto"),
            mark("sweep_to"),
            mark("swept_through")
        )
    }

    /// The first grouping value of a source row: a sweep merges its batch
    /// in this order.
    fn first_group_sql(&self) -> String {
        match self.group_by.first() {
            Some((column, _)) => column.clone(),
            None => self.bucket_sql(""),
        }
    }

    /// A watermark view: the partials of the unfolded rows up to rowid
    /// `$1`, in key order (a sweep's batch).
    pub fn sweep_batch_sql(&self) -> String {
        format!(
            "SELECT {} FROM {} WHERE {} AND rowid <= $1 GROUP BY {positions} ORDER BY {positions}",
            self.partials_of_rows(),
            self.source(),
            self.unfolded_rows(),
            positions = self.group_positions()
        )
    }

    /// Merges `rows` partials bound as parameters, a row after the other
    /// in [`Self::columns`] order.
    pub fn merge_values_sql(&self, rows: usize) -> String {
        let row = format!("({})", vec!["?"; self.width()].join(", "));
        self.merge_into_table(&format!("VALUES {}", vec![row; rows].join(", ")))
    }

    /// How many values a merged row binds.
    pub fn width(&self) -> usize {
        self.columns().len()
    }

    /// Moves a sweep's marks on, if nothing else changed them since
    /// generation `$5`: `upto` `$1`, `sweep_to` `$2`, `swept_through` `$3`.
    pub fn sweep_mark_sql(&self) -> String {
        format!(
            "UPDATE {MARKS} SET upto = $1, sweep_to = $2, swept_through = $3, \
             generation = generation + 1 WHERE name = $4 AND generation = $5"
        )
    }

    /// A watermark view on SQLite: sets the watermark on the source's last
    /// row, once the table holds every row (after a backfill, a rebuild or
    /// [`Self::settle_sql`]); nothing for other views. Run also after rows
    /// are deleted from the source: SQLite gives a new row the largest
    /// rowid plus one, which must not be at or below the watermark.
    /// (PostgreSQL never hands out an xid again, and a cut is set by the
    /// statement that reads the rows.)
    pub fn mark_sql(&self) -> Vec<String> {
        if !self.watermark || self.backend == Backend::Postgres {
            return Vec::new();
        }
        vec![format!(
            "INSERT INTO {MARKS} (name, upto) VALUES ('{}', (SELECT COALESCE(max(rowid), 0) FROM {})) \
             ON CONFLICT (name) DO UPDATE SET upto = excluded.upto, sweep_to = NULL, \
             swept_through = NULL, generation = {MARKS}.generation + 1",
            self.name,
            self.source()
        )]
    }

    /// A watermark view created empty: every source row is to be swept in
    /// (see [`super::sweep`]), as if it had just arrived.
    pub fn unmark_sql(&self) -> String {
        format!(
            "UPDATE {MARKS} SET upto = 0, sweep_to = NULL, swept_through = NULL, \
             generation = generation + 1 WHERE name = '{}'",
            self.name
        )
    }

    /// A watermark view: folds every row after the watermark, so the table
    /// holds them all; run before rows leave the source (expiry, tier
    /// moves, swaps), then [`Self::mark_sql`] after. Nothing for other
    /// views.
    pub fn settle_sql(&self) -> Vec<String> {
        if !self.watermark {
            return Vec::new();
        }
        if self.backend == Backend::Postgres {
            return self.fold_cut_sql();
        }
        let mut sql = vec![self.merge_source_rows(&self.unfolded_rows())];
        sql.extend(self.mark_sql());
        sql
    }

    /// A watermark view on PostgreSQL: folds what its cut does not see and
    /// moves the cut on, in one statement (see [`CUTS`]). One fold of a
    /// view at a time: two from the same cut would count rows twice, and
    /// the lock that keeps them apart keeps every other writer of the table
    /// out too, as `MERGE` needs. `INSERT … ON CONFLICT` goes in key order,
    /// so that the table's index is written page by page.
    pub fn fold_cut_sql(&self) -> Vec<String> {
        let table = self.table();
        let partials = format!(
            "SELECT {} FROM {} WHERE {} GROUP BY {positions}",
            self.partials_of_rows(),
            self.source(),
            self.unfolded_rows(),
            positions = self.group_positions()
        );
        let merge = match self.merge_statement {
            true => self.merge_by_join(&partials),
            false => {
                self.merge_into_table(&format!("{partials} ORDER BY {}", self.group_positions()))
            }
        };
        vec![
            format!("LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE"),
            format!(
                "WITH fg_cut AS (UPDATE {CUTS} SET cut = pg_current_snapshot() WHERE name = '{}') {merge}",
                self.name
            ),
        ]
    }

    /// A watermark view on PostgreSQL: the source rows its table holds (a
    /// condition on the source). `None` elsewhere: SQLite's one writer lets
    /// no row commit between a fold and what follows it.
    pub fn folded_rows(&self) -> Option<String> {
        (self.watermark && self.backend == Backend::Postgres)
            .then(|| format!("NOT COALESCE({}, false)", self.unfolded_rows()))
    }

    /// A view of an earlier version kept by a trigger on PostgreSQL becomes
    /// a watermark view: the trigger goes, and the cut is a snapshot taken
    /// while no commit can insert into the source, so it sees every row the
    /// trigger counted and none it did not. Two processes adopting at once
    /// set it once.
    pub fn adopt_cut_sql(&self) -> Vec<String> {
        let (trigger, source) = (self.trigger(), self.source());
        vec![
            format!("LOCK TABLE {source} IN SHARE ROW EXCLUSIVE MODE"),
            format!("ALTER TABLE {} SET ({VIEW_TABLE_FILLFACTOR})", self.table()),
            format!("DROP TRIGGER IF EXISTS {trigger} ON {source}"),
            format!("DROP FUNCTION IF EXISTS {trigger}()"),
            format!(
                "INSERT INTO {CUTS} (name, cut) VALUES ('{}', pg_current_snapshot()) \
                 ON CONFLICT (name) DO NOTHING",
                self.name
            ),
        ]
    }

    /// Merges the partials of the source rows `condition` selects.
    fn merge_source_rows(&self, condition: &str) -> String {
        self.merge_into_table(&format!(
            "SELECT {} FROM {} WHERE {condition} GROUP BY {}",
            self.partials_of_rows(),
            self.source(),
            self.group_positions()
        ))
    }

    /// What is not yet in the table: the tail's partials, or for a
    /// watermark view the source rows after the watermark.
    pub fn unfolded_count_sql(&self) -> String {
        if self.watermark {
            format!(
                "SELECT count(*) FROM {} WHERE {}",
                self.source(),
                self.unfolded_rows()
            )
        } else {
            format!("SELECT count(*) FROM {}", self.tail())
        }
    }

    /// Whether queries read more than the table (a tail, or the source rows
    /// after a watermark).
    pub fn reads_unfolded(&self) -> bool {
        self.watermark || matches!(self.refresh, Refresh::Every(_))
    }

    /// Folds the tail into the table, in one transaction.
    ///
    /// SQLite: merge, then delete the whole tail (one writer at a time, so
    /// both see the same tail). PostgreSQL: one statement merging exactly
    /// the rows its `DELETE … RETURNING` took, so appends committed
    /// meanwhile stay for the next fold, nothing is locked against ingest,
    /// and store nodes folding at once never take a row twice.
    ///
    /// Not for watermark views: [`super::sweep`] folds those.
    pub fn fold_sql(&self) -> Vec<String> {
        let (table, tail) = (self.table(), self.tail());
        if self.backend == Backend::Postgres {
            let moved = format!("WITH fg_moved AS (DELETE FROM {tail} RETURNING *) ");
            let merge = match &self.rows {
                Some(_) => format!("INSERT INTO {table} SELECT * FROM fg_moved"),
                None => self.merge_into_table(&format!(
                    "SELECT {} FROM fg_moved WHERE true GROUP BY {}",
                    self.partials_of_partials(),
                    self.group_positions()
                )),
            };
            return vec![moved + &merge];
        }
        let merge = match &self.rows {
            Some(_) => format!("INSERT INTO {table} SELECT * FROM {tail}"),
            None => self.merge_into_table(&format!(
                "SELECT {} FROM {tail} WHERE true GROUP BY {}",
                self.partials_of_partials(),
                self.group_positions()
            )),
        };
        vec![merge, format!("DELETE FROM {tail}")]
    }

    pub fn drop_sql(&self) -> Vec<String> {
        let trigger = self.trigger();
        let mut sql = match self.backend {
            Backend::Postgres => vec![
                format!("DROP TRIGGER IF EXISTS {trigger} ON {}", self.source()),
                format!("DROP FUNCTION IF EXISTS {trigger}()"),
            ],
            Backend::Sqlite => vec![format!("DROP TRIGGER IF EXISTS {trigger}")],
        };
        sql.push(format!("DROP TABLE IF EXISTS {}", self.table()));
        sql.push(format!("DROP TABLE IF EXISTS {}", self.tail()));
        if self.watermark {
            let marks = match self.backend {
                Backend::Sqlite => MARKS,
                Backend::Postgres => CUTS,
            };
            sql.push(format!("DELETE FROM {marks} WHERE name = '{}'", self.name));
        }
        sql
    }

    /// What a query reads to see everything: the table, plus the tail for
    /// periodic views, or the partials of the source rows after the
    /// watermark.
    pub fn read_from(&self) -> String {
        if self.watermark {
            return format!(
                "(SELECT * FROM {} UNION ALL SELECT {} FROM {} WHERE {} GROUP BY {}) AS fgv",
                self.table(),
                self.partials_of_rows(),
                self.source(),
                self.unfolded_rows(),
                self.group_positions()
            );
        }
        match self.refresh {
            Refresh::Every(_) => format!(
                "(SELECT * FROM {} UNION ALL SELECT * FROM {}) AS fgv",
                self.table(),
                self.tail()
            ),
            Refresh::Realtime | Refresh::OnDemand => self.table(),
        }
    }
}

/// A view's own ttl: only an aggregate view bucketed on `received_at` may
/// keep its buckets after its stream's rows expire, and only for longer
/// than the stream keeps them. Not over a bucketed stream: a batch swap
/// rebuilds such a view from the rows the stream still has.
fn check_view_ttl(def: &ViewDef, source: &Stream) -> Result<Option<Duration>, String> {
    let Some(text) = &def.ttl else {
        return Ok(None);
    };
    let ttl = duration::parse(text).map_err(|e| format!("ttl = {text:?}: {e}"))?;
    let on_received = def.bucket.as_ref().is_some_and(|b| b.column == RECEIVED_AT);
    if !def.key.is_empty() || def.aggregates.is_empty() || !on_received {
        return Err(
            "only an aggregate view bucketed on received_at keeps its own ttl (whole buckets expire)"
                .into(),
        );
    }
    if source.bucket().is_some() {
        return Err(format!(
            "stream {} is bucketed: a batch swap rebuilds its views from its rows, so a view cannot outlive them",
            source.name
        ));
    }
    match source.def.ttl()? {
        None => Err(format!(
            "stream {} keeps its rows for good (no ttl): a view's ttl can only be longer than its stream's",
            source.name
        )),
        Some(stream_ttl) if ttl <= stream_ttl => Err(format!(
            "ttl = {text:?} must be longer than stream {}'s ttl ({})",
            source.name,
            source.def.ttl.as_deref().unwrap_or_default()
        )),
        Some(_) => Ok(Some(ttl)),
    }
}

fn parse_refresh(refresh: &RefreshDef) -> Result<Refresh, String> {
    Ok(match refresh {
        RefreshDef::Named(n) if n == "realtime" => Refresh::Realtime,
        RefreshDef::Named(n) if n == "on_demand" => Refresh::OnDemand,
        RefreshDef::Every { every } => {
            let period =
                duration::parse(every).map_err(|e| format!("refresh every {every:?}: {e}"))?;
            if period < Duration::from_secs(1) {
                return Err("a periodic refresh must be at least 1s apart".into());
            }
            Refresh::Every(period)
        }
        RefreshDef::Named(other) => {
            return Err(format!(
                "refresh {other:?}: expected \"realtime\", \"on_demand\" or {{ every = \"30s\" }}"
            ))
        }
    })
}

/// An aggregate view over another view may only use what that view holds:
/// over an aggregate view, a subset of its groups, a multiple of its
/// bucket, and aggregates of the columns it keeps partials of; over a rows
/// view, its stored columns.
fn check_rollup(def: &ViewDef, over: &ViewPlan) -> Result<(), String> {
    let source = &over.name;
    let aggregated_columns = def
        .aggregates
        .iter()
        .map(|(alias, text)| parse_aggregate(alias, text).map(|a| a.column))
        .collect::<Result<Vec<_>, _>>()?;
    if over.rows.is_some() {
        let columns = def
            .group_by
            .iter()
            .chain(def.bucket.iter().map(|b| &b.column))
            .chain(aggregated_columns.iter().flatten());
        for column in columns {
            if !over.holds(column) || over.rows.as_ref().is_some_and(|r| r.is_derived(column)) {
                return Err(format!(
                    "{column:?} is not a stored column of view {source} (a derived column cannot be aggregated)"
                ));
            }
        }
        return Ok(());
    }
    for column in &def.group_by {
        if !over.group_by.iter().any(|(c, _)| c == column) {
            return Err(format!(
                "view {source} is not grouped by {column:?}, so a view over it cannot be"
            ));
        }
    }
    match (&def.bucket, &over.bucket) {
        (None, _) => {}
        (Some(b), Some((column, width))) if b.column == *column => {
            let wanted = duration::parse(&b.width)
                .map_err(|e| format!("bucket width {:?}: {e}", b.width))
                .map(duration::millis)?;
            if wanted % width != 0 {
                return Err(format!(
                    "bucket {} is not a multiple of view {source}'s {}ms buckets",
                    b.width, width
                ));
            }
        }
        (Some(b), _) => {
            return Err(format!(
                "view {source} is not bucketed by {:?}, so a view over it cannot be",
                b.column
            ))
        }
    }
    for column in aggregated_columns.iter().flatten() {
        if !over.measured.iter().any(|m| m.column == *column) {
            return Err(format!(
                "view {source} keeps no partials of {column:?}; aggregate what it does"
            ));
        }
    }
    Ok(())
}

/// `count(*)`, `count(col)`, `sum(col)`, `avg(col)`, `min(col)`, `max(col)`.
fn parse_aggregate(alias: &str, text: &str) -> Result<Aggregate, String> {
    let text = text.trim();
    let (func, rest) = text
        .split_once('(')
        .ok_or_else(|| format!("aggregate {alias} = {text:?}: expected e.g. \"avg(celsius)\""))?;
    let argument = rest
        .strip_suffix(')')
        .ok_or_else(|| format!("aggregate {alias} = {text:?}: missing closing parenthesis"))?
        .trim();
    let func_name = func.trim().to_lowercase();
    let func = AggFn::parse_name(&func_name).ok_or_else(|| {
        format!(
            "aggregate {alias} = {text:?}: {func_name} cannot be maintained incrementally; \
             use count, sum, avg, min or max"
        )
    })?;
    if argument.to_lowercase().starts_with("distinct ") {
        return Err(format!(
            "aggregate {alias} = {text:?}: a distinct count cannot be maintained incrementally"
        ));
    }
    let column = match (func, argument) {
        (AggFn::Count, "*") => None,
        (_, "*") => return Err(format!("aggregate {alias} = {text:?}: only count takes *")),
        (_, column) => {
            check_identifier("column", column).map_err(|_| {
                format!("aggregate {alias} = {text:?}: the argument must be a column name")
            })?;
            Some(column.to_string())
        }
    };
    Ok(Aggregate {
        name: alias.to_string(),
        func,
        column,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_parse_or_say_why_not() {
        let a = parse_aggregate("n", "count(*)").unwrap();
        assert_eq!((a.func, a.column), (AggFn::Count, None));
        let a = parse_aggregate("m", " AVG( celsius ) ").unwrap();
        assert_eq!((a.func, a.column.as_deref()), (AggFn::Avg, Some("celsius")));
        assert!(parse_aggregate("x", "median(celsius)")
            .unwrap_err()
            .contains("cannot be maintained incrementally"));
        assert!(parse_aggregate("x", "count(distinct device_id)")
            .unwrap_err()
            .contains("distinct"));
        assert!(parse_aggregate("x", "sum(*)").is_err());
        assert!(parse_aggregate("x", "sum(a + b)").is_err());
        assert!(parse_aggregate("x", "celsius").is_err());
    }
}
