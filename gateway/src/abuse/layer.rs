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

use super::body::{BodyRead, read_within, refuse_unread};
use super::bucket::{KeyedBuckets, TokenBucket};
use super::config::{AbuseConfig, SidecarAbuseConfig};
use crate::error::ApiError;
use crate::server::Caller;

/// What a caller whose certificate names no usable identity is told.
pub(crate) const NO_IDENTITY: &str = "the client certificate names no usable identity (one URI \
     subject alternative name, or a DNS one that is a host name)";

/// The key service's routes open to callers without an identity (probes,
/// scrapers, the API document); every other route needs one.
const OPEN_PATHS: &[&str] = &["/healthz", "/readyz", "/metrics", "/v1/openapi.json"];

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

/// Wraps the key service's API router. Before the body is read: a caller
/// without an identity is refused (403) on every route but the open ones
/// (`OPEN_PATHS`), and a token is taken from the caller's bucket (429
/// `rate_limited` + `Retry-After`); a refused request's body is drained,
/// not kept (see `refuse_unread`). Then the whole body is read (within
/// `body_read_timeout_secs` and `max_body` bytes, so every answer, even an
/// early refusal, leaves the connection clean).
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
    let identity = request.extensions().get::<Caller>().and_then(|c| c.0.as_deref());
    let refusal = match identity {
        None if !OPEN_PATHS.contains(&request.uri().path()) => {
            Some(ApiError::forbidden(NO_IDENTITY).into_response())
        }
        // Callers without an identity share one bucket on the open routes.
        identity => limiter.buckets.take(identity.unwrap_or_default()).err().map(|wait| {
            tracing::debug!(identity, "rate limited");
            rate_limited(wait, "too many requests from this identity")
        }),
    };
    if let Some(refusal) = refusal {
        let (parts, body) = request.into_parts();
        let deadline = tokio::time::Instant::now() + limiter.bounds.read_timeout;
        refuse_unread(body, limiter.max_body, deadline, parts.version, &parts.headers).await;
        return refusal;
    }
    let mut request = match read_body(request, limiter.bounds, limiter.max_body).await {
        Ok(request) => request,
        Err(refused) => return refused,
    };
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

    /// A body that never ends, counting how often it was polled.
    struct Endless(Arc<std::sync::atomic::AtomicUsize>);

    impl hyper::body::Body for Endless {
        type Data = axum::body::Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::task::Poll::Pending
        }
    }

    /// A key service router that counts the requests reaching it.
    fn key_service(config: &AbuseConfig) -> (Router, Arc<std::sync::atomic::AtomicUsize>) {
        let reached = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = reached.clone();
        let handler = move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async { "ok" }
        };
        let router = Router::new()
            .route("/v1/x", axum::routing::post(handler.clone()))
            .route("/healthz", get(handler));
        (protect_key_service(router, config, 1 << 20), reached)
    }

    /// A request from `identity` whose body never ends, and how often the
    /// body was polled.
    fn endless(
        path: &str,
        identity: Option<&str>,
        version: axum::http::Version,
    ) -> (Request, Arc<std::sync::atomic::AtomicUsize>) {
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut request = Request::builder()
            .method("POST")
            .uri(path)
            .version(version)
            .body(Body::new(Endless(polls.clone())))
            .unwrap();
        request.extensions_mut().insert(Caller(identity.map(str::to_owned)));
        (request, polls)
    }

    #[tokio::test]
    async fn a_rate_limited_identity_is_refused_before_its_body_is_read() {
        use std::sync::atomic::Ordering;
        let config = AbuseConfig { rate_per_sec: 0.001, burst: 1, ..Default::default() };
        let (router, reached) = key_service(&config);
        let mut first = Request::builder().method("POST").uri("/v1/x").body(Body::empty()).unwrap();
        first.extensions_mut().insert(Caller(Some("a".to_owned())));
        assert_eq!(router.clone().oneshot(first).await.unwrap().status(), StatusCode::OK);
        // The bucket is empty: refused at once, the body never touched.
        let (second, polls) = endless("/v1/x", Some("a"), axum::http::Version::HTTP_2);
        let answer = tokio::time::timeout(Duration::from_secs(5), router.clone().oneshot(second))
            .await
            .expect("answered without waiting for the body")
            .unwrap();
        assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(polls.load(Ordering::Relaxed), 0);
        assert_eq!(reached.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_caller_without_an_identity_is_refused_before_its_body_is_read() {
        use std::sync::atomic::Ordering;
        let (router, reached) = key_service(&AbuseConfig::default());
        let (request, polls) = endless("/v1/x", None, axum::http::Version::HTTP_2);
        let answer = tokio::time::timeout(Duration::from_secs(5), router.clone().oneshot(request))
            .await
            .expect("answered without waiting for the body")
            .unwrap();
        assert_eq!(answer.status(), StatusCode::FORBIDDEN);
        assert_eq!(polls.load(Ordering::Relaxed), 0);
        // The open routes stay open.
        let mut probe = Request::builder().uri("/healthz").body(Body::empty()).unwrap();
        probe.extensions_mut().insert(Caller(None));
        assert_eq!(router.oneshot(probe).await.unwrap().status(), StatusCode::OK);
        assert_eq!(reached.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn retry_after_rounds_up() {
        let r = rate_limited(Duration::from_millis(1), "x");
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = rate_limited(Duration::from_millis(2_001), "x");
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
    }
}
