//! The workers: each takes its account's oldest due message, asks pacing for a turn, sends it
//! through the shared pool, and decides each recipient's fate from its reply: `2xx` delivered
//! (never sent again), `5xx` bounced, `4xx` retried with backoff. Throttling pauses the account
//! without counting against the message; connection and token trouble holds the account's
//! messages on the same backoff schedule. A message still pending at `max_queue_age_secs` is
//! bounced. A message leaves the queue only once every bounce it owes is queued too.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::dsn;
use super::index::{worker_count, AccountQueue};
use super::model::{Envelope, RcptStatus};
use super::pauses::{Hold, Pause};
use super::retry::{backoff, pause_for};
use super::spool::Claim;
use super::transfer::{self, Transfer};
use super::Queue;
use crate::delivery::pacing::{Pace, Pacers};
use crate::delivery::status::{Cause, Status};
use crate::delivery::transport::Transport;
use crate::observe::metrics::AccountCounters;
use crate::observe::MessageOutcome;
use crate::smtp::{Reply, Severity};
use crate::util::sync::lock;

/// Attempts in a row on which one recipient of a message drew a throttling reply before that is
/// taken as the recipient's trouble (a deferral with backoff) rather than the account's.
const STRIKES: u32 = 2;

/// A message another process holds (or that could not be claimed) is tried again after this.
const CLAIM_AGAIN: Duration = Duration::from_secs(5);

/// A throttled message waits this long after the pause ends, so the others go first.
const BEHIND: Duration = Duration::from_secs(1);

pub(super) struct Worker {
    /// Its place among the account's workers; those at or above the cap leave.
    pub lane: usize,
    pub queue: Arc<Queue>,
    pub aq: Arc<AccountQueue>,
    pub transport: Arc<dyn Transport>,
    pub pacer: Arc<dyn Pace>,
    pub pacers: Arc<Pacers>,
    pub counters: AccountCounters,
}

/// One transaction's worth of work for a worker.
struct Job {
    env: Arc<Envelope>,
    /// Indexes into the envelope's recipients; none: only bounces are left to queue.
    rcpts: Vec<usize>,
}

/// What a worker does next.
enum Next {
    Job(Job),
    /// Messages past `max_queue_age_secs`, taken from the index.
    Expired(Vec<String>),
    Sleep(Option<Instant>),
    /// `pick` chose this message (recipients `rcpts`) if pacing gives it a turn; `expiry`: when
    /// the account's first message expires, to wake for it meanwhile.
    Turn {
        id: String,
        rcpts: Vec<usize>,
        expiry: Option<Instant>,
    },
    /// A reload lowered the account's connection cap below this worker's lane.
    Leave,
}

impl Worker {
    pub async fn run(self, stop: CancellationToken, cut: CancellationToken) {
        loop {
            let work = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                work = self.next_work() => work,
            };
            if let Next::Leave = work {
                return;
            }
            // Work in flight finishes, shutdown or not, unless the grace period runs out (a
            // message cut short stays queued and is sent again).
            let done = async {
                match work {
                    Next::Job(job) => self.deliver(job).await,
                    Next::Expired(ids) => {
                        for id in ids {
                            self.expire(&id).await;
                        }
                    }
                    Next::Sleep(_) | Next::Leave | Next::Turn { .. } => {}
                }
            };
            tokio::select! {
                _ = done => {}
                _ = cut.cancelled() => return,
            }
        }
    }

    /// The next job or expired messages, sleeping until there is one.
    async fn next_work(&self) -> Next {
        let lifted = self.queue.pauses.lifted();
        loop {
            let wake = self.aq.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            // A pause another relay lifted (shared store) ends the sleep too.
            let lift = async {
                match &lifted {
                    Some(n) => n.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(lift);
            if self.leaves() {
                return Next::Leave;
            }
            let picked = match self.pick() {
                Next::Turn { id, rcpts, expiry } => self.paced(id, rcpts, expiry).await,
                other => other,
            };
            match picked {
                work @ (Next::Job(_) | Next::Expired(_) | Next::Leave) => return work,
                Next::Turn { .. } => unreachable!("paced above"),
                Next::Sleep(until) => {
                    let sleep = async {
                        match until {
                            Some(t) => tokio::time::sleep_until(t).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = wake => {}
                        _ = sleep => {}
                        _ = lift => {}
                    }
                }
            }
        }
    }

    /// Whether this worker's lane is above the account's cap; if so, its lane is free from now on.
    /// Decided under the lanes' lock, so that a reload raising the cap again either sees the
    /// worker stay or sees its lane free and fills it.
    fn leaves(&self) -> bool {
        let mut lanes = lock(&self.aq.lanes);
        if self.lane < worker_count(&self.aq.account.load()) {
            return false;
        }
        lanes.remove(&self.lane);
        true
    }

    /// Under the lock: expired messages out, else the oldest due message that pacing allows.
    fn pick(&self) -> Next {
        let queue = &self.queue;
        let now = queue.clock.now();
        let mut inner = lock(&self.aq.inner);
        // Ids are time-ordered, so the messages that expire first are at the front.
        let expired: Vec<String> = inner
            .messages
            .values()
            .take_while(|e| e.expires <= now)
            .filter(|e| !e.busy && e.pending().next().is_some())
            .map(|e| e.env.id.clone())
            .collect();
        if !expired.is_empty() {
            for id in &expired {
                inner.take(id);
            }
            return Next::Expired(expired);
        }
        let soonest_expiry = inner
            .messages
            .values()
            .find(|e| !e.busy && e.pending().next().is_some())
            .map(|e| e.expires);
        let wake_by = |t: Option<Instant>| match (t, soonest_expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(p) = queue.pauses.current(&self.aq.name, now) {
            return Next::Sleep(wake_by(Some(p.until)));
        }
        let first = inner.ready.iter().next().cloned();
        let Some((_, id)) = first.clone().filter(|(due, _)| *due <= now) else {
            return Next::Sleep(wake_by(first.map(|(due, _)| due)));
        };
        let e = inner.messages.get(&id).expect("ready messages are indexed");
        let untried: Vec<usize> = e.pending().filter(|i| !e.tried[*i]).collect();
        if untried.is_empty() {
            // Only bounces are owed: no transaction, no turn from pacing.
            let env = inner.take(&id).expect("found above").env.clone();
            return Next::Job(Job {
                env,
                rcpts: Vec::new(),
            });
        }
        // An API sends a message in one request: it is never split (pacing waits until the
        // day's budget has room for all of it, and RCPT refused what one message may not carry);
        // SMTP sends what the budget allows now.
        let cap = if self.aq.account.load().provider.transport.is_api() {
            0
        } else {
            self.pacer.recipients_now(self.pacers.now_ms())
        };
        let take = if cap == 0 { untried.len() } else { cap };
        let rcpts: Vec<usize> = untried.into_iter().take(take).collect();
        Next::Turn {
            id,
            rcpts,
            expiry: soonest_expiry,
        }
    }

    /// A turn from pacing for the message `pick` chose (outside the lock: a shared store's
    /// pacing is a database round trip); then the message, unless another worker took it meanwhile.
    async fn paced(&self, id: String, rcpts: Vec<usize>, expiry: Option<Instant>) -> Next {
        let n = rcpts.len() as u32;
        if let Err(wait) = self.pacer.take(n, self.pacers.now_ms()).await {
            tracing::debug!(account = %self.aq.name, "{}", wait.describe(&self.aq.name));
            let until = self.queue.clock.now() + wait.after;
            return Next::Sleep(Some(expiry.map_or(until, |e| e.min(until))));
        }
        let mut inner = lock(&self.aq.inner);
        // Still as `pick` saw it: not taken by another worker meanwhile, due, and each chosen
        // recipient still pending and untried (else another worker's attempt came between).
        let now = self.queue.clock.now();
        let unchanged = inner.messages.get(&id).is_some_and(|e| {
            !e.busy
                && e.due <= now
                && rcpts
                    .iter()
                    .all(|i| !e.tried[*i] && e.pending().any(|p| p == *i))
        });
        if unchanged {
            let env = inner.take(&id).expect("found above").env.clone();
            return Next::Job(Job { env, rcpts });
        }
        drop(inner);
        self.pacer.refund(n, self.pacers.now_ms());
        Next::Sleep(Some(self.queue.clock.now()))
    }

    async fn deliver(&self, job: Job) {
        let spool = &self.queue.spool;
        let id = job.env.id.clone();
        let claim = spool.claim(&id).await;
        if let Ok(Claim::Taken) = claim {
            self.attempt(job).await;
            spool.release(&id);
            return;
        }
        // Not sent: the pacing turn (if one was taken: a message with only bounces left takes
        // none) goes back, and the message waits (held by another process, or the database out
        // of reach) or leaves the index (another relay adopted it).
        if !job.rcpts.is_empty() {
            self.pacer
                .refund(job.rcpts.len() as u32, self.pacers.now_ms());
        }
        let mut inner = lock(&self.aq.inner);
        match claim {
            Ok(Claim::Gone) => {
                inner.remove(&id);
                tracing::info!(id, account = %self.aq.name, "queued message taken over by another relay");
            }
            _ => {
                // The database's own trouble is logged once by the store; each message's retry
                // is detail.
                if let Err(e) = &claim {
                    tracing::debug!(id, error = %e, "cannot claim a queued message; trying again later");
                }
                inner.release(&id);
                inner.set_due(&id, self.queue.clock.now() + CLAIM_AGAIN);
            }
        }
    }

    async fn attempt(&self, job: Job) {
        if job.rcpts.is_empty() {
            return self.conclude(&job.env.id).await;
        }
        let account = self.aq.account.load_full();
        let env = &job.env;
        let addresses: Vec<String> = job
            .rcpts
            .iter()
            .map(|i| env.recipients[*i].clone())
            .collect();
        let body = self.queue.spool.open_body(env).await;
        match transfer::transfer(&*self.transport, &account, env, &addresses, body).await {
            Transfer::Decided(statuses) => self.settle(job, statuses).await,
            Transfer::Stopped { status, recipient } => self.stopped(job, status, recipient).await,
        }
    }

    /// Nothing was decided: the account pauses (throttling, trouble, busy connections), and the
    /// message keeps its place, unless it was the one drawing the throttling.
    async fn stopped(&self, job: Job, status: Status, recipient: Option<usize>) {
        let queue = &self.queue;
        let name = &self.aq.name;
        let now = queue.clock.now();
        // Nothing was sent: the turn taken from pacing is given back.
        self.pacer
            .refund(job.rcpts.len() as u32, self.pacers.now_ms());
        let cause = status.cause().unwrap_or(Cause::Connection);
        // What last happened to the message tried, for `queue` (not an attempt of its own, except
        // where `record_attempt` below says so); set with the pause, so that whoever sees one sees
        // the other.
        let last = (cause != Cause::Busy).then(|| Box::new(status.clone()));
        let reply = status.into_reply();
        let (pause, why, hold, behind) = match cause {
            Cause::Busy => (
                Duration::from_secs(1),
                "all upstream connections busy".to_string(),
                Hold::Busy,
                false,
            ),
            Cause::Throttled | Cause::Quota => {
                let struck = recipient.is_some() && {
                    let mut inner = lock(&self.aq.inner);
                    inner.messages.get_mut(&job.env.id).is_some_and(|e| {
                        e.strikes += 1;
                        e.strikes >= STRIKES
                    })
                };
                if struck {
                    // The account works for the others; this recipient keeps drawing it.
                    tracing::warn!(id = %job.env.id, account = %name, reply = %reply.summary(), "a recipient keeps drawing a throttling reply; deferring the message instead of pausing the account");
                    let reply = if reply.severity() == Severity::Transient {
                        reply
                    } else {
                        Reply::new(
                            451,
                            format!(
                                "4.7.0 deferred after repeated throttling ({})",
                                reply.summary()
                            ),
                        )
                    };
                    let deferred = Status::temporary(Cause::Deferred, reply);
                    let statuses = vec![deferred; job.rcpts.len()];
                    return self.settle(job, statuses).await;
                }
                let pause = pause_for(&reply, cause, &queue.config.load());
                tracing::warn!(account = %name, reply = %reply.summary(), pause_secs = pause.as_secs(), "provider is throttling the account; pausing its queue");
                (
                    pause,
                    format!("throttled: {}", reply.summary()),
                    Hold::Throttled,
                    recipient.is_some(),
                )
            }
            Cause::Connection | Cause::Token | Cause::Deferred => {
                let n = queue.pauses.trouble(name, now);
                let pause = backoff(n, &queue.config.load());
                let why = reply.summary();
                tracing::warn!(account = %name, error = %why, next_attempt_secs = pause.as_secs(), "queued mail held");
                (pause, why, Hold::Trouble, false)
            }
        };
        let until = now + pause;
        // In force before anything is awaited: a `queue retry` from now on lifts it.
        let pause = {
            let mut inner = lock(&self.aq.inner);
            if let (Some(last), Some(e)) = (last, inner.messages.get_mut(&job.env.id)) {
                e.progress.last = Some(last);
            }
            queue.pauses.pause(name, Pause { until, why, hold })
        };
        if matches!(cause, Cause::Connection | Cause::Token) {
            // The message tried has had an attempt, like any other that failed for now: its
            // count, its last reply and its next attempt are recorded (an offline `queue` shows
            // them, and rebuilds the account's hold from them).
            self.record_attempt(&job, pause.until.saturating_duration_since(now))
                .await;
        }
        let mut inner = lock(&self.aq.inner);
        if behind {
            // Behind the others when the pause ends, so that one recipient's throttling does not
            // make the whole queue wait on it.
            inner.set_due(&job.env.id, pause.until + BEHIND);
        }
        inner.release(&job.env.id);
    }

    /// Records each recipient's fate from its status, then what is owed for the message.
    async fn settle(&self, job: Job, statuses: Vec<Status>) {
        let queue = &self.queue;
        let account = self.aq.account.load_full();
        let env = job.env.clone();
        let now = queue.clock.now();
        let mut failed = Vec::new();
        queue.pauses.recovered(&self.aq.name);
        let retry_in = {
            let mut inner = lock(&self.aq.inner);
            let Some(e) = inner.messages.get_mut(&env.id) else {
                return;
            };
            e.strikes = 0;
            for (i, status) in job.rcpts.iter().zip(statuses) {
                let address = &env.recipients[*i];
                let summary = status.reply().summary();
                let r = &mut e.progress.recipients[*i];
                e.tried[*i] = true;
                match &status {
                    Status::Accepted { .. } => {
                        r.status = RcptStatus::Delivered;
                        self.counters.accepted(1);
                        tracing::info!(id = %env.id, to = %address, reply = %summary, "delivered");
                    }
                    Status::Permanent { reply } => {
                        r.status = RcptStatus::Bounced;
                        r.notified = false;
                        let code = reply.enhanced().map(|c| c.to_string());
                        let code = code.unwrap_or_else(|| "5.0.0".into());
                        tracing::info!(id = %env.id, to = %address, reply = %summary, "bounced");
                        failed.push(code.clone());
                        r.dsn_status = Some(code.into());
                    }
                    Status::Temporary { .. } => {
                        queue
                            .observer
                            .metrics
                            .recipients(&account.name, "deferred", 1);
                        tracing::info!(id = %env.id, to = %address, reply = %summary, "deferred");
                    }
                }
                r.last = Some(Box::new(status));
            }
            // The message's last word: its batch's last recipient's.
            if let Some(last) = job.rcpts.last() {
                e.progress.last = e.progress.recipients[*last].last.clone();
            }
            let pending: Vec<usize> = e.pending().collect();
            let mut retry_in = None;
            if !pending.is_empty() && pending.iter().all(|i| e.tried[*i]) {
                e.progress.attempts += 1;
                let wait = backoff(e.progress.attempts, &queue.config.load());
                e.due = now + wait;
                e.progress.next_attempt = queue.clock.unix() + wait.as_secs();
                e.tried.iter_mut().for_each(|t| *t = false);
                retry_in = Some((e.progress.attempts, wait));
            }
            retry_in
        };
        if let Some((attempts, wait)) = retry_in {
            tracing::info!(id = %env.id, attempts, next_attempt_secs = wait.as_secs(), "message deferred");
        }
        queue.bounced(&account.name, &env, &failed);
        self.conclude(&env.id).await;
    }

    /// A failed attempt that decided no recipient (no connection, no token): counted and recorded.
    async fn record_attempt(&self, job: &Job, wait: Duration) {
        let queue = &self.queue;
        let progress = {
            let mut inner = lock(&self.aq.inner);
            let Some(e) = inner.messages.get_mut(&job.env.id) else {
                return;
            };
            e.progress.attempts += 1;
            e.progress.next_attempt = queue.clock.unix() + wait.as_secs();
            e.progress.clone()
        };
        queue
            .record_progress(
                &self.aq,
                &job.env,
                &progress,
                "record delivery progress in the spool",
            )
            .await;
    }

    /// A message past `max_queue_age_secs`: its pending recipients are bounced.
    async fn expire(&self, id: &str) {
        let mut failed = Vec::new();
        let env = {
            let mut inner = lock(&self.aq.inner);
            let Some(e) = inner.messages.get_mut(id) else {
                return;
            };
            for i in e.pending().collect::<Vec<_>>() {
                tracing::info!(id = %e.env.id, to = %e.env.recipients[i], "bounced: still undelivered at max_queue_age_secs");
                let r = &mut e.progress.recipients[i];
                r.status = RcptStatus::Bounced;
                r.notified = false;
                r.dsn_status = Some("4.4.7".into());
                failed.push("4.4.7".to_string());
            }
            e.env.clone()
        };
        self.queue.bounced(&self.aq.name, &env, &failed);
        self.conclude(id).await;
    }

    /// What is owed once recipients are decided: the bounce for those that failed (a bounce that
    /// cannot be queued keeps the message, and is tried again), then the message removed when
    /// nothing is left, or its progress recorded.
    async fn conclude(&self, id: &str) {
        let queue = &self.queue;
        let account = self.aq.account.load_full();
        let failed = |e: &super::index::Entry| -> Vec<dsn::Failed> {
            let env = &e.env;
            e.progress
                .unnotified()
                .map(|i| {
                    let r = &e.progress.recipients[i];
                    let diagnostic = match &env.damaged {
                        Some(what) => format!("the relay's queued copy could not be read: {what}"),
                        None => r.last_reply().unwrap_or_else(|| {
                            "delivery time expired before the upstream could be reached".into()
                        }),
                    };
                    dsn::Failed {
                        address: env.recipients[i].clone(),
                        status: r.dsn_status.as_deref().unwrap_or("5.0.0").to_string(),
                        diagnostic,
                    }
                })
                .collect()
        };
        let Some((env, failed)) = lock(&self.aq.inner)
            .messages
            .get(id)
            .map(|e| (e.env.clone(), failed(e)))
        else {
            return;
        };
        let owed = !failed.is_empty();
        let notified = match queue.prepare_bounce(&account, &env, &failed).await {
            None => true,
            // The bounce first: a crash before the original's record then means a second bounce,
            // never none.
            Some((writer, bounce)) => queue.commit_bounce(&env, writer, bounce).await,
        };
        let now = queue.clock.now();
        let (bounced, progress) = {
            let mut inner = lock(&self.aq.inner);
            let Some(e) = inner.messages.get_mut(id) else {
                return;
            };
            if notified {
                e.progress
                    .recipients
                    .iter_mut()
                    .for_each(|r| r.notified = true);
            } else {
                // Tried again on the backoff schedule, by whichever worker picks it then.
                let wait = backoff(e.progress.attempts.max(1), &queue.config.load());
                e.due = e.due.max(now + wait);
                e.progress.next_attempt = queue.clock.unix() + wait.as_secs();
            }
            let finished = e.finished();
            let bounced = e
                .progress
                .recipients
                .iter()
                .any(|r| r.status == RcptStatus::Bounced);
            // What is recorded, for a message that stays.
            (bounced, (!finished).then(|| e.progress.clone()))
        };
        let Some(progress) = progress else {
            if bounced {
                // Once per message, when it is finished with: not once per attempt that bounced some.
                self.counters
                    .message(MessageOutcome::Bounced, env.size as usize);
            }
            if owed {
                // Its bounce is queued: removed durably before the worker goes on.
                if let Err(e) = queue.spool.remove(&env).await {
                    tracing::warn!(id = %env.id, error = %e, "cannot remove a finished message from the spool");
                }
            } else {
                // The common case, delivered: the worker goes on while the removal becomes
                // durable (the spool tries until it is; shutdown waits for it).
                queue.spool.remove_detached(&env);
            }
            lock(&self.aq.inner).remove(id);
            return;
        };
        queue
            .record_progress(
                &self.aq,
                &env,
                &progress,
                "record delivery progress in the spool",
            )
            .await;
        lock(&self.aq.inner).release(id);
        // More recipients of it may go at once.
        self.aq.wake.notify_one();
    }
}
