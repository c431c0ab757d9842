//! The reconnect backoff, one policy for every loop that waits for PostgreSQL or Kafka to come
//! back: 100 ms, doubling, at most 2 s between attempts, for as long as it takes, no jitter.
//!
//! The cap is the smallest any service used before this was shared, so no loop notices a
//! recovered dependency later than it used to; an attempt every 2 s during an outage costs
//! nothing worth saving. Built on [`backon`]: [`policy`] for `Retryable::retry`, [`Backoff`] for
//! hand-written loops:
//!
//! ```
//! # async fn connect() -> Result<(), String> { Ok(()) }
//! # async fn example(shutdown: outbox_core::shutdown::CancellationToken) {
//! use outbox_core::reconnect::Backoff;
//! let mut backoff = Backoff::new();
//! while !shutdown.is_cancelled() {
//!     match connect().await {
//!         Ok(()) => backoff.reset(),
//!         Err(error) => {
//!             let delay = backoff.next_delay();
//!             tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot connect");
//!             outbox_core::shutdown::sleep_or_cancel(delay, &shutdown).await;
//!         }
//!     }
//! #   break;
//! }
//! # }
//! ```

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The first delay after a failure.
pub const MIN_DELAY: Duration = Duration::from_millis(100);
/// The longest delay between two attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(2);

/// The policy as a backon builder: [`MIN_DELAY`] doubling to [`MAX_DELAY`], never giving up.
pub fn policy() -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(MIN_DELAY)
        .with_max_delay(MAX_DELAY)
        .with_factor(2.0)
        .without_max_times()
}

/// The delays of one run of failures: [`Backoff::next_delay`] after each failure,
/// [`Backoff::reset`] after a success, so the next failure waits [`MIN_DELAY`] again.
#[derive(Debug)]
pub struct Backoff {
    delays: ExponentialBackoff,
}

impl Backoff {
    pub fn new() -> Self {
        Backoff {
            delays: policy().build(),
        }
    }

    /// How long to wait before the next attempt: [`MIN_DELAY`], then twice the previous delay,
    /// at most [`MAX_DELAY`].
    pub fn next_delay(&mut self) -> Duration {
        // The policy sets no limit on attempts, so the iterator never ends. backon multiplies in
        // f32 (200.000003 ms); whole milliseconds read better in logs and tests.
        whole_millis(self.delays.next().unwrap_or(MAX_DELAY))
    }

    /// Starts over: the next failure waits [`MIN_DELAY`].
    pub fn reset(&mut self) {
        *self = Backoff::new();
    }
}

fn whole_millis(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubles_from_the_minimum_to_the_cap_and_stays_there() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert_eq!(
            delays,
            [
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(2000),
                ms(2000),
                ms(2000)
            ]
        );
        for _ in 0..1000 {
            assert_eq!(
                backoff.next_delay(),
                MAX_DELAY,
                "never gives up, never exceeds"
            );
        }
    }

    #[test]
    fn reset_starts_over_at_the_minimum() {
        let mut backoff = Backoff::new();
        for _ in 0..5 {
            backoff.next_delay();
        }
        backoff.reset();
        assert_eq!(backoff.next_delay(), MIN_DELAY);
        assert_eq!(backoff.next_delay(), ms(200));
    }

    #[test]
    fn the_backon_builder_gives_the_same_delays() {
        let mut backoff = Backoff::new();
        for from_builder in policy().build().take(10) {
            assert_eq!(whole_millis(from_builder), backoff.next_delay());
        }
    }
}
