//! One key service call per cached key at a time.
//!
//! When a cached key expires, every request that needs it misses at once;
//! without this each would send its own call (and the key service would
//! audit each). Concurrent misses of one key instead share the call the
//! first of them began, and all get its answer, error included. A call
//! whose caller is cancelled is taken over by one of the others, so none
//! is left waiting on a call no one makes.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::OnceCell;

use super::ks_client::KsError;

type Answer<T> = Result<Arc<T>, KsError>;

/// A caller leaving a call (answered, or cancelled): if it was the last
/// one and no answer came, the call's entry goes, so that calls whose
/// callers all gave up (their clients timed out in an outage) do not stay
/// behind, one per key the app named.
struct Leaving<'a, K: Hash + Eq + Clone, T> {
    flights: &'a SingleFlight<K, T>,
    key: &'a K,
    call: &'a Arc<OnceCell<Answer<T>>>,
}

impl<K: Hash + Eq + Clone, T> Drop for Leaving<'_, K, T> {
    fn drop(&mut self) {
        let mut calls = self.flights.calls();
        // Under the map's lock, where callers join: the map's reference
        // and this caller's are the only ones left.
        let alone = Arc::strong_count(self.call) == 2;
        if !self.call.initialized()
            && alone
            && calls.get(self.key).is_some_and(|c| Arc::ptr_eq(c, self.call))
        {
            calls.remove(self.key);
        }
    }
}

/// The calls in flight, by the key they fetch.
pub(super) struct SingleFlight<K, T> {
    calls: Mutex<HashMap<K, Arc<OnceCell<Answer<T>>>>>,
}

impl<K, T> Default for SingleFlight<K, T> {
    fn default() -> Self {
        Self { calls: Mutex::default() }
    }
}

impl<K: Hash + Eq + Clone, T> SingleFlight<K, T> {
    fn calls(&self) -> MutexGuard<'_, HashMap<K, Arc<OnceCell<Answer<T>>>>> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer of the call for `key` in flight, or of `fetch`, begun
    /// now, if none is. `fetch` should cache what it gets before it
    /// returns: a miss after the call is over begins a new call.
    pub(super) async fn run<F, Fut>(&self, key: K, fetch: F) -> Answer<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Answer<T>>,
    {
        let call = self.calls().entry(key.clone()).or_default().clone();
        let _leaving = Leaving { flights: self, key: &key, call: &call };
        call.get_or_init(|| async {
            let answer = fetch().await;
            // Over before its answer is given: those already holding the
            // call get it, later misses find the cache or call again.
            let mut calls = self.calls();
            if calls.get(&key).is_some_and(|c| Arc::ptr_eq(c, &call)) {
                calls.remove(&key);
            }
            answer
        })
        .await
        .clone()
    }

    /// Lets later misses of the keys `matches` picks begin calls of their
    /// own, rather than share one already in flight (whose answer may
    /// predate what made the caller forget them).
    pub(super) fn detach(&self, matches: impl Fn(&K) -> bool) {
        self.calls().retain(|k, _| !matches(k));
    }

    /// Calls in flight.
    #[cfg(test)]
    pub(super) fn in_flight(&self) -> usize {
        self.calls().len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    type Flights = SingleFlight<&'static str, u32>;

    /// A call that waits `ms`, counting itself, and answers `value`.
    async fn slow(calls: &AtomicUsize, ms: u64, value: Answer<u32>) -> Answer<u32> {
        calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        value
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_call_and_its_error() {
        let flights = Arc::new(Flights::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let mut misses = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let (flights, calls) = (flights.clone(), calls.clone());
            misses
                .spawn(async move { flights.run("a", || slow(&calls, 50, Ok(Arc::new(7)))).await });
        }
        for answer in misses.join_all().await {
            assert_eq!(*answer.unwrap(), 7);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(flights.in_flight(), 0, "over once answered");

        // Another key is another call; a later miss, a new one.
        let refused = || Err(KsError::Unavailable("down".into()));
        let (a, b) = tokio::join!(
            flights.run("a", || slow(&calls, 50, refused())),
            flights.run("b", || slow(&calls, 50, Ok(Arc::new(8)))),
        );
        assert!(matches!(a, Err(KsError::Unavailable(_))));
        assert_eq!(*b.unwrap(), 8);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    /// The caller whose call is cancelled hands it to one still waiting.
    #[tokio::test]
    async fn a_cancelled_caller_hands_the_call_on() {
        let flights = Arc::new(Flights::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let first = {
            let (flights, calls) = (flights.clone(), calls.clone());
            tokio::spawn(
                async move { flights.run("a", || slow(&calls, 10_000, Ok(Arc::new(1)))).await },
            )
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = flights.run("a", || slow(&calls, 10, Ok(Arc::new(2))));
        let cancel = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            first.abort();
        };
        let (answer, ()) = tokio::join!(second, cancel);
        assert_eq!(*answer.unwrap(), 2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(flights.in_flight(), 0);
    }

    /// A call whose callers all gave up leaves nothing behind; one that
    /// another caller still waits on stays, and is answered.
    #[tokio::test]
    async fn a_call_every_caller_gave_up_on_is_forgotten() {
        let flights = Flights::default();
        let calls = AtomicUsize::new(0);
        for key in ["a", "b", "c"] {
            let stuck = flights.run(key, || slow(&calls, 10_000, Ok(Arc::new(1))));
            assert!(tokio::time::timeout(Duration::from_millis(20), stuck).await.is_err());
        }
        assert_eq!(flights.in_flight(), 0);

        let waiting = flights.run("a", || slow(&calls, 100, Ok(Arc::new(2))));
        let gave_up = async {
            let stuck = flights.run("a", || slow(&calls, 10_000, Ok(Arc::new(3))));
            assert!(tokio::time::timeout(Duration::from_millis(20), stuck).await.is_err());
            assert_eq!(flights.in_flight(), 1, "still awaited");
        };
        let (answer, ()) = tokio::join!(waiting, gave_up);
        assert_eq!(*answer.unwrap(), 2);
        assert_eq!(flights.in_flight(), 0);
    }

    /// After `detach`, a miss begins its own call even while an older one
    /// for the key is still out, and the older one's end leaves it be.
    #[tokio::test]
    async fn detached_keys_call_anew() {
        let flights = Flights::default();
        let calls = AtomicUsize::new(0);
        let old = flights.run("a", || slow(&calls, 100, Ok(Arc::new(1))));
        let new = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            flights.detach(|k| *k == "a");
            let new = flights.run("a", || slow(&calls, 200, Ok(Arc::new(2))));
            let joined = async {
                // Joins the new call, which outlives the old one.
                tokio::time::sleep(Duration::from_millis(150)).await;
                assert_eq!(flights.in_flight(), 1);
                flights.run("a", || slow(&calls, 10, Ok(Arc::new(3)))).await
            };
            tokio::join!(new, joined)
        };
        let (old, (new, joined)) = tokio::join!(old, new);
        assert_eq!((*old.unwrap(), *new.unwrap(), *joined.unwrap()), (1, 2, 2));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
