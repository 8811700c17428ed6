//! Local authentication: the mailer's login and password against argon2id hashes from the config.
//!
//! Verification is CPU- and memory-heavy by design, so it runs on the blocking pool, bounded by a
//! semaphore so a burst of logins cannot exhaust memory. An unknown login is checked against a dummy
//! hash with the same parameters, so a wrong login and a wrong password cost the same time.

use std::collections::HashMap;
use std::sync::Arc;

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use tokio::sync::Semaphore;

use crate::config::Account;
use crate::util::secret::Secret;

pub struct Authenticator {
    by_login: HashMap<String, Arc<Account>>,
    dummy_hash: String,
    permits: Semaphore,
}

/// Hashes a password as an argon2id PHC string (the crate's recommended parameters).
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters cannot fail")
        .to_string()
}

fn verify(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

impl Authenticator {
    pub fn new(accounts: &[Arc<Account>]) -> Authenticator {
        Authenticator {
            by_login: accounts
                .iter()
                .map(|a| (a.login.clone(), a.clone()))
                .collect(),
            dummy_hash: hash_password("xoauth-relay dummy password for unknown logins"),
            permits: Semaphore::new(4),
        }
    }

    pub fn knows(&self, login: &str) -> bool {
        self.by_login.contains_key(login)
    }

    /// The account whose login and password these are, or `None`.
    pub async fn verify(&self, login: &str, password: Secret) -> Option<Arc<Account>> {
        let account = self.by_login.get(login).cloned();
        let hash = account
            .as_ref()
            .map(|a| a.password_hash.expose().to_string())
            .unwrap_or_else(|| self.dummy_hash.clone());
        let _permit = self.permits.acquire().await.ok()?;
        let ok = tokio::task::spawn_blocking(move || verify(&hash, password.expose()))
            .await
            .unwrap_or(false);
        account.filter(|_| ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_argon2id_and_verifies() {
        let h = hash_password("s3cret");
        assert!(h.starts_with("$argon2id$v=19$"), "{h}");
        assert!(verify(&h, "s3cret"));
        assert!(!verify(&h, "wrong"));
    }
}
