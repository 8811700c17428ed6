//! From the file as written to the configuration the relay runs on: presets merged, every rule
//! checked, errors worded with the key and the fix.
//!
//! [`build`] is pure (it names secrets but does not read them); [`external`] is the one step that
//! looks outside the file, through [`Env`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use super::raw::{RawAccount, RawConfig, RawProvider};
use super::{
    err, Account, Config, ConfigError, DeliveryMode, Env, Family, GrantKind, Mechanism, Pacing,
    Provider, SecretSource, SmtpUpstream, TlsMode, TransportKind, UpstreamProxy,
};
use crate::util::is_loopback_host;
use crate::util::secret::Secret;

/// One `[[accounts]]` entry, checked against the resolved providers and the accounts before it.
fn account(
    a: RawAccount,
    providers: &BTreeMap<String, Arc<Provider>>,
    failed_providers: &HashSet<String>,
    seen_names: &mut HashSet<String>,
    seen_logins: &mut HashMap<String, String>,
    default_delivery: DeliveryMode,
) -> Result<Arc<Account>, ConfigError> {
    let what = format!("account `{}`", a.name);
    let pacing_overrides = a.pacing();
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
    let sources = super::sources::parse(&what, &a.sources)?;
    let login = a.login.clone().unwrap_or_else(|| a.name.clone());
    // An account of devices only (sources, no password) has no login to collide with.
    let logs_in = a.password_hash.is_some() || a.login.is_some() || sources.is_empty();
    if logs_in {
        if let Some(other) = seen_logins.insert(login.clone(), a.name.clone()) {
            return err(format!(
                "{what}: login `{login}` is already used by account `{other}`; give each account its own `login`"
            ));
        }
    }
    let password_hash = match a.password_hash {
        None if sources.is_empty() || a.login.is_some() => {
            return err(format!(
                "{what}: `password_hash` is missing; create one with `xoauth-relay hash-password` and paste it in{}",
                if sources.is_empty() { "" } else { " (or drop `login`: an account of devices only needs neither)" }
            ));
        }
        None => None,
        Some(hash) => {
            if let Err(e) = argon2::PasswordHash::new(hash.expose()) {
                return err(format!(
                    "{what}: `password_hash` is not a PHC string ({e}); create one with `xoauth-relay hash-password`"
                ));
            }
            Some(hash)
        }
    };
    let Some(provider) = providers.get(&a.provider).cloned() else {
        if failed_providers.contains(&a.provider) {
            // Its provider's own error says what to fix.
            return err(String::new());
        }
        return err(format!(
            "{what}: provider `{}` is not defined; add a [providers.{}] table or use `google` / `microsoft`",
            a.provider, a.provider
        ));
    };
    if a.max_upstream_connections == Some(0) {
        return err(format!(
            "{what}: max_upstream_connections must be at least 1"
        ));
    }
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
            "{what}: grant = \"client_credentials\" must be set on [providers.{}] (it changes the scope \
             to {}); use a separate provider table for app-only accounts",
            provider.name,
            app_only_scope(provider.transport)
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
        && provider.secret_source.is_none()
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
    let max_upstream_connections = a
        .max_upstream_connections
        .unwrap_or(provider.max_upstream_connections);
    let pacing = provider.pacing.with(pacing_overrides);
    let delivery = a.delivery.unwrap_or(default_delivery);
    if a.header_recipients.is_some() && !provider.transport.is_api() {
        return err(format!(
            "{what}: `header_recipients` applies to accounts whose provider has transport = \"graph\" or \
             \"gmail_api\"; provider `{}` sends by SMTP, where the envelope is exact anyway",
            provider.name
        ));
    }
    let header_recipients = a.header_recipients.unwrap_or(provider.header_recipients);
    Ok(Arc::new(Account {
        name: a.name,
        login,
        password_hash,
        provider,
        mailbox: a.mailbox,
        allowed_senders: a.allowed_senders,
        sources,
        grant,
        max_upstream_connections,
        pacing,
        delivery,
        header_recipients,
    }))
}

/// The app-only (client credentials) scope of a Microsoft transport.
fn app_only_scope(transport: TransportKind) -> &'static str {
    match transport {
        TransportKind::Graph => "https://graph.microsoft.com/.default",
        _ => "https://outlook.office365.com/.default",
    }
}

/// The scopes a provider asks for when it lists none: what its transport needs.
fn preset_scopes(
    family: Family,
    transport: TransportKind,
    grant: Option<GrantKind>,
) -> Option<Vec<String>> {
    let app_only = grant == Some(GrantKind::ClientCredentials);
    let list = |s: &[&str]| Some(s.iter().map(|s| s.to_string()).collect());
    match (transport, family) {
        (TransportKind::Graph, _) if app_only => list(&[app_only_scope(transport)]),
        (TransportKind::Graph, _) => {
            list(&["https://graph.microsoft.com/Mail.Send", "offline_access"])
        }
        (TransportKind::GmailApi, _) => list(&["https://www.googleapis.com/auth/gmail.send"]),
        (TransportKind::Smtp, Family::Google) => list(&["https://mail.google.com/"]),
        (TransportKind::Smtp, Family::Microsoft) if app_only => list(&[app_only_scope(transport)]),
        (TransportKind::Smtp, Family::Microsoft) => {
            list(&["https://outlook.office.com/SMTP.Send", "offline_access"])
        }
        (TransportKind::Smtp, Family::Generic) => None,
    }
}

/// Applies presets and validates; reads nothing outside `raw`.
pub fn build(mut raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
    let anchored = super::paths::anchor(&mut raw, path.parent().unwrap_or(Path::new("")));
    // Every problem is collected, so one `check` run shows them all.
    let mut errors: Vec<String> = Vec::new();
    let default_proxy = match raw
        .server
        .upstream_proxy
        .as_deref()
        .map(UpstreamProxy::parse)
    {
        Some(Err(e)) => {
            errors.push(format!("[server] upstream_proxy: {e}"));
            None
        }
        Some(Ok(p)) => Some(p),
        None => None,
    };
    let password_set = raw.server.upstream_proxy_password_env.is_some()
        || raw.server.upstream_proxy_password_file.is_some();
    if default_proxy.as_ref().is_some_and(|p| p.user.is_some()) && !password_set {
        errors.push(
            "[server] upstream_proxy names a user but no password: set upstream_proxy_password_env or \
             upstream_proxy_password_file"
                .into(),
        );
    }
    if raw.server.upstream_proxy_password_env.is_some()
        && raw.server.upstream_proxy_password_file.is_some()
    {
        errors.push(
            "[server]: set only one of upstream_proxy_password_env and upstream_proxy_password_file"
                .into(),
        );
    }
    let mut failed_providers = HashSet::new();
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
        match provider(&name, overrides.unwrap_or_default(), default_proxy.as_ref()) {
            Ok(p) => {
                providers.insert(name, Arc::new(p));
            }
            Err(e) => {
                errors.push(e.0);
                failed_providers.insert(name);
            }
        }
    }

    let mut accounts = Vec::new();
    let mut seen_names = HashSet::new();
    let mut seen_logins: HashMap<String, String> = HashMap::new();
    for a in raw.accounts {
        match account(
            a,
            &providers,
            &failed_providers,
            &mut seen_names,
            &mut seen_logins,
            raw.delivery.mode,
        ) {
            Ok(a) => accounts.push(a),
            Err(e) => errors.push(e.0),
        }
    }
    errors.extend(super::sources::overlapping(&accounts));

    if raw.limits.max_message_bytes == 0 || raw.limits.max_recipients == 0 {
        errors.push("[limits]: max_message_bytes and max_recipients must be greater than 0".into());
    }
    if raw.server.refresh_margin_secs > 1800 {
        errors.push(
            "[server]: refresh_margin_secs must be at most 1800 (access tokens live about an hour)"
                .into(),
        );
    }
    if raw.limits.max_connections == 0 || raw.limits.max_connections > 1_000_000 {
        errors.push("[limits]: max_connections must be between 1 and 1000000".into());
    }
    if raw.limits.max_connections_per_ip == 0 {
        errors.push("[limits]: max_connections_per_ip must be at least 1".into());
    }
    const DAY: u64 = 86_400;
    for (key, value) in [
        ("idle_timeout_secs", raw.limits.idle_timeout_secs),
        ("upstream_timeout_secs", raw.limits.upstream_timeout_secs),
        (
            "tls_handshake_timeout_secs",
            raw.limits.tls_handshake_timeout_secs,
        ),
        ("preauth_timeout_secs", raw.limits.preauth_timeout_secs),
        ("upstream_idle_secs", raw.limits.upstream_idle_secs),
        ("upstream_wait_secs", raw.limits.upstream_wait_secs),
        ("auth_lockout_secs", raw.limits.auth_lockout_secs),
    ] {
        if value == 0 || value > DAY {
            errors.push(format!(
                "[limits]: {key} must be between 1 and {DAY} seconds"
            ));
        }
    }
    let d = &raw.delivery;
    for (key, value) in [
        ("retry_min_secs", d.retry_min_secs),
        ("retry_max_secs", d.retry_max_secs),
        ("max_queue_age_secs", d.max_queue_age_secs),
        ("quota_pause_secs", d.quota_pause_secs),
    ] {
        if value == 0 {
            errors.push(format!("[delivery]: {key} must be at least 1"));
        }
    }
    if d.retry_max_secs < d.retry_min_secs {
        errors.push("[delivery]: retry_max_secs must not be smaller than retry_min_secs".into());
    }
    let a = &raw.alerts;
    if let Some(url) = &a.webhook_url {
        if let Err(e) = webhook_allowed(url) {
            errors.push(format!("[alerts] webhook_url: {e}"));
        }
    }
    for (key, value) in [
        ("repeat_secs", a.repeat_secs),
        ("alert_after_secs", a.alert_after_secs),
        ("alert_queue_age_secs", a.alert_queue_age_secs),
    ] {
        if value == 0 {
            errors.push(format!("[alerts]: {key} must be at least 1"));
        }
    }
    if !(1..=60).contains(&raw.server.keepalive_days) {
        errors.push(
            "[server]: keepalive_days must be between 1 and 60 (Microsoft drops grants unused for 90 days)"
                .into(),
        );
    }
    if raw.listeners.is_empty() {
        errors.push(format!(
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
            errors.push(format!(
                "[[listeners]] {}: tls = \"none\" but require_tls_for_auth = true and allow_plaintext_loopback = false, \
                 so no mailer could ever authenticate there; use tls = \"starttls\" or allow loopback clients",
                l.address
            ));
        }
        if l.address.port() != 0 && !addrs.insert(l.address) {
            errors.push(format!(
                "[[listeners]]: address {} is listed twice",
                l.address
            ));
        }
    }
    errors.extend(raw.store.problems());
    errors.retain(|e| !e.is_empty());
    if !errors.is_empty() {
        return err(errors.join("\n"));
    }
    Ok(Config {
        path: path.to_path_buf(),
        anchored,
        server: raw.server,
        listeners: raw.listeners,
        tls: raw.tls,
        limits: raw.limits,
        delivery: raw.delivery,
        metrics: raw.metrics,
        alerts: raw.alerts,
        store: raw.store,
        providers,
        accounts,
    })
}

/// A webhook gets events about grants: https, or plain http only to this machine.
fn webhook_allowed(text: &str) -> Result<(), String> {
    let url = url::Url::parse(text).map_err(|e| format!("\"{text}\" is not a URL ({e})"))?;
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err("use https (plain http is allowed only to loopback)".into()),
        other => Err(format!("scheme `{other}` is not supported; use https://")),
    }
}

/// A provider's client secret read and its files checked.
fn provider_externals(name: &str, p: &Provider, env: &dyn Env) -> Result<Provider, ConfigError> {
    let what = format!("provider `{name}`");
    let mut p = Provider::clone(p);
    p.client_secret = match &p.secret_source {
        Some(SecretSource::Env(var)) => match env.var(var) {
            Some(v) if !v.is_empty() => Some(Secret::new(v)),
            _ => {
                return err(format!(
                    "{what}: `client_secret_env` names {var}, which is not set; export it or use `client_secret_file`"
                ))
            }
        },
        Some(SecretSource::File(file)) => Some(Secret::new(env.read_secret(file).map_err(|e| {
            ConfigError(format!(
                "{what}: `client_secret_file` {}: {e}; check the path and that the relay's user can read it",
                file.display()
            ))
        })?)),
        Some(SecretSource::Inline(s)) => Some(s.clone()),
        None => None,
    };
    for (key, file) in [
        ("smtp_ca_file", &p.smtp.ca_file),
        ("http_ca_file", &p.http_ca_file),
        ("service_account_key_file", &p.service_account_key_file),
        ("client_certificate_file", &p.client_certificate_file),
        ("client_private_key_file", &p.client_private_key_file),
    ] {
        if let Some(f) = file {
            if !env.exists(f) {
                return err(format!(
                    "{what}: `{key}` {}: No such file or directory; check the path",
                    f.display()
                ));
            }
        }
    }
    Ok(p)
}

/// Reads client secrets from env vars and files, and checks that every file the config names exists.
pub fn external(mut config: Config, env: &dyn Env) -> Result<Config, ConfigError> {
    let mut resolved = BTreeMap::new();
    let mut errors = Vec::new();
    let server = &config.server;
    let proxy_password = if let Some(var) = &server.upstream_proxy_password_env {
        match env.var(var) {
            Some(v) if !v.is_empty() => Some(Secret::new(v)),
            _ => {
                errors.push(format!(
                    "[server] upstream_proxy_password_env names {var}, which is not set; export it"
                ));
                None
            }
        }
    } else if let Some(file) = &server.upstream_proxy_password_file {
        match env.read_secret(file) {
            Ok(v) => Some(Secret::new(v)),
            Err(e) => {
                errors.push(format!(
                    "[server] upstream_proxy_password_file {}: {e}; check the path and that the relay's user can read it",
                    file.display()
                ));
                None
            }
        }
    } else {
        None
    };
    if let Err(e) = config.store.read_url(env) {
        errors.push(e);
    }
    for (name, p) in &config.providers {
        match provider_externals(name, p, env) {
            Ok(mut p) => {
                if let Some(proxy) = p.smtp.proxy.as_mut().filter(|x| x.user.is_some()) {
                    proxy.password = proxy_password.clone();
                }
                resolved.insert(name.clone(), Arc::new(p));
            }
            Err(e) => errors.push(e.0),
        }
    }
    if let Some(command) = &config.alerts.command {
        if !env.exists(command) {
            errors.push(format!(
                "[alerts] command {} does not exist; check the path",
                command.display()
            ));
        }
    }
    if !errors.is_empty() {
        return err(errors.join("\n"));
    }
    config.accounts = config
        .accounts
        .iter()
        .map(|a| {
            let mut a = Account::clone(a);
            a.provider = resolved[&a.provider.name].clone();
            Arc::new(a)
        })
        .collect();
    config.providers = resolved;
    let (cert, key) = (&config.tls.certificate, &config.tls.private_key);
    if config.listeners.iter().any(|l| l.tls != TlsMode::None)
        && env.exists(cert) != env.exists(key)
    {
        return err(format!(
            "[tls]: only one of certificate ({}) and private_key ({}) exists; provide both, or remove both to \
             have a self-signed pair generated",
            cert.display(),
            key.display()
        ));
    }
    Ok(config)
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

/// The Gmail API preset: Google Workspace's sending limits (support.google.com/a/answer/166852:
/// 2,000 messages and 10,000 recipients a day, 100 recipients per message "via SMTP or the Gmail
/// API") and the API's rate (developers.google.com/gmail/api/reference/quota: 15,000 quota units
/// a minute per user, 100 per `messages.send`: 150 messages a minute).
const GMAIL_API_PACING: Pacing = Pacing {
    max_messages_per_minute: 150,
    max_recipients_per_message: 100,
    max_messages_per_day: 2_000,
    max_recipients_per_day: 10_000,
};

fn provider(
    name: &str,
    raw: RawProvider,
    default_proxy: Option<&UpstreamProxy>,
) -> Result<Provider, ConfigError> {
    let what = format!("provider `{name}`");
    let family = match raw.preset.as_deref().unwrap_or(name) {
        "google" => Family::Google,
        "microsoft" => Family::Microsoft,
        _ if raw.preset.is_some() => {
            return err(format!(
                "{what}: preset = \"{}\" is not known; use \"google\" or \"microsoft\" (or leave it out)",
                raw.preset.as_deref().unwrap_or_default()
            ))
        }
        _ => Family::Generic,
    };
    let transport = raw.transport.unwrap_or_default();
    match (transport, family) {
        (TransportKind::Graph, Family::Google) | (TransportKind::GmailApi, Family::Microsoft) => {
            return err(format!(
                "{what}: transport = \"{}\" is the other family's API; use preset = \"{}\" (or leave preset out)",
                transport.as_str(),
                if transport == TransportKind::Graph { "microsoft" } else { "google" }
            ))
        }
        (TransportKind::Smtp, _) if raw.api_url.is_some() || raw.header_recipients.is_some() => {
            return err(format!(
                "{what}: `api_url` and `header_recipients` apply to transport = \"graph\" or \"gmail_api\" only; \
                 set `transport` or remove them"
            ))
        }
        _ => {}
    }
    let tenant = raw.tenant.clone().unwrap_or_else(|| "common".into());
    let ms = |path: &str| format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/{path}");
    // Preset values; fields the operator sets win.
    let (token, authorize, device, revoke, host, port, tls) = match family {
        Family::Google => (
            Some("https://oauth2.googleapis.com/token".to_string()),
            Some("https://accounts.google.com/o/oauth2/v2/auth".to_string()),
            Some("https://oauth2.googleapis.com/device/code".to_string()),
            Some("https://oauth2.googleapis.com/revoke".to_string()),
            Some("smtp.gmail.com".to_string()),
            Some(465),
            Some(TlsMode::Implicit),
        ),
        Family::Microsoft => (
            Some(ms("token")),
            Some(ms("authorize")),
            Some(ms("devicecode")),
            None,
            Some("smtp.office365.com".to_string()),
            Some(587),
            Some(TlsMode::Starttls),
        ),
        Family::Generic => (None, None, None, None, None, None, None),
    };
    let scopes = preset_scopes(family, transport, raw.grant);
    if raw.max_upstream_connections == Some(0) {
        return err(format!(
            "{what}: max_upstream_connections must be at least 1"
        ));
    }
    let presets = match (transport, family) {
        // The Gmail API's own per-user limits (see README, "Microsoft Graph and the Gmail API").
        (TransportKind::GmailApi, _) => GMAIL_API_PACING,
        // Graph sends through the same Exchange Online mailbox limits as SMTP.
        (TransportKind::Graph, _) | (_, Family::Microsoft) => Pacing {
            max_messages_per_minute: 30,
            max_recipients_per_message: 500,
            max_messages_per_day: 0,
            max_recipients_per_day: 10_000,
        },
        (_, Family::Google) => Pacing {
            max_messages_per_minute: 0,
            max_recipients_per_message: 100,
            max_messages_per_day: 2_000,
            max_recipients_per_day: 10_000,
        },
        (_, Family::Generic) => Pacing::default(),
    };
    let pacing = presets.with(raw.pacing());
    let Some(token_url) = raw.token_url.or(token) else {
        return err(format!(
            "{what}: `token_url` is missing (required for providers other than google / microsoft)"
        ));
    };
    // An API account never opens an SMTP connection: the SMTP keys are allowed and unused.
    let Some(smtp_host) = raw
        .smtp_host
        .or(host)
        .or_else(|| transport.is_api().then(String::new))
    else {
        return err(format!(
            "{what}: `smtp_host` is missing (or set transport = \"graph\" / \"gmail_api\" for an HTTP API)"
        ));
    };
    let api_url = match transport {
        TransportKind::Smtp => String::new(),
        t => raw
            .api_url
            .clone()
            .unwrap_or_else(|| t.default_api_url().to_string())
            .trim_end_matches('/')
            .to_string(),
    };
    if transport.is_api() {
        check_url(name, "api_url", &api_url)?;
    }
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
    if smtp_tls == TlsMode::None && !is_loopback_host(&smtp_host) && !transport.is_api() {
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
    let secret_source = if let Some(var) = raw.client_secret_env {
        Some(SecretSource::Env(var))
    } else if let Some(file) = raw.client_secret_file {
        Some(SecretSource::File(file))
    } else {
        raw.client_secret.map(SecretSource::Inline)
    };
    let client_secret = match &secret_source {
        Some(SecretSource::Inline(s)) => Some(s.clone()),
        _ => None,
    };
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
        secret_source,
        client_secret,
        smtp: SmtpUpstream {
            host: smtp_host,
            port: raw.smtp_port.or(port).unwrap_or(587),
            tls: smtp_tls,
            ca_file: raw.smtp_ca_file,
            mechanism: raw.mechanism.unwrap_or(Mechanism::Xoauth2),
            proxy: match raw.upstream_proxy.as_deref() {
                Some("direct") => None,
                Some(text) => {
                    let proxy = UpstreamProxy::parse(text)
                        .map_err(|e| ConfigError(format!("{what}: upstream_proxy: {e}")))?;
                    if proxy.user.is_some() {
                        return err(format!(
                            "{what}: upstream_proxy: a proxy with a user belongs in [server] upstream_proxy (its \
                             password comes from upstream_proxy_password_env / _file there)"
                        ));
                    }
                    Some(proxy)
                }
                None => default_proxy.cloned(),
            },
        },
        transport,
        api_url,
        header_recipients: raw.header_recipients.unwrap_or_default(),
        http_ca_file: raw.http_ca_file,
        redirect_port: raw.redirect_port,
        grant: raw.grant.unwrap_or(GrantKind::RefreshToken),
        service_account_key_file: raw.service_account_key_file,
        client_certificate_file: raw.client_certificate_file,
        client_private_key_file: raw.client_private_key_file,
        pacing,
        max_upstream_connections: raw.max_upstream_connections.unwrap_or(
            match (transport, family) {
                // Outlook allows 4 concurrent requests per mailbox and app.
                (TransportKind::Graph, _) => 4,
                (TransportKind::GmailApi, _) => 10,
                // Exchange Online refuses a fourth authenticated SMTP connection per mailbox.
                (_, Family::Microsoft) => 3,
                (_, Family::Google | Family::Generic) => 10,
            },
        ),
    })
}
