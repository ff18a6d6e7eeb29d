//! End-to-end key lifecycle (DESIGN §7): rotation and usage, rewrap and
//! retirement, crypto-shredding under two-person control, master rotation
//! across a crash, and scheduled rotation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use std::time::{Duration, Instant};

use keygate_tests::keyservice::{KeyService, Options, run_to_exit, write_private};
use keygate_tests::providers::softhsm2::{self, SoftHsm2};
use keygate_tests::sidecar::Sidecar;
use serde_json::{Value, json};
use sqlx::Connection;

const ADMIN: &str = "spiffe://test/admin";
const ADMIN_OFFICER: &str = "spiffe://test/admin-officer";
const OFFICER: &str = "spiffe://test/officer";
const AUDITOR: &str = "spiffe://test/auditor";
const CLINICAL: &str = "spiffe://test/sidecar-clinical";
const ENCRYPTOR: &str = "spiffe://test/encryptor";
const DECRYPTOR: &str = "spiffe://test/decryptor";

fn patient(i: usize) -> Value {
    json!({
        "name": format!("Patient {i}"),
        "ssn": format!("123-45-{:04}", i % 10_000),
        "mrn": format!("MRN-{i:06}"),
        "email": format!("patient{i}@example.org"),
        "diagnosis": {"code": "C50.9", "stage": i % 4},
        "patient_id": format!("P-{i}"),
        "age": 30 + i % 50,
    })
}

async fn create_tenant(ks: &KeyService, tenant: &str) {
    let (status, body) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": tenant})).await;
    assert_eq!(status, 201, "{body}");
}

async fn encrypt_many(sc: &Sidecar, tenant: &str, records: &[Value]) -> Vec<Value> {
    let mut out = Vec::with_capacity(records.len());
    for chunk in records.chunks(500) {
        let (status, body) = sc
            .post("/v1/encrypt", &json!({"tenant": tenant, "schema": "patient", "records": chunk}))
            .await;
        assert_eq!(status, 200, "{body}");
        out.extend(body["records"].as_array().unwrap().iter().cloned());
    }
    out
}

async fn decrypt(sc: &Sidecar, record: &Value) -> (u16, Value) {
    sc.post("/v1/decrypt", &json!({"record": record})).await
}

async fn usage(ks: &KeyService, tenant: &str) -> Vec<Value> {
    let (status, body) = ks.get(AUDITOR, &format!("/v1/tenants/{tenant}/keys/usage")).await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    body["versions"].as_array().unwrap().clone()
}

async fn rotate(ks: &KeyService, tenant: &str) -> u64 {
    let (status, body) =
        ks.post(ADMIN, &format!("/v1/tenants/{tenant}/keys/rotate"), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    body["version"].as_u64().unwrap()
}

async fn set_state(ks: &KeyService, tenant: &str, version: u64, action: &str) {
    let path = format!("/v1/tenants/{tenant}/keys/{version}/state");
    let (status, body) = ks.post(ADMIN, &path, &json!({"action": action})).await;
    assert_eq!(status, 200, "{body}");
}

const SHORT_TTLS: &str = "[pool]\nttl_secs = 1\n[cache]\nttl_secs = 1\n";

#[tokio::test(flavor = "multi_thread")]
async fn rotation_keeps_old_records_readable_and_usage_counts_move() {
    let dir = tempfile::tempdir().unwrap();
    let ks =
        KeyService::start(&dir.path().join("ks"), "[lifecycle]\nusage_flush_interval_ms = 100\n");
    create_tenant(&ks, "onc").await;
    let sc = Sidecar::start(&ks, &dir.path().join("sc"), CLINICAL, SHORT_TTLS);
    let before = encrypt_many(&sc, "onc", &(0..5).map(patient).collect::<Vec<_>>()).await;
    let issued_v1 = usage(&ks, "onc").await[0]["records_issued"].as_u64().unwrap();
    assert!(issued_v1 >= 5, "DEKs issued under v1 are counted: {issued_v1}");

    assert_eq!(rotate(&ks, "onc").await, 2);
    tokio::time::sleep(Duration::from_millis(1_500)).await; // the sidecar's pool TTL
    let after = encrypt_many(&sc, "onc", &(5..10).map(patient).collect::<Vec<_>>()).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await; // cached DEKs expire: unwraps
    for (i, record) in before.iter().chain(&after).enumerate() {
        let (status, body) = decrypt(&sc, record).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["record"]["name"], format!("Patient {i}"));
        let expected = if i < 5 { 1 } else { 2 };
        assert_eq!(body["report"][0]["kek_version"], expected, "record {i} carries v{expected}");
        assert_eq!(
            body["report"][0]["stale_key_version"],
            i < 5,
            "old records are flagged for rewrap"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // a usage flush
    let versions = usage(&ks, "onc").await;
    assert_eq!(versions.len(), 2);
    let (v1, v2) = (&versions[0], &versions[1]);
    assert_eq!(
        (v1["state"].as_str(), v2["state"].as_str()),
        (Some("decrypt_only"), Some("active"))
    );
    assert!(v2["records_issued"].as_u64().unwrap() >= 5, "{v2}");
    assert!(v1["unwraps"].as_u64().unwrap() >= 5 && v1["unwraps_24h"] == v1["unwraps"], "{v1}");
    assert!(v1["last_unwrap_at"].as_i64().unwrap() > 1_700_000_000, "{v1}");
    assert!(v2["unwraps"].as_u64().unwrap() >= 5, "{v2}");
    // Counts survive a restart (they were flushed to the keystore).
    let mut ks = ks;
    ks.restart();
    assert_eq!(usage(&ks, "onc").await[0]["unwraps"], v1["unwraps"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn rewrap_ten_thousand_then_retire_the_old_version() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(&dir.path().join("ks"), "");
    create_tenant(&ks, "onc").await;
    let sc = Sidecar::start(&ks, &dir.path().join("sc"), CLINICAL, SHORT_TTLS);
    let records: Vec<Value> = (0..10_001).map(patient).collect();
    let v1_records = encrypt_many(&sc, "onc", &records).await;
    let (to_rewrap, left_behind) = v1_records.split_at(10_000);
    assert_eq!(rotate(&ks, "onc").await, 2);

    let mut rewrapped = Vec::with_capacity(to_rewrap.len());
    let mut moved = 0;
    for chunk in to_rewrap.chunks(1_000) {
        let (status, body) = sc.post("/v1/rewrap", &json!({"records": chunk})).await;
        assert_eq!(status, 200, "{body}");
        moved += body["rewrapped"].as_u64().unwrap();
        rewrapped.extend(body["records"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(moved, 10_000);
    for (old, new) in to_rewrap.iter().zip(&rewrapped) {
        let (old, new) = (old.as_object().unwrap(), new.as_object().unwrap());
        assert_eq!(old.len(), new.len());
        for (key, value) in old {
            if key != "_kg" {
                assert_eq!(new[key], *value, "field {key} is byte-identical");
            }
        }
        assert_ne!(old["_kg"], new["_kg"], "the header's key part changed");
    }
    // Records already on the active version come back unchanged.
    let (status, again) = sc.post("/v1/rewrap", &json!({"records": &rewrapped[..500]})).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["rewrapped"], 0);
    assert_eq!(again["records"].as_array().unwrap()[..], rewrapped[..500]);

    // Retire v1: the rewrapped records still decrypt (on v2), the one left
    // behind does not; re-enabling v1 brings it back.
    set_state(&ks, "onc", 1, "disable").await;
    tokio::time::sleep(Duration::from_millis(1_500)).await; // the sidecar's cache TTL
    for record in rewrapped.iter().step_by(97) {
        let (status, body) = decrypt(&sc, record).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["report"][0]["kek_version"], 2);
    }
    let (status, body) = decrypt(&sc, &left_behind[0]).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("key_version_disabled")),
        "{body}"
    );
    set_state(&ks, "onc", 1, "enable").await;
    let (status, body) = decrypt(&sc, &left_behind[0]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["record"]["name"], "Patient 10000");
}

/// The first event of an audit export (JSON lines) for which `is` holds.
fn audit_event(export: &str, is: impl Fn(&Value) -> bool) -> Option<Value> {
    export.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).find(|e| is(e))
}

async fn shred(ks: &KeyService, who: &str, tenant: &str, version: Option<u64>) -> (u16, Value) {
    let body = json!({"version": version, "reason": "patient asked for erasure (test)"});
    ks.post(who, &format!("/v1/tenants/{tenant}/shred"), &body).await
}

async fn decide(ks: &KeyService, who: &str, id: &str, decision: &str) -> (u16, Value) {
    ks.post(who, &format!("/v1/approvals/{id}"), &json!({"decision": decision})).await
}

#[tokio::test(flavor = "multi_thread")]
async fn shredding_needs_two_people_and_reaches_every_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(&dir.path().join("ks"), "");
    for tenant in ["onc", "t-other"] {
        create_tenant(&ks, tenant).await;
    }
    // The DEK pool keeps its default TTL (60 s): pooled DEKs must not
    // outlive the cache TTL, the bound on a shred.
    let cache = "[cache]\nttl_secs = 2\n";
    let a = Sidecar::start(&ks, &dir.path().join("a"), CLINICAL, cache);
    let b = Sidecar::start(&ks, &dir.path().join("b"), CLINICAL, cache);
    // A sidecar with a long TTL learns of the shred from the key service.
    let c = Sidecar::start(&ks, &dir.path().join("c"), CLINICAL, "[cache]\nttl_secs = 600\n");
    encrypt_many(&c, "onc", &[patient(0)]).await;
    let onc = encrypt_many(&a, "onc", &(0..20).map(patient).collect::<Vec<_>>()).await;
    let other = encrypt_many(&a, "t-other", &(0..5).map(patient).collect::<Vec<_>>()).await;
    for sc in [&a, &b] {
        for record in onc.iter().chain(&other) {
            assert_eq!(decrypt(sc, record).await.0, 200, "warm caches before the shred");
        }
    }

    // Bad requests are refused before anyone is asked.
    assert_eq!(shred(&ks, ADMIN, "nobody", None).await.0, 404);
    let (status, body) = shred(&ks, ADMIN, "onc", Some(1)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("invalid_transition")),
        "{body}"
    );
    assert_eq!(shred(&ks, OFFICER, "onc", None).await.0, 403, "officers do not request");

    let (status, request) = shred(&ks, ADMIN_OFFICER, "onc", None).await;
    assert_eq!(status, 202, "{request}");
    assert_eq!(request["state"], "pending");
    let id = request["id"].as_str().unwrap().to_owned();
    let (status, pending) = ks.get(OFFICER, "/v1/approvals?state=pending").await;
    assert_eq!(status, 200);
    assert!(pending.contains(&id), "{pending}");

    // Not the requester, even holding security_officer; not a mere admin.
    let (status, body) = decide(&ks, ADMIN_OFFICER, &id, "approve").await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("self_approval")), "{body}");
    let (status, _) = decide(&ks, ADMIN, &id, "approve").await;
    assert_eq!(status, 403);
    assert_eq!(decide(&ks, OFFICER, "0123", "approve").await.0, 404);
    // Nothing happened yet.
    assert_eq!(decrypt(&a, &onc[0]).await.0, 200);

    let (status, done) = decide(&ks, OFFICER, &id, "approve").await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(
        (done["state"].as_str(), done["decided_by"].as_str()),
        (Some("executed"), Some(OFFICER))
    );
    let (status, _) = decide(&ks, OFFICER, &id, "reject").await;
    assert_eq!(status, 409, "decided once");
    let shredded_at = Instant::now();

    // Sidecar c has DEKs pooled for "onc" for the next 10 minutes; the first
    // `key_destroyed` it hears (a cold decrypt) drops them, so its next
    // encrypt fails at once instead of writing records no one can read.
    let encrypt_onc = json!({"tenant": "onc", "schema": "patient", "record": patient(1)});
    let (status, body) = decrypt(&c, &onc[1]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (410, Some("key_destroyed")), "{body}");
    let (status, body) = c.post("/v1/encrypt", &encrypt_onc).await;
    assert_eq!((status, body["error"]["code"].as_str()), (410, Some("key_destroyed")), "{body}");

    // Within the cache TTL bound, every sidecar refuses, old cache included.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    for sc in [&a, &b] {
        for record in onc.iter().step_by(3) {
            let (status, body) = decrypt(sc, record).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (410, Some("key_destroyed")),
                "{body}"
            );
        }
        for record in &other {
            assert_eq!(decrypt(sc, record).await.0, 200, "other tenants are unaffected");
        }
        let (status, body) = sc.post("/v1/encrypt", &encrypt_onc).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (410, Some("key_destroyed")),
            "{body}"
        );
    }
    assert!(shredded_at.elapsed() < Duration::from_secs(10));
    let (status, body) = ks.post(ADMIN, "/v1/tenants/onc/keys/rotate", &json!({})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (410, Some("key_destroyed")), "{body}");

    // The store holds no material for it.
    let mut db = sqlx::SqliteConnection::connect(&format!("sqlite://{}", ks.database().display()))
        .await
        .unwrap();
    let (material, root): (i64, Option<Vec<u8>>) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM kek_versions WHERE tenant = 'onc' AND wrapped IS NOT NULL),
                (SELECT index_root_wrapped FROM tenants WHERE id = 'onc')",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!((material, root), (0, None));
    let other_material: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM kek_versions WHERE tenant = 't-other' AND wrapped IS NOT NULL",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(other_material, 1);
    db.close().await.unwrap();

    // A rejected request never runs.
    let (_, request) = shred(&ks, ADMIN, "t-other", None).await;
    let id2 = request["id"].as_str().unwrap();
    let (status, rejected) = decide(&ks, OFFICER, id2, "reject").await;
    assert_eq!((status, rejected["state"].as_str()), (200, Some("rejected")));
    assert_eq!(decide(&ks, ADMIN_OFFICER, id2, "approve").await.0, 409);
    assert_eq!(decrypt(&a, &other[0]).await.0, 200);

    // The audit chain names the request, requester, approver; it verifies.
    let (_, export) = ks.get(AUDITOR, "/v1/audit").await;
    let shred_event =
        audit_event(&export, |e| e["action"] == "tenant.shred").expect("a tenant.shred event");
    assert_eq!(shred_event["actor"], OFFICER);
    assert_eq!(shred_event["detail"]["requested_by"], ADMIN_OFFICER);
    assert_eq!(shred_event["detail"]["approved_by"], OFFICER);
    assert!(export.contains("shred.request") && export.contains("shred.reject"));
    assert!(export.contains("\"self_approval\"") || export.contains("approve own request"));
    // Who still tried to unwrap the shredded tenant's keys is on record.
    let tried = audit_event(&export, |e| e["action"] == "dek.unwrap" && e["outcome"] == "denied")
        .expect("the refused unwraps are recorded");
    assert_eq!(
        (&tried["tenant"], &tried["actor"], &tried["detail"]["error"]),
        (&json!("onc"), &json!(CLINICAL), &json!("key_destroyed")),
        "{tried}"
    );
    assert!(!tried["record_key_ids"].as_array().unwrap().is_empty(), "{tried}");
    let (_, verify) = ks.get(AUDITOR, "/v1/audit/verify").await;
    assert!(verify.contains("\"ok\":true"), "{verify}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_approved_shred_waits_for_its_delay() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(
        &dir.path().join("ks"),
        "[lifecycle]\nshred_delay_secs = 2\nscheduler_interval_ms = 200\n",
    );
    create_tenant(&ks, "onc").await;
    assert_eq!(rotate(&ks, "onc").await, 2);
    let (_, request) = shred(&ks, ADMIN, "onc", Some(1)).await;
    let (status, approved) = decide(&ks, OFFICER, request["id"].as_str().unwrap(), "approve").await;
    assert_eq!((status, approved["state"].as_str()), (200, Some("approved")), "{approved}");
    let state_of_v1 = || async {
        let (_, body) = ks.get(ADMIN, "/v1/tenants/onc").await;
        let body: Value = serde_json::from_str(&body).unwrap();
        body["versions"][0]["state"].as_str().unwrap().to_owned()
    };
    assert_eq!(state_of_v1().await, "decrypt_only", "not before the delay");
    let deadline = Instant::now() + Duration::from_secs(10);
    while state_of_v1().await != "destroyed" {
        assert!(Instant::now() < deadline, "the scheduler never ran the approved shred");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The request is marked executed right after the keys are destroyed.
    loop {
        let (_, all) = ks.get(OFFICER, "/v1/approvals").await;
        if all.contains("\"executed\"") {
            break;
        }
        assert!(Instant::now() < deadline, "destroyed but never marked executed: {all}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, tenant) = ks.get(ADMIN, "/v1/tenants/onc").await;
    assert!(tenant.contains("\"active_version\":2"), "v2 untouched: {tenant}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_approved_shred_can_be_withdrawn_while_it_waits() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(
        &dir.path().join("ks"),
        "[lifecycle]\nshred_delay_secs = 6\nscheduler_interval_ms = 100\n",
    );
    create_tenant(&ks, "onc").await;
    let (_, request) = shred(&ks, ADMIN, "onc", None).await;
    let id = request["id"].as_str().unwrap();
    let (status, approved) = decide(&ks, OFFICER, id, "approve").await;
    assert_eq!((status, approved["state"].as_str()), (200, Some("approved")), "{approved}");
    // Not an admin's to stop; any security officer's, the approver's too.
    assert_eq!(decide(&ks, ADMIN, id, "reject").await.0, 403);
    let body = json!({"decision": "reject", "comment": "wrong tenant"});
    let (status, withdrawn) = ks.post(OFFICER, &format!("/v1/approvals/{id}"), &body).await;
    assert_eq!(status, 200, "{withdrawn}");
    assert_eq!(withdrawn["state"], "rejected");
    assert!(withdrawn["comment"].as_str().unwrap().contains("wrong tenant"), "{withdrawn}");
    let (status, again) = decide(&ks, OFFICER, id, "reject").await;
    assert_eq!((status, again["error"]["code"].as_str()), (409, Some("approval_not_pending")));

    // Past its time, and a few scheduler rounds: nothing is destroyed.
    tokio::time::sleep(Duration::from_millis(6_500)).await;
    let (_, tenant) = ks.get(ADMIN, "/v1/tenants/onc").await;
    let tenant: Value = serde_json::from_str(&tenant).unwrap();
    assert_eq!(tenant["shredded"], false, "{tenant}");
    assert_eq!(tenant["versions"][0]["state"], "active", "{tenant}");
    let (status, _) = ks.post(ENCRYPTOR, "/v1/tenants/onc/datakeys", &json!({"count": 1})).await;
    assert_eq!(status, 200);
    let (_, export) = ks.get(AUDITOR, "/v1/audit?tenant=onc").await;
    let withdrawal =
        audit_event(&export, |e| e["action"] == "shred.withdraw").expect("a shred.withdraw event");
    assert_eq!((&withdrawal["actor"], &withdrawal["outcome"]), (&json!(OFFICER), &json!("ok")));
    assert_eq!(withdrawal["detail"]["approved_by"], OFFICER);
    assert!(!export.contains("\"tenant.shred\""), "{export}");
}

/// Approving with `expect`: the tenant and scope the officer means.
async fn approve_expecting(
    ks: &KeyService,
    id: &str,
    tenant: &str,
    version: Option<u64>,
) -> (u16, Value) {
    let body = json!({"decision": "approve", "expect": {"tenant": tenant, "version": version}});
    ks.post(OFFICER, &format!("/v1/approvals/{id}"), &body).await
}

async fn approval_state(ks: &KeyService, id: &str) -> String {
    let (_, all) = ks.get(OFFICER, "/v1/approvals").await;
    let all: Value = serde_json::from_str(&all).unwrap();
    let found = all["approvals"].as_array().unwrap().iter().find(|a| a["id"] == id).unwrap();
    found["state"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_request_meant_fresh_and_still_backed_is_approved() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(&dir.path().join("ks"), "[lifecycle]\napproval_ttl_secs = 3\n");
    create_tenant(&ks, "onc").await;
    assert_eq!(rotate(&ks, "onc").await, 2);

    // An id passed on for "v1 of onc" that is a shred of the whole tenant.
    let (_, whole) = shred(&ks, ADMIN, "onc", None).await;
    let whole = whole["id"].as_str().unwrap().to_owned();
    for (tenant, version) in [("onc", Some(1)), ("t-other", None)] {
        let (status, refused) = approve_expecting(&ks, &whole, tenant, version).await;
        assert_eq!((status, refused["error"]["code"].as_str()), (409, Some("approval_mismatch")));
        let message = refused["error"]["message"].as_str().unwrap();
        assert!(message.contains("tenant onc (all versions)"), "{message}");
    }
    assert_eq!(approval_state(&ks, &whole).await, "pending", "nothing decided");

    // Its requester (an admin, not a security officer) takes it back.
    let (status, withdrawn) = decide(&ks, ADMIN, &whole, "reject").await;
    assert_eq!((status, withdrawn["state"].as_str()), (200, Some("rejected")), "{withdrawn}");
    assert!(withdrawn["comment"].as_str().unwrap().contains(&format!("withdrawn by {ADMIN}")));
    assert_eq!(withdrawn["decided_by"], Value::Null);
    let (status, _) = approve_expecting(&ks, &whole, "onc", None).await;
    assert_eq!(status, 409, "a withdrawn request is not approved");

    // A request nobody approved in time may only be rejected.
    let (_, stale) = shred(&ks, ADMIN, "onc", Some(1)).await;
    let stale = stale["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(4_200)).await;
    let (status, refused) = approve_expecting(&ks, &stale, "onc", Some(1)).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (409, Some("approval_expired")));
    assert_eq!(approval_state(&ks, &stale).await, "pending");
    assert_eq!(decide(&ks, OFFICER, &stale, "reject").await.0, 200);

    // A requester who no longer administers the tenant: the request may
    // only be rejected.
    let (_, orphan) = shred(&ks, ADMIN_OFFICER, "onc", Some(1)).await;
    let orphan = orphan["id"].as_str().unwrap().to_owned();
    let demoted = keygate_tests::keyservice::TEST_POLICY.replace(
        "identity = \"spiffe://test/admin-officer\"\ntenants = [\"*\"]\nroles = [\"admin\", \"security_officer\"]",
        "identity = \"spiffe://test/admin-officer\"\ntenants = [\"*\"]\nroles = [\"security_officer\"]",
    );
    assert_ne!(demoted, keygate_tests::keyservice::TEST_POLICY);
    std::fs::write(dir.path().join("ks").join("policy.toml"), demoted).unwrap();
    ks.sighup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ks.post(ADMIN_OFFICER, "/v1/tenants/onc/keys/rotate", &json!({})).await.0 != 403 {
        assert!(Instant::now() < deadline, "the policy was never reloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, refused) = approve_expecting(&ks, &orphan, "onc", Some(1)).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (409, Some("requester_not_authorized"))
    );
    assert_eq!(approval_state(&ks, &orphan).await, "pending");
    let (_, tenant) = ks.get(ADMIN, "/v1/tenants/onc").await;
    assert!(!tenant.contains("destroyed"), "nothing destroyed: {tenant}");
    assert_eq!(decide(&ks, OFFICER, &orphan, "reject").await.0, 200);

    let (_, export) = ks.get(AUDITOR, "/v1/audit?tenant=onc").await;
    let withdrawal =
        audit_event(&export, |e| e["action"] == "shred.withdraw").expect("a shred.withdraw event");
    assert_eq!(withdrawal["actor"], ADMIN);
    assert!(!export.contains("\"shred.approve\""), "{export}");
    // Each refused approval is in the audit log, as the officer's denial.
    for refused in [
        "decide a request other than the one named",
        "approve an expired request",
        "approve a request its requester may no longer make",
    ] {
        let denial = audit_event(&export, |e| e["action"] == refused)
            .unwrap_or_else(|| panic!("no {refused:?} event: {export}"));
        assert_eq!((&denial["actor"], &denial["outcome"]), (&json!(OFFICER), &json!("denied")));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_rotation_fires_once_per_period() {
    let dir = tempfile::tempdir().unwrap();
    let ks =
        KeyService::start(&dir.path().join("ks"), "[lifecycle]\nscheduler_interval_ms = 100\n");
    create_tenant(&ks, "onc").await;
    create_tenant(&ks, "t-still").await;
    let put = |body: Value| {
        let client = ks.client(ADMIN);
        let url = format!("{}/v1/tenants/onc/keys/auto-rotate", ks.url);
        async move {
            let response = client.put(url).json(&body).send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = put(json!({"every_secs": 0})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_period")));
    // Longer than keys.max_rotation_period_days (365 by default).
    let (status, body) = put(json!({"every_secs": 366 * 86_400})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_period")), "{body}");
    let (status, body) = put(json!({"every_secs": 2})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rotate_every_secs"], 2);
    assert!(body["next_rotation_at"].as_i64().is_some());
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(7_300)).await;
    let (status, _) = put(json!({"every_secs": null})).await;
    assert_eq!(status, 200);
    let elapsed = started.elapsed().as_secs_f64();

    let (_, body) = ks.get(ADMIN, "/v1/tenants/onc").await;
    let tenant: Value = serde_json::from_str(&body).unwrap();
    let created: Vec<i64> = tenant["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["created_at"].as_i64().unwrap())
        .collect();
    let rotations = created.len() - 1;
    // Seconds-granular times: one rotation per 2 s period, never two.
    assert!(rotations >= 2 && rotations as f64 <= elapsed / 2.0 + 1.0, "{rotations} in {elapsed}s");
    for pair in created.windows(2) {
        assert!(pair[1] - pair[0] >= 2, "two rotations within one period: {created:?}");
    }
    let (_, still) = ks.get(ADMIN, "/v1/tenants/t-still").await;
    assert!(still.contains("\"active_version\":1"), "no schedule, no rotation: {still}");
    let (_, export) = ks.get(AUDITOR, "/v1/audit?tenant=onc").await;
    let scheduled = export.lines().filter(|l| l.contains("keygate:scheduler")).count();
    assert_eq!(scheduled, rotations, "each scheduled rotation is audited");
    // Turned off: no more rotations.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (_, body) = ks.get(ADMIN, "/v1/tenants/onc").await;
    let tenant: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(tenant["versions"].as_array().unwrap().len(), created.len());
}

/// Keys per master, from the keystore itself.
async fn keys_per_master(ks: &KeyService) -> Vec<(String, i64)> {
    let mut db = sqlx::SqliteConnection::connect(&format!("sqlite://{}", ks.database().display()))
        .await
        .unwrap();
    let rows = sqlx::query_as(
        "SELECT m.kind, count(*) FROM (
             SELECT master_key AS m FROM kek_versions WHERE wrapped IS NOT NULL
             UNION ALL SELECT index_root_master FROM tenants WHERE index_root_wrapped IS NOT NULL
             UNION ALL SELECT master_key FROM audit_signing_keys
         ) k JOIN master_keys m ON m.id = k.m GROUP BY m.kind ORDER BY m.kind",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    db.close().await.unwrap();
    rows
}

/// A SoftHSM2 token holding a master key (made with `keygate admin`), a
/// PIN file for it, and a directory for a key service.
struct Hsm {
    token: SoftHsm2,
    dir: tempfile::TempDir,
    ks_dir: std::path::PathBuf,
    pin: std::path::PathBuf,
    /// A key service `[root]` section for the token's master key.
    hsm_root: String,
}

impl Hsm {
    fn with_master_key() -> Self {
        let token = SoftHsm2::new_token();
        let dir = tempfile::tempdir().unwrap();
        let ks_dir = dir.path().join("ks");
        std::fs::create_dir_all(&ks_dir).unwrap();
        let pin = dir.path().join("pin");
        write_private(&pin, softhsm2::USER_PIN);
        let hsm_root = token.root_section(&pin.display().to_string());
        let create = dir.path().join("create.toml");
        std::fs::write(&create, format!("listen = \"127.0.0.1:0\"\ndata_dir = \"d\"\n[tls]\ncert = \"x\"\nkey = \"x\"\nclient_ca = \"x\"\n{hsm_root}[policy]\nfile = \"p\"\n")).unwrap();
        token.create_key_with_cli(&create);
        Self { token, dir, ks_dir, pin, hsm_root }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn master_rotation_to_softhsm2_resumes_after_a_crash() {
    let Hsm { token, dir, ks_dir, pin, hsm_root } = Hsm::with_master_key();
    let conf = token.conf();
    let env = [("SOFTHSM2_CONF", conf.to_str().unwrap())];
    // The root is a local key file, so the HSM's module is listed.
    let trusted = format!("[trusted_masters]\npkcs11_modules = [{:?}]\n", token.module());
    let mut ks = KeyService::start_with(
        &ks_dir,
        &Options { env: &env, extra: &trusted, ..Options::default() },
    );

    const TENANTS: usize = 300;
    let mut deks = Vec::new();
    for i in 0..TENANTS {
        let tenant = format!("t-{i:03}");
        create_tenant(&ks, &tenant).await;
        let (status, body) = ks
            .post(ENCRYPTOR, &format!("/v1/tenants/{tenant}/datakeys"), &json!({"count": 1}))
            .await;
        assert_eq!(status, 200, "{body}");
        deks.push((tenant, body["kek_version"].clone(), body["keys"][0].clone()));
    }
    let to = json!({"to": {
        "provider": "pkcs11",
        "module": token.module(),
        "token_label": softhsm2::TOKEN_LABEL,
        "key_label": softhsm2::KEY_LABEL,
        "pin_file": pin,
    }});

    // Relative paths and unusable providers are refused up front.
    let mut relative = to.clone();
    relative["to"]["pin_file"] = json!("pin");
    let (status, body) = ks.post(ADMIN, "/v1/master/rotate", &relative).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_provider")), "{body}");
    // A timeout over a day, as the config file would refuse it (before
    // any attempt to reach the provider).
    let slow = json!({"to": {"provider": "aws_kms", "region": "eu-west-1", "key_id": "alias/k", "timeout_ms": 86_400_001}});
    let (status, body) = ks.post(ADMIN, "/v1/master/rotate", &slow).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_provider")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("root.timeout_ms is longer"));
    let mut wrong = to.clone();
    wrong["to"]["key_label"] = json!("no-such-key");
    assert_eq!(ks.post(ADMIN, "/v1/master/rotate", &wrong).await.0, 400);
    assert_eq!(ks.post(DECRYPTOR, "/v1/master/rotate", &to).await.0, 403);

    // Start the rotation and SIGKILL the service in the middle of it.
    let request = {
        let client = ks.client(ADMIN);
        let url = format!("{}/v1/master/rotate", ks.url);
        let body = to.clone();
        tokio::spawn(async move { client.post(url).json(&body).send().await })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let counts = keys_per_master(&ks).await;
        if counts.iter().any(|(kind, n)| kind == "pkcs11" && *n >= 20) {
            break;
        }
        assert!(Instant::now() < deadline, "the rotation never started: {counts:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ks.kill();
    let _ = request.await;
    let midway = keys_per_master(&ks).await;
    assert_eq!(midway.len(), 2, "killed in the middle: keys under both masters {midway:?}");

    // Restarted with a PIN the token rejects (someone rewrote the file):
    // keys still under the old master are served, those under the HSM get
    // 503 at once, and however many requests and reconnections need the
    // HSM, the token is offered that PIN once (a token that counts failed
    // logins would lock its user), as `GET /v1/master` shows.
    write_private(&pin, "not-the-pin");
    let rejections = |ks: &KeyService| ks.log().matches("the token rejected the user PIN").count();
    let rejected_before = rejections(&ks);
    let started = Instant::now();
    ks.resume();
    let unwrap_one = |ks: &KeyService, (tenant, version, key): &(String, Value, Value)| {
        let item = json!({"record_key_id": key["record_key_id"], "kek_version": version,
                          "wrapped": key["wrapped"]});
        let path = format!("/v1/tenants/{tenant}/datakeys/unwrap");
        let client = ks.client(DECRYPTOR);
        let url = format!("{}{path}", ks.url);
        async move {
            let response = client.post(url).json(&json!({"items": [item]})).send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let mut on_hsm = Vec::new();
    for dek in &deks {
        let (status, body) = unwrap_one(&ks, dek).await;
        let unavailable =
            (status, body["error"]["code"].as_str()) == (503, Some("root_key_unavailable"));
        assert!(status == 200 || unavailable, "{}: {status} {body}", dek.0);
        if unavailable {
            on_hsm.push(dek.clone());
        }
    }
    // (Tenant keys move first, and the rotation was killed once 20 had.)
    assert!(on_hsm.len() >= 20, "{} requests refused", on_hsm.len());
    let master = |masters: &str, kind: &str| {
        let masters: Value = serde_json::from_str(masters).unwrap();
        let all = masters["masters"].as_array().unwrap().clone();
        all.into_iter().find(|m| m["kind"] == kind).unwrap()
    };
    let (_, masters) = ks.get(ADMIN, "/v1/master").await;
    assert_eq!(master(&masters, "local")["connection"], json!({"state": "connected"}));
    let hsm = master(&masters, "pkcs11")["connection"].clone();
    assert_eq!(hsm["state"], "failing", "{hsm}");
    assert!(hsm["last_error"].as_str().unwrap().contains("CKR_PIN_INCORRECT"), "{hsm}");

    // One failed login in all; the master's connection is tried again
    // once per wait (30 s, then 60 s, …), each refused without a login.
    let logins = rejections(&ks) - rejected_before;
    assert_eq!(logins, 1, "{logins} failed logins for {} requests", on_hsm.len());
    let failures = hsm["failures"].as_u64().unwrap();
    let waits_over = started.elapsed().as_secs() / 30;
    assert!(failures >= 1 && failures <= 1 + waits_over, "{hsm}");
    let longest_wait = (30 << (failures - 1)).min(900);
    assert!(hsm["retry_in_secs"].as_u64().unwrap() <= longest_wait, "{hsm}");
    // The error names module paths and PIN sources: admins only.
    let (_, as_auditor) = ks.get(AUDITOR, "/v1/master").await;
    let hsm_to_auditor = master(&as_auditor, "pkcs11")["connection"].clone();
    assert_eq!(hsm_to_auditor["state"], "failing", "{hsm_to_auditor}");
    assert!(hsm_to_auditor.get("last_error").is_none(), "{hsm_to_auditor}");
    assert!(!masters.contains("not-the-pin") && !ks.log().contains("not-the-pin"));

    // `POST /v1/master/{id}/connect` tries now, wait or not: with the PIN
    // put right, the master is back at once rather than after up to 15
    // minutes. Admins only, audited. (A failing one: below.)
    let hsm_id = master(&masters, "pkcs11")["id"].as_i64().unwrap();
    let connect = format!("/v1/master/{hsm_id}/connect");
    assert_eq!(ks.post(AUDITOR, &connect, &json!({})).await.0, 403);
    assert_eq!(ks.post(ADMIN, "/v1/master/0/connect", &json!({})).await.0, 400);
    assert_eq!(ks.post(ADMIN, "/v1/master/x/connect", &json!({})).await.0, 400);
    let (status, body) = ks.post(ADMIN, "/v1/master/999/connect", &json!({})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("unknown_master")), "{body}");
    write_private(&pin, softhsm2::USER_PIN);
    let (status, body) = ks.post(ADMIN, &connect, &json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["id"].as_i64(), body["kind"].as_str()), (Some(hsm_id), Some("pkcs11")));
    assert_eq!(body["connection"], json!({"state": "connected"}), "{body}");
    assert_eq!(rejections(&ks) - rejected_before, logins, "no login failed");
    let (status, body) = unwrap_one(&ks, &on_hsm[0]).await;
    assert_eq!(status, 200, "{body}");
    let (_, export) = ks.get(AUDITOR, "/v1/audit").await;
    let events: Vec<Value> = export.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let connects = |events: &[Value]| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["action"] == "master.connect")
            .map(|e| {
                assert_eq!(
                    (e["actor"].as_str(), &e["detail"]["master"]),
                    (Some(ADMIN), &json!(hsm_id))
                );
                e["outcome"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    assert_eq!(connects(&events), ["ok"], "{export}");
    let refused = events.iter().any(|e| {
        (e["actor"].as_str(), e["action"].as_str(), e["outcome"].as_str())
            == (Some(AUDITOR), Some("connect to a master key"), Some("denied"))
    });
    assert!(refused, "the auditor's attempt is audited as denied");

    // An HSM whose token is gone is an outage: tried again after 1 s, 2 s,
    // 4 s …, not after the 30 s, 60 s … that wrong settings wait (three
    // failures would take them 90 s). SoftHSM2 reads its tokens once per
    // process, at C_Initialize, so this one would not see the token come
    // back before a restart.
    ks.stop();
    write_private(&pin, softhsm2::USER_PIN);
    let tokens = token.tokens_dir();
    let away = dir.path().join("tokens-away");
    std::fs::rename(&tokens, &away).unwrap();
    std::fs::create_dir(&tokens).unwrap();
    ks.resume();
    let deadline = Instant::now() + Duration::from_secs(80);
    loop {
        let (status, body) = unwrap_one(&ks, &on_hsm[0]).await;
        assert_eq!((status, body["error"]["code"].as_str()), (503, Some("root_key_unavailable")));
        let (_, masters) = ks.get(ADMIN, "/v1/master").await;
        let hsm = master(&masters, "pkcs11")["connection"].clone();
        assert_eq!(hsm["state"], "failing", "{hsm}");
        let failures = hsm["failures"].as_u64().unwrap();
        let longest_wait = (1 << (failures - 1)).min(60);
        assert!(hsm["retry_in_secs"].as_u64().unwrap() <= longest_wait, "{hsm}");
        if failures >= 3 {
            assert!(hsm["last_error"].as_str().unwrap().contains(softhsm2::TOKEN_LABEL), "{hsm}");
            break;
        }
        assert!(Instant::now() < deadline, "an outage waits as long as wrong settings: {hsm}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Connecting now fails too, and says why (to an admin).
    let (status, body) = ks.post(ADMIN, &connect, &json!({})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("master_unreachable")));
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(softhsm2::TOKEN_LABEL), "{body}");
    let (_, export) = ks.get(AUDITOR, "/v1/audit").await;
    let events: Vec<Value> = export.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(connects(&events), ["ok", "ok", "error"], "{export}");
    ks.stop();
    std::fs::remove_dir(&tokens).unwrap();
    std::fs::rename(&away, &tokens).unwrap();

    // Restarted with its old configuration: every tenant readable, under
    // whichever master each key is on.
    ks.resume();
    let unwrap_all = |ks: &KeyService| {
        let deks = deks.clone();
        let client = ks.client(DECRYPTOR);
        let url = ks.url.clone();
        async move {
            for (tenant, version, key) in deks {
                let item = json!({"record_key_id": key["record_key_id"], "kek_version": version,
                                  "wrapped": key["wrapped"]});
                let response = client
                    .post(format!("{url}/v1/tenants/{tenant}/datakeys/unwrap"))
                    .json(&json!({"items": [item]}))
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                let body: Value = response.json().await.unwrap();
                assert_eq!(status, 200, "{tenant}: {body}");
                assert_eq!(body["results"][0]["dek"], key["dek"], "{tenant}: same DEK");
            }
        }
    };
    unwrap_all(&ks).await;

    // Running the command again finishes the job.
    let (status, done) = ks.post(ADMIN, "/v1/master/rotate", &to).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!((done["state"].as_str(), done["remaining"].as_u64()), (Some("complete"), Some(0)));
    assert_eq!(done["master"]["kind"], "pkcs11");
    assert_eq!(keys_per_master(&ks).await, [("pkcs11".to_owned(), (2 * TENANTS + 1) as i64)]);
    let (_, masters) = ks.get(AUDITOR, "/v1/master").await;
    let masters: Value = serde_json::from_str(&masters).unwrap();
    assert_eq!(masters["active"]["kind"], "pkcs11");
    unwrap_all(&ks).await;
    let (status, body) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "after"})).await;
    assert_eq!(status, 201, "{body}");
    let (_, verify) = ks.get(AUDITOR, "/v1/audit/verify").await;
    assert!(verify.contains("\"ok\":true"), "{verify}");

    // Nothing is left under the old master: without its key file the
    // service still starts and serves everything.
    ks.stop();
    std::fs::remove_file(ks_dir.join("root.key")).unwrap();
    let config = std::fs::read_to_string(ks_dir.join("keygate.toml")).unwrap();
    let config = config.replace(
        "[root]\nprovider = \"dev_local\"\nkey_file = \"root.key\"\ncreate_if_missing = true\n",
        &hsm_root,
    );
    assert!(config.contains("pkcs11"));
    std::fs::write(ks_dir.join("keygate.toml"), config).unwrap();
    ks.restart();
    unwrap_all(&ks).await;
    let (_, verify) = ks.get(AUDITOR, "/v1/audit/verify").await;
    assert!(verify.contains("\"ok\":true"), "{verify}");
    assert!(!ks.log().contains(softhsm2::USER_PIN));
}

/// A master other than the configured root loads only a PKCS#11 module
/// this host lists, and is only a key it lists: neither an admin's
/// rotation request nor a row someone rewrote in the keystore chooses the
/// library the key service loads.
#[tokio::test(flavor = "multi_thread")]
async fn masters_load_only_the_modules_this_host_trusts() {
    let Hsm { token, dir, ks_dir, pin, .. } = Hsm::with_master_key();
    // The same module at a path nobody listed: it would load and work.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let copy = elsewhere.join("libsofthsm2.so");
    std::fs::copy(token.module(), &copy).unwrap();
    let conf = token.conf();
    let env = [("SOFTHSM2_CONF", conf.to_str().unwrap())];
    // The module is listed, but only another key in it.
    let hsm_key = format!("pkcs11:{}/{}", softhsm2::TOKEN_LABEL, softhsm2::KEY_LABEL);
    let other_key = format!("pkcs11:{}/another-key", softhsm2::TOKEN_LABEL);
    let trusted = format!(
        "[trusted_masters]\npkcs11_modules = [{:?}]\nkeys = [{other_key:?}]\n",
        token.module()
    );
    let mut ks = KeyService::start_with(
        &ks_dir,
        &Options { env: &env, extra: &trusted, ..Options::default() },
    );
    create_tenant(&ks, "onc").await;
    let (status, issued) =
        ks.post(ENCRYPTOR, "/v1/tenants/onc/datakeys", &json!({"count": 1})).await;
    assert_eq!(status, 200, "{issued}");
    let unwrap = json!({"items": [{"record_key_id": issued["keys"][0]["record_key_id"],
        "kek_version": issued["kek_version"], "wrapped": issued["keys"][0]["wrapped"]}]});

    // An admin's rotation to the unlisted copy: refused before it is
    // loaded, and recorded as refused.
    let to = |module: &std::path::Path| {
        json!({"to": {
            "provider": "pkcs11",
            "module": module,
            "token_label": softhsm2::TOKEN_LABEL,
            "key_label": softhsm2::KEY_LABEL,
            "pin_file": pin,
        }})
    };
    let (status, body) = ks.post(ADMIN, "/v1/master/rotate", &to(&copy)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("untrusted_provider")),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&copy.display().to_string())
            && message.contains("trusted_masters.pkcs11_modules"),
        "{message}"
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", ks.pid().unwrap())).unwrap();
    assert!(!maps.contains(copy.to_str().unwrap()), "the refused module was loaded");
    assert_eq!(keys_per_master(&ks).await, [("local".to_owned(), 3)]);
    let (_, export) = ks.get(AUDITOR, "/v1/audit").await;
    let refused = audit_event(&export, |e| e["action"] == "master.rotate").unwrap();
    assert_eq!(refused["outcome"], "denied", "{refused}");
    assert_eq!(refused["detail"]["rule"], "trusted_masters", "{refused}");

    // The listed module, but a key the host did not list: refused too.
    let (status, body) = ks.post(ADMIN, "/v1/master/rotate", &to(token.module())).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("untrusted_provider")),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&hsm_key) && message.contains("trusted_masters.keys"), "{message}");
    assert_eq!(keys_per_master(&ks).await, [("local".to_owned(), 3)]);
    let (_, export) = ks.get(AUDITOR, "/v1/audit").await;
    let reasons: Vec<String> = export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["action"] == "master.rotate" && e["outcome"] == "denied")
        .map(|e| e["detail"]["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("pkcs11_modules") && reasons[1].contains(&hsm_key), "{reasons:?}");

    // Listed module and key: the keys move under the HSM.
    ks.stop();
    let config = std::fs::read_to_string(ks_dir.join("keygate.toml")).unwrap();
    let config =
        config.replace(&format!("keys = [{other_key:?}]"), &format!("keys = [{hsm_key:?}]"));
    std::fs::write(ks_dir.join("keygate.toml"), config).unwrap();
    ks.restart();
    let (status, done) = ks.post(ADMIN, "/v1/master/rotate", &to(token.module())).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(keys_per_master(&ks).await, [("pkcs11".to_owned(), 3)]);

    // Someone with write access to the keystore points the recorded
    // master at another key in the listed module: refused by name before
    // the module is asked for it (an unknown label would say so instead).
    ks.stop();
    let database = ks.database();
    let rewrite = |from: String, to: String| {
        let database = database.clone();
        async move {
            let url = format!("sqlite://{}", database.display());
            let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
            let done = sqlx::query(
                "UPDATE master_keys SET config = replace(config, ?1, ?2),
                                        key_ref = replace(key_ref, ?1, ?2) WHERE kind = 'pkcs11'",
            )
            .bind(from)
            .bind(to)
            .execute(&mut db)
            .await
            .unwrap();
            assert_eq!(done.rows_affected(), 1);
            db.close().await.unwrap();
        }
    };
    rewrite(softhsm2::KEY_LABEL.to_owned(), "rogue".to_owned()).await;
    let config = ks_dir.join("keygate.toml");
    let server = ["server".as_ref(), "--config".as_ref(), config.as_os_str()];
    let (started, stderr) = run_to_exit(&server, &env);
    assert!(!started, "the key service started on a key nobody listed: {stderr}");
    let rogue = format!("pkcs11:{}/rogue", softhsm2::TOKEN_LABEL);
    assert!(stderr.contains(&rogue) && stderr.contains("trusted_masters.keys"), "{stderr}");
    rewrite("rogue".to_owned(), softhsm2::KEY_LABEL.to_owned()).await;
    ks.restart();

    // Someone with write access to the keystore points the recorded
    // master at the copy: the key service does not load it, and keys
    // under that master are unavailable rather than reached through it.
    // The audit signing key is under that master too, so the service
    // does not start, and says why.
    ks.stop();
    let module = token.module().to_str().unwrap().to_owned();
    rewrite(module, copy.to_str().unwrap().to_owned()).await;
    let (started, stderr) = run_to_exit(&server, &env);
    assert!(!started, "the key service started on a module nobody listed: {stderr}");
    assert!(
        stderr.contains("recorded settings refused")
            && stderr.contains(&copy.display().to_string())
            && stderr.contains("trusted_masters.pkcs11_modules"),
        "{stderr}"
    );

    // Listed by the host's operator, the same settings work: the refusal
    // above was the check, not a broken copy.
    let config = std::fs::read_to_string(ks_dir.join("keygate.toml")).unwrap();
    let listed = format!("pkcs11_modules = [{:?}, {:?}]", token.module(), copy);
    let config = config.replace(&format!("pkcs11_modules = [{:?}]", token.module()), &listed);
    std::fs::write(ks_dir.join("keygate.toml"), config).unwrap();
    ks.restart();
    let (status, body) = ks.post(DECRYPTOR, "/v1/tenants/onc/datakeys/unwrap", &unwrap).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["dek"], issued["keys"][0]["dek"]);
}
