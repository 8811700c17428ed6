//! SMTP without IO: replies, the mailer-facing session state machine, the body codec.
//!
//! Nothing here uses tokio or a socket: the session consumes bytes and returns actions, and the
//! IO layers (`inbound` towards the mailer, `delivery` towards the provider) carry them out. That is
//! what lets every protocol rule be tested without a network.

pub mod body;
pub mod data;
pub mod reply;
pub mod session;

pub use reply::{EnhancedCode, Reply, Severity};
