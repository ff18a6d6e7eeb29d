//! The bounded cache of unwrapped DEKs, keyed by record key id.
//!
//! Entries live at most `ttl` (the bound on how long a disable, rotation
//! or shred takes to reach this sidecar) and the cache holds at most
//! `max_entries`, evicting the oldest first. Evicted keys are wiped.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kms_core::{KekVersion, Key256, RecordKeyId, TenantId};

struct Entry {
    tenant: TenantId,
    kek_version: KekVersion,
    key: Arc<Key256>,
    expires: Instant,
}

#[derive(Default)]
struct Inner {
    map: HashMap<RecordKeyId, Entry>,
    order: VecDeque<(RecordKeyId, Instant)>,
}

/// Unwrapped DEKs.
pub(super) struct DekCache {
    ttl: Duration,
    max_entries: usize,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl DekCache {
    /// An empty cache.
    pub(super) fn new(ttl: Duration, max_entries: usize) -> Self {
        Self {
            ttl,
            max_entries,
            inner: Mutex::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The DEK of a record, if cached for exactly this tenant and version.
    pub(super) fn get(
        &self,
        id: &RecordKeyId,
        tenant: &TenantId,
        version: KekVersion,
    ) -> Option<Arc<Key256>> {
        let now = Instant::now();
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let found = inner
            .map
            .get(id)
            .filter(|e| e.expires > now && &e.tenant == tenant && e.kek_version == version)
            .map(|e| e.key.clone());
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Caches the DEKs of one tenant under a single lock.
    pub(super) fn insert_many(
        &self,
        tenant: &TenantId,
        deks: impl IntoIterator<Item = (RecordKeyId, KekVersion, Arc<Key256>)>,
    ) {
        if self.max_entries == 0 || self.ttl.is_zero() {
            return;
        }
        let expires = Instant::now() + self.ttl;
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (id, version, key) in deks {
            inner
                .map
                .insert(id, Entry { tenant: tenant.clone(), kek_version: version, key, expires });
            inner.order.push_back((id, expires));
        }
        while inner.map.len() > self.max_entries {
            let Some((oldest, stamp)) = inner.order.pop_front() else { break };
            if inner.map.get(&oldest).is_some_and(|e| e.expires == stamp) {
                inner.map.remove(&oldest);
            }
        }
        // The order queue may hold stale stamps of re-inserted ids; keep it bounded.
        if inner.order.len() > 2 * self.max_entries.max(1) {
            let Inner { map, order } = &mut *inner;
            order.retain(|(id, stamp)| map.get(id).is_some_and(|e| e.expires == *stamp));
        }
    }

    /// Drops expired entries; returns how many remain.
    pub(super) fn evict_expired(&self) -> usize {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.map.retain(|_, e| e.expires > now);
        let Inner { map, order } = &mut *inner;
        order.retain(|(id, _)| map.contains_key(id));
        map.len()
    }

    /// (hits, misses, entries).
    pub(super) fn stats(&self) -> (u64, u64, usize) {
        let entries = self.inner.lock().unwrap_or_else(|p| p.into_inner()).map.len();
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed), entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> TenantId {
        TenantId::new(name).unwrap()
    }

    #[test]
    fn bounded_tenant_and_version_checked_and_expiring() {
        let cache = DekCache::new(Duration::from_millis(50), 2);
        let ids: Vec<RecordKeyId> = (0..3u8).map(|i| RecordKeyId::from_bytes([i; 16])).collect();
        for id in &ids {
            cache.insert_many(&t("a"), [(*id, 1, Arc::new(Key256::from_array(&mut [1; 32])))]);
        }
        assert!(cache.get(&ids[0], &t("a"), 1).is_none(), "oldest evicted at the bound");
        assert!(cache.get(&ids[2], &t("a"), 1).is_some());
        assert!(cache.get(&ids[2], &t("b"), 1).is_none(), "other tenant");
        assert!(cache.get(&ids[2], &t("a"), 2).is_none(), "other version");
        std::thread::sleep(Duration::from_millis(60));
        assert!(cache.get(&ids[2], &t("a"), 1).is_none(), "expired");
        assert_eq!(cache.evict_expired(), 0);
    }
}
