//! `test NAME [--to ADDR]`: token, connect, authenticate (and send), each step printed with its
//! outcome, so an operator sees where the path breaks.

use std::time::Duration;

use super::{account, span_text, AdminContext};
use crate::control::wire::Response;
use crate::delivery::client::Client;
use crate::delivery::UpstreamError;

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
        let body = format!(
            "From: <{}>\r\nTo: <{to}>\r\nSubject: xoauth-relay test\r\nDate: {}\r\n\r\nThis is a test message sent by `xoauth-relay test {name}`.\r\n",
            acct.mailbox,
            crate::util::clock::rfc2822(crate::util::clock::now_unix())
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
