//! The grant store: refresh tokens, cached access tokens and per-account bookkeeping.
//!
//! [`GrantStore`] is the seam: the token manager and the admin commands see only this trait, so a
//! shared database for several relays can be added beside [`sled_store::SledStore`] without touching token
//! logic. [`memory::MemoryStore`] serves unit tests. Sealing lives in [`seal`], the only code that
//! sees ciphertext.
//!
//! Durable operations block on a disk sync; [`Store`] runs them on the blocking pool so no runtime
//! worker waits on an fsync.

pub mod memory;
pub mod seal;
pub mod sled_store;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::util::secret::Secret;

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

/// The store as the rest of the relay holds it: cheap to clone, durable writes off the runtime.
#[derive(Clone)]
pub struct Store(Arc<dyn GrantStore>);

impl Store {
    pub fn new(inner: impl GrantStore) -> Store {
        Store(Arc::new(inner))
    }

    pub fn get(&self, account: &str) -> Result<Option<Grant>, StoreError> {
        self.0.get(account)
    }

    pub fn status(&self, account: &str) -> Status {
        self.0.status(account)
    }

    pub fn update_status(&self, account: &str, f: impl Fn(&mut Status)) {
        self.0.update_status(account, &f)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&dyn GrantStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.0.clone();
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

    /// For the end of a process, where no runtime may be left to run blocking work.
    pub fn flush_now(&self) -> Result<(), StoreError> {
        self.0.flush()
    }
}
