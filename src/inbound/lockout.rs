//! Brute force: an address that keeps failing logins is shut out for a while.
//!
//! Failed logins (wrong password or unknown login, never grant trouble) are counted per source in a
//! sliding window of [`WINDOW`]. The failure that reaches `[limits] auth_failures_per_ip` still gets
//! its `535`; from then on the address gets `421 4.7.0` at the greeting and at AUTH for
//! `auth_lockout_secs`. A successful login does not wipe the count: a guesser who also knows one
//! password must not reset it. Loopback is not exempt (a local web app can be the attacker's proxy).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Failures older than this no longer count.
pub const WINDOW: Duration = Duration::from_secs(600);
/// Addresses tracked at most; beyond, the quietest are forgotten (a flood of sources must not
/// grow memory without bound).
const MAX_TRACKED: usize = 100_000;

/// The address a limit applies to: IPv4-mapped IPv6 as IPv4, IPv6 per /64 (the smallest block a
/// host is given).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

#[derive(Default)]
struct Source {
    failures: VecDeque<Instant>,
    locked_until: Option<Instant>,
}

pub struct Lockout {
    /// Both follow a reload.
    limit: AtomicUsize,
    lockout_ms: AtomicU64,
    sources: Mutex<HashMap<IpAddr, Source>>,
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
        Lockout {
            limit: AtomicUsize::new(limit),
            lockout_ms: AtomicU64::new(lockout.as_millis() as u64),
            sources: Mutex::new(HashMap::new()),
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

    fn sources(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Source>> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_locked(&self, ip: IpAddr, now: Instant) -> bool {
        self.limit() > 0
            && self
                .sources()
                .get(&source_key(ip))
                .and_then(|s| s.locked_until)
                .is_some_and(|until| until > now)
    }

    pub fn failed(&self, ip: IpAddr, now: Instant) -> Failure {
        if self.limit() == 0 {
            return Failure::Counted;
        }
        let mut sources = self.sources();
        if sources.len() >= MAX_TRACKED {
            sources.retain(|_, s| {
                s.locked_until.is_some_and(|u| u > now)
                    || s.failures.back().is_some_and(|t| *t + WINDOW > now)
            });
        }
        let s = sources.entry(source_key(ip)).or_default();
        while s.failures.front().is_some_and(|t| *t + WINDOW <= now) {
            s.failures.pop_front();
        }
        s.failures.push_back(now);
        if s.failures.len() >= self.limit() && s.locked_until.is_none_or(|u| u <= now) {
            let lockout = Duration::from_millis(self.lockout_ms.load(Ordering::Relaxed));
            s.locked_until = Some(now + lockout);
            s.failures.clear();
            return Failure::LockedOut;
        }
        Failure::Counted
    }

    /// Forgets the failures and lockout of `ip` (its source key), or of every address; returns
    /// how many addresses were locked out.
    pub fn unlock(&self, ip: Option<IpAddr>, now: Instant) -> usize {
        let locked = |s: &Source| s.locked_until.is_some_and(|u| u > now);
        let mut sources = self.sources();
        match ip {
            Some(ip) => sources
                .remove(&source_key(ip))
                .map_or(0, |s| usize::from(locked(&s))),
            None => {
                let n = sources.values().filter(|s| locked(s)).count();
                sources.clear();
                n
            }
        }
    }

    /// Forgets addresses with nothing left to remember (run periodically).
    pub fn prune(&self, now: Instant) {
        self.sources().retain(|_, s| {
            s.locked_until.is_some_and(|u| u > now)
                || s.failures.back().is_some_and(|t| *t + WINDOW > now)
        });
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
        assert!(lockout.sources().is_empty());
    }
}
