//! One mailer session's messages on their way upstream: the interface the inbound connection calls.
//!
//! [`Submission`] takes a transaction step by step (`mail`, `rcpt`, `data`, `body`, `end_data`,
//! `reset`, `abort`) and answers each with an [`Outcome`] carrying the reply the mailer should see,
//! so an upstream rejection reaches the mailer with the upstream's own code. It holds a pooled
//! upstream connection only for the length of one transaction ([`Submission::open`] leases it), so
//! fifty mailer sessions of one account can share its three connections. It gets access tokens
//! through the pool's dialer and never sees a refresh token.
//!
//! When the upstream offers PIPELINING (RFC 2920) and the mailer's RCPTs and DATA are already
//! buffered behind its MAIL, they go upstream in the same write; the replies are kept in order and
//! handed out as the session asks for each command, so the mailer still gets each reply for its own
//! command.

use std::collections::VecDeque;
use std::sync::Arc;

use super::activity::Activity;
use super::outcome::{Outcome, UpstreamError};
use super::pacing::{Pacer, Pacers};
use super::pool::{Lease, OpenError, Pool};
use super::queue::model::Envelope;
use super::queue::spool::SpoolWriter;
use super::queue::Queue;
use crate::config::{Account, DeliveryMode};
use crate::oauth::tokens::TokenManager;
use crate::observe::metrics::AccountCounters;
use crate::observe::MessageOutcome;
use crate::smtp::body::BodyChunk;
use crate::smtp::session::{Ahead, MailParams};
use crate::smtp::{Reply, Severity};

/// Everything delivery needs that is shared by all sessions.
pub struct UpstreamContext {
    pub tokens: Arc<TokenManager>,
    pub pool: Arc<Pool>,
    pub activity: Activity,
    pub pacers: Arc<Pacers>,
    pub queue: Arc<Queue>,
    /// How long a direct-mode message waits for its turn under the account's pacing.
    /// In milliseconds: `upstream_wait_secs`, which a reload may change.
    pub pacing_wait: std::sync::atomic::AtomicU64,
    pub observer: crate::observe::Observer,
}

/// Outcome of the upstream half of a message, for the per-message log line.
#[derive(Debug, Default, Clone)]
pub struct MessageStats {
    pub sender: String,
    pub recipients: usize,
    pub size: usize,
    /// Queue mode: the id the message was queued as.
    pub queued_as: Option<String>,
}

/// Delivery of one session's messages through the account's provider.
pub struct Submission {
    ctx: Arc<UpstreamContext>,
    account: Arc<Account>,
    /// The connection of the transaction in progress.
    lease: Option<Lease>,
    /// The upstream accepted MAIL and the transaction has not ended.
    in_transaction: bool,
    /// The upstream accepted DATA and is reading a body.
    in_data: bool,
    /// Replies to commands sent ahead with MAIL, in order, with the command each answers.
    ahead: VecDeque<(String, Result<Reply, UpstreamError>)>,
    /// RCPTs forwarded in the transaction in progress (for `max_recipients_per_message`).
    rcpts: usize,
    pacer: Option<Arc<Pacer>>,
    counters: AccountCounters,
    usage: crate::observe::usage::AccountHandle,
    /// Queue mode: the message being received into the spool.
    spooled: Option<Spooled>,
    pub stats: MessageStats,
}

/// A queue-mode message on its way into the spool.
struct Spooled {
    env: Envelope,
    writer: Option<SpoolWriter>,
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

fn unavailable(e: &UpstreamError) -> Reply {
    Reply::new(
        451,
        format!("4.4.1 Upstream not available, try again later ({e})"),
    )
}

fn closed_by_upstream(reply: &Reply) -> Reply {
    Reply::new(
        451,
        format!(
            "4.4.1 Upstream closed the connection ({}), try again later",
            reply.summary()
        ),
    )
}

/// A reply the connection must not be used after: the upstream said it is closing.
fn closing(result: &Result<Reply, UpstreamError>) -> bool {
    matches!(result, Ok(r) if r.code == 421)
}

impl Submission {
    pub fn new(ctx: Arc<UpstreamContext>, account: Arc<Account>) -> Submission {
        let pacer = ctx.pacers.get(&account.name);
        let counters = ctx.observer.metrics.account(&account.name);
        let usage = ctx.observer.usage.account(&account.name);
        Submission {
            ctx,
            account,
            lease: None,
            in_transaction: false,
            in_data: false,
            ahead: VecDeque::new(),
            rcpts: 0,
            pacer,
            counters,
            usage,
            spooled: None,
            stats: MessageStats::default(),
        }
    }

    /// Counts the message that just ended (metrics and usage).
    pub fn record(&self, outcome: MessageOutcome) {
        let s = &self.stats;
        self.counters.message(outcome, s.size);
        match outcome {
            MessageOutcome::Relayed => {
                self.counters.accepted(s.recipients as u64);
                self.usage.message(s.recipients as u64, s.size as u64);
            }
            MessageOutcome::Queued => self.usage.message(s.recipients as u64, s.size as u64),
            _ => {}
        }
    }

    /// Direct mode under pacing: waits for the account's turn (up to `upstream_wait_secs`), or
    /// says why not.
    async fn paced(&self) -> Result<(), Reply> {
        let Some(pacer) = &self.pacer else {
            return Ok(());
        };
        let clock = self.ctx.tokens.clock();
        let wait = self
            .ctx
            .pacing_wait
            .load(std::sync::atomic::Ordering::Relaxed);
        let deadline = clock.now() + std::time::Duration::from_millis(wait);
        loop {
            match pacer.take(0, self.ctx.pacers.now_ms()) {
                Ok(()) => return Ok(()),
                Err(wait) if clock.now() + wait.after <= deadline => {
                    tokio::time::sleep(wait.after).await;
                }
                Err(wait) => {
                    let text = wait.describe(&self.account.name);
                    tracing::warn!(account = %self.account.name, "{text}");
                    return Err(Reply::new(451, format!("4.7.0 {text}; try again later")));
                }
            }
        }
    }

    /// Whether one more RCPT may go upstream in this transaction (direct mode's share of pacing).
    fn recipient_allowed(&self) -> Result<(), Reply> {
        let Some(pacer) = &self.pacer else {
            return Ok(());
        };
        let cap = pacer.recipients_per_message();
        if cap > 0 && self.rcpts >= cap {
            return Err(Reply::new(
                452,
                format!(
                    "4.5.3 Too many recipients for one message to this provider (at most {cap}); send the rest in another message"
                ),
            ));
        }
        pacer
            .take_recipient(self.ctx.pacers.now_ms())
            .map_err(|wait| {
                let text = wait.describe(&self.account.name);
                tracing::warn!(account = %self.account.name, "{text}");
                Reply::new(451, format!("4.7.0 {text}; try again later"))
            })
    }

    /// Leases an authenticated connection from the account's pool; the refusal is the mailer's reply.
    async fn open(&self, fresh: bool) -> Result<Lease, Reply> {
        let name = &self.account.name;
        self.ctx
            .pool
            .lease(&self.account, fresh)
            .await
            .map_err(|e| match e {
                OpenError::Busy { cap } => {
                    tracing::warn!(account = %name, cap, "all upstream connections busy");
                    Reply::new(
                        451,
                        format!(
                            "4.4.5 account `{name}`: all {cap} upstream connections are busy; try again later"
                        ),
                    )
                }
                OpenError::Token(e) => {
                    tracing::warn!(account = %name, error = %e, "no access token for the upstream");
                    Reply::new(454, format!("4.7.0 {}", e.for_mailer()))
                }
                OpenError::AuthRejected(reply) => {
                    let text = token_refused_text(&self.account, &reply);
                    tracing::warn!(account = %name, reply = %reply.summary(), "{text}");
                    Reply::new(454, format!("4.7.0 {text}"))
                }
                // A refusal before MAIL (greeting, EHLO, STARTTLS) is about the connection, not
                // this message: the mailer should retry later, not bounce.
                OpenError::Connect(e) => {
                    tracing::warn!(account = %name, error = %e, "upstream connection failed");
                    unavailable(&e)
                }
            })
    }

    /// Retires the connection of this transaction.
    fn drop_connection(&mut self) {
        self.lease = None;
        self.in_transaction = false;
        self.in_data = false;
        self.ahead.clear();
    }

    /// Hands the connection back to the pool for the next transaction (unless a step on it was
    /// cut short, which leaves the dialogue out of step).
    fn give_back(&mut self) {
        if let Some(mut lease) = self.lease.take() {
            if lease.client().is_some_and(|c| !c.in_step()) {
                lease.give_back();
            }
        }
        self.in_transaction = false;
        self.in_data = false;
        self.ahead.clear();
    }

    /// The mailer's reply for the upstream's answer to a step; a broken or closing connection is
    /// retired and reported as a temporary failure.
    fn settle(&mut self, result: Result<Reply, UpstreamError>) -> Reply {
        match result {
            Ok(reply) if reply.code == 421 => {
                // The upstream is closing the connection; only our session with it ends, not the mailer's.
                tracing::warn!(account = %self.account.name, reply = %reply.summary(), "upstream closed the connection");
                self.drop_connection();
                closed_by_upstream(&reply)
            }
            Ok(reply) => reply,
            Err(e) => {
                tracing::warn!(account = %self.account.name, error = %e, "upstream connection failed");
                self.drop_connection();
                unavailable(&e)
            }
        }
    }

    /// Sends a command of the open transaction, or takes its reply if it was sent ahead.
    async fn step(&mut self, line: String) -> Reply {
        // A DATA sent ahead that the session answered itself (no recipient accepted) is left over:
        // its reply is dropped, unless the upstream opened DATA, which only closing can end.
        if line != "DATA" && self.ahead.front().is_some_and(|(sent, _)| sent == "DATA") {
            if let Some((_, Ok(r))) = self.ahead.pop_front() {
                if r.code == 354 {
                    self.drop_connection();
                    return Reply::new(451, "4.4.1 Upstream connection lost");
                }
            }
        }
        if let Some((sent, _)) = self.ahead.front() {
            if *sent == line {
                let (_, result) = self.ahead.pop_front().expect("front exists");
                return self.settle(result);
            }
            // The session always asks for what it let us send ahead, in order; anything else means
            // the dialogue is out of step.
            tracing::warn!(account = %self.account.name, "pipelined commands out of step; dropping the connection");
            self.drop_connection();
        }
        let Some(client) = self.lease.as_mut().and_then(Lease::client) else {
            return Reply::new(451, "4.4.1 Upstream connection lost");
        };
        let result = client.command(&line).await;
        self.settle(result)
    }

    pub async fn mail(&mut self, from: &str, params: &MailParams, ahead: &Ahead) -> Outcome {
        self.stats = MessageStats {
            sender: from.to_string(),
            ..MessageStats::default()
        };
        if self.in_transaction {
            // The mailer abandoned its last transaction without telling us (the session reports
            // RSET, so this is only a safety net).
            self.reset().await;
        }
        self.rcpts = 0;
        if self.account.delivery == DeliveryMode::Queue {
            if !self.ctx.queue.has_room() {
                self.record(MessageOutcome::Failed);
                return Outcome::from_reply(Reply::new(
                    452,
                    "4.3.1 Insufficient system storage; try again later",
                ));
            }
            self.spooled = Some(Spooled {
                env: Envelope {
                    account: self.account.name.clone(),
                    sender: from.to_string(),
                    eight_bit: params.eight_bit,
                    smtputf8: params.smtputf8,
                    ..Envelope::default()
                },
                writer: None,
            });
            return Outcome::from_reply(Reply::new(250, "2.1.0 Ok"));
        }
        let reply = match self.paced().await {
            Err(reply) => reply,
            Ok(()) => self.mail_reply(from, params, ahead).await,
        };
        // A message that never got started upstream (unreachable, busy, paced, refused) is
        // counted here; the others at their end.
        match reply.severity() {
            Severity::Transient => self.record(MessageOutcome::Failed),
            Severity::Permanent => self.record(MessageOutcome::Rejected),
            _ => {}
        }
        Outcome::from_reply(reply)
    }

    async fn mail_reply(&mut self, from: &str, params: &MailParams, ahead: &Ahead) -> Reply {
        for attempt in 0..2 {
            self.rcpts = 0;
            let mut lease = match self.lease.take() {
                Some(lease) => lease,
                None => match self.open(attempt > 0).await {
                    Ok(lease) => lease,
                    Err(reply) => return reply,
                },
            };
            let Some(conn) = lease.conn.as_mut() else {
                return Reply::new(451, "4.4.1 Upstream connection lost");
            };
            let caps = conn.client.caps.clone();
            let size = params.size.map(|s| s as u64);
            let line = match caps.mail_command(from, size, params.eight_bit, params.smtputf8) {
                Ok(line) => line,
                Err(refusal) => {
                    lease.give_back();
                    return refusal;
                }
            };
            let mut lines = vec![line];
            if caps.pipelining {
                // Only as many RCPTs as pacing allows go ahead; the rest are answered one by one.
                let mut all = true;
                for to in &ahead.rcpts {
                    if self.recipient_allowed().is_err() {
                        all = false;
                        break;
                    }
                    self.rcpts += 1;
                    lines.push(format!("RCPT TO:<{to}>"));
                }
                if ahead.data && all {
                    lines.push("DATA".to_string());
                }
            }
            let mut results = conn.client.pipeline(&lines).await.into_iter();
            let first = results.next().expect("one result per line");
            // A connection kept idle in the pool may have been closed by the upstream meanwhile:
            // that shows as a broken connection or a 421 before any reply. Replace it, once.
            let dead = matches!(first, Err(UpstreamError::Connection(_))) || closing(&first);
            if conn.reused && dead && attempt == 0 {
                tracing::debug!(account = %self.account.name, "pooled upstream connection was closed; opening another");
                drop(lease);
                continue;
            }
            self.ahead = lines.into_iter().skip(1).zip(results).collect();
            self.lease = Some(lease);
            let reply = self.settle(first);
            if reply.is_positive() {
                self.in_transaction = true;
            } else if self
                .ahead
                .iter()
                .any(|(_, r)| matches!(r, Ok(r) if r.code == 354))
            {
                // A server that opened DATA without a transaction is not one to reuse.
                self.drop_connection();
            } else {
                self.give_back();
            }
            return reply;
        }
        Reply::new(451, "4.4.1 Upstream connection lost")
    }

    /// The next step's reply came with MAIL's (pipelining): answering it will not wait.
    pub fn answer_ready(&self) -> bool {
        !self.ahead.is_empty()
    }

    pub async fn rcpt(&mut self, to: &str) -> Outcome {
        if let Some(spooled) = self.spooled.as_mut() {
            spooled.env.recipients.push(to.to_string());
            self.stats.recipients += 1;
            return Outcome::from_reply(Reply::new(250, "2.1.5 Ok"));
        }
        let line = format!("RCPT TO:<{to}>");
        let sent_ahead = self.ahead.front().is_some_and(|(sent, _)| *sent == line);
        if !sent_ahead {
            if let Err(reply) = self.recipient_allowed() {
                return Outcome::from_reply(reply);
            }
            self.rcpts += 1;
        }
        let reply = self.step(line).await;
        if reply.is_positive() {
            self.stats.recipients += 1;
        } else {
            self.counters.rejected();
        }
        Outcome::from_reply(reply)
    }

    pub async fn data(&mut self) -> Outcome {
        if let Some(spooled) = self.spooled.as_mut() {
            spooled.writer = Some(self.ctx.queue.writer(&mut spooled.env));
            return Outcome::from_reply(Reply::new(354, "End data with <CR><LF>.<CR><LF>"));
        }
        let reply = self.step("DATA".to_string()).await;
        self.in_data = reply.code == 354;
        Outcome::from_reply(reply)
    }

    /// Streams part of the body. A failure drops the connection; `end_data` then reports it.
    pub async fn body(&mut self, chunk: &BodyChunk) {
        self.stats.size += chunk.len();
        if let Some(writer) = self.spooled.as_mut().and_then(|s| s.writer.as_mut()) {
            writer.push(chunk.bytes()).await;
            return;
        }
        if let Some(client) = self.lease.as_mut().and_then(Lease::client) {
            if let Err(e) = client.body_chunk(chunk).await {
                tracing::warn!(account = %self.account.name, error = %e, "upstream connection failed during DATA");
                self.drop_connection();
            }
        }
    }

    pub async fn end_data(&mut self) -> Outcome {
        if let Some(Spooled {
            env,
            writer: Some(writer),
        }) = self.spooled.take()
        {
            return Outcome::from_reply(match self.ctx.queue.accept(writer, env).await {
                Ok(id) => {
                    let reply = super::queue::queued_reply(&id);
                    self.stats.queued_as = Some(id);
                    reply
                }
                Err(e) => {
                    tracing::warn!(account = %self.account.name, error = %e, "cannot queue a message");
                    Reply::new(
                        451,
                        "4.3.0 Cannot queue the message right now; try again later",
                    )
                }
            });
        }
        let Some(client) = self.lease.as_mut().and_then(Lease::client) else {
            return Outcome::from_reply(Reply::new(
                451,
                "4.4.1 Upstream connection lost during DATA; message not sent",
            ));
        };
        let reply = match client.end_data().await {
            Ok(reply) if reply.code == 421 => {
                // A temporary failure for the mailer (not a 421 of ours: the relay is not closing),
                // and the connection is done.
                self.drop_connection();
                tracing::warn!(account = %self.account.name, reply = %reply.summary(), "upstream closed the connection after the message");
                closed_by_upstream(&reply)
            }
            Ok(reply) => {
                self.give_back();
                reply
            }
            Err(e) => {
                self.drop_connection();
                tracing::warn!(account = %self.account.name, error = %e, "no final reply from upstream");
                // The upstream may or may not have taken it; a temporary failure makes the mailer retry.
                return Outcome::from_reply(Reply::new(
                    451,
                    format!(
                        "4.4.1 No final reply from upstream ({e}); message may not have been sent"
                    ),
                ));
            }
        };
        if reply.is_positive() {
            let now = self.ctx.tokens.clock().unix();
            self.ctx.activity.touch(&self.account.name, now);
        }
        Outcome::from_reply(reply)
    }

    /// The mailer abandoned its transaction: reset it upstream and hand the connection back.
    pub async fn reset(&mut self) {
        // A half-received queued message is thrown away with its spool file.
        self.spooled = None;
        let cut_short = self
            .lease
            .as_mut()
            .and_then(Lease::client)
            .is_some_and(|c| c.in_step());
        // A DATA sent ahead that the upstream opened (354) has it reading a body: RSET would be
        // message text. Likewise a step cut short. Only closing ends those.
        let data_open = self
            .ahead
            .iter()
            .any(|(_, r)| matches!(r, Ok(r) if r.code == 354));
        if self.in_data || cut_short || data_open {
            return self.abort();
        }
        if !self.in_transaction {
            return self.give_back();
        }
        self.ahead.clear();
        let reply = self.step("RSET".to_string()).await;
        if reply.code == 250 {
            self.give_back();
        } else {
            self.drop_connection();
        }
    }

    /// Abandons the current transaction mid-DATA: closing the connection is the only way SMTP
    /// offers, and it guarantees the upstream discards the partial message. Never back in the pool.
    pub fn abort(&mut self) {
        self.spooled = None;
        if self.lease.is_some() {
            tracing::info!(account = %self.account.name, "upstream transaction aborted");
        }
        self.drop_connection();
    }

    /// The mailer's session is over: whatever it held goes back (or, mid-DATA, is closed).
    pub async fn finish(&mut self) {
        self.reset().await;
    }
}
