//! An in-memory grant store for unit tests: the same contract as the sled store, nothing on disk.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Grant, GrantStore, Status, StoreError};
use crate::util::sync::lock;

#[derive(Default)]
pub struct MemoryStore {
    grants: Mutex<HashMap<String, Grant>>,
    status: Mutex<HashMap<String, Status>>,
    /// Writes of grants fail while set (a full disk).
    pub full: std::sync::atomic::AtomicBool,
}

impl GrantStore for MemoryStore {
    fn get(&self, account: &str) -> Result<Option<Grant>, StoreError> {
        Ok(lock(&self.grants).get(account).cloned())
    }

    fn put(&self, account: &str, grant: &Grant) -> Result<(), StoreError> {
        if self.full.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError("No space left on device".into()));
        }
        lock(&self.grants).insert(account.to_string(), grant.clone());
        Ok(())
    }

    fn remove(&self, account: &str) -> Result<bool, StoreError> {
        Ok(lock(&self.grants).remove(account).is_some())
    }

    fn status(&self, account: &str) -> Status {
        lock(&self.status).get(account).cloned().unwrap_or_default()
    }

    fn update_status(&self, account: &str, f: &dyn Fn(&mut Status)) {
        f(lock(&self.status).entry(account.to_string()).or_default());
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
