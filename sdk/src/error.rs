//! The one error type of the client, and which errors are retried.

use std::time::Duration;

use crate::code::ErrorCode;
use crate::operation::Operation;
use crate::report::FieldReport;

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
    /// arrived (reset, closed by the peer), and not while a success answer
    /// was read ([`Error::Interrupted`]). Retried: see [`Client`](crate::Client)
    /// for why that is safe for every call.
    #[error("{op}: the connection to the keygate sidecar failed before a complete answer")]
    Transport {
        /// The call.
        op: Operation,
        /// The transport's error.
        #[source]
        source: BoxError,
    },

    /// The sidecar answered with success (`status`), and the connection
    /// failed while the answer was read. Not retried: the sidecar did the
    /// work, so a retry would be a second access in the audit log (and a
    /// second set of record keys issued, for an encrypt). The result is
    /// lost: call again if it is still needed.
    #[error(
        "{op}: the keygate sidecar answered {status}, and the connection failed while the \
         answer was read"
    )]
    Interrupted {
        /// The call.
        op: Operation,
        /// The success status the sidecar answered.
        status: u16,
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
        /// again (its `Retry-After`, sent with 429 `rate_limited`, with 503
        /// `timeout`, and with 503 `key_service_unavailable` when the key
        /// service sheds load).
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

    /// [`Decrypted::into_record`](crate::Decrypted::into_record) on a record
    /// the policy did not fully reveal. Masked fields hold their mask and
    /// withheld ones are missing, so encrypting it again would store the
    /// mask as the value and lose the withheld fields. Use
    /// [`Decrypted::into_partial_record`](crate::Decrypted::into_partial_record)
    /// to read such a record, never to write it back.
    #[error(
        "{op}: the decrypted record is not fully revealed ({}), so it must not be written back; \
         read it with Decrypted::into_partial_record",
        describe_fields(not_revealed)
    )]
    PartialRecord {
        /// The call.
        op: Operation,
        /// The protected fields not revealed: pointer, class and outcome,
        /// never a value.
        not_revealed: Vec<FieldReport>,
    },
}

impl Error {
    /// Whether the client retries this error (when it has retries left):
    /// a connection that could not be made or failed before a complete
    /// answer, and the sidecar's transient 503s, `key_service_unavailable`
    /// and `timeout` (the sidecar dropped the request at its deadline),
    /// after their `Retry-After` if they sent one. Never any other answer
    /// from the sidecar (in particular no 4xx), never a client-side
    /// timeout, never a decoding failure.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Transport { .. } => true,
            Self::Api { status, code, .. } => *status == 503 && code.is_transient(),
            Self::Config { .. }
            | Self::Interrupted { .. }
            | Self::Timeout { .. }
            | Self::UnexpectedStatus { .. }
            | Self::Encode { .. }
            | Self::Decode { .. }
            | Self::Record { .. }
            | Self::PartialRecord { .. } => false,
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
    /// call, and this says for how long. A retryable 503 is retried no
    /// sooner than this, and returned with it once the retries are spent or
    /// when the wait would pass the call's deadline (without one: when it
    /// is longer than the attempt timeout).
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
            | Self::Interrupted { op, .. }
            | Self::Timeout { op, .. }
            | Self::Api { op, .. }
            | Self::UnexpectedStatus { op, .. }
            | Self::Encode { op, .. }
            | Self::Decode { op, .. }
            | Self::Record { op, .. }
            | Self::PartialRecord { op, .. } => Some(*op),
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

/// `/ssn masked, /diagnosis withheld`: the pointers and outcomes of `fields`.
fn describe_fields(fields: &[FieldReport]) -> String {
    let described: Vec<String> =
        fields.iter().map(|f| format!("{} {}", f.pointer, f.outcome)).collect();
    described.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{Answer, success_body};

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
        // The sidecar's answer at its request deadline.
        assert!(api(503, "timeout").is_retryable());
        assert!(!api(503, "audit_unavailable").is_retryable());
        assert!(!api(503, "something_new").is_retryable());
        assert!(!api(500, "internal").is_retryable());
        assert!(!api(502, "key_service_error").is_retryable());
        // The code alone is not enough: it must come with 503.
        assert!(!api(500, "key_service_unavailable").is_retryable());
    }

    /// Every 4xx answer the sidecar sends, as it sends it (status and code
    /// from the gateway's `ApiError`s: `error.rs`, `sidecar/`, `abuse/`, and
    /// the key service codes `sidecar/state.rs` passes on): each is typed
    /// and final. None may be retried, whatever its code says.
    #[test]
    fn no_4xx_the_sidecar_sends_is_retried() {
        for (status, code) in [
            (400, "malformed_json"),
            (400, "json_too_deep"),
            (400, "invalid_request"),
            (400, "too_many_records"),
            (400, "too_many_fields"),
            (400, "already_encrypted"),
            (400, "not_encrypted"),
            (400, "shape_mismatch"),
            (400, "reserved_member"),
            (400, "not_searchable"),
            (400, "wrong_context"),
            (400, "invalid_tenant"),
            (400, "batch_too_large"),
            (400, "invalid_request_id"),
            (401, "unauthorized"),
            (403, "forbidden"),
            (404, "not_found"),
            (404, "unknown_tenant"),
            (404, "unknown_schema"),
            (404, "unknown_field"),
            (405, "method_not_allowed"),
            (408, "body_timeout"),
            (409, "no_active_key"),
            (409, "key_version_disabled"),
            (410, "key_destroyed"),
            (413, "body_too_large"),
            (413, "answer_too_large"),
            (415, "unsupported_media_type"),
            (422, "cannot_decrypt"),
            (422, "invalid_request"),
            (429, "rate_limited"),
        ] {
            // The answer as the sidecar sends it, read as the client reads it.
            let body = format!(r#"{{"error":{{"code":"{code}","message":"m"}}}}"#).into_bytes();
            let answer = Answer { status, retry_after: Some(Duration::from_secs(1)), body };
            let err = success_body(OP, answer).unwrap_err();
            assert!(matches!(err, Error::Api { .. }), "{status} {code}: {err:?}");
            assert!(!matches!(err.code(), Some(ErrorCode::Other(_))), "{code} is not typed");
            assert!(!err.is_retryable(), "{status} {code}");
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
