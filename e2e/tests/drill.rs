//! The short chaos drill, as a user runs it: `scripts/chaos.sh` on a private stack of its own
//! (three brokers, two relays, two consumers; PostgreSQL on 5446, Kafka on 19160.., the services
//! on 19170..), about a minute of traffic with one broker SIGKILLed, the leading relay SIGKILLed
//! and a receiver answering 503; nothing acknowledged may be lost and nothing unexpected arrive.
//! The stack is stopped at the end; the shared PostgreSQL and Kafka are never touched.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use outbox_core::testing::PrivateStack;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The services' debug binaries, built by this checkout's cargo so the drill never runs stale ones.
/// With outbox-core's `testing` feature, as every crate's tests enable it, to stay close to what
/// `cargo test --workspace` built (whether it is then a no-op is not yet measured).
fn service_binaries() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .current_dir(root())
        .args(["build", "--bins", "--features", "outbox-core/testing"])
        .args([
            "-p", "producer", "-p", "relay", "-p", "consumer", "-p", "notifier",
        ])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "the services build");
    // target/debug/deps/drill-… → target/debug
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target/debug")
        .to_path_buf()
}

#[test]
fn short_drill_three_brokers_loses_nothing() {
    let bin_dir = service_binaries();
    let stack = PrivateStack::new("/var/tmp/outbox-drill-test", 3, 19160, 5446, 19170);
    let results = root().join(format!(
        "target/chaos/test-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let started = Instant::now();
    let status = Command::new("bash")
        .arg(root().join("scripts/chaos.sh"))
        .args([
            "--private",
            "--brokers",
            "3",
            "--relays",
            "2",
            "--consumers",
            "2",
        ])
        .args(["--rate", "50", "--duration", "60s"])
        .args(["--faults", "broker,relay,receiver"])
        .args(["--broker-down", "10s", "--receiver-down", "10s"])
        .args(["--warmup", "5s", "--gap", "3s", "--drain-timeout", "2m"])
        .arg("--results")
        .arg(&results)
        .envs(stack.env().iter().map(|(k, v)| (*k, v.as_str())))
        .env("OUTBOX_BIN_DIR", &bin_dir)
        .env("RUST_LOG", "warn")
        .status()
        .expect("run scripts/chaos.sh");
    eprintln!("the short drill took {:?}", started.elapsed());

    let summary: Value = serde_json::from_slice(
        &std::fs::read(results.join("summary.json")).expect("the drill wrote summary.json"),
    )
    .expect("summary.json is JSON");
    eprintln!(
        "{}",
        std::fs::read_to_string(results.join("summary.txt")).unwrap_or_default()
    );
    for receiver in ["healthy", "failing"] {
        let r = &summary["receivers"][receiver];
        assert!(
            r["acknowledged"].as_u64().unwrap() > 1000,
            "{receiver}: traffic flowed: {r}"
        );
        assert_eq!(
            r["lost"], 0,
            "{receiver}: nothing acknowledged is lost: {r}"
        );
        assert_eq!(r["unexpected"], 0, "{receiver}: nothing unexpected: {r}");
        assert_eq!(
            r["bad_signatures"], 0,
            "{receiver}: every signature verifies"
        );
    }
    assert!(
        summary["receivers"]["failing"]["answered_503"]
            .as_u64()
            .unwrap()
            > 0,
        "the failing receiver did fail"
    );
    let faults: Vec<&str> = summary["faults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        faults,
        ["broker 2 killed", "relay leader killed", "receiver 503"]
    );
    for f in summary["faults"].as_array().unwrap() {
        assert!(f["recovery_s"].is_number(), "recovered from {f}");
    }
    assert_eq!(summary["outbox_dead_rows_max"], 0, "no outbox row turned D");
    assert!(
        results.join("timeline.png").exists(),
        "the timeline picture"
    );
    assert!(
        status.success(),
        "scripts/chaos.sh exits 0 when nothing is lost"
    );
}
