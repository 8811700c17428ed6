//! Queue mode: a `250` means the message is on disk and will be delivered or returned to its
//! sender, whatever the provider is doing at that moment (Postfix's promise).
//!
//! - [`model`]: the envelope and per-recipient progress, as kept on disk.
//! - [`spool`]: the seam to the queue's storage; [`local`] is today's (segment log, files, group
//!   commit).
//! - [`index`]: each account's messages in memory; [`pauses`]: why an account waits.
//! - [`worker`]: the workers that take due messages and decide each recipient's fate.
//! - [`transfer`]: one transaction of a queued message through the account's transport, one
//!   status per recipient.
//! - [`retry`]: backoff, and how long a throttled account pauses.
//! - [`bounce`] and [`dsn`]: the bounce (RFC 3464) for recipients that failed for good.
//! - [`view`]: what `queue`, `queue show`, `retry` and `delete` see and do.
//! - [`recover`]: what the spool held at start-up, put back in order.
//!
//! Each account has workers, as many as its `max_upstream_connections` (a reload adds or retires
//! some), that take due messages oldest first, ask the account's pacing
//! ([`super::pacing::Pace`]) before each transaction, and send through the account's transport.

mod bounce;
pub mod dsn;
mod index;
pub mod local;
pub mod model;
pub mod pauses;
mod recover;
pub mod retry;
pub mod shared;
pub mod spool;
pub mod transfer;
mod view;
mod worker;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::index::{worker_count, AccountQueue, Entry};
pub use self::local::disk;
use self::model::{Envelope, Progress};
use self::spool::{Incoming, Opened, Spool};
pub use self::view::{AccountView, MessageView, RecipientView, Target};
use super::pacing::Pacers;
use super::status::Cause;
use super::transport::Transport;
use crate::config::{Account, DeliveryConfig, Provider};
use crate::observe::Observer;
use crate::smtp::Reply;
use crate::util::clock::SharedClock;
use crate::util::keyed::Keyed;
use crate::util::sync::lock;

static ID_SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Where the daily pacing windows are kept between runs (in the spool directory).
const PACING_FILE: &str = "pacing.json";
pub const USAGE_FILE: &str = "usage.json";

/// A status that held the whole account (no connection, no token) rather than decided anything
/// about the message.
fn held_account(status: &super::status::Status) -> bool {
    matches!(status.cause(), Some(Cause::Connection | Cause::Token))
}

/// How long a free-space reading serves before the filesystem is asked again.
const FREE_SPACE_TTL: Duration = Duration::from_secs(1);

pub struct Queue {
    spool: Arc<dyn Spool>,
    pub(super) pauses: Arc<dyn pauses::Pauses>,
    accounts: Keyed<AccountQueue>,
    /// `[delivery]`; a reload swaps it.
    config: arc_swap::ArcSwap<DeliveryConfig>,
    /// What workers need, once [`Queue::start`] ran: a reload starts workers for new accounts.
    workers: Mutex<Option<Workers>>,
    clock: SharedClock,
    /// Our name, for bounces (Reporting-MTA).
    hostname: String,
    observer: Observer,
    /// The last reading of the spool filesystem's free space: (when, enough).
    room: Mutex<Option<(Instant, bool)>>,
}

/// What a worker runs with.
struct Workers {
    transport: Arc<dyn Transport>,
    pacers: Arc<Pacers>,
    stop: CancellationToken,
    cut: CancellationToken,
    tasks: TaskTracker,
}

/// What [`Queue::open`] needs: the spool and what opening it found, and the rest.
pub struct Setup<'a> {
    pub spool: Arc<dyn Spool>,
    pub opened: Opened,
    pub config: DeliveryConfig,
    pub accounts: &'a [Arc<Account>],
    pub providers: &'a BTreeMap<String, Arc<Provider>>,
    pub clock: SharedClock,
    pub hostname: &'a str,
    pub observer: Observer,
    /// A store several relays share: throttling pauses hold the account on all of them.
    pub shared: Option<Arc<dyn crate::store::Shared>>,
}

impl Queue {
    /// Indexes what the spool holds. Returns the queue and the accounts it made for queued mail
    /// whose account is no longer configured (the token manager, pool and pacers need them too).
    pub fn open(setup: Setup<'_>) -> (Queue, Vec<Arc<Account>>) {
        let (spool, opened) = (setup.spool, setup.opened);
        let accounts = Keyed::new(
            setup
                .accounts
                .iter()
                .map(|a| (a.name.clone(), AccountQueue::new(a))),
        );
        let queue = Queue {
            spool,
            pauses: match setup.shared {
                Some(store) => pauses::SharedPauses::new(store, setup.clock.clone()),
                None => Arc::new(pauses::LocalPauses::default()),
            },
            accounts,
            config: arc_swap::ArcSwap::from_pointee(setup.config),
            clock: setup.clock,
            hostname: setup.hostname.to_string(),
            observer: setup.observer,
            workers: Mutex::new(None),
            room: Mutex::new(None),
        };
        queue.report_damage(&opened.damage);
        let mut retired = Vec::new();
        for s in opened.stored {
            let aq = match queue.accounts.get(&s.envelope.account) {
                Some(aq) => aq,
                None => {
                    let (aq, account) = queue.retired(&s.envelope, setup.providers);
                    retired.extend(account);
                    aq
                }
            };
            let progress = s
                .progress
                .unwrap_or_else(|| Progress::fresh(s.envelope.recipients.len()));
            queue.restore_pause(&s.envelope.account, &progress);
            let entry = queue.entry(Arc::new(s.envelope), progress);
            lock(&aq.inner).insert(entry);
        }
        (queue, retired)
    }

    /// An account whose last recorded attempt found the upstream or the token failing is shown
    /// held, as the relay held it, until that attempt's next one: what an offline `queue` lists.
    /// [`Queue::start`] lifts it.
    fn restore_pause(&self, account: &str, progress: &Progress) {
        let Some(last) = progress.last.as_deref().filter(|l| held_account(l)) else {
            return;
        };
        let left = progress.next_attempt.saturating_sub(self.clock.unix());
        if left == 0 {
            return;
        }
        self.pauses.pause(
            account,
            pauses::Pause {
                until: self.clock.now() + Duration::from_secs(left),
                why: last.reply().summary(),
                hold: pauses::Hold::Trouble,
            },
        );
    }

    /// An index entry, its times moved from the wall clock to the monotonic one.
    fn entry(&self, env: Arc<Envelope>, progress: Progress) -> Entry {
        let now = self.clock.now();
        let unix = self.clock.unix();
        // A hold of the whole account is the account's pause (see `restore_pause`), not this
        // message's backoff.
        let held = progress.last.as_deref().is_some_and(held_account);
        let wait = progress.next_attempt.saturating_sub(unix);
        let due = now + Duration::from_secs(if held { 0 } else { wait });
        let expires_unix = env.received + self.config.load().max_queue_age_secs;
        let expires = now + Duration::from_secs(expires_unix.saturating_sub(unix));
        Entry {
            tried: vec![false; env.recipients.len()],
            env,
            progress,
            due,
            expires,
            busy: false,
            strikes: 0,
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

    /// Whether the spool's filesystem has room for more mail (`[delivery] min_free_bytes`).
    pub fn has_room(&self) -> bool {
        let now = self.clock.now();
        let mut room = lock(&self.room);
        if let Some((at, enough)) = *room {
            if now.saturating_duration_since(at) < FREE_SPACE_TTL {
                return enough;
            }
        }
        let enough = match self.spool.space() {
            Some((free, total)) => {
                let need = self
                    .config
                    .load()
                    .min_free_bytes
                    .unwrap_or((total / 20).min(1 << 30));
                if free < need {
                    tracing::warn!(free, need, "spool filesystem nearly full: queue mode refuses new mail (min_free_bytes)");
                }
                free >= need
            }
            // Unknown: the spool's own writes will say.
            None => true,
        };
        *room = Some((now, enough));
        enough
    }

    /// Gives `env` its id and arrival time, and somewhere to receive its body into.
    pub fn writer(&self, env: &mut Envelope) -> Box<dyn Incoming> {
        env.id = self.new_id();
        env.received = self.clock.unix();
        if let Some(aq) = self.accounts.get(&env.account) {
            let origin = aq.origin.load();
            env.provider = origin.0.clone();
            env.mailbox = origin.1.clone();
            env.grant = Some(aq.account.load().grant);
        }
        self.spool.incoming(env)
    }

    /// Makes a received message durable and schedules it; the id is the mailer's receipt.
    pub async fn accept(
        &self,
        writer: Box<dyn Incoming>,
        mut env: Envelope,
    ) -> std::io::Result<String> {
        let Some(aq) = self.accounts.get(&env.account) else {
            return Err(std::io::Error::other(format!(
                "account `{}` is not configured",
                env.account
            )));
        };
        env.size = writer.size();
        writer.commit(&mut env).await?;
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
        transport: Arc<dyn Transport>,
        pacers: Arc<Pacers>,
        stop: CancellationToken,
        cut: CancellationToken,
        tasks: &TaskTracker,
    ) {
        let w = Workers {
            transport,
            pacers,
            stop,
            cut,
            tasks: tasks.clone(),
        };
        // Held throughout: a reload adding an account meanwhile waits, then finds the workers.
        let mut workers = lock(&self.workers);
        for (name, aq) in self.accounts.all().iter() {
            // A start tries again at once: what held an account before (no connection, no token)
            // is shown by an offline `queue`, not waited out.
            self.pauses.forget(name);
            self.spawn_workers(&w, aq);
        }
        if let Some(every) = self.spool.adopt_every() {
            self.adopt_loop(every, w.stop.clone(), &w.tasks);
        }
        *workers = Some(w);
    }

    /// Whether this process delivers (`serve`), or only looks at the spool (an admin command run
    /// without a relay).
    pub fn delivering(&self) -> bool {
        lock(&self.workers).is_some()
    }

    fn spawn_workers(self: &Arc<Self>, w: &Workers, aq: &Arc<AccountQueue>) {
        if aq.held.load().is_some() {
            return;
        }
        let Some(pacer) = w.pacers.get(&aq.name) else {
            return;
        };
        let mut lanes = lock(&aq.lanes);
        for lane in 0..worker_count(&aq.account.load()) {
            if !lanes.insert(lane) {
                continue;
            }
            let worker = worker::Worker {
                lane,
                queue: self.clone(),
                aq: aq.clone(),
                transport: w.transport.clone(),
                pacer: pacer.clone(),
                pacers: w.pacers.clone(),
                counters: self.observer.metrics.account(&aq.name),
            };
            w.tasks.spawn(worker.run(w.stop.clone(), w.cut.clone()));
        }
    }

    /// A reloaded config: new accounts get a queue (and workers, once started); the others
    /// deliver with their new settings from the next transaction on, with as many workers as
    /// their connection cap now allows. An account configured again is no longer held.
    pub fn reconfigure(self: &Arc<Self>, accounts: &[Arc<Account>], config: &DeliveryConfig) {
        self.config.store(Arc::new(config.clone()));
        let workers = lock(&self.workers);
        for a in accounts {
            let added = !self.accounts.contains(&a.name);
            let aq = self
                .accounts
                .insert_missing(&a.name, || AccountQueue::new(a));
            aq.account.store(a.clone());
            aq.origin.store(Arc::new(index::origin(a)));
            aq.held.store(None);
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
        self.spool.upkeep();
        for aq in self.accounts.all().values() {
            let stale: Vec<(Arc<Envelope>, Progress)> = {
                let mut inner = lock(&aq.inner);
                let ids: Vec<String> = inner
                    .messages
                    .values()
                    .filter(|e| !e.busy && self.spool.pins_storage(&e.env))
                    .map(|e| e.env.id.clone())
                    .collect();
                ids.iter()
                    .filter_map(|id| inner.take(id).map(|e| (e.env.clone(), e.progress.clone())))
                    .collect()
            };
            for (env, progress) in stale {
                self.record_progress(
                    aq,
                    &env,
                    &progress,
                    "move a waiting message out of the spool log",
                )
                .await;
                lock(&aq.inner).release(&env.id);
            }
        }
    }

    /// Writes a message's progress. The spool may move a logged message into a file of its own on
    /// the way: the index then holds the envelope as moved. `what` names the write in the log.
    async fn record_progress(
        &self,
        aq: &AccountQueue,
        env: &Envelope,
        progress: &Progress,
        what: &str,
    ) {
        let mut moved = env.clone();
        if let Err(e) = self.spool.record(&mut moved, progress).await {
            tracing::warn!(id = %env.id, error = %e, "cannot {what}");
            return;
        }
        if moved.logged != env.logged {
            if let Some(e) = lock(&aq.inner).messages.get_mut(&env.id) {
                e.env = Arc::new(moved);
            }
        }
    }

    /// Waits until every change handed to the spool is durable.
    pub async fn flush(&self) {
        self.spool.flush().await;
    }

    /// Writes the daily pacing windows where the next run finds them.
    pub async fn save_pacing(&self, pacers: &Pacers) {
        self.save_state(PACING_FILE, pacers.snapshot(), "the pacing windows")
            .await;
    }

    /// Reads what [`Queue::save_pacing`] wrote (blocking; at start-up).
    pub fn load_pacing(&self, pacers: &Pacers) {
        if let Some(bytes) = self.spool.read_state(PACING_FILE) {
            pacers.restore(&bytes);
        }
    }

    /// Writes the usage figures where the next run finds them.
    pub async fn save_usage(&self, usage: &crate::observe::usage::Usage) {
        self.save_state(USAGE_FILE, usage.snapshot(), "the usage figures")
            .await;
    }

    /// Reads what [`Queue::save_usage`] wrote (blocking; at start-up).
    pub fn load_usage(&self, usage: &crate::observe::usage::Usage) {
        if let Some(bytes) = self.spool.read_state(USAGE_FILE) {
            usage.restore(&bytes);
        }
    }

    /// The spool keeps the relay's small state files beside the mail (one seam for a shared store).
    async fn save_state(&self, name: &str, bytes: Vec<u8>, what: &str) {
        if let Err(e) = self.spool.write_state(name, bytes).await {
            tracing::warn!(error = %e, "cannot save {what}");
        }
    }

    /// The account's grant changed: whatever was held for token trouble may go now (a
    /// provider's throttling stays).
    pub fn grant_changed(&self, account: &str) {
        if let Some(aq) = self.accounts.get(account) {
            self.pauses.lift(account, true);
            aq.wake.notify_waiters();
        }
    }

    /// Every account with a queue, configured or not (for `queue_stuck`).
    pub fn account_names(&self) -> Vec<String> {
        self.accounts.all().keys().cloned().collect()
    }
}

/// The reply a queue-mode mailer gets for its message.
pub fn queued_reply(id: &str) -> Reply {
    Reply::new(250, format!("2.0.0 Ok: queued as {id}"))
}
