//! A failed connection or exchange with the upstream, worded for the operator, with its kind:
//! what [`super::status::Status`] is made from when no reply came.

use crate::smtp::Reply;

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
    /// Whether the connection broke under us (reset, closed, a failed write): a pooled one that
    /// breaks at once was closed by the upstream while idle, and is worth replacing once.
    pub fn closed(&self) -> bool {
        matches!(self, UpstreamError::Connection(e) if e.kind == ErrorKind::Closed)
    }

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
