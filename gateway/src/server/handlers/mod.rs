//! HTTP handlers, one file per resource.

pub(super) mod audit;
pub(super) mod datakeys;
pub(super) mod ops;
pub(super) mod tenants;

use axum::extract::FromRequest;
use kms_core::TenantId;

use crate::error::ApiError;

/// `Json<T>` whose rejections are our JSON errors.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub(super) struct ApiJson<T>(pub(super) T);

impl<T: serde::Serialize> axum::response::IntoResponse for ApiJson<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

/// Validates a tenant id taken from the path.
pub(super) fn tenant_id(raw: &str) -> Result<TenantId, ApiError> {
    TenantId::new(raw).map_err(|e| ApiError::bad_request("invalid_tenant", e.to_string()))
}
