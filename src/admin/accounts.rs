//! `accounts`: each account's grant kind and state, token expiry, last refresh and use, the
//! refresh token's age with the provider-specific warnings, and its queue; as a table or, with
//! `--json`, one array of objects with the same facts for scripts.

use serde::Serialize;

use super::{ago, span_text, AdminContext};
use crate::config::{Account, Family};
use crate::oauth::tokens::GrantState;
use crate::util::clock::rfc3339;

/// One account's facts; the JSON field names are what scripts rely on.
#[derive(Serialize)]
struct Row {
    name: String,
    /// None for an account of devices only (`sources`, no password).
    login: Option<String>,
    provider: String,
    /// `smtp`, `graph` or `gmail_api`, and where it sends.
    transport: &'static str,
    endpoint: String,
    mailbox: String,
    grant: &'static str,
    state: &'static str,
    /// Why the state is not `ok`, when there is more to say.
    state_detail: Option<String>,
    token_expires_in_secs: Option<u64>,
    last_refresh: Option<String>,
    last_use: Option<String>,
    refresh_token_age_secs: Option<u64>,
    /// When the provider said the refresh token itself dies (Google Testing-status apps).
    refresh_token_expires_in_secs: Option<i64>,
    warning: Option<&'static str>,
    queued: usize,
    queue_oldest_secs: Option<u64>,
    paused: Option<String>,
    /// `--usage`: `last_24h`, `last_7d`, `last_source`, beside the other fields.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    usage: Option<crate::observe::usage::Report>,
    #[serde(skip)]
    times: (Option<u64>, Option<u64>),
}

fn row(ctx: &AdminContext, a: &Account, now: u64, usage: Option<&[Vec<u8>]>) -> Row {
    let tokens = &ctx.tokens;
    let status = tokens.status(&a.name);
    let last_use = ctx.activity.last_use(&a.name).max(status.last_use);
    let state = tokens.grant_state(a);
    let state_detail = match &state {
        GrantState::Ok => None,
        GrantState::NeedsAuthorization => Some(format!("run `{}`", crate::hints::grant_command(a))),
        GrantState::Revoked => Some(format!(
            "{}; {}",
            status.last_error.as_deref().unwrap_or("invalid_grant"),
            crate::hints::revoked_fix(a)
        )),
        GrantState::Failing(e) => Some(e.clone()),
        GrantState::Unreadable(e) => Some(format!("unreadable: {e}")),
    };
    let g = tokens.stored_grant(&a.name).ok().flatten();
    // A grant that works but cannot do what the transport needs is not ok.
    let scope_problem = g
        .as_ref()
        .and_then(|g| g.scope.as_deref())
        .and_then(|granted| crate::delivery::api::scope_problem(a, granted));
    let (state_name, state_detail) = match (state.as_str(), scope_problem) {
        ("ok", Some(problem)) => ("scope_missing", Some(problem)),
        (name, _) => (name, state_detail),
    };
    let with_refresh = g.as_ref().filter(|g| g.refresh_token.is_some());
    let age = with_refresh.map(|g| now.saturating_sub(g.obtained_at));
    let warning = with_refresh.and_then(|g| {
        let idle = now.saturating_sub(last_use.or(g.last_refresh).unwrap_or(g.obtained_at));
        match a.provider.family {
            Family::Google if age.unwrap_or(0) > 5 * 86400 => {
                Some("Google apps in Testing status lose grants after 7 days; publish the app")
            }
            Family::Microsoft if idle > 80 * 86400 => {
                Some("Microsoft expires refresh tokens after 90 days without use")
            }
            _ => None,
        }
    });
    let q = ctx.queue.account_view(&a.name);
    let last_refresh = g.as_ref().and_then(|g| g.last_refresh);
    Row {
        name: a.name.clone(),
        login: a.password_hash.is_some().then(|| a.login.clone()),
        provider: a.provider.name.clone(),
        transport: a.provider.transport.as_str(),
        endpoint: a.endpoint(),
        mailbox: a.mailbox.clone(),
        grant: a.grant.as_str(),
        state: state_name,
        state_detail,
        // The cached token if there is one, else the stored one; null once expired.
        token_expires_in_secs: tokens.cached_for(&a.name).map(|d| d.as_secs()).or_else(|| {
            g.as_ref()
                .and_then(|g| g.access_expires_at)
                .filter(|t| *t > now)
                .map(|t| t - now)
        }),
        last_refresh: last_refresh.map(rfc3339),
        last_use: last_use.map(rfc3339),
        refresh_token_age_secs: age,
        refresh_token_expires_in_secs: g
            .as_ref()
            .and_then(|g| g.refresh_expires_at)
            .map(|t| t as i64 - now as i64),
        warning,
        queued: q.queued,
        queue_oldest_secs: q.oldest_secs,
        paused: q.paused,
        usage: usage.map(|others| ctx.observer.usage.report_with(&a.name, others)),
        times: (last_refresh, last_use),
    }
}

/// `others`: the usage figures of the other relays sharing a store (none without one).
pub(super) fn list(
    ctx: &AdminContext,
    json: bool,
    usage: bool,
    others: &[Vec<u8>],
) -> Result<String, String> {
    let now = ctx.clock.unix();
    let rows: Vec<Row> = ctx
        .config
        .load()
        .accounts
        .iter()
        .map(|a| row(ctx, a, now, usage.then_some(others)))
        .collect();
    if json {
        let mut text = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
        text.push('\n');
        return Ok(text);
    }
    if usage {
        return Ok(usage_table(&rows));
    }
    let mut table = vec![[
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
    for r in rows {
        let state = match &r.state_detail {
            Some(d) => format!("{}: {d}", r.state.replace('_', " ")),
            None => r.state.to_string(),
        };
        let expires = match r.token_expires_in_secs {
            Some(t) => format!("in {}", span_text(t)),
            None => "-".into(),
        };
        let age = match (r.refresh_token_age_secs, r.warning) {
            (None, _) => "-".to_string(),
            (Some(age), None) => span_text(age),
            (Some(age), Some(w)) => format!("{} (warning: {w})", span_text(age)),
        };
        let mut queued = r.queued.to_string();
        if let Some(age) = r.queue_oldest_secs {
            queued.push_str(&format!(" (oldest {})", span_text(age)));
        }
        if let Some(why) = &r.paused {
            queued.push_str(&format!(", paused: {why}"));
        }
        let provider = match r.transport {
            "smtp" => r.provider,
            t => format!("{} ({t})", r.provider),
        };
        table.push(vec![
            r.name,
            r.login.unwrap_or_else(|| "(devices)".into()),
            provider,
            r.mailbox,
            r.grant.to_string(),
            state,
            expires,
            ago(r.times.0, now),
            ago(r.times.1, now),
            age,
            queued,
        ]);
    }
    Ok(super::columns(table))
}

/// `accounts --usage`: the rolling 24 h and 7 day figures.
fn usage_table(rows: &[Row]) -> String {
    let mut table = vec![[
        "ACCOUNT",
        "MESSAGES 24H/7D",
        "RECIPIENTS 24H/7D",
        "BYTES 24H/7D",
        "FAILED LOGINS 24H/7D",
        "SOURCES 24H/7D",
        "LAST SOURCE",
    ]
    .map(String::from)
    .to_vec()];
    for r in rows {
        let Some(u) = &r.usage else { continue };
        let pair = |a: u64, b: u64| format!("{a}/{b}");
        table.push(vec![
            r.name.clone(),
            pair(u.last_24h.messages, u.last_7d.messages),
            pair(u.last_24h.recipients, u.last_7d.recipients),
            pair(u.last_24h.bytes, u.last_7d.bytes),
            pair(u.last_24h.failed_logins, u.last_7d.failed_logins),
            pair(u.last_24h.sources, u.last_7d.sources),
            u.last_source.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    super::columns(table)
}
