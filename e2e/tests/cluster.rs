//! A three-node Kafka cluster (`scripts/stack.sh --brokers 3`: replication factor 3,
//! `min.insync.replicas=2`) under the four services, with nodes SIGKILLed: the services get the
//! bootstrap list and nothing else changes.
//!
//! The cluster is this binary's own (state in /var/tmp/outbox-cluster-test, nodes on 19120, 19123,
//! 19126), so killing its nodes disturbs no other test; its tests take turns on it.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outbox_core::testing::{eventually, PrivateStack};
use support::Stack;

const TESTS: usize = 2;
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static FINISHED: AtomicUsize = AtomicUsize::new(0);

fn cluster() -> PrivateStack {
    PrivateStack::new("/var/tmp/outbox-cluster-test", 3, 19120, 5442, 19130)
}

/// `scripts/stack.sh <args>` on the cluster, off the runtime's threads (the services keep running).
async fn on_cluster(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cluster().run(&args)
    })
    .await
    .expect("stack.sh")
}

/// Every node up (started when not), and the bootstrap list.
async fn all_nodes_up() -> String {
    on_cluster(&["kafka-start"]).await;
    cluster().bootstrap()
}

/// The last test to finish stops the cluster.
async fn done() {
    if FINISHED.fetch_add(1, Ordering::SeqCst) + 1 == TESTS {
        on_cluster(&["kafka-stop"]).await;
    }
}

async fn post_all(stack: &Stack, what: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = stack
            .post(format!("{what} {i}"), &format!("req_{what}_{i}"))
            .await
            .unwrap_or_else(|| panic!("the producer acknowledges {what} {i}"));
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ids
}

async fn all_received(stack: &Stack, ids: &[String], within: Duration) {
    let want: HashSet<String> = ids.iter().cloned().collect();
    eventually(
        &format!("the notifier receives all {} events", want.len()),
        within,
        || async {
            let got = stack.received_ids().await;
            want.is_subset(&got).then_some(())
        },
    )
    .await;
}

async fn count(stack: &Stack, state: &str) -> i64 {
    stack
        .db
        .count(&format!(
            "select count(*) from outbox.outbox where state = '{state}'"
        ))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_of_three_brokers_killed_the_relay_and_consumer_carry_on() {
    let _turn = TURN.lock().await;
    let started = Instant::now();
    let bootstrap = all_nodes_up().await;
    let stack = Stack::start(&bootstrap).await;
    let mut ids = post_all(&stack, "before", 20).await;
    all_received(&stack, &ids, Duration::from_secs(60)).await;

    // Node 1 is the first address of the bootstrap list, and leads some partitions.
    on_cluster(&["broker-stop", "1", "--kill"]).await;
    let killed = Instant::now();
    ids.extend(post_all(&stack, "one-down", 100).await);
    all_received(&stack, &ids, Duration::from_secs(90)).await;
    eprintln!(
        "one broker down: 100 events sent and delivered {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(count(&stack, "D").await, 0, "no row dead");
    // A send whose delivery report timed out while the broker was down turns its row X although
    // the record got through: the notifier already has the event, and the row is E once its
    // retry is acknowledged.
    stack
        .db
        .wait_for_count(
            "every row sent",
            "select count(*) from outbox.outbox where state = 'E'",
            120,
            Duration::from_secs(30),
        )
        .await;
    assert!(!stack.relay.is_finished(), "the relay keeps running");
    assert!(!stack.consumer.is_finished(), "the consumer keeps running");
    eprintln!("one-of-three test took {:?}", started.elapsed());
    done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_of_three_brokers_killed_rows_turn_x_never_d_and_all_are_sent_once_one_returns() {
    let _turn = TURN.lock().await;
    let started = Instant::now();
    let bootstrap = all_nodes_up().await;
    let stack = Stack::start(&bootstrap).await;
    let mut ids = post_all(&stack, "before", 10).await;
    all_received(&stack, &ids, Duration::from_secs(60)).await;

    // Below min.insync.replicas (and below the controllers' majority): nothing can be written.
    on_cluster(&["broker-stop", "2", "--kill"]).await;
    on_cluster(&["broker-stop", "3", "--kill"]).await;
    ids.extend(post_all(&stack, "two-down", 30).await);
    eventually(
        "rows turn X while two of three brokers are down",
        Duration::from_secs(60),
        || async { (count(&stack, "X").await > 0).then_some(()) },
    )
    .await;
    // A few more rounds of retries: still nothing dead, nothing sent.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        count(&stack, "D").await,
        0,
        "an outage never makes a row dead"
    );
    assert_eq!(
        count(&stack, "E").await,
        10,
        "nothing is acknowledged below min.insync.replicas"
    );

    let restarted = Instant::now();
    on_cluster(&["broker-start", "2"]).await;
    eprintln!(
        "broker 2 answers again {:?} after its start",
        restarted.elapsed()
    );
    eventually(
        "every row sent once a second broker is back",
        Duration::from_secs(120),
        || async { (count(&stack, "E").await == 40).then_some(()) },
    )
    .await;
    all_received(&stack, &ids, Duration::from_secs(60)).await;
    eprintln!(
        "two brokers down: all 30 sent and delivered {:?} after broker 2 was started",
        restarted.elapsed()
    );
    assert_eq!(count(&stack, "D").await, 0);
    eprintln!("two-of-three test took {:?}", started.elapsed());
    done().await;
}
