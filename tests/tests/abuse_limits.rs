//! Abuse limits end to end (issue #9): per-identity rate limits at the key
//! service, per-connection limits at the sidecar, slow clients cut off,
//! deep JSON and oversized batches refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::pki::Validity;
use keygate_tests::keyservice::{KeyService, Options};
use keygate_tests::sidecar::Sidecar;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const ADMIN: &str = "spiffe://test/admin";
const ENC: &str = "spiffe://test/encryptor";
const SIDECAR: &str = "spiffe://test/sidecar-clinical";

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code in {body}"))
}

/// Sends `count` requests one after another; returns the 429 responses'
/// (Retry-After, body) and how many succeeded.
async fn burst(client: &reqwest::Client, url: &str, count: usize) -> (usize, Vec<(u64, Value)>) {
    let mut ok = 0;
    let mut limited = Vec::new();
    for _ in 0..count {
        let response = client.get(url).send().await.unwrap();
        match response.status().as_u16() {
            200 => {
                // Read the body, or the client cannot reuse the connection
                // (and a new connection has a bucket of its own).
                let _ = response.bytes().await;
                ok += 1;
            }
            429 => {
                let retry = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
                limited.push((retry, response.json().await.unwrap()));
            }
            other => panic!("unexpected status {other}"),
        }
    }
    (ok, limited)
}

#[tokio::test(flavor = "multi_thread")]
async fn key_service_rate_limits_each_identity_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    // One token every 4 s: slow machines add at most a token or two
    // during the burst.
    let ks = KeyService::start(dir.path(), "[abuse]\nrate_per_sec = 0.25\nburst = 5\n");
    let url = format!("{}/v1/policy/self", ks.url);
    let (ok, limited) = burst(&ks.client(ENC), &url, 12).await;
    assert!((5..=7).contains(&ok), "the burst passes, then the limit bites: {ok} ok");
    assert!(!limited.is_empty());
    for (retry_after, body) in &limited {
        assert!((1..=4).contains(retry_after), "Retry-After {retry_after}");
        assert_eq!(code(body), "rate_limited", "{body}");
    }
    // Another identity is unaffected.
    let (ok, limited) = burst(&ks.client(ADMIN), &url, 3).await;
    assert_eq!((ok, limited.len()), (3, 0));
    // And the limited identity recovers at the configured rate.
    tokio::time::sleep(Duration::from_millis(4_100)).await;
    let (status, _) = ks.get(ENC, "/v1/policy/self").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn sidecar_rate_limits_each_connection_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(&dir.path().join("ks"), "");
    let sc = Sidecar::start(
        &ks,
        &dir.path().join("sc"),
        SIDECAR,
        "[abuse]\nrate_per_sec_per_connection = 0.1\nburst_per_connection = 4\n",
    );
    let url = format!("{}/healthz", sc.base);
    let one_connection = sc.new_client();
    let (ok, limited) = burst(&one_connection, &url, 10).await;
    assert!((4..=6).contains(&ok), "{ok} ok");
    assert!(!limited.is_empty());
    assert!(limited.iter().all(|(retry, body)| *retry >= 1 && code(body) == "rate_limited"));
    // A new connection has its own allowance.
    let (ok, limited) = burst(&sc.new_client(), &url, 3).await;
    assert_eq!((ok, limited.len()), (3, 0));
}

/// Writes `head` one byte every `pace` until the peer closes the
/// connection; returns how long that took (None: still open at `give_up`).
async fn trickle<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    head: &[u8],
    pace: Duration,
    give_up: Duration,
) -> (Option<Duration>, Vec<u8>) {
    let start = Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    for byte in head.iter().cycle() {
        if start.elapsed() > give_up {
            return (None, answer);
        }
        if stream.write_all(&[*byte]).await.is_err() || stream.flush().await.is_err() {
            return (Some(start.elapsed()), answer);
        }
        // Anything the server says (or its closing) ends the trickle.
        match tokio::time::timeout(pace, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return (Some(start.elapsed()), answer),
            Ok(Ok(n)) => {
                answer.extend_from_slice(&buf[..n]);
                // Read whatever else comes until the close.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        answer.extend_from_slice(&buf[..n]);
                    }
                })
                .await;
                return (Some(start.elapsed()), answer);
            }
            Err(_) => {} // nothing yet: send the next byte
        }
    }
    (None, answer)
}

/// A key service and a sidecar on loopback TCP with these `[abuse]`
/// settings, and the sidecar's address.
fn tcp_sidecar(dir: &std::path::Path, abuse: &str) -> (KeyService, Sidecar, String) {
    let ks = KeyService::start(&dir.join("ks"), "");
    let sc = Sidecar::start_tcp(&ks, &dir.join("sc"), SIDECAR, &format!("[abuse]\n{abuse}"));
    let addr = sc.base.trim_start_matches("http://").to_owned();
    (ks, sc, addr)
}

const SLOW_HEADERS: &[u8] =
    b"POST /v1/encrypt HTTP/1.1\r\nHost: localhost\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// Sends [`SLOW_HEADERS`] a byte at a time; the server (with
/// `header_read_timeout_secs = 1`) must close the connection within 4 s.
async fn headers_are_cut_off<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    let (closed, _) =
        trickle(stream, SLOW_HEADERS, Duration::from_millis(200), Duration::from_secs(10)).await;
    let closed = closed.expect("a client trickling headers is cut off");
    assert!(closed < Duration::from_secs(4), "{closed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_are_cut_off_at_the_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let (_ks, sc, addr) =
        tcp_sidecar(dir.path(), "header_read_timeout_secs = 1\nbody_read_timeout_secs = 1\n");

    // Headers byte by byte: the connection is closed after ~1 s.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    headers_are_cut_off(&mut tcp).await;

    // Complete headers, then the body byte by byte: 408 body_timeout.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(
        b"POST /v1/encrypt HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
    )
    .await
    .unwrap();
    let (closed, answer) =
        trickle(&mut tcp, b"{\"tenant\":", Duration::from_millis(200), Duration::from_secs(10))
            .await;
    let closed = closed.expect("a client trickling its body is cut off");
    assert!(closed < Duration::from_secs(4), "{closed:?}");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");

    // The sidecar still serves.
    let (status, _) = sc.get("/healthz").await;
    assert_eq!(status, 200);
}

/// A TLS connection to the key service presenting `identity`.
async fn tls_connect(
    ks: &KeyService,
    identity: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ks.pki.ca.cert_pem().as_bytes()).unwrap()).unwrap();
    let client = ks.pki.ca.issue_client(identity, Validity::days(1)).unwrap();
    let chain = vec![CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let port = ks.url.rsplit(':').next().unwrap();
    let tcp = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}")).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_are_cut_off_at_the_key_service() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(
        dir.path(),
        "[abuse]\nheader_read_timeout_secs = 1\nbody_read_timeout_secs = 1\n",
    );
    let mut tls = tls_connect(&ks, ENC).await;
    headers_are_cut_off(&mut tls).await;

    let mut tls = tls_connect(&ks, ENC).await;
    tls.write_all(
        b"POST /v1/tenants/onc/datakeys HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n",
    )
    .await
    .unwrap();
    let (closed, answer) =
        trickle(&mut tls, b"{\"count\":", Duration::from_millis(200), Duration::from_secs(10))
            .await;
    assert!(closed.expect("cut off") < Duration::from_secs(4));
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("body_timeout"), "{answer}");

    let (status, _) = ks.get(ENC, "/healthz").await;
    assert_eq!(status, 200);
}

/// HTTP/2 streams are held to the same body deadline: a stream whose body
/// stalls is answered 408 `body_timeout`, and the connection's other
/// streams are served as before.
#[tokio::test(flavor = "multi_thread")]
async fn slow_http2_bodies_are_cut_off_at_the_key_service() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(
        dir.path(),
        "[abuse]\nheader_read_timeout_secs = 1\nbody_read_timeout_secs = 1\n",
    );
    let tls = tls_connect(&ks, ENC).await;
    let (client, connection) = h2::client::handshake(tls).await.unwrap();
    let driver = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post("https://localhost/v1/tenants/onc/datakeys")
        .header("content-type", "application/json")
        .header("content-length", "500")
        .body(())
        .unwrap();
    let started = Instant::now();
    let (response, mut body) = client.send_request(request, false).unwrap();
    body.send_data(bytes::Bytes::from_static(b"{\"count\":"), false).unwrap();
    // ... and nothing more.
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("a stalled body is answered")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    assert_eq!(response.status().as_u16(), 408);
    let mut answer = Vec::new();
    let mut data = response.into_body();
    while let Some(chunk) = data.data().await {
        let chunk = chunk.unwrap();
        let _ = data.flow_control().release_capacity(chunk.len());
        answer.extend_from_slice(&chunk);
    }
    assert_eq!(code(&serde_json::from_slice(&answer).unwrap()), "body_timeout");

    // The same connection still serves another stream.
    let mut client = client.ready().await.unwrap();
    let request = http::Request::get("https://localhost/healthz").body(()).unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    assert_eq!(response.await.unwrap().status().as_u16(), 200);
    drop(client);
    driver.abort();
}

/// Waits up to 10 s for the peer to close `stream` without a word;
/// returns how long that took.
async fn closed_silently<S: AsyncRead + Unpin>(stream: &mut S) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("an idle connection is closed, not kept");
    assert!(matches!(read, Ok(0) | Err(_)), "closed without an answer: {read:?}");
    started.elapsed()
}

/// The HTTP/2 client preface and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
const GOAWAY: u8 = 7;
const PING: u8 = 6;

/// Reads HTTP/2 frames until the stream ends, acknowledging SETTINGS and,
/// if `answer_pings`, PINGs. Returns the frame types read, and how the
/// stream ended: `Ok` at a clean end (TLS: with close_notify).
async fn h2_frames<S>(stream: &mut S, answer_pings: bool) -> (Vec<u8>, std::io::Result<()>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut buf, mut types, mut chunk) = (Vec::new(), Vec::new(), [0u8; 4096]);
    loop {
        while buf.len() >= 9 {
            let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (kind, ack) = (buf[3], buf[4] & 1 == 1);
            let answer = match kind {
                4 if !ack => vec![0, 0, 0, 4, 1, 0, 0, 0, 0],
                PING if !ack && answer_pings => {
                    [&[0, 0, 8, PING, 1, 0, 0, 0, 0], &buf[9..17]].concat()
                }
                _ => Vec::new(),
            };
            if let Err(e) = stream.write_all(&answer).await {
                return (types, Err(e));
            }
            types.push(kind);
            buf.drain(..9 + len);
        }
        match stream.read(&mut chunk).await {
            Ok(0) => return (types, Ok(())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return (types, Err(e)),
        }
    }
}

/// A connection with no request in flight and no byte moving for
/// `idle_timeout_secs` is closed: one that never sends a byte (which no
/// header timeout covers), and an HTTP/2 one after its handshake. A
/// request in flight keeps its connection however quiet it is, and a
/// pooling client carries on over a new connection.
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed_at_the_key_service() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(
        dir.path(),
        "[abuse]\nidle_timeout_secs = 1\nheader_read_timeout_secs = 30\nbody_read_timeout_secs = 3\n",
    );
    let mut tls = tls_connect(&ks, ENC).await;
    let closed = closed_silently(&mut tls).await;
    assert!(closed < Duration::from_secs(4), "{closed:?}");

    // HTTP/2: closed in order, with a GOAWAY and TLS's close_notify.
    let mut tls = tls_connect(&ks, ENC).await;
    tls.write_all(H2_PREFACE).await.unwrap();
    let started = Instant::now();
    let (frames, ended) = tokio::time::timeout(Duration::from_secs(10), h2_frames(&mut tls, true))
        .await
        .expect("an idle HTTP/2 connection is closed, not kept");
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    assert!(frames.contains(&GOAWAY), "{frames:?}");
    ended.expect("closed with TLS's close_notify, not dropped");

    // An HTTP/2 client that stops reading never answers the PING that
    // comes with the first GOAWAY: its connection is dropped a grace
    // period (5 s) later.
    let mut tls = tls_connect(&ks, ENC).await;
    tls.write_all(H2_PREFACE).await.unwrap();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (frames, _) = tokio::time::timeout(Duration::from_secs(10), h2_frames(&mut tls, false))
        .await
        .expect("dropped, not kept");
    let closed = started.elapsed();
    assert!(closed > Duration::from_secs(5) && closed < Duration::from_secs(9), "{closed:?}");
    assert!(frames.contains(&GOAWAY) && frames.contains(&PING), "{frames:?}");

    // In flight: a stalled body waits for its own deadline (3 s), well past
    // the idle timeout, and is answered.
    let mut tls = tls_connect(&ks, ENC).await;
    let started = Instant::now();
    tls.write_all(
        b"POST /v1/tenants/onc/datakeys HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"count\":",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("body_timeout"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(2500), "{:?}", started.elapsed());

    // A client that keeps its connections in a pool: the one it used is
    // closed while it waits, and its next request goes over a new one.
    let client = ks.client(ENC);
    let url = format!("{}/healthz", ks.url);
    for _ in 0..2 {
        assert_eq!(client.get(&url).send().await.unwrap().status().as_u16(), 200);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Shutting down (SIGTERM): a request in flight is still answered, and a
/// connection with nothing in flight is closed in order (HTTP/2: GOAWAY).
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_answers_requests_in_flight_and_closes_the_rest_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut ks = KeyService::start(dir.path(), "[abuse]\nbody_read_timeout_secs = 30\n");
    let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    let mut idle = tls_connect(&ks, ENC).await;
    idle.write_all(H2_PREFACE).await.unwrap();
    let closing = tokio::spawn(async move { h2_frames(&mut idle, true).await });

    // A request whose body is half sent when the signal comes.
    let body = r#"{"count": 1}"#;
    let mut in_flight = tls_connect(&ks, ENC).await;
    let head = format!(
        "POST /v1/tenants/onc/datakeys HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    in_flight.write_all(head.as_bytes()).await.unwrap();
    in_flight.write_all(&body.as_bytes()[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let port: u16 = ks.url.rsplit(':').next().unwrap().parse().unwrap();
    let stopped = tokio::task::spawn_blocking(move || ks.stop());

    let (frames, ended) = tokio::time::timeout(Duration::from_secs(10), closing)
        .await
        .expect("the idle HTTP/2 connection is closed on shutdown")
        .unwrap();
    assert!(frames.contains(&GOAWAY), "{frames:?}");
    ended.expect("closed with TLS's close_notify, not dropped");
    // While the request in flight holds the drain open, a new client is
    // refused, not left waiting in the backlog.
    let late = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    assert!(late.is_err(), "a connection was accepted during the drain");
    in_flight.write_all(&body.as_bytes()[5..]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), in_flight.read_to_end(&mut answer))
        .await
        .expect("answered, then closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    stopped.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed_at_the_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let (_ks, sc, addr) = tcp_sidecar(dir.path(), "idle_timeout_secs = 1\n");
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let closed = closed_silently(&mut tcp).await;
    assert!(closed < Duration::from_secs(4), "{closed:?}");
    let (status, _) = sc.get("/healthz").await;
    assert_eq!(status, 200);

    // HTTP/2: closed in order, with a GOAWAY.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(H2_PREFACE).await.unwrap();
    let (frames, ended) = tokio::time::timeout(Duration::from_secs(10), h2_frames(&mut tcp, true))
        .await
        .expect("an idle HTTP/2 connection is closed, not kept");
    assert!(frames.contains(&GOAWAY), "{frames:?}");
    ended.unwrap();
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test(flavor = "multi_thread")]
async fn deep_json_is_refused_before_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(&dir.path().join("ks"), "");
    let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    // Key service: 80 levels (under serde_json's own 128) is over our 64.
    let body = format!(
        r#"{{"events":[{{"actor":"a","action":"record.encrypt","tenant":"onc","outcome":"ok","ts_ms":1,"fields":{{"f":{}}}}}]}}"#,
        nested(80)
    );
    let response = ks
        .client(SIDECAR)
        .post(format!("{}/v1/audit/events", ks.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(code(&response.json::<Value>().await.unwrap()), "json_too_deep");
    // The same event, shallow, is accepted.
    let shallow = json!({"events": [{"actor": "a", "action": "record.encrypt", "tenant": "onc", "outcome": "ok", "ts_ms": 1, "fields": {"f": [[1]]}}]});
    let (status, body) = ks.post(SIDECAR, "/v1/audit/events", &shallow).await;
    assert_eq!(status, 200, "{body}");

    // Sidecar: a record nested past limits.max_depth (64), and a body
    // nested far past serde_json's limit.
    let sc = Sidecar::start(&ks, &dir.path().join("sc"), SIDECAR, "");
    for depth in [70, 100_000] {
        let body =
            format!(r#"{{"tenant":"onc","schema":"patient","record":{{"x":{}}}}}"#, nested(depth));
        let (status, answer) = sc.post_raw("/v1/encrypt", body.into_bytes()).await;
        assert_eq!((status, code(&answer)), (400, "json_too_deep"), "{depth}");
    }
    let ok = json!({"tenant": "onc", "schema": "patient", "record": {"x": serde_json::from_str::<Value>(&nested(20)).unwrap()}});
    let (status, answer) = sc.post("/v1/encrypt", &ok).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_batches_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(&dir.path().join("ks"), "[limits]\nmax_batch = 50\n");
    let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    let (status, body) = ks.post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 51})).await;
    assert_eq!((status, code(&body)), (400, "batch_too_large"));
    let (status, body) = ks.post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 50})).await;
    assert_eq!(status, 200, "{body}");
    let key = &body["keys"][0];
    let item =
        json!({"record_key_id": key["record_key_id"], "kek_version": 1, "wrapped": key["wrapped"]});
    let items: Vec<Value> = (0..51).map(|_| item.clone()).collect();
    for path in ["/v1/tenants/onc/datakeys/unwrap", "/v1/tenants/onc/datakeys/rewrap"] {
        let (status, body) = ks.post(SIDECAR, path, &json!({"items": items})).await;
        assert_eq!((status, code(&body)), (400, "batch_too_large"), "{path}");
    }
    let fields: Vec<Value> =
        (0..51).map(|_| json!({"path": "/mrn", "mode": "deterministic"})).collect();
    let (status, body) = ks
        .post(SIDECAR, "/v1/tenants/onc/derived", &json!({"schema": "patient", "fields": fields}))
        .await;
    assert_eq!((status, code(&body)), (400, "batch_too_large"));

    let sc = Sidecar::start(&ks, &dir.path().join("sc"), SIDECAR, "[limits]\nmax_records = 10\n");
    let records: Vec<Value> = (0..11).map(|i| json!({"name": format!("p{i}")})).collect();
    let (status, body) = sc
        .post("/v1/encrypt", &json!({"tenant": "onc", "schema": "patient", "records": records}))
        .await;
    assert_eq!((status, code(&body)), (400, "too_many_records"));
    let (status, body) = sc.post("/v1/decrypt", &json!({"records": records})).await;
    assert_eq!((status, code(&body)), (400, "too_many_records"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_encrypt_answer_is_bounded_by_the_body_limit() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(&dir.path().join("ks"), "");
    let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    let sc =
        Sidecar::start(&ks, &dir.path().join("sc"), SIDECAR, "[limits]\nmax_body_bytes = 100000\n");
    // Ten records of 3,000 one-digit allergies: 60 kB in, each digit a
    // sealed value of some 90 bytes out (padded to 16), 2.7 MB in all.
    let tiny: Vec<Value> = (0..10).map(|_| json!({"allergies": vec![1; 3_000]})).collect();
    let request = json!({"tenant": "onc", "schema": "patient", "records": tiny});
    assert!(serde_json::to_vec(&request).unwrap().len() < 100_000);
    let (status, body) = sc.post("/v1/encrypt", &request).await;
    assert_eq!((status, code(&body)), (413, "answer_too_large"), "{body}");
    // Ordinary records under the same limit are fine.
    let records: Vec<Value> = (0..50)
        .map(|i| json!({"name": format!("p{i}"), "ssn": "123-45-6789", "allergies": ["latex"]}))
        .collect();
    let (status, body) = sc
        .post("/v1/encrypt", &json!({"tenant": "onc", "schema": "patient", "records": records}))
        .await;
    assert_eq!(status, 200, "{body}");
}

/// Writes a whole HTTP/1.1 request, as most clients do before they read,
/// then reads the answer's head and JSON body.
async fn send_whole_then_read<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    head: &str,
    body: impl Iterator<Item = Vec<u8>>,
) -> std::io::Result<(String, Value)> {
    stream.write_all(head.as_bytes()).await?;
    for chunk in body {
        stream.write_all(&chunk).await?;
    }
    stream.flush().await?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            let n = stream.read(&mut buf).await?;
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer);
            if let Some((head, body)) = text.split_once("\r\n\r\n")
                && let Ok(json) = serde_json::from_str::<Value>(body)
            {
                return Ok((head.to_owned(), json));
            }
            if n == 0 {
                return Err(std::io::Error::other(format!("closed after {text:?}")));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read_all).await.expect("an answer in time")
}

/// An oversized body is answered 413 `body_too_large` to a client that
/// sends it all before reading (not a reset connection), declared or
/// chunked, at the sidecar and over TLS at the key service; the connection
/// then serves its next request.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_bodies_are_answered_not_reset() {
    let dir = tempfile::tempdir().unwrap();
    let (ks, _sc, addr) = tcp_sidecar(dir.path(), "");

    // The sidecar's limit is 16 MiB.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    refused_both_ways(&mut tcp, "/v1/encrypt", 40).await;
    let (status, _) =
        send_whole_then_read(&mut tcp, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n", mib(0))
            .await
            .unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "the same connection serves on: {status}");

    // The key service's limit is 8 MiB.
    let mut tls = tls_connect(&ks, ENC).await;
    refused_both_ways(&mut tls, "/v1/tenants/onc/datakeys", 20).await;
}

/// `count` MiB of spaces, a MiB at a time.
fn mib(count: usize) -> impl Iterator<Item = Vec<u8>> {
    (0..count).map(|_| vec![b' '; 1024 * 1024])
}

/// Posts `mib` MiB to `path` with a Content-Length, then chunked, on one
/// connection; each must be answered 413 `body_too_large`.
async fn refused_both_ways<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    path: &str,
    mib: usize,
) {
    let head = "Host: localhost\r\nContent-Type: application/json\r\n";
    let declared = format!("POST {path} HTTP/1.1\r\n{head}Content-Length: {}\r\n\r\n", mib << 20);
    let chunked = format!("POST {path} HTTP/1.1\r\n{head}Transfer-Encoding: chunked\r\n\r\n");
    let chunks = self::mib(mib)
        .map(|c| [format!("{:x}\r\n", c.len()).into_bytes(), c, b"\r\n".to_vec()].concat())
        .chain(std::iter::once(b"0\r\n\r\n".to_vec()));
    for (head, body) in [
        (declared, Box::new(self::mib(mib)) as Box<dyn Iterator<Item = Vec<u8>>>),
        (chunked, Box::new(chunks)),
    ] {
        let (status, answer) = send_whole_then_read(stream, &head, body).await.unwrap();
        assert!(status.starts_with("HTTP/1.1 413"), "{path}: {status}");
        assert_eq!(code(&answer), "body_too_large");
    }
}

/// A body further over the limit than the drain allows (64 MiB) is not
/// read on: the connection is closed, so a refused body cannot hold the
/// server reading indefinitely.
#[tokio::test(flavor = "multi_thread")]
async fn an_endless_oversized_body_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (_ks, sc, addr) = tcp_sidecar(dir.path(), "");
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = "POST /v1/encrypt HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n";
    let endless = mib(1000);
    let sent = tokio::time::timeout(
        Duration::from_secs(20),
        send_whole_then_read(&mut tcp, head, endless),
    )
    .await
    .expect("cut off in time");
    assert!(sent.is_err(), "1000 MiB were taken: {sent:?}");
    let (status, _) = sc.get("/healthz").await;
    assert_eq!(status, 200);
}

/// The plain ops listener (`ops_listen`) is held to the API's limits: a
/// client trickling its headers is cut off, a silent connection is closed,
/// and the endpoints still answer.
#[tokio::test(flavor = "multi_thread")]
async fn the_ops_listener_cuts_off_slow_and_idle_clients() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ops = format!("127.0.0.1:{port}");
    let _ks = KeyService::start_with(
        dir.path(),
        &Options {
            extra: "[abuse]\nheader_read_timeout_secs = 1\nidle_timeout_secs = 2\n",
            env: &[("KEYGATE_OPS_LISTEN", &ops)],
            ..Options::default()
        },
    );
    let url = format!("http://{ops}");
    let metrics = reqwest::get(format!("{url}/metrics")).await.unwrap();
    assert_eq!(metrics.status(), 200);
    let healthz = reqwest::get(format!("{url}/healthz")).await.unwrap();
    assert_eq!(healthz.status(), 200);

    let mut tcp = tokio::net::TcpStream::connect(&ops).await.unwrap();
    headers_are_cut_off(&mut tcp).await;

    let mut silent = tokio::net::TcpStream::connect(&ops).await.unwrap();
    let closed = closed_silently(&mut silent).await;
    assert!(closed >= Duration::from_millis(1500), "not before the idle timeout: {closed:?}");

    let healthz = reqwest::get(format!("{url}/healthz")).await.unwrap();
    assert_eq!(healthz.status(), 200, "still serving");
}
