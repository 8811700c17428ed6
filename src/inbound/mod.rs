//! The mailer side: listeners, admission limits, and the IO driver of one mailer connection.
//!
//! `listener` accepts and admits; `connection` runs one session: it feeds socket bytes to the
//! sans-IO [`crate::smtp::session::Session`] and carries out its actions (TLS, password check,
//! delivery through [`crate::delivery::Submission`]); `lockout` shuts out addresses that keep
//! failing logins.

pub mod connection;
pub mod listener;
pub mod lockout;
