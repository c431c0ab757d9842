-- The webhook body is the envelope exactly as read from Kafka. json keeps those bytes (jsonb would
-- reorder keys and respace them), so every attempt of a delivery sends and signs the same body
-- whether it is sent straight from the consumer's memory or read back for a retry; and storing it
-- only validates it instead of parsing it into jsonb.
alter table inbox alter column payload type json using payload::json;
