//! Reading the segments at start-up: record by record (one in memory at a time), stepping over
//! damage to the next record that checks out, keeping the damaged bytes aside.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{
    numbers, segment_path, Found, LogAt, Record, Scan, HEADER, KIND_DONE, KIND_MESSAGE, MAGIC,
    MAX_RECORD, SEGMENT_HEADER, V1_HEADER, V1_MAX_RECORD, WINDOW,
};
use crate::delivery::queue::local::disk::Disk;
use crate::delivery::queue::spool::Damage;

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
pub(super) fn read_up_to(file: &File, at: u64, buf: &mut [u8]) -> io::Result<usize> {
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
