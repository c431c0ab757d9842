-- The producer's demo domain (messages) and its idempotency keys. Runs with search_path =
-- producer; tables of the releases that kept everything in public are moved here.

do $$
begin
    -- Set by the migration runner on a database the legacy release made (its history in
    -- public.schema_migrations): only tables of ours move, an application's own are never touched.
    if current_setting('outbox.legacy_public', true) = 'on' then
        alter table public.messages set schema producer;
        alter table public.idempotency_keys set schema producer;
    end if;
end $$;

create table if not exists messages (
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
create index if not exists messages_created on messages (created_at desc, id desc);

create table if not exists idempotency_keys (
    key           text primary key,
    request_hash  text        not null,
    response_code integer     not null,
    response_body jsonb       not null,
    created_at    timestamptz not null default now()
);
