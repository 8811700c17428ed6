//! The SMTP transport: a message as one SMTP transaction on a pooled, authenticated connection.
//!
//! This is the one place a transaction runs, for direct mode and the queue alike: MAIL with its
//! parameters, the RCPTs and DATA sent ahead when the upstream offers PIPELINING (the replies kept
//! in order and handed out as each stage is asked for), one retry on a fresh connection when a
//! pooled one turns out to have been closed while idle, and the keep-or-drop rule: a connection
//! goes back to the pool only when its dialogue is complete and in step; after a `421`, a broken
//! step, a `354` nobody will answer, or an abandoned body, it is closed.

use std::collections::VecDeque;
use std::sync::Arc;

use super::client::Client;
use super::error::UpstreamError;
use super::pool::{Lease, OpenError, Pool};
use super::status::{Cause, Status};
use super::transport::{Begun, MailStart, Transaction, Transport};
use crate::config::Account;
use crate::smtp::body::BodyChunk;
use crate::smtp::Reply;
use crate::util::BoxFuture;

pub struct SmtpTransport {
    pool: Arc<Pool>,
}

impl SmtpTransport {
    pub fn new(pool: Arc<Pool>) -> SmtpTransport {
        SmtpTransport { pool }
    }
}

/// Why the upstream will not take the account's token, and the fix when known.
pub fn token_refused_text(account: &Account, reply: &Reply) -> String {
    let hint = crate::hints::for_smtp_reply(account.provider.family, reply)
        .map(|h| format!("; {h}"))
        .unwrap_or_default();
    format!(
        "Upstream rejected the account's token ({}){hint}",
        reply.summary()
    )
}

fn lost() -> Status {
    Status::temporary(
        Cause::Connection,
        Reply::new(451, "4.4.1 Upstream connection lost"),
    )
}

/// A positive reply where the dialogue wants another: the server is out of step.
fn unexpected(what: &str, reply: &Reply) -> Status {
    Status::temporary(
        Cause::Deferred,
        Reply::new(
            451,
            format!("4.5.0 Unexpected reply to {what} ({})", reply.summary()),
        ),
    )
}

impl SmtpTransport {
    /// The status for a connection that could not be had.
    fn refused(&self, account: &Account, e: OpenError) -> Status {
        let name = &account.name;
        match e {
            OpenError::Busy { cap } => {
                tracing::warn!(account = %name, cap, "all upstream connections busy");
                Status::temporary(
                    Cause::Busy,
                    Reply::new(
                        451,
                        format!(
                            "4.4.5 account `{name}`: all {cap} upstream connections are busy; try again later"
                        ),
                    ),
                )
            }
            OpenError::Token(e) => {
                tracing::warn!(account = %name, error = %e, "no access token for the upstream");
                Status::temporary(
                    Cause::Token,
                    Reply::new(454, format!("4.7.0 {}", e.for_mailer())),
                )
            }
            OpenError::AuthRejected(reply) => {
                let text = token_refused_text(account, &reply);
                tracing::warn!(account = %name, reply = %reply.summary(), "{text}");
                // Too many connections (`432 4.3.2` at AUTH) is throttling, not the token.
                let cause = match Status::from_reply(reply.clone()).cause() {
                    Some(c @ (Cause::Throttled | Cause::Quota)) => c,
                    _ => Cause::Token,
                };
                Status::temporary(cause, Reply::new(454, format!("4.7.0 {text}")))
            }
            // A refusal before MAIL (greeting, EHLO, STARTTLS) is about the connection, not this
            // message: the mailer should retry later, not bounce.
            OpenError::Connect(e) => {
                tracing::warn!(account = %name, error = %e, "upstream connection failed");
                let cause = match &e {
                    UpstreamError::Rejected(r) => Status::from_reply(r.clone())
                        .cause()
                        .filter(|c| matches!(c, Cause::Throttled | Cause::Quota))
                        .unwrap_or(Cause::Connection),
                    _ => Cause::Connection,
                };
                match Status::connection(&e) {
                    Status::Temporary { reply, .. } => Status::temporary(cause, reply),
                    other => other,
                }
            }
        }
    }
}

impl Transport for SmtpTransport {
    fn begin<'a>(
        &'a self,
        account: &'a Arc<Account>,
        start: MailStart<'a>,
    ) -> BoxFuture<'a, Begun> {
        Box::pin(async move {
            for attempt in 0..2 {
                let mut lease = match self.pool.lease(account, attempt > 0).await {
                    Ok(lease) => lease,
                    Err(e) => return (self.refused(account, e), None),
                };
                let Some(conn) = lease.conn.as_mut() else {
                    return (lost(), None);
                };
                let caps = conn.client.caps.clone();
                let line = match caps.mail_command(
                    start.from,
                    start.size,
                    start.eight_bit,
                    start.smtputf8,
                ) {
                    Ok(line) => line,
                    Err(refusal) => {
                        lease.give_back();
                        return (Status::from_reply(refusal), None);
                    }
                };
                let mut lines = vec![line];
                if caps.pipelining {
                    lines.extend(start.ahead.iter().map(|to| format!("RCPT TO:<{to}>")));
                    if start.data_ahead && !start.ahead.is_empty() {
                        lines.push("DATA".to_string());
                    }
                }
                let mut results = conn.client.pipeline(&lines).await.into_iter();
                let first = results.next().expect("one result per line");
                // A connection kept idle in the pool may have been closed by the upstream
                // meanwhile: that shows as a broken connection or a 421 before any reply.
                // Replace it, once.
                let dead = match &first {
                    Err(e) => e.closed(),
                    Ok(r) => r.code == 421,
                };
                if conn.reused && dead && attempt == 0 {
                    tracing::debug!(account = %account.name, "pooled upstream connection was closed; opening another");
                    continue;
                }
                let mut tx = SmtpTransaction {
                    account: account.clone(),
                    lease: Some(lease),
                    ahead: lines.into_iter().skip(1).zip(results).collect(),
                    in_data: false,
                };
                let status = tx.status_of(first);
                if status.is_accepted() {
                    let tx: Box<dyn Transaction> = Box::new(tx);
                    return (status, Some(tx));
                }
                // Refused: what was sent ahead was refused too (no transaction). A server that
                // opened DATA without a transaction is not one to reuse.
                if tx.data_open() {
                    tx.drop_connection();
                } else {
                    tx.give_back();
                }
                return (status, None);
            }
            (lost(), None)
        })
    }

    fn known_refusal(&self, account: &Account) -> Option<String> {
        self.pool
            .remembered_refusal(&account.name)
            .map(|reply| token_refused_text(account, &reply))
    }

    fn grant_changed(&self, account: &str) {
        self.pool.retire_account(account);
    }
}

/// An SMTP transaction in progress on a leased connection.
struct SmtpTransaction {
    account: Arc<Account>,
    lease: Option<Lease>,
    /// Replies to commands sent ahead with MAIL, in order, with the command each answers.
    ahead: VecDeque<(String, Result<Reply, UpstreamError>)>,
    /// The upstream accepted DATA and is reading a body.
    in_data: bool,
}

impl SmtpTransaction {
    fn client(&mut self) -> Option<&mut Client> {
        self.lease.as_mut().and_then(Lease::client)
    }

    /// Retires the connection: the upstream discards whatever was half done.
    fn drop_connection(&mut self) {
        self.lease = None;
        self.in_data = false;
        self.ahead.clear();
    }

    /// Hands the connection back to the pool for the next transaction, unless a step on it was
    /// cut short (the dialogue would be out of step).
    fn give_back(&mut self) {
        if let Some(mut lease) = self.lease.take() {
            if lease.client().is_some_and(|c| !c.in_step()) {
                lease.give_back();
            }
        }
        self.in_data = false;
        self.ahead.clear();
    }

    /// A DATA sent ahead that the upstream opened (354): only closing ends it.
    fn data_open(&self) -> bool {
        self.ahead
            .iter()
            .any(|(_, r)| matches!(r, Ok(r) if r.code == 354))
    }

    /// The status of a step's answer; a broken or closing connection is retired.
    fn status_of(&mut self, result: Result<Reply, UpstreamError>) -> Status {
        match result {
            Ok(reply) if reply.code == 421 => {
                // The upstream is closing the connection; only our session with it ends, not
                // the mailer's.
                tracing::warn!(account = %self.account.name, reply = %reply.summary(), "upstream closed the connection");
                self.drop_connection();
                Status::closed_by_upstream(&reply)
            }
            Ok(reply) => Status::from_reply(reply),
            Err(e) => {
                tracing::warn!(account = %self.account.name, error = %e, "upstream connection failed");
                self.drop_connection();
                Status::connection(&e)
            }
        }
    }

    /// Sends a command of the transaction, or takes its reply if it was sent ahead.
    async fn step(&mut self, line: String) -> Status {
        // A DATA sent ahead that the caller answered itself (no recipient accepted) is left over:
        // its reply is dropped, unless the upstream opened DATA, which only closing can end.
        if line != "DATA" && self.ahead.front().is_some_and(|(sent, _)| sent == "DATA") {
            if let Some((_, Ok(r))) = self.ahead.pop_front() {
                if r.code == 354 {
                    self.drop_connection();
                    return lost();
                }
            }
        }
        if let Some((sent, _)) = self.ahead.front() {
            if *sent == line {
                let (_, result) = self.ahead.pop_front().expect("front exists");
                return self.status_of(result);
            }
            // The caller asks for what it let us send ahead, in order; anything else means the
            // dialogue is out of step.
            tracing::warn!(account = %self.account.name, "pipelined commands out of step; dropping the connection");
            self.drop_connection();
        }
        let Some(client) = self.client() else {
            return lost();
        };
        let result = client.command(&line).await;
        self.status_of(result)
    }

    async fn end(mut self: Box<Self>) -> Status {
        let Some(client) = self.client() else {
            return Status::temporary(
                Cause::Connection,
                Reply::new(
                    451,
                    "4.4.1 Upstream connection lost during DATA; message not sent",
                ),
            );
        };
        match client.end_data().await {
            Ok(reply) if reply.code == 421 => {
                tracing::warn!(account = %self.account.name, reply = %reply.summary(), "upstream closed the connection after the message");
                self.drop_connection();
                Status::closed_by_upstream(&reply)
            }
            Ok(reply) if (300..400).contains(&reply.code) => {
                self.drop_connection();
                unexpected("the end of data", &reply)
            }
            Ok(reply) => {
                self.give_back();
                Status::from_reply(reply)
            }
            Err(e) => {
                tracing::warn!(account = %self.account.name, error = %e, "no final reply from upstream");
                self.drop_connection();
                // The upstream may or may not have taken it; a temporary failure makes the
                // mailer (or the queue) try again.
                Status::temporary(
                    Cause::Connection,
                    Reply::new(
                        451,
                        format!(
                            "4.4.1 No final reply from upstream ({e}); message may not have been sent"
                        ),
                    ),
                )
            }
        }
    }

    async fn rset(mut self: Box<Self>) {
        let cut_short = self.client().is_some_and(|c| c.in_step());
        // Reading a body (opened, or a DATA sent ahead that was opened) or a step cut short: an
        // RSET would be message text. Only closing ends those.
        if self.in_data || cut_short || self.data_open() {
            return self.abort();
        }
        self.ahead.clear();
        let Some(client) = self.client() else {
            return;
        };
        match client.command("RSET").await {
            Ok(r) if r.code == 250 => self.give_back(),
            _ => self.drop_connection(),
        }
    }
}

impl Transaction for SmtpTransaction {
    fn recipient<'a>(&'a mut self, to: &'a str) -> BoxFuture<'a, Status> {
        Box::pin(async move {
            let status = self.step(format!("RCPT TO:<{to}>")).await;
            match status {
                // Only 2xx accepts a recipient; anything else positive is a server out of step.
                Status::Accepted { reply } if reply.code >= 300 => unexpected("RCPT", &reply),
                other => other,
            }
        })
    }

    fn data(&mut self) -> BoxFuture<'_, Status> {
        Box::pin(async move {
            match self.step("DATA".to_string()).await {
                Status::Accepted { reply } if reply.code == 354 => {
                    self.in_data = true;
                    Status::Accepted { reply }
                }
                // DATA "accepted" without asking for the body: nothing can be sent.
                Status::Accepted { reply } => {
                    self.drop_connection();
                    unexpected("DATA", &reply)
                }
                other => other,
            }
        })
    }

    fn body<'a>(&'a mut self, chunk: &'a BodyChunk) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(client) = self.client() else {
                return;
            };
            if let Err(e) = client.body_chunk(chunk).await {
                tracing::warn!(account = %self.account.name, error = %e, "upstream connection failed during DATA");
                self.drop_connection();
            }
        })
    }

    fn finish(self: Box<Self>) -> BoxFuture<'static, Status> {
        Box::pin(self.end())
    }

    fn reset(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(self.rset())
    }

    fn abort(mut self: Box<Self>) {
        if self.lease.is_some() {
            tracing::info!(account = %self.account.name, "upstream transaction aborted");
        }
        self.drop_connection();
    }

    fn answer_ready(&self) -> bool {
        !self.ahead.is_empty()
    }
}
