//! Errors of the AWS KMS provider: SDK errors sorted into what the caller
//! can do about them, and how they map to [`RootKeyError`].

use std::error::Error as StdError;

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use kms_core::RootKeyError;
use kms_core::crypto::rng::RandomError;

use super::PROVIDER_KIND;

/// Error codes that mean "slow down" (the SDK already retried them).
const THROTTLING_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "LimitExceededException",
];
/// Error codes that mean "KMS cannot serve this now" (retry later).
const UNAVAILABLE_CODES: &[&str] = &[
    "KMSInternalException",
    "KMSInternal",
    "DependencyTimeoutException",
    "KeyUnavailableException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "InternalFailure",
];
/// Error codes that mean the key cannot be used as configured.
const KEY_NOT_USABLE_CODES: &[&str] =
    &["DisabledException", "KMSInvalidStateException", "InvalidKeyUsageException"];

/// The AWS KMS provider failed.
///
/// Messages carry the operation, KMS's error code and message, never
/// credentials or key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AwsKmsError {
    /// A configuration value is unusable.
    #[error("invalid AWS KMS provider configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// KMS could not be reached or did not answer in time (after the
    /// SDK's retries).
    #[error("AWS KMS {operation} failed: endpoint {endpoint} unreachable: {detail}")]
    Unreachable {
        /// The KMS operation (`Encrypt`, `Decrypt`).
        operation: &'static str,
        /// The endpoint (configured URL or the region's default).
        endpoint: String,
        /// The transport's error.
        detail: String,
    },
    /// KMS is throttling requests (after the SDK's retries).
    #[error("AWS KMS {operation} was throttled ({code})")]
    Throttled {
        /// The KMS operation.
        operation: &'static str,
        /// KMS's error code.
        code: String,
    },
    /// KMS answered that it cannot serve the request now.
    #[error("AWS KMS {operation} failed: KMS is unavailable ({code}: {message})")]
    ServiceUnavailable {
        /// The KMS operation.
        operation: &'static str,
        /// KMS's error code, or the HTTP status.
        code: String,
        /// KMS's message.
        message: String,
    },
    /// The key does not exist (in this account and region).
    #[error("AWS KMS key {key_id} not found: {message}")]
    KeyNotFound {
        /// The key as configured or resolved.
        key_id: String,
        /// KMS's message.
        message: String,
    },
    /// The credentials may not use the key for this operation.
    #[error(
        "AWS KMS {operation} on key {key_id} was denied: {message} (grant kms:Encrypt and \
         kms:Decrypt on the key to this service's role)"
    )]
    AccessDenied {
        /// The KMS operation.
        operation: &'static str,
        /// The key.
        key_id: String,
        /// KMS's message.
        message: String,
    },
    /// The key is disabled, pending deletion or import, or not a symmetric
    /// encryption key.
    #[error("AWS KMS key {key_id} cannot be used for {operation} ({code}: {message})")]
    KeyNotUsable {
        /// The KMS operation.
        operation: &'static str,
        /// The key.
        key_id: String,
        /// KMS's error code.
        code: String,
        /// KMS's message.
        message: String,
    },
    /// No usable credentials in the SDK's chain.
    #[error("no usable AWS credentials for KMS: {detail}")]
    Credentials {
        /// The credential provider's error.
        detail: String,
        /// Whether retrying later may help (a credential endpoint timed
        /// out) rather than needing a fix (nothing configured).
        retryable: bool,
    },
    /// KMS answered with another error.
    #[error("AWS KMS {operation} failed: {code}: {message}")]
    Service {
        /// The KMS operation.
        operation: &'static str,
        /// KMS's error code, or the HTTP status.
        code: String,
        /// KMS's message.
        message: String,
    },
    /// The blob does not unwrap under this key and context.
    #[error("the AWS KMS root key cannot unwrap this key")]
    CannotUnwrap,
    /// KMS's answer lacks a field it always sends.
    #[error("AWS KMS {operation} returned no {field}")]
    MalformedResponse {
        /// The KMS operation.
        operation: &'static str,
        /// The missing field.
        field: &'static str,
    },
    /// The wrap/unwrap round trip of the readiness check returned another key.
    #[error("AWS KMS readiness check failed: the unwrapped key differs from the wrapped one")]
    RoundTripMismatch,
    /// The OS random number generator failed.
    #[error(transparent)]
    Random(#[from] RandomError),
}

impl AwsKmsError {
    /// Sorts an SDK error of `operation` on `key_id` through `endpoint`.
    pub(super) fn from_sdk<E>(
        operation: &'static str,
        key_id: &str,
        endpoint: &str,
        error: SdkError<E>,
    ) -> Self
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        if let Some(credentials) = find_in_chain::<CredentialsError>(&error) {
            let retryable = matches!(
                credentials,
                CredentialsError::ProviderTimedOut(_) | CredentialsError::ProviderError(_)
            );
            return Self::Credentials {
                detail: DisplayErrorContext(credentials).to_string(),
                retryable,
            };
        }
        let unreachable =
            |detail: String| Self::Unreachable { operation, endpoint: endpoint.to_owned(), detail };
        match &error {
            SdkError::ServiceError(service) => {
                let status = service.raw().status();
                let code =
                    service.err().code().map_or_else(|| status.as_u16().to_string(), str::to_owned);
                let message = service.err().message().unwrap_or_default().to_owned();
                Self::from_service(operation, key_id, code, message, status.is_server_error())
            }
            SdkError::ResponseError(response) if response.raw().status().is_server_error() => {
                Self::ServiceUnavailable {
                    operation,
                    code: response.raw().status().as_u16().to_string(),
                    message: DisplayErrorContext(&error).to_string(),
                }
            }
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => {
                unreachable(DisplayErrorContext(&error).to_string())
            }
            _ => Self::Service {
                operation,
                code: "client".to_owned(),
                message: DisplayErrorContext(&error).to_string(),
            },
        }
    }

    /// Sorts a KMS error answer by its code.
    pub(super) fn from_service(
        operation: &'static str,
        key_id: &str,
        code: String,
        message: String,
        server_error: bool,
    ) -> Self {
        let code_is = |codes: &[&str]| codes.contains(&code.as_str());
        if code_is(THROTTLING_CODES) {
            Self::Throttled { operation, code }
        } else if code_is(UNAVAILABLE_CODES) || (server_error && !code_is(KEY_NOT_USABLE_CODES)) {
            Self::ServiceUnavailable { operation, code, message }
        } else if code == "NotFoundException" {
            Self::KeyNotFound { key_id: key_id.to_owned(), message }
        } else if code == "AccessDeniedException" {
            Self::AccessDenied { operation, key_id: key_id.to_owned(), message }
        } else if code_is(KEY_NOT_USABLE_CODES) {
            Self::KeyNotUsable { operation, key_id: key_id.to_owned(), code, message }
        } else if operation == "Decrypt"
            && matches!(code.as_str(), "InvalidCiphertextException" | "IncorrectKeyException")
        {
            Self::CannotUnwrap
        } else {
            Self::Service { operation, code, message }
        }
    }

    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Throttled { .. } | Self::ServiceUnavailable { .. } => {
                true
            }
            Self::Credentials { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

impl From<AwsKmsError> for RootKeyError {
    /// Unreachable and unavailable are `Unavailable`, throttling is
    /// `Throttled` (both retryable); key, permission, credential and
    /// configuration problems are `Misconfigured`; a blob that does not
    /// decrypt is `CannotUnwrap`; anything else is `Backend`.
    fn from(error: AwsKmsError) -> Self {
        let detail = error.to_string();
        match error {
            AwsKmsError::CannotUnwrap => RootKeyError::CannotUnwrap,
            AwsKmsError::Throttled { .. } => RootKeyError::Throttled { provider: PROVIDER_KIND },
            AwsKmsError::Unreachable { .. }
            | AwsKmsError::ServiceUnavailable { .. }
            | AwsKmsError::Credentials { retryable: true, .. } => {
                RootKeyError::Unavailable { provider: PROVIDER_KIND, detail }
            }
            AwsKmsError::InvalidConfig { .. }
            | AwsKmsError::KeyNotFound { .. }
            | AwsKmsError::AccessDenied { .. }
            | AwsKmsError::KeyNotUsable { .. }
            | AwsKmsError::Credentials { retryable: false, .. } => {
                RootKeyError::Misconfigured { provider: PROVIDER_KIND, detail }
            }
            AwsKmsError::Service { operation, .. }
            | AwsKmsError::MalformedResponse { operation, .. } => {
                RootKeyError::Backend { provider: PROVIDER_KIND, operation, detail }
            }
            AwsKmsError::RoundTripMismatch | AwsKmsError::Random(_) => {
                RootKeyError::Backend { provider: PROVIDER_KIND, operation: "wrap/unwrap", detail }
            }
        }
    }
}

/// The first error of type `T` in `error`'s source chain.
fn find_in_chain<'a, T: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}
