//! Local authentication: the mailer's login and password against argon2id hashes from the config.
//!
//! Verification is CPU- and memory-heavy by design, so it runs on the blocking pool, at most one per
//! core at a time, each in one of a fixed set of reused memory buffers: RSS stays bounded by the
//! number of concurrent verifications, however many logins arrive (allocating 19 MiB per login left
//! the allocator holding it). An unknown login is checked against a dummy hash with the same
//! parameters, so a wrong login and a wrong password cost the same time.
//!
//! A login verified once is remembered for `auth_cache_secs` (Dovecot's `auth_cache_ttl`): the cache
//! holds an HMAC-SHA-256, under a key made at start and never stored, of login and password, and a
//! fingerprint of the account's password hash, so a changed hash invalidates it. Failed logins are
//! never cached; the cache never holds a password.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::password_hash::{rand_core::OsRng, Output, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use ring::hmac;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::Account;
use crate::util::clock::SharedClock;
use crate::util::secret::Secret;
use crate::util::sync::lock;

/// What an unknown login is verified against: the default parameters (so it costs what a real one
/// does) and a password nobody knows. A constant, because hashing one at start-up would cost a start
/// 19 MiB of peak memory.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$Mc4EXP5+ymXcb4wNBoEHkQ$e+7GP1nsI1BfTMJfqOpxmB8N0ZhDYrnbLZn2CAvboeo";

/// Entries kept at most; beyond it the cache is swept (expired entries first, then all).
const CACHE_MAX: usize = 10_000;

/// Hashes a password as an argon2id PHC string (the crate's recommended parameters).
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters cannot fail")
        .to_string()
}

/// Verifies `password` against a PHC string, computing in `blocks` (resized as the hash needs).
fn verify_in(hash: &str, password: &[u8], blocks: &mut Vec<Block>) -> bool {
    let mut run = || -> Option<bool> {
        let parsed = PasswordHash::new(hash).ok()?;
        let algorithm = Algorithm::try_from(parsed.algorithm).ok()?;
        let version = match parsed.version {
            Some(v) => Version::try_from(v).ok()?,
            None => Version::default(),
        };
        let params = Params::try_from(&parsed).ok()?;
        let expected = parsed.hash?;
        let mut salt = [0u8; 64];
        let salt = parsed.salt?.decode_b64(&mut salt).ok()?;
        let mut out = vec![0u8; expected.len()];
        blocks.resize(params.block_count(), Block::new());
        Argon2::new(algorithm, version, params)
            .hash_password_into_with_memory(password, salt, &mut out, &mut blocks[..])
            .ok()?;
        // Output's equality is constant-time.
        Some(Output::new(&out).ok()? == expected)
    };
    run().unwrap_or(false)
}

struct Cached {
    account: Arc<Account>,
    hash_fingerprint: hmac::Tag,
    expires: Instant,
}

struct LoginCache {
    key: hmac::Key,
    /// `auth_cache_secs` in milliseconds, 0 for off; a reload may change it.
    ttl_ms: AtomicU64,
    entries: Mutex<HashMap<Vec<u8>, Cached>>,
    hits: AtomicU64,
}

impl LoginCache {
    fn new(ttl: Duration) -> LoginCache {
        let rng = ring::rand::SystemRandom::new();
        LoginCache {
            key: hmac::Key::generate(hmac::HMAC_SHA256, &rng).expect("system randomness"),
            ttl_ms: AtomicU64::new(ttl.as_millis() as u64),
            entries: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
        }
    }

    /// The cache key: login and password, length-prefixed so no two pairs collide.
    fn tag(&self, login: &str, password: &Secret) -> Vec<u8> {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&(login.len() as u64).to_be_bytes());
        ctx.update(login.as_bytes());
        ctx.update(password.expose().as_bytes());
        ctx.sign().as_ref().to_vec()
    }

    fn fingerprint(&self, account: &Account) -> hmac::Tag {
        let hash = account.password_hash.as_ref().map_or("", |h| h.expose());
        hmac::sign(&self.key, hash.as_bytes())
    }

    /// A hit only while the login still maps to the same account with the same password hash.
    fn get(&self, tag: &[u8], current: &Arc<Account>, now: Instant) -> bool {
        let entries = lock(&self.entries);
        let hit = entries.get(tag).is_some_and(|c| {
            c.expires > now
                && c.account.name == current.name
                && c.hash_fingerprint.as_ref() == self.fingerprint(current).as_ref()
        });
        if hit {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    fn put(&self, tag: Vec<u8>, account: Arc<Account>, now: Instant) {
        let mut entries = lock(&self.entries);
        if entries.len() >= CACHE_MAX {
            entries.retain(|_, c| c.expires > now);
            if entries.len() >= CACHE_MAX {
                entries.clear();
            }
        }
        let cached = Cached {
            hash_fingerprint: self.fingerprint(&account),
            account,
            expires: now + Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed)),
        };
        entries.insert(tag, cached);
    }
}

/// A successful login.
pub struct Verified {
    pub account: Arc<Account>,
    /// Answered from the login cache, without argon2.
    pub cached: bool,
}

/// What outlives a change of accounts: the argon2 workers and buffers, and the cache (whose entries
/// stay valid only for unchanged password hashes).
struct Engine {
    dummy_hash: String,
    permits: Semaphore,
    /// Argon2 working memory, one buffer per verification that ran at the same time as others.
    buffers: Mutex<Vec<Vec<Block>>>,
    cache: LoginCache,
    /// Verifications running, by cache key: a burst of sessions logging in with the same login and
    /// password costs one argon2 run, the others wait for it and hit the cache. (Per key, not per
    /// login: wrong passwords do not queue ahead of the right one.)
    inflight: Mutex<HashMap<Vec<u8>, Arc<tokio::sync::Mutex<()>>>>,
    clock: SharedClock,
}

pub struct Authenticator {
    by_login: HashMap<String, Arc<Account>>,
    /// `sources` of the accounts: a device there sends as the account without AUTH.
    devices: Vec<(ipnet::IpNet, Arc<Account>)>,
    engine: Arc<Engine>,
}

fn devices(accounts: &[Arc<Account>]) -> Vec<(ipnet::IpNet, Arc<Account>)> {
    accounts
        .iter()
        .flat_map(|a| a.sources.iter().map(move |net| (*net, a.clone())))
        .collect()
}

fn by_login(accounts: &[Arc<Account>]) -> HashMap<String, Arc<Account>> {
    accounts
        .iter()
        // An account of devices only has no password: nobody logs in as it.
        .filter(|a| a.password_hash.is_some())
        .map(|a| (a.login.clone(), a.clone()))
        .collect()
}

impl Engine {
    /// The login cache, unless `auth_cache_secs` is 0.
    fn cache(&self) -> Option<&LoginCache> {
        (self.cache.ttl_ms.load(Ordering::Relaxed) > 0).then_some(&self.cache)
    }
}

impl Authenticator {
    pub fn new(
        accounts: &[Arc<Account>],
        cache_ttl: Duration,
        clock: SharedClock,
    ) -> Authenticator {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let engine = Engine {
            dummy_hash: DUMMY_HASH.to_string(),
            permits: Semaphore::new(cores),
            buffers: Mutex::new(Vec::new()),
            cache: LoginCache::new(cache_ttl),
            inflight: Mutex::new(HashMap::new()),
            clock,
        };
        Authenticator {
            by_login: by_login(accounts),
            devices: devices(accounts),
            engine: Arc::new(engine),
        }
    }

    /// The same workers and cache for a new set of accounts and `auth_cache_secs` (a reloaded
    /// config).
    pub fn with_accounts(&self, accounts: &[Arc<Account>], cache_ttl: Duration) -> Authenticator {
        let ttl = &self.engine.cache.ttl_ms;
        ttl.store(cache_ttl.as_millis() as u64, Ordering::Relaxed);
        Authenticator {
            by_login: by_login(accounts),
            devices: devices(accounts),
            engine: self.engine.clone(),
        }
    }

    /// The account whose `sources` hold `ip` (the config allows at most one).
    pub fn device(&self, ip: std::net::IpAddr) -> Option<&Arc<Account>> {
        let ip = ip.to_canonical();
        self.devices
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, a)| a)
    }

    /// The account a configured login belongs to.
    pub fn account_of(&self, login: &str) -> Option<&Arc<Account>> {
        self.by_login.get(login)
    }

    /// Logins answered from the cache so far (for tests and metrics).
    pub fn cache_hits(&self) -> u64 {
        self.engine.cache.hits.load(Ordering::Relaxed)
    }

    /// The account whose login and password these are, or `None`.
    pub async fn verify(&self, login: &str, password: Secret) -> Option<Verified> {
        let engine = &self.engine;
        let account = self.by_login.get(login).cloned();
        let cache = engine.cache();
        let tag = cache.map(|c| c.tag(login, &password));
        let hit = |tag: &Option<Vec<u8>>| match (cache, tag, &account) {
            (Some(cache), Some(tag), Some(current)) => cache.get(tag, current, engine.clock.now()),
            _ => false,
        };
        let cached = |account: &Option<Arc<Account>>| {
            account.clone().map(|account| Verified {
                account,
                cached: true,
            })
        };
        if hit(&tag) {
            return cached(&account);
        }
        let flight = tag
            .as_ref()
            .map(|t| lock(&engine.inflight).entry(t.clone()).or_default().clone());
        let _one_at_a_time = match &flight {
            Some(f) => Some(f.lock().await),
            None => None,
        };
        // Whoever went first may have just verified the same password.
        if hit(&tag) {
            return cached(&account);
        }
        let _done = tag.clone().map(|tag| Landed { engine, tag });
        self.verify_uncached(account, password, tag).await
    }

    async fn verify_uncached(
        &self,
        account: Option<Arc<Account>>,
        password: Secret,
        tag: Option<Vec<u8>>,
    ) -> Option<Verified> {
        let engine = &self.engine;
        let cache = engine.cache();
        let hash = account
            .as_ref()
            .and_then(|a| a.password_hash.as_ref())
            .map(|h| h.expose().to_string())
            .unwrap_or_else(|| engine.dummy_hash.clone());
        let ok = engine.run_argon2(hash, password).await;
        let account = account.filter(|_| ok)?;
        if let (Some(cache), Some(tag)) = (cache, tag) {
            cache.put(tag, account.clone(), engine.clock.now());
        }
        Some(Verified {
            account,
            cached: false,
        })
    }
}

/// Ends a verification's flight, also when the session is dropped mid-way.
struct Landed<'a> {
    engine: &'a Engine,
    tag: Vec<u8>,
}

impl Drop for Landed<'_> {
    fn drop(&mut self) {
        lock(&self.engine.inflight).remove(&self.tag);
    }
}

impl Engine {
    async fn run_argon2(&self, hash: String, password: Secret) -> bool {
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        let mut blocks = lock(&self.buffers).pop().unwrap_or_default();
        let (ok, blocks) = tokio::task::spawn_blocking(move || {
            let ok = verify_in(&hash, password.expose().as_bytes(), &mut blocks);
            (ok, blocks)
        })
        .await
        .unwrap_or_default();
        lock(&self.buffers).push(blocks);
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_argon2id_and_verifies() {
        let mut blocks = Vec::new();
        assert!(
            PasswordHash::new(DUMMY_HASH).is_ok() && !verify_in(DUMMY_HASH, b"", &mut blocks),
            "the dummy hash parses and takes no empty password"
        );
        let h = hash_password("s3cret");
        assert!(h.starts_with("$argon2id$v=19$"), "{h}");
        assert!(verify_in(&h, b"s3cret", &mut blocks));
        assert!(!verify_in(&h, b"wrong", &mut blocks));
        assert!(!verify_in("not a hash", b"s3cret", &mut blocks));
        assert_eq!(
            blocks.len(),
            Params::DEFAULT_M_COST as usize,
            "one reused buffer"
        );
    }

    fn account(login: &str, password: &str) -> Arc<Account> {
        crate::config::one_account(login, &hash_password(password)).accounts[0].clone()
    }

    #[tokio::test]
    async fn the_cache_serves_a_repeated_login_and_never_a_wrong_or_outdated_password() {
        let clock = crate::util::clock::ManualClock::new(0);
        let auth = Authenticator::new(
            &[account("news", "pw1")],
            Duration::from_secs(300),
            clock.clone(),
        );
        let pw = |p: &str| Secret::new(p);
        let first = auth.verify("news", pw("pw1")).await.unwrap();
        assert!(!first.cached);
        assert!(auth.verify("news", pw("pw1")).await.unwrap().cached);
        assert!(auth.verify("news", pw("wrong")).await.is_none());
        assert!(auth.verify("nobody", pw("pw1")).await.is_none());
        assert_eq!(auth.cache_hits(), 1);
        // A changed hash: the old password is refused, the new one verified afresh.
        let changed = auth.with_accounts(&[account("news", "pw2")], Duration::from_secs(300));
        assert!(changed.verify("news", pw("pw1")).await.is_none());
        assert!(!changed.verify("news", pw("pw2")).await.unwrap().cached);
        assert!(changed.verify("news", pw("pw2")).await.unwrap().cached);
        // Entries expire.
        clock.advance(Duration::from_secs(301));
        assert!(!changed.verify("news", pw("pw2")).await.unwrap().cached);
    }
}
