//! Retention and tiering. A stream declared with `hot = "3h"` keeps rows
//! received within that time in its table (the hot tier, which ingest
//! writes and the view triggers watch) and moves older ones to its cold
//! tier, `fgc_<stream>`: compressed chunks of rows ([`crate::catalog::cold`]).
//! With `ttl = "30d"` older rows are deleted from both. Queries name the
//! stream and read both tiers ([`crate::expand`]).
//!
//! Views are unaffected by a move (the rows still exist), and follow a
//! deletion in the same transaction: a view bucketed on `received_at`
//! loses its buckets before the cut-off, which is rounded down to whole
//! buckets of every such view; any other view is rebuilt from what remains.
//! A view declared with a `ttl` of its own (longer than the stream's)
//! keeps the buckets of expired rows, and loses them at its own ttl.

use std::sync::Arc;
use std::time::Duration;

use fleetgate_protocol::schema::{RECEIVED_AT, ROW_ID};
use serde::Serialize;
use sqlx::Row;

use crate::catalog::{cold, physical_columns_sql, Catalog, Stream};
use crate::db::{Backend, Db};
use crate::views::Views;
use crate::with_pool;

pub struct Tiers {
    db: Db,
    catalog: Catalog,
    views: Arc<Views>,
    /// Per view with a ttl of its own, the cut-off it last expired to: a
    /// cut-off moves a whole bucket at a time, so until it moves there is
    /// nothing new to delete.
    view_cutoffs: std::sync::Mutex<std::collections::HashMap<String, i64>>,
}

/// Rows and time span of each tier, for `GET /v1/streams/{name}/tiers`.
#[derive(Debug, Clone, Serialize)]
pub struct TierStats {
    pub stream: String,
    pub hot: Option<String>,
    pub ttl: Option<String>,
    pub hot_rows: i64,
    pub cold_rows: i64,
    /// Oldest and newest `received_at` (unix ms) in each tier.
    pub hot_span: Option<(i64, i64)>,
    pub cold_span: Option<(i64, i64)>,
    /// The cold tier's chunks, and the bytes they take stored (compressed).
    pub cold_chunks: i64,
    pub cold_bytes: i64,
}

impl Tiers {
    pub fn new(db: Db, catalog: Catalog, views: Arc<Views>) -> Tiers {
        Tiers {
            db,
            catalog,
            views,
            view_cutoffs: Default::default(),
        }
    }

    /// Moves and expires rows every second.
    pub fn follow(self: Arc<Self>) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.round(fleetgate_protocol::unix_now_ms()).await;
            }
        });
    }

    /// Expires, then moves, the rows of every stream that asks for it,
    /// and expires the buckets of views with a ttl of their own.
    pub async fn round(&self, now_ms: i64) {
        match self.expire_views(now_ms).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(buckets = n, "expired view buckets deleted"),
            Err(e) => tracing::warn!(error = %e, "cannot expire view buckets"),
        }
        for stream in self.catalog.list() {
            match self.expire(&stream, now_ms).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(stream = %stream.name, rows = n, "expired rows deleted"),
                Err(e) => tracing::warn!(stream = %stream.name, error = %e, "cannot expire rows"),
            }
            match self.move_cold(&stream, now_ms).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(stream = %stream.name, rows = n, "rows moved to the cold tier")
                }
                Err(e) => {
                    tracing::warn!(stream = %stream.name, error = %e, "cannot move rows to the cold tier")
                }
            }
        }
    }

    /// A condition that spares the newest row of a keyless SQLite stream:
    /// SQLite gives a new row the largest id plus one, so the row holding
    /// the largest id must stay, or ids of moved rows would be reused.
    fn keep_newest_id(&self, stream: &Stream) -> String {
        if stream.def.key.is_none() && self.db.backend() == Backend::Sqlite {
            format!(
                " AND {ROW_ID} < (SELECT max({ROW_ID}) FROM {})",
                stream.name
            )
        } else {
            String::new()
        }
    }

    /// Moves rows older than the stream's `hot` to its cold tier, a chunk
    /// per transaction; returns how many.
    pub async fn move_cold(&self, stream: &Stream, now_ms: i64) -> Result<u64, String> {
        let Some(hot) = stream.def.hot_after()? else {
            return Ok(0);
        };
        let cutoff = now_ms - hot.as_millis() as i64;
        let name = &stream.name;
        let spare = self.keep_newest_id(stream);
        let mut moved = 0;
        loop {
            let chunk_sql = format!(
                "SELECT {RECEIVED_AT} FROM {name} WHERE {RECEIVED_AT} < $1 \
                 ORDER BY {RECEIVED_AT} LIMIT 1 OFFSET {}",
                cold::CHUNK_ROWS - 1
            );
            let chunk_end: Option<i64> = with_pool!(self.db, pool => {
                sqlx::query_scalar(&chunk_sql).bind(cutoff).fetch_optional(pool).await
            })
            .map_err(|e| e.to_string())?;
            // Rows sharing one timestamp move together (a chunk may hold
            // more than CHUNK_ROWS when many share the last one).
            let upto = chunk_end.map_or(cutoff, |end| end + 1).min(cutoff);
            let folded = self.views.folded_in_every_view(name);
            let condition = format!("{RECEIVED_AT} < $1{spare}{folded}");
            let (backend, lock) = (
                self.db.backend(),
                format!("LOCK TABLE {name} IN ACCESS SHARE MODE"),
            );
            let (settle, mark) = self.views.around_removal(name);
            // One transaction: a row is in exactly one tier at any commit.
            let packed = with_pool!(self.db, pool => async {
                let mut tx = pool.begin().await?;
                if backend == Backend::Postgres {
                    sqlx::query(&lock).execute(&mut *tx).await?;
                }
                for statement in &settle {
                    sqlx::query(statement).execute(&mut *tx).await?;
                }
                let physical: Vec<String> = sqlx::query_scalar(physical_columns_sql(backend))
                    .bind(name).fetch_all(&mut *tx).await?;
                let chunk = stream
                    .move_to_cold_sql(&physical, &condition)
                    .map_err(sqlx::Error::Protocol)?;
                let packed: Option<i64> = sqlx::query_scalar(&chunk.pack)
                    .bind(upto).fetch_optional(&mut *tx).await?;
                for statement in &chunk.after {
                    sqlx::query(statement).bind(upto).execute(&mut *tx).await?;
                }
                for statement in &mark {
                    sqlx::query(statement).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>(packed.unwrap_or(0) as u64)
            }.await)
            .map_err(|e| e.to_string())?;
            moved += packed;
            if chunk_end.is_none() || upto >= cutoff || packed == 0 {
                return Ok(moved);
            }
        }
    }

    /// Packs into chunks each cold tier an earlier version kept as a plain
    /// table, in one transaction per stream, so a query sees each row in
    /// exactly one of the two. Run at start-up; returns the rows packed.
    pub async fn pack_plain_cold_tiers(&self) -> Result<u64, String> {
        let backend = self.db.backend();
        let mut total = 0;
        for stream in self.catalog.list().into_iter().filter(|s| s.tiered()) {
            let cold = stream.cold_table();
            let columns: Vec<String> = with_pool!(self.db, pool => {
                sqlx::query_scalar(physical_columns_sql(backend)).bind(&cold).fetch_all(pool).await
            })
            .map_err(|e| e.to_string())?;
            if !columns.iter().any(|c| c == RECEIVED_AT) {
                continue;
            }
            let ddl = stream.replace_plain_cold_ddl(self.db.auto_id_column("chunk"));
            let plain = stream.plain_cold_table();
            let chunk_end = format!(
                "SELECT {RECEIVED_AT} FROM {plain} ORDER BY {RECEIVED_AT} LIMIT 1 OFFSET {}",
                cold::CHUNK_ROWS - 1
            );
            let chunk = stream
                .pack_plain_cold_sql(&columns, &format!("{RECEIVED_AT} < $1"))
                .map_err(|e| format!("cannot pack the cold tier of {}: {e}", stream.name))?;
            let drop = format!("DROP TABLE {plain}");
            // Processes starting together: one packs, the others find it done.
            let lock = format!("SELECT pg_advisory_xact_lock(hashtext('{cold}'))");
            let packed = with_pool!(self.db, pool => async {
                let mut tx = pool.begin().await?;
                if backend == Backend::Postgres {
                    sqlx::query(&lock).execute(&mut *tx).await?;
                }
                let now: Vec<String> = sqlx::query_scalar(physical_columns_sql(backend))
                    .bind(&cold).fetch_all(&mut *tx).await?;
                if now != columns {
                    return Ok(0);
                }
                for statement in &ddl {
                    sqlx::query(statement).execute(&mut *tx).await?;
                }
                let mut packed = 0;
                loop {
                    let end: Option<i64> =
                        sqlx::query_scalar(&chunk_end).fetch_optional(&mut *tx).await?;
                    let upto = end.map_or(i64::MAX, |end| end + 1);
                    let rows: Option<i64> =
                        sqlx::query_scalar(&chunk.pack).bind(upto).fetch_optional(&mut *tx).await?;
                    for statement in &chunk.after {
                        sqlx::query(statement).bind(upto).execute(&mut *tx).await?;
                    }
                    packed += rows.unwrap_or(0) as u64;
                    if end.is_none() || rows.is_none() {
                        break;
                    }
                }
                sqlx::query(&drop).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(packed)
            }.await)
            .map_err(|e| format!("cannot pack the cold tier of {}: {e}", stream.name))?;
            tracing::info!(stream = %stream.name, rows = packed, "plain cold tier packed into compressed chunks");
            total += packed;
        }
        Ok(total)
    }

    /// Deletes the buckets older than its own ttl from each view that has
    /// one, whole buckets, never sooner than its stream's rows expire (a
    /// stream's ttl may have been lengthened since); returns how many
    /// bucket rows.
    pub async fn expire_views(&self, now_ms: i64) -> Result<u64, String> {
        let mut deleted = 0;
        for plan in self.views.plans() {
            let (Some(ttl), Some((_, width))) = (plan.ttl, &plan.bucket) else {
                continue;
            };
            let Some(stream) = self.catalog.get(plan.source()) else {
                continue;
            };
            let Some(stream_ttl) = stream.def.ttl()? else {
                continue;
            };
            let kept = ttl.max(stream_ttl).as_millis() as i64;
            let cutoff = (now_ms - kept).div_euclid(*width) * width;
            let last = self
                .view_cutoffs
                .lock()
                .expect("cut-offs")
                .get(&plan.name)
                .copied();
            if last == Some(cutoff) {
                continue;
            }
            // A watermark view first takes in its unfolded rows, so none
            // of them brings back a bucket once it is gone.
            let settle = plan.settle_sql();
            let deletes = [plan.table(), plan.tail()].map(|table| {
                format!(
                    "DELETE FROM {table} WHERE {} < $1",
                    crate::views::def::BUCKET
                )
            });
            deleted += with_pool!(self.db, pool => async {
                let mut tx = pool.begin().await?;
                for statement in &settle {
                    sqlx::query(statement).execute(&mut *tx).await?;
                }
                let mut deleted = 0;
                for statement in &deletes {
                    deleted += sqlx::query(statement).bind(cutoff).execute(&mut *tx).await?.rows_affected();
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>(deleted)
            }.await)
            .map_err(|e| format!("view {}: {e}", plan.name))?;
            self.view_cutoffs
                .lock()
                .expect("cut-offs")
                .insert(plan.name.clone(), cutoff);
        }
        Ok(deleted)
    }

    /// Deletes rows older than the stream's `ttl` from both tiers, and
    /// takes them out of its views in the same transaction; returns how
    /// many rows.
    pub async fn expire(&self, stream: &Stream, now_ms: i64) -> Result<u64, String> {
        let Some(ttl) = stream.def.ttl()? else {
            return Ok(0);
        };
        // A view with a ttl of its own keeps the buckets of expired rows.
        let plans: Vec<_> = self
            .views
            .plans()
            .into_iter()
            .filter(|p| p.source() == stream.name && p.ttl.is_none())
            .collect();
        // Whole buckets of every view bucketed on received_at: those views
        // then lose whole buckets, exactly the deleted rows.
        let step = plans
            .iter()
            .filter_map(|p| match &p.bucket {
                Some((column, width)) if column == RECEIVED_AT => Some(*width),
                _ => None,
            })
            .fold(1, lcm);
        let cutoff = (now_ms - ttl.as_millis() as i64).div_euclid(step) * step;
        let (name, spare) = (&stream.name, self.keep_newest_id(stream));
        let any_sql = format!(
            "SELECT 1 FROM {name} WHERE {RECEIVED_AT} < $1{spare} {}",
            if stream.tiered() {
                format!(
                    "UNION ALL SELECT 1 FROM {} WHERE first_at < $1",
                    stream.cold_table()
                )
            } else {
                String::new()
            }
        );
        let due: Option<i32> = with_pool!(self.db, pool => {
            sqlx::query_scalar(&format!("SELECT 1 FROM ({any_sql}) AS due LIMIT 1"))
                .bind(cutoff)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| e.to_string())?;
        if due.is_none() {
            return Ok(0);
        }

        let backend = self.db.backend();
        let hot_delete = format!("DELETE FROM {name} WHERE {RECEIVED_AT} < $1{spare}");
        // Cold rows: their keys, whole chunks, then the rows of the chunk
        // that straddles the cut-off.
        let (mut cold_count, mut cold_deletes) = (None, Vec::new());
        if stream.tiered() {
            let cold = stream.cold_table();
            let expired = format!("{} < $1", stream.cold_value(RECEIVED_AT));
            cold_count = Some(format!(
                "SELECT count(*) FROM {} WHERE first_at < $1 AND {expired}",
                stream.cold_rows()
            ));
            cold_deletes.extend(stream.forget_cold_keys_sql("first_at < $1", &expired));
            cold_deletes.push(format!("DELETE FROM {cold} WHERE last_at < $1"));
            cold_deletes.extend(stream.remove_from_cold_sql("first_at < $1", &expired));
        }
        let mut view_updates = Vec::new();
        for plan in &plans {
            match &plan.bucket {
                Some((column, _)) if column == RECEIVED_AT => {
                    for table in [plan.table(), plan.tail()] {
                        view_updates.push(format!(
                            "DELETE FROM {table} WHERE {} < $1",
                            crate::views::def::BUCKET
                        ));
                    }
                }
                // A rows view holds each row's receive time: the same rows go.
                _ if plan.rows.is_some() => {
                    for table in [plan.table(), plan.tail()] {
                        view_updates.push(format!(
                            "DELETE FROM {table} WHERE {RECEIVED_AT} < $1{spare}"
                        ));
                    }
                }
                // Min and max cannot be taken back: rebuilt from the rows
                // that remain.
                _ => view_updates.extend(plan.rebuild_sql(&stream.read_from())),
            }
        }
        let lock = format!("LOCK TABLE {name} IN SHARE ROW EXCLUSIVE MODE");
        let (settle, mark) = self.views.around_removal(name);
        with_pool!(self.db, pool => async {
            let mut tx = pool.begin().await?;
            // Ingest waits while views are rebuilt, so none of its rows is
            // counted twice or missed. (SQLite has one writer anyway.)
            if backend == Backend::Postgres && !plans.is_empty() {
                sqlx::query(&lock).execute(&mut *tx).await?;
            }
            for statement in &settle {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            let mut deleted = sqlx::query(&hot_delete).bind(cutoff).execute(&mut *tx).await?.rows_affected();
            if let Some(count) = &cold_count {
                let cold: i64 = sqlx::query_scalar(count).bind(cutoff).fetch_one(&mut *tx).await?;
                deleted += cold as u64;
            }
            for statement in &cold_deletes {
                let query = sqlx::query(statement);
                let query = if statement.contains("$1") { query.bind(cutoff) } else { query };
                query.execute(&mut *tx).await?;
            }
            for statement in &view_updates {
                let query = sqlx::query(statement);
                // Rebuilds take no cut-off.
                let query = if statement.contains("$1") { query.bind(cutoff) } else { query };
                query.execute(&mut *tx).await?;
            }
            for statement in &mark {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(deleted)
        }.await)
        .map_err(|e| e.to_string())
    }

    pub async fn stats(&self, stream: &Stream) -> Result<TierStats, String> {
        let span = |table: &str| {
            format!("SELECT count(*), min({RECEIVED_AT}), max({RECEIVED_AT}) FROM {table}")
        };
        let read = |sql: String| async move {
            with_pool!(self.db, pool => {
                sqlx::query(&sql).fetch_one(pool).await.map(|r| {
                    let rows: i64 = r.get(0);
                    let span = match (r.get::<Option<i64>, _>(1), r.get::<Option<i64>, _>(2)) {
                        (Some(a), Some(b)) => Some((a, b)),
                        _ => None,
                    };
                    (rows, span)
                })
            })
            .map_err(|e| e.to_string())
        };
        let (hot_rows, hot_span) = read(span(&stream.name)).await?;
        let (cold_rows, cold_span, cold_chunks, cold_bytes) = if stream.tiered() {
            let sql = stream.cold_stats_sql();
            with_pool!(self.db, pool => {
                sqlx::query(&sql).fetch_one(pool).await.map(|r| {
                    let span = match (r.get::<Option<i64>, _>(1), r.get::<Option<i64>, _>(2)) {
                        (Some(a), Some(b)) => Some((a, b)),
                        _ => None,
                    };
                    (r.get::<i64, _>(0), span, r.get::<i64, _>(3), r.get::<i64, _>(4))
                })
            })
            .map_err(|e| e.to_string())?
        } else {
            (0, None, 0, 0)
        };
        Ok(TierStats {
            stream: stream.name.clone(),
            hot: stream.def.hot.clone(),
            ttl: stream.def.ttl.clone(),
            hot_rows,
            cold_rows,
            hot_span,
            cold_span,
            cold_chunks,
            cold_bytes,
        })
    }
}

fn lcm(a: i64, b: i64) -> i64 {
    fn gcd(a: i64, b: i64) -> i64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    a / gcd(a, b) * b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::{auto::AutoSettings, ViewsFile};

    /// A realtime view on SQLite holds rows up to its watermark; rows after
    /// it are read at query time. Expiry and tier moves that take out rows
    /// not yet folded, including the rows with the largest rowids (which
    /// SQLite then hands out again), must leave the view answering exactly
    /// what the table holds.
    #[tokio::test]
    async fn watermark_views_stay_exact_through_expiry_and_tier_moves() {
        let (_dir, db, catalog) = crate::catalog::scratch_store(
            "[streams.meter]\nkey = [\"seq\"]\nttl = \"1h\"\nhot = \"10m\"\n\
             fields.seq = { type = \"int\", required = true }\nfields.kwh = { type = \"float\" }\n",
        )
        .await;
        let views = Arc::new(
            Views::open(db.clone(), catalog.clone(), AutoSettings::off())
                .await
                .unwrap(),
        );
        let file = ViewsFile::parse(
            "[views.by_device]\nsource = \"meter\"\ngroup_by = [\"device_id\"]\n\
             aggregates = { n = \"count(*)\", total = \"sum(kwh)\", peak = \"max(kwh)\" }\n\
             [views.by_minute]\nsource = \"meter\"\n\
             bucket = { column = \"received_at\", width = \"1m\" }\n\
             aggregates = { n = \"count(*)\", total = \"sum(kwh)\" }\n",
        )
        .unwrap();
        views.create(&file).await.unwrap();
        let plans = views.plans();
        assert!(
            plans.iter().all(|p| p.watermark),
            "realtime views on SQLite"
        );
        let tiers = Tiers::new(db.clone(), catalog.clone(), views.clone());
        let now = 10 * 3_600_000;
        let minute = 60_000;
        let insert = |seq: i64, device: &str, at: i64| {
            let sql = format!(
                "INSERT INTO meter (device_id, received_at, seq, kwh, extra) \
                 VALUES ('{device}', {at}, {seq}, {}.5, '{{}}')",
                seq % 7
            );
            let db = db.clone();
            async move { db.execute_ddl(&[sql]).await.unwrap() }
        };
        // What the view answers, against the table (both tiers), per
        // device and per minute.
        let check = |what: &'static str| {
            let (db, plans, catalog) = (db.clone(), plans.clone(), catalog.clone());
            async move {
                let table = catalog.get("meter").unwrap().read_from();
                for plan in &plans {
                    let (group, on_table) = match plan.name.as_str() {
                        "by_device" => ("device_id", "device_id"),
                        _ => ("fg_bucket", "(received_at / 60000) * 60000"),
                    };
                    let through_view = format!(
                        "SELECT {group} AS g, sum(fg_rows) AS n, sum(kwh__sum) AS s FROM {} \
                         GROUP BY 1 ORDER BY 1",
                        plan.read_from()
                    );
                    let direct = format!(
                        "SELECT {on_table} AS g, count(*) AS n, sum(kwh) AS s FROM {table} \
                         GROUP BY 1 ORDER BY 1"
                    );
                    let rows = |sql: String| {
                        let db = db.clone();
                        async move {
                            with_pool!(db, pool => {
                                sqlx::query_as::<_, (String, i64, f64)>(&format!(
                                    "SELECT CAST(g AS TEXT), n, s FROM ({sql}) AS q"
                                ))
                                .fetch_all(pool)
                                .await
                            })
                            .unwrap()
                        }
                    };
                    assert_eq!(
                        rows(through_view).await,
                        rows(direct).await,
                        "{} {what}",
                        plan.name
                    );
                }
            }
        };
        // Recent rows first, then old ones: the old ones hold the largest
        // rowids. Half are folded, half are not.
        for seq in 1..=20 {
            insert(seq, ["a", "b"][seq as usize % 2], now - seq * minute).await;
        }
        for plan in &plans {
            views.fold(plan).await.unwrap();
        }
        for seq in 21..=40 {
            insert(
                seq,
                ["a", "b", "c"][seq as usize % 3],
                now - 2 * 3_600_000 + seq,
            )
            .await;
        }
        check("with rows after the watermark").await;
        // Older than the ttl: 21..=40 go, all of them unfolded, and the
        // newest rowids with them.
        let stream = catalog.get("meter").unwrap();
        assert_eq!(tiers.expire(&stream, now).await.unwrap(), 20);
        check("after expiry").await;
        // New rows get the rowids the expired ones had.
        for seq in 41..=45 {
            insert(seq, "d", now - minute).await;
        }
        check("after rowids are handed out again").await;
        // Older than `hot`, not folded: to the cold tier.
        for seq in 46..=50 {
            insert(seq, "e", now - 30 * minute).await;
        }
        assert!(tiers.move_cold(&stream, now).await.unwrap() > 0);
        check("after a tier move").await;
        for seq in 51..=55 {
            insert(seq, "f", now).await;
        }
        for plan in &plans {
            views.fold(plan).await.unwrap();
        }
        check("folded").await;
    }

    #[test]
    fn whole_buckets_of_every_view_make_the_step() {
        assert_eq!(lcm(1, 3_600_000), 3_600_000);
        assert_eq!(lcm(3_600_000, 86_400_000), 86_400_000);
        assert_eq!(lcm(4, 6), 12);
    }
}
