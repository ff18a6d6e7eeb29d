//! The middleware that applies the limits: identity buckets at the key
//! service, connection guards at the sidecar, and the body bounds every
//! JSON extractor ([`crate::extract::ApiJson`]) reads.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::body::{BodyRead, read_within};
use super::bucket::{KeyedBuckets, TokenBucket};
use super::config::{AbuseConfig, SidecarAbuseConfig};
use crate::error::ApiError;
use crate::server::Caller;

/// Bounds on reading a JSON request body, put into every request's
/// extensions by the abuse layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyBounds {
    /// How long the whole body may take to arrive.
    pub read_timeout: Duration,
    /// Deepest nesting of arrays and objects.
    pub max_depth: usize,
}

impl Default for BodyBounds {
    fn default() -> Self {
        Self { read_timeout: Duration::from_secs(30), max_depth: 64 }
    }
}

struct IdentityLimiter {
    buckets: KeyedBuckets,
    bounds: BodyBounds,
    max_body: usize,
}

/// Wraps the key service's API router: the whole request body is read first
/// (within `body_read_timeout_secs` and `max_body` bytes, so every answer,
/// even an early refusal, leaves the connection clean), then a token bucket
/// per client identity (429 `rate_limited` + `Retry-After`).
pub fn protect_key_service(router: Router, config: &AbuseConfig, max_body: usize) -> Router {
    let limiter = Arc::new(IdentityLimiter {
        buckets: KeyedBuckets::new(
            config.rate_per_sec,
            config.burst,
            config.max_tracked_identities,
        ),
        bounds: BodyBounds {
            read_timeout: Duration::from_secs(config.body_read_timeout_secs.max(1)),
            max_depth: config.max_json_depth,
        },
        max_body,
    });
    router.layer(middleware::from_fn_with_state(limiter, limit_identity))
}

async fn limit_identity(
    State(limiter): State<Arc<IdentityLimiter>>,
    request: Request,
    next: Next,
) -> Response {
    let mut request = match read_body(request, limiter.bounds, limiter.max_body).await {
        Ok(request) => request,
        Err(refused) => return refused,
    };
    let identity = request.extensions().get::<Caller>().and_then(|c| c.0.as_deref());
    if let Err(wait) = limiter.buckets.take(identity.unwrap_or_default()) {
        tracing::debug!(identity, "rate limited");
        return rate_limited(wait, "too many requests from this identity");
    }
    request.extensions_mut().insert(limiter.bounds);
    next.run(request).await
}

/// Per-connection limits of the sidecar, attached to each request of a
/// connection by the listener.
#[derive(Debug)]
pub struct ConnectionGuard {
    in_flight: Arc<Semaphore>,
    bucket: Mutex<TokenBucket>,
    rate: f64,
    burst: u32,
}

impl ConnectionGuard {
    /// A guard for a new connection.
    pub fn new(config: &SidecarAbuseConfig) -> Self {
        Self {
            in_flight: Arc::new(Semaphore::new(config.max_concurrent_per_connection.max(1))),
            bucket: Mutex::new(TokenBucket::full(config.burst_per_connection, Instant::now())),
            rate: config.rate_per_sec_per_connection,
            burst: config.burst_per_connection,
        }
    }
}

struct SidecarLimiter {
    bounds: BodyBounds,
    max_body: usize,
}

/// Wraps the sidecar's router: the whole body is read first (within the
/// timeout and `max_body`), then the connection guard the listener attached
/// (rate and concurrency per connection). `max_depth` is the records'
/// depth limit; the body adds two levels.
pub fn protect_sidecar(
    router: Router,
    config: &SidecarAbuseConfig,
    max_depth: usize,
    max_body: usize,
) -> Router {
    let limiter = Arc::new(SidecarLimiter {
        bounds: BodyBounds {
            read_timeout: Duration::from_secs(config.body_read_timeout_secs.max(1)),
            max_depth: max_depth.saturating_add(2),
        },
        max_body,
    });
    router.layer(middleware::from_fn_with_state(limiter, limit_connection))
}

async fn limit_connection(
    State(limiter): State<Arc<SidecarLimiter>>,
    request: Request,
    next: Next,
) -> Response {
    let mut request = match read_body(request, limiter.bounds, limiter.max_body).await {
        Ok(request) => request,
        Err(refused) => return refused,
    };
    request.extensions_mut().insert(limiter.bounds);
    let Some(guard) = request.extensions().get::<Arc<ConnectionGuard>>().cloned() else {
        return next.run(request).await;
    };
    let taken = guard.bucket.lock().unwrap_or_else(|p| p.into_inner()).take(
        Instant::now(),
        guard.rate,
        guard.burst,
    );
    if let Err(wait) = taken {
        return rate_limited(wait, "too many requests on this connection");
    }
    let Ok(_permit) = guard.in_flight.clone().try_acquire_owned() else {
        return rate_limited(
            Duration::from_secs(1),
            "too many concurrent requests on this connection",
        );
    };
    next.run(request).await
}

/// Reads the whole body within the bounds and puts it back, so that no
/// answer (a refusal included) leaves unread bytes on an HTTP/1 connection
/// (see [`super::body`]). Slow bodies get 408 `body_timeout`, oversized ones
/// 413 `body_too_large`.
async fn read_body(
    request: Request,
    bounds: BodyBounds,
    max_body: usize,
) -> Result<Request, Response> {
    let (parts, body) = request.into_parts();
    let deadline = tokio::time::Instant::now() + bounds.read_timeout;
    let refusal = match read_within(body, max_body, deadline, parts.version, &parts.headers).await {
        BodyRead::Complete(bytes) => return Ok(Request::from_parts(parts, Body::from(bytes))),
        BodyRead::TooLarge => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is too large",
        ),
        BodyRead::TimedOut => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "the request body did not arrive in time",
        ),
        BodyRead::Failed => {
            ApiError::bad_request("invalid_request", "the request body could not be read")
        }
    };
    Err(refusal.into_response())
}

/// 429 `rate_limited` with `Retry-After` (whole seconds, at least 1).
fn rate_limited(wait: Duration, message: &str) -> Response {
    let seconds = wait.as_secs().saturating_add(u64::from(wait.subsec_nanos() > 0)).max(1);
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("{message}; retry after {seconds} s"),
    )
    .with_retry_after(Some(seconds))
    .into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::header;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    async fn call(router: &Router, guard: &Arc<ConnectionGuard>) -> Response {
        let mut request = Request::builder().uri("/slow").body(Body::empty()).unwrap();
        request.extensions_mut().insert(guard.clone());
        router.clone().oneshot(request).await.unwrap()
    }

    #[tokio::test]
    async fn a_connection_over_its_concurrency_gets_429() {
        let config = SidecarAbuseConfig { max_concurrent_per_connection: 2, ..Default::default() };
        let (release, wait) = tokio::sync::watch::channel(false);
        let router = Router::new().route(
            "/slow",
            get(move || {
                let mut wait = wait.clone();
                async move {
                    let _ = wait.wait_for(|r| *r).await;
                    "done"
                }
            }),
        );
        let router = protect_sidecar(router, &config, 64, 1 << 20);
        let guard = Arc::new(ConnectionGuard::new(&config));
        let first = tokio::spawn({
            let (r, g) = (router.clone(), guard.clone());
            async move { call(&r, &g).await }
        });
        let second = tokio::spawn({
            let (r, g) = (router.clone(), guard.clone());
            async move { call(&r, &g).await }
        });
        while guard.in_flight.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let third = call(&router, &guard).await;
        assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(third.headers()[header::RETRY_AFTER], "1");
        // Another connection has its own allowance.
        let other = Arc::new(ConnectionGuard::new(&config));
        let _ = release.send(true);
        assert_eq!(call(&router, &other).await.status(), StatusCode::OK);
        assert_eq!(first.await.unwrap().status(), StatusCode::OK);
        assert_eq!(second.await.unwrap().status(), StatusCode::OK);
        assert_eq!(call(&router, &guard).await.status(), StatusCode::OK, "permits come back");
    }

    #[tokio::test]
    async fn a_connection_over_its_rate_gets_429_with_retry_after() {
        let config = SidecarAbuseConfig {
            rate_per_sec_per_connection: 0.5,
            burst_per_connection: 3,
            ..Default::default()
        };
        let router = protect_sidecar(
            Router::new().route("/slow", get(|| async { "ok" })),
            &config,
            64,
            1024,
        );
        let guard = Arc::new(ConnectionGuard::new(&config));
        for _ in 0..3 {
            assert_eq!(call(&router, &guard).await.status(), StatusCode::OK);
        }
        let refused = call(&router, &guard).await;
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.headers()[header::RETRY_AFTER], "2");
    }

    #[test]
    fn retry_after_rounds_up() {
        let r = rate_limited(Duration::from_millis(1), "x");
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = rate_limited(Duration::from_millis(2_001), "x");
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
    }
}
