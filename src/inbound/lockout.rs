//! Brute force: an address that keeps failing logins is shut out for a while.
//!
//! Failed logins (wrong password or unknown login, never grant trouble) are counted in a sliding
//! window of [`WINDOW`] twice: per source address and login (`[limits] auth_failures_per_login`),
//! and per source address across logins (`auth_failures_per_ip`, against spraying). The failure
//! that reaches a limit still gets its `535`; from then on, for `auth_lockout_secs`, that login
//! from that address gets `421 4.7.0` at AUTH, and an address over its own limit gets `421 4.7.0`
//! at the greeting. A session counts one failure per credential it tries: a mailer library that
//! tries PLAIN and then LOGIN with the same wrong password has failed once. A successful login
//! does not wipe a count: a guesser who also knows one password must not reset it. Loopback is not
//! exempt (a local web app can be the attacker's proxy), which is why one app's wrong password
//! must not lock out every other login on the host.

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
struct Table<K> {
    sources: HashMap<K, Source>,
    by_expiry: BTreeSet<(Instant, K)>,
    capacity: usize,
}

impl<K: Key> Table<K> {
    /// Drops what has expired by `now`, oldest first.
    fn expire(&mut self, now: Instant) {
        while let Some((at, key)) = self.by_expiry.first().cloned() {
            if at > now {
                break;
            }
            self.by_expiry.pop_first();
            self.sources.remove(&key);
        }
    }

    /// Re-files `key` after its source changed.
    fn refile(&mut self, key: K) {
        let Some(s) = self.sources.get_mut(&key) else {
            return;
        };
        let expires = s.expiry();
        self.by_expiry.remove(&(s.expires, key.clone()));
        s.expires = expires;
        self.by_expiry.insert((expires, key));
    }

    /// Forgets every key `which` picks; returns how many of them were locked out at `now`.
    fn remove(&mut self, which: impl Fn(&K) -> bool, now: Instant) -> usize {
        let keys: Vec<K> = self.sources.keys().filter(|k| which(k)).cloned().collect();
        let mut locked = 0;
        for key in keys {
            if let Some(s) = self.sources.remove(&key) {
                locked += usize::from(s.locked_until.is_some_and(|u| u > now));
                self.by_expiry.remove(&(s.expires, key));
            }
        }
        locked
    }
}

/// What a table counts by: an address, or an address and a login.
trait Key: Clone + Eq + Ord + std::hash::Hash {}
impl<K: Clone + Eq + Ord + std::hash::Hash> Key for K {}

/// One limit over one kind of key.
struct Counter<K> {
    /// Follows a reload.
    limit: AtomicUsize,
    table: Mutex<Table<K>>,
}

impl<K: Key> Counter<K> {
    fn new(limit: usize, capacity: usize) -> Counter<K> {
        Counter {
            limit: AtomicUsize::new(limit),
            table: Mutex::new(Table {
                sources: HashMap::new(),
                by_expiry: BTreeSet::new(),
                capacity,
            }),
        }
    }

    fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table<K>> {
        lock(&self.table)
    }

    fn is_locked(&self, key: &K, now: Instant) -> bool {
        self.limit() > 0
            && self
                .table()
                .sources
                .get(key)
                .and_then(|s| s.locked_until)
                .is_some_and(|until| until > now)
    }

    /// Counts a failure; `true` when it reached the limit.
    fn failed(&self, key: K, now: Instant, lockout: Duration) -> bool {
        if self.limit() == 0 {
            return false;
        }
        let mut table = self.table();
        table.expire(now);
        let s = table.sources.entry(key.clone()).or_insert(Source {
            failures: VecDeque::new(),
            locked_until: None,
            expires: now,
        });
        while s.failures.front().is_some_and(|t| *t + WINDOW <= now) {
            s.failures.pop_front();
        }
        s.failures.push_back(now);
        let mut reached = false;
        if s.failures.len() >= self.limit() && s.locked_until.is_none_or(|u| u <= now) {
            s.locked_until = Some(now + lockout);
            s.failures.clear();
            reached = true;
        }
        table.refile(key);
        while table.sources.len() > table.capacity {
            let Some((_, oldest)) = table.by_expiry.pop_first() else {
                break;
            };
            table.sources.remove(&oldest);
        }
        reached
    }

    /// Locks `key` out until `now + lockout`, whatever its count here (decided elsewhere).
    fn lock(&self, key: K, now: Instant, lockout: Duration) {
        if self.limit() == 0 {
            return;
        }
        let mut table = self.table();
        let s = table.sources.entry(key.clone()).or_insert(Source {
            failures: VecDeque::new(),
            locked_until: None,
            expires: now,
        });
        s.failures.clear();
        s.locked_until = Some(
            s.locked_until
                .map_or(now + lockout, |u| u.max(now + lockout)),
        );
        table.refile(key);
    }
}

/// Told of each failed login (its source key and login), for counting across relays.
pub type Report = Box<dyn Fn(IpAddr, &str) + Send + Sync>;

pub struct Lockout {
    by_login: Counter<(IpAddr, String)>,
    by_ip: Counter<IpAddr>,
    /// Follows a reload.
    lockout_ms: AtomicU64,
    /// With a store several relays share: failures counted there too, so that a guesser cannot
    /// multiply its tries by the number of relays.
    report: std::sync::OnceLock<Report>,
}

/// What a failed login led to.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    Counted,
    /// This failure reached `auth_failures_per_login`: this login from this address is refused.
    LoginLockedOut,
    /// This failure reached `auth_failures_per_ip`: the address is locked out.
    AddressLockedOut,
}

impl Lockout {
    /// A limit of 0 turns that count off.
    pub fn new(per_login: usize, per_ip: usize, lockout: Duration) -> Lockout {
        Lockout::bounded(per_login, per_ip, lockout, MAX_TRACKED)
    }

    fn bounded(per_login: usize, per_ip: usize, lockout: Duration, capacity: usize) -> Lockout {
        Lockout {
            by_login: Counter::new(per_login, capacity),
            by_ip: Counter::new(per_ip, capacity),
            lockout_ms: AtomicU64::new(lockout.as_millis() as u64),
            report: std::sync::OnceLock::new(),
        }
    }

    /// New thresholds (a reload); what is locked out already stays so until its time is up.
    pub fn set(&self, per_login: usize, per_ip: usize, lockout: Duration) {
        self.by_login.limit.store(per_login, Ordering::Relaxed);
        self.by_ip.limit.store(per_ip, Ordering::Relaxed);
        self.lockout_ms
            .store(lockout.as_millis() as u64, Ordering::Relaxed);
    }

    /// The address is locked out (refused at the greeting).
    pub fn is_locked(&self, ip: IpAddr, now: Instant) -> bool {
        self.by_ip.is_locked(&source_key(ip), now)
    }

    /// `login` from this address is refused at AUTH.
    pub fn login_locked(&self, ip: IpAddr, login: &str, now: Instant) -> bool {
        self.is_locked(ip, now)
            || self
                .by_login
                .is_locked(&(source_key(ip), login.to_string()), now)
    }

    /// The limits in force: (`auth_failures_per_login`, `auth_failures_per_ip`, lockout).
    pub fn limits(&self) -> (usize, usize, Duration) {
        (
            self.by_login.limit(),
            self.by_ip.limit(),
            Duration::from_millis(self.lockout_ms.load(Ordering::Relaxed)),
        )
    }

    /// Failures are reported to `report` too (once, at start).
    pub fn set_report(&self, report: Report) {
        let _ = self.report.set(report);
    }

    /// A lockout the relays reached together: the address (`login: None`) or one login from it.
    pub fn lock(&self, ip: IpAddr, login: Option<&str>, now: Instant) {
        let lockout = Duration::from_millis(self.lockout_ms.load(Ordering::Relaxed));
        let key = source_key(ip);
        match login {
            Some(login) => self.by_login.lock((key, login.to_string()), now, lockout),
            None => self.by_ip.lock(key, now, lockout),
        }
    }

    pub fn failed(&self, ip: IpAddr, login: &str, now: Instant) -> Failure {
        let lockout = Duration::from_millis(self.lockout_ms.load(Ordering::Relaxed));
        let key = source_key(ip);
        if let Some(report) = self.report.get() {
            report(key, login);
        }
        let login_reached = self.by_login.failed((key, login.to_string()), now, lockout);
        if self.by_ip.failed(key, now, lockout) {
            Failure::AddressLockedOut
        } else if login_reached {
            Failure::LoginLockedOut
        } else {
            Failure::Counted
        }
    }

    /// Forgets the failures and lockouts of `ip` (its source key: every login from it), or of
    /// every address; returns how many lockouts were lifted.
    pub fn unlock(&self, ip: Option<IpAddr>, now: Instant) -> usize {
        let ip = ip.map(source_key);
        let mine = |k: &IpAddr| ip.is_none_or(|ip| *k == ip);
        self.by_login.table().remove(|(k, _)| mine(k), now) + self.by_ip.table().remove(mine, now)
    }

    /// Forgets what has nothing left to remember (run periodically).
    pub fn prune(&self, now: Instant) {
        self.by_login.table().expire(now);
        self.by_ip.table().expire(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRM: &str = "crm";

    #[test]
    fn unlock_lifts_one_address_or_all() {
        let lockout = Lockout::new(0, 1, Duration::from_secs(600));
        let now = Instant::now();
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.7".parse().unwrap(), "192.0.2.8".parse().unwrap());
        lockout.failed(a, CRM, now);
        lockout.failed(b, CRM, now);
        assert_eq!(lockout.unlock(Some(a), now), 1);
        assert!(!lockout.is_locked(a, now) && lockout.is_locked(b, now));
        assert_eq!(lockout.unlock(Some(a), now), 0);
        assert_eq!(lockout.unlock(None, now), 1);
        assert!(!lockout.is_locked(b, now));
    }

    #[test]
    fn ten_failures_of_one_login_refuse_that_login_there_and_nothing_else() {
        let lockout = Lockout::new(10, 50, Duration::from_secs(600));
        let now = Instant::now();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..9 {
            assert_eq!(lockout.failed(ip, CRM, now), Failure::Counted);
        }
        assert!(!lockout.login_locked(ip, CRM, now));
        assert_eq!(lockout.failed(ip, CRM, now), Failure::LoginLockedOut);
        assert!(lockout.login_locked(ip, CRM, now));
        // The address, the other logins on it, and the same login elsewhere are not affected.
        assert!(!lockout.is_locked(ip, now));
        assert!(!lockout.login_locked(ip, "printer", now));
        assert!(!lockout.login_locked("192.0.2.8".parse().unwrap(), CRM, now));
        assert!(!lockout.login_locked(ip, CRM, now + Duration::from_secs(600)));
        assert_eq!(lockout.unlock(Some(ip), now), 1);
        assert!(!lockout.login_locked(ip, CRM, now));
    }

    #[test]
    fn spraying_across_logins_locks_the_address_out() {
        let lockout = Lockout::new(10, 50, Duration::from_secs(600));
        let now = Instant::now();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for n in 0..49 {
            assert_eq!(
                lockout.failed(ip, &format!("guess{n}"), now),
                Failure::Counted
            );
        }
        assert_eq!(
            lockout.failed(ip, "guess49", now),
            Failure::AddressLockedOut
        );
        assert!(lockout.is_locked(ip, now) && lockout.login_locked(ip, CRM, now));
        assert!(!lockout.is_locked("192.0.2.8".parse().unwrap(), now));
        // The same host over IPv4-mapped IPv6.
        assert!(lockout.is_locked("::ffff:192.0.2.7".parse().unwrap(), now));
    }

    #[test]
    fn failures_older_than_the_window_do_not_count() {
        let lockout = Lockout::new(0, 3, Duration::from_secs(60));
        let t0 = Instant::now();
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        lockout.failed(ip, CRM, t0);
        lockout.failed(ip, CRM, t0 + Duration::from_secs(10));
        assert_eq!(
            lockout.failed(ip, CRM, t0 + WINDOW + Duration::from_secs(1)),
            Failure::Counted
        );
        // Another address in the same /64 is the same source.
        assert_eq!(
            lockout.failed(
                "2001:db8::2".parse().unwrap(),
                CRM,
                t0 + WINDOW + Duration::from_secs(2)
            ),
            Failure::AddressLockedOut
        );
        lockout.prune(t0 + WINDOW * 3);
        assert!(lockout.by_ip.table().sources.is_empty());
    }

    #[test]
    fn the_table_is_bounded_and_a_flood_evicts_what_expires_first() {
        let lockout = Lockout::bounded(2, 2, Duration::from_secs(600), 100);
        let t0 = Instant::now();
        let attacker: IpAddr = "198.51.100.1".parse().unwrap();
        lockout.failed(attacker, CRM, t0);
        assert_eq!(lockout.failed(attacker, CRM, t0), Failure::AddressLockedOut);
        // A flood of sources, one failure each, a minute later.
        for i in 0..1000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            lockout.failed(ip, CRM, t0 + Duration::from_secs(60));
            assert!(lockout.by_ip.table().sources.len() <= 100);
            assert!(lockout.by_login.table().sources.len() <= 100);
        }
        let table = lockout.by_ip.table();
        assert_eq!(table.sources.len(), 100);
        assert_eq!(table.by_expiry.len(), 100);
    }
}
