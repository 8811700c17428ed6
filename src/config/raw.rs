//! The file as written: serde structures and the TOML parse, nothing else.
//!
//! A pure function of the text (no environment, no files), so a reload can parse a candidate file
//! without touching anything. Unknown keys are refused: a typo in a mail relay's config should stop
//! the start, not silently fall back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    AlertsConfig, ConfigError, DeliveryConfig, DeliveryMode, GrantKind, HeaderRecipients, Limits,
    ListenerConfig, Mechanism, MetricsConfig, ServerConfig, TlsConfig, TlsMode, TransportKind,
};
use crate::util::secret::Secret;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub alerts: AlertsConfig,
    #[serde(default)]
    pub store: super::StoreConfig,
    #[serde(default)]
    pub providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    pub accounts: Vec<RawAccount>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    /// `google` or `microsoft`: the family's endpoints, hints and limits for a table of any name.
    pub preset: Option<String>,
    pub transport: Option<TransportKind>,
    pub api_url: Option<String>,
    pub header_recipients: Option<HeaderRecipients>,
    pub token_url: Option<String>,
    pub authorize_url: Option<String>,
    pub device_authorization_url: Option<String>,
    pub revocation_url: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub client_secret_env: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    pub smtp_host: Option<String>,
    pub smtp_port: Option<u16>,
    pub smtp_tls: Option<TlsMode>,
    pub smtp_ca_file: Option<PathBuf>,
    pub http_ca_file: Option<PathBuf>,
    pub mechanism: Option<Mechanism>,
    pub tenant: Option<String>,
    pub redirect_port: Option<u16>,
    pub grant: Option<GrantKind>,
    pub service_account_key_file: Option<PathBuf>,
    pub client_certificate_file: Option<PathBuf>,
    pub client_private_key_file: Option<PathBuf>,
    pub max_upstream_connections: Option<usize>,
    pub upstream_proxy: Option<String>,
    pub max_messages_per_minute: Option<u32>,
    pub max_recipients_per_message: Option<u32>,
    pub max_messages_per_day: Option<u32>,
    pub max_recipients_per_day: Option<u32>,
}

impl RawProvider {
    pub fn pacing(&self) -> [Option<u32>; 4] {
        [
            self.max_messages_per_minute,
            self.max_recipients_per_message,
            self.max_messages_per_day,
            self.max_recipients_per_day,
        ]
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccount {
    pub name: String,
    pub login: Option<String>,
    pub password_hash: Option<Secret>,
    pub provider: String,
    pub mailbox: String,
    #[serde(default)]
    pub allowed_senders: Option<Vec<String>>,
    /// Devices that send without AUTH from these addresses or networks are this account's.
    #[serde(default)]
    pub sources: Vec<String>,
    pub grant: Option<GrantKind>,
    pub max_upstream_connections: Option<usize>,
    pub delivery: Option<DeliveryMode>,
    pub header_recipients: Option<HeaderRecipients>,
    pub max_messages_per_minute: Option<u32>,
    pub max_recipients_per_message: Option<u32>,
    pub max_messages_per_day: Option<u32>,
    pub max_recipients_per_day: Option<u32>,
}

impl RawAccount {
    pub fn pacing(&self) -> [Option<u32>; 4] {
        [
            self.max_messages_per_minute,
            self.max_recipients_per_message,
            self.max_messages_per_day,
            self.max_recipients_per_day,
        ]
    }
}

impl std::fmt::Debug for RawAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawAccount")
            .field("name", &self.name)
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

/// Parses the file's text; errors carry `path:line:col`.
pub fn parse(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    // serde stops at the first unknown key: each one found is blanked out (its line kept, so the
    // positions of the others stay right) and the text parsed again, so that one `check` names
    // every typo. Any other error ends the search.
    const MAX_REPORTED: usize = 50;
    let mut text = text.to_string();
    let mut errors = Vec::new();
    loop {
        let e = match toml::from_str(&text) {
            Ok(raw) if errors.is_empty() => return Ok(raw),
            Ok(_) => break,
            Err(e) => e,
        };
        let unknown_key = e.message().starts_with("unknown field `");
        if !unknown_key && !errors.is_empty() {
            // Perhaps only what blanking a multi-line value left behind: the typos are reported.
            break;
        }
        errors.push(describe(&e, &text, path));
        match e
            .span()
            .filter(|_| unknown_key && errors.len() < MAX_REPORTED)
        {
            Some(span) => blank_line_at(&mut text, span.start),
            None => break,
        }
    }
    Err(ConfigError(errors.join("\n")))
}

/// One parse error with `path:line:col`, and a hint where one helps.
fn describe(e: &toml::de::Error, text: &str, path: &Path) -> String {
    // Line and column only: the parser's own message quotes the source line, which may hold
    // a client secret.
    let at = e
        .span()
        .map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(":{line}:{col}")
        })
        .unwrap_or_default();
    let mut msg = format!("{}{at}: {}", path.display(), e.message().trim_end());
    if let Some(near) = nearest_field(e.message()) {
        msg.push_str(&format!(" (did you mean `{near}`?)"));
    }
    if msg.contains("invalid socket address") {
        msg.push_str(
            "\n(a listener address is an IP and a port, like 127.0.0.1:587 or 0.0.0.0:587)",
        );
    }
    msg
}

/// Replaces the line holding byte `at` with spaces (line breaks and lengths stay as they were).
fn blank_line_at(text: &mut String, at: usize) {
    let at = at.min(text.len());
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    text.replace_range(start..end, &" ".repeat(end - start));
}

/// For serde's "unknown field `max_recipents`, expected one of `a`, `b`, ...": the valid key
/// closest to the typo, when one is close enough to be what was meant.
fn nearest_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    let (unknown, expected) = rest.split_once('`')?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|k| (strsim::damerau_levenshtein(unknown, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}
