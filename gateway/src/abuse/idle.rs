//! Closing connections that sit idle.
//!
//! hyper's HTTP/1 header timeout starts with a request's first byte; the
//! protocol detection in front of it and HTTP/2 have no timeout at all. A
//! client that connects and then sends nothing would hold its socket (and
//! one of the process's file descriptors) for ever, and so would one that
//! stops reading its answer. A connection is idle while no request is in
//! flight and no byte moves either way; idle for `idle_timeout_secs`, it is
//! closed, in order ([`serve_until_idle`]). A connection with a send limit
//! is closed too when an answer carrying keys waits longer than that to be
//! sent ([`super::sends`]), idle or not.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use super::sends::SecretSends;

/// What one connection is doing, shared by its IO, its requests and the
/// task that closes it.
struct Activity {
    epoch: Instant,
    /// Milliseconds from `epoch` to the last read or write that moved bytes.
    last_io_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            last_io_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_io_ms.store(ms, Ordering::Relaxed);
    }

    /// Counts a request as in flight until the guard is dropped.
    pub(crate) fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Resolves once the connection has been idle for `timeout`.
    pub(crate) async fn idle_for(&self, timeout: Duration) {
        loop {
            let last_io = Duration::from_millis(self.last_io_ms.load(Ordering::Relaxed));
            let quiet = self.epoch.elapsed().saturating_sub(last_io);
            let wait = if self.in_flight.load(Ordering::Relaxed) > 0 {
                // A request may take long without a byte moving (waiting
                // for its body has a deadline of its own); look again later.
                timeout
            } else if quiet >= timeout {
                return;
            } else {
                timeout - quiet
            };
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
        }
    }
}

/// How long an idle connection may take to close in order (HTTP/2 waits
/// for the client to answer a PING before its last GOAWAY; a client that
/// stopped reading never does).
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How a connection served by [`serve_http_with`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// It closed, or was closed (idle, shutting down).
    Closed,
    /// It was closed because an answer carrying keys was not taken within
    /// the send limit (the caller counts and logs it, naming the peer).
    SendOverdue,
}

/// Serves HTTP/1.1 or HTTP/2 with `service` on one accepted connection:
/// an HTTP/1 request's headers within `headers`, and the connection closed
/// in order when idle for `idle` or when `stop` turns true
/// ([`serve_until_idle`]). Every listener serves its connections so. With
/// a `send_limit`, each request gets the connection's [`SecretSends`] in
/// its extensions, and an answer it notes there that is still unsent after
/// `send_limit` closes the connection at once (dropping the answer):
/// [`Ended::SendOverdue`].
pub(crate) async fn serve_http_with<I, S>(
    io: I,
    service: S,
    headers: Duration,
    idle: Duration,
    send_limit: Option<Duration>,
    stop: watch::Receiver<bool>,
) -> Result<Ended, Box<dyn std::error::Error + Send + Sync>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            Request<Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let activity = Activity::new();
    let sends = send_limit.map(|limit| (SecretSends::default(), limit));
    let service = Counted::new(service, activity.clone(), sends.as_ref().map(|(s, _)| s.clone()));
    let io = TokioIo::new(Watched::new(io, activity.clone()));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(headers);
    let connection = builder.serve_connection(io, TowerToHyperService::new(service));
    let overdue = async {
        match &sends {
            Some((sends, limit)) => sends.overdue(*limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        served = serve_until_idle(connection, &activity, idle, stop) => {
            served.map(|()| Ended::Closed)
        }
        () = overdue => Ok(Ended::SendOverdue),
    }
}

/// Serves `connection` until it ends. Once it has been idle for `idle`, or
/// when `stop` turns true (the server shutting down), it is closed in
/// order: HTTP/2 sends GOAWAY and finishes the streams in flight, HTTP/1
/// stops keep-alive, and the stream is shut down after (with TLS's
/// close_notify), so a client can tell a closed connection from a lost
/// one. An idle one that has not closed [`CLOSE_GRACE`] later is dropped;
/// on shutdown, the server's drain bound applies instead
/// ([`OpenConnections::close_all`]).
async fn serve_until_idle<C>(
    connection: C,
    activity: &Activity,
    idle: Duration,
    mut stop: watch::Receiver<bool>,
) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    tokio::pin!(connection);
    let idle = tokio::select! {
        served = connection.as_mut() => return served,
        () = activity.idle_for(idle) => true,
        // An error: the server is gone, which is a reason to stop too.
        _ = stop.wait_for(|stopping| *stopping) => false,
    };
    connection.as_mut().graceful_shutdown();
    if !idle {
        return connection.await;
    }
    tracing::debug!("idle connection: closing it");
    match tokio::time::timeout(CLOSE_GRACE, connection).await {
        Ok(served) => served,
        Err(_) => {
            tracing::debug!("an idle connection did not close in time: dropped");
            Ok(())
        }
    }
}

/// A server's open connections, as far as shutting down goes: each one
/// served by [`serve_until_idle`] with a [`Self::watcher`].
pub(crate) struct OpenConnections {
    stop: watch::Sender<bool>,
}

impl OpenConnections {
    pub(crate) fn new() -> Self {
        Self { stop: watch::Sender::new(false) }
    }

    /// For a new connection: tells it when the server stops, and counts it
    /// as open until dropped.
    pub(crate) fn watcher(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Closes every connection in order and waits until all have ended,
    /// for `drain` at most.
    pub(crate) async fn close_all(self, drain: Duration) {
        self.stop.send_replace(true);
        tokio::select! {
            () = self.stop.closed() => {}
            () = tokio::time::sleep(drain) => {
                tracing::warn!("shutdown: in-flight requests did not finish in time");
            }
        }
    }
}

/// A request in flight on a connection (see [`Activity::busy`]).
pub(crate) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's service, counting each request in flight on the
/// connection's [`Activity`] until its response is ready, and handing each
/// request the connection's [`SecretSends`] if it has them.
#[derive(Clone)]
struct Counted<S> {
    inner: S,
    activity: Arc<Activity>,
    sends: Option<SecretSends>,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S, activity: Arc<Activity>, sends: Option<SecretSends>) -> Self {
        Self { inner, activity, sends }
    }
}

impl<S, B> tower::Service<Request<B>> for Counted<S>
where
    S: tower::Service<Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if let Some(sends) = &self.sends {
            request.extensions_mut().insert(sends.clone());
        }
        let busy = self.activity.busy();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            drop(busy);
            response
        })
    }
}

/// A connection's byte stream, noting in its [`Activity`] every read and
/// write that moves bytes.
struct Watched<T> {
    io: T,
    activity: Arc<Activity>,
}

impl<T> Watched<T> {
    pub(crate) fn new(io: T, activity: Arc<Activity>) -> Self {
        Self { io, activity }
    }

    fn moved(&self, poll: &Poll<io::Result<usize>>) {
        if matches!(poll, Poll::Ready(Ok(n)) if *n > 0) {
            self.activity.touch();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, data);
        this.moved(&poll);
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, data);
        this.moved(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use axum::body::{Body, Bytes};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::abuse::PendingSend;

    /// An answer's bytes, with the send it is timed by and a flag set when
    /// they are dropped.
    struct Answer {
        bytes: Vec<u8>,
        _send: PendingSend,
        dropped: Arc<AtomicBool>,
    }

    impl AsRef<[u8]> for Answer {
        fn as_ref(&self) -> &[u8] {
            &self.bytes
        }
    }

    impl Drop for Answer {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::Relaxed);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_with_keys_not_taken_in_time_closes_its_connection() {
        let dropped = Arc::new(AtomicBool::new(false));
        let service = tower::service_fn({
            let dropped = dropped.clone();
            move |request: Request<Incoming>| {
                let sends = request.extensions().get::<SecretSends>().cloned();
                let answer = sends.map(|sends| Answer {
                    bytes: vec![b'k'; 1 << 20],
                    _send: sends.start(),
                    dropped: dropped.clone(),
                });
                async move {
                    let answer = answer.expect("the connection's sends");
                    Ok::<_, std::convert::Infallible>(axum::response::Response::new(Body::from(
                        Bytes::from_owner(answer),
                    )))
                }
            }
        });
        // The client asks, and then never reads (the pipe holds 4 KiB).
        let (mut client, server) = tokio::io::duplex(4096);
        let (_stop_tx, stop) = watch::channel(false);
        let limit = Duration::from_secs(10);
        // Both far longer than the send limit, so only it can close.
        let (headers, idle) = (Duration::from_secs(60), Duration::from_secs(120));
        let started = Instant::now();
        let served =
            tokio::spawn(serve_http_with(server, service, headers, idle, Some(limit), stop));
        client.write_all(b"GET / HTTP/1.1\r\nhost: keygate\r\n\r\n").await.unwrap();
        assert_eq!(served.await.unwrap().unwrap(), Ended::SendOverdue);
        assert_eq!(started.elapsed(), limit, "closed at the send limit, not when idle");
        assert!(dropped.load(Ordering::Relaxed), "the answer went with the connection");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_only_when_nothing_moves_and_nothing_is_in_flight() {
        let timeout = Duration::from_secs(10);
        let activity = Activity::new();
        let (a, mut b) = tokio::io::duplex(64);
        let mut watched = Watched::new(a, activity.clone());

        // Bytes moving either way keep the connection from being idle.
        let started = Instant::now();
        let watchdog = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(timeout).await }
        });
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            b.write_all(b"x").await.unwrap();
            let mut byte = [0u8; 1];
            watched.read_exact(&mut byte).await.unwrap();
            tokio::time::sleep(Duration::from_secs(6)).await;
            watched.write_all(b"y").await.unwrap();
            b.read_exact(&mut byte).await.unwrap();
        }
        assert!(!watchdog.is_finished());
        watchdog.await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(36 + 10));

        // A request in flight keeps it too, however long it is quiet.
        let started = Instant::now();
        let busy = activity.busy();
        let watchdog = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(timeout).await }
        });
        tokio::time::sleep(Duration::from_secs(35)).await;
        assert!(!watchdog.is_finished());
        drop(busy);
        watchdog.await.unwrap();
        // Idle from the last byte, once nothing is in flight: at the next look.
        assert_eq!(started.elapsed(), Duration::from_secs(40));
    }
}
