//! When the pool may call `C_Login` ([`LoginGate`], [`RefusedPins`]),
//! without a token: a refused PIN is never offered again, other failures
//! wait with exponential backoff.

use std::time::{Duration, Instant};

use cryptoki::error::RvError;
use secrecy::SecretString;

use super::super::login::{LoginGate, MAX_LOGIN_WAIT, RefusedPins, is_pin_refusal};
use super::*;

const BASE: Duration = Duration::from_secs(30);

/// Drives `gate` for `hours`, a call every second, as the pool would: a
/// login is attempted whenever the gate lets it through, and the token
/// answers each with `rv`. Returns how many logins reached the token.
fn logins_over(gate: &mut LoginGate, rv: RvError, hours: u64) -> usize {
    let start = Instant::now();
    let mut attempts = 0;
    for second in 0..hours * 3600 {
        let now = start + Duration::from_secs(second);
        if gate.check("t", now).is_err() {
            continue;
        }
        attempts += 1;
        if is_pin_refusal(rv) {
            gate.refuse(rv);
        } else {
            gate.failed(rv, now);
        }
    }
    attempts
}

#[test]
fn a_refused_pin_is_offered_once_and_never_again() {
    for rv in [
        RvError::PinIncorrect,
        RvError::PinInvalid,
        RvError::PinLenRange,
        RvError::PinExpired,
        RvError::PinLocked,
    ] {
        let mut gate = LoginGate::new(BASE);
        assert_eq!(logins_over(&mut gate, rv, 24), 1, "{rv:?}");
        assert_eq!(gate.refused(), Some(rv));
        // Not even a success of another session (the user logged in by
        // someone else) or a long wait lets the PIN through again.
        gate.succeeded();
        let much_later = Instant::now() + Duration::from_secs(365 * 86_400);
        let error = gate.check("t", much_later).unwrap_err();
        let Pkcs11Error::PinRefused { rv: refused, .. } = &error else { panic!("{error:?}") };
        assert_eq!(*refused, rv);
        assert!(error.to_string().contains("restart the key service with the right PIN"));
    }
}

#[test]
fn other_login_failures_back_off_exponentially_up_to_five_minutes() {
    let mut gate = LoginGate::new(BASE);
    let now = Instant::now();
    let waits: Vec<u64> =
        (0..7).map(|_| gate.failed(RvError::DeviceError, now).as_secs()).collect();
    assert_eq!(waits, [30, 60, 120, 240, 300, 300, 300]);
    assert_eq!(MAX_LOGIN_WAIT, Duration::from_secs(300));
    // 30 s + 60 s + 120 s + 240 s, then one every 5 minutes: about 15 in
    // the first hour (not 120), 12 an hour after that.
    let mut gate = LoginGate::new(BASE);
    assert_eq!(logins_over(&mut gate, RvError::DeviceError, 1), 15);
    assert_eq!(gate.refused(), None);

    // Between attempts a call fails at once, saying how long is left.
    let mut gate = LoginGate::new(BASE);
    gate.failed(RvError::DeviceError, now);
    let error = gate.check("t", now + Duration::from_secs(10)).unwrap_err();
    let Pkcs11Error::LoginDeferred { rv, failures, retry_in, .. } = error else {
        panic!("{error:?}")
    };
    assert_eq!((rv, failures, retry_in), (RvError::DeviceError, 1, Duration::from_secs(20)));
    assert!(gate.check("t", now + BASE).is_ok());

    // A successful login ends the backoff.
    gate.failed(RvError::DeviceError, now);
    gate.succeeded();
    assert!(gate.check("t", now).is_ok());
    assert_eq!(gate.failed(RvError::DeviceError, now), BASE);
}

#[test]
fn a_long_or_zero_base_wait_is_kept() {
    let now = Instant::now();
    let mut long = LoginGate::new(Duration::from_secs(3600));
    assert_eq!(long.failed(RvError::DeviceError, now), Duration::from_secs(3600));
    assert_eq!(long.failed(RvError::DeviceError, now), Duration::from_secs(3600));
    let mut forever = LoginGate::new(Duration::MAX);
    forever.failed(RvError::DeviceError, now);
    assert!(forever.check("t", now + Duration::from_secs(86_400)).is_err());
    let mut zero = LoginGate::new(Duration::ZERO);
    zero.failed(RvError::DeviceError, now);
    assert!(zero.check("t", now).is_ok());
}

#[test]
fn user_pin_not_initialized_is_not_a_refusal_of_the_pin() {
    assert!(!is_pin_refusal(RvError::UserPinNotInitialized));
    assert!(!is_pin_refusal(RvError::DeviceError));
    let mut gate = LoginGate::new(BASE);
    assert!(logins_over(&mut gate, RvError::UserPinNotInitialized, 1) > 1);
}

#[test]
fn refused_pins_are_remembered_per_token_and_pin_and_never_shown() {
    let mut refused = RefusedPins::default();
    let pin = SecretString::from(PIN);
    assert_eq!(refused.find("token", &pin), None);
    refused.add("token", &pin, RvError::PinIncorrect);
    refused.add("token", &pin, RvError::PinLocked);
    assert_eq!(refused.find("token", &SecretString::from(PIN)), Some(RvError::PinIncorrect));
    assert_eq!(refused.find("other-token", &pin), None);
    assert_eq!(refused.find("token", &SecretString::from("another-pin")), None);
    let debug = format!("{refused:?}");
    assert!(!debug.contains(PIN), "{debug}");
}
