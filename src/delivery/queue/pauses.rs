//! Why and until when an account's deliveries wait: the provider throttling it, the upstream or
//! the token failing (with the backoff's step), or its connections all busy.
//!
//! Behind a small interface: [`LocalPauses`] in this relay's memory; [`SharedPauses`] when
//! several relays share a store (one relay's `432 4.3.2` pausing the account on all of them),
//! without the workers and views changing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::Shared;
use crate::util::clock::SharedClock;
use crate::util::sync::lock;

/// Why an account waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The provider is throttling it (rate, connections, quota).
    Throttled,
    /// The upstream is unreachable or the token does not work.
    Trouble,
    /// Its connections are all in use.
    Busy,
}

#[derive(Debug, Clone)]
pub struct Pause {
    pub until: Instant,
    pub why: String,
    pub hold: Hold,
}

pub trait Pauses: Send + Sync {
    /// The account's pause in force at `now`, if any.
    fn current(&self, account: &str, now: Instant) -> Option<Pause>;

    /// Pauses the account; the longest pause wins (a quota's hour is not cut short by a busy
    /// second). Returns the pause in force afterwards.
    fn pause(&self, account: &str, pause: Pause) -> Pause;

    /// One more failure of the account (connection, token), unless one in force already holds it
    /// (workers failing side by side are one failure): the backoff's step, from 1.
    fn trouble(&self, account: &str, now: Instant) -> u32;

    /// A transfer got through: the trouble count starts again.
    fn recovered(&self, account: &str);

    /// Lifts the pause (`queue retry`, a new grant); `keep_throttling`: a provider's throttling
    /// stays.
    fn lift(&self, account: &str, keep_throttling: bool);

    /// Lifts what holds the account on this relay only (a start: what held it before the
    /// restart is tried again at once; other relays' throttling stays theirs).
    fn forget(&self, account: &str) {
        self.lift(account, false)
    }

    /// Notified when another relay lifted a pause here (workers sleeping out a pause wake).
    fn lifted(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
}

#[derive(Default)]
struct Account {
    pause: Option<Pause>,
    trouble: u32,
}

/// The pauses of this relay's accounts, in memory.
#[derive(Default)]
pub struct LocalPauses(Mutex<HashMap<String, Account>>);

impl Pauses for LocalPauses {
    fn current(&self, account: &str, now: Instant) -> Option<Pause> {
        let mut all = lock(&self.0);
        let a = all.get_mut(account)?;
        if a.pause.as_ref().is_some_and(|p| p.until <= now) {
            a.pause = None;
        }
        a.pause.clone()
    }

    fn pause(&self, account: &str, pause: Pause) -> Pause {
        let mut all = lock(&self.0);
        let a = all.entry(account.to_string()).or_default();
        if a.pause.as_ref().is_none_or(|p| p.until < pause.until) {
            a.pause = Some(pause);
        }
        a.pause.clone().expect("set above")
    }

    fn trouble(&self, account: &str, now: Instant) -> u32 {
        let mut all = lock(&self.0);
        let a = all.entry(account.to_string()).or_default();
        let held = a
            .pause
            .as_ref()
            .is_some_and(|p| p.hold == Hold::Trouble && p.until > now);
        if !held {
            a.trouble += 1;
        }
        a.trouble.max(1)
    }

    fn recovered(&self, account: &str) {
        if let Some(a) = lock(&self.0).get_mut(account) {
            a.trouble = 0;
        }
    }

    fn lift(&self, account: &str, keep_throttling: bool) {
        if let Some(a) = lock(&self.0).get_mut(account) {
            if !(keep_throttling && a.pause.as_ref().is_some_and(|p| p.hold == Hold::Throttled)) {
                a.pause = None;
            }
            a.trouble = 0;
        }
    }
}

/// Where a shared store keeps an account's throttling pause (`xoauth_rows`, kind `pause`).
const ROW: &str = "pause";

/// A throttling pause as the relays share it: until when (unix seconds) and why.
#[derive(serde::Serialize, serde::Deserialize)]
struct SharedPause {
    until: u64,
    why: String,
}

/// Pauses several relays share: the provider's throttling and quota replies (`Hold::Throttled`)
/// hold the account on every relay (one relay's `432 4.3.2` is the provider's answer to all of
/// them); trouble (an upstream or token failing as seen from here) and busy connections stay
/// this relay's. Kept in memory as [`LocalPauses`]; the shared row and a signal carry a pause
/// or a lift to the others, which read it back ([`SharedPauses::follow`]).
pub struct SharedPauses {
    local: LocalPauses,
    lifted: Arc<tokio::sync::Notify>,
    store: Arc<dyn Shared>,
    clock: SharedClock,
}

impl SharedPauses {
    pub fn new(store: Arc<dyn Shared>, clock: SharedClock) -> Arc<SharedPauses> {
        let pauses = Arc::new(SharedPauses {
            local: LocalPauses::default(),
            lifted: Arc::new(tokio::sync::Notify::new()),
            store,
            clock,
        });
        tokio::spawn(SharedPauses::follow(Arc::downgrade(&pauses)));
        pauses
    }

    /// Applies the pauses and lifts any relay announces, until the pauses are dropped.
    async fn follow(this: Weak<SharedPauses>) {
        let Some(mut signals) = this.upgrade().map(|p| p.store.signals()) else {
            return;
        };
        // The pauses in force when this relay starts (another relay's throttling holds here too).
        if let Some(p) = this.upgrade() {
            if let Ok(rows) = p.store.read_rows(ROW).await {
                for (account, bytes) in rows {
                    p.apply(&account, &bytes);
                }
            }
        }
        loop {
            let (kind, account) = match signals.recv().await {
                Ok(signal) => signal,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            };
            let Some(p) = this.upgrade() else { return };
            match kind.as_str() {
                "pause" => p.read_back(&account).await,
                "lift" => {
                    p.local.lift(&account, false);
                    p.lifted.notify_waiters();
                }
                _ => {}
            }
        }
    }

    async fn read_back(&self, account: &str) {
        if let Ok(Some(bytes)) = self.store.read_row(ROW, account).await {
            self.apply(account, &bytes);
        }
    }

    /// A shared pause row, held here until it ends.
    fn apply(&self, account: &str, bytes: &[u8]) {
        let Ok(shared) = serde_json::from_slice::<SharedPause>(bytes) else {
            return;
        };
        let left = shared.until.saturating_sub(self.clock.unix());
        if left > 0 {
            self.local.pause(
                account,
                Pause {
                    until: self.clock.now() + Duration::from_secs(left),
                    why: shared.why,
                    hold: Hold::Throttled,
                },
            );
        }
    }

    /// Writes the pause (the longest wins, as here) and tells the others; in the background.
    fn share(&self, account: &str, pause: &Pause) {
        let left = pause.until.saturating_duration_since(self.clock.now());
        let until = self.clock.unix() + left.as_secs_f64().ceil() as u64;
        let why = pause.why.clone();
        let (store, account) = (self.store.clone(), account.to_string());
        tokio::spawn(async move {
            let mut change = |old: Option<&[u8]>| {
                let longer = old
                    .and_then(|b| serde_json::from_slice::<SharedPause>(b).ok())
                    .is_some_and(|p| p.until >= until);
                (!longer)
                    .then(|| {
                        serde_json::to_vec(&SharedPause {
                            until,
                            why: why.clone(),
                        })
                        .ok()
                    })
                    .flatten()
            };
            if store.update_row(ROW, &account, &mut change).await.is_ok() {
                store.signal("pause", &account).await;
            }
        });
    }

    /// Clears the shared pause (`queue retry`, a new grant) and tells the others.
    fn share_lift(&self, account: &str) {
        let (store, account) = (self.store.clone(), account.to_string());
        tokio::spawn(async move {
            let mut change = |old: Option<&[u8]>| {
                old?;
                serde_json::to_vec(&SharedPause {
                    until: 0,
                    why: String::new(),
                })
                .ok()
            };
            if store.update_row(ROW, &account, &mut change).await.is_ok() {
                store.signal("lift", &account).await;
            }
        });
    }
}

impl Pauses for SharedPauses {
    fn current(&self, account: &str, now: Instant) -> Option<Pause> {
        self.local.current(account, now)
    }

    fn pause(&self, account: &str, pause: Pause) -> Pause {
        if pause.hold == Hold::Throttled {
            self.share(account, &pause);
        }
        self.local.pause(account, pause)
    }

    fn trouble(&self, account: &str, now: Instant) -> u32 {
        self.local.trouble(account, now)
    }

    fn recovered(&self, account: &str) {
        self.local.recovered(account)
    }

    fn lift(&self, account: &str, keep_throttling: bool) {
        self.local.lift(account, keep_throttling);
        if !keep_throttling {
            self.share_lift(account);
        }
    }

    // The relays' throttling (read from the shared rows at start) stays.
    fn forget(&self, account: &str) {
        self.local.lift(account, true)
    }

    fn lifted(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.lifted.clone())
    }
}
