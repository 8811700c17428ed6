//! Brute force: an address that keeps failing logins is shut out for a while.
//!
//! Failed logins (wrong password or unknown login, never grant trouble) are counted per source in a
//! sliding window of [`WINDOW`]. The failure that reaches `[limits] auth_failures_per_ip` still gets
//! its `535`; from then on the address gets `421 4.7.0` at the greeting and at AUTH for
//! `auth_lockout_secs`. A successful login does not wipe the count: a guesser who also knows one
//! password must not reset it. Loopback is not exempt (a local web app can be the attacker's proxy).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::util::sync::lock;
use tokio::time::Instant;

/// Failures older than this no longer count.
pub const WINDOW: Duration = Duration::from_secs(600);
/// Addresses tracked at most; beyond, the one with the least left to remember is forgotten (a
/// flood of sources must not grow memory without bound).
const MAX_TRACKED: usize = 100_000;

/// The address a limit applies to: IPv4-mapped IPv6 as IPv4, IPv6 per /64 (the smallest block a
/// host is given).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

struct Source {
    failures: VecDeque<Instant>,
    locked_until: Option<Instant>,
    /// When there is nothing left to remember of it: its key in [`Table::by_expiry`].
    expires: Instant,
}

impl Source {
    fn expiry(&self) -> Instant {
        let window = self.failures.back().map(|t| *t + WINDOW);
        match (window, self.locked_until) {
            (Some(a), Some(b)) => a.max(b),
            (a, b) => a.or(b).unwrap_or(self.expires),
        }
    }
}

/// The sources, and the same keys ordered by when they expire: every update is O(log n), and
/// the bound evicts the source with the least left to remember.
struct Table {
    sources: HashMap<IpAddr, Source>,
    by_expiry: BTreeSet<(Instant, IpAddr)>,
    capacity: usize,
}

impl Table {
    /// Drops what has expired by `now`, oldest first.
    fn expire(&mut self, now: Instant) {
        while let Some(&(at, key)) = self.by_expiry.first() {
            if at > now {
                break;
            }
            self.by_expiry.pop_first();
            self.sources.remove(&key);
        }
    }

    /// Re-files `key` after its source changed.
    fn refile(&mut self, key: IpAddr) {
        let Some(s) = self.sources.get_mut(&key) else {
            return;
        };
        let expires = s.expiry();
        self.by_expiry.remove(&(s.expires, key));
        s.expires = expires;
        self.by_expiry.insert((expires, key));
    }

    fn remove(&mut self, key: IpAddr) -> Option<Source> {
        let s = self.sources.remove(&key)?;
        self.by_expiry.remove(&(s.expires, key));
        Some(s)
    }
}

pub struct Lockout {
    /// Both follow a reload.
    limit: AtomicUsize,
    lockout_ms: AtomicU64,
    table: Mutex<Table>,
}

/// What a failed login led to.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    Counted,
    /// This failure reached the limit: the address is locked out from now on.
    LockedOut,
}

impl Lockout {
    /// `limit` 0 turns it off.
    pub fn new(limit: usize, lockout: Duration) -> Lockout {
        Lockout::bounded(limit, lockout, MAX_TRACKED)
    }

    fn bounded(limit: usize, lockout: Duration, capacity: usize) -> Lockout {
        Lockout {
            limit: AtomicUsize::new(limit),
            lockout_ms: AtomicU64::new(lockout.as_millis() as u64),
            table: Mutex::new(Table {
                sources: HashMap::new(),
                by_expiry: BTreeSet::new(),
                capacity,
            }),
        }
    }

    /// New thresholds (a reload); addresses already locked out stay so until their time is up.
    pub fn set(&self, limit: usize, lockout: Duration) {
        self.limit.store(limit, Ordering::Relaxed);
        self.lockout_ms
            .store(lockout.as_millis() as u64, Ordering::Relaxed);
    }

    fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        lock(&self.table)
    }

    pub fn is_locked(&self, ip: IpAddr, now: Instant) -> bool {
        self.limit() > 0
            && self
                .table()
                .sources
                .get(&source_key(ip))
                .and_then(|s| s.locked_until)
                .is_some_and(|until| until > now)
    }

    pub fn failed(&self, ip: IpAddr, now: Instant) -> Failure {
        if self.limit() == 0 {
            return Failure::Counted;
        }
        let lockout = Duration::from_millis(self.lockout_ms.load(Ordering::Relaxed));
        let mut table = self.table();
        table.expire(now);
        let key = source_key(ip);
        let s = table.sources.entry(key).or_insert(Source {
            failures: VecDeque::new(),
            locked_until: None,
            expires: now,
        });
        while s.failures.front().is_some_and(|t| *t + WINDOW <= now) {
            s.failures.pop_front();
        }
        s.failures.push_back(now);
        let mut outcome = Failure::Counted;
        if s.failures.len() >= self.limit() && s.locked_until.is_none_or(|u| u <= now) {
            s.locked_until = Some(now + lockout);
            s.failures.clear();
            outcome = Failure::LockedOut;
        }
        table.refile(key);
        while table.sources.len() > table.capacity {
            let Some((_, oldest)) = table.by_expiry.pop_first() else {
                break;
            };
            table.sources.remove(&oldest);
        }
        outcome
    }

    /// Forgets the failures and lockout of `ip` (its source key), or of every address; returns
    /// how many addresses were locked out.
    pub fn unlock(&self, ip: Option<IpAddr>, now: Instant) -> usize {
        let locked = |s: &Source| s.locked_until.is_some_and(|u| u > now);
        let mut table = self.table();
        match ip {
            Some(ip) => table
                .remove(source_key(ip))
                .map_or(0, |s| usize::from(locked(&s))),
            None => {
                let n = table.sources.values().filter(|s| locked(s)).count();
                table.sources.clear();
                table.by_expiry.clear();
                n
            }
        }
    }

    /// Forgets addresses with nothing left to remember (run periodically).
    pub fn prune(&self, now: Instant) {
        self.table().expire(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlock_lifts_one_address_or_all() {
        let lockout = Lockout::new(1, Duration::from_secs(600));
        let now = Instant::now();
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.7".parse().unwrap(), "192.0.2.8".parse().unwrap());
        lockout.failed(a, now);
        lockout.failed(b, now);
        assert_eq!(lockout.unlock(Some(a), now), 1);
        assert!(!lockout.is_locked(a, now) && lockout.is_locked(b, now));
        assert_eq!(lockout.unlock(Some(a), now), 0);
        assert_eq!(lockout.unlock(None, now), 1);
        assert!(!lockout.is_locked(b, now));
    }

    #[test]
    fn the_tenth_failure_locks_the_address_out_and_not_its_neighbours() {
        let lockout = Lockout::new(10, Duration::from_secs(600));
        let now = Instant::now();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..9 {
            assert_eq!(lockout.failed(ip, now), Failure::Counted);
        }
        assert!(!lockout.is_locked(ip, now));
        assert_eq!(lockout.failed(ip, now), Failure::LockedOut);
        assert!(lockout.is_locked(ip, now));
        assert!(!lockout.is_locked("192.0.2.8".parse().unwrap(), now));
        // The same host over IPv4-mapped IPv6.
        assert!(lockout.is_locked("::ffff:192.0.2.7".parse().unwrap(), now));
        assert!(!lockout.is_locked(ip, now + Duration::from_secs(600)));
    }

    #[test]
    fn failures_older_than_the_window_do_not_count() {
        let lockout = Lockout::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        lockout.failed(ip, t0);
        lockout.failed(ip, t0 + Duration::from_secs(10));
        assert_eq!(
            lockout.failed(ip, t0 + WINDOW + Duration::from_secs(1)),
            Failure::Counted
        );
        // Another address in the same /64 is the same source.
        assert_eq!(
            lockout.failed(
                "2001:db8::2".parse().unwrap(),
                t0 + WINDOW + Duration::from_secs(2)
            ),
            Failure::LockedOut
        );
        lockout.prune(t0 + WINDOW * 3);
        assert!(lockout.table().sources.is_empty());
    }

    #[test]
    fn the_table_is_bounded_and_a_flood_evicts_what_expires_first() {
        let lockout = Lockout::bounded(2, Duration::from_secs(600), 100);
        let t0 = Instant::now();
        let attacker: IpAddr = "198.51.100.1".parse().unwrap();
        lockout.failed(attacker, t0);
        assert_eq!(lockout.failed(attacker, t0), Failure::LockedOut);
        // A flood of sources, one failure each, a minute later.
        for i in 0..1000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            lockout.failed(ip, t0 + Duration::from_secs(60));
            assert!(lockout.table().sources.len() <= 100);
        }
        let table = lockout.table();
        assert_eq!(table.sources.len(), 100);
        assert_eq!(table.by_expiry.len(), 100);
    }
}
