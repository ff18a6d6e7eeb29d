//! The per-tenant pool of pre-issued DEKs.
//!
//! Encryption takes one DEK per record from the pool; a background refill
//! asks the key service for a batch whenever the pool falls below its
//! low-water mark. Pooled DEKs expire after a TTL and are dropped (wiped);
//! each DEK leaves the pool exactly once, so none is ever reused. While the
//! key service is unreachable, encryption continues from what is pooled,
//! and a failed refill is not tried again before a backoff (the key
//! service's `Retry-After` when it sends one).
//!
//! A pooled DEK lives no longer than the cache TTL, the bound in which a
//! shred reaches this sidecar; and the key service saying `key_destroyed`
//! for a tenant drops that tenant's pool at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kms_core::{IssuedDek, TenantId};

use super::config::PoolConfig;
use super::ks_client::{KeyServiceClient, KsError};

/// The wait after a first failed refill, doubled after each one more…
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// …up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The longest `Retry-After` heeded, so that a wild one cannot stop
/// refills for longer than a pooled DEK lives anyway.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

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
    queue: Mutex<Queue>,
    refilling: AtomicBool,
    /// Top-ups under way in requests (see [`DekPool::take`]).
    topping_up: AtomicUsize,
}

impl TenantPool {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A tenant's pooled DEKs, and what its refills met.
#[derive(Default)]
struct Queue {
    deks: VecDeque<Pooled>,
    /// A refill heard `key_destroyed`: the pool is dropped, and the next
    /// take fails with this, so the request's handler drops the tenant's
    /// cached and derived keys too (as for a `key_destroyed` it hears).
    /// An idle pool is evicted with its mark; the next take then asks the
    /// key service, which says it again.
    destroyed: Option<KsError>,
    /// No refill before this, after a failed one.
    refill_after: Option<Instant>,
    /// The wait after the next failed refill (none yet: zero).
    backoff: Duration,
}

impl Queue {
    fn backing_off(&self, now: Instant) -> bool {
        self.refill_after.is_some_and(|at| now < at)
    }

    /// A refill failed with `e`: none again before its `Retry-After`, or
    /// an exponential backoff, so a key service that is down or busy gets
    /// no batch (and the log no warning) per request.
    fn back_off(&mut self, e: &KsError, now: Instant) {
        let backoff = self.backoff.max(FIRST_BACKOFF);
        self.backoff = (backoff * 2).min(MAX_BACKOFF);
        let wait = match e {
            KsError::Api { retry_after: Some(secs), .. } => {
                Duration::from_secs(*secs).min(MAX_RETRY_AFTER)
            }
            _ => backoff,
        };
        self.refill_after = Some(now + wait);
    }

    /// The key service said the tenant's keys are destroyed: every pooled
    /// DEK goes (wiped), and `e` answers the next take.
    fn destroy(&mut self, e: KsError) {
        self.deks.clear();
        self.destroyed = Some(e);
    }

    /// Pools `deks` (asked for at `asked_at`), unless the tenant's keys
    /// were destroyed meanwhile.
    fn extend(&mut self, deks: Vec<IssuedDek>, asked_at: Instant) {
        if self.destroyed.is_none() {
            self.deks.extend(deks.into_iter().map(|dek| Pooled { dek, asked_at }));
        }
    }
}

/// Most top-ups under way at once that ask for a batch beyond their own
/// need; the others ask for what they lack. Hundreds of concurrent cold
/// requests then ask for 8 batches (and the refill's), not one each:
/// hundreds of thousands of DEKs would queue for seconds behind the key
/// service's share of keys in flight per identity (6,384 by default) and
/// be refused `busy`, where 18,000 pass in a few turns of it. Under load
/// the pool needs whole batches: allowing one (none while a refill ran)
/// cost 11 % of batch encrypt at c=16, eight nothing measurable
/// (interleaved A/Bs, docs/performance.md item 39).
const SPARE_TOP_UPS: usize = 8;

/// A top-up under way in a request, counted on its pool while it lasts
/// (a request dropped mid-call included).
struct TopUp<'a>(&'a TenantPool);

impl<'a> TopUp<'a> {
    /// Counts one; and how many others were under way.
    fn start(pool: &'a TenantPool) -> (Self, usize) {
        let before = pool.topping_up.fetch_add(1, Ordering::AcqRel);
        (Self(pool), before)
    }
}

impl Drop for TopUp<'_> {
    fn drop(&mut self) {
        self.0.topping_up.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Pooled DEKs a request took while it waits for the rest: back at the
/// front of the pool, in their order, unless it gets the rest. A request
/// whose top-up fails, or that is dropped while it waits (its client gave
/// up first, during an outage say), leaves them for smaller requests that
/// can go on encrypting while the key service cannot issue.
struct Popped<'a> {
    pool: &'a TenantPool,
    deks: Vec<Pooled>,
}

impl Popped<'_> {
    /// Kept: the request got the rest.
    fn keep(mut self) -> Vec<Pooled> {
        std::mem::take(&mut self.deks)
    }
}

impl Drop for Popped<'_> {
    fn drop(&mut self) {
        if self.deks.is_empty() {
            return;
        }
        let mut queue = self.pool.queue();
        // A destroyed pool takes none back: they are dropped (wiped) here.
        if queue.destroyed.is_none() {
            for p in self.deks.drain(..).rev() {
                queue.deks.push_front(p);
            }
        }
    }
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
        let backing_off;
        {
            let now = Instant::now();
            let mut queue = pool.queue();
            if let Some(e) = &queue.destroyed {
                return Err(e.clone());
            }
            while out.len() < count {
                match queue.deks.pop_front() {
                    Some(p) if p.asked_at + self.ttl > now => out.push(p),
                    Some(_) => {} // expired: dropped and wiped
                    None => break,
                }
            }
            backing_off = queue.backing_off(now);
        }
        let mut first_asked = out.iter().map(|p| p.asked_at).min();
        // (Collected in place: no second buffer per request.)
        let deks: Vec<IssuedDek> = if out.len() < count {
            let missing = count - out.len();
            let popped = Popped { pool: &pool, deks: out };
            // A few top-ups at a time ask for a batch beyond their own
            // need: concurrent cold requests would otherwise ask a batch
            // each. None does while refills back off.
            let (top_up, others) = TopUp::start(&pool);
            let spare = others < SPARE_TOP_UPS && !backing_off;
            let asked_at = Instant::now();
            let ask = if spare { missing.max(self.config.batch) } else { missing };
            let mut fresh = match self.client.issue(tenant, ask).await {
                Ok(fresh) => fresh,
                Err(e) => {
                    if e.is_key_destroyed() {
                        pool.queue().destroy(e.clone());
                    }
                    drop(popped);
                    drop(top_up);
                    // A tenant that could not be served (unknown, say)
                    // leaves no empty pool behind.
                    drop(pool);
                    self.drop_idle(|t| t == tenant);
                    return Err(e);
                }
            };
            drop(top_up);
            first_asked = Some(first_asked.map_or(asked_at, |a| a.min(asked_at)));
            let rest = fresh.split_off(missing.min(fresh.len()));
            pool.queue().extend(rest, asked_at);
            let mut deks: Vec<IssuedDek> = popped.keep().into_iter().map(|p| p.dek).collect();
            deks.extend(fresh);
            deks
        } else {
            out.into_iter().map(|p| p.dek).collect()
        };
        self.refill_if_low(tenant, &pool);
        // Exactly `count`: `issue` answers exactly what it was asked (or
        // fails), at least `missing`, of which `missing` are kept.
        Ok(Taken { deks, asked_at: first_asked.unwrap_or_else(Instant::now) })
    }

    fn refill_if_low(self: &Arc<Self>, tenant: &TenantId, pool: &Arc<TenantPool>) {
        {
            let queue = pool.queue();
            if queue.deks.len() >= self.config.low_water
                || queue.destroyed.is_some()
                || queue.backing_off(Instant::now())
            {
                return;
            }
        }
        if pool.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let (this, pool, tenant) = (self.clone(), pool.clone(), tenant.clone());
        tokio::spawn(async move {
            let asked_at = Instant::now();
            let issued = this.client.issue(&tenant, this.config.batch).await;
            {
                let mut queue = pool.queue();
                match issued {
                    Ok(deks) => {
                        queue.refill_after = None;
                        queue.backoff = Duration::ZERO;
                        queue.extend(deks, asked_at);
                    }
                    // Its pooled DEKs were issued before the shred.
                    Err(e) if e.is_key_destroyed() => {
                        queue.destroy(e);
                        tracing::info!(tenant = %tenant, "DEK pool refill: key destroyed; pool dropped");
                    }
                    Err(e) => {
                        queue.back_off(&e, Instant::now());
                        tracing::warn!(tenant = %tenant, error = %e, "DEK pool refill failed");
                    }
                }
            }
            pool.refilling.store(false, Ordering::Release);
        });
    }

    /// Drops (and wipes) every pooled DEK of `tenant`, and returns how
    /// many. A refill under way fills the discarded pool and is dropped
    /// with it.
    pub(super) fn forget(&self, tenant: &TenantId) -> usize {
        let pool = self.tenants.lock().unwrap_or_else(|p| p.into_inner()).remove(tenant);
        pool.map_or(0, |pool| pool.queue().deks.drain(..).count())
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
                let mut q = p.queue();
                q.deks.retain(|d| d.asked_at + self.ttl > now);
                q.deks.len()
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
            !which(tenant) || Arc::strong_count(pool) > 1 || !pool.queue().deks.is_empty()
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
    use std::path::Path;
    use std::sync::atomic::AtomicU64;

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::Path as UrlPath;
    use axum::http::{StatusCode, header};
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use data_encoding::BASE64URL_NOPAD;
    use kms_core::{Key256, RecordKeyId, SecretBuf, WRAPPED_DEK_LEN, WrappedDek};
    use serde_json::{Value, json};

    use super::*;
    use crate::pki::{DevCa, Validity};
    use crate::sidecar::config::KeyServiceConfig;
    use crate::{issue_binary, unwrap_binary};

    /// Writes a CA, and a client certificate of it, into `dir`; the
    /// configuration of a client of `url` presenting it.
    fn client_files(dir: &Path, ca: &DevCa, url: String) -> KeyServiceConfig {
        let app = ca.issue_client("spiffe://test/app", Validity::days(1)).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.cert_pem()).unwrap();
        std::fs::write(dir.join("app.crt"), &app.cert_pem).unwrap();
        std::fs::write(dir.join("app.key"), app.key_pem.as_bytes()).unwrap();
        KeyServiceConfig {
            urls: vec![url],
            ca: dir.join("ca.crt"),
            cert: dir.join("app.crt"),
            key: dir.join("app.key"),
            timeout_ms: 10_000,
            tls_reload_interval_secs: 60,
            server_identity: None,
        }
    }

    /// A client of a key service that cannot be reached.
    pub(in crate::sidecar) fn unreachable_client(dir: &Path) -> Arc<KeyServiceClient> {
        let ca = DevCa::generate("test CA").unwrap();
        let mut config = client_files(dir, &ca, "https://127.0.0.1:1".to_owned());
        config.timeout_ms = 2_000;
        Arc::new(KeyServiceClient::new(&config, crate::compliance::Profile::Development).unwrap())
    }

    /// A fake key service: what it was asked, and how it answers.
    #[derive(Default)]
    pub(in crate::sidecar) struct Fake {
        /// Issue calls, and the DEKs asked for in them.
        pub(in crate::sidecar) issues: AtomicUsize,
        pub(in crate::sidecar) keys_asked: AtomicUsize,
        /// Items asked to unwrap, over all calls.
        pub(in crate::sidecar) unwrap_items: AtomicUsize,
        /// When set, every call is refused: status, code, `Retry-After`.
        pub(in crate::sidecar) refusal: Mutex<Option<(u16, &'static str, Option<u64>)>>,
        /// How long an issue takes, in ms.
        pub(in crate::sidecar) issue_delay_ms: AtomicU64,
        /// Derived-key calls, and how long each takes, in ms.
        pub(in crate::sidecar) derived_calls: AtomicUsize,
        pub(in crate::sidecar) derived_delay_ms: AtomicU64,
        next_id: AtomicU64,
    }

    impl Fake {
        pub(in crate::sidecar) fn refuse(&self, refusal: Option<(u16, &'static str, Option<u64>)>) {
            *self.refusal.lock().unwrap() = refusal;
        }

        fn refused(&self) -> Option<Response> {
            let (status, code, retry_after) = (*self.refusal.lock().unwrap())?;
            let body = axum::Json(json!({"error": {"code": code, "message": "refused"}}));
            let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
            if let Some(secs) = retry_after {
                response.headers_mut().insert(header::RETRY_AFTER, secs.into());
            }
            Some(response)
        }

        /// Issues `count` DEKs, each id new, in the binary form.
        fn issue(&self, count: usize) -> Response {
            let keys: Vec<IssuedDek> = (0..count)
                .map(|_| {
                    let n = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let mut id = [0u8; 16];
                    id[8..].copy_from_slice(&n.to_be_bytes());
                    IssuedDek::new(
                        RecordKeyId::from_bytes(id),
                        4,
                        WrappedDek::from_slice(&[1; WRAPPED_DEK_LEN]).unwrap(),
                        Key256::from_array(&mut [2; 32]),
                    )
                })
                .collect();
            let out = issue_binary::write_answer(4, &keys);
            ([(header::CONTENT_TYPE, issue_binary::CONTENT_TYPE)], out.as_slice().to_vec())
                .into_response()
        }
    }

    /// A fake key service behind mutual TLS, and a client of it. It
    /// issues DEKs; unwraps (in the binary form) each item to 32 copies of
    /// the first byte of its id, active version 4; and derives the key of
    /// a pseudonym namespace: its name's bytes, zero-padded.
    pub(in crate::sidecar) async fn fake_key_service(
        dir: &Path,
    ) -> (Arc<KeyServiceClient>, Arc<Fake>) {
        let ca = DevCa::generate("test CA").unwrap();
        let server = ca.issue_server(&["localhost"], Validity::days(1)).unwrap();
        let tls = crate::tls::tests::write_files(dir, &server, &ca);
        let acceptor =
            tokio_rustls::TlsAcceptor::from(crate::tls::build_server_config(&tls).unwrap());
        let fake = Arc::new(Fake::default());
        let (f1, f2, f3) = (fake.clone(), fake.clone(), fake.clone());
        let issue = move |body: Bytes| {
            let fake = f1.clone();
            async move {
                let count = serde_json::from_slice::<Value>(&body).unwrap()["count"]
                    .as_u64()
                    .unwrap() as usize;
                fake.issues.fetch_add(1, Ordering::Relaxed);
                fake.keys_asked.fetch_add(count, Ordering::Relaxed);
                let delay = fake.issue_delay_ms.load(Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(delay)).await;
                fake.refused().unwrap_or_else(|| fake.issue(count))
            }
        };
        let unwrap = move |body: Bytes| {
            let fake = f2.clone();
            async move {
                if let Some(refused) = fake.refused() {
                    return refused;
                }
                let request = unwrap_binary::decode_request(&body).unwrap();
                fake.unwrap_items.fetch_add(request.items.len(), Ordering::Relaxed);
                let mut out = SecretBuf::with_capacity(0);
                unwrap_binary::write_active_version(&mut out, 4);
                for item in &request.items {
                    let byte = item.record_key_id.as_bytes()[0];
                    unwrap_binary::write_key(&mut out, &Key256::from_array(&mut [byte; 32]));
                }
                ([(header::CONTENT_TYPE, unwrap_binary::CONTENT_TYPE)], out.as_slice().to_vec())
                    .into_response()
            }
        };
        let derived = move |UrlPath(_tenant): UrlPath<String>, body: Bytes| {
            let fake = f3.clone();
            async move {
                fake.derived_calls.fetch_add(1, Ordering::Relaxed);
                let delay = fake.derived_delay_ms.load(Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(delay)).await;
                if let Some(refused) = fake.refused() {
                    return refused;
                }
                let request: Value = serde_json::from_slice(&body).unwrap();
                let field = &request["fields"][0];
                let mut key = [0u8; 32];
                let name = field["namespace"].as_str().unwrap().as_bytes();
                key[..name.len()].copy_from_slice(name);
                axum::Json(json!({"keys": [{
                    "path": field["path"],
                    "purpose": "keygate/v1/pseudonym",
                    "key": BASE64URL_NOPAD.encode(&key),
                }]}))
                .into_response()
            }
        };
        let router = Router::new()
            .route("/v1/tenants/{tenant}/datakeys", post(issue))
            .route("/v1/tenants/{tenant}/datakeys/unwrap", post(unwrap))
            .route("/v1/tenants/{tenant}/derived", post(derived));
        let port = crate::sidecar::ks_client::tests::serve_mtls(acceptor, router, drop).await;
        let config = client_files(dir, &ca, format!("https://localhost:{port}"));
        let client =
            KeyServiceClient::new(&config, crate::compliance::Profile::Development).unwrap();
        (Arc::new(client), fake)
    }

    fn config(batch: usize, low_water: usize) -> PoolConfig {
        PoolConfig { batch, low_water, ..PoolConfig::default() }
    }

    fn dek(n: u8) -> IssuedDek {
        IssuedDek::new(
            RecordKeyId::from_bytes([n; 16]),
            1,
            WrappedDek::from_slice(&[n; WRAPPED_DEK_LEN]).unwrap(),
            Key256::from_array(&mut [n; 32]),
        )
    }

    fn ids(taken: &Taken) -> Vec<u8> {
        taken.deks.iter().map(|d| d.record_key_id.as_bytes()[0]).collect()
    }

    /// Waits (up to 5 s) until no refill of `tenant` is under way.
    async fn refilled(pool: &DekPool, tenant: &TenantId) {
        let tenant = pool.tenant(tenant);
        for _ in 0..500 {
            if !tenant.refilling.load(Ordering::Acquire) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the refill never ended");
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

    /// A refill that hears `key_destroyed` drops the pool at once: the
    /// next take fails as a synchronous issue would have, not with DEKs
    /// issued before the shred.
    #[tokio::test]
    async fn a_refill_hearing_key_destroyed_drops_the_pool_and_fails_the_next_take() {
        let dir = tempfile::tempdir().unwrap();
        let (client, fake) = fake_key_service(dir.path()).await;
        let pool = DekPool::new(client, config(10, 5), Duration::from_secs(60));
        let onc = TenantId::new("onc").unwrap();
        // Cold: one issue of a batch; 9 pooled, above the low-water mark.
        assert_eq!(pool.take(&onc, 1).await.unwrap().deks.len(), 1);
        assert_eq!(fake.issues.load(Ordering::Relaxed), 1);
        fake.refuse(Some((410, "key_destroyed", None)));
        // 4 left: below the mark, so a refill starts, and fails.
        assert_eq!(pool.take(&onc, 5).await.unwrap().deks.len(), 5);
        refilled(&pool, &onc).await;
        assert_eq!(fake.issues.load(Ordering::Relaxed), 2);
        let e = pool.take(&onc, 1).await.err().expect("4 DEKs were pooled before the shred");
        assert!(
            matches!(&e, KsError::Api { status: 410, code, .. } if code == "key_destroyed"),
            "{e:?}"
        );
        assert_eq!(pool.evict_expired(), 0, "the pooled DEKs are gone");
        assert_eq!(fake.issues.load(Ordering::Relaxed), 2, "the failure came from the pool");
    }

    /// Concurrent cold requests ask one batch between them, not one each.
    #[tokio::test]
    async fn concurrent_cold_takes_ask_for_a_few_batches_not_one_each() {
        let dir = tempfile::tempdir().unwrap();
        let (client, fake) = fake_key_service(dir.path()).await;
        fake.issue_delay_ms.store(50, Ordering::Relaxed);
        let config = PoolConfig::default();
        let batch = config.batch;
        let pool = DekPool::new(client, config, Duration::from_secs(60));
        let onc = TenantId::new("onc").unwrap();
        let takes: Vec<_> = (0..50)
            .map(|_| {
                let (pool, onc) = (pool.clone(), onc.clone());
                tokio::spawn(async move { pool.take(&onc, 1).await.map(|t| t.deks.len()) })
            })
            .collect();
        for take in takes {
            assert_eq!(take.await.unwrap().unwrap(), 1);
        }
        refilled(&pool, &onc).await;
        let asked = fake.keys_asked.load(Ordering::Relaxed);
        let most = (SPARE_TOP_UPS + 1) * batch + 50;
        assert!(asked <= most, "{asked} DEKs asked for by 50 one-record requests");
    }

    /// Pooled DEKs a failed request had taken go back, first and in order,
    /// for smaller requests while the key service cannot issue.
    #[tokio::test]
    async fn a_failed_top_up_puts_back_what_it_took() {
        let dir = tempfile::tempdir().unwrap();
        let pool =
            DekPool::new(unreachable_client(dir.path()), config(10, 0), Duration::from_secs(60));
        let onc = TenantId::new("onc").unwrap();
        pool.tenant(&onc).queue().extend((1..=5).map(dek).collect(), Instant::now());
        assert!(pool.take(&onc, 10).await.is_err());
        let taken = pool.take(&onc, 5).await.expect("the 5 pooled DEKs");
        assert_eq!(ids(&taken), [1, 2, 3, 4, 5]);
    }

    /// So do those of a request dropped while its top-up waits (its client
    /// gave up first).
    #[tokio::test]
    async fn a_request_dropped_mid_top_up_puts_back_what_it_took() {
        let dir = tempfile::tempdir().unwrap();
        let (client, fake) = fake_key_service(dir.path()).await;
        fake.issue_delay_ms.store(5_000, Ordering::Relaxed);
        let pool = DekPool::new(client, config(10, 0), Duration::from_secs(60));
        let onc = TenantId::new("onc").unwrap();
        pool.tenant(&onc).queue().extend((1..=5).map(dek).collect(), Instant::now());
        let waiting = tokio::time::timeout(Duration::from_millis(200), pool.take(&onc, 10));
        assert!(waiting.await.is_err(), "still waiting for the key service");
        assert_eq!(fake.issues.load(Ordering::Relaxed), 1);
        fake.issue_delay_ms.store(0, Ordering::Relaxed);
        let taken = pool.take(&onc, 5).await.expect("the 5 pooled DEKs");
        assert_eq!(ids(&taken), [1, 2, 3, 4, 5]);
        assert_eq!(fake.issues.load(Ordering::Relaxed), 1, "taken from the pool");
    }

    /// A failed refill is not tried again at every request: after an
    /// exponential backoff, or the key service's `Retry-After`; and a
    /// refill that succeeds ends the backoff.
    #[tokio::test]
    async fn failed_refills_back_off() {
        let dir = tempfile::tempdir().unwrap();
        let (client, fake) = fake_key_service(dir.path()).await;
        let pool = DekPool::new(client, config(50, 1_000), Duration::from_secs(60));
        let onc = TenantId::new("onc").unwrap();
        pool.tenant(&onc).queue().extend((0..100).map(dek).collect(), Instant::now());
        fake.refuse(Some((503, "unavailable", None)));
        for _ in 0..20 {
            pool.take(&onc, 1).await.unwrap();
            refilled(&pool, &onc).await;
        }
        let issues = fake.issues.load(Ordering::Relaxed);
        assert!((1..=2).contains(&issues), "{issues} refills in a 503 outage");
        // The backoff grows; past it, a refill is tried again.
        let tenant = pool.tenant(&onc);
        assert!(tenant.queue().backoff >= 2 * FIRST_BACKOFF);
        tokio::time::sleep(3 * FIRST_BACKOFF).await;
        pool.take(&onc, 1).await.unwrap();
        refilled(&pool, &onc).await;
        assert_eq!(fake.issues.load(Ordering::Relaxed), issues + 1, "tried again after it");

        // A busy key service's Retry-After is heeded: 1 s, not the 100 ms
        // of a first failure (another tenant's, so its backoff is fresh).
        let card = TenantId::new("card").unwrap();
        let tenant = pool.tenant(&card);
        tenant.queue().extend((0..100).map(dek).collect(), Instant::now());
        // (503 `busy`: load shed by every replica, as in `abuse::keys`.)
        fake.refuse(Some((503, "busy", Some(1))));
        let before = fake.issues.load(Ordering::Relaxed);
        pool.take(&card, 1).await.unwrap();
        refilled(&pool, &card).await;
        assert_eq!(fake.issues.load(Ordering::Relaxed), before + 1);
        let until = tenant.queue().refill_after.unwrap();
        assert!(until > Instant::now() + Duration::from_millis(700), "Retry-After: 1");
        // Meanwhile a request short of DEKs asks only what it lacks (and
        // puts back what it took when that fails).
        let asked = fake.keys_asked.load(Ordering::Relaxed);
        assert!(pool.take(&card, 100).await.is_err());
        assert_eq!(fake.keys_asked.load(Ordering::Relaxed), asked + 1, "not a batch");
        let before = before + 1;
        fake.refuse(None);
        tokio::time::sleep(Duration::from_millis(300)).await;
        pool.take(&card, 1).await.unwrap();
        refilled(&pool, &card).await;
        assert_eq!(fake.issues.load(Ordering::Relaxed), before + 1, "still waiting");
        tokio::time::sleep(Duration::from_millis(800)).await;
        pool.take(&card, 1).await.unwrap();
        refilled(&pool, &card).await;
        assert_eq!(fake.issues.load(Ordering::Relaxed), before + 2);
        let queue = tenant.queue();
        assert!(queue.refill_after.is_none() && queue.backoff == Duration::ZERO, "reset");
        assert_eq!(queue.deks.len(), 100 - 3 + 50, "3 taken, a batch pooled");
    }
}
