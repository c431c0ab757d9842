-- The consumer: inbox (dedupe by event id), poison records, endpoints, deliveries, attempts and
-- the endpoints' circuit breakers. Runs with search_path = webhooks; tables of the releases that
-- kept everything in public are moved here (the breakers table was shared with the notifier:
-- the endpoints' rows are moved, and the table goes once the notifier has taken its own).

do $$
begin
    -- Set by the migration runner on a database the legacy release made (its history in
    -- public.schema_migrations): only tables of ours move, an application's own are never touched.
    if current_setting('outbox.legacy_public', true) = 'on' then
        alter table public.inbox set schema webhooks;
        alter table public.poison_records set schema webhooks;
        alter table public.endpoints set schema webhooks;
        alter table public.deliveries set schema webhooks;
        alter table public.delivery_attempts set schema webhooks;
    end if;
end $$;

create table if not exists inbox (
    event_id        text primary key,
    event_type      text        not null,
    topic           text        not null,
    kafka_partition integer     not null,
    kafka_offset    bigint      not null,
    correlation_id  text,
    -- The envelope exactly as read from Kafka: json keeps those bytes (jsonb would reorder and
    -- respace them), so every attempt signs and sends the same body.
    payload         json        not null,
    received_at     timestamptz not null default now()
);
-- Retention reads only the old end of the inbox (rows arrive in time order).
create index if not exists inbox_received_brin on inbox using brin (received_at);

create table if not exists poison_records (
    id              bigint generated always as identity primary key,
    topic           text        not null,
    kafka_partition integer     not null,
    kafka_offset    bigint      not null,
    error           text        not null,
    payload         bytea,
    received_at     timestamptz not null default now(),
    unique (topic, kafka_partition, kafka_offset)
);

create table if not exists endpoints (
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

-- state: pending (waiting for next_attempt_at), succeeded, dead. leased_until marks a delivery an
-- instance is sending now; an expired lease is claimable again. No foreign key to the inbox: every
-- delivery is inserted by the statement that inserts its inbox row, and the check cost a lookup
-- and a row lock per delivery.
create table if not exists deliveries (
    id              bigint generated always as identity primary key,
    event_id        text        not null,
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
create index if not exists deliveries_due on deliveries (next_attempt_at, id) where state = 'pending';
create index if not exists deliveries_dead on deliveries (endpoint_id, updated_at) where state = 'dead';

create table if not exists delivery_attempts (
    id            bigint generated always as identity primary key,
    delivery_id   bigint      not null,
    attempt       integer     not null,
    status_code   integer,
    latency_ms    integer     not null,
    error         text,
    response_body text,
    attempted_at  timestamptz not null default now()
);
create index if not exists delivery_attempts_delivery on delivery_attempts (delivery_id, attempt);

-- Circuit breakers of the endpoints (scope 'endpoint'), shared by every consumer instance.
create table if not exists circuit_breakers (
    scope         text        not null,
    name          text        not null,
    state         text        not null default 'CLOSED' check (state in ('CLOSED', 'OPEN', 'HALF_OPEN')),
    failure_count integer     not null default 0,
    success_count integer     not null default 0,
    opened_at     timestamptz,
    probe_until   timestamptz,
    updated_at    timestamptz not null default now(),
    primary key (scope, name)
);

do $$
begin
    if current_setting('outbox.legacy_public', true) = 'on'
       and to_regclass('public.circuit_breakers') is not null then
        insert into circuit_breakers select * from public.circuit_breakers where scope = 'endpoint'
            on conflict do nothing;
        delete from public.circuit_breakers where scope = 'endpoint';
    end if;
end $$;
