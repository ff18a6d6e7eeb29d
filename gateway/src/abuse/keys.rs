//! Room for plaintext keys in flight at the key service.
//!
//! A pool of `limits.max_keys_in_flight` permits, one per DEK in an issue
//! or unwrap answer being made or sent, keeps the key service's memory
//! bounded whatever its clients' concurrency. The pool is shared, so it
//! is also something a client could hold on to; three bounds keep one
//! client from holding it:
//!
//! - **A share per identity** (`limits.max_keys_in_flight_per_identity`):
//!   an identity waits for its own room first, and only then queues for
//!   the pool, so it never holds or waits for more of the pool than its
//!   share (or, for a single request larger than the share, that one
//!   request). The share and the largest batch fit in the pool together
//!   (the configuration sees to it; by default the share is half the pool
//!   or what the largest batch leaves of it, whichever is less, and at
//!   least 1), so while one identity holds its whole share, another's
//!   largest request still finds room instead of queueing in front of
//!   everyone.
//! - **A bounded wait** (`limits.keys_wait_ms`): the pool serves first
//!   come, first served, so a large request waiting for room holds up the
//!   smaller ones behind it; whoever has waited this long gets 503 `busy`
//!   with `Retry-After`, and the queue moves on.
//! - **A send deadline** (`limits.keys_send_timeout_secs`): the room is
//!   held until the answer's last byte is written; an answer the client has
//!   not taken in time closes its connection ([`super::sends`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::sends::{PendingSend, SecretSends};
use crate::error::ApiError;
use crate::metrics::KeysBusyLabels;

/// The pool of room for keys in flight, with each identity's share.
#[derive(Debug)]
pub struct KeyRoom {
    pool: Arc<Semaphore>,
    size: usize,
    share: usize,
    wait: Duration,
    /// The identities holding or waiting for room, each with its share
    /// (an entry goes when nobody holds or waits for it any more).
    identities: Mutex<HashMap<String, Share>>,
    /// Requests refused `busy`, by what they waited for.
    busy: Family<KeysBusyLabels, Counter>,
}

/// Room for some keys, given back when dropped: keep it with the answer
/// carrying them until that has been sent.
#[derive(Debug)]
pub struct KeysHeld {
    // Fields drop in order: the share goes back (and the identity's entry
    // with it, if unused) before the pool's room.
    _share: ShareHeld,
    _pool: OwnedSemaphorePermit,
    sends: Option<SecretSends>,
    pending: Option<PendingSend>,
}

/// An identity's share, and how many requests hold or wait for it.
#[derive(Debug)]
struct Share {
    permits: Arc<Semaphore>,
    users: usize,
}

/// A handle on an identity's share, and the permits taken from it; when
/// dropped, gives them back and forgets the identity if nobody else holds
/// or waits for its share. Taken before the first wait and kept until the
/// keys are sent, so that the entry goes however the request ends,
/// including by its future being dropped while it waits (the client went
/// away, the request timed out).
#[derive(Debug)]
struct ShareHeld {
    room: Arc<KeyRoom>,
    identity: String,
    share: Arc<Semaphore>,
    permits: u32,
}

impl KeyRoom {
    /// A pool of `size` permits (at least 1), of which one identity may
    /// hold `share` (at least 1, at most `size`); a request waits `wait`
    /// at most for its room. Requests refused `busy` are counted in `busy`.
    pub fn new(
        size: usize,
        share: usize,
        wait: Duration,
        busy: Family<KeysBusyLabels, Counter>,
    ) -> Arc<Self> {
        let size = size.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(Self {
            pool: Arc::new(Semaphore::new(size)),
            size,
            share: share.clamp(1, size),
            wait,
            identities: Mutex::default(),
            busy,
        })
    }

    /// Waits for room for `count` more keys for `identity`: its share of
    /// `count` (at most its whole share), then `count` of the pool (at most
    /// the whole pool: a request for more runs alone). 503 `busy` if
    /// either does not come within the wait. `sends`, the connection's
    /// (see `abuse::sends`), times the answer once it is ready
    /// ([`KeysHeld::sending`]).
    pub async fn acquire(
        self: &Arc<Self>,
        identity: &str,
        count: usize,
        sends: Option<SecretSends>,
    ) -> Result<KeysHeld, ApiError> {
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut share = ShareHeld {
            room: self.clone(),
            identity: identity.to_owned(),
            share: self.share_of(identity),
            permits: 0,
        };
        let wanted = permits(count, self.share);
        match tokio::time::timeout_at(deadline, share.share.acquire_many(wanted)).await {
            Ok(Ok(permit)) => permit.forget(),
            Ok(Err(_)) => return Err(shutting_down()),
            Err(_) => {
                tracing::debug!(identity, count, "no room for keys within this identity's share");
                return Err(self.busy(
                    "identity_share",
                    "this identity already has its share of keys in flight",
                ));
            }
        }
        share.permits = wanted;
        let pool = self.pool.clone().acquire_many_owned(permits(count, self.size));
        let pool = match tokio::time::timeout_at(deadline, pool).await {
            Ok(Ok(pool)) => pool,
            Ok(Err(_)) => return Err(shutting_down()),
            Err(_) => {
                tracing::debug!(identity, count, "no room for keys in the pool");
                return Err(self.busy("pool", "the key service has too many keys in flight"));
            }
        };
        Ok(KeysHeld { _share: share, _pool: pool, sends, pending: None })
    }

    /// Permits of the pool free now.
    pub fn available(&self) -> usize {
        self.pool.available_permits()
    }

    /// How many identities hold or wait for room.
    pub fn identities(&self) -> usize {
        self.lock().len()
    }

    /// `identity`'s share (a new, whole one if it holds and waits for
    /// none), counting one more user until [`ShareHeld`] drops.
    fn share_of(&self, identity: &str) -> Arc<Semaphore> {
        let mut identities = self.lock();
        // The identity is copied only when it is new to the map.
        let share = match identities.get_mut(identity) {
            Some(share) => share,
            None => identities.entry(identity.to_owned()).or_insert_with(|| Share {
                permits: Arc::new(Semaphore::new(self.share)),
                users: 0,
            }),
        };
        share.users = share.users.saturating_add(1);
        share.permits.clone()
    }

    /// 503 `busy`, counted under `wait`.
    fn busy(&self, wait: &'static str, message: &str) -> ApiError {
        self.busy.get_or_create(&KeysBusyLabels { wait }).inc();
        ApiError::unavailable("busy", format!("{message}; try again shortly"))
            .with_retry_after(Some(1))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Share>> {
        self.identities.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl KeysHeld {
    /// The answer carrying the keys is ready: from now on, it must be sent
    /// within the connection's send limit (if it has one).
    #[must_use]
    pub fn sending(mut self) -> Self {
        self.pending = self.sends.take().map(|sends| sends.start());
        self
    }
}

impl Drop for ShareHeld {
    fn drop(&mut self) {
        self.share.add_permits(self.permits as usize);
        let mut identities = self.room.lock();
        if let Some(share) = identities.get_mut(&self.identity) {
            share.users = share.users.saturating_sub(1);
            if share.users == 0 {
                identities.remove(&self.identity);
            }
        }
    }
}

/// `count` permits, between 1 and `most`.
fn permits(count: usize, most: usize) -> u32 {
    u32::try_from(count.clamp(1, most)).unwrap_or(u32::MAX)
}

/// The pool is never closed; this only keeps the error arms total.
fn shutting_down() -> ApiError {
    ApiError::unavailable("shutting_down", "the key service is shutting down")
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use tokio::time::Instant;

    use super::*;

    const WAIT: Duration = Duration::from_millis(500);

    fn assert_busy(result: Result<KeysHeld, ApiError>) {
        let error = result.expect_err("busy");
        assert_eq!((error.status(), error.code()), (StatusCode::SERVICE_UNAVAILABLE, "busy"));
        assert_eq!(error.retry_after(), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn one_identity_holds_at_most_its_share_and_others_still_get_room() {
        let busy = Family::<KeysBusyLabels, Counter>::default();
        let room = KeyRoom::new(100, 50, WAIT, busy.clone());
        // `a`'s clients stopped reading: its answers hold their room.
        let held = room.acquire("a", 30, None).await.unwrap();
        let more = room.acquire("a", 20, None).await.unwrap();
        let started = Instant::now();
        assert_busy(room.acquire("a", 1, None).await);
        assert_eq!(started.elapsed(), WAIT, "refused after the wait");
        // `b` is not held up by `a`, in the pool nor in `a`'s queue.
        let started = Instant::now();
        let b = room.acquire("b", 50, None).await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(room.available(), 0);
        // Room given back is taken again.
        drop(more);
        let a = room.acquire("a", 20, None).await.unwrap();
        drop((held, a, b));
        assert_eq!(room.available(), 100);
        assert_eq!(room.identities(), 0, "nothing is kept for identities without room");
        assert_eq!(busy.get_or_create(&KeysBusyLabels { wait: "identity_share" }).get(), 1);
        assert_eq!(busy.get_or_create(&KeysBusyLabels { wait: "pool" }).get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_request_queued_for_the_pool_holds_others_up_only_for_the_wait() {
        let busy = Family::<KeysBusyLabels, Counter>::default();
        let room = KeyRoom::new(100, 80, WAIT, busy.clone());
        let b = room.acquire("b", 50, None).await.unwrap();
        // `a` wants 80 and queues for the pool (first come, first served)…
        let large = tokio::spawn({
            let room = room.clone();
            async move { room.acquire("a", 80, None).await }
        });
        let ahead = Duration::from_millis(100);
        tokio::time::sleep(ahead).await;
        // …so `c`'s 10 wait behind it, until `a` has waited its limit.
        let started = Instant::now();
        let c = room.acquire("c", 10, None).await.unwrap();
        assert_eq!(started.elapsed(), WAIT - ahead);
        assert_busy(large.await.unwrap());
        assert_eq!(busy.get_or_create(&KeysBusyLabels { wait: "pool" }).get(), 1);
        drop((b, c));
        assert_eq!(room.available(), 100);
        assert_eq!(room.identities(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_dropped_while_it_waits_leaves_nothing_behind() {
        let room = KeyRoom::new(100, 50, WAIT, Family::default());
        // Waiting for its identity's share when its client goes away (or
        // the request times out): the future is dropped mid-wait.
        let a = room.acquire("a", 50, None).await.unwrap();
        let gone = tokio::time::timeout(WAIT / 5, room.acquire("a", 1, None)).await;
        assert!(gone.is_err(), "still waiting when dropped");
        assert_eq!(room.identities(), 1);
        drop(a);
        assert_eq!((room.identities(), room.available()), (0, 100));
        // Waiting for the pool, its share already taken.
        let b = room.acquire("b", 50, None).await.unwrap();
        let c = room.acquire("c", 50, None).await.unwrap();
        let gone = tokio::time::timeout(WAIT / 5, room.acquire("a", 10, None)).await;
        assert!(gone.is_err(), "still waiting when dropped");
        assert_eq!(room.identities(), 2, "b and c, not a");
        drop((b, c));
        assert_eq!((room.identities(), room.available()), (0, 100));
        // Its share came back whole.
        let _a = room.acquire("a", 50, None).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_larger_than_the_share_or_the_pool_runs_alone() {
        let room = KeyRoom::new(100, 50, WAIT, Family::default());
        let whole = room.acquire("a", 1_000, None).await.unwrap();
        assert_eq!(room.available(), 0);
        assert_busy(room.acquire("b", 1, None).await);
        drop(whole);
        let _b = room.acquire("b", 1, None).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn room_is_held_until_the_answer_is_dropped_and_its_send_is_timed() {
        let room = KeyRoom::new(10, 5, WAIT, Family::default());
        let sends = SecretSends::default();
        let held = room.acquire("a", 5, Some(sends.clone())).await.unwrap();
        assert_eq!(sends.pending(), 0, "not ready yet");
        let held = held.sending();
        assert_eq!(sends.pending(), 1);
        drop(held);
        assert_eq!((sends.pending(), room.available()), (0, 10));
    }
}
