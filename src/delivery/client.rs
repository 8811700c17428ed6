//! The relay's SMTP client towards a provider: connect, TLS, EHLO, SASL XOAUTH2/OAUTHBEARER,
//! commands and a streamed body. It knows nothing of sessions or accounts.
//!
//! Written on tokio directly rather than on mail-send, whose client answers Gmail's XOAUTH2 error
//! challenge wrongly, stops at the first rejected RCPT and adds a blank line to bodies that end in
//! CRLF; here each command's reply is passed through as it comes and the body is re-stuffed byte for
//! byte. Errors keep their kind ([`ErrorKind`]): timeout, connect, TLS, protocol, closed.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use smtp_proto::{
    EhloResponse, AUTH_OAUTHBEARER, AUTH_XOAUTH2, EXT_8BIT_MIME, EXT_PIPELINING, EXT_SIZE,
    EXT_SMTP_UTF8, EXT_START_TLS,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::{ErrorKind, UpstreamError};
use crate::config::{Mechanism, Provider, TlsMode};
use crate::observe::metrics::{Step, StepTimers};
use crate::smtp::body::{BodyChunk, BodyEncoder};
use crate::smtp::Reply;
use crate::util::secret::Secret;

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Stream for T {}
pub type BoxStream = Box<dyn Stream>;

const MAX_REPLY: usize = 64 * 1024;
/// Encoded body bytes gathered before a write.
const BODY_BATCH: usize = 128 * 1024;
/// Wait for the reply to the end of data (RFC 5321 §4.5.3.2.6).
const FINAL_REPLY_TIMEOUT: Duration = Duration::from_secs(600);

/// Extensions the upstream advertised in its EHLO reply (parsed by smtp-proto).
#[derive(Debug, Default, Clone)]
pub struct Capabilities {
    pub starttls: bool,
    pub size: bool,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub pipelining: bool,
    /// smtp-proto's `AUTH_*` bits.
    pub auth: u64,
}

impl Capabilities {
    fn from_ehlo(reply: &Reply) -> Capabilities {
        let wire = reply.to_bytes();
        let Ok(ehlo) = EhloResponse::parse(&mut wire.iter()) else {
            return Capabilities::default();
        };
        let has = |ext| ehlo.has_capability(ext);
        Capabilities {
            starttls: has(EXT_START_TLS),
            size: has(EXT_SIZE),
            eight_bit: has(EXT_8BIT_MIME),
            smtputf8: has(EXT_SMTP_UTF8),
            pipelining: has(EXT_PIPELINING),
            auth: ehlo.auth_mechanisms,
        }
    }
}

impl Capabilities {
    /// The MAIL command for a message from `from` with these properties, or the refusal when this
    /// upstream cannot take it as it is.
    pub fn mail_command(
        &self,
        from: &str,
        size: Option<u64>,
        eight_bit: bool,
        smtputf8: bool,
    ) -> Result<String, Reply> {
        let mut line = format!("MAIL FROM:<{from}>");
        if let Some(size) = size.filter(|_| self.size) {
            line.push_str(&format!(" SIZE={size}"));
        }
        if eight_bit {
            if !self.eight_bit {
                // 8-bit content must not reach a 7-bit server (RFC 6152 §3).
                return Err(Reply::new(
                    554,
                    "5.6.3 The upstream does not accept 8-bit content (no 8BITMIME); send it 7-bit encoded",
                ));
            }
            line.push_str(" BODY=8BITMIME");
        }
        if smtputf8 {
            if !self.smtputf8 {
                // Passing internationalised addresses to a server that did not offer SMTPUTF8
                // would be rejected or mangled there (RFC 6531 §3.4).
                return Err(Reply::new(
                    553,
                    "5.6.7 The upstream does not support SMTPUTF8 for this message",
                ));
            }
            line.push_str(" SMTPUTF8");
        }
        Ok(line)
    }
}

/// One SMTP client connection to a provider.
pub struct Client {
    stream: BoxStream,
    buf: Vec<u8>,
    timeout: Duration,
    pub caps: Capabilities,
    body: BodyEncoder,
    /// Encoded body not yet written.
    out: Vec<u8>,
    /// Replies still owed for what was sent: if a step was cut short, the dialogue is out of
    /// step and the connection must not be reused.
    owed: usize,
    /// The upstream's name, for error messages.
    host: String,
    /// Where reply times go (`xoauth_relay_upstream_reply_seconds`), once the relay hands it out.
    timings: Option<StepTimers>,
}

impl Client {
    /// Connects, sets up TLS as the provider requires (never falling back to clear text) and says EHLO.
    pub async fn connect(
        provider: &Provider,
        tls: &Arc<rustls::ClientConfig>,
        helo_name: &str,
        timeout: Duration,
    ) -> Result<Client, UpstreamError> {
        let host = provider.smtp.host.as_str();
        let tcp = super::connect::connect(
            host,
            provider.smtp.port,
            provider.smtp.proxy.as_ref(),
            timeout,
        )
        .await?;
        let stream: BoxStream = if provider.smtp.tls == TlsMode::Implicit {
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
            out: Vec::new(),
            owed: 0,
            host: host.to_string(),
            timings: None,
        };
        let greeting = client.read_reply().await?;
        if greeting.code != 220 {
            return Err(UpstreamError::Rejected(greeting));
        }
        client.ehlo(helo_name).await?;
        if provider.smtp.tls == TlsMode::Starttls {
            if !client.caps.starttls {
                return Err(UpstreamError::new(
                    ErrorKind::Protocol,
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

    /// From now on, the time until each MAIL, RCPT, DATA and end-of-data reply is recorded.
    pub fn time_replies(&mut self, timers: StepTimers) {
        self.timings = Some(timers);
    }

    fn timed(&self, step: Option<Step>, since: tokio::time::Instant) {
        if let (Some(t), Some(step)) = (&self.timings, step) {
            t.observe(step, since.elapsed());
        }
    }

    fn err(&self, kind: ErrorKind, what: &str, e: impl std::fmt::Display) -> UpstreamError {
        UpstreamError::new(kind, &self.host, what, e)
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
        .map_err(|_| self.err(ErrorKind::Timeout, "write", "timed out"))?
        .map_err(|e| self.err(ErrorKind::Closed, "write", e))
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
                Ok(None) if self.buf.len() > MAX_REPLY => {
                    return Err(self.err(ErrorKind::Protocol, "reply", "too long"))
                }
                Ok(None) => {}
                Err(e) => return Err(self.err(ErrorKind::Protocol, "reply", e)),
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .map_err(|_| self.err(ErrorKind::Timeout, "reply", "timed out"))?
                .map_err(|e| self.err(ErrorKind::Closed, "reply", e))?;
            if n == 0 {
                return Err(self.err(ErrorKind::Closed, "reply", "connection closed"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub async fn command(&mut self, line: &str) -> Result<Reply, UpstreamError> {
        let mut replies = self.pipeline(std::slice::from_ref(&line.to_string())).await;
        replies.pop().expect("one reply per line")
    }

    /// Sends `lines` in one write and reads one reply per line, in order (RFC 2920 when more than
    /// one). Once the connection breaks, every remaining line gets the same error.
    pub async fn pipeline(&mut self, lines: &[String]) -> Vec<Result<Reply, UpstreamError>> {
        let failed = |e: UpstreamError| vec![Err(e); lines.len()];
        if !self.buf.is_empty() {
            // Replies nobody asked for: the dialogue is out of step, every later reply would be misread.
            return failed(self.err(
                ErrorKind::Protocol,
                "protocol",
                "unexpected data from the server; connection dropped",
            ));
        }
        let mut out = Vec::with_capacity(lines.iter().map(|l| l.len() + 2).sum());
        for line in lines {
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        self.owed = lines.len();
        let sent = tokio::time::Instant::now();
        if let Err(e) = self.write(&out).await {
            return failed(e);
        }
        let mut replies = Vec::with_capacity(lines.len());
        while replies.len() < lines.len() {
            match self.read_reply().await {
                Ok(reply) => {
                    self.owed -= 1;
                    self.timed(Step::of_command(&lines[replies.len()]), sent);
                    replies.push(Ok(reply));
                }
                Err(e) => {
                    replies.resize(lines.len(), Err(e));
                }
            }
        }
        replies
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
        // The token is in these strings: overwritten when they go.
        let (name, bit, initial, cancel) = match provider.smtp.mechanism {
            Mechanism::Xoauth2 => (
                "XOAUTH2",
                AUTH_XOAUTH2,
                format!("user={mailbox}\x01auth=Bearer {}\x01\x01", token.expose()),
                "",
            ),
            Mechanism::Oauthbearer => (
                "OAUTHBEARER",
                AUTH_OAUTHBEARER,
                format!(
                    "n,a={},\x01host={}\x01port={}\x01auth=Bearer {}\x01\x01",
                    mailbox.replace('=', "=3D").replace(',', "=2C"),
                    provider.smtp.host,
                    provider.smtp.port,
                    token.expose()
                ),
                "AQ==",
            ),
        };
        if self.caps.auth != 0 && self.caps.auth & bit == 0 {
            return Err(self.err(
                ErrorKind::Protocol,
                "AUTH",
                format!(
                    "offers {} but not {name}; check `mechanism` for this provider",
                    mechanism_names(self.caps.auth)
                ),
            ));
        }
        let initial = zeroize::Zeroizing::new(initial);
        let encoded = zeroize::Zeroizing::new(b64.encode(initial.as_bytes()));
        let mut line = zeroize::Zeroizing::new(String::with_capacity(encoded.len() + 16));
        line.push_str("AUTH ");
        line.push_str(name);
        line.push(' ');
        line.push_str(&encoded);
        line.push_str("\r\n");
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
    /// Whether every reply for what was sent has been read (a step cut short leaves some owed).
    pub fn in_step(&self) -> bool {
        self.owed > 0
    }

    /// Bytes are gathered up to [`BODY_BATCH`] so that a small message goes out in one write with
    /// its end-of-data, and a large one in few large writes.
    pub async fn body(&mut self, chunk: &[u8]) -> Result<(), UpstreamError> {
        self.body.encode(chunk, &mut self.out);
        if self.out.len() >= BODY_BATCH {
            self.write_out().await?;
        }
        Ok(())
    }

    /// Like [`Client::body`]; a large chunk already in wire form is written from where it lies
    /// instead of being copied into the batch.
    pub async fn body_chunk(&mut self, chunk: &BodyChunk) -> Result<(), UpstreamError> {
        match self.body.as_is(chunk) {
            Some(wire) if self.out.len() + wire.len() >= BODY_BATCH => {
                if !self.out.is_empty() {
                    self.write_out().await?;
                }
                self.write(wire).await
            }
            Some(wire) => {
                self.out.extend_from_slice(wire);
                Ok(())
            }
            None => self.body(chunk.bytes()).await,
        }
    }

    /// Writes the gathered body bytes, keeping the buffer for the next batch.
    async fn write_out(&mut self) -> Result<(), UpstreamError> {
        let out = std::mem::take(&mut self.out);
        let written = self.write(&out).await;
        self.out = out;
        self.out.clear();
        written
    }

    /// Ends the body and reads the final reply, allowing the upstream the 10 minutes RFC 5321
    /// §4.5.3.2.6 suggests: giving up earlier makes the mailer retry a message that may have been taken.
    pub async fn end_data(&mut self) -> Result<Reply, UpstreamError> {
        let mut out = std::mem::take(&mut self.out);
        out.extend_from_slice(self.body.finish());
        self.owed = 1;
        let sent = tokio::time::Instant::now();
        let written = self.write(&out).await;
        out.clear();
        self.out = out;
        written?;
        let reply = self
            .read_reply_within(self.timeout.max(FINAL_REPLY_TIMEOUT))
            .await?;
        self.owed = 0;
        self.timed(Some(Step::Data), sent);
        Ok(reply)
    }
}

/// The mechanisms a server offered, for an error message.
fn mechanism_names(bits: u64) -> String {
    use smtp_proto::{AUTH_CRAM_MD5, AUTH_LOGIN, AUTH_PLAIN};
    let known = [
        (AUTH_PLAIN, "PLAIN"),
        (AUTH_LOGIN, "LOGIN"),
        (AUTH_CRAM_MD5, "CRAM-MD5"),
        (AUTH_XOAUTH2, "XOAUTH2"),
        (AUTH_OAUTHBEARER, "OAUTHBEARER"),
    ];
    let names: Vec<&str> = known
        .iter()
        .filter(|(bit, _)| bits & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    if names.is_empty() {
        "other mechanisms".into()
    } else {
        names.join(" ")
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
    .map_err(|_| UpstreamError::new(ErrorKind::Config, host, "TLS", "not a valid server name"))?;
    tokio::time::timeout(
        timeout,
        tokio_rustls::TlsConnector::from(tls.clone()).connect(name, stream),
    )
    .await
    .map_err(|_| UpstreamError::new(ErrorKind::Timeout, host, "TLS handshake", "timed out"))?
    .map_err(|e| UpstreamError::new(ErrorKind::Tls, host, "TLS handshake", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ehlo_capabilities_come_from_smtp_proto() {
        let reply = Reply::multi(
            250,
            [
                "fake.provider",
                "SIZE 40000000",
                "8BITMIME",
                "SMTPUTF8",
                "PIPELINING",
                "AUTH XOAUTH2 OAUTHBEARER",
            ]
            .map(String::from)
            .to_vec(),
        );
        let caps = Capabilities::from_ehlo(&reply);
        assert!(
            caps.size && caps.eight_bit && caps.smtputf8 && caps.pipelining,
            "{caps:?}"
        );
        assert!(!caps.starttls);
        assert_eq!(caps.auth, AUTH_XOAUTH2 | AUTH_OAUTHBEARER);
    }
}
