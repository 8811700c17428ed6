//! The queue on disk: what makes a queue-mode `250` true after a crash.
//!
//! Under `data_dir/queue/` (directories `0700`, files `0600` by the process umask):
//! - `tmp/ID`: a body being received; whatever is here at start-up was never acknowledged.
//! - `msg/ID`: the body as the mailer sent it (dot-stuffing undone), never changed again;
//! - `msg/ID.env`: the envelope (JSON), the commit marker: a message exists when both are there;
//! - `msg/ID.state`: per-recipient progress (JSON), replaced atomically after each attempt.
//!
//! Every change that must survive a crash goes through one committer thread that takes all
//! changes waiting at that moment and makes them durable together: one `syncfs` for the data of
//! the whole batch, the renames, one `fsync` of `msg/` for the names (group commit: ten sessions
//! queueing at once share two disk syncs instead of needing twenty).

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Bytes of body gathered in memory before they are written out.
const WRITE_BATCH: usize = 256 * 1024;
/// Changes made durable together at most.
const MAX_BATCH: usize = 512;

/// Who sent a message to whom, fixed at submission.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub id: String,
    pub account: String,
    /// The envelope sender; empty for a null sender.
    pub sender: String,
    pub recipients: Vec<String>,
    /// Unix seconds.
    pub received: u64,
    pub size: u64,
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
    /// `tmp/ID` is written and closed; its envelope goes to `msg/ID.env` with it.
    Commit {
        body_tmp: PathBuf,
        body: PathBuf,
        env_tmp: PathBuf,
        env: PathBuf,
        env_bytes: Vec<u8>,
    },
    /// Replaces `path` with `bytes` (through `tmp`).
    Write {
        tmp: PathBuf,
        path: PathBuf,
        bytes: Vec<u8>,
    },
    Remove(Vec<PathBuf>),
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
        for dir in [&root, &msg, &tmp] {
            crate::util::fs::create_private_dir(dir)?;
        }
        for entry in std::fs::read_dir(&tmp)? {
            let _ = std::fs::remove_file(entry?.path());
        }
        let mut stored = Vec::new();
        for entry in std::fs::read_dir(&msg)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(id) = name.strip_suffix(".env") else {
                continue;
            };
            let body = msg.join(id);
            let envelope = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Envelope>(&b).ok());
            match envelope {
                Some(envelope) if body.exists() => {
                    let progress = std::fs::read(msg.join(format!("{id}.state")))
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Progress>(&b).ok())
                        .filter(|p| p.recipients.len() == envelope.recipients.len());
                    stored.push(Stored { envelope, progress });
                }
                // Renamed but not made durable before a crash: it was never acknowledged.
                _ => {
                    tracing::warn!(
                        id,
                        "incomplete message in the spool removed (it was never acknowledged)"
                    );
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        // Bodies whose envelope never arrived.
        for entry in std::fs::read_dir(&msg)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !name.contains('.') && !msg.join(format!("{name}.env")).exists() {
                let _ = std::fs::remove_file(&path);
            }
            if let Some(id) = name.strip_suffix(".state") {
                if !msg.join(format!("{id}.env")).exists() {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        stored.sort_by(|a, b| a.envelope.id.cmp(&b.envelope.id));
        let (jobs, rx) = mpsc::channel();
        let sync_dir = root.clone();
        let names_dir = msg.clone();
        std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || committer(rx, &sync_dir, &names_dir))?;
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

    /// A file to receive a body into.
    pub fn writer(&self, id: &str) -> SpoolWriter {
        SpoolWriter {
            path: self.tmp.join(id),
            file: None,
            buf: Vec::new(),
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

    /// Writes out the rest of the body and makes it and its envelope durable, together with
    /// whatever else is being committed at that moment.
    pub async fn commit(&self, mut writer: SpoolWriter, envelope: &Envelope) -> io::Result<()> {
        writer.write_out(true).await?;
        let id = &envelope.id;
        let op = Op::Commit {
            body_tmp: writer.path.clone(),
            body: self.msg.join(id),
            env_tmp: self.tmp.join(format!("{id}.env")),
            env: self.msg.join(format!("{id}.env")),
            env_bytes: serde_json::to_vec(envelope).map_err(io::Error::other)?,
        };
        self.run(op).await?;
        writer.committed = true;
        Ok(())
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
        let paths = vec![
            self.msg.join(format!("{id}.env")),
            self.msg.join(format!("{id}.state")),
            self.msg.join(id),
        ];
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

    /// Writes the buffer (and on `last`, closes the file).
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
        if !self.committed && (self.file.is_some() || self.size > 0) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The committer thread: batches, then two syncs per batch.
fn committer(rx: mpsc::Receiver<Job>, root: &Path, names: &Path) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let results = commit_batch(&batch, root, names);
        for (job, result) in batch.into_iter().zip(results) {
            let _ = job.done.send(result);
        }
    }
}

fn commit_batch(batch: &[Job], root: &Path, names: &Path) -> Vec<io::Result<()>> {
    let mut results: Vec<io::Result<()>> = batch
        .iter()
        .map(|job| match &job.op {
            Op::Commit {
                env_tmp, env_bytes, ..
            } => crate::util::fs::write_private(env_tmp, env_bytes),
            Op::Write { tmp, bytes, .. } => crate::util::fs::write_private(tmp, bytes),
            Op::Remove(_) => Ok(()),
        })
        .collect();
    // The data of every file in the batch reaches the disk before any of them gets its name.
    if let Err(e) = File::open(root).and_then(|d| rustix::fs::syncfs(&d).map_err(io::Error::from)) {
        return batch
            .iter()
            .map(|_| Err(io::Error::new(e.kind(), e.to_string())))
            .collect();
    }
    for (job, result) in batch.iter().zip(results.iter_mut()) {
        if result.is_err() {
            continue;
        }
        *result = match &job.op {
            Op::Commit {
                body_tmp,
                body,
                env_tmp,
                env,
                ..
            } => std::fs::rename(body_tmp, body).and_then(|()| std::fs::rename(env_tmp, env)),
            Op::Write { tmp, path, .. } => std::fs::rename(tmp, path),
            Op::Remove(paths) => paths
                .iter()
                .try_for_each(|p| match std::fs::remove_file(p) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                }),
        };
    }
    let synced = File::open(names)
        .and_then(|d| d.sync_all())
        .and_then(|()| File::open(root).and_then(|d| d.sync_all()));
    if let Err(e) = synced {
        return batch
            .iter()
            .map(|_| Err(io::Error::new(e.kind(), e.to_string())))
            .collect();
    }
    results
}
