-- Notifier: deduplicate per route, so an event delivered both to /webhooks/logger and to
-- /webhooks/notify (two endpoints of the consumer, the same event id) is handled once by each
-- route rather than the second being mistaken for a duplicate of the first.
alter table received_events drop constraint received_events_pkey;
alter table received_events add primary key (route, webhook_id);

-- A stable order for keyset pagination (newest first) that received_at alone cannot give.
alter table received_events add column seq bigint generated always as identity;
create unique index received_events_seq on received_events (seq);

-- The X-Correlation-Id of the request that delivered the event, to find its logs.
alter table received_events add column correlation_id text;

-- "Was this channel already notified for this event?" on every retry of a webhook.
create index notifications_sent on notifications (webhook_id, channel) where outcome = 'sent';
