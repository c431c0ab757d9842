-- Why a pending delivery waits, as a fact instead of a guess from next_attempt_at:
--   null               waiting for its retry time (or due now), or leased (leased_until) and being sent;
--   'breaker'          held while its endpoint's circuit breaker is open; next_attempt_at is when a
--                      probe may go; a breaker reset releases exactly these;
--   'endpoint_disabled' parked while its endpoint is disabled; next_attempt_at is 'infinity' so the
--                      dispatchers' due-index scan never walks over it; enabling releases exactly these.
alter table deliveries add column if not exists held_by text
    check (held_by in ('breaker', 'endpoint_disabled'));

update deliveries set held_by = 'endpoint_disabled'
 where state = 'pending' and next_attempt_at = 'infinity';

-- Before this column a breaker hold was recognised by "never attempted, not leased, due later,
-- endpoint's breaker not closed": the same rule, applied once.
update deliveries d set held_by = 'breaker'
  from circuit_breakers b
 where b.scope = 'endpoint' and b.name = d.endpoint_id and b.state <> 'CLOSED'
   and d.state = 'pending' and d.held_by is null and d.leased_until is null
   and d.attempts = 0 and d.next_attempt_at > now() and d.next_attempt_at <> 'infinity';
