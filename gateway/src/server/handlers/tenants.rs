//! Tenants and KEK versions: create, list, show, rotate, change state.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use kms_core::audit::AuditEvent;
use kms_core::store::{KekRecord, TenantRecord};
use kms_core::{KekState, StateChange};

use super::{ApiJson, ApiPath, tenant_id};
use crate::audit_log::now_ms;
use crate::error::{ApiError, MASTER_CHANGED};
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
    let tenant = body.tenant.clone();
    let event = move |outcome| {
        AuditEvent::new(now_ms(), actor.as_str(), "tenant.create", outcome)
            .with_tenant(tenant.clone())
            .with_kek_version(1)
    };
    let hierarchy = state.hierarchy.clone();
    let created = async move { Ok(hierarchy.create_tenant(&body.tenant).await?) };
    let record = state.audit.before(event, created).await?;
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
    // Concurrent rotations (here or on other replicas) each get their own
    // version: one that finds its version taken prepares the next.
    for _ in 0..ROTATION_ATTEMPTS {
        let record = state.hierarchy.tenant(&tenant).await?;
        if let Some(added) = rotate_once(&state, &actor, &record, false).await? {
            return Ok(Json(VersionView::from(&added)));
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        ROTATION_CONFLICT,
        "other rotations of this tenant kept taking the next version; retry",
    ))
}

/// How often a rotation prepares again after losing its version to another.
const ROTATION_ATTEMPTS: usize = 32;
/// The error of a rotation whose version another rotation added first.
const ROTATION_CONFLICT: &str = "rotation_conflict";

/// Rotates `tenant` (as read) once, recording the new version before it is
/// stored ([`crate::audit_log::AuditLog::before`]). `None` if another
/// rotation added that version first (also recorded, as `invalid`).
pub(crate) async fn rotate_once(
    state: &AppState,
    actor: &str,
    tenant: &TenantRecord,
    scheduled: bool,
) -> Result<Option<KekRecord>, ApiError> {
    // A master rotation that activates another master between the wrap and
    // the store is met by wrapping again (each attempt audited).
    let mut attempts = 0;
    loop {
        match rotate_attempt(state, actor, tenant, scheduled).await {
            Err(e) if e.code() == MASTER_CHANGED && attempts < 2 => attempts += 1,
            other => return other,
        }
    }
}

async fn rotate_attempt(
    state: &AppState,
    actor: &str,
    tenant: &TenantRecord,
    scheduled: bool,
) -> Result<Option<KekRecord>, ApiError> {
    let prepared = state.hierarchy.prepare_rotation(tenant).await?;
    let version = prepared.version();
    let (actor, id) = (actor.to_owned(), tenant.id.clone());
    let event = move |outcome| {
        let event = AuditEvent::new(now_ms(), actor.as_str(), "kek.rotate", outcome)
            .with_tenant(id.clone())
            .with_kek_version(version);
        if scheduled { event.with_detail("scheduled", true) } else { event }
    };
    let hierarchy = state.hierarchy.clone();
    let stored = async move {
        hierarchy.commit_rotation(prepared).await?.ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                ROTATION_CONFLICT,
                format!("another rotation added version {version} first"),
            )
        })
    };
    match state.audit.before(event, stored).await {
        Ok(record) => Ok(Some(record)),
        Err(e) if e.code() == ROTATION_CONFLICT => Ok(None),
        Err(e) => Err(e),
    }
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
    // The state the change leads to where it is allowed.
    let target = KekState::DecryptOnly.apply(change).map_err(|e| crate::error::internal(&e))?;
    let id = tenant.clone();
    let event = move |outcome| {
        AuditEvent::new(now_ms(), actor.as_str(), "kek.state", outcome)
            .with_tenant(id.clone())
            .with_kek_version(version)
            .with_detail("state", target.as_str())
    };
    let hierarchy = state.hierarchy.clone();
    let changed = async move { Ok(hierarchy.change_state(&tenant, version, change).await?) };
    let record = state.audit.before(event, changed).await?;
    Ok(Json(VersionView::from(&record)))
}
