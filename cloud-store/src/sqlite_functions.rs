//! SQL functions registered on every SQLite connection, so the cold tier's
//! compressed chunks are packed and read in SQL as on PostgreSQL (where
//! TOAST compresses them with lz4 itself):
//!
//! - `fg_compress(text)` → blob: LZ4 of the text, its length first.
//! - `fg_decompress(blob)` → text: the text back.
//!
//! Both are deterministic and return NULL for NULL.
//!
//! And `floor`, `ceil` and `ceiling`, which the query guard allows but this
//! SQLite is built without: as on PostgreSQL, a number's floor or ceiling as
//! a float (NULL for NULL or anything not a number), so a query such as
//! Grafana's time grouping (`floor(x/60)*60`) answers alike on both.

use std::ffi::{c_int, CStr};
use std::ptr;

use libsqlite3_sys as ffi;
use sqlx::SqliteConnection;

/// A blob claiming a larger text than this is refused rather than
/// allocated for: chunks hold at most [`crate::catalog::cold::CHUNK_ROWS`]
/// rows, far below it.
const MAX_TEXT: usize = 1 << 30;

type ScalarFunction =
    unsafe extern "C" fn(*mut ffi::sqlite3_context, c_int, *mut *mut ffi::sqlite3_value);

/// Registers the functions on `connection` (run on each new connection).
pub async fn register(connection: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    let mut handle = connection.lock_handle().await?;
    let db = handle.as_raw_handle().as_ptr();
    let functions: [(&CStr, ScalarFunction); 5] = [
        (c"fg_compress", compress),
        (c"fg_decompress", decompress),
        (c"floor", floor),
        (c"ceil", ceil),
        (c"ceiling", ceil),
    ];
    for (name, function) in functions {
        // SAFETY: `db` is this connection's open handle, locked for the
        // call; the name is a static C string; no user data or destructor.
        let rc = unsafe {
            ffi::sqlite3_create_function_v2(
                db,
                name.as_ptr(),
                1,
                ffi::SQLITE_UTF8 | ffi::SQLITE_DETERMINISTIC,
                ptr::null_mut(),
                Some(function),
                None,
                None,
                None,
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(sqlx::Error::Protocol(format!(
                "cannot register SQLite function {name:?} (code {rc})"
            )));
        }
    }
    Ok(())
}

/// The bytes of the single argument, or `None` for NULL.
///
/// SAFETY: `argv` holds one value, valid for this call.
unsafe fn argument<'a>(argv: *mut *mut ffi::sqlite3_value, as_text: bool) -> Option<&'a [u8]> {
    let value = *argv;
    if ffi::sqlite3_value_type(value) == ffi::SQLITE_NULL {
        return None;
    }
    // Text or blob first, then its length: the order SQLite asks for.
    let data = if as_text {
        ffi::sqlite3_value_text(value).cast::<u8>()
    } else {
        ffi::sqlite3_value_blob(value).cast::<u8>()
    };
    let len = ffi::sqlite3_value_bytes(value) as usize;
    if data.is_null() || len == 0 {
        return Some(&[]);
    }
    Some(std::slice::from_raw_parts(data, len))
}

/// `round` of the single argument, as a float; NULL unless it is a number.
///
/// SAFETY: `argv` holds one value, valid for this call.
unsafe fn rounded(
    context: *mut ffi::sqlite3_context,
    argv: *mut *mut ffi::sqlite3_value,
    round: fn(f64) -> f64,
) {
    let value = *argv;
    match ffi::sqlite3_value_numeric_type(value) {
        ffi::SQLITE_INTEGER | ffi::SQLITE_FLOAT => {
            ffi::sqlite3_result_double(context, round(ffi::sqlite3_value_double(value)))
        }
        _ => ffi::sqlite3_result_null(context),
    }
}

unsafe extern "C" fn floor(
    context: *mut ffi::sqlite3_context,
    _argc: c_int,
    argv: *mut *mut ffi::sqlite3_value,
) {
    rounded(context, argv, f64::floor)
}

unsafe extern "C" fn ceil(
    context: *mut ffi::sqlite3_context,
    _argc: c_int,
    argv: *mut *mut ffi::sqlite3_value,
) {
    rounded(context, argv, f64::ceil)
}

unsafe extern "C" fn compress(
    context: *mut ffi::sqlite3_context,
    _argc: c_int,
    argv: *mut *mut ffi::sqlite3_value,
) {
    let Some(text) = argument(argv, true) else {
        return ffi::sqlite3_result_null(context);
    };
    let packed = lz4_flex::compress_prepend_size(text);
    ffi::sqlite3_result_blob64(
        context,
        packed.as_ptr().cast(),
        packed.len() as u64,
        ffi::SQLITE_TRANSIENT(),
    );
}

unsafe extern "C" fn decompress(
    context: *mut ffi::sqlite3_context,
    _argc: c_int,
    argv: *mut *mut ffi::sqlite3_value,
) {
    let Some(packed) = argument(argv, false) else {
        return ffi::sqlite3_result_null(context);
    };
    let claimed = packed
        .get(..4)
        .map(|len| u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize);
    let text = match claimed {
        Some(len) if len <= MAX_TEXT => lz4_flex::decompress_size_prepended(packed)
            .map_err(|e| format!("fg_decompress: not a compressed chunk: {e}")),
        _ => Err("fg_decompress: not a compressed chunk".to_string()),
    };
    match text {
        Ok(text) => ffi::sqlite3_result_text64(
            context,
            text.as_ptr().cast(),
            text.len() as u64,
            ffi::SQLITE_TRANSIENT(),
            ffi::SQLITE_UTF8 as u8,
        ),
        Err(message) => {
            ffi::sqlite3_result_error(context, message.as_ptr().cast(), message.len() as c_int)
        }
    }
}

#[cfg(test)]
mod tests {
    use sqlx::sqlite::SqlitePoolOptions;

    #[tokio::test]
    async fn text_comes_back_as_it_went_in_and_garbage_is_an_error() {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .after_connect(|connection, _| Box::pin(super::register(connection)))
            .connect("sqlite::memory:")
            .await
            .unwrap();
        let text = r#"[{"device_id":"d1","kwh":0.30000000000000004}]"#.repeat(200);
        let (back, packed, raw): (String, i64, i64) = sqlx::query_as(
            "SELECT fg_decompress(fg_compress($1)), length(fg_compress($1)), length(CAST($1 AS BLOB))",
        )
        .bind(&text)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(back, text);
        assert!(packed * 10 < raw, "{packed} bytes for {raw}");
        let null: Option<String> = sqlx::query_scalar("SELECT fg_decompress(fg_compress(NULL))")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(null, None);
        let err = sqlx::query_scalar::<_, String>("SELECT fg_decompress(x'ffffff7f00')")
            .fetch_one(&pool)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a compressed chunk"), "{err}");
    }

    #[tokio::test]
    async fn floor_and_ceiling_answer_as_on_postgres() {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .after_connect(|connection, _| Box::pin(super::register(connection)))
            .connect("sqlite::memory:")
            .await
            .unwrap();
        let row: (f64, f64, f64, f64, Option<f64>, Option<f64>) = sqlx::query_as(
            "SELECT floor((1772359263000/1000)/60)*60, floor(-2.5), ceil(2.1), ceiling('2.5'), \
             floor(NULL), ceil('x')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(row, (1_772_359_260.0, -3.0, 3.0, 3.0, None, None));
    }
}
