//! Retry delays, kept as data: a durable retry is a `next_attempt_at` computed here.

use std::time::Duration;

use rand::Rng;

use crate::config::parse_duration;

/// When each attempt of a delivery happens, relative to the previous failure. The first entry is
/// the delay before attempt 1 (normally `0s`); after the last attempt fails, the delivery is dead.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySchedule {
    delays: Vec<Duration>,
}

impl RetrySchedule {
    /// The default: at once, +1 min, +5 min, +30 min, +2 h, +12 h.
    pub const DEFAULT: &'static str = "0s,1m,5m,30m,2h,12h";

    pub fn new(delays: Vec<Duration>) -> Result<Self, String> {
        if delays.is_empty() {
            return Err("a retry schedule needs at least one attempt".into());
        }
        Ok(RetrySchedule { delays })
    }

    /// How many attempts a delivery gets in all.
    pub fn max_attempts(&self) -> u32 {
        self.delays.len() as u32
    }

    /// The delay after `attempts_made` failed attempts, or `None` when none is left (dead).
    pub fn delay_after(&self, attempts_made: u32) -> Option<Duration> {
        self.delays.get(attempts_made as usize).copied()
    }
}

impl std::str::FromStr for RetrySchedule {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let delays = text
            .split(',')
            .map(parse_duration)
            .collect::<Result<Vec<_>, _>>()?;
        RetrySchedule::new(delays)
    }
}

/// Spreads a delay by ±`fraction` so that retries of many failures do not arrive together.
pub fn with_jitter(delay: Duration, fraction: f64) -> Duration {
    if delay.is_zero() || fraction <= 0.0 {
        return delay;
    }
    let factor = rand::rng().random_range((1.0 - fraction)..=(1.0 + fraction));
    delay.mul_f64(factor)
}

/// Capped exponential backoff: `base × 2^(attempts−1)`, at most `cap`, with ±20% jitter.
pub fn exponential_backoff(attempts: u32, base: Duration, cap: Duration) -> Duration {
    let exp = attempts.saturating_sub(1).min(20);
    let delay = base.saturating_mul(1u32 << exp).min(cap);
    with_jitter(delay, 0.2).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_schedule_has_six_attempts() {
        let s: RetrySchedule = RetrySchedule::DEFAULT.parse().unwrap();
        assert_eq!(s.max_attempts(), 6);
        assert_eq!(s.delay_after(0), Some(Duration::ZERO));
        assert_eq!(s.delay_after(1), Some(Duration::from_secs(60)));
        assert_eq!(s.delay_after(5), Some(Duration::from_secs(12 * 3600)));
        assert_eq!(s.delay_after(6), None);
    }

    #[test]
    fn schedule_in_milliseconds_for_tests() {
        let s: RetrySchedule = "0ms,10ms,20ms".parse().unwrap();
        assert_eq!(s.delay_after(2), Some(Duration::from_millis(20)));
        assert!("".parse::<RetrySchedule>().is_err());
        assert!("1m,soon".parse::<RetrySchedule>().is_err());
    }

    #[test]
    fn jitter_stays_within_bounds() {
        for _ in 0..1000 {
            let d = with_jitter(Duration::from_secs(100), 0.2);
            assert!(
                d >= Duration::from_secs(80) && d <= Duration::from_secs(120),
                "{d:?}"
            );
        }
        assert_eq!(with_jitter(Duration::ZERO, 0.2), Duration::ZERO);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        assert!(exponential_backoff(1, base, cap) <= Duration::from_millis(120));
        let third = exponential_backoff(3, base, cap);
        assert!(third >= Duration::from_millis(320) && third <= Duration::from_millis(480));
        assert!(exponential_backoff(40, base, cap) <= cap);
    }
}
