//! The bounded on-disk queue records wait in until the broker acknowledges
//! them: while the device is offline, across restarts, and in flight.
//!
//! `queue.log` holds entries (`u32 LE length`, `u8 stream length`, stream,
//! payload); `queue.acked` holds the byte offset up to which the broker has
//! acknowledged. The file starts over when everything is acknowledged, and
//! is compacted when a large acknowledged head builds up. Entries are written to the file before publish returns
//! (they survive a process crash) and synced to disk in batches.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// One queued record and the offset just past it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub end: u64,
    pub stream: String,
    pub payload: Vec<u8>,
}

/// Offsets handed out (`Entry::end`, `acked`) are logical: they keep
/// growing while the file is started over or compacted underneath, so a
/// connection's in-flight offsets stay valid. `base` is the logical offset
/// of the file's first byte.
pub struct DiskQueue {
    log: File,
    log_path: PathBuf,
    acked_path: PathBuf,
    base: u64,
    len: u64,
    acked: u64,
    capacity: u64,
    pending_entries: u64,
    dirty: bool,
}

const MAX_ENTRY: u64 = 16 << 20;
/// Acknowledged bytes at the head of the file past which it is compacted
/// (when they are also at least half of it), so a device that is never
/// fully caught up still does not grow its file without end.
const COMPACT_AT: u64 = 1 << 20;

impl DiskQueue {
    /// Opens (or creates) the queue in `dir`, holding at most `capacity`
    /// bytes of unacknowledged entries. A torn last entry is cut off.
    pub fn open(dir: &Path, capacity: u64) -> Result<DiskQueue, String> {
        fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create queue directory {}: {e}", dir.display()))?;
        let log_path = dir.join("queue.log");
        let acked_path = dir.join("queue.acked");
        let mut log = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let mut acked = match fs::read(&acked_path) {
            Ok(bytes) if bytes.len() == 8 => u64::from_le_bytes(bytes.try_into().expect("8 bytes")),
            _ => 0,
        };
        let file_len = log.metadata().map_err(|e| e.to_string())?.len();
        if acked > file_len {
            acked = 0;
        }
        let mut bytes = Vec::new();
        log.seek(SeekFrom::Start(acked))
            .map_err(|e| e.to_string())?;
        log.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
        let (mut at, mut entries) = (0usize, 0u64);
        while let Some((next, _)) = parse(&bytes, at) {
            at = next;
            entries += 1;
        }
        let len = acked + at as u64;
        if len < file_len {
            log.set_len(len)
                .map_err(|e| format!("cannot repair the queue: {e}"))?;
        }
        let _ = fs::remove_file(dir.join("queue.log.new"));
        Ok(DiskQueue {
            log,
            log_path,
            acked_path,
            base: 0,
            len,
            acked,
            capacity,
            pending_entries: entries,
            dirty: false,
        })
    }

    pub fn pending_entries(&self) -> u64 {
        self.pending_entries
    }

    pub fn pending_bytes(&self) -> u64 {
        self.len - self.acked
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Appends a record; refused when the queue is full.
    pub fn push(&mut self, stream: &str, payload: &[u8]) -> Result<(), String> {
        let size = 5 + stream.len() as u64 + payload.len() as u64;
        if size > MAX_ENTRY || stream.len() > u8::MAX as usize {
            return Err(format!("record of {size} bytes is too large to queue"));
        }
        if self.pending_bytes() + size > self.capacity {
            return Err(format!(
                "offline queue is full ({} of {} bytes); records are kept until the broker acknowledges them",
                self.pending_bytes(),
                self.capacity
            ));
        }
        let mut entry = Vec::with_capacity(size as usize);
        entry.extend_from_slice(&((size - 4) as u32).to_le_bytes());
        entry.push(stream.len() as u8);
        entry.extend_from_slice(stream.as_bytes());
        entry.extend_from_slice(payload);
        if let Err(e) = self.log.write_all(&entry) {
            // Cut off whatever part was written, so later entries stay aligned.
            let _ = self.log.set_len(self.len - self.base);
            return Err(format!("cannot write the offline queue: {e}"));
        }
        self.len += size;
        self.pending_entries += 1;
        self.dirty = true;
        Ok(())
    }

    /// Flushes written entries to disk.
    pub fn sync(&mut self) -> Result<(), String> {
        if self.dirty {
            self.log.sync_data().map_err(|e| e.to_string())?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Up to `max` entries starting at byte `from` (an entry boundary).
    pub fn read_from(&mut self, from: u64, max: usize) -> Result<Vec<Entry>, String> {
        if from >= self.len || max == 0 {
            return Ok(Vec::new());
        }
        if from < self.acked {
            return Err(format!("offset {from} was already acknowledged"));
        }
        let physical = from - self.base;
        let want = (self.len - from).min(1 << 20) as usize;
        let mut bytes = vec![0; want];
        self.log
            .seek(SeekFrom::Start(physical))
            .and_then(|_| self.log.read_exact(&mut bytes))
            .map_err(|e| format!("cannot read the offline queue: {e}"))?;
        let mut entries = Vec::new();
        let mut at = 0;
        while entries.len() < max {
            let Some((next, (stream, payload))) = parse(&bytes, at) else {
                break;
            };
            entries.push(Entry {
                end: from + next as u64,
                stream: stream.to_string(),
                payload: payload.to_vec(),
            });
            at = next;
        }
        if entries.is_empty() {
            // An entry larger than the read window: read exactly it.
            let size = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize + 4;
            let mut whole = vec![0; size];
            self.log
                .seek(SeekFrom::Start(physical))
                .and_then(|_| self.log.read_exact(&mut whole))
                .map_err(|e| format!("cannot read the offline queue: {e}"))?;
            if let Some((next, (stream, payload))) = parse(&whole, 0) {
                entries.push(Entry {
                    end: from + next as u64,
                    stream: stream.to_string(),
                    payload: payload.to_vec(),
                });
            }
        }
        Ok(entries)
    }

    /// Records that everything before byte `upto` was acknowledged; when
    /// nothing is left, starts the log over.
    pub fn ack(&mut self, upto: u64, entries: u64) -> Result<(), String> {
        if upto <= self.acked {
            return Ok(());
        }
        self.acked = upto.min(self.len);
        self.pending_entries = self.pending_entries.saturating_sub(entries);
        if self.acked == self.len {
            // Offset 0 first: a crash before the truncation then resends
            // (at least once), never skips.
            self.write_acked(0)?;
            self.log.set_len(0).map_err(|e| e.to_string())?;
            self.base = self.len;
            self.pending_entries = 0;
            return Ok(());
        }
        let head = self.acked - self.base;
        if head >= COMPACT_AT && head * 2 >= self.len - self.base {
            return self.compact();
        }
        self.write_acked(head)
    }

    /// Rewrites the file without its acknowledged head. The order makes a
    /// crash at any point resend (at least once), never skip: the new file
    /// is complete, then the acknowledged offset becomes 0, then the new
    /// file replaces the old.
    fn compact(&mut self) -> Result<(), String> {
        let failed = |e: std::io::Error| format!("cannot compact the offline queue: {e}");
        let mut tail = vec![0; (self.len - self.acked) as usize];
        self.log
            .seek(SeekFrom::Start(self.acked - self.base))
            .and_then(|_| self.log.read_exact(&mut tail))
            .map_err(failed)?;
        let new_path = self.log_path.with_extension("log.new");
        let mut new = File::create(&new_path).map_err(failed)?;
        new.write_all(&tail)
            .and_then(|_| new.sync_all())
            .map_err(failed)?;
        self.write_acked(0)?;
        fs::rename(&new_path, &self.log_path).map_err(failed)?;
        self.log = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.log_path)
            .map_err(failed)?;
        self.base = self.acked;
        self.dirty = false;
        Ok(())
    }

    fn write_acked(&self, offset: u64) -> Result<(), String> {
        let tmp = self.acked_path.with_extension("tmp");
        fs::write(&tmp, offset.to_le_bytes())
            .and_then(|_| fs::rename(&tmp, &self.acked_path))
            .map_err(|e| format!("cannot record acknowledged records: {e}"))
    }
}

/// The entry at `at`, and the offset after it; `None` if incomplete.
fn parse(bytes: &[u8], at: usize) -> Option<(usize, (&str, &[u8]))> {
    let size = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
    let body = bytes.get(at + 4..at + 4 + size)?;
    let stream_len = *body.first()? as usize;
    let stream = std::str::from_utf8(body.get(1..1 + stream_len)?).ok()?;
    Some((at + 4 + size, (stream, &body[1 + stream_len..])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_unacknowledged_entries_across_reopen_and_repairs_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        for i in 0..5u8 {
            queue.push("temperature", &[i; 10]).unwrap();
        }
        let entries = queue.read_from(0, 2).unwrap();
        assert_eq!(entries.len(), 2);
        queue.ack(entries[1].end, 2).unwrap();
        drop(queue);
        // A torn write: half an entry at the end.
        let mut log = OpenOptions::new()
            .append(true)
            .open(dir.path().join("queue.log"))
            .unwrap();
        log.write_all(&[40, 0, 0, 0, 11, b't']).unwrap();
        let mut queue = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(queue.pending_entries(), 3);
        let rest = queue.read_from(queue.acked(), 10).unwrap();
        let payloads: Vec<u8> = rest.iter().map(|e| e.payload[0]).collect();
        assert_eq!(payloads, vec![2, 3, 4]);
        queue.ack(rest[2].end, 3).unwrap();
        assert_eq!((queue.pending_entries(), queue.pending_bytes()), (0, 0));
        assert!(queue.read_from(queue.acked(), 10).unwrap().is_empty());
    }

    #[test]
    fn a_queue_never_fully_caught_up_is_compacted_and_keeps_its_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = DiskQueue::open(dir.path(), 64 << 20).unwrap();
        let record = |n: u32| [&n.to_le_bytes()[..], &[7u8; 1000][..]].concat();
        queue.push("s", &record(0)).unwrap();
        let mut next = 0;
        // One record is always outstanding, so the log never starts over.
        for n in 1..5000u32 {
            queue.push("s", &record(n)).unwrap();
            let oldest = queue.read_from(next, 1).unwrap();
            assert_eq!(oldest[0].payload, record(n - 1), "record {}", n - 1);
            queue.ack(oldest[0].end, 1).unwrap();
            next = oldest[0].end;
        }
        let file = fs::metadata(dir.path().join("queue.log")).unwrap().len();
        assert!(file < 3 << 20, "the log grew to {file} bytes");
        drop(queue);
        // What was not acknowledged is still there after a reopen.
        let mut queue = DiskQueue::open(dir.path(), 64 << 20).unwrap();
        let rest = queue.read_from(queue.acked(), 10).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].payload, record(4999));
    }

    #[test]
    fn refuses_records_beyond_its_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = DiskQueue::open(dir.path(), 100).unwrap();
        queue.push("s", &[0; 60]).unwrap();
        let err = queue.push("s", &[0; 60]).unwrap_err();
        assert!(err.contains("offline queue is full"), "{err}");
        let entries = queue.read_from(0, 10).unwrap();
        queue.ack(entries[0].end, 1).unwrap();
        queue.push("s", &[0; 60]).unwrap();
    }
}
