//! When the pool may call `C_Login`: the rule that keeps a stale PIN from
//! locking the token's user out.
//!
//! HSM partitions lock their user after a few failed logins (often 3 to
//! 10), and that locks out every application sharing the partition. So:
//! - once the token *refuses the PIN* (`CKR_PIN_INCORRECT`,
//!   `CKR_PIN_INVALID`, `CKR_PIN_LEN_RANGE`, `CKR_PIN_EXPIRED`,
//!   `CKR_PIN_LOCKED`), that PIN is never offered to the token again by
//!   this process: every later use fails at once with
//!   [`Pkcs11Error::PinRefused`]. The PIN cannot become right again on its
//!   own; the key service must be restarted with the right one. (The
//!   refusal is remembered per module, token and PIN, so a provider
//!   connected again with the same PIN is refused without a login too.)
//! - any other failed login (a device or session error) waits
//!   `pin_retry_interval` before the next attempt, doubling after each
//!   failure in a row up to [`MAX_LOGIN_WAIT`]; calls in between fail at
//!   once with [`Pkcs11Error::LoginDeferred`]. A successful login ends the
//!   wait.
//!
//! [`LoginGate`] is that decision, without the token (unit-tested); the
//! pool holds one and asks it before and tells it after every `C_Login`.

use std::fmt;
use std::time::{Duration, Instant};

use cryptoki::error::RvError;
use kms_core::crypto::ct_eq;
use secrecy::{ExposeSecret, SecretString};

use super::error::{Pkcs11Error, is_pin_rejection};

/// The longest wait between two logins after failures that were not a
/// refused PIN.
pub(super) const MAX_LOGIN_WAIT: Duration = Duration::from_secs(300);

/// Return values of `C_Login` that mean the token refuses this PIN: it
/// will never be tried again in this process. Every PIN rejection but a
/// user PIN not set yet, which counts no failed attempt and which the
/// token's officer may set to this very PIN.
pub(super) fn is_pin_refusal(rv: RvError) -> bool {
    is_pin_rejection(rv) && rv != RvError::UserPinNotInitialized
}

/// Whether `C_Login` may be called now; see the module docs.
#[derive(Debug)]
pub(super) struct LoginGate {
    /// The first wait after a failure that was not a refused PIN.
    base_wait: Duration,
    state: State,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// The last login worked, or none was tried.
    Open,
    /// The token refused the PIN: never again.
    Refused(RvError),
    /// `failures` logins in a row failed, the last with `rv`; the next
    /// may be tried from `until` (`None`: a wait too long for an
    /// `Instant`, so never).
    Waiting { rv: RvError, failures: u32, until: Option<Instant> },
}

impl LoginGate {
    /// A gate that lets the first login through.
    pub(super) fn new(base_wait: Duration) -> Self {
        Self { base_wait, state: State::Open }
    }

    /// The return value with which the token refused the PIN, if it did.
    pub(super) fn refused(&self) -> Option<RvError> {
        match self.state {
            State::Refused(rv) => Some(rv),
            State::Open | State::Waiting { .. } => None,
        }
    }

    /// `Ok` if a login may be attempted at `now`; otherwise the error to
    /// return instead, for `token`.
    pub(super) fn check(&self, token: &str, now: Instant) -> Result<(), Pkcs11Error> {
        match self.state {
            State::Open => Ok(()),
            State::Refused(rv) => Err(Pkcs11Error::PinRefused { token: token.to_owned(), rv }),
            State::Waiting { until: Some(until), .. } if now >= until => Ok(()),
            State::Waiting { rv, failures, until } => Err(Pkcs11Error::LoginDeferred {
                token: token.to_owned(),
                rv,
                failures,
                retry_in: until.map_or(Duration::MAX, |until| until.saturating_duration_since(now)),
            }),
        }
    }

    /// The login worked (or the user was logged in already).
    pub(super) fn succeeded(&mut self) {
        if !matches!(self.state, State::Refused(_)) {
            self.state = State::Open;
        }
    }

    /// The token refused the PIN with `rv` (here, or to another provider
    /// of this process with the same module, token and PIN).
    pub(super) fn refuse(&mut self, rv: RvError) {
        self.state = State::Refused(rv);
    }

    /// A login failed at `now` with `rv`, which does not refuse the PIN;
    /// returns how long the next one waits.
    pub(super) fn failed(&mut self, rv: RvError, now: Instant) -> Duration {
        let failures = match self.state {
            State::Refused(_) => return Duration::MAX,
            State::Open => 1,
            State::Waiting { failures, .. } => failures.saturating_add(1),
        };
        let wait = self.wait_after(failures);
        self.state = State::Waiting { rv, failures, until: now.checked_add(wait) };
        wait
    }

    /// `base_wait`, doubled for each failure in a row after the first, up
    /// to [`MAX_LOGIN_WAIT`] (or `base_wait`, if that is longer).
    fn wait_after(&self, failures: u32) -> Duration {
        let cap = self.base_wait.max(MAX_LOGIN_WAIT);
        let doublings = failures.saturating_sub(1).min(31);
        self.base_wait.checked_mul(1 << doublings).unwrap_or(cap).min(cap)
    }
}

/// The PINs a module's tokens refused in this process, so that a provider
/// connected again with one (the same PIN source re-read) does not offer
/// it to the token again. Only compared, in constant time; never shown.
#[derive(Default)]
pub(super) struct RefusedPins(Vec<RefusedPin>);

struct RefusedPin {
    token: String,
    pin: SecretString,
    rv: RvError,
}

impl RefusedPins {
    /// How the token labelled `token` refused `pin`, if it did.
    pub(super) fn find(&self, token: &str, pin: &SecretString) -> Option<RvError> {
        self.0
            .iter()
            .find(|refused| {
                refused.token == token
                    && ct_eq(refused.pin.expose_secret().as_bytes(), pin.expose_secret().as_bytes())
            })
            .map(|refused| refused.rv)
    }

    /// Records that the token labelled `token` refused `pin` with `rv`.
    pub(super) fn add(&mut self, token: &str, pin: &SecretString, rv: RvError) {
        if self.find(token, pin).is_none() {
            self.0.push(RefusedPin { token: token.to_owned(), pin: pin.clone(), rv });
        }
    }
}

impl fmt::Debug for RefusedPins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefusedPins").field("count", &self.0.len()).finish_non_exhaustive()
    }
}
