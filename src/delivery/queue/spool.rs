//! The queue on disk: what makes a queue-mode `250` true after a crash.
//!
//! Under `data_dir/queue/` (directories `0700`, files `0600`):
//! - `tmp/ID`: a message being received; whatever is here at start-up was never acknowledged.
//! - `msg/ID`: a committed message: one line of envelope (JSON), then the body as the mailer sent
//!   it (dot-stuffing undone); never changed again. Its presence is the commit.
//! - `msg/ID.state`: per-recipient progress (JSON), replaced atomically after each attempt.
//!
//! A message is written and `fdatasync`ed by the session that received it (sessions do this side
//! by side), then handed to one committer thread, which renames every message waiting at that
//! moment into `msg/` and makes the names durable with one `fsync` of the directory (group commit:
//! ten sessions queueing at once share one directory sync instead of queueing behind each other).
//! Progress records and removals go through the same thread and share its syncs.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufRead, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Bytes of body gathered in memory before they are written out.
const WRITE_BATCH: usize = 256 * 1024;
/// Changes made durable together at most.
const MAX_BATCH: usize = 512;

/// Who sent a message to whom, fixed at submission.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Envelope {
    pub id: String,
    pub account: String,
    /// The envelope sender; empty for a null sender.
    pub sender: String,
    pub recipients: Vec<String>,
    /// Unix seconds.
    pub received: u64,
    /// Bytes of body (not stored: the file's length tells).
    #[serde(skip)]
    pub size: u64,
    /// Where the body starts in the file (after the envelope line).
    #[serde(skip)]
    pub body_offset: u64,
    #[serde(default)]
    pub eight_bit: bool,
    #[serde(default)]
    pub smtputf8: bool,
    /// A delivery status notification made by the relay: never bounced itself.
    #[serde(default)]
    pub bounce: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptStatus {
    Pending,
    Delivered,
    Bounced,
}

impl RcptStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RcptStatus::Pending => "pending",
            RcptStatus::Delivered => "delivered",
            RcptStatus::Bounced => "bounced",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RcptState {
    pub status: RcptStatus,
    pub last_reply: Option<String>,
}

/// What has happened to a message so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    /// Delivery attempts that ended in a temporary failure.
    pub attempts: u32,
    /// Unix seconds of the next attempt.
    pub next_attempt: u64,
    pub last_reply: Option<String>,
    /// One per envelope recipient, in order.
    pub recipients: Vec<RcptState>,
}

impl Progress {
    pub fn fresh(recipients: usize) -> Progress {
        Progress {
            attempts: 0,
            next_attempt: 0,
            last_reply: None,
            recipients: vec![
                RcptState {
                    status: RcptStatus::Pending,
                    last_reply: None,
                };
                recipients
            ],
        }
    }
}

enum Op {
    /// A written and synced file gets its name in `msg/`.
    Place {
        from: PathBuf,
        to: PathBuf,
    },
    /// Replaces `path` with `bytes` (through `tmp`).
    Write {
        tmp: PathBuf,
        path: PathBuf,
        bytes: Vec<u8>,
    },
    Remove(Vec<PathBuf>),
}

impl Op {
    /// The directory whose entries it changes.
    fn dir(&self) -> Option<&Path> {
        match self {
            Op::Place { to, .. } => to.parent(),
            Op::Write { path, .. } => path.parent(),
            Op::Remove(paths) => paths.first().and_then(|p| p.parent()),
        }
    }
}

struct Job {
    op: Op,
    done: oneshot::Sender<io::Result<()>>,
}

pub struct Spool {
    root: PathBuf,
    msg: PathBuf,
    tmp: PathBuf,
    jobs: mpsc::Sender<Job>,
}

/// A message found at start-up.
pub struct Stored {
    pub envelope: Envelope,
    pub progress: Option<Progress>,
}

impl Spool {
    /// Creates the directories, throws away what was never committed, and returns the messages
    /// that were. Blocking: run at start-up.
    pub fn open(data_dir: &Path) -> io::Result<(Spool, Vec<Stored>)> {
        let root = data_dir.join("queue");
        let msg = root.join("msg");
        let tmp = root.join("tmp");
        let new = !msg.exists();
        for dir in [&root, &msg, &tmp] {
            crate::util::fs::create_private_dir(dir)?;
        }
        if new {
            // The new directories' names must survive a power loss as much as the files in them.
            for dir in [&root, data_dir] {
                File::open(dir)?.sync_all()?;
            }
        }
        for entry in std::fs::read_dir(&tmp)? {
            let _ = std::fs::remove_file(entry?.path());
        }
        let mut stored = Vec::new();
        let mut ids = BTreeSet::new();
        for entry in std::fs::read_dir(&msg)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(&path);
            } else if !name.contains('.') {
                ids.insert(name.to_string());
            }
        }
        for entry in std::fs::read_dir(&msg)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name
                .strip_suffix(".state")
                .is_some_and(|id| !ids.contains(id))
            {
                let _ = std::fs::remove_file(&path);
            }
        }
        for id in ids {
            match read_envelope(&msg.join(&id)) {
                Ok(envelope) => {
                    let progress = std::fs::read(msg.join(format!("{id}.state")))
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Progress>(&b).ok())
                        .filter(|p| p.recipients.len() == envelope.recipients.len());
                    stored.push(Stored { envelope, progress });
                }
                Err(e) => {
                    // Committed files are complete (synced before their rename); this one is not ours.
                    tracing::warn!(id, error = %e, "unreadable file in the spool left alone");
                }
            }
        }
        stored.sort_by(|a, b| a.envelope.id.cmp(&b.envelope.id));
        let (jobs, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || committer(rx))?;
        Ok((
            Spool {
                root,
                msg,
                tmp,
                jobs,
            },
            stored,
        ))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn body_path(&self, id: &str) -> PathBuf {
        self.msg.join(id)
    }

    /// A file to receive the body of `envelope` into.
    pub fn writer(&self, envelope: &Envelope) -> SpoolWriter {
        let mut buf = serde_json::to_vec(envelope).unwrap_or_default();
        buf.push(b'\n');
        SpoolWriter {
            path: self.tmp.join(&envelope.id),
            file: None,
            header: buf.len() as u64,
            buf,
            size: 0,
            failed: None,
            committed: false,
        }
    }

    async fn run(&self, op: Op) -> io::Result<()> {
        let (done, result) = oneshot::channel();
        self.jobs
            .send(Job { op, done })
            .map_err(|_| io::Error::other("the spool committer has stopped"))?;
        result
            .await
            .map_err(|_| io::Error::other("the spool committer has stopped"))?
    }

    /// Writes out the rest of the message, syncs it, and gives it its name in `msg/` together
    /// with whatever else is being committed at that moment. Returns where the body starts.
    pub async fn commit(&self, mut writer: SpoolWriter, id: &str) -> io::Result<u64> {
        writer.write_out(true).await?;
        let op = Op::Place {
            from: writer.path.clone(),
            to: self.msg.join(id),
        };
        self.run(op).await?;
        writer.committed = true;
        Ok(writer.header)
    }

    /// Records a message's progress durably.
    pub async fn record(&self, id: &str, progress: &Progress) -> io::Result<()> {
        let op = Op::Write {
            tmp: self.msg.join(format!("{id}.state.tmp")),
            path: self.msg.join(format!("{id}.state")),
            bytes: serde_json::to_vec(progress).map_err(io::Error::other)?,
        };
        self.run(op).await
    }

    /// Removes a message that is done with (delivered, bounced or deleted), durably: a crash
    /// afterwards must not deliver it again.
    pub async fn remove(&self, id: &str) -> io::Result<()> {
        // The message first: without it the state file means nothing.
        let paths = vec![self.msg.join(id), self.msg.join(format!("{id}.state"))];
        self.run(Op::Remove(paths)).await
    }

    /// Writes a small file durably (the pacing windows).
    pub async fn write_file(&self, name: &str, bytes: Vec<u8>) -> io::Result<()> {
        let op = Op::Write {
            tmp: self.tmp.join(format!("{name}.tmp")),
            path: self.root.join(name),
            bytes,
        };
        self.run(op).await
    }
}

/// Receives a body into `tmp/`; dropped without a commit, it removes what it wrote.
pub struct SpoolWriter {
    path: PathBuf,
    file: Option<File>,
    /// Length of the envelope line.
    header: u64,
    buf: Vec<u8>,
    size: u64,
    failed: Option<io::ErrorKind>,
    committed: bool,
}

impl SpoolWriter {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Adds body bytes; they reach the disk in batches, off the async runtime.
    pub async fn push(&mut self, chunk: &[u8]) {
        self.size += chunk.len() as u64;
        if self.failed.is_some() {
            return;
        }
        self.buf.extend_from_slice(chunk);
        if self.buf.len() >= WRITE_BATCH {
            if let Err(e) = self.write_out(false).await {
                tracing::warn!(error = %e, "cannot write a message to the spool");
                self.failed = Some(e.kind());
                self.buf = Vec::new();
            }
        }
    }

    /// Writes the buffer (and on `last`, syncs and closes the file).
    async fn write_out(&mut self, last: bool) -> io::Result<()> {
        if let Some(kind) = self.failed {
            return Err(kind.into());
        }
        let path = self.path.clone();
        let file = self.file.take();
        let buf = std::mem::take(&mut self.buf);
        let (file, mut buf) = tokio::task::spawn_blocking(move || {
            let mut buf = buf;
            let mut file = match file {
                Some(f) => f,
                None => crate::util::fs::create_private(&path)?,
            };
            file.write_all(&buf)?;
            if last {
                file.sync_data()?;
            }
            buf.clear();
            Ok::<_, io::Error>((file, buf))
        })
        .await
        .map_err(io::Error::other)??;
        if !last {
            buf.reserve(WRITE_BATCH);
            self.buf = buf;
            self.file = Some(file);
        }
        Ok(())
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Reads a committed message's envelope line; the body follows it.
pub fn read_envelope(path: &Path) -> io::Result<Envelope> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut reader = io::BufReader::new(file.take(1 << 20));
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(io::Error::other("no envelope line"));
    }
    let mut envelope: Envelope = serde_json::from_slice(&line).map_err(io::Error::other)?;
    envelope.body_offset = line.len() as u64;
    envelope.size = len - envelope.body_offset;
    Ok(envelope)
}

/// Reads up to `limit` bytes of a message's body from its start.
pub fn read_body(path: &Path, offset: u64, limit: u64) -> io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    file.seek(io::SeekFrom::Start(offset))?;
    let mut out = Vec::new();
    file.take(limit).read_to_end(&mut out)?;
    Ok(out)
}

/// The committer thread: takes every job waiting, then one sync per directory touched.
fn committer(rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let results = commit_batch(&batch);
        for (job, result) in batch.into_iter().zip(results) {
            let _ = job.done.send(result);
        }
    }
}

fn commit_batch(batch: &[Job]) -> Vec<io::Result<()>> {
    let mut results: Vec<io::Result<()>> = batch
        .iter()
        .map(|job| match &job.op {
            Op::Place { from, to } => std::fs::rename(from, to),
            Op::Write { tmp, path, bytes } => crate::util::fs::create_private(tmp)
                .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_data()))
                .and_then(|()| std::fs::rename(tmp, path)),
            Op::Remove(paths) => paths
                .iter()
                .try_for_each(|p| match std::fs::remove_file(p) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                }),
        })
        .collect();
    let dirs: BTreeSet<&Path> = batch.iter().filter_map(|j| j.op.dir()).collect();
    for dir in dirs {
        if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
            for (job, result) in batch.iter().zip(results.iter_mut()) {
                if job.op.dir() == Some(dir) && result.is_ok() {
                    *result = Err(io::Error::new(e.kind(), e.to_string()));
                }
            }
        }
    }
    results
}
