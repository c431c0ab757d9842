-- Circuit breakers, shared by every instance: scope 'endpoint' (consumer) or 'channel' (notifier).
create table circuit_breakers (
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

-- Notifier: events it accepted (dedupe by webhook id) and the notifications it sent.
create table received_events (
    webhook_id  text primary key,
    route       text        not null,
    event_type  text,
    payload     jsonb       not null,
    received_at timestamptz not null default now()
);

create table notifications (
    id         bigint generated always as identity primary key,
    webhook_id text        not null,
    channel    text        not null,
    outcome    text        not null,
    error      text,
    created_at timestamptz not null default now()
);
create index notifications_webhook on notifications (webhook_id);
