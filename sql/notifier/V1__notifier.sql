-- The notifier: events it accepted (dedupe per route and webhook id), the notifications it sent,
-- and its channels' circuit breakers. Runs with search_path = notifier; tables of the releases
-- that kept everything in public are moved here.

do $$
begin
    -- Set by the migration runner on a database the legacy release made (its history in
    -- public.schema_migrations): only tables of ours move, an application's own are never touched.
    if current_setting('outbox.legacy_public', true) = 'on' then
        alter table public.received_events set schema notifier;
        alter table public.notifications set schema notifier;
    end if;
end $$;

create table if not exists received_events (
    webhook_id     text        not null,
    route          text        not null,
    event_type     text,
    payload        jsonb       not null,
    received_at    timestamptz not null default now(),
    -- A stable order for keyset pagination (newest first) that received_at alone cannot give.
    seq            bigint generated always as identity,
    -- The X-Correlation-Id of the request that delivered the event, to find its logs.
    correlation_id text,
    -- Per route, so an event delivered to both /webhooks/logger and /webhooks/notify is handled
    -- once by each.
    primary key (route, webhook_id)
);
create unique index if not exists received_events_seq on received_events (seq);

create table if not exists notifications (
    id         bigint generated always as identity primary key,
    webhook_id text        not null,
    channel    text        not null,
    outcome    text        not null,
    error      text,
    created_at timestamptz not null default now()
);
create index if not exists notifications_webhook on notifications (webhook_id);
-- "Was this channel already notified for this event?" on every retry of a webhook.
create index if not exists notifications_sent on notifications (webhook_id, channel) where outcome = 'sent';

-- Circuit breakers of the notification channels (scope 'channel').
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
        insert into circuit_breakers select * from public.circuit_breakers where scope = 'channel'
            on conflict do nothing;
        delete from public.circuit_breakers where scope = 'channel';
    end if;
end $$;
