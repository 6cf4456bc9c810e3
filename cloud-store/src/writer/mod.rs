//! The store stage: group commit.
//!
//! Receivers run the synchronous stages and queue the result here; one writer
//! task commits whatever has queued in a single transaction, then answers
//! every message of that transaction. While a commit runs the next group
//! queues (on PostgreSQL, while two run), so batches grow with load and the
//! cost of a commit is shared. Groups are answered in the order they were
//! taken. The queue is bounded: when it is full, `submit` waits, and a
//! gatekeeper that waits stops reading from its publishers (back-pressure,
//! not buffering). How rows go into a table is [`insert`]'s.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetgate_protocol::ingest::BoxFuture;
use fleetgate_protocol::schema::BUCKET_COLUMN;
use fleetgate_protocol::{IngestError, IngestMessage, IngestOutcome, IngestService, PendingCommit};
use futures::stream::{FuturesOrdered, StreamExt};
use sqlx::QueryBuilder;
use tokio::sync::{mpsc, oneshot, watch, Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::catalog::{Catalog, Stream, SUPERSEDED_BY};
use crate::db::{is_layout_change, is_transient, Backend, Db};
use crate::metrics::StoreMetrics;
use crate::pipeline::{CommitObserver, Pipeline, Reject, Work};
use crate::state::StateStore;
use crate::values::SqlValue;
use crate::with_pool;

mod insert;

use insert::{chunks, InsertInto, InsertRows, KeyColumns, KeyPart};

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
        // PostgreSQL takes concurrent writers: while one commit waits for
        // its WAL flush, the next group's rows go in. SQLite has one writer.
        // Concurrent commits cannot deadlock on what they share: streams go
        // in name order, and a view's trigger merges groups in key order.
        let in_flight = match self.db.backend() {
            Backend::Sqlite => 1,
            Backend::Postgres => POSTGRES_COMMITS_IN_FLIGHT,
        };
        // Answered in the order the groups were taken, whichever commit
        // ends first: acknowledgements and live copies keep arrival order.
        let mut committing = FuturesOrdered::new();
        let mut open = true;
        loop {
            tokio::select! {
                Some(settled) = committing.next(), if !committing.is_empty() => {
                    for commit in settled {
                        self.finish(commit);
                    }
                }
                job = queue.recv(), if committing.len() < in_flight => {
                    let Some(first) = job else { break };
                    let group = self.group_from(first, &mut queue);
                    committing.push_back(self.commit_group(group));
                }
                _ = closing.changed(), if open => {
                    // Refuse new messages; what is queued is still committed.
                    queue.close();
                    open = false;
                }
            }
        }
        while let Some(settled) = committing.next().await {
            for commit in settled {
                self.finish(commit);
            }
        }
    }

    /// `first` and what queued behind it, up to the group's size.
    fn group_from(&self, first: Job, queue: &mut mpsc::Receiver<Job>) -> Vec<Job> {
        let mut records = size(&first);
        let mut group = vec![first];
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
        group
    }

    async fn commit_group(&self, group: Vec<Job>) -> Vec<Settled> {
        let started = Instant::now();
        let works: Vec<&Work> = group.iter().map(|j| &j.work).collect();
        match self.commit_with_retry(&works).await {
            Ok(stored) => vec![Settled::new(group, Ok(stored), started)],
            // The database is unavailable: nothing is acknowledged, and the
            // devices re-send once it is back.
            Err(e) if is_transient(&e) => vec![Settled::new(group, Err(e.to_string()), started)],
            Err(e) => {
                // Some message's data broke the transaction: commit each on
                // its own, so the others are not held hostage and the culprit
                // becomes rejects with the database's reason.
                tracing::warn!(error = %e, messages = group.len(), "group commit failed; committing messages one by one");
                self.commit_one_by_one(group).await
            }
        }
    }

    async fn commit_one_by_one(&self, group: Vec<Job>) -> Vec<Settled> {
        let mut settled = Vec::with_capacity(group.len());
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
            settled.push(Settled::new(
                vec![job],
                result.map_err(|e| e.to_string()),
                started,
            ));
        }
        settled
    }

    /// Answers each message of a commit.
    fn finish(&self, commit: Settled) {
        let Settled {
            group,
            result,
            took,
        } = commit;
        self.metrics.commit_seconds.observe(took.as_secs_f64());
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

/// Commits PostgreSQL runs at once. Two: one inserting while the other
/// waits for its flush. Measured on 2 cores: 80–88k records/s with two,
/// 71–82k with one, and no better with four (smaller groups).
const POSTGRES_COMMITS_IN_FLIGHT: usize = 2;

/// A commit's outcome, waiting for its turn to be answered.
struct Settled {
    group: Vec<Job>,
    /// Per message and valid record, whether the commit stored it.
    result: Result<Vec<Vec<bool>>, String>,
    /// From the start of the commit to its end (not to its answer).
    took: Duration,
}

impl Settled {
    fn new(group: Vec<Job>, result: Result<Vec<Vec<bool>>, String>, started: Instant) -> Settled {
        Settled {
            group,
            result,
            took: started.elapsed(),
        }
    }
}

fn size(job: &Job) -> usize {
    job.work.records.len() + job.work.rejects.len()
}

/// A row to insert, in the stream's current layout, with the message and
/// record (indices) it came from.
type PendingRow<'a> = (Cow<'a, [SqlValue]>, (usize, usize));

/// A stream's rows for one commit.
struct StreamRows<'a> {
    stream: Arc<Stream>,
    rows: Vec<PendingRow<'a>>,
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
        // In name order, so that concurrent commits lock what they share
        // (a view's groups) in one order.
        let mut streams: Vec<&StreamRows> = by_stream.values().collect();
        streams.sort_by(|a, b| a.stream.name.cmp(&b.stream.name));
        for StreamRows { stream, rows } in streams {
            let key = stream.def.key.as_ref().map(|_| {
                KeyColumns::new(&stream.primary_key(), &stream.columns, &stream.kinds)
            });
            let superseded = match (&key, stream.bucket()) {
                (Some(_), Some(_)) => {
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
                _ => Vec::new(),
            };
            for (run, rows) in by_target(stream, key.as_ref(), rows, &superseded) {
                let into = insert_into(stream, key.as_ref(), run);
                let values: Vec<&[SqlValue]> = rows.iter().map(|row| &*row.0).collect();
                let flags = tx.insert_rows(&into, &values).await?;
                for ((_, (w, r)), flag) in rows.iter().zip(flags) {
                    stored[*w][*r] = flag;
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

/// A stream's rows by the table they go to: the stream's own first (`None`),
/// then the superseded table, per superseding run. A keyless stream's rows
/// all go to its table. Of a key twice in one commit only the first goes
/// to the database, as the database would keep it (a NULL key part never
/// equals another in SQL, so such rows all go), so each key the database
/// returns names one record.
fn by_target<'r, 'a>(
    stream: &Stream,
    key: Option<&KeyColumns>,
    rows: &'r [PendingRow<'a>],
    superseded: &[(i64, i64, i64)],
) -> Vec<(Option<i64>, Vec<&'r PendingRow<'a>>)> {
    let Some(key) = key else {
        return vec![(None, rows.iter().collect())];
    };
    let bucket_at = stream.columns.iter().position(|c| c == BUCKET_COLUMN);
    let mut seen = HashSet::new();
    let mut targets: Vec<(Option<i64>, Vec<&PendingRow>)> = vec![(None, Vec::new())];
    for row in rows {
        let parts = key.of(&row.0);
        if !parts.contains(&KeyPart::Null) && !seen.insert(parts) {
            continue;
        }
        let bucket = bucket_at.and_then(|i| match row.0[i] {
            SqlValue::Int(b) => Some(b),
            _ => None,
        });
        // The newest run superseding the bucket, as the late trigger picks it.
        let run = bucket.and_then(|b| {
            superseded
                .iter()
                .filter(|(from, to, _)| *from <= b && b < *to)
                .map(|p| p.2)
                .max()
        });
        match targets.iter_mut().find(|(r, _)| *r == run) {
            Some((_, rows)) => rows.push(row),
            None => targets.push((run, vec![row])),
        }
    }
    targets
}

/// Where rows for `run`'s superseded table, or (`None`) the stream's own,
/// are inserted.
fn insert_into<'s>(
    stream: &'s Stream,
    key: Option<&'s KeyColumns>,
    run: Option<i64>,
) -> InsertInto<'s> {
    match run {
        None => InsertInto {
            head: stream.insert_head.clone(),
            conflict: stream.insert_tail,
            kinds: &stream.kinds,
            run: None,
            key,
        },
        Some(run) => InsertInto {
            head: format!(
                "INSERT INTO {} ({}, {SUPERSEDED_BY}) ",
                stream.superseded_table(),
                stream.columns.join(", ")
            ),
            conflict: " ON CONFLICT DO NOTHING",
            kinds: &stream.kinds,
            run: Some(run),
            key,
        },
    }
}
