//! Upstream delivery: the relay's SMTP client towards the provider.
//!
//! [`Delivery`] is the one interface the connection uses to hand over a message: `mail`, `rcpt`,
//! `data`, `body`, `end_data`, `abort`. Each returns the reply the mailer should see, so an upstream
//! rejection reaches the mailer with the upstream's own code. Delivery gets access tokens from the
//! token manager and never sees a refresh token.
//!
//! The client is written on tokio directly rather than on mail-send, whose client answers Gmail's
//! XOAUTH2 error challenge wrongly, stops at the first rejected RCPT and adds a blank line to bodies
//! that end in CRLF; here each command's reply is passed through as it comes and the body is
//! re-stuffed byte for byte.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{Account, Mechanism, Provider, TlsMode};
use crate::reply::Reply;
use crate::secret::Secret;
use crate::session::MailParams;
use crate::tokens::{TokenError, TokenManager};

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Stream for T {}
pub type BoxStream = Box<dyn Stream>;

const MAX_REPLY: usize = 64 * 1024;
/// Wait for the reply to the end of data (RFC 5321 §4.5.3.2.6).
const FINAL_REPLY_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug)]
pub enum UpstreamError {
    /// Network, TLS, timeout or protocol trouble: the mailer gets a 451 and retries later.
    Connection(String),
    /// The server refused the token (after Gmail's challenge has been answered).
    AuthRejected(Reply),
    /// The server answered a step with an error of its own.
    Rejected(Reply),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connection(s) => f.write_str(s),
            UpstreamError::AuthRejected(r) => write!(f, "authentication rejected: {}", r.summary()),
            UpstreamError::Rejected(r) => write!(f, "rejected: {}", r.summary()),
        }
    }
}

/// Extensions the upstream advertised in its EHLO reply.
#[derive(Debug, Default, Clone)]
pub struct Capabilities {
    pub starttls: bool,
    pub size: bool,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub auth: Vec<String>,
}

impl Capabilities {
    fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut caps = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let keyword = words.next().unwrap_or("").to_ascii_uppercase();
            match keyword.as_str() {
                "STARTTLS" => caps.starttls = true,
                "SIZE" => caps.size = true,
                "8BITMIME" => caps.eight_bit = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "AUTH" => caps.auth = words.map(|w| w.to_ascii_uppercase()).collect(),
                _ => {}
            }
        }
        caps
    }
}

/// One SMTP client connection to a provider.
pub struct Client {
    stream: BoxStream,
    buf: Vec<u8>,
    timeout: Duration,
    pub caps: Capabilities,
    body: BodyEncoder,
    /// The upstream's name, for error messages.
    host: String,
}

/// Turns a message body into DATA wire form. CR and LF that are not a CRLF pair become CRLF: RFC 5321
/// §2.3.8 allows an SMTP client to send them only as CRLF, and passing a bare LF on would let a mailer
/// smuggle an end of data (`LF.LF`) past the relay to an upstream that accepts one. Lines starting with
/// "." are dot-stuffed. State carries across chunks, which may split anywhere.
#[derive(Default)]
struct BodyEncoder {
    pending_cr: bool,
    mid_line: bool,
}

impl BodyEncoder {
    fn encode(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        while i < chunk.len() {
            if self.mid_line && !self.pending_cr {
                // Fast path: copy up to the next line-end character.
                let run = memchr::memchr2(b'\r', b'\n', &chunk[i..]).unwrap_or(chunk.len() - i);
                out.extend_from_slice(&chunk[i..i + run]);
                i += run;
                if i == chunk.len() {
                    break;
                }
            }
            let b = chunk[i];
            i += 1;
            if self.pending_cr {
                self.pending_cr = false;
                out.extend_from_slice(b"\r\n");
                self.mid_line = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => self.pending_cr = true,
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    self.mid_line = false;
                }
                b'.' if !self.mid_line => {
                    out.extend_from_slice(b"..");
                    self.mid_line = true;
                }
                _ => {
                    out.push(b);
                    self.mid_line = true;
                }
            }
        }
    }

    /// The end-of-data sequence, completing an unfinished last line; resets for the next message.
    fn finish(&mut self) -> &'static [u8] {
        let unfinished = self.pending_cr || self.mid_line;
        *self = BodyEncoder::default();
        if unfinished {
            b"\r\n.\r\n"
        } else {
            b".\r\n"
        }
    }
}

fn conn_err(host: &str, what: &str, e: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::Connection(format!("upstream {host}: {what}: {e}"))
}

impl Client {
    /// Connects, sets up TLS as the provider requires (never falling back to clear text) and says EHLO.
    pub async fn connect(
        provider: &Provider,
        tls: &Arc<rustls::ClientConfig>,
        helo_name: &str,
        timeout: Duration,
    ) -> Result<Client, UpstreamError> {
        let host = provider.smtp_host.as_str();
        let addr = (
            host.trim_start_matches('[').trim_end_matches(']'),
            provider.smtp_port,
        );
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| conn_err(host, "connect", "timed out"))?
            .map_err(|e| conn_err(host, "connect", e))?;
        let _ = tcp.set_nodelay(true);
        let stream: BoxStream = if provider.smtp_tls == TlsMode::Implicit {
            Box::new(tls_handshake(tcp, host, tls, timeout).await?)
        } else {
            Box::new(tcp)
        };
        let mut client = Client {
            stream,
            buf: Vec::new(),
            timeout,
            caps: Capabilities::default(),
            body: BodyEncoder::default(),
            host: host.to_string(),
        };
        let greeting = client.read_reply().await?;
        if greeting.code != 220 {
            return Err(UpstreamError::Rejected(greeting));
        }
        client.ehlo(helo_name).await?;
        if provider.smtp_tls == TlsMode::Starttls {
            if !client.caps.starttls {
                return Err(conn_err(
                    host,
                    "STARTTLS",
                    "not offered; refusing to send the token in clear",
                ));
            }
            let reply = client.command("STARTTLS").await?;
            if reply.code != 220 {
                return Err(UpstreamError::Rejected(reply));
            }
            let plain = std::mem::replace(&mut client.stream, Box::new(tokio::io::duplex(1).0));
            client.buf.clear();
            client.stream = Box::new(tls_handshake(plain, host, tls, timeout).await?);
            client.ehlo(helo_name).await?;
        }
        Ok(client)
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> UpstreamError {
        conn_err(&self.host, what, e)
    }

    async fn ehlo(&mut self, helo_name: &str) -> Result<(), UpstreamError> {
        let reply = self.command(&format!("EHLO {helo_name}")).await?;
        if reply.code != 250 {
            return Err(UpstreamError::Rejected(reply));
        }
        self.caps = Capabilities::from_ehlo(&reply);
        Ok(())
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), UpstreamError> {
        tokio::time::timeout(self.timeout, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
        .map_err(|_| self.err("write", "timed out"))?
        .map_err(|e| self.err("write", e))
    }

    pub async fn read_reply(&mut self) -> Result<Reply, UpstreamError> {
        self.read_reply_within(self.timeout).await
    }

    async fn read_reply_within(&mut self, limit: Duration) -> Result<Reply, UpstreamError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match Reply::parse(&self.buf) {
                Ok(Some((reply, used))) => {
                    self.buf.drain(..used);
                    return Ok(reply);
                }
                Ok(None) if self.buf.len() > MAX_REPLY => return Err(self.err("reply", "too long")),
                Ok(None) => {}
                Err(e) => return Err(self.err("reply", e)),
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .map_err(|_| self.err("reply", "timed out"))?
                .map_err(|e| self.err("reply", e))?;
            if n == 0 {
                return Err(self.err("reply", "connection closed"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub async fn command(&mut self, line: &str) -> Result<Reply, UpstreamError> {
        if !self.buf.is_empty() {
            // Replies nobody asked for: the dialogue is out of step, every later reply would be misread.
            return Err(self.err(
                "protocol",
                "unexpected data from the server; connection dropped",
            ));
        }
        self.write(format!("{line}\r\n").as_bytes()).await?;
        self.read_reply().await
    }

    /// SASL XOAUTH2 or OAUTHBEARER with `token` for `mailbox`. On an error challenge (Gmail's
    /// `334 <base64 JSON>`), answers as the mechanism requires (empty line / `^A`) to get the final
    /// reply, and returns it as `AuthRejected`.
    pub async fn authenticate(
        &mut self,
        provider: &Provider,
        mailbox: &str,
        token: &Secret,
    ) -> Result<(), UpstreamError> {
        let b64 = &base64::engine::general_purpose::STANDARD;
        let (name, initial, cancel) = match provider.mechanism {
            Mechanism::Xoauth2 => (
                "XOAUTH2",
                format!("user={mailbox}\x01auth=Bearer {}\x01\x01", token.expose()),
                "",
            ),
            Mechanism::Oauthbearer => (
                "OAUTHBEARER",
                format!(
                    "n,a={},\x01host={}\x01port={}\x01auth=Bearer {}\x01\x01",
                    mailbox.replace('=', "=3D").replace(',', "=2C"),
                    provider.smtp_host,
                    provider.smtp_port,
                    token.expose()
                ),
                "AQ==",
            ),
        };
        if !self.caps.auth.is_empty() && !self.caps.auth.iter().any(|m| m == name) {
            return Err(self.err(
                "AUTH",
                format!(
                    "offers {} but not {name}; check `mechanism` for this provider",
                    self.caps.auth.join(" ")
                ),
            ));
        }
        let line = format!("AUTH {name} {}\r\n", b64.encode(initial));
        self.write(line.as_bytes()).await?;
        let mut reply = self.read_reply().await?;
        if reply.code == 334 {
            self.write(format!("{cancel}\r\n").as_bytes()).await?;
            reply = self.read_reply().await?;
        }
        match reply.code {
            235 => Ok(()),
            // 454/421 are the server's own trouble, not the token's: no refresh will help.
            421 | 454 => Err(UpstreamError::Rejected(reply)),
            _ => Err(UpstreamError::AuthRejected(reply)),
        }
    }

    /// Writes part of a message body (see [`BodyEncoder`]).
    pub async fn body(&mut self, chunk: &[u8]) -> Result<(), UpstreamError> {
        let mut out = Vec::with_capacity(chunk.len() + chunk.len() / 32 + 4);
        self.body.encode(chunk, &mut out);
        self.write(&out).await
    }

    /// Ends the body and reads the final reply, allowing the upstream the 10 minutes RFC 5321
    /// §4.5.3.2.6 suggests: giving up earlier makes the mailer retry a message that may have been taken.
    pub async fn end_data(&mut self) -> Result<Reply, UpstreamError> {
        let end = self.body.finish();
        self.write(end).await?;
        self.read_reply_within(self.timeout.max(FINAL_REPLY_TIMEOUT))
            .await
    }
}

async fn tls_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    host: &str,
    tls: &Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<S>, UpstreamError> {
    let name = rustls::pki_types::ServerName::try_from(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    )
    .map_err(|_| conn_err(host, "TLS", "not a valid server name"))?;
    tokio::time::timeout(
        timeout,
        tokio_rustls::TlsConnector::from(tls.clone()).connect(name, stream),
    )
    .await
    .map_err(|_| conn_err(host, "TLS handshake", "timed out"))?
    .map_err(|e| conn_err(host, "TLS handshake", e))
}

/// Everything a delivery needs that is shared by all sessions.
pub struct UpstreamContext {
    pub tokens: Arc<TokenManager>,
    /// Client TLS config per provider name (public roots plus that provider's `smtp_ca_file`).
    pub tls: std::collections::HashMap<String, Arc<rustls::ClientConfig>>,
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
pub struct Delivery {
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

impl Delivery {
    pub fn new(ctx: Arc<UpstreamContext>, account: Arc<Account>) -> Delivery {
        Delivery {
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
            UpstreamError::Connection(format!(
                "no TLS configuration for provider `{}`",
                provider.name
            ))
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

    pub async fn mail(&mut self, from: &str, params: &MailParams) -> Reply {
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

    pub async fn rcpt(&mut self, to: &str) -> Reply {
        let reply = self.exchange(&format!("RCPT TO:<{to}>")).await;
        if reply.is_positive() {
            self.stats.recipients += 1;
        }
        reply
    }

    pub async fn data(&mut self) -> Reply {
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

    pub async fn end_data(&mut self) -> Reply {
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
            self.ctx
                .tokens
                .store()
                .update_status(&self.account.name, |s| {
                    s.last_use = Some(crate::store::now_unix())
                });
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

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(chunks: &[&[u8]]) -> Vec<u8> {
        let mut enc = BodyEncoder::default();
        let mut out = Vec::new();
        for c in chunks {
            enc.encode(c, &mut out);
        }
        out.extend_from_slice(enc.finish());
        out
    }

    #[test]
    fn stuffing_is_exact_across_chunk_boundaries() {
        assert_eq!(
            encoded(&[b".a\r\n.", b"b\r\nc.\r\n"]),
            b"..a\r\n..b\r\nc.\r\n.\r\n"
        );
        assert_eq!(encoded(&[b"x\r", b"\n", b".y\r\n"]), b"x\r\n..y\r\n.\r\n");
        assert_eq!(encoded(&[]), b".\r\n");
        assert_eq!(encoded(&[b"no newline"]), b"no newline\r\n.\r\n");
        assert_eq!(encoded(&[b"blank\r\n\r\n"]), b"blank\r\n\r\n.\r\n");
    }

    #[test]
    fn bare_line_ends_become_crlf_so_no_end_of_data_can_be_smuggled() {
        let smuggle = b"one\n.\nMAIL FROM:<x@evil>\r\nlone\r.\r\n";
        let wire = encoded(&[smuggle]);
        assert_eq!(
            wire,
            b"one\r\n..\r\nMAIL FROM:<x@evil>\r\nlone\r\n..\r\n.\r\n"
        );
        // Byte by byte gives the same.
        let parts: Vec<&[u8]> = smuggle.chunks(1).collect();
        assert_eq!(encoded(&parts), wire);
        assert_eq!(encoded(&[b"end\r"]), b"end\r\n.\r\n");
    }
}
