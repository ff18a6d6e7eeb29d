//! Cache invalidation across replicas by LISTEN/NOTIFY.
//!
//! Writers call `pg_notify(channel, tenant)` inside the transaction of the
//! change, so PostgreSQL delivers the notification exactly when the change
//! commits (and never for one rolled back). Each store runs at most one
//! listener task, on its own connection, which fans notifications out to
//! every [`Invalidations`] subscription. When the listener's connection
//! fails it sends [`Invalidation::All`], reconnects with backoff, and sends
//! `All` again once it listens anew: whatever was committed in between was
//! not announced to this replica. While it cannot reconnect it sends `All`
//! after each failed attempt too, so that what a replica caches meanwhile
//! (its queries may well work: the listener's own connection is what
//! fails) is kept no longer than a pause (at most 5 s) and an attempt (an
//! attempt refused fails at once; one the server does not answer waits up
//! to the operation bound plus `acquire_timeout`, 50 s by default), not for
//! the whole key TTL the operator may have raised to hours.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgListener, PgNotification, PgPool, PgPoolOptions};
use sqlx::{Executor, Postgres};
use tokio::sync::broadcast;
use tokio::task::AbortHandle;

use super::options::Settings;
use super::{silent, unavailable};
use crate::ids::TenantId;
use crate::store::coordination::InvalidationSource;
use crate::store::{Invalidation, Invalidations, StoreError};

/// Invalidations buffered per subscription; one that falls further behind
/// gets [`Invalidation::All`] in place of what it missed.
const CAPACITY: usize = 1024;
/// First and longest pause between reconnection attempts.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// Announces a change of `tenant`; inside a transaction, at its commit.
pub(super) async fn notify<'e, E>(
    executor: E,
    channel: &str,
    tenant: &TenantId,
) -> Result<(), StoreError>
where
    E: Executor<'e, Database = Postgres>,
{
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(tenant.as_str())
        .execute(executor)
        .await
        .map_err(unavailable)?;
    Ok(())
}

/// A store's running listener task; stopped when the last clone of the
/// store is dropped.
pub(super) struct Listener {
    sender: broadcast::Sender<Invalidation>,
    task: AbortHandle,
}

impl Listener {
    /// Connects, listens, and only then spawns the task, so a change
    /// committed after this returns is delivered.
    pub(super) async fn start(settings: &Settings) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            StoreError::Unavailable(format!("no Tokio runtime for the listener: {e}"))
        })?;
        let listener = listen(settings).await?;
        let (sender, _) = broadcast::channel(CAPACITY);
        let task = runtime.spawn(run(settings.clone(), listener, sender.clone())).abort_handle();
        Ok(Self { sender, task })
    }

    pub(super) fn subscribe(&self) -> Invalidations {
        Invalidations::new(Box::new(Subscription(self.sender.subscribe())))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Subscription(broadcast::Receiver<Invalidation>);

#[async_trait]
impl InvalidationSource for Subscription {
    async fn recv(&mut self) -> Option<Invalidation> {
        match self.0.recv().await {
            Ok(invalidation) => Some(invalidation),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(Invalidation::All),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// A listener on a fresh pool of its own (one connection, never recycled
/// for age or idleness), listening on the store's channel. Fresh each time,
/// so a dead connection still being cleaned up never blocks the new one.
/// Bounded client side, so a silent server cannot stall reconnection.
async fn listen(settings: &Settings) -> Result<PgListener, StoreError> {
    let limit = settings.operation_timeout().saturating_add(settings.options.acquire_timeout);
    tokio::time::timeout(limit, listen_unbounded(settings)).await.map_err(|_| silent(limit))?
}

async fn listen_unbounded(settings: &Settings) -> Result<PgListener, StoreError> {
    let pool: PgPool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(settings.options.acquire_timeout)
        .connect_lazy_with(settings.listener.clone());
    let mut listener = PgListener::connect_with(&pool).await.map_err(unavailable)?;
    // Reconnection is ours (`run`), so that `All` follows the new LISTEN.
    listener.eager_reconnect(false);
    listener.ignore_pool_close_event(true);
    listener.listen(&settings.channel).await.map_err(unavailable)?;
    Ok(listener)
}

async fn run(
    settings: Settings,
    mut listener: PgListener,
    sender: broadcast::Sender<Invalidation>,
) {
    loop {
        let lost = match next_or_probe(&mut listener, &settings).await {
            Ok(Some(notification)) => {
                // A payload that is not a tenant id is no reason to keep
                // anything: flush it all.
                let invalidation = TenantId::new(notification.payload())
                    .map_or(Invalidation::All, Invalidation::Tenant);
                // No subscriber right now is fine.
                let _nobody = sender.send(invalidation);
                continue;
            }
            Ok(None) => "connection lost".to_owned(),
            Err(e) => e,
        };
        tracing::warn!(
            error = %lost,
            "keystore invalidation listener lost its connection; flushing caches and reconnecting"
        );
        let _nobody = sender.send(Invalidation::All);
        drop(listener);
        listener = reconnect(&settings, &sender).await;
        tracing::info!("keystore invalidation listener is listening again; flushing caches");
        let _nobody = sender.send(Invalidation::All);
    }
}

/// The next notification; `Ok(None)` or an error when the connection is
/// gone. A connection that stays silent for `listener_probe` is probed with
/// a query, so that one dropped without a word (a NAT or firewall
/// forgetting it) is noticed rather than waited on for ever.
/// (`try_recv` is cancel-safe: sqlx only consumes whole messages.)
async fn next_or_probe(
    listener: &mut PgListener,
    settings: &Settings,
) -> Result<Option<PgNotification>, String> {
    loop {
        match tokio::time::timeout(settings.options.listener_probe, listener.try_recv()).await {
            Ok(received) => return received.map_err(|e| e.to_string()),
            Err(_silent) => {
                let probe = sqlx::query("SELECT 1").execute(&mut *listener);
                match tokio::time::timeout(settings.options.acquire_timeout, probe).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => return Err("no answer to a liveness probe".to_owned()),
                }
            }
        }
    }
}

/// Retries until listening again, backing off up to [`BACKOFF`]`.1`;
/// sends `All` after each failed attempt (see the module's doc).
async fn reconnect(settings: &Settings, sender: &broadcast::Sender<Invalidation>) -> PgListener {
    let mut pause = BACKOFF.0;
    loop {
        match listen(settings).await {
            Ok(listener) => return listener,
            Err(e) => {
                let _nobody = sender.send(Invalidation::All);
                tracing::debug!(error = %e, "keystore invalidation listener cannot reconnect yet");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(BACKOFF.1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PgStoreOptions;

    /// A listener that cannot reconnect keeps flushing the caches, so
    /// nothing cached while no change can be announced outlives a pause.
    #[tokio::test]
    async fn a_listener_that_cannot_reconnect_keeps_flushing() {
        let options = PgStoreOptions {
            acquire_timeout: Duration::from_millis(500),
            ..PgStoreOptions::default()
        };
        // Port 1 on loopback: nothing listens there, each attempt fails.
        let settings = Settings::new("postgres://postgres@127.0.0.1:1/test", options).unwrap();
        let (sender, mut flushes) = broadcast::channel(CAPACITY);
        let reconnecting = tokio::spawn(async move {
            reconnect(&settings, &sender).await;
        });
        for attempt in 0..3 {
            let flush = tokio::time::timeout(Duration::from_secs(3), flushes.recv())
                .await
                .unwrap_or_else(|_| panic!("no flush after attempt {attempt}"));
            assert_eq!(flush.unwrap(), Invalidation::All);
        }
        assert!(!reconnecting.is_finished());
        reconnecting.abort();
    }
}
