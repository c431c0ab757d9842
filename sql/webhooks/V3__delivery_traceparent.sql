-- The W3C trace context (`traceparent`) each attempt of a delivery continues: the consumer's span
-- that recorded the event's Kafka record (itself continuing the record's `traceparent` header).
-- Kept with the delivery so that a retry by another consumer instance, or after a restart, stays
-- in the event's trace. Null when spans were not exported while the event was recorded.
alter table deliveries add column if not exists traceparent text;
