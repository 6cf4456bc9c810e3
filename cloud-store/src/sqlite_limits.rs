//! What SQLite may take for a query, through libsqlite3's C API (with
//! [`crate::sqlite_functions`] and [`crate::sqlite_query`], the store's
//! only `unsafe` code).
//!
//! - Per read connection, set before each query ([`limit_connection`]):
//!   the longest value a query may build (`SQLITE_LIMIT_LENGTH`, the
//!   query's byte bound: a value that doubles stops there instead of at
//!   SQLite's default of a billion bytes), and the longest statement, the
//!   deepest expression and the most compound SELECT terms SQLite will
//!   compile, so that SQL which did not come through the query guard is
//!   bounded too.
//! - Per query, a memory budget ([`budget`]): SQLite's allocations on the
//!   thread that runs the query count against it, and one that would go
//!   over fails, so SQLite stops that query with "out of memory". A value
//!   length limit alone does not bound a query (each of thousands of
//!   expressions may hold a value that long).
//!
//! Why not `sqlite3_hard_heap_limit64`, the process-wide limit: sqlx-sqlite
//! 0.8 copies each row's values with `sqlite3_value_dup` and does not check
//! the copy (`NonNull::new_unchecked`), so an allocation refused at the
//! limit aborts the process, on whatever connection meets it first: the
//! ingest writer as well as a query. Measured with four hostile queries at
//! once, it did. A budget only fails allocations on a query's own thread,
//! where [`crate::sqlite_query`] reads rows without that copy.

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

use libsqlite3_sys as ffi;
use sqlx::sqlite::LockedSqliteHandle;

use crate::query::{MAX_DEPTH, MAX_SQL_BYTES};

/// Longest statement a read connection compiles: a checked query of at
/// most [`MAX_SQL_BYTES`], grown by the expansion of tiered streams.
const SQL_LENGTH: c_int = (64 * MAX_SQL_BYTES) as c_int;
/// Deepest expression SQLite compiles: above the guard's [`MAX_DEPTH`],
/// for what a view rewrite or an expansion adds.
const EXPR_DEPTH: c_int = (2 * MAX_DEPTH) as c_int;
/// Most terms of one compound SELECT (UNION, …): the guard counts each as
/// a level, so no checked query has more than [`MAX_DEPTH`].
const COMPOUND_SELECT: c_int = MAX_DEPTH as c_int;

/// Sets the read connection `handle`'s limits for a query whose values may
/// be up to `max_value_bytes` long (SQLite caps it at its compiled-in
/// maximum, a billion bytes).
pub fn limit_connection(handle: &mut LockedSqliteHandle<'_>, max_value_bytes: usize) {
    let db = handle.as_raw_handle().as_ptr();
    let length = c_int::try_from(max_value_bytes).unwrap_or(c_int::MAX);
    for (limit, value) in [
        (ffi::SQLITE_LIMIT_LENGTH, length),
        (ffi::SQLITE_LIMIT_SQL_LENGTH, SQL_LENGTH),
        (ffi::SQLITE_LIMIT_EXPR_DEPTH, EXPR_DEPTH),
        (ffi::SQLITE_LIMIT_COMPOUND_SELECT, COMPOUND_SELECT),
    ] {
        // SAFETY: `db` is this connection's open handle, locked for the
        // call; sqlite3_limit only reads and stores integers.
        unsafe {
            ffi::sqlite3_limit(db, limit, value);
        }
    }
}

/// A query's memory budget is this many times `--query-max-bytes`: room
/// to build a value of the longest length from its half (a doubling holds
/// both), beside the connection's page cache.
pub const BUDGET_FACTOR: usize = 2;

/// The memory budget of a query whose result and values may take
/// `max_bytes` (128 MiB by default); `None` when that is unbounded.
pub fn budget_for(max_bytes: usize) -> Option<usize> {
    (max_bytes != usize::MAX).then(|| max_bytes.saturating_mul(BUDGET_FACTOR))
}

/// SQLite's own allocator, which [`install_budgets`] wraps.
struct DefaultMethods(ffi::sqlite3_mem_methods);

// SAFETY: the default allocator's methods are plain functions, and its
// `pAppData` is not used by them; the struct is never written after it is
// stored.
unsafe impl Send for DefaultMethods {}
unsafe impl Sync for DefaultMethods {}

static DEFAULT: OnceLock<DefaultMethods> = OnceLock::new();

#[derive(Clone, Copy)]
struct Budget {
    used: usize,
    limit: usize,
    exceeded: bool,
}

thread_local! {
    /// The budget of the query running on this thread, if one is. Const and
    /// without a destructor, so the allocator can read it at any time.
    static BUDGET: Cell<Option<Budget>> = const { Cell::new(None) };
}

/// Makes SQLite allocate through a wrapper that enforces [`budget`]s. It
/// must run before SQLite is first used in the process (SQLite refuses it
/// afterwards), so the binary calls it first thing; where it was not
/// called, budgets are not enforced.
pub fn install_budgets() -> Result<(), String> {
    if DEFAULT.get().is_some() {
        return Ok(());
    }
    // SAFETY: sqlite3_config is called before SQLite is initialized (it
    // says SQLITE_MISUSE otherwise), from one thread; GETMALLOC fills the
    // struct it is given, MALLOC copies the one it is given.
    unsafe {
        let mut default: ffi::sqlite3_mem_methods = std::mem::zeroed();
        let rc = ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_GETMALLOC,
            &mut default as *mut ffi::sqlite3_mem_methods,
        );
        if rc != ffi::SQLITE_OK || default.xMalloc.is_none() {
            return Err(format!("cannot read SQLite's allocator (code {rc})"));
        }
        let ours = ffi::sqlite3_mem_methods {
            xMalloc: Some(budget_malloc),
            xFree: Some(budget_free),
            xRealloc: Some(budget_realloc),
            ..default
        };
        let _ = DEFAULT.set(DefaultMethods(default));
        let rc = ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_MALLOC,
            &ours as *const ffi::sqlite3_mem_methods,
        );
        if rc != ffi::SQLITE_OK {
            return Err(format!(
                "cannot set SQLite's allocator (code {rc}): SQLite was used before"
            ));
        }
    }
    Ok(())
}

/// Counts SQLite's allocations on this thread against `limit` bytes until
/// the guard is dropped.
pub(crate) fn budget(limit: usize) -> BudgetGuard {
    BUDGET.set(Some(Budget {
        used: 0,
        limit,
        exceeded: false,
    }));
    BudgetGuard
}

pub(crate) struct BudgetGuard;

impl BudgetGuard {
    /// Whether an allocation was refused for the budget.
    pub(crate) fn exceeded(&self) -> bool {
        BUDGET.get().is_some_and(|b| b.exceeded)
    }
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        BUDGET.set(None);
    }
}

fn default_methods() -> &'static ffi::sqlite3_mem_methods {
    // Set before these functions are ever installed.
    &DEFAULT.get().expect("SQLite's default allocator").0
}

/// SAFETY (the three below): SQLite calls them as its allocator, with
/// pointers it got from them; they hand on to SQLite's own allocator, whose
/// methods `install_budgets` checked are present.
unsafe extern "C" fn budget_malloc(n: c_int) -> *mut c_void {
    let default = default_methods();
    let (malloc, size) = (default.xMalloc.unwrap(), default.xSize.unwrap());
    let Some(mut budget) = BUDGET.get() else {
        return malloc(n);
    };
    if budget.used.saturating_add(n.max(0) as usize) > budget.limit {
        budget.exceeded = true;
        BUDGET.set(Some(budget));
        return std::ptr::null_mut();
    }
    let p = malloc(n);
    if !p.is_null() {
        budget.used += size(p).max(0) as usize;
        BUDGET.set(Some(budget));
    }
    p
}

unsafe extern "C" fn budget_free(p: *mut c_void) {
    let default = default_methods();
    if let (Some(mut budget), false) = (BUDGET.get(), p.is_null()) {
        budget.used = budget
            .used
            .saturating_sub(default.xSize.unwrap()(p).max(0) as usize);
        BUDGET.set(Some(budget));
    }
    default.xFree.unwrap()(p);
}

unsafe extern "C" fn budget_realloc(p: *mut c_void, n: c_int) -> *mut c_void {
    let default = default_methods();
    let (realloc, size) = (default.xRealloc.unwrap(), default.xSize.unwrap());
    let Some(mut budget) = BUDGET.get() else {
        return realloc(p, n);
    };
    let old = if p.is_null() {
        0
    } else {
        size(p).max(0) as usize
    };
    let growth = (n.max(0) as usize).saturating_sub(old);
    if budget.used.saturating_add(growth) > budget.limit {
        // SQLite keeps `p` when a reallocation fails.
        budget.exceeded = true;
        BUDGET.set(Some(budget));
        return std::ptr::null_mut();
    }
    let q = realloc(p, n);
    if !q.is_null() {
        budget.used = budget.used.saturating_sub(old) + size(q).max(0) as usize;
        BUDGET.set(Some(budget));
    }
    q
}
