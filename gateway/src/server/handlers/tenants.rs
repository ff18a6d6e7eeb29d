//! Tenants and KEK versions: create, list, show, rotate, change state.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use kms_core::StateChange;
use kms_core::audit::{AuditEvent, Outcome};

use super::{ApiJson, ApiPath, tenant_id};
use crate::audit_log::now_ms;
use crate::error::ApiError;
use crate::policy::Role;
use crate::server::api::{ChangeState, CreateTenant, StateAction, TenantView, VersionView};
use crate::server::{AppState, Caller};

/// Creates a tenant: KEK v1 and an index root (role `admin`).
#[utoipa::path(
    post,
    path = "/v1/tenants",
    tag = "tenants",
    request_body = CreateTenant,
    responses(
        (status = 201, description = "Created: KEK v1 and index root, wrapped by the active master key", body = TenantView),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<CreateTenant>,
) -> Result<(StatusCode, Json<TenantView>), ApiError> {
    let actor = state.authorize(&caller, &body.tenant, &[Role::Admin], "create tenants").await?;
    let record = state.hierarchy.create_tenant(&body.tenant).await?;
    let event = AuditEvent::new(now_ms(), actor, "tenant.create", Outcome::Ok)
        .with_tenant(body.tenant.clone())
        .with_kek_version(1);
    state.audit.record(vec![event]).await?;
    Ok((StatusCode::CREATED, Json(TenantView::from(&record))))
}

/// Lists the tenants the caller may administer or audit.
#[utoipa::path(
    get,
    path = "/v1/tenants",
    tag = "tenants",
    responses(
        (status = 200, description = "The tenants the caller administers or audits", body = Vec<TenantView>),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<TenantView>>, ApiError> {
    let identity = state.identity(&caller)?;
    let policy = state.policy.current();
    let visible = |t: &kms_core::TenantId| {
        policy.authorize(identity, t, Role::Admin) || policy.authorize(identity, t, Role::Auditor)
    };
    let tenants =
        state.hierarchy.store().list_tenants().await.map_err(|e| crate::error::store_error(&e))?;
    Ok(Json(tenants.iter().filter(|t| visible(&t.id)).map(TenantView::from).collect()))
}

/// One tenant (roles `admin`, `auditor`).
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}",
    tag = "tenants",
    params(("tenant" = String, Path, description = "Tenant id, `[a-z0-9][a-z0-9_-]{0,62}`")),
    responses(
        (status = 200, description = "Versions and states (never key material)", body = TenantView),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(tenant): ApiPath<String>,
) -> Result<Json<TenantView>, ApiError> {
    let tenant = tenant_id(&tenant)?;
    state.authorize(&caller, &tenant, &[Role::Admin, Role::Auditor], "view tenants").await?;
    let record = state.hierarchy.tenant(&tenant).await?;
    Ok(Json(TenantView::from(&record)))
}

/// A new active KEK version; older ones become decrypt-only (role `admin`).
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/keys/rotate",
    tag = "tenants",
    params(("tenant" = String, Path, description = "Tenant id, `[a-z0-9][a-z0-9_-]{0,62}`")),
    responses(
        (status = 200, description = "The new active KEK version", body = VersionView),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn rotate(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(tenant): ApiPath<String>,
) -> Result<Json<VersionView>, ApiError> {
    let tenant = tenant_id(&tenant)?;
    let actor = state.authorize(&caller, &tenant, &[Role::Admin], "rotate keys").await?;
    let record = state.hierarchy.rotate(&tenant).await?;
    let event = AuditEvent::new(now_ms(), actor, "kek.rotate", Outcome::Ok)
        .with_tenant(tenant)
        .with_kek_version(record.version);
    state.audit.record(vec![event]).await?;
    Ok(Json(VersionView::from(&record)))
}

/// Disables, enables or makes decrypt-only one KEK version (role `admin`).
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/keys/{version}/state",
    tag = "tenants",
    params(("tenant" = String, Path, description = "Tenant id, `[a-z0-9][a-z0-9_-]{0,62}`"), ("version" = u32, Path, minimum = 1, description = "KEK version")),
    request_body = ChangeState,
    responses(
        (status = 200, description = "The version after the change", body = VersionView),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn change_state(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath((tenant, version)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<ChangeState>,
) -> Result<Json<VersionView>, ApiError> {
    let tenant = tenant_id(&tenant)?;
    let version: u32 = version.parse().ok().filter(|v| *v >= 1).ok_or_else(|| {
        ApiError::bad_request("invalid_version", "a KEK version is a number from 1")
    })?;
    let actor = state.authorize(&caller, &tenant, &[Role::Admin], "change key states").await?;
    let change = match body.action {
        StateAction::Enable => StateChange::Enable,
        StateAction::Disable => StateChange::Disable,
        StateAction::DecryptOnly => StateChange::DecryptOnly,
    };
    let record = state.hierarchy.change_state(&tenant, version, change).await?;
    let event = AuditEvent::new(now_ms(), actor, "kek.state", Outcome::Ok)
        .with_tenant(tenant)
        .with_kek_version(version)
        .with_detail("state", record.state.as_str());
    state.audit.record(vec![event]).await?;
    Ok(Json(VersionView::from(&record)))
}
