//! Rewrites an aggregate SELECT over a stream into the same query over one
//! of its views, when the view can answer it exactly: every grouping is a
//! view grouping column or a bucket the view's bucket divides, every filter
//! reads only those (or bounds the bucketed column on a bucket boundary),
//! and every aggregate is one the view keeps partials for. Anything else is
//! refused with the reason, and the query runs on the primary table.
//!
//! The rewritten query re-aggregates the view's partials, so a view with
//! finer groups or buckets than the query still answers it, and partial rows
//! repeated for one group (NULL groups, periodic tails) merge.

use sqlparser::ast::{
    BinaryOperator, CastKind, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr,
    OrderByKind, Query, Select, SelectItem, SetExpr, TableFactor, UnaryOperator,
};

use fleetgate_protocol::schema::RECEIVED_AT;

use super::def::{partial, AggFn, ViewPlan, BUCKET, ROWS};
use crate::db::Backend;
use crate::sql_expr::{integer, split_and, strip_nested};
use crate::values::ColumnKind;

/// Scalar functions a rewritten query may keep around mapped arguments.
const SCALAR_FUNCTIONS: &[&str] = &[
    "abs", "ceil", "ceiling", "coalesce", "floor", "lower", "nullif", "round", "upper", "length",
    "sign", "sqrt", "trunc",
];

/// The SQL to run on `plan`'s view instead of `query`, whose result columns
/// are named `names`; or why the view cannot answer it.
pub fn rewrite(
    query: &Query,
    plan: &ViewPlan,
    names: &[String],
    backend: Backend,
    primary_leads_with: &[String],
) -> Result<String, String> {
    if let Some(rows) = &plan.rows {
        return rows.rewrite(query, plan, names, backend, primary_leads_with);
    }
    if query.with.is_some() {
        return Err("the query has a WITH clause".into());
    }
    if query.fetch.is_some() {
        return Err("the query uses FETCH".into());
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Err("the query is not a single SELECT".into());
    };
    let alias = source_alias(select, plan)?;
    if select.distinct.is_some() {
        return Err("the query uses DISTINCT".into());
    }
    if select.qualify.is_some() || !select.named_window.is_empty() {
        return Err("the query uses window clauses".into());
    }
    let mapper = Mapper {
        plan,
        backend,
        alias,
        outputs: Vec::new(),
    };

    let group_by = match &select.group_by {
        GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => exprs
            .iter()
            .map(|e| mapper.map(e, Context::Row))
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err("the query's GROUP BY has modifiers".into()),
    };
    let mut items = Vec::new();
    let mut aggregates = false;
    for (item, name) in select.projection.iter().zip(names) {
        let expr = match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
            _ => return Err("the query selects * (views keep aggregates, not rows)".into()),
        };
        aggregates |= contains_aggregate(expr);
        let mapped = mapper.map(expr, Context::Aggregate)?;
        items.push(format!("{mapped} AS \"{}\"", name.replace('"', "\"\"")));
    }
    if select.projection.len() != names.len() {
        return Err("the query's result columns could not be matched".into());
    }
    if !aggregates && group_by.is_empty() {
        return Err("the query reads rows, not aggregates".into());
    }
    let mut sql = format!("SELECT {} FROM {}", items.join(", "), plan.read_from());
    if let Some(filter) = &select.selection {
        let conjuncts = split_and(filter)
            .into_iter()
            .map(|c| mapper.map_filter(c))
            .collect::<Result<Vec<_>, _>>()?;
        sql.push_str(&format!(" WHERE {}", conjuncts.join(" AND ")));
    }
    if !group_by.is_empty() {
        sql.push_str(&format!(" GROUP BY {}", group_by.join(", ")));
    }
    if let Some(having) = &select.having {
        sql.push_str(&format!(
            " HAVING {}",
            mapper.map(having, Context::Aggregate)?
        ));
    }
    if let Some(order_by) = &query.order_by {
        let OrderByKind::Expressions(exprs) = &order_by.kind else {
            return Err("the query uses ORDER BY ALL".into());
        };
        let mapper = Mapper {
            outputs: output_names(select),
            ..mapper
        };
        let mut keys = Vec::new();
        for key in exprs {
            if key.with_fill.is_some() {
                return Err("the query uses WITH FILL".into());
            }
            keys.push(format!(
                "{}{}",
                mapper.map(&key.expr, Context::Aggregate)?,
                key.options
            ));
        }
        sql.push_str(&format!(" ORDER BY {}", keys.join(", ")));
    }
    if let Some(limit) = &query.limit_clause {
        sql.push_str(&limit.to_string());
    }
    Ok(sql)
}

/// The name (or alias) columns may be qualified with; the FROM must be the
/// view's source alone.
fn source_alias(select: &Select, plan: &ViewPlan) -> Result<String, String> {
    let (table, alias) = single_table(select)?;
    if table != plan.source() {
        return Err(format!("the query reads {table}, not {}", plan.source()));
    }
    Ok(alias)
}

/// The one table a SELECT reads, and the name its columns may be
/// qualified with (its alias, or itself).
pub(super) fn single_table(select: &Select) -> Result<(String, String), String> {
    let [from] = select.from.as_slice() else {
        return Err("the query reads more than one table".into());
    };
    if !from.joins.is_empty() {
        return Err("the query joins tables".into());
    }
    let TableFactor::Table { name, alias, .. } = &from.relation else {
        return Err("the query reads a subquery".into());
    };
    let table = name.to_string().to_lowercase();
    let alias = alias
        .as_ref()
        .map_or_else(|| table.clone(), |a| a.name.value.to_lowercase());
    Ok((table, alias))
}

pub(super) fn output_names(select: &Select) -> Vec<String> {
    select
        .projection
        .iter()
        .filter_map(|item| match item {
            SelectItem::ExprWithAlias { alias, .. } => Some(alias.value.to_lowercase()),
            _ => None,
        })
        .collect()
}

fn contains_aggregate(expr: &Expr) -> bool {
    let mut found = false;
    let _ = sqlparser::ast::visit_expressions(expr, |e| {
        if let Expr::Function(f) = e {
            if AggFn::parse_name(&f.name.to_string().to_lowercase()).is_some() {
                found = true;
                return std::ops::ControlFlow::Break(());
            }
        }
        std::ops::ControlFlow::Continue(())
    });
    found
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Context {
    /// Grouping keys and filters: only the view's grouping columns and buckets.
    Row,
    /// Results, HAVING and ORDER BY: aggregates too.
    Aggregate,
}

struct Mapper<'a> {
    plan: &'a ViewPlan,
    backend: Backend,
    alias: String,
    /// Result aliases ORDER BY may name.
    outputs: Vec<String>,
}

impl Mapper<'_> {
    fn column(&self, expr: &Expr) -> Option<String> {
        column_of(expr, &self.alias)
    }

    fn group_column(&self, expr: &Expr) -> Result<String, String> {
        let column = self
            .column(expr)
            .ok_or_else(|| format!("{expr} is not a column of {}", self.plan.source()))?;
        if self.plan.group_by.iter().any(|(c, _)| *c == column) {
            Ok(column)
        } else if self.outputs.contains(&column) {
            Ok(format!("\"{column}\""))
        } else {
            Err(format!(
                "column {column} is not one the view groups by ({})",
                self.plan
                    .group_by
                    .iter()
                    .map(|(c, _)| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }

    /// `col / W * W` over the bucketed column, with W a multiple of the
    /// view's width: the same bucket of the view's buckets.
    fn bucket(&self, expr: &Expr) -> Option<Result<String, String>> {
        let (column, width) = self.plan.bucket.as_ref()?;
        let (dividend, inner, outer) = as_bucket(expr)?;
        if self.column(dividend).as_ref() != Some(column) {
            return None;
        }
        Some(if inner != outer {
            Err(format!(
                "{expr} is not a bucket (divides and multiplies by different numbers)"
            ))
        } else if inner % width != 0 {
            Err(format!(
                "the query's bucket {inner} is not a multiple of the view's {width}"
            ))
        } else if inner == *width {
            Ok(BUCKET.to_string())
        } else {
            Ok(format!("({BUCKET} / {inner}) * {inner}"))
        })
    }

    /// A filter conjunct: over grouping columns, or a bound on the bucketed
    /// column at a bucket boundary (`>=` and `<` only: those keep whole
    /// buckets).
    fn map_filter(&self, expr: &Expr) -> Result<String, String> {
        if let Some(bound) = self.bucket_bound(expr) {
            return bound;
        }
        self.map(expr, Context::Row)
    }

    fn bucket_bound(&self, expr: &Expr) -> Option<Result<String, String>> {
        let (column, width) = self.plan.bucket.as_ref()?;
        let Expr::BinaryOp { left, op, right } = expr else {
            return None;
        };
        let (op, value) = if self.column(left).as_ref() == Some(column) {
            (op.clone(), right)
        } else if self.column(right).as_ref() == Some(column) {
            let flipped = match op {
                BinaryOperator::Lt => BinaryOperator::Gt,
                BinaryOperator::LtEq => BinaryOperator::GtEq,
                BinaryOperator::Gt => BinaryOperator::Lt,
                BinaryOperator::GtEq => BinaryOperator::LtEq,
                other => other.clone(),
            };
            (flipped, left)
        } else {
            return None;
        };
        let Some(bound) = signed_integer(value) else {
            return Some(Err(format!(
                "{expr}: a bound on {column} must be a number for a view to apply"
            )));
        };
        // Buckets divide as integers, truncating toward zero: bucket 0 holds
        // -(width-1)..=width-1 and bucket -width holds -(2*width-1)..=-width,
        // so from 0 down a multiple of the width falls inside a bucket.
        // received_at is never negative; any other column may be. (Width 1
        // does not truncate.)
        let signed = column != RECEIVED_AT && *width > 1;
        Some(match op {
            BinaryOperator::GtEq | BinaryOperator::Lt if bound % width != 0 => Err(format!(
                "{expr}: {bound} is not on a {width} ms bucket boundary"
            )),
            BinaryOperator::GtEq | BinaryOperator::Lt if signed && bound <= 0 => Err(format!(
                "{expr}: {column} may be negative, and its buckets truncate toward zero \
                 (bucket 0 holds -{w} to {w}): only a bound above 0 keeps whole buckets",
                w = width - 1
            )),
            BinaryOperator::GtEq | BinaryOperator::Lt => Ok(format!("{BUCKET} {op} {bound}")),
            _ => Err(format!(
                "{expr}: only >= and < bounds on {column} keep whole buckets"
            )),
        })
    }

    fn map(&self, expr: &Expr, context: Context) -> Result<String, String> {
        if let Some(bucket) = self.bucket(expr) {
            return bucket;
        }
        match expr {
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => self.group_column(expr),
            Expr::Value(v) => Ok(v.to_string()),
            Expr::Nested(inner) => Ok(format!("({})", self.map(inner, context)?)),
            Expr::BinaryOp { left, op, right } => Ok(format!(
                "({} {op} {})",
                self.map(left, context)?,
                self.map(right, context)?
            )),
            Expr::UnaryOp { op, expr } => match op {
                UnaryOperator::Not | UnaryOperator::Minus | UnaryOperator::Plus => {
                    Ok(format!("{op} ({})", self.map(expr, context)?))
                }
                _ => Err(format!("operator {op} is not supported through views")),
            },
            Expr::IsNull(e) => Ok(format!("({} IS NULL)", self.map(e, context)?)),
            Expr::IsNotNull(e) => Ok(format!("({} IS NOT NULL)", self.map(e, context)?)),
            Expr::InList {
                expr,
                list,
                negated,
            } => {
                let items = list
                    .iter()
                    .map(|e| self.map(e, context))
                    .collect::<Result<Vec<_>, _>>()?;
                let not = if *negated { "NOT " } else { "" };
                Ok(format!(
                    "({} {not}IN ({}))",
                    self.map(expr, context)?,
                    items.join(", ")
                ))
            }
            Expr::Between {
                expr,
                negated,
                low,
                high,
            } => {
                let not = if *negated { "NOT " } else { "" };
                Ok(format!(
                    "({} {not}BETWEEN {} AND {})",
                    self.map(expr, context)?,
                    self.map(low, context)?,
                    self.map(high, context)?
                ))
            }
            Expr::Cast {
                kind: CastKind::Cast,
                expr,
                data_type,
                format: None,
                ..
            } => Ok(format!("CAST({} AS {data_type})", self.map(expr, context)?)),
            Expr::Function(function) => {
                let name = function.name.to_string().to_lowercase();
                let plain = function.filter.is_none()
                    && function.over.is_none()
                    && function.within_group.is_empty()
                    && function.null_treatment.is_none()
                    && matches!(function.parameters, FunctionArguments::None);
                let FunctionArguments::List(list) = &function.args else {
                    return Err(format!("{expr} is not supported through views"));
                };
                if !plain || !list.clauses.is_empty() {
                    return Err(format!("{expr} uses clauses views cannot apply"));
                }
                if let Some(func) = AggFn::parse_name(&name) {
                    if context == Context::Row {
                        return Err(format!("{expr}: an aggregate cannot appear here"));
                    }
                    if list.duplicate_treatment.is_some() {
                        return Err(format!("{expr}: DISTINCT aggregates are not kept by views"));
                    }
                    return self.aggregate(expr, func, &list.args);
                }
                if !SCALAR_FUNCTIONS.contains(&name.as_str()) {
                    return Err(format!("function {name} is not supported through views"));
                }
                let args = list
                    .args
                    .iter()
                    .map(|arg| match arg {
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => self.map(e, context),
                        _ => Err(format!("{expr}: only plain arguments are supported")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(format!("{name}({})", args.join(", ")))
            }
            other => Err(format!("{other} is not supported through views")),
        }
    }

    /// An aggregate over the source, as the same aggregate over partials.
    fn aggregate(&self, expr: &Expr, func: AggFn, args: &[FunctionArg]) -> Result<String, String> {
        let column = match args {
            [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)] if func == AggFn::Count => None,
            [FunctionArg::Unnamed(FunctionArgExpr::Expr(e))] => Some(
                self.column(e)
                    .ok_or_else(|| format!("{expr}: views keep aggregates of columns only"))?,
            ),
            _ => return Err(format!("{expr} is not an aggregate views keep")),
        };
        // The partials serve every aggregate of a measured column, not only
        // the declared ones (a view declaring avg also answers sum and count).
        if let Some(c) = &column {
            let Some(measured) = self.plan.measured.iter().find(|m| m.column == *c) else {
                return Err(format!("the view keeps no partials of {c}, so not {expr}"));
            };
            let numeric = matches!(measured.kind, ColumnKind::Int | ColumnKind::Float);
            let fits = match func {
                AggFn::Count => true,
                AggFn::Sum | AggFn::Avg => numeric,
                AggFn::Min | AggFn::Max => measured.kind != ColumnKind::Bool,
            };
            if !fits {
                return Err(format!("the view keeps no partials for {expr}"));
            }
        }
        let n = |c: &str| format!("sum({})", partial(c, "n"));
        Ok(match (func, column.as_deref()) {
            (AggFn::Count, None) => format!("COALESCE(CAST(sum({ROWS}) AS BIGINT), 0)"),
            (AggFn::Count, Some(c)) => format!("COALESCE(CAST({} AS BIGINT), 0)", n(c)),
            (AggFn::Sum, Some(c)) => {
                format!("CASE WHEN {} > 0 THEN sum({}) END", n(c), partial(c, "sum"))
            }
            (AggFn::Avg, Some(c)) => {
                let sum = match self.backend {
                    // SQLite divides integers as integers; avg does not.
                    Backend::Sqlite => format!("CAST(sum({}) AS REAL)", partial(c, "sum")),
                    Backend::Postgres => format!("sum({})", partial(c, "sum")),
                };
                format!("CASE WHEN {} > 0 THEN {sum} / {} END", n(c), n(c))
            }
            (AggFn::Min, Some(c)) => format!("min({})", partial(c, "min")),
            (AggFn::Max, Some(c)) => format!("max({})", partial(c, "max")),
            _ => return Err(format!("{expr} is not an aggregate views keep")),
        })
    }
}

/// The source column an identifier names, if it names one (`alias`
/// qualifies the query's one table).
pub(super) fn column_of(expr: &Expr, alias: &str) -> Option<String> {
    match strip_nested(expr) {
        Expr::Identifier(ident) => Some(ident.value.to_lowercase()),
        Expr::CompoundIdentifier(parts) => match parts.as_slice() {
            [table, column] if table.value.to_lowercase() == alias => {
                Some(column.value.to_lowercase())
            }
            _ => None,
        },
        _ => None,
    }
}

/// An integer literal, or a negated one (`-100` parses as a minus applied
/// to 100).
fn signed_integer(expr: &Expr) -> Option<i64> {
    match strip_nested(expr) {
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => integer(expr)?.checked_neg(),
        other => integer(other),
    }
}

/// `x / W1 * W2`, the bucket form: `x` and both numbers.
pub(super) fn as_bucket(expr: &Expr) -> Option<(&Expr, i64, i64)> {
    let Expr::BinaryOp {
        left,
        op: BinaryOperator::Multiply,
        right,
    } = strip_nested(expr)
    else {
        return None;
    };
    let outer = integer(right)?;
    let Expr::BinaryOp {
        left: dividend,
        op: BinaryOperator::Divide,
        right: divisor,
    } = strip_nested(left)
    else {
        return None;
    };
    Some((strip_nested(dividend), integer(divisor)?, outer))
}

/// How many rows a view holds at most per unit of time, as a cost to rank
/// candidates by: fewer grouping columns and wider buckets are cheaper.
pub fn rank(plan: &ViewPlan) -> (usize, i64, bool) {
    let width = plan.bucket.as_ref().map_or(i64::MAX, |(_, w)| *w);
    // A periodic view also reads its tail, a watermark view the rows
    // after its watermark.
    let tail = plan.reads_unfolded();
    // A rows view holds a row per source row: any aggregate view that
    // answers is smaller.
    let size = match &plan.rows {
        Some(rows) => 1_000 + rows.width(),
        None => plan.group_by.len(),
    };
    (size, -width, tail)
}
