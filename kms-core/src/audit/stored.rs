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
    let mut checkpoints = CheckpointCursor { after: 0, done: false };
    loop {
        let rows = store.audit_rows(instance, verifier.head().0, page).await?;
        if let Some(last) = rows.last() {
            // Every checkpoint up to this page's last event is queued
            // before the events pass.
            while !checkpoints.done && checkpoints.after < last.seq {
                checkpoints.fetch(store, &mut verifier, instance, page).await?;
            }
            verifier.push_rows(&rows)?;
            continue;
        }
        while !checkpoints.done {
            checkpoints.fetch(store, &mut verifier, instance, page).await?;
        }
        // A live writer commits events and their checkpoint together, so a
        // checkpoint past the events read means either events written
        // since, or a cut tail: read again to tell which.
        if checkpoints.after <= verifier.head().0 {
            break;
        }
        if store.audit_rows(instance, verifier.head().0, 1).await?.is_empty() {
            break;
        }
        checkpoints.done = false;
    }
    Ok(verifier.finish()?)
}

/// Where the checkpoints read so far end.
struct CheckpointCursor {
    /// The highest checkpoint sequence number fetched so far.
    after: i64,
    /// Whether the last fetch found no more.
    done: bool,
}

impl CheckpointCursor {
    /// Queues the next page of checkpoints.
    async fn fetch(
        &mut self,
        store: &dyn KeyStore,
        verifier: &mut ChainVerifier,
        instance: &str,
        page: u32,
    ) -> Result<(), VerifyStoredError> {
        let checkpoints = store.audit_checkpoints(instance, self.after, page).await?;
        verifier.push_checkpoints(&checkpoints)?;
        match checkpoints.last() {
            Some(last) => self.after = last.seq,
            None => self.done = true,
        }
        Ok(())
    }
}
