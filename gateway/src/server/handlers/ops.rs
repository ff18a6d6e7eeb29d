//! Liveness, readiness and metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use kms_core::{Key256, KeyPurpose, WrapContext};
use serde_json::json;

use crate::server::AppState;

/// `GET /healthz`: the process is up.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "ops",
    responses(
        (status = 200, description = "The process is up", body = crate::openapi::Health),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: the keystore answers, the root key provider really wraps
/// and unwraps, and the audit log commits.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "ops",
    responses(
        (status = 200, description = "Store, root key and audit writer work", body = crate::openapi::Readiness),
        (status = 503, description = "Something is not ready; `checks` says what", body = crate::openapi::Readiness),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let store = state.hierarchy.store().ping().await.map_err(|e| e.to_string());
    let root = root_round_trip(&state).await;
    let audit = if state.audit.is_healthy() {
        Ok(())
    } else {
        Err(state.audit.last_error().unwrap_or_else(|| "the audit writer stopped".to_owned()))
    };
    let check = |r: &Result<(), String>| match r {
        Ok(()) => json!({ "ok": true }),
        Err(e) => json!({ "ok": false, "error": e }),
    };
    let ready = store.is_ok() && root.is_ok() && audit.is_ok();
    let body = json!({
        "ready": ready,
        "checks": { "store": check(&store), "root_key": check(&root), "audit": check(&audit) },
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn root_round_trip(state: &AppState) -> Result<(), String> {
    let (_, root) = state.hierarchy.active_master().await.map_err(|e| e.to_string())?;
    let context = WrapContext {
        purpose: KeyPurpose::AuditSigning,
        owner: "keygate-readiness".into(),
        version: 0,
    };
    let probe = Key256::generate().map_err(|e| e.to_string())?;
    let wrapped = root.wrap(&probe, &context).await.map_err(|e| e.to_string())?;
    let back = root.unwrap(&wrapped, &context).await.map_err(|e| e.to_string())?;
    if kms_core::crypto::ct_eq(back.expose_secret(), probe.expose_secret()) {
        Ok(())
    } else {
        Err("the root key provider returned a different key".to_owned())
    }
}

/// `GET /metrics`: Prometheus text exposition.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    responses(
        (status = 200, description = "Prometheus / OpenMetrics text", content_type = "application/openmetrics-text", body = String),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let stats = state.hierarchy.cache_stats();
    let m = &state.metrics;
    m.kek_cache_hits.set(stats.hits);
    m.kek_cache_misses.set(stats.misses);
    m.kek_cache_entries.set(u64::try_from(stats.entries).unwrap_or(u64::MAX));
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        m.encode(),
    )
        .into_response()
}
