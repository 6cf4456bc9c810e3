//! Folding a realtime view on SQLite without holding its one writer for
//! long.
//!
//! A fold merges the partials of the source rows after a view's watermark
//! into its table. Out-of-order records spread a batch over as many groups
//! as it has rows, so a batch only folds cheaply when it is big (each page
//! of the table is written once, not once per row). Merged in one
//! transaction, such a batch held the writer for a few hundred
//! milliseconds, and every ingest commit waited behind it.
//!
//! A sweep keeps the big batch and gives the writer back often:
//!
//! 1. [`Batch::read`] groups the batch on a reading connection, in key
//!    order, without the writer.
//! 2. [`Batch::merge`] merges it a slice of groups per write transaction,
//!    each sized to hold the writer about as long as ingest's commits
//!    made it wait (from [`SLICE_HOLD`] to [`SLICE_HOLD_MAX`]). Each slice also
//!    moves the marks: the groups whose first grouping value sorts at or
//!    before `swept_through` are in the table. Queries (see
//!    `ViewPlan::read_from`) add only the rows that are not, so every row
//!    counts once mid-sweep.
//!
//! Every mark change moves `generation` on, and a slice commits only if
//! the generation is the one its batch was read at: a removal, rebuild or
//! drop that came in between stops the sweep, and the next one reads again.

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Row, Sqlite, TypeInfo, ValueRef};

use super::def::{ViewPlan, MARKS};
use crate::db::{Db, Pools};

/// Source rows one batch takes at most. A batch merges each of its groups
/// once, so bigger batches fold cheaper when records arrive out of order
/// (a week of 1,000 devices' hourly groups: 115,000 merges for 200,000
/// rows, 168,000 for 1,000,000), and slices keep even a big one from
/// holding up ingest; queries aggregate the rows not merged meanwhile.
/// A batch is this big only when the folds are behind: each round takes
/// what arrived since the last.
pub const BATCH_ROWS: i64 = 1_000_000;

/// How long a slice holds the writer when ingest is light: an ingest
/// commit arriving meanwhile waits about this long.
pub const SLICE_HOLD: Duration = Duration::from_millis(10);

/// How long a slice may hold the writer when ingest's own commits made it
/// wait that long: under a saturating load, slices then get about half of
/// the writer rather than a sliver between long commits, and fall behind
/// less.
pub const SLICE_HOLD_MAX: Duration = Duration::from_millis(50);

/// Rows merged per statement: a statement binds at most 32,766 values.
const ROWS_PER_STATEMENT: usize = 256;

#[derive(Debug, Clone, Copy)]
pub struct SweepLimits {
    pub batch_rows: i64,
    /// Groups in a slice: sized from how long slices hold and wait for the
    /// writer when `None` (see [`SLICE_HOLD`]).
    pub slice_groups: Option<usize>,
    /// Stop after this many slices, leaving the sweep under way.
    pub max_slices: Option<usize>,
}

impl Default for SweepLimits {
    fn default() -> Self {
        SweepLimits {
            batch_rows: BATCH_ROWS,
            slice_groups: None,
            max_slices: None,
        }
    }
}

/// One value of a grouped row, as SQLite stored it.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Value {
    fn read(row: &SqliteRow, index: usize) -> Result<Value, sqlx::Error> {
        let raw = row.try_get_raw(index)?;
        if raw.is_null() {
            return Ok(Value::Null);
        }
        let storage = raw.type_info().name().to_string();
        Ok(match storage.as_str() {
            "INTEGER" | "BOOLEAN" => Value::Integer(row.try_get_unchecked(index)?),
            "REAL" => Value::Real(row.try_get_unchecked(index)?),
            "BLOB" => Value::Blob(row.try_get_unchecked(index)?),
            _ => Value::Text(row.try_get_unchecked(index)?),
        })
    }

    fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>,
    ) -> sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>> {
        match self {
            Value::Null => query.bind(None::<i64>),
            Value::Integer(v) => query.bind(*v),
            Value::Real(v) => query.bind(*v),
            Value::Text(v) => query.bind(v.as_str()),
            Value::Blob(v) => query.bind(v.as_slice()),
        }
    }
}

/// The grouped partials of one batch of source rows, in key order.
pub struct Batch {
    /// The marks' generation the batch was read at.
    generation: i64,
    upto: i64,
    /// The last source row the batch takes.
    to: i64,
    groups: Vec<Vec<Value>>,
}

/// How a merge ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Merged {
    /// The whole batch is in the table: the watermark is its last row.
    Done { to: i64 },
    /// Stopped at [`SweepLimits::max_slices`], the sweep under way.
    Paused,
    /// The marks changed since the batch was read: nothing more merged.
    Overtaken,
}

impl Batch {
    /// Groups the next batch after `plan`'s watermark (or the rest of a
    /// sweep under way) on a reading connection. `None`: nothing to fold,
    /// or not a SQLite database.
    pub async fn read(
        db: &Db,
        plan: &ViewPlan,
        limits: &SweepLimits,
    ) -> Result<Option<Batch>, sqlx::Error> {
        let Pools::Sqlite { read, .. } = &db.pools else {
            return Ok(None);
        };
        // One read transaction: the marks and the rows from one snapshot.
        let mut tx = read.begin().await?;
        let marks: Option<(i64, Option<i64>, i64, i64)> = sqlx::query_as(&format!(
            "SELECT upto, sweep_to, generation, (SELECT COALESCE(max(rowid), 0) FROM {}) \
             FROM {MARKS} WHERE name = $1",
            plan.source()
        ))
        .bind(&plan.name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((upto, sweep_to, generation, last)) = marks else {
            return Ok(None);
        };
        let to = sweep_to.unwrap_or_else(|| last.min(upto + limits.batch_rows));
        if to <= upto {
            return Ok(None);
        }
        let width = plan.width();
        let sql = plan.sweep_batch_sql();
        let mut rows = sqlx::query(&sql).bind(to).fetch(&mut *tx);
        let mut groups = Vec::new();
        while let Some(row) = rows.try_next().await? {
            groups.push(
                (0..width)
                    .map(|i| Value::read(&row, i))
                    .collect::<Result<_, _>>()?,
            );
        }
        drop(rows);
        tx.rollback().await?;
        Ok(Some(Batch {
            generation,
            upto,
            to,
            groups,
        }))
    }

    /// Merges the batch a slice of groups per write transaction (see the
    /// module's documentation).
    pub async fn merge(
        &self,
        db: &Db,
        plan: &ViewPlan,
        limits: &SweepLimits,
    ) -> Result<Merged, sqlx::Error> {
        let Pools::Sqlite { write, .. } = &db.pools else {
            return Ok(Merged::Overtaken);
        };
        let mark = plan.sweep_mark_sql();
        let per_statement = ROWS_PER_STATEMENT.min(30_000 / plan.width().max(1));
        let mut generation = self.generation;
        let mut slice = limits.slice_groups.unwrap_or(256);
        let (mut start, mut slices) = (0, 0);
        loop {
            if limits.max_slices.is_some_and(|max| slices >= max) {
                return Ok(Merged::Paused);
            }
            let mut end = (start + slice.max(1)).min(self.groups.len());
            // A first grouping value's groups go in one slice: the marks
            // tell them apart by that value alone.
            while end < self.groups.len() && self.groups[end][0] == self.groups[end - 1][0] {
                end += 1;
            }
            let done = end == self.groups.len();
            let asked = Instant::now();
            let mut tx = write.begin().await?;
            let (waited, began) = (asked.elapsed(), Instant::now());
            let query = sqlx::query(&mark)
                .bind(if done { self.to } else { self.upto })
                .bind((!done).then_some(self.to));
            // Not done: the slice has groups, the last one's first value.
            let query = match done {
                true => query.bind(None::<i64>),
                false => self.groups[end - 1][0].bind(query),
            };
            let moved = query
                .bind(&plan.name)
                .bind(generation)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if moved != 1 {
                tx.rollback().await?;
                return Ok(Merged::Overtaken);
            }
            for rows in self.groups[start..end].chunks(per_statement) {
                let sql = plan.merge_values_sql(rows.len());
                let mut query = sqlx::query(&sql);
                for value in rows.iter().flatten() {
                    query = value.bind(query);
                }
                query.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            let held = began.elapsed();
            generation += 1;
            slices += 1;
            if done {
                return Ok(Merged::Done { to: self.to });
            }
            if limits.slice_groups.is_none() {
                slice = next_slice(end - start, held, waited);
            }
            start = end;
        }
    }
}

/// The next slice's size in groups, from how long this one of `groups`
/// held the writer and waited for it.
fn next_slice(groups: usize, held: Duration, waited: Duration) -> usize {
    let hold = waited.clamp(SLICE_HOLD, SLICE_HOLD_MAX);
    let fits = groups as u128 * hold.as_nanos() / held.as_nanos().max(1);
    // At most four times bigger: one quick slice says little of the next.
    (fits.min(100_000) as usize).clamp(16, (groups * 4).max(16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::{AutoSettings, Views, ViewsFile};
    use std::sync::Arc;

    const VIEWS: &str = r#"
[views.by_room]
source = "meter"
group_by = ["room"]
bucket = { column = "received_at", width = "1s" }
aggregates = { n = "count(*)", total = "sum(kwh)", low = "min(kwh)", high = "max(kwh)" }

[views.fleet]
source = "meter"
bucket = { column = "received_at", width = "1s" }
aggregates = { n = "count(*)", total = "sum(kwh)" }
"#;

    /// The view's answer and the primary table's, for each view.
    const COMPARED: [(&str, &str, &str); 2] = [
        (
            "by_room",
            "SELECT room, fg_bucket, sum(fg_rows), total(kwh__sum), min(kwh__min), max(kwh__max) \
             FROM {view} GROUP BY 1, 2 ORDER BY 1, 2",
            "SELECT room, (received_at / 1000) * 1000, count(*), total(kwh), min(kwh), max(kwh) \
             FROM meter GROUP BY 1, 2 ORDER BY 1, 2",
        ),
        (
            "fleet",
            "SELECT fg_bucket, sum(fg_rows), total(kwh__sum), NULL, NULL, NULL \
             FROM {view} GROUP BY 1 ORDER BY 1",
            "SELECT (received_at / 1000) * 1000, count(*), total(kwh), NULL, NULL, NULL \
             FROM meter GROUP BY 1 ORDER BY 1",
        ),
    ];

    async fn answer(db: &Db, sql: &str) -> Vec<Vec<Value>> {
        let Pools::Sqlite { write, .. } = &db.pools else {
            unreachable!("a SQLite database")
        };
        let rows = sqlx::query(sql).fetch_all(write).await.unwrap();
        rows.iter()
            .map(|row| {
                (0..row.len())
                    .map(|i| Value::read(row, i).unwrap())
                    .collect()
            })
            .collect()
    }

    /// Each of [`COMPARED`]'s views answers as the primary table does.
    async fn answers_as_the_table(db: &Db, plans: &[Arc<ViewPlan>], when: &str) {
        for (plan, (name, through_view, on_table)) in plans.iter().zip(COMPARED) {
            let through_view = through_view.replace("{view}", &plan.read_from());
            assert_eq!(
                answer(db, &through_view).await,
                answer(db, on_table).await,
                "view {name}, {when}"
            );
        }
    }

    /// Sweeps stopped after any slice, overtaken by a removal's settling,
    /// and resumed, on random rows (NULL rooms, late rows, NULL readings):
    /// through each view, queries answer as the primary table does at
    /// every step, and once swept nothing is left unfolded.
    #[tokio::test]
    async fn every_row_counts_once_however_sweeps_stop_and_start() {
        let (_dir, db, catalog) = crate::catalog::scratch_store(
            "[streams.meter]\nfields.kwh = { type = \"float\" }\nfields.room = { type = \"string\" }\n",
        )
        .await;
        let views = Views::open(db.clone(), catalog.clone(), AutoSettings::off())
            .await
            .unwrap();
        views
            .create(&ViewsFile::parse(VIEWS).unwrap())
            .await
            .unwrap();
        let plans: Vec<_> = COMPARED
            .iter()
            .map(|(name, _, _)| views.plan(name).unwrap())
            .collect();
        assert!(plans.iter().all(|p| p.watermark));

        let mut seed = 11u64;
        let mut random = move |below: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % below
        };
        let (mut paused, mut overtaken) = (0, 0);
        for round in 0..60 {
            let inserts: Vec<String> = (0..random(30))
                .map(|_| {
                    let room = ["NULL", "'a'", "'b'", "'c'", "'d'"][random(5) as usize];
                    let kwh = match random(10) {
                        0 => "NULL".to_string(),
                        n => format!("{}.0", n + random(50)),
                    };
                    format!(
                        "INSERT INTO meter (device_id, received_at, kwh, room, extra) \
                         VALUES ('m', {}, {kwh}, {room}, '{{}}')",
                        random(20_000)
                    )
                })
                .collect();
            db.execute_ddl(&inserts).await.unwrap();
            let plan = &plans[random(2) as usize];
            let limits = SweepLimits {
                batch_rows: 1 + random(40) as i64,
                slice_groups: Some(1 + random(3) as usize),
                max_slices: Some(1 + random(3) as usize),
            };
            if let Some(batch) = Batch::read(&db, plan, &limits).await.unwrap() {
                if random(4) == 0 {
                    // What expiry and tier moves run first, in their own
                    // transaction: every unfolded row in, marks reset.
                    let (settle, mark) = views.around_removal("meter");
                    db.execute_ddl(&[settle, mark].concat()).await.unwrap();
                    assert_eq!(
                        batch.merge(&db, plan, &limits).await.unwrap(),
                        Merged::Overtaken
                    );
                    overtaken += 1;
                } else if batch.merge(&db, plan, &limits).await.unwrap() == Merged::Paused {
                    paused += 1;
                }
            }
            answers_as_the_table(&db, &plans, &format!("round {round}")).await;
        }
        assert!(
            paused > 5 && overtaken > 5,
            "{paused} paused, {overtaken} overtaken"
        );

        for plan in &plans {
            views.fold(plan).await.unwrap();
        }
        answers_as_the_table(&db, &plans, "swept").await;
        for listed in views.list().await.unwrap() {
            assert_eq!(listed.unfolded, 0, "{}", listed.name);
        }
    }

    #[test]
    fn slices_grow_towards_the_hold_and_shrink_when_slow() {
        let (ms, idle) = (Duration::from_millis, Duration::ZERO);
        assert_eq!(next_slice(256, ms(1), idle), 1024);
        assert_eq!(next_slice(1000, ms(20), idle), 500);
        assert_eq!(next_slice(100, Duration::from_secs(5), idle), 16);
        // Waiting 30 ms behind ingest's commits: slices may hold 30 ms.
        assert_eq!(next_slice(1000, ms(10), ms(30)), 3000);
        assert_eq!(next_slice(1000, ms(10), Duration::from_secs(2)), 4000);
        assert_eq!(next_slice(1000, ms(100), Duration::from_secs(2)), 500);
    }
}
