//! One mailer session's messages on their way upstream: the interface the inbound connection calls.
//!
//! [`Submission`] takes a transaction step by step (`mail`, `rcpt`, `data`, `body`, `end_data`,
//! `abort`) and answers each with an [`Outcome`] carrying the reply the mailer should see, so an
//! upstream rejection reaches the mailer with the upstream's own code. It gets access tokens from
//! the token manager and never sees a refresh token. Where the upstream connection comes from is
//! one function ([`Submission::open`]), the seam a connection pool plugs into.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::client::Client;
use super::outcome::{ErrorKind, Outcome, UpstreamError};
use crate::config::Account;
use crate::oauth::tokens::{TokenError, TokenManager};
use crate::smtp::session::MailParams;
use crate::smtp::Reply;
use crate::util::secret::Secret;

/// Everything a delivery needs that is shared by all sessions.
pub struct UpstreamContext {
    pub tokens: Arc<TokenManager>,
    /// Client TLS config per provider name (public roots plus that provider's `smtp_ca_file`).
    pub tls: HashMap<String, Arc<rustls::ClientConfig>>,
    pub helo_name: String,
    pub timeout: Duration,
}

/// Outcome of the upstream half of a message, for the per-message log line.
#[derive(Debug, Default, Clone)]
pub struct MessageStats {
    pub sender: String,
    pub recipients: usize,
    pub size: usize,
}

/// Delivery of one session's messages through the account's provider, reusing the connection
/// between messages.
pub struct Submission {
    ctx: Arc<UpstreamContext>,
    account: Arc<Account>,
    client: Option<Client>,
    /// The upstream has an open transaction (MAIL accepted) that must be reset before the next one.
    in_transaction: bool,
    pub stats: MessageStats,
}

fn unavailable(e: &UpstreamError) -> Reply {
    Reply::new(
        451,
        format!("4.4.1 Upstream not available, try again later ({e})"),
    )
}

impl Submission {
    pub fn new(ctx: Arc<UpstreamContext>, account: Arc<Account>) -> Submission {
        Submission {
            ctx,
            account,
            client: None,
            in_transaction: false,
            stats: MessageStats::default(),
        }
    }

    async fn connect_and_auth(&self, token: &Secret) -> Result<Client, UpstreamError> {
        let provider = &self.account.provider;
        let tls = self.ctx.tls.get(&provider.name).ok_or_else(|| {
            UpstreamError::new(
                ErrorKind::Config,
                &provider.smtp_host,
                "TLS",
                format!("no TLS configuration for provider `{}`", provider.name),
            )
        })?;
        let mut client =
            Client::connect(provider, tls, &self.ctx.helo_name, self.ctx.timeout).await?;
        client
            .authenticate(provider, &self.account.mailbox, token)
            .await?;
        Ok(client)
    }

    /// Opens an authenticated connection: on a token rejection, refreshes once and tries once more.
    async fn open(&mut self) -> Result<(), Reply> {
        let name = &self.account.name;
        let token_reply = |e: TokenError| Reply::new(454, format!("4.7.0 {e}"));
        let token = self.ctx.tokens.token(name).await.map_err(token_reply)?;
        let client = match self.connect_and_auth(&token.secret).await {
            Err(UpstreamError::AuthRejected(first))
                if !crate::hints::refresh_cannot_help(&first) =>
            {
                tracing::info!(account = %name, reply = %first.summary(), "upstream refused the access token; refreshing and retrying once");
                let token = self
                    .ctx
                    .tokens
                    .token_after_rejection(name, &token.secret)
                    .await
                    .map_err(token_reply)?;
                self.connect_and_auth(&token.secret).await
            }
            other => other,
        };
        match client {
            Ok(c) => {
                self.client = Some(c);
                self.in_transaction = false;
                Ok(())
            }
            Err(UpstreamError::AuthRejected(reply)) => {
                let hint = crate::hints::for_smtp_reply(self.account.provider.family, &reply)
                    .map(|h| format!("; {h}"))
                    .unwrap_or_default();
                tracing::warn!(account = %name, reply = %reply.summary(), hint = %hint, "upstream rejected the access token twice");
                Err(Reply::new(
                    454,
                    format!(
                        "4.7.0 Upstream rejected the account's token ({}){hint}",
                        reply.summary()
                    ),
                ))
            }
            // A refusal before MAIL (greeting, EHLO, STARTTLS) is about the connection, not this
            // message: the mailer should retry later, not bounce.
            Err(e) => {
                tracing::warn!(account = %name, error = %e, "upstream connection failed");
                Err(unavailable(&e))
            }
        }
    }

    /// Sends a command on the open connection; a broken connection is dropped and reported as 451.
    async fn exchange(&mut self, line: &str) -> Reply {
        let Some(client) = self.client.as_mut() else {
            return Reply::new(451, "4.4.1 Upstream connection lost");
        };
        match client.command(line).await {
            Ok(reply) if reply.code == 421 => {
                // The upstream is closing the connection; only our session with it ends, not the mailer's.
                self.drop_connection();
                tracing::warn!(account = %self.account.name, reply = %reply.summary(), "upstream closed the connection");
                Reply::new(
                    451,
                    format!(
                        "4.4.1 Upstream closed the connection ({}), try again later",
                        reply.summary()
                    ),
                )
            }
            Ok(reply) => reply,
            Err(e) => {
                self.drop_connection();
                tracing::warn!(account = %self.account.name, error = %e, "upstream connection failed");
                unavailable(&e)
            }
        }
    }

    fn drop_connection(&mut self) {
        self.client = None;
        self.in_transaction = false;
    }

    pub async fn mail(&mut self, from: &str, params: &MailParams) -> Outcome {
        Outcome::from_reply(self.mail_reply(from, params).await)
    }

    async fn mail_reply(&mut self, from: &str, params: &MailParams) -> Reply {
        self.stats = MessageStats {
            sender: from.to_string(),
            ..MessageStats::default()
        };
        if self.in_transaction {
            // The mailer reset or abandoned its last transaction; the upstream still has it open.
            if self.exchange("RSET").await.code != 250 {
                self.drop_connection();
            }
        }
        // A connection kept from the last message may have been closed by the upstream meanwhile
        // (idle timeout): that shows as a broken connection or a 421. Reconnect once in that case.
        let reused = self.client.is_some();
        let mut reply = self.mail_once(from, params).await;
        if reused && (self.client.is_none() || reply.code == 421) {
            self.drop_connection();
            reply = self.mail_once(from, params).await;
        }
        self.in_transaction = reply.is_positive();
        reply
    }

    async fn mail_once(&mut self, from: &str, params: &MailParams) -> Reply {
        if self.client.is_none() {
            if let Err(reply) = self.open().await {
                return reply;
            }
        }
        let caps = self
            .client
            .as_ref()
            .map(|c| c.caps.clone())
            .unwrap_or_default();
        let mut line = format!("MAIL FROM:<{from}>");
        if let Some(size) = params.size.filter(|_| caps.size) {
            line.push_str(&format!(" SIZE={size}"));
        }
        if params.eight_bit && caps.eight_bit {
            line.push_str(" BODY=8BITMIME");
        }
        if params.smtputf8 {
            if !caps.smtputf8 {
                // Passing internationalised addresses to a server that did not offer SMTPUTF8 would
                // be rejected or mangled there (RFC 6531 §3.4).
                return Reply::new(
                    553,
                    "5.6.7 The upstream does not support SMTPUTF8 for this message",
                );
            }
            line.push_str(" SMTPUTF8");
        }
        self.exchange(&line).await
    }

    pub async fn rcpt(&mut self, to: &str) -> Outcome {
        Outcome::from_reply(self.rcpt_reply(to).await)
    }

    async fn rcpt_reply(&mut self, to: &str) -> Reply {
        let reply = self.exchange(&format!("RCPT TO:<{to}>")).await;
        if reply.is_positive() {
            self.stats.recipients += 1;
        }
        reply
    }

    pub async fn data(&mut self) -> Outcome {
        Outcome::from_reply(self.data_reply().await)
    }

    async fn data_reply(&mut self) -> Reply {
        self.exchange("DATA").await
    }

    /// Streams part of the body. A failure drops the connection; `end_data` then reports it.
    pub async fn body(&mut self, chunk: &[u8]) {
        self.stats.size += chunk.len();
        if let Some(client) = self.client.as_mut() {
            if let Err(e) = client.body(chunk).await {
                tracing::warn!(account = %self.account.name, error = %e, "upstream connection failed during DATA");
                self.drop_connection();
            }
        }
    }

    pub async fn end_data(&mut self) -> Outcome {
        Outcome::from_reply(self.end_data_reply().await)
    }

    async fn end_data_reply(&mut self) -> Reply {
        let Some(client) = self.client.as_mut() else {
            return Reply::new(
                451,
                "4.4.1 Upstream connection lost during DATA; message not sent",
            );
        };
        let reply = match client.end_data().await {
            Ok(reply) => reply,
            Err(e) => {
                self.drop_connection();
                tracing::warn!(account = %self.account.name, error = %e, "no final reply from upstream");
                // The upstream may or may not have taken it; a temporary failure makes the mailer retry.
                return Reply::new(
                    451,
                    format!(
                        "4.4.1 No final reply from upstream ({e}); message may not have been sent"
                    ),
                );
            }
        };
        self.in_transaction = false;
        if reply.is_positive() {
            let now = self.ctx.tokens.clock().unix();
            self.ctx
                .tokens
                .store()
                .update_status(&self.account.name, |s| s.last_use = Some(now));
        }
        reply
    }

    /// Abandons the current transaction mid-DATA: closing the connection is the only way SMTP
    /// offers, and it guarantees the upstream discards the partial message.
    pub fn abort(&mut self) {
        if self.client.is_some() {
            tracing::info!(account = %self.account.name, "upstream transaction aborted");
        }
        self.drop_connection();
    }

    /// Ends the session politely.
    pub async fn quit(&mut self) {
        if self.client.is_some() && !self.in_transaction {
            let _ = self.exchange("QUIT").await;
        }
        self.drop_connection();
    }
}
