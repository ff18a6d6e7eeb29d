//! Lifecycle operations (DESIGN §7): crypto-shredding, auto-rotation,
//! master rotation and usage accounting.

use std::sync::Arc;
use std::time::Duration;

use super::{HierarchyError, KeyHierarchy, unix_now};
use crate::audit::AuditSigner;
use crate::dek::KekVersion;
use crate::ids::TenantId;
use crate::root::{ProviderInfo, RootKeyProvider, WrapContext};
use crate::store::{Approval, MasterKeyId, StoredKeyRef, TenantRecord, VersionUsage};

/// Stored keys a master rotation moves per keystore read.
const MASTER_ROTATION_PAGE: u32 = 256;
/// `recent_unwraps` of [`KeyHierarchy::usage`] covers this many hours.
const RECENT_HOURS: i64 = 24;

/// What a master rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterRotation {
    /// The new active master key.
    pub master: MasterKeyId,
    /// Its description.
    pub info: ProviderInfo,
    /// Tenant KEK versions moved to it by this run.
    pub tenant_keys: u64,
    /// Index roots moved to it by this run.
    pub index_roots: u64,
    /// Audit signing keys moved to it by this run.
    pub audit_signing_keys: u64,
}

impl KeyHierarchy {
    /// Crypto-shreds one KEK version (not the active one) or, with `None`,
    /// every version and the index root of a tenant: their wrapped
    /// material is erased from the keystore and from this instance's cache;
    /// other replicas are told (PostgreSQL) and forget it at once, and
    /// otherwise within the key TTL.
    pub async fn destroy(
        &self,
        id: &TenantId,
        version: Option<KekVersion>,
    ) -> Result<TenantRecord, HierarchyError> {
        let result = self.store.destroy_keys(id, version, unix_now()).await;
        self.cache.invalidate_tenant(id);
        Ok(result?)
    }

    /// Runs an approved shred request: destroys what it names as
    /// [`KeyHierarchy::destroy`] does and marks it executed, in one store
    /// transaction, only if it is still approved (not withdrawn, not run).
    pub async fn execute_approval(
        &self,
        approval: &Approval,
    ) -> Result<(Approval, TenantRecord), HierarchyError> {
        let result = self.store.execute_approval(&approval.id, unix_now()).await;
        // Whatever the answer: a commit whose acknowledgement was lost
        // destroyed the keys all the same.
        self.cache.invalidate_tenant(&approval.tenant);
        Ok(result?)
    }

    /// Sets (or clears) a tenant's auto-rotation period.
    pub async fn set_rotation_period(
        &self,
        id: &TenantId,
        every: Option<Duration>,
    ) -> Result<TenantRecord, HierarchyError> {
        let secs = every.map(|d| i64::try_from(d.as_secs().max(1)).unwrap_or(i64::MAX));
        Ok(self.store.set_rotation_period(id, secs).await?)
    }

    /// The tenants whose auto-rotation period has run out at `now` (Unix
    /// seconds): each has an active version at least its period old and
    /// is not shredded. The scheduler rotates each with
    /// [`KeyHierarchy::prepare_rotation`] and
    /// [`KeyHierarchy::commit_rotation`], recording it in between.
    pub async fn due_for_rotation(&self, now: i64) -> Result<Vec<TenantRecord>, HierarchyError> {
        let mut due = self.store.list_tenants().await?;
        due.retain(|tenant| {
            let (Some(every), Some(active)) = (tenant.rotate_every_secs, tenant.active()) else {
                return false;
            };
            tenant.index_root_wrapped.is_some() && active.created_at.saturating_add(every) <= now
        });
        Ok(due)
    }

    /// Makes `provider` the active master key and rewraps every stored key
    /// (tenant KEKs, index roots, audit signing keys) under it.
    ///
    /// Resumable: each key moves in its own compare-and-swap write, so a
    /// crash at any point leaves every key wrapped under exactly one master
    /// the keystore knows (with its connection settings, `config`), and
    /// running the rotation again moves the rest. Keys are never unwrapped
    /// outside this process; material destroyed meanwhile stays destroyed.
    pub async fn rotate_master(
        &self,
        provider: Arc<dyn RootKeyProvider>,
        config: &str,
    ) -> Result<MasterRotation, HierarchyError> {
        let info = provider.describe();
        let id = self.store.register_master(&info).await?;
        self.store.set_master_config(id, config).await?;
        self.masters.insert(id, provider.clone());
        self.store.activate_master(id).await?;
        let mut report = MasterRotation {
            master: id,
            info,
            tenant_keys: 0,
            index_roots: 0,
            audit_signing_keys: 0,
        };
        loop {
            let keys = self.store.keys_not_under(id, MASTER_ROTATION_PAGE).await?;
            if keys.is_empty() {
                return Ok(report);
            }
            for stored in keys {
                let context = wrap_context(&stored.key);
                let old = self.master(stored.master).await?;
                let key = old.unwrap(&stored.wrapped, &context).await?;
                let wrapped = provider.wrap(&key, &context).await?;
                if !self.store.replace_wrapped(&stored.key, stored.master, &wrapped, id).await? {
                    continue; // changed meanwhile: the next page sees its new state
                }
                match stored.key {
                    StoredKeyRef::Kek { .. } => report.tenant_keys += 1,
                    StoredKeyRef::IndexRoot { .. } => report.index_roots += 1,
                    StoredKeyRef::AuditSigning { .. } => report.audit_signing_keys += 1,
                }
            }
        }
    }

    /// Adds the usage counted in memory to the keystore. On failure the
    /// counts are kept for the next flush.
    pub async fn flush_usage(&self) -> Result<(), HierarchyError> {
        let _one_at_a_time = self.usage.flushing.lock().await;
        let deltas = self.usage.take();
        if deltas.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.store.add_usage(&deltas).await {
            // Kept when the outcome is unknown too: counted twice if it
            // landed, which errs on the safe side (a version looks used).
            self.usage.restore(deltas);
            return Err(e.into());
        }
        Ok(())
    }

    /// Per-version usage of a tenant (this instance's latest counts
    /// included); `recent_unwraps` covers the last 24 hours.
    pub async fn usage(&self, id: &TenantId) -> Result<Vec<VersionUsage>, HierarchyError> {
        if let Err(e) = self.flush_usage().await {
            tracing::warn!(error = %e, "usage counts not flushed");
        }
        let since = unix_now().div_euclid(3600) - (RECENT_HOURS - 1);
        Ok(self.store.usage(id, since).await?)
    }
}

/// The context a stored key is wrapped for.
fn wrap_context(key: &StoredKeyRef) -> WrapContext {
    match key {
        StoredKeyRef::Kek { tenant, version } => WrapContext::tenant_kek(tenant, *version),
        StoredKeyRef::IndexRoot { tenant } => WrapContext::index_root(tenant),
        StoredKeyRef::AuditSigning { instance } => AuditSigner::wrap_context(instance),
    }
}
