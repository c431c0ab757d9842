-- outbox.publish calls outbox.uuid_v7() twice (the event id and, when none is given, the
-- correlation id) and, when no topic is given, outbox.route(). Both were SQL functions with a SET
-- clause: PostgreSQL never inlines such a function and keeps no plan for it across calls, so it
-- parsed, analysed and planned their bodies on every call of publish (the parser was among the
-- publishing backends' hottest functions in `perf`). Measured with pgbench, 4 clients, one
-- publish of 1 KiB of data a transaction, each pair in the same minute:
--   with a topic:  3,000-4,200 publishes/s before, 4,300-6,900 with uuid_v7 inlined;
--   routed:        3,600-4,000 with route in SQL, 4,400-4,800 in PL/pgSQL (uuid_v7 inlined).
--
-- uuid_v7 drops its SET clause so that it is inlined into the expression that calls it, planned
-- once with it. It still runs as its caller (it is not SECURITY DEFINER), and it names its
-- functions, operators and types by schema (overlay, substring and extract are syntax, always
-- pg_catalog's) so that a caller's search_path cannot change what it does when called directly.
-- Inlined into publish, it is parsed under publish's own search_path.
create or replace function outbox.uuid_v7() returns uuid
language sql volatile parallel safe
as $$
    select pg_catalog.encode(
        pg_catalog.set_bit(pg_catalog.set_bit(pg_catalog.set_bit(pg_catalog.set_bit(
            overlay(pg_catalog.uuid_send(pg_catalog.gen_random_uuid())
                    placing substring(pg_catalog.int8send(pg_catalog.floor(
                        extract(epoch from pg_catalog.clock_timestamp()) operator(pg_catalog.*) 1000
                    )::pg_catalog.int8) from 3)
                    from 1 for 6),
            52, 1), 53, 1), 54, 1), 55, 0),
        'hex')::pg_catalog.uuid
$$;

-- PL/pgSQL keeps a function's plans for the session; its SET clause stays.
create or replace function outbox.route(event_type text) returns text
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
    return (select r.topic from outbox.routes r
             where case when right(r.pattern, 1) = '*' then starts_with(route.event_type, left(r.pattern, -1))
                        else r.pattern = route.event_type end
             order by r.position
             limit 1);
end $$;
