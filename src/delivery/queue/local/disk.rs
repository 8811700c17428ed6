//! The few filesystem operations that make the spool durable, behind a trait: the real one, and a
//! test double that fails the Nth write, sync or rename, so that tests can watch what a full disk
//! or an IO error does to a done record, a bounce or a message being placed.

use crate::util::sync::lock;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub trait Disk: Send + Sync + 'static {
    /// Writes all of `bytes` to `file` (opened at `path`).
    fn write(&self, path: &Path, file: &mut File, bytes: &[u8]) -> io::Result<()>;
    /// Makes what was written to `file` durable (`fdatasync`).
    fn sync(&self, path: &Path, file: &File) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the entries of `dir` durable (created, renamed and removed names).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The operating system's filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct Os;

impl Disk for Os {
    fn write(&self, _: &Path, file: &mut File, bytes: &[u8]) -> io::Result<()> {
        file.write_all(bytes)
    }

    fn sync(&self, _: &Path, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// The kinds of operation a [`Faulty`] disk counts and can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Write,
    Sync,
    Rename,
    SyncDir,
}

const OPS: [Op; 4] = [Op::Write, Op::Sync, Op::Rename, Op::SyncDir];

/// A test double: the real filesystem, except that operations fail when told to (with `ENOSPC`).
/// Paths can be narrowed to those containing a fragment (`"seg/"`: the log, `"msg/"`: files).
#[derive(Debug, Default)]
pub struct Faulty {
    done: [AtomicU64; 4],
    failed: [AtomicU64; 4],
    rules: Mutex<Vec<Rule>>,
}

#[derive(Debug)]
struct Rule {
    op: Op,
    /// Only paths containing this.
    path: String,
    /// Matching operations to let through first.
    skip: u64,
    /// Then fail this many.
    fail: u64,
}

impl Faulty {
    /// From now on, after `skip` more matching `op`s on paths containing `path`, the next `fail`
    /// fail.
    pub fn fail(&self, op: Op, path: &str, skip: u64, fail: u64) {
        lock(&self.rules).push(Rule {
            op,
            path: path.to_string(),
            skip,
            fail,
        });
    }

    /// Forgets every rule: everything succeeds from now on.
    pub fn heal(&self) {
        lock(&self.rules).clear();
    }

    /// How many `op`s succeeded so far.
    pub fn done(&self, op: Op) -> u64 {
        self.done[index(op)].load(Ordering::SeqCst)
    }

    /// How many `op`s were failed on purpose so far.
    pub fn failed(&self, op: Op) -> u64 {
        self.failed[index(op)].load(Ordering::SeqCst)
    }

    fn run<T>(&self, op: Op, path: &Path, real: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let text = path.to_string_lossy();
        let refuse = {
            let mut rules = lock(&self.rules);
            let rule = rules
                .iter_mut()
                .find(|r| r.op == op && r.fail > 0 && text.contains(&r.path));
            match rule {
                Some(r) if r.skip > 0 => {
                    r.skip -= 1;
                    false
                }
                Some(r) => {
                    r.fail -= 1;
                    true
                }
                None => false,
            }
        };
        if refuse {
            self.failed[index(op)].fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let out = real()?;
        self.done[index(op)].fetch_add(1, Ordering::SeqCst);
        Ok(out)
    }
}

impl Disk for Faulty {
    fn write(&self, path: &Path, file: &mut File, bytes: &[u8]) -> io::Result<()> {
        self.run(Op::Write, path, || Os.write(path, file, bytes))
    }

    fn sync(&self, path: &Path, file: &File) -> io::Result<()> {
        self.run(Op::Sync, path, || Os.sync(path, file))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.run(Op::Rename, to, || Os.rename(from, to))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        // A trailing separator, so that a rule for "msg/" matches the directory itself.
        let named = dir.join("");
        self.run(Op::SyncDir, &named, || Os.sync_dir(dir))
    }
}

fn index(op: Op) -> usize {
    OPS.iter().position(|o| *o == op).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nth_matching_operation_fails_and_the_others_go_through() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Faulty::default();
        disk.fail(Op::Rename, "msg", 1, 1);
        let a = dir.path().join("a");
        std::fs::write(&a, b"x").unwrap();
        let msg = dir.path().join("msg");
        std::fs::create_dir(&msg).unwrap();
        disk.rename(&a, &dir.path().join("b")).unwrap();
        disk.rename(&dir.path().join("b"), &msg.join("1")).unwrap();
        let err = disk.rename(&msg.join("1"), &msg.join("2")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        disk.rename(&msg.join("1"), &msg.join("2")).unwrap();
        assert_eq!((disk.done(Op::Rename), disk.failed(Op::Rename)), (3, 1));
    }
}
