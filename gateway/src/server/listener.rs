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

use crate::abuse::{AcceptBackoff, ConnectionSlots, OpenConnections, serve_http_with};
use crate::tls::{TlsReloader, identity_of};

/// The verified identity of a connection's client (its certificate's URI
/// SAN, else DNS SAN); `None` if the certificate names neither.
#[derive(Debug, Clone)]
pub struct Caller(pub Option<String>);

/// How many connections a listener keeps open, and how long a client may
/// take over each part of a connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConnectionLimits {
    /// Most connections open at once (each listener its own), counted
    /// from before the TLS handshake; more are closed when accepted.
    pub(super) max_open: usize,
    /// To finish the TLS handshake.
    pub(super) handshake: Duration,
    /// To send an HTTP/1 request's headers, once begun.
    pub(super) headers: Duration,
    /// To do anything: no request in flight and no byte moving this long
    /// closes the connection.
    pub(super) idle: Duration,
    /// To take an answer carrying keys once it is ready (mutual-TLS API
    /// only): an answer not taken in time closes its connection.
    pub(super) send: Option<Duration>,
}

/// Serves `router` on `listener` over mutual TLS until `shutdown`
/// resolves, then lets in-flight requests finish (up to `drain`).
pub(super) async fn serve_tls(
    listener: TcpListener,
    tls: Arc<TlsReloader>,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let open = OpenConnections::new();
    let slots = ConnectionSlots::new(limits.max_open);
    tokio::pin!(shutdown);
    while let Some((tcp, peer)) = accept(&listener, &mut shutdown).await {
        // Closed at once: a flood costs an accept per connection, not a
        // handshake or a task.
        let Some(slot) = slots.take() else {
            tracing::debug!(peer = %peer, refused = slots.refused(), "no connection slot free");
            continue;
        };
        let acceptor = tls.acceptor();
        let router = router.clone();
        let stop = open.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
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
            serve_connection(stream, service, limits, stop, peer).await;
        });
    }
    // Closed first, so that new clients are refused during the drain
    // rather than left waiting in the backlog.
    drop(listener);
    open.close_all(drain).await;
}

/// Serves `router` over plain HTTP (the ops endpoints) on `listener`
/// until `shutdown`, with the same connection cap (its own slots), header
/// and idle timeouts and the same drain as the API (no TLS, so no
/// handshake timeout; no keys, so no send limit): the ops port is often
/// open to a whole cluster network, and a connection it holds open costs
/// the same file descriptors the API needs.
pub(super) async fn serve_plain(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let limits = ConnectionLimits { send: None, ..limits };
    let open = OpenConnections::new();
    let slots = ConnectionSlots::new(limits.max_open);
    tokio::pin!(shutdown);
    while let Some((tcp, peer)) = accept(&listener, &mut shutdown).await {
        let Some(slot) = slots.take() else {
            tracing::debug!(peer = %peer, refused = slots.refused(), "no connection slot free");
            continue;
        };
        let (router, stop) = (router.clone(), open.watcher());
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(tcp, router, limits, stop, peer).await;
        });
    }
    drop(listener);
    open.close_all(drain).await;
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

/// Serves one connection (see [`serve_http_with`]), logging how it ended.
async fn serve_connection<I, S>(
    stream: I,
    service: S,
    limits: ConnectionLimits,
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
    let served =
        serve_http_with(stream, service, limits.headers, limits.idle, limits.send, stop).await;
    if let Err(e) = served {
        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Asks for `/` on `stream` and says whether the whole answer came.
    async fn answered(stream: &mut TcpStream) -> bool {
        if stream.write_all(b"GET / HTTP/1.1\r\nhost: keygate\r\n\r\n").await.is_err() {
            return false;
        }
        let mut answer = Vec::new();
        let mut chunk = [0u8; 256];
        while !answer.ends_with(b"\r\n\r\nok") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
        answer.starts_with(b"HTTP/1.1 200")
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_slots_come_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnectionLimits {
            max_open: 2,
            handshake: Duration::from_secs(10),
            headers: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            send: None,
        };
        let router = Router::new().route("/", get(|| async { "ok" }));
        let (stop_tx, mut stop) = watch::channel(false);
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let server = tokio::spawn(serve_plain(listener, router, limits, shutdown, Duration::ZERO));
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        assert!(answered(&mut first).await && answered(&mut second).await);
        // Both slots taken: a third connection is closed unanswered.
        let mut third = TcpStream::connect(addr).await.unwrap();
        assert!(!answered(&mut third).await);
        // A slot comes back when its connection ends.
        drop(first);
        let mut fourth = None;
        for _ in 0..100 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            if answered(&mut stream).await {
                fourth = Some(stream);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(fourth.is_some(), "a freed slot is taken again");
        assert!(answered(&mut second).await, "the open connections are served on");
        let _ = stop_tx.send(true);
        server.await.unwrap();
    }
}
