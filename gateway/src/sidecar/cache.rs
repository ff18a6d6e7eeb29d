//! The bounded cache of unwrapped DEKs, keyed by record key id.
//!
//! Entries live at most `ttl` (the bound on how long a disable, rotation
//! or shred takes to reach this sidecar) and the cache holds at most
//! `max_entries`, evicting the oldest first. Evicted keys are wiped.
//!
//! The key bytes live in one slab allocated once for `max_entries` keys
//! (it never grows, so no copy of a key is ever left behind in freed
//! memory); the map holds only ids and slot numbers. A cache of 100,000
//! DEKs is then three allocations instead of 300,000 small ones, which
//! scattered long-lived keys across pages otherwise freed after each
//! request and kept the sidecar's resident set far above what was live.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kms_core::{KEY_LEN, KekVersion, Key256, RecordKeyId, TenantId};
use zeroize::Zeroize;

struct Entry {
    /// Index into `Inner::tenants`.
    tenant: u32,
    kek_version: KekVersion,
    /// Index into `Inner::keys`.
    slot: u32,
    expires: Instant,
}

struct Inner {
    /// Keyed by foldhash, not SipHash: every id in the map was chosen at
    /// random by the key service (an id enters only with its DEK, from the
    /// pool or unwrapped under an AAD that binds it), so no caller can fill
    /// a bucket, and foldhash is keyed per process besides.
    map: HashMap<RecordKeyId, Entry, foldhash::fast::RandomState>,
    order: VecDeque<(RecordKeyId, Instant)>,
    tenants: Vec<TenantId>,
    /// How many entries each of `tenants` has (so that forgetting a tenant
    /// with none, as every `key_destroyed` after its first does, scans
    /// nothing).
    live: Vec<usize>,
    /// Key bytes; capacity fixed at `max_entries` when the cache is made.
    keys: Vec<[u8; KEY_LEN]>,
    /// Slots of `keys` free for reuse (wiped).
    free: Vec<u32>,
    /// When each tenant's keys were last forgotten (its keys destroyed):
    /// DEKs the key service vouched for before then are not cached, even
    /// when their answer comes in after (an unwrap in flight across the
    /// shred). One entry per tenant ever forgotten.
    forgotten: HashMap<TenantId, Instant>,
}

impl Inner {
    fn remove(&mut self, id: &RecordKeyId) {
        if let Some(entry) = self.map.remove(id) {
            self.release(&entry);
        }
    }

    /// Removes `id` if its entry is the one queued with `stamp` (an id
    /// cached again has a later stamp, queued later). One lookup: the entry
    /// is put back in the rare case it is not that one.
    fn remove_if_stamped(&mut self, id: &RecordKeyId, stamp: Instant) {
        match self.map.remove(id) {
            Some(entry) if entry.expires == stamp => self.release(&entry),
            Some(entry) => {
                self.map.insert(*id, entry);
            }
            None => {}
        }
    }

    /// Wipes and frees the slot of an entry taken out of the map.
    fn release(&mut self, entry: &Entry) {
        if let Some(live) = self.live.get_mut(entry.tenant as usize) {
            *live = live.saturating_sub(1);
        }
        if let Some(key) = self.keys.get_mut(entry.slot as usize) {
            key.zeroize();
            self.free.push(entry.slot);
        }
    }

    /// Counts an entry of tenant `to` in place of one of `from`, if any.
    fn count(&mut self, from: Option<u32>, to: u32) {
        if let Some(live) = from.and_then(|from| self.live.get_mut(from as usize)) {
            *live = live.saturating_sub(1);
        }
        if let Some(live) = self.live.get_mut(to as usize) {
            *live += 1;
        }
    }

    /// A slot for a new key, if the slab has room (it always has while
    /// the map holds fewer than `max_entries` keys).
    fn slot(&mut self) -> Option<u32> {
        if let Some(slot) = self.free.pop() {
            return Some(slot);
        }
        if self.keys.len() < self.keys.capacity() {
            self.keys.push([0; KEY_LEN]);
            return u32::try_from(self.keys.len() - 1).ok();
        }
        None
    }

    fn tenant_index(&mut self, tenant: &TenantId) -> u32 {
        match self.tenants.iter().position(|t| t == tenant) {
            Some(i) => u32::try_from(i).unwrap_or(u32::MAX),
            None => {
                self.tenants.push(tenant.clone());
                self.live.push(0);
                u32::try_from(self.tenants.len() - 1).unwrap_or(u32::MAX)
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.keys.zeroize();
    }
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
    /// An empty cache (its key slab is reserved, not yet touched).
    pub(super) fn new(ttl: Duration, max_entries: usize) -> Self {
        let max_entries = max_entries.min(u32::MAX as usize);
        let inner = Inner {
            map: HashMap::default(),
            order: VecDeque::new(),
            tenants: Vec::new(),
            live: Vec::new(),
            keys: Vec::with_capacity(max_entries),
            free: Vec::new(),
            forgotten: HashMap::new(),
        };
        Self {
            ttl,
            max_entries,
            inner: Mutex::new(inner),
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
        let found = {
            let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            inner
                .map
                .get(id)
                .filter(|e| {
                    e.expires > now
                        && e.kek_version == version
                        && inner.tenants.get(e.tenant as usize) == Some(tenant)
                })
                .and_then(|e| inner.keys.get(e.slot as usize))
                .and_then(|bytes| Key256::from_slice(bytes))
        };
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found.map(Arc::new)
    }

    /// Caches the DEKs of one tenant under a single lock (the key bytes are
    /// copied into the slab, so a borrowed key will do) until the TTL after
    /// `known_at`, when the key service last vouched for them (asked to
    /// issue or unwrap them): a shred or state change after that instant
    /// reaches these entries within the TTL, however long they waited
    /// before being cached.
    pub(super) fn insert_many<K: Borrow<Key256>>(
        &self,
        tenant: &TenantId,
        known_at: Instant,
        deks: impl IntoIterator<Item = (RecordKeyId, KekVersion, K)>,
    ) {
        let expires = known_at + self.ttl;
        if self.max_entries == 0 || expires <= Instant::now() {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.forgotten.get(tenant).is_some_and(|at| known_at <= *at) {
            return;
        }
        let tenant = inner.tenant_index(tenant);
        for (id, version, key) in deks {
            // Whether `order` holds `id` with this expiry already: an entry
            // of the same id and expiry needs no second place in line.
            let mut queued = false;
            let slot = match inner.map.get_mut(&id) {
                // Cached already (rare): the entry and its slot are reused.
                Some(entry) => {
                    let before = entry.tenant;
                    queued = entry.expires == expires;
                    *entry = Entry { tenant, kek_version: version, slot: entry.slot, expires };
                    let slot = entry.slot;
                    if before != tenant {
                        inner.count(Some(before), tenant);
                    }
                    Some(slot)
                }
                None => {
                    // Room first (oldest out), so the slab never outgrows
                    // its reservation.
                    while inner.map.len() >= self.max_entries {
                        let Some((oldest, stamp)) = inner.order.pop_front() else { break };
                        inner.remove_if_stamped(&oldest, stamp);
                    }
                    let slot = inner.slot();
                    if let Some(slot) = slot {
                        inner.map.insert(id, Entry { tenant, kek_version: version, slot, expires });
                        inner.count(None, tenant);
                    }
                    slot
                }
            };
            let Some(slot) = slot else { continue };
            if let Some(bytes) = inner.keys.get_mut(slot as usize) {
                bytes.copy_from_slice(key.borrow().expose_secret());
            }
            if !queued {
                inner.order.push_back((id, expires));
            }
        }
        // The order queue may hold stale stamps of re-inserted ids; keep it bounded.
        if inner.order.len() > 2 * self.max_entries.max(1) {
            let Inner { map, order, .. } = &mut *inner;
            order.retain(|(id, stamp)| map.get(id).is_some_and(|e| e.expires == *stamp));
        }
    }

    /// Drops (and wipes) every entry of `tenant`: its keys were destroyed.
    /// DEKs of it vouched for until now are not cached later either.
    /// Returns how many entries were dropped.
    pub(super) fn forget_tenant(&self, tenant: &TenantId) -> usize {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.forgotten.insert(tenant.clone(), Instant::now());
        let Some(index) = inner.tenants.iter().position(|t| t == tenant) else { return 0 };
        if inner.live.get(index).is_none_or(|live| *live == 0) {
            return 0;
        }
        let gone: Vec<RecordKeyId> = inner
            .map
            .iter()
            .filter(|(_, e)| e.tenant as usize == index)
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            inner.remove(id);
        }
        let Inner { map, order, .. } = &mut *inner;
        order.retain(|(id, _)| map.contains_key(id));
        gone.len()
    }

    /// Drops expired entries (wiping their keys); returns how many remain.
    pub(super) fn evict_expired(&self) -> usize {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let expired: Vec<RecordKeyId> =
            inner.map.iter().filter(|(_, e)| e.expires <= now).map(|(id, _)| *id).collect();
        for id in &expired {
            inner.remove(id);
        }
        let Inner { map, order, .. } = &mut *inner;
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

    fn key(byte: u8) -> Arc<Key256> {
        Arc::new(Key256::from_array(&mut [byte; 32]))
    }

    #[test]
    fn bounded_tenant_and_version_checked_and_expiring() {
        let cache = DekCache::new(Duration::from_millis(50), 2);
        let ids: Vec<RecordKeyId> = (0..3u8).map(|i| RecordKeyId::from_bytes([i; 16])).collect();
        for (i, id) in ids.iter().enumerate() {
            cache.insert_many(&t("a"), Instant::now(), [(*id, 1, key(i as u8 + 1))]);
        }
        assert!(cache.get(&ids[0], &t("a"), 1).is_none(), "oldest evicted at the bound");
        assert_eq!(cache.get(&ids[2], &t("a"), 1).unwrap().expose_secret(), &[3; 32]);
        assert_eq!(cache.get(&ids[1], &t("a"), 1).unwrap().expose_secret(), &[2; 32]);
        assert!(cache.get(&ids[2], &t("b"), 1).is_none(), "other tenant");
        assert!(cache.get(&ids[2], &t("a"), 2).is_none(), "other version");
        std::thread::sleep(Duration::from_millis(60));
        assert!(cache.get(&ids[2], &t("a"), 1).is_none(), "expired");
        assert_eq!(cache.evict_expired(), 0);
    }

    #[test]
    fn slots_are_reused_and_wiped_and_never_exceed_the_bound() {
        let cache = DekCache::new(Duration::from_secs(60), 3);
        for round in 0..10u8 {
            let deks = (0..3u8).map(|i| {
                (
                    RecordKeyId::from_bytes([round, i, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                    1,
                    key(round),
                )
            });
            cache.insert_many(&t("a"), Instant::now(), deks);
        }
        let inner = cache.inner.lock().unwrap();
        assert_eq!(inner.map.len(), 3);
        assert_eq!(inner.keys.len(), 3, "the slab never grows past max_entries");
        assert!(inner.keys.iter().all(|k| k == &[9; 32]), "live keys are the newest");
        drop(inner);
        // Re-inserting an id replaces its key in place.
        let id = RecordKeyId::from_bytes([9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        cache.insert_many(&t("a"), Instant::now(), [(id, 1, key(42))]);
        assert_eq!(cache.get(&id, &t("a"), 1).unwrap().expose_secret(), &[42; 32]);
        let inner = cache.inner.lock().unwrap();
        for slot in &inner.free {
            assert_eq!(inner.keys[*slot as usize], [0; 32], "free slots are wiped");
        }
    }

    #[test]
    fn churn_keeps_every_live_key_and_every_slot_accounted_for() {
        let max = 50;
        let cache = DekCache::new(Duration::from_secs(60), max);
        let id = |n: u32| {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&n.to_be_bytes());
            RecordKeyId::from_bytes(bytes)
        };
        // Batches of fresh ids mixed with re-cached recent ones (as two
        // requests that missed the same DEK would), under two tenants.
        for round in 0..40u32 {
            let tenant = if round % 3 == 0 { t("b") } else { t("a") };
            let batch: Vec<_> = (0..17u32)
                .map(|i| {
                    let n = if i % 5 == 0 {
                        (round * 17 + i).saturating_sub(20)
                    } else {
                        round * 17 + i
                    };
                    (id(n), 1 + round % 2, key((n % 250) as u8))
                })
                .collect();
            cache.insert_many(&tenant, Instant::now(), batch.clone());
            for (id, version, key) in &batch {
                let got = cache.get(id, &tenant, *version).expect("just cached");
                assert_eq!(got.expose_secret(), key.expose_secret());
            }
            let inner = cache.inner.lock().unwrap();
            assert!(inner.map.len() <= max && inner.keys.len() <= max);
            let mut live = vec![0; inner.tenants.len()];
            for entry in inner.map.values() {
                live[entry.tenant as usize] += 1;
            }
            assert_eq!(live, inner.live, "each tenant's entries counted");
            let mut slots: Vec<u32> = inner.map.values().map(|e| e.slot).collect();
            slots.extend(&inner.free);
            slots.sort_unstable();
            slots.dedup();
            assert_eq!(slots.len(), inner.keys.len(), "each slot is live or free, once");
        }
    }

    #[test]
    fn a_recached_key_outlives_its_first_place_in_line() {
        let cache = DekCache::new(Duration::from_secs(60), 2);
        let [a, b, c] = [1u8, 2, 3].map(|i| RecordKeyId::from_bytes([i; 16]));
        cache.insert_many(&t("x"), Instant::now(), [(a, 1, key(1)), (b, 1, key(2))]);
        std::thread::sleep(Duration::from_millis(2));
        // `a` again: its first place in line is now stale.
        cache.insert_many(&t("x"), Instant::now(), [(a, 2, key(11))]);
        // Room for `c` is made past `a`'s stale place, from `b`.
        cache.insert_many(&t("x"), Instant::now(), [(c, 1, key(3))]);
        assert_eq!(cache.get(&a, &t("x"), 2).unwrap().expose_secret(), &[11; 32]);
        assert!(cache.get(&a, &t("x"), 1).is_none(), "replaced, version and all");
        assert!(cache.get(&b, &t("x"), 1).is_none(), "the oldest live entry went");
        assert_eq!(cache.get(&c, &t("x"), 1).unwrap().expose_secret(), &[3; 32]);
        let inner = cache.inner.lock().unwrap();
        assert_eq!((inner.map.len(), inner.keys.len()), (2, 2));
    }

    #[test]
    fn entries_live_the_ttl_from_when_the_key_service_vouched_for_them() {
        let ttl = Duration::from_secs(2);
        let cache = DekCache::new(ttl, 10);
        let (fresh, late, stale) = (
            RecordKeyId::from_bytes([1; 16]),
            RecordKeyId::from_bytes([2; 16]),
            RecordKeyId::from_bytes([3; 16]),
        );
        let now = Instant::now();
        cache.insert_many(&t("a"), now, [(fresh, 1, key(1))]);
        // Issued 1.9 s ago (say, pooled since): 100 ms left, not 2 s.
        cache.insert_many(&t("a"), now - Duration::from_millis(1_900), [(late, 1, key(2))]);
        // Issued longer ago than the TTL: not cached at all.
        cache.insert_many(&t("a"), now - ttl, [(stale, 1, key(3))]);
        assert!(cache.get(&stale, &t("a"), 1).is_none());
        assert_eq!(cache.stats().2, 2);
        std::thread::sleep(Duration::from_millis(300));
        assert!(cache.get(&late, &t("a"), 1).is_none(), "gone at its own deadline");
        assert!(cache.get(&fresh, &t("a"), 1).is_some());
    }

    #[test]
    fn a_destroyed_tenants_entries_are_forgotten_and_no_others() {
        let cache = DekCache::new(Duration::from_secs(60), 10);
        let ids: Vec<RecordKeyId> = (0..4u8).map(|i| RecordKeyId::from_bytes([i; 16])).collect();
        cache.insert_many(&t("gone"), Instant::now(), [(ids[0], 1, key(1)), (ids[1], 2, key(2))]);
        cache.insert_many(&t("kept"), Instant::now(), [(ids[2], 1, key(3))]);
        cache.forget_tenant(&t("gone"));
        cache.forget_tenant(&t("never-seen"));
        assert!(
            cache.get(&ids[0], &t("gone"), 1).is_none()
                && cache.get(&ids[1], &t("gone"), 2).is_none()
        );
        assert!(cache.get(&ids[2], &t("kept"), 1).is_some());
        assert_eq!(cache.stats().2, 1);
        // Its slots are free (and wiped) for others.
        let inner = cache.inner.lock().unwrap();
        assert_eq!(inner.free.len(), 2);
        assert!(inner.free.iter().all(|s| inner.keys[*s as usize] == [0; KEY_LEN]));
    }

    /// An unwrap asked for before the shred was heard, answered after:
    /// its DEKs are not cached; one asked for after the shred is.
    #[test]
    fn deks_vouched_for_before_a_forget_are_not_cached_after_it() {
        let cache = DekCache::new(Duration::from_secs(60), 10);
        let (early, late) = (RecordKeyId::from_bytes([1; 16]), RecordKeyId::from_bytes([2; 16]));
        let asked = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        cache.forget_tenant(&t("a"));
        cache.insert_many(&t("a"), asked, [(early, 1, key(1))]);
        assert!(cache.get(&early, &t("a"), 1).is_none(), "in flight across the forget");
        cache.insert_many(&t("b"), asked, [(early, 1, key(1))]);
        assert!(cache.get(&early, &t("b"), 1).is_some(), "another tenant is not held back");
        std::thread::sleep(Duration::from_millis(2));
        cache.insert_many(&t("a"), Instant::now(), [(late, 1, key(2))]);
        assert!(cache.get(&late, &t("a"), 1).is_some());
    }

    /// One id cached again with the same expiry (a batch repeating a
    /// record, or two requests sharing one unwrap) keeps one place in line.
    #[test]
    fn an_id_recached_with_the_same_expiry_is_queued_once() {
        let cache = DekCache::new(Duration::from_secs(60), 10);
        let id = RecordKeyId::from_bytes([1; 16]);
        let at = Instant::now();
        cache.insert_many(&t("a"), at, (0..5).map(|_| (id, 1, key(1))));
        cache.insert_many(&t("a"), at, [(id, 1, key(1))]);
        assert_eq!(cache.inner.lock().unwrap().order.len(), 1);
        // A later expiry is a new place in line (the first one is stale).
        std::thread::sleep(Duration::from_millis(2));
        cache.insert_many(&t("a"), Instant::now(), [(id, 1, key(1))]);
        assert_eq!(cache.inner.lock().unwrap().order.len(), 2);
        assert!(cache.get(&id, &t("a"), 1).is_some());
    }

    /// Each tenant's entries are counted as they come and go (moved to
    /// another tenant, evicted, expired), so forgetting a tenant with none
    /// left scans nothing and drops nothing.
    #[test]
    fn forgetting_counts_what_each_tenant_holds() {
        let cache = DekCache::new(Duration::from_secs(60), 3);
        let [x, y, z, w] = [1u8, 2, 3, 4].map(|i| RecordKeyId::from_bytes([i; 16]));
        cache.insert_many(&t("a"), Instant::now(), [(x, 1, key(1)), (y, 1, key(2))]);
        cache.insert_many(&t("b"), Instant::now(), [(y, 1, key(2)), (z, 1, key(3))]);
        // `w` evicts the oldest, `x` of `a`.
        cache.insert_many(&t("b"), Instant::now(), [(w, 1, key(4))]);
        assert_eq!(cache.inner.lock().unwrap().live, [0, 3]);
        assert_eq!(cache.forget_tenant(&t("a")), 0);
        assert_eq!(cache.forget_tenant(&t("b")), 3);
        assert_eq!(cache.forget_tenant(&t("b")), 0, "forgotten already");
        assert_eq!(cache.stats().2, 0);
        assert_eq!(cache.inner.lock().unwrap().live, [0, 0]);
    }

    #[test]
    fn disabled_cache_holds_nothing() {
        let cache = DekCache::new(Duration::from_secs(60), 0);
        let id = RecordKeyId::from_bytes([1; 16]);
        cache.insert_many(&t("a"), Instant::now(), [(id, 1, key(1))]);
        assert!(cache.get(&id, &t("a"), 1).is_none());
    }
}
