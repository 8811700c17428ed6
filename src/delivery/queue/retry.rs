//! When to try again: the backoff schedule, and which replies are throttling rather than failure.
//!
//! A provider that says "slow down" (`421`, `432 4.3.2`, `451 4.7.x`) or "quota used up" is not
//! saying anything about the message: the account pauses and the message keeps its place and its
//! attempt count. A quota reply is usually a 5xx (Microsoft `554 5.2.0 ... SubmissionQuotaExceeded`,
//! Gmail `550 5.4.5 Daily user sending limit exceeded`) and must never become a bounce.

use std::time::Duration;

use rand::Rng;

use crate::config::DeliveryConfig;
use crate::smtp::{EnhancedCode, Reply};

/// How long an account pauses after a rate or connection limit reply that names no time.
pub const RATE_PAUSE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// Too fast or too many connections: a minute.
    Rate,
    /// A sending quota: `quota_pause_secs`.
    Quota,
}

/// Whether `reply` is the provider throttling the account.
pub fn throttle(reply: &Reply) -> Option<Throttle> {
    let text = reply.lines.join(" ").to_ascii_lowercase();
    // X.2.2 is the recipient's mailbox being full ("over quota"): that recipient's fate, not the
    // account's sending quota.
    let mailbox_full = reply.enhanced().is_some_and(|c| c.1 == 2 && c.2 == 2);
    let quota = !mailbox_full
        && (reply.enhanced() == Some(EnhancedCode(5, 4, 5))
            || ["submissionquotaexceeded", "sending limit exceeded", "quota"]
                .iter()
                .any(|w| text.contains(w)));
    if quota {
        return Some(Throttle::Quota);
    }
    let rate = match reply.code {
        421 => true,
        432 => reply.mentions(EnhancedCode(4, 3, 2)),
        451 => reply.enhanced().is_some_and(|c| c.0 == 4 && c.1 == 7),
        _ => false,
    };
    rate.then_some(Throttle::Rate)
}

/// How long the account pauses for a throttling reply: the time the reply names, else the
/// default for its kind.
pub fn pause_for(reply: &Reply, kind: Throttle, config: &DeliveryConfig) -> Duration {
    named_wait(reply).unwrap_or(match kind {
        Throttle::Rate => RATE_PAUSE,
        Throttle::Quota => Duration::from_secs(config.quota_pause_secs),
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
    fn provider_throttling_and_quota_replies_are_recognised() {
        let quota = [
            Reply::new(
                554,
                "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
            ),
            Reply::new(550, "5.4.5 Daily user sending limit exceeded."),
        ];
        for r in &quota {
            assert_eq!(throttle(r), Some(Throttle::Quota), "{r:?}");
        }
        let rate = [
            Reply::new(421, "4.7.0 Try again later, closing connection."),
            Reply::new(
                432,
                "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
            ),
            Reply::new(451, "4.7.500 Server busy. Please try again later"),
        ];
        for r in &rate {
            assert_eq!(throttle(r), Some(Throttle::Rate), "{r:?}");
        }
        for r in [
            Reply::new(550, "5.1.1 No such user"),
            Reply::new(450, "4.2.1 Mailbox busy"),
            Reply::new(451, "4.3.0 Local error"),
            // A full mailbox is the recipient's trouble.
            Reply::new(
                452,
                "4.2.2 The email account that you tried to reach is over quota",
            ),
        ] {
            assert_eq!(throttle(&r), None, "{r:?}");
        }
    }

    #[test]
    fn a_named_time_wins_over_the_default_pause() {
        let config = DeliveryConfig::default();
        let r = Reply::new(451, "4.7.0 Too many messages, try again in 5 minutes");
        assert_eq!(
            pause_for(&r, Throttle::Rate, &config),
            Duration::from_secs(300)
        );
        let r = Reply::new(550, "5.4.5 Daily user sending limit exceeded");
        assert_eq!(
            pause_for(&r, Throttle::Quota, &config),
            Duration::from_secs(3600)
        );
        assert_eq!(
            pause_for(&Reply::new(421, "4.7.0 busy"), Throttle::Rate, &config),
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
