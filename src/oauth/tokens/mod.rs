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
use crate::config::{Account, GrantKind};
use crate::observe::{Event, Observer};
use crate::store::{Grant, Store};
use crate::util::clock::SharedClock;
use crate::util::keyed::Keyed;
use crate::util::secret::Secret;
use crate::util::sync::lock;

mod error;
#[cfg(test)]
mod tests;
mod upkeep;

use self::error::passing;
pub use self::error::{GrantState, TokenError};

/// Used when the provider does not say how long a token lives.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct AccessToken {
    pub secret: Secret,
    pub expires_at: Instant,
    /// How long it was issued for; a short-lived token is refreshed a fraction of it before expiry.
    pub lifetime: Duration,
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

/// After the shared database was out of reach for a refresh: waiters get that error for this long
/// (each would otherwise wait for its own connection attempt in turn).
const DATABASE_BACKOFF: Duration = Duration::from_secs(1);

struct AccountTokens {
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

impl AccountTokens {
    fn new(account: &Arc<Account>) -> AccountTokens {
        AccountTokens {
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
    slots: Keyed<AccountTokens>,
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
        let slots = Keyed::new(
            accounts
                .iter()
                .map(|a| (a.name.clone(), AccountTokens::new(a))),
        );
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

    /// A new or deleted grant starts with a clean record: no revoked flag, no old provider error;
    /// relays sharing the store drop what they cached of the old grant.
    async fn clear_status(&self, account: &str) {
        self.store.update_status(account, |s| {
            s.revoked = false;
            s.last_error = None;
        });
        if let Err(e) = self.store.flush().await {
            tracing::warn!(account, error = %e, "cannot write the account's status");
        }
        if let Some(shared) = self.store.sharing() {
            if let Err(e) = shared.replaced(account).await {
                tracing::warn!(account, error = %e, "cannot tell the other relays about the new grant; they see it at their next refresh");
            }
        }
    }

    /// Follows a shared store's news: a grant replaced, deleted or found revoked by another relay
    /// makes this one forget its cached token, so the next session goes by the new state.
    pub fn follow_shared(self: &Arc<Self>) {
        let Some(shared) = self.store.sharing() else {
            return;
        };
        let mut changes = shared.changes();
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let changed = changes.recv().await;
                let Some(this) = this.upgrade() else { return };
                match changed {
                    Ok(account) => this.forget(&account),
                    // Missed news: forget everything rather than keep a dead grant's token.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        for name in this.slots.all().keys() {
                            this.forget(name);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    /// Drops the cached token and remembered failures of `account`.
    fn forget(&self, account: &str) {
        self.slots.with(account, |s| {
            *lock(&s.cached) = None;
            *lock(&s.failure) = None;
            *lock(&s.failing_since) = None;
            *lock(&s.unsaved) = None;
        });
    }

    fn slot(&self, account: &str) -> Result<Arc<AccountTokens>, TokenError> {
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
            let slot = self.slots.insert_missing(&a.name, || AccountTokens::new(a));
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

    fn fresh(&self, slot: &AccountTokens) -> Option<AccessToken> {
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

    fn valid(&self, slot: &AccountTokens) -> Option<AccessToken> {
        let now = self.clock.now();
        lock(&slot.cached)
            .as_ref()
            .filter(|t| t.expires_at > now)
            .cloned()
    }

    /// Starts a refresh unless one is running; nobody waits for it. `ask`: a new request even
    /// if the last one failed only moments ago.
    fn refresh_behind(self: &Arc<Self>, slot: Arc<AccountTokens>, ask: bool) {
        if slot.behind.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        self.tasks.spawn(async move {
            let _ = this.run_refresh(slot.clone(), None, ask).await;
            slot.behind.store(false, Ordering::Release);
        });
    }

    /// Waits for a refresh of `account` in progress, if any.
    #[cfg(test)]
    async fn settled(&self, account: &str) {
        let slot = self.slot(account).unwrap();
        drop(slot.refresh.lock().await);
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
        slot: Arc<AccountTokens>,
        rejected: Option<Secret>,
    ) -> Result<AccessToken, TokenError> {
        self.run_refresh(slot, rejected, false).await
    }

    /// [`TokenManager::refresh`]; `ask`: a new request even if the last one failed only moments ago.
    async fn run_refresh(
        self: &Arc<Self>,
        slot: Arc<AccountTokens>,
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
                // A failing endpoint is not asked by every waiter; a shared database out of reach
                // asked nobody, and is tried again a moment later.
                let backoff = match error {
                    TokenError::Database(_) => DATABASE_BACKOFF,
                    _ => FAILURE_BACKOFF,
                };
                if this.clock.now().saturating_duration_since(at) < backoff {
                    return match still_valid().filter(|_| passing(&error)) {
                        Some(t) => Ok(t),
                        None => Err(error),
                    };
                }
            }
            // A token persisted by an earlier run may still be good, but only an empty cache means we
            // have not looked at it yet; a stale cached token is the stored one.
            let first_use = rejected.is_none() && lock(&slot.cached).is_none();
            let result = this.obtain(&slot, first_use, rejected.as_ref()).await;
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
        self.forget(account);
        out
    }

    /// Caches a token that expires in `left` and was issued for `lifetime`.
    fn cache(
        &self,
        slot: &AccountTokens,
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
    async fn obtain(
        &self,
        slot: &AccountTokens,
        reuse_stored: bool,
        rejected: Option<&Secret>,
    ) -> Result<AccessToken, TokenError> {
        let account = slot.account.load_full();
        let name = account.name.clone();
        let store_error = |e: crate::store::StoreError| TokenError::Store(e.to_string());
        let database = |e: crate::store::StoreError| TokenError::Database(e.to_string());
        // A store shared by several relays: one refresh at a time across all of them (the lease
        // is held until the new grant is committed), and the grant read from the database itself,
        // so a token another relay just stored is used instead of asking the provider again.
        let shared = self.store.sharing();
        let _lease = match shared {
            Some(s) => Some(s.lease(&name).await.map_err(database)?),
            None => None,
        };
        let unsaved = lock(&slot.unsaved).clone();
        let stored = match (unsaved, shared) {
            (Some(grant), _) => Some(grant),
            (None, Some(s)) => s.current(&name).await.map_err(database)?,
            (None, None) => self.store.get(&name).map_err(store_error)?,
        };
        let status = self.store.status(&name);
        let now = self.clock.unix();
        if reuse_stored || shared.is_some() {
            // A token persisted by an earlier run (or another relay) is still good: no need to
            // ask the provider.
            if let Some(g) = &stored {
                let usable = g.access_token.as_ref().filter(|t| rejected != Some(*t));
                if let (Some(tok), Some(exp)) = (usable, g.access_expires_at) {
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
                    return Err(TokenError::NeedsAuthorization {
                        command: crate::hints::grant_command(&account),
                        account: name,
                    });
                };
                if status.revoked {
                    return Err(TokenError::Revoked {
                        account: name,
                        detail: status.last_error.unwrap_or_else(|| "invalid_grant".into()),
                        fix: crate::hints::revoked_fix(&account),
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
                let hint = error.hint(account.provider.family).unwrap_or("");
                if revoked {
                    metrics.token_refresh(&name, "invalid_grant");
                    let fix = crate::hints::revoked_fix(&account);
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
                        fix: crate::hints::revoked_fix(&account),
                    },
                    ProviderError::Unreachable(detail) => TokenError::Unreachable {
                        account: name,
                        detail,
                    },
                    error => TokenError::Refused {
                        account: name,
                        error,
                        family: account.provider.family,
                    },
                })
            }
        }
    }

    /// A failed token request that is not a revoked grant: once they have failed for
    /// `alert_after_secs`, `refresh_failing` fires.
    fn failing(&self, slot: &AccountTokens, detail: &str, hint: &str) {
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
        slot: &AccountTokens,
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
        if set.scope.is_some() {
            grant.scope = set.scope.clone();
        }
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
                let again = crate::hints::command(&format!("authorize {name}"));
                tracing::error!(
                    account = %name,
                    error = %e,
                    "cannot save the new grant to the database; keeping it in memory and retrying every 30 s \
                     (if the relay stops first, run `{again}`)"
                );
                *lock(&slot.unsaved) = Some(grant);
                self.observer.alerts.raise(
                    Event::GrantSaveFailed,
                    &name,
                    &format!("the new grant could not be written to the database ({e})"),
                    &format!(
                        "free space on the disk that holds data_dir (and check its health); the relay keeps the \
                         grant in memory and retries; if it stops before it succeeds, run `{again}`"
                    ),
                );
            }
        }
        tracing::info!(account = %name, rotated, expires_in_secs = lifetime.as_secs(), "access token refreshed");
        Ok(self.cache(slot, set.access_token, lifetime, lifetime))
    }
}
