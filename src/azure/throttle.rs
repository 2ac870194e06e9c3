//! A client-side copy of ARM's token buckets, so that we slow ourselves down before ARM answers 429.
//!
//! ARM keeps one bucket per subscription (per principal, per region) and per operation class:
//! reads 250 + 25/s, writes 200 + 10/s, deletes 200 + 10/s. Each request *reserves* a token; when
//! the bucket is empty the reservation lies in the future and the caller sleeps until then, so
//! concurrent callers queue fairly instead of all waking at once. The
//! `x-ms-ratelimit-remaining-subscription-*` headers lower our count when ARM has seen more
//! traffic than we have (other processes with the same identity).

use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpClass {
    Read,
    Write,
    Delete,
}

impl OpClass {
    pub fn of(method: &reqwest::Method) -> Self {
        match *method {
            reqwest::Method::GET | reqwest::Method::HEAD | reqwest::Method::OPTIONS => {
                OpClass::Read
            }
            reqwest::Method::DELETE => OpClass::Delete,
            _ => OpClass::Write,
        }
    }

    fn header_suffix(self) -> &'static str {
        match self {
            OpClass::Read => "reads",
            OpClass::Write => "writes",
            OpClass::Delete => "deletes",
        }
    }
}

/// One bucket's size and refill rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketLimits {
    pub capacity: f64,
    pub refill_per_sec: f64,
}

/// Limits per operation class; defaults are ARM's published subscription limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottleLimits {
    pub reads: BucketLimits,
    pub writes: BucketLimits,
    pub deletes: BucketLimits,
}

impl Default for ThrottleLimits {
    fn default() -> Self {
        ThrottleLimits {
            reads: BucketLimits {
                capacity: 250.0,
                refill_per_sec: 25.0,
            },
            writes: BucketLimits {
                capacity: 200.0,
                refill_per_sec: 10.0,
            },
            deletes: BucketLimits {
                capacity: 200.0,
                refill_per_sec: 10.0,
            },
        }
    }
}

impl ThrottleLimits {
    fn of(&self, class: OpClass) -> BucketLimits {
        match class {
            OpClass::Read => self.reads,
            OpClass::Write => self.writes,
            OpClass::Delete => self.deletes,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Negative when reservations lie in the future.
    tokens: f64,
    updated: DateTime<Utc>,
    /// Requests reserved and not yet answered: ARM counts them when they arrive, which may be
    /// later than we reserved them.
    in_flight: u32,
}

impl Bucket {
    fn refill(&mut self, limits: BucketLimits, now: DateTime<Utc>) {
        let elapsed = (now - self.updated).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
        if elapsed > 0.0 {
            // ARM's bucket stops filling at capacity while our in-flight requests have not reached
            // it yet; so ours stops that many tokens short, or a burst sent after a lag finds it dry.
            let ceiling = limits.capacity - f64::from(self.in_flight);
            self.tokens =
                (self.tokens + elapsed * limits.refill_per_sec).min(ceiling.max(self.tokens));
            self.updated = now;
        }
    }
}

/// The scope a request is counted against: its subscription, or the tenant for tenant-level calls.
pub fn throttle_scope(url: &url::Url) -> String {
    let mut segments = url.path_segments().into_iter().flatten();
    while let Some(segment) = segments.next() {
        if segment.eq_ignore_ascii_case("subscriptions") {
            if let Some(id) = segments.next().filter(|s| !s.is_empty()) {
                return id.to_ascii_lowercase();
            }
        }
    }
    "tenant".to_string()
}

/// The header ARM uses to report what is left in the bucket this request was counted against.
pub fn remaining_header(scope: &str, class: OpClass) -> String {
    let level = if scope == "tenant" {
        "tenant"
    } else {
        "subscription"
    };
    format!("x-ms-ratelimit-remaining-{level}-{}", class.header_suffix())
}

#[derive(Debug, Default)]
pub struct ArmThrottle {
    limits: ThrottleLimits,
    buckets: Mutex<HashMap<(String, OpClass), Bucket>>,
}

impl ArmThrottle {
    pub fn new(limits: ThrottleLimits) -> Self {
        ArmThrottle {
            limits,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for one request and returns how long to wait before sending it.
    pub fn reserve(&self, scope: &str, class: OpClass, now: DateTime<Utc>) -> Duration {
        let limits = self.limits.of(class);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = buckets.entry((scope.to_string(), class)).or_insert(Bucket {
            tokens: limits.capacity,
            updated: now,
            in_flight: 0,
        });
        bucket.refill(limits, now);
        bucket.tokens -= 1.0;
        bucket.in_flight += 1;
        if bucket.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.tokens / limits.refill_per_sec)
        }
    }

    /// Marks a reserved request as answered (or abandoned): ARM has counted it, or never will.
    pub fn release(&self, scope: &str, class: OpClass, now: DateTime<Utc>) {
        let limits = self.limits.of(class);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = buckets.get_mut(&(scope.to_string(), class)) {
            bucket.refill(limits, now);
            bucket.in_flight = bucket.in_flight.saturating_sub(1);
        }
    }

    /// Lowers our count to what ARM reported remaining (never raises it: ARM's count lags our
    /// reservations that are still waiting to be sent).
    pub fn observe_remaining(
        &self,
        scope: &str,
        class: OpClass,
        remaining: f64,
        now: DateTime<Utc>,
    ) {
        let limits = self.limits.of(class);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = buckets.get_mut(&(scope.to_string(), class)) {
            bucket.refill(limits, now);
            bucket.tokens = bucket.tokens.min(remaining);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(1_800_000_000_000 + ms).unwrap()
    }

    #[test]
    fn full_bucket_then_paced_at_refill_rate() {
        let throttle = ArmThrottle::new(ThrottleLimits::default());
        for _ in 0..250 {
            assert_eq!(throttle.reserve("sub", OpClass::Read, t(0)), Duration::ZERO);
        }
        // The 251st read waits one refill step (1/25 s), the 260th ten.
        assert_eq!(
            throttle.reserve("sub", OpClass::Read, t(0)),
            Duration::from_millis(40)
        );
        for _ in 0..8 {
            throttle.reserve("sub", OpClass::Read, t(0));
        }
        assert_eq!(
            throttle.reserve("sub", OpClass::Read, t(0)),
            Duration::from_millis(400)
        );
        // Other classes and subscriptions have their own buckets.
        assert_eq!(
            throttle.reserve("sub", OpClass::Write, t(0)),
            Duration::ZERO
        );
        assert_eq!(
            throttle.reserve("other", OpClass::Read, t(0)),
            Duration::ZERO
        );
        // Once answered, after 10 s the read bucket has refilled 250 tokens minus the 10 borrowed.
        for _ in 0..260 {
            throttle.release("sub", OpClass::Read, t(0));
        }
        assert_eq!(
            throttle.reserve("sub", OpClass::Read, t(10_000)),
            Duration::ZERO
        );
    }

    #[test]
    fn unanswered_requests_keep_the_bucket_short_of_capacity() {
        let limits = ThrottleLimits::default();
        let throttle = ArmThrottle::new(limits);
        for _ in 0..200 {
            assert_eq!(
                throttle.reserve("sub", OpClass::Write, t(0)),
                Duration::ZERO
            );
        }
        // 10 s later ARM may not have counted any of the 200 yet (its bucket is still full), so
        // the 100 tokens refilled meanwhile are not ours to spend until they are answered.
        assert!(throttle.reserve("sub", OpClass::Write, t(10_000)) > Duration::ZERO);
        for _ in 0..201 {
            throttle.release("sub", OpClass::Write, t(10_000));
        }
        assert_eq!(
            throttle.reserve("sub", OpClass::Write, t(20_000)),
            Duration::ZERO
        );
    }

    #[test]
    fn reported_remaining_lowers_the_count() {
        let throttle = ArmThrottle::new(ThrottleLimits::default());
        throttle.reserve("sub", OpClass::Write, t(0));
        throttle.observe_remaining("sub", OpClass::Write, 0.0, t(0));
        assert_eq!(
            throttle.reserve("sub", OpClass::Write, t(0)),
            Duration::from_millis(100)
        );
        throttle.observe_remaining("sub", OpClass::Write, 150.0, t(0));
        assert!(throttle.reserve("sub", OpClass::Write, t(0)) > Duration::ZERO);
    }

    #[test]
    fn scope_and_header_names() {
        let url = url::Url::parse(
            "https://management.azure.com/subscriptions/ABC/resourceGroups/rg?api-version=1",
        )
        .unwrap();
        assert_eq!(throttle_scope(&url), "abc");
        let url = url::Url::parse(
            "https://management.azure.com/providers/Microsoft.ResourceGraph/resources",
        )
        .unwrap();
        assert_eq!(throttle_scope(&url), "tenant");
        assert_eq!(
            remaining_header("abc", OpClass::Delete),
            "x-ms-ratelimit-remaining-subscription-deletes"
        );
        assert_eq!(
            remaining_header("tenant", OpClass::Read),
            "x-ms-ratelimit-remaining-tenant-reads"
        );
        assert_eq!(OpClass::of(&reqwest::Method::PATCH), OpClass::Write);
    }
}
