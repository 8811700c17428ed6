//! The control socket: how admin commands reach a running relay.
//!
//! A Unix socket in the data dir, mode 0600, so only the relay's own user can use it. One JSON
//! request line in, one JSON response line out. It exists because sled allows a single process per
//! database, and because a running relay must drop its cached token when a grant changes.
//!
//! `wire` holds the messages both ends speak; `server` runs in the relay and hands each request to a
//! [`server::Handler`] (the admin room implements it); `client` is what the CLI uses. Neither end
//! imports the other, nor the admin room.

pub mod client;
pub mod server;
pub mod wire;

/// Longest request or response line accepted.
pub(crate) const MAX_MESSAGE: u64 = 1 << 20;
