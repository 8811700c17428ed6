//! The connection slots of each account: how many upstream connections (or API requests) it
//! holds, against its `max_upstream_connections`. [`LocalSlots`] counts this relay's; with a
//! store several relays share, [`SharedSlots`] holds each slot as a lease row, so the cap is the
//! account's across relays (Exchange Online answers a fourth connection with `432 4.3.2`,
//! whichever relay opens it), and a dead relay's slots come free after `lease_secs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::store::Shared;
use crate::util::sync::lock;
use crate::util::BoxFuture;

pub trait Slots: Send + Sync {
    /// Takes a slot for `account` if it holds fewer than `cap`.
    fn acquire<'a>(&'a self, account: &'a str, cap: usize) -> BoxFuture<'a, bool>;
    /// Gives a slot back (its connection is closed).
    fn release(&self, account: &str);
    /// Slots `account` holds now (this relay's).
    fn held(&self, account: &str) -> usize;
    /// How often a caller waiting for a slot looks again: a slot another relay frees wakes no
    /// waiter here. `None`: only a local release frees one.
    fn recheck(&self) -> Option<Duration> {
        None
    }
}

/// Connection slots counted in memory.
#[derive(Default)]
pub struct LocalSlots(Mutex<HashMap<String, usize>>);

impl LocalSlots {
    fn take(&self, account: &str, cap: usize) -> bool {
        let mut held = lock(&self.0);
        let n = held.entry(account.to_string()).or_default();
        if *n >= cap {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives one back; whether there was one.
    fn give(&self, account: &str) -> bool {
        match lock(&self.0).get_mut(account) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

impl Slots for LocalSlots {
    fn acquire<'a>(&'a self, account: &'a str, cap: usize) -> BoxFuture<'a, bool> {
        Box::pin(std::future::ready(self.take(account, cap)))
    }

    fn release(&self, account: &str) {
        self.give(account);
    }

    fn held(&self, account: &str) -> usize {
        lock(&self.0).get(account).copied().unwrap_or(0)
    }
}

/// A waiter looks again this often for a slot another relay freed.
const RECHECK: Duration = Duration::from_millis(100);

/// Slots as lease rows in the shared database; while it is out of reach, this relay's share of
/// the cap (the cap divided by the relays last seen alive), counted here.
pub struct SharedSlots {
    store: Arc<dyn Shared>,
    /// The lease ids this relay holds, per account (renewed every third of a lease).
    leases: Arc<Mutex<HashMap<String, Vec<i64>>>>,
    /// Slots taken while the database was out of reach.
    offline: LocalSlots,
    warned: AtomicBool,
    /// When this relay last asked the others for a slot, per account.
    asked: Mutex<HashMap<String, Instant>>,
    /// The slots the other relays held at the last look, per account (looked at with every
    /// renewal, and at each slot taken).
    others: Arc<Mutex<HashMap<String, usize>>>,
}

/// How often a waiting relay asks the others to give up an idle connection.
const ASK_EVERY: Duration = Duration::from_millis(250);

impl SharedSlots {
    /// At the cap: the others' idle connections give a slot up (at most every [`ASK_EVERY`]).
    async fn ask_others(&self, account: &str) {
        let now = Instant::now();
        {
            let mut asked = lock(&self.asked);
            if asked
                .get(account)
                .is_some_and(|at| now.duration_since(*at) < ASK_EVERY)
            {
                return;
            }
            asked.insert(account.to_string(), now);
        }
        self.store.signal("want", account).await;
    }

    pub fn new(store: Arc<dyn Shared>) -> SharedSlots {
        let leases = Arc::new(Mutex::new(HashMap::new()));
        let others = Arc::new(Mutex::new(HashMap::new()));
        tokio::spawn(renew(
            Arc::downgrade(&leases),
            Arc::downgrade(&others),
            store.clone(),
        ));
        SharedSlots {
            store,
            leases,
            offline: LocalSlots::default(),
            warned: AtomicBool::new(false),
            asked: Mutex::new(HashMap::new()),
            others,
        }
    }
}

impl Slots for SharedSlots {
    fn acquire<'a>(&'a self, account: &'a str, cap: usize) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            match self.store.take_slot(account, cap).await {
                Ok((taken, before)) => {
                    self.warned.store(false, Ordering::Relaxed);
                    {
                        let mut leases = lock(&self.leases);
                        let mine = leases.entry(account.to_string()).or_default();
                        // What the other relays hold, so that a share taken while the database
                        // is away leaves them theirs.
                        lock(&self.others)
                            .insert(account.to_string(), before.saturating_sub(mine.len()));
                        if let Some(id) = taken {
                            mine.push(id);
                            return true;
                        }
                    }
                    self.ask_others(account).await;
                    false
                }
                // A busy pool or a single failed query: wait like at the cap; the local share is
                // for the database out of reach.
                Err(_) if self.store.trouble().is_none() => false,
                Err(e) => {
                    let relays = self.store.relays_seen();
                    if !self.warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(account, error = %e, relays, "the database is out of reach: upstream connections limited to this relay's share of max_upstream_connections");
                    }
                    // A share of the cap, and never more than the others left free when last
                    // seen: their connections stay open through the outage too.
                    let others = lock(&self.others).get(account).copied().unwrap_or(0);
                    let share = (cap / relays).max(1).min(cap.saturating_sub(others));
                    self.held(account) < share && self.offline.take(account, share)
                }
            }
        })
    }

    fn release(&self, account: &str) {
        if self.offline.give(account) {
            return;
        }
        let id = lock(&self.leases).get_mut(account).and_then(Vec::pop);
        if let Some(id) = id {
            let store = self.store.clone();
            // Tried a few times; a row whose release still fails is no longer renewed, and runs
            // out after lease_secs.
            tokio::spawn(async move {
                let mut wait = Duration::from_millis(200);
                for _ in 0..5 {
                    if store.free_slot(id).await.is_ok() {
                        return;
                    }
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            });
        }
    }

    fn held(&self, account: &str) -> usize {
        lock(&self.leases).get(account).map_or(0, Vec::len) + self.offline.held(account)
    }

    fn recheck(&self) -> Option<Duration> {
        Some(RECHECK)
    }
}

/// Renews the slots this relay holds every third of a lease, and looks at what the other relays
/// hold, until the slots are dropped.
async fn renew(
    leases: std::sync::Weak<Mutex<HashMap<String, Vec<i64>>>>,
    others: std::sync::Weak<Mutex<HashMap<String, usize>>>,
    store: Arc<dyn Shared>,
) {
    let mut every = tokio::time::interval(store.lease_time() / 3);
    every.tick().await;
    loop {
        every.tick().await;
        let Some(leases) = leases.upgrade() else {
            return;
        };
        let ids: Vec<i64> = lock(&leases).values().flatten().copied().collect();
        drop(leases);
        if let Err(e) = store.renew_slots(ids).await {
            tracing::debug!(error = %e, "cannot renew connection slots");
        }
        if let (Ok(held), Some(others)) = (store.slots_of_others().await, others.upgrade()) {
            *lock(&others) = held.into_iter().collect();
        }
    }
}
