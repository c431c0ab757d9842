-- Publishing from any service (contract): outbox.publish(...) inside the caller's transaction
-- builds the envelope, writes the outbox rows and wakes the relay at commit. Runs with
-- search_path = outbox.

-- Event type → topic, first match by position wins: an exact type, a prefix ending in '*', or
-- '*'. The producer writes TOPIC_ROUTES here at start-up, so SQL callers route as it does.
create table if not exists routes (
    position integer primary key,
    pattern  text not null,
    topic    text not null
);

-- A time-ordered UUID (version 7: 48 bits of Unix milliseconds, then random bits), as the Rust
-- side makes them, so event ids sort by creation time whoever wrote them.
create or replace function outbox.uuid_v7() returns uuid
language sql volatile parallel safe
set search_path = pg_catalog, pg_temp
as $$
    select encode(
        set_bit(set_bit(set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    placing substring(int8send(floor(extract(epoch from clock_timestamp()) * 1000)::bigint) from 3)
                    from 1 for 6),
            52, 1), 53, 1), 54, 1), 55, 0),
        'hex')::uuid
$$;

-- The topic of an event type by the rules in outbox.routes, or null.
create or replace function outbox.route(event_type text) returns text
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    select r.topic from outbox.routes r
     where case when right(r.pattern, 1) = '*' then starts_with($1, left(r.pattern, -1))
                else r.pattern = $1 end
     order by r.position
     limit 1
$$;

-- How deeply a JSON value nests: 0 for a scalar, 1 for [] or {"a": 1}. Stops counting past
-- `limit`, so a hostile value costs no more than the limit's worth of levels.
create or replace function outbox.json_depth(value jsonb, lim integer) returns integer
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
declare
    depth integer := 0;
    level jsonb[] := array[value];
begin
    loop
        level := array(
            select c from unnest(level) v,
                   lateral (select e from jsonb_array_elements(case when jsonb_typeof(v) = 'array' then v end) e
                            union all
                            select e from jsonb_each(case when jsonb_typeof(v) = 'object' then v end) x(k, e)) c(c)
            where jsonb_typeof(c) in ('array', 'object'));
        -- Every value of this level that is a container adds a level.
        if depth = 0 and jsonb_typeof(value) not in ('array', 'object') then
            return 0;
        end if;
        depth := depth + 1;
        exit when cardinality(level) = 0 or depth > lim;
    end loop;
    return depth;
end $$;

-- Errors (stable SQLSTATEs, so callers can tell them apart):
--   22023 invalid_parameter_value  a missing or malformed argument
--   54000 program_limit_exceeded   key, data depth or envelope size over the limit
--   OB001                          no route for the event type and no topic given
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
    insert into outbox.outbox (event_id, event_type, aggregate_id, topic, headers)
    values (v_id, publish.event_type, publish.key, v_topic, v_headers)
    returning id into v_row;
    insert into outbox.outbox_payloads (outbox_id, payload) values (v_row, v_envelope);
    -- Delivered at commit, and only if the caller's transaction commits.
    perform pg_notify('outbox', '');
    return v_id;
end $$;

-- Least privilege: a role that may call outbox.publish and nothing else. Functions are
-- executable by everyone unless revoked; the outbox tables are reachable only through it.
do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'outbox_publisher') then
        create role outbox_publisher nologin;
    end if;
end $$;
revoke all on function outbox.publish(text, text, jsonb, text, jsonb, text, text) from public;
revoke all on function outbox.uuid_v7() from public;
revoke all on function outbox.route(text) from public;
revoke all on function outbox.json_depth(jsonb, integer) from public;
grant usage on schema outbox to outbox_publisher;
grant execute on function outbox.publish(text, text, jsonb, text, jsonb, text, text) to outbox_publisher;
