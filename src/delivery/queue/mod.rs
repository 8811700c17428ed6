//! Queue mode: a `250` means the message is on disk and will be delivered or returned to its
//! sender, whatever the provider is doing at that moment (Postfix's promise).
//!
//! - [`spool`]: the files, and the group commit that makes them durable.
//! - [`transfer`]: one upstream transaction of a queued message, one reply per recipient.
//! - [`retry`]: backoff, and which replies are throttling rather than failure.
//! - [`dsn`]: the bounce (RFC 3464) for recipients that failed for good.
//!
//! Each account has workers, as many as its `max_upstream_connections` (a reload adds or retires
//! some), that take due messages oldest first, ask the account's [`Pacer`] before each
//! transaction, and send through the shared pool. A recipient's fate is decided from its reply: `2xx` delivered (never sent again), `5xx`
//! bounced, `4xx` retried with backoff. Throttling pauses the account without counting against
//! the message; connection and token trouble holds the account's messages on the same backoff
//! schedule. A message still pending at `max_queue_age_secs` is bounced.

pub mod dsn;
pub mod log;
pub mod retry;
pub mod spool;
pub mod transfer;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::retry::{backoff, pause_for, throttle};
use self::spool::{Envelope, Progress, RcptStatus, Spool, SpoolWriter};
use self::transfer::Stopped;
use super::pacing::{Pacer, Pacers};
use super::pool::Pool;
use crate::config::{Account, DeliveryConfig};
use crate::observe::metrics::AccountCounters;
use crate::observe::{Event, MessageOutcome, Observer};
use crate::smtp::{Reply, Severity};
use crate::util::clock::SharedClock;
use crate::util::keyed::Keyed;

static ID_SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Where the daily pacing windows are kept between runs (in the spool directory).
const PACING_FILE: &str = "pacing.json";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Entry {
    env: Arc<Envelope>,
    progress: Progress,
    due: Instant,
    expires: Instant,
    /// A worker has it.
    busy: bool,
    /// Recipients tried in the current round (a round ends when every pending one has been tried).
    tried: Vec<bool>,
}

impl Entry {
    fn pending(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.env.recipients.len())
            .filter(|i| self.progress.recipients[*i].status == RcptStatus::Pending)
    }
}

/// Why an account waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// The provider is throttling it (rate, connections, quota).
    Throttled,
    /// The upstream is unreachable or the token does not work.
    Trouble,
    /// Its connections are all in use.
    Busy,
}

struct Pause {
    until: Instant,
    why: String,
    hold: Hold,
}

#[derive(Default)]
struct Inner {
    /// By id, which is time-ordered: oldest (and first to expire) first.
    messages: BTreeMap<String, Entry>,
    /// The messages no worker has, by when they are due: the next job is the first.
    ready: std::collections::BTreeSet<(Instant, String)>,
    paused: Option<Pause>,
    /// Consecutive attempts that failed for the account (connection, token): the hold's backoff.
    trouble: u32,
}

impl Inner {
    fn insert(&mut self, e: Entry) {
        self.ready.insert((e.due, e.env.id.clone()));
        self.messages.insert(e.env.id.clone(), e);
    }

    fn remove(&mut self, id: &str) -> Option<Entry> {
        let e = self.messages.remove(id)?;
        self.ready.remove(&(e.due, e.env.id.clone()));
        Some(e)
    }

    fn set_due(&mut self, id: &str, due: Instant) {
        if let Some(e) = self.messages.get_mut(id) {
            if !e.busy {
                self.ready.remove(&(e.due, e.env.id.clone()));
                self.ready.insert((due, e.env.id.clone()));
            }
            e.due = due;
        }
    }

    /// A worker takes it.
    fn take(&mut self, id: &str) -> Option<&mut Entry> {
        let e = self.messages.get_mut(id)?;
        e.busy = true;
        self.ready.remove(&(e.due, e.env.id.clone()));
        Some(e)
    }

    /// Its worker is done with it for now.
    fn release(&mut self, id: &str) {
        if let Some(e) = self.messages.get_mut(id) {
            if e.busy {
                e.busy = false;
                self.ready.insert((e.due, e.env.id.clone()));
            }
        }
    }
}

struct AccountQueue {
    name: String,
    /// Swapped by a reload.
    account: arc_swap::ArcSwap<Account>,
    inner: Mutex<Inner>,
    /// A message arrived, a pause was lifted, a retry was asked for.
    wake: Notify,
    /// The slots (0 .. `max_upstream_connections`) that have a worker: a reload that raises the
    /// cap starts workers for the empty ones, one that lowers it lets the workers above it go.
    slots: Mutex<std::collections::BTreeSet<usize>>,
}

/// One queued message as `queue` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MessageView {
    pub id: String,
    pub account: String,
    pub sender: String,
    pub size: u64,
    pub age_secs: u64,
    pub attempts: u32,
    pub next_attempt_secs: u64,
    pub last_reply: Option<String>,
    pub recipients: Vec<RecipientView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecipientView {
    pub address: String,
    pub state: &'static str,
    pub last_reply: Option<String>,
}

/// An account's queue at a glance, for `accounts`.
pub struct AccountView {
    pub queued: usize,
    pub paused: Option<String>,
    pub oldest_secs: Option<u64>,
}

/// What `queue retry` applies to.
pub enum Target {
    Id(String),
    Account(String),
    All,
}

pub struct Queue {
    spool: Spool,
    accounts: Keyed<AccountQueue>,
    /// `[delivery]`; a reload swaps it.
    config: arc_swap::ArcSwap<DeliveryConfig>,
    /// What workers need, once [`Queue::start`] ran: a reload starts workers for new accounts.
    workers: Mutex<Option<Workers>>,
    clock: SharedClock,
    /// Our name, for bounces (Reporting-MTA).
    hostname: String,
    observer: Observer,
}

/// What a worker runs with.
struct Workers {
    pool: Arc<Pool>,
    pacers: Arc<Pacers>,
    stop: CancellationToken,
    cut: CancellationToken,
    tasks: TaskTracker,
}

impl AccountQueue {
    fn new(account: &Arc<Account>) -> AccountQueue {
        AccountQueue {
            name: account.name.clone(),
            account: arc_swap::ArcSwap::new(account.clone()),
            inner: Mutex::new(Inner::default()),
            wake: Notify::new(),
            slots: Mutex::new(Default::default()),
        }
    }
}

/// One transaction's worth of work for a worker.
struct Job {
    env: Arc<Envelope>,
    /// Indexes into the envelope's recipients.
    rcpts: Vec<usize>,
}

impl Queue {
    /// Opens the spool and indexes what it holds; blocking (start-up or a one-shot command).
    pub fn open(
        data_dir: &std::path::Path,
        config: DeliveryConfig,
        accounts: &[Arc<Account>],
        clock: SharedClock,
        hostname: &str,
        observer: Observer,
    ) -> std::io::Result<Queue> {
        let (spool, stored) = Spool::open(data_dir)?;
        let accounts = Keyed::new(
            accounts
                .iter()
                .map(|a| (a.name.clone(), AccountQueue::new(a))),
        );
        let queue = Queue {
            spool,
            accounts,
            config: arc_swap::ArcSwap::from_pointee(config),
            clock,
            hostname: hostname.to_string(),
            observer,
            workers: Mutex::new(None),
        };
        for s in stored {
            let Some(aq) = queue.accounts.get(&s.envelope.account) else {
                tracing::warn!(id = %s.envelope.id, account = %s.envelope.account, "queued message for an account that is no longer configured; left in the spool");
                continue;
            };
            let progress = s
                .progress
                .unwrap_or_else(|| Progress::fresh(s.envelope.recipients.len()));
            let entry = queue.entry(Arc::new(s.envelope), progress);
            lock(&aq.inner).insert(entry);
        }
        Ok(queue)
    }

    /// An index entry, its times moved from the wall clock to the monotonic one.
    fn entry(&self, env: Arc<Envelope>, progress: Progress) -> Entry {
        let now = self.clock.now();
        let unix = self.clock.unix();
        let due = now + Duration::from_secs(progress.next_attempt.saturating_sub(unix));
        let expires_unix = env.received + self.config.load().max_queue_age_secs;
        let expires = now + Duration::from_secs(expires_unix.saturating_sub(unix));
        Entry {
            tried: vec![false; env.recipients.len()],
            env,
            progress,
            due,
            expires,
            busy: false,
        }
    }

    /// A new message id: time-ordered (so the queue is FIFO by id) and unique.
    fn new_id(&self) -> String {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        // The sequence makes ids unique within the process; the random part across restarts within
        // one microsecond (a clock stepping back).
        let seq = ID_SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0xFFFF;
        format!(
            "{micros:014X}{seq:04X}{:04X}",
            rand::thread_rng().gen::<u16>()
        )
    }

    /// Gives `env` its id and arrival time, and a spool file to receive its body into.
    pub fn writer(&self, env: &mut Envelope) -> SpoolWriter {
        env.id = self.new_id();
        env.received = self.clock.unix();
        self.spool.writer(env)
    }

    /// Makes a received message durable and schedules it; the id is the mailer's receipt.
    pub async fn accept(&self, writer: SpoolWriter, mut env: Envelope) -> std::io::Result<String> {
        let Some(aq) = self.accounts.get(&env.account) else {
            return Err(std::io::Error::other(format!(
                "account `{}` is not configured",
                env.account
            )));
        };
        env.size = writer.size();
        self.spool.commit(writer, &mut env).await?;
        tracing::info!(id = %env.id, account = %env.account, size = env.size, recipients = env.recipients.len(), bounce = env.bounce, "message queued");
        let progress = Progress::fresh(env.recipients.len());
        let id = env.id.clone();
        let entry = self.entry(Arc::new(env), progress);
        lock(&aq.inner).insert(entry);
        aq.wake.notify_one();
        Ok(id)
    }

    /// Starts each account's workers; they stop between transactions once `stop` is cancelled.
    pub fn start(
        self: &Arc<Self>,
        pool: Arc<Pool>,
        pacers: Arc<Pacers>,
        stop: CancellationToken,
        cut: CancellationToken,
        tasks: &TaskTracker,
    ) {
        let w = Workers {
            pool,
            pacers,
            stop,
            cut,
            tasks: tasks.clone(),
        };
        // Held throughout: a reload adding an account meanwhile waits, then finds the workers.
        let mut workers = lock(&self.workers);
        for aq in self.accounts.all().values() {
            self.spawn_workers(&w, aq);
        }
        *workers = Some(w);
    }

    fn spawn_workers(self: &Arc<Self>, w: &Workers, aq: &Arc<AccountQueue>) {
        let Some(pacer) = w.pacers.get(&aq.name) else {
            return;
        };
        let mut slots = lock(&aq.slots);
        for slot in 0..worker_count(&aq.account.load()) {
            if !slots.insert(slot) {
                continue;
            }
            let worker = Worker {
                slot,
                queue: self.clone(),
                aq: aq.clone(),
                pool: w.pool.clone(),
                pacer: pacer.clone(),
                pacers: w.pacers.clone(),
                counters: self.observer.metrics.account(&aq.name),
            };
            w.tasks.spawn(worker.run(w.stop.clone(), w.cut.clone()));
        }
    }

    /// A reloaded config: new accounts get a queue (and workers, once started); the others
    /// deliver with their new settings from the next transaction on, with as many workers as
    /// their connection cap now allows.
    pub fn reconfigure(self: &Arc<Self>, accounts: &[Arc<Account>], config: &DeliveryConfig) {
        self.config.store(Arc::new(config.clone()));
        let workers = lock(&self.workers);
        for a in accounts {
            let added = !self.accounts.contains(&a.name);
            let aq = self
                .accounts
                .insert_missing(&a.name, || AccountQueue::new(a));
            aq.account.store(a.clone());
            if let Some(w) = workers.as_ref() {
                self.spawn_workers(w, &aq);
            }
            if !added {
                // Idle workers above a lowered cap learn of it now.
                aq.wake.notify_waiters();
            }
        }
    }

    /// Moves logged messages that have stayed while the log moved on (held, throttled) to files of
    /// their own, so that one waiting message does not keep every segment after it on disk. Run
    /// periodically by the app.
    pub async fn compact(&self) {
        // Segments deleted since are held open by readers: let their space go.
        self.spool.close_readers();
        let active = self.spool.active_segment();
        for aq in self.accounts.all().values() {
            let stale: Vec<(Arc<Envelope>, Progress)> = {
                let mut inner = lock(&aq.inner);
                let ids: Vec<String> = inner
                    .messages
                    .values()
                    .filter(|e| !e.busy)
                    .filter(|e| e.env.logged.is_some_and(|at| at.segment + 1 < active))
                    .map(|e| e.env.id.clone())
                    .collect();
                ids.iter()
                    .filter_map(|id| inner.take(id).map(|e| (e.env.clone(), e.progress.clone())))
                    .collect()
            };
            for (env, progress) in stale {
                let mut moved = Envelope::clone(&env);
                if let Err(e) = self.spool.record(&mut moved, &progress).await {
                    tracing::warn!(id = %env.id, error = %e, "cannot move a waiting message out of the spool log");
                }
                let mut inner = lock(&aq.inner);
                if let Some(e) = inner.messages.get_mut(&env.id) {
                    e.env = Arc::new(moved);
                }
                inner.release(&env.id);
            }
        }
    }

    /// Waits until every change handed to the spool is durable.
    pub async fn flush(&self) {
        self.spool.flush().await;
    }

    /// Writes the daily pacing windows where the next run finds them.
    pub async fn save_pacing(&self, pacers: &Pacers) {
        if let Err(e) = self.spool.write_file(PACING_FILE, pacers.snapshot()).await {
            tracing::warn!(error = %e, "cannot save the pacing windows");
        }
    }

    /// Reads what [`Queue::save_pacing`] wrote (blocking; at start-up).
    pub fn load_pacing(&self, pacers: &Pacers) {
        if let Ok(bytes) = std::fs::read(self.spool.root().join(PACING_FILE)) {
            pacers.restore(&bytes);
        }
    }

    fn view(&self, e: &Entry, now: Instant, paused: Option<&Pause>) -> MessageView {
        let next = paused.map_or(e.due, |p| p.until.max(e.due));
        let env = &e.env;
        MessageView {
            id: env.id.clone(),
            account: env.account.clone(),
            sender: env.sender.clone(),
            size: env.size,
            age_secs: self.clock.unix().saturating_sub(env.received),
            attempts: e.progress.attempts,
            next_attempt_secs: next.saturating_duration_since(now).as_secs(),
            last_reply: e
                .progress
                .last_reply
                .clone()
                .or_else(|| paused.map(|p| p.why.clone())),
            recipients: env
                .recipients
                .iter()
                .zip(&e.progress.recipients)
                .map(|(address, r)| RecipientView {
                    address: address.clone(),
                    state: r.status.as_str(),
                    last_reply: r.last_reply.clone(),
                })
                .collect(),
        }
    }

    /// Queued messages, oldest first.
    pub fn list(&self, account: Option<&str>) -> Vec<MessageView> {
        let now = self.clock.now();
        let mut out: Vec<MessageView> = self
            .accounts
            .all()
            .values()
            .filter(|aq| account.is_none_or(|a| a == aq.name))
            .flat_map(|aq| {
                let inner = lock(&aq.inner);
                let paused = inner.paused.as_ref().filter(|p| p.until > now);
                inner
                    .messages
                    .values()
                    .map(|e| self.view(e, now, paused))
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// One message and its headers (never the body).
    pub async fn show(&self, id: &str) -> Option<(MessageView, String)> {
        let view = self.list(None).into_iter().find(|m| m.id == id)?;
        let env = self
            .accounts
            .get(&view.account)
            .and_then(|aq| lock(&aq.inner).messages.get(id).map(|e| e.env.clone()))?;
        let headers = self.headers(&env).await;
        Some((view, String::from_utf8_lossy(&headers).into_owned()))
    }

    async fn headers(&self, env: &Envelope) -> Vec<u8> {
        let source = self.spool.body(env);
        let start = tokio::task::spawn_blocking(move || source.read(64 * 1024))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        dsn::header_block(&start).to_vec()
    }

    pub fn account_view(&self, account: &str) -> AccountView {
        let Some(aq) = self.accounts.get(account) else {
            return AccountView {
                queued: 0,
                paused: None,
                oldest_secs: None,
            };
        };
        let now = self.clock.now();
        let unix = self.clock.unix();
        let inner = lock(&aq.inner);
        AccountView {
            queued: inner.messages.len(),
            paused: inner.paused.as_ref().filter(|p| p.until > now).map(|p| {
                format!(
                    "{} (until {}s from now)",
                    p.why,
                    p.until.saturating_duration_since(now).as_secs()
                )
            }),
            oldest_secs: inner
                .messages
                .values()
                .map(|e| unix.saturating_sub(e.env.received))
                .max(),
        }
    }

    /// Attempt now: lifts the pause and the backoff (pacing still applies), also for a relay
    /// started later. Returns how many messages it applies to.
    pub async fn retry(&self, target: &Target) -> usize {
        let now = self.clock.now();
        let mut count = 0;
        let mut records = Vec::new();
        for aq in self.accounts.all().values() {
            let mut inner = lock(&aq.inner);
            let mut touched = false;
            let ids: Vec<String> = inner
                .messages
                .keys()
                .filter(|id| match target {
                    Target::All => true,
                    Target::Account(a) => *a == aq.name,
                    Target::Id(wanted) => wanted == *id,
                })
                .cloned()
                .collect();
            for id in ids {
                inner.set_due(&id, now);
                let e = inner.messages.get_mut(&id).expect("listed above");
                e.progress.next_attempt = 0;
                // A logged message has no progress file, and a busy one is recorded by its
                // worker; the others need the new time on disk for a relay started later.
                if e.env.logged.is_none() && !e.busy {
                    records.push((aq.clone(), e.env.clone(), e.progress.clone()));
                    // Held while its record is written, so that no worker's newer one is overwritten.
                    inner.take(&id);
                }
                count += 1;
                touched = true;
            }
            if touched || matches!(target, Target::Account(a) if *a == aq.name) {
                inner.paused = None;
                inner.trouble = 0;
                drop(inner);
                aq.wake.notify_waiters();
            }
        }
        for (aq, env, progress) in records {
            let mut env = Envelope::clone(&env);
            if let Err(e) = self.spool.record(&mut env, &progress).await {
                tracing::warn!(id = %env.id, error = %e, "cannot record the retry in the spool");
            }
            lock(&aq.inner).release(&env.id);
            aq.wake.notify_one();
        }
        count
    }

    /// The account's grant changed: whatever was held for token trouble may go now (a
    /// provider's throttling stays).
    pub fn grant_changed(&self, account: &str) {
        if let Some(aq) = self.accounts.get(account) {
            {
                let mut inner = lock(&aq.inner);
                if inner
                    .paused
                    .as_ref()
                    .is_some_and(|p| p.hold != Hold::Throttled)
                {
                    inner.paused = None;
                }
                inner.trouble = 0;
            }
            aq.wake.notify_waiters();
        }
    }

    /// Deletes a message without a bounce. `false` when there is no such message (or a worker is
    /// sending it right now).
    pub async fn delete(&self, id: &str) -> Result<bool, String> {
        for aq in self.accounts.all().values() {
            let removed = {
                let mut inner = lock(&aq.inner);
                match inner.messages.get(id) {
                    Some(e) if e.busy => {
                        return Err(format!(
                            "message {id} is being delivered right now; try again in a moment"
                        ))
                    }
                    Some(_) => inner.remove(id),
                    None => None,
                }
            };
            if let Some(e) = removed {
                self.spool
                    .remove(&e.env)
                    .await
                    .map_err(|e| format!("message {id}: cannot remove it from the spool: {e}"))?;
                tracing::info!(id, account = %e.env.account, sender = %e.env.sender, "message deleted from the queue by the operator");
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Queues a bounce for `failed` recipients of `env` to its sender, unless the sender is null
    /// or the message is itself automatic.
    async fn bounce(&self, account: &Account, env: &Envelope, failed: Vec<dsn::Failed>) {
        if let Some((writer, bounce)) = self.prepare_bounce(account, env, failed).await {
            self.commit_bounce(env, writer, bounce).await;
        }
    }

    /// The bounce for `failed`, written but not yet committed (so that its commit can share a
    /// sync with the original's progress record).
    async fn prepare_bounce(
        &self,
        account: &Account,
        env: &Envelope,
        failed: Vec<dsn::Failed>,
    ) -> Option<(SpoolWriter, Envelope)> {
        if failed.is_empty() {
            return None;
        }
        self.bounced(account, env, &failed);
        let headers = self.headers(env).await;
        if env.bounce || env.sender.is_empty() || dsn::is_automatic(&headers) {
            tracing::info!(id = %env.id, "no bounce sent (null sender or an automatic message)");
            return None;
        }
        let report = dsn::build(&dsn::Bounce {
            reporting_mta: &self.hostname,
            from: &account.mailbox,
            to: &env.sender,
            queue_id: &env.id,
            arrival_unix: env.received,
            now_unix: self.clock.unix(),
            headers: &headers,
            failed: &failed,
        });
        let mut bounce = Envelope {
            account: account.name.clone(),
            sender: account.mailbox.clone(),
            recipients: vec![env.sender.clone()],
            bounce: true,
            ..Envelope::default()
        };
        let mut writer = self.writer(&mut bounce);
        writer.push(&report).await;
        Some((writer, bounce))
    }

    /// Counts the failed recipients and raises `message_bounced`.
    fn bounced(&self, account: &Account, env: &Envelope, failed: &[dsn::Failed]) {
        let metrics = &self.observer.metrics;
        metrics.recipients(&account.name, "bounced", failed.len() as u64);
        // Status codes only: the upstream's text often repeats the recipient's address.
        let mut codes: Vec<&str> = failed.iter().map(|f| f.status.as_str()).collect();
        codes.sort_unstable();
        codes.dedup();
        let detail = format!(
            "message {}: {} recipient(s) failed for good ({})",
            env.id,
            failed.len(),
            codes.join(", ")
        );
        let hint = if env.sender.is_empty() || env.bounce {
            "no delivery status notification is sent for a message with a null sender"
        } else {
            "the sender gets a delivery status notification naming each failed recipient"
        };
        self.observer
            .alerts
            .raise(Event::MessageBounced, &account.name, &detail, hint);
    }

    async fn commit_bounce(&self, env: &Envelope, writer: SpoolWriter, bounce: Envelope) {
        match self.accept(writer, bounce).await {
            Ok(bid) => {
                tracing::info!(id = %env.id, bounce = %bid, to = %env.sender, "bounce queued")
            }
            Err(e) => {
                tracing::warn!(id = %env.id, error = %e, "cannot queue the bounce; it is dropped")
            }
        }
    }
}

/// One worker per upstream connection the account may open.
fn worker_count(account: &Account) -> usize {
    account.max_upstream_connections.max(1)
}

struct Worker {
    /// Its place among the account's workers; those at or above the cap leave.
    slot: usize,
    queue: Arc<Queue>,
    aq: Arc<AccountQueue>,
    pool: Arc<Pool>,
    pacer: Arc<Pacer>,
    pacers: Arc<Pacers>,
    counters: AccountCounters,
}

/// What a worker waits for next.
enum Next {
    Job(Job),
    Expired(Vec<Entry>),
    Sleep(Option<Instant>),
    /// A reload lowered the account's connection cap below this worker's slot.
    Leave,
}

impl Worker {
    async fn run(self, stop: CancellationToken, cut: CancellationToken) {
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
                    Next::Expired(entries) => {
                        for e in entries {
                            self.expire(e).await;
                        }
                    }
                    Next::Sleep(_) | Next::Leave => {}
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
        loop {
            let wake = self.aq.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if self.leaves() {
                return Next::Leave;
            }
            match self.pick() {
                work @ (Next::Job(_) | Next::Expired(_) | Next::Leave) => return work,
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
                    }
                }
            }
        }
    }

    /// Whether this worker's slot is above the account's cap; if so, its slot is free from now on.
    /// Decided under the slots' lock, so that a reload raising the cap again either sees the
    /// worker stay or sees its slot free and fills it.
    fn leaves(&self) -> bool {
        let mut slots = lock(&self.aq.slots);
        if self.slot < worker_count(&self.aq.account.load()) {
            return false;
        }
        slots.remove(&self.slot);
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
            .filter(|e| !e.busy)
            .map(|e| e.env.id.clone())
            .collect();
        if !expired.is_empty() {
            let entries = expired.iter().filter_map(|id| inner.remove(id)).collect();
            return Next::Expired(entries);
        }
        let soonest_expiry = inner.messages.values().find(|e| !e.busy).map(|e| e.expires);
        let wake_by = |t: Option<Instant>| match (t, soonest_expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(p) = &inner.paused {
            if p.until > now {
                return Next::Sleep(wake_by(Some(p.until)));
            }
            inner.paused = None;
        }
        let cap = self.pacer.recipients_now(self.pacers.now_ms());
        let first = inner.ready.iter().next().cloned();
        let found = first
            .as_ref()
            .filter(|(due, _)| *due <= now)
            .and_then(|(_, id)| inner.messages.get(id))
            .map(|e| {
                let untried: Vec<usize> = e.pending().filter(|i| !e.tried[*i]).collect();
                let take = if cap == 0 { untried.len() } else { cap };
                (
                    e.env.id.clone(),
                    untried.into_iter().take(take).collect::<Vec<_>>(),
                )
            });
        let Some((id, rcpts)) = found else {
            return Next::Sleep(wake_by(first.map(|(due, _)| due)));
        };
        if let Err(wait) = self.pacer.take(rcpts.len() as u32, self.pacers.now_ms()) {
            tracing::debug!(account = %self.aq.name, "{}", wait.describe(&self.aq.name));
            return Next::Sleep(wake_by(Some(now + wait.after)));
        }
        let entry = inner.take(&id).expect("found above");
        Next::Job(Job {
            env: entry.env.clone(),
            rcpts,
        })
    }

    async fn deliver(&self, job: Job) {
        let queue = &self.queue;
        let account = &self.aq.account.load_full();
        let env = &job.env;
        let addresses: Vec<String> = job
            .rcpts
            .iter()
            .map(|i| env.recipients[*i].clone())
            .collect();
        let body = queue.spool.body(env);
        let result = transfer::transfer(&self.pool, account, env, &addresses, &body).await;
        let now = queue.clock.now();
        let replies = match result {
            Ok(replies) => replies,
            Err(stopped) => {
                // Nothing was sent: the turn taken from pacing is given back.
                self.pacer
                    .refund(job.rcpts.len() as u32, self.pacers.now_ms());
                let (pause, why, hold) = match stopped {
                    Stopped::Busy => (
                        Duration::from_secs(1),
                        "all upstream connections busy".to_string(),
                        Hold::Busy,
                    ),
                    Stopped::Throttled(reply) => {
                        let kind = throttle(&reply).expect("a throttling reply");
                        let pause = pause_for(&reply, kind, &queue.config.load());
                        tracing::warn!(account = %account.name, reply = %reply.summary(), pause_secs = pause.as_secs(), "provider is throttling the account; pausing its queue");
                        (
                            pause,
                            format!("throttled: {}", reply.summary()),
                            Hold::Throttled,
                        )
                    }
                    Stopped::Trouble(why) => {
                        let n = {
                            let mut inner = lock(&self.aq.inner);
                            // Workers failing side by side are one failure of the account.
                            let held = inner
                                .paused
                                .as_ref()
                                .is_some_and(|p| p.hold == Hold::Trouble && p.until > now);
                            if !held {
                                inner.trouble += 1;
                            }
                            inner.trouble.max(1)
                        };
                        let pause = backoff(n, &queue.config.load());
                        tracing::warn!(account = %account.name, error = %why, next_attempt_secs = pause.as_secs(), "queued mail held");
                        (pause, why, Hold::Trouble)
                    }
                };
                let mut inner = lock(&self.aq.inner);
                // The longest pause wins: a quota's hour is not cut short by a busy second.
                let until = now + pause;
                if inner.paused.as_ref().is_none_or(|p| p.until < until) {
                    inner.paused = Some(Pause { until, why, hold });
                }
                inner.release(&env.id);
                return;
            }
        };
        self.settle(job, replies).await;
    }

    /// Records each recipient's fate, bounces the failures, and reschedules or removes the message.
    async fn settle(&self, job: Job, replies: Vec<Reply>) {
        let queue = &self.queue;
        let account = &self.aq.account.load_full();
        let env = job.env.clone();
        let now = queue.clock.now();
        let mut failed = Vec::new();
        let (progress, done, retry_in) = {
            let mut inner = lock(&self.aq.inner);
            inner.trouble = 0;
            let Some(e) = inner.messages.get_mut(&env.id) else {
                return;
            };
            for (i, reply) in job.rcpts.iter().zip(&replies) {
                let address = &env.recipients[*i];
                let summary = reply.summary();
                let r = &mut e.progress.recipients[*i];
                e.tried[*i] = true;
                match reply.severity() {
                    Severity::Positive | Severity::Intermediate => {
                        r.status = RcptStatus::Delivered;
                        self.counters.accepted(1);
                        tracing::info!(id = %env.id, to = %address, reply = %summary, "delivered");
                    }
                    Severity::Permanent => {
                        r.status = RcptStatus::Bounced;
                        tracing::info!(id = %env.id, to = %address, reply = %summary, "bounced");
                        failed.push(dsn::Failed {
                            address: address.clone(),
                            status: reply
                                .enhanced()
                                .map(|c| c.to_string())
                                .unwrap_or_else(|| "5.0.0".into()),
                            diagnostic: summary.clone(),
                        });
                    }
                    Severity::Transient => {
                        queue
                            .observer
                            .metrics
                            .recipients(&account.name, "deferred", 1);
                        tracing::info!(id = %env.id, to = %address, reply = %summary, "deferred");
                    }
                }
                r.last_reply = Some(summary.clone());
                e.progress.last_reply = Some(summary);
            }
            let pending: Vec<usize> = e.pending().collect();
            let done = pending.is_empty();
            if done
                && e.progress
                    .recipients
                    .iter()
                    .any(|r| r.status == RcptStatus::Bounced)
            {
                // Once per message, when it is finished with: not once per attempt that bounced some.
                self.counters
                    .message(MessageOutcome::Bounced, env.size as usize);
            }
            let mut retry_in = None;
            if !done && pending.iter().all(|i| e.tried[*i]) {
                e.progress.attempts += 1;
                let wait = backoff(e.progress.attempts, &queue.config.load());
                e.due = now + wait;
                e.progress.next_attempt = queue.clock.unix() + wait.as_secs();
                e.tried.iter_mut().for_each(|t| *t = false);
                retry_in = Some(wait);
            }
            (e.progress.clone(), done, retry_in)
        };
        if let Some(wait) = retry_in {
            tracing::info!(id = %env.id, attempts = progress.attempts, next_attempt_secs = wait.as_secs(), "message deferred");
        }
        let bounce = queue.prepare_bounce(account, &env, failed).await;
        if done && bounce.is_none() {
            // The common case, delivered: the worker goes on while the removal becomes durable
            // (shutdown waits for it with the spool's flush).
            queue.spool.remove_detached(&env);
            lock(&self.aq.inner).remove(&env.id);
            return;
        }
        let mut moved = Envelope::clone(&env);
        let record = async {
            if done {
                queue.spool.remove(&moved).await
            } else {
                queue.spool.record(&mut moved, &progress).await
            }
        };
        // The bounce first: a crash between the two then means a second bounce, never none.
        if let Some((writer, b)) = bounce {
            queue.commit_bounce(&env, writer, b).await;
        }
        let recorded = record.await;
        if let Err(e) = recorded {
            tracing::warn!(id = %env.id, error = %e, "cannot record delivery progress in the spool");
        }
        let mut inner = lock(&self.aq.inner);
        if done {
            inner.remove(&env.id);
        } else {
            if let Some(e) = inner.messages.get_mut(&env.id) {
                if moved.logged != env.logged {
                    e.env = Arc::new(moved);
                }
            }
            inner.release(&env.id);
        }
        drop(inner);
        if !done {
            // More recipients of it may go at once.
            self.aq.wake.notify_one();
        }
    }

    /// A message past `max_queue_age_secs`: its pending recipients are bounced.
    async fn expire(&self, e: Entry) {
        let env = &e.env;
        let failed: Vec<dsn::Failed> = e
            .pending()
            .map(|i| {
                let last = e.progress.recipients[i].last_reply.clone();
                tracing::info!(id = %env.id, to = %env.recipients[i], "bounced: still undelivered at max_queue_age_secs");
                dsn::Failed {
                    address: env.recipients[i].clone(),
                    status: "4.4.7".into(),
                    diagnostic: last.unwrap_or_else(|| {
                        "delivery time expired before the upstream could be reached".into()
                    }),
                }
            })
            .collect();
        self.counters
            .message(MessageOutcome::Bounced, env.size as usize);
        let account = self.aq.account.load_full();
        self.queue.bounce(&account, env, failed).await;
        if let Err(err) = self.queue.spool.remove(env).await {
            tracing::warn!(id = %env.id, error = %err, "cannot remove an expired message from the spool");
        }
    }
}

/// The reply a queue-mode mailer gets for its message.
pub fn queued_reply(id: &str) -> Reply {
    Reply::new(250, format!("2.0.0 Ok: queued as {id}"))
}
