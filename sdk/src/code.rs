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
    /// The bearer token is missing or wrong (401).
    Unauthorized,
    /// The application's identity may not do this (403).
    Forbidden,
    /// No such endpoint (a sidecar older than this client).
    NotFound,
    /// The tenant is not known to the key service.
    UnknownTenant,
    /// The schema (or schema version) is not known.
    UnknownSchema,
    /// The path names no field of the schema.
    UnknownField,
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
    /// The sidecar cannot reach its key service (503); retried.
    KeyServiceUnavailable,
    /// The audit log cannot record the access, so the sidecar refuses it (503).
    AuditUnavailable,
    /// The sidecar timed out on its own upstream call (503); retried.
    Timeout,
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
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::UnknownTenant => "unknown_tenant",
            Self::UnknownSchema => "unknown_schema",
            Self::UnknownField => "unknown_field",
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
            "unauthorized" => Self::Unauthorized,
            "forbidden" => Self::Forbidden,
            "not_found" => Self::NotFound,
            "unknown_tenant" => Self::UnknownTenant,
            "unknown_schema" => Self::UnknownSchema,
            "unknown_field" => Self::UnknownField,
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

    const KNOWN: [&str; 22] = [
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
