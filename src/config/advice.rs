//! What a valid file may still get wrong: the example's published password and placeholders, a
//! key kept with the data it seals, files open to other users. `check` prints these; the published
//! password on a reachable listener is a refusal (`app::preflight`).

use std::net::SocketAddr;
use std::path::PathBuf;

use super::{Config, SecretSource};

/// The `password_hash` published in `config/relay.example.toml` (password "change-me"): anyone can
/// log in with it, so `serve` refuses it on a listener other than loopback.
const EXAMPLE_PASSWORD_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$pvxRNMbZtA9LLJEcHj8WNQ$C4AqN4TR5l9vfJdFPgfWeihGedxXqzT3b2R2NySCvmA";

impl Config {
    /// The key that seals the grants: `key_file`, else `master.key` beside the config file (not in
    /// data_dir, so a backup of the data does not carry its own key). A key at the old default,
    /// `data_dir/master.key`, keeps working until it is moved (`check` says so).
    pub fn key_file(&self) -> PathBuf {
        if let Some(k) = &self.server.key_file {
            return k.clone();
        }
        let beside = self.path.with_file_name("master.key");
        let old = self.server.data_dir.join("master.key");
        if !beside.exists() && old.exists() {
            old
        } else {
            beside
        }
    }

    /// Accounts still using the example config's published password.
    pub fn example_password_accounts(&self) -> Vec<&str> {
        self.accounts
            .iter()
            .filter(|a| {
                a.password_hash
                    .as_ref()
                    .is_some_and(|h| h.expose() == EXAMPLE_PASSWORD_HASH)
            })
            .map(|a| a.name.as_str())
            .collect()
    }

    /// Listeners reachable from other machines.
    pub fn public_listeners(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .map(|l| l.address)
            .filter(|a| !a.ip().to_canonical().is_loopback())
            .collect()
    }

    /// Providers still holding the example's placeholder client id or secret: the provider would
    /// answer every token request with `invalid_client`.
    pub fn placeholders(&self) -> Vec<String> {
        const CLIENT_ID: &str = "1234.apps.googleusercontent.com";
        const SECRET: &str = "replace-with-the-client-secret";
        let mut out = Vec::new();
        for (name, p) in &self.providers {
            let secret = match &p.secret_source {
                Some(SecretSource::Inline(s)) => Some(s),
                _ => p.client_secret.as_ref(),
            };
            let mut left = Vec::new();
            if p.client_id == CLIENT_ID {
                left.push(format!("client_id \"{CLIENT_ID}\""));
            }
            if secret.is_some_and(|s| s.expose() == SECRET) {
                left.push(format!("client_secret \"{SECRET}\""));
            }
            if !left.is_empty() {
                let is = if left.len() == 1 {
                    "is the example's placeholder"
                } else {
                    "are the example's placeholders"
                };
                out.push(format!(
                    "[providers.{name}]: {} {is}; put in your OAuth client's (README, \"Authorize \
                     an account\")",
                    left.join(" and ")
                ));
            }
        }
        out
    }

    /// What `check` should point out although the file is valid.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = self.placeholders();
        for name in self.example_password_accounts() {
            out.push(format!(
                "account `{name}`: password_hash is the example's published one (password \"change-me\"); \
                 make your own with `xoauth-relay hash-password` (serve refuses it on a non-loopback listener)"
            ));
        }
        let key = self.key_file();
        if key.starts_with(&self.server.data_dir) {
            out.push(format!(
                "[server] key_file {} is inside data_dir: a backup of data_dir then carries its own key; \
                 move it to {} (the default) or set key_file to a path outside data_dir",
                key.display(),
                self.path.with_file_name("master.key").display()
            ));
        }
        let data = &self.server.data_dir;
        if crate::util::fs::readable_by_others(data) {
            out.push(format!(
                "[server] data_dir {} is open to other users; it holds sealed grants and queued mail: `serve` \
                 tightens it to 0700 (or run `chmod 700 {}`)",
                data.display(),
                data.display()
            ));
        }
        if crate::util::fs::readable_by_others(&key) {
            out.push(format!(
                "[server] key_file {} is readable by other users; run `chmod 600 {}`",
                key.display(),
                key.display()
            ));
        }
        out
    }
}
