//! The queue in memory: each account's messages, which of them are ready and when, and why the
//! account waits. The spool is the truth on disk; this is what the workers schedule from.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::model::{Envelope, Progress, RcptStatus};
use crate::config::Account;

pub(super) struct Entry {
    pub env: Arc<Envelope>,
    pub progress: Progress,
    pub due: Instant,
    pub expires: Instant,
    /// A worker has it.
    pub busy: bool,
    /// Recipients tried in the current round (a round ends when every pending one has been tried).
    pub tried: Vec<bool>,
    /// Attempts in a row on which a recipient drew a throttling reply.
    pub strikes: u32,
}

impl Entry {
    pub fn pending(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.env.recipients.len())
            .filter(|i| self.progress.recipients[*i].status == RcptStatus::Pending)
    }

    /// Nothing left to do for it: every recipient decided and every bounce queued.
    pub fn finished(&self) -> bool {
        self.pending().next().is_none() && self.progress.unnotified().next().is_none()
    }
}

#[derive(Default)]
pub(super) struct Inner {
    /// By id, which is time-ordered: oldest (and first to expire) first.
    pub messages: BTreeMap<String, Entry>,
    /// The messages no worker has and that can be sent, by when they are due: the next job is
    /// the first.
    pub ready: BTreeSet<(Instant, String)>,
}

impl Inner {
    pub fn insert(&mut self, e: Entry) {
        if e.env.damaged.is_none() {
            self.ready.insert((e.due, e.env.id.clone()));
        }
        self.messages.insert(e.env.id.clone(), e);
    }

    pub fn remove(&mut self, id: &str) -> Option<Entry> {
        let e = self.messages.remove(id)?;
        self.ready.remove(&(e.due, e.env.id.clone()));
        Some(e)
    }

    pub fn set_due(&mut self, id: &str, due: Instant) {
        if let Some(e) = self.messages.get_mut(id) {
            if !e.busy && e.env.damaged.is_none() {
                self.ready.remove(&(e.due, e.env.id.clone()));
                self.ready.insert((due, e.env.id.clone()));
            }
            e.due = due;
        }
    }

    /// A worker takes it.
    pub fn take(&mut self, id: &str) -> Option<&mut Entry> {
        let e = self.messages.get_mut(id)?;
        e.busy = true;
        self.ready.remove(&(e.due, e.env.id.clone()));
        Some(e)
    }

    /// Its worker is done with it for now.
    pub fn release(&mut self, id: &str) {
        if let Some(e) = self.messages.get_mut(id) {
            if e.busy {
                e.busy = false;
                if e.env.damaged.is_none() {
                    self.ready.insert((e.due, e.env.id.clone()));
                }
            }
        }
    }
}

pub(super) struct AccountQueue {
    pub name: String,
    /// Swapped by a reload.
    pub account: arc_swap::ArcSwap<Account>,
    /// The provider and mailbox every message it queues records (shared, not copied per message).
    pub origin: arc_swap::ArcSwap<(Arc<str>, Arc<str>)>,
    /// Why nothing of it can be sent at all (its account and provider are gone from the config):
    /// listed and alerted, never attempted, until deleted.
    pub held: arc_swap::ArcSwapOption<String>,
    pub inner: Mutex<Inner>,
    /// A message arrived, a pause was lifted, a retry was asked for.
    pub wake: Notify,
    /// The lanes (0 .. `max_upstream_connections`) that have a worker: a reload that raises the
    /// cap starts workers for the empty ones, one that lowers it lets the workers above it go.
    pub lanes: Mutex<BTreeSet<usize>>,
}

impl AccountQueue {
    pub fn new(account: &Arc<Account>) -> AccountQueue {
        AccountQueue {
            name: account.name.clone(),
            account: arc_swap::ArcSwap::new(account.clone()),
            origin: arc_swap::ArcSwap::from_pointee(origin(account)),
            held: arc_swap::ArcSwapOption::empty(),
            inner: Mutex::new(Inner::default()),
            wake: Notify::new(),
            lanes: Mutex::new(Default::default()),
        }
    }
}

/// What a queued message records of its account's provider and mailbox.
pub(super) fn origin(account: &Account) -> (Arc<str>, Arc<str>) {
    (
        Arc::from(account.provider.name.as_str()),
        Arc::from(account.mailbox.as_str()),
    )
}

/// One worker per upstream connection the account may open.
pub(super) fn worker_count(account: &Account) -> usize {
    account.max_upstream_connections.max(1)
}
