//! What happens to a message after the mailer hands it over: the interface the inbound side calls
//! ([`submission::Submission`]), the per-account upstream connection pool ([`pool`]), the SMTP
//! client towards the provider ([`client`]) and how it reaches it ([`connect`]: Happy Eyeballs,
//! SOCKS5 and HTTP CONNECT proxies), the typed outcomes of each step ([`outcome`]), last-use
//! bookkeeping ([`activity`]), each account's sending limits ([`pacing`], asked in both modes) and
//! the durable queue with its retries and bounces ([`queue`]).

pub mod activity;
pub mod client;
pub mod connect;
pub mod outcome;
pub mod pacing;
pub mod pool;
pub mod queue;
pub mod submission;

pub use outcome::{ErrorKind, Outcome, UpstreamError};
pub use submission::{Submission, UpstreamContext};
