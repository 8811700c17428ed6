//! The spool's fast path: small messages appended to segment files, many per disk sync.
//!
//! A file per message costs a create, a sync, a rename, and at the end an unlink that frees its
//! blocks: most of the CPU of queueing a 10 KiB message. Instead, a message that arrived whole in
//! memory is one record appended to the active segment (`queue/seg/NNNNNNNNNN`), and its end is
//! a small "done" record; the committer appends every record waiting at that moment with one
//! write and one `fdatasync`. Segments are deleted oldest first once none of their messages is
//! live (a done record always lies after its message, so a deleted prefix can never bring a
//! message back). Messages that stay (deferred, held) move to their own file ([`super::spool`]),
//! so they do not pin the segments behind them. Every start begins a new segment.
//!
//! The format (version 2): a segment starts with `XRQSEG2\n` and 8 random octets, its sync mark.
//! A record is `sync mark (8) | payload length: u32 LE | kind: u8 | crc32 of the payload: u32 LE |
//! crc32 of the 17 octets before: u32 LE | payload`. The header's own checksum makes its length
//! trustworthy, so a damaged payload costs only its record; a damaged header is stepped over by
//! looking for the next sync mark whose header checks out. The mark is random per segment and the
//! file is private, so a message body cannot carry a record that a resync would take for real. A
//! message's payload is `envelope length: u32 LE | crc32 of the envelope: u32 LE | envelope | body`:
//! when only the body is damaged, the queue still knows whose message it was.
//!
//! Damaged bytes are copied to `queue/corrupt/SEGMENT-OFFSET` before anything else happens to
//! them (a segment whose damage could not be copied is never deleted). Only a torn tail, where
//! nothing valid follows the bad point in the last segment (a crash in the middle of an append,
//! which was never acknowledged), is cut off.
//!
//! Version 1 (the first release): no segment header, records `len: u32 LE | crc32 of the rest:
//! u32 LE | kind: u8 | payload`, a message's payload `envelope line \n body`. Such segments are still
//! read (a resync tries each later position whose record checks out), never appended to.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::disk::Disk;
pub use crate::delivery::queue::model::LogAt;
use crate::delivery::queue::spool::Damage;

mod read;
#[cfg(test)]
mod tests;

use self::read::read_up_to;
pub use self::read::scan;

/// A segment is closed and a new one begun beyond this size.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Larger records are not ours (a damaged length).
const MAX_RECORD: u32 = 64 * 1024 * 1024;
const MAGIC: &[u8; 8] = b"XRQSEG2\n";
/// Magic and sync mark.
const SEGMENT_HEADER: u64 = 16;
const HEADER: usize = 21;
const V1_HEADER: usize = 9;
/// A logged message is at most a write batch of body and its envelope: a longer version 1 record
/// is a damaged length (this bounds a resync's work).
const V1_MAX_RECORD: u32 = 2 * 1024 * 1024;
/// How much of a segment a resync reads at a time.
const WINDOW: usize = 8 * 1024 * 1024;

pub const KIND_MESSAGE: u8 = 1;
pub const KIND_DONE: u8 = 2;

/// A record to append.
#[derive(Clone, Copy)]
pub enum Rec<'a> {
    /// A message: its envelope (one JSON line) and its body.
    Message { envelope: &'a [u8], body: &'a [u8] },
    /// A message of `segment` is done with.
    Done { segment: u64, id: &'a str },
}

/// A record found when reading the segments.
pub enum Record {
    Message {
        envelope: Vec<u8>,
        body: LogAt,
        len: u64,
    },
    Done {
        /// The segment of the message.
        segment: u64,
        id: String,
    },
}

pub struct Found {
    pub segment: u64,
    pub record: Record,
}

/// What reading the segments found.
#[derive(Default)]
pub struct Scan {
    pub found: Vec<Found>,
    pub damage: Vec<Damage>,
    /// Segments holding damage that could not be copied aside: never deleted.
    pub pinned: BTreeSet<u64>,
}

/// The segments, owned by the committer thread.
pub struct Log {
    dir: PathBuf,
    disk: Arc<dyn Disk>,
    active: File,
    number: u64,
    sync: [u8; 8],
    size: u64,
    /// Live messages per segment.
    live: BTreeMap<u64, usize>,
    /// The segments there are, so that freeing one needs no directory listing.
    on_disk: BTreeSet<u64>,
    /// Never deleted (damage that could not be copied aside).
    pinned: BTreeSet<u64>,
    /// A failed append could not be cut off cleanly: nothing more goes into this segment.
    damaged: bool,
}

pub fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:010}"))
}

pub(super) fn numbers(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// One record in wire form (version 2), for a segment with `sync`.
fn encode(record: &Rec<'_>, sync: &[u8; 8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    let (kind, payload_start) = (
        match record {
            Rec::Message { .. } => KIND_MESSAGE,
            Rec::Done { .. } => KIND_DONE,
        },
        out.len(),
    );
    match record {
        Rec::Message { envelope, body } => {
            out.extend_from_slice(&(envelope.len() as u32).to_le_bytes());
            out.extend_from_slice(&crc32fast::hash(envelope).to_le_bytes());
            out.extend_from_slice(envelope);
            out.extend_from_slice(body);
        }
        Rec::Done { segment, id } => {
            out.extend_from_slice(&segment.to_le_bytes());
            out.extend_from_slice(id.as_bytes());
        }
    }
    let len = (out.len() - payload_start) as u32;
    let crc = crc32fast::hash(&out[payload_start..]);
    let head = &mut out[start..payload_start];
    head[..8].copy_from_slice(sync);
    head[8..12].copy_from_slice(&len.to_le_bytes());
    head[12] = kind;
    head[13..17].copy_from_slice(&crc.to_le_bytes());
    let head_crc = crc32fast::hash(&head[..17]);
    head[17..21].copy_from_slice(&head_crc.to_le_bytes());
}

/// Where a message record's body starts, from the start of its record.
fn body_offset(record: &Rec<'_>) -> u64 {
    match record {
        Rec::Message { envelope, .. } => (HEADER + 8 + envelope.len()) as u64,
        Rec::Done { .. } => HEADER as u64,
    }
}

impl Log {
    /// Begins a new segment after the ones there are, with `live` counted by the caller from
    /// [`scan`] and the segments it found `pinned`.
    pub fn open(
        dir: &Path,
        disk: Arc<dyn Disk>,
        live: BTreeMap<u64, usize>,
        pinned: BTreeSet<u64>,
    ) -> io::Result<Log> {
        let on_disk: BTreeSet<u64> = numbers(dir)?.into_iter().collect();
        let number = on_disk.last().map_or(0, |n| n + 1);
        let (active, sync) = create_segment(dir, number, &*disk)?;
        let mut log = Log {
            dir: dir.to_path_buf(),
            disk,
            active,
            number,
            sync,
            size: SEGMENT_HEADER,
            live,
            on_disk,
            pinned,
            damaged: false,
        };
        log.on_disk.insert(number);
        log.drop_dead_prefix();
        Ok(log)
    }

    pub fn active(&self) -> u64 {
        self.number
    }

    /// Appends `records` in one write and one sync; returns where each one's body starts (for a
    /// done record, its payload). A message record counts as live in its segment.
    pub fn append(&mut self, records: &[Rec<'_>]) -> io::Result<Vec<LogAt>> {
        if self.damaged {
            self.rotate()?;
            self.damaged = false;
        }
        let mut out = Vec::new();
        let mut at = Vec::with_capacity(records.len());
        for record in records {
            at.push(LogAt {
                segment: self.number,
                offset: self.size + out.len() as u64 + body_offset(record),
            });
            encode(record, &self.sync, &mut out);
        }
        let path = segment_path(&self.dir, self.number);
        let written = self
            .disk
            .write(&path, &mut self.active, &out)
            .and_then(|()| self.disk.sync(&path, &self.active));
        if let Err(e) = written {
            // Whatever part reached the file is cut off (durably, or a power loss could bring back
            // records that were refused), so the next append starts clean; if that fails too, the
            // segment takes nothing more.
            let cut = self
                .active
                .set_len(self.size)
                .and_then(|()| self.active.sync_data())
                .and_then(|()| self.active.metadata())
                .is_ok_and(|m| m.len() == self.size);
            if !cut {
                tracing::error!(
                    segment = self.number,
                    "cannot cut a failed append off the spool log; starting a new segment"
                );
                self.damaged = true;
            }
            return Err(e);
        }
        self.size += out.len() as u64;
        for record in records {
            if let Rec::Message { .. } = record {
                *self.live.entry(self.number).or_default() += 1;
            }
        }
        if self.size >= SEGMENT_BYTES {
            // The records are durable whatever happens here: a failed rotation keeps this segment.
            if let Err(e) = self.rotate() {
                tracing::warn!(error = %e, segment = self.number, "cannot start a new spool log segment; the current one goes on");
            }
        }
        Ok(at)
    }

    /// A message of `segment` is done with (its done record is durable).
    pub fn release(&mut self, segment: u64) {
        let Some(n) = self.live.get_mut(&segment) else {
            return;
        };
        *n = n.saturating_sub(1);
        // Only the oldest segment's last message frees anything.
        if *n == 0 && self.on_disk.first() == Some(&segment) {
            self.drop_dead_prefix();
        }
    }

    /// Starts the next segment; nothing changes unless all of it worked.
    fn rotate(&mut self) -> io::Result<()> {
        let number = self.number + 1;
        let (file, sync) = create_segment(&self.dir, number, &*self.disk)?;
        self.size = SEGMENT_HEADER;
        self.active = file;
        self.sync = sync;
        self.number = number;
        self.on_disk.insert(number);
        self.drop_dead_prefix();
        Ok(())
    }

    /// Deletes the oldest segments while none of their messages is live (never the active one,
    /// nor one whose damage could not be kept aside).
    fn drop_dead_prefix(&mut self) {
        let mut deleted = false;
        while let Some(&number) = self.on_disk.first() {
            if number >= self.number
                || self.pinned.contains(&number)
                || self.live.get(&number).is_some_and(|n| *n > 0)
            {
                break;
            }
            if std::fs::remove_file(segment_path(&self.dir, number)).is_err() {
                break;
            }
            self.on_disk.remove(&number);
            self.live.remove(&number);
            deleted = true;
        }
        if deleted {
            let _ = self.disk.sync_dir(&self.dir);
        }
    }
}

/// A new segment with its header, durable with its name.
fn create_segment(dir: &Path, number: u64, disk: &dyn Disk) -> io::Result<(File, [u8; 8])> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = segment_path(dir, number);
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .mode(0o600)
        .open(&path)?;
    let sync: [u8; 8] = rand::random();
    let mut head = MAGIC.to_vec();
    head.extend_from_slice(&sync);
    let made = disk
        .write(&path, &mut file, &head)
        .and_then(|()| disk.sync(&path, &file))
        .and_then(|()| disk.sync_dir(dir));
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok((file, sync))
}

/// Reads `len` bytes at `at` (a logged message's body, or its start).
pub fn read_at(dir: &Path, at: LogAt, len: u64) -> io::Result<Vec<u8>> {
    let file = File::open(segment_path(dir, at.segment))?;
    let mut out = vec![0u8; len as usize];
    let got = read_up_to(&file, at.offset, &mut out)?;
    if got < out.len() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "spool log segment shorter than its record",
        ));
    }
    Ok(out)
}
