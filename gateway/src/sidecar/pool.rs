//! The per-tenant pool of pre-issued DEKs.
//!
//! Encryption takes one DEK per record from the pool; a background refill
//! asks the key service for a batch whenever the pool falls below its
//! low-water mark. Pooled DEKs expire after a TTL and are dropped (wiped);
//! each DEK leaves the pool exactly once, so none is ever reused. While the
//! key service is unreachable, encryption continues from what is pooled.
//!
//! A pooled DEK lives no longer than the cache TTL, the bound in which a
//! shred reaches this sidecar; and the key service saying `key_destroyed`
//! for a tenant drops that tenant's pool at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kms_core::{IssuedDek, TenantId};

use super::config::PoolConfig;
use super::ks_client::{KeyServiceClient, KsError};

struct Pooled {
    dek: IssuedDek,
    /// When it was asked for: the key service issued it after this.
    asked_at: Instant,
}

/// DEKs taken from the pool.
pub(super) struct Taken {
    /// Exactly as many as asked for.
    pub(super) deks: Vec<IssuedDek>,
    /// When the first of them was asked for of the key service: a shred
    /// or state change after it may not have reached them. (The DEK
    /// cache keeps what encrypt warms it with from this instant on, not
    /// from when it is taken, so a shred still reaches it within the
    /// cache TTL.)
    pub(super) asked_at: Instant,
}

#[derive(Default)]
struct TenantPool {
    queue: Mutex<VecDeque<Pooled>>,
    refilling: AtomicBool,
}

/// DEK pools of every tenant this sidecar encrypts for.
pub(super) struct DekPool {
    client: Arc<KeyServiceClient>,
    config: PoolConfig,
    ttl: Duration,
    tenants: Mutex<HashMap<TenantId, Arc<TenantPool>>>,
}

impl DekPool {
    /// An empty pool; tenants are added on first use. Pooled DEKs expire
    /// after `pool.ttl_secs` or `cache_ttl`, whichever is shorter.
    pub(super) fn new(
        client: Arc<KeyServiceClient>,
        config: PoolConfig,
        cache_ttl: Duration,
    ) -> Arc<Self> {
        let ttl = Duration::from_secs(config.ttl_secs).min(cache_ttl);
        Arc::new(Self { client, config, ttl, tenants: Mutex::default() })
    }

    fn tenant(&self, tenant: &TenantId) -> Arc<TenantPool> {
        self.tenants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(tenant.clone())
            .or_default()
            .clone()
    }

    /// Takes exactly `count` DEKs, from the pool first and from the key
    /// service for the rest; starts a background refill below the
    /// low-water mark.
    pub(super) async fn take(
        self: &Arc<Self>,
        tenant: &TenantId,
        count: usize,
    ) -> Result<Taken, KsError> {
        let pool = self.tenant(tenant);
        let mut out = Vec::with_capacity(count);
        let mut first_asked = None;
        {
            let now = Instant::now();
            let mut queue = pool.queue.lock().unwrap_or_else(|p| p.into_inner());
            while out.len() < count {
                match queue.pop_front() {
                    Some(p) if p.asked_at + self.ttl > now => {
                        first_asked =
                            Some(first_asked.map_or(p.asked_at, |a: Instant| a.min(p.asked_at)));
                        out.push(p.dek);
                    }
                    Some(_) => {} // expired: dropped and wiped
                    None => break,
                }
            }
        }
        if out.len() < count {
            let missing = count - out.len();
            let asked_at = Instant::now();
            let issued = self.client.issue(tenant, missing.max(self.config.batch)).await;
            let mut fresh = match issued {
                Ok(fresh) => fresh,
                Err(e) => {
                    // A tenant that could not be served (unknown, say)
                    // leaves no empty pool behind.
                    drop(pool);
                    self.drop_idle(|t| t == tenant);
                    return Err(e);
                }
            };
            first_asked = Some(first_asked.map_or(asked_at, |a| a.min(asked_at)));
            let rest = fresh.split_off(missing.min(fresh.len()));
            out.extend(fresh);
            self.push(&pool, rest, asked_at);
        }
        self.refill_if_low(tenant, &pool);
        // Exactly `count`: `issue` answers exactly what it was asked (or
        // fails), at least `missing`, of which `missing` are kept.
        Ok(Taken { deks: out, asked_at: first_asked.unwrap_or_else(Instant::now) })
    }

    fn push(&self, pool: &TenantPool, deks: Vec<IssuedDek>, asked_at: Instant) {
        let mut queue = pool.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.extend(deks.into_iter().map(|dek| Pooled { dek, asked_at }));
    }

    fn refill_if_low(self: &Arc<Self>, tenant: &TenantId, pool: &Arc<TenantPool>) {
        let len = pool.queue.lock().unwrap_or_else(|p| p.into_inner()).len();
        if len >= self.config.low_water || pool.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let (this, pool, tenant) = (self.clone(), pool.clone(), tenant.clone());
        tokio::spawn(async move {
            let asked_at = Instant::now();
            match this.client.issue(&tenant, this.config.batch).await {
                Ok(deks) => this.push(&pool, deks, asked_at),
                Err(e) => tracing::warn!(tenant = %tenant, error = %e, "DEK pool refill failed"),
            }
            pool.refilling.store(false, Ordering::Release);
        });
    }

    /// Drops (and wipes) every pooled DEK of `tenant`. A refill under way
    /// fills the discarded pool and is dropped with it.
    pub(super) fn forget(&self, tenant: &TenantId) {
        let pool = self.tenants.lock().unwrap_or_else(|p| p.into_inner()).remove(tenant);
        if let Some(pool) = pool {
            pool.queue.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// Drops expired DEKs of every tenant, and the pools left empty and
    /// idle; returns how many DEKs remain.
    pub(super) fn evict_expired(&self) -> usize {
        let now = Instant::now();
        let pools: Vec<_> =
            self.tenants.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let left = pools
            .iter()
            .map(|p| {
                let mut q = p.queue.lock().unwrap_or_else(|e| e.into_inner());
                q.retain(|d| d.asked_at + self.ttl > now);
                q.len()
            })
            .sum();
        drop(pools);
        self.drop_idle(|_| true);
        left
    }

    /// Removes the pools of the tenants `which` picks that hold no DEK and
    /// that nothing uses (no request taking from it, no refill filling it),
    /// so the map holds only tenants served lately.
    fn drop_idle(&self, which: impl Fn(&TenantId) -> bool) {
        self.tenants.lock().unwrap_or_else(|p| p.into_inner()).retain(|tenant, pool| {
            !which(tenant)
                || Arc::strong_count(pool) > 1
                || !pool.queue.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
        });
    }

    /// How many tenants have a pool.
    #[cfg(test)]
    fn tenants(&self) -> usize {
        self.tenants.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::pki::{DevCa, Validity};
    use crate::sidecar::config::KeyServiceConfig;

    /// A client of a key service that cannot be reached.
    pub(in crate::sidecar) fn unreachable_client(dir: &std::path::Path) -> Arc<KeyServiceClient> {
        let ca = DevCa::generate("test CA").unwrap();
        let app = ca.issue_client("spiffe://test/app", Validity::days(1)).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.cert_pem()).unwrap();
        std::fs::write(dir.join("app.crt"), &app.cert_pem).unwrap();
        std::fs::write(dir.join("app.key"), app.key_pem.as_bytes()).unwrap();
        let config = KeyServiceConfig {
            urls: vec!["https://127.0.0.1:1".to_owned()],
            ca: dir.join("ca.crt"),
            cert: dir.join("app.crt"),
            key: dir.join("app.key"),
            timeout_ms: 2_000,
            tls_reload_interval_secs: 60,
            server_identity: None,
        };
        Arc::new(KeyServiceClient::new(&config, crate::compliance::Profile::Development).unwrap())
    }

    #[tokio::test]
    async fn tenants_that_could_not_be_served_leave_no_pool_behind() {
        let dir = tempfile::tempdir().unwrap();
        let pool = DekPool::new(
            unreachable_client(dir.path()),
            PoolConfig::default(),
            Duration::from_secs(60),
        );
        for i in 0..20 {
            let tenant = TenantId::new(format!("t-{i}")).unwrap();
            assert!(pool.take(&tenant, 1).await.is_err());
        }
        assert_eq!(pool.tenants(), 0, "one empty pool per tenant ever asked for");
        // An idle, empty pool goes at the next eviction too.
        let idle = TenantId::new("idle").unwrap();
        drop(pool.tenant(&idle));
        assert_eq!(pool.tenants(), 1);
        assert_eq!(pool.evict_expired(), 0);
        assert_eq!(pool.tenants(), 0);
    }
}
