//! End-to-end tests of `keygate sidecar` beside a real key service.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use keygate_tests::keyservice::{KeyService, signal};
use keygate_tests::sidecar::Sidecar;
use serde_json::{Value, json};

const ADMIN: &str = "spiffe://test/admin";
const AUDITOR: &str = "spiffe://test/auditor";
const CLINICAL: &str = "spiffe://test/sidecar-clinical";
const CONTACT: &str = "spiffe://test/sidecar-contact";

fn patient(i: usize) -> Value {
    json!({
        "name": format!("Patient {i}"),
        "ssn": format!("123-45-{:04}", i % 10_000),
        "mrn": format!("MRN-{i:06}"),
        "email": format!("patient{i}@example.org"),
        "diagnosis": {"code": "C50.9", "stage": i % 4, "confirmed": true, "notes": null},
        "patient_id": format!("P-{i}"),
        "allergies": ["penicillin", {"substance": "latex", "severity": 2.5}],
        "age": 30 + i % 50,
    })
}

/// A key service in `dir/ks` with the tenant `onc`.
async fn key_service_with_onc(dir: &std::path::Path) -> KeyService {
    let ks = KeyService::start(&dir.join("ks"), "");
    let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    ks
}

async fn stack(dir: &std::path::Path, sidecar_extra: &str) -> (KeyService, Sidecar) {
    let ks = key_service_with_onc(dir).await;
    let sidecar = Sidecar::start(&ks, &dir.join("sidecar"), CLINICAL, sidecar_extra);
    (ks, sidecar)
}

async fn encrypt(sc: &Sidecar, record: &Value) -> Value {
    let (status, body) = sc
        .post("/v1/encrypt", &json!({"tenant": "onc", "schema": "patient", "record": record}))
        .await;
    assert_eq!(status, 200, "{body}");
    body["record"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn need_to_know_by_field_class() {
    let dir = tempfile::tempdir().unwrap();
    let (ks, clinical) = stack(dir.path(), "").await;
    let contact = Sidecar::start(&ks, &dir.path().join("contact"), CONTACT, "");
    let encrypted = encrypt(&clinical, &patient(7)).await;

    let (status, body) = clinical.post("/v1/decrypt", &json!({"record": encrypted})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["record"]["diagnosis"], patient(7)["diagnosis"], "phi.clinical is revealed");

    let (status, body) =
        contact.post("/v1/decrypt", &json!({"record": encrypted, "purpose": "treatment"})).await;
    assert_eq!(status, 200, "{body}");
    let record = &body["record"];
    assert!(record.get("diagnosis").is_none(), "diagnosis withheld: {record}");
    assert_eq!(record["ssn"], "***-**-0007", "ssn masked");
    assert_eq!(record["email"], "patient7@example.org", "contact data revealed");
    assert!(record.get("mrn").is_none(), "no mask defined for mrn: withheld");
    assert_eq!(record["allergies"], json!([null, null]));
    let fields = body["report"][0]["fields"].as_array().unwrap();
    let outcome = |p: &str| fields.iter().find(|f| f["pointer"] == p).unwrap()["outcome"].clone();
    assert_eq!(outcome("/diagnosis"), "withheld");
    assert_eq!(outcome("/ssn"), "masked");
    assert_eq!(outcome("/email"), "revealed");
    assert!(!body.to_string().contains("C50.9"), "no trace of the withheld value");
}

/// A search token tests guesses against every stored record, so an
/// identity that may not encrypt (which would make the same test) gets one
/// only for a field decrypt shows it, clear or masked, for the purpose.
#[tokio::test(flavor = "multi_thread")]
async fn index_tokens_follow_need_to_know_unless_the_caller_may_encrypt() {
    const LOOKUP: &str = "spiffe://test/lookup";
    async fn index(sc: &Sidecar, path: &str, value: &str, purpose: Option<&str>) -> (u16, Value) {
        let mut body = json!({"tenant": "onc", "schema": "patient", "path": path, "value": value});
        if let Some(purpose) = purpose {
            body["purpose"] = json!(purpose);
        }
        sc.post("/v1/index", &body).await
    }
    let dir = tempfile::tempdir().unwrap();
    // Decryptor only: contact data in clear for treatment, masked for
    // billing; identifiers never.
    std::fs::create_dir_all(dir.path().join("ks")).unwrap();
    let policy = format!(
        "{}\n[[grant]]\nidentity = \"{LOOKUP}\"\ntenants = [\"onc\"]\nroles = [\"decryptor\"]\n\
         classes = [\"pii.contact\"]\npurposes = [\"treatment\"]\n\
         \n[[grant]]\nidentity = \"{LOOKUP}\"\ntenants = [\"onc\"]\nroles = [\"decryptor\"]\n\
         masked = [\"pii.contact\"]\npurposes = [\"billing\"]\n",
        keygate_tests::keyservice::TEST_POLICY
    );
    std::fs::write(dir.path().join("ks/policy.toml"), policy).unwrap();
    let ks = key_service_with_onc(dir.path()).await;
    // Encryptor and decryptor, /mrn withheld on decrypt (masked, no mask).
    let contact = Sidecar::start(&ks, &dir.path().join("contact"), CONTACT, "");
    let lookup = Sidecar::start(&ks, &dir.path().join("lookup"), LOOKUP, "");
    let record = encrypt(&contact, &patient(9)).await;

    let email = "patient9@example.org";
    for purpose in ["treatment", "billing"] {
        let (status, body) = index(&lookup, "/email", email, Some(purpose)).await;
        assert_eq!((status, &body["token"]), (200, &record["email_bidx"]), "{purpose}: {body}");
    }
    for (path, value, purpose) in [
        ("/email", email, Some("research")),
        ("/email", email, None),
        ("/mrn", "MRN-000009", Some("treatment")),
        ("/mrn", "MRN-000009", Some("billing")),
    ] {
        let (status, body) = index(&lookup, path, value, purpose).await;
        assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(path) && !message.contains(value), "{message}");
        assert!(body.get("token").is_none());
    }
    // Whoever may encrypt gets the token whatever decrypt shows it.
    let (status, body) = index(&contact, "/mrn", "MRN-000009", None).await;
    assert_eq!((status, &body["token"]), (200, &record["mrn"]), "{body}");
    let (status, body) = contact.post("/v1/decrypt", &json!({"record": record})).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["record"].get("mrn").is_none(), "withheld on decrypt: {body}");
}

/// A pseudonym field is shown to the very readers it de-identifies, so a
/// pseudonym of a guess would re-identify them: only an identity that may
/// encrypt (and could make the same test through /v1/encrypt) gets one.
#[tokio::test(flavor = "multi_thread")]
async fn pseudonyms_are_made_only_for_identities_that_may_encrypt() {
    const RESEARCH: &str = "spiffe://test/research";
    let dir = tempfile::tempdir().unwrap();
    // Decryptor only, shown the pseudonym field's class in clear.
    std::fs::create_dir_all(dir.path().join("ks")).unwrap();
    let policy = format!(
        "{}\n[[grant]]\nidentity = \"{RESEARCH}\"\ntenants = [\"onc\"]\nroles = [\"decryptor\"]\n\
         classes = [\"pii.identifier\", \"phi.clinical\"]\npurposes = [\"research\"]\n",
        keygate_tests::keyservice::TEST_POLICY
    );
    std::fs::write(dir.path().join("ks/policy.toml"), policy).unwrap();
    let ks = key_service_with_onc(dir.path()).await;
    let clinical = Sidecar::start(&ks, &dir.path().join("clinical"), CLINICAL, "");
    let research = Sidecar::start(&ks, &dir.path().join("research"), RESEARCH, "");
    let record = encrypt(&clinical, &patient(5)).await;
    let (status, body) =
        research.post("/v1/decrypt", &json!({"record": record, "purpose": "research"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["record"]["patient_id"], record["patient_id"], "the pseudonym is shown");

    let guess = json!({"tenant": "onc", "namespace": "patient", "value": "P-5"});
    let (status, body) = research.post("/v1/pseudonym", &guess).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("encryptor") && !message.contains("P-5"), "{message}");
    assert!(body.get("pseudonym").is_none());
    let (status, body) = clinical.post("/v1/pseudonym", &guess).await;
    assert_eq!((status, &body["pseudonym"]), (200, &record["patient_id"]), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_records_are_refused_without_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let (_ks, sc) = stack(dir.path(), "").await;
    let a = encrypt(&sc, &patient(1)).await;
    let b = encrypt(&sc, &patient(2)).await;

    let mut flipped = a.clone();
    let ssn = flipped["ssn"].as_str().unwrap().to_owned();
    let mut bytes = ssn.into_bytes();
    let i = bytes.len() - 5;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    flipped["ssn"] = json!(String::from_utf8(bytes).unwrap());
    let mut moved = a.clone();
    moved["diagnosis"] = b["diagnosis"].clone();
    let mut dropped = a.clone();
    dropped.as_object_mut().unwrap().remove("ssn");
    let mut swapped = a.clone();
    swapped["_kg"] = b["_kg"].clone();
    for (what, record) in [
        ("flipped byte", flipped),
        ("moved field", moved),
        ("dropped field", dropped),
        ("swapped _kg", swapped),
    ] {
        let (status, body) = sc.post("/v1/decrypt", &json!({"record": record})).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (422, Some("cannot_decrypt")),
            "{what}: {body}"
        );
        assert!(!body.to_string().contains("Patient"), "{what}: nothing of the plaintext");
    }
    // A batch with one bad record fails whole.
    let (status, _) = sc.post("/v1/decrypt", &json!({"records": [a, {"_kg": "kg1h:AAAA"}]})).await;
    assert_eq!(status, 422);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_specific_errors_and_the_sidecar_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (_ks, sc) = stack(dir.path(), "").await;
    let encrypted = encrypt(&sc, &patient(1)).await;
    let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_record = format!(r#"{{"tenant":"onc","schema":"patient","record":{{"x":{deep}}}}}"#);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("/v1/encrypt", b"{\"tenant\":".to_vec(), 400, "malformed_json"),
        (
            "/v1/encrypt",
            serde_json::to_vec(&json!({"tenant": "t-nobody", "schema": "patient", "record": {}}))
                .unwrap(),
            404,
            "unknown_tenant",
        ),
        (
            "/v1/encrypt",
            serde_json::to_vec(&json!({"tenant": "onc", "schema": "invoice", "record": {}}))
                .unwrap(),
            404,
            "unknown_schema",
        ),
        (
            "/v1/encrypt",
            serde_json::to_vec(&json!({"tenant": "onc", "schema": "patient", "record": encrypted}))
                .unwrap(),
            400,
            "already_encrypted",
        ),
        (
            "/v1/encrypt",
            serde_json::to_vec(&json!({"tenant": "onc", "schema": "patient", "record": [1]}))
                .unwrap(),
            400,
            "invalid_request",
        ),
        (
            "/v1/encrypt",
            serde_json::to_vec(
                &json!({"tenant": "onc", "schema": "patient", "record": {"allergies": "latex"}}),
            )
            .unwrap(),
            400,
            "shape_mismatch",
        ),
        (
            "/v1/encrypt",
            serde_json::to_vec(&json!({"tenant": "elsewhere", "schema": "patient", "record": {}}))
                .unwrap(),
            403,
            "forbidden",
        ),
        (
            "/v1/decrypt",
            serde_json::to_vec(&json!({"record": {"plain": true}})).unwrap(),
            400,
            "not_encrypted",
        ),
        ("/v1/encrypt", vec![b' '; 50 * 1024 * 1024], 413, "body_too_large"),
        ("/v1/encrypt", deep_record.into_bytes(), 400, "json_too_deep"),
    ];
    for (path, body, status, code) in cases {
        let (got, answer) = sc.post_raw(path, body).await;
        assert_eq!((got, answer["error"]["code"].as_str()), (status, Some(code)), "{answer}");
    }
    // In a request of several records, the error names the one at fault.
    let batch = json!({"tenant": "onc", "schema": "patient",
                       "records": [patient(1), encrypted.clone(), patient(2)]});
    let (status, answer) = sc.post("/v1/encrypt", &batch).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("already_encrypted")));
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("records[1]: "), "{message}");
    let (status, answer) =
        sc.post("/v1/rewrap", &json!({"records": [encrypted.clone(), {"plain": true}]})).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("not_encrypted")));
    assert!(answer["error"]["message"].as_str().unwrap().starts_with("records[1]: "), "{answer}");
    let mut tampered = encrypted.clone();
    tampered["_kg"] = json!(format!("{}x", encrypted["_kg"].as_str().unwrap()));
    let (status, answer) =
        sc.post("/v1/decrypt", &json!({"records": [encrypted.clone(), {"plain": true}]})).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("not_encrypted")));
    assert!(answer["error"]["message"].as_str().unwrap().starts_with("records[1]: "), "{answer}");
    let (status, answer) = sc
        .post("/v1/decrypt", &json!({"records": [encrypted.clone(), encrypted.clone(), tampered]}))
        .await;
    assert!((400..500).contains(&status), "{status} {answer}");
    assert!(answer["error"]["message"].as_str().unwrap().starts_with("records[2]: "), "{answer}");
    let (status, _) = sc.get("/healthz").await;
    assert_eq!(status, 200);
    let (status, body) = sc.post("/v1/decrypt", &json!({"record": encrypted})).await;
    assert_eq!(status, 200, "still serving: {body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn keeps_working_from_pool_and_cache_while_the_key_service_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ks, sc) = stack(dir.path(), "[pool]\nbatch = 10\nlow_water = 2\n").await;
    let cached = encrypt(&sc, &patient(1)).await;
    // Let the pool refill, then take the key service away.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    ks.stop();

    let mut encrypted_while_down = 0;
    let refusal = loop {
        let (status, body) = sc
            .post(
                "/v1/encrypt",
                &json!({"tenant": "onc", "schema": "patient", "record": patient(100)}),
            )
            .await;
        if status != 200 {
            break (status, body);
        }
        encrypted_while_down += 1;
        assert!(encrypted_while_down <= 20, "the pool cannot hold that many");
    };
    assert!(encrypted_while_down >= 1, "encryption continued from the pool");
    assert_eq!(
        (refusal.0, refusal.1["error"]["code"].as_str()),
        (503, Some("key_service_unavailable")),
        "{}",
        refusal.1
    );

    let (status, body) = sc.post("/v1/decrypt", &json!({"record": cached})).await;
    assert_eq!(status, 200, "a cached DEK still decrypts: {body}");

    ks.resume();
    let mut recovered = false;
    for _ in 0..100 {
        let (status, _) = sc
            .post(
                "/v1/encrypt",
                &json!({"tenant": "onc", "schema": "patient", "record": patient(5)}),
            )
            .await;
        if status == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(recovered, "the sidecar recovered by itself");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_decrypt_is_audited_including_cache_hits() {
    let dir = tempfile::tempdir().unwrap();
    let (ks, mut sc) = stack(dir.path(), "").await;
    let encrypted = encrypt(&sc, &patient(3)).await;
    let id = {
        let (_, body) =
            sc.post("/v1/decrypt", &json!({"record": encrypted, "purpose": "treatment"})).await;
        body["report"][0]["record_key_id"].as_str().unwrap().to_owned()
    };
    for _ in 0..2 {
        let (status, _) =
            sc.post("/v1/decrypt", &json!({"record": encrypted, "purpose": "treatment"})).await;
        assert_eq!(status, 200);
    }
    sc.stop(); // flushes
    let (_, export) = ks.get(AUDITOR, "/v1/audit?tenant=onc").await;
    let decrypts: Vec<Value> = export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["action"] == "record.decrypt")
        .collect();
    // Alike accesses waiting in the sidecar may share one event, which
    // lists the record once per access and counts the requests.
    let accesses: usize = decrypts
        .iter()
        .map(|e| e["record_key_ids"].as_array().unwrap().iter().filter(|i| **i == id).count())
        .sum();
    let requests: u64 =
        decrypts.iter().map(|e| e["detail"]["fields"]["requests"].as_u64().unwrap()).sum();
    assert_eq!((accesses, requests), (3, 3), "{export}");
    assert!(
        decrypts
            .iter()
            .all(|e| e["ts_ms"].as_i64() <= e["detail"]["fields"]["last_ts_ms"].as_i64())
    );
    assert!(
        decrypts.iter().all(|e| e["detail"]["fields"]["cache_hit"] == true),
        "encrypt warmed the cache"
    );
    assert!(decrypts.iter().all(|e| e["detail"]["purpose"] == "treatment"));
    assert!(decrypts.iter().all(|e| e["detail"]["reported_by"] == CLINICAL));
    assert!(!export.contains("123-45-0003"), "no values in audit events");
}

#[tokio::test(flavor = "multi_thread")]
async fn rewrap_index_pseudonym_and_stale_version_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (ks, sc) = stack(dir.path(), "[cache]\nttl_secs = 1\n").await;
    let old = encrypt(&sc, &patient(4)).await;
    let (status, _) = ks.post(ADMIN, "/v1/tenants/onc/keys/rotate", &json!({})).await;
    assert_eq!(status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await; // cache TTL

    let (status, body) = sc.post("/v1/decrypt", &json!({"record": old})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["report"][0]["stale_key_version"], true, "{body}");

    let (status, body) = sc.post("/v1/rewrap", &json!({"records": [old]})).await;
    assert_eq!((status, body["rewrapped"].as_u64()), (200, Some(1)), "{body}");
    let new = &body["records"][0];
    for field in ["ssn", "mrn", "diagnosis", "email", "email_bidx", "patient_id", "allergies"] {
        assert_eq!(new[field], old[field], "{field} byte-identical");
    }
    assert_ne!(new["_kg"], old["_kg"]);
    let (_, again) = sc.post("/v1/rewrap", &json!({"record": new})).await;
    assert_eq!(again["rewrapped"], 0);
    assert_eq!(&again["record"], new, "already on the active version: unchanged");
    let (status, body) = sc.post("/v1/decrypt", &json!({"record": new})).await;
    assert_eq!((status, &body["report"][0]["kek_version"]), (200, &json!(2)));
    assert_eq!(body["report"][0]["stale_key_version"], false);

    let (_, token) = sc.post("/v1/index", &json!({"tenant": "onc", "schema": "patient", "path": "/email", "value": "PATIENT4@example.org"})).await;
    assert_eq!(token["token"], old["email_bidx"]);
    let (_, token) = sc
        .post(
            "/v1/index",
            &json!({"tenant": "onc", "schema": "patient", "path": "/mrn", "value": "MRN-000004"}),
        )
        .await;
    assert_eq!(token["token"], old["mrn"]);
    let (status, body) = sc
        .post(
            "/v1/index",
            &json!({"tenant": "onc", "schema": "patient", "path": "/ssn", "value": "x"}),
        )
        .await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("not_searchable")));
    let (_, p) = sc
        .post("/v1/pseudonym", &json!({"tenant": "onc", "namespace": "patient", "value": "P-4"}))
        .await;
    assert_eq!(p["pseudonym"], old["patient_id"]);

    // Each token and pseudonym made is on record, never the value.
    let mut found = (0, 0);
    for _ in 0..50 {
        let (_, export) = ks.get(AUDITOR, "/v1/audit?tenant=onc").await;
        let events: Vec<Value> =
            export.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).collect();
        let requests = |action: &str, key: &str, value: &str| -> u64 {
            events
                .iter()
                .filter(|e| e["action"] == action && e["detail"]["fields"][key] == value)
                .map(|e| e["detail"]["fields"]["requests"].as_u64().unwrap())
                .sum()
        };
        found = (
            requests("field.index", "path", "/email") + requests("field.index", "path", "/mrn"),
            requests("field.pseudonym", "namespace", "patient"),
        );
        if found == (2, 1) {
            assert!(!export.contains("PATIENT4") && !export.contains("MRN-000004"), "{export}");
            assert!(!export.contains("\"P-4\""), "{export}");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(found, (2, 1), "two tokens (the refused /ssn is not one) and one pseudonym");
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_when_audit_events_cannot_be_delivered_for_too_long() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ks, sc) =
        stack(dir.path(), "[audit]\nflush_interval_ms = 100\nmax_unreported_secs = 1\n").await;
    let encrypted = encrypt(&sc, &patient(9)).await;
    ks.stop();
    let (status, body) = sc.post("/v1/decrypt", &json!({"record": encrypted})).await;
    assert_eq!(status, 200, "within the bound, from the cache: {body}");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (status, body) = sc.post("/v1/decrypt", &json!({"record": encrypted})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("audit_unavailable")),
        "{body}"
    );
    assert!(!body.to_string().contains("123-45"), "no plaintext once events cannot be recorded");
    ks.resume();
    let mut recovered = false;
    for _ in 0..100 {
        if sc.post("/v1/decrypt", &json!({"record": encrypted})).await.0 == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(recovered, "events delivered once the key service is back; decrypt works again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_whose_events_are_refused_holds_up_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    let ks = key_service_with_onc(dir.path()).await;
    let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "t-a"})).await;
    assert_eq!(status, 201);
    let sc = Sidecar::start(
        &ks,
        &dir.path().join("sidecar"),
        CLINICAL,
        "[audit]\nflush_interval_ms = 100\nmax_unreported_secs = 1\n",
    );
    let encrypt_for = |tenant: &'static str, i: usize| {
        let sc = &sc;
        async move {
            sc.post(
                "/v1/encrypt",
                &json!({"tenant": tenant, "schema": "patient", "record": patient(i)}),
            )
            .await
        }
    };
    assert_eq!(encrypt_for("t-a", 1).await.0, 200, "t-a's DEK pool filled, grants cached");
    // Its event delivered before the grant goes: only later ones are refused.
    let mut delivered = false;
    for _ in 0..100 {
        let (_, export) = ks.get(AUDITOR, "/v1/audit?tenant=t-a").await;
        if export.contains("\"record.encrypt\"") {
            delivered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(delivered, "the first event reached the key service");

    // The key service stops granting t-a to this sidecar. Its cached
    // grants and pooled DEKs still encrypt for t-a a while; the key service
    // refuses those events.
    let policy = dir.path().join("ks/policy.toml");
    let text = std::fs::read_to_string(&policy).unwrap();
    let revoked = text.replace(
        "identity = \"spiffe://test/sidecar-clinical\"\ntenants = [\"onc\", \"t-*\"]",
        "identity = \"spiffe://test/sidecar-clinical\"\ntenants = [\"onc\"]",
    );
    assert_ne!(revoked, text);
    std::fs::write(&policy, &revoked).unwrap();
    ks.sighup();
    let mut reloaded = false;
    for _ in 0..100 {
        let (_, grants) = ks.get(CLINICAL, "/v1/policy/self").await;
        if !grants.contains("t-*") {
            reloaded = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(reloaded, "policy reloaded");
    assert_eq!(encrypt_for("t-a", 2).await.0, 200, "from the pool, on cached grants");

    // That event is set aside: t-a's requests are refused, onc's go on,
    // past the bound on undelivered events.
    let mut held = false;
    for _ in 0..100 {
        let (status, body) = encrypt_for("t-a", 3).await;
        if status == 503 {
            assert_eq!(body["error"]["code"], "audit_unavailable", "{body}");
            assert!(body["error"]["message"].as_str().unwrap().contains("t-a"), "{body}");
            held = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(held, "t-a held once its event is refused");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (status, body) = encrypt_for("onc", 4).await;
    assert_eq!(status, 200, "onc is not held up by t-a's refused event: {body}");
    let encrypted = body["record"].clone();
    let (status, body) = sc.post("/v1/decrypt", &json!({"record": encrypted})).await;
    assert_eq!(status, 200, "{body}");
    assert!(sc.log().contains("refuses audit events"), "{}", sc.log());

    // Granted again: the event set aside is taken, and t-a is served again.
    std::fs::write(&policy, &text).unwrap();
    ks.sighup();
    let mut served = false;
    for _ in 0..200 {
        if encrypt_for("t-a", 5).await.0 == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(served, "t-a served again once its event was taken");
    let (_, export) = ks.get(AUDITOR, "/v1/audit?tenant=t-a").await;
    let encrypts: Vec<Value> = export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["action"] == "record.encrypt")
        .collect();
    let requests: u64 =
        encrypts.iter().map(|e| e["detail"]["fields"]["requests"].as_u64().unwrap()).sum();
    assert!(requests >= 2, "the refused event is in the chain now: {export}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_report_over_the_key_services_batch_limit_is_halved_not_held() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(&dir.path().join("ks"), "[limits]\nmax_batch = 4\n");
    let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    let sc = Sidecar::start(
        &ks,
        &dir.path().join("sidecar"),
        CLINICAL,
        "[pool]\nbatch = 4\nlow_water = 1\n[audit]\nflush_interval_ms = 1000\nmax_unreported_secs = 3\n",
    );
    let encrypted = encrypt(&sc, &patient(3)).await;
    // Ten decrypts with ten purposes within one flush interval: ten events
    // of one tenant that cannot share one, over the key service's limit.
    for i in 0..10 {
        let body = json!({"record": encrypted, "purpose": format!("p{i}")});
        assert_eq!(sc.post("/v1/decrypt", &body).await.0, 200);
    }
    let mut recorded = 0;
    for _ in 0..100 {
        let (_, export) = ks.get(AUDITOR, "/v1/audit?tenant=onc").await;
        recorded = export
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|e| e["action"] == "record.decrypt")
            .count();
        if recorded >= 10 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(recorded, 10, "every event delivered, in smaller reports");
    let (status, body) = sc.post("/v1/decrypt", &json!({"record": encrypted})).await;
    assert_eq!(status, 200, "the tenant is not held: {body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_socket_is_private_and_nothing_else_at_its_path_is_deleted() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ks = key_service_with_onc(dir.path()).await;
    let sc_dir = dir.path().join("sc");
    let mut sc = Sidecar::start(&ks, &sc_dir, CLINICAL, "");
    let mode = std::fs::symlink_metadata(&sc.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let config = sc_dir.join("sidecar.toml");
    let start_again = || {
        keygate_tests::keyservice::run_to_exit(
            &["sidecar".as_ref(), "--config".as_ref(), config.as_os_str()],
            &[],
        )
    };
    // A live sidecar's socket is not taken over.
    let (ok, stderr) = start_again();
    assert!(!ok && stderr.contains("is in use"), "{stderr}");
    assert_eq!(
        encrypt(&sc, &patient(1)).await["mrn"].as_str().map(|m| m.starts_with("kg1")),
        Some(true)
    );

    // Not a socket: left alone, and the start stops.
    sc.stop();
    std::fs::write(&sc.socket, "not a socket").unwrap();
    let (ok, stderr) = start_again();
    assert!(!ok && stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&sc.socket).unwrap(), "not a socket");

    // A socket left by a sidecar that is gone is replaced.
    std::fs::remove_file(&sc.socket).unwrap();
    let mut crashed = Sidecar::start(&ks, &sc_dir, CLINICAL, "");
    let pid = crashed.pid().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(crashed.socket.exists(), "a killed sidecar leaves its socket");
    crashed.stop();
    let again = Sidecar::start(&ks, &sc_dir, CLINICAL, "");
    assert_eq!(
        encrypt(&again, &patient(2)).await["mrn"].as_str().map(|m| m.starts_with("kg1")),
        Some(true)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_token_and_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let ks = key_service_with_onc(dir.path()).await;
    let token_dir = dir.path().join("contact");
    std::fs::create_dir_all(&token_dir).unwrap();
    std::fs::write(token_dir.join("token"), "a-long-enough-bearer-token-for-tests\n").unwrap();
    let sc = Sidecar::start(&ks, &token_dir, CONTACT, "token_file = \"token\"");
    let (status, body) = sc
        .post("/v1/encrypt", &json!({"tenant": "onc", "schema": "patient", "record": patient(1)}))
        .await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthorized")));

    let client = keygate_sdk::Client::builder()
        .unix_socket(sc.socket.clone())
        .bearer_token(keygate_sdk::SecretString::from("a-long-enough-bearer-token-for-tests"))
        .build()
        .unwrap();
    let encrypted = client.encrypt("onc", "patient", &patient(1)).await.unwrap();
    let decrypted = client.decrypt_value(&encrypted, None).await.unwrap();
    assert!(decrypted.partial_record().get("diagnosis").is_none());
    let wrong = keygate_sdk::Client::builder()
        .unix_socket(sc.socket.clone())
        .bearer_token(keygate_sdk::SecretString::from("a-long-enough-bearer-token-for-tesTS"))
        .build()
        .unwrap();
    assert!(wrong.encrypt("onc", "patient", &patient(1)).await.is_err());

    // The raw report says why fields were masked or withheld.
    let raw = reqwest::Client::builder().unix_socket(sc.socket.clone()).build().unwrap();
    let body: Value = raw
        .post("http://localhost/v1/decrypt")
        .bearer_auth("a-long-enough-bearer-token-for-tests")
        .json(&json!({"record": encrypted}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let fields = body["report"][0]["fields"].as_array().unwrap();
    let reason = |p: &str| {
        fields.iter().find(|f| f["pointer"] == p).unwrap()["reason"].as_str().unwrap().to_owned()
    };
    assert!(reason("/diagnosis").contains("does not grant phi.clinical"), "{body}");
    assert!(reason("/ssn").contains("masked form of phi.identifier"), "{body}");
}

#[test]
fn a_non_loopback_listener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sidecar.toml");
    std::fs::write(
        &config,
        "listen = { tcp = \"0.0.0.0:9999\" }\nschemas = []\n[key_service]\nurls = [\"https://localhost:1\"]\nca = \"ca\"\ncert = \"c\"\nkey = \"k\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(keygate_tests::keyservice::keygate_binary())
        .args(["sidecar", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "configuration error exit code");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing to listen on 0.0.0.0:9999"), "{stderr}");
}

/// A request the key service does not answer is dropped at the sidecar's
/// deadline (`limits.request_timeout_ms`), well before the key service
/// client's own timeout (2 s here): 503 `timeout` with `Retry-After` and
/// the request's id. The DEKs a dropped encrypt took from the pool go back
/// to it, and the sidecar serves the next requests as before.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_past_its_deadline_is_dropped_with_503_timeout_and_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // No DEK cache: every decrypt asks the key service.
    let (ks, sc) = stack(
        dir.path(),
        "[limits]\nrequest_timeout_ms = 1000\n[cache]\nmax_entries = 0\n\
         [pool]\nbatch = 20\nlow_water = 5\n",
    )
    .await;
    let encrypted = encrypt(&sc, &patient(1)).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await; // a refill settles
    let pool_size = || async { gauge(&sc.get("/metrics").await.1, "keygate_dek_pool_size") };
    let pooled = pool_size().await;
    assert!(pooled >= 5, "{pooled} pooled");
    let http = sc.new_client();
    let post = |path: &str, body: Value| http.post(format!("{}{path}", sc.base)).json(&body).send();
    let ks_pid = ks.pid().unwrap();
    signal(ks_pid, "STOP");

    let started = std::time::Instant::now();
    let response = post("/v1/decrypt", json!({"record": encrypted})).await.unwrap();
    let took = started.elapsed();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 32, "the sidecar's own id: {id}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "timeout", "{body}");
    assert!(
        took >= std::time::Duration::from_millis(1000)
            && took < std::time::Duration::from_millis(1800),
        "answered at the deadline, not at the key service client's timeout: {took:?}"
    );

    // More records than are pooled: the request takes every pooled DEK and
    // waits for the rest; dropped, it gives them back.
    let records: Vec<Value> = (0..pooled as usize + 5).map(patient).collect();
    let response =
        post("/v1/encrypt", json!({"tenant": "onc", "schema": "patient", "records": records}))
            .await
            .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["code"], "timeout");
    assert_eq!(pool_size().await, pooled, "every DEK the dropped request took is back");
    // Served as before, from the pool, the key service still silent.
    encrypt(&sc, &patient(2)).await;
    assert_eq!(pool_size().await, pooled - 1);

    signal(ks_pid, "CONT");
    let (status, body) = sc.post("/v1/decrypt", &json!({"record": encrypted})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["record"]["ssn"], patient(1)["ssn"]);
    let (_, metrics) = sc.get("/metrics").await;
    assert_eq!(gauge(&metrics, "keygate_sidecar_request_timeouts_total"), 2, "{metrics}");
    let log = sc.log();
    assert!(
        log.lines().any(|l| l.contains(&id) && l.contains("request dropped at its deadline")),
        "logged with its id: {log}"
    );
}

/// A request's id (`x-request-id`) is the app's when it sends a valid one,
/// else the sidecar's own; it is echoed, and recorded in the request's
/// field-level audit events once per request: a call sent twice (a retry
/// whose first answer was lost) shows as its id twice, not as two calls.
/// Anything but 32 hex digits or a UUID is refused, never recorded.
#[tokio::test(flavor = "multi_thread")]
async fn request_ids_are_echoed_checked_and_recorded_in_audit_events() {
    let dir = tempfile::tempdir().unwrap();
    let (ks, mut sc) = stack(dir.path(), "").await;
    let encrypted = encrypt(&sc, &patient(6)).await;
    let http = sc.new_client();
    let url = format!("{}/v1/decrypt", sc.base);
    let decrypt = |ids: &[&str]| {
        let mut request =
            http.post(&url).json(&json!({"record": encrypted, "purpose": "treatment"}));
        for id in ids {
            request = request.header("x-request-id", *id);
        }
        request.send()
    };
    let echoed = |response: &reqwest::Response| {
        response.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_owned())
    };
    let retried = "5f0c6b4e9a2d4c1b8e7f3a6d2c9b1e40";
    for _ in 0..2 {
        let response = decrypt(&[retried]).await.unwrap();
        assert_eq!(
            (response.status().as_u16(), echoed(&response).as_deref()),
            (200, Some(retried))
        );
    }
    let response = decrypt(&[]).await.unwrap();
    assert_eq!(response.status(), 200);
    let own = echoed(&response).unwrap();
    assert!(own.len() == 32 && own != retried, "{own}");
    let long = "a".repeat(65);
    for bad in [
        &["123-45-6789"][..],
        &["MRN-000123-0000000042"],
        &["jane.doe@example.org"],
        &[long.as_str()],
        &[retried, retried],
    ] {
        let response = decrypt(bad).await.unwrap();
        assert_eq!((response.status().as_u16(), echoed(&response)), (400, None), "{bad:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_request_id", "{body}");
    }

    sc.stop(); // flushes
    let (_, export) = ks.get(AUDITOR, "/v1/audit?tenant=onc").await;
    let mut listed: Vec<String> = export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["action"] == "record.decrypt")
        .flat_map(|e| {
            let ids = e["detail"]["fields"]["request_ids"].as_array().unwrap().clone();
            ids.into_iter().map(|id| id.as_str().unwrap().to_owned())
        })
        .collect();
    listed.sort();
    let mut expected = vec![own, retried.to_owned(), retried.to_owned()];
    expected.sort();
    assert_eq!(listed, expected, "{export}");
    for refused in ["123-45-6789", "MRN-000123", "jane.doe"] {
        assert!(!export.contains(refused), "{refused} recorded");
    }
}

/// Sends every body to `path` at once, each on a connection of its own.
fn post_at_once(
    sc: &Sidecar,
    path: &str,
    bodies: impl Iterator<Item = Value>,
) -> Vec<tokio::task::JoinHandle<(u16, Value)>> {
    bodies
        .map(|body| {
            let (client, url) = (sc.new_client(), format!("{}{path}", sc.base));
            tokio::spawn(async move {
                let response = client.post(url).json(&body).send().await.unwrap();
                (response.status().as_u16(), response.json::<Value>().await.unwrap())
            })
        })
        .collect()
}

/// A gauge's value in a metrics exposition.
fn gauge(metrics: &str, name: &str) -> u64 {
    let line = metrics
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// A sidecar without a DEK cache unwraps every record's DEK; concurrent
/// requests may share unwrap calls. However they are shared, each request
/// gets its own record back, each unwrap is audited once under the purpose
/// it was made for, and the metrics count calls and requests.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_cold_decrypts_each_get_their_own_record_and_every_unwrap_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let (ks, warm) = stack(dir.path(), "").await;
    let cold =
        Sidecar::start(&ks, &dir.path().join("cold"), CLINICAL, "[cache]\nmax_entries = 0\n");
    let n = 48;
    let mut encrypted = Vec::with_capacity(n);
    for i in 0..n {
        encrypted.push(encrypt(&warm, &patient(i)).await);
    }
    let purposes = ["treatment", "billing"];
    let bodies = encrypted
        .iter()
        .enumerate()
        .map(|(i, record)| json!({"record": record, "purpose": purposes[i % 2]}));
    let tasks = post_at_once(&cold, "/v1/decrypt", bodies);
    let mut ids = Vec::with_capacity(n);
    for (i, task) in tasks.into_iter().enumerate() {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["record"]["ssn"], patient(i)["ssn"], "request {i} got its own record");
        ids.push((body["report"][0]["record_key_id"].clone(), purposes[i % 2]));
    }

    let (status, metrics) = cold.get("/metrics").await;
    assert_eq!(status, 200);
    let gauge = |name: &str| gauge(&metrics, name);
    let (calls, requests) =
        (gauge("keygate_dek_unwrap_calls"), gauge("keygate_dek_unwrap_requests"));
    assert_eq!(requests, n as u64, "every request missed the (absent) cache once");
    assert!((1..=requests).contains(&calls), "{calls} calls for {requests} requests");

    // The key service audited each unwrap once, under its request's purpose.
    let (_, export) = ks.get(AUDITOR, "/v1/audit?tenant=onc").await;
    let unwraps: Vec<Value> = export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["action"] == "dek.unwrap" && e["actor"] == CLINICAL)
        .collect();
    let mut audited: Vec<(Value, String)> = unwraps
        .iter()
        .flat_map(|e| {
            let purpose = e["detail"]["purpose"].as_str().unwrap().to_owned();
            e["record_key_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |id| (id.clone(), purpose.clone()))
        })
        .collect();
    let mut expected: Vec<(Value, String)> =
        ids.into_iter().map(|(id, purpose)| (id, purpose.to_owned())).collect();
    audited.sort_by_key(|(id, p)| format!("{id}{p}"));
    expected.sort_by_key(|(id, p)| format!("{id}{p}"));
    assert_eq!(audited, expected);
    assert_eq!(unwraps.len() as u64, calls, "one event per call");
}

/// After a rotation, concurrent rewraps may share key service calls; each
/// request still gets its own record back, moved to the new version and
/// decrypting to what was written.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_rewraps_each_get_their_own_record() {
    let dir = tempfile::tempdir().unwrap();
    let (ks, sc) = stack(dir.path(), "").await;
    let n = 32;
    let mut old = Vec::with_capacity(n);
    for i in 0..n {
        old.push(encrypt(&sc, &patient(i)).await);
    }
    let (status, _) = ks.post(ADMIN, "/v1/tenants/onc/keys/rotate", &json!({})).await;
    assert_eq!(status, 200);
    let tasks = post_at_once(&sc, "/v1/rewrap", old.iter().map(|record| json!({"record": record})));
    for (i, task) in tasks.into_iter().enumerate() {
        let (status, body) = task.await.unwrap();
        assert_eq!((status, body["rewrapped"].as_u64()), (200, Some(1)), "{body}");
        let new = &body["record"];
        assert_eq!(new["ssn"], old[i]["ssn"], "request {i} got its own record");
        assert_ne!(new["_kg"], old[i]["_kg"]);
        let (status, plain) = sc.post("/v1/decrypt", &json!({"record": new})).await;
        assert_eq!((status, &plain["report"][0]["kek_version"]), (200, &json!(2)), "{plain}");
        assert_eq!(plain["record"]["ssn"], patient(i)["ssn"]);
    }
    let (_, metrics) = sc.get("/metrics").await;
    let gauge = |name: &str| gauge(&metrics, name);
    let (calls, requests) =
        (gauge("keygate_dek_rewrap_calls"), gauge("keygate_dek_rewrap_requests"));
    assert_eq!(requests, n as u64);
    assert!((1..=requests).contains(&calls), "{calls} calls for {requests} requests");
}

/// One request of records of two tenants, interleaved: one unwrap (then
/// one rewrap) per tenant, and every record gets its own key back. The
/// records differ in shape too (one to three allergies), and each one's
/// report lists its own fields.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_mixing_tenants_is_served_tenant_by_tenant_record_by_record() {
    let dir = tempfile::tempdir().unwrap();
    let (ks, warm) = stack(dir.path(), "").await;
    let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "t-derm"})).await;
    assert_eq!(status, 201);
    let cold =
        Sidecar::start(&ks, &dir.path().join("cold"), CLINICAL, "[cache]\nmax_entries = 0\n");
    let tenants = ["onc", "t-derm"];
    let mut records = Vec::new();
    let allergies = |i: usize| i % 3 + 1;
    let record = |i: usize| {
        let mut record = patient(i);
        record["allergies"] = json!(vec!["latex"; allergies(i)]);
        record
    };
    for i in 0..8 {
        let tenant = tenants[i % 2];
        let body = json!({"tenant": tenant, "schema": "patient", "record": record(i)});
        let (status, body) = warm.post("/v1/encrypt", &body).await;
        assert_eq!(status, 200, "{body}");
        records.push(body["record"].clone());
    }
    let check = |body: &Value, version: u64| {
        for (i, report) in body["report"].as_array().unwrap().iter().enumerate() {
            assert_eq!(report["tenant"], tenants[i % 2], "{report}");
            assert_eq!(report["kek_version"], version, "{report}");
            assert_eq!(body["records"][i]["ssn"], patient(i)["ssn"], "record {i}");
            assert_eq!(body["records"][i]["allergies"], record(i)["allergies"], "record {i}");
            let listed: Vec<&str> = report["fields"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|f| f["pointer"].as_str()?.strip_prefix("/allergies/"))
                .collect();
            let expected: Vec<String> = (0..allergies(i)).map(|k| k.to_string()).collect();
            assert_eq!(listed, expected, "record {i}: {report}");
        }
    };
    let (status, body) = cold.post("/v1/decrypt", &json!({"records": records})).await;
    assert_eq!(status, 200, "{body}");
    check(&body, 1);

    for tenant in tenants {
        let (status, _) =
            ks.post(ADMIN, &format!("/v1/tenants/{tenant}/keys/rotate"), &json!({})).await;
        assert_eq!(status, 200);
    }
    let (status, body) = cold.post("/v1/rewrap", &json!({"records": records})).await;
    assert_eq!((status, body["rewrapped"].as_u64()), (200, Some(8)), "{body}");
    let (status, body) = cold.post("/v1/decrypt", &json!({"records": body["records"]})).await;
    assert_eq!(status, 200, "{body}");
    check(&body, 2);
}

/// Records of one tenant and schema under two schema versions, decrypted
/// alike (the same fields, the same outcomes): each record's report gives
/// its own version's class and reason, not the other's.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_mixing_schema_versions_reports_each_versions_classes() {
    let dir = tempfile::tempdir().unwrap();
    let ks = key_service_with_onc(dir.path()).await;
    // Version 2 files the diagnosis under another class, which this
    // identity is not granted either.
    let v2 = keygate_tests::PATIENT_SCHEMA.replace("version = 1", "version = 2").replace(
        r#""/diagnosis",  mode = "randomized",    class = "phi.clinical""#,
        r#""/diagnosis",  mode = "randomized",    class = "phi.notes""#,
    );
    assert!(v2.contains("phi.notes"));
    let sidecar_dir = dir.path().join("contact");
    std::fs::create_dir_all(&sidecar_dir).unwrap();
    std::fs::write(
        sidecar_dir.join("patient.toml"),
        format!("{}\n{v2}", keygate_tests::PATIENT_SCHEMA),
    )
    .unwrap();
    let contact = Sidecar::start(&ks, &sidecar_dir, CONTACT, "");
    let mut records = Vec::new();
    for i in 0..4 {
        let version = i % 2 + 1;
        let body = json!({"tenant": "onc", "schema": "patient", "schema_version": version, "record": patient(i)});
        let (status, body) = contact.post("/v1/encrypt", &body).await;
        assert_eq!(status, 200, "{body}");
        records.push(body["record"].clone());
    }
    let (status, body) = contact.post("/v1/decrypt", &json!({"records": records})).await;
    assert_eq!(status, 200, "{body}");
    for (i, report) in body["report"].as_array().unwrap().iter().enumerate() {
        let version = i % 2 + 1;
        assert_eq!(report["schema_version"], version, "{report}");
        let diagnosis =
            report["fields"].as_array().unwrap().iter().find(|f| f["pointer"] == "/diagnosis");
        let diagnosis = diagnosis.unwrap_or_else(|| panic!("record {i}: {report}"));
        let class = if version == 1 { "phi.clinical" } else { "phi.notes" };
        assert_eq!(
            (&diagnosis["class"], &diagnosis["outcome"]),
            (&json!(class), &json!("withheld"))
        );
        assert!(diagnosis["reason"].as_str().unwrap().contains(class), "{diagnosis}");
        assert!(body["records"][i].get("diagnosis").is_none(), "record {i}");
    }
}
