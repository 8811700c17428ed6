//! What every connection of the relay shares: the config snapshot a reload swaps, admission,
//! lockouts, the way into delivery, and the shutdown signals.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::delivery::Delivery;
use crate::observe::Observer;

/// The part of the configuration a reload replaces. A session reads it once, when it starts, and
/// finishes on it.
pub struct Live {
    pub config: Arc<Config>,
    pub authenticator: Authenticator,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// What every connection shares.
pub struct Shared {
    pub live: arc_swap::ArcSwap<Live>,
    /// Connection slots: `max_connections`, `max_connections_per_ip`.
    pub admission: Arc<super::admission::Admission>,
    /// The way in for the sessions' messages.
    pub delivery: Arc<Delivery>,
    pub observer: Observer,
    pub lockout: super::lockout::Lockout,
    /// Cancelled when the relay shuts down: sessions between commands are sent away.
    pub stop: CancellationToken,
    /// Cancelled when the shutdown grace period is over: whatever still runs is cut.
    pub cut: CancellationToken,
}
