//! Reading the outbox by its cursor (and the few unsent rows due for a retry), publishing with
//! the idempotent producer, and marking each batch from the delivery reports in one statement
//! that appends the sent rows' partitions and offsets and moves the cursor: no event row is
//! ever rewritten.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::db::PgPool;
use outbox_core::envelope::{HEADER_CORRELATION_ID, HEADER_EVENT_ID, HEADER_EVENT_TYPE};
use outbox_core::kafka;
use outbox_core::outbox::OutboxState;
use outbox_core::reconnect::Backoff;
use outbox_core::schedule::exponential_backoff;
use outbox_core::shutdown::sleep_or_cancel;
use outbox_core::trace_context::TRACEPARENT;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{Config, Metrics};

/// The snapshot's xmin: every event whose writer's xid is below it is final (committed and
/// visible, or rolled back), so the cursor may pass it.
pub const SNAPSHOT_XMIN: &str = "select pg_snapshot_xmin(pg_current_snapshot())::text::bigint";

/// The cursor as the last leader committed it.
pub const LOAD_CURSOR: &str = "
    select xmin_done::text::bigint, id_done, version,
           coalesce(ahead_xid, 9223372036854775807), coalesce(ahead_max_xid, 0), coalesce(ahead_max_id, 0)
      from relay_cursor";

/// The committed events not handled yet, in three parts (`$2` xmin done, `$3` id done, `$4` the
/// snapshot's xmin):
/// - fresh: final events beyond the cursor, the next `$1` in id order;
/// - late: events of transactions that ended since the cursor's xmin, with lower ids (a
///   transaction that commits late);
/// - ahead: committed events of transactions newer than the xmin (not final yet, since an older
///   writer still runs), up to the last fresh one when the fresh part was cut by `$1`, so that
///   the batch holds every committed unsent event below its highest id (per-key order).
///
/// For each: whether it was already sent (only looked up where it may have been sent ahead of the
/// cursor: xid at or above `$5` or the xmin), whether it has an `unsent` row (put there by hand,
/// or held back earlier: skipped, it is sent from there) and whether its key has an unsent P or X
/// row or is one of `$6`, the keys of rows held back by batches whose marks are not written yet
/// (held back behind them).
///
/// `cut` reads the fresh ids again instead of reading `fresh`: a CTE named twice is materialized,
/// and a batch of `fresh` (4,000 events of 1 KiB: 5 MB) then spilled to a temporary file on every
/// claim. Read again, it costs only when `ahead` has a candidate, which is rare. Measured in psql
/// on a backlog of 200,000: 33-37 ms a claim before, 27-30 after.
///
/// Each part is read by the one index that bounds it by what is unhandled, and the other
/// condition is written so that no index can serve it: `fresh` by id from the cursor (`is true`
/// keeps it from reading every final event by writer), `late` and `ahead` by writer, the few
/// events of recent transactions (`e.id + 0` keeps them from reading every event up to the cut
/// by id). Plans did both on their own, a claim then reading the whole outbox: measured, 4,132
/// rows read to find 1 on a fresh outbox of 5,000 events.
///
/// The look in `sent` is a probe per event by index (a lateral `limit 1`, which PostgreSQL cannot
/// turn into a hash): as an `exists` subquery the planner hashed the whole of `sent` once per
/// claim whenever one event needed the look (measured: a claim of 14 events took 14 ms with
/// 22,000 sent facts), and that grows with every sent fact kept until retention drops it. The
/// looks in `unsent`, a small table, stay `exists`: hashed once per claim they cost a backlog's
/// drain less than two probes per event (measured: 59k against 63k events/s).
pub const CLAIM_CURSOR: &str = "
    with fresh as (
        select e.id, e.xid, e.topic, e.aggregate_id, e.payload, e.headers, e.created_at from events e
         where e.id > $3 and (e.xid < $4::bigint::text::xid8) is true
         order by e.id
         limit $1
    ), late as (
        select e.id, e.xid, e.topic, e.aggregate_id, e.payload, e.headers, e.created_at from events e
         where e.xid >= $2::bigint::text::xid8 and e.xid < $4::bigint::text::xid8 and e.id + 0 <= $3
    ), cut as (
        select case when count(*) >= $1 then coalesce(max(id), $3) else 9223372036854775807 end as id
          from (select e.id from events e
                 where e.id > $3 and (e.xid < $4::bigint::text::xid8) is true
                 order by e.id
                 limit $1) f
    ), ahead as (
        select e.id, e.xid, e.topic, e.aggregate_id, e.payload, e.headers, e.created_at from events e
         where e.xid >= $4::bigint::text::xid8 and e.id + 0 <= (select id from cut)
    )
    select c.id, c.topic, c.aggregate_id, c.payload::text, c.headers, c.created_at,
           exists (select 1 from unsent u where u.id = c.id) as own,
           exists (select 1 from unsent u where u.aggregate_id = c.aggregate_id and u.state in ('P', 'X'))
               or c.aggregate_id = any($6::text[]) as held,
           sent.found is not null, c.xid::text::bigint
      from (select * from fresh union all select * from late union all select * from ahead) c
      left join lateral (
          select true as found from sent s
           where (c.xid >= $5::bigint::text::xid8 or c.xid >= $4::bigint::text::xid8)
             and s.id = c.id and s.created_at = c.created_at limit 1) sent on true";

/// Due `P`/`X` rows of `unsent` behind the cursor (`$3` xmin, `$4` id), in id order, never a
/// row whose key has an older unsent row that is not due (that row would then be overtaken).
/// `$2` are the rows of the previous batch, acknowledged by Kafka but whose marks are still
/// being written.
///
/// It does not leave out the keys the unmarked batches hold back (the cursor claim's `$6`): a key
/// whose events keep coming has a row held back by nearly every batch, and its unsent rows would
/// then never be claimed. Its held rows have higher ids than its unsent ones, unless a
/// transaction committed late.
pub const CLAIM_UNSENT: &str = "
    with held as (
        select aggregate_id, min(id) as from_id from unsent
         where state in ('P', 'X') and next_attempt_at > now()
         group by aggregate_id)
    select e.id, e.topic, e.aggregate_id, e.payload::text, e.headers, u.attempts, e.created_at,
           u.last_error_kind = 'permanent' as solo
      from unsent u join events e on e.id = u.id and e.created_at = u.created_at
     where u.state in ('P', 'X') and u.next_attempt_at <= now()
       and e.xid < $3::bigint::text::xid8 and e.id <= $4
       and not exists (select 1 from held h where h.aggregate_id = u.aggregate_id and h.from_id < u.id)
       and not exists (select 1 from unnest($2::bigint[]) marking(id) where marking.id = u.id)
     order by u.id
     limit $1";

/// A batch's outcome in one statement, so it is all or nothing: the cursor moves (only from the
/// version this leader read: a relay that lost the lead writes nothing), the sent rows' partitions
/// and offsets are appended, the sent `unsent` rows go, the held-back rows are put in `unsent`
/// as P and the failed ones as X or D. Answers 1, or 0 if the cursor had moved, and how many sent
/// facts it appended.
pub static MARK_BATCH: LazyLock<String> =
    LazyLock::new(|| MARK_BATCH_TEMPLATE.replace("ON_SENT_CONFLICT", ""));

/// [`MARK_BATCH`] for a batch whose plain mark failed on a sent fact already there: that fact
/// stays, the row's `unsent` entry goes, and Kafka holds the event twice (consumers drop the
/// second by its event id). It heals a row found both sent and unsent (put back by hand, or by a
/// bug) instead of refusing every mark after it. Only then: `on conflict` costs the plain insert
/// about half again (measured at 4,000 rows: 11-20 ms plain, 18-28 ms with it).
static MARK_BATCH_HEALING: LazyLock<String> = LazyLock::new(|| {
    MARK_BATCH_TEMPLATE.replace(
        "ON_SENT_CONFLICT",
        "on conflict (id, created_at) do nothing",
    )
});

const MARK_BATCH_TEMPLATE: &str = "
    with moved as (
        update relay_cursor set xmin_done = $1::bigint::text::xid8, id_done = $2, version = version + 1, waiting = false,
               ahead_xid = nullif($21::bigint, 9223372036854775807), ahead_max_xid = $22, ahead_max_id = $23
         where version = $3
        returning 1
    ), sent_rows as (
        insert into sent (id, created_at, kafka_partition, kafka_offset, attempts)
        select * from unnest($4::bigint[], $5::timestamptz[], $6::int[], $7::bigint[], $8::int[])
         where exists (select 1 from moved)
        ON_SENT_CONFLICT
        returning 1
    ), resolved as (
        delete from unsent where id = any($9::bigint[]) and exists (select 1 from moved)
    ), held as (
        insert into unsent (id, created_at, aggregate_id, state)
        select h.id, h.created_at, h.key, 'P' from unnest($10::bigint[], $11::timestamptz[], $12::text[]) as h(id, created_at, key)
         where exists (select 1 from moved)
        on conflict (id) do nothing
    ), failed as (
        insert into unsent (id, created_at, aggregate_id, state, attempts, last_error, last_error_kind, next_attempt_at)
        select f.id, f.created_at, f.key, f.state, f.attempts, f.error, f.kind,
               now() + f.delay_ms * interval '1 millisecond'
          from unnest($13::bigint[], $14::timestamptz[], $15::text[], $16::text[], $17::int[], $18::text[], $19::text[], $20::bigint[])
               as f(id, created_at, key, state, attempts, error, kind, delay_ms)
         where exists (select 1 from moved)
        on conflict (id) do update
           set state = excluded.state, attempts = excluded.attempts, last_error = excluded.last_error,
               last_error_kind = excluded.last_error_kind, next_attempt_at = excluded.next_attempt_at
    )
    select (select count(*) from moved), (select count(*) from sent_rows)";

/// Publishers NOTIFY while this is set (see V5__notify_only_when_waited_for.sql); the next mark
/// clears it.
const ANNOUNCE_WAITING: &str = "update relay_cursor set waiting = true where not waiting";

/// The next transaction id, read once the announcement has committed: every publish that read
/// `waiting` unset belongs to a transaction with a lower id (publish reads it after its insert,
/// which gives the transaction its id).
const NEXT_XID: &str = "select pg_snapshot_xmax(pg_current_snapshot())::text::bigint";

/// When the next unsent row falls due (to sleep exactly that long when nothing is due now).
const NEXT_DUE: &str = "select min(next_attempt_at) from unsent where state in ('P', 'X')";

/// How long after its announcement an idle relay first looks again while a transaction that may
/// have published without a NOTIFY is still running; each further look waits twice as long. A
/// publish whose transaction read `waiting` just before it was set sends no NOTIFY, and without
/// these looks its event would wait for the next publish or `RELAY_POLL_INTERVAL`. Publishing
/// transactions are short, so most are found by the first.
const ANNOUNCE_GRACE: Duration = Duration::from_millis(25);

/// How long a relay whose claim found nothing first waits before it looks again; each further
/// look waits twice as long, and after [`QUIET_LOOKS`] of them it asks for a NOTIFY. A NOTIFY
/// costs the publishers (each commit that ran one waits for a lock that serialises them until
/// its WAL is flushed), and a relay that keeps up finds nothing between two events now and
/// then: it announced and publishers notified until its next mark. A relay that finds work
/// again within these looks never asks. Measured with 8 pgbench clients running
/// `outbox.publish` while a relay kept up: 2,476-2,501 publishes/s announcing at once,
/// 3,036-3,580 with these looks; at 2,000 events/s (debezium-bench) 163 announcements in a
/// 10 s run against 4. An event that arrives during a look waits for its end (up to 4 ms).
const QUIET_LOOK: Duration = Duration::from_millis(1);
const QUIET_LOOKS: u32 = 3;

/// The wait before the next look of a relay whose last `looks` looks found nothing, or None
/// once it should announce instead.
fn quiet_look(looks: u32) -> Option<Duration> {
    (looks < QUIET_LOOKS).then(|| QUIET_LOOK * 2u32.pow(looks))
}

/// An idle leader's sleep: `wait`, or until a NOTIFY wakes it or it stops leading.
async fn nap(
    wait: Duration,
    wake: &Notify,
    leadership: &CancellationToken,
    shutdown: &CancellationToken,
) {
    tokio::select! {
        _ = wake.notified() => {}
        _ = tokio::time::sleep(wait) => {}
        _ = leadership.cancelled() => {}
        _ = shutdown.cancelled() => {}
    }
}

/// Where an idle leader stands with publishers' NOTIFYs (`relay_cursor.waiting`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Idle {
    /// Its last batch had rows (its mark cleared `waiting`), or the announcement failed.
    Busy,
    /// `waiting` is set. Publishes that read it unset are in transactions with ids below
    /// `until_xid`; until the claim's snapshot xmin reaches it, one of them may still commit
    /// without a NOTIFY, so the relay looks again after `next_look`.
    Announced { until_xid: i64, next_look: Duration },
    /// Every publish that missed the announcement has been looked for: from now on only a
    /// NOTIFY, a due row or the poll wakes it.
    Asleep,
}

impl Idle {
    /// Announced, right after `until_xid` was read.
    fn announced(until_xid: i64) -> Idle {
        Idle::Announced {
            until_xid,
            next_look: ANNOUNCE_GRACE,
        }
    }

    /// How long to sleep when a look found nothing (`xmin`: that claim's snapshot xmin;
    /// `until_due`: until the next due row or the poll), and the stage after that sleep. A long
    /// transaction that never publishes costs a look at doubling intervals, up to the poll's.
    fn sleep(self, xmin: i64, until_due: Duration) -> (Duration, Idle) {
        match self {
            Idle::Announced {
                until_xid,
                next_look,
            } if xmin < until_xid => (
                next_look.min(until_due),
                Idle::Announced {
                    until_xid,
                    next_look: next_look.saturating_mul(2),
                },
            ),
            Idle::Announced { .. } => (until_due, Idle::Asleep),
            other => (until_due, other),
        }
    }
}

/// The leader's cursor: every event with xid < `xmin_done` and id <= `id_done` was handled.
/// `version` is what the next mark expects to find in `relay_cursor`. Events sent ahead of it
/// have xids from `ahead_xid` (`i64::MAX`: none) to `ahead_max_xid`, ids up to `ahead_max_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub xmin_done: i64,
    pub id_done: i64,
    pub version: i64,
    pub ahead_xid: i64,
    pub ahead_max_xid: i64,
    pub ahead_max_id: i64,
}

impl Cursor {
    /// Reads `relay_cursor` (`LOAD_CURSOR`).
    pub fn from_row(row: &tokio_postgres::Row) -> Self {
        Cursor {
            xmin_done: row.get(0),
            id_done: row.get(1),
            version: row.get(2),
            ahead_xid: row.get(3),
            ahead_max_xid: row.get(4),
            ahead_max_id: row.get(5),
        }
    }

    /// Notes an event read ahead of the cursor (not final yet).
    fn ahead(&mut self, xid: i64, id: i64) {
        self.ahead_xid = self.ahead_xid.min(xid);
        self.ahead_max_xid = self.ahead_max_xid.max(xid);
        self.ahead_max_id = self.ahead_max_id.max(id);
    }

    /// Passes one event a claim found (`xmin`: the claim's snapshot xmin): returns what to do with
    /// it, and whether the batch must commit the cursor for it. An event that is final (written
    /// below the xmin) moves `id_done`; one that is not yet is noted as read ahead.
    ///
    /// An event already sent (a sent fact, or in the batch whose marks are being written) or with
    /// an `unsent` row is passed without a send. It still counts once final: the cursor has moved
    /// over it, and only a mark writes that down. (Not counting the in-flight ones once left the
    /// committed cursor behind for good when nothing else was written after them.)
    fn pass(&mut self, xmin: i64, event: &Found) -> (Passed, bool) {
        let is_final = event.xid < xmin;
        if is_final {
            self.id_done = self.id_done.max(event.id);
        } else {
            self.ahead(event.xid, event.id);
        }
        if event.in_flight || event.own || event.sent {
            return (Passed::Skip, is_final);
        }
        if event.key_held {
            (Passed::HoldBack, true)
        } else {
            (Passed::Send, true)
        }
    }

    /// Forgets the events sent ahead once the cursor has passed them all.
    fn forget_passed(&mut self) {
        if self.ahead_xid != i64::MAX
            && self.xmin_done > self.ahead_max_xid
            && self.id_done >= self.ahead_max_id
        {
            self.ahead_xid = i64::MAX;
            self.ahead_max_xid = 0;
            self.ahead_max_id = 0;
        }
    }
}

/// One event `CLAIM_CURSOR` found, as the cursor sees it.
#[derive(Debug, Clone, Copy)]
struct Found {
    id: i64,
    xid: i64,
    /// Sent, or held back, by a batch whose marks are not written yet.
    in_flight: bool,
    /// Has an `unsent` row of its own (sent from there).
    own: bool,
    /// Its key has an older unsent P or X row.
    key_held: bool,
    /// Has a sent fact.
    sent: bool,
}

/// What a claim does with an event it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Passed {
    Send,
    HoldBack,
    Skip,
}

struct Claimed {
    id: i64,
    topic: String,
    key: String,
    /// None only if the row's envelope was set to null by hand: sent as a record Kafka refuses,
    /// so the row turns dead after its attempts instead of blocking its key.
    payload: Option<String>,
    headers: Value,
    attempts: i32,
    created_at: DateTime<Utc>,
    /// Last failed permanently: sent alone, after everything before it was acknowledged.
    solo: bool,
    /// Claimed from `unsent` (a retry, or a row held back earlier), not from the cursor.
    retried: bool,
    /// Enqueued as soon as it was claimed, during the sends of the batch before (see
    /// [`send_early`]).
    early: Option<Enqueued>,
}

/// A record handed to the producer: its delivery report to come, or why it was refused.
type Enqueued = Result<rdkafka::producer::DeliveryFuture, KafkaError>;

/// A row the cursor passed that waits in `unsent` behind an older unsent row of its key.
struct HeldBack {
    id: i64,
    created_at: DateTime<Utc>,
    key: String,
}

/// One claim: the rows to send, the rows held back, and the cursor once they are marked.
struct Batch {
    rows: Vec<Claimed>,
    held: Vec<HeldBack>,
    /// The rows the cursor passed (sent, held back, or skipped), and the unsent rows claimed.
    handled: usize,
    cursor: Cursor,
    /// Its spans, when they were made before its first records were enqueued ([`send_early`]).
    spans: Option<(tracing::Span, Vec<tracing::Span>)>,
}

impl Batch {
    /// Holds back what this batch, claimed while the batch before was sent, carries of the keys
    /// whose rows that batch failed (`failed_keys`, the ones turned X), as a claim made after
    /// those failures were written would have: a row from the cursor is held back (it waits in
    /// `unsent`), a row claimed from `unsent` is left there for a later claim. None of these rows
    /// was sent early: their keys were in flight.
    fn hold_behind(&mut self, failed_keys: &HashSet<&str>) {
        if failed_keys.is_empty() {
            return;
        }
        let rows = std::mem::take(&mut self.rows);
        for row in rows {
            if !failed_keys.contains(row.key.as_str()) {
                self.rows.push(row);
                continue;
            }
            debug_assert!(
                row.early.is_none(),
                "a row of a key in flight was sent early"
            );
            if row.retried {
                self.handled -= 1;
            } else {
                self.held.push(HeldBack {
                    id: row.id,
                    created_at: row.created_at,
                    key: row.key,
                });
            }
        }
    }
}

/// Errors that will not go away by waiting: the row counts towards `RELAY_MAX_ATTEMPTS` and then
/// turns dead. Everything else (timeouts, broker down, leader changes) is transient and retried
/// for as long as it takes.
/// The spans of one batch's sends: the batch's own, linked to the trace of every event it carries
/// (a batch belongs to many traces, so it is a child of none), and one per event, a child of the
/// event's `traceparent` header, which then carries that span's context on into Kafka. Nothing
/// when spans are not exported.
fn batch_spans(rows: &mut [Claimed]) -> (tracing::Span, Vec<tracing::Span>) {
    let batch = tracing::info_span!(
        "relay_batch",
        events = rows.len(),
        sent = tracing::field::Empty
    );
    if !outbox_core::telemetry::exporting() {
        return (batch, Vec::new());
    }
    let mut per_event = Vec::new();
    for row in rows.iter_mut() {
        let Some(tp) = row
            .headers
            .get(TRACEPARENT)
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            continue;
        };
        outbox_core::trace_context::link_to(&batch, &tp);
        let span = tracing::info_span!(parent: None, "relay_publish", otel.kind = "producer", outbox_id = row.id, topic = %row.topic);
        outbox_core::trace_context::continue_from_value(&span, Some(&tp));
        if let (Some(next), Some(headers)) = (
            outbox_core::trace_context::traceparent(&span),
            row.headers.as_object_mut(),
        ) {
            headers.insert(TRACEPARENT.to_owned(), Value::String(next));
        }
        per_event.push(span);
    }
    (batch, per_event)
}

fn is_permanent(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(
            MessageSizeTooLarge
                | InvalidMessageSize
                | InvalidMessage
                | MessageBatchTooLarge
                | TopicAuthorizationFailed
                | InvalidTopic
                | PolicyViolation
        )
    )
}

/// Records a batch enqueues before it lets the other tasks of its thread run (the claim made
/// meanwhile, the connections' tasks). Enqueueing never waits, so without these pauses a claim
/// polled in the same task sent its statements only once the whole batch was enqueued: measured
/// at 4,000 rows, it then started 5-20 ms into the sends and ended after the acknowledgements,
/// and the next batch waited for it. The claim has a task of its own now, which may still share
/// this thread.
const ENQUEUE_SLICE: usize = 128;

/// The relay's Kafka side and its batch loop.
pub struct Publisher {
    producer: Mutex<FutureProducer>,
    brokers: String,
    send_timeout: Duration,
    pool: PgPool,
    claimer: Claimer,
    metrics: Metrics,
    configured_topics: Vec<String>,
    known_topics: Mutex<HashSet<String>>,
    partitions: i32,
    poll_interval: Duration,
    max_attempts: i32,
    retry_base: Duration,
    retry_max: Duration,
}

impl Publisher {
    pub fn new(
        config: &Config,
        topics: Vec<String>,
        pool: PgPool,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let producer = Self::create_producer(&config.kafka.kafka_brokers, config.send_timeout)?;
        Ok(Publisher {
            producer: Mutex::new(producer),
            brokers: config.kafka.kafka_brokers.clone(),
            send_timeout: config.send_timeout,
            claimer: Claimer {
                pool: pool.clone(),
                batch_size: config.batch_size.max(1),
            },
            pool,
            metrics,
            configured_topics: topics,
            known_topics: Mutex::new(HashSet::new()),
            partitions: config.topic_partitions,
            poll_interval: config.poll_interval,
            max_attempts: config.max_attempts.max(1),
            retry_base: config.retry_base,
            retry_max: config.retry_max,
        })
    }

    fn create_producer(brokers: &str, send_timeout: Duration) -> anyhow::Result<FutureProducer> {
        Ok(kafka::idempotent_producer_config(brokers, "outbox-relay", send_timeout).create()?)
    }

    pub fn producer(&self) -> FutureProducer {
        self.producer.lock().expect("producer lock").clone()
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// True when the cluster answers a metadata request within two seconds.
    pub async fn kafka_reachable(&self) -> bool {
        outbox_core::kafka::is_reachable(self.producer(), |p| p.client()).await
    }

    /// Publishes batches while `leadership` and `shutdown` hold; sleeps until NOTIFY, the next due
    /// row or the poll interval when nothing is due.
    pub async fn lead(
        &self,
        wake: &Notify,
        leadership: &CancellationToken,
        shutdown: &CancellationToken,
    ) {
        self.ensure_topics(&self.configured_topics).await;
        let mut db_backoff = Backoff::new();
        let mut pipeline = Pipeline::default();
        let mut idle = Idle::Busy;
        let mut quiet_looks = 0;
        while !leadership.is_cancelled() && !shutdown.is_cancelled() {
            match self.publish_batch(&mut pipeline, leadership).await {
                Ok(0) => {
                    // A few quick looks first (see `QUIET_LOOK`). Then it asks for a NOTIFY and
                    // looks once more at once: a publish that committed without one (it saw a
                    // busy relay) is found by that look, or by the looks after it while its
                    // transaction runs. Not announced: it sleeps as below.
                    if idle == Idle::Busy {
                        if let Some(wait) = quiet_look(quiet_looks) {
                            quiet_looks += 1;
                            nap(wait, wake, leadership, shutdown).await;
                            continue;
                        }
                        if let Some(until_xid) = self.announce_waiting().await {
                            tracing::debug!(cursor = ?pipeline.reading.cursor, until_xid, "nothing to claim; announced waiting");
                            idle = Idle::announced(until_xid);
                            continue;
                        }
                    }
                    let xmin = pipeline.reading.cursor.map_or(i64::MIN, |c| c.xmin_done);
                    let wait;
                    (wait, idle) = idle.sleep(xmin, self.until_next_due().await);
                    nap(wait, wake, leadership, shutdown).await;
                }
                Ok(_) => {
                    // Its mark cleared `waiting`.
                    idle = Idle::Busy;
                    quiet_looks = 0;
                    db_backoff.reset();
                }
                Err(error) => {
                    let delay = db_backoff.next_delay();
                    tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "batch not claimed or not marked; its rows stay unsent and are sent again");
                    // Start over from the cursor as committed.
                    let _ = pipeline.settle().await;
                    pipeline.next = None;
                    pipeline.reading = Reading::default();
                    sleep_or_cancel(delay, leadership).await;
                }
            }
        }
        // Leadership lost or shutting down: the marks in flight still get their chance.
        let _ = pipeline.settle().await;
    }

    /// Sets `relay_cursor.waiting`, so that publishers NOTIFY. Returns the next transaction id
    /// once that has committed ([`NEXT_XID`]), or None if it could not be set.
    async fn announce_waiting(&self) -> Option<i64> {
        let client = self.pool.get().await.ok()?;
        let announced = async {
            client.execute(ANNOUNCE_WAITING, &[]).await?;
            Ok::<i64, tokio_postgres::Error>(client.query_one(NEXT_XID, &[]).await?.get(0))
        };
        announced
            .await
            .map_err(|error| tracing::debug!(%error, "waiting not announced"))
            .ok()
    }

    async fn until_next_due(&self) -> Duration {
        let next: Option<DateTime<Utc>> = match self.pool.get().await {
            Ok(client) => client
                .query_one(NEXT_DUE, &[])
                .await
                .ok()
                .and_then(|r| r.get(0)),
            Err(_) => None,
        };
        match next {
            Some(at) => outbox_core::duration::time_until(at, Utc::now())
                .clamp(Duration::from_millis(5), self.poll_interval),
            None => self.poll_interval,
        }
    }

    /// Creates the topics not yet known to exist. A failure (Kafka down) is logged; the sends then
    /// fail transiently and their rows turn X until Kafka is back.
    async fn ensure_topics(&self, topics: &[String]) {
        let missing: Vec<String> = {
            let known = self.known_topics.lock().expect("topics lock");
            topics
                .iter()
                .filter(|t| !known.contains(*t))
                .cloned()
                .collect()
        };
        if missing.is_empty() {
            return;
        }
        let created = tokio::time::timeout(
            self.send_timeout,
            kafka::ensure_topics(&self.brokers, &missing, self.partitions),
        )
        .await;
        match created {
            Ok(Ok(())) => self
                .known_topics
                .lock()
                .expect("topics lock")
                .extend(missing),
            Ok(Err(error)) => tracing::warn!(%error, "topics not created yet"),
            Err(_) => tracing::warn!(topics = ?missing, "topic creation timed out (is Kafka up?)"),
        }
    }

    /// Claims one batch, publishes it and marks every row: E with its partition and offset, or X/D
    /// with the error and the next attempt time, in one statement that also moves the cursor.
    /// Returns how many rows the batch handled.
    ///
    /// The next batch is claimed while this one's acknowledgements arrive (from the cursor this
    /// batch's marks will commit, without the rows in flight). When the whole batch was
    /// acknowledged, its marks are written in the background while that next batch is sent. Its
    /// rows of keys this batch has no row of are sent as soon as they are claimed; the others
    /// only once every row before them is in Kafka, so per-key order holds as in a sequential
    /// loop. A batch with a failure is marked before the next batch is sent, and that batch then
    /// holds back the failed rows' keys.
    async fn publish_batch(
        &self,
        pipeline: &mut Pipeline,
        leadership: &CancellationToken,
    ) -> Result<usize, BatchError> {
        let claim_started = std::time::Instant::now();
        let batch = match pipeline.next.take() {
            Some(batch) => batch,
            None => {
                pipeline.settle().await?;
                self.claimer
                    .claim(&mut pipeline.reading, &InFlight::default())
                    .await?
            }
        };
        if batch.handled == 0 {
            pipeline.settle().await?;
            return Ok(0);
        }
        let Batch {
            rows,
            held,
            handled,
            cursor,
            spans,
        } = batch;
        if !rows.is_empty() {
            self.metrics.batch_size.observe(rows.len() as f64);
        }
        let batch_topics: Vec<String> = rows
            .iter()
            .map(|r| r.topic.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        self.ensure_topics(&batch_topics).await;

        let claim_ms = claim_started.elapsed().as_secs_f64() * 1000.0;
        let send_started = std::time::Instant::now();
        // The next mark expects the version this one leaves.
        if let Some(reading) = pipeline.reading.cursor.as_mut() {
            reading.version = cursor.version + 1;
        }
        let producer = self.producer();
        let mut rows = rows;
        let (span, per_event) = spans.unwrap_or_else(|| batch_spans(&mut rows));
        let this_batch = InFlight::of(&rows, &held);
        let busy_keys: HashSet<String> = rows.iter().map(|r| r.key.clone()).collect();
        let solo = rows.iter().any(|r| r.solo);
        let nothing_to_send = rows.is_empty();
        let send = Self::send_in_order(&producer, &mut rows).instrument(span.clone());
        // The next batch is claimed while this one's acknowledgements arrive, as if all of them
        // will be good (its claim skips every row of this batch): waiting for them first made
        // the claim a third of each cycle under load (measured at 2,000/s: acknowledgements
        // p50 8-38 ms, the claim after them 5-8 ms). Its rows of keys this batch has no row of
        // are sent at once ([`send_early`]). If a row here fails, the failure is written first
        // and the next batch then holds back the failed row's key ([`Batch::hold_behind`]). A
        // batch with a `solo` row is sent alone (a failure is likely).
        let before_claim = pipeline.reading;
        let (outcomes, claimed_meanwhile, claim_ahead_ms, sent_early) = if nothing_to_send || solo {
            (send.await, None, 0.0, 0)
        } else {
            let mut in_flight = pipeline.unmarked();
            in_flight.extend(&this_batch);
            // A task of its own, so that reading its rows can run on the other core while
            // this one enqueues (its statements go out first: see `ENQUEUE_SLICE`).
            let claimer = self.claimer.clone();
            let mut reading = pipeline.reading;
            let producer = producer.clone();
            let known_topics = self.known_topics.lock().expect("topics lock").clone();
            let claim = tokio::spawn(async move {
                let started = std::time::Instant::now();
                let mut claimed = claimer.claim(&mut reading, &in_flight).await;
                let ahead_ms = started.elapsed().as_secs_f64() * 1000.0;
                let sent_early = match claimed.as_mut() {
                    Ok(next) => send_early(next, &producer, &known_topics, &busy_keys).await,
                    Err(_) => 0,
                };
                (claimed, reading, ahead_ms, sent_early)
            });
            let outcomes = send.await;
            match claim.await {
                Ok((claimed, reading, ahead_ms, sent_early)) => {
                    pipeline.reading = reading;
                    (outcomes, Some(claimed), ahead_ms, sent_early)
                }
                Err(_) => (outcomes, Some(Err(BatchError::ClaimAbandoned)), 0.0, 0),
            }
        };
        span.record("sent", outcomes.iter().filter(|o| o.is_ok()).count());
        drop(per_event);
        let mut sent = Sent::default();
        let mut failed = Failed::default();
        let mut per_topic: HashMap<&str, u64> = HashMap::new();
        for (row, outcome) in rows.iter().zip(outcomes) {
            match outcome {
                Ok((partition, offset)) => {
                    sent.ids.push(row.id);
                    sent.created.push(row.created_at);
                    sent.partitions.push(partition);
                    sent.offsets.push(offset);
                    sent.attempts.push(row.attempts + 1);
                    if row.retried {
                        sent.retried.push(row.id);
                    }
                    *per_topic.entry(row.topic.as_str()).or_default() += 1;
                    let latency = (Utc::now() - row.created_at)
                        .num_microseconds()
                        .unwrap_or(0) as f64
                        / 1e6;
                    self.metrics.commit_to_ack.observe(latency.max(0.0));
                }
                Err(error) => {
                    let permanent = is_permanent(&error);
                    let attempts = row.attempts + 1;
                    // A batch-mate's refusal can fail a good record, so only a failure of the
                    // record sent alone counts as the last one.
                    let dead = permanent && row.solo && attempts >= self.max_attempts;
                    let delay =
                        exponential_backoff(attempts as u32, self.retry_base, self.retry_max);
                    failed.ids.push(row.id);
                    failed.created.push(row.created_at);
                    failed.keys.push(row.key.clone());
                    let state = if dead {
                        OutboxState::Dead
                    } else {
                        OutboxState::Retry
                    };
                    failed.states.push(state.code().to_owned());
                    failed.attempts.push(attempts);
                    failed.errors.push(error.to_string());
                    failed
                        .kinds
                        .push(if permanent { "permanent" } else { "transient" }.to_owned());
                    failed.delays_ms.push(delay.as_millis() as i64);
                    self.metrics
                        .failures
                        .with_label_values(&[if permanent { "permanent" } else { "transient" }])
                        .inc();
                    if dead {
                        self.metrics.dead.inc();
                        tracing::error!(outbox_id = row.id, attempts, %error, "row is dead: non-transient error after the last attempt");
                    }
                }
            }
        }
        let send_ms = send_started.elapsed().as_secs_f64() * 1000.0;
        for (topic, n) in &per_topic {
            self.metrics
                .published
                .with_label_values(&[topic])
                .inc_by(*n);
        }
        let mark_started = std::time::Instant::now();
        let marks = Marks {
            pool: self.pool.clone(),
            metrics: self.metrics.clone(),
            expected_version: cursor.version,
            cursor,
            sent,
            held,
            failed,
        };
        if marks.failed.ids.is_empty() && !rows.is_empty() {
            pipeline.make_room().await?;
            // Every row was sent, so what it marks is the batch as claimed.
            pipeline.marking.push_back(Marking {
                in_flight: this_batch,
                task: tokio::spawn(marks.write_until_done(leadership.clone())),
            });
            let next = match claimed_meanwhile {
                Some(claimed) => claimed?,
                None => {
                    let marking = pipeline.unmarked();
                    self.claimer.claim(&mut pipeline.reading, &marking).await?
                }
            };
            pipeline.next = Some(next);
            tracing::debug!(sent = rows.len(), "batch published");
        } else {
            pipeline.settle().await?;
            // Written before the next batch is sent (or anything else claimed), so that its
            // failed keys hold back there.
            marks.write().await?;
            match claimed_meanwhile {
                Some(Ok(mut next)) => {
                    let retry = OutboxState::Retry.code();
                    let failed_keys: HashSet<&str> = (marks.failed.keys.iter())
                        .zip(&marks.failed.states)
                        .filter(|(_, state)| *state == retry)
                        .map(|(key, _)| key.as_str())
                        .collect();
                    next.hold_behind(&failed_keys);
                    pipeline.next = Some(next);
                }
                _ => pipeline.reading = before_claim,
            }
            if let Some(first_error) = marks.failed.errors.first() {
                tracing::warn!(sent = marks.sent.ids.len(), failed = marks.failed.ids.len(), %first_error, "batch partly failed; failed rows turned X (or D)");
            }
        }
        tracing::debug!(
            rows = handled,
            claim_ms,
            send_ms,
            claim_ahead_ms,
            sent_early,
            next_claim_ms = mark_started.elapsed().as_secs_f64() * 1000.0,
            "batch timing"
        );
        self.replace_producer_if_fatal();
        Ok(handled)
    }

    /// Sends the rows in id order and returns each one's outcome. Rows flagged `solo` are sent
    /// alone: everything before them is acknowledged first, and they are acknowledged before
    /// anything after them is sent, so per-key order holds around them too.
    async fn send_in_order(
        producer: &FutureProducer,
        rows: &mut [Claimed],
    ) -> Vec<Result<(i32, i64), KafkaError>> {
        let mut outcomes = Vec::with_capacity(rows.len());
        let mut pending = Vec::new();
        for row in rows {
            if let Some(enqueued) = row.early.take() {
                pending.push(enqueued);
            } else if row.solo {
                outcomes.extend(Self::acknowledged(std::mem::take(&mut pending)).await);
                let alone = vec![enqueue(producer, row).await];
                outcomes.extend(Self::acknowledged(alone).await);
            } else {
                pending.push(enqueue(producer, row).await);
                if pending.len() % ENQUEUE_SLICE == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
        outcomes.extend(Self::acknowledged(pending).await);
        outcomes
    }

    async fn acknowledged(pending: Vec<Enqueued>) -> Vec<Result<(i32, i64), KafkaError>> {
        let mut outcomes = Vec::with_capacity(pending.len());
        for delivery in pending {
            outcomes.push(match delivery {
                Ok(future) => match future.await {
                    Ok(Ok(delivery)) => Ok((delivery.partition, delivery.offset)),
                    Ok(Err((error, _))) => Err(error),
                    Err(_) => Err(KafkaError::Canceled),
                },
                Err(error) => Err(error),
            });
        }
        outcomes
    }

    /// A fatal idempotent-producer error poisons the instance: drop it and start a new one. The
    /// rows of its purged records were marked X above and will be sent again.
    fn replace_producer_if_fatal(&self) {
        let producer = self.producer();
        if let Some((code, reason)) = producer.client().fatal_error() {
            tracing::error!(
                ?code,
                reason,
                "fatal Kafka producer error; recreating the producer"
            );
            match Self::create_producer(&self.brokers, self.send_timeout) {
                Ok(fresh) => *self.producer.lock().expect("producer lock") = fresh,
                Err(error) => tracing::error!(%error, "cannot recreate the Kafka producer"),
            }
        }
    }
}

async fn enqueue(producer: &FutureProducer, row: &Claimed) -> Enqueued {
    let Some(payload) = &row.payload else {
        return Err(KafkaError::MessageProduction(
            RDKafkaErrorCode::InvalidMessage,
        ));
    };
    // The contract's three headers first (absent ones empty, as before), then whatever else
    // the publisher gave (outbox.publish's `headers`).
    let header = |name: &str| {
        row.headers
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    let mut headers = OwnedHeaders::new_with_capacity(3);
    for name in [HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_CORRELATION_ID] {
        headers = headers.insert(Header {
            key: name,
            value: Some(header(name)),
        });
    }
    if let Some(extra) = row.headers.as_object() {
        for (name, value) in extra {
            let contract = [HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_CORRELATION_ID];
            if let (false, Some(value)) = (contract.contains(&name.as_str()), value.as_str()) {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value),
                });
            }
        }
    }
    let mut record = FutureRecord::to(&row.topic)
        .key(&row.key)
        .payload(payload)
        .headers(headers);
    loop {
        match producer.send_result(record) {
            Ok(future) => return Ok(future),
            // librdkafka's local queue is full: wait for deliveries to drain it.
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((error, _)) => return Err(error),
        }
    }
}

/// Enqueues what a batch claimed during the sends of the batch before may send at once: the
/// rows of every key that batch has no row of (`busy_keys`). The rest waits for the batch before
/// to be acknowledged, as before: each key's rows still reach Kafka in id order, and a failure
/// there still holds its key back ([`Batch::hold_behind`]). Returns how many were enqueued.
///
/// Waiting for the batch before made an event wait for up to two acknowledgements: its batch
/// was claimed during one and sent after it. Nothing is sent early from a batch with a `solo`
/// row (sent alone, after everything before it), or with a topic not known to exist yet.
async fn send_early(
    batch: &mut Batch,
    producer: &FutureProducer,
    known_topics: &HashSet<String>,
    busy_keys: &HashSet<String>,
) -> usize {
    let rows = &mut batch.rows;
    let early = |r: &Claimed| !busy_keys.contains(&r.key);
    if !rows.iter().any(early)
        || rows
            .iter()
            .any(|r| r.solo || !known_topics.contains(&r.topic))
    {
        return 0;
    }
    // Before the first send: the spans rewrite each event's `traceparent`.
    let (span, per_event) = batch_spans(rows);
    let mut sent = 0;
    for (i, row) in rows.iter_mut().enumerate() {
        if early(row) {
            row.early = Some(enqueue(producer, row).instrument(span.clone()).await);
            sent += 1;
            if i % ENQUEUE_SLICE == 0 {
                tokio::task::yield_now().await;
            }
        }
    }
    batch.spans = Some((span, per_event));
    sent
}

/// Reads the next batch; cloned into the task that claims during a batch's sends.
#[derive(Clone)]
struct Claimer {
    pool: PgPool,
    batch_size: i64,
}

impl Claimer {
    /// The next batch: due `unsent` rows behind the cursor (without those in `in_flight`, sent
    /// and not yet marked), then the final events beyond it, in id order. Advances `reading` to
    /// the cursor the batch's marks will commit.
    async fn claim(
        &self,
        reading: &mut Reading,
        in_flight: &InFlight,
    ) -> Result<Batch, BatchError> {
        let client = self.pool.get().await?;
        let cursor = match reading.cursor {
            Some(cursor) => cursor,
            None => {
                let cursor = Cursor::from_row(&client.query_one(LOAD_CURSOR, &[]).await?);
                reading.cursor = Some(cursor);
                cursor
            }
        };
        // Prepared: planning these cost about as much as running them for small batches, and an
        // unprepared statement takes two round trips.
        let snapshot_xmin = client.prepare_cached(SNAPSHOT_XMIN).await?;
        let xmin: i64 = client.query_one(&snapshot_xmin, &[]).await?.get(0);
        let unsent = client.prepare_cached(CLAIM_UNSENT).await?;
        let mut rows: Vec<Claimed> = client
            .query(
                &unsent,
                &[
                    &self.batch_size,
                    &in_flight.ids,
                    &cursor.xmin_done,
                    &cursor.id_done,
                ],
            )
            .await?
            .iter()
            .map(|r| Claimed {
                id: r.get(0),
                topic: r.get(1),
                key: r.get(2),
                payload: r.get(3),
                headers: r.get(4),
                attempts: r.get(5),
                created_at: r.get(6),
                solo: r.get::<_, Option<bool>>(7).unwrap_or(false),
                retried: true,
                early: None,
            })
            .collect();
        let mut handled = rows.len();
        let mut held = Vec::new();
        let mut next = cursor;
        let limit = (self.batch_size - rows.len() as i64).max(0);
        let claim = client.prepare_cached(CLAIM_CURSOR).await?;
        let found = client
            .query(
                &claim,
                &[
                    &limit,
                    &cursor.xmin_done,
                    &cursor.id_done,
                    &xmin,
                    &cursor.ahead_xid,
                    &in_flight.held_keys,
                ],
            )
            .await?;
        let sent_ids: HashSet<i64> = in_flight.ids.iter().copied().collect();
        for r in &found {
            let id: i64 = r.get(0);
            let event = Found {
                id,
                xid: r.get(9),
                in_flight: sent_ids.contains(&id),
                own: r.get(6),
                key_held: r.get(7),
                sent: r.get(8),
            };
            let (passed, counts) = next.pass(xmin, &event);
            handled += usize::from(counts);
            match passed {
                Passed::Skip => {}
                Passed::HoldBack => held.push(HeldBack {
                    id: event.id,
                    created_at: r.get(5),
                    key: r.get(2),
                }),
                Passed::Send => rows.push(Claimed {
                    id: event.id,
                    topic: r.get(1),
                    key: r.get(2),
                    payload: r.get(3),
                    headers: r.get(4),
                    attempts: 0,
                    created_at: r.get(5),
                    solo: false,
                    retried: false,
                    early: None,
                }),
            }
        }
        next.xmin_done = xmin;
        next.forget_passed();
        rows.sort_by_key(|r| r.id);
        reading.cursor = Some(next);
        Ok(Batch {
            rows,
            held,
            handled,
            cursor: next,
            spans: None,
        })
    }
}

#[derive(Default)]
struct Sent {
    ids: Vec<i64>,
    created: Vec<DateTime<Utc>>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    attempts: Vec<i32>,
    /// The sent rows that came from `unsent`.
    retried: Vec<i64>,
}

/// Where the leader reads: its cursor, None until loaded from `relay_cursor`.
#[derive(Debug, Default, Clone, Copy)]
struct Reading {
    cursor: Option<Cursor>,
}

/// The batch whose marks are being written, the batch claimed meanwhile, and the cursor.
#[derive(Default)]
struct Pipeline {
    marking: VecDeque<Marking>,
    next: Option<Batch>,
    reading: Reading,
}

struct Marking {
    /// The rows it marks sent or puts in `unsent` as held back, and their keys.
    in_flight: InFlight,
    task: tokio::task::JoinHandle<Result<(), BatchError>>,
}

impl Pipeline {
    /// Batches whose marks may be in flight at once: one, since each mark moves the cursor from
    /// the version the one before left. The next claim excludes its unsent rows.
    const MAX_MARKING: usize = 1;

    /// Waits until every mark in flight is committed.
    async fn settle(&mut self) -> Result<(), BatchError> {
        while let Some(marking) = self.marking.pop_front() {
            marking.finish().await?;
        }
        Ok(())
    }

    /// Collects the marks already written, and waits for the oldest while the pipeline is full.
    async fn make_room(&mut self) -> Result<(), BatchError> {
        while let Some(oldest) = self.marking.front() {
            if !oldest.task.is_finished() && self.marking.len() < Self::MAX_MARKING {
                break;
            }
            if let Some(marking) = self.marking.pop_front() {
                marking.finish().await?;
            }
        }
        Ok(())
    }

    /// The rows sent, and the keys held back, whose marks are not known to be committed.
    fn unmarked(&self) -> InFlight {
        let mut unmarked = InFlight::default();
        for marking in &self.marking {
            unmarked.extend(&marking.in_flight);
        }
        unmarked
    }
}

/// What a claim must not take as unhandled: the rows sent or held back by batches whose marks
/// are not written yet, and the keys those batches hold back. A held row reaches `unsent` only
/// with its batch's mark; until then, a newer row of its key must be held back too, or it would
/// overtake it (found by `rows_arriving_while_their_keys_retried_rows_are_sent_keep_their_order`:
/// the mark before had removed the key's last unsent row, so nothing in `unsent` held the newer
/// one).
#[derive(Debug, Default)]
struct InFlight {
    /// Sent or held back: the claim passes them.
    ids: Vec<i64>,
    held_keys: Vec<String>,
}

impl InFlight {
    /// A batch claimed but not marked yet.
    fn of(rows: &[Claimed], held: &[HeldBack]) -> Self {
        InFlight {
            ids: rows
                .iter()
                .map(|r| r.id)
                .chain(held.iter().map(|h| h.id))
                .collect(),
            held_keys: held.iter().map(|h| h.key.clone()).collect(),
        }
    }

    fn extend(&mut self, other: &InFlight) {
        self.ids.extend_from_slice(&other.ids);
        self.held_keys.extend_from_slice(&other.held_keys);
    }
}

impl Marking {
    async fn finish(self) -> Result<(), BatchError> {
        self.task.await.unwrap_or(Err(BatchError::MarkAbandoned))
    }
}

/// A batch's outcome, written in one statement ([`MARK_BATCH`]).
struct Marks {
    pool: PgPool,
    metrics: Metrics,
    expected_version: i64,
    cursor: Cursor,
    sent: Sent,
    held: Vec<HeldBack>,
    failed: Failed,
}

impl Marks {
    async fn write(&self) -> Result<(), BatchError> {
        match self.write_with(&MARK_BATCH).await {
            Err(BatchError::Query(error))
                if error.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
            {
                tracing::warn!(%error, "a sent row already has a sent fact; marking again, keeping it");
                self.write_with(&MARK_BATCH_HEALING).await
            }
            other => other,
        }
    }

    async fn write_with(&self, statement: &str) -> Result<(), BatchError> {
        let client = self.pool.get().await?;
        let mark = client.prepare_cached(statement).await?;
        let (sent, failed) = (&self.sent, &self.failed);
        let held_ids: Vec<i64> = self.held.iter().map(|h| h.id).collect();
        let held_created: Vec<DateTime<Utc>> = self.held.iter().map(|h| h.created_at).collect();
        let held_keys: Vec<&str> = self.held.iter().map(|h| h.key.as_str()).collect();
        let row = client
            .query_one(
                &mark,
                &[
                    &self.cursor.xmin_done,
                    &self.cursor.id_done,
                    &self.expected_version,
                    &sent.ids,
                    &sent.created,
                    &sent.partitions,
                    &sent.offsets,
                    &sent.attempts,
                    &sent.retried,
                    &held_ids,
                    &held_created,
                    &held_keys,
                    &failed.ids,
                    &failed.created,
                    &failed.keys,
                    &failed.states,
                    &failed.attempts,
                    &failed.errors,
                    &failed.kinds,
                    &failed.delays_ms,
                    &self.cursor.ahead_xid,
                    &self.cursor.ahead_max_xid,
                    &self.cursor.ahead_max_id,
                ],
            )
            .await?;
        let (moved, appended): (i64, i64) = (row.get(0), row.get(1));
        if moved != 1 {
            return Err(BatchError::CursorMoved);
        }
        let resent = sent.ids.len() as u64 - appended as u64;
        if resent > 0 {
            self.metrics.resent.inc_by(resent);
            tracing::warn!(
                events = resent,
                "events sent again although already marked sent: Kafka has them twice (consumers drop the second by event id); their unsent entries are gone"
            );
        }
        Ok(())
    }

    /// Retries until written: the next batch is already in Kafka, so giving up would send these
    /// rows again after it. Only a lost leadership, or a cursor another relay moved, ends the
    /// attempts (the rows are then sent again).
    async fn write_until_done(self, leadership: CancellationToken) -> Result<(), BatchError> {
        let mut backoff = Backoff::new();
        loop {
            match self.write().await {
                Ok(()) => return Ok(()),
                Err(BatchError::CursorMoved) => return Err(BatchError::CursorMoved),
                Err(error) if leadership.is_cancelled() => return Err(error),
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, rows = self.sent.ids.len(), retry_in_ms = delay.as_millis() as u64, "sent rows not marked yet");
                    sleep_or_cancel(delay, &leadership).await;
                }
            }
        }
    }
}

#[derive(Default)]
struct Failed {
    ids: Vec<i64>,
    created: Vec<DateTime<Utc>>,
    keys: Vec<String>,
    states: Vec<String>,
    attempts: Vec<i32>,
    errors: Vec<String>,
    kinds: Vec<String>,
    delays_ms: Vec<i64>,
}

/// Why a batch could not be claimed or marked. Its rows stay as they were and are sent again.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("PostgreSQL is unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("PostgreSQL error: {}", outbox_core::db::describe(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("the task writing a batch's marks ended abnormally")]
    MarkAbandoned,
    #[error("the task claiming the next batch ended abnormally")]
    ClaimAbandoned,
    #[error("another relay moved the cursor (this one no longer leads)")]
    CursorMoved,
}

#[cfg(test)]
mod tests {
    use super::*;

    const XMIN: i64 = 1_000;

    #[test]
    fn an_announced_relay_looks_again_at_doubling_intervals_until_every_earlier_writer_is_done() {
        let poll = Duration::from_secs(1);
        let announced = Idle::announced(XMIN);
        // A transaction with an id below the one read at the announcement still runs.
        let (wait, next) = announced.sleep(XMIN - 1, poll);
        assert_eq!(wait, ANNOUNCE_GRACE);
        let (wait, next) = next.sleep(XMIN - 1, poll);
        assert_eq!(wait, ANNOUNCE_GRACE * 2);
        let (wait, next) = next.sleep(XMIN - 1, poll);
        assert_eq!(wait, ANNOUNCE_GRACE * 4);
        // The intervals never pass the poll's, nor the next due row's.
        let mut stage = next;
        for _ in 0..20 {
            let wait;
            (wait, stage) = stage.sleep(XMIN - 1, poll);
            assert!(wait <= poll);
        }
        let soon = Duration::from_millis(5);
        assert_eq!(announced.sleep(XMIN - 1, soon).0, soon);
        // The last claim's snapshot is past every such transaction: it saw their events.
        assert_eq!(stage.sleep(XMIN, poll), (poll, Idle::Asleep));
        assert_eq!(announced.sleep(XMIN + 5, poll), (poll, Idle::Asleep));
        // Asleep, and when the announcement failed: the whole wait.
        assert_eq!(Idle::Asleep.sleep(XMIN - 1, poll), (poll, Idle::Asleep));
        assert_eq!(Idle::Busy.sleep(XMIN - 1, poll), (poll, Idle::Busy));
    }

    #[test]
    fn an_idle_relay_looks_again_at_doubling_intervals_before_it_asks_for_a_notify() {
        let waits: Vec<Option<Duration>> = (0..=QUIET_LOOKS).map(quiet_look).collect();
        assert_eq!(
            waits,
            [Some(1), Some(2), Some(4), None].map(|ms| ms.map(Duration::from_millis))
        );
    }

    fn cursor() -> Cursor {
        Cursor {
            xmin_done: 900,
            id_done: 10,
            version: 3,
            ahead_xid: i64::MAX,
            ahead_max_xid: 0,
            ahead_max_id: 0,
        }
    }

    fn event(id: i64, xid: i64) -> Found {
        Found {
            id,
            xid,
            in_flight: false,
            own: false,
            key_held: false,
            sent: false,
        }
    }

    #[test]
    fn a_final_unsent_event_is_sent_and_moves_the_cursor() {
        let mut next = cursor();
        assert_eq!(next.pass(XMIN, &event(11, 950)), (Passed::Send, true));
        assert_eq!((next.id_done, next.ahead_xid), (11, i64::MAX));
    }

    #[test]
    fn a_committed_event_above_the_xmin_is_sent_ahead_of_the_cursor() {
        let mut next = cursor();
        assert_eq!(next.pass(XMIN, &event(12, 1_005)), (Passed::Send, true));
        assert_eq!(next.id_done, 10, "not final: the cursor stays");
        assert_eq!(
            (next.ahead_xid, next.ahead_max_xid, next.ahead_max_id),
            (1_005, 1_005, 12)
        );
    }

    #[test]
    fn an_event_behind_an_unsent_row_of_its_key_is_held_back() {
        let mut next = cursor();
        let e = Found {
            key_held: true,
            ..event(11, 950)
        };
        assert_eq!(next.pass(XMIN, &e), (Passed::HoldBack, true));
        assert_eq!(next.id_done, 11);
    }

    #[test]
    fn an_event_already_sent_or_owned_by_unsent_is_skipped_and_counts_once_final() {
        // In flight: sent ahead by the batch whose marks are being written. Once final there is
        // nothing to send, but the cursor moved over it, so the batch must be marked.
        let already: [fn(Found) -> Found; 3] = [
            |e| Found {
                in_flight: true,
                ..e
            },
            |e| Found { sent: true, ..e },
            |e| Found { own: true, ..e },
        ];
        for (xid, counts, id_done) in [(950, true, 11), (1_001, false, 10)] {
            for mark in already {
                let (mut next, e) = (cursor(), mark(event(11, xid)));
                assert_eq!(next.pass(XMIN, &e), (Passed::Skip, counts), "{e:?}");
                assert_eq!(next.id_done, id_done, "{e:?}");
            }
        }
    }

    fn claimed(id: i64, key: &str, retried: bool) -> Claimed {
        Claimed {
            id,
            topic: "orders".into(),
            key: key.into(),
            payload: Some("{}".into()),
            headers: Value::Null,
            attempts: 0,
            created_at: Utc::now(),
            solo: false,
            retried,
            early: None,
        }
    }

    #[test]
    fn a_batch_claimed_during_a_failed_one_holds_back_the_failed_keys_and_leaves_their_unsent_rows()
    {
        let mut batch = Batch {
            rows: vec![
                claimed(3, "a", true),
                claimed(10, "a", false),
                claimed(11, "b", false),
                claimed(12, "a", false),
                claimed(13, "c", false),
            ],
            held: vec![],
            handled: 5,
            cursor: cursor(),
            spans: None,
        };
        batch.hold_behind(&HashSet::from(["a", "c"]));
        let sent: Vec<i64> = batch.rows.iter().map(|r| r.id).collect();
        let held: Vec<(i64, &str)> = batch.held.iter().map(|h| (h.id, h.key.as_str())).collect();
        assert_eq!(sent, [11]);
        assert_eq!(held, [(10, "a"), (12, "a"), (13, "c")]);
        // The unsent row stays in `unsent` for a later claim: not handled by this batch.
        assert_eq!(batch.handled, 4);
    }

    #[test]
    fn a_batch_claimed_during_a_good_one_is_unchanged() {
        let mut batch = Batch {
            rows: vec![claimed(3, "a", true), claimed(10, "b", false)],
            held: vec![],
            handled: 2,
            cursor: cursor(),
            spans: None,
        };
        batch.hold_behind(&HashSet::new());
        assert_eq!(batch.rows.len(), 2);
        assert!(batch.held.is_empty());
        assert_eq!(batch.handled, 2);
    }
}
