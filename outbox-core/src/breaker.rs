//! The circuit breaker (design semantics): CLOSED → OPEN after `failures` consecutive failures;
//! OPEN admits nothing for `open_for`; then HALF_OPEN admits one probe at a time; `successes`
//! successes → CLOSED, any failure → OPEN again.
//!
//! [`Breaker`] is the pure state machine. [`store`] keeps it in PostgreSQL so that every instance
//! of a service shares one breaker per endpoint (or per channel). [`BreakerView`] is how every
//! admin API shows one, so the consumer's and the notifier's breaker JSON agree.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::duration::chrono_duration;

/// The breaker's state, spelled as the admin API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "CLOSED",
            BreakerState::Open => "OPEN",
            BreakerState::HalfOpen => "HALF_OPEN",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "CLOSED" => Some(BreakerState::Closed),
            "OPEN" => Some(BreakerState::Open),
            "HALF_OPEN" => Some(BreakerState::HalfOpen),
            _ => None,
        }
    }

    /// Every state, for 0/1 gauges labelled by state.
    pub const ALL: [BreakerState; 3] = [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
    ];

    /// The metric label (`closed`, `open`, `half_open`).
    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// The thresholds (`BREAKER_FAILURES`, `BREAKER_OPEN_FOR`, `BREAKER_SUCCESSES`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerPolicy {
    pub failures_to_open: u32,
    pub open_for: Duration,
    pub successes_to_close: u32,
    /// How long one HALF_OPEN probe may take before another is let through (a crashed prober
    /// must not hold the breaker half-open forever).
    pub probe_timeout: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failures_to_open: 5,
            open_for: Duration::from_secs(60),
            successes_to_close: 2,
            probe_timeout: Duration::from_secs(30),
        }
    }
}

/// One breaker's state and counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Breaker {
    pub state: BreakerState,
    /// Consecutive failures (CLOSED), reset by a success.
    pub failure_count: u32,
    /// Successful probes so far (HALF_OPEN).
    pub success_count: u32,
    /// When it last opened.
    pub opened_at: Option<DateTime<Utc>>,
    /// While a HALF_OPEN probe is in flight: when its slot frees up again.
    pub probe_until: Option<DateTime<Utc>>,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: BreakerState::Closed,
            failure_count: 0,
            success_count: 0,
            opened_at: None,
            probe_until: None,
        }
    }
}

/// Whether a call may go through now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// CLOSED: go ahead.
    Allowed,
    /// HALF_OPEN: go ahead as the one probe; report its outcome.
    Probe,
    /// OPEN, or a probe is already in flight: wait until this time and ask again.
    Rejected { retry_at: DateTime<Utc> },
}

impl Breaker {
    /// While OPEN: the instant a probe may go through, `opened_at + open_for` (the one place
    /// that sum is made). None in any other state.
    pub fn probe_at(&self, open_for: Duration) -> Option<DateTime<Utc>> {
        match self.state {
            BreakerState::Open => self.opened_at.map(|at| at + chrono_duration(open_for)),
            _ => None,
        }
    }

    /// Asks to make a call at `now`, moving OPEN → HALF_OPEN when the cool-down has passed.
    pub fn admit(&mut self, policy: &BreakerPolicy, now: DateTime<Utc>) -> Admission {
        if self.state == BreakerState::Open {
            let reopen = self
                .probe_at(policy.open_for)
                .unwrap_or_else(|| now + chrono_duration(policy.open_for));
            if now < reopen {
                return Admission::Rejected { retry_at: reopen };
            }
            self.state = BreakerState::HalfOpen;
            self.success_count = 0;
            self.probe_until = None;
        }
        match self.state {
            BreakerState::Closed => Admission::Allowed,
            _ => match self.probe_until {
                Some(until) if now < until => Admission::Rejected { retry_at: until },
                _ => {
                    self.probe_until = Some(now + chrono_duration(policy.probe_timeout));
                    Admission::Probe
                }
            },
        }
    }

    /// Records a successful call.
    pub fn on_success(&mut self, policy: &BreakerPolicy) {
        match self.state {
            BreakerState::Closed => self.failure_count = 0,
            BreakerState::HalfOpen => {
                self.success_count += 1;
                self.probe_until = None;
                if self.success_count >= policy.successes_to_close {
                    *self = Breaker::default();
                }
            }
            // A call admitted before the breaker opened elsewhere: it does not close it.
            BreakerState::Open => {}
        }
    }

    /// Records a failed call.
    pub fn on_failure(&mut self, policy: &BreakerPolicy, now: DateTime<Utc>) {
        match self.state {
            BreakerState::Closed => {
                self.failure_count += 1;
                if self.failure_count >= policy.failures_to_open {
                    self.open(now);
                }
            }
            BreakerState::HalfOpen => self.open(now),
            BreakerState::Open => {}
        }
    }

    /// Records a call that said nothing about the callee (it could not even be made): nothing
    /// changes, except that a HALF_OPEN probe slot it held is free again, so the next call can
    /// probe at once instead of after the probe timeout.
    pub fn on_no_verdict(&mut self) {
        if self.state == BreakerState::HalfOpen {
            self.probe_until = None;
        }
    }

    fn open(&mut self, now: DateTime<Utc>) {
        self.state = BreakerState::Open;
        self.opened_at = Some(now);
        self.success_count = 0;
        self.probe_until = None;
    }
}

/// One breaker as every admin API shows it (the consumer's per endpoint, the notifier's per
/// channel, each beside its own name field, with `#[serde(flatten)]`):
///
/// ```json
/// {"state": "OPEN", "failure_count": 5, "success_count": 0,
///  "opened_at": "2026-01-01T00:00:00Z", "probe_at": "2026-01-01T00:01:00Z",
///  "probe_until": null, "updated_at": "2026-01-01T00:00:00Z"}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BreakerView {
    /// State and counters, as stored.
    #[serde(flatten)]
    pub breaker: Breaker,
    /// While OPEN: when a probe may go through (`opened_at` + `BREAKER_OPEN_FOR`); null otherwise.
    pub probe_at: Option<DateTime<Utc>>,
    /// When it was last written; null for a breaker never written (CLOSED with zero counts).
    pub updated_at: Option<DateTime<Utc>>,
}

impl BreakerView {
    /// The view of `breaker` under a policy that keeps it open for `open_for`.
    pub fn new(breaker: &Breaker, open_for: Duration, updated_at: Option<DateTime<Utc>>) -> Self {
        BreakerView {
            breaker: breaker.clone(),
            probe_at: breaker.probe_at(open_for),
            updated_at,
        }
    }

    /// The view of a stored breaker, or of one never written (`None`: CLOSED, zero counts).
    pub fn of_stored(stored: Option<&store::StoredBreaker>, open_for: Duration) -> Self {
        match stored {
            Some(stored) => Self::new(&stored.breaker, open_for, Some(stored.updated_at)),
            None => Self::new(&Breaker::default(), open_for, None),
        }
    }
}

pub mod store {
    //! Breakers in the `circuit_breakers` table, keyed by (scope, name). Every change happens in a
    //! transaction holding the row lock, so instances never overwrite each other's counts.

    use super::*;
    use deadpool_postgres::GenericClient;
    use std::collections::HashMap;
    use tokio_postgres::Row;

    /// One breaker as stored.
    #[derive(Debug, Clone, Serialize)]
    pub struct StoredBreaker {
        pub name: String,
        #[serde(flatten)]
        pub breaker: Breaker,
        pub updated_at: DateTime<Utc>,
    }

    /// A row naming `name, state, failure_count, success_count, opened_at, probe_until,
    /// updated_at` (the columns of `circuit_breakers`).
    pub fn from_row(row: &Row) -> StoredBreaker {
        let state: String = row.get("state");
        StoredBreaker {
            name: row.get("name"),
            breaker: Breaker {
                state: BreakerState::parse(&state).unwrap_or(BreakerState::Closed),
                failure_count: row.get::<_, i32>("failure_count").max(0) as u32,
                success_count: row.get::<_, i32>("success_count").max(0) as u32,
                opened_at: row.get("opened_at"),
                probe_until: row.get("probe_until"),
            },
            updated_at: row.get("updated_at"),
        }
    }

    const COLUMNS: &str =
        "name, state, failure_count, success_count, opened_at, probe_until, updated_at";

    /// Every breaker of a scope, by name.
    pub async fn list(
        db: &impl GenericClient,
        scope: &str,
    ) -> Result<Vec<StoredBreaker>, tokio_postgres::Error> {
        let sql = format!("select {COLUMNS} from circuit_breakers where scope = $1 order by name");
        Ok(db
            .query(&sql, &[&scope])
            .await?
            .iter()
            .map(from_row)
            .collect())
    }

    /// One breaker; a breaker never written is CLOSED with zero counts.
    pub async fn get(
        db: &impl GenericClient,
        scope: &str,
        name: &str,
    ) -> Result<Breaker, tokio_postgres::Error> {
        let sql = format!("select {COLUMNS} from circuit_breakers where scope = $1 and name = $2");
        Ok(db
            .query_opt(&sql, &[&scope, &name])
            .await?
            .map(|row| from_row(&row).breaker)
            .unwrap_or_default())
    }

    /// The stored breakers of `names` in one query, by name; names never written are absent
    /// (CLOSED with zero counts).
    pub async fn get_many(
        db: &impl GenericClient,
        scope: &str,
        names: &[&str],
    ) -> Result<HashMap<String, Breaker>, tokio_postgres::Error> {
        let sql =
            format!("select {COLUMNS} from circuit_breakers where scope = $1 and name = any($2)");
        // Prepared once per connection: every batch a dispatcher sends reads it first, so its
        // parse round trip was on the way of every webhook.
        let statement = db.prepare_cached(&sql).await?;
        Ok(db
            .query(&statement, &[&scope, &names])
            .await?
            .iter()
            .map(|row| {
                let stored = from_row(row);
                (stored.name, stored.breaker)
            })
            .collect())
    }

    /// Loads the breaker under a row lock, applies `change`, and writes it back, in one transaction.
    pub async fn update<T>(
        client: &mut deadpool_postgres::Object,
        scope: &str,
        name: &str,
        change: impl FnOnce(&mut Breaker) -> T,
    ) -> Result<(T, Breaker), tokio_postgres::Error> {
        let tx = client.transaction().await?;
        tx.execute(
            "insert into circuit_breakers (scope, name) values ($1, $2) on conflict do nothing",
            &[&scope, &name],
        )
        .await?;
        let sql = format!(
            "select {COLUMNS} from circuit_breakers where scope = $1 and name = $2 for update"
        );
        let row = tx.query_one(&sql, &[&scope, &name]).await?;
        let mut breaker = from_row(&row).breaker;
        let before = breaker.clone();
        let result = change(&mut breaker);
        if breaker != before {
            tx.execute(
                "update circuit_breakers set state = $3, failure_count = $4, success_count = $5,
                        opened_at = $6, probe_until = $7, updated_at = now()
                  where scope = $1 and name = $2",
                &[
                    &scope,
                    &name,
                    &breaker.state.as_str(),
                    &(breaker.failure_count as i32),
                    &(breaker.success_count as i32),
                    &breaker.opened_at,
                    &breaker.probe_until,
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok((result, breaker))
    }

    /// Puts a breaker back to CLOSED with zero counts.
    pub async fn reset(
        db: &impl GenericClient,
        scope: &str,
        name: &str,
    ) -> Result<(), tokio_postgres::Error> {
        db.execute(
            "insert into circuit_breakers (scope, name) values ($1, $2)
             on conflict (scope, name) do update set state = 'CLOSED', failure_count = 0,
                 success_count = 0, opened_at = null, probe_until = null, updated_at = now()",
            &[&scope, &name],
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            failures_to_open: 5,
            open_for: Duration::from_secs(60),
            successes_to_close: 2,
            probe_timeout: Duration::from_secs(10),
        }
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    /// A breaker opened at 0 by five failures, after its first probe was admitted at 60.
    fn probing(p: &BreakerPolicy) -> Breaker {
        let mut b = Breaker::default();
        for _ in 0..p.failures_to_open {
            b.on_failure(p, at(0));
        }
        assert_eq!(b.admit(p, at(60)), Admission::Probe);
        b
    }

    #[test]
    fn opens_after_five_consecutive_failures() {
        let p = policy();
        let mut b = Breaker::default();
        for _ in 0..4 {
            assert_eq!(b.admit(&p, at(0)), Admission::Allowed);
            b.on_failure(&p, at(0));
        }
        b.on_success(&p);
        assert_eq!(b.failure_count, 0, "a success resets the consecutive count");
        for _ in 0..5 {
            b.on_failure(&p, at(1));
        }
        assert_eq!(b.state, BreakerState::Open);
        assert_eq!(
            b.admit(&p, at(30)),
            Admission::Rejected { retry_at: at(61) }
        );
    }

    #[test]
    fn half_open_lets_one_probe_and_closes_after_two_successes() {
        let p = policy();
        let mut b = probing(&p);
        assert_eq!(b.state, BreakerState::HalfOpen);
        assert_eq!(
            b.admit(&p, at(61)),
            Admission::Rejected { retry_at: at(70) },
            "one probe at a time"
        );
        b.on_success(&p);
        assert_eq!(b.state, BreakerState::HalfOpen);
        assert_eq!(b.admit(&p, at(62)), Admission::Probe);
        b.on_success(&p);
        assert_eq!(b, Breaker::default());
    }

    #[test]
    fn a_failed_probe_opens_again() {
        let p = policy();
        let mut b = probing(&p);
        b.on_failure(&p, at(61));
        assert_eq!(b.state, BreakerState::Open);
        assert_eq!(b.opened_at, Some(at(61)));
        assert!(matches!(b.admit(&p, at(100)), Admission::Rejected { .. }));
    }

    #[test]
    fn a_probe_without_verdict_frees_its_slot_and_changes_nothing_else() {
        let p = policy();
        let mut b = Breaker::default();
        b.on_no_verdict();
        assert_eq!(b, Breaker::default(), "CLOSED stays as it is");
        for _ in 0..p.failures_to_open {
            b.on_failure(&p, at(0));
        }
        assert_eq!(b.admit(&p, at(60)), Admission::Probe);
        b.on_no_verdict();
        assert_eq!(b.state, BreakerState::HalfOpen);
        assert_eq!(
            b.admit(&p, at(61)),
            Admission::Probe,
            "the next call probes at once"
        );
    }

    #[test]
    fn the_view_names_the_probe_instant_only_while_open() {
        let p = policy();
        let mut b = Breaker::default();
        let closed = BreakerView::new(&b, p.open_for, None);
        assert_eq!(closed.breaker, Breaker::default());
        assert_eq!(closed.probe_at, None);
        for _ in 0..5 {
            b.on_failure(&p, at(0));
        }
        let open = BreakerView::new(&b, p.open_for, Some(at(0)));
        assert_eq!(open.probe_at, Some(at(60)));
        assert_eq!(
            b.admit(&p, at(59)),
            Admission::Rejected { retry_at: at(60) },
            "admission waits for the instant the view names"
        );
        assert_eq!(b.admit(&p, at(60)), Admission::Probe);
        let half_open = BreakerView::new(&b, p.open_for, Some(at(60)));
        assert_eq!(half_open.probe_at, None);
        assert_eq!(half_open.breaker.probe_until, Some(at(70)));

        let json = serde_json::to_value(&open).unwrap();
        let mut fields: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            [
                "failure_count",
                "opened_at",
                "probe_at",
                "probe_until",
                "state",
                "success_count",
                "updated_at"
            ]
        );
        assert_eq!(json["state"], "OPEN");
    }

    #[test]
    fn a_lost_probe_frees_its_slot_after_the_probe_timeout() {
        let p = policy();
        let mut b = probing(&p);
        assert_eq!(b.admit(&p, at(70)), Admission::Probe);
    }
}
