-- The append-only outbox: sending an event never rewrites its row (PgQ's idea, adapted).
-- Runs with search_path = outbox.
--
--   events   every event, inserted once by outbox.publish and never updated, with the id of
--            the transaction that wrote it (xid). Range-partitioned by created_at; retention
--            drops whole partitions.
--   outbox_payloads  the envelopes, written beside (partitioned like events, dropped with them).
--   sent     where Kafka put each sent event, appended by the relay a batch at a time (narrow,
--            partitioned like events, dropped with them).
--   unsent   the few events the relay's cursor passed but did not send: held back behind an
--            older row of their key (P), failed and waiting for a retry (X), or dead (D).
--   relay_cursor  how far the relay has read: every event with xid < xmin_done and id <= id_done
--            was handled (sent, or put in unsent). Only the leader moves it.
--   outbox   a view with the columns the old table had: the state a reader sees (P/E/X/D) is
--            derived from the pieces above.
--
-- Why the cursor is safe: a transaction whose xid is below the xmin of a snapshot has ended, so
-- every event with xid < xmin is final (committed and visible, or rolled back) and the cursor may
-- pass it. A transaction that commits late (began before, committed after later ones) is still
-- found, because its xid is at or above the cursor's xmin until it ends. Committed events of
-- newer transactions are sent ahead of the cursor (in id order with the rest), so a long
-- transaction does not delay them: it costs reading them again, and their sent facts, on every
-- claim until it ends.

alter table outbox rename to outbox_v2;
alter table outbox_payloads rename to outbox_payloads_v2;
alter index if exists outbox_payloads_pkey rename to outbox_payloads_v2_pkey;

create sequence events_id_seq as bigint;

create table events (
    id           bigint      not null default nextval('outbox.events_id_seq'),
    xid          xid8        not null default pg_current_xact_id(),
    event_id     text        not null,
    event_type   text        not null,
    aggregate_id text        not null,
    topic        text        not null,
    headers      jsonb       not null default '{}'::jsonb,
    created_at   timestamptz not null default now(),
    primary key (id, created_at)
) partition by range (created_at);
alter sequence events_id_seq owned by events.id;
-- Late commits and the rows a long transaction holds back are found by their writer.
create index events_xid on events (xid);
-- Rows stamped before any partition covered their time (the relay makes partitions ahead; see
-- outbox.ensure_partitions) land here; retention deletes their sent rows one by one.
create table events_default partition of events default;

create table outbox_payloads (
    outbox_id  bigint      not null,
    created_at timestamptz not null default now(),
    payload    json        not null,
    primary key (outbox_id, created_at)
) partition by range (created_at);
create table outbox_payloads_default partition of outbox_payloads default;

create table sent (
    id              bigint      not null,
    created_at      timestamptz not null,
    kafka_partition integer     not null,
    kafka_offset    bigint      not null,
    attempts        integer     not null default 1,
    sent_at         timestamptz not null default now(),
    primary key (id, created_at)
) partition by range (created_at);
create table sent_default partition of sent default;

create table unsent (
    id              bigint      primary key,
    created_at      timestamptz not null,
    aggregate_id    text        not null,
    state           char(1)     not null check (state in ('P', 'X', 'D')),
    attempts        integer     not null default 0,
    last_error      text,
    last_error_kind text check (last_error_kind in ('transient', 'permanent')),
    next_attempt_at timestamptz not null default now()
);
create index unsent_key on unsent (aggregate_id) where state in ('P', 'X');
create index unsent_due on unsent (next_attempt_at) include (aggregate_id, id) where state in ('P', 'X');
create index unsent_created on unsent (created_at);

create table relay_cursor (
    one           boolean primary key default true check (one),
    xmin_done     xid8    not null,
    id_done       bigint  not null,
    version       bigint  not null default 0,
    -- Events committed but not final yet (a transaction with a lower xid still ran) are sent
    -- ahead of the cursor. Those beyond it have xids from ahead_xid to ahead_max_xid and ids up
    -- to ahead_max_id: the cursor looks for their sent facts when it reaches them.
    ahead_xid     bigint,
    ahead_max_xid bigint,
    ahead_max_id  bigint
);

-- The range partitions, so that retention knows their bounds without parsing the catalog.
create table partitions (
    lower         timestamptz primary key,
    upper         timestamptz not null,
    events_part   text        not null,
    payloads_part text        not null,
    sent_part     text        not null
);

-- The release before: its rows move over with their ids and states. A P or X row is still sent
-- (from unsent, where it keeps its attempts and next attempt time), E keeps its partition and
-- offset, D stays dead. They count as behind the cursor (xid 0).
do $$
declare
    newest timestamptz;
    bound  timestamptz;
begin
    select max(created_at) into newest from outbox_v2;
    if newest is not null then
        -- A partition of their own, not the default one: the relay's partitions then never have
        -- to scan them, and retention drops them at once when they are all old and sent.
        bound := greatest(clock_timestamp(), newest + interval '1 microsecond');
        create table events_legacy (like events);
        execute format('alter table outbox.events attach partition outbox.events_legacy for values from (minvalue) to (%L)', bound);
        create table outbox_payloads_legacy (like outbox_payloads);
        execute format('alter table outbox.outbox_payloads attach partition outbox.outbox_payloads_legacy for values from (minvalue) to (%L)', bound);
        create table sent_legacy (like sent);
        execute format('alter table outbox.sent attach partition outbox.sent_legacy for values from (minvalue) to (%L)', bound);
        insert into partitions (lower, upper, events_part, payloads_part, sent_part)
        values ('-infinity', bound, 'events_legacy', 'outbox_payloads_legacy', 'sent_legacy');
    end if;
    insert into events (id, xid, event_id, event_type, aggregate_id, topic, headers, created_at)
    select o.id, '0'::xid8, o.event_id, o.event_type, o.aggregate_id, o.topic, o.headers, o.created_at
      from outbox_v2 o;
    insert into outbox_payloads (outbox_id, created_at, payload)
    select o.id, o.created_at, p.payload from outbox_v2 o join outbox_payloads_v2 p on p.outbox_id = o.id;
    insert into sent (id, created_at, kafka_partition, kafka_offset, attempts, sent_at)
    select id, created_at, coalesce(kafka_partition, 0), coalesce(kafka_offset, -1),
           greatest(attempts, 1), coalesce(sent_at, created_at)
      from outbox_v2 where state = 'E';
    insert into unsent (id, created_at, aggregate_id, state, attempts, last_error, last_error_kind, next_attempt_at)
    select id, created_at, aggregate_id, state, attempts, last_error, last_error_kind, next_attempt_at
      from outbox_v2 where state in ('P', 'X', 'D');
    perform setval('outbox.events_id_seq', greatest((select max(id) from outbox_v2), 1),
                   (select max(id) from outbox_v2) is not null);
    insert into relay_cursor (xmin_done, id_done)
    values (pg_snapshot_xmin(pg_current_snapshot()), coalesce((select max(id) from outbox_v2), 0));
end $$;
drop table outbox_payloads_v2;
drop table outbox_v2;

-- What readers see, as the old table had it.
create view outbox as
select e.id, e.event_id, e.event_type, e.aggregate_id, e.topic, e.headers,
       (case when s.id is not null then 'E' else coalesce(u.state, 'P') end)::char(1) as state,
       coalesce(s.attempts, u.attempts, 0) as attempts,
       case when s.id is null then u.last_error end as last_error,
       case when s.id is null then u.last_error_kind end as last_error_kind,
       coalesce(case when s.id is null then u.next_attempt_at end, e.created_at) as next_attempt_at,
       s.kafka_partition, s.kafka_offset, e.created_at, s.sent_at
  from events e
  left join sent s on s.id = e.id and s.created_at = e.created_at
  left join unsent u on u.id = e.id;

-- Hand edits through the view (operators, tests, the producer's retry of a dead row) land in the
-- pieces: a state set by hand is a fact like the relay's.
create or replace function outbox.outbox_edited() returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    if new.created_at is distinct from old.created_at then
        update outbox.events set created_at = new.created_at where id = old.id;
        update outbox.outbox_payloads set created_at = new.created_at where outbox_id = old.id;
        update outbox.sent set created_at = new.created_at where id = old.id;
        update outbox.unsent set created_at = new.created_at where id = old.id;
    end if;
    if new.state = 'E' then
        delete from outbox.unsent where id = old.id;
        insert into outbox.sent as s (id, created_at, kafka_partition, kafka_offset, attempts, sent_at)
        values (old.id, new.created_at, coalesce(new.kafka_partition, 0), coalesce(new.kafka_offset, -1),
                greatest(new.attempts, 1), coalesce(new.sent_at, now()))
        on conflict (id, created_at) do update
           set kafka_partition = excluded.kafka_partition, kafka_offset = excluded.kafka_offset,
               attempts = excluded.attempts, sent_at = excluded.sent_at;
    elsif new.state in ('P', 'X', 'D') then
        delete from outbox.sent where id = old.id;
        if new.state <> 'P' or old.state <> 'P' or new.attempts <> old.attempts
           or new.next_attempt_at is distinct from old.next_attempt_at
           or exists (select 1 from outbox.unsent where id = old.id) then
            insert into outbox.unsent as u (id, created_at, aggregate_id, state, attempts, last_error,
                                            last_error_kind, next_attempt_at)
            values (old.id, new.created_at, old.aggregate_id, new.state, new.attempts, new.last_error,
                    new.last_error_kind, new.next_attempt_at)
            on conflict (id) do update
               set state = excluded.state, attempts = excluded.attempts, last_error = excluded.last_error,
                   last_error_kind = excluded.last_error_kind, next_attempt_at = excluded.next_attempt_at;
        end if;
    else
        raise exception 'outbox: state must be P, E, X or D' using errcode = '23514';
    end if;
    return new;
end $$;
create trigger outbox_edited instead of update on outbox
    for each row execute function outbox.outbox_edited();

-- Deleting an event by hand removes it with its facts; events are only written by outbox.publish.
create or replace function outbox.outbox_deleted() returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    if tg_op = 'INSERT' then
        raise exception 'outbox: events are written by outbox.publish' using errcode = '0A000';
    end if;
    delete from outbox.unsent where id = old.id;
    delete from outbox.sent where id = old.id and created_at = old.created_at;
    delete from outbox.outbox_payloads where outbox_id = old.id and created_at = old.created_at;
    delete from outbox.events where id = old.id and created_at = old.created_at;
    return old;
end $$;
create trigger outbox_deleted instead of insert or delete on outbox
    for each row execute function outbox.outbox_deleted();

-- Partitions: [lower, upper) of events, outbox_payloads and sent, made empty and attached (which locks the
-- parents only in SHARE UPDATE EXCLUSIVE mode, so publishers are not blocked).
create or replace function outbox.add_partition(lower timestamptz, upper timestamptz) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    suffix text := to_char(lower at time zone 'UTC', 'YYYYMMDD"T"HH24MISSUS');
begin
    execute format('create table outbox.%I (like outbox.events)', 'events_' || suffix);
    execute format('alter table outbox.events attach partition outbox.%I for values from (%L) to (%L)',
                   'events_' || suffix, lower, upper);
    execute format('create table outbox.%I (like outbox.outbox_payloads)', 'payloads_' || suffix);
    execute format('alter table outbox.outbox_payloads attach partition outbox.%I for values from (%L) to (%L)',
                   'payloads_' || suffix, lower, upper);
    execute format('create table outbox.%I (like outbox.sent)', 'sent_' || suffix);
    execute format('alter table outbox.sent attach partition outbox.%I for values from (%L) to (%L)',
                   'sent_' || suffix, lower, upper);
    insert into outbox.partitions values (lower, upper, 'events_' || suffix, 'payloads_' || suffix, 'sent_' || suffix);
end $$;

-- Makes partitions up to `ahead` from now, aligned on multiples of `span` (since the epoch). A
-- partition never starts before a moment a little after it is made (a span, at most a minute):
-- events stamped earlier (a transaction that began before) go to the default partition.
-- Returns how many were made.
create or replace function outbox.ensure_partitions(span interval, ahead interval) returns integer
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    made  integer := 0;
    last  timestamptz;
    lower timestamptz;
    upper timestamptz;
    secs  float8 := extract(epoch from span);
begin
    if secs <= 0 then
        raise exception 'outbox.ensure_partitions: span must be positive' using errcode = '22023';
    end if;
    loop
        select max(p.upper) into last from outbox.partitions p;
        -- Not now but a little later: a publisher stamping a row after the chosen bound, whose
        -- insert still routes by the partitions as they were before the attach, would fail.
        lower := greatest(coalesce(last, '-infinity'), clock_timestamp() + least(span, interval '1 minute'));
        exit when lower >= clock_timestamp() + ahead or made >= 64;
        upper := to_timestamp((floor(extract(epoch from lower) / secs) + 1) * secs);
        perform outbox.add_partition(lower, upper);
        made := made + 1;
    end loop;
    return made;
end $$;

-- Drops every partition whose time range ended before `cut` and whose events are all handled
-- and sent (none beyond the cursor, none in unsent): the envelopes and sent facts go at once,
-- without dead rows. Returns how many events went.
create or replace function outbox.drop_old_partitions(cut timestamptz) returns bigint
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    p       record;
    c       record;
    pending boolean;
    n       bigint;
    dropped bigint := 0;
begin
    select * into c from outbox.relay_cursor;
    for p in select * from outbox.partitions where upper <= cut order by lower loop
        if exists (select 1 from outbox.unsent u where u.created_at >= p.lower and u.created_at < p.upper) then
            continue;
        end if;
        execute format('select exists (select 1 from outbox.%I where xid >= $1 or id > $2)', p.events_part)
           into pending using c.xmin_done, c.id_done;
        if pending then
            continue;
        end if;
        execute format('select count(*) from outbox.%I', p.events_part) into n;
        execute format('drop table outbox.%I, outbox.%I, outbox.%I', p.events_part, p.payloads_part, p.sent_part);
        delete from outbox.partitions where lower = p.lower;
        dropped := dropped + n;
    end loop;
    return dropped;
end $$;

-- The cursor's wait: the age of the oldest transaction still running in the cluster that holds
-- an xid (the one with the oldest xid: the snapshot's xmin), 0 when none. Any writer counts, in
-- any database of the cluster, since xids are shared. Other roles' sessions are seen only with
-- pg_read_all_stats (or as superuser).
create or replace function outbox.snapshot_xmin_age() returns float8
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    select coalesce((
        select extract(epoch from clock_timestamp() - w.started)::float8
          from (select xact_start as started, age(backend_xid) as xids
                  from pg_stat_activity where backend_xid is not null
                union all
                select prepared, age(transaction) from pg_prepared_xacts) w
         order by w.xids desc
         limit 1), 0)
$$;

-- The ids of the events not sent yet (P or X; D too with `with_dead`): those in unsent, and
-- those beyond the committed cursor without a sent fact. Cheap however many events were sent.
create or replace function outbox.unsent_ids(with_dead boolean default false) returns setof bigint
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    select id from outbox.unsent where state in ('P', 'X') or (with_dead and state = 'D')
    union all
    select e.id from outbox.events e, outbox.relay_cursor c
     where (e.id > c.id_done or e.xid >= c.xmin_done)
       and not exists (select 1 from outbox.unsent u where u.id = e.id)
       and not exists (select 1 from outbox.sent s where s.id = e.id and s.created_at = e.created_at)
$$;

-- outbox.publish as in V2, writing the append-only events table.
create or replace function outbox.publish(
    event_type     text,
    key            text,
    data           jsonb,
    topic          text default null,
    headers        jsonb default null,
    correlation_id text default null,
    source         text default null
) returns text
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    max_key_bytes     constant integer := 256;
    max_data_depth    constant integer := 64;
    max_payload_bytes constant integer := 1000000;
    v_id          text := 'evt_' || replace(outbox.uuid_v7()::text, '-', '');
    v_topic       text;
    v_correlation text;
    v_headers     jsonb;
    v_envelope    json;
    v_data_text   text := publish.data::text;
    v_row         bigint;
begin
    if publish.event_type is null or length(publish.event_type) > 128
       or publish.event_type !~ '^[a-z0-9_]+(\.[a-z0-9_]+)+$' then
        raise exception 'outbox.publish: event_type must be dot-separated lowercase words, like order.created'
            using errcode = '22023';
    end if;
    if publish.key is null or publish.key = '' or octet_length(publish.key) > max_key_bytes then
        raise exception 'outbox.publish: key (the aggregate id) must be 1 to % bytes', max_key_bytes
            using errcode = case when octet_length(publish.key) > max_key_bytes then '54000' else '22023' end;
    end if;
    if publish.data is null or jsonb_typeof(publish.data) <> 'object' then
        raise exception 'outbox.publish: data must be a JSON object'
            using errcode = '22023';
    end if;
    -- Nesting needs an opening bracket per level: with few of them, the walk is not needed.
    if length(v_data_text) - length(translate(v_data_text, '[{', '')) > max_data_depth
       and outbox.json_depth(publish.data, max_data_depth) > max_data_depth then
        raise exception 'outbox.publish: data nests more than % levels', max_data_depth
            using errcode = '54000';
    end if;
    if publish.correlation_id is not null and publish.correlation_id !~ '^[!-~]{1,128}$' then
        raise exception 'outbox.publish: correlation_id must be 1 to 128 visible ASCII characters'
            using errcode = '22023';
    end if;
    if publish.source is not null and (publish.source = '' or length(publish.source) > 128) then
        raise exception 'outbox.publish: source must be 1 to 128 characters'
            using errcode = '22023';
    end if;
    if publish.headers is not null and (
        jsonb_typeof(publish.headers) <> 'object'
        or exists (select 1 from jsonb_each(publish.headers) h(name, value)
                    where jsonb_typeof(h.value) <> 'string' or h.name !~ '^[!-~]{1,128}$'
                       or octet_length(h.value #>> '{}') > 4096)
        or (select count(*) from jsonb_object_keys(publish.headers)) > 32) then
        raise exception 'outbox.publish: headers must be a JSON object of at most 32 string values, named by 1 to 128 visible ASCII characters'
            using errcode = '22023';
    end if;
    if publish.topic is not null then
        if publish.topic !~ '^[a-zA-Z0-9._-]{1,249}$' or publish.topic in ('.', '..') then
            raise exception 'outbox.publish: topic must be 1 to 249 of [a-zA-Z0-9._-]'
                using errcode = '22023';
        end if;
        v_topic := publish.topic;
    else
        v_topic := outbox.route(publish.event_type);
        if v_topic is null then
            raise exception 'outbox.publish: no topic is routed for event type %', publish.event_type
                using errcode = 'OB001', hint = 'add a rule to outbox.routes (TOPIC_ROUTES) or pass topic';
        end if;
    end if;
    v_correlation := coalesce(publish.correlation_id,
                              'req_' || replace(outbox.uuid_v7()::text, '-', ''));
    v_envelope := json_build_object(
        'id', v_id,
        'event', publish.event_type,
        'version', '1.0',
        'idempotency_key', publish.event_type || '-' || publish.key || '-' || v_id,
        'timestamp', to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
        'data', publish.data,
        'metadata', json_build_object(
            'source', coalesce(publish.source, 'sql'),
            'environment', coalesce(nullif(current_setting('outbox.environment', true), ''), 'dev'),
            'correlation_id', v_correlation));
    if octet_length(v_envelope::text) > max_payload_bytes then
        raise exception 'outbox.publish: the event is % bytes; at most % are accepted',
            octet_length(v_envelope::text), max_payload_bytes
            using errcode = '54000';
    end if;
    -- The contract's three headers win over the caller's of the same names.
    v_headers := coalesce(publish.headers, '{}'::jsonb) || jsonb_build_object(
        'event_id', v_id, 'event_type', publish.event_type, 'correlation_id', v_correlation);
    insert into outbox.events (event_id, event_type, aggregate_id, topic, headers)
    values (v_id, publish.event_type, publish.key, v_topic, v_headers)
    returning id into v_row;
    insert into outbox.outbox_payloads (outbox_id, payload) values (v_row, v_envelope);
    -- Delivered at commit, and only if the caller's transaction commits.
    perform pg_notify('outbox', '');
    return v_id;
end $$;
revoke all on function outbox.publish(text, text, jsonb, text, jsonb, text, text) from public;
grant execute on function outbox.publish(text, text, jsonb, text, jsonb, text, text) to outbox_publisher;
revoke all on function outbox.outbox_edited() from public;
revoke all on function outbox.outbox_deleted() from public;
revoke all on function outbox.add_partition(timestamptz, timestamptz) from public;
revoke all on function outbox.ensure_partitions(interval, interval) from public;
revoke all on function outbox.drop_old_partitions(timestamptz) from public;
revoke all on function outbox.snapshot_xmin_age() from public;
revoke all on function outbox.unsent_ids(boolean) from public;
