//! `queue`: what is waiting, for whom, and why; `queue show`, `retry` and `delete`.

use super::{span_text, AdminContext};
use crate::delivery::queue::{MessageView, Target};

/// The table, or with `json` one JSON array with an object per message.
pub(super) async fn list(
    ctx: &AdminContext,
    account: Option<&str>,
    json: bool,
) -> Result<String, String> {
    if let Some(a) = account {
        super::account(ctx, a)?;
    }
    let messages = ctx.queue.list_all(account).await;
    if json {
        return serde_json::to_string_pretty(&messages)
            .map(|mut s| {
                s.push('\n');
                s
            })
            .map_err(|e| e.to_string());
    }
    let quarantine = ctx.queue.quarantine();
    let kept = match quarantine.files {
        0 => String::new(),
        n => format!(
            "quarantined: {n} file(s), {} bytes of damaged spool data kept in {} (see the error log and the \
             queue_corrupt alert; what could be identified is listed above as held)\n",
            quarantine.bytes,
            quarantine.dir.display()
        ),
    };
    if messages.is_empty() {
        return Ok(format!("queue is empty\n{kept}"));
    }
    let mut rows = vec![[
        "ID",
        "ACCOUNT",
        "SENDER",
        "PENDING/DELIVERED/BOUNCED",
        "SIZE",
        "AGE",
        "ATTEMPTS",
        "NEXT",
        "LAST REPLY",
    ]
    .map(String::from)
    .to_vec()];
    for m in &messages {
        let count = |state: &str| m.recipients.iter().filter(|r| r.state == state).count();
        rows.push(vec![
            m.id.clone(),
            m.account.clone(),
            sender(m),
            format!(
                "{}/{}/{}",
                count("pending"),
                count("delivered"),
                count("bounced")
            ),
            m.size.to_string(),
            span_text(m.age_secs),
            m.attempts.to_string(),
            if m.held.is_some() {
                "held".into()
            } else if m.next_attempt_secs == 0 {
                "now".into()
            } else {
                format!("in {}", span_text(m.next_attempt_secs))
            },
            m.held
                .clone()
                .or_else(|| m.last_reply.clone())
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    // A store several relays share: which relay holds each message, and whether it is being sent.
    if messages.iter().any(|m| m.relay.is_some()) {
        rows[0].push("RELAY".into());
        for (row, m) in rows.iter_mut().skip(1).zip(&messages) {
            let relay = m.relay.clone().unwrap_or_else(|| "-".into());
            row.push(match &m.sending {
                Some(_) => format!("{relay} (sending)"),
                None => relay,
            });
        }
    }
    let mut out = super::columns(rows);
    out.push_str(&format!("{} message(s)\n", messages.len()));
    out.push_str(&kept);
    Ok(out)
}

fn sender(m: &MessageView) -> String {
    if m.sender.is_empty() {
        "<>".into()
    } else {
        m.sender.clone()
    }
}

/// Envelope, each recipient's state and last reply, and the headers (never the body).
pub(super) async fn show(ctx: &AdminContext, id: &str) -> Result<String, String> {
    let Some((m, headers)) = ctx.queue.show(id).await else {
        return Err(format!(
            "no queued message {id}; `{}` lists them",
            crate::hints::command("queue")
        ));
    };
    let mut out = format!(
        "id: {}\naccount: {}\nsender: {}\nsize: {}\nage: {}\nattempts: {}\nnext attempt: in {}\nlast reply: {}\nrecipients:\n",
        m.id,
        m.account,
        sender(&m),
        m.size,
        span_text(m.age_secs),
        m.attempts,
        span_text(m.next_attempt_secs),
        m.last_reply.as_deref().unwrap_or("-"),
    );
    if let Some(held) = &m.held {
        out.push_str(&format!("held: {held}\n"));
    }
    for r in &m.recipients {
        out.push_str(&format!(
            "  {} {} {}\n",
            r.address,
            r.state,
            r.last_reply.as_deref().unwrap_or("")
        ));
    }
    out.push_str("headers:\n");
    for line in headers.lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    Ok(out)
}

pub(super) async fn retry(ctx: &AdminContext, target: Target) -> Result<String, String> {
    if let Target::Account(a) = &target {
        super::account(ctx, a)?;
    }
    let n = ctx.queue.retry(&target).await;
    match target {
        Target::Id(id) if n == 0 => Err(format!(
            "no queued message {id}; `{}` lists them",
            crate::hints::command("queue")
        )),
        _ if !ctx.queue.delivering() => Ok(format!(
            "{n} message(s) due now; no relay is running, so they go out when `{}` starts\n",
            crate::hints::command("serve")
        )),
        _ => Ok(format!(
            "{n} message(s) scheduled for delivery now (pacing still applies)\n"
        )),
    }
}

pub(super) async fn delete(ctx: &AdminContext, id: &str) -> Result<String, String> {
    if ctx.queue.delete(id).await? {
        Ok(format!("message {id} deleted (no bounce sent)\n"))
    } else {
        Err(format!(
            "no queued message {id}; `{}` lists them",
            crate::hints::command("queue")
        ))
    }
}
