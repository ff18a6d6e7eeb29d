//! The in-memory cache of unwrapped tenant keys.
//!
//! Entries live for a bounded TTL and are dropped (and so zeroized) when
//! they expire; expired entries are never served. Sweeping happens on every
//! insert and whenever the owner calls [`KeyCache::evict_expired`] (the key
//! service does so on a timer), so expired keys do not linger in memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::crypto::Aead;
use crate::dek::KekVersion;
use crate::ids::TenantId;
use crate::kek::KekState;
use crate::secret::Key256;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Slot {
    Kek(KekVersion),
    ActiveVersion,
    IndexRoot,
}

#[derive(Clone)]
pub(super) enum Cached {
    /// A KEK version's state and, if it can unwrap, its keyed cipher.
    Kek {
        state: KekState,
        aead: Option<Arc<Aead>>,
    },
    ActiveVersion(KekVersion),
    IndexRoot(Arc<Key256>),
}

struct Entry {
    value: Cached,
    expires: Instant,
}

/// Hit and miss counts (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups served from memory.
    pub hits: u64,
    /// Lookups that went to the store and root key provider.
    pub misses: u64,
    /// Entries currently held.
    pub entries: usize,
}

pub(super) struct KeyCache {
    ttl: Duration,
    entries: Mutex<Entries>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct Entries {
    map: HashMap<(TenantId, Slot), Entry>,
    /// Bumped by every invalidation of a tenant. A lookup that went to the
    /// store records the generation first and may only insert its result if
    /// no invalidation happened meanwhile, so a state change racing a cache
    /// fill can never be overwritten by the stale value.
    generations: HashMap<TenantId, u64>,
    /// Bumped by [`KeyCache::invalidate_all`].
    epoch: u64,
}

/// The invalidation counts (global, tenant) taken before reading the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Generation(u64, u64);

impl KeyCache {
    pub(super) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(Entries::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // A panic while holding the lock cannot leave the map inconsistent
        // (every operation is a single insert/remove), so recover from poison.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn get(&self, tenant: &TenantId, slot: Slot) -> Option<Cached> {
        let now = Instant::now();
        let mut entries = self.lock();
        let key = (tenant.clone(), slot);
        let found = match entries.map.get(&key) {
            Some(entry) if entry.expires > now => Some(entry.value.clone()),
            Some(_) => {
                entries.map.remove(&key);
                None
            }
            None => None,
        };
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// The tenant's current generation; take it before reading the store.
    pub(super) fn generation(&self, tenant: &TenantId) -> Generation {
        let entries = self.lock();
        Generation(entries.epoch, entries.generations.get(tenant).copied().unwrap_or(0))
    }

    /// Caches `value` unless the tenant was invalidated since `seen`.
    pub(super) fn insert(&self, tenant: &TenantId, seen: Generation, slot: Slot, value: Cached) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut entries = self.lock();
        let now_seen =
            Generation(entries.epoch, entries.generations.get(tenant).copied().unwrap_or(0));
        if now_seen != seen {
            return;
        }
        entries.map.retain(|_, e| e.expires > now);
        entries.map.insert((tenant.clone(), slot), Entry { value, expires: now + self.ttl });
    }

    /// Forgets everything cached for a tenant (after a state change) and
    /// makes in-flight fills for it discard their results.
    pub(super) fn invalidate_tenant(&self, tenant: &TenantId) {
        let mut entries = self.lock();
        entries.map.retain(|(t, _), _| t != tenant);
        *entries.generations.entry(tenant.clone()).or_insert(0) += 1;
    }

    /// Forgets everything and makes every in-flight fill discard its result.
    pub(super) fn invalidate_all(&self) {
        let mut entries = self.lock();
        entries.map.clear();
        entries.epoch += 1;
    }

    pub(super) fn evict_expired(&self) -> usize {
        let now = Instant::now();
        let mut entries = self.lock();
        let before = entries.map.len();
        entries.map.retain(|_, e| e.expires > now);
        before - entries.map.len()
    }

    pub(super) fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.lock().map.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> TenantId {
        TenantId::new(name).unwrap()
    }

    #[test]
    fn a_fill_that_raced_an_invalidation_is_discarded() {
        let cache = KeyCache::new(Duration::from_secs(60));
        let seen = cache.generation(&t("a"));
        cache.invalidate_tenant(&t("a"));
        cache.insert(&t("a"), seen, Slot::ActiveVersion, Cached::ActiveVersion(1));
        assert!(cache.get(&t("a"), Slot::ActiveVersion).is_none(), "stale fill dropped");

        let seen = cache.generation(&t("b"));
        cache.invalidate_all();
        cache.insert(&t("b"), seen, Slot::ActiveVersion, Cached::ActiveVersion(1));
        assert!(
            cache.get(&t("b"), Slot::ActiveVersion).is_none(),
            "stale fill dropped after a flush"
        );

        let seen = cache.generation(&t("b"));
        cache.insert(&t("b"), seen, Slot::ActiveVersion, Cached::ActiveVersion(2));
        assert!(matches!(cache.get(&t("b"), Slot::ActiveVersion), Some(Cached::ActiveVersion(2))));
        cache.invalidate_all();
        assert_eq!(cache.stats().entries, 0);
    }
}
