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
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::disk::Disk;
use crate::delivery::queue::spool::Damage;

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

/// Where a logged message's body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogAt {
    pub segment: u64,
    /// Of the body, in the segment file.
    pub offset: u64,
}

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

fn numbers(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// Every valid record of every segment, oldest first, one record in memory at a time; damage is
/// copied to `corrupt` and reported; a torn tail of the last segment is cut off.
pub fn scan(dir: &Path, corrupt: &Path, disk: &dyn Disk) -> io::Result<Scan> {
    let all = numbers(dir)?;
    let mut out = Scan::default();
    for (i, &number) in all.iter().enumerate() {
        let last = i + 1 == all.len();
        Reader::open(dir, number)?.scan(last, corrupt, disk, &mut out)?;
    }
    Ok(out)
}

/// What lies at a position of a segment.
enum At {
    Record(Record, u64),
    /// A record whose header checks out but whose payload does not: its extent is known.
    Damaged {
        end: u64,
        envelope: Option<Vec<u8>>,
    },
    /// No record starts here.
    Bad,
}

/// One segment being read.
struct Reader {
    path: PathBuf,
    number: u64,
    file: File,
    size: u64,
    /// Version 2's sync mark; `None` for version 1.
    sync: Option<[u8; 8]>,
    buf: Vec<u8>,
}

impl Reader {
    fn open(dir: &Path, number: u64) -> io::Result<Reader> {
        let path = segment_path(dir, number);
        let file = File::open(&path)?;
        let size = file.metadata()?.len();
        let mut head = [0u8; 24];
        let got = read_up_to(&file, 0, &mut head)?;
        let head = &head[..got];
        let mut reader = Reader {
            path,
            number,
            file,
            size,
            sync: None,
            buf: Vec::new(),
        };
        if head.len() >= SEGMENT_HEADER as usize
            && (head[..8] == *MAGIC || (head.len() == 24 && head[8..16] == head[16..24]))
        {
            // The mark as the header has it, or as the first record has it if the header's copy
            // is the damaged one.
            let mut sync: [u8; 8] = head[8..16].try_into().expect("8 octets");
            if head.len() == 24 && head[8..16] != head[16..24] {
                let first: [u8; 8] = head[16..24].try_into().expect("8 octets");
                reader.sync = Some(first);
                if reader.header_at(SEGMENT_HEADER)?.is_some() {
                    sync = first;
                }
            }
            reader.sync = Some(sync);
        } else if MAGIC.starts_with(head) {
            // A segment whose header never got written whole: empty.
            reader.sync = Some([0; 8]);
            reader.size = reader.size.min(SEGMENT_HEADER);
        }
        Ok(reader)
    }

    fn start(&self) -> u64 {
        if self.sync.is_some() {
            SEGMENT_HEADER
        } else {
            0
        }
    }

    fn scan(
        mut self,
        last: bool,
        corrupt: &Path,
        disk: &dyn Disk,
        out: &mut Scan,
    ) -> io::Result<()> {
        let mut pos = self.start();
        while pos < self.size {
            match self.at(pos)? {
                At::Record(record, next) => {
                    out.found.push(Found {
                        segment: self.number,
                        record,
                    });
                    pos = next;
                }
                At::Damaged { end, envelope } => {
                    self.damaged(pos, end, envelope, corrupt, disk, out);
                    pos = end;
                }
                At::Bad => match self.resync(pos + 1)? {
                    Some(next) => {
                        self.damaged(pos, next, None, corrupt, disk, out);
                        pos = next;
                    }
                    None if last => {
                        // Appended but never synced, so never acknowledged.
                        tracing::warn!(
                            segment = self.number,
                            bytes = self.size - pos,
                            "incomplete record at the end of the spool log cut off"
                        );
                        let f = OpenOptions::new().write(true).open(&self.path)?;
                        f.set_len(pos)?;
                        f.sync_all()?;
                        return Ok(());
                    }
                    None => {
                        let end = self.size;
                        self.damaged(pos, end, None, corrupt, disk, out);
                        return Ok(());
                    }
                },
            }
        }
        Ok(())
    }

    /// Copies `offset..end` aside and reports it.
    fn damaged(
        &self,
        offset: u64,
        end: u64,
        envelope: Option<Vec<u8>>,
        corrupt: &Path,
        disk: &dyn Disk,
        out: &mut Scan,
    ) {
        let name = corrupt.join(format!("{:010}-{offset:012}", self.number));
        let known = name.exists();
        let kept = if known {
            Some(name)
        } else {
            match self.copy(offset, end, &name, disk) {
                Ok(()) => Some(name),
                Err(e) => {
                    tracing::error!(segment = self.number, offset, error = %e, "cannot copy damaged spool log bytes aside; the segment is kept");
                    out.pinned.insert(self.number);
                    None
                }
            }
        };
        out.damage.push(Damage {
            segment: self.number,
            offset,
            len: end - offset,
            kept,
            envelope,
            known,
        });
    }

    fn copy(&self, from: u64, to: u64, name: &Path, disk: &dyn Disk) -> io::Result<()> {
        let dir = name.parent().expect("a file in corrupt/");
        crate::util::fs::create_private_dir(dir)?;
        let tmp = name.with_extension("tmp");
        let mut file = crate::util::fs::create_private(&tmp)?;
        let mut at = from;
        let mut chunk = vec![0u8; WINDOW.min((to - from) as usize)];
        while at < to {
            let n = ((to - at) as usize).min(chunk.len());
            self.file.read_exact_at(&mut chunk[..n], at)?;
            disk.write(&tmp, &mut file, &chunk[..n])?;
            at += n as u64;
        }
        disk.sync(&tmp, &file)?;
        disk.rename(&tmp, name)?;
        disk.sync_dir(dir)
    }

    fn at(&mut self, pos: u64) -> io::Result<At> {
        match self.sync {
            Some(_) => self.v2_at(pos),
            None => self.v1_at(pos),
        }
    }

    /// The header at `pos` if it checks out: payload length, kind, payload checksum.
    fn header_at(&self, pos: u64) -> io::Result<Option<(u32, u8, u32)>> {
        let Some(sync) = self.sync else {
            return Ok(None);
        };
        let mut head = [0u8; HEADER];
        if pos + HEADER as u64 > self.size || read_up_to(&self.file, pos, &mut head)? < HEADER {
            return Ok(None);
        }
        Ok(parse_header(&head, &sync))
    }

    fn v2_at(&mut self, pos: u64) -> io::Result<At> {
        let Some((len, kind, crc)) = self.header_at(pos)? else {
            return Ok(At::Bad);
        };
        let start = pos + HEADER as u64;
        let end = start + u64::from(len);
        if end > self.size {
            return Ok(At::Bad);
        }
        self.read(start, len as usize)?;
        let payload = &self.buf[..len as usize];
        if crc32fast::hash(payload) != crc {
            let envelope = (kind == KIND_MESSAGE)
                .then(|| split_v2_message(payload).map(|(env, _)| env.to_vec()))
                .flatten();
            return Ok(At::Damaged { end, envelope });
        }
        let record = match kind {
            KIND_MESSAGE => split_v2_message(payload).map(|(env, body_at)| Record::Message {
                envelope: env.to_vec(),
                body: LogAt {
                    segment: self.number,
                    offset: start + body_at as u64,
                },
                len: u64::from(len) - body_at as u64,
            }),
            _ => done_record(payload),
        };
        // A record that checks out but cannot be understood was not written by us.
        Ok(match record {
            Some(r) => At::Record(r, end),
            None => At::Damaged {
                end,
                envelope: None,
            },
        })
    }

    fn v1_at(&mut self, pos: u64) -> io::Result<At> {
        let mut head = [0u8; V1_HEADER];
        if pos + V1_HEADER as u64 > self.size || read_up_to(&self.file, pos, &mut head)? < V1_HEADER
        {
            return Ok(At::Bad);
        }
        let len = u32::from_le_bytes(head[0..4].try_into().expect("4 octets"));
        let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 octets"));
        let end = pos + 8 + u64::from(len);
        if len == 0 || len > MAX_RECORD || end > self.size {
            return Ok(At::Bad);
        }
        self.read(pos + 8, len as usize)?;
        let body = &self.buf[..len as usize];
        if crc32fast::hash(body) != crc {
            return Ok(At::Bad);
        }
        let (kind, payload) = (body[0], &body[1..]);
        let record = match kind {
            KIND_MESSAGE => memchr::memchr(b'\n', payload).map(|nl| Record::Message {
                envelope: payload[..nl].to_vec(),
                body: LogAt {
                    segment: self.number,
                    offset: pos + V1_HEADER as u64 + nl as u64 + 1,
                },
                len: (payload.len() - nl - 1) as u64,
            }),
            KIND_DONE => done_record(payload),
            _ => None,
        };
        Ok(match record {
            Some(r) => At::Record(r, end),
            None => At::Bad,
        })
    }

    fn read(&mut self, at: u64, len: usize) -> io::Result<()> {
        self.buf.resize(len, 0);
        self.file.read_exact_at(&mut self.buf[..len], at)
    }

    /// The first position from `from` on where a record starts (version 2: its header checks
    /// out; version 1: the whole record does).
    fn resync(&mut self, from: u64) -> io::Result<Option<u64>> {
        let overlap = match self.sync {
            Some(_) => HEADER,
            None => V1_HEADER + V1_MAX_RECORD as usize,
        };
        let mut base = from;
        let mut window = vec![0u8; WINDOW.max(2 * overlap)];
        while base < self.size {
            let n = ((self.size - base) as usize).min(window.len());
            self.file.read_exact_at(&mut window[..n], base)?;
            let whole = base + n as u64 == self.size;
            // Candidates whose record fits in the window: the next window starts at `limit`.
            let limit = if whole { n } else { n - overlap };
            let found = match self.sync {
                Some(sync) => memchr::memmem::find_iter(&window[..n], &sync)
                    .take_while(|p| *p < limit)
                    .find(|&p| {
                        window
                            .get(p..p + HEADER)
                            .and_then(|h| parse_header(h, &sync))
                            .is_some()
                    }),
                None => (0..limit).find(|&p| v1_valid(&window[..n], p)),
            };
            if let Some(p) = found {
                return Ok(Some(base + p as u64));
            }
            if whole {
                break;
            }
            base += limit as u64;
        }
        Ok(None)
    }
}

/// Reads as much as there is at `at`, up to `buf`'s length.
fn read_up_to(file: &File, at: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], at + got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

fn parse_header(head: &[u8], sync: &[u8; 8]) -> Option<(u32, u8, u32)> {
    if head.len() < HEADER || head[..8] != *sync {
        return None;
    }
    let word = |at: usize| u32::from_le_bytes(head[at..at + 4].try_into().expect("4 octets"));
    let (len, kind, crc) = (word(8), head[12], word(13));
    let valid = crc32fast::hash(&head[..17]) == word(17)
        && len <= MAX_RECORD
        && matches!(kind, KIND_MESSAGE | KIND_DONE);
    valid.then_some((len, kind, crc))
}

/// A whole version 1 record at `p` of `bytes` (the resync's test of a position).
fn v1_valid(bytes: &[u8], p: usize) -> bool {
    let Some(head) = bytes.get(p..p + V1_HEADER) else {
        return false;
    };
    let len = u32::from_le_bytes(head[0..4].try_into().expect("4 octets"));
    if len == 0 || len > V1_MAX_RECORD || !matches!(head[8], KIND_MESSAGE | KIND_DONE) {
        return false;
    }
    let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 octets"));
    bytes
        .get(p + 8..p + 8 + len as usize)
        .is_some_and(|body| crc32fast::hash(body) == crc)
}

/// A version 2 message payload: the envelope if it checks out, and where the body starts.
fn split_v2_message(payload: &[u8]) -> Option<(&[u8], usize)> {
    let word = |at: usize| {
        payload
            .get(at..at + 4)
            .map(|w| u32::from_le_bytes(w.try_into().expect("4 octets")))
    };
    let (len, crc) = (word(0)? as usize, word(4)?);
    let envelope = payload.get(8..8 + len)?;
    (crc32fast::hash(envelope) == crc).then_some((envelope, 8 + len))
}

/// A done record's payload: the message's segment, then its id.
fn done_record(payload: &[u8]) -> Option<Record> {
    let segment = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    let id = std::str::from_utf8(&payload[8..]).ok()?.to_string();
    Some(Record::Done { segment, id })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::queue::disk::Os;

    /// A log in `dir` that counts every segment already there as live (nothing is deleted).
    fn log(dir: &Path) -> Log {
        let live = numbers(dir).unwrap().into_iter().map(|n| (n, 1)).collect();
        Log::open(dir, Arc::new(Os), live, BTreeSet::new()).unwrap()
    }

    fn message<'a>(env: &'a [u8], body: &'a [u8]) -> Rec<'a> {
        Rec::Message {
            envelope: env,
            body,
        }
    }

    /// What a scan finds: ("M", envelope, body) and ("D", id, "") rows, and the damage.
    fn found(dir: &Path) -> (Vec<(String, String, String)>, Vec<Damage>) {
        let corrupt = dir.parent().unwrap().join("corrupt");
        let scan = scan(dir, &corrupt, &Os).unwrap();
        let rows = scan
            .found
            .iter()
            .map(|f| match &f.record {
                Record::Message {
                    envelope,
                    body,
                    len,
                } => (
                    "M".to_string(),
                    String::from_utf8_lossy(envelope).into_owned(),
                    String::from_utf8_lossy(&read_at(dir, *body, *len).unwrap()).into_owned(),
                ),
                Record::Done { id, .. } => ("D".into(), id.clone(), String::new()),
            })
            .collect();
        (rows, scan.damage)
    }

    fn rows(list: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
        list.iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect()
    }

    #[test]
    fn records_survive_a_reopen_and_a_torn_tail_is_cut_off() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("seg");
        std::fs::create_dir(&dir).unwrap();
        let mut log = log(&dir);
        let at = log
            .append(&[message(b"e1", b"one"), message(b"e2", b"two")])
            .unwrap();
        assert_eq!(read_at(&dir, at[1], 3).unwrap(), b"two");
        log.append(&[Rec::Done {
            segment: 0,
            id: "A1",
        }])
        .unwrap();
        drop(log);
        // A crash in the middle of the next append.
        let mut wire = Vec::new();
        let sync: [u8; 8] = std::fs::read(segment_path(&dir, 0)).unwrap()[8..16]
            .try_into()
            .unwrap();
        encode(&message(b"e3", b"three"), &sync, &mut wire);
        let f = OpenOptions::new()
            .append(true)
            .open(segment_path(&dir, 0))
            .unwrap();
        f.write_all_at(&wire[..30], f.metadata().unwrap().len())
            .unwrap();
        let (got, damage) = found(&dir);
        assert_eq!(
            got,
            rows(&[("M", "e1", "one"), ("M", "e2", "two"), ("D", "A1", "")])
        );
        assert!(damage.is_empty(), "a torn tail is no damage");
        // Cut off; the next start appends to a new segment, and everything reads back.
        let mut log = Log::open(
            &dir,
            Arc::new(Os),
            BTreeMap::from([(0, 1)]),
            BTreeSet::new(),
        )
        .unwrap();
        assert_eq!(log.active(), 1);
        log.append(&[message(b"e4", b"four")]).unwrap();
        assert_eq!(found(&dir).0.len(), 4);
    }

    #[test]
    fn segments_go_oldest_first_once_nothing_in_them_is_live() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = log(dir.path());
        log.append(&[message(b"e", b"a")]).unwrap();
        log.rotate().unwrap();
        log.append(&[message(b"e", b"b")]).unwrap();
        log.rotate().unwrap();
        // The second segment's message is done, but the first still has a live one: both stay.
        log.release(1);
        assert_eq!(numbers(dir.path()).unwrap(), [0, 1, 2]);
        log.release(0);
        assert_eq!(numbers(dir.path()).unwrap(), [2]);
    }

    /// Writes `n` messages into one segment and closes it; returns the segment's bytes.
    fn segment_with(dir: &Path, n: usize) -> Vec<u8> {
        let mut log = log(dir);
        for i in 0..n {
            let env = format!("env{i}");
            let body = format!("body {i} ").repeat(i + 1);
            log.append(&[message(env.as_bytes(), body.as_bytes())])
                .unwrap();
        }
        log.append(&[Rec::Done {
            segment: 0,
            id: "X",
        }])
        .unwrap();
        drop(log);
        std::fs::read(segment_path(dir, 0)).unwrap()
    }

    #[test]
    fn a_damaged_record_costs_only_itself_and_is_kept_aside() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("seg");
        std::fs::create_dir(&dir).unwrap();
        let clean = segment_with(&dir, 5);
        // A later segment, so that the first is not the last (no torn tail there).
        log(&dir).append(&[message(b"later", b"x")]).unwrap();
        let (want, _) = found(&dir);
        // Every octet of the first segment past its header, flipped in turn: at most the record
        // it falls in is lost, and that record's bytes are kept aside.
        for at in (16..clean.len()).step_by(3) {
            let mut bytes = clean.clone();
            bytes[at] ^= 0x40;
            std::fs::write(segment_path(&dir, 0), &bytes).unwrap();
            let _ = std::fs::remove_dir_all(root.path().join("corrupt"));
            let (got, damage) = found(&dir);
            assert_eq!(damage.len(), 1, "flip at {at}: {damage:?}");
            assert!(
                got.len() + 1 == want.len(),
                "flip at {at}: {} of {} records left",
                got.len(),
                want.len()
            );
            assert!(got.iter().all(|r| want.contains(r)), "flip at {at}");
            let d = &damage[0];
            let kept = std::fs::read(d.kept.as_ref().unwrap()).unwrap();
            assert_eq!(kept, &bytes[d.offset as usize..(d.offset + d.len) as usize]);
            // A damaged body whose envelope survived says whose it was.
            if let Some(env) = &d.envelope {
                assert!(env.starts_with(b"env"), "{env:?}");
            }
        }
    }

    #[test]
    fn a_first_release_segment_still_loads_and_resyncs() {
        let dir = tempfile::tempdir().unwrap();
        let seg = dir.path().join("seg");
        std::fs::create_dir(&seg).unwrap();
        // The first release's format, as it wrote it.
        let v1 = |kind: u8, payload: &[u8]| {
            let mut body = vec![kind];
            body.extend_from_slice(payload);
            let mut out = (body.len() as u32).to_le_bytes().to_vec();
            out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
            out.extend_from_slice(&body);
            out
        };
        let mut bytes = Vec::new();
        bytes.extend(v1(KIND_MESSAGE, b"{\"id\":\"A\"}\nbody A\r\n"));
        let second = bytes.len();
        bytes.extend(v1(KIND_MESSAGE, b"{\"id\":\"B\"}\nbody B\r\n"));
        bytes.extend(v1(KIND_MESSAGE, b"{\"id\":\"C\"}\nbody C\r\n"));
        let mut done = 0u64.to_le_bytes().to_vec();
        done.extend_from_slice(b"A");
        bytes.extend(v1(KIND_DONE, &done));
        std::fs::write(segment_path(&seg, 0), &bytes).unwrap();
        let (got, damage) = found(&seg);
        assert_eq!(
            got,
            rows(&[
                ("M", "{\"id\":\"A\"}", "body A\r\n"),
                ("M", "{\"id\":\"B\"}", "body B\r\n"),
                ("M", "{\"id\":\"C\"}", "body C\r\n"),
                ("D", "A", ""),
            ])
        );
        assert!(damage.is_empty());
        // Its second record's length damaged: the rest still loads.
        bytes[second + 1] ^= 0x10;
        std::fs::write(segment_path(&seg, 0), &bytes).unwrap();
        log(&seg); // a later segment
        let (got, damage) = found(&seg);
        assert_eq!(damage.len(), 1);
        assert_eq!(
            got,
            rows(&[
                ("M", "{\"id\":\"A\"}", "body A\r\n"),
                ("M", "{\"id\":\"C\"}", "body C\r\n"),
                ("D", "A", ""),
            ])
        );
    }
}
