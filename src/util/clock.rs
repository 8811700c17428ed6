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

/// Calendar fields of unix seconds, UTC: (year, month, day, seconds into the day, days since 1970).
fn civil(secs: u64) -> (i64, i64, i64, u64, i64) {
    let days = (secs / 86400) as i64;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, secs % 86400, days)
}

/// `2026-12-02T03:04:05Z`, for JSON that scripts read.
pub fn rfc3339(secs: u64) -> String {
    let (year, month, day, rem, _) = civil(secs);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// An RFC 5322 date (UTC), for message headers.
pub fn rfc2822(secs: u64) -> String {
    let (year, month, day, rem, days) = civil(secs);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days.rem_euclid(7)) as usize];
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(month - 1) as usize];
    format!(
        "{weekday}, {day:02} {mon} {year} {:02}:{:02}:{:02} +0000",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_180_645), "2026-12-02T03:04:05Z");
        assert_eq!(
            super::rfc2822(1_796_180_645),
            "Wed, 02 Dec 2026 03:04:05 +0000"
        );
    }
}
