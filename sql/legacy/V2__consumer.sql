-- Consumer side: inbox (dedupe by event id), poison records, endpoints, deliveries and attempts.

create table inbox (
    event_id        text primary key,
    event_type      text        not null,
    topic           text        not null,
    kafka_partition integer     not null,
    kafka_offset    bigint      not null,
    correlation_id  text,
    payload         jsonb       not null,
    received_at     timestamptz not null default now()
);

create table poison_records (
    id              bigint generated always as identity primary key,
    topic           text        not null,
    kafka_partition integer     not null,
    kafka_offset    bigint      not null,
    error           text        not null,
    payload         bytea,
    received_at     timestamptz not null default now(),
    unique (topic, kafka_partition, kafka_offset)
);

create table endpoints (
    id                         text primary key,
    url                        text        not null,
    description                text,
    event_types                text[]      not null,
    secret                     text        not null,
    previous_secret            text,
    previous_secret_expires_at timestamptz,
    enabled                    boolean     not null default true,
    rate_limit_per_second      integer,
    created_at                 timestamptz not null default now(),
    updated_at                 timestamptz not null default now()
);

-- state: pending (waiting for next_attempt_at), succeeded, dead.
-- leased_until marks a delivery a dispatcher is sending now; an expired lease is claimable again,
-- so a crashed instance hands its work back by itself.
create table deliveries (
    id              bigint generated always as identity primary key,
    event_id        text        not null references inbox (event_id),
    endpoint_id     text        not null references endpoints (id) on delete cascade,
    state           text        not null default 'pending' check (state in ('pending', 'succeeded', 'dead')),
    attempts        integer     not null default 0,
    next_attempt_at timestamptz not null default now(),
    leased_until    timestamptz,
    last_status     integer,
    last_error      text,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now(),
    delivered_at    timestamptz,
    unique (event_id, endpoint_id)
);
create index deliveries_due on deliveries (next_attempt_at, id) where state = 'pending';
create index deliveries_dead on deliveries (endpoint_id, updated_at) where state = 'dead';

create table delivery_attempts (
    id            bigint generated always as identity primary key,
    delivery_id   bigint      not null references deliveries (id) on delete cascade,
    attempt       integer     not null,
    status_code   integer,
    latency_ms    integer     not null,
    error         text,
    response_body text,
    attempted_at  timestamptz not null default now()
);
create index delivery_attempts_delivery on delivery_attempts (delivery_id, attempt);
