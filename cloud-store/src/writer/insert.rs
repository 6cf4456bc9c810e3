//! How one commit's rows go into one table, on each backend, and which of
//! them a keyed table stored (a re-sent key is not).
//!
//! - SQLite: multi-row `VALUES` statements of a few sizes ([`chunk_sizes`]),
//!   each prepared once per connection.
//! - PostgreSQL: one `INSERT … SELECT * FROM unnest($1, $2, …)` per table,
//!   each column bound as one array. Its text depends on the columns only,
//!   so it is prepared once whatever the commit's size; the server decodes
//!   a handful of arrays instead of thousands of parameters; and a view's
//!   statement trigger runs once per commit instead of once per chunk.

use std::collections::{HashMap, VecDeque};
use std::future::Future;

use sqlx::{PgConnection, QueryBuilder, Row, SqliteConnection};

use crate::bulk::{bind_row, chunk_sizes};
use crate::catalog::sql_type;
use crate::values::{ColumnKind, SqlValue};

/// Where rows go, and what tells a stored row from a re-sent one.
pub(super) struct InsertInto<'s> {
    /// `INSERT INTO t (columns) `.
    pub head: String,
    /// After the rows: conflict handling (` ON CONFLICT DO NOTHING`).
    pub conflict: &'s str,
    pub kinds: &'s [ColumnKind],
    /// Bound after each row's values: the superseding run, for the
    /// superseded table.
    pub run: Option<i64>,
    /// The table's key, when an insert of a row may be a no-op.
    pub key: Option<&'s KeyColumns>,
}

/// A keyed table's key columns: what `RETURNING` names, and where they are
/// in a row.
pub(super) struct KeyColumns {
    returning: String,
    positions: Vec<usize>,
    kinds: Vec<ColumnKind>,
}

impl KeyColumns {
    /// `names` are the key columns, `columns` and `kinds` the insert's.
    pub fn new(names: &[String], columns: &[String], kinds: &[ColumnKind]) -> KeyColumns {
        let positions: Vec<usize> = names
            .iter()
            .map(|k| {
                columns
                    .iter()
                    .position(|c| c == k)
                    .expect("key columns are insert columns")
            })
            .collect();
        KeyColumns {
            returning: format!(" RETURNING {}", names.join(", ")),
            kinds: positions.iter().map(|&i| kinds[i]).collect(),
            positions,
        }
    }

    pub fn of(&self, values: &[SqlValue]) -> Vec<KeyPart> {
        self.positions
            .iter()
            .map(|&i| KeyPart::of(&values[i]))
            .collect()
    }

    /// Which of `rows` were stored, given the keys an insert of all of
    /// them returned (one per row inserted).
    fn stored<R>(&self, rows: &[&[SqlValue]], returned: &[R]) -> Result<Vec<bool>, sqlx::Error>
    where
        R: Row,
        usize: sqlx::ColumnIndex<R>,
        for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        for<'r> Option<f64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        for<'r> Option<bool>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    {
        // As many back as were sent: every one was stored (no re-send, the
        // usual case), and no key needs matching.
        if returned.len() == rows.len() {
            return Ok(vec![true; rows.len()]);
        }
        let mut stored = vec![false; rows.len()];
        let mut waiting: HashMap<Vec<KeyPart>, VecDeque<usize>> = HashMap::new();
        for (i, values) in rows.iter().enumerate() {
            waiting.entry(self.of(values)).or_default().push_back(i);
        }
        // A key column of a returned row, as `KeyPart::of` reads a value.
        let part = |row: &R, i: usize, kind: ColumnKind| -> Result<KeyPart, sqlx::Error> {
            let part = match kind {
                ColumnKind::Int => row.try_get::<Option<i64>, _>(i)?.map(KeyPart::Int),
                ColumnKind::Bool => row.try_get::<Option<bool>, _>(i)?.map(KeyPart::Bool),
                ColumnKind::Text => row.try_get::<Option<String>, _>(i)?.map(KeyPart::Text),
                ColumnKind::Float => row
                    .try_get::<Option<f64>, _>(i)?
                    .map(|v| KeyPart::of(&SqlValue::Float(v))),
            };
            Ok(part.unwrap_or(KeyPart::Null))
        };
        for row in returned {
            let key = self
                .kinds
                .iter()
                .enumerate()
                .map(|(i, kind)| part(row, i, *kind))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(i) = waiting.get_mut(&key).and_then(VecDeque::pop_front) {
                stored[i] = true;
            }
        }
        Ok(stored)
    }
}

/// One value of a row's key, comparable the way the database's unique
/// index compares it (keys are never floats; see `StreamDef::check`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum KeyPart {
    Null,
    Int(i64),
    Bool(bool),
    Text(String),
    Float(u64),
}

impl KeyPart {
    fn of(value: &SqlValue) -> KeyPart {
        match value {
            SqlValue::Null => KeyPart::Null,
            SqlValue::Int(v) => KeyPart::Int(*v),
            SqlValue::Bool(v) => KeyPart::Bool(*v),
            SqlValue::Text(v) => KeyPart::Text(v.clone()),
            SqlValue::Float(v) => KeyPart::Float(if *v == 0.0 { 0 } else { v.to_bits() }),
        }
    }
}

/// A connection (inside the commit's transaction) that inserts rows.
pub(super) trait InsertRows {
    /// Inserts `rows` (each in `into`'s columns) and returns, per row,
    /// whether it was stored.
    fn insert_rows<'a>(
        &'a mut self,
        into: &'a InsertInto<'a>,
        rows: &'a [&'a [SqlValue]],
    ) -> impl Future<Output = Result<Vec<bool>, sqlx::Error>> + Send + 'a;
}

/// `rows` in statements of [`chunk_sizes`].
pub(super) fn chunks<T>(rows: &[T], columns: usize) -> impl Iterator<Item = &[T]> {
    let mut rest = rows;
    chunk_sizes(rows.len(), columns).into_iter().map(move |n| {
        let (now, later) = rest.split_at(n);
        rest = later;
        now
    })
}

fn width(into: &InsertInto) -> usize {
    into.kinds.len() + usize::from(into.run.is_some())
}

fn values_insert<'a>(
    into: &'a InsertInto<'a>,
    chunk: &'a [&'a [SqlValue]],
) -> QueryBuilder<'a, sqlx::Sqlite> {
    let mut insert = QueryBuilder::new(&into.head);
    insert.push_values(chunk, |mut row, values| {
        bind_row(&mut row, values, into.kinds);
        if let Some(run) = into.run {
            row.push_bind(run);
        }
    });
    insert.push(into.conflict);
    insert
}

impl InsertRows for SqliteConnection {
    async fn insert_rows<'a>(
        &'a mut self,
        into: &'a InsertInto<'a>,
        rows: &'a [&'a [SqlValue]],
    ) -> Result<Vec<bool>, sqlx::Error> {
        let width = width(into);
        let Some(key) = into.key else {
            for chunk in chunks(rows, width) {
                values_insert(into, chunk)
                    .build()
                    .persistent(true)
                    .execute(&mut *self)
                    .await?;
            }
            return Ok(vec![true; rows.len()]);
        };
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // RETURNING cost a quarter of ingest (SQLite buffers the rows, the
        // driver hands each over on its own), and a re-send is rare: insert
        // without it under a savepoint, and only when fewer rows went in
        // than were sent undo that and insert again, returning the stored
        // keys.
        sqlx::query("SAVEPOINT fg_keyed")
            .execute(&mut *self)
            .await?;
        let mut inserted = 0;
        for chunk in chunks(rows, width) {
            let done = values_insert(into, chunk)
                .build()
                .persistent(true)
                .execute(&mut *self)
                .await?;
            inserted += done.rows_affected();
        }
        let all = inserted == rows.len() as u64;
        if !all {
            sqlx::query("ROLLBACK TO fg_keyed")
                .execute(&mut *self)
                .await?;
        }
        sqlx::query("RELEASE fg_keyed").execute(&mut *self).await?;
        if all {
            return Ok(vec![true; rows.len()]);
        }
        let mut stored = Vec::with_capacity(rows.len());
        for chunk in chunks(rows, width) {
            let mut insert = values_insert(into, chunk);
            insert.push(&key.returning);
            let returned = insert
                .build()
                .persistent(true)
                .fetch_all(&mut *self)
                .await?;
            stored.extend(key.stored(chunk, &returned)?);
        }
        Ok(stored)
    }
}

impl InsertRows for PgConnection {
    async fn insert_rows<'a>(
        &'a mut self,
        into: &'a InsertInto<'a>,
        rows: &'a [&'a [SqlValue]],
    ) -> Result<Vec<bool>, sqlx::Error> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let arrays: Vec<String> = into
            .kinds
            .iter()
            .enumerate()
            .map(|(i, kind)| format!("${}::{}[]", i + 1, sql_type(*kind)))
            .collect();
        let run = match into.run {
            Some(_) => format!(", ${}::BIGINT", into.kinds.len() + 1),
            None => String::new(),
        };
        let mut sql = format!(
            "{}SELECT *{run} FROM unnest({}){}",
            into.head,
            arrays.join(", "),
            into.conflict
        );
        if let Some(key) = into.key {
            sql.push_str(&key.returning);
        }
        let mut insert = sqlx::query(&sql);
        for (i, kind) in into.kinds.iter().enumerate() {
            insert = bind_column(insert, rows, i, *kind)?;
        }
        if let Some(run) = into.run {
            insert = insert.bind(run);
        }
        match into.key {
            None => {
                insert.execute(&mut *self).await?;
                Ok(vec![true; rows.len()])
            }
            Some(key) => {
                let returned = insert.fetch_all(&mut *self).await?;
                key.stored(rows, &returned)
            }
        }
    }
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds column `i` of every row as one array of the column's type. A
/// value of another type than its column's is a bug upstream (validation
/// types every value); it fails the commit rather than be stored altered.
fn bind_column<'q>(
    insert: PgQuery<'q>,
    rows: &'q [&'q [SqlValue]],
    i: usize,
    kind: ColumnKind,
) -> Result<PgQuery<'q>, sqlx::Error> {
    fn collect<'v, T>(
        rows: &'v [&'v [SqlValue]],
        i: usize,
        kind: ColumnKind,
        typed: impl Fn(&'v SqlValue) -> Option<T>,
    ) -> Result<Vec<Option<T>>, sqlx::Error> {
        rows.iter()
            .map(|row| match &row[i] {
                SqlValue::Null => Ok(None),
                value => typed(value).map(Some).ok_or_else(|| {
                    sqlx::Error::Protocol(format!(
                        "a {value:?} cannot be written to a {} column",
                        sql_type(kind)
                    ))
                }),
            })
            .collect()
    }
    Ok(match kind {
        ColumnKind::Int => insert.bind(collect(rows, i, kind, |v| match v {
            SqlValue::Int(v) => Some(*v),
            _ => None,
        })?),
        ColumnKind::Float => insert.bind(collect(rows, i, kind, |v| match v {
            SqlValue::Float(v) => Some(*v),
            SqlValue::Int(v) => Some(*v as f64),
            _ => None,
        })?),
        ColumnKind::Bool => insert.bind(collect(rows, i, kind, |v| match v {
            SqlValue::Bool(v) => Some(*v),
            _ => None,
        })?),
        ColumnKind::Text => insert.bind(collect(rows, i, kind, |v| match v {
            SqlValue::Text(v) => Some(v.as_str()),
            _ => None,
        })?),
    })
}
