//! Derived index keys and this sidecar's grants, fetched from the key
//! service and kept for the cache TTL from when they were asked for (so a
//! shred or a policy change reaches the sidecar within that bound). A
//! tenant's keys forgotten (its shred heard) are not put back by a fetch
//! that began before. Concurrent misses of one key share one call
//! ([`SingleFlight`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kms_core::record::SchemaKeys;
use kms_core::schema::Schema;
use kms_core::{Key256, Name, TenantId};

use super::ks_client::{KeyServiceClient, KsError};
use super::single_flight::SingleFlight;
use crate::policy::EffectiveGrants;

type Stamped<T> = (Arc<T>, Instant);

/// Most pseudonym namespace keys kept. The app names the namespace of
/// each `POST /v1/pseudonym`, so without a bound their number would be
/// the app's to choose; a namespace past it is answered, not cached.
const MAX_NAMESPACE_KEYS: usize = 10_000;

/// Cached derived keys and grants.
pub(super) struct Keyring {
    client: Arc<KeyServiceClient>,
    ttl: Duration,
    schema_keys: Mutex<HashMap<(TenantId, Name, u32), Stamped<SchemaKeys>>>,
    namespace_keys: Mutex<HashMap<(TenantId, Name), Stamped<Key256>>>,
    /// Most entries of `namespace_keys`.
    max_namespace_keys: usize,
    grants: Mutex<Option<Stamped<EffectiveGrants>>>,
    /// The calls in flight for each of the maps above.
    schema_calls: SingleFlight<(TenantId, Name, u32), SchemaKeys>,
    namespace_calls: SingleFlight<(TenantId, Name), Key256>,
    grants_calls: SingleFlight<(), EffectiveGrants>,
    /// When each tenant's keys were last forgotten: a fetch for a tenant
    /// that began before then keeps what it got for its own request, and
    /// does not cache it (as the DEK cache does). Per tenant, so that a
    /// shredded tenant's traffic (each `key_destroyed` forgets again) does
    /// not keep other tenants' keys from being cached.
    forgotten: Mutex<HashMap<TenantId, Instant>>,
}

impl Keyring {
    /// An empty keyring.
    pub(super) fn new(client: Arc<KeyServiceClient>, ttl: Duration) -> Self {
        Self {
            client,
            ttl,
            schema_keys: Mutex::default(),
            namespace_keys: Mutex::default(),
            max_namespace_keys: MAX_NAMESPACE_KEYS,
            grants: Mutex::default(),
            schema_calls: SingleFlight::default(),
            namespace_calls: SingleFlight::default(),
            grants_calls: SingleFlight::default(),
            forgotten: Mutex::default(),
        }
    }

    /// Caches `value` under `key`, stamped `asked_at`, unless `tenant`'s
    /// keys were forgotten since, or the map holds `max` live entries.
    fn keep<K: std::hash::Hash + Eq, T>(
        &self,
        map: &Mutex<HashMap<K, Stamped<T>>>,
        (tenant, key): (&TenantId, K),
        value: Arc<T>,
        asked_at: Instant,
        max: usize,
    ) {
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        // Read under the map's lock, which `forget` takes after stamping.
        let forgotten =
            self.forgotten.lock().unwrap_or_else(|p| p.into_inner()).get(tenant).copied();
        if forgotten.is_some_and(|at| asked_at <= at) {
            return;
        }
        if map.len() >= max && !map.contains_key(&key) {
            // Full: room from expired entries only; none, and the caller
            // has its answer all the same.
            map.retain(|_, (_, at)| at.elapsed() < self.ttl);
            if map.len() >= max {
                return;
            }
        }
        map.insert(key, (value, asked_at));
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
        self.schema_calls
            .run(key.clone(), || async {
                let asking = Instant::now();
                let keys = Arc::new(self.client.schema_keys(tenant, schema).await?);
                // Bounded by the tenants the key service knows and the
                // schemas loaded.
                self.keep(&self.schema_keys, (tenant, key), keys.clone(), asking, usize::MAX);
                Ok(keys)
            })
            .await
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
        self.namespace_calls
            .run(key.clone(), || async {
                let asking = Instant::now();
                let k = Arc::new(self.client.pseudonym_key(tenant, namespace).await?);
                let max = self.max_namespace_keys;
                self.keep(&self.namespace_keys, (tenant, key), k.clone(), asking, max);
                Ok(k)
            })
            .await
    }

    /// This sidecar's grants (refreshed after the TTL; fail closed when
    /// they cannot be refreshed).
    pub(super) async fn grants(&self) -> Result<Arc<EffectiveGrants>, KsError> {
        if let Some((grants, at)) = &*self.grants.lock().unwrap_or_else(|p| p.into_inner())
            && at.elapsed() < self.ttl
        {
            return Ok(grants.clone());
        }
        self.grants_calls
            .run((), || async {
                let asked_at = Instant::now();
                let grants = Arc::new(self.client.policy_self().await?);
                *self.grants.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((grants.clone(), asked_at));
                Ok(grants)
            })
            .await
    }

    /// Drops the derived keys of `tenant`.
    pub(super) fn forget(&self, tenant: &TenantId) {
        // First, so that no miss from now on joins a call begun before.
        self.schema_calls.detach(|(t, _, _)| t == tenant);
        self.namespace_calls.detach(|(t, _)| t == tenant);
        // Stamped before the maps are cleared (see `keep`). One entry per
        // tenant ever forgotten: tenants, not requests, bound it.
        self.forgotten
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.clone(), Instant::now());
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::sidecar::pool::tests::{fake_key_service, unreachable_client};

    /// A fetch that began before its tenant's keys were forgotten (a shred
    /// heard while it was in flight) is not cached; another tenant's, and
    /// one that began after, are.
    #[test]
    fn a_fetch_begun_before_a_forget_is_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::new(unreachable_client(dir.path()), Duration::from_secs(60));
        let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
        let ns = Name::new("mrn").unwrap();
        let key = || Arc::new(Key256::from_array(&mut [7; 32]));
        let asked = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        ring.forget(&a);
        ring.keep(&ring.namespace_keys, (&a, (a.clone(), ns.clone())), key(), asked, usize::MAX);
        ring.keep(&ring.namespace_keys, (&b, (b.clone(), ns.clone())), key(), asked, usize::MAX);
        assert!(ring.fresh(&ring.namespace_keys, &(a.clone(), ns.clone())).is_none());
        assert!(ring.fresh(&ring.namespace_keys, &(b, ns.clone())).is_some(), "per tenant");
        std::thread::sleep(Duration::from_millis(2));
        let again = Instant::now();
        ring.keep(&ring.namespace_keys, (&a, (a.clone(), ns.clone())), key(), again, usize::MAX);
        assert!(ring.fresh(&ring.namespace_keys, &(a, ns)).is_some(), "begun after");
    }

    /// When a key expires under load, the requests that miss it share one
    /// call; a shred heard meanwhile makes later misses ask anew.
    #[tokio::test]
    async fn concurrent_misses_of_a_key_share_one_call() {
        let dir = tempfile::tempdir().unwrap();
        let (client, fake) = fake_key_service(dir.path()).await;
        fake.derived_delay_ms.store(100, Ordering::Relaxed);
        let ring = Arc::new(Keyring::new(client, Duration::from_secs(60)));
        let onc = TenantId::new("onc").unwrap();
        let ask = |ring: &Arc<Keyring>| {
            let (ring, onc) = (ring.clone(), onc.clone());
            async move { ring.namespace_key(&onc, &Name::new("mrn").unwrap()).await }
        };
        let mut misses = tokio::task::JoinSet::new();
        for _ in 0..16 {
            misses.spawn(ask(&ring));
        }
        for key in misses.join_all().await {
            assert_eq!(&key.unwrap().expose_secret()[..3], b"mrn");
        }
        assert_eq!(fake.derived_calls.load(Ordering::Relaxed), 1);

        ring.forget(&onc);
        let before = tokio::spawn(ask(&ring));
        tokio::time::sleep(Duration::from_millis(30)).await;
        ring.forget(&onc);
        let after = ask(&ring).await;
        assert!(before.await.unwrap().is_ok() && after.is_ok());
        assert_eq!(fake.derived_calls.load(Ordering::Relaxed), 3, "one before, one after");
    }

    /// Namespaces the app names beyond the bound are answered, not cached;
    /// once cached ones expire, new ones take their place.
    #[tokio::test]
    async fn namespace_keys_are_bounded_and_answered_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (client, _) = fake_key_service(dir.path()).await;
        let ttl = Duration::from_millis(1_500);
        let mut ring = Keyring::new(client, ttl);
        ring.max_namespace_keys = 8;
        let onc = TenantId::new("onc").unwrap();
        let cached = |ring: &Keyring| ring.namespace_keys.lock().unwrap().len();
        for round in ["a", "b"] {
            for i in 0..18 {
                let name = format!("ns-{round}-{i}");
                let key = ring.namespace_key(&onc, &Name::new(&name).unwrap()).await.unwrap();
                // The fake's key of a namespace: its name, zero-padded.
                assert_eq!(&key.expose_secret()[..name.len()], name.as_bytes(), "{name}");
                assert!(cached(&ring) <= 8, "{} cached", cached(&ring));
            }
            assert_eq!(cached(&ring), 8);
            let first = (onc.clone(), Name::new(format!("ns-{round}-0")).unwrap());
            assert!(ring.fresh(&ring.namespace_keys, &first).is_some(), "the first 8 kept");
            tokio::time::sleep(ttl).await;
        }
    }
}
