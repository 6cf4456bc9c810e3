//! SQL functions registered on every SQLite connection, so the cold tier's
//! compressed chunks are packed and read in SQL as on PostgreSQL (where
//! TOAST compresses them with lz4 itself):
//!
//! - `fg_compress(text)` → blob: LZ4 of the text, its length first.
//! - `fg_decompress(blob)` → text: the text back.
//!
//! Both are deterministic and return NULL for NULL.
//!
//! And the math functions the query guard allows but this SQLite is built
//! without, as PostgreSQL has them, so a query answers alike on both
//! (Grafana's time grouping, `floor(x/60)*60`, for one): `floor`, `ceil`,
//! `ceiling`, `trunc`, `sign`, `sqrt`, `exp`, `ln`, `log(x)` (base 10),
//! `log(b, x)` and `power(x, y)`. They answer a float, NULL when an
//! argument is NULL or not a number, and refuse what PostgreSQL refuses
//! with its words (`sqrt(-1)`: "cannot take square root of a negative
//! number").

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
    let functions: [(&CStr, c_int, ScalarFunction); 14] = [
        (c"fg_compress", 1, compress),
        (c"fg_decompress", 1, decompress),
        (c"floor", 1, floor),
        (c"ceil", 1, ceil),
        (c"ceiling", 1, ceil),
        (c"trunc", 1, trunc),
        (c"sign", 1, sign),
        (c"sqrt", 1, sqrt),
        (c"exp", 1, exp),
        (c"ln", 1, ln),
        (c"log", 1, log10),
        (c"log", 2, log_base),
        (c"power", 2, power),
        (c"pow", 2, power),
    ];
    for (name, arguments, function) in functions {
        // SAFETY: `db` is this connection's open handle, locked for the
        // call; the name is a static C string; no user data or destructor.
        let rc = unsafe {
            ffi::sqlite3_create_function_v2(
                db,
                name.as_ptr(),
                arguments,
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

/// The `N` arguments of a math function as numbers; `None` when one is
/// NULL or not a number.
///
/// SAFETY: `argv` holds `N` values, valid for this call.
unsafe fn numbers<const N: usize>(argv: *mut *mut ffi::sqlite3_value) -> Option<[f64; N]> {
    let mut numbers = [0.0; N];
    for (i, number) in numbers.iter_mut().enumerate() {
        let value = *argv.add(i);
        match ffi::sqlite3_value_numeric_type(value) {
            ffi::SQLITE_INTEGER | ffi::SQLITE_FLOAT => *number = ffi::sqlite3_value_double(value),
            _ => return None,
        }
    }
    Some(numbers)
}

/// A math function of `N` numbers: NULL for NULL, else its value or its
/// refusal.
macro_rules! math_function {
    ($name:ident, $n:literal, |$x:ident| $body:expr) => {
        unsafe extern "C" fn $name(
            context: *mut ffi::sqlite3_context,
            _argc: c_int,
            argv: *mut *mut ffi::sqlite3_value,
        ) {
            let answer: Result<f64, &CStr> = match numbers::<$n>(argv) {
                None => return ffi::sqlite3_result_null(context),
                Some($x) => $body,
            };
            match answer {
                Ok(value) => ffi::sqlite3_result_double(context, value),
                Err(refusal) => ffi::sqlite3_result_error(context, refusal.as_ptr(), -1),
            }
        }
    };
}

math_function!(floor, 1, |x| Ok(x[0].floor()));
math_function!(ceil, 1, |x| Ok(x[0].ceil()));
math_function!(trunc, 1, |x| Ok(x[0].trunc()));
math_function!(sign, 1, |x| Ok(if x[0] == 0.0 {
    0.0
} else {
    x[0].signum()
}));
math_function!(sqrt, 1, |x| if x[0] < 0.0 {
    Err(c"cannot take square root of a negative number")
} else {
    Ok(x[0].sqrt())
});
math_function!(exp, 1, |x| finite(x[0].exp()));
math_function!(ln, 1, |x| logarithm(x[0]));
math_function!(log10, 1, |x| logarithm(x[0]).map(|_| x[0].log10()));
math_function!(log_base, 2, |x| match (logarithm(x[0]), logarithm(x[1])) {
    (Ok(0.0), _) => Err(c"division by zero"),
    (Ok(base), Ok(value)) => Ok(value / base),
    (Err(refusal), _) | (_, Err(refusal)) => Err(refusal),
});
math_function!(power, 2, |x| {
    let (base, exponent) = (x[0], x[1]);
    if base == 0.0 && exponent < 0.0 {
        Err(c"zero raised to a negative power is undefined")
    } else if base < 0.0 && exponent.fract() != 0.0 {
        Err(c"a negative number raised to a non-integer power yields a complex result")
    } else {
        finite(base.powf(exponent))
    }
});

/// The natural logarithm, refused where PostgreSQL refuses it.
fn logarithm(x: f64) -> Result<f64, &'static CStr> {
    if x == 0.0 {
        Err(c"cannot take logarithm of zero")
    } else if x < 0.0 {
        Err(c"cannot take logarithm of a negative number")
    } else {
        Ok(x.ln())
    }
}

/// A result too large for a float is refused, as PostgreSQL does.
fn finite(value: f64) -> Result<f64, &'static CStr> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(c"value out of range: overflow")
    }
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
    async fn math_functions_answer_and_refuse_as_on_postgres() {
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
        let row: (f64, f64, f64, f64, f64, f64, f64, f64, f64) = sqlx::query_as(
            "SELECT trunc(-2.7), sign(-4), sqrt(16), exp(0), ln(1), log(1000), log(2, 8), \
             power(2, 10), power(-2, 3)",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(row, (-2.0, -1.0, 4.0, 1.0, 0.0, 3.0, 3.0, 1024.0, -8.0));
        for (query, refusal) in [
            (
                "SELECT sqrt(-1)",
                "cannot take square root of a negative number",
            ),
            ("SELECT ln(0)", "cannot take logarithm of zero"),
            (
                "SELECT log(-1)",
                "cannot take logarithm of a negative number",
            ),
            ("SELECT log(1, 8)", "division by zero"),
            (
                "SELECT power(0, -1)",
                "zero raised to a negative power is undefined",
            ),
            (
                "SELECT power(-8, 0.5)",
                "a negative number raised to a non-integer power yields a complex result",
            ),
            ("SELECT exp(1000)", "value out of range: overflow"),
        ] {
            let Err(err) = sqlx::query(query).fetch_one(&pool).await else {
                panic!("{query} was not refused");
            };
            assert!(err.to_string().contains(refusal), "{query}: {err}");
        }
    }
}
