//! The one TOML file an operator writes: listeners, TLS, limits, providers and accounts.
//!
//! Parsing is strict (unknown keys are refused) because a typo in a mail relay's config should stop the
//! start, not silently fall back to a default. Every error names the key and says what to do.
//! Provider presets (`google`, `microsoft`) are merged here so that the rest of the program only ever
//! sees a fully resolved [`Provider`].

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

/// A configuration problem, worded for the operator who has to fix it.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: ServerConfig,
    #[serde(default)]
    listeners: Vec<ListenerConfig>,
    #[serde(default)]
    tls: TlsConfig,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    accounts: Vec<RawAccount>,
}

#[derive(Debug, Clone, Deserialize)]
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
        }
    }
}

impl ServerConfig {
    pub fn key_file(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("master.key"))
    }

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub idle_timeout_secs: u64,
    /// Deadline for each step of the upstream dialogue (connect, TLS, each reply).
    pub upstream_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 36_700_160,
            max_recipients: 100,
            max_connections: 1000,
            idle_timeout_secs: 300,
            upstream_timeout_secs: 60,
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

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    token_url: Option<String>,
    authorize_url: Option<String>,
    device_authorization_url: Option<String>,
    revocation_url: Option<String>,
    scopes: Option<Vec<String>>,
    client_id: Option<String>,
    client_secret: Option<crate::secret::Secret>,
    client_secret_env: Option<String>,
    client_secret_file: Option<PathBuf>,
    smtp_host: Option<String>,
    smtp_port: Option<u16>,
    smtp_tls: Option<TlsMode>,
    smtp_ca_file: Option<PathBuf>,
    mechanism: Option<Mechanism>,
    tenant: Option<String>,
    redirect_port: Option<u16>,
    grant: Option<GrantKind>,
    service_account_key_file: Option<PathBuf>,
    client_certificate_file: Option<PathBuf>,
    client_private_key_file: Option<PathBuf>,
}

/// Which provider family a provider belongs to; drives error hints and flow quirks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Google,
    Microsoft,
    Generic,
}

/// A provider with every preset and override applied and its client secret read.
#[derive(Clone)]
pub struct Provider {
    pub name: String,
    pub family: Family,
    pub token_url: String,
    pub authorize_url: Option<String>,
    pub device_authorization_url: Option<String>,
    pub revocation_url: Option<String>,
    pub scopes: Vec<String>,
    pub client_id: String,
    pub client_secret: Option<String>,
    pub smtp_host: String,
    pub smtp_port: u16,
    pub smtp_tls: TlsMode,
    pub smtp_ca_file: Option<PathBuf>,
    pub mechanism: Mechanism,
    pub redirect_port: Option<u16>,
    pub grant: GrantKind,
    pub service_account_key_file: Option<PathBuf>,
    pub client_certificate_file: Option<PathBuf>,
    pub client_private_key_file: Option<PathBuf>,
}

impl std::fmt::Debug for Provider {
    // By hand so that the client secret can never reach a log through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("token_url", &self.token_url)
            .field(
                "smtp",
                &format_args!("{}:{}", self.smtp_host, self.smtp_port),
            )
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    name: String,
    login: Option<String>,
    password_hash: Option<String>,
    provider: String,
    mailbox: String,
    #[serde(default)]
    allowed_senders: Option<Vec<String>>,
    grant: Option<GrantKind>,
}

/// One mailer identity mapped to one provider grant.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: String,
    pub login: String,
    pub password_hash: String,
    pub provider: Arc<Provider>,
    pub mailbox: String,
    pub allowed_senders: Option<Vec<String>>,
    pub grant: GrantKind,
}

/// Whether MAIL FROM `sender` matches `allowed` (exact addresses or `*@domain`, case-insensitive);
/// no list means any sender.
pub fn sender_allowed(allowed: Option<&[String]>, sender: &str) -> bool {
    let Some(list) = allowed else {
        return true;
    };
    let sender = sender.to_ascii_lowercase();
    list.iter().any(|pattern| {
        let pattern = pattern.to_ascii_lowercase();
        match pattern.strip_prefix("*@") {
            Some(domain) => sender.rsplit_once('@').is_some_and(|(_, d)| d == domain),
            None => pattern == sender,
        }
    })
}

/// The whole resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub server: ServerConfig,
    pub listeners: Vec<ListenerConfig>,
    pub tls: TlsConfig,
    pub limits: Limits,
    pub providers: BTreeMap<String, Arc<Provider>>,
    pub accounts: Vec<Arc<Account>>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!(
                "cannot read config file {}: {e}; pass --config PATH (or set XOAUTH_RELAY_CONFIG), \
                 starting from config/relay.example.toml",
                path.display()
            ))
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
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
            if msg.contains("invalid socket address") {
                msg.push_str(
                    "\n(a listener address is an IP and a port, like 127.0.0.1:587 or 0.0.0.0:587)",
                );
            }
            ConfigError(msg)
        })?;
        // Relative paths in the file are relative to the directory the relay runs in, like the
        // documented `cargo run -- serve --config config/relay.example.toml`.
        let mut providers = BTreeMap::new();
        let mut names: Vec<String> = raw.providers.keys().cloned().collect();
        for preset in ["google", "microsoft"] {
            if !raw.providers.contains_key(preset) {
                names.push(preset.to_string());
            }
        }
        for name in names {
            let overrides = raw.providers.get(&name).cloned();
            let used = raw.accounts.iter().any(|a| a.provider == name);
            if overrides.is_none() && !used {
                continue;
            }
            let p = resolve_provider(&name, overrides.unwrap_or_default())?;
            providers.insert(name, Arc::new(p));
        }

        let mut accounts = Vec::new();
        let mut seen_names = HashSet::new();
        let mut seen_logins: std::collections::HashMap<String, String> = Default::default();
        for a in raw.accounts {
            let what = format!("account `{}`", a.name);
            if a.name.is_empty() || a.name.contains(char::is_whitespace) {
                return err(format!(
                    "{what}: `name` must be a non-empty word without spaces"
                ));
            }
            if !seen_names.insert(a.name.clone()) {
                return err(format!(
                    "{what}: two [[accounts]] have this name; names must be unique"
                ));
            }
            let login = a.login.clone().unwrap_or_else(|| a.name.clone());
            if let Some(other) = seen_logins.insert(login.clone(), a.name.clone()) {
                return err(format!(
                    "{what}: login `{login}` is already used by account `{other}`; give each account its own `login`"
                ));
            }
            let Some(password_hash) = a.password_hash else {
                return err(format!(
                    "{what}: `password_hash` is missing; create one with `xoauth-relay hash-password` and paste it in"
                ));
            };
            if let Err(e) = argon2::PasswordHash::new(&password_hash) {
                return err(format!(
                    "{what}: `password_hash` is not a PHC string ({e}); create one with `xoauth-relay hash-password`"
                ));
            }
            let Some(provider) = providers.get(&a.provider).cloned() else {
                return err(format!(
                    "{what}: provider `{}` is not defined; add a [providers.{}] table or use `google` / `microsoft`",
                    a.provider, a.provider
                ));
            };
            if !a.mailbox.contains('@') {
                return err(format!(
                    "{what}: `mailbox` must be the upstream address, like news@example.com"
                ));
            }
            let grant = a.grant.unwrap_or(provider.grant);
            if grant == GrantKind::ClientCredentials
                && provider.grant != GrantKind::ClientCredentials
                && provider.family == Family::Microsoft
            {
                return err(format!(
                    "{what}: grant = \"client_credentials\" must be set on [providers.microsoft] (it changes the scope \
                     to https://outlook.office365.com/.default); use a separate provider table for app-only accounts"
                ));
            }
            if grant == GrantKind::ClientCredentials
                && provider.family == Family::Microsoft
                && provider.token_url.contains("/common/")
            {
                return err(format!(
                    "{what}: app-only (client_credentials) tokens need your tenant: set `tenant` (id or domain) in \
                     [providers.microsoft]"
                ));
            }
            if grant == GrantKind::ClientCredentials && provider.family == Family::Google {
                return err(format!(
                    "{what}: Google has no client-credentials grant for Gmail; use grant = \"service_account\" \
                     (Workspace domain-wide delegation) or a user grant from `xoauth-relay authorize`"
                ));
            }
            if grant == GrantKind::RefreshToken
                && provider.family == Family::Google
                && provider.client_secret.is_none()
            {
                return err(format!(
                    "{what}: Google's token endpoint needs the OAuth client's secret (Desktop app clients have one too); \
                     set client_secret_env, client_secret_file or client_secret in [providers.google]"
                ));
            }
            for pattern in a.allowed_senders.iter().flatten() {
                let domain_wildcard = pattern
                    .strip_prefix("*@")
                    .is_some_and(|d| !d.is_empty() && !d.contains(['*', '@']));
                let address = !pattern.contains('*') && pattern.matches('@').count() == 1;
                if !(domain_wildcard || address) {
                    return err(format!(
                        "{what}: allowed_senders entry \"{pattern}\" is neither an address (news@example.com) nor \
                         a whole domain (*@example.com)"
                    ));
                }
            }
            if grant == GrantKind::ServiceAccount && provider.service_account_key_file.is_none() {
                return err(format!(
                    "{what}: grant = \"service_account\" needs `service_account_key_file` in [providers.{}]",
                    provider.name
                ));
            }
            accounts.push(Arc::new(Account {
                name: a.name,
                login,
                password_hash,
                provider,
                mailbox: a.mailbox,
                allowed_senders: a.allowed_senders,
                grant,
            }));
        }

        if raw.limits.max_message_bytes == 0 || raw.limits.max_recipients == 0 {
            return err("[limits]: max_message_bytes and max_recipients must be greater than 0");
        }
        if raw.server.refresh_margin_secs > 1800 {
            return err("[server]: refresh_margin_secs must be at most 1800 (access tokens live about an hour)");
        }
        if raw.limits.max_connections == 0 {
            return err("[limits]: max_connections must be greater than 0");
        }
        if raw.listeners.is_empty() {
            return err(format!(
                "{}: no [[listeners]] configured; add one, like address = \"127.0.0.1:587\", tls = \"starttls\"",
                path.display()
            ));
        }
        let mut addrs = HashSet::new();
        for l in &raw.listeners {
            if l.tls == TlsMode::None
                && raw.server.require_tls_for_auth
                && !raw.server.allow_plaintext_loopback
            {
                return err(format!(
                    "[[listeners]] {}: tls = \"none\" but require_tls_for_auth = true and allow_plaintext_loopback = false, \
                     so no mailer could ever authenticate there; use tls = \"starttls\" or allow loopback clients",
                    l.address
                ));
            }
            if l.address.port() != 0 && !addrs.insert(l.address) {
                return err(format!(
                    "[[listeners]]: address {} is listed twice",
                    l.address
                ));
            }
        }
        if raw.listeners.iter().any(|l| l.tls != TlsMode::None)
            && raw.tls.certificate.exists() != raw.tls.private_key.exists()
        {
            return err(format!(
                "[tls]: only one of certificate ({}) and private_key ({}) exists; provide both, or remove both to \
                 have a self-signed pair generated",
                raw.tls.certificate.display(),
                raw.tls.private_key.display()
            ));
        }
        Ok(Config {
            path: path.to_path_buf(),
            server: raw.server,
            listeners: raw.listeners,
            tls: raw.tls,
            limits: raw.limits,
            providers,
            accounts,
        })
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

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn check_url(provider: &str, key: &str, value: &str) -> Result<(), ConfigError> {
    let url = url::Url::parse(value).map_err(|e| {
        ConfigError(format!(
            "provider `{provider}`: `{key}` = \"{value}\" is not a URL ({e})"
        ))
    })?;
    let host = url.host_str().unwrap_or("");
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_host(host) => Ok(()),
        _ => err(format!(
            "provider `{provider}`: `{key}` must be an https URL (http is accepted only for a loopback host)"
        )),
    }
}

fn resolve_provider(name: &str, raw: RawProvider) -> Result<Provider, ConfigError> {
    let what = format!("provider `{name}`");
    let family = match name {
        "google" => Family::Google,
        "microsoft" => Family::Microsoft,
        _ => Family::Generic,
    };
    let tenant = raw.tenant.clone().unwrap_or_else(|| "common".into());
    let ms = |path: &str| format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/{path}");
    // Preset values; fields the operator sets win.
    let (token, authorize, device, revoke, scopes, host, port, tls) = match family {
        Family::Google => (
            Some("https://oauth2.googleapis.com/token".to_string()),
            Some("https://accounts.google.com/o/oauth2/v2/auth".to_string()),
            Some("https://oauth2.googleapis.com/device/code".to_string()),
            Some("https://oauth2.googleapis.com/revoke".to_string()),
            Some(vec!["https://mail.google.com/".to_string()]),
            Some("smtp.gmail.com".to_string()),
            Some(465),
            Some(TlsMode::Implicit),
        ),
        Family::Microsoft => (
            Some(ms("token")),
            Some(ms("authorize")),
            Some(ms("devicecode")),
            None,
            Some(if raw.grant == Some(GrantKind::ClientCredentials) {
                vec!["https://outlook.office365.com/.default".to_string()]
            } else {
                vec![
                    "https://outlook.office.com/SMTP.Send".to_string(),
                    "offline_access".to_string(),
                ]
            }),
            Some("smtp.office365.com".to_string()),
            Some(587),
            Some(TlsMode::Starttls),
        ),
        Family::Generic => (None, None, None, None, None, None, None, None),
    };
    let Some(token_url) = raw.token_url.or(token) else {
        return err(format!(
            "{what}: `token_url` is missing (required for providers other than google / microsoft)"
        ));
    };
    let Some(smtp_host) = raw.smtp_host.or(host) else {
        return err(format!("{what}: `smtp_host` is missing"));
    };
    let Some(client_id) = raw.client_id else {
        return err(format!(
            "{what}: `client_id` is missing; register an OAuth app with the provider and put its client id here"
        ));
    };
    let authorize_url = raw.authorize_url.or(authorize);
    let device_authorization_url = raw.device_authorization_url.or(device);
    let revocation_url = raw.revocation_url.or(revoke);
    check_url(name, "token_url", &token_url)?;
    for (key, value) in [
        ("authorize_url", &authorize_url),
        ("device_authorization_url", &device_authorization_url),
        ("revocation_url", &revocation_url),
    ] {
        if let Some(v) = value {
            check_url(name, key, v)?;
        }
    }
    let smtp_tls = raw.smtp_tls.or(tls).unwrap_or(TlsMode::Starttls);
    if smtp_tls == TlsMode::None && !is_loopback_host(&smtp_host) {
        return err(format!(
            "{what}: smtp_tls = \"none\" is allowed only for a loopback smtp_host; use \"starttls\" or \"implicit\""
        ));
    }
    let secret_sources = [
        raw.client_secret.is_some(),
        raw.client_secret_env.is_some(),
        raw.client_secret_file.is_some(),
    ];
    if secret_sources.iter().filter(|s| **s).count() > 1 {
        return err(format!(
            "{what}: set only one of `client_secret`, `client_secret_env`, `client_secret_file`"
        ));
    }
    let client_secret = if let Some(var) = &raw.client_secret_env {
        match std::env::var(var) {
            Ok(v) if !v.is_empty() => Some(v),
            _ => {
                return err(format!(
                    "{what}: `client_secret_env` names {var}, which is not set; export it or use `client_secret_file`"
                ))
            }
        }
    } else if let Some(file) = &raw.client_secret_file {
        Some(read_secret_file(file).map_err(|e| {
            ConfigError(format!(
                "{what}: `client_secret_file` {}: {e}; check the path and that the relay's user can read it",
                file.display()
            ))
        })?)
    } else {
        raw.client_secret.map(|s| s.expose().to_string())
    };
    for (key, file) in [
        ("smtp_ca_file", &raw.smtp_ca_file),
        ("service_account_key_file", &raw.service_account_key_file),
        ("client_certificate_file", &raw.client_certificate_file),
        ("client_private_key_file", &raw.client_private_key_file),
    ] {
        if let Some(f) = file {
            if let Err(e) = std::fs::metadata(f) {
                return err(format!(
                    "{what}: `{key}` {}: {e}; check the path",
                    f.display()
                ));
            }
        }
    }
    if raw.client_certificate_file.is_some() != raw.client_private_key_file.is_some() {
        return err(format!(
            "{what}: `client_certificate_file` and `client_private_key_file` go together; set both or neither"
        ));
    }
    Ok(Provider {
        name: name.to_string(),
        family,
        token_url,
        authorize_url,
        device_authorization_url,
        revocation_url,
        scopes: raw.scopes.or(scopes).unwrap_or_default(),
        client_id,
        client_secret,
        smtp_host,
        smtp_port: raw.smtp_port.or(port).unwrap_or(587),
        smtp_tls,
        smtp_ca_file: raw.smtp_ca_file,
        mechanism: raw.mechanism.unwrap_or(Mechanism::Xoauth2),
        redirect_port: raw.redirect_port,
        grant: raw.grant.unwrap_or(GrantKind::RefreshToken),
        service_account_key_file: raw.service_account_key_file,
        client_certificate_file: raw.client_certificate_file,
        client_private_key_file: raw.client_private_key_file,
    })
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
