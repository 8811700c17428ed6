//! What happens to a message after the mailer hands it over: the interface the inbound side calls
//! ([`submission::Submission`]), the SMTP client towards the provider ([`client`]), and the typed
//! outcomes of each step ([`outcome`]).
//!
//! Coming rooms plug in here: a per-account connection pool behind `Submission::open`, pacing, and
//! a durable queue that decides retry-or-bounce from [`outcome::Outcome`] alone.

pub mod client;
pub mod outcome;
pub mod submission;

pub use outcome::{ErrorKind, Outcome, UpstreamError};
pub use submission::{Submission, UpstreamContext};
