-- The outbox: what publishers write (inside their own transactions) and the relay reads.
-- Runs with search_path = outbox. A database made by the releases that kept every table in public
-- has its tables moved here, rows, indexes and sequences with them; otherwise they are created.

do $$
begin
    -- Set by the migration runner on a database the legacy release made (its history in
    -- public.schema_migrations): only tables of ours move, an application's own are never touched.
    if current_setting('outbox.legacy_public', true) = 'on' then
        alter table public.outbox set schema outbox;
        alter table public.outbox_payloads set schema outbox;
    end if;
end $$;

-- States (contract): P pending, E sent, X error (retried at next_attempt_at), D dead (replayable).
create table if not exists outbox (
    id              bigint generated always as identity primary key,
    -- Unique by construction (UUIDv7); not indexed, because every mark would have to update
    -- that index too. Messages find their row by outbox_id.
    event_id        text        not null,
    event_type      text        not null,
    aggregate_id    text        not null,
    topic           text        not null,
    headers         jsonb       not null default '{}'::jsonb,
    state           char(1)     not null default 'P' check (state in ('P', 'E', 'X', 'D')),
    attempts        integer     not null default 0,
    last_error      text,
    -- transient or permanent: a row that last failed permanently is retried alone, so that a
    -- record Kafka refuses cannot take its batch-mates down with it.
    last_error_kind text check (last_error_kind in ('transient', 'permanent')),
    next_attempt_at timestamptz not null default now(),
    kafka_partition integer,
    kafka_offset    bigint,
    created_at      timestamptz not null default now(),
    sent_at         timestamptz
);
-- Finding due rows stays cheap however many sent rows pile up: only unsent rows are indexed.
create index if not exists outbox_unsent on outbox (id) include (next_attempt_at, aggregate_id) where state in ('P', 'X');
-- Rows waiting for a later retry, by time: the few keys that must hold back (per-key order), and
-- when the relay should wake next.
create index if not exists outbox_unsent_due on outbox (next_attempt_at) include (aggregate_id, id) where state in ('P', 'X');
create index if not exists outbox_dead on outbox (id) where state = 'D';
-- Retention finds old rows by creation time. A BRIN index costs next to nothing per write (a
-- btree on sent_at would add one more index insert to every "marked sent" update).
create index if not exists outbox_created_brin on outbox using brin (created_at);

-- The envelope lives in a table of its own, written once and only read by the relay's claim.
-- Marking a row sent then copies a ~200-byte row instead of one that carries the envelope, and
-- the next claim steps over the old versions on narrow pages: on the 2-core test machine a claim
-- plus mark of 2,000 rows of 1 KiB took 25 ms instead of 55 ms (pgbench, the relay's statements).
create table if not exists outbox_payloads (
    outbox_id bigint primary key,
    payload   json   not null
);
