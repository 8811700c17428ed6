//! The mailer side: listeners, admission limits, and the IO driver of one mailer connection.
//!
//! `listener` accepts, `admission` counts connections against the limits, `shared` is what they
//! all share; `connection` runs one session: it feeds socket bytes to the
//! sans-IO [`crate::smtp::session::Session`] and carries out its actions (TLS, password check,
//! delivery through [`crate::delivery::Submission`]); `lockout` shuts out addresses that keep
//! failing logins.

pub mod admission;
pub mod connection;
pub mod listener;
pub mod lockout;
pub mod shared;
