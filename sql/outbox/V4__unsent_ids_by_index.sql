-- outbox.unsent_ids() read every event: its `id > id_done or xid >= xmin_done`, against the cursor
-- joined as a table, gave the planner nothing to use an index with, so each call scanned every
-- partition (measured: 250 ms at 300,000 events), and the relay's backlog gauges call it every
-- 5 s on every instance, the producer's /stats and /outbox?state= on every request. Now the
-- events beyond the cursor are read as two index ranges (by id on the primary keys, by writer on
-- events_xid), planned for the cursor's values as constants: as unknown parameters the planner
-- guesses a third of the table and scans it all. The cost follows the unsent events, not the
-- sent ones.
create or replace function outbox.unsent_ids(with_dead boolean default false) returns setof bigint
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
    c record;
begin
    select xmin_done, id_done into c from outbox.relay_cursor;
    return query
        select id from outbox.unsent where state in ('P', 'X') or (with_dead and state = 'D');
    return query execute format(
        'select b.id from (
                select e.id, e.created_at from outbox.events e where e.id > %1$s
                union all
                select e.id, e.created_at from outbox.events e where e.xid >= %2$L::xid8 and e.id <= %1$s
            ) b
          where not exists (select 1 from outbox.unsent u where u.id = b.id)
            and not exists (select 1 from outbox.sent s where s.id = b.id and s.created_at = b.created_at)',
        c.id_done, c.xmin_done);
end $$;
