//! Timestamp fields are stored as epoch milliseconds, but SQL written for
//! PostgreSQL timestamps compares them with timestamp literals and takes
//! their epoch: Grafana's `$__timeFilter(taken_at)` becomes
//! `taken_at BETWEEN '2026-03-01T10:00:00Z' AND '…'`, its
//! `$__timeGroup(taken_at, '1m')` becomes
//! `floor(extract(epoch from taken_at)/60)*60`, and an analyst writes
//! `received_at >= '2026-03-01 10:00'`. Unchanged, the first compares an
//! integer with text (always false on SQLite, an error on PostgreSQL) and
//! the second is an error on both.
//!
//! [`rewrite`] gives those forms their meaning on the columns the caller
//! names as timestamps: a timestamp literal compared with one becomes its
//! epoch milliseconds, and `extract(epoch from column)` becomes
//! `column / 1000.0` (seconds, as PostgreSQL gives them). Nothing else is
//! touched, so a query that already uses milliseconds runs as it did.

use std::collections::HashSet;
use std::ops::ControlFlow;

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use sqlparser::ast::{
    BinaryOperator, DateTimeField, Expr, Ident, Query, Value, ValueWithSpan, VisitorMut,
};

/// Rewrites `query` in place (see the module docs); true if it changed.
pub fn rewrite(query: &mut Query, timestamps: &HashSet<String>) -> bool {
    let mut rewriter = Rewriter {
        timestamps,
        changed: false,
    };
    let _ = sqlparser::ast::VisitMut::visit(query, &mut rewriter);
    rewriter.changed
}

struct Rewriter<'a> {
    timestamps: &'a HashSet<String>,
    changed: bool,
}

impl VisitorMut for Rewriter<'_> {
    type Break = ();

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        match expr {
            Expr::Extract {
                field: DateTimeField::Epoch,
                expr: inner,
                ..
            } if self.is_timestamp(inner) => {
                let column = std::mem::replace(&mut **inner, Expr::value(Value::Null));
                *expr = Expr::Nested(Box::new(Expr::BinaryOp {
                    left: Box::new(column),
                    op: BinaryOperator::Divide,
                    right: Box::new(Expr::value(Value::Number("1000.0".into(), false))),
                }));
                self.changed = true;
            }
            Expr::BinaryOp { left, op, right } if is_comparison(op) => {
                if self.is_timestamp(left) {
                    self.changed |= to_epoch_ms(right);
                } else if self.is_timestamp(right) {
                    self.changed |= to_epoch_ms(left);
                }
            }
            Expr::Between {
                expr: column,
                low,
                high,
                ..
            } if self.is_timestamp(column) => {
                self.changed |= to_epoch_ms(low);
                self.changed |= to_epoch_ms(high);
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

impl Rewriter<'_> {
    fn is_timestamp(&self, expr: &Expr) -> bool {
        let name = match expr {
            Expr::Identifier(ident) => ident,
            Expr::CompoundIdentifier(parts) => match parts.last() {
                Some(ident) => ident,
                None => return false,
            },
            Expr::Nested(inner) => return self.is_timestamp(inner),
            _ => return false,
        };
        self.timestamps.contains(&folded(name))
    }
}

/// An identifier as the database resolves it: folded to lower case unless
/// quoted.
fn folded(ident: &Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_lowercase(),
    }
}

fn is_comparison(op: &BinaryOperator) -> bool {
    matches!(
        op,
        BinaryOperator::Eq
            | BinaryOperator::NotEq
            | BinaryOperator::Lt
            | BinaryOperator::LtEq
            | BinaryOperator::Gt
            | BinaryOperator::GtEq
    )
}

/// Replaces `expr` by its epoch milliseconds if it is a timestamp literal
/// (`'2026-03-01T10:00:00Z'`, also cast: `'…'::timestamptz`); true if it
/// did.
fn to_epoch_ms(expr: &mut Expr) -> bool {
    let text = match &*expr {
        Expr::Value(ValueWithSpan {
            value: Value::SingleQuotedString(text),
            ..
        }) => text,
        Expr::Cast { expr: inner, .. } => match &**inner {
            Expr::Value(ValueWithSpan {
                value: Value::SingleQuotedString(text),
                ..
            }) => text,
            _ => return false,
        },
        _ => return false,
    };
    let Some(ms) = epoch_ms(text) else {
        return false;
    };
    *expr = Expr::value(Value::Number(ms.to_string(), false));
    true
}

/// A timestamp's epoch milliseconds, as PostgreSQL reads a timestamptz
/// literal in the UTC time zone: RFC 3339, a space for the `T`, an offset
/// as `+00`, `+0000` or `+00:00`, or none (UTC), or a date alone
/// (midnight).
pub fn epoch_ms(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Some(time.timestamp_millis());
    }
    let with_t = text.replacen(' ', "T", 1);
    for format in ["%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M%#z"] {
        if let Ok(time) = DateTime::parse_from_str(&with_t, format) {
            return Some(time.timestamp_millis());
        }
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(time) = NaiveDateTime::parse_from_str(&with_t, format) {
            return Some(time.and_utc().timestamp_millis());
        }
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .map(|time| time.and_utc().timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;

    fn rewritten(sql: &str) -> String {
        let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap();
        let sqlparser::ast::Statement::Query(query) = &mut statements[0] else {
            panic!("not a query");
        };
        let timestamps = ["taken_at".to_string(), "received_at".to_string()].into();
        rewrite(query, &timestamps);
        query.to_string()
    }

    #[test]
    fn grafana_macros_read_milliseconds() {
        // $__timeGroupAlias(taken_at, '1m') and $__timeFilter(taken_at), as
        // Grafana expands them for PostgreSQL.
        assert_eq!(
            rewritten(
                "SELECT floor(extract(epoch from taken_at)/60)*60 AS \"time\", avg(celsius) \
                 FROM temperature WHERE taken_at BETWEEN '2026-03-01T10:00:00Z' AND \
                 '2026-03-01T10:03:00.5Z' GROUP BY 1"
            ),
            "SELECT FLOOR((taken_at / 1000.0) / 60) * 60 AS \"time\", avg(celsius) \
             FROM temperature WHERE taken_at BETWEEN 1772359200000 AND 1772359380500 GROUP BY 1"
        );
    }

    #[test]
    fn comparisons_either_way_and_casts() {
        assert_eq!(
            rewritten(
                "SELECT * FROM t WHERE t.received_at >= '2026-03-01 10:00:00+00'::timestamptz \
                 AND '2026-03-02' > received_at"
            ),
            "SELECT * FROM t WHERE t.received_at >= 1772359200000 AND 1772409600000 > received_at"
        );
    }

    #[test]
    fn other_columns_and_other_text_are_left_alone() {
        for sql in [
            "SELECT * FROM t WHERE label = '2026-03-01T10:00:00Z'",
            "SELECT * FROM t WHERE taken_at = 'yesterday'",
            "SELECT * FROM t WHERE taken_at >= 1772359200000",
            "SELECT EXTRACT(EPOCH FROM other) FROM t",
        ] {
            assert_eq!(rewritten(sql), sql);
        }
    }

    #[test]
    fn literals_read_as_postgresql_reads_them_in_utc() {
        let ten = 1_772_359_200_000;
        for text in [
            "2026-03-01T10:00:00Z",
            "2026-03-01T10:00:00+00:00",
            "2026-03-01 10:00:00+00",
            "2026-03-01 10:00:00+0000",
            "2026-03-01 11:00:00+01",
            "2026-03-01 10:00:00",
            "2026-03-01 10:00",
            "2026-03-01T10:00:00.000Z",
        ] {
            assert_eq!(epoch_ms(text), Some(ten), "{text}");
        }
        assert_eq!(epoch_ms("2026-03-01"), Some(ten - 10 * 3_600_000));
        assert_eq!(epoch_ms("tomorrow"), None);
    }
}
