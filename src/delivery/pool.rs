//! Upstream connections per account, shared by every mailer session of that account.
//!
//! SMTP AUTH binds a connection to one mailbox, so the pool is keyed by account. A connection is
//! opened, TLS'd and authenticated once, then carries one transaction at a time for whichever session
//! leases it. Every open connection of an account counts against its `max_upstream_connections`
//! (idle ones too: Exchange Online refuses a fourth per mailbox, whatever we think of it); a lease
//! beyond the cap waits for one to come back, up to `upstream_wait_secs`.
//!
//! A connection is retired (never leased again) when it has been idle longer than
//! `upstream_idle_secs` (QUIT), when the access token it authenticated with has expired, when the
//! account's grant is replaced or revoked ([`Pool::retire_account`]), when a reload changes the
//! account's upstream ([`Pool::reconfigure`]), and whenever its holder says so (an upstream `421`,
//! a broken dialogue, a mailer gone mid-DATA).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::client::Client;
use super::error::{ErrorKind, UpstreamError};
use crate::config::Account;
use crate::oauth::tokens::{TokenError, TokenManager};
use crate::observe::{Event, Step};
use crate::util::clock::SharedClock;
use crate::util::keyed::Keyed;
use crate::util::secret::Secret;
use crate::util::sync::lock;

/// How long a QUIT to a retired connection may take.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// An authenticated upstream connection.
pub struct Conn {
    pub client: Client,
    /// When the access token it authenticated with expires; the connection is retired then.
    token_expires: Instant,
    /// The account's grant generation it was authenticated under.
    generation: u64,
    /// It has carried a transaction before (so it may have been closed by the upstream meanwhile).
    pub reused: bool,
}

/// Why no connection could be had.
#[derive(Debug)]
pub enum OpenError {
    /// Every connection of the account is in use and none came back in time.
    Busy { cap: usize },
    /// No token (grant missing, revoked, endpoint down).
    Token(TokenError),
    /// The upstream refused the token, also after one refresh.
    AuthRejected(crate::smtp::Reply),
    /// Connect, TLS, greeting, EHLO or STARTTLS failed.
    Connect(UpstreamError),
}

pub struct Pool {
    accounts: Keyed<AccountPool>,
    /// Each account's connections against its cap.
    slots: Arc<dyn Slots>,
    dialer: Dialer,
    /// `upstream_idle_secs` and `upstream_wait_secs`, in milliseconds (a reload may change them).
    idle_timeout: AtomicU64,
    wait: AtomicU64,
    clock: SharedClock,
    /// Where QUITs to retired connections run, so shutdown waits for them.
    tasks: TaskTracker,
}

/// What opening a connection needs.
pub struct Dialer {
    pub tokens: Arc<TokenManager>,
    /// Client TLS config per provider name (public roots plus that provider's `smtp_ca_file`);
    /// a reload swaps it.
    pub tls: arc_swap::ArcSwap<HashMap<String, Arc<rustls::ClientConfig>>>,
    pub helo_name: String,
    /// `upstream_timeout_secs` in milliseconds (a reload may change it); see [`Dialer::timeout`].
    pub timeout: AtomicU64,
    pub observer: crate::observe::Observer,
}

/// How long an upstream refusal of the account's token is answered from memory.
const REFUSAL_MEMORY: Duration = Duration::from_secs(60);

struct AccountPool {
    name: String,
    slots: Arc<dyn Slots>,
    /// The account as configured now (a reload swaps it).
    account: arc_swap::ArcSwap<Account>,
    /// `max_upstream_connections`; a reload may change it.
    cap: AtomicUsize,
    /// The upstream refused the token even after a refresh: the same answer, without asking it
    /// again, until then (Microsoft throttles request loops).
    refused: Mutex<Option<(Instant, crate::smtp::Reply)>>,
    state: Mutex<Connections>,
    /// A connection came back or a slot was freed.
    freed: Notify,
}

#[derive(Default)]
struct Connections {
    /// Most recently returned last.
    idle: Vec<(Conn, Instant)>,
    generation: u64,
    closed: bool,
}

pub use super::slots::{LocalSlots, Slots};

/// A connection slot held by one session for one transaction. Dropping it without
/// [`Lease::give_back`] retires the connection (the upstream discards a half-sent message).
pub struct Lease {
    pool: Arc<AccountPool>,
    pub conn: Option<Conn>,
    clock: SharedClock,
    /// The slot has been handed back (given back or retired explicitly).
    done: bool,
}

impl Lease {
    pub fn client(&mut self) -> Option<&mut Client> {
        self.conn.as_mut().map(|c| &mut c.client)
    }

    /// Puts the connection back for the next transaction, unless the grant changed or its token
    /// expired meanwhile.
    pub fn give_back(mut self) {
        self.done = true;
        let Some(mut conn) = self.conn.take() else {
            return self.release();
        };
        let now = self.clock.now();
        let mut state = lock(&self.pool.state);
        if state.closed || conn.generation != state.generation || conn.token_expires <= now {
            self.pool.slots.release(&self.pool.name);
        } else {
            conn.reused = true;
            state.idle.push((conn, now));
        }
        drop(state);
        self.pool.freed.notify_one();
    }

    fn release(&mut self) {
        self.done = true;
        self.conn = None;
        self.pool.slots.release(&self.pool.name);
        self.pool.freed.notify_one();
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.done {
            self.release();
        }
    }
}

impl Pool {
    pub fn new(
        accounts: &[Arc<Account>],
        dialer: Dialer,
        idle_timeout: Duration,
        wait: Duration,
        tasks: TaskTracker,
        clock: SharedClock,
        slots: Arc<dyn Slots>,
    ) -> Arc<Pool> {
        let accounts = Keyed::new(
            accounts
                .iter()
                .map(|a| (a.name.clone(), AccountPool::new(a, slots.clone()))),
        );
        Arc::new(Pool {
            accounts,
            slots,
            dialer,
            idle_timeout: millis(idle_timeout),
            wait: millis(wait),
            clock,
            tasks,
        })
    }

    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    /// A reloaded config: new accounts get a pool, caps follow the file, and an account whose
    /// upstream changed (host, port, TLS, CA, mechanism, proxy, mailbox) has its connections
    /// retired (idle ones now, leased ones when they come back), so the next message dials anew.
    pub fn reconfigure(
        &self,
        accounts: &[Arc<Account>],
        tls: HashMap<String, Arc<rustls::ClientConfig>>,
        limits: &crate::config::Limits,
    ) {
        self.dialer.tls.store(Arc::new(tls));
        for (at, secs) in [
            (&self.idle_timeout, limits.upstream_idle_secs),
            (&self.wait, limits.upstream_wait_secs),
            (&self.dialer.timeout, limits.upstream_timeout_secs),
        ] {
            at.store(secs * 1000, Ordering::Relaxed);
        }
        for a in accounts {
            let pool = self
                .accounts
                .insert_missing(&a.name, || AccountPool::new(a, self.slots.clone()));
            pool.cap
                .store(a.max_upstream_connections.max(1), Ordering::Relaxed);
            // Waiters may now fit under a raised cap.
            pool.freed.notify_waiters();
            let old = pool.account.swap(a.clone());
            // What a connection was opened and authenticated for, compared by value.
            let same = old.provider.name == a.provider.name
                && old.provider.smtp == a.provider.smtp
                && old.mailbox == a.mailbox;
            if !same {
                self.retire_account(&a.name);
            }
        }
    }

    /// Open connections of `account` (idle, leased and being dialled).
    pub fn open_connections(&self, account: &str) -> usize {
        self.accounts
            .with(account, |p| p.slots.held(account))
            .unwrap_or(0)
    }

    /// The upstream's lasting refusal of the account's token, if it came in the last minute.
    pub fn remembered_refusal(&self, account: &str) -> Option<crate::smtp::Reply> {
        let now = self.clock.now();
        self.accounts.with(account, |pool| {
            lock(&pool.refused)
                .as_ref()
                .filter(|(until, _)| *until > now)
                .map(|(_, reply)| reply.clone())
        })?
    }

    /// A connection for one transaction: an idle one when there is one (unless `fresh`), else a new
    /// one if the cap allows, else the first to come back within `upstream_wait_secs`.
    pub async fn lease(&self, account: &Arc<Account>, fresh: bool) -> Result<Lease, OpenError> {
        let Some(pool) = self.accounts.get(&account.name) else {
            return Err(OpenError::Token(TokenError::UnknownAccount(
                account.name.clone(),
            )));
        };
        if let Some(reply) = self.remembered_refusal(&account.name) {
            return Err(OpenError::AuthRejected(reply));
        }
        let deadline = self.clock.now() + from_millis(&self.wait);
        loop {
            let freed = pool.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let (got, stale, generation) = self.take(&pool, fresh);
            self.quit_all(&pool, stale);
            if let Some(conn) = got {
                let mut lease = self.slot(&pool);
                lease.conn = Some(conn);
                return Ok(lease);
            }
            if pool.slots.acquire(&pool.name, pool.cap()).await {
                // On failure the lease drops here and frees the slot.
                let mut lease = self.slot(&pool);
                lease.conn = Some(self.dial_remembering(&pool, generation).await?);
                return Ok(lease);
            }
            // At the cap: a fresh connection may take an idle one's slot; the old connection
            // goes before the new one comes, so the upstream never sees one more than the cap.
            let idle = if fresh {
                lock(&pool.state).idle.pop()
            } else {
                None
            };
            if let Some((mut old, _)) = idle {
                let mut lease = self.slot(&pool);
                let _ = tokio::time::timeout(QUIT_TIMEOUT, old.client.command("QUIT")).await;
                drop(old);
                lease.conn = Some(self.dial_remembering(&pool, generation).await?);
                return Ok(lease);
            }
            let left = deadline.saturating_duration_since(self.clock.now());
            if left.is_zero() {
                return Err(OpenError::Busy { cap: pool.cap() });
            }
            // A slot freed by another relay wakes nobody here: look again now and then.
            let look = pool.slots.recheck().map_or(left, |r| r.min(left));
            let _ = tokio::time::timeout(look, freed).await;
        }
    }

    /// A lease on a slot `take` reserved (freed again if dropped before it holds a connection).
    fn slot(&self, pool: &Arc<AccountPool>) -> Lease {
        Lease {
            pool: pool.clone(),
            conn: None,
            clock: self.clock.clone(),
            done: false,
        }
    }

    /// Under the lock: sweeps stale idle connections out (returned, to be closed), then an idle
    /// connection unless a fresh one is wanted (`None`: a slot for a new one is needed).
    fn take(&self, pool: &AccountPool, fresh: bool) -> (Option<Conn>, Vec<Conn>, u64) {
        let mut state = lock(&pool.state);
        let generation = state.generation;
        let stale = self.sweep(&mut state);
        if !fresh {
            if let Some((conn, _)) = state.idle.pop() {
                return (Some(conn), stale, generation);
            }
        }
        (None, stale, generation)
    }

    /// Takes out the idle connections that must not be used again: idle too long, token expired,
    /// authenticated under a replaced grant.
    fn sweep(&self, state: &mut Connections) -> Vec<Conn> {
        let now = self.clock.now();
        let idle = from_millis(&self.idle_timeout);
        let generation = state.generation;
        let (keep, old): (Vec<_>, Vec<_>) =
            std::mem::take(&mut state.idle)
                .into_iter()
                .partition(|(c, since)| {
                    c.generation == generation
                        && c.token_expires > now
                        && now.saturating_duration_since(*since) < idle
                });
        state.idle = keep;
        // Their slots stay taken until their QUIT is done: the upstream sees them until then.
        old.into_iter().map(|(c, _)| c).collect()
    }

    /// [`Pool::dial`], remembering a refusal of the token for [`REFUSAL_MEMORY`].
    async fn dial_remembering(
        &self,
        pool: &AccountPool,
        generation: u64,
    ) -> Result<Conn, OpenError> {
        // The account as the current config has it, not as the session that asked saw it: a
        // connection opened now may serve sessions that start after a reload.
        let account = pool.account.load_full();
        let account = &*account;
        let result = self.dial(account, generation).await;
        if let Err(OpenError::AuthRejected(reply)) = &result {
            // Only a lasting refusal, and not one for a grant replaced meanwhile.
            let current = lock(&pool.state).generation == generation;
            if reply.code >= 500 && current {
                let until = self.clock.now() + REFUSAL_MEMORY;
                *lock(&pool.refused) = Some((until, reply.clone()));
                let hint = crate::hints::for_smtp_reply(account.provider.family, reply).unwrap_or(
                    "check that SMTP AUTH is enabled for the mailbox and the grant's scopes",
                );
                self.dialer.observer.alerts.raise(
                    Event::UpstreamAuthRejected,
                    &account.name,
                    &reply.summary(),
                    hint,
                );
            }
        }
        result
    }

    /// Token → connect → TLS → EHLO → AUTH; on a token rejection, one refresh and one more try.
    async fn dial(&self, account: &Account, generation: u64) -> Result<Conn, OpenError> {
        let name = &account.name;
        let tokens = &self.dialer.tokens;
        let token = tokens.token(name).await.map_err(OpenError::Token)?;
        let (client, token) = match self.dialer.connect_and_auth(account, &token.secret).await {
            Err(UpstreamError::AuthRejected(first))
                if !crate::hints::refresh_cannot_help(&first) =>
            {
                tracing::info!(account = %name, reply = %first.summary(), "upstream refused the access token; refreshing and retrying once");
                let token = tokens
                    .token_after_rejection(name, &token.secret)
                    .await
                    .map_err(OpenError::Token)?;
                (
                    self.dialer.connect_and_auth(account, &token.secret).await,
                    token,
                )
            }
            other => (other, token),
        };
        match client {
            Ok(client) => Ok(Conn {
                client,
                token_expires: token.expires_at,
                generation,
                reused: false,
            }),
            Err(UpstreamError::AuthRejected(reply)) => Err(OpenError::AuthRejected(reply)),
            Err(e) => Err(OpenError::Connect(e)),
        }
    }

    /// Closes idle connections idle longer than `upstream_idle_secs` or past their token; run
    /// periodically by the app.
    pub fn reap(&self) {
        for pool in self.accounts.all().values() {
            let stale = self.sweep(&mut lock(&pool.state));
            self.quit_all(pool, stale);
        }
    }

    /// The grant was replaced or revoked: no connection authenticated with the old one is used
    /// again (idle ones close now, leased ones when they come back).
    pub fn retire_account(&self, account: &str) {
        let Some(pool) = self.accounts.get(account) else {
            return;
        };
        // A new grant deserves a new try.
        *lock(&pool.refused) = None;
        let stale: Vec<Conn> = {
            let mut state = lock(&pool.state);
            state.generation += 1;
            let idle = std::mem::take(&mut state.idle);
            idle.into_iter().map(|(c, _)| c).collect()
        };
        self.quit_all(&pool, stale);
    }

    /// Another relay sharing the store waits for one of `account`'s slots: the connection idle
    /// longest here gives its slot up, instead of holding it until `upstream_idle_secs`.
    pub fn yield_idle(&self, account: &str) {
        let Some(pool) = self.accounts.get(account) else {
            return;
        };
        let spare = {
            let mut state = lock(&pool.state);
            (!state.idle.is_empty()).then(|| state.idle.remove(0).0)
        };
        self.quit_all(&pool, spare.into_iter().collect());
    }

    /// At shutdown: no more leases come back into the pool; idle connections say QUIT.
    pub fn close(&self) {
        for pool in self.accounts.all().values() {
            let stale: Vec<Conn> = {
                let mut state = lock(&pool.state);
                state.closed = true;
                let idle = std::mem::take(&mut state.idle);
                idle.into_iter().map(|(c, _)| c).collect()
            };
            self.quit_all(pool, stale);
        }
    }

    /// Says QUIT to retired connections in the background; each frees its slot once closed.
    fn quit_all(&self, pool: &Arc<AccountPool>, conns: Vec<Conn>) {
        for mut conn in conns {
            let pool = pool.clone();
            self.tasks.spawn(async move {
                let _ = tokio::time::timeout(QUIT_TIMEOUT, conn.client.command("QUIT")).await;
                drop(conn);
                pool.slots.release(&pool.name);
                pool.freed.notify_one();
            });
        }
    }
}

pub fn millis(d: Duration) -> AtomicU64 {
    AtomicU64::new(d.as_millis() as u64)
}

fn from_millis(a: &AtomicU64) -> Duration {
    Duration::from_millis(a.load(Ordering::Relaxed))
}

impl AccountPool {
    fn new(account: &Arc<Account>, slots: Arc<dyn Slots>) -> AccountPool {
        AccountPool {
            name: account.name.clone(),
            slots,
            account: arc_swap::ArcSwap::new(account.clone()),
            cap: AtomicUsize::new(account.max_upstream_connections.max(1)),
            refused: Mutex::new(None),
            state: Mutex::new(Connections::default()),
            freed: Notify::new(),
        }
    }

    fn cap(&self) -> usize {
        self.cap.load(Ordering::Relaxed)
    }
}

impl Dialer {
    /// The deadline for each step of the upstream dialogue.
    pub fn timeout(&self) -> Duration {
        from_millis(&self.timeout)
    }

    pub async fn connect_and_auth(
        &self,
        account: &Account,
        token: &Secret,
    ) -> Result<Client, UpstreamError> {
        let provider = &account.provider;
        let tls = self
            .tls
            .load()
            .get(&provider.name)
            .cloned()
            .ok_or_else(|| {
                UpstreamError::new(
                    ErrorKind::Config,
                    &provider.smtp.host,
                    "TLS",
                    format!("no TLS configuration for provider `{}`", provider.name),
                )
            })?;
        let timers = self.observer.metrics.step_timers();
        let started = tokio::time::Instant::now();
        let mut client = Client::connect(provider, &tls, &self.helo_name, self.timeout()).await?;
        timers.observe(Step::Connect, started.elapsed());
        let started = tokio::time::Instant::now();
        let authenticated = client.authenticate(provider, &account.mailbox, token).await;
        timers.observe(Step::Auth, started.elapsed());
        authenticated?;
        client.time_replies(timers);
        Ok(client)
    }
}
