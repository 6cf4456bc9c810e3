//! A query's shape: the smallest aggregate view that would answer it, with
//! the query's literal values taken out, so that the same dashboard query
//! for another device or another day has the same shape.
//!
//! Grouping keys and filtered columns become the view's grouping columns; a
//! bucket (`col / W * W`) and `>=`/`<` bounds on one column become its
//! bucket, as wide as the query's bucket and the bounds allow; aggregated
//! columns become measured columns. Whether the view really answers the
//! query is left to [`super::rewrite`], the router's own judge.

use std::collections::BTreeSet;

use fleetgate_protocol::schema::RECEIVED_AT;
use indexmap::IndexMap;
use sqlparser::ast::{
    BinaryOperator, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr,
    OrderByKind, Query, SelectItem, SetExpr,
};

use super::def::{AggFn, BucketDef, RefreshDef, ViewDef};
use super::rewrite::{as_bucket, column_of, output_names, single_table};
use crate::sql_expr::{integer, split_and};

/// Bucket widths a shape may take from its query's bounds, widest first
/// (ms): a day, an hour, a minute, a second, a millisecond.
const WIDTHS: [i64; 5] = [86_400_000, 3_600_000, 60_000, 1_000, 1];

#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// Canonical text: equal for queries one view answers alike.
    pub key: String,
    /// The view that would answer queries of this shape (refresh to be
    /// chosen).
    pub def: ViewDef,
}

/// The shape of an aggregate query over one stream, or why it has none.
pub fn of_query(query: &Query) -> Result<Shape, String> {
    if query.with.is_some() {
        return Err("the query has a WITH clause".into());
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Err("the query is not a single SELECT".into());
    };
    if select.distinct.is_some() {
        return Err("the query uses DISTINCT".into());
    }
    let (source, alias) = single_table(select)?;
    let mut shape = Collector {
        alias,
        outputs: Vec::new(),
        group: BTreeSet::new(),
        bucket: None,
        bounds: Vec::new(),
        measured: IndexMap::new(),
        counts_rows: false,
    };
    let grouped = match &select.group_by {
        GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => {
            for expr in exprs {
                shape.expr(expr)?;
            }
            !exprs.is_empty()
        }
        _ => return Err("the query's GROUP BY has modifiers".into()),
    };
    for item in &select.projection {
        match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                shape.expr(e)?
            }
            _ => return Err("the query selects *".into()),
        }
    }
    if shape.measured.is_empty() && !shape.counts_rows && !grouped {
        return Err("the query reads rows, not aggregates".into());
    }
    if let Some(filter) = &select.selection {
        for conjunct in split_and(filter) {
            if !shape.bound(conjunct) {
                shape.expr(conjunct)?;
            }
        }
    }
    shape.outputs = output_names(select);
    if let Some(having) = &select.having {
        shape.expr(having)?;
    }
    if let Some(order_by) = &query.order_by {
        if let OrderByKind::Expressions(keys) = &order_by.kind {
            for key in keys {
                shape.expr(&key.expr)?;
            }
        }
    }
    shape.finish(source)
}

struct Collector {
    alias: String,
    /// Result aliases (ORDER BY and HAVING may name them).
    outputs: Vec<String>,
    group: BTreeSet<String>,
    /// The bucketed column and the query's bucket width.
    bucket: Option<(String, i64)>,
    /// `>=`/`<` bounds: column and value.
    bounds: Vec<(String, i64)>,
    /// Aggregated columns, with the first aggregate seen of each.
    measured: IndexMap<String, AggFn>,
    counts_rows: bool,
}

impl Collector {
    fn column(&mut self, expr: &Expr) -> Result<(), String> {
        let column = column_of(expr, &self.alias)
            .ok_or_else(|| format!("{expr} names another table's column"))?;
        if !self.outputs.contains(&column) {
            self.group.insert(column);
        }
        Ok(())
    }

    /// Records what `expr` reads: buckets, aggregates, and columns (which the
    /// view must group by).
    fn expr(&mut self, expr: &Expr) -> Result<(), String> {
        if let Some((dividend, inner, outer)) = as_bucket(expr) {
            if let (Some(column), true) = (column_of(dividend, &self.alias), inner == outer) {
                return self.bucket(column, inner);
            }
        }
        match expr {
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => self.column(expr),
            Expr::Value(_) => Ok(()),
            Expr::Nested(e)
            | Expr::UnaryOp { expr: e, .. }
            | Expr::IsNull(e)
            | Expr::IsNotNull(e) => self.expr(e),
            Expr::Cast { expr, .. } => self.expr(expr),
            Expr::BinaryOp { left, right, .. } => {
                self.expr(left)?;
                self.expr(right)
            }
            Expr::InList { expr, list, .. } => {
                self.expr(expr)?;
                list.iter().try_for_each(|e| self.expr(e))
            }
            Expr::Between {
                expr, low, high, ..
            } => {
                self.expr(expr)?;
                self.expr(low)?;
                self.expr(high)
            }
            Expr::Function(function) => {
                let FunctionArguments::List(list) = &function.args else {
                    return Err(format!("{expr} is not a call views can keep"));
                };
                let name = function.name.to_string().to_lowercase();
                let Some(func) = AggFn::parse_name(&name) else {
                    return list.args.iter().try_for_each(|arg| match arg {
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => self.expr(e),
                        _ => Err(format!("{expr}: only plain arguments are supported")),
                    });
                };
                if list.duplicate_treatment.is_some() {
                    return Err(format!("{expr}: DISTINCT aggregates are not kept by views"));
                }
                match list.args.as_slice() {
                    [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)] if func == AggFn::Count => {
                        self.counts_rows = true;
                        Ok(())
                    }
                    [FunctionArg::Unnamed(FunctionArgExpr::Expr(e))] => {
                        let column = column_of(e, &self.alias).ok_or_else(|| {
                            format!("{expr}: views keep aggregates of columns only")
                        })?;
                        self.measured.entry(column).or_insert(func);
                        Ok(())
                    }
                    _ => Err(format!("{expr} is not an aggregate views keep")),
                }
            }
            other => Err(format!("{other} is not supported through views")),
        }
    }

    fn bucket(&mut self, column: String, width: i64) -> Result<(), String> {
        match &self.bucket {
            Some((other, _)) if *other != column => {
                Err(format!("the query buckets both {other} and {column}"))
            }
            Some((_, w)) if *w != width => Err(format!(
                "the query buckets {column} by both {w} and {width}"
            )),
            _ => {
                self.bucket = Some((column, width));
                Ok(())
            }
        }
    }

    /// Takes `col >= n` or `col < n` (either way round) as a bound; false
    /// for any other conjunct.
    fn bound(&mut self, conjunct: &Expr) -> bool {
        let Expr::BinaryOp { left, op, right } = conjunct else {
            return false;
        };
        let (column, value, op) = match (column_of(left, &self.alias), integer(right)) {
            (Some(c), Some(v)) => (c, v, op.clone()),
            _ => match (integer(left), column_of(right, &self.alias)) {
                (Some(v), Some(c)) => (
                    c,
                    v,
                    match op {
                        BinaryOperator::Lt => BinaryOperator::Gt,
                        BinaryOperator::GtEq => BinaryOperator::LtEq,
                        BinaryOperator::Gt => BinaryOperator::Lt,
                        BinaryOperator::LtEq => BinaryOperator::GtEq,
                        other => other.clone(),
                    },
                ),
                _ => return false,
            },
        };
        if !matches!(op, BinaryOperator::GtEq | BinaryOperator::Lt) {
            return false;
        }
        // Buckets truncate toward zero, so from 0 down a bound splits one
        // on a column that may be negative (the router refuses such a
        // view): the column is then a group instead. received_at is never
        // negative.
        if value <= 0 && column != RECEIVED_AT {
            return false;
        }
        self.bounds.push((column, value));
        true
    }

    fn finish(mut self, source: String) -> Result<Shape, String> {
        // Bounds fall on whole buckets: the bucket column is the bounded
        // one, and the width the widest that divides the query's bucket and
        // every bound.
        let bucket_column = match (&self.bucket, self.bounds.first()) {
            (Some((column, _)), _) => Some(column.clone()),
            (None, Some((column, _))) => Some(column.clone()),
            (None, None) => None,
        };
        for (column, _) in &self.bounds {
            if Some(column) != bucket_column.as_ref() {
                self.group.insert(column.clone());
            }
        }
        let bucket = match bucket_column {
            None => None,
            Some(column) => {
                if self.group.contains(&column) {
                    return Err(format!(
                        "the query groups or filters by {column} itself as well as by its buckets"
                    ));
                }
                let query_width = self.bucket.as_ref().map(|(_, w)| *w);
                let bounds: Vec<i64> = self
                    .bounds
                    .iter()
                    .filter(|(c, _)| *c == column)
                    .map(|(_, v)| *v)
                    .collect();
                let divides_all = |w: i64| bounds.iter().all(|b| b % w == 0);
                let width = match query_width {
                    Some(w) if w > 0 && divides_all(w) => w,
                    Some(w) if w > 0 => *WIDTHS
                        .iter()
                        .find(|&&u| w % u == 0 && divides_all(u))
                        .expect("1 ms divides everything"),
                    Some(w) => return Err(format!("bucket width {w} is not positive")),
                    None => *WIDTHS
                        .iter()
                        .find(|&&u| divides_all(u))
                        .expect("1 ms divides everything"),
                };
                Some((column, width))
            }
        };

        let mut aggregates = IndexMap::new();
        aggregates.insert("rows".to_string(), "count(*)".to_string());
        let mut measured: Vec<(&String, &AggFn)> = self.measured.iter().collect();
        measured.sort_by(|a, b| a.0.cmp(b.0));
        for (column, func) in &measured {
            let name = format!("{func:?}").to_lowercase();
            aggregates.insert(format!("{name}_{column}"), format!("{name}({column})"));
        }
        let key = format!(
            "{source} group[{}] bucket[{}] measured[{}]",
            self.group.iter().cloned().collect::<Vec<_>>().join(","),
            bucket
                .as_ref()
                .map(|(c, w)| format!("{c}/{w}"))
                .unwrap_or_default(),
            measured
                .iter()
                .map(|(c, _)| c.as_str())
                .collect::<Vec<_>>()
                .join(",")
        );
        Ok(Shape {
            key,
            def: ViewDef {
                source,
                group_by: self.group.into_iter().collect(),
                bucket: bucket.map(|(column, width)| BucketDef {
                    column,
                    width: format!("{width}ms"),
                }),
                aggregates,
                key: Vec::new(),
                fields: Vec::new(),
                derived: Default::default(),
                refresh: RefreshDef::default(),
                ttl: None,
                hot: None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::dialect::SQLiteDialect;
    use sqlparser::parser::Parser;

    fn shape(sql: &str) -> Result<Shape, String> {
        let mut statements = Parser::parse_sql(&SQLiteDialect {}, sql).unwrap();
        let sqlparser::ast::Statement::Query(query) = statements.remove(0) else {
            panic!("not a query")
        };
        of_query(&query)
    }

    #[test]
    fn literal_values_do_not_change_a_shape() {
        let a = shape(
            "SELECT device_id, received_at / 3600000 * 3600000, avg(celsius) \
             FROM temperature WHERE device_id = 'a' AND received_at >= 1763769600000 \
             GROUP BY device_id, received_at / 3600000 * 3600000",
        )
        .unwrap();
        let b = shape(
            "SELECT device_id, received_at / 3600000 * 3600000, max(celsius) \
             FROM temperature WHERE device_id IN ('b', 'c') AND received_at >= 1763856000000 \
             AND received_at < 1763942400000 GROUP BY device_id, received_at / 3600000 * 3600000",
        )
        .unwrap();
        assert_eq!(a.key, b.key);
        assert_eq!(a.def.group_by, vec!["device_id".to_string()]);
        let bucket = a.def.bucket.unwrap();
        assert_eq!(
            (bucket.column.as_str(), bucket.width.as_str()),
            ("received_at", "3600000ms")
        );
        assert_eq!(a.def.aggregates["avg_celsius"], "avg(celsius)");
    }

    #[test]
    fn bounds_narrow_the_bucket_to_what_they_allow() {
        let s = shape("SELECT count(*) FROM t WHERE received_at >= 1763769660000 GROUP BY site")
            .unwrap();
        let bucket = s.def.bucket.unwrap();
        assert_eq!(bucket.width, "60000ms");
        assert_eq!(s.def.group_by, vec!["site".to_string()]);
        // A bound other than >= or < needs the column as a group.
        let s = shape("SELECT sum(x) FROM t WHERE seq > 5").unwrap();
        assert_eq!(s.def.group_by, vec!["seq".to_string()]);
        assert!(s.def.bucket.is_none());
        // So does a bound of 0 on a column that may be negative: bucket 0
        // holds values on both sides of it.
        let s = shape("SELECT sum(x) FROM t WHERE altitude >= 0").unwrap();
        assert_eq!(s.def.group_by, vec!["altitude".to_string()]);
        assert!(s.def.bucket.is_none());
        // With a second bound that would bucket it, no view fits at all.
        assert!(shape("SELECT sum(x) FROM t WHERE altitude >= 0 AND altitude < 500").is_err());
    }

    #[test]
    fn queries_no_view_can_answer_have_no_shape() {
        assert!(shape("SELECT * FROM t").is_err());
        assert!(shape("SELECT celsius FROM t WHERE device_id = 'a'").is_err());
        assert!(shape("SELECT count(*) FROM a JOIN b ON a.x = b.x").is_err());
        assert!(shape("SELECT count(DISTINCT device_id) FROM t").is_err());
        assert!(
            shape("SELECT count(*) FROM t WHERE received_at >= 5 GROUP BY received_at").is_err()
        );
    }
}
