//! Alerts before mail stops: a revoked grant, a token endpoint failing for a while, a grant about
//! to expire, the upstream refusing the account's token, a stuck queue, a bounce.
//!
//! Every configured channel (`[alerts] command`, `webhook_url`) gets every event as one JSON object
//! (`event`, `account`, `time`, `detail`, `hint`), never a token, password or body. One event kind
//! for one account fires at most once per `repeat_secs`, whether or not the channel took it: a
//! failing channel is logged and tried again at the next occurrence after that. Delivery runs in its
//! own task, so an alert never holds up mail.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::metrics::Metrics;
use crate::config::AlertsConfig;
use crate::util::clock::SharedClock;
use crate::util::sync::lock;

/// A command or webhook gets this long.
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    GrantRevoked,
    RefreshFailing,
    GrantExpiring,
    UpstreamAuthRejected,
    QueueStuck,
    MessageBounced,
    /// Spool data was found damaged (kept aside in `queue/corrupt/`).
    QueueCorrupt,
    /// A new grant (a rotated refresh token) could not be written to the database.
    GrantSaveFailed,
}

impl Event {
    pub const ALL: [Event; 8] = [
        Event::GrantRevoked,
        Event::RefreshFailing,
        Event::GrantExpiring,
        Event::UpstreamAuthRejected,
        Event::QueueStuck,
        Event::MessageBounced,
        Event::QueueCorrupt,
        Event::GrantSaveFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Event::GrantRevoked => "grant_revoked",
            Event::RefreshFailing => "refresh_failing",
            Event::GrantExpiring => "grant_expiring",
            Event::UpstreamAuthRejected => "upstream_auth_rejected",
            Event::QueueStuck => "queue_stuck",
            Event::MessageBounced => "message_bounced",
            Event::QueueCorrupt => "queue_corrupt",
            Event::GrantSaveFailed => "grant_save_failed",
        }
    }
}

#[derive(serde::Serialize)]
struct Payload<'a> {
    event: &'static str,
    account: &'a str,
    time: String,
    detail: &'a str,
    hint: &'a str,
}

pub struct Alerts {
    /// Both swapped by a reload; what fired stays remembered.
    config: arc_swap::ArcSwap<AlertsConfig>,
    webhook: arc_swap::ArcSwap<Option<reqwest::Client>>,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    fired: Mutex<HashMap<(Event, String), Instant>>,
}

impl Alerts {
    pub fn new(
        config: AlertsConfig,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> Result<Alerts, String> {
        let webhook = webhook_client(&config)?;
        Ok(Alerts {
            config: arc_swap::ArcSwap::from_pointee(config),
            webhook: arc_swap::ArcSwap::from_pointee(webhook),
            clock,
            metrics,
            fired: Mutex::new(HashMap::new()),
        })
    }

    /// The configured thresholds (`alert_after_secs`, `alert_queue_age_secs`).
    pub fn thresholds(&self) -> Arc<AlertsConfig> {
        self.config.load_full()
    }

    /// A reloaded `[alerts]`, with the webhook client [`webhook_client`] built for it.
    pub fn reconfigure(&self, config: AlertsConfig, webhook: Option<reqwest::Client>) {
        self.config.store(Arc::new(config));
        self.webhook.store(Arc::new(webhook));
    }

    /// Raises `event` for `account` unless it fired within `repeat_secs`; returns whether it fired.
    pub fn raise(&self, event: Event, account: &str, detail: &str, hint: &str) -> bool {
        let now = self.clock.now();
        let config = self.config.load_full();
        let repeat = Duration::from_secs(config.repeat_secs);
        {
            let mut fired = lock(&self.fired);
            let key = (event, account.to_string());
            if fired
                .get(&key)
                .is_some_and(|at| now.saturating_duration_since(*at) < repeat)
            {
                return false;
            }
            fired.insert(key, now);
        }
        self.metrics.alert(account, event.as_str());
        tracing::warn!(event = event.as_str(), account, detail, hint, "alert");
        let payload = Payload {
            event: event.as_str(),
            account,
            time: crate::util::clock::rfc3339(self.clock.unix()),
            detail,
            hint,
        };
        let json = serde_json::to_vec(&payload).unwrap_or_default();
        if let Some(command) = config.command.clone() {
            let json = json.clone();
            let event = event.as_str();
            tokio::spawn(async move {
                if let Err(e) = run_command(&command, &json).await {
                    tracing::warn!(event, command = %command.display(), error = %e, "alert command failed");
                }
            });
        }
        let webhook = self.webhook.load();
        if let (Some(client), Some(url)) = (webhook.as_ref(), &config.webhook_url) {
            let request = client
                .post(url)
                .header("content-type", "application/json")
                .body(json);
            let event = event.as_str();
            tokio::spawn(async move {
                match request.send().await {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => {
                        tracing::warn!(
                            event,
                            status = r.status().as_u16(),
                            "alert webhook refused the alert"
                        )
                    }
                    Err(e) => {
                        tracing::warn!(event, error = %e.without_url(), "alert webhook failed")
                    }
                }
            });
        }
        true
    }
}

/// The HTTP client for `webhook_url`, if one is set (public roots, no redirects, 30 s).
pub fn webhook_client(config: &AlertsConfig) -> Result<Option<reqwest::Client>, String> {
    if config.webhook_url.is_none() {
        return Ok(None);
    }
    crate::util::tls::http_client_builder(None, &[])?
        .timeout(CHANNEL_TIMEOUT)
        .build()
        .map(Some)
        .map_err(|e| format!("[alerts] webhook_url: {e}"))
}

/// Runs `command` with `json` on its stdin, killed after [`CHANNEL_TIMEOUT`].
async fn run_command(command: &std::path::Path, json: &[u8]) -> Result<(), String> {
    // Not the relay's environment: client secrets may be passed to it in variables.
    let keep = ["PATH", "LANG", "HOME", "TZ"]
        .into_iter()
        .filter_map(|k| std::env::var_os(k).map(|v| (k, v)));
    let mut child = tokio::process::Command::new(command)
        .env_clear()
        .envs(keep)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let run = async {
        // A command that does not read its input must not make the write fail the alert.
        let _ = stdin.write_all(json).await;
        drop(stdin);
        child.wait().await
    };
    match tokio::time::timeout(CHANNEL_TIMEOUT, run).await {
        Err(_) => Err(format!("killed after {}s", CHANNEL_TIMEOUT.as_secs())),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("exited with {status}")),
    }
}
