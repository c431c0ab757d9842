//! What the outbox pipeline's four services share.
//!
//! Each module is one noun of the product: [`envelope`] (the event JSON), [`outbox`] (row states),
//! [`signature`] (sign and verify webhooks), [`breaker`] (the circuit breaker and its persistence),
//! [`schedule`] (retry delays), [`config`] (environment parsing), [`duration`] (durations against
//! timestamps), [`db`] (pool and migrations), [`kafka`] (client settings), [`telemetry`] (logs and
//! metrics), [`http`] (the routes and error shape every service has), [`admin_auth`] (the
//! `ADMIN_TOKEN` check), [`retention`] (periodic batched deletes), [`reconnect`] (the one
//! reconnect backoff) and [`shutdown`] (the signal and the cancellable sleep).

// glibc's malloc was a fifth of the consumer's CPU under load (perf: _int_malloc, _int_free,
// malloc_consolidate); mimalloc serves the many short-lived HTTP and SQL buffers far cheaper.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod admin_auth;
pub mod breaker;
pub mod config;
pub mod db;
pub mod duration;
pub mod envelope;
pub mod http;
pub mod kafka;
pub mod outbox;
pub mod reconnect;
pub mod retention;
pub mod routing;
pub mod schedule;
pub mod service;
pub mod shutdown;
pub mod signature;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trace_context;
