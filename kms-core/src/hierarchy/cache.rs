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
    entries: Mutex<HashMap<(TenantId, Slot), Entry>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl KeyCache {
    pub(super) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(TenantId, Slot), Entry>> {
        // A panic while holding the lock cannot leave the map inconsistent
        // (every operation is a single insert/remove), so recover from poison.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn get(&self, tenant: &TenantId, slot: Slot) -> Option<Cached> {
        let now = Instant::now();
        let mut map = self.lock();
        let key = (tenant.clone(), slot);
        let found = match map.get(&key) {
            Some(entry) if entry.expires > now => Some(entry.value.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        };
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    pub(super) fn insert(&self, tenant: &TenantId, slot: Slot, value: Cached) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, e| e.expires > now);
        map.insert((tenant.clone(), slot), Entry { value, expires: now + self.ttl });
    }

    /// Forgets everything cached for a tenant (after a local state change).
    pub(super) fn invalidate_tenant(&self, tenant: &TenantId) {
        self.lock().retain(|(t, _), _| t != tenant);
    }

    pub(super) fn evict_expired(&self) -> usize {
        let now = Instant::now();
        let mut map = self.lock();
        let before = map.len();
        map.retain(|_, e| e.expires > now);
        before - map.len()
    }

    pub(super) fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.lock().len(),
        }
    }
}
