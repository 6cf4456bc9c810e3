//! Small readings of parsed SQL that the query expansion, the catalog and
//! the view router share. Depends on nothing else in the crate, so that
//! imports between those modules run one way.

use sqlparser::ast::{BinaryOperator, Expr, Value};

/// Bounds on `received_at` (inclusive) that every row a query reads from
/// a stream lies within: a tiered stream's cold side then unpacks only
/// the chunks that overlap them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReceivedSpan {
    pub from: Option<i64>,
    pub to: Option<i64>,
}

/// The conjuncts of `expr`: `a AND (b AND c)` is `[a, b, c]`.
pub fn split_and(expr: &Expr) -> Vec<&Expr> {
    match expr {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            let mut parts = split_and(left);
            parts.extend(split_and(right));
            parts
        }
        Expr::Nested(inner) => split_and(inner),
        other => vec![other],
    }
}

/// `expr` without the parentheses around it.
pub fn strip_nested(expr: &Expr) -> &Expr {
    match expr {
        Expr::Nested(inner) => strip_nested(inner),
        other => other,
    }
}

/// `expr` as an integer, if it is an integer literal.
pub fn integer(expr: &Expr) -> Option<i64> {
    match strip_nested(expr) {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse().ok(),
            _ => None,
        },
        _ => None,
    }
}
