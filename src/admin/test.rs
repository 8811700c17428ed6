//! `test NAME [--to ADDR]`: token, connect, authenticate (and send), each step printed with its
//! outcome, so an operator sees where the path breaks.

use std::sync::Arc;
use std::time::Duration;

use super::{account, span_text, AdminContext};
use crate::config::Account;
use crate::control::wire::Response;
use crate::delivery::client::Client;
use crate::delivery::transport::MailStart;
use crate::delivery::UpstreamError;
use crate::smtp::body::BodyChunk;

/// The test message `test --to` sends.
fn test_message(acct: &Account, to: &str) -> String {
    format!(
        "From: <{}>\r\nTo: <{to}>\r\nSubject: xoauth-relay test\r\nDate: {}\r\n\r\nThis is a test message sent by `xoauth-relay test {}`.\r\n",
        acct.mailbox,
        crate::util::clock::rfc2822(crate::util::clock::now_unix()),
        acct.name
    )
}

/// An API account: the grant's scopes, then (with `--to`) a message through the API, the same
/// way the relay's messages go.
async fn api_steps(
    ctx: &AdminContext,
    acct: &Arc<Account>,
    to: Option<&str>,
    lines: &mut Vec<String>,
) -> Result<(), String> {
    let name = &acct.name;
    let granted = ctx
        .tokens
        .stored_grant(name)?
        .and_then(|g| g.scope)
        .unwrap_or_default();
    match crate::delivery::api::scope_problem(acct, &granted) {
        Some(problem) if !granted.is_empty() => return Err(format!("scopes: {problem}")),
        _ if granted.is_empty() => lines.push("scopes: not listed by the provider".into()),
        _ => lines.push(format!("scopes: ok ({granted})")),
    }
    let transport = acct.provider.transport.as_str();
    lines.push(format!("endpoint: {transport} at {}", acct.endpoint()));
    let Some(to) = to else {
        lines.push(format!(
            "ok (an API is only tried by sending: add --to ADDR to send a test message through {transport})"
        ));
        return Ok(());
    };
    let ahead = [to.to_string()];
    let start = MailStart {
        from: &acct.mailbox,
        size: None,
        eight_bit: false,
        smtputf8: false,
        ahead: &ahead,
        data_ahead: true,
    };
    let (status, tx) = ctx.transport.begin(acct, start).await;
    let Some(mut tx) = tx else {
        return Err(format!("start: {}", status.reply().summary()));
    };
    let rcpt = tx.recipient(to).await;
    if !rcpt.is_accepted() {
        return Err(format!("recipient {to}: {}", rcpt.reply().summary()));
    }
    tx.data().await;
    let body = test_message(acct, to);
    tx.body(&BodyChunk::decoded(body.into_bytes())).await;
    let end = tx.finish().await;
    lines.push(format!(
        "send through {transport}: {}",
        end.reply().summary()
    ));
    if !end.is_accepted() {
        return Err("message refused".into());
    }
    lines.push("ok".into());
    Ok(())
}

/// `test NAME`: each step of a real upstream session, printed with its outcome.
pub(super) async fn test(ctx: &AdminContext, name: &str, to: Option<&str>) -> Response {
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
    let acct = account(ctx, name)?;
    let p = &acct.provider;
    let token = ctx
        .tokens
        .token(name)
        .await
        .map_err(|e| format!("token: {e}"))?;
    let left = token.expires_at.saturating_duration_since(ctx.clock.now());
    lines.push(format!(
        "token: ok (expires in {})",
        span_text(left.as_secs())
    ));
    if p.transport.is_api() {
        return api_steps(ctx, &acct, to, lines).await;
    }
    let dialer = ctx.pool.dialer();
    let tls = dialer
        .tls
        .load()
        .get(&p.name)
        .cloned()
        .ok_or("no TLS configuration")?;
    let target = format!(
        "connect to {}:{} ({})",
        p.smtp.host, p.smtp.port, p.smtp.tls
    );
    let mut client = Client::connect(p, &tls, &dialer.helo_name, dialer.timeout())
        .await
        .map_err(|e| format!("{target}: {e}"))?;
    lines.push(format!("{target}: ok"));
    let mechanism = format!("{:?}", p.smtp.mechanism).to_uppercase();
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
        let body = test_message(&acct, to);
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
