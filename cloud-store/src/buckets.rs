//! Time-bucketed real-time keys. A stream declared with
//! `bucket = { time = "ordered_at", width = "1h" }` stores each row under
//! (`fg_bucket`, key): the bucket leads the primary key and an index on
//! (`fg_bucket`, time) reads a bucket in time order; a record sent twice is
//! stored once. When a batch run supersedes a period, [`Buckets::swap`]
//! moves that period's real-time rows, whole buckets at a time, to the
//! stream's superseded table (`fgs_<stream>`, marked with the run), so
//! the stream holds real time only where no batch answers for it. Nothing
//! acknowledged is deleted: superseded rows stay queryable, joinable to the
//! batch by their keys, and a record arriving late for a superseded bucket
//! goes there too.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleetgate_protocol::schema::BUCKET_COLUMN;
use serde::Serialize;
use sqlx::Row;

use crate::catalog::{physical_columns_sql, Catalog, Stream, SUPERSEDED_BY};
use crate::db::{Backend, Db};
use crate::views::def::BUCKET;
use crate::views::Views;
use crate::with_pool;

pub struct Buckets {
    db: Db,
    catalog: Catalog,
    views: Arc<Views>,
}

/// One bucket of a bucketed stream.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BucketInfo {
    /// The bucket's start (the time column's unit, ms for timestamps).
    pub bucket: i64,
    /// Real-time rows in the stream.
    pub rows: i64,
    /// Rows a batch run superseded, and the newest such run.
    pub superseded_rows: i64,
    pub superseded_by: Option<i64>,
}

/// What a swap did.
#[derive(Debug, Clone, Serialize)]
pub struct Swap {
    pub stream: String,
    /// The buckets swapped out: `from_bucket <= bucket < to_bucket`
    /// (whole buckets inside the period asked for; none when it holds
    /// no whole bucket).
    pub from_bucket: i64,
    pub to_bucket: i64,
    pub rows: u64,
    pub run: i64,
}

impl Buckets {
    pub fn new(db: Db, catalog: Catalog, views: Arc<Views>) -> Buckets {
        Buckets { db, catalog, views }
    }

    fn bucketed(&self, name: &str) -> Result<(Arc<Stream>, i64), String> {
        let stream = self
            .catalog
            .get(name)
            .ok_or_else(|| format!("no stream named {name:?}"))?;
        let width = stream.bucket().map(|(_, width)| width).ok_or_else(|| {
            format!("stream {name} is not bucketed (declare bucket = {{ time, width }})")
        })?;
        Ok((stream, width))
    }

    /// The buckets starting in `[from, to)` that hold rows, oldest first.
    pub async fn list(&self, name: &str, from: i64, to: i64) -> Result<Vec<BucketInfo>, String> {
        let (stream, _) = self.bucketed(name)?;
        let counts = |from_sql: String| {
            format!(
                "SELECT {BUCKET_COLUMN}, count(*), max({SUPERSEDED_BY}) FROM {from_sql} \
                 WHERE {BUCKET_COLUMN} >= $1 AND {BUCKET_COLUMN} < $2 GROUP BY {BUCKET_COLUMN}"
            )
        };
        // The stream's rows have no superseding run.
        let live = counts(format!(
            "(SELECT {BUCKET_COLUMN}, CAST(NULL AS BIGINT) AS {SUPERSEDED_BY} FROM {}) AS live",
            stream.read_from()
        ));
        let superseded = counts(stream.superseded_table());
        let mut buckets: BTreeMap<i64, BucketInfo> = BTreeMap::new();
        for (sql, is_live) in [(live, true), (superseded, false)] {
            let rows: Vec<(i64, i64, Option<i64>)> = with_pool!(self.db, pool => {
                sqlx::query(&sql).bind(from).bind(to).fetch_all(pool).await
                    .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
            })
            .map_err(|e| format!("cannot count the buckets of {name}: {e}"))?;
            for (bucket, count, run) in rows {
                let info = buckets.entry(bucket).or_insert(BucketInfo {
                    bucket,
                    rows: 0,
                    superseded_rows: 0,
                    superseded_by: None,
                });
                if is_live {
                    info.rows = count;
                } else {
                    info.superseded_rows = count;
                    info.superseded_by = run;
                }
            }
        }
        Ok(buckets.into_values().collect())
    }

    /// Swaps out the whole buckets inside `[from, to)`: their rows move to
    /// the superseded table, marked with `run`, records arriving later for
    /// them go there too, and the stream's views lose them, all in one
    /// transaction (ingest into the stream waits meanwhile). Views lose the
    /// swapped rows: a rows view the same rows, a view bucketed on the
    /// stream's time by a width that divides its bucket whole buckets, any
    /// other is rebuilt.
    pub async fn swap(&self, name: &str, from: i64, to: i64, run: i64) -> Result<Swap, String> {
        let (stream, width) = self.bucketed(name)?;
        let from_bucket =
            from.div_euclid(width) * width + if from.rem_euclid(width) > 0 { width } else { 0 };
        let to_bucket = to.div_euclid(width) * width;
        let mut swap = Swap {
            stream: name.to_string(),
            from_bucket,
            to_bucket,
            rows: 0,
            run,
        };
        if from_bucket >= to_bucket {
            return Ok(swap);
        }
        let backend = self.db.backend();
        let fgs = stream.superseded_table();
        let period = format!("{BUCKET_COLUMN} >= {from_bucket} AND {BUCKET_COLUMN} < {to_bucket}");
        let mut sources = vec![stream.name.clone()];
        if stream.tiered() {
            sources.push(stream.cold_table());
            if stream.def.key.is_some() {
                sources.push(stream.cold_keys_table());
            }
        }
        let cold = stream.tiered().then(|| {
            let bucket = stream.cold_value(BUCKET_COLUMN);
            let rows = format!("{bucket} >= {from_bucket} AND {bucket} < {to_bucket}");
            let chunks = format!("first_bucket < {to_bucket} AND last_bucket >= {from_bucket}");
            let repack = stream.remove_from_cold_sql(&chunks, &rows);
            (rows, chunks, repack)
        });
        let time = stream
            .bucket()
            .map(|(time, _)| time.to_string())
            .unwrap_or_default();
        let rebuilds: Vec<String> = self
            .views
            .plans()
            .iter()
            .filter(|plan| plan.source() == name)
            .flat_map(|plan| {
                // What leaves the view: the same rows (a rows view keeps
                // their bucket), or whole view buckets that lie inside the
                // swapped ones; otherwise a rebuild from what stays.
                let removed = match &plan.bucket {
                    _ if plan.rows.is_some() => Some(period.clone()),
                    Some((column, view_width)) if *column == time && width % view_width == 0 => {
                        Some(format!(
                            "{BUCKET} >= {from_bucket} AND {BUCKET} < {to_bucket}"
                        ))
                    }
                    _ => None,
                };
                match removed {
                    Some(condition) => [plan.table(), plan.tail()]
                        .map(|table| format!("DELETE FROM {table} WHERE {condition}"))
                        .to_vec(),
                    None => plan.rebuild_sql(&stream.read_from()),
                }
            })
            .collect();
        // Ingest waits, and so does a tier move (which could otherwise
        // copy rows to the cold tier that this swap also moves).
        let lock = format!(
            "LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
            sources.join(", ")
        );
        let now = fleetgate_protocol::unix_now_ms();
        let (settle, mark) = self.views.around_removal(name);
        swap.rows = with_pool!(self.db, pool => async {
            let mut tx = pool.begin().await?;
            if backend == Backend::Postgres {
                sqlx::query(&lock).execute(&mut *tx).await?;
            }
            for statement in &settle {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO fleetgate_superseded (stream, from_bucket, to_bucket, run, at) VALUES ($1, $2, $3, $4, $5)")
                .bind(name).bind(from_bucket).bind(to_bucket).bind(run).bind(now)
                .execute(&mut *tx).await?;
            // The columns as they are now (the lock keeps compaction out).
            let columns: Vec<String> = sqlx::query_scalar(physical_columns_sql(backend))
                .bind(name).fetch_all(&mut *tx).await?;
            let copy = format!(
                "INSERT INTO {fgs} ({}, {SUPERSEDED_BY}) SELECT {}, {run} FROM {} \
                 WHERE {period} ON CONFLICT DO NOTHING",
                columns.join(", "), columns.join(", "), stream.name
            );
            sqlx::query(&copy).execute(&mut *tx).await?;
            let delete = format!("DELETE FROM {} WHERE {period}", stream.name);
            let mut moved = sqlx::query(&delete).execute(&mut *tx).await?.rows_affected();
            if let Some((rows, chunks, repack)) = &cold {
                let copy = format!(
                    "INSERT INTO {fgs} ({}, {SUPERSEDED_BY}) SELECT {}, {run} FROM {} \
                     WHERE {chunks} AND {rows} ON CONFLICT DO NOTHING",
                    columns.join(", "), stream.cold_as_stored(&columns), stream.cold_rows()
                );
                moved += sqlx::query(&copy).execute(&mut *tx).await?.rows_affected();
                for statement in repack {
                    sqlx::query(statement).execute(&mut *tx).await?;
                }
                if stream.def.key.is_some() {
                    let keys = format!("DELETE FROM {} WHERE {period}", stream.cold_keys_table());
                    sqlx::query(&keys).execute(&mut *tx).await?;
                }
            }
            for statement in rebuilds.iter().chain(&mark) {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(moved)
        }.await)
        .map_err(|e| format!("cannot swap out {name}'s buckets: {e}"))?;
        tracing::info!(
            stream = name,
            from_bucket,
            to_bucket,
            rows = swap.rows,
            run,
            "superseded buckets swapped out"
        );
        Ok(swap)
    }
}
