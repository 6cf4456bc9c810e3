//! The store stage: group commit.
//!
//! Receivers run the synchronous stages and queue the result here; one writer
//! task commits whatever has queued in a single transaction, then answers
//! every message of that transaction. While a commit runs the next group
//! queues, so batches grow with load and the cost of a commit is shared. The
//! queue is bounded: when it is full, `submit` waits, and a gatekeeper that
//! waits stops reading from its publishers (back-pressure, not buffering).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetgate_protocol::ingest::BoxFuture;
use fleetgate_protocol::{IngestError, IngestMessage, IngestOutcome, IngestService, PendingCommit};
use sqlx::QueryBuilder;
use tokio::sync::{mpsc, oneshot, watch, Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::bulk::{bind_row, chunk_sizes};
use crate::catalog::{Catalog, Stream};
use crate::db::{is_layout_change, is_transient, Db};
use crate::metrics::StoreMetrics;
use crate::pipeline::{CommitObserver, Pipeline, Reject, SqlValue, Work};
use crate::state::StateStore;
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
            Ok(inserted) => self.finish(group, Ok(inserted), started),
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

    fn finish(&self, group: Vec<Job>, result: Result<u64, String>, started: Instant) {
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(inserted) => {
                self.metrics.commits.inc();
                let valid: u64 = group.iter().map(|j| j.work.records.len() as u64).sum();
                let rejected: u64 = group.iter().map(|j| j.work.rejects.len() as u64).sum();
                self.metrics.records_accepted.inc_by(valid);
                self.metrics
                    .records_duplicate
                    .inc_by(valid.saturating_sub(inserted));
                self.metrics.records_rejected.inc_by(rejected);
                let mut works = Vec::with_capacity(group.len());
                for job in group {
                    let outcome = IngestOutcome {
                        stored: job.work.records.len() as u32,
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
    /// connection) for about a minute; returns rows newly inserted.
    async fn commit_with_retry(&self, works: &[&Work]) -> Result<u64, sqlx::Error> {
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

/// One transaction: every valid record into its stream table, every reject
/// into the rejects table. Returns the number of rows newly inserted.
async fn commit(db: &Db, catalog: &Catalog, works: &[&Work]) -> Result<u64, sqlx::Error> {
    // Per stream: its current layout, and the rows to write in it.
    type Rows<'a> = (Arc<Stream>, Vec<Cow<'a, [SqlValue]>>);
    let mut by_stream: HashMap<&str, Rows> = HashMap::new();
    let mut rejects = Vec::new();
    for work in works {
        if let Some(stream) = &work.stream {
            let entry = by_stream.entry(stream.name.as_str()).or_insert_with(|| {
                let current = catalog.get(&stream.name).unwrap_or_else(|| stream.clone());
                (current, Vec::new())
            });
            let current = &entry.0;
            if Arc::ptr_eq(current, stream) || current.columns == stream.columns {
                entry.1.extend(
                    work.records
                        .iter()
                        .map(|r| Cow::Borrowed(r.values.as_slice())),
                );
            } else {
                entry.1.extend(
                    work.records
                        .iter()
                        .map(|r| Cow::Owned(current.adapt(stream, &r.values))),
                );
            }
        }
        for reject in &work.rejects {
            rejects.push((work, reject));
        }
    }
    with_pool!(db, pool => {
        let mut tx = pool.begin().await?;
        let mut inserted = 0;
        for (stream, rows) in by_stream.values() {
            let mut rest = rows.as_slice();
            for chunk in chunk_sizes(rows.len(), stream.columns.len()) {
                let (now, later) = rest.split_at(chunk);
                rest = later;
                let mut insert = QueryBuilder::new(&stream.insert_head);
                insert.push_values(now, |mut row, values| {
                    bind_row(&mut row, values, &stream.kinds);
                });
                insert.push(stream.insert_tail);
                inserted += insert.build().persistent(true).execute(&mut *tx).await?.rows_affected();
            }
        }
        let mut rest = rejects.as_slice();
        for chunk in chunk_sizes(rejects.len(), 5) {
            let (now, later) = rest.split_at(chunk);
            rest = later;
            let mut insert = QueryBuilder::new(
                "INSERT INTO fleetgate_rejects (stream, device_id, received_at, payload, reasons) ",
            );
            insert.push_values(now, |mut row, (work, reject)| {
                row.push_bind(work.message.stream.as_str())
                    .push_bind(work.message.device_id.as_str())
                    .push_bind(work.message.received_at_ms)
                    .push_bind(reject.payload.as_str())
                    .push_bind(serde_json::to_string(&reject.reasons).expect("reasons serialize"));
            });
            insert.build().persistent(true).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(inserted)
    })
}
