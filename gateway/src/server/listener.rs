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

use crate::abuse::{
    AcceptBackoff, ConnectionSlots, Ended, OpenConnections, Refusal, SlotLimits, serve_http_with,
};
use crate::metrics::{ConnectionRefusedLabels, IdentityRefusedLabels, Metrics};
use crate::tls::{TlsReloader, client_identity};

/// The verified identity of a connection's client (its certificate's URI
/// SAN, else its first DNS SAN; see [`client_identity`]); `None` if the
/// certificate names none (counted in
/// `keygate_client_identities_refused_total`).
#[derive(Debug, Clone)]
pub struct Caller(pub Option<String>);

/// How many connections a listener keeps open, and how long a client may
/// take over each part of a connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConnectionLimits {
    /// Most connections open at once (each listener its own), counted
    /// from before the TLS handshake, and of those, most still in their
    /// handshake, in all and from one peer; more are closed when accepted.
    pub(super) slots: SlotLimits,
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
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let open = OpenConnections::new();
    let slots = ConnectionSlots::new(limits.slots);
    tokio::pin!(shutdown);
    while let Some((tcp, peer)) = accept(&listener, &mut shutdown).await {
        // Closed at once: a flood costs an accept per connection, not a
        // handshake or a task.
        let mut slot = match slots.take(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                count_refusal(&metrics, "api", refusal);
                continue;
            }
        };
        let acceptor = tls.acceptor();
        let router = router.clone();
        let stop = open.watcher();
        let metrics = metrics.clone();
        tokio::spawn(async move {
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
            // Authenticated: the connection keeps its slot, and its place
            // among the handshakes goes to the next one.
            slot.handshake_done();
            let identity = match client_identity(stream.get_ref().1.peer_certificates()) {
                Ok(identity) => Some(identity),
                Err(why) => {
                    // Counted: a renewal that changed the SAN's spelling
                    // otherwise shows only as 403s.
                    let reason = why.as_str();
                    tracing::info!(
                        peer = %peer,
                        reason,
                        "client certificate gives no identity: only the open routes answer it"
                    );
                    metrics
                        .client_identities_refused
                        .get_or_create(&IdentityRefusedLabels { reason })
                        .inc();
                    None
                }
            };
            let caller = Caller(identity.clone());
            let service = router.map_request(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(caller.clone());
                request
            });
            let who = Peer { addr: peer, identity };
            serve_connection(stream, service, limits, stop, &who, &metrics).await;
            drop(slot);
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
/// handshake timeout or budget; no keys, so no send limit): the ops port
/// is often open to a whole cluster network, and a connection it holds
/// open costs the same file descriptors the API needs.
pub(super) async fn serve_plain(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let limits = ConnectionLimits { send: None, ..limits };
    let open = OpenConnections::new();
    let slots = ConnectionSlots::new(limits.slots);
    tokio::pin!(shutdown);
    while let Some((tcp, peer)) = accept(&listener, &mut shutdown).await {
        let mut slot = match slots.take(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                count_refusal(&metrics, "ops", refusal);
                continue;
            }
        };
        // No handshake: the connection is established once accepted.
        slot.handshake_done();
        let (router, stop, metrics) = (router.clone(), open.watcher(), metrics.clone());
        tokio::spawn(async move {
            let who = Peer { addr: peer, identity: None };
            serve_connection(tcp, router, limits, stop, &who, &metrics).await;
            drop(slot);
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

/// A connection closed at accept (the slots log it).
fn count_refusal(metrics: &Metrics, listener: &'static str, refusal: Refusal) {
    let labels = ConnectionRefusedLabels { listener, reason: refusal.as_str() };
    metrics.connections_refused.get_or_create(&labels).inc();
}

/// Who is at the other end of a connection, for its log lines.
struct Peer {
    addr: SocketAddr,
    /// The client certificate's identity, if it names one.
    identity: Option<String>,
}

/// Serves one connection (see [`serve_http_with`]), logging how it ended.
async fn serve_connection<I, S>(
    stream: I,
    service: S,
    limits: ConnectionLimits,
    stop: watch::Receiver<bool>,
    peer: &Peer,
    metrics: &Metrics,
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
    let identity = peer.identity.as_deref().unwrap_or("none");
    match served {
        Ok(Ended::Closed) => {}
        Ok(Ended::SendOverdue) => {
            metrics.key_sends_overdue.inc();
            tracing::warn!(
                peer = %peer.addr,
                identity,
                "an answer carrying keys was not taken within limits.keys_send_timeout_secs: \
                 connection closed"
            );
        }
        Err(e) => {
            tracing::debug!(peer = %peer.addr, identity, error = %e, "connection ended with an error");
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::Extension;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::config::TlsConfig;
    use crate::pki::{DevCa, Validity};

    fn refused(metrics: &Metrics, listener: &'static str, reason: &'static str) -> u64 {
        let labels = ConnectionRefusedLabels { listener, reason };
        metrics.connections_refused.get_or_create(&labels).get()
    }

    /// A shutdown signal for a listener, and its trigger.
    fn shutdown() -> (watch::Sender<bool>, impl std::future::Future<Output = ()>) {
        let (stop_tx, mut stop) = watch::channel(false);
        (stop_tx, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
    }

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
            slots: SlotLimits { connections: 2, handshakes: 1, handshakes_per_peer: 1 },
            handshake: Duration::from_secs(10),
            headers: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            send: None,
        };
        let router = Router::new().route("/", get(|| async { "ok" }));
        let (stop_tx, shutdown) = shutdown();
        let metrics = Arc::new(Metrics::default());
        let server = tokio::spawn(serve_plain(
            listener,
            router,
            limits,
            metrics.clone(),
            shutdown,
            Duration::ZERO,
        ));
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        assert!(answered(&mut first).await && answered(&mut second).await);
        // Both slots taken: a third connection is closed unanswered (and
        // counted). No handshake, so the handshake budgets do not apply.
        let mut third = TcpStream::connect(addr).await.unwrap();
        assert!(!answered(&mut third).await);
        assert_eq!(refused(&metrics, "ops", "connections"), 1);
        assert_eq!(refused(&metrics, "ops", "peer_handshakes"), 0);
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

    #[tokio::test]
    async fn stalled_handshakes_from_one_address_do_not_keep_an_authenticated_client_out() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("keygate test CA").unwrap();
        let server = ca.issue_server(&["localhost"], Validity::days(1)).unwrap();
        let client = ca.issue_client("spiffe://test/sidecar", Validity::days(1)).unwrap();
        let paths = TlsConfig {
            cert: dir.path().join("server.crt"),
            key: dir.path().join("server.key"),
            client_ca: dir.path().join("ca.crt"),
            reload_interval_secs: 5,
        };
        std::fs::write(&paths.cert, &server.cert_pem).unwrap();
        std::fs::write(&paths.key, server.key_pem.as_bytes()).unwrap();
        std::fs::write(&paths.client_ca, ca.cert_pem()).unwrap();
        let tls =
            Arc::new(TlsReloader::load(&paths, crate::compliance::Profile::Development).unwrap());

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnectionLimits {
            slots: SlotLimits { connections: 12, handshakes: 6, handshakes_per_peer: 4 },
            // Long enough that no stalled handshake times out in the test.
            handshake: Duration::from_secs(60),
            headers: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            send: Some(Duration::from_secs(10)),
        };
        let router = Router::new().route(
            "/",
            get(|Extension(caller): Extension<Caller>| async move { caller.0.unwrap_or_default() }),
        );
        let (stop_tx, shutdown) = shutdown();
        let metrics = Arc::new(Metrics::default());
        let server = tokio::spawn(serve_tls(
            listener,
            tls,
            router,
            limits,
            metrics.clone(),
            shutdown,
            Duration::ZERO,
        ));

        // 127.0.0.1 opens 20 connections and never starts a handshake: it
        // gets its 4, the other 16 are closed at once.
        let mut stalled = Vec::new();
        for _ in 0..20 {
            stalled.push(TcpStream::connect(addr).await.unwrap());
        }
        for _ in 0..500 {
            if refused(&metrics, "api", "peer_handshakes") == 16 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(refused(&metrics, "api", "peer_handshakes"), 16);

        // A client with a certificate, from another address, is served,
        // on one new connection after another (each gives its place among
        // the handshakes back once its handshake is done).
        let pem = format!("{}{}", client.cert_pem, client.key_pem.as_str());
        let http = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca.cert_pem().as_bytes()).unwrap()])
            .identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap())
            .local_address(Some("127.0.0.2".parse().unwrap()))
            .resolve("localhost", addr)
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        for _ in 0..3 {
            let answer = http
                .get(format!("https://localhost:{}/", addr.port()))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert_eq!(answer, "spiffe://test/sidecar");
        }
        assert_eq!(refused(&metrics, "api", "handshakes"), 0);
        assert_eq!(refused(&metrics, "api", "connections"), 0);

        let _ = stop_tx.send(true);
        drop(stalled);
        server.await.unwrap();
    }
}
