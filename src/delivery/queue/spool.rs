//! The queue on disk: what makes a queue-mode `250` true after a crash.
//!
//! Under `data_dir/queue/` (directories `0700`, files `0600`):
//! - `seg/`: small messages (received whole in memory), appended to a segment log ([`super::log`])
//!   by the committer, many to one `fdatasync`: the fast path, with no file per message.
//! - `tmp/ID`: a large message being received; whatever is here at start-up was never acknowledged.
//! - `msg/ID`: a message in a file of its own: one line of envelope (JSON), then the body as the
//!   mailer sent it (dot-stuffing undone); never changed again. Its presence is the commit. Large
//!   messages go here directly, logged ones move here when they stay (deferred, held).
//! - `msg/ID.state`: per-recipient progress (JSON), replaced atomically after each attempt.
//!
//! Every change that must survive a crash goes through one committer thread, which takes all the
//! changes waiting at that moment and makes them durable together: one `fdatasync` of the log and
//! one `fsync` per directory touched (group commit: ten sessions queueing at once share one sync
//! instead of queueing behind each other).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::File;
use std::io::{self, BufRead, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::log::{self, LogAt, KIND_DONE, KIND_MESSAGE};

/// Bytes of body gathered in memory before they are written out.
const WRITE_BATCH: usize = 256 * 1024;
/// How long a batch of done records waits for company. Nobody waits on them (a message that
/// arrives ends the wait), and a crash inside the window only means a message delivered again,
/// so the window is wide enough to make them a few dozen syncs a second under load.
const DONE_LINGER: std::time::Duration = std::time::Duration::from_millis(20);
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
    /// Where the body starts in its file (after the envelope line).
    #[serde(skip)]
    pub body_offset: u64,
    /// Where the body is in the log, for a logged message.
    #[serde(skip)]
    pub logged: Option<LogAt>,
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
    /// Detached removals are waiting in [`Spool::detached`]: take them into this batch.
    TakeDetached,
    /// A record for the log.
    Append {
        kind: u8,
        payload: Vec<u8>,
    },
}

impl Op {
    /// The directory whose entries it changes.
    fn dir(&self) -> Option<&Path> {
        match self {
            Op::Place { to, .. } => to.parent(),
            Op::Write { path, .. } => path.parent(),
            Op::Remove(paths) => paths.first().and_then(|p| p.parent()),
            Op::Append { .. } | Op::TakeDetached => None,
        }
    }
}

struct Job {
    op: Op,
    /// Who waits for the result; `None` for a removal nobody waits on (the committer logs a
    /// failure itself).
    done: Option<oneshot::Sender<io::Result<Option<LogAt>>>>,
    /// The message it is about, for that log line.
    id: Option<String>,
}

/// Where a message's body can be read, off the async runtime.
#[derive(Debug, Clone)]
pub enum BodySource {
    Log {
        dir: PathBuf,
        at: LogAt,
        len: u64,
        /// The segment, already open.
        open: Option<std::sync::Arc<File>>,
    },
    File {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
}

impl BodySource {
    /// The whole body if it can be had without waiting for the disk: a logged body whose pages
    /// are in the page cache (`preadv2` with `RWF_NOWAIT`), as a just-queued one is. `None`:
    /// read it on the blocking pool instead.
    pub fn read_cached(&self) -> Option<Vec<u8>> {
        let BodySource::Log {
            at,
            len,
            open: Some(file),
            ..
        } = self
        else {
            return None;
        };
        let mut buf = vec![0u8; usize::try_from(*len).ok()?];
        let mut done = 0;
        while done < buf.len() {
            let slice = &mut [std::io::IoSliceMut::new(&mut buf[done..])];
            let flags = rustix::io::ReadWriteFlags::NOWAIT;
            match rustix::io::preadv2(file, slice, at.offset + done as u64, flags) {
                Ok(n) if n > 0 => done += n,
                _ => return None,
            }
        }
        Some(buf)
    }

    /// Up to `limit` bytes from the start of the body. Blocking.
    pub fn read(&self, limit: u64) -> io::Result<Vec<u8>> {
        match self {
            BodySource::Log { dir, at, len, .. } => log::read_at(dir, *at, (*len).min(limit)),
            BodySource::File { path, offset, .. } => read_body(path, *offset, limit),
        }
    }
}

pub struct Spool {
    root: PathBuf,
    msg: PathBuf,
    tmp: PathBuf,
    seg: PathBuf,
    jobs: mpsc::Sender<Job>,
    /// The segment being appended to (kept by the committer).
    active: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Removals of delivered messages, gathered here and handed to the committer with one
    /// wake-up per batch instead of one per message.
    detached: Detached,
    /// Segments recently read from, kept open: reading a logged body is then one `preadv2`.
    readers: std::sync::Mutex<VecDeque<(u64, std::sync::Arc<File>)>>,
}

/// Open segment files kept for reading; a segment deleted while open keeps its space until its
/// handle goes ([`Spool::close_readers`]).
const OPEN_READERS: usize = 4;

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
        let seg = root.join("seg");
        let new = !seg.exists();
        for dir in [&root, &msg, &tmp, &seg] {
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
        // The log: messages without a done record, unless they moved to a file meanwhile.
        let mut logged: BTreeMap<String, Envelope> = BTreeMap::new();
        for found in log::scan(&seg)? {
            match found.kind {
                KIND_MESSAGE => match envelope_line(&found.payload) {
                    Some((mut envelope, header)) => {
                        envelope.size = (found.payload.len() - header) as u64;
                        envelope.logged = Some(LogAt {
                            segment: found.segment,
                            offset: found.offset + header as u64,
                        });
                        logged.insert(envelope.id.clone(), envelope);
                    }
                    None => tracing::error!(
                        segment = found.segment,
                        "unreadable message record in the spool log skipped"
                    ),
                },
                KIND_DONE => {
                    // The segment of the message, then its id.
                    let id = found.payload.get(8..).unwrap_or_default();
                    logged.remove(String::from_utf8_lossy(id).as_ref());
                }
                _ => {}
            }
        }
        let in_files: BTreeSet<String> = stored.iter().map(|s| s.envelope.id.clone()).collect();
        let mut live: BTreeMap<u64, usize> = BTreeMap::new();
        // Moved to a file, but the crash came before the log's done record: the file wins, and
        // the log is told now (else the message would come back once its file is gone).
        let mut moved: Vec<Vec<u8>> = Vec::new();
        for (id, envelope) in logged {
            if in_files.contains(&id) {
                let mut payload = envelope
                    .logged
                    .expect("set above")
                    .segment
                    .to_le_bytes()
                    .to_vec();
                payload.extend_from_slice(id.as_bytes());
                moved.push(payload);
                continue;
            }
            let segment = envelope.logged.expect("set above").segment;
            *live.entry(segment).or_default() += 1;
            stored.push(Stored {
                envelope,
                progress: None,
            });
        }
        stored.sort_by(|a, b| a.envelope.id.cmp(&b.envelope.id));
        let mut log = log::Log::open(&seg, live)?;
        if !moved.is_empty() {
            let records: Vec<(u8, &[u8])> =
                moved.iter().map(|p| (KIND_DONE, p.as_slice())).collect();
            log.append(&records)?;
        }
        let active = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(log.active()));
        let (jobs, rx) = mpsc::channel();
        let shown = active.clone();
        let detached = Detached::default();
        let taken = detached.clone();
        std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || committer(rx, log, &shown, &taken))?;
        Ok((
            Spool {
                root,
                msg,
                tmp,
                seg,
                jobs,
                active,
                detached,
                readers: std::sync::Mutex::new(VecDeque::new()),
            },
            stored,
        ))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where to read `env`'s body from.
    pub fn body(&self, env: &Envelope) -> BodySource {
        match env.logged {
            Some(at) => BodySource::Log {
                dir: self.seg.clone(),
                at,
                len: env.size,
                open: self.reader(at.segment),
            },
            None => BodySource::File {
                path: self.msg.join(&env.id),
                offset: env.body_offset,
                len: env.size,
            },
        }
    }

    /// The segment being appended to: logged messages in segments well before it should move
    /// to files so that the log can shrink.
    pub fn active_segment(&self) -> u64 {
        self.active.load(std::sync::atomic::Ordering::Relaxed)
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

    /// Hands `op` to the committer now; the answer comes when it is durable.
    /// Closes the segments kept open for reading (run periodically, so that deleted segments give
    /// their space back).
    pub fn close_readers(&self) {
        self.readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The segment `number`, open for reading (from the few kept open, or opened now).
    fn reader(&self, number: u64) -> Option<std::sync::Arc<File>> {
        let mut readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, f)) = readers.iter().find(|(n, _)| *n == number) {
            return Some(f.clone());
        }
        let file = std::sync::Arc::new(File::open(log::segment_path(&self.seg, number)).ok()?);
        if readers.len() >= OPEN_READERS {
            readers.pop_front();
        }
        readers.push_back((number, file.clone()));
        Some(file)
    }

    fn submit(&self, op: Op) -> impl std::future::Future<Output = io::Result<Option<LogAt>>> {
        let (done, result) = oneshot::channel();
        let sent = self.jobs.send(Job {
            op,
            done: Some(done),
            id: None,
        });
        async move {
            sent.map_err(|_| io::Error::other("the spool committer has stopped"))?;
            result
                .await
                .map_err(|_| io::Error::other("the spool committer has stopped"))?
        }
    }

    async fn run(&self, op: Op) -> io::Result<Option<LogAt>> {
        self.submit(op).await
    }

    /// Waits until everything handed to the committer before is durable (at shutdown).
    pub async fn flush(&self) {
        let _ = self.run(Op::Remove(Vec::new())).await;
    }

    /// Makes a received message durable together with whatever else is being committed at that
    /// moment: appended to the log if it is all in memory, else its file synced and named in
    /// `msg/`. Sets where its body is.
    pub async fn commit(&self, mut writer: SpoolWriter, env: &mut Envelope) -> io::Result<()> {
        if writer.file.is_none() && writer.failed.is_none() {
            let payload = std::mem::take(&mut writer.buf);
            let at = self
                .run(Op::Append {
                    kind: KIND_MESSAGE,
                    payload,
                })
                .await?
                .expect("an append has a place");
            writer.committed = true;
            env.logged = Some(LogAt {
                segment: at.segment,
                offset: at.offset + writer.header,
            });
            return Ok(());
        }
        writer.write_out(true).await?;
        let op = Op::Place {
            from: writer.path.clone(),
            to: self.msg.join(&env.id),
        };
        self.run(op).await?;
        writer.committed = true;
        env.body_offset = writer.header;
        env.logged = None;
        Ok(())
    }

    /// Records a message's progress durably. A logged message moves to a file of its own first
    /// (it is staying, and must not keep its segment alive); `env` then says where it is.
    pub async fn record(&self, env: &mut Envelope, progress: &Progress) -> io::Result<()> {
        if let Some(at) = env.logged {
            self.move_to_file(env, at).await?;
        }
        let id = &env.id;
        let op = Op::Write {
            tmp: self.msg.join(format!("{id}.state.tmp")),
            path: self.msg.join(format!("{id}.state")),
            bytes: serde_json::to_vec(progress).map_err(io::Error::other)?,
        };
        self.run(op).await.map(|_| ())
    }

    async fn move_to_file(&self, env: &mut Envelope, at: LogAt) -> io::Result<()> {
        let source = self.body(env);
        let mut head = serde_json::to_vec(&*env).map_err(io::Error::other)?;
        head.push(b'\n');
        let header = head.len() as u64;
        let tmp = self.tmp.join(&env.id);
        let to_write = tmp.clone();
        tokio::task::spawn_blocking(move || {
            let body = source.read(u64::MAX)?;
            let mut f = crate::util::fs::create_private(&to_write)?;
            f.write_all(&head)?;
            f.write_all(&body)?;
            f.sync_data()
        })
        .await
        .map_err(io::Error::other)??;
        let dest = self.msg.join(&env.id);
        if let Err(e) = self
            .run(Op::Place {
                from: tmp,
                to: dest.clone(),
            })
            .await
        {
            // The rename may have happened before the failure: back to the log copy alone.
            let _ = tokio::fs::remove_file(&dest).await;
            return Err(e);
        }
        let logged = Envelope {
            logged: Some(at),
            ..Envelope::clone(env)
        };
        // From here the file is the message, whatever happens to the log's done record.
        env.logged = None;
        env.body_offset = header;
        // Only now the log may forget it: a crash in between finds it twice, the file wins, and
        // start-up writes the done record that is missing.
        if let Err(e) = self.remove(&logged).await {
            tracing::warn!(id = %env.id, error = %e, "cannot mark a moved message in the spool log; the next start-up does");
        }
        Ok(())
    }

    /// Removes a message that is done with (delivered, bounced or deleted), durably: a crash
    /// afterwards must not deliver it again. The removal is handed over at once; the future
    /// says when it is durable.
    pub fn remove(&self, env: &Envelope) -> impl std::future::Future<Output = io::Result<()>> {
        let durable = self.submit(self.removal(env));
        async move { durable.await.map(|_| ()) }
    }

    /// The change that removes `env`: a done record for a logged message, else its files.
    fn removal(&self, env: &Envelope) -> Op {
        match env.logged {
            Some(at) => {
                let mut payload = at.segment.to_le_bytes().to_vec();
                payload.extend_from_slice(env.id.as_bytes());
                Op::Append {
                    kind: KIND_DONE,
                    payload,
                }
            }
            None => {
                let id = &env.id;
                // The message first: without it the state file means nothing.
                Op::Remove(vec![
                    self.msg.join(id),
                    self.msg.join(format!("{id}.state")),
                ])
            }
        }
    }

    /// [`Spool::remove`] for a delivered message, without a waiter: the worker goes on at once, the
    /// committer logs a failure, and shutdown's [`Spool::flush`] still waits for it.
    pub fn remove_detached(&self, env: &Envelope) {
        let job = Job {
            op: self.removal(env),
            done: None,
            id: Some(env.id.clone()),
        };
        let first = {
            let mut waiting = lock(&self.detached);
            waiting.push(job);
            waiting.len() == 1
        };
        // The first one wakes the committer; the others join it until it takes them.
        if first {
            let _ = self.jobs.send(Job {
                op: Op::TakeDetached,
                done: None,
                id: None,
            });
        }
    }

    /// Writes a small file durably (the pacing windows).
    pub async fn write_file(&self, name: &str, bytes: Vec<u8>) -> io::Result<()> {
        let op = Op::Write {
            tmp: self.tmp.join(format!("{name}.tmp")),
            path: self.root.join(name),
            bytes,
        };
        self.run(op).await.map(|_| ())
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

/// The envelope line at the start of `bytes`, and its length with the newline.
fn envelope_line(bytes: &[u8]) -> Option<(Envelope, usize)> {
    let end = memchr::memchr(b'\n', bytes)?;
    let envelope = serde_json::from_slice(&bytes[..end]).ok()?;
    Some((envelope, end + 1))
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

/// The committer thread: takes every job waiting, then one sync per directory touched and one
/// append and sync of the log.
type Detached = std::sync::Arc<std::sync::Mutex<Vec<Job>>>;

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn committer(
    rx: mpsc::Receiver<Job>,
    mut log: log::Log,
    active: &std::sync::atomic::AtomicU64,
    detached: &Detached,
) {
    while let Ok(first) = rx.recv() {
        // Nobody waits on a batch of detached done records: until a job someone waits on comes,
        // or the window closes, more of them join the same sync.
        let deadline = std::time::Instant::now() + DONE_LINGER;
        let mut nobody_waits = first.done.is_none();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            let job = match rx.try_recv() {
                Ok(job) => job,
                Err(_) if nobody_waits => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    match rx.recv_timeout(left) {
                        Ok(job) => job,
                        Err(_) => break,
                    }
                }
                Err(_) => break,
            };
            nobody_waits &= job.done.is_none();
            batch.push(job);
        }
        if batch.iter().any(|j| matches!(j.op, Op::TakeDetached)) {
            batch.append(&mut lock(detached));
        }
        let results = commit_batch(&batch, &mut log);
        active.store(log.active(), std::sync::atomic::Ordering::Relaxed);
        for (job, result) in batch.into_iter().zip(results) {
            match job.done {
                Some(done) => {
                    let _ = done.send(result);
                }
                None => {
                    if let Err(e) = result {
                        let id = job.id.as_deref().unwrap_or("");
                        tracing::warn!(id, error = %e, "cannot record delivery progress in the spool");
                    }
                }
            }
        }
    }
}

fn commit_batch(batch: &[Job], log: &mut log::Log) -> Vec<io::Result<Option<LogAt>>> {
    let mut results: Vec<io::Result<Option<LogAt>>> = batch
        .iter()
        .map(|job| match &job.op {
            Op::Place { from, to } => std::fs::rename(from, to).map(|()| None),
            Op::Write { tmp, path, bytes } => crate::util::fs::create_private(tmp)
                .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_data()))
                .and_then(|()| std::fs::rename(tmp, path))
                .map(|()| None),
            Op::Remove(paths) => paths
                .iter()
                .try_for_each(|p| match std::fs::remove_file(p) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                })
                .map(|()| None),
            Op::Append { .. } | Op::TakeDetached => Ok(None),
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
    let records: Vec<(usize, u8, &[u8])> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, job)| match &job.op {
            Op::Append { kind, payload } => Some((i, *kind, payload.as_slice())),
            _ => None,
        })
        .collect();
    if !records.is_empty() {
        let wire: Vec<(u8, &[u8])> = records.iter().map(|(_, k, p)| (*k, *p)).collect();
        match log.append(&wire) {
            Ok(places) => {
                for ((i, kind, payload), at) in records.iter().zip(places) {
                    results[*i] = Ok(Some(at));
                    if *kind == KIND_DONE {
                        if let Some(segment) = payload.get(..8).and_then(|b| b.try_into().ok()) {
                            log.release(u64::from_le_bytes(segment));
                        }
                    }
                }
            }
            Err(e) => {
                for (i, _, _) in &records {
                    results[*i] = Err(io::Error::new(e.kind(), e.to_string()));
                }
            }
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(id: &str) -> Envelope {
        Envelope {
            id: id.into(),
            account: "news".into(),
            sender: "a@example.com".into(),
            recipients: vec!["b@example.org".into()],
            ..Envelope::default()
        }
    }

    #[tokio::test]
    async fn a_message_moved_to_a_file_before_a_crash_never_comes_back_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, stored) = Spool::open(dir.path()).unwrap();
        assert!(stored.is_empty());
        let mut env = envelope("A1");
        let mut writer = spool.writer(&env);
        writer.push(b"Subject: x\r\n\r\nbody\r\n").await;
        spool.commit(writer, &mut env).await.unwrap();
        assert!(env.logged.is_some(), "small messages go to the log");
        // The move to a file got as far as the file; the crash came before the done record.
        let mut head = serde_json::to_vec(&env).unwrap();
        head.push(b'\n');
        head.extend_from_slice(b"Subject: x\r\n\r\nbody\r\n");
        std::fs::write(dir.path().join("queue/msg/A1"), head).unwrap();
        drop(spool);

        let (spool, stored) = Spool::open(dir.path()).unwrap();
        assert_eq!(stored.len(), 1, "the file wins, once");
        assert!(stored[0].envelope.logged.is_none());
        spool.remove(&stored[0].envelope).await.unwrap();
        drop(spool);
        let (_spool, stored) = Spool::open(dir.path()).unwrap();
        assert!(stored.is_empty(), "delivered and gone, also from the log");
    }
}
