//! Why and until when an account's deliveries wait: the provider throttling it, the upstream or
//! the token failing (with the backoff's step), or its connections all busy.
//!
//! Behind a small interface, in this relay's memory today, so that a store shared by several
//! relays can take it over (one relay's `432 4.3.2` pausing the account on all of them) without
//! the workers and views changing.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::time::Instant;

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
