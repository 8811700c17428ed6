//! The local spool: the queue on this machine's disk, what makes a queue-mode `250` true after a
//! crash.
//!
//! Under `data_dir/queue/` (directories `0700`, files `0600`):
//! - `seg/`: small messages (received whole in memory), appended to a segment log ([`log`])
//!   by the committer, many to one `fdatasync`: the fast path, with no file per message.
//! - `tmp/ID`: a large message being received; whatever is here at start-up was never acknowledged.
//! - `msg/ID`: a message in a file of its own: one line of envelope (JSON), then the body as the
//!   mailer sent it (dot-stuffing undone); never changed again. Its presence is the commit. Large
//!   messages go here directly, logged ones move here when they stay (deferred, held).
//! - `msg/ID.state`: per-recipient progress (JSON), replaced atomically after each attempt.
//!
//! - `corrupt/`: damaged log bytes kept aside.
//!
//! Every change that must survive a crash goes through one committer thread ([`commit`]), which
//! makes everything waiting at that moment durable together.

mod commit;
pub mod disk;
pub mod log;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::File;
use std::io::{self, BufRead, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use tokio::sync::oneshot;

use self::commit::{Committer, Detached, Job, Op};
use self::disk::Disk;
use self::log::{LogAt, Rec, Record};
use super::model::{valid_id, Envelope, Progress};
use super::spool::{Body, Claim, Incoming, Opened, Quarantine, Spool, Stored};
use crate::util::sync::lock;
use crate::util::BoxFuture;

/// Bytes of body gathered in memory before they are written out.
const WRITE_BATCH: usize = 256 * 1024;
/// Where a message's body can be read, off the async runtime.
#[derive(Debug, Clone)]
enum BodySource {
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
    fn read_cached(&self) -> Option<Vec<u8>> {
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
    fn read(&self, limit: u64) -> io::Result<Vec<u8>> {
        match self {
            BodySource::Log { dir, at, len, .. } => log::read_at(dir, *at, (*len).min(limit)),
            BodySource::File { path, offset, .. } => read_body(path, *offset, limit),
        }
    }
}

/// Bodies at most this long are read whole (one trip to the blocking pool).
const READ_WHOLE: u64 = 128 * 1024;

/// The local spool (see the module's documentation).
pub struct LocalSpool(Arc<Inner>);

struct Inner {
    root: PathBuf,
    msg: PathBuf,
    tmp: PathBuf,
    seg: PathBuf,
    corrupt: PathBuf,
    disk: Arc<dyn Disk>,
    jobs: mpsc::Sender<Job>,
    /// The segment being appended to (kept by the committer).
    active: Arc<std::sync::atomic::AtomicU64>,
    /// Removals of delivered messages, gathered here and handed to the committer with one
    /// wake-up per batch instead of one per message.
    detached: Detached,
    /// Segments recently read from, kept open: reading a logged body is then one `preadv2`.
    readers: std::sync::Mutex<VecDeque<(u64, Arc<File>)>>,
}

/// Open segment files kept for reading; a segment deleted while open keeps its space until its
/// handle goes ([`Spool::close_readers`]).
const OPEN_READERS: usize = 4;

impl LocalSpool {
    /// Creates the directories, throws away what was never committed, and returns the messages
    /// that were. Blocking: run at start-up.
    pub fn open(data_dir: &Path, disk: Arc<dyn Disk>) -> io::Result<(LocalSpool, Opened)> {
        let root = data_dir.join("queue");
        let msg = root.join("msg");
        let tmp = root.join("tmp");
        let seg = root.join("seg");
        let corrupt = root.join("corrupt");
        let new = !seg.exists();
        for dir in [&root, &msg, &tmp, &seg] {
            crate::util::fs::create_private_dir(dir)?;
        }
        if new {
            // The new directories' names must survive a power loss as much as the files in them.
            for dir in [&root, data_dir] {
                disk.sync_dir(dir)?;
            }
        }
        for entry in std::fs::read_dir(&tmp)? {
            let _ = std::fs::remove_file(entry?.path());
        }
        let mut opened = Opened::default();
        let mut ids = BTreeSet::new();
        for entry in std::fs::read_dir(&msg)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(&path);
            } else if valid_id(name) {
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
                Ok(mut envelope) => {
                    if envelope.id != id {
                        tracing::warn!(id, inside = %envelope.id, "spool file whose envelope names another id: its file name is used");
                    }
                    // The name is what every path is built from, never the text inside.
                    envelope.id = id.clone();
                    let progress = std::fs::read(msg.join(format!("{id}.state")))
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Progress>(&b).ok())
                        .filter(|p| p.recipients.len() == envelope.recipients.len());
                    opened.stored.push(Stored { envelope, progress });
                }
                Err(e) => {
                    // Committed files are complete (synced before their rename); this one is not ours.
                    tracing::warn!(id, error = %e, "unreadable file in the spool left alone");
                }
            }
        }
        // The log: messages without a done record, unless they moved to a file meanwhile.
        let scan = log::scan(&seg, &corrupt, &*disk)?;
        let mut pinned = scan.pinned;
        let mut logged: BTreeMap<String, Envelope> = BTreeMap::new();
        for found in scan.found {
            match found.record {
                Record::Message {
                    envelope,
                    body,
                    len,
                } => match parse_envelope(&envelope) {
                    Some(mut env) => {
                        env.size = len;
                        env.logged = Some(body);
                        logged.insert(env.id.clone(), env);
                    }
                    None => {
                        // It checks out, so it was written whole: by a release that wrote
                        // something this one cannot read. Kept, never deleted unread.
                        tracing::error!(
                            segment = found.segment,
                            "spool log record with an envelope this release cannot read; its segment is kept"
                        );
                        pinned.insert(found.segment);
                    }
                },
                Record::Done { id, .. } => {
                    logged.remove(&id);
                }
            }
        }
        // Damaged bodies whose envelope survived are messages the queue lists (and never sends).
        for d in &scan.damage {
            let Some(mut env) = d.envelope.as_deref().and_then(parse_envelope) else {
                continue;
            };
            env.logged = Some(LogAt {
                segment: d.segment,
                offset: d.offset,
            });
            env.size = d.len;
            env.damaged = Some(
                format!(
                "its body in the spool was found damaged (segment {}, offset {}, {} bytes){}: it cannot \
                 be delivered as received; nothing of it was sent",
                d.segment,
                d.offset,
                d.len,
                d.kept
                    .as_ref()
                    .map(|p| format!("; the bytes are kept in {}", p.display()))
                    .unwrap_or_default()
                )
                .into(),
            );
            logged.entry(env.id.clone()).or_insert(env);
        }
        opened.damage = scan.damage;
        let in_files: BTreeSet<String> = opened
            .stored
            .iter()
            .map(|s| s.envelope.id.clone())
            .collect();
        let mut live: BTreeMap<u64, usize> = BTreeMap::new();
        // Moved to a file, but the crash came before the log's done record: the file wins, and
        // the log is told now (else the message would come back once its file is gone).
        let mut moved: Vec<(u64, String)> = Vec::new();
        for (id, envelope) in logged {
            let segment = envelope.logged.expect("set above").segment;
            if in_files.contains(&id) {
                moved.push((segment, id));
                continue;
            }
            // A damaged message's bytes are kept aside: it needs nothing of its segment.
            if envelope.damaged.is_none() {
                *live.entry(segment).or_default() += 1;
            }
            opened.stored.push(Stored {
                envelope,
                progress: None,
            });
        }
        opened
            .stored
            .sort_by(|a, b| a.envelope.id.cmp(&b.envelope.id));
        let mut log = log::Log::open(&seg, disk.clone(), live, pinned)?;
        if !moved.is_empty() {
            let records: Vec<Rec<'_>> = moved
                .iter()
                .map(|(segment, id)| Rec::Done {
                    segment: *segment,
                    id,
                })
                .collect();
            log.append(&records)?;
        }
        let active = Arc::new(std::sync::atomic::AtomicU64::new(log.active()));
        let (jobs, rx) = mpsc::channel();
        let shown = active.clone();
        let detached = Detached::default();
        let taken = detached.clone();
        let committing = disk.clone();
        std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || Committer::new(log, committing).run(rx, &shown, &taken))?;
        Ok((
            LocalSpool(Arc::new(Inner {
                root,
                msg,
                tmp,
                seg,
                corrupt,
                disk,
                jobs,
                active,
                detached,
                readers: std::sync::Mutex::new(VecDeque::new()),
            })),
            opened,
        ))
    }
}

impl Inner {
    /// What `queue/corrupt/` holds.
    fn quarantine(&self) -> Quarantine {
        let mut q = Quarantine {
            dir: self.corrupt.clone(),
            ..Quarantine::default()
        };
        if let Ok(entries) = std::fs::read_dir(&self.corrupt) {
            for e in entries.flatten() {
                if let Ok(m) = e.metadata() {
                    if m.is_file() && !e.file_name().to_string_lossy().ends_with(".tmp") {
                        q.files += 1;
                        q.bytes += m.len();
                    }
                }
            }
        }
        q
    }

    /// Where to read `env`'s body from.
    fn body(&self, env: &Envelope) -> BodySource {
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

    /// `env`'s body, to send: a small one read whole (without waiting for the disk when its pages
    /// are cached, as a just-queued one's are), a large one (always in a file) streamed.
    async fn open_body(&self, env: &Envelope) -> io::Result<Body> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let source = self.body(env);
        if let BodySource::File { path, offset, len } = &source {
            if *len > READ_WHOLE {
                let mut file = tokio::fs::File::open(path).await?;
                file.seek(io::SeekFrom::Start(*offset)).await?;
                return Ok(Body::Stream(Box::new(file.take(*len))));
            }
        }
        if let Some(bytes) = source.read_cached() {
            return Ok(Body::Bytes(bytes));
        }
        tokio::task::spawn_blocking(move || source.read(u64::MAX))
            .await
            .map_err(io::Error::other)?
            .map(Body::Bytes)
    }

    /// The segment `number`, open for reading (from the few kept open, or opened now).
    fn reader(&self, number: u64) -> Option<Arc<File>> {
        let mut readers = lock(&self.readers);
        if let Some((_, f)) = readers.iter().find(|(n, _)| *n == number) {
            return Some(f.clone());
        }
        let file = Arc::new(File::open(log::segment_path(&self.seg, number)).ok()?);
        if readers.len() >= OPEN_READERS {
            readers.pop_front();
        }
        readers.push_back((number, file.clone()));
        Some(file)
    }

    /// Hands `op` to the committer now; the answer comes when it is durable.
    fn submit(&self, op: Op) -> impl std::future::Future<Output = io::Result<Option<LogAt>>> {
        let (done, result) = oneshot::channel();
        let sent = self.jobs.send(Job {
            op,
            done: vec![done],
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

    /// Waits until everything handed to the committer before is durable (at shutdown); what still
    /// fails after [`FLUSH_PATIENCE`] is logged by name.
    async fn flush(&self) {
        let _ = self.run(Op::Flush).await;
    }

    /// Renames a synced file into `msg/`, durably. On failure nothing is left there: the rename
    /// may have happened before the directory sync failed, and a file left in `msg/` would be
    /// delivered at the next start although its mailer was told to send it again.
    async fn place(&self, from: &Path, to: &Path) -> io::Result<()> {
        let placed = self
            .run(Op::Place {
                from: from.to_path_buf(),
                to: to.to_path_buf(),
            })
            .await;
        if let Err(e) = placed {
            if std::fs::remove_file(to).is_ok() {
                let _ = self.disk.sync_dir(&self.msg);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Records a message's progress durably. A logged message moves to a file of its own first
    /// (it is staying, and must not keep its segment alive); `env` then says where it is.
    async fn record(&self, env: &mut Envelope, progress: &Progress) -> io::Result<()> {
        if let Some(at) = env.logged.filter(|_| env.damaged.is_none()) {
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
        let disk = self.disk.clone();
        tokio::task::spawn_blocking(move || {
            let body = source.read(u64::MAX)?;
            let mut f = crate::util::fs::create_private(&to_write)?;
            disk.write(&to_write, &mut f, &head)?;
            disk.write(&to_write, &mut f, &body)?;
            disk.sync(&to_write, &f)
        })
        .await
        .map_err(io::Error::other)??;
        if let Err(e) = self.place(&tmp, &self.msg.join(&env.id)).await {
            // Back to the log copy alone.
            let _ = std::fs::remove_file(&tmp);
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
        self.remove_detached(&logged);
        Ok(())
    }

    /// Removes a message that is done with (delivered, bounced or deleted), durably: a crash
    /// afterwards must not deliver it again. The removal is handed over at once and tried until
    /// it is durable; the future says when it is.
    fn remove(
        &self,
        env: &Envelope,
    ) -> impl std::future::Future<Output = io::Result<()>> + 'static {
        let durable = self.submit(self.removal(env));
        async move { durable.await.map(|_| ()) }
    }

    /// The change that removes `env`: a done record for a logged message, else its files.
    fn removal(&self, env: &Envelope) -> Op {
        match env.logged {
            Some(at) => Op::Done {
                segment: at.segment,
                id: env.id.clone(),
                release: env.damaged.is_none(),
            },
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

    /// [`Spool::remove`] for a delivered message, without a waiter: the worker goes on at once,
    /// the committer tries until the removal is durable, and shutdown's [`Spool::flush`] waits
    /// for it.
    fn remove_detached(&self, env: &Envelope) {
        let job = Job {
            op: self.removal(env),
            done: Vec::new(),
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
                done: Vec::new(),
                id: None,
            });
        }
    }

    /// Writes a small file durably (the pacing windows).
    async fn write_file(&self, name: &str, bytes: Vec<u8>) -> io::Result<()> {
        let op = Op::Write {
            tmp: self.tmp.join(format!("{name}.tmp")),
            path: self.root.join(name),
            bytes,
        };
        self.run(op).await.map(|_| ())
    }
}

/// An envelope from the spool log, if it is one this release can use.
fn parse_envelope(bytes: &[u8]) -> Option<Envelope> {
    let env: Envelope = serde_json::from_slice(bytes).ok()?;
    valid_id(&env.id).then_some(env)
}

/// Receives a body: in memory up to [`WRITE_BATCH`] (then it goes to the log whole), else into
/// `tmp/`; dropped without a commit, it removes what it wrote.
struct LocalIncoming {
    spool: Arc<Inner>,
    path: PathBuf,
    disk: Arc<dyn Disk>,
    file: Option<File>,
    /// Length of the envelope line.
    header: u64,
    buf: Vec<u8>,
    size: u64,
    failed: Option<io::ErrorKind>,
    committed: bool,
}

impl LocalIncoming {
    /// Adds body bytes; they reach the disk in batches, off the async runtime.
    async fn add(&mut self, chunk: &[u8]) {
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
        let disk = self.disk.clone();
        let (file, mut buf) = tokio::task::spawn_blocking(move || {
            let mut buf = buf;
            let mut file = match file {
                Some(f) => f,
                None => crate::util::fs::create_private(&path)?,
            };
            disk.write(&path, &mut file, &buf)?;
            if last {
                disk.sync(&path, &file)?;
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

impl Incoming for LocalIncoming {
    fn size(&self) -> u64 {
        self.size
    }

    fn push<'a>(&'a mut self, chunk: &'a [u8]) -> BoxFuture<'a, ()> {
        Box::pin(self.add(chunk))
    }

    /// Durable together with whatever else is being committed at that moment: appended to the
    /// log if it is all in memory, else its file synced and named in `msg/`.
    fn commit<'a>(mut self: Box<Self>, env: &'a mut Envelope) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let spool = self.spool.clone();
            if self.file.is_none() && self.failed.is_none() {
                let bytes = std::mem::take(&mut self.buf);
                let header = self.header as usize;
                let at = spool
                    .run(Op::Message { bytes, header })
                    .await?
                    .expect("an append has a place");
                self.committed = true;
                env.logged = Some(at);
                return Ok(());
            }
            self.write_out(true).await?;
            let dest = spool.msg.join(&env.id);
            spool.place(&self.path, &dest).await?;
            self.committed = true;
            env.body_offset = self.header;
            env.logged = None;
            Ok(())
        })
    }
}

impl Drop for LocalIncoming {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Spool for LocalSpool {
    fn incoming(&self, envelope: &Envelope) -> Box<dyn Incoming> {
        let mut buf = serde_json::to_vec(envelope).unwrap_or_default();
        buf.push(b'\n');
        Box::new(LocalIncoming {
            spool: self.0.clone(),
            path: self.0.tmp.join(&envelope.id),
            disk: self.0.disk.clone(),
            file: None,
            header: buf.len() as u64,
            buf,
            size: 0,
            failed: None,
            committed: false,
        })
    }

    fn record<'a>(
        &'a self,
        env: &'a mut Envelope,
        progress: &'a Progress,
    ) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(self.0.record(env, progress))
    }

    fn remove(&self, env: &Envelope) -> BoxFuture<'static, io::Result<()>> {
        Box::pin(self.0.remove(env))
    }

    fn remove_detached(&self, env: &Envelope) {
        self.0.remove_detached(env)
    }

    fn open_body<'a>(&'a self, env: &'a Envelope) -> BoxFuture<'a, io::Result<Body>> {
        Box::pin(self.0.open_body(env))
    }

    fn read_head<'a>(&'a self, env: &'a Envelope, limit: u64) -> BoxFuture<'a, Vec<u8>> {
        let source = self.0.body(env);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || source.read(limit))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default()
        })
    }

    /// A logged message staying while the log moved on keeps every segment after its own.
    fn pins_storage(&self, env: &Envelope) -> bool {
        let active = self.0.active.load(std::sync::atomic::Ordering::Relaxed);
        env.damaged.is_none() && env.logged.is_some_and(|at| at.segment + 1 < active)
    }

    /// Segments deleted since are held open by readers: their space goes now.
    fn upkeep(&self) {
        lock(&self.0.readers).clear();
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.0.flush())
    }

    fn quarantine(&self) -> Quarantine {
        self.0.quarantine()
    }

    fn space(&self) -> Option<(u64, u64)> {
        let st = rustix::fs::statvfs(&self.0.root).ok()?;
        Some((
            st.f_bavail.saturating_mul(st.f_frsize),
            st.f_blocks.saturating_mul(st.f_frsize),
        ))
    }

    fn write_state<'a>(&'a self, name: &'a str, bytes: Vec<u8>) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(self.0.write_file(name, bytes))
    }

    fn read_state(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.0.root.join(name)).ok()
    }

    fn claim<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, io::Result<Claim>> {
        Box::pin(std::future::ready(Ok(Claim::Taken)))
    }

    fn renew<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn release(&self, _id: &str) {}
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

#[cfg(test)]
mod tests;
