//! How much one instance sends at once: per-endpoint rate limits (token buckets) and each
//! endpoint's share of the deliveries held in memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A poisoned lock only means another delivery panicked; the data is still usable.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Each endpoint's `rate_limit_per_second`, enforced per instance.
#[derive(Default)]
pub struct RateLimits {
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

impl RateLimits {
    /// `Some(wait)` when the endpoint's rate limit (`limit` per second) allows no request now.
    pub fn check(&self, endpoint_id: &str, limit: Option<i32>) -> Option<Duration> {
        let limit = limit.filter(|&n| n > 0)? as f64;
        let mut buckets = lock(&self.buckets);
        let bucket = buckets
            .entry(endpoint_id.to_owned())
            .or_insert_with(|| TokenBucket::new(limit));
        bucket.take(limit, Instant::now())
    }
}

/// Deliveries in memory per endpoint: one endpoint may hold at most `limit`, so a hung endpoint
/// cannot take the room every other endpoint needs.
pub struct Shares {
    held: Mutex<HashMap<String, usize>>,
    limit: usize,
}

impl Shares {
    pub fn new(limit: usize) -> Self {
        Shares {
            held: Mutex::new(HashMap::new()),
            limit: limit.max(1),
        }
    }

    /// Takes as much of `group` as the endpoint's room allows; returns that and the rest.
    pub fn take<T>(&self, endpoint_id: &str, mut group: Vec<T>) -> (Vec<T>, Vec<T>) {
        let mut held = lock(&self.held);
        let taken = held.entry(endpoint_id.to_owned()).or_default();
        let room = self.limit.saturating_sub(*taken);
        let overflow = group.split_off(room.min(group.len()));
        *taken += group.len();
        (group, overflow)
    }

    pub fn give_back(&self, endpoint_id: &str, n: usize) {
        let mut held = lock(&self.held);
        if let Some(taken) = held.get_mut(endpoint_id) {
            *taken = taken.saturating_sub(n);
            if *taken == 0 {
                held.remove(endpoint_id);
            }
        }
    }
}

/// A per-endpoint token bucket: `rate` requests per second, bursts up to one second's worth.
#[derive(Debug, Clone)]
struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: f64) -> Self {
        TokenBucket {
            tokens: rate,
            last: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is available.
    fn take(&mut self, rate: f64, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate.max(1.0));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_spreads_requests() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2.0);
        bucket.last = start;
        assert_eq!(bucket.take(2.0, start), None);
        assert_eq!(bucket.take(2.0, start), None);
        let wait = bucket.take(2.0, start).expect("empty");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert_eq!(bucket.take(2.0, start + Duration::from_millis(500)), None);
    }

    #[test]
    fn an_endpoint_takes_at_most_its_share() {
        let shares = Shares::new(3);
        let (taken, rest) = shares.take("a", vec![1, 2]);
        assert_eq!((taken.len(), rest.len()), (2, 0));
        let (taken, rest) = shares.take("a", vec![3, 4]);
        assert_eq!((taken, rest), (vec![3], vec![4]));
        assert_eq!(
            shares.take("b", vec![5]).0,
            vec![5],
            "another endpoint has its own room"
        );
        shares.give_back("a", 3);
        assert_eq!(shares.take("a", vec![6, 7, 8, 9]).0.len(), 3);
    }
}
