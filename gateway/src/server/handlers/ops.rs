//! Liveness, readiness and metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use kms_core::{Key256, KeyPurpose, WrapContext};
use serde_json::json;
use std::time::{Duration, Instant};

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
///
/// Anyone who reaches the listener may ask (probes carry no identity on
/// `ops_listen`), so the answer names only which check failed, with a
/// stable code; the reason goes to the log. The root provider's round trip
/// (two HSM or KMS calls) is made at most once per [`ROOT_PROBE_FOR`],
/// however often readiness is asked.
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
    let store = state.hierarchy.store().ping().await.map_err(|e| {
        tracing::warn!(error = %e, "readiness: the keystore does not answer");
        "store_unavailable"
    });
    let root = state.root_probe.check(root_round_trip(&state)).await;
    let audit = if state.audit.is_healthy() {
        Ok(())
    } else {
        let reason = state.audit.last_error();
        tracing::warn!(error = reason.as_deref().unwrap_or("stopped"), "readiness: audit writer");
        Err("audit_unavailable")
    };
    let check = |r: &Result<(), &str>| match r {
        Ok(()) => json!({ "ok": true }),
        Err(code) => json!({ "ok": false, "error": code }),
    };
    let ready = store.is_ok() && root.is_ok() && audit.is_ok();
    let body = json!({
        "ready": ready,
        "checks": { "store": check(&store), "root_key": check(&root), "audit": check(&audit) },
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// How long a root provider round trip answers readiness.
const ROOT_PROBE_FOR: Duration = Duration::from_secs(2);

/// The last root provider round trip of the readiness check.
#[derive(Default)]
pub(crate) struct RootProbe {
    /// When it was made, and whether it worked. Held across a round trip,
    /// so concurrent checks wait for one instead of each making their own.
    last: tokio::sync::Mutex<Option<(Instant, bool)>>,
}

impl RootProbe {
    /// Whether the root provider works, by `round_trip` unless a recent
    /// one answers (a future does nothing until awaited).
    async fn check(
        &self,
        round_trip: impl Future<Output = Result<(), String>>,
    ) -> Result<(), &'static str> {
        let mut last = self.last.lock().await;
        let worked = match *last {
            Some((at, worked)) if at.elapsed() < ROOT_PROBE_FOR => worked,
            _ => {
                let worked = match round_trip.await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "readiness: the root key provider failed");
                        false
                    }
                };
                *last = Some((Instant::now(), worked));
                worked
            }
        };
        if worked { Ok(()) } else { Err("root_key_unavailable") }
    }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_flood_of_readiness_checks_makes_one_round_trip() {
        let probe = RootProbe::default();
        let trips = AtomicUsize::new(0);
        let trip = |result: Result<(), String>| {
            let trips = &trips;
            async move {
                trips.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                result
            }
        };
        let answers = tokio::join!(
            probe.check(trip(Ok(()))),
            probe.check(trip(Ok(()))),
            probe.check(trip(Ok(()))),
            probe.check(trip(Ok(()))),
        );
        assert_eq!(answers, (Ok(()), Ok(()), Ok(()), Ok(())));
        assert_eq!(trips.load(Ordering::SeqCst), 1, "concurrent checks share one");
        assert_eq!(probe.check(trip(Err("down".into()))).await, Ok(()), "still fresh");
        assert_eq!(trips.load(Ordering::SeqCst), 1);

        // Once stale, the next check asks again, and a failure is a code.
        *probe.last.lock().await = Some((Instant::now() - ROOT_PROBE_FOR, true));
        assert_eq!(
            probe.check(trip(Err("pin file gone".into()))).await,
            Err("root_key_unavailable")
        );
        assert_eq!(trips.load(Ordering::SeqCst), 2);
    }
}
