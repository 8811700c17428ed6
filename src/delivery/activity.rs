//! When each account last delivered mail. Kept in memory, because the message path must not touch
//! the disk (a write per message made every session of an account contend on one record), and
//! written to the store at most every [`PERSIST_EVERY`] and at shutdown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Account;
use crate::store::Store;
use crate::util::keyed::Keyed;

pub const PERSIST_EVERY: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Entry {
    /// Unix seconds of the last delivery; 0 for none since start.
    last_use: AtomicU64,
    persisted: AtomicU64,
}

#[derive(Default)]
pub struct Activity {
    accounts: Keyed<Entry>,
}

impl Activity {
    pub fn new(accounts: &[Arc<Account>]) -> Activity {
        Activity {
            accounts: Keyed::new(accounts.iter().map(|a| (a.name.clone(), Entry::default()))),
        }
    }

    /// Accounts a reloaded config added.
    pub fn reconfigure(&self, accounts: &[Arc<Account>]) {
        for a in accounts {
            self.accounts.insert_missing(&a.name, Entry::default);
        }
    }

    /// Records a delivery: one atomic store, no lock shared across accounts.
    pub fn touch(&self, account: &str, now: u64) {
        self.accounts
            .with(account, |e| e.last_use.fetch_max(now, Ordering::Relaxed));
    }

    /// The last delivery since this process started, if any.
    pub fn last_use(&self, account: &str) -> Option<u64> {
        self.accounts
            .with(account, |e| e.last_use.load(Ordering::Relaxed))
            .filter(|t| *t > 0)
    }

    /// Writes what changed since the last call to the store, durably.
    pub async fn persist(&self, store: &Store) {
        let mut changed = false;
        for (name, e) in self.accounts.all().iter() {
            let t = e.last_use.load(Ordering::Relaxed);
            if t > e.persisted.swap(t, Ordering::Relaxed) {
                store.update_status(name, |s| s.last_use = s.last_use.max(Some(t)));
                changed = true;
            }
        }
        if changed {
            if let Err(e) = store.flush().await {
                tracing::warn!(error = %e, "cannot write last-use times to the database");
            }
        }
    }
}
