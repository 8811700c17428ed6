//! One mailer connection: the IO half of a session.
//!
//! Reads bytes from the socket into the [`Session`], carries out the actions it returns (replies,
//! TLS upgrade, password checks, upstream delivery) and feeds the answers back. Replies are batched
//! and flushed before anything that can wait (a read, an upstream round trip), which keeps pipelined
//! clients fast without delaying any reply.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::Instrument;

use super::shared::{Live, Shared};
use crate::config::TlsMode;
use crate::delivery::client::BoxStream;
use crate::delivery::Submission;
use crate::observe::MessageOutcome;
use crate::smtp::session::{Action, AuthOutcome, Authorized, Session, SessionConfig};
use crate::smtp::Reply;
use crate::util::secret::Secret;

const READ_CHUNK: usize = 64 * 1024;
/// Replies are written out once this much is waiting, so a client that pipelines thousands of
/// commands (and perhaps never reads) cannot make the relay hold their replies.
const OUT_LIMIT: usize = 16 * 1024;
/// Refusals logged per session; the rest are counted in one line at the end.
const LOGGED_REFUSALS: u32 = 5;

/// Serves one accepted connection until the mailer quits, times out or disconnects.
pub async fn handle(
    shared: Arc<Shared>,
    stream: BoxStream,
    peer: SocketAddr,
    mode: TlsMode,
    id: u64,
) {
    let span = tracing::info_span!("session", id, %peer, login = tracing::field::Empty, account = tracing::field::Empty);
    async move {
        tracing::debug!("connected");
        let cut = shared.cut.clone();
        let mut conn = Connection::new(shared, stream, peer, mode);
        let ended = tokio::select! {
            r = conn.run() => r,
            _ = cut.cancelled() => Err(End::Cut),
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "connection ended");
        }
        if conn.refusals > LOGGED_REFUSALS {
            tracing::info!(
                refusals = conn.refusals,
                not_logged = conn.refusals - LOGGED_REFUSALS,
                "session ended after more refusals than are logged one by one"
            );
        }
        if let Some(d) = conn.delivery.as_mut() {
            if conn.session.in_data() {
                d.abort();
            }
            d.finish().await;
        }
        tracing::debug!("closed");
    }
    .instrument(span)
    .await
}

struct Connection {
    shared: Arc<Shared>,
    /// The configuration this session started with.
    live: Arc<Live>,
    peer: SocketAddr,
    stream: BoxStream,
    mode: TlsMode,
    session: Session,
    out: Vec<u8>,
    delivery: Option<Submission>,
    message_started: Instant,
    /// A connection not authenticated by then is closed.
    preauth_deadline: Instant,
    /// Error replies sent, for the log's bound.
    refusals: u32,
    /// Nothing read yet: the first bytes tell a TLS client on a port where SMTP comes first.
    first_read: bool,
    /// Credentials this session tried and failed (as digests): each counts once.
    failed_credentials: Vec<u64>,
    /// The account whose `sources` hold the peer's address: a MAIL without AUTH is its.
    device: Option<Arc<crate::config::Account>>,
    /// The login whose names the session's log span carries (a span field recorded again would
    /// be printed twice).
    logged_login: Option<String>,
}

enum End {
    Io(std::io::Error),
    Timeout,
    Tls(String),
    /// The shutdown grace period ran out.
    Cut,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Io(e) => write!(f, "{e}"),
            End::Timeout => f.write_str("idle timeout"),
            End::Tls(e) => write!(f, "TLS: {e}"),
            End::Cut => f.write_str("cut at the end of the shutdown grace period"),
        }
    }
}

impl Connection {
    fn new(shared: Arc<Shared>, stream: BoxStream, peer: SocketAddr, mode: TlsMode) -> Connection {
        let live = shared.live.load_full();
        let server = &live.config.server;
        let limits = &live.config.limits;
        let mut session = Session::new(SessionConfig {
            hostname: server.hostname.clone(),
            tls_active: false,
            starttls_available: mode == TlsMode::Starttls && live.tls.is_some(),
            implicit_tls_port: live
                .config
                .listeners
                .iter()
                .find(|l| l.tls == TlsMode::Implicit)
                .map(|l| l.address.port())
                .filter(|&port| port != 0 && live.tls.is_some()),
            plaintext_auth_allowed: !server.require_tls_for_auth
                || (server.allow_plaintext_loopback && peer.ip().to_canonical().is_loopback()),
            max_message_bytes: limits.max_message_bytes,
            max_recipients: limits.max_recipients,
            max_errors: limits.max_errors_per_session,
            reject_bare_line_endings: limits.bare_line_endings
                == crate::config::BareLineEndings::Reject,
        });
        let preauth_deadline = Instant::now() + Duration::from_secs(limits.preauth_timeout_secs);
        let device = live.authenticator.device(peer.ip()).cloned();
        if let Some(account) = &device {
            session.allow_device(Authorized {
                account: account.name.clone(),
                allowed_senders: account.allowed_senders.clone(),
            });
        }
        Connection {
            device,
            peer,
            stream,
            mode,
            session,
            out: Vec::new(),
            delivery: None,
            message_started: Instant::now(),
            preauth_deadline,
            refusals: 0,
            first_read: true,
            failed_credentials: Vec::new(),
            logged_login: None,
            shared,
            live,
        }
    }

    fn idle(&self) -> Duration {
        Duration::from_secs(self.live.config.limits.idle_timeout_secs)
    }

    /// How long the next wait on the mailer may last: the idle timeout, and before AUTH no longer
    /// than the pre-auth deadline (so a client that reads slowly cannot outlive it).
    fn patience(&self) -> Duration {
        if self.session.authorized().is_some() {
            return self.idle();
        }
        self.idle().min(
            self.preauth_deadline
                .saturating_duration_since(Instant::now()),
        )
    }

    /// Past the pre-auth deadline without AUTH.
    fn preauth_expired(&self) -> bool {
        self.session.authorized().is_none() && Instant::now() >= self.preauth_deadline
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        tokio::time::timeout(self.patience(), async {
            self.stream.write_all(&out).await?;
            self.stream.flush().await
        })
        .await
        .map_err(|_| End::Timeout)?
        .map_err(End::Io)
    }

    /// Replies wait in the buffer while the next one is at hand too (a pipelined RCPT or DATA whose
    /// upstream reply came with MAIL's): one write for the group instead of one per reply.
    async fn flush_unless_answer_ready(&mut self) -> Result<(), End> {
        if self.delivery.as_ref().is_some_and(Submission::answer_ready) {
            return Ok(());
        }
        self.flush().await
    }

    /// This relay's first listener of `mode`, in words: "port 2465 (implicit TLS)", or without the
    /// number where the config lets the system pick one.
    fn listener_port(&self, mode: TlsMode) -> Option<String> {
        let l = self.live.config.listeners.iter().find(|l| l.tls == mode)?;
        let what = if mode == TlsMode::Implicit {
            "implicit TLS"
        } else {
            "STARTTLS"
        };
        Some(match l.address.port() {
            0 => format!("the {what} port"),
            port => format!("port {port} ({what})"),
        })
    }

    /// Where a client that cannot do implicit TLS should go instead, in words.
    fn starttls_port(&self) -> String {
        self.listener_port(TlsMode::Starttls)
            .unwrap_or_else(|| "a STARTTLS listener (none is configured)".into())
    }

    async fn upgrade_tls(&mut self) -> Result<(), End> {
        let acceptor = self
            .live
            .tls
            .clone()
            .ok_or_else(|| End::Tls("no certificate configured".into()))?;
        let plain = std::mem::replace(&mut self.stream, Box::new(tokio::io::duplex(1).0));
        let limit = Duration::from_secs(self.live.config.limits.tls_handshake_timeout_secs);
        let tls = tokio::time::timeout(limit, acceptor.accept(plain))
            .await
            .map_err(|_| End::Timeout)?
            .map_err(|e| End::Tls(e.to_string()))?;
        self.stream = Box::new(tls);
        Ok(())
    }

    async fn run(&mut self) -> Result<(), End> {
        if self.mode == TlsMode::Implicit {
            if let Err(e) = self.upgrade_tls().await {
                match &e {
                    // The likeliest cause by far: a mailer set to STARTTLS or plain SMTP, waiting
                    // for a greeting that on this port comes only after the handshake.
                    End::Timeout => tracing::warn!(
                        "no TLS handshake: a STARTTLS or plain client on the implicit-TLS port? \
                         set the mailer to SSL/TLS, or point it at {}",
                        self.starttls_port()
                    ),
                    // A client that speaks first in clear text: its command is no TLS record.
                    End::Tls(why)
                        if why.contains("InvalidContentType")
                            || why.contains("corrupt message") =>
                    {
                        tracing::warn!(
                            "plain-text SMTP on the implicit-TLS port: set the mailer to SSL/TLS, or \
                             point it at {}",
                            self.starttls_port()
                        )
                    }
                    _ => {}
                }
                return Err(e);
            }
            self.session.tls_started_implicitly();
        }
        if self
            .shared
            .lockout
            .is_locked(self.peer.ip(), Instant::now())
        {
            self.auth_failed("locked_out");
            Reply::new(421, crate::smtp::session::LOCKED_OUT).write_to(&mut self.out);
            let _ = self.flush().await;
            return Ok(());
        }
        self.session.greeting().write_to(&mut self.out);
        let stop = self.shared.stop.clone();
        loop {
            while let Some(action) = self.session.next_action() {
                if !self.execute(action).await? {
                    return Ok(());
                }
            }
            self.flush().await?;
            let preauth = self.session.authorized().is_none() && self.patience() < self.idle();
            if self.preauth_expired() {
                return self.preauth_timeout().await;
            }
            let idle = self.patience();
            // On shutdown, a mailer between commands is told to come back later; one sending a
            // message body may finish it (within the shutdown grace period).
            let in_data = self.session.in_data();
            // Straight into the session's buffer: no copy per read.
            let target = self.session.input_for_read(READ_CHUNK);
            let read = tokio::time::timeout(idle, self.stream.read_buf(target));
            let outcome = tokio::select! {
                biased;
                _ = stop.cancelled(), if !in_data => {
                    Reply::new(421, "4.3.2 Service shutting down, try again later").write_to(&mut self.out);
                    let _ = self.flush().await;
                    return Ok(());
                }
                r = read => r,
            };
            let n = match outcome {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(End::Io(e)),
                Err(_) if preauth => return self.preauth_timeout().await,
                Err(_) => {
                    Reply::new(421, "4.4.2 Idle timeout, closing connection")
                        .write_to(&mut self.out);
                    let _ = self.flush().await;
                    return Err(End::Timeout);
                }
            };
            if n == 0 {
                return Ok(());
            }
            if std::mem::take(&mut self.first_read) && self.session.starts_with_tls_hello() {
                // Answering the handshake bytes as commands would only log unreadable lines.
                let kind = if self.mode == TlsMode::None {
                    "plain"
                } else {
                    "STARTTLS"
                };
                let instead = match self.listener_port(TlsMode::Implicit) {
                    Some(port) => format!("use {port} or STARTTLS"),
                    None => "set the mailer to STARTTLS (this relay has no implicit-TLS listener)"
                        .into(),
                };
                tracing::warn!("client started TLS on a {kind} port; {instead}");
                return Ok(());
            }
        }
    }

    async fn preauth_timeout(&mut self) -> Result<(), End> {
        self.out.clear();
        Reply::new(421, "4.4.2 Not authenticated in time, closing connection")
            .write_to(&mut self.out);
        let out = std::mem::take(&mut self.out);
        // A last word with a short fuse: the deadline has passed.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.write_all(&out)).await;
        Err(End::Timeout)
    }

    /// Carries out one action; `false` ends the connection.
    async fn execute(&mut self, action: Action) -> Result<bool, End> {
        match action {
            Action::Reply(reply) => {
                if reply.code == 538 {
                    self.auth_failed("tls_required");
                }
                // Refusals the mailer sees are in the log too (replies carry no secrets), the first
                // few of a session one by one.
                if reply.code >= 400 {
                    self.refusals = self.refusals.saturating_add(1);
                    if self.refusals <= LOGGED_REFUSALS {
                        tracing::info!(reply = %reply.summary(), "refused");
                    }
                }
                reply.write_to(&mut self.out);
                if self.out.len() >= OUT_LIMIT {
                    self.flush().await?;
                }
            }
            Action::StartTls => {
                self.flush().await?;
                self.upgrade_tls().await?;
                self.session.tls_started();
            }
            Action::Authenticate { login, password } => {
                self.flush().await?;
                let outcome = self.authenticate(login, password).await;
                self.session.auth_result(outcome);
            }
            Action::Mail {
                from,
                params,
                ahead,
            } => {
                self.flush().await?;
                self.message_started = Instant::now();
                if self.delivery.is_none() {
                    if let Err(reply) = self.start_device().await {
                        self.session.upstream_reply(reply);
                        return Ok(true);
                    }
                }
                let outcome = self.delivery().mail(&from, &params, &ahead).await;
                self.session.upstream_reply(outcome.into_reply());
            }
            Action::Rcpt { to } => {
                self.flush_unless_answer_ready().await?;
                let outcome = self.delivery().rcpt(&to).await;
                self.session.upstream_reply(outcome.into_reply());
            }
            Action::Data => {
                self.flush_unless_answer_ready().await?;
                let outcome = self.delivery().data().await;
                self.session.upstream_reply(outcome.into_reply());
            }
            Action::BodyChunk(chunk) => self.delivery().body(&chunk).await,
            Action::EndOfData => {
                self.flush().await?;
                let started = self.message_started;
                let delivery = self.delivery();
                let outcome = delivery.end_data().await;
                let reply = outcome.reply();
                let stats = delivery.stats();
                let (what, counted) = match (&stats.queued_as, outcome.is_accepted()) {
                    (Some(_), _) => ("message accepted into the queue", MessageOutcome::Queued),
                    (None, true) => ("message relayed", MessageOutcome::Relayed),
                    (None, false) if reply.code >= 500 => {
                        ("message not relayed", MessageOutcome::Rejected)
                    }
                    (None, false) => ("message not relayed", MessageOutcome::Failed),
                };
                delivery.record(counted);
                tracing::info!(
                    sender = %stats.sender,
                    recipients = stats.recipients,
                    size = stats.size,
                    reply = %reply.summary(),
                    duration_ms = started.elapsed().as_millis() as u64,
                    "{what}"
                );
                self.session.upstream_reply(outcome.into_reply());
            }
            Action::AbortTransaction => self.delivery().abort(),
            Action::Reset => self.delivery().reset().await,
            Action::Close => {
                self.flush().await?;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The session's first MAIL without AUTH from a device's address: the session becomes its
    /// account's, as after a login (the grant must be usable; usage and the log name the address).
    async fn start_device(&mut self) -> Result<(), Reply> {
        let account = self
            .device
            .clone()
            .expect("the session allows MAIL without AUTH only for a device");
        if let Err(refusal) = self.shared.delivery.admit(&account).await {
            self.auth_failed(refusal.reason);
            return Err(Reply::new(454, format!("4.7.0 {}", refusal.text)));
        }
        let span = tracing::Span::current();
        span.record("account", tracing::field::display(&account.name));
        tracing::info!(source = %self.peer.ip().to_canonical(), "device session: sending without AUTH as the account of its source address");
        self.shared
            .observer
            .usage
            .login(&account.name, self.peer.ip().to_canonical());
        self.delivery = Some(self.shared.delivery.submission(account));
        Ok(())
    }

    /// Counts a failed login against the lockout limits; says so when it reached one.
    fn lockout_failure(&self, ip: std::net::IpAddr, login: &str, known: bool) {
        let limits = &self.live.config.limits;
        let unlock = format!(
            "lift it with `{}`",
            crate::hints::command(&format!("unlock {}", ip.to_canonical()))
        );
        let who = if known { login } else { "(an unknown login)" };
        let (failures, what) = match self.shared.lockout.failed(ip, login, Instant::now()) {
            super::lockout::Failure::Counted => return,
            super::lockout::Failure::LoginLockedOut => (
                limits.auth_failures_per_login,
                "login refused from this address after too many failed logins",
            ),
            super::lockout::Failure::AddressLockedOut => (
                limits.auth_failures_per_ip,
                "address locked out after too many failed logins across logins",
            ),
        };
        tracing::warn!(
            address = %ip.to_canonical(),
            login = %who,
            failures,
            lockout_secs = limits.auth_lockout_secs,
            "{what}; {unlock}"
        );
    }

    /// Counts a refused login (`xoauth_relay_auth_failures_total{reason}`).
    fn auth_failed(&self, reason: &'static str) {
        self.shared.observer.metrics.auth_failure(reason);
    }

    /// The session asks for upstream work only after a successful AUTH, which creates the delivery.
    fn delivery(&mut self) -> &mut Submission {
        self.delivery
            .as_mut()
            .expect("upstream action before authentication")
    }

    async fn authenticate(&mut self, login: String, password: Secret) -> AuthOutcome {
        let lockout = &self.shared.lockout;
        let ip = self.peer.ip();
        if lockout.login_locked(ip, &login, Instant::now()) {
            tracing::info!(
                result = "locked_out",
                "login refused: too many failed logins from this address"
            );
            self.auth_failed("locked_out");
            return AuthOutcome::LockedOut;
        }
        let credential = credential_key(&login, &password);
        let Some(verified) = self.live.authenticator.verify(&login, password).await else {
            // Only a configured login is named: an unknown one may be a password typed in the wrong
            // field, or carry line breaks meant to forge log lines.
            let account = self.live.authenticator.account_of(&login);
            let known = account.is_some();
            if let Some(account) = account {
                self.shared.observer.usage.failed_login(&account.name);
                tracing::info!(login = %login, result = "bad_credentials", "login failed: wrong password");
            } else {
                tracing::info!(result = "bad_credentials", "login failed: unknown login");
            }
            // The same credential again in this session (PLAIN, then LOGIN) is one mistake.
            if !self.failed_credentials.contains(&credential) {
                self.failed_credentials.push(credential);
                self.lockout_failure(ip, &login, known);
            }
            self.auth_failed("bad_credentials");
            return AuthOutcome::BadCredentials;
        };
        let account = verified.account;
        if self.logged_login.as_deref() != Some(login.as_str()) {
            let span = tracing::Span::current();
            span.record("login", tracing::field::display(&login));
            span.record("account", tracing::field::display(&account.name));
            self.logged_login = Some(login.clone());
        }
        if let Err(refusal) = self.shared.delivery.admit(&account).await {
            self.auth_failed(refusal.reason);
            return AuthOutcome::GrantUnavailable(refusal.text);
        }
        tracing::info!(login = %login, result = "ok", cached = verified.cached, "login succeeded");
        self.shared
            .observer
            .usage
            .login(&account.name, self.peer.ip().to_canonical());
        self.delivery = Some(self.shared.delivery.submission(account.clone()));
        AuthOutcome::Ok(Authorized {
            account: account.name.clone(),
            allowed_senders: account.allowed_senders.clone(),
        })
    }
}

/// A digest of a login and password, to recognise a credential tried again in the same session
/// without keeping the password.
fn credential_key(login: &str, password: &Secret) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    // Keyed per process: the digest says nothing outside it.
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let mut h = KEYS.get_or_init(Default::default).build_hasher();
    login.hash(&mut h);
    password.expose().hash(&mut h);
    h.finish()
}
