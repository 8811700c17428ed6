//! Time as the relay reads it, behind a trait so that expiry, backoff and schedules can be unit-tested.
//!
//! Two clocks are needed: a monotonic one for deadlines (tokio's, so `tokio::time::pause` moves it
//! too) and wall-clock seconds for what is persisted or shown (a stored token's expiry, "last use").
//! [`ManualClock`] moves both together, which tokio's paused clock alone cannot do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub trait Clock: Send + Sync {
    /// Monotonic time for deadlines and cache expiry.
    fn now(&self) -> Instant;
    /// Unix seconds, for what is stored or shown.
    fn unix(&self) -> u64;
}

pub type SharedClock = Arc<dyn Clock>;

/// The real clocks (tokio's monotonic clock, which a paused test runtime controls).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn unix(&self) -> u64 {
        now_unix()
    }
}

pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A clock that moves only when told to: both readings advance together.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    start_unix: u64,
    offset_ms: AtomicU64,
}

impl ManualClock {
    pub fn new(start_unix: u64) -> Arc<ManualClock> {
        Arc::new(ManualClock {
            start: Instant::now(),
            start_unix,
            offset_ms: AtomicU64::new(0),
        })
    }

    pub fn advance(&self, by: Duration) {
        self.offset_ms
            .fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }

    fn offset(&self) -> Duration {
        Duration::from_millis(self.offset_ms.load(Ordering::SeqCst))
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + self.offset()
    }

    fn unix(&self) -> u64 {
        self.start_unix + self.offset().as_secs()
    }
}
