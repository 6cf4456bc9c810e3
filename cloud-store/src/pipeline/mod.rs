//! The ingest pipeline: authorize → decode → validate → enrich → bucket → store → publish live.
//!
//! Each stage is a type with one job. The synchronous stages implement
//! [`Stage`] and run in the receiving task, in the order [`Pipeline::standard`]
//! lists them; [`crate::writer`] is the store stage (group commit) and
//! [`CommitObserver`]s (such as live re-publishing) run after each commit.
//! A new stage is a new type added to that list; no other stage changes.

mod authorize;
mod bucket;
mod decode;
mod enrich;
mod publish_live;
mod validate;

use std::sync::Arc;

use fleetgate_protocol::IngestMessage;
use serde_json::{Map, Value};

pub use authorize::Authorize;
pub use bucket::Bucket;
pub use decode::Decode;
pub use enrich::Enrich;
pub use publish_live::PublishLive;
pub use validate::Validate;

use crate::catalog::{Catalog, Stream};
use crate::state::StateSet;
use crate::values::SqlValue;

/// One record on its way to a stream table.
#[derive(Debug, Clone)]
pub struct Record {
    /// The record as the device sent it.
    pub raw: Map<String, Value>,
    /// Column values in the stream's insert order (filled by Validate and Enrich).
    pub values: Vec<SqlValue>,
}

/// A record (or a whole payload) refused, with every reason.
#[derive(Debug, Clone)]
pub struct Reject {
    pub payload: String,
    pub reasons: Vec<String>,
}

/// One message as it moves through the stages.
#[derive(Debug)]
pub struct Work {
    pub message: IngestMessage,
    /// The cluster state (rules, lookup tables) the message is processed
    /// under: the version it was routed under.
    pub state: Arc<StateSet>,
    /// Set by Authorize once the stream is known to exist.
    pub stream: Option<Arc<Stream>>,
    /// Valid records. After the commit, only those it stored: the writer
    /// drops re-sent keys (`duplicates`) before the observers see them, so
    /// `live/` carries exactly what was stored.
    pub records: Vec<Record>,
    pub rejects: Vec<Reject>,
    /// Valid records the commit did not store because their key was
    /// already stored (set by the writer).
    pub duplicates: u32,
    /// Set when the sender may not write this stream at all: the message
    /// holds nothing, and is answered without being committed.
    pub refused: Option<String>,
}

impl Work {
    pub fn new(message: IngestMessage, state: Arc<StateSet>) -> Work {
        Work {
            message,
            state,
            stream: None,
            records: Vec::new(),
            rejects: Vec::new(),
            duplicates: 0,
            refused: None,
        }
    }

    /// Refuses the whole message: not stored, not even as rejects.
    pub fn refuse(&mut self, reason: String) {
        self.records.clear();
        self.rejects.clear();
        self.refused = Some(reason);
    }

    /// Replaces whatever the message held by one reject of the whole payload.
    fn reject_whole(&mut self, reason: String) {
        const KEEP: usize = 64 * 1024;
        let payload = &self.message.payload[..self.message.payload.len().min(KEEP)];
        self.records.clear();
        self.rejects = vec![Reject {
            payload: storable_text(payload),
            reasons: vec![reason],
        }];
    }
}

/// Raw bytes as text every backend can store: invalid UTF-8 and NUL (which
/// PostgreSQL refuses in TEXT) become U+FFFD.
fn storable_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\0', "\u{FFFD}")
}

/// A synchronous pipeline stage. Returning `Err(reason)` rejects the whole
/// message; per-record problems go into `work.rejects` instead.
pub trait Stage: Send + Sync {
    fn process(&self, work: &mut Work) -> Result<(), String>;
}

/// Called after each commit with the messages it made durable.
pub trait CommitObserver: Send + Sync {
    fn committed(&self, work: &[Work]);
}

pub struct Pipeline {
    stages: Vec<Box<dyn Stage>>,
}

impl Pipeline {
    pub fn standard(catalog: Catalog, max_payload: usize) -> Pipeline {
        Pipeline {
            // Authorize first: a sender that may not write the stream
            // costs no decoding, and its payload is never looked at.
            stages: vec![
                Box::new(Authorize { catalog }),
                Box::new(Decode { max_payload }),
                Box::new(Validate),
                Box::new(Enrich),
                Box::new(Bucket),
            ],
        }
    }

    /// Runs every stage; a stage that rejects the message ends the run, and
    /// the message carries a single reject with the reason. A stage that
    /// refuses it ([`Work::refuse`]) ends the run with nothing to store.
    pub fn run(&self, message: IngestMessage, state: Arc<StateSet>) -> Work {
        let mut work = Work::new(message, state);
        for stage in &self.stages {
            if let Err(reason) = stage.process(&mut work) {
                work.reject_whole(reason);
                break;
            }
            if work.refused.is_some() {
                break;
            }
        }
        work
    }
}
