//! Coordination between key-service replicas that share a keystore: job
//! locks (a scheduled job runs on one replica at a time) and cache
//! invalidations (a change made through one replica reaches the KEK caches
//! of the others).

#[cfg(feature = "sqlite")]
use std::collections::HashSet;
use std::fmt;
#[cfg(feature = "sqlite")]
use std::path::PathBuf;
#[cfg(feature = "sqlite")]
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;

use super::StoreError;
use crate::ids::TenantId;

/// Proof that this process holds the lock of one scheduled job, from
/// [`KeyStore::try_job_lock`](super::KeyStore::try_job_lock).
///
/// The lock is released when the guard is dropped or
/// [released](JobLock::release). A lock can also be lost without either:
/// the PostgreSQL store holds it on a database session, and if that session
/// ends (network failure, server restart, `pg_terminate_backend`) the
/// database releases it and another replica may take it. A job that runs
/// for long should therefore call [`JobLock::check`] before each unit of
/// work and stop when it fails.
pub struct JobLock {
    job: String,
    holder: Box<dyn LockHolder>,
}

/// What a store keeps alive while a job lock is held.
#[async_trait]
pub(crate) trait LockHolder: Send {
    /// `Ok` while the lock is certainly still held.
    async fn check(&mut self) -> Result<(), StoreError>;
    /// Gives the lock up now.
    async fn release(self: Box<Self>) -> Result<(), StoreError>;
}

impl JobLock {
    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
    pub(crate) fn new(job: &str, holder: Box<dyn LockHolder>) -> Self {
        Self { job: job.to_owned(), holder }
    }

    /// The job this lock is for.
    pub fn job(&self) -> &str {
        &self.job
    }

    /// `Ok` while the lock is certainly still held; an error means it may
    /// have passed to another replica and the job must stop.
    pub async fn check(&mut self) -> Result<(), StoreError> {
        self.holder.check().await
    }

    /// Releases the lock now (dropping the guard does too, a moment later).
    pub async fn release(self) -> Result<(), StoreError> {
        self.holder.release().await
    }
}

impl fmt::Debug for JobLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobLock").field("job", &self.job).finish_non_exhaustive()
    }
}

/// Something cached from the keystore may be stale.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Invalidation {
    /// This tenant's KEK versions or state changed: drop what is cached of it.
    Tenant(TenantId),
    /// Notifications may have been missed (the listener lost its connection
    /// or fell behind): drop everything cached.
    All,
}

/// A subscription to the invalidations of a keystore, from
/// [`KeyStore::subscribe_invalidations`](super::KeyStore::subscribe_invalidations).
///
/// Delivery is at most once and only while the store's listener is
/// connected: what happens while it is not is never replayed. Instead the
/// subscription yields [`Invalidation::All`] when it notices that
/// notifications may have been lost, both when the connection drops and
/// again once listening has resumed. The cache TTL remains the backstop.
pub struct Invalidations {
    source: Box<dyn InvalidationSource>,
}

/// Where a subscription's invalidations come from.
#[async_trait]
pub(crate) trait InvalidationSource: Send {
    /// The next invalidation; `None` once the store is gone.
    async fn recv(&mut self) -> Option<Invalidation>;
}

impl Invalidations {
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn new(source: Box<dyn InvalidationSource>) -> Self {
        Self { source }
    }

    /// Waits for the next invalidation; `None` once the store has been
    /// dropped and nothing more will come. Cancel-safe: dropping the future
    /// loses nothing.
    pub async fn recv(&mut self) -> Option<Invalidation> {
        self.source.recv().await
    }
}

impl fmt::Debug for Invalidations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Invalidations").finish_non_exhaustive()
    }
}

#[cfg(feature = "sqlite")]
/// Job locks held in this process, by (database, job). Enough for a store
/// that only one process may open (SQLite); not a cross-process lock.
static LOCAL_JOB_LOCKS: Mutex<Option<HashSet<(PathBuf, String)>>> = Mutex::new(None);

#[cfg(feature = "sqlite")]
/// Takes the in-process job lock of `job` on the database at `database`.
pub(crate) fn try_local_job_lock(database: PathBuf, job: &str) -> Option<JobLock> {
    let key = (database, job.to_owned());
    let mut held = LOCAL_JOB_LOCKS.lock().unwrap_or_else(PoisonError::into_inner);
    if !held.get_or_insert_with(HashSet::new).insert(key.clone()) {
        return None;
    }
    Some(JobLock::new(job, Box::new(LocalLock { key: Some(key) })))
}

#[cfg(feature = "sqlite")]
struct LocalLock {
    key: Option<(PathBuf, String)>,
}

#[cfg(feature = "sqlite")]
impl Drop for LocalLock {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut held = LOCAL_JOB_LOCKS.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(set) = held.as_mut() {
                set.remove(&key);
            }
        }
    }
}

#[cfg(feature = "sqlite")]
#[async_trait]
impl LockHolder for LocalLock {
    async fn check(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn release(self: Box<Self>) -> Result<(), StoreError> {
        drop(self);
        Ok(())
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_job_locks_are_exclusive_per_database_and_job() {
        let db = PathBuf::from("/nonexistent/unit-test.sqlite3");
        let first = try_local_job_lock(db.clone(), "rotate").unwrap();
        assert!(try_local_job_lock(db.clone(), "rotate").is_none());
        let other_job = try_local_job_lock(db.clone(), "evict").unwrap();
        let other_db = try_local_job_lock(PathBuf::from("/nonexistent/other"), "rotate").unwrap();
        assert_eq!(first.job(), "rotate");
        first.release().await.unwrap();
        let mut again = try_local_job_lock(db.clone(), "rotate").unwrap();
        again.check().await.unwrap();
        drop((again, other_job, other_db));
        assert!(try_local_job_lock(db, "rotate").is_some());
    }
}
