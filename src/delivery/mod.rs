//! What happens to a message after the mailer hands it over.
//!
//! - [`submission`]: the way in the inbound side calls ([`Delivery`]: admission at AUTH, and a
//!   [`Submission`] per session: direct, or into the queue).
//! - [`transport`]: the seam between a message and the way it goes upstream; [`smtp`] is today's
//!   transport (one SMTP transaction on a pooled connection), over [`pool`] (per-account upstream
//!   connections, capped), [`client`] (the SMTP client) and [`connect`] (Happy Eyeballs, SOCKS5
//!   and HTTP CONNECT proxies); [`api`] is the other: Microsoft Graph and the Gmail API over HTTP.
//! - [`status`]: what each step came to, typed once; [`error`]: connection failures.
//! - [`pacing`]: each account's sending limits, asked in both modes; [`activity`]: last use.
//! - [`queue`]: the durable queue with its retries and bounces.

pub mod activity;
pub mod api;
pub mod client;
pub mod connect;
pub mod error;
pub mod pacing;
pub mod pool;
pub mod queue;
pub mod slots;
pub mod smtp;
pub mod status;
pub mod submission;
pub mod transport;

pub use error::{ErrorKind, UpstreamError};
pub use status::{Cause, Status};
pub use submission::{Delivery, Submission};
