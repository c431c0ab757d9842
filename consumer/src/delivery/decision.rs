//! What one attempt leads to: from the facts of the attempt (the receiver's status and the headers
//! that matter, or why there was no answer; the attempt's number; the retry schedule; now) to the
//! delivery's next step and what the endpoint's breaker learns. Pure: no clock, no randomness
//! (jitter is passed in), no I/O, so the whole outcome table is a unit test.

use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::schedule::RetrySchedule;
use reqwest::header::HeaderMap;

/// Outcome labels of `consumer_deliveries_total`: each attempt counts once.
pub mod outcome {
    /// 2xx within the timeout.
    pub const SUCCESS: &str = "success";
    /// Failed; another attempt is scheduled.
    pub const FAILURE: &str = "failure";
    /// Failed and no attempt is left: the delivery is dead.
    pub const DEAD: &str = "dead";
    /// The receiver answered `webhook-delivery: abort-message`: dead at once.
    pub const ABORTED: &str = "aborted";
    /// The request could not be built (the delivery's fault, not the endpoint's): dead at once.
    pub const UNSENDABLE: &str = "unsendable";
}

/// The longest `Retry-After` honoured: a receiver cannot park a delivery for longer.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(6 * 3600);

/// How an attempt ended, as far as the decision cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The receiver answered with `status`. `retry_after` is its `Retry-After` on a 429 or 503;
    /// `abort` is `webhook-delivery: abort-message`.
    Answered {
        status: u16,
        retry_after: Option<Duration>,
        abort: bool,
    },
    /// No answer: the connection failed, timed out, broke off, or the address guard refused it.
    NoAnswer,
    /// The request could not be built (e.g. a stored event id that is no valid header value):
    /// another attempt would build the same request.
    Unsendable,
}

impl Reply {
    /// Reads the answer's status and the headers the decision uses.
    pub fn answered(status: u16, headers: &HeaderMap, now: DateTime<Utc>) -> Reply {
        let abort = headers
            .get("webhook-delivery")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("abort-message"));
        let retry_after = matches!(status, 429 | 503)
            .then(|| headers.get(reqwest::header::RETRY_AFTER))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, now));
        Reply::Answered {
            status,
            retry_after,
            abort,
        }
    }
}

/// What the endpoint's breaker learns from one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Success,
    Failure,
    /// The delivery's fault, not the endpoint's: the breaker learns nothing, and a probe slot the
    /// attempt held is given back so that the next delivery can probe.
    Unsendable,
}

/// The delivery's next step after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Succeeded,
    RetryAt(DateTime<Utc>),
    Dead,
}

/// The decision: the next step, the outcome label of `consumer_deliveries_total`, and the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub next: Next,
    pub outcome: &'static str,
    pub verdict: Verdict,
}

/// Decides what attempt number `attempt` (1 for the first) that ended in `reply` leads to.
/// `jitter` spreads a scheduled delay (the dispatcher passes `with_jitter`; tests pass identity).
pub fn decide(
    attempt: u32,
    reply: &Reply,
    schedule: &RetrySchedule,
    jitter: impl FnOnce(Duration) -> Duration,
    now: DateTime<Utc>,
) -> Decision {
    let decision = |next, outcome, verdict| Decision {
        next,
        outcome,
        verdict,
    };
    let retry_after = match *reply {
        Reply::Answered { status, .. } if (200..300).contains(&status) => {
            return decision(Next::Succeeded, outcome::SUCCESS, Verdict::Success)
        }
        // The receiver is up and asks us to stop: not the endpoint's failure.
        Reply::Answered { abort: true, .. } => {
            return decision(Next::Dead, outcome::ABORTED, Verdict::Success)
        }
        // Nothing reached the endpoint, and another attempt would build the same request.
        Reply::Unsendable => return decision(Next::Dead, outcome::UNSENDABLE, Verdict::Unsendable),
        Reply::Answered { retry_after, .. } => retry_after,
        Reply::NoAnswer => None,
    };
    match schedule.delay_after(attempt) {
        // A receiver that says when to come back (429/503 with Retry-After) is not retried
        // sooner; the attempt still counts.
        Some(delay) => {
            let wait = jitter(delay).max(retry_after.unwrap_or_default());
            decision(
                Next::RetryAt(
                    now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX),
                ),
                outcome::FAILURE,
                Verdict::Failure,
            )
        }
        None => decision(Next::Dead, outcome::DEAD, Verdict::Failure),
    }
}

/// A `Retry-After` value, in seconds or as an HTTP date, as a wait from `now` (at most
/// [`MAX_RETRY_AFTER`]).
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = DateTime::parse_from_rfc2822(value).ok()?;
            (at.with_timezone(&Utc) - now).to_std().unwrap_or_default()
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    fn secs(n: i64) -> DateTime<Utc> {
        now() + chrono::Duration::seconds(n)
    }

    /// The outcome table: every kind of answer, at the first and at the last attempt of a
    /// 10 s, 60 s schedule (two retries: attempt 3 is the last).
    #[test]
    fn every_kind_of_answer_leads_to_its_next_step() {
        let schedule: RetrySchedule = "0s,10s,60s".parse().unwrap();
        let answered = |status, h: &[(&'static str, &'static str)]| {
            Reply::answered(status, &headers(h), now())
        };
        use Next::*;
        use Verdict::*;
        let table: Vec<(&str, u32, Reply, Next, &str, Verdict)> = vec![
            (
                "200",
                1,
                answered(200, &[]),
                Succeeded,
                outcome::SUCCESS,
                Success,
            ),
            (
                "204 on the last",
                3,
                answered(204, &[]),
                Succeeded,
                outcome::SUCCESS,
                Success,
            ),
            (
                "2xx ignores abort",
                1,
                answered(200, &[("webhook-delivery", "abort-message")]),
                Succeeded,
                outcome::SUCCESS,
                Success,
            ),
            (
                "500 retried",
                1,
                answered(500, &[]),
                RetryAt(secs(10)),
                outcome::FAILURE,
                Failure,
            ),
            (
                "second failure",
                2,
                answered(502, &[]),
                RetryAt(secs(60)),
                outcome::FAILURE,
                Failure,
            ),
            (
                "last failure is dead",
                3,
                answered(500, &[]),
                Dead,
                outcome::DEAD,
                Failure,
            ),
            (
                "4xx retried too",
                1,
                answered(404, &[]),
                RetryAt(secs(10)),
                outcome::FAILURE,
                Failure,
            ),
            (
                "410 retried too",
                1,
                answered(410, &[]),
                RetryAt(secs(10)),
                outcome::FAILURE,
                Failure,
            ),
            (
                "429 waits its Retry-After",
                1,
                answered(429, &[("retry-after", "120")]),
                RetryAt(secs(120)),
                outcome::FAILURE,
                Failure,
            ),
            (
                "503 Retry-After as a date",
                1,
                answered(503, &[("retry-after", "Mon, 23 Nov 2026 10:05:00 GMT")]),
                RetryAt(secs(300)),
                outcome::FAILURE,
                Failure,
            ),
            (
                "a shorter Retry-After never hurries",
                1,
                answered(429, &[("retry-after", "1")]),
                RetryAt(secs(10)),
                outcome::FAILURE,
                Failure,
            ),
            (
                "Retry-After only on 429/503",
                1,
                answered(500, &[("retry-after", "120")]),
                RetryAt(secs(10)),
                outcome::FAILURE,
                Failure,
            ),
            (
                "Retry-After on the last attempt",
                3,
                answered(429, &[("retry-after", "120")]),
                Dead,
                outcome::DEAD,
                Failure,
            ),
            (
                "garbage Retry-After ignored",
                1,
                answered(503, &[("retry-after", "soon")]),
                RetryAt(secs(10)),
                outcome::FAILURE,
                Failure,
            ),
            (
                "abort-message",
                1,
                answered(400, &[("webhook-delivery", " Abort-Message ")]),
                Dead,
                outcome::ABORTED,
                Success,
            ),
            (
                "abort-message on a 500",
                1,
                answered(500, &[("webhook-delivery", "abort-message")]),
                Dead,
                outcome::ABORTED,
                Success,
            ),
            (
                "other webhook-delivery value",
                1,
                answered(500, &[("webhook-delivery", "later")]),
                RetryAt(secs(10)),
                outcome::FAILURE,
                Failure,
            ),
            (
                "timeout / no answer",
                1,
                Reply::NoAnswer,
                RetryAt(secs(10)),
                outcome::FAILURE,
                Failure,
            ),
            (
                "no answer on the last",
                3,
                Reply::NoAnswer,
                Dead,
                outcome::DEAD,
                Failure,
            ),
            (
                "unsendable",
                1,
                Reply::Unsendable,
                Dead,
                outcome::UNSENDABLE,
                Unsendable,
            ),
        ];
        for (name, attempt, reply, next, label, verdict) in table {
            let got = decide(attempt, &reply, &schedule, |d| d, now());
            assert_eq!(
                got,
                Decision {
                    next,
                    outcome: label,
                    verdict
                },
                "{name}"
            );
        }
    }

    #[test]
    fn jitter_applies_to_the_schedule_not_to_retry_after() {
        let schedule: RetrySchedule = "0s,10s".parse().unwrap();
        let doubled = decide(1, &Reply::NoAnswer, &schedule, |d| d * 2, now());
        assert_eq!(doubled.next, Next::RetryAt(secs(20)));
        let reply = Reply::answered(429, &headers(&[("retry-after", "100")]), now());
        let later = decide(1, &reply, &schedule, |d| d * 2, now());
        assert_eq!(later.next, Next::RetryAt(secs(100)));
    }

    #[test]
    fn retry_after_is_read_in_seconds_or_as_a_date_and_capped() {
        assert_eq!(
            parse_retry_after(" 120 ", now()),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Mon, 23 Nov 2026 10:00:30 GMT", now()),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Mon, 23 Nov 2026 09:00:00 GMT", now()),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("999999", now()), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now()), None);
    }
}
