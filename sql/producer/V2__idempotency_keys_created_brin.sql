-- The producer deletes idempotency keys older than IDEMPOTENCY_KEY_RETENTION. Keys arrive in time
-- order, so a BRIN index (next to nothing per insert) lets each batch read only the old end of
-- the table instead of all of it.
create index if not exists idempotency_keys_created_brin on idempotency_keys using brin (created_at);
