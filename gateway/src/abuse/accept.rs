//! What a listener does around `accept`: the pause after a failed one,
//! and the cap on connections open at once.
//!
//! Accepts fail in runs (the process is out of file descriptors, say,
//! often because of a connection flood): retrying at once would spin, and
//! warning on every retry would flood the log for as long as the run
//! lasts. The cap keeps a flood from getting that far: every connection
//! takes a slot before its TLS handshake and gives it back when it ends; a
//! connection accepted with every slot taken is closed at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The first pause.
const FIRST: Duration = Duration::from_millis(50);
/// The longest pause, so that the listener is back soon after the run.
const LONGEST: Duration = Duration::from_secs(1);

/// The pauses of one listener: 50 ms after a first failure, doubling to
/// 1 s while accepts keep failing, back to 50 ms after one succeeds.
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    failures: u64,
}

impl AcceptBackoff {
    /// Counts a failure and says how long to wait before the next
    /// accept. Warns on the 1st, 2nd, 4th, 8th… failure of a run.
    pub(crate) fn failed(&mut self, error: &std::io::Error) -> Duration {
        self.failures = self.failures.saturating_add(1);
        if self.failures.is_power_of_two() {
            tracing::warn!(error = %error, failures = self.failures, "accept failed; pausing");
        }
        let doublings = u32::try_from(self.failures - 1).unwrap_or(u32::MAX).min(5);
        (FIRST * 2u32.pow(doublings)).min(LONGEST)
    }

    /// Ends a run of failures (logged if there was one).
    pub(crate) fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!(failures = self.failures, "accepting connections again");
            self.failures = 0;
        }
    }
}

/// The connections one listener may have open at once.
#[derive(Debug)]
pub(crate) struct ConnectionSlots {
    slots: Arc<Semaphore>,
    /// Connections closed because every slot was taken.
    refused: AtomicU64,
    /// Whether the last connection was refused (a run of refusals is
    /// warned about once, at its start).
    full: AtomicBool,
}

impl ConnectionSlots {
    /// `max` slots (at least 1).
    pub(crate) fn new(max: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS))),
            refused: AtomicU64::new(0),
            full: AtomicBool::new(false),
        }
    }

    /// A slot for a new connection, held until the connection ends, or
    /// `None` (counted, and logged at the start of a run) if every slot is
    /// taken.
    pub(crate) fn take(&self) -> Option<OwnedSemaphorePermit> {
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => {
                if self.full.swap(false, Ordering::Relaxed) {
                    tracing::info!("connection slots free again");
                }
                Some(slot)
            }
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                if !self.full.swap(true, Ordering::Relaxed) {
                    tracing::warn!("every connection slot is taken: closing new connections");
                }
                None
            }
        }
    }

    /// How many connections were closed because every slot was taken.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_given_back_and_refusals_counted() {
        let slots = ConnectionSlots::new(2);
        let first = slots.take().unwrap();
        let _second = slots.take().unwrap();
        assert!(slots.take().is_none());
        assert!(slots.take().is_none());
        assert_eq!(slots.refused(), 2);
        drop(first);
        assert!(slots.take().is_some());
        assert_eq!(slots.refused(), 2);
    }

    #[test]
    fn pauses_double_to_a_second_and_start_over_after_a_success() {
        let error = std::io::Error::from_raw_os_error(24); // EMFILE
        let mut backoff = AcceptBackoff::default();
        let pauses: Vec<u128> = (0..8).map(|_| backoff.failed(&error).as_millis()).collect();
        assert_eq!(pauses, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
        backoff.succeeded();
        assert_eq!(backoff.failed(&error), FIRST);
    }
}
