-- Every delivery is inserted by the statement that inserts its inbox row, and every attempt by the
-- dispatcher holding its delivery's lease: these two foreign keys only re-checked that, at the
-- price of a lookup and a row lock per delivery and per attempt, about a tenth of the consumer's
-- PostgreSQL time. Deleting an endpoint deletes its deliveries' attempts explicitly.
alter table deliveries drop constraint deliveries_event_id_fkey;
alter table delivery_attempts drop constraint delivery_attempts_delivery_id_fkey;
