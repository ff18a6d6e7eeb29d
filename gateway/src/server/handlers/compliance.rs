//! `GET /v1/compliance`: the live compliance report (admins and auditors
//! with a grant on every tenant).

use std::sync::Arc;

use axum::extract::State;
use axum::{Extension, Json};

use crate::compliance::{
    Report, add_keystore_durability, add_masters_in_use, add_tenant_rotation, server_report_with,
};
use crate::config::ServerConfig;
use crate::error::{ApiError, store_error};
use crate::hygiene::Hygiene;
use crate::policy::Role;
use crate::server::masters::masters_in_use;
use crate::server::{AppState, Caller};

/// What the report is computed from besides the live policy.
pub(crate) struct ComplianceContext {
    pub(crate) config: ServerConfig,
    pub(crate) hygiene: Hygiene,
}

/// The checks of [`crate::compliance`], recomputed now against the
/// current policy and files.
#[utoipa::path(
    get,
    path = "/v1/compliance",
    tag = "compliance",
    responses(
        (status = 200, description = "Every safeguard with its HIPAA provision and status (roles `admin`, `auditor` on every tenant)", body = crate::compliance::Report),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn report(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(context): Extension<Arc<ComplianceContext>>,
) -> Result<Json<Report>, ApiError> {
    state
        .authorize_global(&caller, &[Role::Admin, Role::Auditor], "read the compliance report")
        .await?;
    let policy = state.policy.current();
    let mut report = server_report_with(&context.config, &context.hygiene, Ok(&policy));
    let tenants = state.hierarchy.store().list_tenants().await.map_err(|e| store_error(&e))?;
    let schedules: Vec<(String, Option<i64>)> = tenants
        .into_iter()
        .filter(|t| t.index_root_wrapped.is_some()) // shredded tenants hold no key
        .map(|t| (t.id.to_string(), t.rotate_every_secs))
        .collect();
    add_tenant_rotation(&mut report, context.config.keys.max_rotation_period_days, &schedules);
    let in_use =
        masters_in_use(state.hierarchy.store().as_ref()).await.map_err(|e| store_error(&e))?;
    add_masters_in_use(&mut report, &in_use);
    let durability = state.hierarchy.store().durability().await.map_err(|e| store_error(&e))?;
    add_keystore_durability(&mut report, &durability);
    Ok(Json(report))
}
