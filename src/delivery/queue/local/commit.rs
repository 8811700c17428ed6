//! The committer thread of the local spool: it takes every change waiting at that moment and
//! makes them durable together (one `fdatasync` of the log, one `fsync` per directory touched: ten
//! sessions queueing at once share one sync instead of queueing behind each other). A change that
//! must last (a done record, a progress record) and fails is kept and tried again, with its
//! waiters, until it is durable.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::disk::Disk;
use super::log::{self, LogAt, Rec};
use crate::util::sync::lock;

/// How long a batch of done records waits for company. Nobody waits on them (a message that
/// arrives ends the wait), and a crash inside the window only means a message delivered again,
/// so the window is wide enough to make them a few dozen syncs a second under load.
const DONE_LINGER: Duration = Duration::from_millis(20);
/// Changes made durable together at most.
const MAX_BATCH: usize = 512;
/// A change that must not be lost (a done record, a progress record) and failed is tried again
/// after this, doubling up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// At shutdown, changes still failing are waited for this long at most.
const FLUSH_PATIENCE: Duration = Duration::from_secs(10);

pub(super) enum Op {
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
    /// A message for the log: its envelope line is the first `header` bytes.
    Message {
        bytes: Vec<u8>,
        header: usize,
    },
    /// A logged message is done with; `release`: it counted as live in its segment (a damaged
    /// one, kept aside, did not).
    Done {
        segment: u64,
        id: String,
        release: bool,
    },
    /// Answered once every change before it is durable (or, for those that keep failing, after
    /// [`FLUSH_PATIENCE`]).
    Flush,
}

impl Op {
    /// The directory whose entries it changes.
    fn dir(&self) -> Option<&Path> {
        match self {
            Op::Place { to, .. } => to.parent(),
            Op::Write { path, .. } => path.parent(),
            Op::Remove(paths) => paths.first().and_then(|p| p.parent()),
            _ => None,
        }
    }

    /// A change whose loss would bring a message back or undo its progress after a restart: tried
    /// again until it is durable. (A new message's own commit fails at once instead: its mailer
    /// gets a `451` and sends it again.)
    fn must_last(&self) -> bool {
        matches!(self, Op::Write { .. } | Op::Remove(_) | Op::Done { .. })
    }
}

pub(super) type Answer = oneshot::Sender<io::Result<Option<LogAt>>>;

pub(super) struct Job {
    pub(super) op: Op,
    /// Who waits for the result; none for a removal nobody waits on (the committer logs a
    /// failure itself).
    pub(super) done: Vec<Answer>,
    /// The message it is about, for that log line.
    pub(super) id: Option<String>,
}

pub(super) type Detached = Arc<std::sync::Mutex<Vec<Job>>>;

/// The committer thread: takes every job waiting, then one sync per directory touched and one
/// append and sync of the log. A change that must last and failed (a full disk, an IO error) is
/// kept and tried again, with its waiters, until it is durable.
pub(super) struct Committer {
    log: log::Log,
    disk: Arc<dyn Disk>,
    retry: Vec<Job>,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Flushes waiting for the retries to succeed, with their deadline.
    flushes: Vec<(Instant, Answer)>,
}

impl Committer {
    pub(super) fn new(log: log::Log, disk: Arc<dyn Disk>) -> Committer {
        Committer {
            log,
            disk,
            retry: Vec::new(),
            retry_at: None,
            backoff: RETRY_FIRST,
            flushes: Vec::new(),
        }
    }

    /// When the loop must wake without a new job: a retry, or a flush's deadline.
    fn wake_at(&self) -> Option<Instant> {
        let flush = self.flushes.iter().map(|(at, _)| *at).min();
        match (self.retry_at, flush) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(super) fn run(
        mut self,
        rx: mpsc::Receiver<Job>,
        active: &std::sync::atomic::AtomicU64,
        detached: &Detached,
    ) {
        loop {
            let first = match self.wake_at() {
                None => match rx.recv() {
                    Ok(job) => Some(job),
                    Err(_) => break,
                },
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(job) => Some(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                },
            };
            let mut batch = first.map(|job| gather(job, &rx)).unwrap_or_default();
            if batch.iter().any(|j| matches!(j.op, Op::TakeDetached)) {
                batch.append(&mut lock(detached));
            }
            self.supersede(&mut batch);
            if self.retry_at.is_some_and(|at| at <= Instant::now()) {
                batch.append(&mut self.retry);
                self.retry_at = None;
            }
            let results = self.commit(&batch);
            active.store(self.log.active(), std::sync::atomic::Ordering::Relaxed);
            let mut failed = false;
            for (job, result) in batch.into_iter().zip(results) {
                match result {
                    Err(e) if job.op.must_last() => {
                        failed = true;
                        let id = job.id.as_deref().unwrap_or("");
                        tracing::warn!(id, error = %e, "cannot make a change to the spool durable; trying again (until then a restart could deliver the message again)");
                        self.retry.push(job);
                    }
                    _ if matches!(job.op, Op::Flush) => {
                        let until = Instant::now() + FLUSH_PATIENCE;
                        self.flushes
                            .extend(job.done.into_iter().map(|answer| (until, answer)));
                    }
                    result => answer(job.done, result),
                }
            }
            if failed {
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(RETRY_MAX);
            } else if self.retry.is_empty() {
                self.backoff = RETRY_FIRST;
            }
            self.settle_flushes();
        }
        for job in &self.retry {
            tracing::error!(
                id = job.id.as_deref().unwrap_or(""),
                "a change to the spool never became durable; the message may be delivered again"
            );
        }
    }

    /// A new write of a file replaces a failed older one waiting to be tried again (which must
    /// never land after it); the older one's waiters wait for the new one.
    fn supersede(&mut self, batch: &mut [Job]) {
        for job in batch.iter_mut() {
            let Op::Write { path, .. } = &job.op else {
                continue;
            };
            let (old, keep): (Vec<Job>, Vec<Job>) = std::mem::take(&mut self.retry)
                .into_iter()
                .partition(|r| matches!(&r.op, Op::Write { path: p, .. } if p == path));
            self.retry = keep;
            for old in old {
                job.done.extend(old.done);
            }
        }
        if self.retry.is_empty() {
            self.retry_at = None;
        }
    }

    /// Flushes are answered once nothing waits to be tried again, or at their deadline.
    fn settle_flushes(&mut self) {
        let now = Instant::now();
        let clear = self.retry.is_empty();
        let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.flushes)
            .into_iter()
            .partition(|(until, _)| clear || *until <= now);
        self.flushes = wait;
        if !due.is_empty() && !clear {
            for job in &self.retry {
                tracing::error!(id = job.id.as_deref().unwrap_or(""), "a change to the spool is still not durable at shutdown; the message may be delivered again after the restart");
            }
        }
        for (_, answer) in due {
            let _ = answer.send(Ok(None));
        }
    }

    fn commit(&mut self, batch: &[Job]) -> Vec<io::Result<Option<LogAt>>> {
        let disk = &*self.disk;
        let mut results: Vec<io::Result<Option<LogAt>>> = batch
            .iter()
            .map(|job| match &job.op {
                Op::Place { from, to } => disk.rename(from, to).map(|()| None),
                Op::Write { tmp, path, bytes } => crate::util::fs::create_private(tmp)
                    .and_then(|mut f| {
                        disk.write(tmp, &mut f, bytes)
                            .and_then(|()| disk.sync(tmp, &f))
                    })
                    .and_then(|()| disk.rename(tmp, path))
                    .map(|()| None),
                Op::Remove(paths) => paths
                    .iter()
                    .try_for_each(|p| match std::fs::remove_file(p) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                        _ => Ok(()),
                    })
                    .map(|()| None),
                _ => Ok(None),
            })
            .collect();
        let dirs: BTreeSet<&Path> = batch.iter().filter_map(|j| j.op.dir()).collect();
        for dir in dirs {
            if let Err(e) = disk.sync_dir(dir) {
                for (job, result) in batch.iter().zip(results.iter_mut()) {
                    if job.op.dir() == Some(dir) && result.is_ok() {
                        *result = Err(io::Error::new(e.kind(), e.to_string()));
                    }
                }
            }
        }
        let records: Vec<(usize, Rec<'_>)> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, job)| match &job.op {
                Op::Message { bytes, header } => Some((
                    i,
                    Rec::Message {
                        envelope: &bytes[..*header],
                        body: &bytes[*header..],
                    },
                )),
                Op::Done { segment, id, .. } => Some((
                    i,
                    Rec::Done {
                        segment: *segment,
                        id,
                    },
                )),
                _ => None,
            })
            .collect();
        if !records.is_empty() {
            let wire: Vec<Rec<'_>> = records.iter().map(|(_, r)| *r).collect();
            match self.log.append(&wire) {
                Ok(places) => {
                    for ((i, _), at) in records.iter().zip(places) {
                        results[*i] = Ok(Some(at));
                        if let Op::Done {
                            segment,
                            release: true,
                            ..
                        } = &batch[*i].op
                        {
                            self.log.release(*segment);
                        }
                    }
                }
                Err(e) => {
                    for (i, _) in &records {
                        results[*i] = Err(io::Error::new(e.kind(), e.to_string()));
                    }
                }
            }
        }
        results
    }
}

/// `first` and the jobs waiting behind it. Nobody waits on a batch of detached done records:
/// until a job someone waits on comes, or the window closes, more of them join the same sync.
fn gather(first: Job, rx: &mpsc::Receiver<Job>) -> Vec<Job> {
    let deadline = Instant::now() + DONE_LINGER;
    let mut nobody_waits = first.done.is_empty();
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        let job = match rx.try_recv() {
            Ok(job) => job,
            Err(_) if nobody_waits => {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(job) => job,
                    Err(_) => break,
                }
            }
            Err(_) => break,
        };
        nobody_waits &= job.done.is_empty();
        batch.push(job);
    }
    batch
}

fn answer(waiters: Vec<Answer>, result: io::Result<Option<LogAt>>) {
    for waiter in waiters {
        let copy = match &result {
            Ok(v) => Ok(*v),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        };
        let _ = waiter.send(copy);
    }
}
