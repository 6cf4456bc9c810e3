//! Row expressions: the conditions and derivations of transformation rules.
//!
//! Written in SQL's expression syntax (parsed by sqlparser), compiled once
//! against the columns a rule sees, then evaluated per row in Rust — the
//! same meaning on SQLite and PostgreSQL, and a failure names its row
//! instead of aborting a statement. NULL follows SQL: it propagates through
//! operators, and a condition that is NULL does not hold.

use std::cmp::Ordering;

use chrono::{DateTime, Datelike, NaiveDate, Timelike, Utc};
use fleetgate_store::values::SqlValue;
use sqlparser::ast::{
    BinaryOperator, CastKind, DataType, Expr as Ast, Function, FunctionArg, FunctionArgExpr,
    FunctionArguments, UnaryOperator, Value as AstValue,
};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

use crate::schema::{Schema, ValueType};

/// A compiled expression: column names resolved to positions.
#[derive(Debug, Clone)]
pub struct Expr {
    node: Node,
    /// What the expression yields, as far as its parts tell.
    pub ty: Option<ValueType>,
}

#[derive(Debug, Clone)]
enum Node {
    Column(usize),
    Literal(SqlValue),
    Not(Box<Node>),
    Negate(Box<Node>),
    Binary(BinaryOperator, Box<Node>, Box<Node>),
    IsNull(Box<Node>, bool),
    InList(Box<Node>, Vec<Node>, bool),
    Between(Box<Node>, Box<Node>, Box<Node>, bool),
    Like(Box<Node>, String, bool),
    Case {
        operand: Option<Box<Node>>,
        branches: Vec<(Node, Node)>,
        otherwise: Option<Box<Node>>,
    },
    Cast(Box<Node>, ValueType),
    Call(Func, Vec<Node>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Func {
    Lower,
    Upper,
    Trim,
    Length,
    Concat,
    Coalesce,
    Substr,
    Round,
    Abs,
    Year,
    Month,
    Day,
    Hour,
    Date,
    Age,
}

impl Func {
    fn named(name: &str) -> Option<(Func, std::ops::RangeInclusive<usize>)> {
        Some(match name {
            "lower" => (Func::Lower, 1..=1),
            "upper" => (Func::Upper, 1..=1),
            "trim" => (Func::Trim, 1..=1),
            "length" => (Func::Length, 1..=1),
            "concat" => (Func::Concat, 1..=usize::MAX),
            "coalesce" => (Func::Coalesce, 1..=usize::MAX),
            "substr" | "substring" => (Func::Substr, 2..=3),
            "round" => (Func::Round, 1..=2),
            "abs" => (Func::Abs, 1..=1),
            "year" => (Func::Year, 1..=1),
            "month" => (Func::Month, 1..=1),
            "day" => (Func::Day, 1..=1),
            "hour" => (Func::Hour, 1..=1),
            "date" => (Func::Date, 1..=1),
            "age" => (Func::Age, 2..=2),
            _ => return None,
        })
    }
}

const FUNCTIONS: &str = "lower, upper, trim, length, concat, coalesce, substr, round, abs, \
                         year, month, day, hour, date, age(born, at)";

impl Expr {
    /// Parses `text` and resolves its columns against `schema`.
    pub fn compile(text: &str, schema: &Schema) -> Result<Expr, String> {
        let ast = Parser::new(&GenericDialect {})
            .try_with_sql(text)
            .and_then(|mut p| p.parse_expr())
            .map_err(|e| format!("cannot parse expression {text:?}: {e}"))?;
        let node = compile(&ast, schema).map_err(|e| format!("in {text:?}: {e}"))?;
        let ty = type_of(&node, schema);
        Ok(Expr { node, ty })
    }

    pub fn eval(&self, row: &[SqlValue]) -> Result<SqlValue, String> {
        eval(&self.node, row)
    }

    /// A condition: true holds; false and NULL do not.
    pub fn holds(&self, row: &[SqlValue]) -> Result<bool, String> {
        match self.eval(row)? {
            SqlValue::Bool(b) => Ok(b),
            SqlValue::Null => Ok(false),
            other => Err(format!("condition gave {other:?}, not true or false")),
        }
    }
}

fn compile(ast: &Ast, schema: &Schema) -> Result<Node, String> {
    let sub = |e: &Ast| compile(e, schema).map(Box::new);
    Ok(match ast {
        Ast::Identifier(ident) => Node::Column(schema.require(&ident.value)?),
        Ast::CompoundIdentifier(parts) => {
            let name: Vec<&str> = parts.iter().map(|p| p.value.as_str()).collect();
            return Err(format!(
                "{:?}: name columns without a qualifier",
                name.join(".")
            ));
        }
        Ast::Value(value) => Node::Literal(literal(&value.value)?),
        Ast::Nested(inner) => compile(inner, schema)?,
        Ast::UnaryOp { op, expr } => match op {
            UnaryOperator::Not => Node::Not(sub(expr)?),
            UnaryOperator::Minus => Node::Negate(sub(expr)?),
            UnaryOperator::Plus => compile(expr, schema)?,
            other => return Err(format!("operator {other} is not supported")),
        },
        Ast::BinaryOp { left, op, right } => {
            use BinaryOperator::*;
            if !matches!(
                op,
                Plus | Minus
                    | Multiply
                    | Divide
                    | Modulo
                    | StringConcat
                    | Gt
                    | Lt
                    | GtEq
                    | LtEq
                    | Eq
                    | NotEq
                    | And
                    | Or
            ) {
                return Err(format!("operator {op} is not supported"));
            }
            Node::Binary(op.clone(), sub(left)?, sub(right)?)
        }
        Ast::IsNull(e) => Node::IsNull(sub(e)?, true),
        Ast::IsNotNull(e) => Node::IsNull(sub(e)?, false),
        Ast::InList {
            expr,
            list,
            negated,
        } => Node::InList(
            sub(expr)?,
            list.iter()
                .map(|e| compile(e, schema))
                .collect::<Result<_, _>>()?,
            *negated,
        ),
        Ast::Between {
            expr,
            negated,
            low,
            high,
        } => Node::Between(sub(expr)?, sub(low)?, sub(high)?, *negated),
        Ast::Like {
            negated,
            expr,
            pattern,
            escape_char: None,
            any: false,
        } => match pattern.as_ref() {
            Ast::Value(v) => match &v.value {
                AstValue::SingleQuotedString(p) => Node::Like(sub(expr)?, p.clone(), *negated),
                _ => return Err("LIKE takes a quoted pattern".into()),
            },
            _ => return Err("LIKE takes a quoted pattern".into()),
        },
        Ast::Case {
            operand,
            conditions,
            else_result,
            ..
        } => Node::Case {
            operand: operand.as_deref().map(sub).transpose()?,
            branches: conditions
                .iter()
                .map(|w| Ok((compile(&w.condition, schema)?, compile(&w.result, schema)?)))
                .collect::<Result<_, String>>()?,
            otherwise: else_result.as_deref().map(sub).transpose()?,
        },
        Ast::Cast {
            kind: CastKind::Cast | CastKind::DoubleColon,
            expr,
            data_type,
            ..
        } => Node::Cast(sub(expr)?, cast_type(data_type)?),
        Ast::Function(function) => call(function, schema)?,
        other => return Err(format!("{other} is not supported in a rule expression")),
    })
}

fn literal(value: &AstValue) -> Result<SqlValue, String> {
    Ok(match value {
        AstValue::Number(text, _) => match text.parse::<i64>() {
            Ok(i) => SqlValue::Int(i),
            Err(_) => SqlValue::Float(
                text.parse::<f64>()
                    .map_err(|_| format!("{text:?} is not a number"))?,
            ),
        },
        AstValue::SingleQuotedString(s) => SqlValue::Text(s.clone()),
        AstValue::Boolean(b) => SqlValue::Bool(*b),
        AstValue::Null => SqlValue::Null,
        other => return Err(format!("literal {other} is not supported")),
    })
}

fn cast_type(data_type: &DataType) -> Result<ValueType, String> {
    let name = data_type.to_string().to_ascii_lowercase();
    Ok(match name.as_str() {
        "int" | "integer" | "bigint" => ValueType::Int,
        "float" | "real" | "double" | "double precision" => ValueType::Float,
        "text" | "varchar" | "string" => ValueType::Text,
        "bool" | "boolean" => ValueType::Bool,
        "timestamp" => ValueType::Timestamp,
        other => return Err(format!("cannot cast to {other}")),
    })
}

fn call(function: &Function, schema: &Schema) -> Result<Node, String> {
    let name = function.name.to_string().to_ascii_lowercase();
    let (func, arity) = Func::named(&name)
        .ok_or_else(|| format!("unknown function {name}() (there are: {FUNCTIONS})"))?;
    let FunctionArguments::List(list) = &function.args else {
        return Err(format!("{name}() takes arguments in parentheses"));
    };
    let args = list
        .args
        .iter()
        .map(|arg| match arg {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => compile(e, schema),
            other => Err(format!("argument {other} of {name}() is not supported")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !arity.contains(&args.len()) {
        return Err(format!("{name}() does not take {} arguments", args.len()));
    }
    Ok(Node::Call(func, args))
}

/// The static type of an expression, where it is evident.
fn type_of(node: &Node, schema: &Schema) -> Option<ValueType> {
    use BinaryOperator::*;
    Some(match node {
        Node::Column(i) => schema.type_at(*i),
        Node::Literal(SqlValue::Int(_)) => ValueType::Int,
        Node::Literal(SqlValue::Float(_)) => ValueType::Float,
        Node::Literal(SqlValue::Text(_)) => ValueType::Text,
        Node::Literal(SqlValue::Bool(_)) => ValueType::Bool,
        Node::Literal(SqlValue::Null) => return None,
        Node::Negate(e) => type_of(e, schema)?,
        Node::Binary(op, l, r) => match op {
            Plus | Minus | Multiply | Modulo => match (type_of(l, schema)?, type_of(r, schema)?) {
                (ValueType::Float, _) | (_, ValueType::Float) => ValueType::Float,
                _ => ValueType::Int,
            },
            Divide => ValueType::Float,
            StringConcat => ValueType::Text,
            _ => ValueType::Bool,
        },
        Node::Not(_) | Node::IsNull(..) | Node::InList(..) | Node::Between(..) | Node::Like(..) => {
            ValueType::Bool
        }
        Node::Case {
            branches,
            otherwise,
            ..
        } => branches
            .first()
            .and_then(|(_, then)| type_of(then, schema))
            .or_else(|| otherwise.as_deref().and_then(|e| type_of(e, schema)))?,
        Node::Cast(_, ty) => *ty,
        Node::Call(func, args) => match func {
            Func::Lower | Func::Upper | Func::Trim | Func::Concat | Func::Substr => ValueType::Text,
            Func::Length | Func::Year | Func::Month | Func::Day | Func::Hour | Func::Age => {
                ValueType::Int
            }
            Func::Date => ValueType::Timestamp,
            Func::Round | Func::Abs | Func::Coalesce => type_of(args.first()?, schema)?,
        },
    })
}

fn eval(node: &Node, row: &[SqlValue]) -> Result<SqlValue, String> {
    Ok(match node {
        Node::Column(i) => row[*i].clone(),
        Node::Literal(v) => v.clone(),
        Node::Not(e) => match eval(e, row)? {
            SqlValue::Bool(b) => SqlValue::Bool(!b),
            SqlValue::Null => SqlValue::Null,
            other => return Err(format!("NOT of {}", show(&other))),
        },
        Node::Negate(e) => match eval(e, row)? {
            SqlValue::Int(i) => SqlValue::Int(-i),
            SqlValue::Float(f) => SqlValue::Float(-f),
            SqlValue::Null => SqlValue::Null,
            other => return Err(format!("cannot negate {}", show(&other))),
        },
        Node::Binary(op, l, r) => binary(op, eval(l, row)?, || eval(r, row))?,
        Node::IsNull(e, is) => SqlValue::Bool((eval(e, row)? == SqlValue::Null) == *is),
        Node::InList(e, list, negated) => {
            let value = eval(e, row)?;
            if value == SqlValue::Null {
                return Ok(SqlValue::Null);
            }
            let mut found = false;
            for item in list {
                if compare(&value, &eval(item, row)?)? == Some(Ordering::Equal) {
                    found = true;
                    break;
                }
            }
            SqlValue::Bool(found != *negated)
        }
        Node::Between(e, low, high, negated) => {
            let value = eval(e, row)?;
            let above = compare(&value, &eval(low, row)?)?;
            let below = compare(&value, &eval(high, row)?)?;
            match (above, below) {
                (Some(a), Some(b)) => SqlValue::Bool((a.is_ge() && b.is_le()) != *negated),
                _ => SqlValue::Null,
            }
        }
        Node::Like(e, pattern, negated) => match eval(e, row)? {
            SqlValue::Text(text) => SqlValue::Bool(like(&text, pattern) != *negated),
            SqlValue::Null => SqlValue::Null,
            other => return Err(format!("LIKE on {}", show(&other))),
        },
        Node::Case {
            operand,
            branches,
            otherwise,
        } => {
            let subject = operand.as_deref().map(|o| eval(o, row)).transpose()?;
            for (when, then) in branches {
                let hit = match &subject {
                    Some(s) => compare(s, &eval(when, row)?)? == Some(Ordering::Equal),
                    None => eval(when, row)? == SqlValue::Bool(true),
                };
                if hit {
                    return eval(then, row);
                }
            }
            match otherwise {
                Some(e) => eval(e, row)?,
                None => SqlValue::Null,
            }
        }
        Node::Cast(e, ty) => ty.coerce(eval(e, row)?)?,
        Node::Call(func, args) => {
            let values = args
                .iter()
                .map(|a| eval(a, row))
                .collect::<Result<Vec<_>, _>>()?;
            apply(*func, values)?
        }
    })
}

fn show(value: &SqlValue) -> String {
    match value {
        SqlValue::Null => "NULL".into(),
        SqlValue::Int(i) => i.to_string(),
        SqlValue::Float(f) => f.to_string(),
        SqlValue::Bool(b) => b.to_string(),
        SqlValue::Text(t) => format!("{t:?}"),
    }
}

/// Orders two values the way SQL compares them; `None` when either is NULL.
pub fn compare(a: &SqlValue, b: &SqlValue) -> Result<Option<Ordering>, String> {
    Ok(Some(match (a, b) {
        (SqlValue::Null, _) | (_, SqlValue::Null) => return Ok(None),
        (SqlValue::Int(x), SqlValue::Int(y)) => x.cmp(y),
        (SqlValue::Text(x), SqlValue::Text(y)) => x.cmp(y),
        (SqlValue::Bool(x), SqlValue::Bool(y)) => x.cmp(y),
        (x, y) => match (number(x), number(y)) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            _ => return Err(format!("cannot compare {} with {}", show(a), show(b))),
        },
    }))
}

fn number(value: &SqlValue) -> Option<f64> {
    match value {
        SqlValue::Int(i) => Some(*i as f64),
        SqlValue::Float(f) => Some(*f),
        _ => None,
    }
}

fn binary(
    op: &BinaryOperator,
    left: SqlValue,
    right: impl FnOnce() -> Result<SqlValue, String>,
) -> Result<SqlValue, String> {
    use BinaryOperator::*;
    // AND and OR look at the right side only when the left does not decide.
    match (op, &left) {
        (And, SqlValue::Bool(false)) => return Ok(SqlValue::Bool(false)),
        (Or, SqlValue::Bool(true)) => return Ok(SqlValue::Bool(true)),
        _ => {}
    }
    let right = right()?;
    Ok(match op {
        And | Or => match (&left, &right) {
            (SqlValue::Bool(_) | SqlValue::Null, SqlValue::Bool(r)) => {
                if (*op == And) != *r {
                    SqlValue::Bool(*r)
                } else {
                    left
                }
            }
            (SqlValue::Bool(_) | SqlValue::Null, SqlValue::Null) => SqlValue::Null,
            _ => return Err(format!("{op} of {} and {}", show(&left), show(&right))),
        },
        Eq | NotEq | Gt | Lt | GtEq | LtEq => match compare(&left, &right)? {
            None => SqlValue::Null,
            Some(o) => SqlValue::Bool(match op {
                Eq => o.is_eq(),
                NotEq => o.is_ne(),
                Gt => o.is_gt(),
                Lt => o.is_lt(),
                GtEq => o.is_ge(),
                _ => o.is_le(),
            }),
        },
        StringConcat => match (&left, &right) {
            (SqlValue::Null, _) | (_, SqlValue::Null) => SqlValue::Null,
            _ => SqlValue::Text(format!("{}{}", text(&left), text(&right))),
        },
        _ => arithmetic(op, &left, &right)?,
    })
}

fn arithmetic(op: &BinaryOperator, left: &SqlValue, right: &SqlValue) -> Result<SqlValue, String> {
    use BinaryOperator::*;
    if let (SqlValue::Null, _) | (_, SqlValue::Null) = (left, right) {
        return Ok(SqlValue::Null);
    }
    let fails = || format!("{} {op} {}", show(left), show(right));
    if let (SqlValue::Int(x), SqlValue::Int(y), false) = (left, right, *op == Divide) {
        return match op {
            Plus => x.checked_add(*y),
            Minus => x.checked_sub(*y),
            Multiply => x.checked_mul(*y),
            _ => x.checked_rem(*y),
        }
        .map(SqlValue::Int)
        .ok_or_else(|| format!("{} overflows or divides by zero", fails()));
    }
    let (Some(x), Some(y)) = (number(left), number(right)) else {
        return Err(format!("cannot compute {}", fails()));
    };
    if matches!(op, Divide | Modulo) && y == 0.0 {
        return Err(format!("{} divides by zero", fails()));
    }
    Ok(SqlValue::Float(match op {
        Plus => x + y,
        Minus => x - y,
        Multiply => x * y,
        Divide => x / y,
        _ => x % y,
    }))
}

/// The text form of a value, as concat() and code translation see it.
pub fn text(value: &SqlValue) -> String {
    match value {
        SqlValue::Text(t) => t.clone(),
        SqlValue::Null => String::new(),
        other => show(other),
    }
}

fn like(text: &str, pattern: &str) -> bool {
    fn matches(t: &[char], p: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('%', rest)) => (0..=t.len()).any(|i| matches(&t[i..], rest)),
            Some(('_', rest)) => !t.is_empty() && matches(&t[1..], rest),
            Some((c, rest)) => t.first() == Some(c) && matches(&t[1..], rest),
        }
    }
    let t: Vec<char> = text.chars().collect();
    let p: Vec<char> = pattern.chars().collect();
    matches(&t, &p)
}

fn timestamp(value: &SqlValue, func: &str) -> Result<DateTime<Utc>, String> {
    let SqlValue::Int(ms) = value else {
        return Err(format!("{func}() takes a timestamp, not {}", show(value)));
    };
    DateTime::from_timestamp_millis(*ms).ok_or_else(|| format!("{ms} is out of range"))
}

fn apply(func: Func, args: Vec<SqlValue>) -> Result<SqlValue, String> {
    if func == Func::Coalesce {
        return Ok(args
            .into_iter()
            .find(|v| *v != SqlValue::Null)
            .unwrap_or(SqlValue::Null));
    }
    if func == Func::Concat {
        return Ok(SqlValue::Text(args.iter().map(text).collect()));
    }
    if args.contains(&SqlValue::Null) {
        return Ok(SqlValue::Null);
    }
    let text_arg = |name: &str| match &args[0] {
        SqlValue::Text(t) => Ok(t.as_str()),
        other => Err(format!("{name}() takes text, not {}", show(other))),
    };
    let int_arg = |i: usize, name: &str| match &args[i] {
        SqlValue::Int(v) => Ok(*v),
        other => Err(format!("{name}() takes an integer, not {}", show(other))),
    };
    Ok(match func {
        Func::Lower => SqlValue::Text(text_arg("lower")?.to_lowercase()),
        Func::Upper => SqlValue::Text(text_arg("upper")?.to_uppercase()),
        Func::Trim => SqlValue::Text(text_arg("trim")?.trim().to_string()),
        Func::Length => SqlValue::Int(text_arg("length")?.chars().count() as i64),
        Func::Substr => {
            let chars = text_arg("substr")?.chars();
            // SQL counts from 1.
            let start = (int_arg(1, "substr")? - 1).max(0) as usize;
            let taken: String = match args.get(2) {
                Some(_) => chars
                    .skip(start)
                    .take(int_arg(2, "substr")?.max(0) as usize)
                    .collect(),
                None => chars.skip(start).collect(),
            };
            SqlValue::Text(taken)
        }
        Func::Round => {
            let digits = if args.len() == 2 {
                int_arg(1, "round")?
            } else {
                0
            };
            match &args[0] {
                SqlValue::Int(i) => SqlValue::Int(*i),
                SqlValue::Float(f) => {
                    let scale = 10f64.powi(digits as i32);
                    SqlValue::Float((f * scale).round() / scale)
                }
                other => return Err(format!("round() of {}", show(other))),
            }
        }
        Func::Abs => match &args[0] {
            SqlValue::Int(i) => SqlValue::Int(i.abs()),
            SqlValue::Float(f) => SqlValue::Float(f.abs()),
            other => return Err(format!("abs() of {}", show(other))),
        },
        Func::Year => SqlValue::Int(timestamp(&args[0], "year")?.year() as i64),
        Func::Month => SqlValue::Int(timestamp(&args[0], "month")?.month() as i64),
        Func::Day => SqlValue::Int(timestamp(&args[0], "day")?.day() as i64),
        Func::Hour => SqlValue::Int(timestamp(&args[0], "hour")?.hour() as i64),
        Func::Date => {
            let t = timestamp(&args[0], "date")?;
            SqlValue::Int(
                t.date_naive()
                    .and_hms_opt(0, 0, 0)
                    .expect("midnight exists")
                    .and_utc()
                    .timestamp_millis(),
            )
        }
        Func::Age => {
            let born = timestamp(&args[0], "age")?.date_naive();
            let at = timestamp(&args[1], "age")?.date_naive();
            SqlValue::Int(full_years(born, at))
        }
        Func::Coalesce | Func::Concat => unreachable!("handled above"),
    })
}

/// Completed years from `born` to `at`: birthdays count on the day.
fn full_years(born: NaiveDate, at: NaiveDate) -> i64 {
    let mut years = (at.year() - born.year()) as i64;
    if (at.month(), at.day()) < (born.month(), born.day()) {
        years -= 1;
    }
    years
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        Schema::from_pairs([
            ("status", ValueType::Text),
            ("amount", ValueType::Float),
            ("qty", ValueType::Int),
            ("born", ValueType::Timestamp),
            ("at", ValueType::Timestamp),
        ])
    }

    fn row() -> Vec<SqlValue> {
        let ms = |t: &str| ValueType::Timestamp.parse_text(t).unwrap();
        vec![
            SqlValue::Text("test".into()),
            SqlValue::Float(12.5),
            SqlValue::Int(3),
            ms("1990-06-15"),
            ms("2026-06-14T10:00:00Z"),
        ]
    }

    fn eval_text(text: &str) -> Result<SqlValue, String> {
        Expr::compile(text, &schema())?.eval(&row())
    }

    #[test]
    fn evaluates_conditions_and_arithmetic_as_sql_does() {
        assert_eq!(
            eval_text("status = 'test' AND qty > 2"),
            Ok(SqlValue::Bool(true))
        );
        assert_eq!(eval_text("amount * qty"), Ok(SqlValue::Float(37.5)));
        assert_eq!(eval_text("qty + 1"), Ok(SqlValue::Int(4)));
        assert_eq!(eval_text("qty IN (1, 2)"), Ok(SqlValue::Bool(false)));
        assert_eq!(eval_text("NULL = 1"), Ok(SqlValue::Null));
        assert_eq!(eval_text("NULL AND false"), Ok(SqlValue::Bool(false)));
        assert_eq!(eval_text("NULL OR true"), Ok(SqlValue::Bool(true)));
        assert_eq!(eval_text("status LIKE 't%t'"), Ok(SqlValue::Bool(true)));
        assert_eq!(
            eval_text("CASE WHEN amount > 10 THEN 'big' ELSE 'small' END"),
            Ok(SqlValue::Text("big".into()))
        );
        assert_eq!(
            eval_text("upper(status) || '-' || qty"),
            Ok(SqlValue::Text("TEST-3".into()))
        );
        let condition = Expr::compile("amount > 100 OR NULL", &schema()).unwrap();
        assert!(!condition.holds(&row()).unwrap());
    }

    #[test]
    fn age_counts_completed_years() {
        // One day before the 36th birthday.
        assert_eq!(eval_text("age(born, at)"), Ok(SqlValue::Int(35)));
        assert_eq!(eval_text("year(at)"), Ok(SqlValue::Int(2026)));
    }

    #[test]
    fn names_what_is_wrong() {
        let unknown = Expr::compile("colour = 'red'", &schema()).unwrap_err();
        assert!(unknown.contains("no column \"colour\""), "{unknown}");
        let function = Expr::compile("shout(status)", &schema()).unwrap_err();
        assert!(function.contains("unknown function shout()"), "{function}");
        assert!(Expr::compile("status = ", &schema()).is_err());
        let mismatch = eval_text("status > 3").unwrap_err();
        assert!(mismatch.contains("cannot compare"), "{mismatch}");
        assert!(eval_text("qty / 0")
            .unwrap_err()
            .contains("divides by zero"));
    }
}
