//! The pause after a failed `accept`.
//!
//! Accepts fail in runs (the process is out of file descriptors, say,
//! often because of a connection flood): retrying at once would spin, and
//! warning on every retry would flood the log for as long as the run
//! lasts. The connection caps ([`super::ConnectionSlots`]) keep a flood
//! from getting that far.

use std::time::Duration;

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

#[cfg(test)]
mod tests {
    use super::*;

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
