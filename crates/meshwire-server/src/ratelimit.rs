//! Per-requester token buckets (registrations, pre-key bundle fetches,
//! discovery), and the 429 answer of a refused request.

use crate::http::ApiError;
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use meshwire_proto::time::Timestamp;
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const MINUTE_MS: u64 = 60_000;
/// The shared bucket of requesters past the tracking limit.
const OVERFLOW: &str = "\u{0}overflow";

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens times `MINUTE_MS` (exact integer refill).
    scaled: u64,
    at: u64,
}

/// Buckets of `per_minute` tokens refilled continuously, one per requester,
/// at most `max_tracked` of them (requesters past that share one bucket).
#[derive(Debug)]
pub(crate) struct RateLimiter {
    per_minute: u64,
    max_tracked: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
    pub(crate) refused: AtomicU64,
    /// `meshwire_rate_limited_total{limit=...}` of this limiter.
    counter: Counter,
}

impl RateLimiter {
    /// A limiter whose refusals also count on `counter` (its metric).
    pub(crate) fn new(per_minute: u32, max_tracked: usize, counter: Counter) -> Self {
        Self {
            per_minute: u64::from(per_minute),
            max_tracked: max_tracked.max(1),
            buckets: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            counter,
        }
    }

    fn refill(&self, bucket: &mut Bucket, now: u64) {
        let full = self.per_minute.saturating_mul(MINUTE_MS);
        let elapsed = now.saturating_sub(bucket.at);
        bucket.scaled = bucket
            .scaled
            .saturating_add(elapsed.saturating_mul(self.per_minute))
            .min(full);
        bucket.at = bucket.at.max(now);
    }

    /// Takes a token for `requester`: `Ok` or the seconds until one is
    /// available (for `Retry-After`).
    pub(crate) fn take(&self, requester: &str, now: Timestamp) -> Result<(), u64> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let now = now.0;
        let full = self.per_minute.saturating_mul(MINUTE_MS);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = requester;
        if !buckets.contains_key(key) && buckets.len() >= self.max_tracked {
            // Buckets that refilled completely hold no information.
            let per_minute = self.per_minute;
            buckets.retain(|_, b| {
                let elapsed = now.saturating_sub(b.at);
                b.scaled.saturating_add(elapsed.saturating_mul(per_minute)) < full
            });
            if buckets.len() >= self.max_tracked {
                key = OVERFLOW;
            }
        }
        let bucket = buckets
            .entry(key.to_owned())
            .or_insert(Bucket { scaled: full, at: now });
        self.refill(bucket, now);
        if bucket.scaled >= MINUTE_MS {
            bucket.scaled -= MINUTE_MS;
            return Ok(());
        }
        // Time until the bucket holds one token, rounded up to seconds.
        let missing_ms = MINUTE_MS.saturating_sub(bucket.scaled).div_ceil(self.per_minute);
        drop(buckets);
        // The metric first: `/metrics` raises it to `refused` when behind,
        // so it must never be behind.
        self.counter.inc();
        self.refused.fetch_add(1, Ordering::Relaxed);
        Err(missing_ms.div_ceil(1000).max(1))
    }

    /// Requesters tracked now.
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The answer to a rate-limited request: 429 with `Retry-After` (seconds)
/// and a detail naming what was limited (`what`: "registrations").
pub(crate) fn too_many(what: &str, retry_after: u64) -> Response {
    let mut response = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        format!("Too many {what}; retry after {retry_after} s"),
    )
    .into_response();
    if let Ok(value) = HeaderValue::from_str(&retry_after.to_string()) {
        response.headers_mut().insert(RETRY_AFTER, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_refills_and_reports_retry_after() {
        let counter = Counter::default();
        let limiter = RateLimiter::new(3, 10, counter.clone());
        let t = Timestamp(1_000);
        for _ in 0..3 {
            assert_eq!(limiter.take("a", t), Ok(()));
        }
        assert_eq!(limiter.take("a", t), Err(20));
        assert_eq!(limiter.take("b", t), Ok(()));
        // One token every 20 s.
        assert_eq!(limiter.take("a", t.plus_ms(19_999)), Err(1));
        assert_eq!(limiter.take("a", t.plus_ms(20_000)), Ok(()));
        assert_eq!(limiter.refused.load(Ordering::Relaxed), 2);
        assert_eq!(counter.get(), 2);
    }

    #[test]
    fn tracking_is_bounded() {
        let limiter = RateLimiter::new(1, 2, Counter::default());
        let t = Timestamp(0);
        assert_eq!(limiter.take("a", t), Ok(()));
        assert_eq!(limiter.take("b", t), Ok(()));
        // Past the limit, newcomers share one bucket.
        assert_eq!(limiter.take("c", t), Ok(()));
        assert!(limiter.take("d", t).is_err());
        assert!(limiter.tracked() <= 3);
        assert!(limiter.take("a", t).is_err());
    }
}
