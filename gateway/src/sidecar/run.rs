//! Starting, serving and stopping the sidecar.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kms_core::schema::SchemaSet;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use tokio::signal::unix::Signal;

use super::cache::DekCache;
use super::config::{Listen, SidecarConfig};
use super::handlers;
use super::keyring::Keyring;
use super::ks_client::KeyServiceClient;
use super::listener::{AppListener, serve};
use super::pool::DekPool;
use super::reporter::Reporter;
use super::request::{self, RequestScope};
use super::shared_calls::{Rewraps, SharedCalls, Unwraps};
use super::state::{ActiveVersions, SidecarState};
use crate::error::ApiError;
use crate::metrics::{Metrics, RequestLabels, RouteLabels};

/// The sidecar could not start.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {detail}")]
pub struct SidecarError {
    step: &'static str,
    detail: String,
}

fn fail(step: &'static str) -> impl FnOnce(&dyn std::fmt::Display) -> SidecarError {
    move |e| SidecarError { step, detail: e.to_string() }
}

/// Runs the sidecar until SIGTERM or SIGINT, then flushes audit events.
pub async fn run(config: SidecarConfig) -> Result<(), SidecarError> {
    let hygiene = crate::hygiene::harden();
    for warning in config.deadline_warnings() {
        tracing::warn!("{warning}");
    }
    crate::compliance::sidecar_report(&config, &hygiene)
        .enforce()
        .map_err(|e| fail("compliance")(&e))?;
    let mut schemas = SchemaSet::default();
    for path in &config.schemas {
        let text = std::fs::read_to_string(path)
            .map_err(|e| fail("schemas")(&format!("{}: {e}", path.display())))?;
        let set = SchemaSet::from_toml(&text, &path.display().to_string())
            .map_err(|e| fail("schemas")(&e))?;
        schemas.merge(set, &path.display().to_string()).map_err(|e| fail("schemas")(&e))?;
    }
    let token = match &config.token_file {
        Some(path) => {
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(path).map_err(|e| fail("token file")(&e))?,
            );
            let token = text.trim().to_owned();
            if token.len() < 16 {
                return Err(fail("token file")(&"the bearer token must be at least 16 characters"));
            }
            Some(SecretString::from(token))
        }
        None => None,
    };
    let metrics = Metrics::sidecar();
    let client = Arc::new(
        KeyServiceClient::new(&config.key_service, config.profile)
            .map_err(|e| fail("key service client")(&e))?
            .counting_into(&metrics),
    );
    let ttl = Duration::from_secs(config.cache.ttl_secs);
    let reporter = Reporter::new(client.clone(), config.audit.clone(), config.app_identity.clone());
    // Long enough for the call ahead and a request's own: a shared call
    // never cuts failover short.
    let wait_limit = client.longest_call().saturating_mul(2);
    let cache = Arc::new(DekCache::new(ttl, config.cache.max_entries));
    let unwraps = Unwraps { client: client.clone(), cache: cache.clone() };
    let state = Arc::new(SidecarState {
        schemas,
        pool: DekPool::new(client.clone(), config.pool.clone(), ttl),
        cache,
        keyring: Keyring::new(client.clone(), ttl),
        reporter: reporter.clone(),
        unwraps: SharedCalls::new(unwraps, config.limits.max_records, wait_limit),
        rewraps: SharedCalls::new(Rewraps(client.clone()), config.limits.max_records, wait_limit),
        limits: config.limits.clone(),
        token,
        metrics,
        active_versions: ActiveVersions::default(),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let reporter_task = tokio::spawn(reporter.run(stop_rx.clone()));
    // Before the sidecar says it listens, so a SIGHUP right after is a
    // reload (and never SIGHUP's default: the end of the process).
    spawn_tls_reload(
        client.clone(),
        crate::signals::hangups("the key service client's TLS files reload only when they change"),
        Duration::from_secs(config.key_service.tls_reload_interval_secs.max(1)),
        stop_rx.clone(),
    );
    spawn_maintenance(state.clone(), stop_rx);
    let router = crate::abuse::protect_sidecar(
        router(state.clone()),
        &config.abuse,
        config.limits.max_depth,
        config.limits.max_body_bytes,
    );

    let terminated = crate::signals::termination().map_err(|e| fail("signals")(&e))?;
    let mut stdout = std::io::stdout();
    let drain = Duration::from_secs(20);
    match &config.listen {
        Listen::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| fail("listen")(&e))?;
            }
            // Held until the socket is removed at exit: sidecars given the
            // same socket take turns at its path, so none removes or
            // replaces another's.
            let mut lock = path.as_os_str().to_owned();
            lock.push(".lock");
            let _claim = crate::claim::claim(path, lock.as_ref(), "another sidecar")
                .map_err(|e| fail("listen")(&e))?;
            clear_stale_socket(path).map_err(|e| fail("listen")(&e))?;
            let (listener, placed) = bind_private(path).map_err(|e| fail("listen")(&e))?;
            tracing::info!(socket = %path.display(), "sidecar listening");
            let _ = writeln!(stdout, "keygate sidecar listening on unix:{}", path.display());
            let _ = stdout.flush();
            let listener = AppListener::Unix(listener);
            serve(listener, router, config.abuse.clone(), terminated, drain).await;
            // Only the socket this process placed.
            if file_id(path).ok() == Some(placed) {
                let _ = std::fs::remove_file(path);
            }
        }
        Listen::Tcp(addr) => {
            let listener =
                tokio::net::TcpListener::bind(addr).await.map_err(|e| fail("listen")(&e))?;
            let addr = listener.local_addr().map_err(|e| fail("listen")(&e))?;
            tracing::info!(%addr, "sidecar listening");
            let _ = writeln!(stdout, "keygate sidecar listening on http://{addr}");
            let _ = stdout.flush();
            let listener = AppListener::Tcp(listener);
            serve(listener, router, config.abuse.clone(), terminated, drain).await;
        }
    }
    tracing::info!("sidecar shutting down: flushing audit events");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(20), reporter_task).await;
    Ok(())
}

fn set_mode(path: &std::path::Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn spawn_maintenance(state: Arc<SidecarState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    state.pool.evict_expired();
                    state.cache.evict_expired();
                    state.keyring.evict_expired();
                }
                _ = stop.changed() => break,
            }
        }
    });
}

/// Rebuilds the key service client from its TLS files on SIGHUP, and
/// whenever a poll every `every` finds them changed: a renewed certificate
/// is used before the old one expires, a rotated CA before the key
/// service presents a certificate of it. A failure keeps the old client
/// (logged and counted by the client).
fn spawn_tls_reload(
    client: Arc<KeyServiceClient>,
    mut hup: Option<Signal>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut poll = tokio::time::interval(every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is at once, and the files were just read.
        poll.tick().await;
        loop {
            tokio::select! {
                () = crate::signals::next_hangup(&mut hup) => {
                    tracing::info!("SIGHUP: reloading the key service client's TLS files");
                    let _ = client.reload_tls();
                }
                _ = poll.tick() => {
                    let _ = client.reload_tls_if_changed();
                }
                _ = stop.changed() => break,
            }
        }
    });
}

/// The device and inode of what is at `path` (not following a link).
fn file_id(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// Makes room for the socket at `path`: a socket left by a sidecar that
/// is gone is removed; anything else there (a live sidecar's socket, a
/// file, a link) stops the start instead of being deleted.
fn clear_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::other(format!(
            "{} exists and is not a socket; not removing it",
            path.display()
        )));
    }
    // Only a refused connection shows nobody listens; any other failure
    // (no permission to connect, say) says nothing, and stops the start.
    match std::os::unix::net::UnixStream::connect(path) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Ok(_) => Err(std::io::Error::other(format!(
            "{} is in use: another process listens on it",
            path.display()
        ))),
        Err(e) => Err(std::io::Error::other(format!(
            "{} exists and cannot be told stale ({e}); not removing it",
            path.display()
        ))),
    }
}

/// Binds the socket inside a new directory only this user may enter
/// (named at random, never one that existed), gives it mode 0660, and only
/// then links it at `path`: nobody else can connect before the mode is
/// set, whatever the umask, and a link never replaces what is at `path`.
/// Returns the listener and the socket's device and inode.
fn bind_private(path: &std::path::Path) -> std::io::Result<(tokio::net::UnixListener, (u64, u64))> {
    use std::os::unix::fs::DirBuilderExt;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // Six random bytes: the staging path is the socket's plus 16 bytes,
    // against a limit of 107.
    let random = kms_core::crypto::rng::array::<6>().map_err(std::io::Error::other)?;
    let random: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let staging = path.with_file_name(format!(".{name}.{random}"));
    std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
    let inner = staging.join("s");
    let bound = tokio::net::UnixListener::bind(&inner).and_then(|listener| {
        set_mode(&inner, 0o660)?;
        let id = file_id(&inner)?;
        std::fs::hard_link(&inner, path)?;
        Ok((listener, id))
    });
    // Only what was made here: the staging name, then its directory.
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&staging);
    bound
}

fn router(state: Arc<SidecarState>) -> Router {
    let scope = Arc::new(RequestScope {
        deadline: state.limits.request_timeout(),
        timeouts: state.metrics.sidecar_request_timeouts.clone(),
    });
    Router::new()
        .route("/v1/encrypt", post(handlers::encrypt))
        .route("/v1/decrypt", post(handlers::decrypt))
        .route("/v1/rewrap", post(handlers::rewrap))
        .route("/v1/index", post(handlers::index))
        .route("/v1/pseudonym", post(handlers::pseudonymize))
        .layer(middleware::from_fn_with_state(state.clone(), bearer))
        // Outside the token check, so that a refusal carries the id too.
        .layer(middleware::from_fn_with_state(scope, request::scope))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(super::openapi::openapi_json))
        .fallback(|| async { ApiError::not_found("not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed here",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), record_metrics))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .with_state(state)
}

/// Checks `Authorization: Bearer …` in constant time when a token is set.
async fn bearer(State(s): State<Arc<SidecarState>>, request: Request, next: Next) -> Response {
    if let Some(token) = &s.token {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !kms_core::crypto::ct_eq(presented.as_bytes(), token.expose_secret().as_bytes()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid bearer token is required",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// `GET /healthz`: the process is up.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "ops",
    responses((status = 200, description = "The process is up", body = crate::openapi::Health)),
)]
pub(super) async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(json!({"status": "ok"}))
}

/// `GET /readyz`: the key service answers and audit events are flowing.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "ops",
    responses(
        (status = 200, description = "Ready", body = crate::openapi::Readiness),
        (status = 503, description = "Not ready; `checks` says why", body = crate::openapi::Readiness),
    ),
)]
pub(super) async fn readyz(State(s): State<Arc<SidecarState>>) -> Response {
    // Codes only, as the key service's readiness: the reasons go to the log.
    let key_service = s.keyring.grants().await.map(|_| ()).map_err(|e| {
        tracing::warn!(error = %e, "readiness: the key service does not answer");
        "key_service_unavailable"
    });
    let audit = s.reporter.check([]).map_err(|e| e.code());
    let ready = key_service.is_ok() && audit.is_ok();
    let check = |r: &Result<(), &str>| match r {
        Ok(()) => json!({"ok": true}),
        Err(e) => json!({"ok": false, "error": e}),
    };
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({"ready": ready, "checks": {"key_service": check(&key_service), "audit": check(&audit)}});
    (status, axum::Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text exposition.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String)),
)]
pub(super) async fn metrics(State(s): State<Arc<SidecarState>>) -> Response {
    let (hits, misses, entries) = s.cache.stats();
    let m = &s.metrics;
    m.dek_cache_hits.set(hits);
    m.dek_cache_misses.set(misses);
    m.dek_cache_entries.set(u64::try_from(entries).unwrap_or(u64::MAX));
    m.dek_pool_size.set(u64::try_from(s.pool.evict_expired()).unwrap_or(u64::MAX));
    m.audit_pending.set(u64::try_from(s.reporter.pending()).unwrap_or(u64::MAX));
    let (calls, requests) = s.unwraps.stats();
    m.dek_unwrap_calls.set(calls);
    m.dek_unwrap_requests.set(requests);
    let (calls, requests) = s.rewraps.stats();
    m.dek_rewrap_calls.set(calls);
    m.dek_rewrap_requests.set(requests);
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        m.encode(),
    )
        .into_response()
}

async fn record_metrics(
    State(s): State<Arc<SidecarState>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let start = Instant::now();
    let response = next.run(request).await;
    s.metrics
        .requests
        .get_or_create(&RequestLabels { route: route.clone(), code: response.status().as_u16() })
        .inc();
    s.metrics.latency.get_or_create(&RouteLabels { route }).observe(start.elapsed().as_secs_f64());
    response
}
