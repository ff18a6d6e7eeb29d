//! Errors of the PKCS#11 provider, and how they map to [`RootKeyError`].

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use cryptoki::context::Function;
use cryptoki::error::{Error as CryptokiError, RvError};
use kms_core::RootKeyError;
use kms_core::crypto::rng::RandomError;

use super::PROVIDER_KIND;

/// The PKCS#11 provider failed.
///
/// A failed PKCS#11 call is reported as [`Pkcs11Error::Call`], naming the
/// function and its return value (`C_Login failed: CKR_PIN_INCORRECT`).
/// Messages never contain the PIN or key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Pkcs11Error {
    /// A configuration value is unusable (empty label, zero pool size, …).
    #[error("invalid PKCS#11 provider configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// The module file does not exist.
    #[error(
        "PKCS#11 module {} does not exist; install the HSM vendor's PKCS#11 library \
         (for SoftHSM2: `apt-get install softhsm2`, module /usr/lib/softhsm/libsofthsm2.so)",
        path.display()
    )]
    ModuleNotFound {
        /// The configured module path.
        path: PathBuf,
    },
    /// The module exists but cannot be loaded as a PKCS#11 library.
    #[error("cannot load PKCS#11 module {}: {detail}", path.display())]
    ModuleLoad {
        /// The module path.
        path: PathBuf,
        /// The loader's error.
        detail: String,
    },
    /// No slot holds a token with the configured label.
    #[error(
        "no PKCS#11 token labelled {label:?} (tokens present: {})",
        if present.is_empty() { "none".to_owned() } else { format!("{present:?}") }
    )]
    TokenNotFound {
        /// The configured token label.
        label: String,
        /// Labels of the tokens that are present.
        present: Vec<String>,
    },
    /// More than one token has the configured label.
    #[error("{count} PKCS#11 tokens are labelled {label:?}; token labels must be unique")]
    DuplicateToken {
        /// The label.
        label: String,
        /// How many tokens have it.
        count: usize,
    },
    /// The token has no secret key with the configured label.
    #[error(
        "token {token:?} has no secret key labelled {key:?} (create one with \
         `keygate admin`, which calls `Pkcs11RootKey::create_master_key`)"
    )]
    KeyNotFound {
        /// The token label.
        token: String,
        /// The key label.
        key: String,
    },
    /// More than one private AES key in the token has the configured label.
    #[error(
        "token {token:?} has {count} private AES keys labelled {key:?}; key labels must be unique"
    )]
    DuplicateKey {
        /// The token label.
        token: String,
        /// The key label.
        key: String,
        /// How many keys have it.
        count: usize,
    },
    /// `create_master_key` found an object with the label already.
    #[error("token {token:?} already has an object labelled {key:?}; refusing to create another")]
    KeyExists {
        /// The token label.
        token: String,
        /// The key label.
        key: String,
    },
    /// The key exists but must not be used as a master key.
    #[error("key {key:?} on token {token:?} cannot be the master key: {reason}")]
    UnsuitableKey {
        /// The token label.
        token: String,
        /// The key label.
        key: String,
        /// Why (not AES-256, extractable, not sensitive, no encrypt/decrypt).
        reason: &'static str,
    },
    /// The key found under the label in a new session is not the master
    /// key the provider connected to: it does not unwrap the blob wrapped
    /// under that key when the provider connected. The key was deleted and
    /// another created under its label, or the token was restored from
    /// another backup. It is not used (nothing is wrapped under it).
    #[error(
        "key {key:?} on token {token:?} is not the master key this process connected to: it \
         cannot unwrap the check value wrapped under that key at connection (the key was \
         replaced under the same label, or the token restored from another backup); refusing \
         to use it. Put the original key back; keys wrapped under one cannot be unwrapped by \
         the other"
    )]
    KeyReplaced {
        /// The token label.
        token: String,
        /// The key label.
        key: String,
    },
    /// The token does not offer a mechanism the provider needs.
    #[error("token {token:?} does not support {mechanism} for {usage}")]
    MechanismUnsupported {
        /// The token label.
        token: String,
        /// The mechanism (`CKM_AES_GCM`, `CKM_AES_KEY_GEN`).
        mechanism: &'static str,
        /// What it is needed for.
        usage: &'static str,
    },
    /// The token refused this PIN earlier in this process
    /// (`CKR_PIN_INCORRECT`, `_INVALID`, `_LEN_RANGE`, `_EXPIRED` or
    /// `_LOCKED`). The provider never offers it again, so that failed
    /// logins cannot lock the token's user (and, on a shared HSM
    /// partition, every other application) out; the key service must be
    /// restarted with the right PIN.
    #[error(
        "the HSM refused the user PIN for token {token:?} ({}); not trying it again in this \
         process, so that failed logins cannot lock the token's user out: restart the key \
         service with the right PIN",
        ckr_name(*rv)
    )]
    PinRefused {
        /// The token label.
        token: String,
        /// What `C_Login` returned.
        rv: RvError,
    },
    /// `C_Login` failed recently for a reason other than the PIN (a device
    /// or session error); the next attempt waits `pin_retry_interval`,
    /// doubled after each failure in a row up to 5 minutes.
    #[error(
        "C_Login on token {token:?} failed {failures} time(s) in a row, last with {}; \
         not trying again for {retry_in:?}",
        ckr_name(*rv)
    )]
    LoginDeferred {
        /// The token label.
        token: String,
        /// What the last `C_Login` returned.
        rv: RvError,
        /// Failed logins in a row.
        failures: u32,
        /// Time left before the next login attempt.
        retry_in: Duration,
    },
    /// A PKCS#11 function failed.
    #[error("C_{function:?} failed: {}", ckr_name(*rv))]
    Call {
        /// The function.
        function: Function,
        /// Its return value.
        rv: RvError,
    },
    /// The cryptoki binding failed outside of a PKCS#11 call (a missing
    /// function, an integer conversion).
    #[error("PKCS#11 binding error: {detail}")]
    Binding {
        /// The binding's error.
        detail: String,
    },
    /// The PIN file cannot be read.
    #[error("cannot read the PKCS#11 PIN file {}: {source}", path.display())]
    PinFile {
        /// The PIN file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The PIN environment variable is not set or not UTF-8.
    #[error("environment variable {var} (the PKCS#11 user PIN) is not set or not valid UTF-8")]
    PinEnvMissing {
        /// The variable name.
        var: String,
    },
    /// The PIN is empty.
    #[error("the PKCS#11 user PIN is empty")]
    EmptyPin,
    /// The blob does not unwrap under this key and context.
    #[error("the PKCS#11 root key cannot unwrap this key")]
    CannotUnwrap,
    /// The wrap/unwrap round trip of the readiness check returned another key.
    #[error("PKCS#11 readiness check failed: the unwrapped key differs from the wrapped one")]
    RoundTripMismatch,
    /// The OS random number generator failed.
    #[error(transparent)]
    Random(#[from] RandomError),
    /// No session was free, or the module did not answer, within the call
    /// timeout (the call may still finish; its session stays taken until
    /// it does).
    #[error("no answer from the PKCS#11 module within {waited:?}")]
    NoAnswer {
        /// The call timeout.
        waited: Duration,
    },
    /// The worker thread running the PKCS#11 call failed.
    #[error("PKCS#11 worker task failed: {detail}")]
    Worker {
        /// The task's error.
        detail: String,
    },
}

impl Pkcs11Error {
    /// Whether `C_Login` failed (or was not tried after a failed one),
    /// whatever the code: trying again soon could count towards locking
    /// the token's user out.
    pub fn is_login_failure(&self) -> bool {
        matches!(
            self,
            Self::Call { function: Function::Login, .. }
                | Self::PinRefused { .. }
                | Self::LoginDeferred { .. }
        )
    }

    /// The PKCS#11 return value, if a PKCS#11 function failed (for
    /// [`PinRefused`](Self::PinRefused) and
    /// [`LoginDeferred`](Self::LoginDeferred): what `C_Login` returned).
    pub fn rv(&self) -> Option<RvError> {
        match self {
            Self::Call { rv, .. }
            | Self::PinRefused { rv, .. }
            | Self::LoginDeferred { rv, .. } => Some(*rv),
            _ => None,
        }
    }

    /// Whether the error says the session, login state or device went
    /// away, so that the same call may succeed on a fresh session (after
    /// re-initializing the module for `CKR_CRYPTOKI_NOT_INITIALIZED`).
    pub(crate) fn wants_fresh_session(&self) -> bool {
        let Self::Call { rv, .. } = self else { return false };
        matches!(
            rv,
            RvError::SessionClosed
                | RvError::SessionHandleInvalid
                | RvError::UserNotLoggedIn
                | RvError::ObjectHandleInvalid
                | RvError::KeyHandleInvalid
                | RvError::OperationActive
                | RvError::DeviceError
                | RvError::DeviceRemoved
                | RvError::DeviceMemory
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::GeneralError
                | RvError::FunctionFailed
                | RvError::FunctionCanceled
                | RvError::CryptokiNotInitialized
        )
    }

    /// Whether the session is still usable after this error (the failed
    /// operation was terminated by the module, nothing else changed).
    pub(crate) fn keeps_session(&self) -> bool {
        matches!(self, Self::CannotUnwrap)
    }
}

impl From<CryptokiError> for Pkcs11Error {
    fn from(error: CryptokiError) -> Self {
        match error {
            CryptokiError::Pkcs11(rv, function) => Self::Call { function, rv },
            other => Self::Binding { detail: other.to_string() },
        }
    }
}

impl From<Pkcs11Error> for RootKeyError {
    /// Session, device and token failures are `Unavailable` (retry later),
    /// and so is a login deferred after one; a refused PIN, a missing,
    /// unsuitable or replaced key, a login deferred after another failure
    /// and other setup problems are `Misconfigured`; a blob that does not
    /// authenticate is `CannotUnwrap`; anything else is `Backend`, naming
    /// the function.
    fn from(error: Pkcs11Error) -> Self {
        let detail = error.to_string();
        match error {
            Pkcs11Error::CannotUnwrap => RootKeyError::CannotUnwrap,
            Pkcs11Error::TokenNotFound { .. }
            | Pkcs11Error::Worker { .. }
            | Pkcs11Error::NoAnswer { .. } => {
                RootKeyError::Unavailable { provider: PROVIDER_KIND, detail }
            }
            Pkcs11Error::Call { rv, .. } | Pkcs11Error::LoginDeferred { rv, .. }
                if is_capacity_or_outage(rv) =>
            {
                RootKeyError::Unavailable { provider: PROVIDER_KIND, detail }
            }
            Pkcs11Error::Call { rv, .. } if is_pin_rejection(rv) || is_key_misuse(rv) => {
                RootKeyError::Misconfigured { provider: PROVIDER_KIND, detail }
            }
            Pkcs11Error::LoginDeferred { .. } => {
                RootKeyError::Misconfigured { provider: PROVIDER_KIND, detail }
            }
            Pkcs11Error::Call { function, .. } => RootKeyError::Backend {
                provider: PROVIDER_KIND,
                operation: function_name(function),
                detail,
            },
            Pkcs11Error::Binding { .. }
            | Pkcs11Error::RoundTripMismatch
            | Pkcs11Error::Random(_) => {
                RootKeyError::Backend { provider: PROVIDER_KIND, operation: "wrap/unwrap", detail }
            }
            Pkcs11Error::InvalidConfig { .. }
            | Pkcs11Error::ModuleNotFound { .. }
            | Pkcs11Error::ModuleLoad { .. }
            | Pkcs11Error::DuplicateToken { .. }
            | Pkcs11Error::KeyNotFound { .. }
            | Pkcs11Error::DuplicateKey { .. }
            | Pkcs11Error::KeyExists { .. }
            | Pkcs11Error::UnsuitableKey { .. }
            | Pkcs11Error::KeyReplaced { .. }
            | Pkcs11Error::MechanismUnsupported { .. }
            | Pkcs11Error::PinRefused { .. }
            | Pkcs11Error::PinFile { .. }
            | Pkcs11Error::PinEnvMissing { .. }
            | Pkcs11Error::EmptyPin => {
                RootKeyError::Misconfigured { provider: PROVIDER_KIND, detail }
            }
        }
    }
}

/// Return values that mean "the token is unreachable, gone or busy":
/// retrying later may succeed.
fn is_capacity_or_outage(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::SessionClosed
            | RvError::SessionHandleInvalid
            | RvError::SessionCount
            | RvError::UserNotLoggedIn
            | RvError::ObjectHandleInvalid
            | RvError::KeyHandleInvalid
            | RvError::DeviceError
            | RvError::DeviceRemoved
            | RvError::DeviceMemory
            | RvError::HostMemory
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::GeneralError
            | RvError::FunctionFailed
            | RvError::FunctionCanceled
            | RvError::CryptokiNotInitialized
    )
}

/// Return values of `C_Login` that mean the PIN itself is not accepted.
pub(crate) fn is_pin_rejection(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::PinIncorrect
            | RvError::PinInvalid
            | RvError::PinLenRange
            | RvError::PinExpired
            | RvError::PinLocked
            | RvError::UserPinNotInitialized
    )
}

/// Return values that mean the key or mechanism cannot be used this way
/// (the key's attributes or the token's policy forbid it).
fn is_key_misuse(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::KeyFunctionNotPermitted
            | RvError::KeyTypeInconsistent
            | RvError::KeySizeRange
            | RvError::MechanismInvalid
            | RvError::MechanismParamInvalid
    )
}

/// The C name of a PKCS#11 function: `C_Login`.
pub(crate) fn function_name(function: Function) -> &'static str {
    match function {
        Function::Initialize => "C_Initialize",
        Function::Finalize => "C_Finalize",
        Function::GetSlotList => "C_GetSlotList",
        Function::GetTokenInfo => "C_GetTokenInfo",
        Function::GetMechanismInfo => "C_GetMechanismInfo",
        Function::OpenSession => "C_OpenSession",
        Function::CloseSession => "C_CloseSession",
        Function::Login => "C_Login",
        Function::Logout => "C_Logout",
        Function::FindObjectsInit => "C_FindObjectsInit",
        Function::FindObjects => "C_FindObjects",
        Function::FindObjectsFinal => "C_FindObjectsFinal",
        Function::GetAttributeValue => "C_GetAttributeValue",
        Function::GenerateKey => "C_GenerateKey",
        Function::EncryptInit => "C_EncryptInit",
        Function::Encrypt => "C_Encrypt",
        Function::DecryptInit => "C_DecryptInit",
        Function::Decrypt => "C_Decrypt",
        Function::GenerateRandom => "C_GenerateRandom",
        _ => "PKCS#11 function",
    }
}

/// The name of a PKCS#11 return value: `CKR_PIN_INCORRECT`.
///
/// cryptoki's `RvError` variants are the `CKR_` names in CamelCase; this
/// turns them back (`PinIncorrect` → `CKR_PIN_INCORRECT`).
pub fn ckr_name(rv: RvError) -> String {
    match rv {
        RvError::VendorDefined(code) => format!("CKR_VENDOR_DEFINED ({code:#x})"),
        RvError::UnknownErrorCode(code) => format!("unknown CK_RV {code:#x}"),
        other => {
            let camel = format!("{other:?}");
            let mut name = String::with_capacity(4 + camel.len() * 2);
            name.push_str("CKR");
            for c in camel.chars() {
                if c.is_ascii_uppercase() {
                    name.push('_');
                }
                name.push(c.to_ascii_uppercase());
            }
            name
        }
    }
}
