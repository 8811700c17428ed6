//! Per-account state keyed by account name, that a config reload extends without a lock on the
//! read path (an `arc-swap` snapshot of the map).
//!
//! Reloads only add and update: the state of an account removed from the file stays, so mail it
//! has queued is still delivered and its connections close normally; nobody can log in as it.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

pub struct Keyed<T>(ArcSwap<HashMap<String, Arc<T>>>);

impl<T> Default for Keyed<T> {
    fn default() -> Self {
        Keyed(ArcSwap::from_pointee(HashMap::new()))
    }
}

impl<T> Keyed<T> {
    pub fn new(entries: impl IntoIterator<Item = (String, T)>) -> Keyed<T> {
        let map = entries.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        Keyed(ArcSwap::from_pointee(map))
    }

    /// `f` on the entry, without touching its reference count (for per-message paths).
    pub fn with<R>(&self, name: &str, f: impl FnOnce(&T) -> R) -> Option<R> {
        self.0.load().get(name).map(|v| f(v))
    }

    pub fn get(&self, name: &str) -> Option<Arc<T>> {
        self.0.load().get(name).cloned()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.load().contains_key(name)
    }

    /// Every entry, as of now.
    pub fn all(&self) -> Arc<HashMap<String, Arc<T>>> {
        self.0.load_full()
    }

    /// Adds `value` under `name` unless present; returns the entry now there. Reloads are
    /// serialized by the app, so read-modify-write is safe here.
    pub fn insert_missing(&self, name: &str, value: impl FnOnce() -> T) -> Arc<T> {
        if let Some(v) = self.get(name) {
            return v;
        }
        let mut map = HashMap::clone(&self.0.load());
        let v = Arc::new(value());
        map.insert(name.to_string(), v.clone());
        self.0.store(Arc::new(map));
        v
    }
}
