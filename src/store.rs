//! The grant store: the only module that sees ciphertext.
//!
//! Grants (refresh token, cached access token, their times) live in a sled database under
//! `data_dir`, each sealed with XChaCha20-Poly1305 under a 256-bit key kept in `key_file`, outside the
//! database. The account name is bound as associated data, so a sealed grant copied onto another
//! account's key does not open. Non-secret bookkeeping (last use, last provider error) is kept in a
//! second tree in clear so `accounts` can show it.
//!
//! sled allows one process per database: while `serve` runs, admin commands reach this store through
//! the control socket (see `control.rs`) instead of opening it.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use serde::{Deserialize, Serialize};

use crate::config::GrantKind;
use crate::secret::Secret;

const NONCE_LEN: usize = 24;
const AAD_PREFIX: &[u8] = b"xoauth-relay/grant/v1/";

/// What is stored, sealed, per account.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Grant {
    pub kind: GrantKind,
    pub refresh_token: Option<Secret>,
    pub access_token: Option<Secret>,
    /// Unix seconds.
    pub access_expires_at: Option<u64>,
    /// When the current refresh token was obtained (unix seconds).
    pub obtained_at: u64,
    pub last_refresh: Option<u64>,
}

/// Clear-text bookkeeping per account; nothing secret.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub last_use: Option<u64>,
    /// The provider's last error (code and description), cleared by a successful refresh.
    pub last_error: Option<String>,
    /// The provider said the grant is dead (`invalid_grant`); cleared when a new grant is stored.
    pub revoked: bool,
}

#[derive(Debug)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

#[derive(Clone)]
pub struct GrantStore {
    db: sled::Db,
    grants: sled::Tree,
    status: sled::Tree,
    cipher: XChaCha20Poly1305,
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl GrantStore {
    /// Opens (creating if needed) the database in `data_dir` and the key in `key_file`.
    pub fn open(data_dir: &Path, key_file: &Path) -> Result<GrantStore, StoreError> {
        create_private_dir(data_dir)?;
        let key = load_or_create_key(key_file)?;
        let path = data_dir.join("grants.db");
        let db = sled::Config::new().path(&path).open().map_err(|e| {
            let detail = e.to_string();
            if detail.contains("lock") || detail.contains("WouldBlock") || detail.contains("temporarily unavailable") {
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
        Ok(GrantStore {
            db,
            grants,
            status,
            cipher: XChaCha20Poly1305::new((&key).into()),
        })
    }

    fn aad(account: &str) -> Vec<u8> {
        [AAD_PREFIX, account.as_bytes()].concat()
    }

    pub fn get(&self, account: &str) -> Result<Option<Grant>, StoreError> {
        let Some(sealed) = self.grants.get(account).map_err(db_err)? else {
            return Ok(None);
        };
        if sealed.len() < NONCE_LEN {
            return Err(StoreError(format!(
                "account `{account}`: stored grant is truncated"
            )));
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let aad = Self::aad(account);
        let plain = self
            .cipher
            .decrypt(nonce.into(), Payload { msg: ciphertext, aad: &aad })
            .map_err(|_| {
                StoreError(format!(
                    "account `{account}`: stored grant cannot be decrypted with the key in key_file \
                     (wrong or replaced key?); restore the original key or run `xoauth-relay authorize {account}`"
                ))
            })?;
        serde_json::from_slice(&plain).map(Some).map_err(|e| {
            StoreError(format!(
                "account `{account}`: stored grant is unreadable: {e}"
            ))
        })
    }

    /// Seals and writes a grant, then flushes: a rotated refresh token must be on disk before the
    /// access token that came with it is used.
    pub fn put(&self, account: &str, grant: &Grant) -> Result<(), StoreError> {
        let plain = serde_json::to_vec(grant).map_err(|e| StoreError(e.to_string()))?;
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = Self::aad(account);
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            .map_err(|_| StoreError("sealing the grant failed".into()))?;
        let mut sealed = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        self.grants.insert(account, sealed).map_err(db_err)?;
        self.db.flush().map_err(db_err)?;
        Ok(())
    }

    /// Deletes the grant; returns whether there was one.
    pub fn remove(&self, account: &str) -> Result<bool, StoreError> {
        let existed = self.grants.remove(account).map_err(db_err)?.is_some();
        self.db.flush().map_err(db_err)?;
        Ok(existed)
    }

    pub fn status(&self, account: &str) -> Status {
        self.status
            .get(account)
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default()
    }

    /// Updates the bookkeeping record. Not flushed: losing a last-use time in a crash is harmless,
    /// and a disk sync per message would be on the hot path.
    /// Atomic read-modify-write (sled retries `f` on a concurrent change), so a last-use update from
    /// one session cannot undo a failure recorded by a refresh.
    pub fn update_status(&self, account: &str, f: impl Fn(&mut Status)) {
        let _ = self.status.update_and_fetch(account, |old| {
            let mut s: Status = old
                .and_then(|v| serde_json::from_slice(v).ok())
                .unwrap_or_default();
            f(&mut s);
            serde_json::to_vec(&s).ok()
        });
    }

    pub fn flush(&self) {
        let _ = self.db.flush();
    }
}

fn db_err(e: sled::Error) -> StoreError {
    StoreError(format!("database error: {e}"))
}

/// Creates `dir` (and parents) with mode 0700 if missing.
pub fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| StoreError(format!("cannot create data_dir {}: {e}", dir.display())))?;
    }
    Ok(())
}

/// sled creates its files with the process umask; tighten them to 0600 (dirs 0700).
fn restrict_tree(path: &Path) {
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_dir() {
            restrict_tree(&p);
        } else {
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
        }
    }
}

fn load_or_create_key(path: &Path) -> Result<[u8; 32], StoreError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| {
                    StoreError(format!("key_file {} is not a base64 key", path.display()))
                })?;
            let key: [u8; 32] = bytes.try_into().map_err(|_| {
                StoreError(format!(
                    "key_file {} does not hold a 32-byte key",
                    path.display()
                ))
            })?;
            if let Ok(meta) = std::fs::metadata(path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(
                        key_file = %path.display(),
                        "key file is readable by other users; run `chmod 600` on it"
                    );
                }
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                create_private_dir(parent)?;
            }
            let key = XChaCha20Poly1305::generate_key(&mut OsRng);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    StoreError(format!("cannot create key_file {}: {e}", path.display()))
                })?;
            let text = base64::engine::general_purpose::STANDARD.encode(key);
            writeln!(file, "{text}")
                .and_then(|_| file.sync_all())
                .map_err(|e| {
                    StoreError(format!("cannot write key_file {}: {e}", path.display()))
                })?;
            tracing::info!(key_file = %path.display(), "created a new encryption key; back it up: without it the stored grants cannot be read");
            Ok(key.into())
        }
        Err(e) => Err(StoreError(format!(
            "cannot read key_file {}: {e}; check the path and permissions",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(token: &str) -> Grant {
        Grant {
            kind: GrantKind::RefreshToken,
            refresh_token: Some(Secret::new(token)),
            access_token: None,
            access_expires_at: None,
            obtained_at: 1,
            last_refresh: None,
        }
    }

    #[test]
    fn sealed_grant_round_trips_and_is_bound_to_its_account() {
        let dir = tempfile::tempdir().unwrap();
        let store = GrantStore::open(&dir.path().join("d"), &dir.path().join("k")).unwrap();
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
