//! A deadline for answers that carry keys.
//!
//! An answer carrying plaintext DEKs holds room in the key service's pool
//! of keys in flight until its last byte has been written
//! ([`super::KeyRoom`]). A client that never reads it (or opens its HTTP/2
//! flow-control window a byte at a time, which keeps the connection from
//! being idle) would hold that room for as long as it likes. So each
//! connection of the key service notes when such an answer became ready
//! ([`SecretSends::start`]) and when it was sent (the [`PendingSend`]
//! dropped with the answer's bytes); an answer still unsent after the
//! connection's send limit closes the connection (see
//! [`super::idle::serve_http_with`]), which drops the answer and frees
//! its room.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// The answers carrying keys on one connection that are not sent yet, by
/// when each became ready, in the order they did.
#[derive(Debug, Default)]
struct Pending {
    next: u64,
    since: BTreeMap<u64, Instant>,
}

/// A connection's answers carrying keys, put into each of its requests'
/// extensions by `abuse::idle::serve_http_with` when the connection has
/// a send limit.
#[derive(Debug, Clone, Default)]
pub struct SecretSends(Arc<Mutex<Pending>>);

impl SecretSends {
    /// Notes an answer ready to go; it counts as sent when the returned
    /// guard is dropped (keep it with the answer's bytes).
    pub fn start(&self) -> PendingSend {
        let mut pending = self.lock();
        let id = pending.next;
        pending.next = pending.next.wrapping_add(1);
        pending.since.insert(id, Instant::now());
        PendingSend { sends: self.clone(), id }
    }

    /// When the oldest answer not yet sent became ready.
    fn oldest(&self) -> Option<Instant> {
        self.lock().since.first_key_value().map(|(_, since)| *since)
    }

    /// How many answers are not sent yet.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.lock().since.len()
    }

    /// Resolves once an answer has waited `limit` to be sent.
    pub(crate) async fn overdue(&self, limit: Duration) {
        loop {
            // An answer that starts after this look is due no earlier
            // than `limit` from now, when the next look comes.
            let wake = match self.oldest() {
                Some(since) if since.elapsed() >= limit => return,
                Some(since) => since + limit,
                None => Instant::now() + limit,
            };
            tokio::time::sleep_until(wake).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An answer carrying keys, not sent until this is dropped.
#[derive(Debug)]
pub struct PendingSend {
    sends: SecretSends,
    id: u64,
}

impl Drop for PendingSend {
    fn drop(&mut self) {
        self.sends.lock().since.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn overdue_when_the_oldest_unsent_answer_has_waited_the_limit() {
        let limit = Duration::from_secs(10);
        let sends = SecretSends::default();
        let started = Instant::now();
        let watch = tokio::spawn({
            let sends = sends.clone();
            async move { sends.overdue(limit).await }
        });
        // Nothing pending: never overdue; answers sent in time neither.
        tokio::time::sleep(Duration::from_secs(15)).await;
        let first = sends.start();
        tokio::time::sleep(Duration::from_secs(6)).await;
        let second = sends.start();
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(first);
        assert_eq!(sends.pending(), 1);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(!watch.is_finished(), "the second has waited 6 s");
        watch.await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(15 + 6 + 10));
        drop(second);
        assert_eq!(sends.pending(), 0);
    }
}
