//! `[store]`: where the grants and the refresh leases live: sled in `data_dir` (the default, one
//! relay), or PostgreSQL shared by several relays.
//!
//! The key names are normative (issue 20): `backend`, `url_env` / `url_file`, `instance`,
//! `lease_secs`. The connection string is never in the file: it may carry a password.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Env;
use crate::util::secret::Secret;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Sled,
    Postgres,
}

/// Bounds of `lease_secs`: claims are renewed every third of it, so a few seconds is the least
/// that survives a busy database; an hour is the most a dead relay may hold an account's refresh.
const LEASE_SECS: std::ops::RangeInclusive<u64> = 6..=3600;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub backend: Backend,
    pub url_env: Option<String>,
    pub url_file: Option<PathBuf>,
    /// This relay's name among those sharing the database; the OS hostname when unset.
    pub instance: Option<String>,
    /// How long a dead relay's refresh lease and registration stay held.
    pub lease_secs: u64,
    /// The connection string, read from `url_env` or `url_file` when the config is resolved.
    #[serde(skip)]
    pub url: Option<Secret>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: Backend::Sled,
            url_env: None,
            url_file: None,
            instance: None,
            lease_secs: 60,
            url: None,
        }
    }
}

impl StoreConfig {
    pub fn shared(&self) -> bool {
        self.backend == Backend::Postgres
    }

    /// The name this relay registers under: `instance`, or the OS hostname.
    pub fn instance(&self) -> String {
        self.instance.clone().unwrap_or_else(crate::util::hostname)
    }

    pub fn lease(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.lease_secs)
    }

    /// What is wrong with the section as written (nothing read from outside the file).
    pub(super) fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let url_keys = self.url_env.is_some() as u8 + self.url_file.is_some() as u8;
        match self.backend {
            Backend::Sled if url_keys > 0 => out.push(
                "[store] url_env / url_file are set but backend = \"sled\" (the default): set backend = \
                 \"postgres\" to use the database, or remove them"
                    .to_string(),
            ),
            Backend::Postgres if url_keys != 1 => out.push(
                "[store] backend = \"postgres\" needs exactly one of url_env (the name of an environment \
                 variable holding the connection string) and url_file (a file holding it); the string itself \
                 never goes in this file"
                    .to_string(),
            ),
            _ => {}
        }
        if !LEASE_SECS.contains(&self.lease_secs) {
            out.push(format!(
                "[store] lease_secs = {}: use {} to {} seconds (the default, 60, suits most)",
                self.lease_secs,
                LEASE_SECS.start(),
                LEASE_SECS.end()
            ));
        }
        if let Some(name) = &self.instance {
            let ok = !name.is_empty()
                && name.len() <= 63
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                out.push(format!(
                    "[store] instance = {name:?}: use 1 to 63 letters, digits, '-', '_' or '.'"
                ));
            }
        }
        out
    }

    /// Reads the connection string from the environment or its file.
    pub(super) fn read_url(&mut self, env: &dyn Env) -> Result<(), String> {
        if self.backend != Backend::Postgres {
            return Ok(());
        }
        let url = if let Some(var) = &self.url_env {
            match env.var(var) {
                Some(v) if !v.trim().is_empty() => v.trim().to_string(),
                _ => {
                    return Err(format!(
                        "[store] url_env names {var}, which is not set; export it with the connection string \
                         (postgres://USER@HOST:5432/DB?sslmode=verify-full), e.g. in the unit's EnvironmentFile"
                    ))
                }
            }
        } else if let Some(file) = &self.url_file {
            env.read_secret(file)
                .map(|v| v.trim().to_string())
                .map_err(|e| {
                    format!(
                        "[store] url_file {}: {e}; check the path and that the relay's user can read it",
                        file.display()
                    )
                })?
        } else {
            return Ok(());
        };
        self.url = Some(Secret::new(url));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_store_needs_one_place_for_its_url_and_sane_bounds() {
        let pg = |f: &dyn Fn(&mut StoreConfig)| {
            let mut s = StoreConfig {
                backend: Backend::Postgres,
                url_env: Some("DB".into()),
                ..StoreConfig::default()
            };
            f(&mut s);
            s.problems().join("\n")
        };
        assert_eq!(pg(&|_| {}), "");
        assert!(pg(&|s| s.url_env = None).contains("exactly one of url_env"));
        assert!(pg(&|s| s.url_file = Some("f".into())).contains("exactly one"));
        assert!(pg(&|s| s.lease_secs = 1).contains("lease_secs = 1"));
        assert!(pg(&|s| s.instance = Some("a b".into())).contains("instance"));
        let sled = StoreConfig {
            url_env: Some("DB".into()),
            ..StoreConfig::default()
        };
        assert!(sled.problems()[0].contains("backend = \"sled\""));
        assert!(!crate::util::hostname().is_empty());
    }
}
