//! Job locks and invalidations, as every store offers them.

use std::time::Duration;

use crate::harness::{Backend, Fixture, eventually, tenant};

pub(crate) async fn job_locks_are_exclusive_across_stores(f: Fixture) {
    let (a, b) = (f.open().await, f.open().await);
    let mut held = a.try_job_lock("auto-rotate").await.unwrap().expect("nobody holds it");
    assert_eq!(held.job(), "auto-rotate");
    assert!(b.try_job_lock("auto-rotate").await.unwrap().is_none(), "another replica");
    assert!(a.try_job_lock("auto-rotate").await.unwrap().is_none(), "the same store again");
    let other = b.try_job_lock("checkpoint").await.unwrap().expect("another job is free");
    held.check().await.unwrap();

    // Released explicitly: free at once.
    held.release().await.unwrap();
    let held = b.try_job_lock("auto-rotate").await.unwrap().expect("released");
    assert!(a.try_job_lock("auto-rotate").await.unwrap().is_none());

    // Dropped: free soon (PostgreSQL ends the lock's session in the background).
    drop(held);
    let taken = eventually(Duration::from_secs(5), || async {
        a.try_job_lock("auto-rotate").await.unwrap()
    })
    .await;
    assert!(taken.is_some(), "a dropped lock is released");
    drop(other);
}

pub(crate) async fn invalidations_follow_the_store_kind(f: Fixture) {
    let store = f.open().await;
    // Announcing is always allowed (a no-op where nobody else listens).
    store.notify_tenant_changed(&tenant("onc")).await.unwrap();
    let subscription = store.subscribe_invalidations().await.unwrap();
    match f.backend() {
        Backend::Sqlite => assert!(subscription.is_none(), "a single instance has no replicas"),
        Backend::Postgres => assert!(subscription.is_some()),
    }
}
