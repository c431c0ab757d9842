//! The relay against a real PostgreSQL and the local Kafka broker.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use outbox_core::testing::plan::{explain_analyze, nodes, rows_read, scans};
use outbox_core::testing::{eventually, kafka_brokers, read_topic};
use support::{contents_by_key, id_counts, message, Pipeline};

#[tokio::test]
async fn a_thousand_concurrent_posts_each_reach_the_topic_once() {
    let p = Pipeline::start(&kafka_brokers(), |_| {}).await;
    let bodies = (0..1000).map(|i| message(format!("m{i}"), None)).collect();
    let ids = p.post_many(bodies, 64).await;
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 1000);
    p.all_sent(1000, Duration::from_secs(60)).await;

    let records = read_topic(&p.topic, 1000, Duration::from_secs(30)).await;
    let counts = id_counts(&records);
    assert_eq!(records.len(), 1000, "each event once");
    assert_eq!(
        counts.keys().collect::<HashSet<_>>(),
        ids.iter().collect::<HashSet<_>>()
    );
    for r in records.iter().take(20) {
        let envelope = r.json();
        assert_eq!(r.header("event_id"), envelope["id"].as_str());
        assert_eq!(r.header("event_type"), Some("message.created"));
        assert_eq!(
            r.header("correlation_id"),
            envelope["metadata"]["correlation_id"].as_str()
        );
        assert_eq!(r.key.as_deref(), envelope["data"]["key"].as_str());
    }
    // Rows carry where Kafka put them.
    let unplaced = p
        .db
        .count("select count(*) from outbox where kafka_offset is null or kafka_partition is null or sent_at is null")
        .await;
    assert_eq!(unplaced, 0);
    let metrics = p.metrics().await;
    assert!(
        metrics.contains(&format!(
            "relay_events_published_total{{topic=\"{}\"}} 1000",
            p.topic
        )),
        "{metrics}"
    );
    assert!(metrics.contains("relay_is_leader 1"));
}

#[tokio::test]
async fn events_of_one_key_keep_their_order() {
    let p = Pipeline::start(&kafka_brokers(), |c| c.batch_size = 7).await;
    let keys = ["k1", "k2", "k3", "k4"];
    let per_key = 30;
    // Each key's messages are posted in sequence; keys interleave.
    futures::future::join_all(keys.iter().map(|key| {
        let p = &p;
        async move {
            for i in 0..per_key {
                p.post(message(format!("{i:03}"), Some(key))).await;
            }
        }
    }))
    .await;
    p.all_sent((keys.len() * per_key) as i64, Duration::from_secs(60))
        .await;
    let records = read_topic(&p.topic, keys.len() * per_key, Duration::from_secs(30)).await;
    let by_key = contents_by_key(&records);
    for key in keys {
        let expected: Vec<String> = (0..per_key).map(|i| format!("{i:03}")).collect();
        assert_eq!(by_key[key], expected, "order of key {key}");
    }
}

#[tokio::test]
async fn an_older_row_waiting_for_retry_holds_back_newer_rows_of_its_key() {
    let mut p = Pipeline::start(&kafka_brokers(), |_| {}).await;
    // Stop the relay so the rows can be arranged before it sees them.
    p.relay.cancel();
    p.relay.kill().await;
    let first = p.post(message("first", Some("held"))).await;
    p.post(message("second", Some("held"))).await;
    p.post(message("other", Some("free"))).await;
    p.db.execute(
        "update outbox set state = 'X', attempts = 1, next_attempt_at = now() + interval '2 seconds' where event_id = $1",
        &[&first],
    )
    .await;
    // A relay of its own election, as a fresh one would be.
    p.relay.config.lock_key = support::rand_key();
    p.relay.start().await;
    eventually(
        "the free key's row sent",
        Duration::from_secs(10),
        || async { (p.count_state("E").await == 1).then_some(()) },
    )
    .await;
    assert_eq!(
        p.db.count("select count(*) from outbox where aggregate_id = 'held' and state = 'E'")
            .await,
        0,
        "the newer 'held' row must wait for the older one"
    );
    p.all_sent(3, Duration::from_secs(15)).await;
    let records = read_topic(&p.topic, 3, Duration::from_secs(20)).await;
    assert_eq!(contents_by_key(&records)["held"], ["first", "second"]);
    p.relay.stop().await;
}

#[tokio::test]
async fn rows_arriving_while_their_keys_retried_rows_are_sent_keep_their_order() {
    // Each key's first row waits for a retry, due one after the other, while rows of every key
    // keep arriving, each key's from a writer of its own. A newer row is held back while the
    // retried one is unsent, and must stay behind it and behind the rows held before it, also
    // while the batches carrying them are in flight and the marks that put them in `unsent`
    // are not written yet.
    let mut p = Pipeline::start(&kafka_brokers(), |c| c.batch_size = 5).await;
    p.relay.cancel();
    p.relay.kill().await;
    let publish = |content: &str, key: &str, topic: &str| {
        format!(
            "select outbox.publish(event_type => 'message.created', key => '{key}', data => '{{\"content\": \"{content}\"}}', topic => '{topic}')"
        )
    };
    let keys: Vec<String> = (0..8).map(|k| format!("k{k}")).collect();
    let client = p.db.client().await;
    for (i, key) in keys.iter().enumerate() {
        client
            .execute(&publish("first", key, &p.topic), &[])
            .await
            .unwrap();
        client
            .execute(
                "update outbox set state = 'X', attempts = 1, next_attempt_at = now() + $2 * interval '1 millisecond' where aggregate_id = $1",
                &[key, &(400.0 + 150.0 * i as f64)],
            )
            .await
            .unwrap();
    }
    p.relay.config.lock_key = support::rand_key();
    p.relay.start().await;
    let per_key = 400;
    futures::future::join_all(keys.iter().map(|key| {
        let p = &p;
        async move {
            let client = p.db.client().await;
            for i in 0..per_key {
                client
                    .execute(&publish(&format!("{i:03}"), key, &p.topic), &[])
                    .await
                    .unwrap();
            }
        }
    }))
    .await;
    let total = keys.len() * (per_key + 1);
    p.all_sent(total as i64, Duration::from_secs(60)).await;
    let records = read_topic(&p.topic, total, Duration::from_secs(30)).await;
    let by_key = contents_by_key(&records);
    for key in &keys {
        let expected: Vec<String> = std::iter::once("first".to_owned())
            .chain((0..per_key).map(|i| format!("{i:03}")))
            .collect();
        assert_eq!(by_key[key], expected, "order of key {key}");
    }
    p.relay.stop().await;
}

#[tokio::test]
async fn a_record_kafka_refuses_turns_dead_after_the_configured_attempts_and_others_flow() {
    let brokers = kafka_brokers();
    let topic = support::topic_refusing_large_records(&brokers).await;
    let db = outbox_core::testing::TestDb::create().await;
    let producer = support::spawn_producer(&db, &topic).await;
    let big = support::refused_content();
    for content in ["small-1", big.as_str(), "small-2"] {
        let body = serde_json::json!({"content": content, "key": content.len().to_string()});
        let created = support::post_message(&producer, body).await;
        assert!(created.is_some(), "the producer answers 201");
    }
    // The relay starts after the posts, so all three share one batch on the one partition: the
    // refused record must not take its batch-mates down with it.
    let mut config = support::relay_config(&db, &brokers, &topic);
    config.max_attempts = 2;
    let relay = support::spawn_relay(&db, config).await;
    eventually(
        "the large row dead, the small ones sent",
        Duration::from_secs(30),
        || async {
            let dead = db
                .count("select count(*) from outbox where state = 'D'")
                .await;
            let sent = db
                .count("select count(*) from outbox where state = 'E'")
                .await;
            (dead == 1 && sent == 2).then_some(())
        },
    )
    .await;
    let row = db
        .client()
        .await
        .query_one(
            "select attempts, last_error from outbox where state = 'D'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    let error: String = row.get(1);
    assert!(error.to_lowercase().contains("too large"), "{error}");
    let metrics = relay.metrics().await;
    assert!(metrics.contains("relay_events_dead_total 1"), "{metrics}");
}

#[tokio::test]
async fn retention_deletes_old_sent_rows_only() {
    let p = Pipeline::start(&kafka_brokers(), |c| {
        c.retention = Duration::from_secs(3600);
        c.retention_interval = Duration::from_millis(100);
    })
    .await;
    // Rows in the default partition, as in an outbox whose relay made no partitions for a while:
    // without the migrations' first partition (dropped while empty) no partition covers the
    // past, nor the next minute.
    p.db.execute("select outbox.drop_old_partitions('infinity')", &[])
        .await;
    let ids = p
        .post_many((0..6).map(|i| message(format!("r{i}"), None)).collect(), 6)
        .await;
    p.all_sent(6, Duration::from_secs(30)).await;
    p.db.execute(
        "update outbox set created_at = now() - interval '3 hours', sent_at = now() - interval '2 hours' where event_id = any($1)",
        &[&ids[..4].to_vec()],
    )
    .await;
    p.db.wait_for_count(
        "old sent rows deleted",
        "select count(*) from outbox",
        2,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        p.db.count("select count(*) from sent").await,
        2,
        "the deleted rows' sent facts go with them"
    );
    // A message whose outbox row is gone still reads as sent.
    let id: uuid::Uuid =
        p.db.client()
            .await
            .query_one("select id from messages where event_id = $1", &[&ids[0]])
            .await
            .unwrap()
            .get(0);
    let view: serde_json::Value = p.producer.get_json(&format!("/messages/{id}")).await;
    assert_eq!(view["state"], "E");
}

#[test]
fn help_shows_no_secret_values() {
    outbox_core::testing::assert_help_hides_secrets(env!("CARGO_BIN_EXE_relay"));
}

#[tokio::test]
async fn a_transaction_that_commits_after_the_cursor_passed_its_id_is_still_sent() {
    let p = Pipeline::start(&kafka_brokers(), |_| {}).await;
    let publish = |key: &str| {
        format!("select outbox.publish(event_type => 'message.created', key => '{key}', data => '{{}}', topic => '{}')", p.topic)
    };
    // `older` takes its xid first; `late` then writes its row (the lower id), `older` writes its
    // own and commits: with `late` the oldest writer left, older's row is final and the cursor
    // passes its id while late's row, below it, is still invisible. Then `late` commits.
    let mut older_client = p.db.client().await;
    let older = older_client.transaction().await.unwrap();
    older
        .query_one("select pg_current_xact_id()", &[])
        .await
        .unwrap();
    let mut late_client = p.db.client().await;
    let late = late_client.transaction().await.unwrap();
    let late_id: String = late.query_one(&publish("late"), &[]).await.unwrap().get(0);
    let older_id: String = older
        .query_one(&publish("older"), &[])
        .await
        .unwrap()
        .get(0);
    older.commit().await.unwrap();
    let older_row: i64 =
        p.db.client()
            .await
            .query_one("select id from outbox where event_id = $1", &[&older_id])
            .await
            .unwrap()
            .get(0);
    eventually(
        "the cursor passed the older transaction's row",
        Duration::from_secs(20),
        || async {
            let done: i64 =
                p.db.client()
                    .await
                    .query_one("select id_done from outbox.relay_cursor", &[])
                    .await
                    .unwrap()
                    .get(0);
            (done >= older_row).then_some(())
        },
    )
    .await;
    assert_eq!(p.count_state("E").await, 1);
    late.commit().await.unwrap();
    p.all_sent(2, Duration::from_secs(20)).await;
    let records = read_topic(&p.topic, 2, Duration::from_secs(20)).await;
    let counts = id_counts(&records);
    assert_eq!(records.len(), 2, "each event once: {counts:?}");
    assert_eq!(counts.get(&late_id), Some(&1));
    assert_eq!(counts.get(&older_id), Some(&1));
}

#[tokio::test]
async fn retention_drops_whole_partitions_and_keeps_the_one_with_an_unsent_row() {
    let p = Pipeline::start(&kafka_brokers(), |c| {
        c.partition_span = Duration::from_secs(1);
        c.retention = Duration::from_secs(2);
        c.retention_interval = Duration::from_millis(100);
    })
    .await;
    // The migrations' first partition covers the first hour, and the relay's one-second
    // partitions follow it; this test wants those from the start, so it drops every partition
    // while all are empty, and the relay makes them again from now.
    p.db.execute("select outbox.drop_old_partitions('infinity')", &[])
        .await;
    let partition_now = || async {
        p.db.count("select count(*) from outbox.partitions where lower <= now() and now() < upper")
            .await
    };
    eventually(
        "a partition covers now",
        Duration::from_secs(10),
        || async { (partition_now().await == 1).then_some(()) },
    )
    .await;
    let first = p
        .post_many((0..3).map(|i| message(format!("a{i}"), None)).collect(), 3)
        .await;
    // The next second is the next partition.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = vec![p.post(message("b", None)).await];
    let partitions_of = |ids: Vec<String>| {
        let db = &p.db;
        async move {
            db.client()
                .await
                .query(
                    "select distinct tableoid::regclass::text from outbox.events where event_id = any($1)",
                    &[&ids],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        }
    };
    let (first_parts, second_parts) = (
        partitions_of(first.clone()).await,
        partitions_of(second.clone()).await,
    );
    assert!(
        first_parts
            .iter()
            .chain(&second_parts)
            .all(|t| !t.contains("default")),
        "{first_parts:?} {second_parts:?}"
    );
    assert!(first_parts.iter().all(|t| !second_parts.contains(t)));
    p.all_sent(4, Duration::from_secs(20)).await;
    // The row of the second partition turns dead: unsent, it keeps its partition.
    p.db.execute(
        "update outbox set state = 'D', attempts = 5, last_error = 'by hand' where event_id = $1",
        &[&second[0]],
    )
    .await;
    p.db.wait_for_count(
        "the first partition dropped",
        "select count(*) from outbox",
        1,
        Duration::from_secs(20),
    )
    .await;
    for table in &first_parts {
        let left =
            p.db.count(&format!(
                "select count(*) from pg_class where oid = to_regclass('{table}')"
            ))
            .await;
        assert_eq!(left, 0, "{table} dropped whole");
    }
    // Long past the retention of the second partition, it stays for its dead row.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(partitions_of(second.clone()).await, second_parts);
    assert_eq!(p.count_state("D").await, 1);
    assert_eq!(
        p.db.count("select count(*) from outbox.events where payload is not null")
            .await,
        1,
        "the dead row keeps its envelope, to be replayed"
    );
    let metrics = p.metrics().await;
    assert!(
        metrics.contains("relay_retention_deleted_total 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_snapshot_xmin_age_grows_while_a_transaction_is_held_open() {
    let p = Pipeline::start(&kafka_brokers(), |_| {}).await;
    let age = || async {
        let metrics = p.metrics().await;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("relay_snapshot_xmin_age_seconds "))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let mut client = p.db.client().await;
    let open = client.transaction().await.unwrap();
    open.query_one("select pg_current_xact_id()", &[])
        .await
        .unwrap();
    let held = std::time::Instant::now();
    let first = eventually("the age passes 3 s", Duration::from_secs(20), || async {
        age().await.filter(|a| *a >= 3.0)
    })
    .await;
    let later = eventually("the age grows", Duration::from_secs(20), || async {
        age().await.filter(|a| *a > first + 2.0)
    })
    .await;
    // At least as old as this transaction (an older one elsewhere in the cluster counts too).
    assert!(
        later >= held.elapsed().as_secs_f64() - 6.0,
        "{later} after {:?}",
        held.elapsed()
    );
    open.commit().await.unwrap();
}

#[tokio::test]
async fn the_committed_cursor_passes_every_event_once_the_writers_stop() {
    // Concurrent writers hold the snapshot's xmin back for a moment now and then, so events are
    // sent ahead of the cursor, at times by the batch whose marks are still being written when
    // the next batch finds them final. The cursor as committed must still reach the last event
    // without any further write: relays that take over, retention and the xmin-age metric read
    // it. Whether a burst ends that way is a matter of timing, so the test makes many bursts.
    // Only final events are asked for: a transaction anywhere in the cluster (another test's)
    // may hold the xmin back, and the cursor rightly waits for it.
    let p = Pipeline::start(&kafka_brokers(), |c| {
        c.batch_size = 10;
        c.poll_interval = Duration::from_millis(50);
    })
    .await;
    let client = p.db.client().await;
    for burst in 1..=12 {
        let bodies = (0..150)
            .map(|i| message(format!("m{burst}-{i}"), Some(&format!("k{}", i % 50))))
            .collect();
        p.post_many(bodies, 64).await;
        p.all_sent(150 * burst, Duration::from_secs(60)).await;
        eventually(
            &format!("the committed cursor past every final event of burst {burst}"),
            Duration::from_secs(5),
            || async {
                let row = client
                    .query_one(
                        "select not exists (
                                   select 1 from events e
                                    where e.xid < pg_snapshot_xmin(pg_current_snapshot())
                                      and (e.id > c.id_done or e.xid >= c.xmin_done)),
                               format('cursor %s; events up to id %s, xid %s; xmin %s',
                                      row(c.*), (select max(id) from events), (select max(xid) from events),
                                      pg_snapshot_xmin(pg_current_snapshot()))
                           from relay_cursor c",
                        &[],
                    )
                    .await
                    .unwrap();
                let passed = row.get::<_, bool>(0);
                if !passed {
                    eprintln!("{}", row.get::<_, String>(1));
                }
                passed.then_some(())
            },
        )
        .await;
    }
}

/// A pipeline whose relay polls once an hour.
async fn polling_hourly() -> Pipeline {
    Pipeline::start(&kafka_brokers(), |c| {
        c.poll_interval = Duration::from_secs(3600);
    })
    .await
}

/// Waits until the relay has asked publishers for a NOTIFY (`relay_cursor.waiting`).
async fn announced(client: &tokio_postgres::Client) {
    eventually(
        "the idle relay announces it waits",
        Duration::from_secs(10),
        || async {
            let row = client
                .query_one("select waiting from relay_cursor", &[])
                .await
                .unwrap();
            row.get::<_, bool>(0).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn an_idle_relay_asks_for_a_notify_and_the_next_publish_wakes_it() {
    // Only a NOTIFY wakes this relay in time.
    let p = polling_hourly().await;
    let client = p.db.client().await;
    for round in 1..=3 {
        // Idle: it asked publishers to wake it (each batch's mark cleared the request)...
        announced(&client).await;
        // ...and the next publish does, long before the poll would have.
        p.post(message(format!("wake {round}"), None)).await;
        p.all_sent(round, Duration::from_secs(10)).await;
    }
}

#[tokio::test]
async fn a_publish_that_missed_the_announcement_is_found_when_its_long_transaction_commits() {
    // Only the relay's own looks find the late event in time.
    let p = polling_hourly().await;
    let admin = p.db.client().await;
    announced(&admin).await;
    // From here on publishers see a busy relay (as just before a batch's mark) and NOTIFY nobody.
    admin
        .execute("update relay_cursor set waiting = false", &[])
        .await
        .unwrap();
    let late = p.db.client().await;
    late.batch_execute("begin").await.unwrap();
    late.query_one(
        "select outbox.publish(event_type => 'message.late', key => 'late', data => '{}', topic => $1)",
        &[&p.topic],
    )
    .await
    .unwrap();
    // The relay busy with another event: it sends it, finds nothing more and announces, while
    // the late event's transaction still runs.
    p.post(message("first", None)).await;
    admin.batch_execute("notify outbox").await.unwrap();
    p.all_sent(1, Duration::from_secs(10)).await;
    announced(&admin).await;
    // Committed long after the relay's first look, without a NOTIFY.
    tokio::time::sleep(Duration::from_millis(300)).await;
    late.batch_execute("commit").await.unwrap();
    p.all_sent(2, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_row_found_both_sent_and_unsent_is_sent_again_once_and_the_relay_goes_on() {
    let p = Pipeline::start(&kafka_brokers(), |_| {}).await;
    let first = p.post(message("first", None)).await;
    p.all_sent(1, Duration::from_secs(15)).await;
    // The state a bug (or a hand) can leave: a sent event that also waits in `unsent`.
    p.db.client()
        .await
        .execute(
            "insert into unsent (id, created_at, aggregate_id, state)
             select id, created_at, aggregate_id, 'P' from events where event_id = $1",
            &[&first],
        )
        .await
        .unwrap();
    let second = p.post(message("second", None)).await;
    // Marking the row again must not fail every batch after it: both end E, nothing unsent. (The
    // view reads E for a row with a sent fact, so the unsent entry is waited for on its own.)
    p.all_sent(2, Duration::from_secs(15)).await;
    p.db.wait_for_count(
        "the unsent entry gone",
        "select count(*) from unsent",
        0,
        Duration::from_secs(15),
    )
    .await;
    let records = read_topic(&p.topic, 3, Duration::from_secs(20)).await;
    let counts = id_counts(&records);
    assert_eq!(counts.get(&first), Some(&2), "sent again, once: {counts:?}");
    assert_eq!(counts.get(&second), Some(&1), "{counts:?}");
    let metrics = p.metrics().await;
    assert!(metrics.contains("relay_events_resent_total 1"), "{metrics}");
}

#[tokio::test]
async fn a_claim_reads_the_events_it_handles_not_the_history_and_sent_facts_by_index() {
    // A claim must cost what it handles, not what the outbox keeps, in the plan PostgreSQL makes
    // for its values and in the one it keeps for any values: read the few events of recent
    // writers by writer, never every event up to the cut by id; and while a transaction holds
    // the snapshot's xmin back, look up whether each event beyond it was sent by a probe, never
    // by reading every sent fact kept (as a hash, or row after row because `sent` looked empty
    // when the plan was made).
    use relay::statements::{Cursor, CLAIM_CURSOR, LOAD_CURSOR, SNAPSHOT_XMIN};
    const HISTORY: i64 = 20_000;
    const AHEAD: i64 = 30;
    let mut p = Pipeline::start(&kafka_brokers(), |_| {}).await;
    // The relay's partitions made, and autovacuum kept off these tables: from here on nothing
    // makes PostgreSQL plan the claim afresh.
    p.db.wait_for_count(
        "the relay's partitions made",
        "select least(count(*), 1) from partitions where lower > '-infinity'",
        1,
        Duration::from_secs(15),
    )
    .await;
    p.db.execute(
        "do $$
         declare t regclass;
         begin
             for t in select inhrelid::regclass from pg_inherits
                       where inhparent in ('events'::regclass, 'sent'::regclass) loop
                 execute format('alter table %s set (autovacuum_enabled = off)', t);
             end loop;
         end $$",
        &[],
    )
    .await;
    // On a connection set up as the relay's are, the claim prepared while the outbox is empty.
    // The plan kept for any values is made at its first run and kept from then on: the relay's
    // statements get theirs a few runs after it starts, here on a fresh outbox.
    let pool = relay::pool(&p.db.url, 1).unwrap();
    let client = pool.get().await.unwrap();
    client
        .batch_execute(&format!(
            "prepare claim(bigint, bigint, bigint, bigint, bigint, text[]) as {CLAIM_CURSOR};
             set plan_cache_mode = force_generic_plan;
             execute claim(4000, 0, 0, 0, 9223372036854775807, '{{}}');"
        ))
        .await
        .unwrap();

    let insert = "insert into events (event_id, event_type, aggregate_id, topic, payload)
                  select $3 || g, 'message.created', 'key-' || (g % 100), $1, '{}'::json
                    from generate_series(1, $2::bigint) g";
    p.db.execute(insert, &[&p.topic, &HISTORY, &"evt_history_"])
        .await;
    p.all_sent(HISTORY, Duration::from_secs(60)).await;
    p.relay.stop().await;

    // Events committed while an older transaction runs: not final, so the claim looks each one
    // up in `sent`.
    let mut holder = p.db.client().await;
    let open = holder.transaction().await.unwrap();
    open.query_one("select pg_current_xact_id()", &[])
        .await
        .unwrap();
    p.db.execute(insert, &[&p.topic, &AHEAD, &"evt_ahead_"])
        .await;

    let cursor = Cursor::from_row(&client.query_one(LOAD_CURSOR, &[]).await.unwrap());
    let xmin: i64 = client.query_one(SNAPSHOT_XMIN, &[]).await.unwrap().get(0);
    // What the claim has to read: the events beyond the cursor. (All of the history, when an
    // older transaction elsewhere in the cluster holds the xmin back from before it.)
    let unhandled: i64 = client
        .query_one(
            "select count(*) from events where id > $1 or xid >= $2::bigint::text::xid8",
            &[&cursor.id_done, &cursor.xmin_done],
        )
        .await
        .unwrap()
        .get(0);
    // The kept plan first (made on the empty outbox), then one made for these values.
    for mode in ["force_generic_plan", "force_custom_plan"] {
        let plan = explain_analyze(
            &client,
            &format!("set plan_cache_mode = {mode}"),
            &format!(
                "execute claim(4000, {}, {}, {xmin}, {}, '{{}}')",
                cursor.xmin_done, cursor.id_done, cursor.ahead_xid
            ),
        )
        .await;
        let events = rows_read(&plan, |r| r.starts_with("events"));
        // How each read of `sent` went: by index, or row after row.
        let sent: Vec<String> = scans(&plan)
            .into_iter()
            .filter(|scan| scan.relation.starts_with("sent"))
            .map(|scan| format!("{} on {}", scan.kind, scan.relation))
            .collect();
        assert!(
            events <= 3.0 * unhandled as f64 + 10.0,
            "{mode}: read {events} events for {unhandled} beyond the cursor ({HISTORY} kept): {plan:#}"
        );
        assert!(
            !sent.is_empty(),
            "{mode}: the events were looked up: {plan:#}"
        );
        assert!(
            sent.iter().all(|r| r.starts_with("Index")),
            "{mode}: {sent:?}, with {HISTORY} sent facts kept: {plan:#}"
        );
    }
    open.commit().await.unwrap();
}

#[tokio::test]
async fn a_claim_runs_in_the_relay_s_own_process_without_parallel_workers() {
    // A parallel worker is a process PostgreSQL forks for one statement. On a backlog of a few
    // megabytes it planned them for the claim, every batch; here they are made free to plan, so
    // a session that may use them does.
    let db = outbox_core::testing::TestDb::create().await;
    db.execute(
        "insert into events (event_id, event_type, aggregate_id, topic, payload)
         select 'evt_' || g, 'message.created', 'key-' || (g % 100), 'parallel', '{}'::json
           from generate_series(1, 2000) g",
        &[],
    )
    .await;
    db.execute("analyze events", &[]).await;
    let (plain, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    assert!(
        claim_gathers(&plain).await > 0,
        "the premise: a session with the server's defaults plans workers for the claim"
    );
    let relay_pool = relay::pool(&db.url, 1).unwrap();
    let relay_client = relay_pool.get().await.unwrap();
    assert_eq!(
        claim_gathers(&relay_client).await,
        0,
        "the relay's session planned workers"
    );
}

/// How many nodes of the claim's plan start parallel workers, when they cost nothing to plan.
async fn claim_gathers(client: &tokio_postgres::Client) -> usize {
    use relay::statements::{CLAIM_CURSOR, SNAPSHOT_XMIN};
    let free = "set parallel_setup_cost = 0; set parallel_tuple_cost = 0;
                set min_parallel_table_scan_size = 0; set min_parallel_index_scan_size = 0";
    let xmin: i64 = client.query_one(SNAPSHOT_XMIN, &[]).await.unwrap().get(0);
    client
        .batch_execute(&format!(
            "prepare claim(bigint, bigint, bigint, bigint, bigint, text[]) as {CLAIM_CURSOR}"
        ))
        .await
        .unwrap();
    let plan = explain_analyze(
        client,
        free,
        &format!("execute claim(4000, 0, 0, {xmin}, 9223372036854775807, '{{}}')"),
    )
    .await;
    nodes(&plan)
        .iter()
        .filter(|node| matches!(node["Node Type"].as_str(), Some("Gather" | "Gather Merge")))
        .count()
}

#[tokio::test]
async fn a_row_in_the_batch_after_a_failed_row_of_its_key_waits_behind_it() {
    // The newer row is in the next batch (batches of one row): that batch must be claimed only
    // once the older row's failure is written, so that the newer row waits for it (here until it
    // turns dead) instead of going out first.
    let brokers = kafka_brokers();
    let topic = support::topic_refusing_large_records(&brokers).await;
    let db = outbox_core::testing::TestDb::create().await;
    let producer = support::spawn_producer(&db, &topic).await;
    for content in [support::refused_content(), "after".to_owned()] {
        let created = support::post_message(&producer, message(content, Some("k"))).await;
        assert!(created.is_some(), "the producer answers 201");
    }
    let mut config = support::relay_config(&db, &brokers, &topic);
    config.batch_size = 1;
    config.max_attempts = 2;
    // The older row stays X for about a second between its attempts.
    config.retry_base = Duration::from_secs(1);
    config.retry_max = Duration::from_secs(1);
    let _relay = support::spawn_relay(&db, config).await;
    let states = "select string_agg(state, '' order by id) from outbox";
    eventually(
        "the newer row sent, after the older one turned dead",
        Duration::from_secs(30),
        || async {
            let row = db.client().await.query_one(states, &[]).await.unwrap();
            let now: String = row.get(0);
            assert!(
                !now.ends_with('E') || now.starts_with('D'),
                "the newer row was sent while the older one was {now:?}"
            );
            (now == "DE").then_some(())
        },
    )
    .await;
}
