//! The store stage: group commit.
//!
//! Receivers run the synchronous stages and queue the result here; one writer
//! task commits whatever has queued in a single transaction, then answers
//! every message of that transaction. While a commit runs the next group
//! queues, so batches grow with load and the cost of a commit is shared. The
//! queue is bounded: when it is full, `submit` waits, and a gatekeeper that
//! waits stops reading from its publishers (back-pressure, not buffering).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetgate_protocol::ingest::BoxFuture;
use fleetgate_protocol::schema::BUCKET_COLUMN;
use fleetgate_protocol::{IngestError, IngestMessage, IngestOutcome, IngestService, PendingCommit};
use sqlx::{QueryBuilder, Row};
use tokio::sync::{mpsc, oneshot, watch, Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::bulk::{bind_row, chunk_sizes};
use crate::catalog::{Catalog, Stream, SUPERSEDED_BY};
use crate::db::{is_layout_change, is_transient, Backend, Db};
use crate::metrics::StoreMetrics;
use crate::pipeline::{CommitObserver, Pipeline, Reject, Work};
use crate::state::StateStore;
use crate::values::{ColumnKind, SqlValue};
use crate::with_pool;

pub struct WriterConfig {
    /// Messages that may wait for a commit before `submit` waits.
    pub queue_capacity: usize,
    /// Records (valid and rejected) that may wait for a commit, across all
    /// messages: a message's size, not only their number, is back-pressure.
    pub queue_records: usize,
    /// Records per transaction at most.
    pub max_group_records: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            queue_capacity: 8192,
            queue_records: 200_000,
            max_group_records: 20_000,
        }
    }
}

struct Job {
    work: Work,
    done: oneshot::Sender<Result<IngestOutcome, IngestError>>,
    /// This message's share of the queue's record budget, returned when the
    /// job is answered.
    _budget: OwnedSemaphorePermit,
}

/// The store's ingest front door ([`IngestService`]).
pub struct Store {
    pipeline: Arc<Pipeline>,
    states: Arc<StateStore>,
    jobs: mpsc::Sender<Job>,
    budget: Arc<Semaphore>,
    budget_size: usize,
    metrics: StoreMetrics,
    closing: watch::Sender<bool>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Store {
    pub fn start(
        db: Db,
        catalog: Catalog,
        pipeline: Pipeline,
        config: WriterConfig,
        observers: Vec<Arc<dyn CommitObserver>>,
        metrics: StoreMetrics,
        states: Arc<StateStore>,
    ) -> Store {
        let (jobs, queue) = mpsc::channel(config.queue_capacity);
        let (closing, closing_rx) = watch::channel(false);
        let writer = Writer {
            db,
            catalog,
            observers,
            metrics: metrics.clone(),
            max_group_records: config.max_group_records,
        };
        let handle = tokio::spawn(writer.run(queue, closing_rx));
        Store {
            pipeline: Arc::new(pipeline),
            states,
            jobs,
            budget: Arc::new(Semaphore::new(config.queue_records)),
            budget_size: config.queue_records,
            metrics,
            closing,
            writer: Mutex::new(Some(handle)),
        }
    }

    /// Stops taking messages, commits everything already queued, and returns
    /// once the last commit is answered.
    pub async fn shutdown(&self) {
        let _ = self.closing.send(true);
        if let Some(handle) = self.writer.lock().await.take() {
            let _ = handle.await;
        }
    }
}

impl IngestService for Store {
    fn submit(&self, message: IngestMessage) -> BoxFuture<'_, Result<PendingCommit, IngestError>> {
        Box::pin(async move {
            // Under the version it was routed under, or not at all: the
            // gatekeeper then routes it to a node that holds that version.
            let state = self
                .states
                .resolve(message.state_version, message.received_at_ms)?;
            let work = self.pipeline.run(message, state);
            if let Some(reason) = work.refused {
                // Nothing to store: answered now, without a place in the
                // queue or a commit, so a refused sender costs the store
                // no more than the check.
                let (done, pending) = oneshot::channel();
                let _ = done.send(Ok(IngestOutcome {
                    refused: Some(reason),
                    ..IngestOutcome::default()
                }));
                return Ok(pending);
            }
            let cost = (work.records.len() + work.rejects.len()).clamp(1, self.budget_size) as u32;
            let budget = self
                .budget
                .clone()
                .acquire_many_owned(cost)
                .await
                .map_err(|_| IngestError::ShuttingDown)?;
            let (done, pending) = oneshot::channel();
            self.metrics.queued_messages.inc();
            self.jobs
                .send(Job {
                    work,
                    done,
                    _budget: budget,
                })
                .await
                .map_err(|_| {
                    self.metrics.queued_messages.dec();
                    IngestError::ShuttingDown
                })?;
            Ok(pending)
        })
    }
}

struct Writer {
    db: Db,
    /// Rows are written in each stream's current layout (compaction
    /// changes it while messages wait).
    catalog: Catalog,
    observers: Vec<Arc<dyn CommitObserver>>,
    metrics: StoreMetrics,
    max_group_records: usize,
}

impl Writer {
    async fn run(self, mut queue: mpsc::Receiver<Job>, mut closing: watch::Receiver<bool>) {
        let mut open = true;
        loop {
            let first = tokio::select! {
                job = queue.recv() => job,
                _ = closing.changed(), if open => {
                    // Refuse new messages; what is queued is still committed.
                    queue.close();
                    open = false;
                    continue;
                }
            };
            let Some(first) = first else { break };
            let mut group = vec![first];
            let mut records = size(&group[0]);
            while records < self.max_group_records {
                match queue.try_recv() {
                    Ok(job) => {
                        records += size(&job);
                        group.push(job);
                    }
                    Err(_) => break,
                }
            }
            self.metrics.queued_messages.dec_by(group.len() as i64);
            self.commit_group(group).await;
        }
    }

    async fn commit_group(&self, group: Vec<Job>) {
        let started = Instant::now();
        let works: Vec<&Work> = group.iter().map(|j| &j.work).collect();
        match self.commit_with_retry(&works).await {
            Ok(stored) => self.finish(group, Ok(stored), started),
            // The database is unavailable: nothing is acknowledged, and the
            // devices re-send once it is back.
            Err(e) if is_transient(&e) => self.finish(group, Err(e.to_string()), started),
            Err(e) => {
                // Some message's data broke the transaction: commit each on
                // its own, so the others are not held hostage and the culprit
                // becomes rejects with the database's reason.
                tracing::warn!(error = %e, messages = group.len(), "group commit failed; committing messages one by one");
                self.commit_one_by_one(group).await;
            }
        }
    }

    async fn commit_one_by_one(&self, group: Vec<Job>) {
        for mut job in group {
            let started = Instant::now();
            let mut result = self.commit_with_retry(&[&job.work]).await;
            if let Err(e) = result
                .as_ref()
                .map_err(|e| (is_transient(e), e.to_string()))
            {
                if !e.0 {
                    // The database refuses these records as they are: keep them
                    // as rejects with its reason, so they are neither lost nor
                    // retried forever.
                    let reason = format!("the database refused the record: {}", e.1);
                    let records = std::mem::take(&mut job.work.records);
                    job.work.rejects.extend(records.into_iter().map(|r| Reject {
                        payload: serde_json::Value::Object(r.raw).to_string(),
                        reasons: vec![reason.clone()],
                    }));
                    result = self.commit_with_retry(&[&job.work]).await;
                }
            }
            self.finish(vec![job], result.map_err(|e| e.to_string()), started);
        }
    }

    /// Answers each message of a commit; `stored` says, per message and
    /// valid record, whether the commit stored it.
    fn finish(&self, group: Vec<Job>, result: Result<Vec<Vec<bool>>, String>, started: Instant) {
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(stored) => {
                self.metrics.commits.inc();
                let valid: u64 = group.iter().map(|j| j.work.records.len() as u64).sum();
                let rejected: u64 = group.iter().map(|j| j.work.rejects.len() as u64).sum();
                self.metrics.records_accepted.inc_by(valid);
                self.metrics.records_rejected.inc_by(rejected);
                let mut works = Vec::with_capacity(group.len());
                for (mut job, stored) in group.into_iter().zip(stored) {
                    // From here on a message holds only what was stored, so
                    // observers (live copies) never repeat a re-sent record.
                    let mut flags = stored.into_iter();
                    let before = job.work.records.len();
                    job.work
                        .records
                        .retain(|_| flags.next().expect("a flag per record"));
                    job.work.duplicates = (before - job.work.records.len()) as u32;
                    self.metrics
                        .records_duplicate
                        .inc_by(job.work.duplicates as u64);
                    let outcome = IngestOutcome {
                        stored: job.work.records.len() as u32,
                        duplicates: job.work.duplicates,
                        refused: None,
                        rejected: job.work.rejects.len() as u32,
                        first_reason: job
                            .work
                            .rejects
                            .first()
                            .and_then(|r| r.reasons.first().cloned()),
                    };
                    let _ = job.done.send(Ok(outcome));
                    works.push(job.work);
                }
                for observer in &self.observers {
                    observer.committed(&works);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, messages = group.len(), "commit failed; messages not acknowledged");
                for job in group {
                    let _ = job.done.send(Err(IngestError::Unavailable(e.clone())));
                }
            }
        }
    }

    /// Retries what may succeed on retry (a locked database, a dropped
    /// connection) for about a minute; returns, per message and valid
    /// record, whether it was stored.
    async fn commit_with_retry(&self, works: &[&Work]) -> Result<Vec<Vec<bool>>, sqlx::Error> {
        let mut delay = Duration::from_millis(20);
        let mut attempt = 1;
        loop {
            match commit(&self.db, &self.catalog, works).await {
                // Another process changed a stream's layout (compaction):
                // learn it, and write in it.
                Err(e) if is_layout_change(&e) && attempt < 40 => {
                    tracing::info!(error = %e, "a stream's layout changed; reloading the catalog");
                    if let Err(e) = self.catalog.reload().await {
                        tracing::warn!(error = %e, "cannot reload the stream catalog");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    attempt += 1;
                }
                Err(e) if is_transient(&e) && attempt < 40 => {
                    tracing::warn!(error = %e, attempt, "commit failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    attempt += 1;
                }
                result => return result,
            }
        }
    }
}

fn size(job: &Job) -> usize {
    job.work.records.len() + job.work.rejects.len()
}

/// `items` in statements of [`chunk_sizes`]: a few distinct sizes, so each
/// connection prepares a handful of statements and reuses them.
fn chunks<T>(items: &[T], columns: usize) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    chunk_sizes(items.len(), columns).into_iter().map(move |n| {
        let (now, later) = rest.split_at(n);
        rest = later;
        now
    })
}

/// One value of a row's key, comparable the way the database's unique
/// index compares it (keys are never floats; see `StreamDef::check`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum KeyPart {
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

/// A key column of a row an INSERT … RETURNING gave back.
fn returned_part<R>(row: &R, i: usize, kind: ColumnKind) -> Result<KeyPart, sqlx::Error>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<f64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<bool>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let part = match kind {
        ColumnKind::Int => row.try_get::<Option<i64>, _>(i)?.map(KeyPart::Int),
        ColumnKind::Bool => row.try_get::<Option<bool>, _>(i)?.map(KeyPart::Bool),
        ColumnKind::Text => row.try_get::<Option<String>, _>(i)?.map(KeyPart::Text),
        ColumnKind::Float => row
            .try_get::<Option<f64>, _>(i)?
            .map(|v| KeyPart::of(&SqlValue::Float(v))),
    };
    Ok(part.unwrap_or(KeyPart::Null))
}

/// A row to insert, in the stream's current layout, with the message and
/// record (indices) it came from.
type PendingRow<'a> = (Cow<'a, [SqlValue]>, (usize, usize));

/// A stream's rows for one commit.
struct StreamRows<'a> {
    stream: Arc<Stream>,
    rows: Vec<PendingRow<'a>>,
}

/// Where an INSERT puts rows, and what RETURNING gives back to recognise
/// which of them it stored.
struct InsertInto<'s> {
    /// `INSERT INTO t (columns) ` (then VALUES).
    head: String,
    /// After the VALUES list: conflict handling.
    conflict: String,
    kinds: &'s [ColumnKind],
    /// Bound after each row's values: the superseding run, for the
    /// superseded table.
    run: Option<i64>,
}

/// One transaction: every valid record into its stream table, every reject
/// into the rejects table. Returns, per message and valid record, whether
/// it was stored.
///
/// A keyed stream's record is not stored when its key already is (a
/// re-send: `ON CONFLICT DO NOTHING`, or the cold tier's key trigger), and
/// the caller must know which, so that answers count duplicates apart and
/// `live/` repeats nothing: when not every row went in, such inserts say
/// `RETURNING` the key, and a record is stored exactly when its key comes
/// back. The same key twice in
/// one commit goes to the database once (the first, as the database would
/// keep it), so each returned key names one record.
///
/// A bucketed stream's record for a superseded bucket goes to the
/// superseded table, where the stream's late trigger would send it; the
/// writer sends it there itself, to learn whether it was stored.
async fn commit(
    db: &Db,
    catalog: &Catalog,
    works: &[&Work],
) -> Result<Vec<Vec<bool>>, sqlx::Error> {
    let mut stored: Vec<Vec<bool>> = works.iter().map(|w| vec![false; w.records.len()]).collect();
    // Per stream: its current layout, and the rows to write in it.
    let mut by_stream: HashMap<&str, StreamRows> = HashMap::new();
    let mut rejects = Vec::new();
    for (w, work) in works.iter().enumerate() {
        if let Some(stream) = &work.stream {
            let entry = by_stream.entry(stream.name.as_str()).or_insert_with(|| {
                let current = catalog.get(&stream.name).unwrap_or_else(|| stream.clone());
                StreamRows {
                    stream: current,
                    rows: Vec::new(),
                }
            });
            let current = &entry.stream;
            let same = Arc::ptr_eq(current, stream) || current.columns == stream.columns;
            for (r, record) in work.records.iter().enumerate() {
                let values = if same {
                    Cow::Borrowed(record.values.as_slice())
                } else {
                    Cow::Owned(current.adapt(stream, &record.values))
                };
                entry.rows.push((values, (w, r)));
            }
        }
        for reject in &work.rejects {
            rejects.push((*work, reject));
        }
    }
    with_pool!(db, pool => {
        let mut tx = pool.begin().await?;
        for StreamRows { stream, rows } in by_stream.values() {
            if stream.def.key.is_none() {
                // Nothing can make an insert into a keyless stream a no-op.
                for chunk in chunks(rows, stream.columns.len()) {
                    let mut insert = QueryBuilder::new(&stream.insert_head);
                    insert.push_values(chunk, |mut row, (values, _)| {
                        bind_row(&mut row, values, &stream.kinds);
                    });
                    insert.build().persistent(true).execute(&mut *tx).await?;
                    for (_, (w, r)) in chunk {
                        stored[*w][*r] = true;
                    }
                }
                continue;
            }
            let key_columns = stream.primary_key();
            let positions: Vec<usize> = key_columns
                .iter()
                .map(|k| stream.columns.iter().position(|c| c == k).expect("key columns are insert columns"))
                .collect();
            let key_kinds: Vec<ColumnKind> = positions.iter().map(|&i| stream.kinds[i]).collect();
            let key_of = |values: &[SqlValue]| -> Vec<KeyPart> {
                positions.iter().map(|&i| KeyPart::of(&values[i])).collect()
            };
            // The first of each key in this commit; the others are
            // duplicates of it. (A NULL key part never equals another in
            // SQL, so such rows all go to the database.)
            let mut seen = HashSet::new();
            let mut fresh = Vec::new();
            let mut late: Vec<(i64, Vec<&PendingRow>)> = Vec::new();
            let superseded = match stream.bucket() {
                None => Vec::new(),
                Some(_) => {
                    if db.backend() == Backend::Postgres {
                        // The lock an INSERT takes anyway, taken before the
                        // periods are read: a swap (which locks the table
                        // against it) cannot commit a new period in between.
                        sqlx::query(&format!("LOCK TABLE {} IN ROW EXCLUSIVE MODE", stream.name))
                            .execute(&mut *tx).await?;
                    }
                    sqlx::query_as::<_, (i64, i64, i64)>(
                        "SELECT from_bucket, to_bucket, run FROM fleetgate_superseded WHERE stream = $1",
                    )
                    .bind(stream.name.as_str())
                    .fetch_all(&mut *tx)
                    .await?
                }
            };
            let bucket_at = stream.columns.iter().position(|c| c == BUCKET_COLUMN);
            for row in rows {
                let key = key_of(&row.0);
                if !key.contains(&KeyPart::Null) && !seen.insert(key) {
                    continue;
                }
                let bucket = bucket_at.and_then(|i| match row.0[i] {
                    SqlValue::Int(b) => Some(b),
                    _ => None,
                });
                // The newest run superseding the bucket, as the late trigger picks it.
                let run = bucket.and_then(|b| {
                    superseded.iter().filter(|(from, to, _)| *from <= b && b < *to).map(|p| p.2).max()
                });
                match run {
                    None => fresh.push(row),
                    Some(run) => match late.iter_mut().find(|(r, _)| *r == run) {
                        Some((_, rows)) => rows.push(row),
                        None => late.push((run, vec![row])),
                    },
                }
            }
            let returning = format!(" RETURNING {}", key_columns.join(", "));
            let columns = stream.columns.join(", ");
            let fgs = stream.superseded_table();
            let mut targets = vec![(
                InsertInto {
                    head: stream.insert_head.clone(),
                    conflict: stream.insert_tail.to_string(),
                    kinds: &stream.kinds,
                    run: None,
                },
                fresh,
            )];
            for (run, rows) in late {
                targets.push((
                    InsertInto {
                        head: format!("INSERT INTO {fgs} ({columns}, {SUPERSEDED_BY}) "),
                        conflict: " ON CONFLICT DO NOTHING".to_string(),
                        kinds: &stream.kinds,
                        run: Some(run),
                    },
                    rows,
                ));
            }
            for (into, rows) in &targets {
                let width = stream.columns.len() + usize::from(into.run.is_some());
                let values = |chunk| {
                    let mut insert = QueryBuilder::new(&into.head);
                    insert.push_values(chunk, |mut row, (values, _): &&PendingRow| {
                        bind_row(&mut row, values, into.kinds);
                        if let Some(run) = into.run {
                            row.push_bind(run);
                        }
                    });
                    insert.push(&into.conflict);
                    insert
                };
                // SQLite's RETURNING cost a quarter of ingest (it buffers
                // the rows, the driver hands each over on its own), and
                // a re-send is rare: insert without it under a savepoint,
                // and only when fewer rows went in than were sent undo
                // that and insert again, returning the stored keys.
                // (PostgreSQL returns rows cheaply, and a savepoint there
                // is a subtransaction.)
                if db.backend() == Backend::Sqlite && !rows.is_empty() {
                    sqlx::query("SAVEPOINT fg_keyed").execute(&mut *tx).await?;
                    let mut inserted = 0;
                    for chunk in chunks(rows, width) {
                        let done = values(chunk).build().persistent(true).execute(&mut *tx).await?;
                        inserted += done.rows_affected();
                    }
                    let all = inserted == rows.len() as u64;
                    if !all {
                        sqlx::query("ROLLBACK TO fg_keyed").execute(&mut *tx).await?;
                    }
                    sqlx::query("RELEASE fg_keyed").execute(&mut *tx).await?;
                    if all {
                        for (_, (w, r)) in rows {
                            stored[*w][*r] = true;
                        }
                        continue;
                    }
                }
                for chunk in chunks(rows, width) {
                    let mut insert = values(chunk);
                    insert.push(&returning);
                    let returned = insert.build().persistent(true).fetch_all(&mut *tx).await?;
                    // A row comes back once per row inserted: as many as
                    // were sent means every one was stored (no re-send,
                    // the usual case), and no key needs matching.
                    if returned.len() == chunk.len() {
                        for (_, (w, r)) in chunk {
                            stored[*w][*r] = true;
                        }
                        continue;
                    }
                    let mut waiting: HashMap<Vec<KeyPart>, VecDeque<(usize, usize)>> = HashMap::new();
                    for (values, at) in chunk.iter() {
                        waiting.entry(key_of(values)).or_default().push_back(*at);
                    }
                    for row in &returned {
                        let key = key_kinds
                            .iter()
                            .enumerate()
                            .map(|(i, kind)| returned_part(row, i, *kind))
                            .collect::<Result<Vec<_>, _>>()?;
                        if let Some((w, r)) = waiting.get_mut(&key).and_then(VecDeque::pop_front) {
                            stored[w][r] = true;
                        }
                    }
                }
            }
        }
        for chunk in chunks(&rejects, 5) {
            let mut insert = QueryBuilder::new(
                "INSERT INTO fleetgate_rejects (stream, device_id, received_at, payload, reasons) ",
            );
            insert.push_values(chunk, |mut row, (work, reject)| {
                row.push_bind(work.message.stream.as_str())
                    .push_bind(work.message.device_id.as_str())
                    .push_bind(work.message.received_at_ms)
                    .push_bind(reject.payload.as_str())
                    .push_bind(serde_json::to_string(&reject.reasons).expect("reasons serialize"));
            });
            insert.build().persistent(true).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(stored)
    })
}
