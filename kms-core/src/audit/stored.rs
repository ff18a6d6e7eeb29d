//! Verifying a chain straight from a keystore, page by page.

use super::error::ChainBreak;
use super::signing::AuditVerifyingKey;
use super::verify::{Anchor, ChainVerifier, VerifyReport};
use crate::store::{KeyStore, StoreError};

/// Verifying a stored chain failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyStoredError {
    /// The chain is broken.
    #[error(transparent)]
    Broken(#[from] ChainBreak),
    /// The keystore could not be read; nothing is known about the chain.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Verifies `instance`'s whole chain in `store`, reading at most `page`
/// events or checkpoints at a time, so memory stays bounded however long
/// the chain is. `key` must come from a trusted source (see the
/// [module docs](super)). The chain must pass through every one of
/// `anchors` ([`ChainVerifier::expect_anchors`]).
pub async fn verify_stored_chain(
    store: &dyn KeyStore,
    instance: &str,
    key: AuditVerifyingKey,
    anchors: &[Anchor],
    page: u32,
) -> Result<VerifyReport, VerifyStoredError> {
    let page = page.max(1);
    let mut verifier = ChainVerifier::new(instance, key);
    verifier.expect_anchors(anchors)?;
    // Highest checkpoint sequence number fetched so far; `None` once all are.
    let mut checkpoints_after = Some(0);
    loop {
        let rows = store.audit_rows(instance, verifier.head().0, page).await?;
        let Some(last) = rows.last() else { break };
        // Every checkpoint up to this page's last event is queued before
        // the events pass.
        while let Some(after) = checkpoints_after.filter(|after| *after < last.seq) {
            checkpoints_after =
                fetch_checkpoints(store, &mut verifier, instance, after, page).await?;
        }
        verifier.push_rows(&rows)?;
    }
    while let Some(after) = checkpoints_after {
        checkpoints_after = fetch_checkpoints(store, &mut verifier, instance, after, page).await?;
    }
    Ok(verifier.finish()?)
}

/// Queues the next page of checkpoints; returns the new cursor.
async fn fetch_checkpoints(
    store: &dyn KeyStore,
    verifier: &mut ChainVerifier,
    instance: &str,
    after: i64,
    page: u32,
) -> Result<Option<i64>, VerifyStoredError> {
    let checkpoints = store.audit_checkpoints(instance, after, page).await?;
    verifier.push_checkpoints(&checkpoints)?;
    Ok(checkpoints.last().map(|c| c.seq))
}
