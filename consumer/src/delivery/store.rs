//! The delivery store: the only code that runs SQL on `deliveries` and `delivery_attempts`. Each
//! thing that happens to a delivery is a named operation here; rows become values by column name.
//!
//! The hot statements are batched (one `unnest` per batch, prepared, pipelined), and results are
//! matched by id *and* lease, so a late writer never undoes another instance's work.

use std::time::Duration;

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::{GenericClient, Row};

use super::{DeliveryState, Hold};

/// The previous secret while its rotation grace period lasts, on a row of `endpoints e`.
macro_rules! previous_secret_in_grace {
    () => {
        "case when e.previous_secret_expires_at > now() then e.previous_secret end as previous_secret"
    };
}

/// One leased delivery with everything needed to send it.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub event_id: String,
    pub endpoint_id: String,
    /// Attempts made before this one.
    pub attempts: i32,
    /// The envelope exactly as read from Kafka: the bytes that are signed and sent.
    pub body: Bytes,
    pub correlation_id: Option<String>,
    pub url: String,
    pub secret: String,
    /// The previous secret while its rotation grace period lasts.
    pub previous_secret: Option<String>,
    pub rate_limit: Option<i32>,
    /// The trace context its attempts continue (the span that recorded its event), kept with the
    /// delivery so a retry on another instance or after a restart stays in the event's trace.
    pub traceparent: Option<String>,
}

impl Claimed {
    /// A row naming `id, event_id, endpoint_id, attempts, url, secret, previous_secret,
    /// rate_limit_per_second, traceparent`, with the body and correlation id given.
    fn from_row(row: &Row, body: Bytes, correlation_id: Option<String>) -> Claimed {
        Claimed {
            id: row.get("id"),
            event_id: row.get("event_id"),
            endpoint_id: row.get("endpoint_id"),
            attempts: row.get("attempts"),
            body,
            correlation_id,
            url: row.get("url"),
            secret: row.get("secret"),
            previous_secret: row.get("previous_secret"),
            rate_limit: row.get("rate_limit_per_second"),
            traceparent: row.get("traceparent"),
        }
    }
}

/// Deliveries leased to one instance until `until`.
#[derive(Debug)]
pub struct Leased {
    pub deliveries: Vec<Claimed>,
    pub until: DateTime<Utc>,
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

// ------------------------------------------------------------------------------------ recorded

/// Consumed events in columns, one entry per event, for [`record_events`].
#[derive(Debug, Default)]
pub struct NewEvents<'a> {
    pub ids: Vec<&'a str>,
    pub types: Vec<&'a str>,
    pub topics: Vec<&'a str>,
    pub partitions: Vec<i32>,
    pub offsets: Vec<i64>,
    pub correlation: Vec<Option<&'a str>>,
    pub json: Vec<&'a str>,
    /// The trace context of the span that recorded each event (None when spans are not exported).
    pub traceparents: Vec<Option<&'a str>>,
}

/// What [`record_events`] did.
#[derive(Debug, Default)]
pub struct RecordedEvents {
    /// Events new to the inbox (the rest were already there).
    pub new_events: u64,
    /// Deliveries planned for them, leased or parked.
    pub planned: u64,
    /// The planned deliveries of enabled endpoints, when a lease was asked for.
    pub leased: Option<Leased>,
}

// Inbox rows for new event ids only, and in the same statement their deliveries (which is why
// the inbox insert lives here): one per endpoint whose filter matches ('*', the exact type, or a
// 'prefix.*'). Re-read records insert nothing. With a lease ($8 seconds) the deliveries of enabled
// endpoints are born leased to this instance, which sends them straight from memory; without one
// they wait for the dispatchers' claim. A disabled endpoint's deliveries are recorded parked and
// are released when it is enabled: the endpoint rows are read `for share`, so an enable or disable
// committing meanwhile is either seen here or waits for this transaction and then sees its rows.
// One row per planned delivery with what sending it needs (a null lease for a parked one), or a
// single row of nulls when none was planned; `new_events` counts the new events. Each delivery
// keeps its event's trace context ($9; one per event id, should a batch carry an event twice).
pub const RECORD_EVENTS: &str = concat!(
    "
    with r as (
        select * from unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[],
                             $6::text[], $7::text[], $9::text[])
               as r(id, t, topic, p, o, c, j, tp)
    ), new as (
        insert into inbox (event_id, event_type, topic, kafka_partition, kafka_offset, correlation_id, payload)
        select id, t, topic, p, o, c, j::json from r
        on conflict (event_id) do nothing
        returning event_id, event_type
    ), planned as (
        insert into deliveries (event_id, endpoint_id, leased_until, next_attempt_at, held_by, traceparent)
        select new.event_id, e.id,
               case when e.enabled then now() + make_interval(secs => $8) end,
               case when e.enabled then coalesce(now() + make_interval(secs => $8), now())
                    else 'infinity' end,
               case when not e.enabled then 'endpoint_disabled' end,
               tp.tp
          from new
          join (select distinct on (id) id, tp from r) tp on tp.id = new.event_id
          join endpoints e on exists (
               select 1 from unnest(e.event_types) f
                where f = '*' or f = new.event_type
                   or (right(f, 2) = '.*' and starts_with(new.event_type, left(f, -1))))
           for share of e
        on conflict do nothing
        returning id, event_id, endpoint_id, leased_until, traceparent
    )
    select (select count(*) from new) as new_events, p.id, p.event_id, p.endpoint_id,
           0 as attempts, p.leased_until, p.traceparent, e.url, e.secret, ",
    previous_secret_in_grace!(),
    ", e.rate_limit_per_second
      from (select 1) as one
      left join (planned p join endpoints e on e.id = p.endpoint_id) on true"
);

/// **Recorded**: inserts the new events into the inbox and plans their deliveries, in one
/// statement (so all or nothing on its own, or inside the caller's transaction). With `lease`, the
/// deliveries of enabled endpoints come back leased.
pub async fn record_events(
    db: &impl deadpool_postgres::GenericClient,
    events: &NewEvents<'_>,
    lease: Option<Duration>,
) -> Result<RecordedEvents, tokio_postgres::Error> {
    if events.ids.is_empty() {
        return Ok(RecordedEvents::default());
    }
    let lease = lease.map(seconds);
    // Prepared once per connection: parsing and planning it each time cost as much as running it
    // for the few records a batch holds at a steady rate.
    let statement = db.prepare_cached(RECORD_EVENTS).await?;
    let rows = db
        .query(
            &statement,
            &[
                &events.ids,
                &events.types,
                &events.topics,
                &events.partitions,
                &events.offsets,
                &events.correlation,
                &events.json,
                &lease,
                &events.traceparents,
            ],
        )
        .await?;
    let new_events = rows.first().map_or(0, |r| r.get::<_, i64>("new_events")) as u64;
    let bodies: std::collections::HashMap<&str, (&str, Option<&str>)> = events
        .ids
        .iter()
        .zip(events.json.iter().zip(&events.correlation))
        .map(|(id, (json, correlation))| (*id, (*json, *correlation)))
        .collect();
    let mut planned = 0;
    let mut leased = Vec::new();
    let mut until = None;
    for row in rows
        .iter()
        .filter(|r| r.get::<_, Option<i64>>("id").is_some())
    {
        planned += 1;
        let Some(leased_until) = row.get::<_, Option<DateTime<Utc>>>("leased_until") else {
            continue;
        };
        until = Some(leased_until);
        let event_id: &str = row.get("event_id");
        let (json, correlation) = bodies.get(event_id).copied().unwrap_or_default();
        leased.push(Claimed::from_row(
            row,
            Bytes::copy_from_slice(json.as_bytes()),
            correlation.map(str::to_owned),
        ));
    }
    Ok(RecordedEvents {
        new_events,
        planned,
        leased: until.map(|until| Leased {
            deliveries: leased,
            until,
        }),
    })
}

// ------------------------------------------------------------------------------ claimed/leased

/// Claims up to $1 due deliveries of enabled endpoints for $2 seconds, with what sending needs.
const CLAIM: &str = concat!(
    "
    with due as (
        select d.id from deliveries d join endpoints e on e.id = d.endpoint_id
         where d.state = 'pending' and d.next_attempt_at <= now() and e.enabled
         order by d.next_attempt_at, d.id
         limit $1
         for update of d skip locked
    )
    update deliveries d
       set leased_until = now() + make_interval(secs => $2),
           next_attempt_at = now() + make_interval(secs => $2),
           held_by = null
      from due, inbox i, endpoints e
     where d.id = due.id and i.event_id = d.event_id and e.id = d.endpoint_id
    returning d.id, d.event_id, d.endpoint_id, d.attempts, i.payload::text as body,
              i.correlation_id, d.traceparent, e.url, e.secret, ",
    previous_secret_in_grace!(),
    ", e.rate_limit_per_second, d.leased_until"
);

/// **Claimed**: leases up to `limit` due deliveries to this instance for `lease` (safely across
/// instances: rows another claim holds are skipped). A crashed instance's deliveries are due again
/// by themselves when their lease ends.
pub async fn claim(
    client: &impl GenericClient,
    limit: i64,
    lease: Duration,
) -> Result<Option<Leased>, tokio_postgres::Error> {
    let rows = client.query(CLAIM, &[&limit, &seconds(lease)]).await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let until = first.get("leased_until");
    let deliveries = rows
        .iter()
        .map(|row| {
            let body: String = row.get("body");
            Claimed::from_row(row, Bytes::from(body), row.get("correlation_id"))
        })
        .collect();
    Ok(Some(Leased { deliveries, until }))
}

// ------------------------------------- succeeded, retried, dead, held by the breaker, released

/// One request made (or tried) for a delivery.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub number: i32,
    pub status: Option<i32>,
    pub latency_ms: i32,
    pub error: Option<String>,
    pub response_body: Option<String>,
    pub at: DateTime<Utc>,
}

/// What a batch did to one of its leased deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// **Succeeded**.
    Succeeded,
    /// **Retried** at this time (the attempt counts).
    RetryAt(DateTime<Utc>),
    /// **Dead**: no attempt left, unsendable, or aborted by the receiver.
    Dead,
    /// **Held by the breaker** until a probe may go (the attempt count is untouched).
    HeldByBreaker(DateTime<Utc>),
    /// **Released** unsent, due again at this time: shutting down, the lease ending, the
    /// endpoint's rate limit or its share of memory.
    Released(DateTime<Utc>),
}

/// A leased delivery's result, written by [`record_results`].
#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: i64,
    /// Attempts made, including this batch's.
    pub attempts: i32,
    pub step: Step,
    /// The request made, if one was.
    pub attempt: Option<Attempt>,
    /// When the step was decided (`delivered_at` of a success).
    pub at: DateTime<Utc>,
}

impl Outcome {
    pub fn held_by_breaker(d: &Claimed, until: DateTime<Utc>) -> Outcome {
        Outcome::unsent(d, Step::HeldByBreaker(until))
    }

    pub fn released(d: &Claimed, due: DateTime<Utc>) -> Outcome {
        Outcome::unsent(d, Step::Released(due))
    }

    fn unsent(d: &Claimed, step: Step) -> Outcome {
        Outcome {
            id: d.id,
            attempts: d.attempts,
            step,
            attempt: None,
            at: Utc::now(),
        }
    }

    /// The columns this outcome writes: state, next attempt, hold.
    fn columns(&self) -> (DeliveryState, DateTime<Utc>, Option<Hold>) {
        match self.step {
            Step::Succeeded => (DeliveryState::Succeeded, self.at, None),
            Step::RetryAt(at) => (DeliveryState::Pending, at, None),
            Step::Dead => (DeliveryState::Dead, self.at, None),
            Step::HeldByBreaker(until) => (DeliveryState::Pending, until, Some(Hold::Breaker)),
            Step::Released(due) => (DeliveryState::Pending, due, None),
        }
    }
}

/// Writes a batch's results, but only for rows still under this batch's lease ($8): a lease is only
/// ever held by pending rows. (No `state = 'pending'` here: with it the planner may pick the
/// `deliveries_due` index and read every pending delivery to find this batch's few hundred.)
/// `d.id = any($1)` holds the plan to the batch's ids: joined to `unnest` only, a plan made while
/// `deliveries` looked empty read the whole table, or (without sequential scans) its whole index.
pub const RECORD_RESULTS: &str = "
    update deliveries d
       set state = u.state, attempts = u.attempts, next_attempt_at = u.next_attempt_at,
           held_by = u.held_by, leased_until = null,
           last_status = case when u.sent then u.status else d.last_status end,
           last_error = case when u.sent then u.error else d.last_error end,
           delivered_at = case when u.state = 'succeeded' then u.at else d.delivered_at end,
           updated_at = now()
      from unnest($1::bigint[], $2::text[], $3::int[], $4::timestamptz[], $5::int[], $6::text[],
                  $7::bool[], $9::timestamptz[], $10::text[])
           as u(id, state, attempts, next_attempt_at, status, error, sent, at, held_by)
     where d.id = any($1) and d.id = u.id and d.leased_until = $8";

const RECORD_ATTEMPTS: &str = "
    insert into delivery_attempts
           (delivery_id, attempt, status_code, latency_ms, error, response_body, attempted_at)
    select * from unnest($1::bigint[], $2::int[], $3::int[], $4::int[], $5::text[], $6::text[],
                         $7::timestamptz[])";

/// PostgreSQL text cannot hold NUL characters.
fn clean(text: &str) -> String {
    text.replace('\0', "")
}

/// Writes the outcomes of deliveries leased until `lease` and their attempts, in one transaction
/// (both statements pipelined on one connection). Rows whose lease is no longer `lease` are left
/// alone: another instance owns them now.
pub async fn record_results(
    client: &mut deadpool_postgres::Client,
    outcomes: &[Outcome],
    lease: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    let n = outcomes.len();
    let (mut ids, mut states, mut attempts, mut nexts) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut statuses, mut errors, mut sent, mut ats, mut holds) = (
        Vec::with_capacity(n),
        Vec::<Option<String>>::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut a = AttemptColumns::default();
    for o in outcomes {
        let (state, next, hold) = o.columns();
        ids.push(o.id);
        states.push(state.as_str());
        attempts.push(o.attempts);
        nexts.push(next);
        holds.push(hold.map(Hold::as_str));
        statuses.push(o.attempt.as_ref().and_then(|a| a.status));
        errors.push(
            o.attempt
                .as_ref()
                .and_then(|a| a.error.as_deref())
                .map(clean),
        );
        sent.push(o.attempt.is_some());
        ats.push(o.at);
        if let Some(attempt) = &o.attempt {
            a.push(o.id, attempt);
        }
    }
    let tx = client.transaction().await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 10] = [
        &ids, &states, &attempts, &nexts, &statuses, &errors, &sent, &lease, &ats, &holds,
    ];
    let statement = tx.prepare_cached(RECORD_RESULTS).await?;
    let update = tx.execute(&statement, &params);
    let insert = async {
        if a.ids.is_empty() {
            return Ok(0);
        }
        let statement = tx.prepare_cached(RECORD_ATTEMPTS).await?;
        tx.execute(
            &statement,
            &[
                &a.ids,
                &a.numbers,
                &a.statuses,
                &a.latencies,
                &a.errors,
                &a.bodies,
                &a.ats,
            ],
        )
        .await
    };
    let (updated, inserted) = tokio::join!(update, insert);
    updated?;
    inserted?;
    tx.commit().await
}

#[derive(Default)]
struct AttemptColumns {
    ids: Vec<i64>,
    numbers: Vec<i32>,
    statuses: Vec<Option<i32>>,
    latencies: Vec<i32>,
    errors: Vec<Option<String>>,
    bodies: Vec<Option<String>>,
    ats: Vec<DateTime<Utc>>,
}

impl AttemptColumns {
    fn push(&mut self, delivery_id: i64, a: &Attempt) {
        self.ids.push(delivery_id);
        self.numbers.push(a.number);
        self.statuses.push(a.status);
        self.latencies.push(a.latency_ms);
        self.errors.push(a.error.as_deref().map(clean));
        self.bodies.push(a.response_body.as_deref().map(clean));
        self.ats.push(a.at);
    }
}

// ------------------------------------------------------------------------- parked and released

/// **Parked**: the pending deliveries of an endpoint being disabled wait indefinitely (so the
/// dispatchers' due-index scan never walks over them).
pub async fn park_for_disabled_endpoint(
    tx: &impl GenericClient,
    endpoint_id: &str,
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(
        "update deliveries set next_attempt_at = 'infinity', held_by = 'endpoint_disabled',
                updated_at = now()
          where endpoint_id = $1 and state = 'pending'",
        &[&endpoint_id],
    )
    .await
}

/// **Released**: an endpoint being enabled makes its parked deliveries due at once.
pub async fn release_parked(
    tx: &impl GenericClient,
    endpoint_id: &str,
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(
        "update deliveries set next_attempt_at = now(), held_by = null, updated_at = now()
          where endpoint_id = $1 and state = 'pending' and held_by = 'endpoint_disabled'",
        &[&endpoint_id],
    )
    .await
}

/// **Released**: a reset breaker lets the deliveries it held go at once.
pub async fn release_held_by_breaker(
    client: &impl GenericClient,
    endpoint_id: &str,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "update deliveries set next_attempt_at = now(), held_by = null
              where endpoint_id = $1 and state = 'pending' and held_by = 'breaker'
                and leased_until is null",
            &[&endpoint_id],
        )
        .await
}

// ---------------------------------------------------------------------- retried and replayed

/// What [`retry_dead`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retry {
    Queued,
    NotFound,
    /// Only dead deliveries can be retried; this one is in this state.
    NotDead(DeliveryState),
}

/// **Retried** by hand: a dead delivery is queued again with a fresh retry schedule.
pub async fn retry_dead(
    client: &impl GenericClient,
    id: i64,
) -> Result<Retry, tokio_postgres::Error> {
    let queued = client
        .execute(
            "update deliveries set state = 'pending', attempts = 0, next_attempt_at = now(),
                    leased_until = null, held_by = null, updated_at = now()
              where id = $1 and state = 'dead'",
            &[&id],
        )
        .await?;
    if queued > 0 {
        return Ok(Retry::Queued);
    }
    let row = client
        .query_opt("select state from deliveries where id = $1", &[&id])
        .await?;
    Ok(match row {
        None => Retry::NotFound,
        Some(row) => {
            Retry::NotDead(DeliveryState::parse(row.get("state")).unwrap_or(DeliveryState::Pending))
        }
    })
}

/// **Replayed**: every dead delivery of an endpoint (that died within `since`..`until` when
/// given) is queued again, each with a fresh retry schedule. Returns how many.
pub async fn replay_dead(
    client: &impl GenericClient,
    endpoint_id: &str,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "update deliveries set state = 'pending', attempts = 0, next_attempt_at = now(),
                    leased_until = null, held_by = null, updated_at = now()
              where endpoint_id = $1 and state = 'dead'
                and ($2::timestamptz is null or updated_at >= $2)
                and ($3::timestamptz is null or updated_at < $3)",
            &[&endpoint_id, &since, &until],
        )
        .await
}

// ---------------------------------------------------------------------------------- deleted

/// An endpoint is being deleted: its deliveries' attempts go first (they have no foreign key);
/// the deliveries themselves follow the endpoint row (`on delete cascade`).
pub async fn delete_attempts_of_endpoint(
    tx: &impl GenericClient,
    endpoint_id: &str,
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(
        "delete from delivery_attempts a using deliveries d
          where d.id = a.delivery_id and d.endpoint_id = $1",
        &[&endpoint_id],
    )
    .await
}

// There is no index on the age columns, so deliveries are walked in id order from a cursor: ids
// grow with creation time, so the walk stops at the first delivery created after the cutoff
// instead of reading the whole table, and never re-reads what an earlier batch passed over (old
// pending rows, space left by deleted ones). The state and age are tested again on the locked
// rows, so a dead delivery retried meanwhile is kept. Attempts have no foreign key (V7) and go in
// the same statement.
const DELETE_FINISHED: &str = "
    with scanned as (
        select id, created_at from deliveries where id > $1 order by id limit $3
    ), doomed as (
        select id from deliveries
         where id in (select id from scanned)
           and state in ('succeeded', 'dead') and updated_at < $2
           for update skip locked
    ), attempts as (
        delete from delivery_attempts where delivery_id = any(array(select id from doomed))
        returning 1
    ), gone as (
        delete from deliveries where id = any(array(select id from doomed)) returning 1
    )
    select (select count(*) from gone) as deliveries, (select count(*) from attempts) as attempts,
           (select count(*) from scanned) as scanned, (select max(id) from scanned) as last_id,
           coalesce((select bool_or(created_at >= $2) from scanned), false) as reached_cutoff";

/// One step of the retention walk of [`delete_finished`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FinishedDeleted {
    pub deliveries: u64,
    pub attempts: u64,
    /// Rows looked at; fewer than the batch means the walk reached the end of the table.
    pub scanned: u64,
    /// Where the next step starts.
    pub last_id: Option<i64>,
    /// The step met a delivery created after the cutoff: later ones are younger still.
    pub reached_cutoff: bool,
}

/// Retention: deletes succeeded and dead deliveries last updated before `cutoff`, with their
/// attempts, among the `batch` deliveries after id `after`.
pub async fn delete_finished(
    client: &impl GenericClient,
    after: i64,
    cutoff: DateTime<Utc>,
    batch: i64,
) -> Result<FinishedDeleted, tokio_postgres::Error> {
    let row = client
        .query_one(DELETE_FINISHED, &[&after, &cutoff, &batch])
        .await?;
    Ok(FinishedDeleted {
        deliveries: row.get::<_, i64>("deliveries") as u64,
        attempts: row.get::<_, i64>("attempts") as u64,
        scanned: row.get::<_, i64>("scanned") as u64,
        last_id: row.get("last_id"),
        reached_cutoff: row.get("reached_cutoff"),
    })
}

// ------------------------------------------------------------------------------- read views

/// A delivery as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryFields {
    pub id: i64,
    pub event_id: String,
    pub event_type: String,
    pub endpoint_id: String,
    pub state: DeliveryState,
    /// When the next attempt may go (absent while parked).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Why a pending delivery waits beyond its retry time, if it does.
    pub held_by: Option<Hold>,
    pub leased_until: Option<DateTime<Utc>>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub correlation_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// A delivery in a list: its fields and how many attempts it has had.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryView {
    #[serde(flatten)]
    pub fields: DeliveryFields,
    pub attempts: i32,
}

/// One delivery with its attempts, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryDetail {
    #[serde(flatten)]
    pub fields: DeliveryFields,
    pub attempts: Vec<AttemptView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttemptView {
    pub attempt: i32,
    pub status_code: Option<i32>,
    pub latency_ms: i32,
    pub error: Option<String>,
    pub response_body: Option<String>,
    pub attempted_at: DateTime<Utc>,
}

const VIEW_COLUMNS: &str = "d.id, d.event_id, i.event_type, d.endpoint_id, d.state, d.attempts,
    case when d.state = 'pending' and d.next_attempt_at <> 'infinity' then d.next_attempt_at end
         as next_attempt_at,
    d.held_by, d.leased_until, d.last_status, d.last_error, i.correlation_id, d.created_at,
    d.updated_at, d.delivered_at";

impl DeliveryFields {
    fn from_row(row: &Row) -> DeliveryFields {
        DeliveryFields {
            id: row.get("id"),
            event_id: row.get("event_id"),
            event_type: row.get("event_type"),
            endpoint_id: row.get("endpoint_id"),
            state: DeliveryState::parse(row.get("state")).unwrap_or(DeliveryState::Pending),
            next_attempt_at: row.get("next_attempt_at"),
            held_by: row.get::<_, Option<&str>>("held_by").and_then(Hold::parse),
            leased_until: row.get("leased_until"),
            last_status: row.get("last_status"),
            last_error: row.get("last_error"),
            correlation_id: row.get("correlation_id"),
            created_at: row.get("created_at"),
            updated_at: row.get("updated_at"),
            delivered_at: row.get("delivered_at"),
        }
    }
}

/// Which deliveries [`list`] returns.
#[derive(Debug, Default)]
pub struct Filter {
    pub state: Option<DeliveryState>,
    pub endpoint_id: Option<String>,
    pub event_id: Option<String>,
}

/// Deliveries after id `after` in id order, at most `limit`.
pub async fn list(
    client: &impl GenericClient,
    filter: &Filter,
    after: i64,
    limit: i64,
) -> Result<Vec<DeliveryView>, tokio_postgres::Error> {
    let sql = format!(
        "select {VIEW_COLUMNS} from deliveries d join inbox i on i.event_id = d.event_id
          where ($1::text is null or d.state = $1) and ($2::text is null or d.endpoint_id = $2)
            and ($3::text is null or d.event_id = $3) and d.id > $4
          order by d.id limit $5"
    );
    let state = filter.state.map(DeliveryState::as_str);
    let rows = client
        .query(
            &sql,
            &[
                &state,
                &filter.endpoint_id,
                &filter.event_id,
                &after,
                &limit,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| DeliveryView {
            fields: DeliveryFields::from_row(row),
            attempts: row.get("attempts"),
        })
        .collect())
}

/// One delivery with its attempts.
pub async fn get(
    client: &impl GenericClient,
    id: i64,
) -> Result<Option<DeliveryDetail>, tokio_postgres::Error> {
    let sql = format!(
        "select {VIEW_COLUMNS} from deliveries d join inbox i on i.event_id = d.event_id
          where d.id = $1"
    );
    let Some(row) = client.query_opt(&sql, &[&id]).await? else {
        return Ok(None);
    };
    let attempts = client
        .query(
            "select attempt, status_code, latency_ms, error, response_body, attempted_at
               from delivery_attempts where delivery_id = $1 order by attempted_at, id",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| AttemptView {
            attempt: r.get("attempt"),
            status_code: r.get("status_code"),
            latency_ms: r.get("latency_ms"),
            error: r.get("error"),
            response_body: r.get("response_body"),
            attempted_at: r.get("attempted_at"),
        })
        .collect();
    Ok(Some(DeliveryDetail {
        fields: DeliveryFields::from_row(&row),
        attempts,
    }))
}

/// Pending deliveries, and dead ones per endpoint (every endpoint listed, with 0 when none): for
/// the gauges.
pub async fn counts(
    client: &impl GenericClient,
) -> Result<(i64, Vec<(String, i64)>), tokio_postgres::Error> {
    let pending = client
        .query_one(
            "select count(*) from deliveries where state = 'pending'",
            &[],
        )
        .await?
        .get(0);
    let dead = client
        .query(
            "select e.id, (select count(*) from deliveries d
                            where d.endpoint_id = e.id and d.state = 'dead')
               from endpoints e",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok((pending, dead))
}
