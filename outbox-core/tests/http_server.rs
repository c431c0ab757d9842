//! The shared HTTP server against raw TCP clients: each timeout, the connection bound, the
//! shutdown deadline, and the JSON shape of refusals. Timeouts are milliseconds long here.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::{Json, Router};
use outbox_core::config::HttpArgs;
use outbox_core::http::{JsonBody, QueryParams};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Slack for a closing to be observed after its deadline on a busy machine.
const MARGIN: Duration = Duration::from_millis(1500);

fn limits() -> HttpArgs {
    HttpArgs {
        http_header_timeout: Duration::from_millis(300),
        http_body_timeout: Duration::from_millis(300),
        http_idle_timeout: Duration::from_millis(900),
        http_max_connections: 64,
        shutdown_grace: Duration::from_millis(300),
    }
}

#[derive(Deserialize)]
struct Page {
    limit: u32,
}

fn router() -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route(
            "/echo",
            post(|JsonBody(body): JsonBody<Value>| async move { Json(body) }),
        )
        .route(
            "/items",
            get(|QueryParams(page): QueryParams<Page>| async move {
                Json(json!({"limit": page.limit}))
            }),
        )
        .route(
            "/items/{id}",
            get(|axum::extract::Path(id): axum::extract::Path<String>| async move { id }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                Json(json!({"slow": true}))
            }),
        )
}

struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    served: JoinHandle<()>,
}

async fn start(limits: HttpArgs) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(outbox_core::http::serve(
        listener,
        router(),
        limits,
        shutdown.clone(),
    ));
    Server {
        addr,
        shutdown,
        served,
    }
}

impl Server {
    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.unwrap()
    }
}

/// Reads until the server closes the connection (or `within` passes: `None`); returns what was
/// read and when the close came.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<(String, Instant)> {
    let mut read = Vec::new();
    let outcome = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    outcome
        .ok()
        .map(|()| (String::from_utf8_lossy(&read).into_owned(), Instant::now()))
}

/// Reads one response whose body has a `content-length`: (status, body).
async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&read).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = &text[..end];
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if read.len() >= end + 4 + length {
                let status = head[9..12].parse().unwrap();
                return (status, text[end + 4..end + 4 + length].to_owned());
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(n > 0, "closed before a full response: {text}");
        read.extend_from_slice(&buf[..n]);
    }
}

async fn send_get(stream: &mut TcpStream, target: &str) -> (u16, String) {
    stream
        .write_all(format!("GET {target} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_response(stream).await
}

fn assert_closed_around(
    closed: Option<(String, Instant)>,
    from: Instant,
    deadline: Duration,
) -> String {
    let (read, at) = closed.expect("the server closed the connection");
    let after = at - from;
    assert!(
        after >= deadline - Duration::from_millis(50),
        "closed after {after:?}, before the {deadline:?} deadline"
    );
    read
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_header_timeout() {
    let server = start(limits()).await;
    let opened = Instant::now();
    let mut silent = server.connect().await;
    let closed = read_until_closed(&mut silent, limits().http_header_timeout + MARGIN).await;
    let read = assert_closed_around(closed, opened, limits().http_header_timeout);
    assert_eq!(read, "", "nothing is answered to a silent client");
}

#[tokio::test]
async fn half_sent_headers_are_closed_after_the_header_timeout_however_slowly_they_trickle() {
    let server = start(limits()).await;
    let opened = Instant::now();
    let stream = server.connect().await;
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        let _ = writer.write_all(b"GET /health HTTP/1.1\r\n").await;
        for i in 0.. {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if writer
                .write_all(format!("x-slow-{i}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let closed = tokio::time::timeout(limits().http_header_timeout + MARGIN, async {
        let mut buf = [0u8; 1024];
        while matches!(reader.read(&mut buf).await, Ok(n) if n > 0) {}
        Instant::now()
    })
    .await
    .expect("the server closed the trickling connection");
    assert!(closed - opened >= limits().http_header_timeout - Duration::from_millis(50));
    trickle.abort();
}

#[tokio::test]
async fn a_half_sent_body_answers_408_and_the_connection_closes() {
    let server = start(limits()).await;
    let mut stream = server.connect().await;
    let sent = Instant::now();
    stream
        .write_all(
            b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"a\": ",
        )
        .await
        .unwrap();
    let closed = read_until_closed(&mut stream, limits().http_body_timeout + MARGIN).await;
    let read = assert_closed_around(closed, sent, limits().http_body_timeout);
    assert!(read.starts_with("HTTP/1.1 408"), "{read}");
    assert!(read.contains(r#""code":"body_timeout""#), "{read}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_not_the_header_timeout() {
    let server = start(limits()).await;
    let mut stream = server.connect().await;
    assert_eq!(send_get(&mut stream, "/health").await.0, 200);
    // Longer than the header timeout, shorter than the idle timeout: the connection still serves.
    tokio::time::sleep(limits().http_header_timeout + Duration::from_millis(200)).await;
    assert_eq!(send_get(&mut stream, "/health").await.0, 200);
    let answered = Instant::now();
    let closed = read_until_closed(&mut stream, limits().http_idle_timeout + MARGIN).await;
    let read = assert_closed_around(closed, answered, limits().http_idle_timeout);
    assert_eq!(read, "");
}

#[tokio::test]
async fn beyond_the_connection_bound_new_connections_close_the_oldest_idle_ones() {
    let limits = HttpArgs {
        http_header_timeout: Duration::from_secs(30),
        http_max_connections: 8,
        ..limits()
    };
    let server = start(limits).await;
    let mut idle = Vec::new();
    for _ in 0..8 * 3 {
        idle.push(server.connect().await);
    }
    // A flood of three times the bound of silent sockets: /health still answers at once.
    let mut probe = server.connect().await;
    let (status, body) = send_get(&mut probe, "/health").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    // The oldest were closed to make room; the newest seven are still open.
    for stream in &mut idle[..8 * 3 - 7] {
        assert!(
            read_until_closed(stream, Duration::from_secs(2))
                .await
                .is_some(),
            "an old idle connection was closed"
        );
    }
    for stream in &mut idle[8 * 3 - 7..] {
        assert!(
            read_until_closed(stream, Duration::from_millis(100))
                .await
                .is_none(),
            "a recent idle connection is still open"
        );
    }
}

#[tokio::test]
async fn when_every_connection_has_a_request_in_flight_a_new_one_is_refused() {
    let limits = HttpArgs {
        http_max_connections: 2,
        ..limits()
    };
    let server = start(limits).await;
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut stream = server.connect().await;
        stream
            .write_all(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        busy.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut refused = server.connect().await;
    let closed = read_until_closed(&mut refused, Duration::from_millis(300)).await;
    assert_eq!(closed.map(|(read, _)| read).as_deref(), Some(""));
    // The requests in flight are not cut, and once they are answered there is room again.
    for stream in &mut busy {
        assert_eq!(read_response(stream).await.0, 200);
    }
    let mut later = server.connect().await;
    assert_eq!(send_get(&mut later, "/health").await.0, 200);
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight_and_drops_slow_clients_at_the_grace_deadline() {
    let limits = HttpArgs {
        http_header_timeout: Duration::from_secs(30),
        http_body_timeout: Duration::from_secs(30),
        shutdown_grace: Duration::from_millis(700),
        ..limits()
    };
    let server = start(limits.clone()).await;
    let mut half_head = server.connect().await;
    half_head
        .write_all(b"GET /health HTTP/1.1\r\nHost: te")
        .await
        .unwrap();
    let mut half_body = server.connect().await;
    half_body
        .write_all(
            b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{",
        )
        .await
        .unwrap();
    let mut in_flight = server.connect().await;
    in_flight
        .write_all(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let asked = Instant::now();
    server.shutdown.cancel();
    let (status, _) = read_response(&mut in_flight).await;
    assert_eq!(
        status, 200,
        "the request in flight finished during the grace"
    );
    tokio::time::timeout(limits.shutdown_grace + MARGIN, server.served)
        .await
        .expect("serve returned within the grace deadline")
        .unwrap();
    let stopped = asked.elapsed();
    assert!(
        stopped >= limits.shutdown_grace - Duration::from_millis(50),
        "the slow clients were waited for until the deadline, not {stopped:?}"
    );
    for stream in [&mut half_head, &mut half_body] {
        assert!(read_until_closed(stream, Duration::from_secs(1))
            .await
            .is_some());
    }
    assert!(TcpStream::connect(server.addr).await.is_err());
}

#[tokio::test]
async fn refusals_outside_the_handlers_answer_the_json_shape() {
    let server = start(limits()).await;
    let mut stream = server.connect().await;
    let cases = [
        ("/nowhere", 404, "not_found"),
        ("/items?limit=many", 400, "invalid_query"),
        ("/items?limit=1%00", 400, "nul_character"),
        ("/items/a%00b", 400, "nul_character"),
        ("/items/%FF", 400, "bad_request"),
    ];
    for (target, status, code) in cases {
        let (got, body) = send_get(&mut stream, target).await;
        let body: Value = serde_json::from_str(&body).expect(target);
        assert_eq!(
            (got, body["code"].as_str()),
            (status, Some(code)),
            "{target}"
        );
        assert!(body["error"].is_string(), "{target}");
    }
    stream
        .write_all(b"DELETE /health HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let (status, body) = read_response(&mut stream).await;
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (status, body["code"].as_str()),
        (405, Some("method_not_allowed"))
    );

    // A raw NUL never reaches the services: hyper's parser answers a bare 400 and closes.
    let mut raw = server.connect().await;
    raw.write_all(b"GET /items?limit=1\0 HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let (read, _) = read_until_closed(&mut raw, Duration::from_secs(2))
        .await
        .expect("closed");
    assert!(read.starts_with("HTTP/1.1 400"), "{read}");
}
