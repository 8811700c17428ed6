//! The mailer-facing SMTP session as a state machine without IO.
//!
//! Bytes go in with [`Session::push_input`]; [`Session::next_action`] hands out what the IO layer must
//! do (send a reply, verify a password, open an upstream transaction, stream a body chunk, ...). An
//! action that needs an answer (`Authenticate`, `Mail`, `Rcpt`, `Data`, `EndOfData`, `StartTls`) parks
//! the session until the IO layer calls the matching method; input that arrives meanwhile (pipelining)
//! stays buffered. This keeps every protocol rule unit-testable without sockets.
//!
//! The session never sees a token: after AUTH it knows only the account's name and sender policy.

use std::collections::VecDeque;

use base64::Engine;
use bytes::{Buf, BytesMut};
use smtp_proto::{Request, AUTH_LOGIN, AUTH_PLAIN, MAIL_BODY_8BITMIME, MAIL_SMTPUTF8};

use super::body::BodyChunk;
use super::reply::Reply;
use crate::util::secret::Secret;

/// Longest command line accepted (RFC 4954 asks for 12288 to fit AUTH initial responses).
pub const MAX_LINE: usize = 12288;
/// A body line may wait this long in the buffer for its line end, so that whole lines can go on as
/// they came (see [`Session::step_data`]); a longer one goes through the decoder in pieces.
const BODY_LINE_WAIT: usize = 16 * 1024;
/// Failed AUTH attempts before the session is closed.
const MAX_AUTH_FAILURES: u32 = 3;

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    /// The connection is already encrypted (implicit TLS or after STARTTLS).
    pub tls_active: bool,
    /// STARTTLS can be offered on this listener.
    pub starttls_available: bool,
    /// The port of an implicit-TLS listener, to point a mailer at when it tries AUTH in the clear.
    pub implicit_tls_port: Option<u16>,
    /// AUTH may be used without TLS (loopback peer exempted by config, or TLS not required).
    pub plaintext_auth_allowed: bool,
    pub max_message_bytes: usize,
    pub max_recipients: usize,
    /// Error replies of the relay's own (not the upstream's) after which the session is closed, like
    /// Postfix's hard error limit; a delivered message starts the count again. 0: no limit.
    pub max_errors: u32,
    /// A message with a bare CR or LF is refused (`554 5.5.2`) instead of passed on with CRLF
    /// (Postfix's `smtpd_forbid_bare_newline`).
    pub reject_bare_line_endings: bool,
}

/// What the session knows about the mailer's account once authenticated: no secrets.
#[derive(Debug, Clone)]
pub struct Authorized {
    pub account: String,
    pub allowed_senders: Option<Vec<String>>,
}

impl Authorized {
    pub fn sender_allowed(&self, sender: &str) -> bool {
        sender_allowed(self.allowed_senders.as_deref(), sender)
    }
}

/// At a line start whose first line is not in wire form as it is (a leading dot, a bare CR or LF, the
/// end of data): that line and the ones after it that are not either, which go through the DATA
/// decoder together; `None` while the first line has not fully arrived.
fn decoder_run(input: &[u8]) -> Option<usize> {
    let mut end = 0;
    while let Some(lf) = memchr::memchr(b'\n', &input[end..]) {
        end += lf + 1;
        let next = &input[end..];
        match memchr::memchr(b'\n', next) {
            Some(lf) if super::body::verbatim_lines(&next[..=lf], false) == 0 => {}
            _ => break,
        }
    }
    (end > 0).then_some(end)
}

/// Whether MAIL FROM `sender` matches `allowed` (exact addresses or `*@domain`, case-insensitive);
/// no list means any sender.
pub fn sender_allowed(allowed: Option<&[String]>, sender: &str) -> bool {
    let Some(list) = allowed else {
        return true;
    };
    let sender = sender.to_ascii_lowercase();
    list.iter().any(|pattern| {
        let pattern = pattern.to_ascii_lowercase();
        match pattern.strip_prefix("*@") {
            Some(domain) => sender.rsplit_once('@').is_some_and(|(_, d)| d == domain),
            None => pattern == sender,
        }
    })
}

/// What a locked-out address is told, at the greeting and at AUTH.
pub const LOCKED_OUT: &str = "4.7.0 too many failed logins, try again later";

#[derive(Debug)]
pub enum AuthOutcome {
    Ok(Authorized),
    BadCredentials,
    /// Password right, but the account's grant cannot give a token (text says why and what to do).
    GrantUnavailable(String),
    /// The source address failed too many logins: `421` and close.
    LockedOut,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParams {
    pub size: Option<usize>,
    pub eight_bit: bool,
    pub smtputf8: bool,
}

/// Pipelined commands after a MAIL, in order: RCPTs, then maybe DATA.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ahead {
    pub rcpts: Vec<String>,
    pub data: bool,
}

#[derive(Debug)]
pub enum Action {
    Reply(Reply),
    /// The `220` has been queued; flush it, run the TLS handshake, then call [`Session::tls_started`].
    StartTls,
    /// Answer with [`Session::auth_result`].
    Authenticate {
        login: String,
        password: Secret,
    },
    /// Answer each of these four with [`Session::upstream_reply`].
    Mail {
        from: String,
        params: MailParams,
        /// Commands already buffered after MAIL that the session will forward if MAIL is accepted
        /// (RFC 2920 pipelining): delivery may send them upstream in the same write.
        ahead: Ahead,
    },
    Rcpt {
        to: String,
    },
    Data,
    EndOfData,
    /// Part of the message body, dot-stuffing already undone.
    BodyChunk(BodyChunk),
    /// Drop the upstream transaction without completing it (message too large).
    AbortTransaction,
    /// The mailer abandoned its transaction (RSET, EHLO, HELO, STARTTLS): reset it upstream.
    Reset,
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    Auth,
    Mail,
    Rcpt,
    Data,
    EndOfData,
    Tls,
}

enum Phase {
    Command,
    AuthPlain,
    AuthLoginUser,
    AuthLoginPass { login: String },
    Data(Box<DataPhase>),
    Waiting(Waiting),
    Closed,
}

struct DataPhase {
    decoder: super::data::DataDecoder,
    /// Decoded body not yet handed out (reused between reads).
    decoded: Vec<u8>,
    size: usize,
    /// Why the message will be refused at its end (what comes meanwhile is drained).
    refused: Option<Refusal>,
}

/// Why a message being received is refused at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    TooBig,
    BareLineEnding,
}

impl DataPhase {
    fn new() -> DataPhase {
        DataPhase {
            decoder: super::data::DataDecoder::new(),
            decoded: Vec::new(),
            size: 0,
            refused: None,
        }
    }
}

pub struct Session {
    config: SessionConfig,
    /// Received bytes not yet consumed. Consuming moves a cursor (no shift per line), and body
    /// lines leave as shares of this buffer, not copies.
    input: BytesMut,
    /// Error replies since the last delivered message.
    errors: u32,
    /// A line longer than MAX_LINE is being skipped up to its LF.
    discarding: bool,
    out: VecDeque<Action>,
    phase: Phase,
    ehlo_done: bool,
    auth: Option<Authorized>,
    auth_failures: u32,
    in_transaction: bool,
    accepted_rcpts: usize,
}

fn b64() -> &'static base64::engine::GeneralPurpose {
    &base64::engine::general_purpose::STANDARD
}

impl Session {
    pub fn new(config: SessionConfig) -> Session {
        Session {
            config,
            input: BytesMut::new(),
            errors: 0,
            discarding: false,
            out: VecDeque::new(),
            phase: Phase::Command,
            ehlo_done: false,
            auth: None,
            auth_failures: 0,
            in_transaction: false,
            accepted_rcpts: 0,
        }
    }

    pub fn greeting(&self) -> Reply {
        Reply::new(
            220,
            format!("{} ESMTP xoauth-relay ready", self.config.hostname),
        )
    }

    pub fn authorized(&self) -> Option<&Authorized> {
        self.auth.as_ref()
    }

    /// True while the mailer is sending a message body.
    pub fn in_data(&self) -> bool {
        matches!(
            self.phase,
            Phase::Data(_) | Phase::Waiting(Waiting::EndOfData)
        )
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    pub fn push_input(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    /// The buffer the IO layer appends what it reads from the mailer to (saves copying every read
    /// through a second buffer), with room for `room` bytes in all (at least a little more than is
    /// buffered). Asking for no more than that lets the buffer move its few unconsumed bytes to the
    /// front of the space it has, once no body chunk shares that space any more, instead of growing.
    pub fn input_for_read(&mut self, room: usize) -> &mut BytesMut {
        const MIN_READ: usize = 4096;
        self.input
            .reserve(room.saturating_sub(self.input.len()).max(MIN_READ));
        &mut self.input
    }

    /// Bytes received and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.input.len()
    }

    fn unread(&self) -> &[u8] {
        &self.input
    }

    fn consume(&mut self, n: usize) {
        self.input.advance(n);
    }

    fn clear_input(&mut self) {
        self.input.clear();
    }

    /// The next thing to do, or `None` when the session needs more input or an answer.
    pub fn next_action(&mut self) -> Option<Action> {
        loop {
            if let Some(a) = self.out.pop_front() {
                return Some(a);
            }
            match &self.phase {
                Phase::Waiting(_) | Phase::Closed => return None,
                Phase::Data(_) => {
                    if !self.step_data() {
                        return self.out.pop_front();
                    }
                }
                _ => match self.take_line() {
                    Some(line) => self.handle_line(line),
                    None => return self.out.pop_front(),
                },
            }
        }
    }

    fn reply(&mut self, code: u16, text: impl Into<String>) {
        self.refuse_or_reply(Reply::new(code, text));
    }

    /// Queues a reply of the relay's own, counting errors against `max_errors`.
    fn refuse_or_reply(&mut self, reply: Reply) {
        let error = reply.code >= 400;
        self.out.push_back(Action::Reply(reply));
        if error && !matches!(self.phase, Phase::Closed) {
            self.errors += 1;
            if self.config.max_errors > 0 && self.errors >= self.config.max_errors {
                self.out.push_back(Action::Reply(Reply::new(
                    421,
                    "4.7.0 Too many errors, closing connection",
                )));
                self.out.push_back(Action::Close);
                self.phase = Phase::Closed;
            }
        }
    }

    fn wait(&mut self, action: Action, waiting: Waiting) {
        self.out.push_back(action);
        self.phase = Phase::Waiting(waiting);
    }

    fn expect_waiting(&mut self, what: Waiting) -> bool {
        if matches!(self.phase, Phase::Waiting(w) if w == what) {
            self.phase = Phase::Command;
            true
        } else {
            debug_assert!(false, "answer {what:?} arrived while not waiting for it");
            false
        }
    }

    /// Takes one line (without its line ending) from the input, handling over-long lines.
    fn take_line(&mut self) -> Option<Vec<u8>> {
        loop {
            match memchr::memchr(b'\n', self.unread()) {
                Some(nl) => {
                    let mut line = self.unread()[..=nl].to_vec();
                    // A command line may carry a password (AUTH PLAIN, a SASL response): it does not
                    // stay behind in the buffer's memory.
                    zeroize::Zeroize::zeroize(&mut self.input[..=nl]);
                    self.consume(nl + 1);
                    if self.discarding || line.len() > MAX_LINE + 2 {
                        self.discarding = false;
                        // A SASL exchange cannot survive a lost response: back to commands.
                        if matches!(
                            self.phase,
                            Phase::AuthPlain | Phase::AuthLoginUser | Phase::AuthLoginPass { .. }
                        ) {
                            self.phase = Phase::Command;
                        }
                        self.reply(500, "5.5.6 Line too long");
                        if self.is_closed() {
                            return None;
                        }
                        continue;
                    }
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    return Some(line);
                }
                None if self.buffered() > MAX_LINE => {
                    self.clear_input();
                    self.discarding = true;
                }
                None => return None,
            }
        }
    }

    fn handle_line(&mut self, line: Vec<u8>) {
        let line = zeroize::Zeroizing::new(line);
        match std::mem::replace(&mut self.phase, Phase::Command) {
            Phase::AuthPlain => self.auth_plain_response(&line),
            Phase::AuthLoginUser => self.auth_login_user(&line),
            Phase::AuthLoginPass { login } => self.auth_login_pass(login, &line),
            _ => self.command(&line),
        }
    }

    fn command(&mut self, text: &[u8]) {
        // NUL, a bare CR and other control bytes have no place in a command, and must never be
        // echoed back (EHLO repeats its argument).
        if has_control(text) {
            return self.reply(501, "5.5.2 Control characters are not allowed in commands");
        }
        let mut line = zeroize::Zeroizing::new(Vec::with_capacity(text.len() + 2));
        line.extend_from_slice(text);
        line.extend_from_slice(b"\r\n");
        let request = match Request::parse(&mut line.iter()).map(Request::into_owned) {
            Ok(r) => match written_address(r, &line) {
                Ok(r) => r,
                Err(refusal) => return self.refuse_or_reply(refusal),
            },
            Err(e) => return self.parse_error(e),
        };
        match request {
            Request::Ehlo { host } => self.ehlo(host),
            Request::Helo { host } => {
                // HELO is not EHLO: no extensions, so no AUTH (RFC 4954) until the client says EHLO.
                self.abandon_transaction();
                self.reply(250, format!("{} greets {}", self.config.hostname, host));
            }
            Request::StartTls => self.starttls(),
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, initial_response),
            Request::Mail { from } => self.mail(from),
            Request::Rcpt { to } => match rcpt_address(to) {
                Ok(address) => self.rcpt(address),
                Err(reply) => self.refuse_or_reply(reply),
            },
            Request::Data => self.data(),
            Request::Rset => {
                self.abandon_transaction();
                self.reply(250, "2.0.0 OK");
            }
            Request::Noop { .. } => self.reply(250, "2.0.0 OK"),
            Request::Vrfy { .. } => self.reply(
                252,
                "2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
            ),
            Request::Help { .. } => self.reply(
                214,
                "2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP VRFY HELP QUIT",
            ),
            Request::Quit => {
                self.reply(221, "2.0.0 Bye");
                self.out.push_back(Action::Close);
                self.phase = Phase::Closed;
            }
            Request::Bdat { .. } => self.reply(502, "5.5.1 BDAT is not supported; use DATA"),
            Request::Expn { .. } => self.reply(502, "5.5.1 EXPN is not supported"),
            Request::Lhlo { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.reply(502, "5.5.1 Command not implemented"),
        }
    }

    fn parse_error(&mut self, e: smtp_proto::Error) {
        use smtp_proto::Error as E;
        match e {
            E::UnknownCommand => self.reply(500, "5.5.1 Unknown command"),
            E::InvalidSenderAddress => self.reply(501, "5.1.7 Bad sender address syntax"),
            E::InvalidRecipientAddress => self.reply(501, "5.1.3 Bad recipient address syntax"),
            E::SyntaxError { syntax } => {
                self.reply(501, format!("5.5.2 Syntax error, expected: {syntax}"))
            }
            E::InvalidParameter { param } => {
                self.reply(501, format!("5.5.4 Invalid parameter {param}"))
            }
            E::UnsupportedParameter { param } => {
                self.reply(555, format!("5.5.4 Unsupported parameter {param:.40}"))
            }
            E::ResponseTooLong => self.reply(500, "5.5.6 Line too long"),
            E::NeedsMoreData { .. } | E::InvalidResponse { .. } => {
                self.reply(501, "5.5.2 Syntax error")
            }
        }
    }

    fn ehlo(&mut self, host: String) {
        self.abandon_transaction();
        self.ehlo_done = true;
        let mut lines = vec![
            format!("{} greets {}", self.config.hostname, host),
            "PIPELINING".to_string(),
            format!("SIZE {}", self.config.max_message_bytes),
            "8BITMIME".to_string(),
            "SMTPUTF8".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
        ];
        if self.config.starttls_available && !self.config.tls_active {
            lines.push("STARTTLS".into());
        }
        if self.auth.is_none() && self.auth_allowed() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        lines.push("HELP".into());
        self.out.push_back(Action::Reply(Reply::multi(250, lines)));
    }

    fn auth_allowed(&self) -> bool {
        self.config.tls_active || self.config.plaintext_auth_allowed
    }

    fn starttls(&mut self) {
        if self.config.tls_active {
            return self.reply(503, "5.5.1 TLS already active");
        }
        if !self.config.starttls_available {
            return self.reply(502, "5.5.1 STARTTLS not available on this port");
        }
        self.reply(220, "2.0.0 Ready to start TLS");
        // RFC 3207: anything pipelined after STARTTLS was sent in clear and must be discarded.
        self.clear_input();
        self.discarding = false;
        self.wait(Action::StartTls, Waiting::Tls);
    }

    /// The listener wrapped the connection in TLS before the greeting (implicit TLS, RFC 8314).
    pub fn tls_started_implicitly(&mut self) {
        self.config.tls_active = true;
    }

    /// The TLS handshake finished: the session starts over, as RFC 3207 requires.
    pub fn tls_started(&mut self) {
        if self.expect_waiting(Waiting::Tls) {
            self.clear_input();
            self.config.tls_active = true;
            self.ehlo_done = false;
            self.auth = None;
            self.abandon_transaction();
        }
    }

    fn auth(&mut self, mechanism: u64, initial: String) {
        let initial = zeroize::Zeroizing::new(initial);
        if self.auth.is_some() {
            return self.reply(503, "5.5.1 Already authenticated");
        }
        if !self.ehlo_done {
            return self.reply(503, "5.5.1 Send EHLO first");
        }
        if self.in_transaction {
            return self.reply(503, "5.5.1 AUTH not allowed during a mail transaction");
        }
        if !self.auth_allowed() {
            let way = match (
                self.config.starttls_available,
                self.config.implicit_tls_port,
            ) {
                (true, Some(port)) => format!("; use STARTTLS or port {port}"),
                (true, None) => "; use STARTTLS".to_string(),
                (false, Some(port)) => format!("; use port {port} (TLS)"),
                (false, None) => String::new(),
            };
            return self.reply(
                538,
                format!("5.7.11 Encryption required for requested authentication mechanism{way}"),
            );
        }
        match mechanism {
            AUTH_PLAIN if initial.is_empty() => {
                self.reply(334, "");
                self.phase = Phase::AuthPlain;
            }
            AUTH_PLAIN => self.auth_plain_response(initial.as_bytes()),
            AUTH_LOGIN if initial.is_empty() => {
                self.reply(334, "VXNlcm5hbWU6");
                self.phase = Phase::AuthLoginUser;
            }
            AUTH_LOGIN => self.auth_login_user(initial.as_bytes()),
            _ => self.reply(
                504,
                "5.5.4 Unrecognized authentication type; use PLAIN or LOGIN",
            ),
        }
    }

    /// Decodes a SASL response line; `None` after replying when it was `*` or not base64.
    fn sasl_decode(&mut self, line: &[u8]) -> Option<zeroize::Zeroizing<Vec<u8>>> {
        if line == b"*" {
            self.reply(501, "5.0.0 Authentication cancelled");
            return None;
        }
        if line == b"=" {
            return Some(Vec::new().into());
        }
        match b64().decode(line) {
            Ok(v) => Some(v.into()),
            Err(_) => {
                self.reply(501, "5.5.2 Invalid base64 data");
                None
            }
        }
    }

    fn auth_plain_response(&mut self, line: &[u8]) {
        let Some(decoded) = self.sasl_decode(line) else {
            return;
        };
        let mut parts = decoded.split(|b| *b == 0);
        let (Some(authzid), Some(authcid), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return self.reply(501, "5.5.2 Malformed AUTH PLAIN response");
        };
        if !authzid.is_empty() && authzid != authcid {
            return self.reply(
                535,
                "5.7.8 Authorization identity must be empty or equal to the login",
            );
        }
        let (Ok(login), Ok(password)) =
            (std::str::from_utf8(authcid), std::str::from_utf8(password))
        else {
            return self.reply(501, "5.5.2 Login and password must be UTF-8");
        };
        self.authenticate(login.to_string(), Secret::new(password));
    }

    fn auth_login_user(&mut self, line: &[u8]) {
        let Some(decoded) = self.sasl_decode(line) else {
            return;
        };
        match String::from_utf8(decoded.to_vec()) {
            Ok(login) => {
                self.reply(334, "UGFzc3dvcmQ6");
                self.phase = Phase::AuthLoginPass { login };
            }
            Err(_) => self.reply(501, "5.5.2 Login must be UTF-8"),
        }
    }

    fn auth_login_pass(&mut self, login: String, line: &[u8]) {
        let Some(decoded) = self.sasl_decode(line) else {
            return;
        };
        match std::str::from_utf8(&decoded) {
            Ok(password) => self.authenticate(login, Secret::new(password)),
            Err(_) => self.reply(501, "5.5.2 Password must be UTF-8"),
        }
    }

    fn authenticate(&mut self, login: String, password: Secret) {
        self.wait(Action::Authenticate { login, password }, Waiting::Auth);
    }

    pub fn auth_result(&mut self, outcome: AuthOutcome) {
        if !self.expect_waiting(Waiting::Auth) {
            return;
        }
        match outcome {
            AuthOutcome::Ok(authorized) => {
                self.auth = Some(authorized);
                self.reply(235, "2.7.0 Authentication successful");
            }
            AuthOutcome::BadCredentials => {
                self.auth_failures += 1;
                self.reply(535, "5.7.8 Authentication credentials invalid");
                if self.auth_failures >= MAX_AUTH_FAILURES {
                    self.reply(
                        421,
                        "4.7.0 Too many failed authentication attempts, closing connection",
                    );
                    self.out.push_back(Action::Close);
                    self.phase = Phase::Closed;
                }
            }
            AuthOutcome::GrantUnavailable(why) => self.reply(454, format!("4.7.0 {why}")),
            AuthOutcome::LockedOut => {
                self.reply(421, LOCKED_OUT);
                self.out.push_back(Action::Close);
                self.phase = Phase::Closed;
            }
        }
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<String>) {
        let Some(auth) = &self.auth else {
            return self.reply(530, "5.7.0 Authentication required");
        };
        if self.in_transaction {
            return self.reply(503, "5.5.1 Nested MAIL command");
        }
        if from.size > self.config.max_message_bytes {
            return self.reply(
                552,
                format!(
                    "5.3.4 Message size exceeds the limit of {} bytes",
                    self.config.max_message_bytes
                ),
            );
        }
        if !plain_address(&from.address) {
            return self.reply(
                553,
                "5.1.7 Sender address must not need quoting (no spaces, quotes, <, >, \\)",
            );
        }
        if let Some(param) = unsupported_mail_param(&from) {
            return self.reply(555, format!("5.5.4 {param} is not supported"));
        }
        if !auth.sender_allowed(&from.address) {
            return self.reply(
                550,
                format!(
                    "5.7.1 Sender <{}> is not allowed for account {}",
                    from.address, auth.account
                ),
            );
        }
        let params = MailParams {
            size: (from.size > 0).then_some(from.size),
            eight_bit: from.flags & MAIL_BODY_8BITMIME != 0,
            smtputf8: from.flags & MAIL_SMTPUTF8 != 0,
        };
        let ahead = self.ahead();
        self.wait(
            Action::Mail {
                from: from.address,
                params,
                ahead,
            },
            Waiting::Mail,
        );
    }

    /// The RCPTs (and DATA) that follow in the buffered input and that the session will forward
    /// exactly as they are if MAIL is accepted: the same checks as [`Session::rcpt`], assuming every
    /// earlier recipient is accepted (so a recipient the limit would refuse is never sent ahead).
    fn ahead(&self) -> Ahead {
        let mut ahead = Ahead::default();
        if self.discarding {
            return ahead;
        }
        let mut rest = self.unread();
        while let Some(nl) = memchr::memchr(b'\n', rest) {
            let line = &rest[..=nl];
            rest = &rest[nl + 1..];
            if line.len() > MAX_LINE + 2 {
                break;
            }
            let mut crlf = line.strip_suffix(b"\n").unwrap_or(line).to_vec();
            if crlf.last() == Some(&b'\r') {
                crlf.pop();
            }
            if has_control(&crlf) {
                break;
            }
            crlf.extend_from_slice(b"\r\n");
            match Request::parse(&mut crlf.iter()).map(Request::into_owned) {
                Ok(Request::Rcpt { to }) if ahead.rcpts.len() < self.config.max_recipients => {
                    match rcpt_address(to) {
                        Ok(address) => ahead.rcpts.push(address),
                        Err(_) => break,
                    }
                }
                Ok(Request::Data) if !ahead.rcpts.is_empty() => {
                    ahead.data = true;
                    break;
                }
                _ => break,
            }
        }
        ahead
    }

    fn rcpt(&mut self, to: String) {
        if !self.in_transaction {
            return self.reply(503, "5.5.1 Need MAIL before RCPT");
        }
        if self.accepted_rcpts >= self.config.max_recipients {
            return self.reply(452, "4.5.3 Too many recipients");
        }
        self.wait(Action::Rcpt { to }, Waiting::Rcpt);
    }

    fn data(&mut self) {
        if !self.in_transaction {
            return self.reply(503, "5.5.1 Need MAIL before DATA");
        }
        if self.accepted_rcpts == 0 {
            return self.reply(554, "5.5.1 No valid recipients");
        }
        self.wait(Action::Data, Waiting::Data);
    }

    /// The upstream's answer to the last `Mail`, `Rcpt`, `Data` or `EndOfData` action.
    pub fn upstream_reply(&mut self, reply: Reply) {
        let Phase::Waiting(waiting) = self.phase else {
            debug_assert!(false, "upstream reply while not waiting");
            return;
        };
        self.phase = Phase::Command;
        match waiting {
            Waiting::Mail => self.in_transaction = reply.is_positive(),
            Waiting::Rcpt if reply.is_positive() => self.accepted_rcpts += 1,
            Waiting::Data if reply.code == 354 => {
                self.phase = Phase::Data(Box::new(DataPhase::new()));
                return self.reply(354, "Start mail input; end with <CRLF>.<CRLF>");
            }
            Waiting::EndOfData => {
                if reply.is_positive() {
                    self.errors = 0;
                }
                self.reset_transaction();
            }
            _ => {}
        }
        self.out.push_back(Action::Reply(reply));
    }

    /// Like [`Session::reset_transaction`], telling the IO layer when an upstream transaction was open.
    fn abandon_transaction(&mut self) {
        if self.in_transaction {
            self.out.push_back(Action::Reset);
        }
        self.reset_transaction();
    }

    fn reset_transaction(&mut self) {
        self.in_transaction = false;
        self.accepted_rcpts = 0;
    }

    /// Feeds buffered input to the DATA decoder; returns false when more input is needed.
    ///
    /// At a line start, the whole well-formed lines at hand (CRLF endings, none starting with ".")
    /// are their own decoding: they go on as one chunk sharing the input buffer, and the decoder's
    /// state is unchanged by them (it has just seen a CRLF either way). Everything else, and the
    /// end of data, goes through the decoder.
    fn step_data(&mut self) -> bool {
        let Phase::Data(data) = &mut self.phase else {
            return false;
        };
        if self.input.is_empty() {
            return false;
        }
        let take = if data.decoder.at_line_start() {
            let lines = super::body::verbatim_lines(&self.input, false);
            if lines > 0 {
                let chunk = BodyChunk::wire_lines(self.input.split_to(lines).freeze());
                self.body_chunk(chunk);
                return true;
            }
            match decoder_run(&self.input) {
                Some(run) => run,
                None if self.input.len() < BODY_LINE_WAIT => return false,
                None => self.input.len(),
            }
        } else {
            self.input.len()
        };
        data.decoded.reserve(take);
        let (consumed, done) = data.decoder.decode(&self.input[..take], &mut data.decoded);
        self.input.advance(consumed);
        if self.config.reject_bare_line_endings
            && data.decoder.saw_bare_line_ending()
            && data.refused.is_none()
        {
            data.refused = Some(Refusal::BareLineEnding);
            self.out.push_back(Action::AbortTransaction);
        }
        if !data.decoded.is_empty() {
            let chunk = BodyChunk::decoded(std::mem::take(&mut data.decoded));
            self.body_chunk(chunk);
        }
        if done {
            let refused = match &self.phase {
                Phase::Data(data) => data.refused,
                _ => None,
            };
            match refused {
                None => self.wait(Action::EndOfData, Waiting::EndOfData),
                Some(why) => {
                    self.phase = Phase::Command;
                    self.reset_transaction();
                    match why {
                        Refusal::TooBig => self.reply(
                            552,
                            format!(
                                "5.3.4 Message size exceeds the limit of {} bytes",
                                self.config.max_message_bytes
                            ),
                        ),
                        Refusal::BareLineEnding => self.reply(
                            554,
                            "5.5.2 Bare CR or LF in the message; lines must end with CRLF",
                        ),
                    }
                }
            }
        }
        true
    }

    /// Hands a body chunk on, or drops it once the message is refused (over the size limit, say).
    fn body_chunk(&mut self, chunk: BodyChunk) {
        let Phase::Data(data) = &mut self.phase else {
            return;
        };
        data.size += chunk.len();
        if data.refused.is_some() {
            return;
        }
        if data.size <= self.config.max_message_bytes {
            self.out.push_back(Action::BodyChunk(chunk));
        } else {
            data.refused = Some(Refusal::TooBig);
            self.out.push_back(Action::AbortTransaction);
        }
    }
}

/// smtp-proto hands back an empty address for `<postmaster>` (RFC 5321 §4.5.1), as for the null
/// sender `<>`. Only the literal `<>` is the null sender: `postmaster` gets its name back, as the
/// mailer wrote it, and any other written address that came back empty is refused rather than
/// turned into `<>` upstream.
fn written_address(request: Request<String>, line: &[u8]) -> Result<Request<String>, Reply> {
    let written = || {
        let text = String::from_utf8_lossy(line);
        text.split_once('<')
            .and_then(|(_, rest)| rest.split_once('>'))
            .map(|(inner, _)| inner.to_string())
            .unwrap_or_default()
    };
    let restore = |address: &mut String, code: &str| {
        let inner = written();
        if inner.eq_ignore_ascii_case("postmaster") {
            *address = inner;
            Ok(())
        } else if inner.is_empty() {
            Ok(())
        } else {
            Err(Reply::new(
                553,
                format!("{code} Address syntax not understood"),
            ))
        }
    };
    match request {
        Request::Mail { mut from } if from.address.is_empty() => {
            restore(&mut from.address, "5.1.7")?;
            Ok(Request::Mail { from })
        }
        Request::Rcpt { mut to } if to.address.is_empty() => {
            restore(&mut to.address, "5.1.3")?;
            Ok(Request::Rcpt { to })
        }
        other => Ok(other),
    }
}

/// NUL, bare CR and the other C0 controls (and DEL) have no place in a command line.
fn has_control(line: &[u8]) -> bool {
    line.iter().any(|b| *b < 0x20 || *b == 0x7f)
}

/// The address of a RCPT the relay forwards, or the refusal.
fn rcpt_address(to: smtp_proto::RcptTo<String>) -> Result<String, Reply> {
    if to.orcpt.is_some() || to.flags != 0 || to.rrvs != 0 {
        Err(Reply::new(
            555,
            "5.5.4 RCPT parameters (NOTIFY, ORCPT, RRVS) are not supported",
        ))
    } else if to.address.is_empty() || !plain_address(&to.address) {
        Err(Reply::new(
            553,
            "5.1.3 Recipient address must not need quoting (no spaces, quotes, <, >, \\)",
        ))
    } else {
        Ok(to.address)
    }
}

/// Whether `address` can be written back between angle brackets as it is. smtp-proto removes the
/// quotes of a quoted local part, so an address that needed them (spaces, `>`, ...) could smuggle
/// parameters into the upstream's MAIL/RCPT line; such addresses are refused instead.
fn plain_address(address: &str) -> bool {
    address
        .chars()
        .all(|c| !c.is_control() && !c.is_whitespace() && !matches!(c, '<' | '>' | '"' | '\\'))
}

/// The first MAIL parameter of an extension the relay does not advertise (RFC 5321 §4.1.1.11:
/// refuse rather than drop, which would silently lose e.g. REQUIRETLS).
fn unsupported_mail_param(from: &smtp_proto::MailFrom<String>) -> Option<&'static str> {
    use smtp_proto::{MAIL_BODY_7BIT, MAIL_BODY_BINARYMIME, MAIL_REQUIRETLS};
    let allowed = MAIL_BODY_7BIT | MAIL_BODY_8BITMIME | MAIL_SMTPUTF8;
    if from.flags & MAIL_REQUIRETLS != 0 {
        Some("REQUIRETLS")
    } else if from.flags & MAIL_BODY_BINARYMIME != 0 {
        Some("BODY=BINARYMIME")
    } else if from.flags & !allowed != 0 || from.env_id.is_some() {
        Some("DSN (RET/ENVID)")
    } else if from.trans_id.is_some()
        || from.mtrk.is_some()
        || from.by != 0
        || from.hold_for != 0
        || from.hold_until != 0
        || from.mt_priority != 0
        || from.solicit.is_some()
    {
        Some("this MAIL parameter")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::body::BodyEncoder;

    fn session(tls: bool) -> Session {
        Session::new(SessionConfig {
            hostname: "relay.test".into(),
            tls_active: tls,
            starttls_available: true,
            implicit_tls_port: Some(465),
            plaintext_auth_allowed: false,
            max_message_bytes: 100,
            max_recipients: 2,
            max_errors: 10,
            reject_bare_line_endings: false,
        })
    }

    /// Feeds `input`, answers upstream actions with `upstream`, and returns the replies' first lines.
    fn run(
        s: &mut Session,
        input: &str,
        upstream: &mut dyn FnMut(&Action) -> Option<Reply>,
    ) -> Vec<String> {
        s.push_input(input.as_bytes());
        let mut seen = Vec::new();
        while let Some(action) = s.next_action() {
            match &action {
                Action::Reply(r) => seen.push(r.summary()),
                Action::Authenticate { login, password } => {
                    let ok = login == "news" && password.expose() == "pw";
                    s.auth_result(if ok {
                        AuthOutcome::Ok(Authorized {
                            account: "news".into(),
                            allowed_senders: Some(vec!["*@example.com".into()]),
                        })
                    } else {
                        AuthOutcome::BadCredentials
                    });
                }
                // Chunk boundaries are the session's business: the body is what counts.
                Action::BodyChunk(c) => {
                    let text = String::from_utf8_lossy(c.bytes());
                    match seen.last_mut() {
                        Some(last) if last.starts_with("chunk:") => last.push_str(&text),
                        _ => seen.push(format!("chunk:{text}")),
                    }
                }
                Action::StartTls => {
                    seen.push("starttls".into());
                    s.tls_started();
                }
                other => {
                    if let Some(r) = upstream(other) {
                        s.upstream_reply(r);
                    } else {
                        seen.push(format!("{other:?}"));
                    }
                }
            }
        }
        seen
    }

    fn accept_all(a: &Action) -> Option<Reply> {
        match a {
            Action::Mail { .. } | Action::Rcpt { .. } => Some(Reply::new(250, "2.1.0 OK")),
            Action::Data => Some(Reply::new(354, "go")),
            Action::EndOfData => Some(Reply::new(250, "2.0.0 queued")),
            _ => None,
        }
    }

    #[test]
    fn auth_requires_tls_and_mail_requires_auth() {
        let mut s = session(false);
        let r = run(
            &mut s,
            "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\nMAIL FROM:<a@example.com>\r\n",
            &mut accept_all,
        );
        assert!(r[0].starts_with("250 "), "{r:?}");
        assert!(r[1].starts_with("538 5.7.11"), "{r:?}");
        assert!(r[1].ends_with("use STARTTLS or port 465"), "{r:?}");
        assert!(r[2].starts_with("530 5.7.0"), "{r:?}");
    }

    #[test]
    fn starttls_discards_pipelined_commands_and_resets_ehlo() {
        let mut s = session(false);
        let r = run(
            &mut s,
            "EHLO x\r\nSTARTTLS\r\nAUTH PLAIN AG5ld3MAcHc=\r\n",
            &mut accept_all,
        );
        assert_eq!(r[1], "220 2.0.0 Ready to start TLS");
        assert_eq!(r[2], "starttls");
        assert_eq!(r.len(), 3, "pipelined AUTH must be discarded: {r:?}");
        let r = run(&mut s, "AUTH PLAIN AG5ld3MAcHc=\r\n", &mut accept_all);
        assert_eq!(r[0], "503 5.5.1 Send EHLO first");
    }

    #[test]
    fn full_transaction_with_limits_and_sender_policy() {
        let mut s = session(true);
        let r = run(
            &mut s,
            "EHLO x\r\nAUTH LOGIN\r\nbmV3cw==\r\ncHc=\r\nMAIL FROM:<a@other.org>\r\nMAIL FROM:<a@example.com> SIZE=500\r\n\
             MAIL FROM:<a@example.com> BODY=8BITMIME\r\nRCPT TO:<b@x>\r\nRCPT TO:<c@x>\r\nRCPT TO:<d@x>\r\nDATA\r\n\
             ..leading\r\nline\r\n.\r\n",
            &mut accept_all,
        );
        let expect = [
            "250 relay.test greets x",
            "334 VXNlcm5hbWU6",
            "334 UGFzc3dvcmQ6",
            "235 2.7.0 Authentication successful",
            "550 5.7.1 Sender <a@other.org> is not allowed for account news",
            "552 5.3.4 Message size exceeds the limit of 100 bytes",
            "250 2.1.0 OK",
            "250 2.1.0 OK",
            "250 2.1.0 OK",
            "452 4.5.3 Too many recipients",
            "354 Start mail input; end with <CRLF>.<CRLF>",
            "chunk:.leading\r\nline\r\n",
            "250 2.0.0 queued",
        ];
        assert_eq!(r, expect);
    }

    #[test]
    fn body_split_anywhere_is_unstuffed_the_same() {
        let body = ".a\r\n..b\r\nc\n.d\r\n\r\n";
        let wire = format!("{body}.\r\n");
        for split in 0..wire.len() {
            let mut s = session(true);
            run(&mut s, "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@x>\r\nDATA\r\n", &mut accept_all);
            let mut got = String::new();
            let mut end = false;
            for part in [&wire[..split], &wire[split..]] {
                for item in run(&mut s, part, &mut accept_all) {
                    if let Some(c) = item.strip_prefix("chunk:") {
                        got.push_str(c);
                    } else if item.starts_with("250 2.0.0") {
                        end = true;
                    }
                }
            }
            assert!(end, "split {split}");
            assert_eq!(got, "a\r\n.b\r\nc\n.d\r\n\r\n", "split {split}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]
        /// Whatever the reads, the body handed on is RFC 5321's decoding (a reference written from
        /// the RFC, not the decoder under test), one end of data ends it, the upstream gets the
        /// encoding of that body, and with `reject_bare_line_endings` a body with a bare CR or LF
        /// is refused instead.
        #[test]
        fn the_session_decodes_as_rfc_5321_says_and_the_upstream_gets_the_encoding(
            wire in crate::smtp::data::tests::wire_strategy(),
            reads in proptest::collection::vec(1usize..300, 1..8),
            reject in proptest::prelude::any::<bool>(),
        ) {
            // What follows the first end of data is commands (junk ones, mostly).
            let mut wire = wire;
            wire.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
            let (expected, _, taken) = crate::smtp::data::tests::reference(&wire);
            let bare = crate::smtp::data::tests::has_bare_line_ending(&wire[..taken - 3]);
            let mut s = Session::new(SessionConfig {
                max_message_bytes: 1 << 20,
                reject_bare_line_endings: reject,
                ..session(true).config
            });
            run(&mut s, "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@x>\r\nDATA\r\n", &mut accept_all);
            let (mut body, mut sent, mut ends, mut aborted) = (Vec::new(), Vec::new(), 0, false);
            let mut replies = Vec::new();
            let mut encoder = BodyEncoder::default();
            let mut rest = wire.as_slice();
            let mut sizes = reads.iter().cycle();
            while !rest.is_empty() {
                let n = (*sizes.next().unwrap()).min(rest.len());
                s.push_input(&rest[..n]);
                rest = &rest[n..];
                while let Some(action) = s.next_action() {
                    match action {
                        Action::BodyChunk(c) => {
                            body.extend_from_slice(c.bytes());
                            match encoder.as_is(&c) {
                                Some(bytes) => sent.extend_from_slice(bytes),
                                None => encoder.encode(c.bytes(), &mut sent),
                            }
                        }
                        Action::EndOfData => {
                            ends += 1;
                            s.upstream_reply(Reply::new(250, "2.0.0 ok"));
                        }
                        Action::AbortTransaction => aborted = true,
                        Action::Reply(r) => replies.push(r.summary()),
                        _ => {}
                    }
                }
            }
            sent.extend_from_slice(encoder.finish());
            if reject && bare {
                proptest::prop_assert_eq!(ends, 0);
                proptest::prop_assert!(aborted);
                proptest::prop_assert_eq!(
                    &replies[0],
                    "554 5.5.2 Bare CR or LF in the message; lines must end with CRLF"
                );
            } else {
                proptest::prop_assert_eq!(ends, 1);
                proptest::prop_assert!(!aborted);
                let mut once = BodyEncoder::default();
                let mut encoded = Vec::new();
                once.encode(&expected, &mut encoded);
                encoded.extend_from_slice(once.finish());
                proptest::prop_assert_eq!(&body, &expected);
                proptest::prop_assert_eq!(&sent, &encoded);
                proptest::prop_assert_eq!(&replies[0], "250 2.0.0 ok");
            }
        }
    }

    #[test]
    fn a_body_line_without_end_is_not_held_beyond_the_wait_limit() {
        let mut s = Session::new(SessionConfig {
            max_message_bytes: 1 << 20,
            ..session(true).config
        });
        run(&mut s, "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@x>\r\nDATA\r\n", &mut accept_all);
        let line = "z".repeat(100_000);
        let mut body = String::new();
        for piece in line.as_bytes().chunks(4096) {
            for item in run(&mut s, std::str::from_utf8(piece).unwrap(), &mut accept_all) {
                body.push_str(item.strip_prefix("chunk:").unwrap_or(""));
            }
            assert!(s.buffered() < BODY_LINE_WAIT, "{}", s.buffered());
        }
        let r = run(&mut s, "\r\n.\r\n", &mut accept_all);
        body.push_str(r[0].strip_prefix("chunk:").unwrap_or(""));
        assert_eq!(r.last().unwrap(), "250 2.0.0 queued");
        assert_eq!(body, format!("{line}\r\n"));
    }

    #[test]
    fn quoted_addresses_and_unsupported_parameters_are_refused() {
        let mut s = session(true);
        let r = run(
            &mut s,
            "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\nMAIL FROM:<\"ceo@corp.com> ENVID=x\"@example.com>\r\n\
             MAIL FROM:<a@example.com> RET=HDRS\r\nMAIL FROM:<a@example.com> REQUIRETLS\r\n\
             MAIL FROM:<a@example.com> AUTH=<>\r\nRCPT TO:<b@x> NOTIFY=NEVER\r\nRCPT TO:<\"b c\"@x>\r\nRCPT TO:<b@x>\r\n",
            &mut accept_all,
        );
        assert!(r[2].starts_with("553 5.1.7"), "{r:?}");
        assert!(r[3].starts_with("555 5.5.4"), "{r:?}");
        assert!(r[4].starts_with("555 5.5.4 REQUIRETLS"), "{r:?}");
        assert_eq!(
            r[5], "250 2.1.0 OK",
            "AUTH= is part of the advertised AUTH extension"
        );
        assert!(r[6].starts_with("555 5.5.4"), "{r:?}");
        assert!(r[7].starts_with("553 5.1.3"), "{r:?}");
        assert_eq!(r[8], "250 2.1.0 OK");
    }

    #[test]
    fn empty_body_and_oversized_body() {
        let mut s = session(true);
        let pre = "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@x>\r\nDATA\r\n";
        let r = run(&mut s, &format!("{pre}.\r\n"), &mut accept_all);
        assert_eq!(r.last().unwrap(), "250 2.0.0 queued");
        let big = "x".repeat(150);
        let r = run(
            &mut s,
            &format!(
                "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@x>\r\nDATA\r\n{big}\r\n.\r\nNOOP\r\n"
            ),
            &mut accept_all,
        );
        assert!(r.iter().any(|l| l == "AbortTransaction"), "{r:?}");
        assert_eq!(
            r[r.len() - 2],
            "552 5.3.4 Message size exceeds the limit of 100 bytes"
        );
        assert_eq!(r[r.len() - 1], "250 2.0.0 OK");
    }

    #[test]
    fn rcpts_and_data_behind_mail_are_offered_for_pipelining() {
        let mut s = session(true);
        run(
            &mut s,
            "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\n",
            &mut accept_all,
        );
        s.push_input(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@x>\r\nRCPT TO:<\"q q\"@x>\r\nDATA\r\n",
        );
        let Some(Action::Mail { ahead, .. }) = s.next_action() else {
            panic!("MAIL expected");
        };
        // The quoted address would be refused by the session, so nothing from it on goes ahead.
        assert_eq!(
            ahead,
            Ahead {
                rcpts: vec!["b@x".into()],
                data: false
            }
        );
        let mut s = session(true);
        run(
            &mut s,
            "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\n",
            &mut accept_all,
        );
        s.push_input(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@x>\r\nRCPT TO:<c@x>\r\nRCPT TO:<d@x>\r\nDATA\r\n");
        let Some(Action::Mail { ahead, .. }) = s.next_action() else {
            panic!("MAIL expected");
        };
        // At most max_recipients (2) go ahead; DATA waits for the third RCPT's local refusal.
        assert_eq!(
            ahead,
            Ahead {
                rcpts: vec!["b@x".into(), "c@x".into()],
                data: false
            }
        );
    }

    #[test]
    fn postmaster_is_a_recipient_and_never_a_null_sender() {
        let mut s = session(true);
        let r = run(
            &mut s,
            "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<postmaster>\r\nRCPT TO:<Postmaster>\r\n",
            &mut |a| {
                if let Action::Rcpt { to } = a {
                    Some(Reply::new(250, format!("2.1.5 {to}")))
                } else {
                    accept_all(a)
                }
            },
        );
        assert_eq!(r[3], "250 2.1.5 postmaster", "{r:?}");
        assert_eq!(r[4], "250 2.1.5 Postmaster", "{r:?}");
        let mut s = session(true);
        s.auth = Some(Authorized {
            account: "news".into(),
            allowed_senders: None,
        });
        let mut senders = Vec::new();
        run(
            &mut s,
            "EHLO x\r\nMAIL FROM:<postmaster@example.com>\r\nRSET\r\nMAIL FROM:<postmaster>\r\nRSET\r\n\
             MAIL FROM:<PostMaster>\r\nRSET\r\nMAIL FROM:<>\r\n",
            &mut |a| {
                if let Action::Mail { from, .. } = a {
                    senders.push(from.clone());
                }
                accept_all(a)
            },
        );
        // Only the literal <> is the null sender.
        assert_eq!(
            senders,
            ["postmaster@example.com", "postmaster", "PostMaster", ""]
        );
    }

    #[test]
    fn errors_end_the_session_at_the_limit_and_a_delivered_message_resets_the_count() {
        let mut s = session(true);
        let r = run(&mut s, &"FOO\r\n".repeat(9), &mut accept_all);
        assert_eq!(r.len(), 9);
        let r = run(
            &mut s,
            "EHLO x\r\nAUTH PLAIN AG5ld3MAcHc=\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@x>\r\nDATA\r\nhi\r\n.\r\n",
            &mut accept_all,
        );
        assert_eq!(r.last().unwrap(), "250 2.0.0 queued");
        let r = run(&mut s, &"FOO\r\n".repeat(10), &mut accept_all);
        assert_eq!(r[9], "500 5.5.1 Unknown command");
        assert_eq!(r[10], "421 4.7.0 Too many errors, closing connection");
        assert_eq!(r.last().unwrap(), "Close");
        assert!(s.is_closed());
    }

    #[test]
    fn errors_and_long_lines() {
        let mut s = session(true);
        let long = "A".repeat(MAX_LINE + 10);
        let r = run(
            &mut s,
            &format!("FOO\r\n{long}\r\nNOOP\r\nRCPT TO:<a@b>\r\nEHLO x\r\nAUTH PLAIN !!!\r\nAUTH CRAM-MD5\r\nAUTH PLAIN AG5ld3MAbm8=\r\nVRFY x\r\nQUIT\r\n"),
            &mut accept_all,
        );
        assert_eq!(r[0], "500 5.5.1 Unknown command");
        assert_eq!(r[1], "500 5.5.6 Line too long");
        assert_eq!(r[2], "250 2.0.0 OK");
        assert_eq!(r[3], "503 5.5.1 Need MAIL before RCPT");
        assert_eq!(r[5], "501 5.5.2 Invalid base64 data");
        assert!(r[6].starts_with("504 5.5.4"));
        assert_eq!(r[7], "535 5.7.8 Authentication credentials invalid");
        assert!(r[8].starts_with("252 2.5.0"));
        assert_eq!(r[9], "221 2.0.0 Bye");
        assert!(s.is_closed());
    }
}
