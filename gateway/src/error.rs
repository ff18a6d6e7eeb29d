//! The one place where errors become HTTP responses.
//!
//! Every error kind maps to exactly one status and one stable `code`; the
//! body is `{"error":{"code":"…","message":"…"}}`. Messages say what the
//! client can act on and never carry key material, plaintext, PINs or
//! backend detail; server-side failures are logged (without secrets) and
//! answered with a generic message.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kms_core::HierarchyError;
use kms_core::store::StoreError;
use serde_json::json;

/// An error answered to an API client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// `Retry-After` in seconds, for an answer that asks the client to
    /// come back later (429, 503).
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error with an explicit status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }

    /// The same error, telling the client when to retry (`Retry-After`).
    pub fn with_retry_after(mut self, seconds: Option<u64>) -> Self {
        self.retry_after = seconds;
        self
    }

    /// 400 with a specific code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 403: the caller's identity has no grant for this.
    pub fn forbidden(what: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", what)
    }

    /// 404 for an unknown route or resource.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 503: a dependency cannot serve; nothing was done.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// The stable error code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The same error with `context` said first (what was done before it).
    pub fn after(mut self, context: &str) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The `Retry-After` seconds sent with it, if any.
    pub fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<HierarchyError> for ApiError {
    fn from(e: HierarchyError) -> Self {
        match e {
            HierarchyError::UnknownTenant(t) => {
                Self::not_found("unknown_tenant", format!("no tenant {t}"))
            }
            HierarchyError::TenantExists(t) => Self::new(
                StatusCode::CONFLICT,
                "tenant_exists",
                format!("tenant {t} already exists"),
            ),
            HierarchyError::UnknownVersion { tenant, version } => Self::not_found(
                "unknown_version",
                format!("tenant {tenant} has no KEK version {version}"),
            ),
            HierarchyError::NoActiveKey(t) => Self::new(
                StatusCode::CONFLICT,
                "no_active_key",
                format!("tenant {t} has no active key"),
            ),
            HierarchyError::KeyDestroyed(t) => Self::new(
                StatusCode::GONE,
                "key_destroyed",
                format!("the keys of tenant {t} were destroyed"),
            ),
            HierarchyError::BatchSize { requested, max } => Self::bad_request(
                "batch_too_large",
                format!("a batch must hold 1 to {max} items, not {requested}"),
            ),
            HierarchyError::InvalidTransition(t) => {
                Self::new(StatusCode::CONFLICT, "invalid_transition", t.to_string())
            }
            HierarchyError::Store(e) => store_error(&e),
            HierarchyError::Root(e) => {
                tracing::error!(error = %e, "root key provider failure");
                Self::unavailable("root_key_unavailable", "the root key provider is unavailable")
            }
            HierarchyError::ForeignMaster(id) => {
                tracing::error!(master = id, "key wrapped under a master key this instance lacks");
                Self::unavailable(
                    "root_key_unavailable",
                    "the key is wrapped under a master key this service is not configured with",
                )
            }
            other => internal(&other),
        }
    }
}

/// The code of a change the keystore did not confirm, which may have been
/// made (its audit event's failure says `outcome_unknown`).
pub const OUTCOME_UNKNOWN: &str = "outcome_unknown";

/// The code of a write refused because the active master changed under it.
pub const MASTER_CHANGED: &str = "master_changed";

/// Maps a keystore failure.
pub fn store_error(e: &StoreError) -> ApiError {
    match e {
        StoreError::Unavailable(_) | StoreError::VersionConflict(_) => {
            tracing::error!(error = %e, "keystore failure");
            ApiError::unavailable("store_unavailable", "the keystore is unavailable")
        }
        StoreError::OutcomeUnknown(_) => {
            tracing::error!(error = %e, "keystore failure; the change may have been made");
            ApiError::unavailable(
                OUTCOME_UNKNOWN,
                "the keystore did not confirm the change, which may have been made: \
                 check its state before repeating it",
            )
        }
        StoreError::UnknownTenant(t) => {
            ApiError::not_found("unknown_tenant", format!("no tenant {t}"))
        }
        StoreError::UnknownVersion { tenant, version } => ApiError::not_found(
            "unknown_version",
            format!("tenant {tenant} has no KEK version {version}"),
        ),
        StoreError::InvalidTransition(t) => {
            ApiError::new(StatusCode::CONFLICT, "invalid_transition", t.to_string())
        }
        StoreError::MasterNotActive(_) => ApiError::new(
            StatusCode::CONFLICT,
            MASTER_CHANGED,
            "the active master key changed while this was prepared; try again",
        ),
        StoreError::Shredded(t) => ApiError::new(
            StatusCode::GONE,
            "key_destroyed",
            format!("the keys of tenant {t} were destroyed"),
        ),
        StoreError::UnknownApproval(_) => {
            ApiError::not_found("unknown_approval", "no such request for approval")
        }
        StoreError::ApprovalNotPending { id, state } => ApiError::new(
            StatusCode::CONFLICT,
            "approval_not_pending",
            format!("request {id} is {state}, not pending"),
        ),
        StoreError::SelfApproval => ApiError::new(
            StatusCode::FORBIDDEN,
            "self_approval",
            "a request must be approved by a security officer other than its requester",
        ),
        StoreError::ApprovalExpired { id } => ApiError::new(
            StatusCode::CONFLICT,
            "approval_expired",
            format!(
                "request {id} waited longer than lifecycle.approval_ttl_secs to be approved; \
                 reject it and file a new one if it still holds"
            ),
        ),
        StoreError::ApprovalNotDue { id, execute_after } => ApiError::new(
            StatusCode::CONFLICT,
            "approval_not_due",
            format!("request {id} may not run before {execute_after} (Unix seconds)"),
        ),
        other => internal(other),
    }
}

/// A failure that is our fault: logged in full, answered generically.
pub fn internal(e: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "internal error");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
}

impl From<kms_core::record::RecordError> for ApiError {
    fn from(e: kms_core::record::RecordError) -> Self {
        use kms_core::record::RecordError as R;
        match e {
            R::NotAnObject => {
                Self::bad_request("invalid_request", "a record must be a JSON object")
            }
            R::Unreadable(detail) => Self::bad_request(
                "invalid_request",
                format!("a record has a value that cannot be read ({detail})"),
            ),
            R::AlreadyEncrypted => Self::bad_request(
                "already_encrypted",
                "the record is already encrypted (it has _kg)",
            ),
            R::NotEncrypted => Self::bad_request("not_encrypted", "the record has no _kg header"),
            R::Shape(e) => Self::bad_request("shape_mismatch", e.to_string()),
            R::ReservedMember { pointer } => Self::bad_request(
                "reserved_member",
                format!("the record already has {pointer}, which the blind index needs"),
            ),
            R::TooManyFields => Self::bad_request("too_many_fields", e.to_string()),
            R::UnknownField { path } => {
                Self::not_found("unknown_field", format!("the schema protects no field {path}"))
            }
            R::NotSearchable { path } => Self::bad_request(
                "not_searchable",
                format!("field {path} is neither deterministic nor blind-indexed"),
            ),
            R::WrongContext { tenant, schema, version } => Self::bad_request(
                "wrong_context",
                format!("the record belongs to tenant {tenant}, schema {schema} v{version}"),
            ),
            R::MalformedHeader(_) | R::CannotDecrypt => cannot_decrypt(),
            other => internal(&other),
        }
    }
}

/// 422 `cannot_decrypt`: says nothing about which check failed.
pub fn cannot_decrypt() -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "cannot_decrypt", "cannot decrypt")
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonSyntaxError(e) if e.body_text().contains("recursion limit") => {
                Self::bad_request("json_too_deep", "the request body nests too deeply")
            }
            JsonRejection::JsonSyntaxError(_) => {
                Self::bad_request("malformed_json", "the request body is not valid JSON")
            }
            JsonRejection::JsonDataError(e) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", e.body_text())
            }
            JsonRejection::MissingJsonContentType(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send Content-Type: application/json",
            ),
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Self::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "the request body is too large",
                )
            }
            other => Self::bad_request("invalid_request", other.body_text()),
        }
    }
}
