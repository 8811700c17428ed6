//! The spool's fast path: small messages appended to segment files, many per disk sync.
//!
//! A file per message costs a create, a sync, a rename, and at the end an unlink that frees its
//! blocks: most of the CPU of queueing a 10 KiB message. Instead, a message that arrived whole in
//! memory is one record appended to the active segment (`queue/seg/NNNNNNNNNN`), and its end is
//! a small "done" record; the committer appends every record waiting at that moment with one
//! write and one `fdatasync`. Segments are deleted oldest first once none of their messages is
//! live (a done record always lies after its message, so a deleted prefix can never bring a
//! message back). Messages that stay (deferred, held) move to their own file ([`super::spool`]),
//! so they do not pin the segments behind them.
//!
//! A record is `len: u32 LE | crc32 of the rest: u32 LE | kind: u8 | payload`. At start-up the
//! segments are read in order; a torn tail (a crash mid-append, before its sync) fails its length
//! or checksum and is cut off.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// A segment is closed and a new one begun beyond this size.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Larger records are not ours (a damaged length).
const MAX_RECORD: u32 = 64 * 1024 * 1024;
const HEADER: usize = 9;

pub const KIND_MESSAGE: u8 = 1;
pub const KIND_DONE: u8 = 2;

/// Where a logged message's body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogAt {
    pub segment: u64,
    /// Of the body, in the segment file.
    pub offset: u64,
}

/// A record found when reading the segments.
pub struct Found {
    pub segment: u64,
    /// Of the payload, in the segment file.
    pub offset: u64,
    pub kind: u8,
    pub payload: Vec<u8>,
}

/// The segments, owned by the committer thread.
pub struct Log {
    dir: PathBuf,
    active: File,
    number: u64,
    size: u64,
    /// Live messages per segment.
    live: BTreeMap<u64, usize>,
    /// The segments there are, so that freeing one needs no directory listing.
    on_disk: BTreeSet<u64>,
    /// A failed append could not be cut off cleanly: nothing more goes into this segment.
    damaged: bool,
}

pub fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:010}"))
}

fn numbers(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// Every valid record of every segment, oldest first; a torn tail of the last segment is cut off.
pub fn scan(dir: &Path) -> io::Result<Vec<Found>> {
    let all = numbers(dir)?;
    let mut found = Vec::new();
    for (i, &number) in all.iter().enumerate() {
        let path = segment_path(dir, number);
        let mut bytes = Vec::new();
        File::open(&path)?.read_to_end(&mut bytes)?;
        let mut pos = 0usize;
        while let Some((kind, payload)) = record_at(&bytes, pos) {
            found.push(Found {
                segment: number,
                offset: (pos + HEADER) as u64,
                kind,
                payload: payload.to_vec(),
            });
            pos += HEADER + payload.len();
        }
        if pos < bytes.len() {
            if i + 1 == all.len() {
                // Appended but never synced, so never acknowledged.
                tracing::warn!(
                    segment = number,
                    bytes = bytes.len() - pos,
                    "incomplete record at the end of the spool log cut off"
                );
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(pos as u64)?;
                f.sync_all()?;
            } else {
                tracing::error!(
                    segment = number,
                    offset = pos,
                    "damaged record in the spool log; the rest of this segment is skipped"
                );
            }
        }
    }
    Ok(found)
}

fn record_at(bytes: &[u8], pos: usize) -> Option<(u8, &[u8])> {
    let head = bytes.get(pos..pos + HEADER)?;
    let len = u32::from_le_bytes(head[0..4].try_into().ok()?);
    let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
    if len == 0 || len > MAX_RECORD {
        return None;
    }
    let body = bytes.get(pos + 8..pos + 8 + len as usize)?;
    (crc32fast::hash(body) == crc).then(|| (body[0], &body[1..]))
}

/// One record in wire form.
pub fn encode(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(payload.len() + 1);
    body.push(kind);
    body.extend_from_slice(payload);
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

impl Log {
    /// Opens the newest segment for appending (or starts the first), with `live` counted by the
    /// caller from [`scan`].
    pub fn open(dir: &Path, live: BTreeMap<u64, usize>) -> io::Result<Log> {
        let mut on_disk: BTreeSet<u64> = numbers(dir)?.into_iter().collect();
        let number = on_disk.last().copied().unwrap_or(0);
        on_disk.insert(number);
        let path = segment_path(dir, number);
        let new = !path.exists();
        let active = open_segment(&path)?;
        if new {
            File::open(dir)?.sync_all()?;
        }
        let size = active.metadata()?.len();
        let mut log = Log {
            dir: dir.to_path_buf(),
            active,
            number,
            size,
            live,
            on_disk,
            damaged: false,
        };
        log.drop_dead_prefix();
        Ok(log)
    }

    pub fn active(&self) -> u64 {
        self.number
    }

    /// Appends `records` in one write and one sync; returns each one's payload offset. A message
    /// record counts as live in its segment.
    pub fn append(&mut self, records: &[(u8, &[u8])]) -> io::Result<Vec<LogAt>> {
        if self.damaged {
            self.rotate()?;
            self.damaged = false;
        }
        let mut out = Vec::new();
        let mut at = Vec::with_capacity(records.len());
        for (kind, payload) in records {
            at.push(LogAt {
                segment: self.number,
                offset: self.size + out.len() as u64 + HEADER as u64,
            });
            out.extend_from_slice(&encode(*kind, payload));
        }
        let written = self
            .active
            .write_all(&out)
            .and_then(|()| self.active.sync_data());
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
        for (kind, _) in records {
            if *kind == KIND_MESSAGE {
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
        let file = open_segment(&segment_path(&self.dir, number))?;
        File::open(&self.dir)?.sync_all()?;
        self.size = file.metadata()?.len();
        self.active = file;
        self.number = number;
        self.on_disk.insert(number);
        self.drop_dead_prefix();
        Ok(())
    }

    /// Deletes the oldest segments while none of their messages is live (never the active one).
    fn drop_dead_prefix(&mut self) {
        let mut deleted = false;
        while let Some(&number) = self.on_disk.first() {
            if number >= self.number || self.live.get(&number).is_some_and(|n| *n > 0) {
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
            let _ = File::open(&self.dir).and_then(|d| d.sync_all());
        }
    }
}

fn open_segment(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Reads `len` bytes at `at` (a logged message's body, or its start).
pub fn read_at(dir: &Path, at: LogAt, len: u64) -> io::Result<Vec<u8>> {
    let mut file = File::open(segment_path(dir, at.segment))?;
    file.seek(SeekFrom::Start(at.offset))?;
    let mut out = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut out)?;
    if (out.len() as u64) < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "spool log segment shorter than its record",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen_and_a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), BTreeMap::new()).unwrap();
        let at = log
            .append(&[(KIND_MESSAGE, b"one"), (KIND_MESSAGE, b"two")])
            .unwrap();
        assert_eq!(read_at(dir.path(), at[1], 3).unwrap(), b"two");
        log.append(&[(KIND_DONE, b"one")]).unwrap();
        drop(log);
        // A crash in the middle of the next append.
        let path = segment_path(dir.path(), 0);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&encode(KIND_MESSAGE, b"three")[..7]).unwrap();
        let found = scan(dir.path()).unwrap();
        let kinds: Vec<(u8, &[u8])> = found.iter().map(|f| (f.kind, &f.payload[..])).collect();
        assert_eq!(
            kinds,
            [
                (KIND_MESSAGE, &b"one"[..]),
                (KIND_MESSAGE, b"two"),
                (KIND_DONE, b"one")
            ]
        );
        // Cut off: the next append is readable again.
        let mut log = Log::open(dir.path(), BTreeMap::from([(0, 1)])).unwrap();
        log.append(&[(KIND_MESSAGE, b"four")]).unwrap();
        assert_eq!(scan(dir.path()).unwrap().len(), 4);
    }

    #[test]
    fn segments_go_oldest_first_once_nothing_in_them_is_live() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), BTreeMap::new()).unwrap();
        log.append(&[(KIND_MESSAGE, b"a")]).unwrap();
        log.rotate().unwrap();
        log.append(&[(KIND_MESSAGE, b"b")]).unwrap();
        log.rotate().unwrap();
        // The second segment's message is done, but the first still has a live one: both stay.
        log.release(1);
        assert_eq!(numbers(dir.path()).unwrap(), [0, 1, 2]);
        log.release(0);
        assert_eq!(numbers(dir.path()).unwrap(), [2]);
    }
}
