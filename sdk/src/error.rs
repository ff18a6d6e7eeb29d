//! The one error type of the client, and which errors are retried.

use std::time::Duration;

use crate::code::ErrorCode;
use crate::operation::Operation;

/// A boxed error source (the transport's own error, kept for `source()`).
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong talking to the sidecar.
///
/// No variant ever contains the bearer token or a record value: messages
/// from serde are redacted before they are kept (they would otherwise quote
/// the offending plaintext), and the sidecar's own error messages name
/// fields, never their contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The builder's settings are invalid, or the HTTP client could not be
    /// set up (for example an unreadable CA or token file).
    #[error("invalid keygate client configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },

    /// No connection to the sidecar could be made (socket missing, connection
    /// refused, connect timeout). Nothing reached the sidecar. Retried.
    #[error("{op}: cannot connect to the keygate sidecar at {endpoint}")]
    Connect {
        /// The call.
        op: Operation,
        /// The sidecar's address (`unix:/path` or a URL).
        endpoint: String,
        /// The transport's error.
        #[source]
        source: BoxError,
    },

    /// The connection failed after it was made, before a complete answer
    /// arrived (reset, closed by the peer). Retried: see [`Client`](crate::Client)
    /// for why that is safe for every call.
    #[error("{op}: the connection to the keygate sidecar failed before a complete answer")]
    Transport {
        /// The call.
        op: Operation,
        /// The transport's error.
        #[source]
        source: BoxError,
    },

    /// No complete answer within the per-attempt timeout. Not retried: the
    /// sidecar may still be working on it, and a retry would multiply the
    /// time the caller asked to wait.
    #[error("{op}: no answer from the keygate sidecar within {timeout:?}")]
    Timeout {
        /// The call.
        op: Operation,
        /// The timeout that expired.
        timeout: Duration,
        /// The transport's error.
        #[source]
        source: BoxError,
    },

    /// The sidecar answered with an error code.
    #[error("{op}: keygate sidecar refused the request: {code} (HTTP {status}): {message}")]
    Api {
        /// The call.
        op: Operation,
        /// The HTTP status.
        status: u16,
        /// The stable error code.
        code: ErrorCode,
        /// The sidecar's human-readable message.
        message: String,
        /// How long the sidecar asked the caller to wait before trying
        /// again (its `Retry-After`, sent with 429 `rate_limited`).
        retry_after: Option<Duration>,
    },

    /// The sidecar answered with an error status but without its error body
    /// (something else answered, or a bug).
    #[error("{op}: unexpected HTTP {status} from the keygate sidecar")]
    UnexpectedStatus {
        /// The call.
        op: Operation,
        /// The HTTP status.
        status: u16,
    },

    /// The request could not be encoded (a record's `Serialize` failed or
    /// produced something that is not JSON, such as a map with non-string keys).
    #[error("{op}: cannot encode the request: {detail}")]
    Encode {
        /// The call.
        op: Operation,
        /// What failed, redacted.
        detail: String,
    },

    /// A success answer did not have the documented shape (for example, a
    /// batch answer with a different number of records than were sent).
    #[error("{op}: cannot decode the keygate sidecar's answer: {detail}")]
    Decode {
        /// The call.
        op: Operation,
        /// What failed, redacted.
        detail: String,
    },

    /// A decrypted record does not fit the type asked for. Fields the caller
    /// may not see are withheld (absent) and masked fields are strings, so
    /// such fields should be `Option`s or `#[serde(default)]` (see
    /// [`Decrypted`](crate::Decrypted)).
    #[error("{op}: decrypted record{} does not match the requested type: {detail}", index.map(|i| format!(" {i}")).unwrap_or_default())]
    Record {
        /// The call.
        op: Operation,
        /// The record's position in the batch (`None` for a single record).
        index: Option<usize>,
        /// What did not fit, redacted (field names only, never values).
        detail: String,
    },
}

impl Error {
    /// Whether the client retries this error (when it has retries left):
    /// a connection that could not be made or failed before a complete
    /// answer, and the sidecar's transient 503 codes `key_service_unavailable`
    /// and `timeout`. Never any other answer from the sidecar (in particular
    /// no 4xx), never a client-side timeout, never a decoding failure.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Transport { .. } => true,
            Self::Api { status, code, .. } => *status == 503 && code.is_transient(),
            Self::Config { .. }
            | Self::Timeout { .. }
            | Self::UnexpectedStatus { .. }
            | Self::Encode { .. }
            | Self::Decode { .. }
            | Self::Record { .. } => false,
        }
    }

    /// The sidecar's error code, if the sidecar answered with one.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            Self::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// How long to wait before trying again, if the sidecar said (its
    /// `Retry-After` header, in whole seconds, at most an hour). The client
    /// does not retry a 429 `rate_limited` itself: waiting is the caller's
    /// call, and this says for how long.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status, if the sidecar answered with an error status.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } | Self::UnexpectedStatus { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The call that failed (`None` for configuration errors).
    pub fn operation(&self) -> Option<Operation> {
        match self {
            Self::Config { .. } => None,
            Self::Connect { op, .. }
            | Self::Transport { op, .. }
            | Self::Timeout { op, .. }
            | Self::Api { op, .. }
            | Self::UnexpectedStatus { op, .. }
            | Self::Encode { op, .. }
            | Self::Decode { op, .. }
            | Self::Record { op, .. } => Some(*op),
        }
    }

    pub(crate) fn config(reason: impl Into<String>) -> Self {
        Self::Config { reason: reason.into(), source: None }
    }

    pub(crate) fn config_with(
        reason: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Config { reason: reason.into(), source: Some(Box::new(source)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OP: Operation = Operation::Decrypt;

    fn io(kind: std::io::ErrorKind) -> BoxError {
        Box::new(std::io::Error::from(kind))
    }

    fn api(status: u16, code: &str) -> Error {
        Error::Api {
            op: OP,
            status,
            code: ErrorCode::from(code),
            message: String::new(),
            retry_after: None,
        }
    }

    #[test]
    fn connection_level_failures_are_retried() {
        let refused = Error::Connect {
            op: OP,
            endpoint: "unix:/run/keygate/sidecar.sock".into(),
            source: io(std::io::ErrorKind::ConnectionRefused),
        };
        let reset = Error::Transport { op: OP, source: io(std::io::ErrorKind::ConnectionReset) };
        assert!(refused.is_retryable());
        assert!(reset.is_retryable());
    }

    #[test]
    fn only_the_transient_503_codes_are_retried() {
        assert!(api(503, "key_service_unavailable").is_retryable());
        assert!(api(503, "timeout").is_retryable());
        assert!(!api(503, "audit_unavailable").is_retryable());
        assert!(!api(503, "something_new").is_retryable());
        assert!(!api(500, "internal").is_retryable());
        // The code alone is not enough: it must come with 503.
        assert!(!api(400, "timeout").is_retryable());
    }

    #[test]
    fn no_4xx_is_retried() {
        for code in [
            "rate_limited",
            "invalid_tenant",
            "no_active_key",
            "batch_too_large",
            "too_many_fields",
            "not_searchable",
            "wrong_context",
            "unsupported_media_type",
            "body_timeout",
            "method_not_allowed",
            "answer_too_large",
            "malformed_json",
            "invalid_request",
            "json_too_deep",
            "body_too_large",
            "too_many_records",
            "unauthorized",
            "forbidden",
            "not_found",
            "unknown_tenant",
            "unknown_schema",
            "unknown_field",
            "already_encrypted",
            "not_encrypted",
            "cannot_decrypt",
            "shape_mismatch",
            "reserved_member",
            "key_version_disabled",
            "key_destroyed",
        ] {
            for status in [400, 401, 403, 404, 405, 408, 409, 410, 413, 415, 422, 429] {
                assert!(!api(status, code).is_retryable(), "{status} {code}");
            }
        }
    }

    #[test]
    fn timeouts_decoding_and_local_errors_are_not_retried() {
        let timeout = Error::Timeout {
            op: OP,
            timeout: Duration::from_secs(10),
            source: io(std::io::ErrorKind::TimedOut),
        };
        assert!(!timeout.is_retryable());
        assert!(!Error::UnexpectedStatus { op: OP, status: 503 }.is_retryable());
        assert!(!Error::Decode { op: OP, detail: String::new() }.is_retryable());
        assert!(!Error::Encode { op: OP, detail: String::new() }.is_retryable());
        assert!(!Error::Record { op: OP, index: Some(1), detail: String::new() }.is_retryable());
        assert!(!Error::config("x").is_retryable());
    }

    #[test]
    fn accessors_and_messages() {
        let e = api(403, "forbidden");
        assert_eq!(e.code(), Some(&ErrorCode::Forbidden));
        assert_eq!(e.status(), Some(403));
        assert_eq!(e.operation(), Some(Operation::Decrypt));
        assert_eq!(
            e.to_string(),
            "decrypt: keygate sidecar refused the request: forbidden (HTTP 403): "
        );
        let e = Error::Record { op: OP, index: Some(3), detail: "missing field `ssn`".into() };
        assert_eq!(
            e.to_string(),
            "decrypt: decrypted record 3 does not match the requested type: missing field `ssn`"
        );
        let e = Error::Record { op: OP, index: None, detail: "d".into() };
        assert_eq!(e.to_string(), "decrypt: decrypted record does not match the requested type: d");
        assert_eq!(Error::config("x").operation(), None);
    }
}
