//! The grant store on sled: one database under `data_dir`, grants sealed, bookkeeping in clear.
//!
//! sled allows one process per database: while `serve` runs, admin commands reach this store
//! through the control socket instead of opening it.

use std::path::Path;

use super::seal::Sealer;
use super::{Grant, GrantStore, Status, StoreError};
use crate::util::fs::{create_private_dir, restrict_tree};

const CACHE_BYTES: u64 = 4 << 20;

pub struct SledStore {
    db: sled::Db,
    grants: sled::Tree,
    status: sled::Tree,
    sealer: Sealer,
}

fn db_err(e: sled::Error) -> StoreError {
    StoreError(format!("database error: {e}"))
}

/// How many times (100 ms apart) opening a locked database is tried again.
const LOCK_PATIENCE_STEPS: u32 = 30;

impl SledStore {
    /// Where the database of `data_dir` lives.
    pub fn database_path(data_dir: &Path) -> std::path::PathBuf {
        data_dir.join("grants.db")
    }

    /// Opens (creating if needed) the database in `data_dir` and the key in `key_file`. Blocking:
    /// call at start-up.
    pub fn open(data_dir: &Path, key_file: &Path) -> Result<SledStore, StoreError> {
        create_private_dir(data_dir).map_err(|e| {
            StoreError(format!(
                "cannot create data_dir {}: {e}",
                data_dir.display()
            ))
        })?;
        let sealer = Sealer::from_key_file(key_file)?;
        let path = SledStore::database_path(data_dir);
        // A handful of grants: a few MiB of page cache is plenty (sled's default is 1 GiB).
        let open = || {
            sled::Config::new()
                .path(&path)
                .cache_capacity(CACHE_BYTES)
                .open()
        };
        let locked = |e: &sled::Error| {
            let detail = e.to_string();
            detail.contains("lock")
                || detail.contains("WouldBlock")
                || detail.contains("temporarily unavailable")
        };
        // A relay that just stopped (a restart) lets go of the database's lock a moment after
        // it is gone: wait a little for it before calling it another process.
        let mut attempt = open();
        for _ in 0..LOCK_PATIENCE_STEPS {
            match &attempt {
                Err(e) if locked(e) => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    attempt = open();
                }
                _ => break,
            }
        }
        let db = attempt.map_err(|e| {
            let detail = e.to_string();
            if locked(&e) {
                StoreError(format!(
                    "database {} is in use by another process (is `xoauth-relay serve` running with this data_dir \
                     but its control socket missing?); stop that process or run the command against it",
                    path.display()
                ))
            } else {
                StoreError(format!("cannot open database {}: {detail}", path.display()))
            }
        })?;
        restrict_tree(&path);
        let grants = db.open_tree("grants").map_err(db_err)?;
        let status = db.open_tree("status").map_err(db_err)?;
        Ok(SledStore {
            db,
            grants,
            status,
            sealer,
        })
    }
}

impl SledStore {
    /// Every grant as stored (sealed: the key never leaves this relay) and every status, for
    /// `store migrate-from-sled`.
    #[allow(clippy::type_complexity)]
    pub fn export(&self) -> Result<(Vec<(String, Vec<u8>)>, Vec<(String, Status)>), StoreError> {
        let name = |k: &[u8]| String::from_utf8_lossy(k).into_owned();
        let mut grants = Vec::new();
        for item in self.grants.iter() {
            let (k, v) = item.map_err(db_err)?;
            grants.push((name(&k), v.to_vec()));
        }
        let mut statuses = Vec::new();
        for item in self.status.iter() {
            let (k, v) = item.map_err(db_err)?;
            if let Ok(s) = serde_json::from_slice(&v) {
                statuses.push((name(&k), s));
            }
        }
        Ok((grants, statuses))
    }
}

impl GrantStore for SledStore {
    fn get(&self, account: &str) -> Result<Option<Grant>, StoreError> {
        let Some(sealed) = self.grants.get(account).map_err(db_err)? else {
            return Ok(None);
        };
        self.sealer.open_grant(account, &sealed).map(Some)
    }

    fn put(&self, account: &str, grant: &Grant) -> Result<(), StoreError> {
        let sealed = self.sealer.seal_grant(account, grant)?;
        self.grants.insert(account, sealed).map_err(db_err)?;
        self.db.flush().map_err(db_err)?;
        Ok(())
    }

    fn remove(&self, account: &str) -> Result<bool, StoreError> {
        let existed = self.grants.remove(account).map_err(db_err)?.is_some();
        self.db.flush().map_err(db_err)?;
        Ok(existed)
    }

    fn status(&self, account: &str) -> Status {
        self.status
            .get(account)
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default()
    }

    // sled retries `f` on a concurrent change, so a last-use update from one session cannot undo a
    // failure recorded by a refresh.
    fn update_status(&self, account: &str, f: &dyn Fn(&mut Status)) {
        let _ = self.status.update_and_fetch(account, |old| {
            let mut s: Status = old
                .and_then(|v| serde_json::from_slice(v).ok())
                .unwrap_or_default();
            f(&mut s);
            serde_json::to_vec(&s).ok()
        });
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(db_err)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::util::secret::Secret;

    fn grant(token: &str) -> Grant {
        Grant {
            refresh_token: Some(Secret::new(token)),
            obtained_at: 1,
            ..Grant::default()
        }
    }

    #[test]
    fn sealed_grant_round_trips_and_is_bound_to_its_account() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("d"), &dir.path().join("k")).unwrap();
        store.put("news", &grant("rt-secret-value")).unwrap();
        let back = store.get("news").unwrap().unwrap();
        assert_eq!(back.refresh_token.unwrap().expose(), "rt-secret-value");
        // Move the sealed bytes under another name: the AEAD must refuse them.
        let sealed = store.grants.get("news").unwrap().unwrap();
        store.grants.insert("other", sealed).unwrap();
        assert!(store.get("other").is_err());
        let mode = std::fs::metadata(dir.path().join("k"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
