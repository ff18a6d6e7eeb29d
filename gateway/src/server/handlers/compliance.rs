//! `GET /v1/compliance`: the live compliance report (admins and auditors
//! with a grant on every tenant).

use std::sync::Arc;

use axum::extract::State;
use axum::{Extension, Json};

use crate::compliance::{Report, server_report_with};
use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::hygiene::Hygiene;
use crate::policy::Role;
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
    Ok(Json(server_report_with(&context.config, &context.hygiene, Ok(&policy))))
}
