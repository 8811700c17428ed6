//! Access tokens per account: cached, refreshed before expiry, one refresh at a time.
//!
//! Each account has a slot with the cached token and an async mutex. A caller that finds no fresh
//! token but a still-valid one gets that, while one refresh runs behind it; a caller that finds no
//! valid token takes the mutex and looks again before refreshing, so a hundred sessions arriving
//! after expiry cause one call to the token endpoint. The upkeep refreshes busy accounts ahead
//! of expiry ([`TokenManager::upkeep`]) and quiet grants once in a while
//! ([`TokenManager::keep_alive`]), which is also where dying grants raise their alerts. A rotated refresh token is sealed and flushed to the
//! store before the new access token is handed out. Once the provider says `invalid_grant`, the
//! account is marked revoked and no further refresh is tried until a new grant is stored; this is what
//! turns a dead grant into one clear log line instead of a retry loop.
//!
//! Time comes from an injected [`Clock`](crate::util::clock::Clock): monotonic for expiry and
//! backoff, wall-clock seconds for what is persisted; tokens come from an injected [`Issuer`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::endpoint::{ProviderError, TokenSet};
use super::issuer::Issuer;
use crate::config::{Account, Family, GrantKind};
use crate::observe::{Event, Observer};
use crate::store::{Grant, Store};
use crate::util::clock::SharedClock;
use crate::util::keyed::Keyed;
use crate::util::secret::Secret;
use crate::util::sync::lock;

/// Used when the provider does not say how long a token lives.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct AccessToken {
    pub secret: Secret,
    pub expires_at: Instant,
    /// How long it was issued for; a short-lived token is refreshed a fraction of it before expiry.
    pub lifetime: Duration,
}

/// Why an account has no token; the text says what the operator should do.
#[derive(Debug, Clone)]
pub enum TokenError {
    UnknownAccount(String),
    NeedsAuthorization(String),
    Revoked {
        account: String,
        detail: String,
        family: Family,
    },
    Refused {
        account: String,
        error: ProviderError,
    },
    Unreachable {
        account: String,
        detail: String,
    },
    Store(String),
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenError::UnknownAccount(a) => write!(f, "account `{a}` is not configured"),
            TokenError::NeedsAuthorization(a) => write!(
                f,
                "account `{a}`: no grant stored yet; run `xoauth-relay authorize {a}` (or `import-token {a}`)"
            ),
            TokenError::Revoked { account, detail, family } => write!(
                f,
                "account `{account}`: grant revoked by the provider ({detail}); {}",
                revoked_hint(account, *family)
            ),
            TokenError::Refused { account, error } => {
                write!(f, "account `{account}`: the provider refused a token ({error})")?;
                if let Some(hint) = error.hint() {
                    write!(f, "; {hint}")?;
                }
                Ok(())
            }
            TokenError::Unreachable { account, detail } => write!(
                f,
                "account `{account}`: cannot get a token, {detail}; check the network path to the provider"
            ),
            TokenError::Store(e) => f.write_str(e),
        }
    }
}

impl TokenError {
    /// What a mailer is told (`454 4.7.0 ...`): the account's state and the fix, never an
    /// endpoint's URL, a transport error or a provider's free text (those go to the log, where
    /// [`std::fmt::Display`] has them).
    pub fn for_mailer(&self) -> String {
        match self {
            TokenError::Revoked {
                account, family, ..
            } => format!(
                "account `{account}`: grant revoked by the provider (invalid_grant); {}",
                revoked_hint(account, *family)
            ),
            TokenError::Refused { account, error } => {
                let hint = error.hint().map(|h| format!("; {h}")).unwrap_or_default();
                format!(
                    "account `{account}`: the provider refused a token ({}){hint}",
                    error.code()
                )
            }
            TokenError::Unreachable { account, .. } => format!(
                "account `{account}`: the provider's token endpoint cannot be reached right now; try \
                 again later (the relay's log has the details)"
            ),
            TokenError::Store(_) => {
                "the relay cannot read its grant store right now; try again later (the relay's log \
                 has the details)"
                    .into()
            }
            TokenError::UnknownAccount(_) | TokenError::NeedsAuthorization(_) => self.to_string(),
        }
    }
}

/// Where an account's grant stands (`accounts`, `xoauth_relay_grant_ok`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantState {
    Ok,
    NeedsAuthorization,
    Revoked,
    /// The last token request failed with this.
    Failing(String),
    /// The store could not be read.
    Unreadable(String),
}

impl GrantState {
    /// The word scripts read (`accounts --json` `state`).
    pub fn as_str(&self) -> &'static str {
        match self {
            GrantState::Ok => "ok",
            GrantState::NeedsAuthorization => "needs_authorization",
            GrantState::Revoked => "revoked",
            GrantState::Failing(_) | GrantState::Unreadable(_) => "failing",
        }
    }
}

/// What to do about a revoked grant.
pub fn revoked_hint(account: &str, family: Family) -> String {
    let why = match family {
        Family::Google => {
            " (Google apps in Testing status lose grants after 7 days: publish the app)"
        }
        Family::Microsoft => " (Microsoft drops grants unused for 90 days)",
        Family::Generic => "",
    };
    format!("run `xoauth-relay authorize {account}`{why}")
}

/// Failures a still-valid cached token may ride out: the provider being down or refusing for now;
/// not a revoked grant or a store failure.
fn passing(error: &TokenError) -> bool {
    matches!(
        error,
        TokenError::Unreachable { .. } | TokenError::Refused { .. }
    )
}

impl TokenError {
    /// The token endpoint is down or refusing for now, not the grant gone: queued mail can wait.
    pub fn is_passing(&self) -> bool {
        passing(self)
    }
}

/// Failed token requests closer together than this (or than `alert_after_secs`) are one outage
/// for `refresh_failing`: well above the spacing of retries, so a short threshold can fire.
const OUTAGE_GAP: Duration = Duration::from_secs(300);

/// A refresh token that the provider says dies within this raises `grant_expiring`.
const EXPIRING: u64 = 2 * 86_400;

/// An account that asked for a token this recently is kept refreshed ahead of expiry.
const RECENT_USE: Duration = Duration::from_secs(3600);

/// The upkeep looks at least this often (an account's last use ages out of [`RECENT_USE`]).
const UPKEEP_AT_LEAST: Duration = Duration::from_secs(5);

/// After a failed token request, waiters get the same error for this long instead of each asking
/// the provider again (a dead endpoint would otherwise make a hundred sessions queue for minutes).
const FAILURE_BACKOFF: Duration = Duration::from_secs(15);

struct Slot {
    /// Swapped by a reload; the cached token stays unless what it was issued for changed.
    account: arc_swap::ArcSwap<Account>,
    cached: Mutex<Option<AccessToken>>,
    failure: Mutex<Option<(Instant, TokenError)>>,
    /// Since when token requests have been failing (cleared by a success), for `refresh_failing`.
    failing_since: Mutex<Option<Instant>>,
    /// When a session or a delivery last asked for a token: such an account is kept refreshed
    /// ahead of expiry.
    wanted: Mutex<Option<Instant>>,
    /// A refresh behind a still-valid token is running (one is enough).
    behind: std::sync::atomic::AtomicBool,
    /// A grant the store failed to write (disk full, say): a rotated refresh token must not be lost,
    /// so it is used from here and written again with the next refresh.
    unsaved: Mutex<Option<Grant>>,
    refresh: tokio::sync::Mutex<()>,
}

impl Slot {
    fn new(account: &Arc<Account>) -> Slot {
        Slot {
            account: arc_swap::ArcSwap::new(account.clone()),
            cached: Mutex::new(None),
            failure: Mutex::new(None),
            failing_since: Mutex::new(None),
            wanted: Mutex::new(None),
            behind: std::sync::atomic::AtomicBool::new(false),
            unsaved: Mutex::new(None),
            refresh: tokio::sync::Mutex::new(()),
        }
    }
}

/// Whether a cached token of `old` may serve `new`: the same provider (compared by value, so a
/// field added to it is compared too; a change of its limits costs one refresh, never a token
/// from the wrong client), grant kind and mailbox.
fn same_token_source(old: &Account, new: &Account) -> bool {
    old.provider == new.provider && old.grant == new.grant && old.mailbox == new.mailbox
}

pub struct TokenManager {
    store: Store,
    issuer: Arc<dyn Issuer>,
    clock: SharedClock,
    /// `refresh_margin_secs` in milliseconds (a reload may change it).
    margin: AtomicU64,
    slots: Keyed<Slot>,
    /// Refreshes run here, so shutdown waits for a rotated refresh token to reach the store.
    tasks: TaskTracker,
    observer: Observer,
    /// A token was cached or a failure remembered: the upkeep's next wake-up may be sooner.
    changed: tokio::sync::Notify,
}

impl TokenManager {
    pub fn new(
        store: Store,
        issuer: Arc<dyn Issuer>,
        clock: SharedClock,
        margin: Duration,
        accounts: &[Arc<Account>],
        tasks: TaskTracker,
        observer: Observer,
    ) -> TokenManager {
        let slots = Keyed::new(accounts.iter().map(|a| (a.name.clone(), Slot::new(a))));
        TokenManager {
            store,
            issuer,
            clock,
            margin: AtomicU64::new(margin.as_millis() as u64),
            slots,
            tasks,
            observer,
            changed: tokio::sync::Notify::new(),
        }
    }

    /// The store, for the app's own bookkeeping (last use, shutdown's flush); grants are
    /// changed through [`TokenManager::save_grant`] and [`TokenManager::delete_grant`].
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The stored grant of `account` (never handed to delivery: it holds the refresh token).
    pub fn stored_grant(&self, account: &str) -> Result<Option<Grant>, String> {
        self.store.get(account).map_err(|e| e.to_string())
    }

    /// What the store records of `account` (last error, revoked, last use).
    pub fn status(&self, account: &str) -> crate::store::Status {
        self.store.status(account)
    }

    /// Stores a new grant for `account` (`authorize`, `import-token`), with a clean record. Run it
    /// inside [`TokenManager::replace_grant`], so no refresh is in flight meanwhile.
    pub async fn save_grant(&self, account: &str, grant: Grant) -> Result<(), String> {
        self.store
            .put(account, grant)
            .await
            .map_err(|e| e.to_string())?;
        self.clear_status(account).await;
        Ok(())
    }

    /// Deletes `account`'s grant (`revoke`); whether there was one. Inside `replace_grant` too.
    pub async fn delete_grant(&self, account: &str) -> Result<bool, String> {
        let existed = self
            .store
            .remove(account)
            .await
            .map_err(|e| e.to_string())?;
        self.clear_status(account).await;
        Ok(existed)
    }

    /// A new or deleted grant starts with a clean record: no revoked flag, no old provider error.
    async fn clear_status(&self, account: &str) {
        self.store.update_status(account, |s| {
            s.revoked = false;
            s.last_error = None;
        });
        if let Err(e) = self.store.flush().await {
            tracing::warn!(account, error = %e, "cannot write the account's status");
        }
    }

    fn slot(&self, account: &str) -> Result<Arc<Slot>, TokenError> {
        self.slots
            .get(account)
            .ok_or_else(|| TokenError::UnknownAccount(account.to_string()))
    }

    /// A reloaded config: new accounts get a slot; an account whose token would now come from
    /// somewhere else (provider, client, scopes, grant kind, mailbox) loses its cached token.
    pub fn reconfigure(&self, accounts: &[Arc<Account>], margin: Duration) {
        self.margin
            .store(margin.as_millis() as u64, Ordering::Relaxed);
        for a in accounts {
            let slot = self.slots.insert_missing(&a.name, || Slot::new(a));
            let old = slot.account.swap(a.clone());
            if !same_token_source(&old, a) {
                *lock(&slot.cached) = None;
                *lock(&slot.failure) = None;
                *lock(&slot.failing_since) = None;
            }
        }
    }

    /// How long the cached access token of `account` still lives, if one is cached and valid.
    pub fn cached_for(&self, account: &str) -> Option<Duration> {
        let now = self.clock.now();
        self.slots.with(account, |slot| {
            lock(&slot.cached)
                .as_ref()
                .filter(|t| t.expires_at > now)
                .map(|t| t.expires_at - now)
        })?
    }

    /// Where the account's grant stands, from the store's record and the last token request.
    pub fn grant_state(&self, account: &Account) -> GrantState {
        let status = self.store.status(&account.name);
        match self.store.get(&account.name) {
            Err(e) => GrantState::Unreadable(e.to_string()),
            _ if status.revoked => GrantState::Revoked,
            _ if status.last_error.is_some() => {
                GrantState::Failing(status.last_error.unwrap_or_default())
            }
            Ok(None) if account.grant == GrantKind::RefreshToken => GrantState::NeedsAuthorization,
            Ok(_) => GrantState::Ok,
        }
    }

    /// Whether mail can go now: a usable grant, or a valid cached token while the endpoint fails.
    pub fn grant_ok(&self, account: &Account) -> bool {
        match self.grant_state(account) {
            GrantState::Ok => true,
            GrantState::Failing(_) => self.cached_for(&account.name).is_some(),
            _ => false,
        }
    }

    /// The refresh margin for a token of `lifetime`: the configured one, but at most a third of the
    /// lifetime, so a 5-minute token is used for 3 minutes 20 instead of never being fresh.
    fn margin_for(&self, lifetime: Duration) -> Duration {
        Duration::from_millis(self.margin.load(Ordering::Relaxed)).min(lifetime / 3)
    }

    fn fresh(&self, slot: &Slot) -> Option<AccessToken> {
        lock(&slot.cached)
            .as_ref()
            .filter(|t| t.expires_at > self.clock.now() + self.margin_for(t.lifetime))
            .cloned()
    }

    /// A token valid for at least the safety margin, refreshing if needed. A token inside the
    /// margin but still valid is handed out while the refresh runs in the background: no mailer
    /// waits on the token endpoint while there is a token that works.
    pub async fn token(self: &Arc<Self>, account: &str) -> Result<AccessToken, TokenError> {
        let slot = self.slot(account)?;
        *lock(&slot.wanted) = Some(self.clock.now());
        if let Some(t) = self.fresh(&slot) {
            return Ok(t);
        }
        if let Some(t) = self.valid(&slot) {
            self.refresh_behind(slot, false);
            return Ok(t);
        }
        self.refresh(slot, None).await
    }

    fn valid(&self, slot: &Slot) -> Option<AccessToken> {
        let now = self.clock.now();
        lock(&slot.cached)
            .as_ref()
            .filter(|t| t.expires_at > now)
            .cloned()
    }

    /// Starts a refresh unless one is running; nobody waits for it. `ask`: a new request even
    /// if the last one failed only moments ago.
    fn refresh_behind(self: &Arc<Self>, slot: Arc<Slot>, ask: bool) {
        if slot.behind.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        self.tasks.spawn(async move {
            let _ = this.run_refresh(slot.clone(), None, ask).await;
            slot.behind.store(false, Ordering::Release);
        });
    }

    /// [`TokenManager::keep_alive`] in the background (the app's hourly upkeep), so that no
    /// token request holds up the rest of the upkeep or shutdown.
    pub fn keep_alive_behind(self: &Arc<Self>, idle: Duration) {
        let this = self.clone();
        self.tasks.spawn(async move { this.keep_alive(idle).await });
    }

    /// Waits for a refresh of `account` in progress, if any.
    #[cfg(test)]
    async fn settled(&self, account: &str) {
        let slot = self.slot(account).unwrap();
        drop(slot.refresh.lock().await);
    }

    /// Background upkeep, run by [`TokenManager::run_upkeep`] when [`TokenManager::next_upkeep`]
    /// says: an account that asked for a token in the last hour has it refreshed as soon as it
    /// leaves its margin (before any session needs it, and so that a revoked grant raises
    /// `grant_revoked` within the token's lifetime even when no mailer connects); a failing one
    /// is asked again every [`FAILURE_BACKOFF`], and once more when it has failed for
    /// `alert_after_secs`, so that `refresh_failing` fires however sessions space their tries.
    pub fn upkeep(self: &Arc<Self>) {
        let now = self.clock.now();
        for slot in self.slots.all().values() {
            let recent = self.recently_wanted(slot, now);
            let last = lock(&slot.failure).as_ref().map(|(at, _)| *at);
            let threshold = self
                .alert_due(slot)
                .is_some_and(|t| t <= now && last.is_some_and(|l| l < t));
            let retry =
                recent && last.is_some_and(|l| now.saturating_duration_since(l) >= FAILURE_BACKOFF);
            let margin = recent
                && last.is_none()
                && self.fresh(slot).is_none()
                && self.valid(slot).is_some();
            if threshold || retry {
                self.refresh_behind(slot.clone(), true);
            } else if margin {
                self.refresh_behind(slot.clone(), false);
            }
        }
    }

    /// When [`TokenManager::upkeep`] has something to do next, if anything (a slot being
    /// refreshed in the background says so itself when it is done).
    pub fn next_upkeep(&self) -> Option<Instant> {
        let now = self.clock.now();
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        for slot in self.slots.all().values() {
            if slot.behind.load(Ordering::Acquire) {
                continue;
            }
            let last = lock(&slot.failure).as_ref().map(|(at, _)| *at);
            if self.recently_wanted(slot, now) {
                match last {
                    Some(l) => consider(l + FAILURE_BACKOFF),
                    None => {
                        if let Some(t) = self.valid(slot) {
                            consider((t.expires_at - self.margin_for(t.lifetime)).max(now));
                        }
                    }
                }
            }
            if let (Some(l), Some(t)) = (last, self.alert_due(slot)) {
                if l < t {
                    consider(t);
                }
            }
        }
        next
    }

    /// Runs [`TokenManager::upkeep`] whenever it has something to do, until `stop`.
    pub async fn run_upkeep(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = self.clock.now();
            // Also once in a while: an account's wanted time ages out of the hour unannounced.
            let next = self
                .next_upkeep()
                .map_or(now + UPKEEP_AT_LEAST, |t| t.min(now + UPKEEP_AT_LEAST));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = changed => continue,
                _ = tokio::time::sleep_until(next) => {}
            }
            self.upkeep();
        }
    }

    fn recently_wanted(&self, slot: &Slot, now: Instant) -> bool {
        lock(&slot.wanted).is_some_and(|at| now.saturating_duration_since(at) < RECENT_USE)
    }

    /// When the failures of the outage in progress reach `alert_after_secs`.
    fn alert_due(&self, slot: &Slot) -> Option<Instant> {
        let after = Duration::from_secs(self.observer.alerts.thresholds().alert_after_secs);
        lock(&slot.failing_since).map(|since| since + after)
    }

    /// Writes grants that could not be saved when they came (a full disk), so that a rotated
    /// refresh token is not lost with the process. Run periodically by the app.
    pub async fn save_unsaved(&self) {
        for slot in self.slots.all().values() {
            let Some(grant) = lock(&slot.unsaved).clone() else {
                continue;
            };
            let _guard = slot.refresh.lock().await;
            let name = slot.account.load().name.clone();
            // A refresh meanwhile may have saved a newer one.
            if lock(&slot.unsaved).is_none() {
                continue;
            }
            match self.store.put(&name, grant).await {
                Ok(()) => {
                    *lock(&slot.unsaved) = None;
                    tracing::info!(account = %name, "the grant that could not be saved earlier is saved now");
                }
                Err(e) => {
                    tracing::warn!(account = %name, error = %e, "still cannot save the grant to the database");
                }
            }
        }
    }

    /// Refreshes, once, every refresh-token grant whose refresh token has not been used for
    /// `idle` (Microsoft drops grants unused for 90 days); a failure raises the usual alerts
    /// while there is time to act. Also raises `grant_expiring` for a refresh token the provider
    /// said dies within two days (Google, for Testing-status apps). Run hourly by the app.
    pub async fn keep_alive(self: &Arc<Self>, idle: Duration) {
        let now = self.clock.unix();
        for slot in self.slots.all().values() {
            let account = slot.account.load_full();
            if account.grant != GrantKind::RefreshToken || self.store.status(&account.name).revoked
            {
                continue;
            }
            let Ok(Some(grant)) = self.store.get(&account.name) else {
                continue;
            };
            if let Some(at) = grant.refresh_expires_at.filter(|at| *at < now + EXPIRING) {
                let left = at.saturating_sub(now);
                let hint = match account.provider.family {
                    Family::Google => format!(
                        "a Google app in Testing status gives 7-day grants: publish the app (OAuth consent \
                         screen), then run `xoauth-relay authorize {}`",
                        account.name
                    ),
                    _ => format!("run `xoauth-relay authorize {}` before then", account.name),
                };
                let detail = format!(
                    "the provider said the refresh token expires in {}h ({})",
                    left / 3600,
                    crate::util::clock::rfc3339(at)
                );
                self.observer
                    .alerts
                    .raise(Event::GrantExpiring, &account.name, &detail, &hint);
            }
            let used = grant.last_refresh.unwrap_or(0).max(grant.obtained_at);
            let unused = now.saturating_sub(used);
            if unused < idle.as_secs() {
                continue;
            }
            tracing::info!(account = %account.name, unused_days = unused / 86400, "keep-alive: refreshing a grant that has not been used for a while");
            let _guard = slot.refresh.lock().await;
            let result = self.obtain(slot, false).await;
            *lock(&slot.failure) = result.as_ref().err().map(|e| (self.clock.now(), e.clone()));
            // Microsoft drops a grant unused for 90 days; keep-alive failing on one unused for 80
            // is the last chance to say so with days to spare.
            if account.provider.family == Family::Microsoft
                && unused >= 80 * 86400
                && result.is_err()
            {
                self.observer.alerts.raise(
                    Event::GrantExpiring,
                    &account.name,
                    &format!(
                        "refresh token unused for {} days; Microsoft drops it at 90",
                        unused / 86400
                    ),
                    &format!("run `xoauth-relay authorize {}`", account.name),
                );
            }
        }
    }

    /// A new token after the upstream rejected `rejected`: unless another session already replaced it,
    /// the cached and stored copies are skipped and a new one is requested.
    pub async fn token_after_rejection(
        self: &Arc<Self>,
        account: &str,
        rejected: &Secret,
    ) -> Result<AccessToken, TokenError> {
        let slot = self.slot(account)?;
        self.refresh(slot, Some(rejected.clone())).await
    }

    /// One refresh at a time per account; whoever waited for the lock first looks again, so a crowd
    /// arriving after expiry causes one request. The work runs in its own task: a mailer hanging up
    /// must not cancel it between the provider rotating the refresh token and the new one reaching disk.
    async fn refresh(
        self: &Arc<Self>,
        slot: Arc<Slot>,
        rejected: Option<Secret>,
    ) -> Result<AccessToken, TokenError> {
        self.run_refresh(slot, rejected, false).await
    }

    /// [`TokenManager::refresh`]; `ask`: a new request even if the last one failed only moments ago.
    async fn run_refresh(
        self: &Arc<Self>,
        slot: Arc<Slot>,
        rejected: Option<Secret>,
        ask: bool,
    ) -> Result<AccessToken, TokenError> {
        let this = self.clone();
        let task = self.tasks.spawn(async move {
            let _guard = slot.refresh.lock().await;
            if let Some(t) = this
                .fresh(&slot)
                .filter(|t| rejected.as_ref() != Some(&t.secret))
            {
                return Ok(t);
            }
            // The margin is for comfort, not a cliff: while the provider cannot give a new token,
            // the cached one serves until it really expires.
            let still_valid = || {
                lock(&slot.cached)
                    .as_ref()
                    .filter(|t| t.expires_at > this.clock.now())
                    .filter(|t| rejected.as_ref() != Some(&t.secret))
                    .cloned()
            };
            if let Some((at, error)) = lock(&slot.failure).clone().filter(|_| !ask) {
                if this.clock.now().saturating_duration_since(at) < FAILURE_BACKOFF {
                    return match still_valid().filter(|_| passing(&error)) {
                        Some(t) => Ok(t),
                        None => Err(error),
                    };
                }
            }
            // A token persisted by an earlier run may still be good, but only an empty cache means we
            // have not looked at it yet; a stale cached token is the stored one.
            let first_use = rejected.is_none() && lock(&slot.cached).is_none();
            let result = this.obtain(&slot, first_use).await;
            let now = this.clock.now();
            *lock(&slot.failure) = result.as_ref().err().map(|e| (now, e.clone()));
            this.changed.notify_one();
            match result {
                Err(e) => match still_valid().filter(|_| passing(&e)) {
                    Some(t) => Ok(t),
                    None => Err(e),
                },
                ok => ok,
            }
        });
        task.await
            .map_err(|e| TokenError::Store(format!("token refresh task failed: {e}")))?
    }

    /// Runs `change` (which replaces or deletes the account's grant) while no refresh is in flight,
    /// then forgets the cached token and any remembered failure, so the next session uses the new state.
    pub async fn replace_grant<T>(
        &self,
        account: &str,
        change: impl std::future::Future<Output = T>,
    ) -> T {
        let slot = self.slot(account).ok();
        let _guard = match &slot {
            Some(s) => Some(s.refresh.lock().await),
            None => None,
        };
        let out = change.await;
        if let Some(s) = &slot {
            *lock(&s.cached) = None;
            *lock(&s.failure) = None;
            *lock(&s.failing_since) = None;
            *lock(&s.unsaved) = None;
        }
        out
    }

    /// Caches a token that expires in `left` and was issued for `lifetime`.
    fn cache(
        &self,
        slot: &Slot,
        secret: Secret,
        left: Duration,
        lifetime: Duration,
    ) -> AccessToken {
        let token = AccessToken {
            secret,
            expires_at: self.clock.now() + left,
            lifetime,
        };
        *lock(&slot.cached) = Some(token.clone());
        self.changed.notify_one();
        token
    }

    /// Called with the slot's refresh lock held.
    async fn obtain(&self, slot: &Slot, reuse_stored: bool) -> Result<AccessToken, TokenError> {
        let account = slot.account.load_full();
        let name = account.name.clone();
        let unsaved = lock(&slot.unsaved).clone();
        let stored = match unsaved {
            Some(grant) => Some(grant),
            None => self
                .store
                .get(&name)
                .map_err(|e| TokenError::Store(e.to_string()))?,
        };
        let status = self.store.status(&name);
        let now = self.clock.unix();
        if reuse_stored {
            // A token persisted by an earlier run is still good: no need to ask the provider.
            if let Some(g) = &stored {
                if let (Some(tok), Some(exp)) = (&g.access_token, g.access_expires_at) {
                    let issued = g.last_refresh.unwrap_or(g.obtained_at).min(now);
                    let lifetime = Duration::from_secs(exp.saturating_sub(issued));
                    if exp > now + self.margin_for(lifetime).as_secs() {
                        let left = Duration::from_secs(exp - now);
                        return Ok(self.cache(slot, tok.clone(), left, lifetime));
                    }
                }
            }
        }
        let refresh_token = match account.grant {
            GrantKind::RefreshToken => {
                let Some(rt) = stored.as_ref().and_then(|g| g.refresh_token.clone()) else {
                    return Err(TokenError::NeedsAuthorization(name));
                };
                if status.revoked {
                    return Err(TokenError::Revoked {
                        account: name,
                        detail: status.last_error.unwrap_or_else(|| "invalid_grant".into()),
                        family: account.provider.family,
                    });
                }
                Some(rt)
            }
            GrantKind::ClientCredentials | GrantKind::ServiceAccount => None,
        };
        let result = self.issuer.issue(&account, refresh_token.as_ref()).await;
        let metrics = &self.observer.metrics;
        match result {
            Ok(set) => {
                metrics.token_refresh(&name, "ok");
                *lock(&slot.failing_since) = None;
                self.persist(slot, stored, set).await
            }
            Err(error) => {
                let text = error.to_string();
                let revoked = matches!(error, ProviderError::InvalidGrant(_))
                    && account.grant == GrantKind::RefreshToken;
                let hint = error.hint().unwrap_or("");
                if revoked {
                    metrics.token_refresh(&name, "invalid_grant");
                    let fix = revoked_hint(&name, account.provider.family);
                    self.observer
                        .alerts
                        .raise(Event::GrantRevoked, &name, &text, &fix);
                } else {
                    metrics.token_refresh(&name, "error");
                    self.failing(slot, &text, hint);
                }
                // One warning per new failure, not one per mailer session that runs into it.
                if status.last_error.as_deref() == Some(text.as_str()) {
                    tracing::debug!(account = %name, error = %error, "token request failed again");
                } else {
                    tracing::warn!(account = %name, provider = %account.provider.name, error = %error, hint, "token request failed");
                }
                self.store.update_status(&name, |s| {
                    s.last_error = Some(text.clone());
                    s.revoked = revoked;
                });
                if let Err(e) = self.store.flush().await {
                    tracing::warn!(account = %name, error = %e, "cannot record the token failure on disk");
                }
                Err(match error {
                    ProviderError::InvalidGrant(_) if revoked => TokenError::Revoked {
                        account: name,
                        detail: text,
                        family: account.provider.family,
                    },
                    ProviderError::Unreachable(detail) => TokenError::Unreachable {
                        account: name,
                        detail,
                    },
                    error => TokenError::Refused {
                        account: name,
                        error,
                    },
                })
            }
        }
    }

    /// A failed token request that is not a revoked grant: once they have failed for
    /// `alert_after_secs`, `refresh_failing` fires.
    fn failing(&self, slot: &Slot, detail: &str, hint: &str) {
        let now = self.clock.now();
        let alerts = &self.observer.alerts;
        let after = Duration::from_secs(alerts.thresholds().alert_after_secs);
        // Failures far apart (the last one longer ago than the threshold, and than the retries'
        // spacing) are not one outage.
        let apart = after.max(OUTAGE_GAP);
        let previous = lock(&slot.failure).as_ref().map(|(at, _)| *at);
        let since = {
            let mut since = lock(&slot.failing_since);
            if previous.is_some_and(|at| now.saturating_duration_since(at) > apart) {
                *since = None;
            }
            *since.get_or_insert(now)
        };
        if now.saturating_duration_since(since) >= after {
            let hint = if hint.is_empty() {
                "check the network path to the provider's token endpoint and the provider's status page"
            } else {
                hint
            };
            alerts.raise(
                Event::RefreshFailing,
                &slot.account.load().name,
                detail,
                hint,
            );
        }
    }

    async fn persist(
        &self,
        slot: &Slot,
        stored: Option<Grant>,
        set: TokenSet,
    ) -> Result<AccessToken, TokenError> {
        let name = slot.account.load().name.clone();
        let now = self.clock.unix();
        let lifetime = set.expires_in.unwrap_or(DEFAULT_LIFETIME);
        let mut grant = stored.unwrap_or(Grant {
            obtained_at: now,
            ..Grant::default()
        });
        let rotated = set.refresh_token.is_some() && set.refresh_token != grant.refresh_token;
        if rotated {
            grant.refresh_token = set.refresh_token.clone();
            grant.obtained_at = now;
            grant.refresh_expires_at = None;
        }
        if let Some(left) = set.refresh_expires_in {
            grant.refresh_expires_at = Some(now + left.as_secs());
        }
        grant.access_token = Some(set.access_token.clone());
        grant.access_expires_at = Some(now + lifetime.as_secs());
        grant.last_refresh = Some(now);
        let saved = self.store.put(&name, grant.clone()).await;
        if saved.is_ok() {
            self.store.update_status(&name, |s| {
                s.last_error = None;
                s.revoked = false;
            });
        }
        match saved {
            Ok(()) => *lock(&slot.unsaved) = None,
            Err(e) => {
                tracing::error!(
                    account = %name,
                    error = %e,
                    "cannot save the new grant to the database; keeping it in memory and retrying every 30 s \
                     (if the relay stops first, run `xoauth-relay authorize {name}`)"
                );
                *lock(&slot.unsaved) = Some(grant);
                self.observer.alerts.raise(
                    Event::GrantSaveFailed,
                    &name,
                    &format!("the new grant could not be written to the database ({e})"),
                    &format!(
                        "free space on the disk that holds data_dir (and check its health); the relay keeps the \
                         grant in memory and retries; if it stops before it succeeds, run `xoauth-relay authorize {name}`"
                    ),
                );
            }
        }
        tracing::info!(account = %name, rotated, expires_in_secs = lifetime.as_secs(), "access token refreshed");
        Ok(self.cache(slot, set.access_token, lifetime, lifetime))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::util::clock::{Clock, ManualClock};
    use crate::util::BoxFuture;

    /// Answers every request with `answer`, counting them; rotates the refresh token when asked.
    struct Scripted {
        calls: AtomicUsize,
        answer: Mutex<Result<u64, ProviderError>>,
        rotate: bool,
    }

    impl Scripted {
        fn new(answer: Result<u64, ProviderError>) -> Arc<Scripted> {
            Arc::new(Scripted {
                calls: AtomicUsize::new(0),
                answer: Mutex::new(answer),
                rotate: false,
            })
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl Issuer for Scripted {
        fn issue<'a>(
            &'a self,
            _account: &'a Account,
            _refresh_token: Option<&'a Secret>,
        ) -> BoxFuture<'a, Result<TokenSet, ProviderError>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                // Let every waiter pile up behind the single flight.
                tokio::task::yield_now().await;
                let answer = lock(&self.answer).clone();
                answer.map(|lifetime| TokenSet {
                    access_token: Secret::new(format!("at-{n}")),
                    expires_in: Some(Duration::from_secs(lifetime)),
                    refresh_expires_in: None,
                    refresh_token: self.rotate.then(|| Secret::new(format!("rt-{n}"))),
                })
            })
        }
    }

    struct Fixture {
        tokens: Arc<TokenManager>,
        clock: Arc<ManualClock>,
        store: Store,
    }

    fn fixture(issuer: Arc<Scripted>) -> Fixture {
        fixture_alerting(issuer, crate::config::AlertsConfig::default())
    }

    /// With these alert thresholds (no channel: fired alerts show in the metrics).
    fn fixture_alerting(issuer: Arc<Scripted>, alerts: crate::config::AlertsConfig) -> Fixture {
        // Any valid PHC string: these tests never verify a password.
        let config = crate::config::one_account(
            "news",
            "$argon2id$v=19$m=19456,t=2,p=1$8uLpBtLr7xHax5eifcWBXA$QKTwp/o3Eg0VHq7aeAVpq5nU6VsxKM0bSk9xdcSnc0U",
        );
        let store = Store::new(MemoryStore::default());
        let clock = ManualClock::new(1_000_000);
        let tokens = Arc::new(TokenManager::new(
            store.clone(),
            issuer,
            clock.clone(),
            Duration::from_secs(300),
            &config.accounts,
            TaskTracker::new(),
            Observer::new(&alerts, clock.clone()).unwrap(),
        ));
        Fixture {
            tokens,
            clock,
            store,
        }
    }

    async fn with_grant(f: &Fixture) {
        let grant = Grant {
            refresh_token: Some(Secret::new("rt-0")),
            obtained_at: f.clock.unix(),
            ..Grant::default()
        };
        f.store.put("news", grant).await.unwrap();
    }

    #[tokio::test]
    async fn a_crowd_after_expiry_causes_one_request_and_the_token_is_cached_until_the_margin() {
        let issuer = Scripted::new(Ok(3600));
        let f = fixture(issuer.clone());
        with_grant(&f).await;
        let crowd: Vec<_> = (0..50)
            .map(|_| {
                let t = f.tokens.clone();
                tokio::spawn(async move { t.token("news").await.map(|t| t.secret) })
            })
            .collect();
        for task in crowd {
            assert_eq!(task.await.unwrap().unwrap().expose(), "at-1");
        }
        assert_eq!(issuer.calls(), 1);
        // 3600 s lifetime, 300 s margin: good for 3299 s, refreshed after 3300.
        f.clock.advance(Duration::from_secs(3299));
        assert_eq!(
            f.tokens.token("news").await.unwrap().secret.expose(),
            "at-1"
        );
        assert_eq!(issuer.calls(), 1);
        f.clock.advance(Duration::from_secs(2));
        // Inside the margin: the cached token still serves while the refresh runs behind it.
        assert_eq!(
            f.tokens.token("news").await.unwrap().secret.expose(),
            "at-1"
        );
        after_refresh(&f, &issuer, 2).await;
        assert_eq!(
            f.tokens.token("news").await.unwrap().secret.expose(),
            "at-2"
        );
        assert_eq!(issuer.calls(), 2);
        let stored = f.store.get("news").unwrap().unwrap();
        assert_eq!(stored.access_token.unwrap().expose(), "at-2");
        assert_eq!(stored.access_expires_at, Some(f.clock.unix() + 3600));
    }

    #[tokio::test]
    async fn a_failure_is_remembered_for_the_backoff_then_retried() {
        let issuer = Scripted::new(Err(ProviderError::Unreachable("down".into())));
        let f = fixture(issuer.clone());
        with_grant(&f).await;
        for _ in 0..5 {
            let e = f.tokens.token("news").await.unwrap_err();
            assert!(matches!(e, TokenError::Unreachable { .. }), "{e}");
        }
        assert_eq!(issuer.calls(), 1);
        assert!(f.store.status("news").last_error.is_some());
        f.clock.advance(FAILURE_BACKOFF + Duration::from_secs(1));
        *lock(&issuer.answer) = Ok(3600);
        assert_eq!(
            f.tokens.token("news").await.unwrap().secret.expose(),
            "at-2"
        );
        assert_eq!(f.store.status("news").last_error, None);
    }

    #[tokio::test]
    async fn refresh_failing_fires_once_the_endpoint_has_failed_for_alert_after_secs() {
        let issuer = Scripted::new(Err(ProviderError::Unreachable("down".into())));
        let alerts = crate::config::AlertsConfig {
            alert_after_secs: 2,
            ..Default::default()
        };
        let f = fixture_alerting(issuer.clone(), alerts);
        with_grant(&f).await;
        let fired = |f: &Fixture| {
            let text = f.tokens.observer.metrics.encode(&|_| {});
            text.contains("xoauth_relay_alerts_total{account=\"news\",event=\"refresh_failing\"} 1")
        };
        assert!(f.tokens.token("news").await.is_err());
        assert!(!fired(&f), "one failure is no outage yet");
        // The next try comes after the backoff, longer than the threshold: still the same outage.
        f.clock.advance(FAILURE_BACKOFF + Duration::from_secs(1));
        assert!(f.tokens.token("news").await.is_err());
        assert_eq!(issuer.calls(), 2);
        assert!(fired(&f), "failing for longer than alert_after_secs");
    }

    #[tokio::test]
    async fn invalid_grant_marks_the_grant_revoked_and_stops_asking() {
        let issuer = Scripted::new(Err(ProviderError::InvalidGrant(
            "Token has been revoked".into(),
        )));
        let f = fixture(issuer.clone());
        with_grant(&f).await;
        let e = f.tokens.token("news").await.unwrap_err();
        assert!(
            e.to_string().contains("run `xoauth-relay authorize news`"),
            "{e}"
        );
        f.clock.advance(Duration::from_secs(3600));
        assert!(matches!(
            f.tokens.token("news").await.unwrap_err(),
            TokenError::Revoked { .. }
        ));
        assert_eq!(issuer.calls(), 1, "a revoked grant is never retried");
        assert!(f.store.status("news").revoked);
    }

    #[tokio::test]
    async fn a_rotated_refresh_token_is_stored_before_the_access_token_is_used() {
        let issuer = Arc::new(Scripted {
            rotate: true,
            ..Arc::try_unwrap(Scripted::new(Ok(3600))).ok().unwrap()
        });
        let f = fixture(issuer.clone());
        with_grant(&f).await;
        let token = f.tokens.token("news").await.unwrap();
        assert_eq!(token.secret.expose(), "at-1");
        let stored = f.store.get("news").unwrap().unwrap();
        assert_eq!(stored.refresh_token.unwrap().expose(), "rt-1");
        // A rejected token is replaced even though it has not expired.
        let again = f
            .tokens
            .token_after_rejection("news", &token.secret)
            .await
            .unwrap();
        assert_eq!(again.secret.expose(), "at-2");
        assert_eq!(issuer.calls(), 2);
    }

    /// Until the background refresh has asked the provider `calls` times in all, and finished.
    async fn after_refresh(f: &Fixture, issuer: &Scripted, calls: usize) {
        while issuer.calls() < calls {
            tokio::task::yield_now().await;
        }
        f.tokens.settled("news").await;
    }

    #[tokio::test]
    async fn a_quiet_grant_is_refreshed_once_after_keepalive_days() {
        let issuer = Scripted::new(Ok(3600));
        let f = fixture(issuer.clone());
        with_grant(&f).await;
        let week = Duration::from_secs(7 * 86_400);
        f.tokens.keep_alive(week).await;
        assert_eq!(issuer.calls(), 0, "used today");
        f.clock.advance(Duration::from_secs(8 * 86_400));
        f.tokens.keep_alive(week).await;
        assert_eq!(issuer.calls(), 1, "unused for 8 days");
        f.tokens.keep_alive(week).await;
        assert_eq!(issuer.calls(), 1, "just refreshed");
    }

    #[tokio::test]
    async fn a_refresh_token_the_provider_says_dies_soon_raises_grant_expiring() {
        let f = fixture(Scripted::new(Ok(3600)));
        let grant = Grant {
            refresh_token: Some(Secret::new("rt-0")),
            obtained_at: f.clock.unix(),
            refresh_expires_at: Some(f.clock.unix() + 7 * 86_400),
            ..Grant::default()
        };
        f.store.put("news", grant).await.unwrap();
        let fired = |f: &Fixture| {
            let text = f.tokens.observer.metrics.encode(&|_| {});
            text.contains("xoauth_relay_alerts_total{account=\"news\",event=\"grant_expiring\"} 1")
        };
        let week = Duration::from_secs(7 * 86_400);
        f.tokens.keep_alive(week).await;
        assert!(!fired(&f), "7 days left");
        f.clock.advance(Duration::from_secs(5 * 86_400 + 60));
        f.tokens.keep_alive(week).await;
        assert!(fired(&f), "under 2 days left");
    }

    #[tokio::test]
    async fn a_short_lived_token_is_used_for_two_thirds_of_its_life() {
        let issuer = Scripted::new(Ok(5));
        let f = fixture(issuer.clone());
        with_grant(&f).await;
        f.tokens.token("news").await.unwrap();
        f.clock.advance(Duration::from_millis(3300));
        f.tokens.token("news").await.unwrap();
        assert_eq!(
            issuer.calls(),
            1,
            "5 s token, 300 s margin: still fresh at 3.3 s"
        );
        f.clock.advance(Duration::from_millis(100));
        f.tokens.token("news").await.unwrap();
        after_refresh(&f, &issuer, 2).await;
        assert_eq!(
            issuer.calls(),
            2,
            "refreshed once a third of its life is left"
        );
    }

    #[tokio::test]
    async fn an_outage_near_expiry_keeps_the_cached_token_until_it_expires() {
        let issuer = Scripted::new(Ok(3600));
        let f = fixture(issuer.clone());
        with_grant(&f).await;
        assert_eq!(
            f.tokens.token("news").await.unwrap().secret.expose(),
            "at-1"
        );
        *lock(&issuer.answer) = Err(ProviderError::Unreachable("down".into()));
        // Two minutes before expiry (inside the 300 s margin): the refresh fails, the token serves.
        f.clock.advance(Duration::from_secs(3480));
        for _ in 0..3 {
            assert_eq!(
                f.tokens.token("news").await.unwrap().secret.expose(),
                "at-1"
            );
            after_refresh(&f, &issuer, 2).await;
        }
        assert_eq!(issuer.calls(), 2, "one failed refresh, then the backoff");
        // Once it has expired, the outage shows.
        f.clock.advance(Duration::from_secs(121));
        assert!(matches!(
            f.tokens.token("news").await.unwrap_err(),
            TokenError::Unreachable { .. }
        ));
    }

    #[tokio::test]
    async fn no_grant_means_authorize() {
        let issuer = Scripted::new(Ok(3600));
        let f = fixture(issuer.clone());
        let e = f.tokens.token("news").await.unwrap_err();
        assert!(matches!(e, TokenError::NeedsAuthorization(_)), "{e}");
        assert_eq!(issuer.calls(), 0);
    }

    /// The endpoint fails from the start; sessions come 3.5 s apart, the second answered from the
    /// remembered failure: the upkeep still asks at the threshold, and `refresh_failing` fires.
    #[tokio::test]
    async fn refresh_failing_fires_at_the_threshold_however_sessions_space_their_tries() {
        let issuer = Scripted::new(Err(ProviderError::Unreachable("down".into())));
        let alerts = crate::config::AlertsConfig {
            alert_after_secs: 3,
            ..Default::default()
        };
        let f = fixture_alerting(issuer.clone(), alerts);
        with_grant(&f).await;
        let fired = |f: &Fixture| {
            let text = f.tokens.observer.metrics.encode(&|_| {});
            text.contains("xoauth_relay_alerts_total{account=\"news\",event=\"refresh_failing\"} 1")
        };
        let account = f.tokens.slot("news").unwrap().account.load_full();
        assert!(f.tokens.token("news").await.is_err());
        f.clock.advance(Duration::from_millis(3500));
        assert!(f.tokens.token("news").await.is_err());
        assert_eq!(issuer.calls(), 1, "answered from the remembered failure");
        assert!(!fired(&f));
        assert!(
            f.tokens.next_upkeep().is_some_and(|t| t <= f.clock.now()),
            "the upkeep has the threshold due"
        );
        f.tokens.upkeep();
        after_refresh(&f, &issuer, 2).await;
        assert!(fired(&f), "failing for longer than alert_after_secs");
        assert!(!f.tokens.grant_ok(&account), "grant_ok says 0 meanwhile");
    }

    /// A fixture on tokio's clock (paused by the test), and the upkeep running as in the relay.
    fn paused_fixture(issuer: Arc<Scripted>) -> (Arc<TokenManager>, Store) {
        let config = crate::config::one_account(
            "news",
            "$argon2id$v=19$m=19456,t=2,p=1$8uLpBtLr7xHax5eifcWBXA$QKTwp/o3Eg0VHq7aeAVpq5nU6VsxKM0bSk9xdcSnc0U",
        );
        let store = Store::new(MemoryStore::default());
        let clock = crate::util::clock::system();
        let tokens = Arc::new(TokenManager::new(
            store.clone(),
            issuer,
            clock.clone(),
            Duration::from_secs(300),
            &config.accounts,
            TaskTracker::new(),
            Observer::quiet(clock),
        ));
        tokio::spawn(
            tokens
                .clone()
                .run_upkeep(tokio_util::sync::CancellationToken::new()),
        );
        (tokens, store)
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_in_use_is_refreshed_before_it_expires_whatever_its_lifetime() {
        for lifetime in [4u64, 12, 3600] {
            let issuer = Scripted::new(Ok(lifetime));
            let (tokens, store) = paused_fixture(issuer.clone());
            let grant = Grant {
                refresh_token: Some(Secret::new("rt-0")),
                obtained_at: crate::util::clock::now_unix(),
                ..Grant::default()
            };
            store.put("news", grant).await.unwrap();
            // Used once, then no mailer at all.
            assert_eq!(tokens.token("news").await.unwrap().secret.expose(), "at-1");
            tokio::time::sleep(Duration::from_millis(lifetime * 1000 - 10)).await;
            assert_eq!(
                issuer.calls(),
                2,
                "{lifetime} s token: refreshed before expiry"
            );
            let left = tokens.cached_for("news").unwrap();
            assert!(
                left > Duration::from_millis(lifetime * 1000 / 2),
                "{lifetime} s: {left:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_grant_revoked_while_nobody_sends_is_reported_within_the_token_lifetime() {
        let issuer = Scripted::new(Ok(12));
        let (tokens, store) = paused_fixture(issuer.clone());
        let grant = Grant {
            refresh_token: Some(Secret::new("rt-0")),
            obtained_at: crate::util::clock::now_unix(),
            ..Grant::default()
        };
        store.put("news", grant).await.unwrap();
        tokens.token("news").await.unwrap();
        *lock(&issuer.answer) = Err(ProviderError::InvalidGrant("revoked".into()));
        tokio::time::sleep(Duration::from_millis(11_900)).await;
        let text = tokens.observer.metrics.encode(&|_| {});
        assert!(
            text.contains("xoauth_relay_alerts_total{account=\"news\",event=\"grant_revoked\"} 1"),
            "{text}"
        );
        assert!(store.status("news").revoked);
    }

    #[tokio::test]
    async fn a_rotated_refresh_token_that_cannot_be_saved_raises_an_alert_and_is_saved_later() {
        let issuer = Arc::new(Scripted {
            rotate: true,
            ..Arc::try_unwrap(Scripted::new(Ok(3600))).ok().unwrap()
        });
        let memory = Arc::new(MemoryStore::default());
        let store = Store::new(SharedMemory(memory.clone()));
        let config = crate::config::one_account(
            "news",
            "$argon2id$v=19$m=19456,t=2,p=1$8uLpBtLr7xHax5eifcWBXA$QKTwp/o3Eg0VHq7aeAVpq5nU6VsxKM0bSk9xdcSnc0U",
        );
        let clock = ManualClock::new(1_000_000);
        let tokens = Arc::new(TokenManager::new(
            store.clone(),
            issuer.clone(),
            clock.clone(),
            Duration::from_secs(300),
            &config.accounts,
            TaskTracker::new(),
            Observer::quiet(clock.clone()),
        ));
        let grant = Grant {
            refresh_token: Some(Secret::new("rt-0")),
            obtained_at: clock.unix(),
            ..Grant::default()
        };
        store.put("news", grant).await.unwrap();
        memory.full.store(true, Ordering::SeqCst);
        assert_eq!(tokens.token("news").await.unwrap().secret.expose(), "at-1");
        let text = tokens.observer.metrics.encode(&|_| {});
        assert!(
            text.contains(
                "xoauth_relay_alerts_total{account=\"news\",event=\"grant_save_failed\"} 1"
            ),
            "{text}"
        );
        assert_eq!(
            store
                .get("news")
                .unwrap()
                .unwrap()
                .refresh_token
                .unwrap()
                .expose(),
            "rt-0"
        );
        tokens.save_unsaved().await;
        assert_eq!(
            store
                .get("news")
                .unwrap()
                .unwrap()
                .refresh_token
                .unwrap()
                .expose(),
            "rt-0",
            "still full"
        );
        memory.full.store(false, Ordering::SeqCst);
        tokens.save_unsaved().await;
        assert_eq!(
            store
                .get("news")
                .unwrap()
                .unwrap()
                .refresh_token
                .unwrap()
                .expose(),
            "rt-1",
            "the rotated refresh token reached the store"
        );
    }

    /// A [`MemoryStore`] the test keeps a handle on.
    struct SharedMemory(Arc<MemoryStore>);

    impl crate::store::GrantStore for SharedMemory {
        fn get(&self, account: &str) -> Result<Option<Grant>, crate::store::StoreError> {
            self.0.get(account)
        }
        fn put(&self, account: &str, grant: &Grant) -> Result<(), crate::store::StoreError> {
            self.0.put(account, grant)
        }
        fn remove(&self, account: &str) -> Result<bool, crate::store::StoreError> {
            self.0.remove(account)
        }
        fn status(&self, account: &str) -> crate::store::Status {
            self.0.status(account)
        }
        fn update_status(&self, account: &str, f: &dyn Fn(&mut crate::store::Status)) {
            self.0.update_status(account, f)
        }
        fn flush(&self) -> Result<(), crate::store::StoreError> {
            self.0.flush()
        }
    }
}
