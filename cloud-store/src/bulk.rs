//! Multi-row INSERTs: how many rows go in one statement, and how a typed
//! value is bound. Shared by group commit and batch loads, so both write
//! values the same way.

use sqlx::query_builder::Separated;
use sqlx::{Database, Encode, Type};

use crate::values::{ColumnKind, SqlValue};

/// SQLite allows 32766 parameters per statement, PostgreSQL 65535.
const MAX_PARAMS: usize = 30_000;
const MAX_ROWS_PER_STATEMENT: usize = 512;

/// Splits `n` rows into statement sizes drawn from a few powers of two, so
/// each connection prepares a handful of statements and reuses them.
pub fn chunk_sizes(mut n: usize, columns: usize) -> Vec<usize> {
    let limit = (MAX_PARAMS / columns.max(1)).clamp(1, MAX_ROWS_PER_STATEMENT);
    let top = 1usize << (usize::BITS - 1 - limit.leading_zeros());
    let mut sizes = Vec::new();
    while n >= top {
        sizes.push(top);
        n -= top;
    }
    let mut bit = top >> 1;
    while bit > 0 {
        if n & bit != 0 {
            sizes.push(bit);
        }
        bit >>= 1;
    }
    sizes
}

/// Binds one row's values; `kinds` gives each NULL its column's type.
pub fn bind_row<'args, DB>(
    row: &mut Separated<'_, 'args, DB, &'static str>,
    values: &'args [SqlValue],
    kinds: &[ColumnKind],
) where
    DB: Database,
    i64: Encode<'args, DB> + Type<DB>,
    f64: Encode<'args, DB> + Type<DB>,
    bool: Encode<'args, DB> + Type<DB>,
    &'args str: Encode<'args, DB> + Type<DB>,
    Option<i64>: Encode<'args, DB> + Type<DB>,
    Option<f64>: Encode<'args, DB> + Type<DB>,
    Option<bool>: Encode<'args, DB> + Type<DB>,
    Option<&'args str>: Encode<'args, DB> + Type<DB>,
{
    for (value, kind) in values.iter().zip(kinds) {
        match (value, kind) {
            (SqlValue::Int(v), _) => row.push_bind(*v),
            (SqlValue::Float(v), _) => row.push_bind(*v),
            (SqlValue::Bool(v), _) => row.push_bind(*v),
            (SqlValue::Text(v), _) => row.push_bind(v.as_str()),
            (SqlValue::Null, ColumnKind::Int) => row.push_bind(None::<i64>),
            (SqlValue::Null, ColumnKind::Float) => row.push_bind(None::<f64>),
            (SqlValue::Null, ColumnKind::Bool) => row.push_bind(None::<bool>),
            (SqlValue::Null, ColumnKind::Text) => row.push_bind(None::<&str>),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_row_with_few_distinct_sizes() {
        for n in [0, 1, 7, 512, 513, 1000, 20_000] {
            let sizes = chunk_sizes(n, 8);
            assert_eq!(sizes.iter().sum::<usize>(), n);
            assert!(sizes.iter().all(|s| s.is_power_of_two() && *s <= 512));
        }
        // Wide rows get smaller statements to stay under the parameter limit.
        assert!(chunk_sizes(10_000, 200).iter().all(|s| s * 200 <= 30_000));
    }
}
