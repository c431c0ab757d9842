//! The address guard against the real consumer: with `ALLOW_PRIVATE_ENDPOINTS=false` no webhook
//! connects to a special-purpose address, whether the endpoint's URL holds an IP literal or a
//! name, was validated or written straight into the database; proxies from the environment are
//! ignored; `WEBHOOK_PROXY` gets only checked targets; the admin API refuses every bypass form.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::testing::{self, eventually, TestDb};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(30);

/// A TCP listener on 127.0.0.1 that counts connections and answers every HTTP request 200,
/// recording its request line: a webhook target that shows even a connection that sent nothing,
/// and a stand-in for an HTTP proxy (which receives `POST http://host/path HTTP/1.1`).
struct Listener {
    port: u16,
    connections: Arc<AtomicUsize>,
    request_lines: Arc<Mutex<Vec<String>>>,
}

impl Listener {
    async fn start() -> Listener {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let request_lines = Arc::new(Mutex::new(Vec::new()));
        let (count, lines) = (connections.clone(), request_lines.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(answer_ok(stream, lines.clone()));
            }
        });
        Listener {
            port,
            connections,
            request_lines,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn request_lines(&self) -> Vec<String> {
        self.request_lines.lock().unwrap().clone()
    }
}

/// Reads one request (head and `content-length` body) and answers 200.
async fn answer_ok(mut stream: tokio::net::TcpStream, lines: Arc<Mutex<Vec<String>>>) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buffer.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
    lines
        .lock()
        .unwrap()
        .push(head.lines().next().unwrap_or("").to_owned());
    let _ = stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        .await;
}

/// Writes an endpoint for every event type straight into the database, as an old row, the
/// endpoints file of an earlier configuration or an operator's SQL would: no validation.
async fn store_endpoint(db: &TestDb, id: &str, url: &str) {
    let secret = outbox_core::signature::Secret::generate();
    db.execute(
        "insert into endpoints (id, url, event_types, secret) values ($1, $2, $3, $4)",
        &[&id, &url, &vec!["*".to_owned()], &secret.as_str()],
    )
    .await;
}

/// Waits until the endpoint's one delivery is dead; returns the error of each attempt.
async fn errors_once_dead(db: &TestDb, endpoint: &str) -> Vec<String> {
    eventually(
        &format!("the delivery to {endpoint} is dead"),
        WAIT,
        || async {
            let row = db
                .client()
                .await
                .query_opt(
                    "select state from deliveries where endpoint_id = $1",
                    &[&endpoint],
                )
                .await
                .unwrap()?;
            (row.get::<_, String>(0) == "dead").then_some(())
        },
    )
    .await;
    db.client()
        .await
        .query(
            "select coalesce(a.error, '') from delivery_attempts a
               join deliveries d on d.id = a.delivery_id
              where d.endpoint_id = $1 order by a.attempt",
            &[&endpoint],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn guarded_config(db: &TestDb, topic: &str) -> consumer::Config {
    let mut c = config(db, topic);
    c.allow_private_endpoints = false;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_loopback_ip_literal_is_never_connected_to_and_the_delivery_says_why() {
    let (db, topic) = setup(1).await;
    let target = Listener::start().await;
    store_endpoint(&db, "stored-literal", &format!("{}/hook", target.url())).await;
    let mut consumer = spawn_app(&db, guarded_config(&db, &topic)).await;

    produce(&producer(), &topic, &envelope(1)).await;
    let errors = errors_once_dead(&db, "stored-literal").await;

    assert_eq!(
        errors.len(),
        3,
        "every attempt of RETRY_SCHEDULE: {errors:?}"
    );
    for error in &errors {
        assert!(
            error.contains(
                "refused: 127.0.0.1 is a loopback address (set ALLOW_PRIVATE_ENDPOINTS=true"
            ),
            "{error}"
        );
    }
    assert_eq!(
        target.connections(),
        0,
        "the loopback target was never connected to"
    );
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_name_resolving_to_loopback_is_never_connected_to() {
    let (db, topic) = setup(1).await;
    let target = Listener::start().await;
    let url = format!("http://localhost:{}/hook", target.port);
    store_endpoint(&db, "stored-name", &url).await;
    let mut consumer = spawn_app(&db, guarded_config(&db, &topic)).await;

    produce(&producer(), &topic, &envelope(1)).await;
    let errors = errors_once_dead(&db, "stored-name").await;

    assert_eq!(errors.len(), 3, "{errors:?}");
    for error in &errors {
        assert!(
            error.contains("refused: localhost resolves to a special address: ")
                && error.contains("loopback address"),
            "{error}"
        );
    }
    assert_eq!(target.connections(), 0, "localhost was never connected to");
    consumer.stop().await;
}

/// Proxies from the environment are read when the HTTP client is built, and setting environment
/// variables inside this multi-threaded test process would race with every thread reading them;
/// so the real `consumer` binary runs as a child with `HTTP_PROXY` (and its friends) set in its
/// own environment from the start. Private endpoints are allowed here, so the guard plays no part:
/// the only question is whether the proxy is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_from_the_environment_are_ignored() {
    let (db, topic) = setup(1).await;
    let receiver = Receiver::start().await;
    let proxy = Listener::start().await;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_consumer"))
        .env_clear()
        .envs([
            ("DATABASE_URL", db.url.as_str()),
            ("KAFKA_BROKERS", testing::kafka_brokers().as_str()),
            ("LISTEN_ADDR", format!("127.0.0.1:{port}").as_str()),
            ("CONSUMER_TOPICS", topic.as_str()),
            (
                "CONSUMER_GROUP",
                format!("test-group-{}", uuid::Uuid::new_v4().simple()).as_str(),
            ),
            ("ALLOW_PRIVATE_ENDPOINTS", "true"),
            ("DISPATCH_POLL_INTERVAL", "20ms"),
            ("RUST_LOG", "warn"),
        ])
        .envs(
            [
                "HTTP_PROXY",
                "http_proxy",
                "HTTPS_PROXY",
                "https_proxy",
                "ALL_PROXY",
                "all_proxy",
            ]
            .map(|name| (name, proxy.url())),
        )
        .kill_on_drop(true)
        .spawn()
        .expect("the consumer binary starts");
    let base = format!("http://127.0.0.1:{port}");
    let admin = reqwest::Client::builder().no_proxy().build().unwrap();
    eventually("the consumer process is ready", WAIT, || async {
        let r = admin.get(format!("{base}/ready")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let api = outbox_core::testing::ApiClient {
        base,
        http: admin,
        token: None,
    };
    api.create_endpoint(&NewEndpoint::new(&receiver.url, &["*"]))
        .await
        .expect("POST /endpoints answers 201");

    produce(&producer(), &topic, &envelope(1)).await;
    wait_for_succeeded(&db, 1).await;

    assert_eq!(
        receiver.count(),
        1,
        "the webhook went straight to the receiver"
    );
    assert_eq!(
        proxy.connections(),
        0,
        "the environment's proxy was not used"
    );
    child.kill().await.expect("the consumer process stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_proxy_gets_only_targets_that_pass_the_guard() {
    let (db, topic) = setup(1).await;
    let target = Listener::start().await;
    let proxy = Listener::start().await;
    store_endpoint(&db, "via-literal", &format!("{}/hook", target.url())).await;
    store_endpoint(
        &db,
        "via-name",
        &format!("http://localhost:{}/hook", target.port),
    )
    .await;
    let mut c = guarded_config(&db, &topic);
    // The proxy itself is on loopback: the operator's choice, not checked.
    c.webhook_proxy = Some(proxy.url());
    let mut consumer = spawn_app(&db, c).await;
    // A public address: the fake proxy answers for it, nothing leaves this machine.
    let (public, _) = create_endpoint(&consumer, "http://93.184.216.34/hook", &["*"]).await;

    produce(&producer(), &topic, &envelope(1)).await;
    wait_for_succeeded(&db, 1).await;
    let literal = errors_once_dead(&db, "via-literal").await;
    let name = errors_once_dead(&db, "via-name").await;

    let state: String = db
        .client()
        .await
        .query_one(
            "select state from deliveries where endpoint_id = $1",
            &[&public],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "succeeded");
    assert_eq!(
        proxy.request_lines(),
        vec!["POST http://93.184.216.34/hook HTTP/1.1".to_owned()],
        "the proxy got the public target only"
    );
    assert!(
        literal
            .iter()
            .all(|e| e.starts_with("refused: 127.0.0.1 is a loopback address")),
        "{literal:?}"
    );
    assert!(
        name.iter()
            .all(|e| e.starts_with("refused: localhost resolves to a special address: ")),
        "{name:?}"
    );
    assert_eq!(target.connections(), 0);
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_every_special_address_form() {
    let (db, topic) = setup(1).await;
    let mut consumer = spawn_app(&db, guarded_config(&db, &topic)).await;
    let (id, _) = create_endpoint(&consumer, "http://93.184.216.34/hook", &["*"]).await;

    for url in [
        "http://127.0.0.1/hook",
        "http://2130706433/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://[::7f00:1]/hook",
        "http://[fec0::1]/hook",
        "http://[64:ff9b::7f00:1]/hook",
        "http://[2002:7f00:1::]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[::ffff:a9fe:a9fe]/hook",
        "http://198.18.0.1/hook",
        "http://240.0.0.1/hook",
        "http://192.0.0.170/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://100.64.0.1/hook",
        "http://[fd00::1]/hook",
        "http://[2001:db8::1]/hook",
    ] {
        let admin = consumer.admin();
        let whole = NewEndpoint::new(url, &["*"]);
        let change = EndpointChange {
            url: Some(url.to_owned()),
            ..EndpointChange::default()
        };
        let refusals = [
            ("POST", admin.create_endpoint(&whole).await.map(|_| ())),
            (
                "PATCH",
                admin.update_endpoint(&id, &change).await.map(|_| ()),
            ),
            ("PUT", admin.replace_endpoint(&id, &whole).await.map(|_| ())),
        ];
        for (method, answer) in refusals {
            let refused = answer.expect_err(method);
            assert_eq!(
                (refused.status, refused.code.as_str()),
                (422, "private_url"),
                "{method} {url}: {refused}"
            );
        }
    }
    let refused = consumer
        .admin()
        .create_endpoint(&NewEndpoint::new("http://[::ffff:127.0.0.1]/hook", &["*"]))
        .await
        .unwrap_err();
    assert_eq!(refused.status, 422);
    assert!(
        refused.error.starts_with(
            "::ffff:127.0.0.1 is the IPv4-mapped form of 127.0.0.1, a loopback address"
        ),
        "{refused}"
    );
    assert_eq!(
        db.count("select count(*) from endpoints").await,
        1,
        "nothing was created"
    );
    assert_eq!(
        consumer.admin().endpoint(&id).await.unwrap().url,
        "http://93.184.216.34/hook",
        "nothing was changed"
    );
    consumer.stop().await;
}
