//! The client's HTTP behaviour against the scripted responder in
//! `test_server`: transports, connection reuse, retries, timeouts, and the
//! request and answer shapes of every operation.

use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::test_server::{Reply, TestServer, answer, error};
use crate::{Client, ClientBuilder, Decrypted, Error, ErrorCode, FieldOutcome, SecretString};

const FAST: Duration = Duration::from_millis(5);

fn encrypted() -> Value {
    json!({"_kg": "kg1h:header", "ssn": "kg1:ciphertext", "age": 51})
}

fn encrypted_answer() -> Reply {
    answer(200, json!({"record": encrypted()}))
}

fn over_tcp(url: &str) -> ClientBuilder {
    Client::builder().base_url(url).retry_backoff(FAST)
}

fn report(id: &str, outcome: &str) -> Value {
    json!({
        "record_key_id": id, "tenant": "demo", "schema": "patient", "schema_version": 1,
        "kek_version": 3, "stale_key_version": false,
        "fields": [{"pointer": "/ssn", "class": "phi.identifier", "outcome": outcome}]
    })
}

#[tokio::test]
async fn unix_socket_transport_sends_the_documented_request() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sidecar.sock");
    let server = TestServer::unix(&socket, vec![encrypted_answer()]);
    let client = Client::builder()
        .unix_socket(&socket)
        .bearer_token(SecretString::from("s3cret-token"))
        .build()
        .unwrap();

    let out = client.encrypt("demo", "patient", &json!({"ssn": "123-45-6789", "age": 51})).await;

    assert_eq!(out.unwrap(), encrypted());
    let requests = server.requests();
    let [request] = requests.as_slice() else { panic!("{requests:?}") };
    assert_eq!((request.method.as_str(), request.path.as_str()), ("POST", "/v1/encrypt"));
    assert_eq!(request.header("authorization"), Some("Bearer s3cret-token"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(
        request.json(),
        json!({"tenant": "demo", "schema": "patient", "record": {"ssn": "123-45-6789", "age": 51}})
    );
}

#[tokio::test]
async fn clones_share_one_kept_alive_connection() {
    let (server, url) =
        TestServer::tcp(vec![encrypted_answer(), encrypted_answer(), encrypted_answer()]).await;
    let client = over_tcp(&url).build().unwrap();
    let clone = client.clone();
    let record = json!({"ssn": "1"});
    client.encrypt("demo", "patient", &record).await.unwrap();
    clone.encrypt("demo", "patient", &record).await.unwrap();
    client.encrypt("demo", "patient", &record).await.unwrap();
    assert_eq!(server.requests().len(), 3);
    assert_eq!(server.connections(), 1);
    assert!(server.requests()[0].header("authorization").is_none());
}

#[tokio::test]
async fn a_missing_socket_is_retried_until_the_sidecar_appears() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("late.sock");
    let client = Client::builder()
        .unix_socket(&socket)
        .retries(10)
        .retry_backoff(Duration::from_millis(20))
        .build()
        .unwrap();
    let record = json!({"ssn": "1"});
    let (server, out) = tokio::join!(
        async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            TestServer::unix(&socket, vec![encrypted_answer()])
        },
        client.encrypt("demo", "patient", &record),
    );
    assert_eq!(out.unwrap(), encrypted());
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn connection_refused_is_a_retryable_connect_error_naming_the_endpoint() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let client = over_tcp(&url).retries(2).build().unwrap();
    let err = client.pseudonym("demo", "patient", "P-42").await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains(&url), "{err}");
}

#[tokio::test]
async fn a_connection_closed_before_the_answer_is_retried() {
    let (server, url) = TestServer::tcp(vec![Reply::Close, encrypted_answer()]).await;
    let client = over_tcp(&url).build().unwrap();
    let out = client.encrypt("demo", "patient", &json!({"ssn": "1"})).await;
    assert_eq!(out.unwrap(), encrypted());
    assert_eq!(server.requests().len(), 2);
    assert_eq!(server.requests()[0].json(), server.requests()[1].json());
}

#[tokio::test]
async fn a_connection_closed_before_the_answer_is_a_transport_error() {
    let (_server, url) = TestServer::tcp(vec![Reply::Close]).await;
    let client = over_tcp(&url).retries(0).build().unwrap();
    let err = client.index("demo", "patient", "/email", "x", None).await.unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    assert!(err.is_retryable());
}

/// A success answer broken off is not retried: the sidecar did the work
/// (and audited it), so a retry would be a second access. An error answer
/// broken off is, as before.
#[tokio::test]
async fn a_success_answer_broken_off_is_not_retried() {
    let body = encrypted().to_string();
    let (server, url) = TestServer::tcp(vec![Reply::Truncate(200, body), encrypted_answer()]).await;
    let client = over_tcp(&url).build().unwrap();
    let err = client.encrypt("demo", "patient", &json!({"ssn": "1"})).await.unwrap_err();
    assert!(matches!(err, Error::Interrupted { status: 200, .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert_eq!(server.requests().len(), 1);

    let Reply::Answer(_, unavailable) = error(503, "key_service_unavailable") else {
        unreachable!()
    };
    let (server, url) =
        TestServer::tcp(vec![Reply::Truncate(503, unavailable), encrypted_answer()]).await;
    let client = over_tcp(&url).build().unwrap();
    let out = client.encrypt("demo", "patient", &json!({"ssn": "1"})).await;
    assert_eq!(out.unwrap(), encrypted());
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn transient_503s_are_retried_then_succeed() {
    let (server, url) = TestServer::tcp(vec![
        error(503, "key_service_unavailable"),
        error(503, "key_service_unavailable"),
        encrypted_answer(),
    ])
    .await;
    let client = over_tcp(&url).build().unwrap();
    assert!(client.encrypt("demo", "patient", &json!({})).await.is_ok());
    assert_eq!(server.requests().len(), 3);
}

/// The sidecar's answer at its request deadline.
fn timed_out() -> Reply {
    Reply::AnswerWithHeader(
        503,
        ("retry-after", "0"),
        json!({"error": {"code": "timeout", "message": "past the deadline"}}).to_string(),
    )
}

/// A 503 `timeout` (the sidecar dropped the request at its deadline) is
/// retried, and every attempt of a call carries the call's one request id,
/// 128 random bits in hex; the next call has another.
#[tokio::test]
async fn a_sidecar_timeout_is_retried_under_the_calls_one_request_id() {
    let (server, url) = TestServer::tcp(vec![
        timed_out(),
        timed_out(),
        encrypted_answer(),
        error(503, "key_service_unavailable"),
        encrypted_answer(),
        answer(200, json!({"token": "kg1b:abc"})),
    ])
    .await;
    let client = over_tcp(&url).build().unwrap();
    assert_eq!(client.encrypt("demo", "patient", &json!({})).await.unwrap(), encrypted());
    client.encrypt("demo", "patient", &json!({})).await.unwrap();
    client.index("demo", "patient", "/email", "x", None).await.unwrap();
    let ids: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r.header("x-request-id").expect("every attempt has an id").to_owned())
        .collect();
    assert_eq!(ids.len(), 6);
    for id in &ids {
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id}");
    }
    assert!(ids[0] == ids[1] && ids[1] == ids[2], "one call, one id: {ids:?}");
    assert_eq!(ids[3], ids[4], "{ids:?}");
    assert!(ids[0] != ids[3] && ids[3] != ids[5] && ids[0] != ids[5], "a new call, a new id");

    let (server, url) = TestServer::tcp(vec![timed_out(), timed_out()]).await;
    let client = over_tcp(&url).retries(1).build().unwrap();
    let err = client.encrypt("demo", "patient", &json!({})).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(503), Some(&ErrorCode::Timeout)));
    assert!(err.is_retryable());
    assert_eq!(err.retry_after(), Some(Duration::ZERO));
    assert_eq!(server.requests().len(), 2, "retried once, then returned");
}

#[tokio::test]
async fn retries_stop_when_the_budget_is_spent() {
    let (server, url) = TestServer::tcp(vec![
        error(503, "key_service_unavailable"),
        error(503, "key_service_unavailable"),
        encrypted_answer(),
    ])
    .await;
    let client = over_tcp(&url).retries(1).build().unwrap();
    let err = client.encrypt("demo", "patient", &json!({})).await.unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::KeyServiceUnavailable));
    assert_eq!(err.status(), Some(503));
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn refusals_are_final() {
    for (status, code, expected) in [
        (403, "forbidden", ErrorCode::Forbidden),
        (401, "unauthorized", ErrorCode::Unauthorized),
        (422, "cannot_decrypt", ErrorCode::CannotDecrypt),
        (409, "key_version_disabled", ErrorCode::KeyVersionDisabled),
        (410, "key_destroyed", ErrorCode::KeyDestroyed),
        (503, "audit_unavailable", ErrorCode::AuditUnavailable),
        (500, "internal", ErrorCode::Internal),
        (409, "brand_new_code", ErrorCode::Other("brand_new_code".into())),
    ] {
        let (server, url) = TestServer::tcp(vec![
            error(status, code),
            answer(200, json!({"record": {}, "report": []})),
        ])
        .await;
        let client = over_tcp(&url).build().unwrap();
        let err = client.decrypt_value(&encrypted(), None).await.unwrap_err();
        assert!(
            matches!(&err, Error::Api { status: s, code: c, .. } if *s == status && *c == expected),
            "{err:?}"
        );
        assert_eq!(server.requests().len(), 1, "{code} was retried");
    }
}

/// The sidecar's 503 when every key service replica sheds load: it asks
/// for a pause of `seconds`.
fn shedding(seconds: &'static str) -> Reply {
    Reply::AnswerWithHeader(
        503,
        ("retry-after", seconds),
        json!({"error": {"code": "key_service_unavailable", "message": "busy"}}).to_string(),
    )
}

#[tokio::test]
async fn a_503_is_retried_no_sooner_than_its_retry_after() {
    let (server, url) = TestServer::tcp(vec![shedding("1"), encrypted_answer()]).await;
    let client = over_tcp(&url).build().unwrap();
    let started = Instant::now();
    let out = client.encrypt("demo", "patient", &json!({})).await;
    assert_eq!(out.unwrap(), encrypted());
    assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn a_retry_after_past_the_deadline_is_not_waited_for() {
    let (server, url) = TestServer::tcp(vec![shedding("1"), encrypted_answer()]).await;
    let client = over_tcp(&url).deadline(Duration::from_millis(800)).build().unwrap();
    let started = Instant::now();
    let err = client.encrypt("demo", "patient", &json!({})).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
    assert_eq!(err.code(), Some(&ErrorCode::KeyServiceUnavailable));
    assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
    assert_eq!(server.requests().len(), 1, "retried sooner than the sidecar asked");
}

#[tokio::test]
async fn without_a_deadline_a_retry_after_longer_than_an_attempt_is_not_waited_for() {
    let (server, url) = TestServer::tcp(vec![shedding("1"), encrypted_answer()]).await;
    let client = over_tcp(&url).timeout(Duration::from_millis(500)).build().unwrap();
    let started = Instant::now();
    let err = client.encrypt("demo", "patient", &json!({})).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
    assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
    assert_eq!(server.requests().len(), 1, "retried sooner than the sidecar asked");
}

#[tokio::test]
async fn an_answer_announced_past_the_limit_is_refused_before_it_is_read() {
    let limit = crate::transport::MAX_ANSWER_BYTES as u64;
    let (server, url) = TestServer::tcp(vec![Reply::Announce(limit + 1)]).await;
    let client = over_tcp(&url).timeout(Duration::from_secs(5)).build().unwrap();
    let started = Instant::now();
    let err = client.encrypt("demo", "patient", &json!({})).await.unwrap_err();
    assert!(
        matches!(&err, Error::Decode { detail, .. } if detail.contains("larger than")),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "not waiting for the body");
    assert_eq!(server.requests().len(), 1, "not retried");
}

#[tokio::test]
async fn an_error_status_without_an_error_body_is_unexpected() {
    let (server, url) =
        TestServer::tcp(vec![Reply::Answer(502, "<h1>Bad Gateway</h1>".into())]).await;
    let client = over_tcp(&url).build().unwrap();
    let err = client.rewrap(&encrypted()).await.unwrap_err();
    assert!(matches!(err, Error::UnexpectedStatus { status: 502, .. }), "{err:?}");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn a_slow_answer_times_out_and_is_not_retried() {
    let (server, url) = TestServer::tcp(vec![Reply::Hang, encrypted_answer()]).await;
    let client = over_tcp(&url).timeout(Duration::from_millis(200)).build().unwrap();
    let started = Instant::now();
    let err = client.encrypt("demo", "patient", &json!({})).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(server.requests().len(), 1);
}

#[derive(Debug, Deserialize, PartialEq)]
struct Patient {
    ssn: Option<String>,
    age: u32,
}

#[tokio::test]
async fn decrypt_batch_returns_typed_records_with_their_reports() {
    let (server, url) = TestServer::tcp(vec![answer(
        200,
        json!({
            "records": [{"ssn": "***-**-6789", "age": 51}, {"age": 7}],
            "report": [report("aa", "masked"), report("bb", "withheld")]
        }),
    )])
    .await;
    let client = over_tcp(&url).build().unwrap();
    let out: Vec<Decrypted<Patient>> =
        client.decrypt_batch(&[encrypted(), encrypted()], Some("treatment")).await.unwrap();

    assert_eq!(server.requests()[0].path, "/v1/decrypt");
    assert_eq!(
        server.requests()[0].json(),
        json!({"records": [encrypted(), encrypted()], "purpose": "treatment"})
    );
    assert_eq!(out[0].record, Patient { ssn: Some("***-**-6789".into()), age: 51 });
    assert_eq!(out[1].record, Patient { ssn: None, age: 7 });
    assert_eq!(out[0].report.fields[0].outcome, FieldOutcome::Masked);
    assert_eq!(out[1].report.record_key_id, "bb");
    assert_eq!(out[1].report.kek_version, 3);
}

#[tokio::test]
async fn decrypt_single_and_empty_batches() {
    let (server, url) = TestServer::tcp(vec![answer(
        200,
        json!({"record": {"ssn": "123-45-6789", "age": 51}, "report": [report("aa", "revealed")]}),
    )])
    .await;
    let client = over_tcp(&url).build().unwrap();
    let view = client.decrypt::<Patient>(&encrypted(), None).await.unwrap();
    assert_eq!(view.record.ssn.as_deref(), Some("123-45-6789"));
    assert!(view.report.fully_revealed());
    assert_eq!(server.requests()[0].json(), json!({"record": encrypted()}));

    let none: Vec<Decrypted<Value>> =
        client.decrypt_batch::<Value, Value>(&[], None).await.unwrap();
    assert!(none.is_empty());
    assert!(client.encrypt_batch::<Value>("demo", "patient", &[]).await.unwrap().is_empty());
    assert_eq!(server.requests().len(), 1, "empty batches need no round trip");
}

#[tokio::test]
async fn encrypt_batch_checks_the_answer_has_every_record() {
    let (_server, url) =
        TestServer::tcp(vec![answer(200, json!({"records": [encrypted()]}))]).await;
    let client = over_tcp(&url).build().unwrap();
    let err = client.encrypt_batch("demo", "patient", &[json!({}), json!({})]).await.unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err:?}");
}

#[tokio::test]
async fn rewrap_reports_what_changed() {
    let (server, url) = TestServer::tcp(vec![
        answer(200, json!({"record": encrypted(), "rewrapped": 1})),
        answer(200, json!({"records": [encrypted(), encrypted()], "rewrapped": 0})),
    ])
    .await;
    let client = over_tcp(&url).build().unwrap();
    let one = client.rewrap(&encrypted()).await.unwrap();
    assert!(one.changed);
    let many = client.rewrap_batch(&[encrypted(), encrypted()]).await.unwrap();
    assert_eq!((many.records.len(), many.rewrapped), (2, 0));
    let requests = server.requests();
    assert_eq!(requests[0].path, "/v1/rewrap");
    assert_eq!(requests[0].json(), json!({"record": encrypted()}));
    assert_eq!(requests[1].json(), json!({"records": [encrypted(), encrypted()]}));
}

#[tokio::test]
async fn index_and_pseudonym_return_their_tokens() {
    let (server, url) = TestServer::tcp(vec![
        answer(200, json!({"token": "kg1b:abc"})),
        answer(200, json!({"pseudonym": "kgp:xyz"})),
    ])
    .await;
    let client = over_tcp(&url).build().unwrap();
    let token = client
        .index("demo", "patient", "/email", "jane@example.org", Some("treatment"))
        .await
        .unwrap();
    let pseudonym = client.pseudonym("demo", "patient", &42).await.unwrap();
    assert_eq!((token.as_str(), pseudonym.as_str()), ("kg1b:abc", "kgp:xyz"));
    let requests = server.requests();
    assert_eq!(requests[0].path, "/v1/index");
    assert_eq!(
        requests[0].json(),
        json!({"tenant": "demo", "schema": "patient", "path": "/email", "value": "jane@example.org",
            "purpose": "treatment"})
    );
    assert_eq!(requests[1].path, "/v1/pseudonym");
    assert_eq!(requests[1].json(), json!({"tenant": "demo", "namespace": "patient", "value": 42}));
}

#[tokio::test]
async fn probes_report_state_and_are_never_retried() {
    let (server, url) = TestServer::tcp(vec![
        answer(200, json!({"status": "ok"})),
        answer(503, json!({"status": "not_ready", "key_service": "unreachable"})),
        answer(200, json!({"status": "ready"})),
        error(503, "key_service_unavailable"),
        answer(200, json!({"status": "ok"})),
    ])
    .await;
    let client = over_tcp(&url).build().unwrap();
    client.health().await.unwrap();
    let not_ready = client.ready().await.unwrap();
    assert!(!not_ready.ready);
    assert_eq!(not_ready.detail["key_service"], "unreachable");
    assert!(client.ready().await.unwrap().ready);
    assert!(client.health().await.is_err());
    let requests = server.requests();
    assert_eq!(requests.len(), 4, "a probe was retried");
    assert_eq!((requests[0].method.as_str(), requests[0].path.as_str()), ("GET", "/healthz"));
    assert_eq!(requests[1].path, "/readyz");
}

/// What a misconfigured endpoint (an echo route, a mock, a proxy) answers:
/// the request's own record, in plaintext.
fn plaintext() -> Value {
    json!({"ssn": "123-45-6789", "age": 51})
}

fn assert_refused_without_values(err: &Error) {
    assert!(matches!(err, Error::Decode { .. }), "{err:?}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("6789") && !shown.contains("51"), "{shown}");
    assert!(shown.contains("not an encrypted record"), "{shown}");
}

#[tokio::test]
async fn an_encrypt_answer_that_is_not_encrypted_is_refused() {
    let (server, url) = TestServer::tcp(vec![
        answer(200, json!({"record": plaintext()})),
        answer(200, json!({"records": [encrypted(), plaintext()]})),
    ])
    .await;
    let client = over_tcp(&url).build().unwrap();
    let err = client.encrypt("demo", "patient", &plaintext()).await.unwrap_err();
    assert_refused_without_values(&err);
    let err =
        client.encrypt_batch("demo", "patient", &[plaintext(), plaintext()]).await.unwrap_err();
    assert_refused_without_values(&err);
    assert!(err.to_string().contains("record 1"), "{err}");
    assert_eq!(server.requests().len(), 2, "not retried");
}

#[tokio::test]
async fn a_rewrap_answer_that_is_not_encrypted_is_refused() {
    let (_server, url) = TestServer::tcp(vec![
        answer(200, json!({"record": plaintext(), "rewrapped": 1})),
        answer(200, json!({"records": [plaintext(), encrypted()], "rewrapped": 2})),
        answer(200, json!({"record": {"_kg": 7, "ssn": "123-45-6789"}, "rewrapped": 0})),
    ])
    .await;
    let client = over_tcp(&url).build().unwrap();
    assert_refused_without_values(&client.rewrap(&encrypted()).await.unwrap_err());
    let err = client.rewrap_batch(&[encrypted(), encrypted()]).await.unwrap_err();
    assert_refused_without_values(&err);
    assert!(err.to_string().contains("record 0"), "{err}");
    assert_refused_without_values(&client.rewrap(&encrypted()).await.unwrap_err());
}

#[tokio::test]
async fn rate_limited_is_typed_and_keeps_its_retry_after() {
    let limited = Reply::AnswerWithHeader(
        429,
        ("retry-after", "2"),
        json!({"error": {"code": "rate_limited", "message": "slow down"}}).to_string(),
    );
    let (server, url) = TestServer::tcp(vec![limited, encrypted_answer()]).await;
    let client = over_tcp(&url).build().unwrap();
    let err = client.encrypt("demo", "patient", &json!({})).await.unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::RateLimited));
    assert_eq!(err.status(), Some(429));
    assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));
    assert_eq!(server.requests().len(), 1, "a 429 is the caller's to retry");
}

#[tokio::test]
async fn a_deadline_bounds_a_call_to_a_sidecar_that_never_answers() {
    let (server, url) = TestServer::tcp(vec![Reply::Hang]).await;
    // The default attempt timeout (30 s) is far longer than the deadline.
    let client = over_tcp(&url).deadline(Duration::from_secs(1)).build().unwrap();
    let started = Instant::now();
    let err = client.encrypt("demo", "patient", &json!({})).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert!(matches!(err, Error::Timeout { timeout, .. } if timeout <= Duration::from_secs(1)));
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn a_deadline_ends_retries_with_the_last_error() {
    let unavailable = (0..50).map(|_| error(503, "key_service_unavailable")).collect();
    let (server, url) = TestServer::tcp(unavailable).await;
    let client = Client::builder()
        .base_url(&url)
        .retries(50)
        .retry_backoff(Duration::from_millis(400))
        .deadline(Duration::from_secs(1))
        .build()
        .unwrap();
    let started = Instant::now();
    let err = client.encrypt("demo", "patient", &json!({})).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert_eq!(err.code(), Some(&ErrorCode::KeyServiceUnavailable));
    // The first backoff (at most 400 ms) fits the deadline; the budget of
    // 50 retries, with backoff growing to 2 s, would not.
    let attempts = server.requests().len();
    assert!((2..10).contains(&attempts), "{attempts} attempts");
}

#[tokio::test]
async fn a_batch_answer_with_millions_of_records_is_a_count_mismatch() {
    // About 4 MiB: two million records answered for one sent.
    let records = vec!["0"; 2 * 1024 * 1024].join(",");
    let body = format!(r#"{{"records":[{records}]}}"#);
    let (_server, url) = TestServer::tcp(vec![Reply::Answer(200, body.clone())]).await;
    let client = over_tcp(&url).build().unwrap();
    let err = client.encrypt_batch("demo", "patient", &[plaintext()]).await.unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err:?}");
    let expected = format!("1 records sent but {} records returned", 2 * 1024 * 1024);
    assert!(err.to_string().contains(&expected), "{err}");

    let (_server, url) = TestServer::tcp(vec![Reply::Answer(
        200,
        format!(r#"{{"records":[{{"age":1}}],"report":[{records}]}}"#),
    )])
    .await;
    let client = over_tcp(&url).build().unwrap();
    let err = client.decrypt_batch::<Value, _>(&[encrypted()], None).await.unwrap_err();
    assert!(err.to_string().contains("reports returned"), "{err}");
}

#[tokio::test]
async fn a_localhost_url_reaches_the_sidecar_on_the_loopback_at_its_port() {
    let (server, url) = TestServer::tcp(vec![encrypted_answer()]).await;
    let url = url.replace("127.0.0.1", "localhost");
    let client = over_tcp(&url).build().unwrap();
    assert_eq!(client.encrypt("demo", "patient", &json!({})).await.unwrap(), encrypted());
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn operation_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let client = Client::builder().build().unwrap();
    let record = json!({});
    assert_send(&client.encrypt("demo", "patient", &record));
    assert_send(&client.decrypt::<Value>(&record, None));
    assert_send(&client.decrypt_batch::<Value, Value>(&[], None));
    assert_send(&client.index("demo", "patient", "/email", "x", None));
    assert_send(&client.ready());
}
