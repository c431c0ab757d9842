//! Durations against chrono's timestamps: a `std::time::Duration` added to a timestamp, and the
//! time left until one. Every service converts through these two, so a too-long duration or a
//! passed instant means the same everywhere.

use std::time::Duration;

/// `d` as a `chrono::Duration`, to add to a timestamp; a duration too long for chrono (which
/// holds ±292 years) becomes `chrono::Duration::MAX` rather than failing.
pub fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// How long from `now` until `at`; zero when `at` has passed.
pub fn time_until(
    at: chrono::DateTime<chrono::Utc>,
    now: chrono::DateTime<chrono::Utc>,
) -> Duration {
    (at - now).to_std().unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_convert_to_chrono_saturating_and_back_from_instants() {
        assert_eq!(
            chrono_duration(Duration::from_millis(1500)),
            chrono::Duration::milliseconds(1500)
        );
        assert_eq!(chrono_duration(Duration::MAX), chrono::Duration::MAX);
        let now = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        assert_eq!(
            time_until(now + chrono::Duration::milliseconds(250), now),
            Duration::from_millis(250)
        );
        assert_eq!(
            time_until(now - chrono::Duration::seconds(1), now),
            Duration::ZERO
        );
    }
}
