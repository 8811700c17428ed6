//! `accounts`: each account's grant kind and state, token expiry, last refresh and use, and the
//! refresh token's age with the provider-specific warnings.

use super::{ago, span_text, AdminContext};

/// "0", "12 (oldest 5m)", "12 (oldest 5m), paused: throttled: 421 ... (until 40s from now)".
fn queued(ctx: &AdminContext, account: &str) -> String {
    let v = ctx.upstream.queue.account_view(account);
    let mut out = v.queued.to_string();
    if let Some(age) = v.oldest_secs {
        out.push_str(&format!(" (oldest {})", span_text(age)));
    }
    if let Some(why) = v.paused {
        out.push_str(&format!(", paused: {why}"));
    }
    out
}
use crate::config::{Family, GrantKind};

pub(super) fn table(ctx: &AdminContext) -> String {
    let store = ctx.upstream.tokens.store();
    let now = ctx.upstream.tokens.clock().unix();
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
        "QUEUED",
    ]
    .map(String::from)
    .to_vec()];
    for a in &ctx.config.accounts {
        let status = store.status(&a.name);
        let last_use = ctx.upstream.activity.last_use(&a.name).max(status.last_use);
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
                let idle = now.saturating_sub(last_use.or(g.last_refresh).unwrap_or(g.obtained_at));
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
            ago(last_use, now),
            age,
            queued(ctx, &a.name),
        ]);
    }
    super::columns(rows)
}
