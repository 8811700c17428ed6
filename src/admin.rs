//! Administration: the operations behind `accounts`, `import-token`, `authorize` (storing the grant),
//! `revoke` and `test`.
//!
//! Each operation is a [`Request`] executed against an [`AdminContext`]. The CLI sends it to a running
//! relay over the control socket when there is one (sled allows one process per database, and the
//! relay's token cache must learn about a new grant), and otherwise opens the store itself and runs
//! the very same code.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Config, Family, GrantKind};
use crate::secret::Secret;
use crate::store::{now_unix, Grant};
use crate::upstream::{Client, UpstreamContext, UpstreamError};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Accounts,
    /// Store a grant obtained by `authorize` or given to `import-token`.
    StoreGrant {
        account: String,
        refresh_token: Option<Secret>,
        access_token: Option<Secret>,
        expires_in: Option<u64>,
    },
    Revoke {
        account: String,
    },
    Test {
        account: String,
        to: Option<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub text: String,
}

impl Response {
    fn ok(text: impl Into<String>) -> Response {
        Response {
            ok: true,
            text: text.into(),
        }
    }

    fn fail(text: impl Into<String>) -> Response {
        Response {
            ok: false,
            text: text.into(),
        }
    }
}

pub struct AdminContext {
    pub config: Arc<Config>,
    pub upstream: Arc<UpstreamContext>,
}

/// Runs `request` in the running relay if there is one, else locally.
pub async fn run(config: Config, request: Request) -> Result<Response, String> {
    let socket = config.server.control_socket();
    if let Some(response) = crate::control::call(&socket, &request).await? {
        return Ok(response);
    }
    let config = Arc::new(config);
    let upstream = crate::server::open_core(&config)?;
    let ctx = AdminContext { config, upstream };
    let response = execute(&ctx, request).await;
    ctx.upstream.tokens.store().flush();
    Ok(response)
}

pub async fn execute(ctx: &AdminContext, request: Request) -> Response {
    let result = match request {
        Request::Accounts => Ok(accounts_table(ctx)),
        Request::StoreGrant {
            account,
            refresh_token,
            access_token,
            expires_in,
        } => {
            let change =
                async { store_grant(ctx, &account, refresh_token, access_token, expires_in) };
            ctx.upstream.tokens.replace_grant(&account, change).await
        }
        Request::Revoke { account } => {
            let change = revoke(ctx, &account);
            ctx.upstream.tokens.replace_grant(&account, change).await
        }
        Request::Test { account, to } => return test(ctx, &account, to.as_deref()).await,
    };
    match result {
        Ok(text) => Response::ok(text),
        Err(text) => Response::fail(text),
    }
}

fn account<'a>(
    ctx: &'a AdminContext,
    name: &str,
) -> Result<&'a Arc<crate::config::Account>, String> {
    ctx.config.account(name).map_err(|e| e.to_string())
}

fn store_grant(
    ctx: &AdminContext,
    name: &str,
    refresh_token: Option<Secret>,
    access_token: Option<Secret>,
    expires_in: Option<u64>,
) -> Result<String, String> {
    let acct = account(ctx, name)?;
    if refresh_token
        .as_ref()
        .is_none_or(|t| t.expose().trim().is_empty())
    {
        return Err(format!(
            "account `{name}`: the provider returned no refresh token; nothing stored"
        ));
    }
    let now = now_unix();
    let grant = Grant {
        kind: acct.grant,
        refresh_token,
        access_expires_at: access_token
            .as_ref()
            .map(|_| now + expires_in.unwrap_or(3600)),
        access_token,
        obtained_at: now,
        last_refresh: None,
    };
    let store = ctx.upstream.tokens.store();
    store.put(name, &grant).map_err(|e| e.to_string())?;
    clear_status(store, name);
    tracing::info!(account = %name, "grant stored");
    Ok(format!(
        "account `{name}`: grant stored; the next session uses it"
    ))
}

/// A new or deleted grant starts with a clean record: no revoked flag, no old provider error.
fn clear_status(store: &crate::store::GrantStore, name: &str) {
    store.update_status(name, |s| {
        s.revoked = false;
        s.last_error = None;
    });
    store.flush();
}

async fn revoke(ctx: &AdminContext, name: &str) -> Result<String, String> {
    let acct = account(ctx, name)?;
    let store = ctx.upstream.tokens.store();
    let grant = store.get(name).map_err(|e| e.to_string())?;
    let mut notes = Vec::new();
    if let Some(rt) = grant.as_ref().and_then(|g| g.refresh_token.clone()) {
        if acct.provider.revocation_url.is_some() {
            match revoke_at_provider(ctx, acct, &rt).await {
                Ok(()) => notes.push("revoked at the provider".to_string()),
                Err(e) => notes.push(format!("the provider's revocation endpoint failed ({e}); revoke the app's access in the account's security settings")),
            }
        } else {
            notes.push(format!(
                "provider `{}` has no revocation endpoint; remove the app's consent in the provider's account settings",
                acct.provider.name
            ));
        }
    }
    let existed = store.remove(name).map_err(|e| e.to_string())?;
    clear_status(store, name);
    if !existed {
        return Ok(format!("account `{name}`: no grant was stored"));
    }
    notes.insert(0, format!("account `{name}`: grant deleted"));
    tracing::info!(account = %name, "grant deleted");
    Ok(notes.join("; "))
}

async fn revoke_at_provider(
    ctx: &AdminContext,
    acct: &crate::config::Account,
    rt: &Secret,
) -> Result<(), String> {
    crate::oauth::revoke(&acct.provider, ctx.upstream.tokens.http(), rt)
        .await
        .map_err(|e| e.to_string())
}

/// "3m", "5h", "12d"
pub fn span_text(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn ago(t: Option<u64>, now: u64) -> String {
    t.map(|t| format!("{} ago", span_text(now.saturating_sub(t))))
        .unwrap_or_else(|| "-".into())
}

fn accounts_table(ctx: &AdminContext) -> String {
    let store = ctx.upstream.tokens.store();
    let now = now_unix();
    let mut rows = vec![[
        "ACCOUNT",
        "LOGIN",
        "PROVIDER",
        "MAILBOX",
        "GRANT",
        "STATE",
        "TOKEN EXPIRES",
        "LAST REFRESH",
        "LAST USE",
        "REFRESH TOKEN AGE",
    ]
    .map(String::from)
    .to_vec()];
    for a in &ctx.config.accounts {
        let status = store.status(&a.name);
        let grant = store.get(&a.name);
        let on_demand = a.grant != GrantKind::RefreshToken;
        let state = match (&grant, &status) {
            (Err(e), _) => format!("unreadable: {e}"),
            (_, s) if s.revoked => format!("revoked: run `xoauth-relay authorize {}`", a.name),
            (_, s) if s.last_error.is_some() => {
                format!("failing: {}", s.last_error.as_deref().unwrap_or(""))
            }
            (Ok(None), _) if !on_demand => "needs authorization".to_string(),
            _ => "ok".to_string(),
        };
        let g = grant.ok().flatten();
        let expires = match g.as_ref().and_then(|g| g.access_expires_at) {
            Some(t) if t > now => format!("in {}", span_text(t - now)),
            Some(_) => "expired".into(),
            None => "-".into(),
        };
        let age = match g.as_ref().filter(|g| g.refresh_token.is_some()) {
            None => "-".to_string(),
            Some(g) => {
                let age = now.saturating_sub(g.obtained_at);
                let idle =
                    now.saturating_sub(status.last_use.or(g.last_refresh).unwrap_or(g.obtained_at));
                let warning = match a.provider.family {
                    Family::Google if age > 5 * 86400 => {
                        " (warning: Google apps in Testing status lose grants after 7 days; publish the app)"
                    }
                    Family::Microsoft if idle > 80 * 86400 => {
                        " (warning: Microsoft expires refresh tokens after 90 days without use)"
                    }
                    _ => "",
                };
                format!("{}{warning}", span_text(age))
            }
        };
        rows.push(vec![
            a.name.clone(),
            a.login.clone(),
            a.provider.name.clone(),
            a.mailbox.clone(),
            a.grant.as_str().to_string(),
            state,
            expires,
            ago(g.as_ref().and_then(|g| g.last_refresh), now),
            ago(status.last_use, now),
            age,
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `test NAME`: each step of a real upstream session, printed with its outcome.
async fn test(ctx: &AdminContext, name: &str, to: Option<&str>) -> Response {
    let mut lines = Vec::new();
    let result = test_steps(ctx, name, to, &mut lines).await;
    let ok = result.is_ok();
    if let Err(e) = result {
        lines.push(format!("FAILED: {e}"));
    }
    Response {
        ok,
        text: lines.join("\n") + "\n",
    }
}

async fn test_steps(
    ctx: &AdminContext,
    name: &str,
    to: Option<&str>,
    lines: &mut Vec<String>,
) -> Result<(), String> {
    let acct = account(ctx, name)?.clone();
    let p = &acct.provider;
    let token = ctx
        .upstream
        .tokens
        .token(name)
        .await
        .map_err(|e| format!("token: {e}"))?;
    let left = token
        .expires_at
        .saturating_duration_since(tokio::time::Instant::now());
    lines.push(format!(
        "token: ok (expires in {})",
        span_text(left.as_secs())
    ));
    let tls = ctx
        .upstream
        .tls
        .get(&p.name)
        .ok_or("no TLS configuration")?;
    let target = format!(
        "connect to {}:{} ({})",
        p.smtp_host, p.smtp_port, p.smtp_tls
    );
    let mut client = Client::connect(p, tls, &ctx.upstream.helo_name, ctx.upstream.timeout)
        .await
        .map_err(|e| format!("{target}: {e}"))?;
    lines.push(format!("{target}: ok"));
    let mechanism = format!("{:?}", p.mechanism).to_uppercase();
    match client.authenticate(p, &acct.mailbox, &token.secret).await {
        Ok(()) => lines.push(format!("authenticate {mechanism} as {}: ok", acct.mailbox)),
        Err(UpstreamError::AuthRejected(r) | UpstreamError::Rejected(r)) => {
            let hint = crate::hints::for_smtp_reply(p.family, &r)
                .map(|h| format!("\n  hint: {h}"))
                .unwrap_or_default();
            return Err(format!(
                "authenticate {mechanism} as {}: {}{hint}",
                acct.mailbox,
                r.summary()
            ));
        }
        Err(e) => return Err(format!("authenticate: {e}")),
    }
    if let Some(to) = to {
        for line in [
            format!("MAIL FROM:<{}>", acct.mailbox),
            format!("RCPT TO:<{to}>"),
            "DATA".into(),
        ] {
            let reply = client.command(&line).await.map_err(|e| e.to_string())?;
            lines.push(format!("{line}: {}", reply.summary()));
            if !reply.is_positive() {
                return Err(format!("{line} refused"));
            }
        }
        let body = format!(
            "From: <{}>\r\nTo: <{to}>\r\nSubject: xoauth-relay test\r\nDate: {}\r\n\r\nThis is a test message sent by `xoauth-relay test {name}`.\r\n",
            acct.mailbox,
            rfc2822_now()
        );
        client
            .body(body.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let reply = client.end_data().await.map_err(|e| e.to_string())?;
        lines.push(format!("message: {}", reply.summary()));
        if !reply.is_positive() {
            return Err("message refused".into());
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), client.command("QUIT")).await;
    lines.push("ok".into());
    Ok(())
}

/// Current time as an RFC 5322 date (UTC), without a date crate.
fn rfc2822_now() -> String {
    let secs = now_unix();
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days.rem_euclid(7)) as usize];
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(month - 1) as usize];
    format!(
        "{weekday}, {day:02} {mon} {year} {:02}:{:02}:{:02} +0000",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
