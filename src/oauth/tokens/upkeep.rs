//! Keeping grants alive without a mailer: tokens of accounts in use refreshed as they enter their
//! margin, a failing endpoint asked again (and once more at the alert threshold), quiet grants
//! refreshed after `keepalive_days`, grants that could not be saved saved.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{AccountTokens, TokenManager, EXPIRING, FAILURE_BACKOFF, RECENT_USE, UPKEEP_AT_LEAST};
use crate::config::{Family, GrantKind};
use crate::observe::Event;
use crate::util::sync::lock;

impl TokenManager {
    /// [`TokenManager::keep_alive`] in the background (the app's hourly upkeep), so that no
    /// token request holds up the rest of the upkeep or shutdown.
    pub fn keep_alive_behind(self: &Arc<Self>, idle: Duration) {
        let this = self.clone();
        self.tasks.spawn(async move { this.keep_alive(idle).await });
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

    fn recently_wanted(&self, slot: &AccountTokens, now: Instant) -> bool {
        lock(&slot.wanted).is_some_and(|at| now.saturating_duration_since(at) < RECENT_USE)
    }

    /// When the failures of the outage in progress reach `alert_after_secs`.
    fn alert_due(&self, slot: &AccountTokens) -> Option<Instant> {
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
                let again = crate::hints::grant_command(&account);
                let hint = match account.provider.family {
                    Family::Google => format!(
                        "a Google app in Testing status gives 7-day grants: publish the app (OAuth consent \
                         screen), then run `{again}`"
                    ),
                    _ => format!("run `{again}` before then"),
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
            let result = self.obtain(slot, false, None).await;
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
                    &format!("run `{}`", crate::hints::grant_command(&account)),
                );
            }
        }
    }
}
