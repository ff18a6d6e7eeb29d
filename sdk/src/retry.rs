//! When to try a call again, and how long to wait first.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use crate::error::Error;

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Retries only what [`Error::is_retryable`] allows, at most `retries` times,
/// with exponential backoff and jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetryPolicy {
    /// Retries after the first attempt.
    pub(crate) retries: u32,
    /// The wait before the first retry (before jitter); doubles each time.
    pub(crate) base: Duration,
}

impl RetryPolicy {
    /// Whether to try again after `failed_attempts` attempts, the last of
    /// which failed with `err`.
    pub(crate) fn should_retry(&self, failed_attempts: u32, err: &Error) -> bool {
        failed_attempts <= self.retries && err.is_retryable()
    }

    /// The wait before retry number `retry` (0 for the first) after `err`:
    /// the sidecar's `Retry-After` if it sent one (a key service shedding
    /// load asks for a pause, and retrying sooner only adds to the load),
    /// plus the jittered [`backoff`](Self::backoff), so that clients told the
    /// same pause do not all come back at once.
    pub(crate) fn wait(&self, retry: u32, err: &Error) -> Duration {
        let backoff = self.backoff(retry);
        err.retry_after().map_or(backoff, |asked| asked.saturating_add(backoff))
    }

    /// The wait before retry number `retry` (0 for the first): a random
    /// duration in `[d/2, d]` with `d = base · 2^retry`, at most 2 s. The jitter
    /// keeps many clients that failed together from retrying together.
    pub(crate) fn backoff(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry).unwrap_or(u32::MAX);
        let ceiling = self.base.saturating_mul(factor).min(MAX_BACKOFF);
        let half = ceiling / 2;
        let half_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let jitter = random_u64() % half_nanos.saturating_add(1);
        half.saturating_add(Duration::from_nanos(jitter))
    }
}

/// A random number good enough for jitter (not for anything secret), from
/// std's randomly keyed hasher rather than a dependency.
fn random_u64() -> u64 {
    RandomState::new().hash_one(0u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::code::ErrorCode;
    use crate::operation::Operation;

    fn policy(retries: u32) -> RetryPolicy {
        RetryPolicy { retries, base: Duration::from_millis(100) }
    }

    #[test]
    fn backoff_doubles_within_jittered_bounds_and_is_capped() {
        let p = policy(10);
        for _ in 0..50 {
            let first = p.backoff(0);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let second = p.backoff(1);
            assert!(second >= Duration::from_millis(100) && second <= Duration::from_millis(200));
            let late = p.backoff(40);
            assert!(late >= MAX_BACKOFF / 2 && late <= MAX_BACKOFF);
        }
        assert_eq!(RetryPolicy { retries: 1, base: Duration::ZERO }.backoff(3), Duration::ZERO);
    }

    #[test]
    fn the_wait_is_at_least_the_retry_after_plus_backoff() {
        let p = policy(2);
        let unavailable = |retry_after| Error::Api {
            op: Operation::Encrypt,
            status: 503,
            code: ErrorCode::KeyServiceUnavailable,
            message: String::new(),
            retry_after,
        };
        for _ in 0..50 {
            let wait = p.wait(1, &unavailable(Some(Duration::from_secs(1))));
            assert!(wait >= Duration::from_millis(1100) && wait <= Duration::from_millis(1200));
            let wait = p.wait(0, &unavailable(None));
            assert!(wait >= Duration::from_millis(50) && wait <= Duration::from_millis(100));
        }
    }

    #[test]
    fn retries_stop_when_the_budget_is_spent_or_the_error_is_final() {
        let transient = Error::Api {
            op: Operation::Encrypt,
            status: 503,
            code: ErrorCode::KeyServiceUnavailable,
            message: String::new(),
            retry_after: None,
        };
        let final_error = Error::Api {
            op: Operation::Encrypt,
            status: 403,
            code: ErrorCode::Forbidden,
            message: String::new(),
            retry_after: None,
        };
        let p = policy(2);
        assert!(p.should_retry(1, &transient));
        assert!(p.should_retry(2, &transient));
        assert!(!p.should_retry(3, &transient));
        assert!(!p.should_retry(1, &final_error));
        assert!(!policy(0).should_retry(1, &transient));
    }
}
