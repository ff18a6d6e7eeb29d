//! Serving the app-facing API on a unix socket or a loopback TCP address:
//! HTTP/1.1 and HTTP/2, a [`ConnectionGuard`] per connection (rate and
//! concurrency limits), header read and idle timeouts against slow
//! clients, and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::Request;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tower::ServiceExt;

use crate::abuse::{
    AcceptBackoff, ConnectionGuard, OpenConnections, SidecarAbuseConfig, serve_http_with,
};

/// A bound app-facing listener.
pub(super) enum AppListener {
    /// A unix socket.
    Unix(tokio::net::UnixListener),
    /// A loopback TCP address.
    Tcp(tokio::net::TcpListener),
}

/// Serves `router` until `shutdown` resolves, then lets in-flight requests
/// finish (up to `drain`).
pub(super) async fn serve(
    listener: AppListener,
    router: Router,
    abuse: SidecarAbuseConfig,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let open = OpenConnections::new();
    let abuse = Arc::new(abuse);
    tokio::pin!(shutdown);
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            accepted = accept(&listener) => accepted,
            () = &mut shutdown => break,
        };
        match accepted {
            Ok(accepted) => {
                backoff.succeeded();
                match accepted {
                    Accepted::Unix(stream) => spawn_connection(stream, &router, &abuse, &open),
                    Accepted::Tcp(stream) => spawn_connection(stream, &router, &abuse, &open),
                }
            }
            Err(e) => tokio::time::sleep(backoff.failed(&e)).await,
        }
    }
    // Closed first: new clients are refused during the drain rather than
    // left waiting in the backlog.
    drop(listener);
    open.close_all(drain).await;
}

enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn accept(listener: &AppListener) -> std::io::Result<Accepted> {
    match listener {
        AppListener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
        AppListener::Tcp(l) => l.accept().await.map(|(s, _)| {
            // As on the key service: no Nagle delay between response writes.
            if let Err(e) = s.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            Accepted::Tcp(s)
        }),
    }
}

fn spawn_connection<I>(
    io: I,
    router: &Router,
    abuse: &Arc<SidecarAbuseConfig>,
    open: &OpenConnections,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let guard = Arc::new(ConnectionGuard::new(abuse));
    let service = router.clone().map_request(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(guard.clone());
        request
    });
    let (headers, idle) = (abuse.header_read_timeout(), abuse.idle_timeout());
    let stop = open.watcher();
    tokio::spawn(async move {
        if let Err(e) = serve_http_with(io, service, headers, idle, None, stop).await {
            tracing::debug!(error = %e, "app connection ended with an error");
        }
    });
}
