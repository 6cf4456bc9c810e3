//! The SQL of column compaction: a declared field folded into the `extra`
//! JSON column (its column dropped), read back out of it under its own
//! name, and promoted back to a column.
//!
//! Values are folded as stored (enum codes, converted units, epoch
//! milliseconds), so reading one back out gives exactly what the column
//! held. Floats are written with 17 significant digits, which round-trip
//! every `f64`.

use fleetgate_protocol::schema::EXTRA;

/// The key a compacted field's value is kept under in `extra`: apart from
/// the keys devices send there (which may name a field declared later),
/// since ingest refuses records with keys that start with `fg.`.
pub fn folded_key(field: &str) -> String {
    format!("{FOLDED_PREFIX}{field}")
}

/// What keys of folded fields start with.
pub const FOLDED_PREFIX: &str = "fg.";

/// The JSON path of a folded field's key, for SQLite.
fn path(field: &str) -> String {
    format!("'$.\"{}\"'", folded_key(field))
}

use crate::db::Backend;
use crate::values::ColumnKind;

/// Whether a field of this kind may be folded into `extra`. Booleans stay
/// columns: SQLite reports a folded one as 0/1, not false/true, since the
/// column's declared type is what tells the two apart there.
pub fn foldable(kind: ColumnKind) -> bool {
    kind != ColumnKind::Bool
}

/// The folded field's value, read out of `extra` with the column's type
/// (`row` prefixes the column: "" or "NEW.").
pub fn extract(backend: Backend, row: &str, field: &str, kind: ColumnKind) -> String {
    match backend {
        Backend::Sqlite => {
            let raw = format!("json_extract({row}{EXTRA}, {})", path(field));
            match kind {
                ColumnKind::Int => format!("CAST({raw} AS INTEGER)"),
                ColumnKind::Float => format!("CAST({raw} AS REAL)"),
                ColumnKind::Text | ColumnKind::Bool => raw,
            }
        }
        Backend::Postgres => {
            let raw = format!("(CAST({row}{EXTRA} AS JSONB) ->> '{}')", folded_key(field));
            match kind {
                ColumnKind::Int => format!("CAST({raw} AS BIGINT)"),
                ColumnKind::Float => format!("CAST({raw} AS DOUBLE PRECISION)"),
                ColumnKind::Text | ColumnKind::Bool => raw,
            }
        }
    }
}

/// `extra` without the folded fields, as it read before they were folded
/// (NULL when nothing else is left).
pub fn extra_without(backend: Backend, row: &str, fields: &[&str]) -> String {
    let extra = format!("{row}{EXTRA}");
    match backend {
        Backend::Sqlite => {
            let paths: Vec<String> = fields.iter().map(|f| path(f)).collect();
            format!("NULLIF(json_remove({extra}, {}), '{{}}')", paths.join(", "))
        }
        Backend::Postgres => {
            let minus: String = fields
                .iter()
                .map(|f| format!(" - '{}'", folded_key(f)))
                .collect();
            let json = format!("CAST({extra} AS JSONB)");
            // Text that holds none of them is returned as it is stored.
            format!(
                "CASE WHEN {json}{minus} = {json} THEN {extra} \
                 ELSE NULLIF(CAST({json}{minus} AS TEXT), '{{}}') END"
            )
        }
    }
}

/// Folds `field`'s column into `extra` in `table`, then drops the column.
pub fn fold(backend: Backend, table: &str, field: &str, kind: ColumnKind) -> Vec<String> {
    let set = match backend {
        Backend::Sqlite => {
            let value = match kind {
                ColumnKind::Float => format!("json(printf('%!.17g', {field}))"),
                _ => field.to_string(),
            };
            format!("json_set(COALESCE({EXTRA}, '{{}}'), {}, {value})", path(field))
        }
        Backend::Postgres => format!(
            "CAST(COALESCE(CAST({EXTRA} AS JSONB), '{{}}'::jsonb) || jsonb_build_object('{}', {field}) AS TEXT)",
            folded_key(field)
        ),
    };
    vec![
        format!("UPDATE {table} SET {EXTRA} = {set} WHERE {field} IS NOT NULL"),
        format!("ALTER TABLE {table} DROP COLUMN {field}"),
    ]
}

/// Adds `field`'s column back to `table` and moves its values out of
/// `extra` into it.
pub fn unfold(
    backend: Backend,
    table: &str,
    field: &str,
    kind: ColumnKind,
    sql_type: &str,
) -> Vec<String> {
    vec![
        format!("ALTER TABLE {table} ADD COLUMN {field} {sql_type}"),
        format!(
            "UPDATE {table} SET {field} = {}, {EXTRA} = {} WHERE {}",
            extract(backend, "", field, kind),
            extra_without(backend, "", &[field]),
            holds(backend, "", field)
        ),
    ]
}

/// Whether `extra` holds `field`.
fn holds(backend: Backend, row: &str, field: &str) -> String {
    match backend {
        Backend::Sqlite => format!("json_type({row}{EXTRA}, {}) IS NOT NULL", path(field)),
        Backend::Postgres => format!("CAST({row}{EXTRA} AS JSONB) ? '{}'", folded_key(field)),
    }
}

/// The name of the fence of the field at `position` in the stream's
/// declaration (short: PostgreSQL cuts names at 63 bytes).
pub fn fence_name(stream: &str, position: usize) -> String {
    format!("fgf_{stream}_{position}")
}

/// A trigger that, for a while after a promotion, moves the field out of
/// `extra` into its column in rows inserted by a writer that still had the
/// compacted layout (another process, or a commit that began before the
/// change), so no value ends up where queries no longer look.
pub fn fence(
    backend: Backend,
    stream: &str,
    name: &str,
    field: &str,
    kind: ColumnKind,
) -> Vec<String> {
    match backend {
        Backend::Sqlite => vec![format!(
            "CREATE TRIGGER {name} AFTER INSERT ON {stream} WHEN {} \
             BEGIN UPDATE {stream} SET {field} = {}, {EXTRA} = {} WHERE rowid = NEW.rowid; END",
            holds(backend, "NEW.", field),
            extract(backend, "NEW.", field, kind),
            extra_without(backend, "NEW.", &[field]),
        )],
        // BEFORE the row is stored, so the views' statement triggers see it
        // already fixed.
        Backend::Postgres => vec![
            format!(
                "CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $fgf$ BEGIN \
                 IF NEW.{EXTRA} IS NOT NULL AND {} THEN \
                 NEW.{field} := {}; NEW.{EXTRA} := {}; END IF; RETURN NEW; END $fgf$",
                holds(backend, "NEW.", field),
                extract(backend, "NEW.", field, kind),
                extra_without(backend, "NEW.", &[field]),
            ),
            format!(
                "CREATE TRIGGER {name} BEFORE INSERT ON {stream} FOR EACH ROW EXECUTE FUNCTION {name}()"
            ),
        ],
    }
}

pub fn drop_fence(backend: Backend, stream: &str, name: &str) -> Vec<String> {
    match backend {
        Backend::Sqlite => vec![format!("DROP TRIGGER IF EXISTS {name}")],
        Backend::Postgres => vec![
            format!("DROP TRIGGER IF EXISTS {name} ON {stream}"),
            format!("DROP FUNCTION IF EXISTS {name}()"),
        ],
    }
}
