//! Sealing grants: XChaCha20-Poly1305 under a 256-bit key kept in `key_file`, outside the database.
//! The only code in the relay that handles ciphertext or the key.
//!
//! The account name is bound as associated data, so a sealed grant copied onto another account's
//! key does not open.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::XChaCha20Poly1305;

use super::StoreError;
use crate::util::fs::{create_private_dir, readable_by_others};

const NONCE_LEN: usize = 24;
const AAD_PREFIX: &[u8] = b"xoauth-relay/grant/v1/";

#[derive(Clone)]
pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl Sealer {
    /// Reads the key (creating it, `0600`, on first start). Blocking: call at start-up.
    pub fn from_key_file(path: &Path) -> Result<Sealer, StoreError> {
        let key = load_or_create_key(path)?;
        Ok(Sealer {
            cipher: XChaCha20Poly1305::new((&*key).into()),
        })
    }

    fn aad(account: &str) -> Vec<u8> {
        [AAD_PREFIX, account.as_bytes()].concat()
    }

    pub fn seal(&self, account: &str, plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = Self::aad(account);
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: &aad,
                },
            )
            .map_err(|_| StoreError("sealing the grant failed".into()))?;
        let mut sealed = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        Ok(sealed)
    }

    pub fn open(&self, account: &str, sealed: &[u8]) -> Result<Vec<u8>, StoreError> {
        if sealed.len() < NONCE_LEN {
            return Err(StoreError(format!(
                "account `{account}`: stored grant is truncated"
            )));
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let aad = Self::aad(account);
        self.cipher
            .decrypt(nonce.into(), Payload { msg: ciphertext, aad: &aad })
            .map_err(|_| {
                StoreError(format!(
                    "account `{account}`: stored grant cannot be decrypted with the key in key_file \
                     (wrong or replaced key?); restore the original key or run `xoauth-relay authorize {account}`"
                ))
            })
    }
}

/// Whether the key at `path` would load (`check`): a missing one is made at the first start.
/// A grant as it is kept: JSON, sealed to its account. One rule for every backend, so a sealed
/// value moves between sled and PostgreSQL as it is.
impl Sealer {
    pub fn seal_grant(&self, account: &str, grant: &super::Grant) -> Result<Vec<u8>, StoreError> {
        let plain = zeroize::Zeroizing::new(
            serde_json::to_vec(grant).map_err(|e| StoreError(e.to_string()))?,
        );
        self.seal(account, &plain)
    }

    pub fn open_grant(&self, account: &str, sealed: &[u8]) -> Result<super::Grant, StoreError> {
        let plain = zeroize::Zeroizing::new(self.open(account, sealed)?);
        serde_json::from_slice(&plain).map_err(|e| {
            StoreError(format!(
                "account `{account}`: stored grant is unreadable: {e}"
            ))
        })
    }
}

pub fn verify_key_file(path: &Path) -> Result<(), StoreError> {
    match std::fs::read_to_string(path).map(zeroize::Zeroizing::new) {
        Ok(text) => parse_key(path, &text).map(drop),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError(format!(
            "[server] key_file {}: cannot read it ({e}); check its owner and mode (0600, the relay's user)",
            path.display()
        ))),
    }
}

/// The key in a key file's text (base64 of 32 bytes, surrounding whitespace ignored).
fn parse_key(path: &Path, text: &str) -> Result<zeroize::Zeroizing<[u8; 32]>, StoreError> {
    let damaged = |what: &str| {
        StoreError(format!(
            "[server] key_file {} {what}; restore the key from its backup (a new key cannot read the \
             stored grants)",
            path.display()
        ))
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map(zeroize::Zeroizing::new)
        .map_err(|_| damaged("is not a base64 key"))?;
    let key: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| damaged("does not hold a 32-byte key"))?;
    Ok(zeroize::Zeroizing::new(key))
}

/// The key and every copy made on the way are overwritten when they go (the cipher zeroizes its
/// own copy).
fn load_or_create_key(path: &Path) -> Result<zeroize::Zeroizing<[u8; 32]>, StoreError> {
    match std::fs::read_to_string(path).map(zeroize::Zeroizing::new) {
        Ok(text) => {
            let key = parse_key(path, &text)?;
            if readable_by_others(path) {
                tracing::warn!(
                    key_file = %path.display(),
                    "key file is readable by other users; run `chmod 600` on it"
                );
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                create_private_dir(parent)
                    .map_err(|e| StoreError(format!("cannot create {}: {e}", parent.display())))?;
            }
            let key = zeroize::Zeroizing::new(<[u8; 32]>::from(XChaCha20Poly1305::generate_key(
                &mut OsRng,
            )));
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    StoreError(format!("cannot create key_file {}: {e}", path.display()))
                })?;
            let text = zeroize::Zeroizing::new(
                base64::engine::general_purpose::STANDARD.encode(key.as_slice()),
            );
            writeln!(file, "{}", text.as_str())
                .and_then(|_| file.sync_all())
                .map_err(|e| {
                    StoreError(format!("cannot write key_file {}: {e}", path.display()))
                })?;
            tracing::info!(key_file = %path.display(), "created a new encryption key; back it up: without it the stored grants cannot be read");
            Ok(key)
        }
        Err(e) => Err(StoreError(format!(
            "cannot read key_file {}: {e}; check the path and permissions",
            path.display()
        ))),
    }
}
