//! HTTP handlers, one file per resource.

pub(super) mod audit;
pub(super) mod compliance;
pub(super) mod datakeys;
pub(super) mod lifecycle;
pub(super) mod master;
pub(super) mod ops;
pub(super) mod tenants;

use kms_core::TenantId;

use crate::error::ApiError;

pub(super) use crate::extract::{ApiJson, ApiPath};

/// Validates a tenant id taken from the path.
pub(super) fn tenant_id(raw: &str) -> Result<TenantId, ApiError> {
    TenantId::new(raw).map_err(|e| ApiError::bad_request("invalid_tenant", e.to_string()))
}
