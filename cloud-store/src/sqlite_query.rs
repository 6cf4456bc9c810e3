//! Runs a query on a SQLite read connection through libsqlite3 itself,
//! rather than sqlx's row stream (with [`crate::sqlite_functions`] and
//! [`crate::sqlite_limits`], the store's only `unsafe` code).
//!
//! Why: sqlx copies every value of every row (`sqlite3_value_dup`) before
//! the caller sees it, and does not check that the copy succeeded, so a
//! query that meets its memory budget there would abort the process.
//! Here each value is read where SQLite holds it, its size is known before
//! anything is copied, and a refused allocation is an ordinary error.
//!
//! Values convert as [`crate::query::sqlite_value`] does for sqlx rows:
//! integers (booleans where the column is declared BOOLEAN), reals, text,
//! and blobs as (lossy) text.

use std::ffi::{c_int, CStr};
use std::ptr;

use libsqlite3_sys as ffi;
use serde_json::Value;
use sqlx::sqlite::LockedSqliteHandle;

use crate::query::{value_bytes, QueryError, VALUE_BYTES};
use crate::row_stream::{Batcher, Chunk};

/// A prepared statement, finalized when dropped.
struct Statement(*mut ffi::sqlite3_stmt);

impl Drop for Statement {
    fn drop(&mut self) {
        // SAFETY: the statement came from sqlite3_prepare_v2 and is
        // finalized once, here.
        unsafe {
            ffi::sqlite3_finalize(self.0);
        }
    }
}

/// The connection's last error, as [`crate::query::run`] maps messages.
///
/// SAFETY: `db` is an open connection handle.
unsafe fn error(db: *mut ffi::sqlite3) -> QueryError {
    let message = ffi::sqlite3_errmsg(db);
    if message.is_null() {
        return QueryError::Database("out of memory".into());
    }
    QueryError::Database(CStr::from_ptr(message).to_string_lossy().into_owned())
}

/// Runs `sql` (one checked statement) on the locked connection `handle`,
/// handing `send` its columns, its rows in batches and its end
/// ([`crate::row_stream`]): at most `max_rows` rows and `max_bytes` of
/// them, counted as [`crate::query::QueryLimits::max_bytes`] says. The
/// caller sets the connection's limits, deadline and the thread's memory
/// budget; an error from `send` stops the query.
pub(crate) fn read(
    handle: &mut LockedSqliteHandle<'_>,
    sql: &str,
    max_rows: usize,
    max_bytes: usize,
    send: &mut dyn FnMut(Chunk) -> Result<(), QueryError>,
) -> Result<(), QueryError> {
    let db = handle.as_raw_handle().as_ptr();
    let length = c_int::try_from(sql.len())
        .map_err(|_| QueryError::Database("statement too long".into()))?;
    let mut raw = ptr::null_mut();
    // SAFETY: `db` is this connection's handle, locked by `handle` for as
    // long as it lives (the statement is finalized before it is dropped);
    // `sql` is valid for `length` bytes.
    let rc = unsafe {
        ffi::sqlite3_prepare_v2(db, sql.as_ptr().cast(), length, &mut raw, ptr::null_mut())
    };
    if rc != ffi::SQLITE_OK {
        // SAFETY: as above.
        return Err(unsafe { error(db) });
    }
    if raw.is_null() {
        // Nothing but comments.
        send(Chunk::Columns(Vec::new()))?;
        return send(Chunk::End { truncated: false });
    }
    let statement = Statement(raw);
    let stmt = statement.0;
    // SAFETY (every call below): `stmt` is a live prepared statement of
    // `db`, column indexes are below its column count, and text or blob
    // pointers are read only before the next step or conversion, for the
    // length SQLite gives for them.
    let count = unsafe { ffi::sqlite3_column_count(stmt) }.max(0);
    let mut columns = Vec::with_capacity(count as usize);
    let mut booleans = Vec::with_capacity(count as usize);
    for i in 0..count {
        let name = unsafe { ffi::sqlite3_column_name(stmt, i) };
        if name.is_null() {
            return Err(QueryError::Database("out of memory".into()));
        }
        columns.push(
            unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned(),
        );
        // A column read straight from a table keeps its declared type:
        // BOOLEAN columns hold 0 and 1.
        let declared = unsafe { ffi::sqlite3_column_decltype(stmt, i) };
        booleans.push(
            !declared.is_null() && {
                let declared = unsafe { CStr::from_ptr(declared) }.to_bytes();
                declared.eq_ignore_ascii_case(b"boolean") || declared.eq_ignore_ascii_case(b"bool")
            },
        );
    }
    send(Chunk::Columns(columns))?;
    let mut batcher = Batcher::default();
    let (mut sent, mut bytes, mut truncated) = (0usize, 0usize, false);
    loop {
        match unsafe { ffi::sqlite3_step(stmt) } {
            ffi::SQLITE_ROW => {}
            ffi::SQLITE_DONE => break,
            _ => return Err(unsafe { error(db) }),
        }
        if sent == max_rows {
            truncated = true;
            break;
        }
        let row_start = bytes;
        bytes += std::mem::size_of::<Vec<Value>>();
        let mut values = Vec::with_capacity(count as usize);
        for i in 0..count {
            let value = match unsafe { ffi::sqlite3_column_type(stmt, i) } {
                ffi::SQLITE_INTEGER => {
                    let n = unsafe { ffi::sqlite3_column_int64(stmt, i) };
                    if booleans[i as usize] {
                        Value::Bool(n != 0)
                    } else {
                        Value::from(n)
                    }
                }
                ffi::SQLITE_FLOAT => Value::from(unsafe { ffi::sqlite3_column_double(stmt, i) }),
                kind @ (ffi::SQLITE_TEXT | ffi::SQLITE_BLOB) => {
                    // The pointer first, then the length: the order SQLite
                    // asks for.
                    let data: *const u8 = if kind == ffi::SQLITE_TEXT {
                        unsafe { ffi::sqlite3_column_text(stmt, i) }
                    } else {
                        unsafe { ffi::sqlite3_column_blob(stmt, i) }.cast()
                    };
                    let len = unsafe { ffi::sqlite3_column_bytes(stmt, i) }.max(0) as usize;
                    if len > 0 && data.is_null() {
                        return Err(QueryError::Database("out of memory".into()));
                    }
                    // Refused before it is copied.
                    if bytes.saturating_add(VALUE_BYTES + len) > max_bytes {
                        return Err(QueryError::ResultTooLarge(max_bytes));
                    }
                    let data = if len == 0 {
                        &[][..]
                    } else {
                        unsafe { std::slice::from_raw_parts(data, len) }
                    };
                    Value::String(String::from_utf8_lossy(data).into_owned())
                }
                _ => Value::Null,
            };
            bytes = bytes.saturating_add(value_bytes(&value));
            if bytes > max_bytes {
                return Err(QueryError::ResultTooLarge(max_bytes));
            }
            values.push(value);
        }
        sent += 1;
        if let Some(batch) = batcher.push(values, bytes - row_start) {
            send(batch)?;
        }
    }
    if let Some(batch) = batcher.rest() {
        send(batch)?;
    }
    send(Chunk::End { truncated })
}
