//! Usage per account ("monitor token usage"): messages, recipients, bytes and failed logins in
//! hourly buckets, and the source addresses that logged in, so `accounts --usage` can show the last
//! 24 hours and 7 days and an operator can spot a login used from somewhere new.
//!
//! Kept in memory (a few hundred bytes per account plus one entry per distinct source address,
//! bounded) and written with the relay's other state every 30 s and at shutdown, so the figures
//! span restarts and upgrades: usage is watched over weeks, not since the last start.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use crate::util::clock::SharedClock;
use crate::util::sync::lock;

const HOUR: u64 = 3600;
const WEEK_HOURS: u64 = 7 * 24;
/// Distinct source addresses remembered per account; the least recently seen goes first.
const MAX_SOURCES: usize = 4096;

#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
struct Counts {
    messages: u64,
    recipients: u64,
    bytes: u64,
    failed_logins: u64,
}

#[derive(Default, Clone, Serialize, Deserialize)]
struct AccountUsage {
    /// (hour since the epoch, counts), oldest first, at most a week.
    hours: VecDeque<(u64, Counts)>,
    /// Source address → last successful login (unix seconds).
    sources: HashMap<IpAddr, u64>,
    last_source: Option<IpAddr>,
}

impl AccountUsage {
    fn hour(&mut self, now: u64) -> &mut Counts {
        let hour = now / HOUR;
        while self
            .hours
            .front()
            .is_some_and(|(h, _)| *h + WEEK_HOURS <= hour)
        {
            self.hours.pop_front();
        }
        if self.hours.back().is_none_or(|(h, _)| *h != hour) {
            self.hours.push_back((hour, Counts::default()));
        }
        &mut self.hours.back_mut().expect("just pushed").1
    }

    fn window(&self, now: u64, hours: u64) -> Window {
        let from = (now / HOUR + 1).saturating_sub(hours);
        let mut w = Window::default();
        for (_, c) in self.hours.iter().filter(|(h, _)| *h >= from) {
            w.messages += c.messages;
            w.recipients += c.recipients;
            w.bytes += c.bytes;
            w.failed_logins += c.failed_logins;
        }
        let since = now.saturating_sub(hours * HOUR);
        w.sources = self.sources.values().filter(|t| **t > since).count() as u64;
        w
    }
}

/// Figures for one rolling window.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Window {
    pub messages: u64,
    pub recipients: u64,
    pub bytes: u64,
    pub failed_logins: u64,
    /// Distinct addresses that logged in successfully.
    pub sources: u64,
}

/// `accounts --usage` for one account.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub last_24h: Window,
    pub last_7d: Window,
    pub last_source: Option<String>,
}

/// One account's usage, held by a session.
pub struct AccountHandle {
    entry: Arc<Mutex<AccountUsage>>,
    clock: SharedClock,
}

impl AccountHandle {
    fn with(&self, f: impl FnOnce(&mut AccountUsage, u64)) {
        let now = self.clock.unix();
        f(&mut lock(&self.entry), now);
    }

    pub fn message(&self, recipients: u64, bytes: u64) {
        self.with(|u, now| {
            let c = u.hour(now);
            c.messages += 1;
            c.recipients += recipients;
            c.bytes += bytes;
        });
    }
}

pub struct Usage {
    clock: SharedClock,
    accounts: RwLock<HashMap<String, Arc<Mutex<AccountUsage>>>>,
}

impl Usage {
    pub fn new(clock: SharedClock) -> Usage {
        Usage {
            clock,
            accounts: RwLock::new(HashMap::new()),
        }
    }

    fn with(&self, account: &str, f: impl FnOnce(&mut AccountUsage, u64)) {
        self.account(account).with(f);
    }

    /// The entry of `account`, for a session to keep: counting its messages then takes only the
    /// account's own lock.
    pub fn account(&self, account: &str) -> AccountHandle {
        AccountHandle {
            entry: self.entry(account),
            clock: self.clock.clone(),
        }
    }

    fn entry(&self, account: &str) -> Arc<Mutex<AccountUsage>> {
        let known = self
            .accounts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(account)
            .cloned();
        match known {
            Some(e) => e,
            None => self
                .accounts
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .entry(account.to_string())
                .or_default()
                .clone(),
        }
    }

    pub fn login(&self, account: &str, source: IpAddr) {
        self.with(account, |u, now| {
            if u.sources.len() >= MAX_SOURCES && !u.sources.contains_key(&source) {
                if let Some(oldest) = u.sources.iter().min_by_key(|(_, t)| **t).map(|(a, _)| *a) {
                    u.sources.remove(&oldest);
                }
            }
            u.sources.insert(source, now);
            u.last_source = Some(source);
        });
    }

    pub fn failed_login(&self, account: &str) {
        self.with(account, |u, now| u.hour(now).failed_logins += 1);
    }

    /// Everything counted, for [`Usage::restore`] in the next run.
    pub fn snapshot(&self) -> Vec<u8> {
        let accounts = self.accounts.read().unwrap_or_else(|e| e.into_inner());
        let copy: HashMap<&str, AccountUsage> = accounts
            .iter()
            .map(|(name, e)| (name.as_str(), lock(e).clone()))
            .collect();
        serde_json::to_vec(&copy).unwrap_or_default()
    }

    /// Takes back what [`Usage::snapshot`] wrote (at start-up); an unreadable file is forgotten.
    pub fn restore(&self, bytes: &[u8]) {
        let Ok(saved) = serde_json::from_slice::<HashMap<String, AccountUsage>>(bytes) else {
            tracing::warn!("the saved usage figures cannot be read; counting afresh");
            return;
        };
        for (name, usage) in saved {
            *lock(&self.entry(&name)) = usage;
        }
    }

    /// [`Usage::report`] with the figures of other relays sharing a store added: their
    /// snapshots as they last wrote them (every 30 s).
    pub fn report_with(&self, account: &str, others: &[Vec<u8>]) -> Report {
        let mut merged = lock(&self.entry(account)).clone();
        for bytes in others {
            let Ok(mut all) = serde_json::from_slice::<HashMap<String, AccountUsage>>(bytes) else {
                continue;
            };
            let Some(theirs) = all.remove(account) else {
                continue;
            };
            for (hour, c) in theirs.hours {
                match merged.hours.iter_mut().find(|(h, _)| *h == hour) {
                    Some((_, mine)) => {
                        mine.messages += c.messages;
                        mine.recipients += c.recipients;
                        mine.bytes += c.bytes;
                        mine.failed_logins += c.failed_logins;
                    }
                    None => merged.hours.push_back((hour, c)),
                }
            }
            for (ip, seen) in theirs.sources {
                let t = merged.sources.entry(ip).or_insert(seen);
                *t = (*t).max(seen);
            }
        }
        merged.last_source = merged
            .sources
            .iter()
            .max_by_key(|(_, t)| **t)
            .map(|(ip, _)| *ip)
            .or(merged.last_source);
        let now = self.clock.unix();
        merged.sources.retain(|_, t| *t + WEEK_HOURS * HOUR > now);
        Report {
            last_24h: merged.window(now, 24),
            last_7d: merged.window(now, WEEK_HOURS),
            last_source: merged.last_source.map(|a| a.to_string()),
        }
    }

    pub fn report(&self, account: &str) -> Report {
        let mut report = Report::default();
        self.with(account, |u, now| {
            u.sources.retain(|_, t| *t + WEEK_HOURS * HOUR > now);
            report = Report {
                last_24h: u.window(now, 24),
                last_7d: u.window(now, WEEK_HOURS),
                last_source: u.last_source.map(|a| a.to_string()),
            };
        });
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::clock::ManualClock;

    #[test]
    fn windows_roll() {
        let clock = ManualClock::new(1_000_000 * HOUR);
        let usage = Usage::new(clock.clone());
        usage.account("news").message(3, 100);
        usage.login("news", "192.0.2.1".parse().unwrap());
        clock.advance(std::time::Duration::from_secs(2 * 86400));
        usage.account("news").message(1, 10);
        usage.failed_login("news");
        usage.login("news", "192.0.2.2".parse().unwrap());
        let r = usage.report("news");
        assert_eq!(
            (r.last_24h.messages, r.last_24h.recipients, r.last_24h.bytes),
            (1, 1, 10)
        );
        assert_eq!((r.last_7d.messages, r.last_7d.bytes), (2, 110));
        assert_eq!((r.last_24h.sources, r.last_7d.sources), (1, 2));
        assert_eq!(r.last_24h.failed_logins, 1);
        assert_eq!(r.last_source.as_deref(), Some("192.0.2.2"));
        clock.advance(std::time::Duration::from_secs(8 * 86400));
        assert_eq!(usage.report("news").last_7d.messages, 0);
    }

    #[test]
    fn the_figures_survive_a_restart() {
        let clock = ManualClock::new(1_000_000 * HOUR);
        let usage = Usage::new(clock.clone());
        usage.account("news").message(3, 100);
        usage.failed_login("news");
        usage.login("news", "192.0.2.1".parse().unwrap());
        let saved = usage.snapshot();
        clock.advance(std::time::Duration::from_secs(HOUR));
        let next = Usage::new(clock.clone());
        next.restore(&saved);
        next.account("news").message(1, 10);
        let r = next.report("news");
        assert_eq!((r.last_24h.messages, r.last_24h.bytes), (2, 110));
        assert_eq!((r.last_24h.failed_logins, r.last_24h.sources), (1, 1));
        assert_eq!(r.last_source.as_deref(), Some("192.0.2.1"));
        // A damaged file costs the figures, not the start.
        let fresh = Usage::new(clock);
        fresh.restore(b"{not json");
        assert_eq!(fresh.report("news").last_7d.messages, 0);
    }
}
