//! A minimal HTTP/1.1 responder for the client's own tests, on TCP or a
//! unix socket: it records each request and answers from a script. Enough
//! HTTP for keep-alive, `content-length` bodies, and connections that close
//! or hang; the real sidecar is tested end to end elsewhere.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;

/// What to do with the next request.
#[derive(Debug, Clone)]
pub(crate) enum Reply {
    /// Answer with this status and body (sent as `application/json`).
    Answer(u16, String),
    /// Like `Answer`, with one more header (name, value).
    AnswerWithHeader(u16, (&'static str, &'static str), String),
    /// Close the connection without answering.
    Close,
    /// Never answer.
    Hang,
    /// A 200 whose head announces this many bytes of body, then a few,
    /// then the connection stays open.
    Announce(u64),
    /// This status, with half of this body of the length announced; then
    /// the connection closes.
    Truncate(u16, String),
}

/// One request as received.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub(crate) method: String,
    pub(crate) path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

#[derive(Clone)]
struct Shared {
    script: Arc<Mutex<VecDeque<Reply>>>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    connections: Arc<AtomicUsize>,
}

/// A running responder; stops accepting when dropped.
pub(crate) struct TestServer {
    shared: Shared,
    accept: JoinHandle<()>,
}

/// `Reply::Answer` from a status and a JSON value.
pub(crate) fn answer(status: u16, body: Value) -> Reply {
    Reply::Answer(status, body.to_string())
}

/// The sidecar's error answer.
pub(crate) fn error(status: u16, code: &str) -> Reply {
    answer(
        status,
        serde_json::json!({"error": {"code": code, "message": format!("{code} (test)")}}),
    )
}

impl Recorded {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

impl TestServer {
    /// Listens on 127.0.0.1; returns the server and its base URL.
    pub(crate) async fn tcp(script: Vec<Reply>) -> (Self, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Shared::new(script);
        let state = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                state.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, state.clone()));
            }
        });
        (Self { shared, accept }, url)
    }

    /// Listens on a unix socket at `path`.
    pub(crate) fn unix(path: &Path, script: Vec<Reply>) -> Self {
        let listener = UnixListener::bind(path).unwrap();
        let shared = Shared::new(script);
        let state = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                state.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, state.clone()));
            }
        });
        Self { shared, accept }
    }

    pub(crate) fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub(crate) fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Shared {
    fn new(script: Vec<Reply>) -> Self {
        Self {
            script: Arc::new(Mutex::new(script.into())),
            requests: Arc::default(),
            connections: Arc::default(),
        }
    }
}

/// Serves requests on one connection until the peer or the script closes it.
async fn serve(stream: impl AsyncRead + AsyncWrite + Unpin, state: Shared) {
    let mut stream = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut words = line.split_whitespace();
        let method = words.next().unwrap_or_default().to_owned();
        let path = words.next().unwrap_or_default().to_owned();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map_or(0, |(_, v)| v.parse::<usize>().unwrap());
        let mut body = vec![0; length];
        if stream.read_exact(&mut body).await.is_err() {
            return;
        }
        state.requests.lock().unwrap().push(Recorded { method, path, headers, body });

        let reply = state.script.lock().unwrap().pop_front();
        let (status, extra, body) = match reply.unwrap_or_else(|| error(500, "script_exhausted")) {
            Reply::Answer(status, body) => (status, String::new(), body),
            Reply::AnswerWithHeader(status, (name, value), body) => {
                (status, format!("{name}: {value}\r\n"), body)
            }
            Reply::Close => return,
            Reply::Truncate(status, body) => {
                let head = format!(
                    "HTTP/1.1 {status} Test\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\n\r\n",
                    body.len()
                );
                let half = body.get(..body.len() / 2).unwrap_or_default();
                let _ = stream.write_all(format!("{head}{half}").as_bytes()).await;
                let _ = stream.flush().await;
                return;
            }
            Reply::Hang => std::future::pending().await,
            Reply::Announce(len) => {
                let head = format!(
                    "HTTP/1.1 200 Test\r\ncontent-type: application/json\r\n\
                     content-length: {len}\r\n\r\n{{\"record\":"
                );
                if stream.write_all(head.as_bytes()).await.is_ok() {
                    std::future::pending::<()>().await;
                }
                return;
            }
        };
        let head = format!(
            "HTTP/1.1 {status} Test\r\ncontent-type: application/json\r\n{extra}\
             content-length: {}\r\n\r\n",
            body.len()
        );
        let written = async {
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(body.as_bytes()).await?;
            stream.flush().await
        };
        if written.await.is_err() {
            return;
        }
    }
}
