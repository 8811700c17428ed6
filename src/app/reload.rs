//! Hot reload (`SIGHUP`, `xoauth-relay reload`): the config file read again and put in force for
//! new sessions and new upstream connections, while sessions in progress finish on what they
//! started with.
//!
//! The candidate is parsed, resolved and its TLS material loaded before anything changes, so an
//! invalid file is refused whole and the running config stays. What a running process cannot
//! change (listener addresses, `data_dir`, `key_file`, the control socket, the metrics address,
//! the hostname) refuses the file too, saying a restart is needed. One reload runs at a time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::preflight::{client_tls, server_tls};
use super::{notify, Services};
use crate::admin::AdminContext;
use crate::config::Config;
use crate::inbound::shared::{Live, Shared};
use crate::util::sync::lock;

pub struct Reloader {
    shared: Arc<Shared>,
    admin: Arc<AdminContext>,
    services: Arc<Services>,
    /// A digest of the certificate and key files as last loaded, to tell whether they changed
    /// (a digest: the key itself is not kept around for this).
    tls_files: Mutex<Vec<u8>>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

fn tls_files(config: &Config) -> Vec<u8> {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    for path in [&config.tls.certificate, &config.tls.private_key] {
        digest.update(&std::fs::read(path).unwrap_or_default());
    }
    digest.finish().as_ref().to_vec()
}

impl Reloader {
    pub fn new(
        shared: Arc<Shared>,
        admin: Arc<AdminContext>,
        services: Arc<Services>,
        config: &Config,
    ) -> Reloader {
        Reloader {
            shared,
            admin,
            services,
            tls_files: Mutex::new(tls_files(config)),
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// Reads the file again and puts it in force; `Ok` says what changed, `Err` why nothing did
    /// (logged here either way, whether SIGHUP or `reload` asked).
    /// `requested`: the file the caller means (`reload --config`); another file than the one this
    /// relay reads is refused, naming both (SIGHUP passes none).
    pub async fn reload(&self, requested: Option<std::path::PathBuf>) -> Result<String, String> {
        let own = self.shared.live.load().config.path.clone();
        if let Some(requested) = requested {
            let same = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or(p.to_path_buf());
            if same(&requested) != same(&own) {
                return Err(format!(
                    "nothing reloaded: the running relay reads {}, not {}; run `xoauth-relay --config {} \
                     reload`, or restart the relay on the other file",
                    own.display(),
                    requested.display(),
                    own.display()
                ));
            }
        }
        let _one = self.one_at_a_time.lock().await;
        let done = self.reload_now().await;
        if let Err(e) = &done {
            tracing::error!(error = %e, "reload refused");
        }
        done
    }

    async fn reload_now(&self) -> Result<String, String> {
        let old = self.shared.live.load_full();
        let path = old.config.path.clone();
        let (new, server, client, webhook, http, files) = tokio::task::spawn_blocking(move || {
            let new = Config::load(&path).map_err(|e| e.to_string())?;
            let server = server_tls(&new)?;
            let client = client_tls(&new)?;
            let webhook = crate::observe::alerts::webhook_client(&new.alerts)?;
            let http = crate::oauth::http::HttpClients::new(&new)?;
            let files = tls_files(&new);
            Ok::<_, String>((new, server, client, webhook, http, files))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("config not reloaded, the running one stays: {e}"))?;
        if let Some(what) = needs_restart(&old.config, &new) {
            return Err(format!(
                "config not reloaded, the running one stays: {what} changed, which needs a restart \
                 (systemctl restart xoauth-relay)"
            ));
        }
        notify(sd_notify::NotifyState::Reloading);
        let new = Arc::new(new);
        let upstream = &self.services;
        let limits = &new.limits;
        let margin = Duration::from_secs(new.server.refresh_margin_secs);
        // The token endpoints first: an added account's first token comes through them.
        self.admin.http.replace(http);
        upstream.tokens.reconfigure(&new.accounts, margin);
        upstream.pool.reconfigure(&new.accounts, client, limits);
        upstream
            .api
            .reconfigure(crate::delivery::api::Settings::of(limits));
        upstream.pacers.reconfigure(&new.accounts);
        upstream.queue.reconfigure(&new.accounts, &new.delivery);
        upstream.activity.reconfigure(&new.accounts);
        upstream
            .delivery
            .set_pacing_wait(Duration::from_secs(limits.upstream_wait_secs));
        upstream
            .observer
            .alerts
            .reconfigure(new.alerts.clone(), webhook);
        upstream.observer.prepare(&new);
        self.shared
            .admission
            .set_limits(limits.max_connections, limits.max_connections_per_ip);
        let lockout = Duration::from_secs(limits.auth_lockout_secs);
        self.shared.lockout.set(
            limits.auth_failures_per_login,
            limits.auth_failures_per_ip,
            lockout,
        );
        let certificate_changed = {
            let mut last = lock(&self.tls_files);
            let changed = *last != files;
            *last = files;
            changed
        };
        let changes = describe(&old.config, &new, certificate_changed);
        self.shared.live.store(Arc::new(Live {
            authenticator: old
                .authenticator
                .with_accounts(&new.accounts, Duration::from_secs(limits.auth_cache_secs)),
            config: new.clone(),
            tls: server,
        }));
        self.admin.config.store(new);
        notify(sd_notify::NotifyState::Ready);
        tracing::info!(changes = %changes, "config reloaded");
        Ok(format!(
            "config reloaded from {}: {changes}\n",
            old.config.path.display()
        ))
    }
}

/// Reloads on every SIGHUP until the relay stops; a refused file is logged and changes nothing.
pub async fn on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    reloader: Arc<Reloader>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            got = hangup.recv() => {
                if got.is_none() {
                    return;
                }
                tracing::info!("SIGHUP: reloading the config");
                let _ = reloader.reload(None).await;
            }
        }
    }
}

/// The first setting that a running relay cannot take over.
fn needs_restart(old: &Config, new: &Config) -> Option<&'static str> {
    let listeners = |c: &Config| -> Vec<String> {
        c.listeners
            .iter()
            .map(|l| format!("{} {}", l.address, l.tls))
            .collect()
    };
    if listeners(old) != listeners(new) {
        Some("[[listeners]]")
    } else if old.server.data_dir != new.server.data_dir {
        Some("[server] data_dir")
    } else if old.key_file() != new.key_file() {
        Some("[server] key_file")
    } else if old.server.control_socket() != new.server.control_socket() {
        Some("[server] control_socket")
    } else if old.metrics != new.metrics {
        Some("[metrics] address")
    } else if old.server.hostname != new.server.hostname {
        Some("[server] hostname")
    } else if old.store != new.store {
        Some("[store]")
    } else {
        None
    }
}

/// The names of the fields whose values differ, compared by value through their serialized form:
/// names only, so that no value (a webhook URL may hold a token) reaches the log, and a field
/// added to a section is compared without anyone listing it here.
fn changed_keys<T: serde::Serialize>(old: &T, new: &T) -> Vec<String> {
    match (serde_json::to_value(old), serde_json::to_value(new)) {
        (Ok(serde_json::Value::Object(before)), Ok(serde_json::Value::Object(after))) => after
            .iter()
            .filter(|(key, value)| before.get(*key) != Some(*value))
            .map(|(key, _)| key.clone())
            .collect(),
        _ => Vec::new(),
    }
}

/// "accounts added: a; accounts changed: b; certificate" or "nothing".
fn describe(old: &Config, new: &Config, certificate: bool) -> String {
    let names = |c: &Config| -> Vec<String> { c.accounts.iter().map(|a| a.name.clone()).collect() };
    let (before, after) = (names(old), names(new));
    let added: Vec<&str> = after
        .iter()
        .filter(|n| !before.contains(n))
        .map(String::as_str)
        .collect();
    let removed: Vec<&str> = before
        .iter()
        .filter(|n| !after.contains(n))
        .map(String::as_str)
        .collect();
    let changed: Vec<&str> = new
        .accounts
        .iter()
        .filter(|a| old.account(&a.name).is_ok_and(|o| o != *a))
        .map(|a| a.name.as_str())
        .collect();
    let mut parts = Vec::new();
    for (what, list) in [
        ("accounts added", added),
        ("accounts removed", removed),
        ("accounts changed", changed),
    ] {
        if !list.is_empty() {
            parts.push(format!("{what}: {}", list.join(", ")));
        }
    }
    for (section, keys) in [
        ("[limits]", changed_keys(&old.limits, &new.limits)),
        ("[delivery]", changed_keys(&old.delivery, &new.delivery)),
        ("[alerts]", changed_keys(&old.alerts, &new.alerts)),
        ("[server]", changed_keys(&old.server, &new.server)),
    ] {
        if !keys.is_empty() {
            parts.push(format!("{section} {}", keys.join(", ")));
        }
    }
    if certificate || old.tls.certificate != new.tls.certificate {
        parts.push("TLS certificate".into());
    }
    if parts.is_empty() {
        "nothing changed".into()
    } else {
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_names_the_fields_that_differ_and_no_value() {
        let old = crate::config::AlertsConfig::default();
        let new = crate::config::AlertsConfig {
            webhook_url: Some("https://hooks.example/SECRET".into()),
            repeat_secs: old.repeat_secs + 1,
            ..old.clone()
        };
        let keys = changed_keys(&old, &new);
        assert_eq!(keys, ["repeat_secs", "webhook_url"]);
        assert!(changed_keys(&old, &old).is_empty());
    }
}
