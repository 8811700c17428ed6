//! One upstream transaction for a queued message: MAIL, a batch of RCPTs, DATA, the body from the
//! spool, and one reply per recipient.
//!
//! Every recipient of the batch comes back with the reply that decides its fate (its own RCPT
//! reply, or the DATA / end-of-data reply that applied to it, or a made-up `451` when the
//! connection broke before an answer), so the queue never has to guess. A throttling reply anywhere
//! stops the transaction instead, and nothing of it counts.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::model::Envelope;
use super::retry::throttle;
use super::spool::BodySource;
use crate::config::Account;
use crate::delivery::outcome::UpstreamError;
use crate::delivery::pool::{Lease, OpenError, Pool};
use crate::delivery::submission::token_refused_text;
use crate::smtp::Reply;

const READ_CHUNK: usize = 128 * 1024;

/// Why a transaction did not get as far as deciding recipients.
#[derive(Debug)]
pub enum Stopped {
    /// The provider is throttling the account; `recipient`: the reply came to that one's RCPT
    /// (its index in the batch), not to the connection or the message.
    Throttled {
        reply: Reply,
        recipient: Option<usize>,
    },
    /// No connection: the upstream is unreachable, or the token is not accepted or not available.
    Trouble(String),
    /// Every connection of the account is in use (by direct-mode sessions).
    Busy,
}

fn lost(e: &UpstreamError) -> Reply {
    Reply::new(451, format!("4.4.1 Upstream connection lost ({e})"))
}

/// A reply that stops the transaction, if any.
fn throttled(r: &Result<Reply, UpstreamError>) -> Option<Reply> {
    match r {
        Ok(r) if throttle(r).is_some() => Some(r.clone()),
        _ => None,
    }
}

/// Runs one transaction for `rcpts` (addresses) of `env`; the replies are in the order of `rcpts`.
pub async fn transfer(
    pool: &Pool,
    account: &Arc<Account>,
    env: &Envelope,
    rcpts: &[String],
    body: &BodySource,
) -> Result<Vec<Reply>, Stopped> {
    for attempt in 0..2 {
        let mut lease = pool
            .lease(account, attempt > 0)
            .await
            .map_err(|e| match e {
                OpenError::Busy { .. } => Stopped::Busy,
                OpenError::Token(e) => Stopped::Trouble(e.to_string()),
                OpenError::AuthRejected(r) if throttle(&r).is_some() => Stopped::Throttled {
                    reply: r,
                    recipient: None,
                },
                OpenError::AuthRejected(r) => Stopped::Trouble(token_refused_text(account, &r)),
                OpenError::Connect(UpstreamError::Rejected(r)) if throttle(&r).is_some() => {
                    Stopped::Throttled {
                        reply: r,
                        recipient: None,
                    }
                }
                OpenError::Connect(e) => Stopped::Trouble(e.to_string()),
            })?;
        match run(&mut lease, env, rcpts, body).await {
            Step::Retry if attempt == 0 => {
                tracing::debug!(account = %account.name, "pooled upstream connection was closed; opening another");
                continue;
            }
            Step::Retry => return Ok(vec![lost_text("closed"); rcpts.len()]),
            Step::Done(replies, keep) => {
                give_back_if(lease, keep);
                return Ok(replies);
            }
            Step::Throttled(reply, keep, recipient) => {
                give_back_if(lease, keep);
                return Err(Stopped::Throttled { reply, recipient });
            }
        }
    }
    unreachable!("the loop returns on its second pass")
}

/// Back to the pool only a connection whose dialogue is complete; dropping it closes it.
fn give_back_if(mut lease: Lease, keep: bool) {
    if keep && lease.client().is_some_and(|c| !c.in_step()) {
        lease.give_back();
    }
}

fn lost_text(what: &str) -> Reply {
    Reply::new(451, format!("4.4.1 Upstream connection {what}"))
}

enum Step {
    /// The replies, and whether the connection may be reused.
    Done(Vec<Reply>, bool),
    /// The reply, whether the connection may be reused, and the recipient whose RCPT drew it.
    Throttled(Reply, bool, Option<usize>),
    /// A pooled connection turned out dead before any reply.
    Retry,
}

async fn run(lease: &mut Lease, env: &Envelope, rcpts: &[String], body: &BodySource) -> Step {
    let Some(conn) = lease.conn.as_mut() else {
        return Step::Done(vec![lost_text("lost"); rcpts.len()], false);
    };
    let reused = conn.reused;
    let client = &mut conn.client;
    let caps = client.caps.clone();
    let all = |r: Reply, keep| Step::Done(vec![r; rcpts.len()], keep);
    let mail = match caps.mail_command(&env.sender, Some(env.size), env.eight_bit, env.smtputf8) {
        Ok(line) => line,
        Err(refusal) => return all(refusal, true),
    };
    let mut lines = vec![mail];
    if caps.pipelining {
        lines.extend(rcpts.iter().map(|to| format!("RCPT TO:<{to}>")));
        lines.push("DATA".into());
    }
    let mut results = client.pipeline(&lines).await.into_iter();
    let first = results.next().expect("one result per line");
    let dead = matches!(first, Err(UpstreamError::Connection(_)))
        || matches!(&first, Ok(r) if r.code == 421);
    if reused && dead {
        return Step::Retry;
    }
    let pipelined = caps.pipelining;
    // What was sent ahead and is still owed: a DATA the server opened can only be ended by closing.
    let mail = match first {
        Err(e) => return all(lost(&e), false),
        Ok(r) => r,
    };
    if let Some(r) = throttled(&Ok(mail.clone())) {
        return Step::Throttled(r, !pipelined && mail.code != 421, None);
    }
    if !mail.is_positive() {
        // Pipelined RCPTs and DATA were refused too (no transaction); the connection is only fit
        // for reuse when every one of them was answered and none opened DATA.
        let clean = results.all(|r| matches!(r, Ok(r) if r.code != 354));
        return all(mail, clean);
    }
    let mut results_rcpt: Vec<Result<Reply, UpstreamError>> = Vec::with_capacity(rcpts.len());
    if pipelined {
        results_rcpt.extend(results.by_ref().take(rcpts.len()));
    } else {
        for to in rcpts {
            let r = client.command(&format!("RCPT TO:<{to}>")).await;
            // After a throttling reply or a broken connection, the rest would only hit a wall.
            let stop = r.is_err() || throttled(&r).is_some();
            results_rcpt.push(r);
            if stop {
                break;
            }
        }
    }
    // Throttling first: a provider that says "slow down" and hangs up is throttling, not broken.
    if let Some((at, r)) = results_rcpt
        .iter()
        .enumerate()
        .find_map(|(i, r)| throttled(r).map(|r| (i, r)))
    {
        let data = if pipelined { results.next() } else { None };
        let clean = results_rcpt.iter().all(Result::is_ok)
            && !matches!(data, Some(Ok(ref d)) if d.code == 354)
            && !matches!(data, Some(Err(_)))
            && r.code != 421;
        return Step::Throttled(r, clean && reset(client).await, Some(at));
    }
    if let Some(e) = results_rcpt.iter().find_map(|r| r.as_ref().err()).cloned() {
        // Recipients that had their answer keep it; the others lost theirs with the connection.
        let mut replies: Vec<Reply> = results_rcpt
            .into_iter()
            .map(|r| match r {
                Ok(r) if !r.is_positive() => r,
                _ => lost(&e),
            })
            .collect();
        replies.resize(rcpts.len(), lost(&e));
        return Step::Done(replies, false);
    }
    let mut replies: Vec<Reply> = results_rcpt
        .into_iter()
        .map(|r| r.expect("no errors"))
        .map(|r| {
            // Only 2xx accepts a recipient; anything else positive is a server out of step.
            if r.is_positive() && r.code >= 300 {
                Reply::new(
                    451,
                    format!("4.5.0 Unexpected reply to RCPT ({})", r.summary()),
                )
            } else {
                r
            }
        })
        .collect();
    let accepted: Vec<usize> = (0..replies.len())
        .filter(|i| replies[*i].is_positive())
        .collect();
    let data = if pipelined {
        results.next().expect("a result for DATA")
    } else if accepted.is_empty() {
        return Step::Done(replies, reset(client).await);
    } else {
        client.command("DATA").await
    };
    let data = match data {
        Err(e) => {
            for i in &accepted {
                replies[*i] = lost(&e);
            }
            return Step::Done(replies, false);
        }
        Ok(d) => d,
    };
    if accepted.is_empty() {
        // Nothing to send (the server should have refused DATA; if it opened it, only closing ends it).
        let keep = data.code != 354 && reset(client).await;
        return Step::Done(replies, keep);
    }
    if data.code != 354 {
        if data.is_positive() {
            // DATA "accepted" without asking for the body: nothing was sent.
            let r = Reply::new(
                451,
                format!("4.5.0 Unexpected reply to DATA ({})", data.summary()),
            );
            for i in &accepted {
                replies[*i] = r.clone();
            }
            return Step::Done(replies, false);
        }
        if throttle(&data).is_some() {
            let keep = data.code != 421 && reset(client).await;
            return Step::Throttled(data, keep, None);
        }
        for i in &accepted {
            replies[*i] = data.clone();
        }
        let keep = data.code != 421 && reset(client).await;
        return Step::Done(replies, keep);
    }
    if let Err(e) = send_body(client, body).await {
        for i in &accepted {
            replies[*i] = e.clone();
        }
        return Step::Done(replies, false);
    }
    match client.end_data().await {
        Err(e) => {
            // The upstream may or may not have taken it; the recipients stay pending.
            let r = Reply::new(451, format!("4.4.1 No final reply from upstream ({e})"));
            for i in &accepted {
                replies[*i] = r.clone();
            }
            Step::Done(replies, false)
        }
        Ok(f) if throttle(&f).is_some() => Step::Throttled(f.clone(), f.code != 421, None),
        Ok(f) if f.code < 400 && f.code >= 300 => {
            let r = Reply::new(
                451,
                format!(
                    "4.5.0 Unexpected reply to the end of data ({})",
                    f.summary()
                ),
            );
            for i in &accepted {
                replies[*i] = r.clone();
            }
            Step::Done(replies, false)
        }
        Ok(f) => {
            let keep = f.code != 421;
            for i in &accepted {
                replies[*i] = f.clone();
            }
            Step::Done(replies, keep)
        }
    }
}

/// Ends a transaction that will not be completed; `false` when the connection is not fit for reuse.
async fn reset(client: &mut crate::delivery::client::Client) -> bool {
    matches!(client.command("RSET").await, Ok(r) if r.code == 250)
}

/// Streams the spooled body to the upstream; the error is the recipients' reply. A small body is
/// read in one go (one trip to the blocking pool), a large one (always in a file) in chunks.
async fn send_body(
    client: &mut crate::delivery::client::Client,
    body: &BodySource,
) -> Result<(), Reply> {
    let unreadable =
        |e: std::io::Error| Reply::new(451, format!("4.3.0 Cannot read the spooled message ({e})"));
    let (path, offset) = match body {
        BodySource::File { path, offset, len } if *len > READ_CHUNK as u64 => (path, *offset),
        small => {
            if let Some(bytes) = small.read_cached() {
                return client.body(&bytes).await.map_err(|e| lost(&e));
            }
            let source = small.clone();
            let bytes = tokio::task::spawn_blocking(move || source.read(u64::MAX))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r)
                .map_err(unreadable)?;
            return client.body(&bytes).await.map_err(|e| lost(&e));
        }
    };
    let mut file = tokio::fs::File::open(path).await.map_err(unreadable)?;
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(unreadable)?;
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = file.read(&mut buf).await.map_err(unreadable)?;
        if n == 0 {
            return Ok(());
        }
        client.body(&buf[..n]).await.map_err(|e| lost(&e))?;
    }
}
