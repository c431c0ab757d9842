-- pgbench: the producer's own transaction for POST /messages (producer/src/store.rs,
-- create_message without an Idempotency-Key, and outbox_core::outbox::publish_returning_row),
-- as prepared statements (-M prepared), with a unique body each time. Keep it in step with them.
\set n random(1, 2000000000)
begin;
select e as event_id, currval('outbox.events_id_seq') as outbox_id
  from (select outbox.publish(event_type => 'message.created', key => :client_id || '-' || :n,
                              data => jsonb_build_object('message_id', gen_random_uuid(),
                                        'content', 'pgbench ' || :client_id || '-' || :n || ' ' || :filler,
                                        'key', :client_id || '-' || :n, 'data', null),
                              topic => 'messages', headers => null,
                              correlation_id => 'req_pgbench', source => 'producer') as e
        offset 0) p \gset
insert into producer.messages (id, content, aggregate_id, event_type, event_id, outbox_id, data, correlation_id)
values (gen_random_uuid(), 'pgbench ' || :client_id || '-' || :n || ' ' || :filler, :client_id || '-' || :n,
        'message.created', :event_id, :outbox_id, null, 'req_pgbench')
returning created_at;
commit;
