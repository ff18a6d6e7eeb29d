//! The rest of the key service API end to end: derived keys, sidecar audit
//! events, the caller's own policy, tenants listing, readiness and metrics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use keygate_tests::keyservice::KeyService;
use serde_json::{Value, json};

const ADMIN: &str = "spiffe://test/admin";
const ENC: &str = "spiffe://test/encryptor";
const DEC: &str = "spiffe://test/decryptor";
const AUDITOR: &str = "spiffe://test/auditor";

async fn started() -> (tempfile::TempDir, KeyService) {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), "");
    for tenant in ["onc", "t-two"] {
        let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": tenant})).await;
        assert_eq!(status, 201);
    }
    (dir, ks)
}

#[tokio::test(flavor = "multi_thread")]
async fn derived_keys_are_stable_per_tenant_and_path() {
    let (_dir, ks) = started().await;
    let request = json!({"schema": "patient", "fields": [
        {"path": "/mrn", "mode": "deterministic"},
        {"path": "/email", "mode": "blind_index"},
        {"path": "/patient_id", "mode": "pseudonym"},
    ]});
    let (status, a) = ks.post(ENC, "/v1/tenants/onc/derived", &request).await;
    assert_eq!(status, 200, "{a}");
    let purposes: Vec<&str> =
        a["keys"].as_array().unwrap().iter().map(|k| k["purpose"].as_str().unwrap()).collect();
    assert_eq!(
        purposes,
        ["keygate/v1/det-enc", "keygate/v1/det-nonce", "keygate/v1/bidx", "keygate/v1/pseudonym"]
    );
    let (_, b) = ks.post(DEC, "/v1/tenants/onc/derived", &request).await;
    assert_eq!(a, b, "encryptors and decryptors derive the same keys");
    let (_, other) = ks.post(ENC, "/v1/tenants/t-two/derived", &request).await;
    assert_ne!(a["keys"][0]["key"], other["keys"][0]["key"], "another tenant, other keys");
    let (status, _) = ks.post(AUDITOR, "/v1/tenants/onc/derived", &request).await;
    assert_eq!(status, 403);
    let bad = json!({"schema": "patient", "fields": [{"path": "mrn", "mode": "deterministic"}]});
    let (status, body) = ks.post(ENC, "/v1/tenants/onc/derived", &bad).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_path")));
}

#[tokio::test(flavor = "multi_thread")]
async fn sidecar_events_land_in_the_chain_with_their_reporter() {
    let (_dir, ks) = started().await;
    let event = json!({"events": [{
        "actor": "spiffe://test/app", "action": "record.decrypt", "tenant": "onc", "kek_version": 1,
        "record_key_ids": ["00112233445566778899aabbccddeeff"], "outcome": "ok", "purpose": "treatment",
        "fields": {"/ssn": "masked", "/diagnosis": "withheld"}, "ts_ms": 1_700_000_000_000i64
    }]});
    let (status, body) = ks.post(DEC, "/v1/audit/events", &event).await;
    assert_eq!((status, body["recorded"].as_u64()), (200, Some(1)), "{body}");
    // Not for a tenant the reporter does not serve.
    let mut foreign = event.clone();
    foreign["events"][0]["tenant"] = json!("b");
    let (status, _) = ks.post(DEC, "/v1/audit/events", &foreign).await;
    assert_eq!(status, 403);
    // Only what a sidecar does: not a key service's or an officer's action.
    let mut forged = event.clone();
    forged["events"][0]["action"] = json!("shred.approve");
    let (status, body) = ks.post(DEC, "/v1/audit/events", &forged).await;
    assert_eq!(status, 422, "{body}");
    // An actor is an identity: no control characters (a NUL would fail
    // the group commit of every other request on PostgreSQL), bounded.
    for actor in [json!("spiffe://test/a\u{0}pp"), json!(""), json!("x".repeat(1025))] {
        let mut bad = event.clone();
        bad["events"][0]["actor"] = actor;
        let (status, body) = ks.post(DEC, "/v1/audit/events", &bad).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_request")));
    }
    // A time ahead of the key service's is recorded as the time it came.
    let mut ahead = event.clone();
    ahead["events"][0]["ts_ms"] = json!(i64::MAX / 2);
    ahead["events"][0]["record_key_ids"] = json!(["ffeeddccbbaa99887766554433221100"]);
    let (status, _) = ks.post(DEC, "/v1/audit/events", &ahead).await;
    assert_eq!(status, 200);
    let (_, export) = ks.get(AUDITOR, "/v1/audit").await;
    let line: Value = export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["action"] == "record.decrypt")
        .unwrap();
    assert_eq!(line["actor"], "spiffe://test/app");
    assert_eq!(line["detail"]["reported_by"], DEC);
    assert_eq!(line["detail"]["fields"]["/ssn"], "masked");
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let ahead = export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["record_key_ids"][0] == "ffeeddccbbaa99887766554433221100")
        .unwrap();
    assert!(u128::from(ahead["ts_ms"].as_u64().unwrap()) <= now_ms, "{ahead}");
    assert!(!export.contains("shred.approve"), "{export}");
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_self_and_tenant_listing_follow_the_grants() {
    let (_dir, ks) = started().await;
    let (status, text) = ks.get(DEC, "/v1/policy/self").await;
    assert_eq!(status, 200);
    let grants: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(grants["identity"], DEC);
    assert_eq!(grants["grants"].as_array().unwrap().len(), 1, "only its own grants: {grants}");
    let (_, text) = ks.get("spiffe://test/nobody", "/v1/policy/self").await;
    let none: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(none["grants"], json!([]));

    let (status, text) = ks.get(AUDITOR, "/v1/tenants").await;
    assert_eq!(status, 200);
    let tenants: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(tenants.len(), 2);
    let (_, text) = ks.get(ENC, "/v1/tenants").await;
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&text).unwrap().len(),
        0,
        "encryptors see no tenant metadata"
    );
    let (status, _) = ks.get(ENC, "/v1/tenants/onc").await;
    assert_eq!(status, 403);
    let (status, body) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("tenant_exists")));
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_and_metrics() {
    let (_dir, ks) = started().await;
    let (status, text) = ks.get(ADMIN, "/readyz").await;
    assert_eq!(status, 200, "{text}");
    let ready: Value = serde_json::from_str(&text).unwrap();
    for check in ["store", "root_key", "audit"] {
        assert_eq!(ready["checks"][check]["ok"], true, "{ready}");
    }
    for _ in 0..3 {
        let (status, _) = ks.post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 2})).await;
        assert_eq!(status, 200);
    }
    let (status, metrics) = ks.get(AUDITOR, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(
            r#"keygate_requests_total{route="/v1/tenants/{tenant}/datakeys",code="200"} 3"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains("keygate_request_duration_seconds_bucket"));
    assert!(metrics.contains("keygate_kek_cache_hits "));
    assert!(metrics.contains("keygate_audit_queue_depth "));
    assert!(metrics.contains("keygate_audit_events_total"));
    assert!(!metrics.contains("onc"), "no tenant names in metric labels");
}

/// A certificate whose URI SAN is another spelling of a granted identity
/// (here with a trailing `/`) names none: the caller gets only the open
/// routes, and the connection is counted, so that a renewal that changed
/// the spelling shows on a dashboard and not only as 403s.
#[tokio::test(flavor = "multi_thread")]
async fn certificates_that_name_no_identity_are_refused_and_counted() {
    let (_dir, ks) = started().await;
    let respelled = format!("{ADMIN}/");
    let (status, body) = ks.get(&respelled, "/v1/tenants").await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = ks.get(&respelled, "/healthz").await;
    assert_eq!(status, 200, "the open routes still answer");
    let (status, _) = ks.get(ADMIN, "/v1/tenants").await;
    assert_eq!(status, 200, "the plain spelling is the granted identity");
    let (_, metrics) = ks.get(AUDITOR, "/metrics").await;
    let name = r#"keygate_client_identities_refused_total{reason="uri_san_not_plain"}"#;
    let refused = metric(&metrics, name);
    assert!((1..=2).contains(&refused), "one per connection of that client: {refused}");
    assert!(!metrics.contains("several_uri_sans"), "{metrics}");
    assert!(!metrics.contains(&respelled), "no identity in metric labels");
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_share_audit_commits() {
    let (_dir, ks) = started().await;
    let ks = std::sync::Arc::new(ks);
    let (_, before) = ks.get(AUDITOR, "/metrics").await;
    let requests: Vec<_> = (0..64)
        .map(|_| {
            let ks = ks.clone();
            tokio::spawn(async move {
                ks.post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 1})).await.0
            })
        })
        .collect();
    for r in requests {
        assert_eq!(r.await.unwrap(), 200);
    }
    let (_, after) = ks.get(AUDITOR, "/metrics").await;
    let events = metric(&after, "keygate_audit_events_total")
        - metric(&before, "keygate_audit_events_total");
    let commits = metric(&after, "keygate_audit_commits_total")
        - metric(&before, "keygate_audit_commits_total");
    assert!(events >= 64, "every issue was audited: {events}");
    assert!(commits < events, "group commit: {commits} commits for {events} events");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_in_flight_are_bounded_and_every_request_is_served() {
    // Room for 3,500 plaintext DEKs at a time, 1,000 of them per identity
    // (and batches of at most 2,500, so that the share and the largest
    // batch fit together): 12 concurrent requests of 500 take turns, two
    // at a time, a request for 2,500 (more than the share) runs alone
    // among its identity's, and unwraps share the same bounds. The wait
    // for room is long (20 s, under the 30 s request timeout), so that a
    // slow machine serializes the requests rather than refusing them:
    // nobody is refused and every key is distinct.
    let dir = tempfile::tempdir().unwrap();
    let limits = "[limits]\nmax_keys_in_flight = 3500\nmax_keys_in_flight_per_identity = 1000\n\
                  max_batch = 2500\nkeys_wait_ms = 20000\nrequest_timeout_secs = 30\n";
    let ks = KeyService::start(dir.path(), limits);
    let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    let ks = std::sync::Arc::new(ks);
    let mut requests: Vec<_> = (0..12)
        .map(|_| {
            let ks = ks.clone();
            tokio::spawn(async move {
                ks.post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 500})).await
            })
        })
        .collect();
    requests.push({
        let ks = ks.clone();
        tokio::spawn(async move {
            ks.post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 2500})).await
        })
    });
    let mut issued = Vec::new();
    for r in requests {
        let (status, body) = r.await.unwrap();
        assert_eq!(status, 200, "{body}");
        issued.extend(body["keys"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(issued.len(), 12 * 500 + 2500);
    let distinct: std::collections::HashSet<&str> =
        issued.iter().map(|k| k["dek"].as_str().unwrap()).collect();
    assert_eq!(distinct.len(), issued.len());

    let items: Vec<Value> = issued[..1500]
        .iter()
        .map(|k| json!({"record_key_id": k["record_key_id"], "kek_version": 1, "wrapped": k["wrapped"]}))
        .collect();
    let unwraps: Vec<_> = (0..3)
        .map(|_| {
            let (ks, items) = (ks.clone(), items.clone());
            tokio::spawn(async move {
                ks.post(DEC, "/v1/tenants/onc/datakeys/unwrap", &json!({"items": items})).await
            })
        })
        .collect();
    for u in unwraps {
        let (status, body) = u.await.unwrap();
        assert_eq!(status, 200, "{body}");
        let results = body["results"].as_array().unwrap();
        assert_eq!(results.len(), 1500);
        assert!(results.iter().zip(&issued).all(|(r, k)| r["dek"] == k["dek"]));
    }
}
