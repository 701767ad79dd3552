//! Per-principal rate limits: a token bucket per principal per worker.
//!
//! The installed table gives each principal a limit (the smallest among its groups': `per_second`
//! sustained, `burst` at once). The budget is split evenly over the workers: each worker allows a
//! principal `per_second / workers` requests per second (rounded up) with a bucket of
//! `burst / workers` (rounded up, at least one). Agents spread their requests over their
//! connections to every worker (lanes), so the gateway-wide rate is the configured one to within
//! the rounding: at most `workers - 1` requests per second and `workers - 1` of burst above it. A
//! principal whose requests all reach one worker gets a `1 / workers` share.
//!
//! Tokens are counted in thousandths so that refilling stays exact in integers.

use std::time::Instant;

use dmsc_protocol::table::Limit;

/// One principal's bucket on one worker.
#[derive(Debug, Clone)]
pub(super) struct Bucket {
    /// Thousandths of a token added per millisecond (= requests per second).
    per_second: u64,
    /// Capacity, in thousandths of a token.
    capacity: u64,
    /// Tokens held, in thousandths.
    held: u64,
    /// When `held` was last brought up to date.
    updated: Instant,
}

impl Bucket {
    /// A full bucket for this worker's share of `limit`.
    pub(super) fn new(limit: Limit, workers: usize, now: Instant) -> Self {
        let workers = workers.max(1) as u64;
        let per_second = u64::from(limit.per_second).div_ceil(workers).max(1);
        let burst = u64::from(limit.burst).div_ceil(workers).max(1);
        Self {
            per_second,
            capacity: burst * 1000,
            held: burst * 1000,
            updated: now,
        }
    }

    /// This bucket under a new table: the new `limit`'s rate and capacity, keeping the tokens
    /// it holds (at most the new capacity), so installing a table never refills a bucket.
    pub(super) fn resized(mut self, limit: Limit, workers: usize, now: Instant) -> Self {
        self.refill(now);
        let mut next = Self::new(limit, workers, now);
        next.held = self.held.min(next.capacity);
        next
    }

    fn refill(&mut self, now: Instant) {
        let elapsed_us = now.saturating_duration_since(self.updated).as_micros();
        let added =
            (elapsed_us.min(u128::from(u64::MAX)) as u64).saturating_mul(self.per_second) / 1000;
        if added > 0 {
            self.held = (self.held.saturating_add(added)).min(self.capacity);
            self.updated = now;
        }
    }

    /// Takes one token at `now`; false when none is left.
    pub(super) fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.held >= 1000 {
            self.held -= 1000;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        // 10 per second and a burst of 4 over 2 workers: 5 per second, 2 at once, per worker.
        let mut b = Bucket::new(
            Limit {
                per_second: 10,
                burst: 4,
            },
            2,
            t0,
        );
        assert!(b.take(t0));
        assert!(b.take(t0));
        assert!(!b.take(t0));
        // One token every 200 ms.
        assert!(!b.take(t0 + Duration::from_millis(150)));
        assert!(b.take(t0 + Duration::from_millis(200)));
        assert!(!b.take(t0 + Duration::from_millis(250)));
        // Over a second, 5 more, never more than the burst at once.
        let later = t0 + Duration::from_secs(10);
        assert!(b.take(later));
        assert!(b.take(later));
        assert!(!b.take(later));
    }

    #[test]
    fn a_new_table_keeps_what_a_bucket_holds() {
        let t0 = Instant::now();
        let limit = Limit {
            per_second: 1,
            burst: 2,
        };
        let mut b = Bucket::new(limit, 1, t0);
        assert!(b.take(t0));
        assert!(b.take(t0));
        // Installing a table (even the same limit) every 100 ms never refills the bucket.
        for i in 1..5 {
            b = b.resized(limit, 1, t0 + Duration::from_millis(100 * i));
            assert!(!b.take(t0 + Duration::from_millis(100 * i)));
        }
        // A smaller capacity cuts what is held; time still refills at the new rate.
        let mut b = Bucket::new(limit, 1, t0).resized(
            Limit {
                per_second: 1,
                burst: 1,
            },
            1,
            t0,
        );
        assert!(b.take(t0));
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_secs(1)));
    }
}
