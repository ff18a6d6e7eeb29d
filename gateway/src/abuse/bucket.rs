//! Token buckets: `burst` tokens, refilled at `rate` per second; a request
//! takes one. A rate of 0 (or less) disables the bucket.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(burst: u32, now: Instant) -> Self {
        Self { tokens: f64::from(burst.max(1)), last: now }
    }

    /// Takes one token, or says how long until one is available.
    pub fn take(&mut self, now: Instant, rate: f64, burst: u32) -> Result<(), Duration> {
        if rate <= 0.0 {
            return Ok(());
        }
        let capacity = f64::from(burst.max(1));
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(((1.0 - self.tokens) / rate).min(3600.0)))
        }
    }

    /// Whether it has refilled completely (and so is the same as a new one).
    fn is_full(&self, now: Instant, rate: f64, burst: u32) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * rate >= f64::from(burst.max(1))
    }
}

/// Token buckets keyed by a name (the caller's identity), at most
/// `max_keys` of them. When a new name finds the map full, buckets that
/// have refilled are dropped (they are the same as new ones); if every
/// bucket is still spending, the least recently used eighth is dropped
/// (those callers start again with a full bucket), so the map stays
/// bounded and the cost of the scan is shared by the names that follow.
#[derive(Debug)]
pub struct KeyedBuckets {
    rate: f64,
    burst: u32,
    max_keys: usize,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

impl KeyedBuckets {
    /// Buckets of `burst` tokens refilled at `rate` per second.
    pub fn new(rate: f64, burst: u32, max_keys: usize) -> Self {
        Self { rate, burst, max_keys: max_keys.max(1), buckets: Mutex::default() }
    }

    /// Takes a token from `key`'s bucket, or says how long to wait.
    pub fn take(&self, key: &str) -> Result<(), Duration> {
        self.take_at(key, Instant::now())
    }

    fn take_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = buckets.get_mut(key) {
            return bucket.take(now, self.rate, self.burst);
        }
        if buckets.len() >= self.max_keys {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| !b.is_full(now, rate, burst));
        }
        if buckets.len() >= self.max_keys {
            forget_least_recent(&mut buckets, (self.max_keys / 8).max(1));
        }
        let mut bucket = TokenBucket::full(self.burst, now);
        let taken = bucket.take(now, self.rate, self.burst);
        buckets.insert(key.to_owned(), bucket);
        taken
    }

    /// How many buckets are held.
    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drops the `count` buckets used longest ago.
fn forget_least_recent(buckets: &mut HashMap<String, TokenBucket>, count: usize) {
    let mut by_age: Vec<(Instant, &String)> = buckets.iter().map(|(k, b)| (b.last, k)).collect();
    let count = count.min(by_age.len());
    if count == 0 {
        return;
    }
    by_age.select_nth_unstable_by_key(count - 1, |(last, _)| *last);
    let oldest: Vec<String> = by_age.into_iter().take(count).map(|(_, k)| k.clone()).collect();
    for key in oldest {
        buckets.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let start = Instant::now();
        let mut b = TokenBucket::full(3, start);
        for _ in 0..3 {
            assert!(b.take(start, 2.0, 3).is_ok());
        }
        let wait = b.take(start, 2.0, 3).unwrap_err();
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(b.take(start + Duration::from_millis(500), 2.0, 3).is_ok());
        // Refill never exceeds the burst.
        let later = start + Duration::from_secs(100);
        for _ in 0..3 {
            assert!(b.take(later, 2.0, 3).is_ok());
        }
        assert!(b.take(later, 2.0, 3).is_err());
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let now = Instant::now();
        let mut b = TokenBucket::full(1, now);
        for _ in 0..100 {
            assert!(b.take(now, 0.0, 1).is_ok());
        }
        let keyed = KeyedBuckets::new(0.0, 1, 10);
        assert!((0..100).all(|_| keyed.take("a").is_ok()));
        assert!(keyed.is_empty());
    }

    #[test]
    fn keys_are_independent_and_bounded() {
        let now = Instant::now();
        let keyed = KeyedBuckets::new(1.0, 2, 4);
        assert!(keyed.take_at("a", now).is_ok());
        assert!(keyed.take_at("a", now).is_ok());
        assert!(keyed.take_at("a", now).is_err());
        assert!(keyed.take_at("b", now).is_ok(), "another key has its own bucket");
        for k in ["c", "d", "e", "f"] {
            assert!(keyed.take_at(k, now + Duration::from_secs(10)).is_ok());
        }
        // Refilled buckets were dropped to make room.
        assert!(keyed.len() <= 5, "{}", keyed.len());
    }

    #[test]
    fn the_map_stays_bounded_when_every_bucket_is_spending() {
        let start = Instant::now();
        // A slow refill: nobody's bucket is full again during the test.
        let keyed = KeyedBuckets::new(0.001, 2, 16);
        for i in 0..1_000u64 {
            let now = start + Duration::from_millis(i);
            assert!(keyed.take_at(&format!("id-{i}"), now).is_ok(), "a new name gets its burst");
            assert!(keyed.len() <= 16, "{} buckets after {i}", keyed.len());
        }
        // The most recent are kept (and still limited); the oldest went.
        let now = start + Duration::from_millis(1_000);
        assert!(keyed.take_at("id-999", now).is_ok());
        assert!(keyed.take_at("id-999", now).is_err());
        let buckets = keyed.buckets.lock().unwrap();
        assert!(!buckets.contains_key("id-0"));
        assert!(buckets.contains_key("id-998"));
    }
}
