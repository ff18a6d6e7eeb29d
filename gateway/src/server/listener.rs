//! Accepting mutual-TLS connections and serving HTTP/1.1 and HTTP/2 on
//! them, with the caller's identity attached to every request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::Request;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::ServiceExt;

use crate::abuse::{AcceptBackoff, OpenConnections, serve_http};
use crate::tls::{TlsReloader, identity_of};

/// The verified identity of a connection's client (its certificate's URI
/// SAN, else DNS SAN); `None` if the certificate names neither.
#[derive(Debug, Clone)]
pub struct Caller(pub Option<String>);

/// How long a client may take over each part of a connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConnectionTimeouts {
    /// To finish the TLS handshake.
    pub(super) handshake: Duration,
    /// To send an HTTP/1 request's headers, once begun.
    pub(super) headers: Duration,
    /// To do anything: no request in flight and no byte moving this long
    /// closes the connection.
    pub(super) idle: Duration,
}

/// Serves `router` on `listener` over mutual TLS until `shutdown`
/// resolves, then lets in-flight requests finish (up to `drain`).
pub(super) async fn serve_tls(
    listener: TcpListener,
    tls: Arc<TlsReloader>,
    router: Router,
    timeouts: ConnectionTimeouts,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let open = OpenConnections::new();
    tokio::pin!(shutdown);
    while let Some((tcp, peer)) = accept(&listener, &mut shutdown).await {
        let acceptor = tls.acceptor();
        let router = router.clone();
        let stop = open.watcher();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(timeouts.handshake, acceptor.accept(tcp)).await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::info!(peer = %peer, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(peer = %peer, "TLS handshake timed out");
                    return;
                }
            };
            let caller = Caller(identity_of(stream.get_ref().1.peer_certificates()));
            let service = router.map_request(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(caller.clone());
                request
            });
            serve_connection(stream, service, timeouts, stop, peer).await;
        });
    }
    // Closed first, so that new clients are refused during the drain
    // rather than left waiting in the backlog.
    drop(listener);
    open.close_all(drain).await;
}

/// Serves `router` over plain HTTP (the ops endpoints) on `addr` until
/// `shutdown`, with the same header and idle timeouts and the same drain
/// as the API (no TLS, so no handshake timeout): the ops port is often
/// open to a whole cluster network, and a connection it holds open costs
/// the same file descriptors the API needs.
pub(super) async fn serve_plain(
    addr: SocketAddr,
    router: Router,
    timeouts: ConnectionTimeouts,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "ops endpoints listening (plain HTTP)");
    let open = OpenConnections::new();
    tokio::pin!(shutdown);
    while let Some((tcp, peer)) = accept(&listener, &mut shutdown).await {
        let (router, stop) = (router.clone(), open.watcher());
        tokio::spawn(serve_connection(tcp, router, timeouts, stop, peer));
    }
    drop(listener);
    open.close_all(drain).await;
    Ok(())
}

/// The next connection (with `TCP_NODELAY`), or `None` once `shutdown`
/// resolves. Accept errors (out of file descriptors, say) are retried
/// after a pause ([`AcceptBackoff`]).
async fn accept(
    listener: &TcpListener,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Option<(TcpStream, SocketAddr)> {
    let mut backoff = AcceptBackoff::default();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tokio::time::sleep(backoff.failed(&e)).await;
                    continue;
                }
            },
            () = shutdown.as_mut() => return None,
        };
        backoff.succeeded();
        // Responses go out as several writes (TLS records, HTTP/2
        // frames); with Nagle's algorithm on, a write waits for the ACK
        // of the previous one, which a client may delay by 40 ms.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(peer = %peer, error = %e, "cannot set TCP_NODELAY");
        }
        return Some((tcp, peer));
    }
}

/// Serves one connection (see [`serve_http`]), logging how it ended.
async fn serve_connection<I, S>(
    stream: I,
    service: S,
    timeouts: ConnectionTimeouts,
    stop: watch::Receiver<bool>,
    peer: SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request<Incoming>, Response = axum::response::Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let served = serve_http(stream, service, timeouts.headers, timeouts.idle, stop).await;
    if let Err(e) = served {
        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
    }
}
