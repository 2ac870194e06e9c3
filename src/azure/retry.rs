//! Retry decisions, backoff with jitter, `Retry-After`, and the injectable timer the pipeline sleeps on.

use crate::clock::Clock;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use rand::Rng;
use std::time::Duration;

/// Where the pipeline reads "now" and sleeps. Durations are in the *server's* time: with a scaled
/// [`Clock`] a `Retry-After: 60` from the simulator waits 60 simulated seconds.
pub trait Timer: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()>;
}

/// The shared simulated clock as a timer (real time in production).
#[derive(Debug, Clone, Copy, Default)]
pub struct ClockTimer(pub Clock);

impl Timer for ClockTimer {
    fn now(&self) -> DateTime<Utc> {
        self.0.now()
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        let clock = self.0;
        Box::pin(async move { clock.sleep(duration).await })
    }
}

/// Bounds on retrying one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// No retry starts once this much time has passed since the first attempt.
    pub max_elapsed: Duration,
    /// First backoff step; doubles per attempt.
    pub base_delay: Duration,
    /// Largest backoff step (does not cap a server's `Retry-After`).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            max_elapsed: Duration::from_secs(10 * 60),
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// Backoff before attempt `attempt + 1` (attempt counts from 1): "equal jitter", between half
    /// and all of `base * 2^(attempt-1)`, capped at `max_delay`.
    pub fn backoff(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let ceiling = exp.min(self.max_delay);
        let half = ceiling / 2;
        half + ceiling.saturating_sub(half).mul_f64(rng.gen::<f64>())
    }

    /// Wait after a throttled response: exactly the server's `Retry-After` plus a small upward
    /// jitter (never less, so no request is sent early); backoff when the server gave none.
    pub fn throttle_wait(
        &self,
        retry_after: Option<Duration>,
        attempt: u32,
        rng: &mut impl Rng,
    ) -> Duration {
        match retry_after {
            Some(after) => {
                let spread = (after / 10).min(Duration::from_secs(1));
                after + spread.mul_f64(rng.gen::<f64>())
            }
            None => self.backoff(attempt, rng),
        }
    }
}

/// Whether a status is worth another attempt: throttling and server-side failures. 501 and 505
/// describe the request, not the server's state.
pub fn is_retryable_status(status: u16) -> bool {
    status == 429 || (status >= 500 && status != 501 && status != 505)
}

/// Parses `Retry-After`: delta-seconds (ARM) or an HTTP date, relative to `now` (the server's clock).
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn backoff_grows_stays_within_bounds_and_is_capped() {
        let policy = RetryPolicy::default();
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 1..=12 {
            let exp = Duration::from_secs(1u64 << (attempt - 1)).min(policy.max_delay);
            for _ in 0..50 {
                let d = policy.backoff(attempt, &mut rng);
                assert!(d >= exp / 2 && d <= exp, "attempt {attempt}: {d:?}");
            }
        }
    }

    #[test]
    fn throttle_wait_is_never_shorter_than_retry_after() {
        let policy = RetryPolicy::default();
        let mut rng = StdRng::seed_from_u64(1);
        for secs in [0u64, 1, 7, 60, 3600] {
            for _ in 0..50 {
                let wait = policy.throttle_wait(Some(Duration::from_secs(secs)), 3, &mut rng);
                assert!(wait >= Duration::from_secs(secs));
                assert!(wait <= Duration::from_secs(secs + 1));
            }
        }
    }

    #[test]
    fn retry_after_seconds_and_http_dates() {
        let now = Utc.with_ymd_and_hms(2026, 11, 28, 10, 56, 0).unwrap();
        assert_eq!(parse_retry_after("60", now), Some(Duration::from_secs(60)));
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after("Sat, 28 Nov 2026 10:56:08 +0000", now),
            Some(Duration::from_secs(8))
        );
        assert_eq!(
            parse_retry_after("Sat, 28 Nov 2026 10:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }

    #[test]
    fn retryable_statuses() {
        assert!(is_retryable_status(429));
        assert!(is_retryable_status(500));
        assert!(is_retryable_status(503));
        assert!(!is_retryable_status(501));
        assert!(!is_retryable_status(400));
        assert!(!is_retryable_status(404));
        assert!(!is_retryable_status(409));
    }
}
