//! A running query's rows, handed over in batches as the database yields
//! them, so a door can send a large answer without holding it whole.
//!
//! A producer (a blocking thread stepping a SQLite statement, or a task
//! reading a PostgreSQL cursor) sends [`Chunk`]s through a bounded channel:
//! the columns, batches of rows, then the end. While the reader is behind,
//! the producer waits, so a query holds at most [`BATCHES_AHEAD`] batches
//! of [`BATCH_BYTES`] beyond what the door is sending. The query's limits
//! still apply to the whole answer: [`QueryLimits::max_rows`], the byte
//! bound counted over every row sent, and the timeout, which covers the
//! time a slow reader takes too (as PostgreSQL's `statement_timeout` does),
//! so a reader that stops reading cannot hold a database connection.

use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::query::{QueryError, QueryLimits, QueryResult};

/// What a producer sends, in this order: `Columns` once, `Rows` any number
/// of times, `End` once (or an error instead of any of them, which ends the
/// query).
#[derive(Debug)]
pub enum Chunk {
    Columns(Vec<String>),
    Rows(Vec<Vec<Value>>),
    End { truncated: bool },
}

/// A batch is sent once it holds this many rows or bytes (counted as the
/// byte bound counts them), whichever comes first: big enough that the
/// handover costs nothing per row, small enough that the first rows leave
/// early and memory stays bounded.
pub const BATCH_ROWS: usize = 1024;
pub const BATCH_BYTES: usize = 256 << 10;
/// Batches a producer may be ahead of its reader.
pub const BATCHES_AHEAD: usize = 4;

pub type ChunkSender = mpsc::Sender<Result<Chunk, QueryError>>;

/// Collects rows into batches for [`ChunkSender`]s: a producer pushes rows
/// and sends what [`Batcher::push`] hands back.
pub struct Batcher {
    rows: Vec<Vec<Value>>,
    bytes: usize,
}

impl Default for Batcher {
    fn default() -> Self {
        Batcher {
            rows: Vec::with_capacity(BATCH_ROWS),
            bytes: 0,
        }
    }
}

impl Batcher {
    /// Adds a row of `bytes`; returns a full batch to send.
    pub fn push(&mut self, row: Vec<Value>, bytes: usize) -> Option<Chunk> {
        self.rows.push(row);
        self.bytes += bytes;
        (self.rows.len() >= BATCH_ROWS || self.bytes >= BATCH_BYTES).then(|| self.take())
    }

    /// What is left, if anything.
    pub fn rest(&mut self) -> Option<Chunk> {
        (!self.rows.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> Chunk {
        self.bytes = 0;
        Chunk::Rows(std::mem::replace(
            &mut self.rows,
            Vec::with_capacity(BATCH_ROWS),
        ))
    }
}

/// The reading end: the result's columns, then its rows batch by batch.
pub struct RowStream {
    pub columns: Vec<String>,
    receiver: mpsc::Receiver<Result<Chunk, QueryError>>,
    /// A batch read ahead by [`RowStream::wait_for_rows`].
    ahead: Option<Vec<Vec<Value>>>,
    /// Result columns whose 0s and 1s are booleans.
    booleans: Vec<usize>,
    timeout: Duration,
    max_bytes: usize,
    truncated: bool,
    done: bool,
}

impl RowStream {
    /// A channel for a producer, and the stream once it has sent the
    /// columns (or the error that ended the query first).
    pub fn channel() -> (ChunkSender, mpsc::Receiver<Result<Chunk, QueryError>>) {
        mpsc::channel(BATCHES_AHEAD)
    }

    pub async fn open(
        mut receiver: mpsc::Receiver<Result<Chunk, QueryError>>,
        limits: &QueryLimits,
    ) -> Result<RowStream, QueryError> {
        let (timeout, max_bytes) = (limits.timeout, limits.max_bytes);
        let columns = match receiver.recv().await {
            Some(Ok(Chunk::Columns(columns))) => columns,
            Some(Ok(other)) => {
                return Err(QueryError::Database(format!(
                    "the query sent {other:?} before its columns"
                )))
            }
            Some(Err(e)) => return Err(crate::query::classify(e, timeout, max_bytes)),
            None => return Err(QueryError::Timeout(timeout)),
        };
        Ok(RowStream {
            columns,
            receiver,
            ahead: None,
            booleans: Vec::new(),
            timeout,
            max_bytes,
            truncated: false,
            done: false,
        })
    }

    /// Hands back as booleans the 0s and 1s of the result `columns` known
    /// to read a boolean column ([`crate::expand::tiered_bool_outputs`]).
    pub fn restoring_bools(mut self, columns: Vec<usize>) -> RowStream {
        if let Some(rows) = &mut self.ahead {
            restore_bools(rows, &columns);
        }
        self.booleans = columns;
        self
    }

    /// The next batch of rows; `None` once every row was read.
    pub async fn next_batch(&mut self) -> Option<Result<Vec<Vec<Value>>, QueryError>> {
        if let Some(rows) = self.ahead.take() {
            return Some(Ok(rows));
        }
        while !self.done {
            match self.receiver.recv().await {
                Some(Ok(Chunk::Rows(mut rows))) => {
                    restore_bools(&mut rows, &self.booleans);
                    return Some(Ok(rows));
                }
                Some(Ok(Chunk::End { truncated })) => {
                    self.truncated = truncated;
                    self.done = true;
                }
                Some(Ok(Chunk::Columns(_))) => {}
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(crate::query::classify(e, self.timeout, self.max_bytes)));
                }
                // The producer gave up without an end: its reader was
                // slower than the timeout allows.
                None => {
                    self.done = true;
                    return Some(Err(QueryError::Timeout(self.timeout)));
                }
            }
        }
        None
    }

    /// Waits for the first batch (or the end), so that a query failing
    /// early fails before anything is sent.
    pub async fn wait_for_rows(&mut self) -> Result<(), QueryError> {
        if self.ahead.is_none() {
            if let Some(batch) = self.next_batch().await {
                self.ahead = Some(batch?);
            }
        }
        Ok(())
    }

    /// The rows read ahead by [`RowStream::wait_for_rows`], to look at.
    pub fn first_rows(&self) -> &[Vec<Value>] {
        self.ahead.as_deref().unwrap_or_default()
    }

    /// True when more rows matched than `max_rows` allows: known once every
    /// batch was read.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// The whole answer, for a door that sends it in one piece.
    pub async fn collect(mut self) -> Result<QueryResult, QueryError> {
        let mut rows = Vec::new();
        while let Some(batch) = self.next_batch().await {
            let batch = batch?;
            if rows.is_empty() {
                rows = batch;
            } else {
                rows.extend(batch);
            }
        }
        Ok(QueryResult {
            columns: std::mem::take(&mut self.columns),
            rows,
            truncated: self.truncated,
        })
    }
}

fn restore_bools(rows: &mut [Vec<Value>], columns: &[usize]) {
    if columns.is_empty() {
        return;
    }
    for row in rows {
        for &i in columns {
            if let Some(value) = row.get_mut(i) {
                match value.as_i64() {
                    Some(0) => *value = Value::Bool(false),
                    Some(1) => *value = Value::Bool(true),
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_cut_by_rows_or_bytes() {
        let mut batcher = Batcher::default();
        let sent: Vec<Chunk> = (0..BATCH_ROWS + 1)
            .filter_map(|i| batcher.push(vec![Value::from(i)], 8))
            .collect();
        assert_eq!(sent.len(), 1);
        assert!(matches!(&sent[0], Chunk::Rows(rows) if rows.len() == BATCH_ROWS));
        assert!(matches!(batcher.rest(), Some(Chunk::Rows(rows)) if rows.len() == 1));
        assert!(batcher.rest().is_none());

        let big = batcher.push(vec![Value::from("x")], BATCH_BYTES);
        assert!(matches!(big, Some(Chunk::Rows(rows)) if rows.len() == 1));
    }

    #[tokio::test]
    async fn a_producer_that_stops_without_an_end_is_a_timeout() {
        let limits = QueryLimits::default();
        let (sender, receiver) = RowStream::channel();
        sender
            .send(Ok(Chunk::Columns(vec!["a".into()])))
            .await
            .unwrap();
        sender
            .send(Ok(Chunk::Rows(vec![vec![Value::from(1)]])))
            .await
            .unwrap();
        drop(sender);
        let mut stream = RowStream::open(receiver, &limits).await.unwrap();
        assert_eq!(stream.next_batch().await.unwrap().unwrap().len(), 1);
        assert!(matches!(
            stream.next_batch().await,
            Some(Err(QueryError::Timeout(_)))
        ));
        assert!(stream.next_batch().await.is_none());
    }

    #[tokio::test]
    async fn collect_keeps_order_truncation_and_booleans() {
        let limits = QueryLimits::default();
        let (sender, receiver) = RowStream::channel();
        tokio::spawn(async move {
            sender
                .send(Ok(Chunk::Columns(vec!["n".into(), "ok".into()])))
                .await
                .unwrap();
            for n in 0..3 {
                let row = vec![Value::from(n), Value::from(n % 2)];
                sender.send(Ok(Chunk::Rows(vec![row]))).await.unwrap();
            }
            sender
                .send(Ok(Chunk::End { truncated: true }))
                .await
                .unwrap();
        });
        let mut stream = RowStream::open(receiver, &limits).await.unwrap();
        stream.wait_for_rows().await.unwrap();
        let result = stream.restoring_bools(vec![1]).collect().await.unwrap();
        assert_eq!(result.columns, ["n", "ok"]);
        assert!(result.truncated);
        let ok: Vec<&Value> = result.rows.iter().map(|r| &r[1]).collect();
        assert_eq!(
            ok,
            [&Value::Bool(false), &Value::Bool(true), &Value::Bool(false)]
        );
        assert_eq!(result.rows[2][0], Value::from(2));
    }
}
