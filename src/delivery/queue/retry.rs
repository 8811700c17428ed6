//! When to try again: the backoff schedule, and how long a throttled account pauses (which
//! replies are throttling is decided once, in [`crate::delivery::status`]).

use std::time::Duration;

use rand::Rng;

use crate::config::DeliveryConfig;
use crate::delivery::status::Cause;
use crate::smtp::Reply;

/// How long an account pauses after a rate or connection limit reply that names no time.
pub const RATE_PAUSE: Duration = Duration::from_secs(60);

/// How long the account pauses for a throttling status: the time the reply names, else the
/// default for its kind (a quota: `quota_pause_secs`).
pub fn pause_for(reply: &Reply, cause: Cause, config: &DeliveryConfig) -> Duration {
    named_wait(reply).unwrap_or(match cause {
        Cause::Quota => Duration::from_secs(config.quota_pause_secs),
        _ => RATE_PAUSE,
    })
}

/// "try again in 30 seconds", "retry after 5 minutes", "in 1 hour": a number followed by a unit,
/// after "in" or "after".
pub fn named_wait(reply: &Reply) -> Option<Duration> {
    let text = reply.lines.join(" ").to_ascii_lowercase();
    let words: Vec<&str> = text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    words.windows(3).find_map(|w| {
        if w[0] != "in" && w[0] != "after" {
            return None;
        }
        let n: u64 = w[1].parse().ok()?;
        let unit = match w[2] {
            "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hour" | "hours" => 3600,
            _ => return None,
        };
        Some(Duration::from_secs(n.checked_mul(unit)?.clamp(1, 86_400)))
    })
}

/// The wait before the `n`-th retry (n ≥ 1): `retry_min × 2^(n-1)` capped at `retry_max`, less up
/// to a fifth at random so that a burst that failed together does not retry together, and never
/// below `retry_min`.
pub fn backoff(n: u32, config: &DeliveryConfig) -> Duration {
    let min = config.retry_min_secs;
    let base = min
        .saturating_mul(1u64 << n.saturating_sub(1).min(32))
        .min(config.retry_max_secs)
        .max(min);
    let jitter = rand::thread_rng().gen_range(0.8..=1.0);
    let secs = ((base as f64) * jitter).max(min as f64);
    Duration::from_secs_f64(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_time_wins_over_the_default_pause() {
        let config = DeliveryConfig::default();
        let r = Reply::new(451, "4.7.0 Too many messages, try again in 5 minutes");
        assert_eq!(
            pause_for(&r, Cause::Throttled, &config),
            Duration::from_secs(300)
        );
        let r = Reply::new(550, "5.4.5 Daily user sending limit exceeded");
        assert_eq!(
            pause_for(&r, Cause::Quota, &config),
            Duration::from_secs(3600)
        );
        assert_eq!(
            pause_for(&Reply::new(421, "4.7.0 busy"), Cause::Throttled, &config),
            RATE_PAUSE
        );
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_never_below_the_minimum() {
        let config = DeliveryConfig {
            retry_min_secs: 60,
            retry_max_secs: 3600,
            ..DeliveryConfig::default()
        };
        for _ in 0..50 {
            assert_eq!(backoff(1, &config), Duration::from_secs(60));
            let second = backoff(2, &config).as_secs_f64();
            assert!((96.0..=120.0).contains(&second), "{second}");
            let late = backoff(20, &config).as_secs_f64();
            assert!((2880.0..=3600.0).contains(&late), "{late}");
        }
    }
}
