//! Derived index keys and this sidecar's grants, fetched from the key
//! service and kept for the cache TTL (so a shred or a policy change
//! reaches the sidecar within that bound).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kms_core::record::SchemaKeys;
use kms_core::schema::Schema;
use kms_core::{Key256, Name, TenantId};

use super::ks_client::{KeyServiceClient, KsError};
use crate::policy::EffectiveGrants;

type Stamped<T> = (Arc<T>, Instant);

/// Cached derived keys and grants.
pub(super) struct Keyring {
    client: Arc<KeyServiceClient>,
    ttl: Duration,
    schema_keys: Mutex<HashMap<(TenantId, Name, u32), Stamped<SchemaKeys>>>,
    namespace_keys: Mutex<HashMap<(TenantId, Name), Stamped<Key256>>>,
    grants: Mutex<Option<Stamped<EffectiveGrants>>>,
}

impl Keyring {
    /// An empty keyring.
    pub(super) fn new(client: Arc<KeyServiceClient>, ttl: Duration) -> Self {
        Self {
            client,
            ttl,
            schema_keys: Mutex::default(),
            namespace_keys: Mutex::default(),
            grants: Mutex::default(),
        }
    }

    fn fresh<K: std::hash::Hash + Eq, T>(
        &self,
        map: &Mutex<HashMap<K, Stamped<T>>>,
        key: &K,
    ) -> Option<Arc<T>> {
        let map = map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).filter(|(_, at)| at.elapsed() < self.ttl).map(|(v, _)| v.clone())
    }

    /// The derived keys of `schema` for `tenant`.
    pub(super) async fn schema_keys(
        &self,
        tenant: &TenantId,
        schema: &Schema,
    ) -> Result<Arc<SchemaKeys>, KsError> {
        let key = (tenant.clone(), schema.name.clone(), schema.version);
        if let Some(keys) = self.fresh(&self.schema_keys, &key) {
            return Ok(keys);
        }
        let keys = Arc::new(self.client.schema_keys(tenant, schema).await?);
        self.schema_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (keys.clone(), Instant::now()));
        Ok(keys)
    }

    /// The key of a pseudonym namespace for `tenant`.
    pub(super) async fn namespace_key(
        &self,
        tenant: &TenantId,
        namespace: &Name,
    ) -> Result<Arc<Key256>, KsError> {
        let key = (tenant.clone(), namespace.clone());
        if let Some(k) = self.fresh(&self.namespace_keys, &key) {
            return Ok(k);
        }
        let k = Arc::new(self.client.pseudonym_key(tenant, namespace).await?);
        self.namespace_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (k.clone(), Instant::now()));
        Ok(k)
    }

    /// This sidecar's grants (refreshed after the TTL; fail closed when
    /// they cannot be refreshed).
    pub(super) async fn grants(&self) -> Result<Arc<EffectiveGrants>, KsError> {
        if let Some((grants, at)) = &*self.grants.lock().unwrap_or_else(|p| p.into_inner())
            && at.elapsed() < self.ttl
        {
            return Ok(grants.clone());
        }
        let grants = Arc::new(self.client.policy_self().await?);
        *self.grants.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((grants.clone(), Instant::now()));
        Ok(grants)
    }

    /// Drops the derived keys of `tenant`.
    pub(super) fn forget(&self, tenant: &TenantId) {
        self.schema_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(t, _, _), _| t != tenant);
        self.namespace_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(t, _), _| t != tenant);
    }

    /// Drops everything older than the TTL.
    pub(super) fn evict_expired(&self) {
        let ttl = self.ttl;
        self.schema_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (_, at)| at.elapsed() < ttl);
        self.namespace_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (_, at)| at.elapsed() < ttl);
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        if grants.as_ref().is_some_and(|(_, at)| at.elapsed() >= ttl) {
            *grants = None;
        }
    }
}
