//! Job locks: session-level advisory locks, each on a dedicated connection
//! (outside the pool, so a long job never starves it) that lives exactly as
//! long as the lock. PostgreSQL releases a session's advisory locks when the
//! session ends, so a crashed replica never keeps a job from running.

use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sqlx::{ConnectOptions, Connection, PgConnection};

use super::options::Settings;
use super::{silent, unavailable};
use crate::store::coordination::LockHolder;
use crate::store::{JobLock, StoreError};

/// Domain separation of the lock key (other users of advisory locks on the
/// same database, such as sqlx's migrator, pick their keys otherwise).
const KEY_LABEL: &[u8] = b"keygate job lock v1";

pub(super) async fn try_lock(
    settings: &Settings,
    job: &str,
) -> Result<Option<JobLock>, StoreError> {
    let key = lock_key(settings.schema(), job);
    let connect = settings.job_lock.connect();
    let mut conn = tokio::time::timeout(settings.options.acquire_timeout, connect)
        .await
        .map_err(|_| StoreError::Unavailable("timed out connecting to PostgreSQL".into()))?
        .map_err(unavailable)?;
    // Bounded client side, like every pooled operation: a server gone
    // silent never answers.
    let limit = settings.operation_timeout();
    let try_lock =
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(key).fetch_one(&mut conn);
    let locked: bool = tokio::time::timeout(limit, try_lock)
        .await
        .map_err(|_| silent(limit))?
        .map_err(unavailable)?;
    if !locked {
        let _closed = tokio::time::timeout(limit, conn.close()).await;
        return Ok(None);
    }
    Ok(Some(JobLock::new(
        job,
        Box::new(AdvisoryLock {
            conn: Some(conn),
            key,
            probe_timeout: settings.options.acquire_timeout,
            release_timeout: limit,
        }),
    )))
}

/// The 64-bit advisory lock key of `job` in `schema`: the first eight
/// bytes of a SHA-256 over a label, the schema and the job name, so that
/// keystores in different schemas of one database do not exclude each other.
fn lock_key(schema: Option<&str>, job: &str) -> i64 {
    let digest = Sha256::new()
        .chain_update(KEY_LABEL)
        .chain_update([0])
        .chain_update(schema.unwrap_or("").as_bytes())
        .chain_update([0])
        .chain_update(job.as_bytes())
        .finalize();
    digest.first_chunk::<8>().map_or(0, |bytes| i64::from_be_bytes(*bytes))
}

struct AdvisoryLock {
    /// `None` once released.
    conn: Option<PgConnection>,
    key: i64,
    /// How long [`LockHolder::check`] waits for the server.
    probe_timeout: Duration,
    /// How long releasing (and closing) waits for the server.
    release_timeout: Duration,
}

#[async_trait]
impl LockHolder for AdvisoryLock {
    async fn check(&mut self) -> Result<(), StoreError> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(StoreError::Unavailable("job lock released".into()));
        };
        // The lock lives as long as the session: a live session holds it.
        let lost = |why: String| {
            StoreError::Unavailable(format!("job lock connection lost, lock may be gone: {why}"))
        };
        match tokio::time::timeout(self.probe_timeout, conn.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(lost(e.to_string())),
            Err(_) => Err(lost("no answer".into())),
        }
    }

    async fn release(mut self: Box<Self>) -> Result<(), StoreError> {
        let Some(mut conn) = self.conn.take() else {
            return Ok(());
        };
        let key = self.key;
        let release = async move {
            let unlocked = sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1)")
                .bind(key)
                .fetch_one(&mut conn)
                .await;
            // Closing ends the session, which releases the lock in any case.
            let _closed = conn.close().await;
            unlocked
        };
        // Given up on, the connection is dropped: its session (and lock)
        // ends when the server notices.
        match tokio::time::timeout(self.release_timeout, release).await {
            Ok(unlocked) => unlocked.map(drop).map_err(unavailable),
            Err(_) => Err(silent(self.release_timeout)),
        }
    }
}

impl Drop for AdvisoryLock {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        // Ending the session releases the lock: close politely if a runtime
        // is at hand, else just drop the socket (the server notices).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let limit = self.release_timeout;
            runtime.spawn(async move {
                let _closed = tokio::time::timeout(limit, conn.close()).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_schema_and_job() {
        let a = lock_key(None, "rotate");
        assert_eq!(a, lock_key(None, "rotate"));
        assert_ne!(a, lock_key(Some("s"), "rotate"));
        assert_ne!(a, lock_key(None, "evict"));
        assert_ne!(lock_key(Some("ab"), "c"), lock_key(Some("a"), "bc"));
    }
}
