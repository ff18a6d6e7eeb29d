//! # hsm-adapters
//!
//! Implementations of [`kms_core::RootKeyProvider`]: the master keys under
//! which keygate wraps its tenant keys (DESIGN §9).
//!
//! ## What it guarantees
//! - **The master key never leaves its provider.** Errors, logs, `Debug`
//!   output and [`describe`](kms_core::RootKeyProvider::describe) never
//!   contain key bytes, passphrases, PINs or AWS credentials; a provider is
//!   identified by a fingerprint (a one-way derivation of the key), a token
//!   and key label, or a KMS key ARN. A PKCS#11 master key created here is
//!   generated in the token, sensitive and never extractable, and a key
//!   that could leave its token is refused.
//! - **Every wrap is bound to its [`WrapContext`](kms_core::WrapContext).**
//!   A blob unwraps only under the exact context it was wrapped with (AEAD
//!   associated data, or the KMS encryption context); anything else fails
//!   with an opaque [`CannotUnwrap`](kms_core::RootKeyError::CannotUnwrap)
//!   that does not say why. Wrapping the same key twice gives different
//!   blobs.
//! - **Failures are typed and say whether to retry.** An unreachable or
//!   busy backend is `Unavailable` or `Throttled` (retryable), a wrong PIN,
//!   a missing or unsuitable key or missing permissions are `Misconfigured`;
//!   each provider's own error names the operation (the PKCS#11 function
//!   and `CKR_` value, the KMS operation and error code). A provider that
//!   comes back after an outage works again without being re-created.
//! - **Start-up checks are real.** Each provider's constructor validates
//!   its configuration with a clear message and performs a real wrap and
//!   unwrap; [`check_ready`] does the same for a running provider.
//! - **Key files are parsed strictly and totally.** Exact lengths, known
//!   versions, bounded KDF parameters; any input yields a value or an error,
//!   never a panic.
//! - **Insecure conveniences say so.** The local provider is for development
//!   and logs a warning every time it is created or opened; plain HTTP to a
//!   KMS endpoint is refused unless it is a loopback address (an emulator),
//!   and then logged.
//!
//! ## Providers
//! - `local` ([`LocalRootKey`], Unix only): a 256-bit root key in a file
//!   with mode `0600`, optionally sealed with a passphrase (Argon2id +
//!   AES-256-GCM-SIV). For `keygate up` and development only.
//! - `pkcs11` ([`Pkcs11RootKey`], Unix only): an AES-256 key in a PKCS#11
//!   token (any HSM; tested against SoftHSM2), `CKM_AES_GCM` with the wrap
//!   context as AAD, a pool of logged-in sessions with one retry on a fresh
//!   session. Blocking constructor.
//! - `aws-kms` ([`AwsKmsRootKey`]): an AWS KMS symmetric key, the wrap
//!   context as the KMS encryption context, the SDK's timeouts and retries,
//!   credentials from the SDK's default chain. Async constructor.
//!
//! All three pass the same contract suite (`tests/tests/root_providers.rs`).

#![forbid(unsafe_code)]

mod aws_kms;
#[cfg(all(unix, any(test, feature = "fuzzing")))]
pub mod fuzzing;
#[cfg(unix)]
mod local;
#[cfg(unix)]
mod pkcs11;
mod readiness;
mod secret_file;

pub use crate::aws_kms::{
    AwsKmsConfig, AwsKmsError, AwsKmsRootKey, PROVIDER_KIND as AWS_KMS_PROVIDER_KIND,
    endpoint_is_plain_http, endpoint_without_userinfo,
};
#[cfg(unix)]
pub use crate::local::{
    Argon2Params, FormatError, LocalKeyError, LocalRootKey, PROVIDER_KIND as LOCAL_PROVIDER_KIND,
};
#[cfg(unix)]
pub use crate::pkcs11::{
    MasterKeyInfo, PinSource, Pkcs11Config, Pkcs11Error, Pkcs11RootKey, ckr_name,
};
pub use crate::readiness::{check_ready, readiness_context};
pub use crate::secret_file::{SecretFile, read_secret_file};
