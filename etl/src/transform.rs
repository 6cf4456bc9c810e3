//! Transformation rules: each a step with one job, compiled against the
//! columns it sees, applied in order to the main source's rows.
//!
//! A problem with one row (a code without a translation, a derivation that
//! fails) sends that row to the run's rejects with the reason; a rule that
//! names a missing column fails when the job is applied, before any run.

use std::cmp::Ordering;
use std::collections::HashMap;

use fleetgate_store::values::SqlValue;
use indexmap::IndexMap;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::expr::{self, Expr};
use crate::schema::{Schema, ValueType};

/// One row on its way through a job, with where it came from.
#[derive(Debug, Clone)]
pub struct Row {
    pub values: Vec<SqlValue>,
    /// `source:line`, for rejects.
    pub origin: Origin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The source's position among the job's sources.
    pub source: u16,
    /// The file's position among the source's files.
    pub file: u16,
    /// The line in that file (1 is the first).
    pub line: u64,
}

/// A row refused by a rule.
#[derive(Debug, Clone)]
pub struct RowReject {
    pub origin: Origin,
    pub reason: String,
    /// The row as the rule saw it, as JSON.
    pub row: String,
}

/// What steps read besides the rows they transform.
pub struct Context<'a> {
    /// Every source's rows by name (the joined sources).
    pub sources: &'a HashMap<String, Vec<Row>>,
    pub rejects: Vec<RowReject>,
}

pub trait Step: Send + Sync {
    fn apply(&self, rows: Vec<Row>, context: &mut Context<'_>) -> Vec<Row>;

    /// Whether the step treats each row on its own, so rows can pass
    /// through it in batches (sorting and aggregating need them all).
    fn row_by_row(&self) -> bool {
        true
    }
}

/// The compiled rules of a job.
pub struct Pipeline {
    steps: Vec<Box<dyn Step>>,
    output: Schema,
}

impl Pipeline {
    /// The columns the rules leave: what is loaded.
    pub fn output(&self) -> &Schema {
        &self.output
    }

    /// Whether every step treats rows one by one (see [`Step::row_by_row`]).
    pub fn row_by_row(&self) -> bool {
        self.steps.iter().all(|s| s.row_by_row())
    }

    pub fn apply(&self, mut rows: Vec<Row>, context: &mut Context<'_>) -> Vec<Row> {
        for step in &self.steps {
            rows = step.apply(rows, context);
        }
        rows
    }
}

pub fn compile(
    rules: &[toml::Table],
    main: &str,
    sources: &IndexMap<String, Schema>,
) -> Result<Pipeline, String> {
    let mut schema = sources.get(main).cloned().unwrap_or_default();
    let mut steps: Vec<Box<dyn Step>> = Vec::new();
    for (n, rule) in rules.iter().enumerate() {
        let verb = VERBS
            .iter()
            .find(|v| rule.contains_key(**v))
            .ok_or_else(|| {
                format!(
                    "rule {}: say what it does with one of {}",
                    n + 1,
                    VERBS.join(", ")
                )
            })?;
        let step = compile_rule(verb, rule, &mut schema, main, sources)
            .map_err(|e| format!("rule {} ({verb}): {e}", n + 1))?;
        steps.push(step);
    }
    Ok(Pipeline {
        steps,
        output: schema,
    })
}

const VERBS: [&str; 7] = [
    "discard",
    "drop",
    "translate",
    "derive",
    "sort",
    "join",
    "aggregate",
];

fn parse<T: DeserializeOwned>(rule: &toml::Table) -> Result<T, String> {
    toml::Value::Table(rule.clone())
        .try_into()
        .map_err(|e| e.to_string().trim().to_string())
}

fn compile_rule(
    verb: &str,
    rule: &toml::Table,
    schema: &mut Schema,
    main: &str,
    sources: &IndexMap<String, Schema>,
) -> Result<Box<dyn Step>, String> {
    Ok(match verb {
        "discard" => Box::new(Discard::compile(parse(rule)?, schema)?),
        "drop" => Box::new(Drop::compile(parse(rule)?, schema)?),
        "translate" => Box::new(Translate::compile(parse(rule)?, schema)?),
        "derive" => Box::new(Derive::compile(parse(rule)?, schema)?),
        "sort" => Box::new(Sort::compile(parse(rule)?, schema)?),
        "join" => Box::new(Join::compile(parse(rule)?, schema, main, sources)?),
        _ => Box::new(Aggregate::compile(parse(rule)?, schema)?),
    })
}

fn reject(row: &Row, reason: String, schema_names: &[String]) -> RowReject {
    let object: serde_json::Map<String, serde_json::Value> = schema_names
        .iter()
        .cloned()
        .zip(row.values.iter().map(SqlValue::to_json))
        .collect();
    RowReject {
        origin: row.origin,
        reason,
        row: serde_json::Value::Object(object).to_string(),
    }
}

fn names(schema: &Schema) -> Vec<String> {
    schema.names().map(str::to_string).collect()
}

/// `discard = "status = 'test'"` drops the rows where the condition holds;
/// with `fields = [...]`, it blanks those fields instead.
struct Discard {
    when: Expr,
    fields: Vec<usize>,
    columns: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiscardRule {
    discard: String,
    #[serde(default)]
    fields: Vec<String>,
}

impl Discard {
    fn compile(rule: DiscardRule, schema: &Schema) -> Result<Discard, String> {
        Ok(Discard {
            when: Expr::compile(&rule.discard, schema)?,
            fields: rule
                .fields
                .iter()
                .map(|f| schema.require(f))
                .collect::<Result<_, _>>()?,
            columns: names(schema),
        })
    }
}

impl Step for Discard {
    fn apply(&self, rows: Vec<Row>, context: &mut Context<'_>) -> Vec<Row> {
        rows.into_iter()
            .filter_map(|mut row| match self.when.holds(&row.values) {
                Ok(false) => Some(row),
                Ok(true) if self.fields.is_empty() => None,
                Ok(true) => {
                    for &i in &self.fields {
                        row.values[i] = SqlValue::Null;
                    }
                    Some(row)
                }
                Err(e) => {
                    context.rejects.push(reject(&row, e, &self.columns));
                    None
                }
            })
            .collect()
    }
}

/// `drop = ["note"]` removes columns.
struct Drop {
    /// Kept column positions, in order.
    keep: Vec<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DropRule {
    drop: Vec<String>,
}

impl Drop {
    fn compile(rule: DropRule, schema: &mut Schema) -> Result<Drop, String> {
        let mut dropped = rule
            .drop
            .iter()
            .map(|f| schema.require(f))
            .collect::<Result<Vec<_>, _>>()?;
        dropped.sort_unstable();
        dropped.dedup();
        for &i in dropped.iter().rev() {
            schema.remove(i);
        }
        let keep = (0..schema.len() + dropped.len())
            .filter(|i| !dropped.contains(i))
            .collect();
        Ok(Drop { keep })
    }
}

impl Step for Drop {
    fn apply(&self, rows: Vec<Row>, _: &mut Context<'_>) -> Vec<Row> {
        rows.into_iter()
            .map(|row| Row {
                values: self.keep.iter().map(|&i| row.values[i].clone()).collect(),
                origin: row.origin,
            })
            .collect()
    }
}

/// `translate = "gender", map = { F = 1, M = 2 }`: replaces codes by
/// their meaning (into another column with `into`). A code missing from
/// the map takes `default`, or rejects the row when there is none.
struct Translate {
    from: usize,
    to: usize,
    map: HashMap<String, SqlValue>,
    default: Option<SqlValue>,
    columns: Vec<String>,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TranslateRule {
    translate: String,
    map: IndexMap<String, toml::Value>,
    #[serde(default)]
    default: Option<toml::Value>,
    #[serde(default)]
    into: Option<String>,
}

fn toml_value(value: &toml::Value) -> Result<(SqlValue, ValueType), String> {
    Ok(match value {
        toml::Value::Integer(i) => (SqlValue::Int(*i), ValueType::Int),
        toml::Value::Float(f) => (SqlValue::Float(*f), ValueType::Float),
        toml::Value::Boolean(b) => (SqlValue::Bool(*b), ValueType::Bool),
        toml::Value::String(s) => (SqlValue::Text(s.clone()), ValueType::Text),
        other => return Err(format!("{other} is not a plain value")),
    })
}

impl Translate {
    fn compile(rule: TranslateRule, schema: &mut Schema) -> Result<Translate, String> {
        let from = schema.require(&rule.translate)?;
        let columns = names(schema);
        let mut ty = None;
        let mut meaning = |value: &toml::Value| -> Result<SqlValue, String> {
            let (value, t) = toml_value(value)?;
            if ty.is_some_and(|ty| ty != t) {
                return Err("the translations are not all of one type".into());
            }
            ty = Some(t);
            Ok(value)
        };
        let map = rule
            .map
            .iter()
            .map(|(code, m)| Ok((code.clone(), meaning(m)?)))
            .collect::<Result<HashMap<_, _>, String>>()?;
        let default = rule.default.as_ref().map(&mut meaning).transpose()?;
        let ty = ty.ok_or("map translates nothing")?;
        let to = schema.set(rule.into.as_deref().unwrap_or(&rule.translate), ty);
        Ok(Translate {
            from,
            to,
            map,
            default,
            columns,
            name: rule.translate,
        })
    }
}

impl Step for Translate {
    fn apply(&self, rows: Vec<Row>, context: &mut Context<'_>) -> Vec<Row> {
        rows.into_iter()
            .filter_map(|mut row| {
                let code = &row.values[self.from];
                let meaning = match code {
                    SqlValue::Null => Some(SqlValue::Null),
                    SqlValue::Text(text) => self.map.get(text.as_str()).cloned(),
                    other => self.map.get(&expr::text(other)).cloned(),
                }
                .or_else(|| self.default.clone());
                let Some(meaning) = meaning else {
                    let reason = format!(
                        "{}: code {} has no translation",
                        self.name,
                        expr::text(code)
                    );
                    context.rejects.push(reject(&row, reason, &self.columns));
                    return None;
                };
                if self.to == row.values.len() {
                    row.values.push(meaning);
                } else {
                    row.values[self.to] = meaning;
                }
                Some(row)
            })
            .collect()
    }
}

/// `derive = "age", expr = "age(born, ordered_at)", type = "int"`.
struct Derive {
    expr: Expr,
    to: usize,
    ty: ValueType,
    columns: Vec<String>,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeriveRule {
    derive: String,
    expr: String,
    #[serde(rename = "type")]
    ty: Option<ValueType>,
}

impl Derive {
    fn compile(rule: DeriveRule, schema: &mut Schema) -> Result<Derive, String> {
        let expr = Expr::compile(&rule.expr, schema)?;
        let ty = rule
            .ty
            .or(expr.ty)
            .ok_or("say its type = \"int\" | \"float\" | \"bool\" | \"text\" | \"timestamp\"")?;
        let columns = names(schema);
        let to = schema.set(&rule.derive, ty);
        Ok(Derive {
            expr,
            to,
            ty,
            columns,
            name: rule.derive,
        })
    }
}

impl Step for Derive {
    fn apply(&self, rows: Vec<Row>, context: &mut Context<'_>) -> Vec<Row> {
        rows.into_iter()
            .filter_map(|mut row| {
                match self.expr.eval(&row.values).and_then(|v| self.ty.coerce(v)) {
                    Ok(value) if self.to == row.values.len() => row.values.push(value),
                    Ok(value) => row.values[self.to] = value,
                    Err(e) => {
                        let reason = format!("{}: {e}", self.name);
                        context.rejects.push(reject(&row, reason, &self.columns));
                        return None;
                    }
                }
                Some(row)
            })
            .collect()
    }
}

/// `sort = ["region", "amount desc"]`: stable, NULLs first.
struct Sort {
    keys: Vec<(usize, bool)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SortRule {
    sort: Vec<String>,
}

impl Sort {
    fn compile(rule: SortRule, schema: &Schema) -> Result<Sort, String> {
        let keys = rule
            .sort
            .iter()
            .map(|key| {
                let mut words = key.split_whitespace();
                let column = words.next().ok_or("an empty sort key")?;
                let descending = match words.next().map(|w| w.to_ascii_lowercase()) {
                    None => false,
                    Some(w) if w == "asc" => false,
                    Some(w) if w == "desc" => true,
                    Some(w) => return Err(format!("{w:?}: say asc or desc")),
                };
                Ok((schema.require(column)?, descending))
            })
            .collect::<Result<_, String>>()?;
        Ok(Sort { keys })
    }
}

/// Orders values for sorting and grouping: NULL first, then by value;
/// values of different types by type (they cannot meet in one column).
fn order(a: &SqlValue, b: &SqlValue) -> Ordering {
    match expr::compare(a, b) {
        Ok(Some(o)) => o,
        _ => rank(a).cmp(&rank(b)),
    }
}

fn rank(value: &SqlValue) -> u8 {
    match value {
        SqlValue::Null => 0,
        SqlValue::Bool(_) => 1,
        SqlValue::Int(_) | SqlValue::Float(_) => 2,
        SqlValue::Text(_) => 3,
    }
}

impl Step for Sort {
    fn row_by_row(&self) -> bool {
        false
    }

    fn apply(&self, mut rows: Vec<Row>, _: &mut Context<'_>) -> Vec<Row> {
        rows.sort_by(|a, b| {
            for &(i, descending) in &self.keys {
                let o = order(&a.values[i], &b.values[i]);
                if o != Ordering::Equal {
                    return if descending { o.reverse() } else { o };
                }
            }
            Ordering::Equal
        });
        rows
    }
}

/// `join = "customers", on = "customer_id"`: adds the other source's
/// columns to each row with the same key — one row per match. `kind =
/// "left"` (the default) keeps rows without a match, with NULLs; `inner`
/// rejects them.
struct Join {
    source: String,
    left_key: usize,
    right_key: usize,
    right_columns: Vec<usize>,
    inner: bool,
    columns: Vec<String>,
    /// The joined source's rows by key (positions in it), built on the
    /// first batch: a run that loads while it reads joins many batches
    /// against the same rows.
    index: std::sync::OnceLock<RightIndex>,
}

/// One map per kind of value, so text keys are looked up as they are,
/// without building a key per row.
type RightIndex = [HashMap<String, Vec<usize>>; 4];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinRule {
    join: String,
    on: String,
    #[serde(default)]
    kind: JoinKind,
}

#[derive(Deserialize, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
enum JoinKind {
    #[default]
    Left,
    Inner,
}

impl Join {
    fn compile(
        rule: JoinRule,
        schema: &mut Schema,
        main: &str,
        sources: &IndexMap<String, Schema>,
    ) -> Result<Join, String> {
        if rule.join == main {
            return Err(format!("{main} is the main source; join another"));
        }
        let right = sources
            .get(&rule.join)
            .ok_or_else(|| format!("no source named {:?}", rule.join))?;
        let left_key = schema.require(&rule.on)?;
        let right_key = right
            .require(&rule.on)
            .map_err(|e| format!("source {}: {e}", rule.join))?;
        let columns = names(schema);
        let mut right_columns = Vec::new();
        for (i, (name, ty)) in right.columns().iter().enumerate() {
            if i == right_key {
                continue;
            }
            if schema.position(name).is_some() {
                return Err(format!(
                    "column {name:?} is on both sides; drop or rename one first"
                ));
            }
            schema.set(name, *ty);
            right_columns.push(i);
        }
        Ok(Join {
            source: rule.join,
            left_key,
            right_key,
            right_columns,
            inner: rule.kind == JoinKind::Inner,
            columns,
            index: std::sync::OnceLock::new(),
        })
    }
}

/// A value as a hash key: text form, tagged so 1 and '1' differ.
type HashKey = (u8, String);

fn key_of(value: &SqlValue) -> Option<HashKey> {
    (*value != SqlValue::Null).then(|| (rank(value), expr::text(value)))
}

impl Step for Join {
    fn apply(&self, rows: Vec<Row>, context: &mut Context<'_>) -> Vec<Row> {
        let right = context
            .sources
            .get(&self.source)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let index = self.index.get_or_init(|| {
            let mut index: RightIndex = Default::default();
            for (position, row) in right.iter().enumerate() {
                if let Some((kind, key)) = key_of(&row.values[self.right_key]) {
                    index[kind as usize].entry(key).or_default().push(position);
                }
            }
            index
        });
        let lookup = |value: &SqlValue| match value {
            SqlValue::Null => None,
            SqlValue::Text(text) => index[rank(value) as usize].get(text.as_str()),
            other => index[rank(other) as usize].get(&expr::text(other)),
        };
        let mut joined = Vec::with_capacity(rows.len());
        for row in rows {
            let matches = lookup(&row.values[self.left_key]);
            match matches {
                Some(positions) => {
                    let (last, others) = positions.split_last().expect("indexed keys have rows");
                    let (last, others) = (&right[*last], others.iter().map(|&i| &right[i]));
                    for other in others {
                        let mut values = row.values.clone();
                        values.extend(self.right_columns.iter().map(|&i| other.values[i].clone()));
                        joined.push(Row {
                            values,
                            origin: row.origin,
                        });
                    }
                    let mut row = row;
                    row.values
                        .extend(self.right_columns.iter().map(|&i| last.values[i].clone()));
                    joined.push(row);
                }
                None if self.inner => {
                    let reason = format!("no {} row with this key", self.source);
                    context.rejects.push(reject(&row, reason, &self.columns));
                }
                None => {
                    let mut row = row;
                    row.values
                        .extend(self.right_columns.iter().map(|_| SqlValue::Null));
                    joined.push(row);
                }
            }
        }
        joined
    }
}

/// `aggregate = ["region", "day"], values = { total = "sum(amount)" }`:
/// one row per group, in group order; the columns become the groups and
/// the values.
struct Aggregate {
    by: Vec<usize>,
    values: Vec<(Fold, Option<usize>)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AggregateRule {
    aggregate: Vec<String>,
    values: IndexMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fold {
    Count,
    Sum,
    Avg,
    Min,
    Max,
}

impl Fold {
    pub fn name(self) -> &'static str {
        match self {
            Fold::Count => "count",
            Fold::Sum => "sum",
            Fold::Avg => "avg",
            Fold::Min => "min",
            Fold::Max => "max",
        }
    }
}

/// `count(*)` or `func(column)`: the aggregates rules and reports take.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateCall {
    pub fold: Fold,
    /// `None` for `count(*)`.
    pub column: Option<String>,
}

impl AggregateCall {
    pub fn parse(spec: &str) -> Result<AggregateCall, String> {
        let (func, arg) = spec
            .trim()
            .strip_suffix(')')
            .and_then(|s| s.split_once('('))
            .ok_or_else(|| {
                format!("{spec:?}: write count(*), sum(col), avg(col), min(col) or max(col)")
            })?;
        let fold = match func.trim().to_ascii_lowercase().as_str() {
            "count" => Fold::Count,
            "sum" => Fold::Sum,
            "avg" => Fold::Avg,
            "min" => Fold::Min,
            "max" => Fold::Max,
            other => return Err(format!("unknown aggregate {other}()")),
        };
        let column = match (fold, arg.trim()) {
            (Fold::Count, "*") => None,
            (_, "*") => return Err(format!("{}(*) needs a column", fold.name())),
            (_, column) => Some(column.to_string()),
        };
        Ok(AggregateCall { fold, column })
    }
}

impl Aggregate {
    fn compile(rule: AggregateRule, schema: &mut Schema) -> Result<Aggregate, String> {
        let mut output = Vec::new();
        let mut by = Vec::new();
        for column in &rule.aggregate {
            let i = schema.require(column)?;
            by.push(i);
            output.push((column.clone(), schema.type_at(i)));
        }
        let mut values = Vec::new();
        for (name, text) in &rule.values {
            let call = AggregateCall::parse(text).map_err(|e| format!("{name}: {e}"))?;
            let fold = call.fold;
            let column = call.column.map(|c| schema.require(&c)).transpose()?;
            let input = column.map(|i| schema.type_at(i));
            let ty = match (fold, input) {
                (Fold::Count, _) => ValueType::Int,
                (Fold::Avg, _) => ValueType::Float,
                (_, Some(t @ (ValueType::Int | ValueType::Float))) => t,
                (Fold::Min | Fold::Max, Some(t)) => t,
                (_, Some(t)) => return Err(format!("{name}: cannot sum {t:?} values")),
                (_, None) => unreachable!("only count(*) has no column"),
            };
            if output.iter().any(|(n, _)| n == name) {
                return Err(format!("{name} is both a group and a value"));
            }
            output.push((name.clone(), ty));
            values.push((fold, column));
        }
        *schema = Schema::from_pairs(output);
        Ok(Aggregate { by, values })
    }
}

#[derive(Clone)]
struct Accumulator {
    count: i64,
    sum: SqlValue,
    extreme: SqlValue,
}

impl Step for Aggregate {
    fn row_by_row(&self) -> bool {
        false
    }

    fn apply(&self, rows: Vec<Row>, _: &mut Context<'_>) -> Vec<Row> {
        let mut groups: IndexMap<Vec<Option<HashKey>>, (Row, Vec<Accumulator>)> = IndexMap::new();
        let fresh = Accumulator {
            count: 0,
            sum: SqlValue::Null,
            extreme: SqlValue::Null,
        };
        for row in rows {
            let key: Vec<_> = self.by.iter().map(|&i| key_of(&row.values[i])).collect();
            let origin = row.origin;
            let (_, accumulators) = groups.entry(key).or_insert_with(|| {
                let values = self.by.iter().map(|&i| row.values[i].clone()).collect();
                (
                    Row { values, origin },
                    vec![fresh.clone(); self.values.len()],
                )
            });
            for ((fold, column), acc) in self.values.iter().zip(accumulators.iter_mut()) {
                let Some(i) = column else {
                    acc.count += 1;
                    continue;
                };
                let value = &row.values[*i];
                if *value == SqlValue::Null {
                    continue;
                }
                acc.count += 1;
                match fold {
                    Fold::Sum | Fold::Avg => {
                        acc.sum = match (&acc.sum, value) {
                            (SqlValue::Null, v) => v.clone(),
                            (SqlValue::Int(a), SqlValue::Int(b)) => {
                                SqlValue::Int(a.saturating_add(*b))
                            }
                            (a, b) => SqlValue::Float(number(a) + number(b)),
                        }
                    }
                    Fold::Min | Fold::Max => {
                        let better = acc.extreme == SqlValue::Null || {
                            let o = order(value, &acc.extreme);
                            if *fold == Fold::Min {
                                o.is_lt()
                            } else {
                                o.is_gt()
                            }
                        };
                        if better {
                            acc.extreme = value.clone();
                        }
                    }
                    Fold::Count => {}
                }
            }
        }
        groups
            .into_values()
            .map(|(mut row, accumulators)| {
                for ((fold, _), acc) in self.values.iter().zip(accumulators) {
                    row.values.push(match fold {
                        Fold::Count => SqlValue::Int(acc.count),
                        Fold::Sum => acc.sum,
                        Fold::Avg if acc.count == 0 => SqlValue::Null,
                        Fold::Avg => SqlValue::Float(number(&acc.sum) / acc.count as f64),
                        Fold::Min | Fold::Max => acc.extreme,
                    });
                }
                row
            })
            .collect()
    }
}

fn number(value: &SqlValue) -> f64 {
    match value {
        SqlValue::Int(i) => *i as f64,
        SqlValue::Float(f) => *f,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> IndexMap<String, Schema> {
        let mut sources = IndexMap::new();
        sources.insert(
            "orders".to_string(),
            Schema::from_pairs([
                ("order_id", ValueType::Text),
                ("customer", ValueType::Text),
                ("gender", ValueType::Text),
                ("amount", ValueType::Float),
            ]),
        );
        sources.insert(
            "customers".to_string(),
            Schema::from_pairs([("customer", ValueType::Text), ("region", ValueType::Text)]),
        );
        sources
    }

    fn rules(text: &str) -> Vec<toml::Table> {
        #[derive(Deserialize)]
        struct File {
            rules: Vec<toml::Table>,
        }
        toml::from_str::<File>(text).unwrap().rules
    }

    fn row(source: u16, line: u64, values: Vec<SqlValue>) -> Row {
        Row {
            values,
            origin: Origin {
                source,
                file: 0,
                line,
            },
        }
    }

    fn text(s: &str) -> SqlValue {
        SqlValue::Text(s.into())
    }

    #[test]
    fn applies_rules_in_order_and_rejects_rows_not_runs() {
        let pipeline = compile(
            &rules(
                r#"
                [[rules]]
                discard = "amount < 0"
                [[rules]]
                translate = "gender"
                map = { F = 1, M = 2 }
                [[rules]]
                join = "customers"
                on = "customer"
                [[rules]]
                aggregate = ["region"]
                values = { orders = "count(*)", total = "sum(amount)", women = "sum(gender)" }
                [[rules]]
                sort = ["total desc"]
                "#,
            ),
            "orders",
            &sources(),
        )
        .unwrap();
        assert_eq!(
            pipeline.output().names().collect::<Vec<_>>(),
            ["region", "orders", "total", "women"]
        );
        let orders = vec![
            row(
                0,
                2,
                vec![text("o1"), text("c1"), text("F"), SqlValue::Float(10.0)],
            ),
            row(
                0,
                3,
                vec![text("o2"), text("c2"), text("M"), SqlValue::Float(5.0)],
            ),
            row(
                0,
                4,
                vec![text("o3"), text("c1"), text("X"), SqlValue::Float(7.0)],
            ),
            row(
                0,
                5,
                vec![text("o4"), text("c2"), text("F"), SqlValue::Float(-1.0)],
            ),
            row(
                0,
                6,
                vec![text("o5"), text("c9"), text("M"), SqlValue::Float(1.0)],
            ),
        ];
        let mut by_source = HashMap::new();
        by_source.insert(
            "customers".to_string(),
            vec![
                row(1, 2, vec![text("c1"), text("north")]),
                row(1, 3, vec![text("c2"), text("south")]),
            ],
        );
        let mut context = Context {
            sources: &by_source,
            rejects: Vec::new(),
        };
        let out = pipeline.apply(orders, &mut context);
        let values: Vec<_> = out.iter().map(|r| r.values.clone()).collect();
        assert_eq!(
            values,
            vec![
                vec![
                    text("north"),
                    SqlValue::Int(1),
                    SqlValue::Float(10.0),
                    SqlValue::Int(1)
                ],
                vec![
                    text("south"),
                    SqlValue::Int(1),
                    SqlValue::Float(5.0),
                    SqlValue::Int(2)
                ],
                vec![
                    SqlValue::Null,
                    SqlValue::Int(1),
                    SqlValue::Float(1.0),
                    SqlValue::Int(2)
                ],
            ]
        );
        assert_eq!(context.rejects.len(), 1);
        assert_eq!(context.rejects[0].origin.line, 4);
        assert!(context.rejects[0]
            .reason
            .contains("code X has no translation"));
    }

    #[test]
    fn a_rule_naming_a_missing_column_fails_before_any_row() {
        let missing = |text: &str| compile(&rules(text), "orders", &sources()).err().unwrap();
        let e = missing("[[rules]]\ndrop = [\"amount\"]\n[[rules]]\ndiscard = \"amount > 1\"");
        assert!(
            e.starts_with("rule 2 (discard)") && e.contains("no column \"amount\""),
            "{e}"
        );
        let e = missing("[[rules]]\njoin = \"suppliers\"\non = \"customer\"");
        assert!(e.contains("no source named \"suppliers\""), "{e}");
        let e = missing("[[rules]]\nshuffle = true");
        assert!(e.contains("say what it does"), "{e}");
        let e = missing("[[rules]]\nsort = [\"amount\"]\nlimit = 3");
        assert!(e.contains("unknown field"), "{e}");
    }
}
