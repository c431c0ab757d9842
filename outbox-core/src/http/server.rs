//! The HTTP server of every service: HTTP/1.1 with a time limit on each phase a client controls,
//! a bound on open connections, and a bounded graceful shutdown.
//!
//! Per connection:
//! - a new connection must send a complete request head within `HTTP_HEADER_TIMEOUT` of its
//!   accept; a keep-alive connection, within `HTTP_HEADER_TIMEOUT` of the first byte of its next
//!   request; otherwise it is closed without an answer;
//! - a keep-alive connection that sends nothing for `HTTP_IDLE_TIMEOUT` after a response is closed;
//! - a request body must arrive in full within `HTTP_BODY_TIMEOUT` of its head: otherwise the
//!   request answers 408 (`body_timeout`) and the connection is closed;
//! - while a request is in flight (from its head until its response is written) no connection
//!   timer runs: handlers bound their own work.
//!
//! At most `HTTP_MAX_CONNECTIONS` are open. At the bound, a new connection closes the *oldest idle*
//! one (no request in flight: silent, sending its head slowly, or waiting between requests), so a
//! flood of idle sockets cannot lock out `/health`: the newest connection, which is about to send
//! its request, is the last to go. When every open connection has a request in flight, the new one
//! is closed at once (the caller retries; in-flight work is never cut).
//!
//! On shutdown: accepting stops, idle connections close, requests in flight finish; connections
//! still open `SHUTDOWN_GRACE` later are dropped, so shutdown never waits on a slow client.
//!
//! HTTP/1.1 only: every client of these services (curl, Prometheus, the consumer, probes) speaks
//! it, and one protocol keeps the timers above exact.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::middleware;
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::HttpArgs;

/// Serves `router` on `listener` with the limits of `limits` until `shutdown` is cancelled, then
/// lets requests in flight finish for at most `limits.shutdown_grace` and returns.
///
/// Every response to a refused request uses the shared JSON error shape (see
/// [`super::uniform_errors`]): unknown routes, wrong methods, bad paths and queries, NUL
/// characters in the URI, late bodies.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpArgs,
    shutdown: CancellationToken,
) {
    let router = super::uniform_errors(router)
        .layer(middleware::from_fn(crate::trace_context::http_request_span))
        .layer(middleware::from_fn_with_state(
            limits.http_body_timeout,
            super::body_timeout::limit_body_read,
        ))
        // A bug must still answer (JSON 500) rather than drop the connection without a word.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                axum::response::IntoResponse::into_response(super::ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "the request failed unexpectedly; the service logged why",
                ))
            },
        ));
    let connections = Arc::new(Connections::new(limits.http_max_connections.max(1)));
    let mut tasks = JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Typically EMFILE: wait for connections to close instead of spinning.
                    tracing::warn!(%error, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(connection) = connections.admit() else {
            tracing::warn!(
                max_connections = connections.max,
                "every HTTP connection has a request in flight; closing a new one"
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        tasks.spawn(serve_connection(
            stream,
            router.clone(),
            connection,
            limits.clone(),
            shutdown.clone(),
        ));
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            remaining = tasks.len(),
            "dropping HTTP connections still open after SHUTDOWN_GRACE"
        );
        tasks.shutdown().await;
    }
}

/// Serves one connection until it ends, its watchdog fires, it is evicted, or (after `shutdown`)
/// its last request is answered.
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    connection: Admitted,
    limits: HttpArgs,
    shutdown: CancellationToken,
) {
    let activity = connection.activity.clone();
    let io = TokioIo::new(WatchedIo {
        stream,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let in_flight = activity.begin_request();
            let router = router.clone();
            async move {
                let response = router
                    .oneshot(request)
                    .await
                    .unwrap_or_else(|never| match never {});
                // The request stays in flight until hyper has written (or aborted) the body and
                // dropped it, with the frame mapper that owns the guard.
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        let _in_flight = &in_flight;
                        frame
                    }))
                }))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // hyper's own header timer restarts as soon as a response is written, which would make it an
    // idle timeout too; the watchdog below keeps the two apart.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true);
    let served = builder.serve_connection(io, service);
    tokio::pin!(served);
    let watchdog = activity.watchdog(limits.http_header_timeout, limits.http_idle_timeout);
    tokio::pin!(watchdog);
    tokio::select! {
        _ = served.as_mut() => return,
        _ = &mut watchdog => return,
        _ = activity.evicted.cancelled() => return,
        _ = shutdown.cancelled() => served.as_mut().graceful_shutdown(),
    }
    tokio::select! {
        _ = served => {}
        _ = watchdog => {}
        _ = activity.evicted.cancelled() => {}
    }
}

/// The open connections, oldest first, for the connection bound.
struct Connections {
    max: usize,
    open: Mutex<(u64, BTreeMap<u64, Arc<Activity>>)>,
}

impl Connections {
    fn new(max: usize) -> Self {
        Connections {
            max,
            open: Mutex::new((0, BTreeMap::new())),
        }
    }

    /// Registers a new connection; at the bound, evicts the oldest idle one first. `None` when
    /// every open connection has a request in flight.
    fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut guard = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (next_id, open) = &mut *guard;
        if open.len() >= self.max {
            let oldest_idle = open
                .iter()
                .find(|(_, activity)| activity.is_idle())
                .map(|(id, _)| *id)?;
            if let Some(evicted) = open.remove(&oldest_idle) {
                tracing::debug!("connection bound reached; closing the oldest idle connection");
                evicted.evicted.cancel();
            }
        }
        let id = *next_id;
        *next_id += 1;
        let activity = Arc::new(Activity::new());
        open.insert(id, activity.clone());
        Some(Admitted {
            id,
            activity,
            connections: self.clone(),
        })
    }
}

/// A connection's place in [`Connections`], given back when its task ends.
struct Admitted {
    id: u64,
    activity: Arc<Activity>,
    connections: Arc<Connections>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut guard = self
            .connections
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        guard.1.remove(&self.id);
    }
}

/// What one connection is doing, as its watchdog and the connection bound see it.
struct Activity {
    started: Instant,
    /// Requests from head to written response (more than one only with pipelining).
    in_flight: AtomicUsize,
    /// Whether a response was written: from then on, waiting is idle time, not header time.
    answered: AtomicBool,
    /// Milliseconds after `started` at which the current wait began: the accept, the end of the
    /// last response, or the first byte of the next request head.
    wait_began_ms: AtomicU64,
    /// Whether bytes of the next request head arrived during the current wait.
    head_started: AtomicBool,
    changed: tokio::sync::Notify,
    evicted: CancellationToken,
}

impl Activity {
    fn new() -> Self {
        Activity {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            answered: AtomicBool::new(false),
            wait_began_ms: AtomicU64::new(0),
            head_started: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
            evicted: CancellationToken::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
    }

    fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
        InFlight(self.clone())
    }

    /// On a keep-alive connection, the first byte of the next request starts its header time; a
    /// new connection's header time runs from its accept.
    fn bytes_read(&self) {
        if self.is_idle()
            && self.answered.load(Ordering::SeqCst)
            && !self.head_started.swap(true, Ordering::SeqCst)
        {
            self.wait_began_ms.store(self.now_ms(), Ordering::SeqCst);
            self.changed.notify_waiters();
        }
    }

    /// When the connection must be closed if nothing changes; `None` while a request is in flight.
    fn deadline(&self, header_timeout: Duration, idle_timeout: Duration) -> Option<Instant> {
        if !self.is_idle() {
            return None;
        }
        let waiting_for_head =
            self.head_started.load(Ordering::SeqCst) || !self.answered.load(Ordering::SeqCst);
        let allowed = if waiting_for_head {
            header_timeout
        } else {
            idle_timeout
        };
        let began = Duration::from_millis(self.wait_began_ms.load(Ordering::SeqCst));
        Some(self.started + began + allowed)
    }

    /// Returns once the connection waited too long for a request head or sat idle too long.
    async fn watchdog(&self, header_timeout: Duration, idle_timeout: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read, so no change slips between the two.
            changed.as_mut().enable();
            match self.deadline(header_timeout, idle_timeout) {
                None => changed.await,
                Some(at) if at <= Instant::now() => return,
                Some(at) => {
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
            }
        }
    }
}

/// A request in flight; dropped with its response body, which starts the next wait.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        activity.answered.store(true, Ordering::SeqCst);
        activity.head_started.store(false, Ordering::SeqCst);
        activity
            .wait_began_ms
            .store(activity.now_ms(), Ordering::SeqCst);
        activity.in_flight.fetch_sub(1, Ordering::SeqCst);
        activity.changed.notify_waiters();
    }
}

/// The TCP stream, telling the connection's [`Activity`] when bytes arrive.
struct WatchedIo {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.stream).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
