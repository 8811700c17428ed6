//! The one TOML file an operator writes: listeners, TLS, limits, providers and accounts.
//!
//! Three steps, each with one job: [`raw`] parses the text (pure serde), [`resolve`] applies presets
//! and validates (still pure: secrets are only *named*), and [`Config::resolve`] reads what lives
//! outside the file (environment variables, secret files, certificate paths) through an [`Env`]. A
//! reload can therefore parse, validate and diff a candidate without touching the running relay.
//! Every error names the key and says what to do. The rest of the program only ever sees a fully
//! resolved [`Provider`] and [`Account`], whose `Debug` output shows no secret or password hash.

mod advice;
mod paths;
pub mod raw;
pub mod resolve;
mod sources;
pub mod store;

pub use paths::{Anchored, RelayAddress};
pub use store::{Backend, StoreConfig};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::util::secret::Secret;

/// A configuration problem, worded for the operator who has to fix it.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

pub(crate) fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub hostname: String,
    pub data_dir: PathBuf,
    pub key_file: Option<PathBuf>,
    pub control_socket: Option<PathBuf>,
    pub require_tls_for_auth: bool,
    pub allow_plaintext_loopback: bool,
    /// Refresh an access token this many seconds before it expires.
    pub refresh_margin_secs: u64,
    /// A refresh-token grant unused this many days is refreshed once in the background, so a quiet
    /// account never reaches the provider's inactivity expiry (Microsoft: 90 days).
    pub keepalive_days: u64,
    /// Upstream SMTP through a proxy: `socks5://[user@]host:port` or `http://[user@]host:port`
    /// (HTTP CONNECT); a provider's own `upstream_proxy` wins ("direct" for none).
    pub upstream_proxy: Option<String>,
    /// The proxy user's password, from exactly one of these.
    pub upstream_proxy_password_env: Option<String>,
    pub upstream_proxy_password_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hostname: "localhost".into(),
            data_dir: PathBuf::from("data"),
            key_file: None,
            control_socket: None,
            require_tls_for_auth: true,
            allow_plaintext_loopback: true,
            refresh_margin_secs: 300,
            keepalive_days: 7,
            upstream_proxy: None,
            upstream_proxy_password_env: None,
            upstream_proxy_password_file: None,
        }
    }
}

impl ServerConfig {
    pub fn control_socket(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("control.sock"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Starttls,
    Implicit,
    None,
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsMode::Starttls => "starttls",
            TlsMode::Implicit => "implicit",
            TlsMode::None => "none",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    pub tls: TlsMode,
}

impl ListenerConfig {
    /// Whether any of `listeners` needs the `[tls]` certificate and key.
    pub fn any_tls(listeners: &[ListenerConfig]) -> bool {
        listeners.iter().any(|l| l.tls != TlsMode::None)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            certificate: PathBuf::from("certs/relay.crt"),
            private_key: PathBuf::from("certs/relay.key"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub idle_timeout_secs: u64,
    /// Deadline for each step of the upstream dialogue (connect, TLS, each reply).
    pub upstream_timeout_secs: u64,
    /// A pooled upstream connection unused this long is closed (QUIT).
    pub upstream_idle_secs: u64,
    /// How long a message waits for one of the account's upstream connections before `451 4.4.5`.
    pub upstream_wait_secs: u64,
    /// A verified login is remembered this long (0: every AUTH runs argon2).
    pub auth_cache_secs: u64,
    /// Implicit TLS and STARTTLS handshakes must finish within this.
    pub tls_handshake_timeout_secs: u64,
    /// A connection that has not authenticated by then gets `421 4.4.2`.
    pub preauth_timeout_secs: u64,
    /// Connections from one address at once; more get `421 4.7.0` (loopback counts too).
    pub max_connections_per_ip: usize,
    /// Error replies in a session before `421 4.7.0` and close (Postfix's hard error limit).
    pub max_errors_per_session: u32,
    /// Failed logins of one login from one address within 10 minutes before that login is
    /// refused from there (0: never). A session counts each credential it tries once.
    pub auth_failures_per_login: usize,
    /// Failed logins from one address, across logins, within 10 minutes before the address is
    /// locked out at the greeting (0: never): against guessing many logins.
    pub auth_failures_per_ip: usize,
    /// How long a locked-out address gets `421 4.7.0`.
    pub auth_lockout_secs: u64,
    /// A bare CR or LF in a message body: made CRLF on the way upstream, or the message refused.
    pub bare_line_endings: BareLineEndings,
}

/// `[limits] bare_line_endings`: what a CR or LF outside a CRLF pair in a body comes to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BareLineEndings {
    /// Passed on as CRLF (RFC 5321 §2.3.8 asks it of an SMTP client), so it cannot end the
    /// message at the upstream.
    #[default]
    #[serde(alias = "normalise")]
    Normalize,
    /// `554 5.5.2` at the end of such a message (Postfix's `smtpd_forbid_bare_newline`).
    Reject,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 36_700_160,
            max_recipients: 100,
            max_connections: 1000,
            idle_timeout_secs: 300,
            upstream_timeout_secs: 60,
            upstream_idle_secs: 60,
            upstream_wait_secs: 60,
            auth_cache_secs: 300,
            tls_handshake_timeout_secs: 10,
            preauth_timeout_secs: 60,
            max_connections_per_ip: 50,
            max_errors_per_session: 10,
            auth_failures_per_login: 10,
            auth_failures_per_ip: 50,
            auth_lockout_secs: 600,
            bare_line_endings: BareLineEndings::Normalize,
        }
    }
}

/// How an account's messages go upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// While the mailer waits: a `250` means the upstream said `250`.
    Direct,
    /// Into the spool first: a `250` means it is on disk and will be delivered or returned.
    Queue,
}

/// `[delivery]`: the default mode and the queue's schedule.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub mode: DeliveryMode,
    /// First retry after a temporary failure; doubling (with jitter) up to `retry_max_secs`.
    pub retry_min_secs: u64,
    pub retry_max_secs: u64,
    /// Recipients still pending after this long are bounced.
    pub max_queue_age_secs: u64,
    /// An account that got a provider quota reply waits this long (unless the reply names a time).
    pub quota_pause_secs: u64,
    /// Queue mode answers `452 4.3.1` at MAIL while the filesystem of `data_dir` has less free
    /// space than this (Postfix's `queue_minfree`), so that a rotated refresh token always finds
    /// room. Default: 5% of the filesystem, at most 1 GiB.
    pub min_free_bytes: Option<u64>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            mode: DeliveryMode::Direct,
            retry_min_secs: 60,
            retry_max_secs: 3600,
            max_queue_age_secs: 432_000,
            quota_pause_secs: 3600,
            min_free_bytes: None,
        }
    }
}

/// `[metrics]`: the HTTP endpoint for Prometheus and health checks (absent: off).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub address: Option<SocketAddr>,
}

/// `[alerts]`: where events go and when they fire.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Run with the event as JSON on stdin.
    pub command: Option<PathBuf>,
    /// POSTed the event as JSON; https except on loopback.
    pub webhook_url: Option<String>,
    /// One event kind for one account fires at most this often.
    pub repeat_secs: u64,
    /// `refresh_failing`: the token endpoint has failed this long for an account.
    pub alert_after_secs: u64,
    /// `queue_stuck`: the oldest queued message is older than this.
    pub alert_queue_age_secs: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            command: None,
            webhook_url: None,
            repeat_secs: 3600,
            alert_after_secs: 600,
            alert_queue_age_secs: 3600,
        }
    }
}

/// What a provider accepts from one mailbox; 0 means no limit. Set on a provider (presets for
/// `microsoft` and `google`) and overridden per account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Pacing {
    pub max_messages_per_minute: u32,
    pub max_recipients_per_message: u32,
    pub max_messages_per_day: u32,
    pub max_recipients_per_day: u32,
}

impl Pacing {
    /// `overrides` in field order; a key that is set wins.
    pub fn with(self, overrides: [Option<u32>; 4]) -> Pacing {
        let [a, b, c, d] = overrides;
        Pacing {
            max_messages_per_minute: a.unwrap_or(self.max_messages_per_minute),
            max_recipients_per_message: b.unwrap_or(self.max_recipients_per_message),
            max_messages_per_day: c.unwrap_or(self.max_messages_per_day),
            max_recipients_per_day: d.unwrap_or(self.max_recipients_per_day),
        }
    }

    /// "30/min, 500 rcpt/msg, 10000 rcpt/day" (limits that are set only), or "none".
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [
            (self.max_messages_per_minute, "msg/min"),
            (self.max_recipients_per_message, "rcpt/msg"),
            (self.max_messages_per_day, "msg/day"),
            (self.max_recipients_per_day, "rcpt/day"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n} {unit}"))
        .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    Xoauth2,
    Oauthbearer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    RefreshToken,
    ClientCredentials,
    ServiceAccount,
}

impl GrantKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantKind::RefreshToken => "refresh_token",
            GrantKind::ClientCredentials => "client_credentials",
            GrantKind::ServiceAccount => "service_account",
        }
    }
}

/// Which provider family a provider belongs to; drives error hints and flow quirks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Google,
    Microsoft,
    Generic,
}

/// How a provider's messages go upstream (`transport`): SMTP with XOAUTH2 / OAUTHBEARER, or an
/// HTTP API for tenants where SMTP AUTH is off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    #[default]
    Smtp,
    /// Microsoft Graph `sendMail` (and drafts with upload sessions for large messages).
    Graph,
    /// The Gmail API's `messages.send` (media upload of the raw message).
    GmailApi,
}

impl TransportKind {
    pub fn is_api(self) -> bool {
        self != TransportKind::Smtp
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Smtp => "smtp",
            TransportKind::Graph => "graph",
            TransportKind::GmailApi => "gmail_api",
        }
    }

    /// Where the API is when `api_url` is not set.
    pub fn default_api_url(self) -> &'static str {
        match self {
            TransportKind::Smtp => "",
            TransportKind::Graph => "https://graph.microsoft.com/v1.0",
            TransportKind::GmailApi => "https://gmail.googleapis.com",
        }
    }
}

/// `header_recipients`: what an API transport does with an address in `To`/`Cc`/`Bcc` that the
/// mailer did not give in `RCPT` (the APIs deliver to the header addresses, not to an envelope).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderRecipients {
    /// The message is refused (`554 5.7.0`): it cannot be delivered exactly as the envelope says.
    #[default]
    Refuse,
    /// Those addresses are taken out of the submitted copy's headers.
    Strip,
}

impl HeaderRecipients {
    pub fn as_str(self) -> &'static str {
        match self {
            HeaderRecipients::Refuse => "refuse",
            HeaderRecipients::Strip => "strip",
        }
    }
}

/// Where and how a provider's SMTP server is reached; pooled connections are not reused once
/// any of it changes (compared by value: a field added here is compared too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpUpstream {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    /// Extra CA (PEM) trusted for the SMTP server, besides the public roots.
    pub ca_file: Option<PathBuf>,
    pub mechanism: Mechanism,
    /// The proxy its connections go through, if any.
    pub proxy: Option<UpstreamProxy>,
}

/// A provider with every preset and override applied and its client secret read.
#[derive(Clone, PartialEq)]
pub struct Provider {
    pub name: String,
    pub family: Family,
    pub token_url: String,
    pub authorize_url: Option<String>,
    pub device_authorization_url: Option<String>,
    pub revocation_url: Option<String>,
    pub scopes: Vec<String>,
    pub client_id: String,
    /// Where the client secret comes from; [`Config::resolve`] reads it into `client_secret`.
    pub secret_source: Option<SecretSource>,
    pub client_secret: Option<Secret>,
    pub smtp: SmtpUpstream,
    /// SMTP, or an HTTP API (`api_url` then says where).
    pub transport: TransportKind,
    /// The API's base URL (empty for SMTP).
    pub api_url: String,
    /// The provider's default for its accounts.
    pub header_recipients: HeaderRecipients,
    /// Extra CA (PEM) trusted for the provider's token, device and revocation endpoints (and its API).
    pub http_ca_file: Option<PathBuf>,
    pub redirect_port: Option<u16>,
    pub grant: GrantKind,
    pub service_account_key_file: Option<PathBuf>,
    pub client_certificate_file: Option<PathBuf>,
    pub client_private_key_file: Option<PathBuf>,
    /// Upstream connections open at once per account (Exchange Online refuses a fourth per mailbox).
    pub max_upstream_connections: usize,
    pub pacing: Pacing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    Socks5,
    HttpConnect,
}

/// A proxy for upstream SMTP connections.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamProxy {
    pub kind: ProxyKind,
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    /// Read by [`Config::resolve`] from `upstream_proxy_password_env` / `_file`.
    pub password: Option<Secret>,
}

impl std::fmt::Debug for UpstreamProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}:{}", self.kind, self.host, self.port)
    }
}

impl UpstreamProxy {
    /// Parses `socks5://[user@]host:port` or `http://[user@]host:port`.
    pub fn parse(text: &str) -> Result<UpstreamProxy, String> {
        let url = url::Url::parse(text).map_err(|e| format!("\"{text}\" is not a URL ({e})"))?;
        let kind = match url.scheme() {
            "socks5" | "socks5h" => ProxyKind::Socks5,
            "http" => ProxyKind::HttpConnect,
            other => {
                return Err(format!(
                    "scheme `{other}` is not supported; use socks5://host:port or http://host:port"
                ))
            }
        };
        if url.password().is_some() {
            return Err(
                "put the proxy password in upstream_proxy_password_env or _file, not in the URL"
                    .into(),
            );
        }
        let host = url
            .host_str()
            .ok_or("no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url
            .port()
            .ok_or("no port; write it out, like socks5://proxy.corp:1080")?;
        let user = (!url.username().is_empty()).then(|| url.username().to_string());
        Ok(UpstreamProxy {
            kind,
            host,
            port,
            user,
            password: None,
        })
    }
}

impl std::fmt::Debug for Provider {
    // By hand so that the client secret can never reach a log through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("token_url", &self.token_url)
            .field(
                "smtp",
                &format_args!("{}:{}", self.smtp.host, self.smtp.port),
            )
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

/// One mailer identity mapped to one provider grant (compared by value: a reload that changes
/// any of it, the password hash included, changes the account).
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub name: String,
    pub login: String,
    /// argon2id PHC string; a `Secret` so that `{:?}` of an account cannot print it. None for an
    /// account of devices only (`sources` without a password): nobody logs in as it.
    pub password_hash: Option<Secret>,
    pub provider: Arc<Provider>,
    pub mailbox: String,
    pub allowed_senders: Option<Vec<String>>,
    /// Addresses whose sessions are this account's without AUTH (printers, scanners, old apps).
    pub sources: Vec<ipnet::IpNet>,
    pub grant: GrantKind,
    /// The provider's `max_upstream_connections` unless the account sets its own.
    pub max_upstream_connections: usize,
    /// The provider's limits with the account's overrides.
    pub pacing: Pacing,
    /// `delivery` of the account, else `[delivery] mode`.
    pub delivery: DeliveryMode,
    /// The account's `header_recipients`, else its provider's.
    pub header_recipients: HeaderRecipients,
}

impl Account {
    /// Where the account's messages go: "smtp.office365.com:587" or the API's URL.
    pub fn endpoint(&self) -> String {
        let p = &self.provider;
        match p.transport {
            TransportKind::Smtp => format!("{}:{}", p.smtp.host, p.smtp.port),
            _ => p.api_url.clone(),
        }
    }
}

impl Account {
    /// An account that is no longer configured but still has queued mail: it delivers that mail
    /// through `provider` as `mailbox`, with the grant stored under `name`. Nobody can log in as
    /// it (no login, no password).
    pub fn retired(
        name: &str,
        provider: Arc<Provider>,
        mailbox: &str,
        grant: Option<GrantKind>,
    ) -> Account {
        Account {
            name: name.to_string(),
            login: String::new(),
            password_hash: None,
            sources: Vec::new(),
            grant: grant.unwrap_or(provider.grant),
            max_upstream_connections: provider.max_upstream_connections,
            pacing: provider.pacing,
            header_recipients: provider.header_recipients,
            provider,
            mailbox: mailbox.to_string(),
            allowed_senders: None,
            delivery: DeliveryMode::Queue,
        }
    }
}

impl Provider {
    /// Stands in for a provider that is no longer configured (nothing can be sent through it).
    pub fn missing(name: &str) -> Provider {
        Provider {
            name: name.to_string(),
            family: Family::Generic,
            token_url: String::new(),
            authorize_url: None,
            device_authorization_url: None,
            revocation_url: None,
            scopes: Vec::new(),
            client_id: String::new(),
            secret_source: None,
            client_secret: None,
            smtp: SmtpUpstream {
                host: String::new(),
                port: 0,
                tls: TlsMode::Implicit,
                ca_file: None,
                mechanism: Mechanism::Xoauth2,
                proxy: None,
            },
            transport: TransportKind::Smtp,
            api_url: String::new(),
            header_recipients: HeaderRecipients::Refuse,
            http_ca_file: None,
            redirect_port: None,
            grant: GrantKind::RefreshToken,
            service_account_key_file: None,
            client_certificate_file: None,
            client_private_key_file: None,
            max_upstream_connections: 1,
            pacing: Pacing::default(),
        }
    }
}

/// Where a provider's client secret is read from.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    Inline(Secret),
    Env(String),
    File(PathBuf),
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("Inline([redacted])"),
            SecretSource::Env(v) => write!(f, "Env({v})"),
            SecretSource::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

/// What resolving a config may read from outside the file; a trait so tests and a reload dry run
/// can supply their own.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
    fn read_secret(&self, path: &Path) -> std::io::Result<String>;
    fn exists(&self, path: &Path) -> bool;
}

/// The process environment and the real filesystem.
pub struct SystemEnv;

impl Env for SystemEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn read_secret(&self, path: &Path) -> std::io::Result<String> {
        read_secret_file(path)
    }

    fn exists(&self, path: &Path) -> bool {
        std::fs::metadata(path).is_ok()
    }
}

/// The whole resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    /// Every path the file gave relative, now taken from the file's directory.
    pub anchored: Vec<Anchored>,
    pub server: ServerConfig,
    pub listeners: Vec<ListenerConfig>,
    pub tls: TlsConfig,
    pub limits: Limits,
    pub delivery: DeliveryConfig,
    pub metrics: MetricsConfig,
    pub alerts: AlertsConfig,
    pub store: StoreConfig,
    pub providers: BTreeMap<String, Arc<Provider>>,
    pub accounts: Vec<Arc<Account>>,
}

impl Config {
    /// Reads, parses, validates and resolves the file at `path` against the real environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!(
                "cannot read config file {}: {e}; pass --config PATH (or set XOAUTH_RELAY_CONFIG), \
                 starting from config/relay.example.toml",
                path.display()
            ))
        })?;
        // Absolute, so that the running relay and a command run elsewhere name the same file.
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let config = Config::parse(&text, &path)?;
        config.moved_paths()?;
        config.resolve(&SystemEnv)
    }

    /// Parses and validates the text: a pure function (secrets named, not read).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        resolve::build(raw::parse(text, path)?, path)
    }

    /// Reads what the file only names: client secrets from env vars or files; checks that the files
    /// it points at exist.
    pub fn resolve(self, env: &dyn Env) -> Result<Config, ConfigError> {
        resolve::external(self, env)
    }

    pub fn account(&self, name: &str) -> Result<&Arc<Account>, ConfigError> {
        self.accounts
            .iter()
            .find(|a| a.name == name)
            .ok_or_else(|| {
                ConfigError(format!(
                    "no account named `{name}` in {}; `xoauth-relay accounts` lists them",
                    self.path.display()
                ))
            })
    }
}

/// Reads a secret from a file; one trailing newline is not part of it.
pub fn read_secret_file(path: &Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    Ok(strip_one_newline(text))
}

/// Removes one trailing `\n` or `\r\n`: what `echo` or an editor adds is not part of a secret.
pub fn strip_one_newline(mut s: String) -> String {
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    s
}

/// A minimal valid config for unit tests elsewhere: one account `news` (mailbox news@example.com)
/// with `login` and `password_hash`, on a loopback provider `p`.
#[cfg(test)]
pub(crate) fn one_account(login: &str, password_hash: &str) -> Config {
    let text = format!(
        r#"
[[listeners]]
address = "127.0.0.1:0"
tls = "none"

[providers.p]
token_url = "http://127.0.0.1:1/token"
authorize_url = "http://127.0.0.1:1/authorize"
client_id = "c"
smtp_host = "localhost"
smtp_tls = "none"

[[accounts]]
name = "news"
login = "{login}"
password_hash = "{password_hash}"
provider = "p"
mailbox = "news@example.com"
"#
    );
    Config::parse(&text, Path::new("test.toml")).expect("the test config is valid")
}

#[cfg(test)]
mod tests;
