//! What an upstream step came to, as types: decided where the reply arrives, from its severity.
//!
//! The mailer-facing session only needs the reply to pass on; the queue (a later room) decides
//! retry-or-bounce from these types alone, without reading any text.

use crate::smtp::{Reply, Severity};

/// The result of one step of a transaction (MAIL, RCPT, DATA, end of data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream took it (2xx, or 354 after DATA).
    Accepted(Reply),
    /// Try again later: an upstream 4xx, or a connection failure reported as one.
    Temporary(Reply),
    /// Do not repeat as it is: an upstream 5xx.
    Permanent(Reply),
}

impl Outcome {
    pub fn from_reply(reply: Reply) -> Outcome {
        match reply.severity() {
            Severity::Positive | Severity::Intermediate => Outcome::Accepted(reply),
            Severity::Transient => Outcome::Temporary(reply),
            Severity::Permanent => Outcome::Permanent(reply),
        }
    }

    pub fn reply(&self) -> &Reply {
        match self {
            Outcome::Accepted(r) | Outcome::Temporary(r) | Outcome::Permanent(r) => r,
        }
    }

    pub fn into_reply(self) -> Reply {
        match self {
            Outcome::Accepted(r) | Outcome::Temporary(r) | Outcome::Permanent(r) => r,
        }
    }

    pub fn is_accepted(&self) -> bool {
        matches!(self, Outcome::Accepted(_))
    }
}

/// What went wrong with a connection, kept as a kind so callers can decide without parsing text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A step got no answer in time.
    Timeout,
    /// The server could not be reached (refused, unreachable, name not resolved).
    Connect,
    /// The TLS handshake failed (certificate, protocol).
    Tls,
    /// The server broke the protocol, or it is out of step, or it lacks something we require.
    Protocol,
    /// The connection closed or broke under us.
    Closed,
    /// Local trouble: no TLS configuration for the provider and the like.
    Config,
}

/// A failed connection or exchange with the upstream, worded for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError {
    pub kind: ErrorKind,
    /// `upstream smtp.example.com: TLS handshake: ...`
    pub detail: String,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

#[derive(Debug, Clone)]
pub enum UpstreamError {
    /// Network, TLS, timeout or protocol trouble: a mailer gets a 451 and retries later.
    Connection(ConnectError),
    /// The server refused the token (after Gmail's challenge has been answered).
    AuthRejected(Reply),
    /// The server answered a step with an error of its own.
    Rejected(Reply),
}

impl UpstreamError {
    pub fn new(
        kind: ErrorKind,
        host: &str,
        step: &str,
        e: impl std::fmt::Display,
    ) -> UpstreamError {
        UpstreamError::Connection(ConnectError {
            kind,
            detail: format!("upstream {host}: {step}: {e}"),
        })
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connection(e) => write!(f, "{e}"),
            UpstreamError::AuthRejected(r) => write!(f, "authentication rejected: {}", r.summary()),
            UpstreamError::Rejected(r) => write!(f, "rejected: {}", r.summary()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_follows_the_reply_code() {
        assert!(Outcome::from_reply(Reply::new(250, "2.0.0 OK")).is_accepted());
        assert!(Outcome::from_reply(Reply::new(354, "go")).is_accepted());
        assert!(matches!(
            Outcome::from_reply(Reply::new(451, "4.7.500 Server busy")),
            Outcome::Temporary(_)
        ));
        assert!(matches!(
            Outcome::from_reply(Reply::new(550, "5.1.1 No such user")),
            Outcome::Permanent(_)
        ));
    }
}
