-- Producer side: the domain table, the transactional outbox and idempotency keys.

create table messages (
    id             uuid primary key,
    content        text        not null,
    aggregate_id   text        not null,
    event_type     text        not null,
    event_id       text        not null unique,
    outbox_id      bigint      not null,
    data           jsonb,
    correlation_id text        not null,
    created_at     timestamptz not null default now()
);
create index messages_created on messages (created_at desc, id desc);

-- States (contract): P pending, E sent, X error (retried at next_attempt_at), D dead (replayable).
create table outbox (
    id              bigint generated always as identity primary key,
    -- Unique by construction (UUIDv7); not indexed, because every mark would have to update
    -- that index too. Messages find their row by outbox_id.
    event_id        text        not null,
    event_type      text        not null,
    aggregate_id    text        not null,
    topic           text        not null,
    payload         json        not null,
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
-- Envelopes that make a row longer than ~2 KB (PostgreSQL's fixed toasting threshold) go out of
-- line, uncompressed, so that marking the row sent does not copy them. Smaller ones stay inline.
alter table outbox alter column payload set storage external;
alter table outbox set (toast_tuple_target = 128);
-- Finding due rows stays cheap however many sent rows pile up: only unsent rows are indexed.
create index outbox_unsent on outbox (id) include (next_attempt_at, aggregate_id) where state in ('P', 'X');
-- Rows waiting for a later retry, by time: the few keys that must hold back (per-key order), and
-- when the relay should wake next.
create index outbox_unsent_due on outbox (next_attempt_at) include (aggregate_id, id) where state in ('P', 'X');
create index outbox_dead on outbox (id) where state = 'D';
-- Retention finds old rows by creation time. A BRIN index costs next to nothing per write (a
-- btree on sent_at would add one more index insert to every "marked sent" update).
create index outbox_created_brin on outbox using brin (created_at);

create table idempotency_keys (
    key           text primary key,
    request_hash  text        not null,
    response_code integer     not null,
    response_body jsonb       not null,
    created_at    timestamptz not null default now()
);
