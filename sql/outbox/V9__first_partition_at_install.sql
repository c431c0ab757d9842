-- A new outbox gets its first partition at once, covering every time up to an hour from now; the
-- relay makes the next ones from there (or from a minute after it starts, if that is later).
--
-- Without it, every event written before the relay's first partition landed in the default
-- partition, and attaching any partition later scans the default partitions under an ACCESS
-- EXCLUSIVE lock on them (the lock on the parent is only SHARE UPDATE EXCLUSIVE, but that does not
-- spare the default): publishers routed there and every claim of the relay wait for the scan.
-- Measured in the Debezium benchmark, where the relay started on a fresh outbox under load: the
-- attach a minute in, after 450,000 events, stopped publishers and the relay for 0.8 s, and the
-- attaches before it failed on their lock timeout with claims queued behind them each time.
--
-- An hour, not a minute: the relay's first attach has to get its lock (waiting at most 200 ms for
-- it), and while a backlog drains its claims and its metrics' count of unsent events hold the
-- default partitions for up to seconds. Measured with a minute: the relay's first two attaches
-- timed out, and events written after that minute went to the default partition again.
--
-- Only when no partition exists and the default ones are empty: nobody has published yet, so no
-- insert can still be routed by the partitions as they were before (see ensure_partitions).
do $$
declare
    bound timestamptz := clock_timestamp() + interval '1 hour';
begin
    if exists (select 1 from partitions) or exists (select 1 from events_default)
       or exists (select 1 from sent_default) then
        return;
    end if;
    create table events_initial (like events);
    execute format('alter table outbox.events attach partition outbox.events_initial for values from (minvalue) to (%L)', bound);
    create table sent_initial (like sent);
    execute format('alter table outbox.sent attach partition outbox.sent_initial for values from (minvalue) to (%L)', bound);
    insert into partitions (lower, upper, events_part, sent_part)
    values ('-infinity', bound, 'events_initial', 'sent_initial');
end $$;

-- Attaching still locks the default partitions and scans them: cheap while they stay empty,
-- which they do unless the relay made no partitions for longer than it makes them ahead.
comment on table events_default is
    'Events stamped when no partition covered their time (before the first, or after the relay made none for longer than two spans). Attaching a partition scans this table under an ACCESS EXCLUSIVE lock.';
