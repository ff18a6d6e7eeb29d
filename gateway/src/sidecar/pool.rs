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
    expires: Instant,
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
    ) -> Result<Vec<IssuedDek>, KsError> {
        let pool = self.tenant(tenant);
        let mut out = Vec::with_capacity(count);
        {
            let now = Instant::now();
            let mut queue = pool.queue.lock().unwrap_or_else(|p| p.into_inner());
            while out.len() < count {
                match queue.pop_front() {
                    Some(p) if p.expires > now => out.push(p.dek),
                    Some(_) => {} // expired: dropped and wiped
                    None => break,
                }
            }
        }
        if out.len() < count {
            let missing = count - out.len();
            let mut fresh = self.client.issue(tenant, missing.max(self.config.batch)).await?;
            let rest = fresh.split_off(missing.min(fresh.len()));
            out.extend(fresh);
            self.push(&pool, rest);
        }
        self.refill_if_low(tenant, &pool);
        // Exactly `count`: `issue` answers exactly what it was asked (or
        // fails), at least `missing`, of which `missing` are kept.
        Ok(out)
    }

    fn push(&self, pool: &TenantPool, deks: Vec<IssuedDek>) {
        let expires = Instant::now() + self.ttl;
        let mut queue = pool.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.extend(deks.into_iter().map(|dek| Pooled { dek, expires }));
    }

    fn refill_if_low(self: &Arc<Self>, tenant: &TenantId, pool: &Arc<TenantPool>) {
        let len = pool.queue.lock().unwrap_or_else(|p| p.into_inner()).len();
        if len >= self.config.low_water || pool.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let (this, pool, tenant) = (self.clone(), pool.clone(), tenant.clone());
        tokio::spawn(async move {
            match this.client.issue(&tenant, this.config.batch).await {
                Ok(deks) => this.push(&pool, deks),
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

    /// Drops expired DEKs of every tenant; returns how many remain.
    pub(super) fn evict_expired(&self) -> usize {
        let now = Instant::now();
        let pools: Vec<_> =
            self.tenants.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        pools
            .iter()
            .map(|p| {
                let mut q = p.queue.lock().unwrap_or_else(|e| e.into_inner());
                q.retain(|d| d.expires > now);
                q.len()
            })
            .sum()
    }
}
