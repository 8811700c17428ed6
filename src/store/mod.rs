//! The grant store: refresh tokens, cached access tokens and per-account bookkeeping.
//!
//! [`GrantStore`] is the seam: the token manager and the admin commands see only this trait.
//! [`sled_store::SledStore`] is one relay's store; [`postgres::PgStore`] is shared by several
//! relays and adds [`Shared`]: a refresh lease per account, the grant as the database has it now,
//! and news of grants another relay replaced. [`memory::MemoryStore`] serves unit tests. Sealing
//! lives in [`seal`], the only code that sees ciphertext.
//!
//! Durable operations block on a disk sync; [`Store`] runs them on the blocking pool so no runtime
//! worker waits on an fsync.

pub mod memory;
pub mod postgres;
pub mod seal;
pub mod sled_store;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::util::secret::Secret;
use crate::util::BoxFuture;

/// What is stored, sealed, per account.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub refresh_token: Option<Secret>,
    pub access_token: Option<Secret>,
    /// Unix seconds.
    pub access_expires_at: Option<u64>,
    /// When the current refresh token was obtained (unix seconds).
    pub obtained_at: u64,
    pub last_refresh: Option<u64>,
    /// When the refresh token itself expires (unix seconds), if the provider said.
    #[serde(default)]
    pub refresh_expires_at: Option<u64>,
    /// The scopes the provider's last token answer listed (space-separated), when it listed any:
    /// whether the grant can do what the account's transport needs.
    #[serde(default)]
    pub scope: Option<String>,
}

/// Clear-text bookkeeping per account; nothing secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub last_use: Option<u64>,
    /// The provider's last error (code and description), cleared by a successful refresh.
    pub last_error: Option<String>,
    /// The provider said the grant is dead (`invalid_grant`); cleared when a new grant is stored.
    pub revoked: bool,
}

#[derive(Debug, Clone)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

/// A place to keep grants. Methods may block (disk); call them through [`Store`].
pub trait GrantStore: Send + Sync + 'static {
    fn get(&self, account: &str) -> Result<Option<Grant>, StoreError>;
    /// Seals and writes a grant, durably: a rotated refresh token must be on disk before the access
    /// token that came with it is used.
    fn put(&self, account: &str, grant: &Grant) -> Result<(), StoreError>;
    /// Deletes the grant, durably; returns whether there was one.
    fn remove(&self, account: &str) -> Result<bool, StoreError>;
    fn status(&self, account: &str) -> Status;
    /// Atomic read-modify-write of the bookkeeping record (`f` may run more than once). Not durable
    /// by itself: see [`GrantStore::flush`].
    fn update_status(&self, account: &str, f: &dyn Fn(&mut Status));
    fn flush(&self) -> Result<(), StoreError>;
}

/// A shared record: its key and its bytes.
pub type Record = (String, Vec<u8>);

/// What a store shared by several relays adds to [`GrantStore`].
pub trait Shared: Send + Sync + 'static {
    /// Takes `account`'s refresh lease, waiting while another relay holds it; released on drop.
    fn lease<'a>(&'a self, account: &'a str) -> BoxFuture<'a, Result<postgres::Lease, StoreError>>;
    /// The grant as the database has it now (another relay may just have refreshed it).
    fn current<'a>(&'a self, account: &'a str) -> BoxFuture<'a, Result<Option<Grant>, StoreError>>;
    /// A grant was stored or deleted by an operator here: a clean status, and every relay drops
    /// what it cached of the old one.
    fn replaced<'a>(&'a self, account: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Accounts whose grant another relay replaced, deleted or found revoked.
    fn changes(&self) -> tokio::sync::broadcast::Receiver<String>;
    /// Why the database cannot be used now, if it cannot.
    fn trouble(&self) -> Option<String>;
    /// The database, as `user@host:port/db` (never the password).
    fn database(&self) -> &str;
    /// The relays sharing the database and seen alive, one line each.
    fn relays(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>>;
    /// A clean stop: this relay's registration and leases are given up.
    fn close(&self) -> BoxFuture<'_, ()>;
    /// How many relays were alive at the last look (at least 1): a limit's local share while
    /// the database is out of reach is the limit divided by this.
    fn relays_seen(&self) -> usize;
    /// Runs `change` on the shared record `kind`/`key` in one transaction (see
    /// [`postgres::Change`]).
    fn update_row<'a>(
        &'a self,
        kind: &'a str,
        key: &'a str,
        change: postgres::Change<'a>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn read_row<'a>(
        &'a self,
        kind: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>>;
    /// Every record of `kind`, as (key, value).
    fn read_rows<'a>(&'a self, kind: &'a str) -> BoxFuture<'a, Result<Vec<Record>, StoreError>>;
    /// One of `account`'s upstream connection slots across relays, if fewer than `cap` are held;
    /// and how many the relays held before.
    fn take_slot<'a>(
        &'a self,
        account: &'a str,
        cap: usize,
    ) -> BoxFuture<'a, Result<(Option<i64>, usize), StoreError>>;
    fn free_slot(&self, id: i64) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Keeps the slots `ids` (those this relay holds) from running out.
    fn renew_slots(&self, ids: Vec<i64>) -> BoxFuture<'_, Result<(), StoreError>>;
    /// How many upstream connection slots the other relays hold now, per account.
    fn slots_of_others(&self) -> BoxFuture<'_, Result<Vec<(String, usize)>, StoreError>>;
    /// `lease_secs`: how long a lease lasts unless renewed.
    fn lease_time(&self) -> std::time::Duration;
    /// Tells every relay (this one too) something about `account` (`want`: a relay waits for one
    /// of its slots; `pause`, `lift`: its shared pause changed); best effort.
    fn signal<'a>(&'a self, kind: &'static str, account: &'a str) -> BoxFuture<'a, ()>;
    /// The signals, as (kind, account).
    fn signals(&self) -> tokio::sync::broadcast::Receiver<(String, String)>;
    /// The state record `name` of every other relay that wrote one (usage figures, say).
    fn others_state<'a>(&'a self, name: &'a str)
        -> BoxFuture<'a, Result<Vec<Vec<u8>>, StoreError>>;
}

/// The store as the rest of the relay holds it: cheap to clone, durable writes off the runtime.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn GrantStore>,
    shared: Option<Arc<dyn Shared>>,
}

impl Store {
    pub fn new(inner: impl GrantStore) -> Store {
        Store {
            inner: Arc::new(inner),
            shared: None,
        }
    }

    /// A store several relays share.
    pub fn shared<S: GrantStore + Shared>(inner: Arc<S>) -> Store {
        Store {
            inner: inner.clone(),
            shared: Some(inner),
        }
    }

    /// The shared store's extras; `None` for one relay's own store.
    pub fn sharing(&self) -> Option<&Arc<dyn Shared>> {
        self.shared.as_ref()
    }

    pub fn get(&self, account: &str) -> Result<Option<Grant>, StoreError> {
        self.inner.get(account)
    }

    pub fn status(&self, account: &str) -> Status {
        self.inner.status(account)
    }

    pub fn update_status(&self, account: &str, f: impl Fn(&mut Status)) {
        self.inner.update_status(account, &f)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&dyn GrantStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || work(inner.as_ref()))
            .await
            .map_err(|e| StoreError(format!("store task failed: {e}")))?
    }

    pub async fn put(&self, account: &str, grant: Grant) -> Result<(), StoreError> {
        let account = account.to_string();
        self.blocking(move |s| s.put(&account, &grant)).await
    }

    pub async fn remove(&self, account: &str) -> Result<bool, StoreError> {
        let account = account.to_string();
        self.blocking(move |s| s.remove(&account)).await
    }

    /// Makes bookkeeping changes durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.blocking(|s| s.flush()).await
    }
}
