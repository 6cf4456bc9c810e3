//! The values a stream's columns hold, as the rest of the crate passes
//! them around. Depends on nothing else in the crate, so that the catalog,
//! the pipeline and the views can all use it without importing each other.

use fleetgate_protocol::schema::{FieldDef, FieldType};
use serde_json::Value;

/// The SQL type a stream column is stored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    Int,
    Float,
    Bool,
    Text,
}

impl From<FieldType> for ColumnKind {
    fn from(ty: FieldType) -> Self {
        match ty {
            FieldType::Int | FieldType::Timestamp => ColumnKind::Int,
            FieldType::Float => ColumnKind::Float,
            FieldType::Bool => ColumnKind::Bool,
            FieldType::String | FieldType::Enum => ColumnKind::Text,
        }
    }
}

impl ColumnKind {
    pub(crate) fn of_field(def: &FieldDef) -> ColumnKind {
        if def.code {
            ColumnKind::Int
        } else {
            ColumnKind::from(def.ty)
        }
    }
}

/// A typed value bound into an INSERT.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
}

impl SqlValue {
    pub fn to_json(&self) -> Value {
        match self {
            SqlValue::Null => Value::Null,
            SqlValue::Int(v) => Value::from(*v),
            SqlValue::Float(v) => Value::from(*v),
            SqlValue::Bool(v) => Value::from(*v),
            SqlValue::Text(v) => Value::from(v.as_str()),
        }
    }

    /// A value [`Self::to_json`] wrote, read back as a column of `kind`
    /// holds it; anything else is NULL.
    pub fn from_json(kind: ColumnKind, value: &Value) -> SqlValue {
        let converted = match kind {
            ColumnKind::Int => value.as_i64().map(SqlValue::Int),
            ColumnKind::Float => value.as_f64().map(SqlValue::Float),
            ColumnKind::Bool => value.as_bool().map(SqlValue::Bool),
            ColumnKind::Text => value.as_str().map(|t| SqlValue::Text(t.to_string())),
        };
        converted.unwrap_or(SqlValue::Null)
    }
}
