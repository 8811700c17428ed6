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

use bytes::{Buf, BytesMut};
use smtp_proto::{Request, MAIL_BODY_8BITMIME, MAIL_SMTPUTF8};

mod data_phase;
mod params;
mod sasl;
#[cfg(test)]
mod tests;

pub use self::params::sender_allowed;
use self::params::{
    has_control, plain_address, rcpt_address, unsupported_mail_param, written_address,
};
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
    /// The account of a device at this address (`sources`): the session's at its first MAIL
    /// without AUTH.
    device: Option<Authorized>,
    auth_failures: u32,
    in_transaction: bool,
    accepted_rcpts: usize,
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
            device: None,
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

    /// The peer's address is one of `who`'s `sources`: MAIL without AUTH is that account's.
    pub fn allow_device(&mut self, who: Authorized) {
        self.device = Some(who);
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

    /// Whether the input opens with a TLS handshake record (content type 22, version 3.x): a
    /// client that speaks TLS at once, on a port where SMTP comes first.
    pub fn starts_with_tls_hello(&self) -> bool {
        !self.config.tls_active && self.input.starts_with(&[0x16, 0x03])
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
        let mut line = zeroize::Zeroizing::new(line);
        match std::mem::replace(&mut self.phase, Phase::Command) {
            Phase::AuthPlain => self.auth_plain_response(&line),
            Phase::AuthLoginUser => self.auth_login_user(&line),
            Phase::AuthLoginPass { login } => self.auth_login_pass(login, &line),
            _ => self.command(&mut line),
        }
    }

    /// `line` without its line end (it has the room for it: it came with one).
    fn command(&mut self, line: &mut Vec<u8>) {
        // NUL, a bare CR and other control bytes have no place in a command, and must never be
        // echoed back (EHLO repeats its argument).
        if has_control(line) {
            return self.reply(501, "5.5.2 Control characters are not allowed in commands");
        }
        line.extend_from_slice(b"\r\n");
        let request = match Request::parse(&mut line.iter()).map(Request::into_owned) {
            Ok(r) => match written_address(r, line) {
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

    fn mail(&mut self, from: smtp_proto::MailFrom<String>) {
        if self.auth.is_none() {
            // A device at one of an account's `sources`: no password crosses the network, so
            // neither AUTH nor TLS is asked of it.
            self.auth = self.device.clone();
        }
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
}
