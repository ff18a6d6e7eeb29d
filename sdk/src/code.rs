//! The sidecar's error codes and its error body
//! `{"error": {"code": "…", "message": "…"}}`.

use std::fmt;

use serde::Deserialize;

/// The stable `code` of an error answer from the sidecar.
///
/// Codes this version does not know arrive as [`ErrorCode::Other`] with the
/// code verbatim, so a newer sidecar never breaks an older client. A later
/// version of this crate may turn such a code into its own variant; match on
/// the variants you handle and keep a `_` arm.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request body is not JSON.
    MalformedJson,
    /// The request is JSON but not a valid request.
    InvalidRequest,
    /// The JSON nests deeper than the sidecar accepts.
    JsonTooDeep,
    /// The request body is larger than the sidecar accepts.
    BodyTooLarge,
    /// A batch holds more records than the sidecar accepts.
    TooManyRecords,
    /// The request body did not arrive within the sidecar's read timeout (408).
    BodyTimeout,
    /// The request was not sent as `application/json` (415).
    UnsupportedMediaType,
    /// The endpoint exists but not for this HTTP method (405).
    MethodNotAllowed,
    /// A record has more protected fields than a header can list.
    TooManyFields,
    /// The encrypted records would be larger than the sidecar answers (413);
    /// send fewer or smaller records per request.
    AnswerTooLarge,
    /// The bearer token is missing or wrong (401).
    Unauthorized,
    /// The application's identity may not do this (403).
    Forbidden,
    /// No such endpoint (a sidecar older than this client).
    NotFound,
    /// The tenant is not known to the key service.
    UnknownTenant,
    /// The key service refuses the tenant id as malformed.
    InvalidTenant,
    /// The tenant has no active key version, so nothing can be encrypted for it.
    NoActiveKey,
    /// The schema (or schema version) is not known.
    UnknownSchema,
    /// The path names no field of the schema.
    UnknownField,
    /// The field is neither deterministic nor blind-indexed, so it has no
    /// token to search by.
    NotSearchable,
    /// The record belongs to another tenant or schema than the request names.
    WrongContext,
    /// A record to encrypt is already encrypted.
    AlreadyEncrypted,
    /// A record to decrypt or rewrap is not an encrypted record.
    NotEncrypted,
    /// The record cannot be decrypted (tampered, wrong tenant, …); deliberately
    /// says no more.
    CannotDecrypt,
    /// A record does not have the shape its schema describes.
    ShapeMismatch,
    /// A record uses a member name keygate reserves.
    ReservedMember,
    /// The record's key version is disabled.
    KeyVersionDisabled,
    /// The record's key was destroyed (crypto-shredded); it can never be
    /// decrypted again.
    KeyDestroyed,
    /// The sidecar cannot reach its key service, or the key service cannot
    /// serve now (503, with its `Retry-After` when it sheds load); retried.
    KeyServiceUnavailable,
    /// The audit log cannot record the access, so the sidecar refuses it (503).
    AuditUnavailable,
    /// The sidecar dropped the request at its deadline (503, with
    /// `Retry-After`): its `[limits] request_timeout_ms`, 20 s by default,
    /// shorter than this client's attempt timeout. Nothing of the request
    /// was returned; retried, under the same request id.
    Timeout,
    /// Too many requests (429): from this connection, or from this sidecar's
    /// identity at the key service. Not retried by the client; wait
    /// [`Error::retry_after`](crate::Error::retry_after) before trying again.
    RateLimited,
    /// The key service refused the sidecar's call in a way the sidecar does
    /// not pass on, or answered unexpectedly (502).
    KeyServiceError,
    /// A key service batch was larger than it accepts.
    BatchTooLarge,
    /// The `x-request-id` header is not 32 hex digits or a UUID (400).
    /// This client always sends a valid one.
    InvalidRequestId,
    /// An internal error in the sidecar (500).
    Internal,
    /// A code this version of the client does not know, verbatim.
    Other(String),
}

/// The body of every error answer.
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    #[serde(default)]
    message: String,
}

impl ErrorCode {
    /// The code as the sidecar spells it (`"key_destroyed"`, …).
    pub fn as_str(&self) -> &str {
        match self {
            Self::MalformedJson => "malformed_json",
            Self::InvalidRequest => "invalid_request",
            Self::JsonTooDeep => "json_too_deep",
            Self::BodyTooLarge => "body_too_large",
            Self::TooManyRecords => "too_many_records",
            Self::BodyTimeout => "body_timeout",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::TooManyFields => "too_many_fields",
            Self::AnswerTooLarge => "answer_too_large",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::UnknownTenant => "unknown_tenant",
            Self::InvalidTenant => "invalid_tenant",
            Self::NoActiveKey => "no_active_key",
            Self::UnknownSchema => "unknown_schema",
            Self::UnknownField => "unknown_field",
            Self::NotSearchable => "not_searchable",
            Self::WrongContext => "wrong_context",
            Self::AlreadyEncrypted => "already_encrypted",
            Self::NotEncrypted => "not_encrypted",
            Self::CannotDecrypt => "cannot_decrypt",
            Self::ShapeMismatch => "shape_mismatch",
            Self::ReservedMember => "reserved_member",
            Self::KeyVersionDisabled => "key_version_disabled",
            Self::KeyDestroyed => "key_destroyed",
            Self::KeyServiceUnavailable => "key_service_unavailable",
            Self::AuditUnavailable => "audit_unavailable",
            Self::Timeout => "timeout",
            Self::RateLimited => "rate_limited",
            Self::KeyServiceError => "key_service_error",
            Self::BatchTooLarge => "batch_too_large",
            Self::InvalidRequestId => "invalid_request_id",
            Self::Internal => "internal",
            Self::Other(code) => code,
        }
    }

    /// Whether the sidecar reports a passing upstream condition, so the same
    /// request may succeed a moment later.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, Self::KeyServiceUnavailable | Self::Timeout)
    }
}

impl From<&str> for ErrorCode {
    fn from(code: &str) -> Self {
        match code {
            "malformed_json" => Self::MalformedJson,
            "invalid_request" => Self::InvalidRequest,
            "json_too_deep" => Self::JsonTooDeep,
            "body_too_large" => Self::BodyTooLarge,
            "too_many_records" => Self::TooManyRecords,
            "body_timeout" => Self::BodyTimeout,
            "unsupported_media_type" => Self::UnsupportedMediaType,
            "method_not_allowed" => Self::MethodNotAllowed,
            "too_many_fields" => Self::TooManyFields,
            "answer_too_large" => Self::AnswerTooLarge,
            "unauthorized" => Self::Unauthorized,
            "forbidden" => Self::Forbidden,
            "not_found" => Self::NotFound,
            "unknown_tenant" => Self::UnknownTenant,
            "invalid_tenant" => Self::InvalidTenant,
            "no_active_key" => Self::NoActiveKey,
            "unknown_schema" => Self::UnknownSchema,
            "unknown_field" => Self::UnknownField,
            "not_searchable" => Self::NotSearchable,
            "wrong_context" => Self::WrongContext,
            "already_encrypted" => Self::AlreadyEncrypted,
            "not_encrypted" => Self::NotEncrypted,
            "cannot_decrypt" => Self::CannotDecrypt,
            "shape_mismatch" => Self::ShapeMismatch,
            "reserved_member" => Self::ReservedMember,
            "key_version_disabled" => Self::KeyVersionDisabled,
            "key_destroyed" => Self::KeyDestroyed,
            "key_service_unavailable" => Self::KeyServiceUnavailable,
            "audit_unavailable" => Self::AuditUnavailable,
            "timeout" => Self::Timeout,
            "rate_limited" => Self::RateLimited,
            "key_service_error" => Self::KeyServiceError,
            "batch_too_large" => Self::BatchTooLarge,
            "invalid_request_id" => Self::InvalidRequestId,
            "internal" => Self::Internal,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses an error answer's body; `None` if it is not the sidecar's error shape.
pub(crate) fn parse_error_body(body: &[u8]) -> Option<(ErrorCode, String)> {
    let body: ErrorBody = serde_json::from_slice(body).ok()?;
    Some((ErrorCode::from(body.error.code.as_str()), body.error.message))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: [&str; 35] = [
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
        "key_service_unavailable",
        "audit_unavailable",
        "timeout",
        "internal",
        "body_timeout",
        "unsupported_media_type",
        "method_not_allowed",
        "too_many_fields",
        "answer_too_large",
        "invalid_tenant",
        "no_active_key",
        "not_searchable",
        "wrong_context",
        "rate_limited",
        "key_service_error",
        "batch_too_large",
        "invalid_request_id",
    ];

    #[test]
    fn every_documented_code_has_its_own_variant_and_round_trips() {
        for code in KNOWN {
            let parsed = ErrorCode::from(code);
            assert!(!matches!(parsed, ErrorCode::Other(_)), "{code} fell through to Other");
            assert_eq!(parsed.as_str(), code);
            assert_eq!(parsed.to_string(), code);
        }
    }

    /// The codes the sidecar emits beyond the original set (grep the
    /// gateway's `ApiError::new` and `ks_error` for their sources): each has
    /// its own variant rather than arriving as `Other`.
    #[test]
    fn codes_the_sidecar_emits_parse_to_their_variants() {
        for (code, expected) in [
            ("rate_limited", ErrorCode::RateLimited),
            ("answer_too_large", ErrorCode::AnswerTooLarge),
            ("key_service_error", ErrorCode::KeyServiceError),
            ("no_active_key", ErrorCode::NoActiveKey),
            ("batch_too_large", ErrorCode::BatchTooLarge),
            ("invalid_tenant", ErrorCode::InvalidTenant),
            ("too_many_fields", ErrorCode::TooManyFields),
            ("not_searchable", ErrorCode::NotSearchable),
            ("wrong_context", ErrorCode::WrongContext),
            ("unsupported_media_type", ErrorCode::UnsupportedMediaType),
            ("body_timeout", ErrorCode::BodyTimeout),
            ("method_not_allowed", ErrorCode::MethodNotAllowed),
            ("timeout", ErrorCode::Timeout),
            ("invalid_request_id", ErrorCode::InvalidRequestId),
        ] {
            assert_eq!(ErrorCode::from(code), expected, "{code}");
            assert_eq!(expected.as_str(), code);
        }
    }

    #[test]
    fn error_body_parses_into_the_typed_code() {
        let body = br#"{"error":{"code":"key_destroyed","message":"the key was destroyed"}}"#;
        let (code, message) = parse_error_body(body).unwrap();
        assert_eq!(code, ErrorCode::KeyDestroyed);
        assert_eq!(message, "the key was destroyed");
    }

    #[test]
    fn unknown_codes_are_kept_verbatim_as_other() {
        let body = br#"{"error":{"code":"quota_exceeded","message":"slow down","hint":1}}"#;
        let (code, _) = parse_error_body(body).unwrap();
        assert_eq!(code, ErrorCode::Other("quota_exceeded".to_owned()));
        assert_eq!(code.as_str(), "quota_exceeded");
    }

    #[test]
    fn a_missing_message_is_empty_and_foreign_bodies_are_not_error_bodies() {
        let (code, message) = parse_error_body(br#"{"error":{"code":"internal"}}"#).unwrap();
        assert_eq!((code, message.as_str()), (ErrorCode::Internal, ""));
        assert!(parse_error_body(b"Bad Gateway").is_none());
        assert!(parse_error_body(br#"{"error":"internal"}"#).is_none());
        assert!(parse_error_body(br#"{"status":"ok"}"#).is_none());
    }
}
