//! The route table and the request pipeline around it: body limit,
//! timeout, metrics, JSON errors for unknown routes.

use std::time::{Duration, Instant};

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use tower::ServiceBuilder;

use super::AppState;
use super::handlers::{audit, compliance, datakeys, lifecycle, master, ops, tenants};
use crate::error::ApiError;
use crate::metrics::{RequestLabels, RouteLabels};

/// The key service's API.
pub(super) fn api(state: AppState) -> Router {
    let timeout = Duration::from_secs(state.limits.request_timeout_secs.max(1));
    Router::new()
        .route("/v1/tenants", post(tenants::create).get(tenants::list))
        .route("/v1/tenants/{tenant}", get(tenants::show))
        .route("/v1/tenants/{tenant}/keys/rotate", post(tenants::rotate))
        .route("/v1/tenants/{tenant}/keys/{version}/state", post(tenants::change_state))
        .route("/v1/tenants/{tenant}/keys/usage", get(lifecycle::usage))
        .route("/v1/tenants/{tenant}/keys/auto-rotate", put(lifecycle::auto_rotate))
        .route("/v1/tenants/{tenant}/shred", post(lifecycle::request_shred))
        .route("/v1/approvals", get(lifecycle::list_approvals))
        .route("/v1/approvals/{id}", post(lifecycle::decide))
        .route("/v1/master", get(master::show))
        .route("/v1/master/rotate", post(master::rotate))
        .route("/v1/master/{id}/connect", post(master::connect))
        .route("/v1/tenants/{tenant}/datakeys", post(datakeys::issue))
        .route("/v1/tenants/{tenant}/datakeys/unwrap", post(datakeys::unwrap))
        .route("/v1/tenants/{tenant}/datakeys/rewrap", post(datakeys::rewrap))
        .route("/v1/tenants/{tenant}/derived", post(datakeys::derived))
        .route("/v1/policy/self", get(audit::policy_self))
        .route("/v1/audit/events", post(audit::ingest))
        .route("/v1/audit", get(audit::export))
        .route("/v1/audit/heads", get(audit::heads))
        .route("/v1/audit/verify", get(audit::verify).post(audit::verify_anchored))
        .route("/v1/compliance", get(compliance::report))
        .route("/v1/openapi.json", get(super::openapi::openapi_json))
        .merge(ops_routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(
            ServiceBuilder::new()
                .layer(middleware::from_fn_with_state(state.clone(), record_metrics))
                .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                    ApiError::unavailable("timeout", "the request took too long")
                }))
                .timeout(timeout),
        )
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .with_state(state)
}

/// Health, readiness and metrics alone, for the plain-HTTP `ops_listen`.
pub(super) fn ops(state: AppState) -> Router {
    ops_routes().with_state(state)
}

fn ops_routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed here")
}

async fn record_metrics(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let start = Instant::now();
    let response = next.run(request).await.into_response();
    let metrics = &state.metrics;
    metrics
        .requests
        .get_or_create(&RequestLabels { route: route.clone(), code: response.status().as_u16() })
        .inc();
    metrics.latency.get_or_create(&RouteLabels { route }).observe(start.elapsed().as_secs_f64());
    response
}
