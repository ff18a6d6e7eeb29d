//! Key service calls shared by concurrent requests: unwraps and rewraps.
//!
//! Every DEK the cache does not hold is unwrapped by the key service, and
//! every record rewrapped is a DEK moved by it. Each call costs the key
//! service a fixed amount on top of its DEKs: TLS and HTTP/2 framing,
//! dispatch, and one audit event in a durable group commit — about as much
//! CPU as a hundred DEKs (docs/performance.md, 32). So calls of one kind
//! for one tenant and purpose do not pile up side by side: while
//! [`IN_FLIGHT`] of them are out, the items of later requests wait here and
//! leave together in the next call, whole requests up to [`SHARE_UP_TO`]
//! items (a larger request goes alone, as it would have). A full call's
//! worth waiting is sent at once whatever is out, so large requests keep
//! the key service's cores busy in parallel as before.
//!
//! Each request gets back exactly its own results. A request that finds a
//! call slot free is sent at once: nothing waits on a timer, so a lone
//! request is never slower for this. One that waits gives up after the
//! time two calls could take ([`SharedCalls::new`]'s `wait_limit`), and is
//! then not sent. If the key service refuses a shared call as too large
//! (its `limits.max_batch` below [`SHARE_UP_TO`]), its requests go back to
//! the head of the line and calls are shared up to half that size from
//! then on; a request refused alone gets the refusal, as it would have.
//!
//! The key service sees fewer, larger calls by this sidecar's identity for
//! a tenant and purpose. Each is audited as one `dek.unwrap` (or
//! `dek.rewrap`) event listing every record key id it unwrapped and, in
//! `detail.failed`, every one it could not; its outcome is the whole
//! call's. The sidecar's own field-level events still say which
//! application request read which record.
//!
//! A request that has gone (dropped at its deadline) by the time its call
//! is answered gets nothing, but the DEKs it was unwrapped are cached
//! ([`BatchCall::unclaimed`]): its retry is then a cache hit, not a second
//! unwrap for the key service to do and audit.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kms_core::{DekRequest, KekVersion, Key256, Name, Rewrapped, TenantId};
use tokio::sync::oneshot;

use super::cache::DekCache;
use super::ks_client::{KeyServiceClient, KsError, Unwrapped};

/// A batch call to the key service that requests may share.
pub(super) trait BatchCall: Send + Sync + 'static {
    /// What one item gives back.
    type Item: Send + 'static;
    /// What the whole answer gives besides its items (every request in the
    /// call gets a copy).
    type Common: Copy + Send + 'static;

    /// One call for `items` of `tenant`: one result per item, in order.
    fn call(
        &self,
        tenant: &TenantId,
        items: &[DekRequest],
        purpose: Option<&Name>,
    ) -> impl Future<Output = Result<Batch<Self::Common, Self::Item>, KsError>> + Send;

    /// Takes the answer to `items` of `tenant`, one request's share of a
    /// call sent at `sent_at`, when that request has gone. Dropped unless
    /// the call keeps it.
    fn unclaimed(
        &self,
        _tenant: &TenantId,
        _sent_at: Instant,
        _items: &[DekRequest],
        _answer: Batch<Self::Common, Self::Item>,
    ) {
    }
}

/// A call's answer: what it says for all, and one result per item.
pub(super) struct Batch<C, T> {
    /// For unwraps, the tenant's active KEK version.
    pub(super) common: C,
    /// One per item, in order.
    pub(super) results: Vec<T>,
}

/// `POST /v1/tenants/{t}/datakeys/unwrap`: each item's DEK or error code,
/// and the active KEK version.
pub(super) struct Unwraps {
    pub(super) client: Arc<KeyServiceClient>,
    /// Where the DEKs of a request that has gone are kept for its retry.
    pub(super) cache: Arc<DekCache>,
}

impl BatchCall for Unwraps {
    type Item = Result<Key256, String>;
    type Common = KekVersion;

    async fn call(
        &self,
        tenant: &TenantId,
        items: &[DekRequest],
        purpose: Option<&Name>,
    ) -> Result<Batch<KekVersion, Self::Item>, KsError> {
        let Unwrapped { active_version, results } =
            self.client.unwrap(tenant, items, purpose).await?;
        Ok(Batch { common: active_version, results })
    }

    fn unclaimed(
        &self,
        tenant: &TenantId,
        sent_at: Instant,
        items: &[DekRequest],
        answer: Batch<KekVersion, Self::Item>,
    ) {
        keep_unclaimed(&self.cache, tenant, sent_at, items, answer.results);
    }
}

/// Caches what a request that has gone was unwrapped, as its handler would
/// have: only when every item was (one that failed failed the request, and
/// a `key_destroyed` is a shred for the handler to act on), each (id,
/// version) once. They are cached as of `sent_at`, when the call left, so
/// that a shred heard while it was out keeps them out (`insert_many`).
fn keep_unclaimed(
    cache: &DekCache,
    tenant: &TenantId,
    sent_at: Instant,
    items: &[DekRequest],
    results: Vec<Result<Key256, String>>,
) {
    let Ok(keys) = results.into_iter().collect::<Result<Vec<_>, _>>() else { return };
    let mut seen = HashSet::with_capacity(items.len());
    let deks = items
        .iter()
        .zip(keys)
        .filter(|(item, _)| seen.insert((item.record_key_id, item.kek_version)))
        .map(|(item, key)| (item.record_key_id, item.kek_version, key));
    cache.insert_many(tenant, sent_at, deks);
}

/// `POST /v1/tenants/{t}/datakeys/rewrap`: each item's DEK moved to the
/// active KEK version, or its error code. No purpose: none is sent.
pub(super) struct Rewraps(pub(super) Arc<KeyServiceClient>);

impl BatchCall for Rewraps {
    type Item = Result<Rewrapped, String>;
    type Common = ();

    async fn call(
        &self,
        tenant: &TenantId,
        items: &[DekRequest],
        _purpose: Option<&Name>,
    ) -> Result<Batch<(), Self::Item>, KsError> {
        Ok(Batch { common: (), results: self.0.rewrap(tenant, items).await? })
    }
}

/// Calls of one kind for one tenant and purpose out at once (more only
/// when a full call's worth waits). Two let the key service group-commit
/// one call's audit event while it reads the next, and each call collects
/// what arrived during the previous one; one left the key service idle
/// between calls, four shared too little (docs/performance.md, 32).
const IN_FLIGHT: usize = 2;

/// Items a shared call carries at most: past a few hundred, a call's fixed
/// cost is small beside its items, and the key service handles one call's
/// items one after another.
const SHARE_UP_TO: usize = 256;

/// One request's share of a call's answer, or why the call failed.
type Answer<C> = Result<Batch<<C as BatchCall>::Common, <C as BatchCall>::Item>, KsError>;

/// One request's items, waiting for a call.
struct Waiter<C: BatchCall> {
    items: Vec<DekRequest>,
    answer: oneshot::Sender<Answer<C>>,
}

/// The calls of one tenant and purpose.
struct Line<C: BatchCall> {
    in_flight: usize,
    waiting: Vec<Waiter<C>>,
}

impl<C: BatchCall> Line<C> {
    fn waiting_items(&self) -> usize {
        self.waiting.iter().map(|w| w.items.len()).sum()
    }

    /// The riders of the next call: oldest first, whole requests, at most
    /// `max_items` items unless the first alone has more. Requests that have
    /// gone are dropped unsent.
    fn take_riders(&mut self, max_items: usize) -> Vec<Waiter<C>> {
        self.waiting.retain(|w| !w.answer.is_closed());
        let (mut count, mut take) = (0, 0);
        for waiter in &self.waiting {
            if take > 0 && count + waiter.items.len() > max_items {
                break;
            }
            count += waiter.items.len();
            take += 1;
        }
        self.waiting.drain(..take).collect()
    }
}

type LineKey = (TenantId, Option<Name>);

struct Inner<C: BatchCall> {
    client: C,
    /// Lowered when the key service refuses a shared call as too large.
    max_items: AtomicUsize,
    wait_limit: Duration,
    lines: Mutex<HashMap<LineKey, Line<C>>>,
    calls: AtomicU64,
    requests: AtomicU64,
}

impl<C: BatchCall> Inner<C> {
    fn lines(&self) -> MutexGuard<'_, HashMap<LineKey, Line<C>>> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Makes calls of one kind for requests, sharing them between requests.
pub(super) struct SharedCalls<C: BatchCall>(Arc<Inner<C>>);

impl<C: BatchCall> SharedCalls<C> {
    /// Calls through `client`, sharing calls up to `max_items` items
    /// (capped at [`SHARE_UP_TO`]; a request with more goes alone). A
    /// request waits at most `wait_limit` for its answer.
    pub(super) fn new(client: C, max_items: usize, wait_limit: Duration) -> Self {
        Self(Arc::new(Inner {
            client,
            max_items: AtomicUsize::new(max_items.clamp(1, SHARE_UP_TO)),
            wait_limit,
            lines: Mutex::default(),
            calls: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }))
    }

    /// Calls made, and requests whose items they carried (more than the
    /// calls when calls were shared).
    pub(super) fn stats(&self) -> (u64, u64) {
        (self.0.calls.load(Ordering::Relaxed), self.0.requests.load(Ordering::Relaxed))
    }

    /// Sends `items` of `tenant` for `purpose`: one result per item, in
    /// order, as if this request had made the call alone.
    pub(super) async fn call(
        &self,
        tenant: &TenantId,
        items: Vec<DekRequest>,
        purpose: Option<&Name>,
    ) -> Answer<C> {
        let (answer, result) = oneshot::channel();
        let key = (tenant.clone(), purpose.cloned());
        // A slot is free: its task takes what waits when it runs. A full
        // call's worth waits beyond the slots: taken now, under the lock
        // that counted it, so no later arrival counts it again.
        let start = {
            let max_items = self.0.max_items.load(Ordering::Relaxed);
            let mut lines = self.0.lines();
            let line = lines
                .entry(key.clone())
                .or_insert_with(|| Line { in_flight: 0, waiting: Vec::new() });
            line.waiting.push(Waiter { items, answer });
            if line.in_flight < IN_FLIGHT {
                line.in_flight += 1;
                Some(Vec::new())
            } else if line.waiting_items() >= max_items {
                line.in_flight += 1;
                Some(line.take_riders(max_items))
            } else {
                None
            }
        };
        if let Some(first) = start {
            let slot = Slot { inner: self.0.clone(), key, held: true };
            tokio::spawn(slot.drive(first));
        }
        match tokio::time::timeout(self.0.wait_limit, result).await {
            Ok(Ok(answer)) => answer,
            // The driving task died (a panic, or the runtime stopping):
            // fail closed, like a lost connection.
            Ok(Err(_)) => Err(KsError::Unavailable("key service call abandoned".into())),
            // Our receiver is dropped with the timeout: if still waiting,
            // the items are not sent; if out, their answer goes to
            // `C::unclaimed`.
            Err(_) => Err(KsError::Unavailable(format!(
                "no key service answer within {} ms",
                self.0.wait_limit.as_millis()
            ))),
        }
    }
}

/// One call slot of a line, held by the task that drives it. Dropped
/// without being released (the task panicked or was cancelled), it still
/// gives the slot back; if no other call is out, the line's waiters are
/// dropped with it and their requests fail closed rather than hang.
struct Slot<C: BatchCall> {
    inner: Arc<Inner<C>>,
    key: LineKey,
    held: bool,
}

impl<C: BatchCall> Slot<C> {
    /// Sends `first` (if any), then what waits on the line, call after
    /// call, until nothing does (or, for a slot beyond [`IN_FLIGHT`], until
    /// less than a full call's worth does).
    async fn drive(mut self, first: Vec<Waiter<C>>) {
        let mut riders = first;
        loop {
            if riders.is_empty() {
                match self.next_riders() {
                    Some(next) => riders = next,
                    None => return,
                }
            }
            let items: Vec<DekRequest> =
                riders.iter().flat_map(|w| w.items.iter().copied()).collect();
            self.inner.calls.fetch_add(1, Ordering::Relaxed);
            let (tenant, purpose) = &self.key;
            // Taken before the call leaves, never after, so that a shred
            // heard while it is out keeps an unclaimed answer's DEKs out
            // of the cache (which refuses keys asked for before a shred).
            let sent_at = Instant::now();
            let answer = self.inner.client.call(tenant, &items, purpose.as_ref()).await;
            let riders = std::mem::take(&mut riders);
            match answer {
                // The key service takes fewer items per call than this
                // sidecar shares: share half as many from now on, and put
                // these requests back at the head of the line, in order.
                Err(KsError::Api { code, .. }) if code == "batch_too_large" && riders.len() > 1 => {
                    self.inner.max_items.fetch_min((items.len() / 2).max(1), Ordering::Relaxed);
                    let mut lines = self.inner.lines();
                    if let Some(line) = lines.get_mut(&self.key) {
                        line.waiting.splice(..0, riders);
                    }
                }
                answer => {
                    self.inner.requests.fetch_add(riders.len() as u64, Ordering::Relaxed);
                    hand_out(&self.inner.client, tenant, sent_at, riders, answer);
                }
            }
        }
    }

    /// The riders of the next call, or `None` after giving the slot back
    /// when nothing waits, or when this slot is an extra one and less than
    /// a full call's worth waits.
    fn next_riders(&mut self) -> Option<Vec<Waiter<C>>> {
        let max_items = self.inner.max_items.load(Ordering::Relaxed);
        let mut lines = self.inner.lines();
        let line = lines.get_mut(&self.key)?;
        let riders = if line.in_flight > IN_FLIGHT && line.waiting_items() < max_items {
            Vec::new()
        } else {
            line.take_riders(max_items)
        };
        if riders.is_empty() {
            line.in_flight = line.in_flight.saturating_sub(1);
            if line.in_flight == 0 {
                lines.remove(&self.key);
            }
            self.held = false;
            return None;
        }
        Some(riders)
    }
}

impl<C: BatchCall> Drop for Slot<C> {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let mut lines = self.inner.lines();
        if let Some(line) = lines.get_mut(&self.key) {
            line.in_flight = line.in_flight.saturating_sub(1);
            if line.in_flight == 0 {
                lines.remove(&self.key);
            }
        }
    }
}

/// Splits a shared call's answer between its riders, in order; the share
/// of a rider that has gone goes to `client`'s [`BatchCall::unclaimed`].
fn hand_out<C: BatchCall>(
    client: &C,
    tenant: &TenantId,
    sent_at: Instant,
    riders: Vec<Waiter<C>>,
    answer: Answer<C>,
) {
    match answer {
        Ok(Batch { common, results }) => {
            let mut results = results.into_iter();
            for waiter in riders {
                let own: Vec<C::Item> = results.by_ref().take(waiter.items.len()).collect();
                // The client checked the count; a short answer is refused, not padded.
                let answer = if own.len() == waiter.items.len() {
                    Ok(Batch { common, results: own })
                } else {
                    Err(KsError::Decode("fewer results than items".into()))
                };
                if let Err(Ok(unclaimed)) = waiter.answer.send(answer) {
                    client.unclaimed(tenant, sent_at, &waiter.items, unclaimed);
                }
            }
        }
        Err(e) => {
            for waiter in riders {
                let _ = waiter.answer.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::time::Duration;

    use kms_core::{RecordKeyId, WRAPPED_DEK_LEN, WrappedDek};
    use tokio::sync::Semaphore;
    use tokio::task::JoinHandle;

    use super::*;

    /// A fake key service. Each call is recorded (the first byte of each
    /// item's id), then waits for a permit of `gate`; each item's DEK is 32
    /// copies of that byte. `fail` refuses whole calls; `short` answers one
    /// result fewer than asked; a call of more than `max_batch` items is
    /// refused as too large; `panic` panics. Like [`Unwraps`], it caches
    /// in `cache` what a request that has gone was unwrapped.
    struct Fake {
        gate: Semaphore,
        calls: Mutex<Vec<(LineKey, Vec<u8>)>>,
        fail: AtomicBool,
        short: AtomicBool,
        max_batch: AtomicUsize,
        panic: AtomicBool,
        cache: DekCache,
    }

    impl Default for Fake {
        fn default() -> Self {
            Self {
                gate: Semaphore::new(0),
                calls: Mutex::default(),
                fail: AtomicBool::default(),
                short: AtomicBool::default(),
                max_batch: AtomicUsize::new(usize::MAX),
                panic: AtomicBool::default(),
                cache: DekCache::new(Duration::from_secs(60), 100),
            }
        }
    }

    impl BatchCall for Arc<Fake> {
        type Item = Result<Key256, String>;
        type Common = KekVersion;

        async fn call(
            &self,
            tenant: &TenantId,
            items: &[DekRequest],
            purpose: Option<&Name>,
        ) -> Result<Batch<KekVersion, Self::Item>, KsError> {
            let ids: Vec<u8> = items.iter().map(|i| i.record_key_id.as_bytes()[0]).collect();
            self.calls.lock().unwrap().push(((tenant.clone(), purpose.cloned()), ids.clone()));
            self.gate.acquire().await.unwrap().forget();
            assert!(!self.panic.load(Ordering::Relaxed), "the fake key service panics");
            if ids.len() > self.max_batch.load(Ordering::Relaxed) {
                return Err(KsError::Api {
                    status: 400,
                    code: "batch_too_large".into(),
                    message: "too many items".into(),
                    retry_after: None,
                });
            }
            if self.fail.load(Ordering::Relaxed) {
                return Err(KsError::Unavailable("down".into()));
            }
            let keep = ids.len() - usize::from(self.short.load(Ordering::Relaxed));
            let results =
                ids.iter().take(keep).map(|b| Ok(Key256::from_array(&mut [*b; 32]))).collect();
            Ok(Batch { common: 3, results })
        }

        fn unclaimed(
            &self,
            tenant: &TenantId,
            sent_at: Instant,
            items: &[DekRequest],
            answer: Batch<KekVersion, Self::Item>,
        ) {
            keep_unclaimed(&self.cache, tenant, sent_at, items, answer.results);
        }
    }

    /// The fake key service through a call that keeps nothing unclaimed,
    /// as [`Rewraps`] (whose answers are wrapped parts, not DEKs).
    struct KeepsNothing(Arc<Fake>);

    impl BatchCall for KeepsNothing {
        type Item = Result<Key256, String>;
        type Common = KekVersion;

        async fn call(
            &self,
            tenant: &TenantId,
            items: &[DekRequest],
            purpose: Option<&Name>,
        ) -> Result<Batch<KekVersion, Self::Item>, KsError> {
            self.0.call(tenant, items, purpose).await
        }
    }

    impl Fake {
        fn calls(&self) -> Vec<Vec<u8>> {
            self.calls.lock().unwrap().iter().map(|(_, ids)| ids.clone()).collect()
        }
    }

    fn items(ids: &[u8]) -> Vec<DekRequest> {
        ids.iter()
            .map(|b| DekRequest {
                record_key_id: RecordKeyId::from_bytes([*b; 16]),
                kek_version: 1,
                wrapped: WrappedDek::from_slice(&[*b; WRAPPED_DEK_LEN]).unwrap(),
            })
            .collect()
    }

    fn tenant(name: &str) -> TenantId {
        TenantId::new(name).unwrap()
    }

    type Answer = super::Answer<Arc<Fake>>;
    type Shared = SharedCalls<Arc<Fake>>;

    /// Shares calls through `fake`, up to `max_items`; requests wait 10 s.
    fn shared(fake: &Arc<Fake>, max_items: usize) -> Shared {
        SharedCalls::new(fake.clone(), max_items, Duration::from_secs(10))
    }

    impl<C: BatchCall> SharedCalls<C> {
        fn waiting(&self) -> usize {
            self.0.lines().values().map(|l| l.waiting.len()).sum()
        }

        fn open_lines(&self) -> usize {
            self.0.lines().len()
        }
    }

    impl<C: BatchCall> Clone for SharedCalls<C> {
        fn clone(&self) -> Self {
            Self(self.0.clone())
        }
    }

    /// A request of `ids` for `tenant` and `purpose`, running.
    fn request(u: &Shared, tenant: &str, purpose: Option<&str>, ids: &[u8]) -> JoinHandle<Answer> {
        let (u, tenant, items) = (u.clone(), self::tenant(tenant), items(ids));
        let purpose = purpose.map(|p| Name::new(p).unwrap());
        tokio::spawn(async move { u.call(&tenant, items, purpose.as_ref()).await })
    }

    /// Waits (up to 5 s) until `done` holds.
    async fn until(mut done: impl FnMut() -> bool) {
        for _ in 0..5_000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the condition never held");
    }

    /// Each result is the DEK of its own item, in order.
    fn assert_own_keys(answer: Answer, ids: &[u8]) {
        let answer = answer.unwrap();
        assert_eq!(answer.common, 3);
        let keys: Vec<u8> =
            answer.results.iter().map(|r| r.as_ref().unwrap().expose_secret()[0]).collect();
        assert_eq!(keys, ids);
    }

    /// Starts two requests and waits until both calls are out (blocked
    /// at the gate), so that what comes next has to wait.
    async fn fill_both_slots(u: &Shared, fake: &Fake) -> [JoinHandle<Answer>; 2] {
        let first = request(u, "onc", None, &[1]);
        until(|| fake.calls().len() == 1).await;
        let second = request(u, "onc", None, &[2]);
        until(|| fake.calls().len() == 2).await;
        [first, second]
    }

    #[tokio::test]
    async fn waiting_requests_share_the_next_call_and_each_gets_its_own_keys() {
        let fake = Arc::new(Fake::default());
        let u = shared(&fake, 100);
        let [a, b] = fill_both_slots(&u, &fake).await;
        let c = request(&u, "onc", None, &[3, 4]);
        let d = request(&u, "onc", None, &[5]);
        let e = request(&u, "onc", None, &[6, 7, 8]);
        until(|| u.waiting() == 3).await;
        assert_eq!(fake.calls().len(), 2, "no third call while two are out");

        fake.gate.add_permits(100);
        assert_own_keys(a.await.unwrap(), &[1]);
        assert_own_keys(b.await.unwrap(), &[2]);
        assert_own_keys(c.await.unwrap(), &[3, 4]);
        assert_own_keys(d.await.unwrap(), &[5]);
        assert_own_keys(e.await.unwrap(), &[6, 7, 8]);
        assert_eq!(fake.calls(), [vec![1], vec![2], vec![3, 4, 5, 6, 7, 8]]);
        assert_eq!(u.stats(), (3, 5));
        until(|| u.open_lines() == 0).await;

        // A lone request is sent at once, not held for company.
        let f = request(&u, "onc", None, &[9]);
        assert_own_keys(f.await.unwrap(), &[9]);
        assert_eq!(fake.calls().len(), 4);
    }

    #[tokio::test]
    async fn a_call_carries_at_most_max_items_and_a_full_call_leaves_at_once() {
        let fake = Arc::new(Fake::default());
        let u = shared(&fake, 4);
        let [a, b] = fill_both_slots(&u, &fake).await;
        let c = request(&u, "onc", None, &[3, 4, 5]);
        until(|| u.waiting() == 1).await;
        assert_eq!(fake.calls().len(), 2, "three items wait for a slot");
        // Five items wait: a full call's worth leaves although two are out.
        let d = request(&u, "onc", None, &[6, 7]);
        until(|| fake.calls().len() == 3).await;
        // A request above the limit goes alone, and so at once.
        let e = request(&u, "onc", None, &[10, 11, 12, 13, 14, 15, 16]);
        let f = request(&u, "onc", None, &[20]);
        until(|| fake.calls().len() == 5 && u.waiting() == 1).await;
        // One item waiting is not a full call's worth: no sixth call.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(fake.calls().len(), 5);
        fake.gate.add_permits(100);
        for (handle, ids) in [
            (a, vec![1]),
            (b, vec![2]),
            (c, vec![3, 4, 5]),
            (d, vec![6, 7]),
            (e, (10..=16).collect()),
            (f, vec![20]),
        ] {
            assert_own_keys(handle.await.unwrap(), &ids);
        }
        let mut calls = fake.calls();
        calls.sort();
        let expected: [Vec<u8>; 6] =
            [vec![1], vec![2], vec![3, 4, 5], vec![6, 7], (10..=16).collect(), vec![20]];
        assert_eq!(calls, expected);
        until(|| u.open_lines() == 0).await;
    }

    #[tokio::test]
    async fn a_shared_call_refused_as_too_large_is_sent_again_request_by_request() {
        let fake = Arc::new(Fake::default());
        fake.max_batch.store(2, Ordering::Relaxed);
        let u = shared(&fake, 100);
        let [a, b] = fill_both_slots(&u, &fake).await;
        let c = request(&u, "onc", None, &[3, 4]);
        let d = request(&u, "onc", None, &[5]);
        until(|| u.waiting() == 2).await;
        fake.gate.add_permits(100);
        assert_own_keys(a.await.unwrap(), &[1]);
        assert_own_keys(b.await.unwrap(), &[2]);
        assert_own_keys(c.await.unwrap(), &[3, 4]);
        assert_own_keys(d.await.unwrap(), &[5]);
        assert_eq!(fake.calls(), [vec![1], vec![2], vec![3, 4, 5], vec![3, 4], vec![5]]);
        // Calls are shared up to half the refused size from now on (one
        // item): behind two calls out, each waiting item is a full call.
        fake.gate.forget_permits(fake.gate.available_permits());
        let (h, i) = (request(&u, "onc", None, &[11]), request(&u, "onc", None, &[12]));
        until(|| fake.calls().len() == 7).await;
        let (f, g) = (request(&u, "onc", None, &[9]), request(&u, "onc", None, &[10]));
        until(|| fake.calls().len() == 9).await;
        fake.gate.add_permits(100);
        for (handle, id) in [(h, 11), (i, 12), (f, 9), (g, 10)] {
            assert_own_keys(handle.await.unwrap(), &[id]);
        }
        assert!(fake.calls()[5..].iter().all(|c| c.len() == 1), "{:?}", fake.calls());
        // A request too large on its own gets the refusal, as it would have.
        let e = request(&u, "onc", None, &[6, 7, 8]).await.unwrap();
        assert!(matches!(e, Err(KsError::Api { status: 400, .. })));
    }

    #[tokio::test]
    async fn a_request_gives_up_after_its_wait_limit_and_is_not_sent_later() {
        let fake = Arc::new(Fake::default());
        let u = SharedCalls::new(fake.clone(), 100, Duration::from_millis(200));
        let [a, b] = fill_both_slots(&u, &fake).await;
        let c = request(&u, "onc", None, &[3]);
        for handle in [a, b, c] {
            let e = handle.await.unwrap().err();
            assert!(
                matches!(e, Some(KsError::Unavailable(ref m)) if m.contains("within 200 ms")),
                "{e:?}"
            );
        }
        fake.gate.add_permits(100);
        until(|| u.open_lines() == 0).await;
        assert_eq!(fake.calls(), [vec![1], vec![2]], "the request that gave up was not sent");
        assert_own_keys(request(&u, "onc", None, &[4]).await.unwrap(), &[4]);
    }

    #[tokio::test]
    async fn a_call_that_panics_fails_its_requests_closed_and_frees_the_line() {
        let fake = Arc::new(Fake::default());
        fake.panic.store(true, Ordering::Relaxed);
        let u = shared(&fake, 100);
        let [a, b] = fill_both_slots(&u, &fake).await;
        let c = request(&u, "onc", None, &[3]);
        until(|| u.waiting() == 1).await;
        fake.gate.add_permits(100);
        for handle in [a, b, c] {
            let e = handle.await.unwrap().err();
            assert!(
                matches!(e, Some(KsError::Unavailable(ref m)) if m == "key service call abandoned"),
                "{e:?}"
            );
        }
        until(|| u.open_lines() == 0).await;
        fake.panic.store(false, Ordering::Relaxed);
        assert_own_keys(request(&u, "onc", None, &[4]).await.unwrap(), &[4]);
    }

    #[tokio::test]
    async fn tenants_and_purposes_have_calls_of_their_own() {
        let fake = Arc::new(Fake::default());
        let u = shared(&fake, 100);
        let a = request(&u, "onc", None, &[1]);
        let b = request(&u, "derm", None, &[2]);
        let c = request(&u, "onc", Some("treatment"), &[3]);
        // Each is the first of its line: all three are out at once.
        until(|| fake.calls().len() == 3).await;
        fake.gate.add_permits(100);
        assert_own_keys(a.await.unwrap(), &[1]);
        assert_own_keys(b.await.unwrap(), &[2]);
        assert_own_keys(c.await.unwrap(), &[3]);
        let mut seen: Vec<(String, Option<String>, Vec<u8>)> = fake
            .calls
            .lock()
            .unwrap()
            .iter()
            .map(|((t, p), ids)| (t.to_string(), p.as_ref().map(|p| p.to_string()), ids.clone()))
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                ("derm".into(), None, vec![2]),
                ("onc".into(), None, vec![1]),
                ("onc".into(), Some("treatment".into()), vec![3]),
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_call_fails_each_request_in_it_and_the_line_goes_on() {
        let fake = Arc::new(Fake::default());
        let u = shared(&fake, 100);
        fake.fail.store(true, Ordering::Relaxed);
        let [a, b] = fill_both_slots(&u, &fake).await;
        let c = request(&u, "onc", None, &[3]);
        let d = request(&u, "onc", None, &[4]);
        until(|| u.waiting() == 2).await;
        fake.gate.add_permits(100);
        for handle in [a, b, c, d] {
            let e = handle.await.unwrap().err();
            assert!(matches!(e, Some(KsError::Unavailable(ref m)) if m == "down"), "{e:?}");
        }
        assert_eq!(fake.calls().len(), 3, "c and d shared the failed call");
        fake.fail.store(false, Ordering::Relaxed);
        assert_own_keys(request(&u, "onc", None, &[5]).await.unwrap(), &[5]);
        until(|| u.open_lines() == 0).await;
    }

    #[tokio::test]
    async fn a_request_that_has_gone_is_not_sent() {
        let fake = Arc::new(Fake::default());
        let u = shared(&fake, 100);
        let [a, b] = fill_both_slots(&u, &fake).await;
        let gone = request(&u, "onc", None, &[3]);
        let d = request(&u, "onc", None, &[4]);
        until(|| u.waiting() == 2).await;
        gone.abort();
        assert!(gone.await.is_err_and(|e| e.is_cancelled()));
        fake.gate.add_permits(100);
        for handle in [a, b] {
            assert!(handle.await.unwrap().is_ok());
        }
        assert_own_keys(d.await.unwrap(), &[4]);
        assert_eq!(fake.calls(), [vec![1], vec![2], vec![4]]);
        until(|| u.open_lines() == 0).await;
    }

    #[tokio::test]
    async fn an_answer_short_of_its_items_fails_the_requests_it_cannot_serve() {
        let fake = Arc::new(Fake::default());
        let u = shared(&fake, 100);
        let [a, b] = fill_both_slots(&u, &fake).await;
        let c = request(&u, "onc", None, &[3, 4]);
        let d = request(&u, "onc", None, &[5, 6]);
        until(|| u.waiting() == 2).await;
        fake.short.store(true, Ordering::Relaxed);
        fake.gate.add_permits(100);
        for handle in [a, b] {
            assert!(matches!(handle.await.unwrap(), Err(KsError::Decode(_))));
        }
        // The shared call answered 3 of 4: c is whole, d is refused, not padded.
        assert_own_keys(c.await.unwrap(), &[3, 4]);
        assert!(matches!(d.await.unwrap(), Err(KsError::Decode(_))));
    }

    /// The cached DEK of `[id; 16]` for tenant `onc`, version 1: its
    /// first byte.
    fn cached(fake: &Fake, id: u8) -> Option<u8> {
        let key = fake.cache.get(&RecordKeyId::from_bytes([id; 16]), &tenant("onc"), 1)?;
        Some(key.expose_secret()[0])
    }

    /// A request gone while its call is out is answered to the cache: its
    /// retry finds its keys there. Requests still there get their own
    /// answers, as before (theirs are for their handlers to cache).
    #[tokio::test]
    async fn the_keys_of_a_request_gone_while_its_call_was_out_are_cached() {
        let fake = Arc::new(Fake::default());
        let u = shared(&fake, 100);
        let [a, b] = fill_both_slots(&u, &fake).await;
        let c = request(&u, "onc", None, &[3, 4, 3]);
        let d = request(&u, "onc", None, &[5]);
        until(|| u.waiting() == 2).await;
        a.abort();
        assert!(a.await.is_err_and(|e| e.is_cancelled()));
        // a's call is answered, and its slot sends c and d together.
        fake.gate.add_permits(1);
        until(|| fake.calls().len() == 3).await;
        c.abort();
        assert!(c.await.is_err_and(|e| e.is_cancelled()));
        fake.gate.add_permits(100);
        assert_own_keys(b.await.unwrap(), &[2]);
        assert_own_keys(d.await.unwrap(), &[5]);
        until(|| u.open_lines() == 0).await;
        assert_eq!(fake.calls(), [vec![1], vec![2], vec![3, 4, 3, 5]]);
        assert_eq!([1, 3, 4].map(|id| cached(&fake, id)), [Some(1), Some(3), Some(4)]);
        assert_eq!([2, 5].map(|id| cached(&fake, id)), [None, None]);
        assert_eq!(fake.cache.stats().2, 3);

        // A call that keeps nothing (a rewrap) drops a gone request's answer.
        let fake = Arc::new(Fake::default());
        let u = SharedCalls::new(KeepsNothing(fake.clone()), 100, Duration::from_secs(10));
        let (tenant, items) = (tenant("onc"), items(&[6]));
        let gone = {
            let u = u.clone();
            tokio::spawn(async move { u.call(&tenant, items, None).await })
        };
        until(|| fake.calls().len() == 1).await;
        gone.abort();
        assert!(gone.await.is_err_and(|e| e.is_cancelled()));
        fake.gate.add_permits(1);
        until(|| u.open_lines() == 0).await;
        assert_eq!(fake.cache.stats().2, 0);
    }

    /// A shred heard after a call left and before its answer keeps a gone
    /// request's keys out of the cache: the key service vouched for them
    /// before the shred. Those of a call sent after the shred are cached.
    #[tokio::test]
    async fn a_shred_heard_while_the_call_was_out_keeps_a_gone_requests_keys_out() {
        let fake = Arc::new(Fake::default());
        let u = shared(&fake, 100);
        for (id, shred) in [(1, true), (2, false)] {
            let gone = request(&u, "onc", None, &[id]);
            until(|| fake.calls().len() == usize::from(id)).await;
            gone.abort();
            assert!(gone.await.is_err_and(|e| e.is_cancelled()));
            if shred {
                fake.cache.forget_tenant(&tenant("onc"));
            }
            fake.gate.add_permits(1);
            until(|| u.open_lines() == 0).await;
        }
        assert_eq!(cached(&fake, 1), None, "unwrapped across the shred");
        assert_eq!(cached(&fake, 2), Some(2), "unwrapped after it");
    }

    /// A gone request with an item the key service refused is cached not
    /// at all, as its handler would have failed it (a `key_destroyed` is a
    /// shred it would have acted on).
    #[test]
    fn a_gone_request_with_a_refused_item_is_not_cached() {
        let fake = Fake::default();
        let key = |b: u8| Ok(Key256::from_array(&mut [b; 32]));
        let refused = vec![key(1), Err("key_destroyed".to_owned())];
        keep_unclaimed(&fake.cache, &tenant("onc"), Instant::now(), &items(&[1, 2]), refused);
        assert_eq!(fake.cache.stats().2, 0);
        keep_unclaimed(
            &fake.cache,
            &tenant("onc"),
            Instant::now(),
            &items(&[1, 2]),
            vec![key(1), key(2)],
        );
        assert_eq!([1, 2].map(|id| cached(&fake, id)), [Some(1), Some(2)]);
    }
}
