//! Leader election: a session-level PostgreSQL advisory lock held on a dedicated connection, which
//! also LISTENs for the producer's NOTIFY. The lock lives exactly as long as that session: when the
//! leader process dies or its connection breaks, PostgreSQL releases it and a standby takes over.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use outbox_core::outbox::NOTIFY_CHANNEL;
use outbox_core::reconnect::Backoff;
use outbox_core::shutdown::sleep_or_cancel;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use crate::publish::Publisher;
use crate::Config;

/// A dedicated session: its connection task wakes `wake` on every NOTIFY and cancels `lost` when
/// the connection ends.
struct LockSession {
    client: tokio_postgres::Client,
    lost: CancellationToken,
    driver: JoinHandle<()>,
}

impl Drop for LockSession {
    fn drop(&mut self) {
        // Closing the connection releases the advisory lock.
        self.driver.abort();
    }
}

impl LockSession {
    async fn connect(url: &str, wake: Arc<Notify>) -> Result<Self, tokio_postgres::Error> {
        let (client, mut connection) = tokio_postgres::connect(url, NoTls).await?;
        let lost = CancellationToken::new();
        let lost_by_driver = lost.clone();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => wake.notify_one(),
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "leader session connection failed");
                        break;
                    }
                }
            }
            lost_by_driver.cancel();
        });
        client
            .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
            .await?;
        Ok(LockSession {
            client,
            lost,
            driver,
        })
    }

    async fn try_lock(&self, key: i64) -> Result<bool, tokio_postgres::Error> {
        Ok(self
            .client
            .query_one("select pg_try_advisory_lock($1)", &[&key])
            .await?
            .get(0))
    }

    /// True while the session still answers; a hung connection counts as lost.
    async fn alive(&self) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.client.simple_query("select 1"))
                .await,
            Ok(Ok(_))
        )
    }
}

/// Stands by until this instance holds the lock, publishes while it does, and starts over when the
/// session is lost. Returns on shutdown (after the batch in flight is marked).
pub async fn elect_and_publish(
    config: &Config,
    publisher: Arc<Publisher>,
    shutdown: CancellationToken,
) {
    let wake = Arc::new(Notify::new());
    let metrics = publisher.metrics().clone();
    let mut reconnect = Backoff::new();
    while !shutdown.is_cancelled() {
        let session = match LockSession::connect(&config.database.database_url, wake.clone()).await
        {
            Ok(session) => {
                reconnect.reset();
                session
            }
            Err(error) => {
                let delay = reconnect.next_delay();
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot reach PostgreSQL for leader election");
                sleep_or_cancel(delay, &shutdown).await;
                continue;
            }
        };
        let mut announced_standby = false;
        let leading = loop {
            match session.try_lock(config.lock_key).await {
                Ok(true) => break true,
                Ok(false) => {
                    if !announced_standby {
                        tracing::info!("another relay leads; standing by");
                        announced_standby = true;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(config.standby_poll) => {}
                        _ = session.lost.cancelled() => break false,
                        _ = shutdown.cancelled() => break false,
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "leader lock query failed");
                    break false;
                }
            }
        };
        if !leading {
            continue;
        }
        tracing::info!("leading: this relay publishes the outbox");
        metrics.is_leader.set(1);
        let leadership = session.lost.child_token();
        let retention = tokio::spawn(crate::retention::run(
            publisher.pool().clone(),
            config.retention,
            config.retention_interval,
            crate::retention::Partitions {
                span: config.partition_span,
                ahead: config.partition_span * 2,
            },
            metrics.clone(),
            leadership.clone(),
        ));
        let heartbeat = async {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if !session.alive().await {
                    tracing::warn!("leader session stopped answering; stepping down");
                    leadership.cancel();
                    return;
                }
            }
        };
        tokio::select! {
            _ = publisher.lead(&wake, &leadership, &shutdown) => {}
            _ = heartbeat => {}
        }
        leadership.cancel();
        retention.abort();
        metrics.is_leader.set(0);
        tracing::info!("no longer leading");
        drop(session);
    }
}
