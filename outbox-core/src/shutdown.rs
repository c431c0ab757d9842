//! Graceful shutdown, written once: a [`CancellationToken`] cancelled by SIGTERM or Ctrl-C.
//!
//! Every service's `run` takes a token; tests cancel it themselves. Workers check it between
//! batches, so a batch is either finished and marked or handed back untouched.

pub use tokio_util::sync::CancellationToken;

/// A token cancelled when the process receives SIGTERM or SIGINT.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::terminate(),
            ) {
                Ok(term) => term,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM; only Ctrl-C stops this process");
                    let _ = ctrl_c.await;
                    cancel.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested; finishing in-flight work");
        cancel.cancel();
    });
    token
}

/// Sleeps for `delay`, or less when `token` is cancelled first. Answers true when the whole delay
/// passed, false when the token was (or already is) cancelled, so a loop can write
/// `if !sleep_or_cancel(delay, &token).await { return; }`.
pub async fn sleep_or_cancel(delay: std::time::Duration, token: &CancellationToken) -> bool {
    tokio::select! {
        // Checked first, so a token cancelled before the call never waits out a zero delay.
        biased;
        _ = token.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn sleeps_the_whole_delay_unless_cancelled() {
        let token = CancellationToken::new();
        let started = Instant::now();
        assert!(sleep_or_cancel(Duration::from_millis(50), &token).await);
        assert!(started.elapsed() >= Duration::from_millis(50));

        let cancel = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            cancel.cancel();
        });
        let started = Instant::now();
        assert!(!sleep_or_cancel(Duration::from_secs(60), &token).await);
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(
            !sleep_or_cancel(Duration::ZERO, &token).await,
            "a cancelled token ends even a zero delay as cancelled"
        );
    }
}
