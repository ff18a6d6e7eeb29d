//! The SDK against a real sidecar and key service: 1,000 records through
//! encrypt and decrypt, every JSON type back exactly, no plaintext in the
//! encrypted bytes; typed records; errors as typed codes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use keygate_sdk::{Client, ErrorCode, FieldOutcome};
use keygate_tests::keyservice::{KeyService, signal};
use keygate_tests::sidecar::Sidecar;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const ADMIN: &str = "spiffe://test/admin";
const AUDITOR: &str = "spiffe://test/auditor";

fn record(i: usize) -> Value {
    json!({
        "ssn": format!("SSN-{i:09}-secret"),
        "mrn": if i.is_multiple_of(7) { json!(i as u64 * 1_000_003) } else { json!(format!("MRN-{i:08}-secret")) },
        "email": format!("person{i}.secret@example.org"),
        "diagnosis": {
            "code": format!("DX-{i}-secret"), "stage": (i % 5) as f64 + 0.25, "confirmed": i.is_multiple_of(2),
            "nothing": null, "nested": [[i, -(i as i64)], {"deep": [true, false, null]}],
            "big": u64::MAX - i as u64, "tiny": 1.0e-300 * (i as f64 + 1.0),
        },
        "patient_id": format!("P-{i}"),
        "allergies": [format!("allergen-{i}-secret"), i, null, {"severity": i % 3}],
        "unprotected": {"i": i, "unicode": "Müller ✓"},
    })
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Patient {
    ssn: Option<String>,
    email: Option<String>,
    diagnosis: Option<String>,
    patient_id: Option<String>,
}

async fn stack(dir: &std::path::Path) -> (KeyService, Sidecar, Client) {
    let ks = KeyService::start(&dir.join("ks"), "");
    let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    let sc = Sidecar::start(&ks, &dir.join("sidecar"), "spiffe://test/sidecar-clinical", "");
    let client = Client::builder().unix_socket(sc.socket.clone()).build().unwrap();
    (ks, sc, client)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_records_round_trip_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (_ks, _sc, client) = stack(dir.path()).await;
    let records: Vec<Value> = (0..1_000).map(record).collect();
    let mut encrypted = Vec::new();
    for chunk in records.chunks(100) {
        encrypted.extend(client.encrypt_batch("onc", "patient", chunk).await.unwrap());
    }
    assert_eq!(encrypted.len(), 1_000);
    let text = serde_json::to_string(&encrypted).unwrap();
    assert!(!text.contains("secret"), "no protected plaintext in the encrypted records");
    assert!(text.contains("Müller"), "unprotected members stay as they were");

    let mut decrypted = Vec::new();
    for chunk in encrypted.chunks(100) {
        decrypted.extend(client.decrypt_batch::<Value, _>(chunk, Some("treatment")).await.unwrap());
    }
    for (i, (original, got)) in records.iter().zip(&decrypted).enumerate() {
        let mut expected = original.clone();
        expected["patient_id"] = encrypted[i]["patient_id"].clone(); // a pseudonym stays one
        assert_eq!(got.partial_record(), &expected, "record {i}");
        assert!(got.report.fields.iter().all(|f| f.outcome == FieldOutcome::Revealed));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn typed_records_and_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_ks, _sc, client) = stack(dir.path()).await;
    let jane = Patient {
        ssn: Some("123-45-6789".into()),
        email: Some("jane@example.org".into()),
        diagnosis: Some("C50.9".into()),
        patient_id: Some("P-1".into()),
    };
    let encrypted = client.encrypt("onc", "patient", &jane).await.unwrap();
    let back = client.decrypt::<Patient>(&encrypted, None).await.unwrap();
    let back = back.into_record().unwrap();
    assert_eq!(back.ssn, jane.ssn);
    assert_eq!(back.diagnosis, jane.diagnosis);
    assert!(back.patient_id.unwrap().starts_with("kgp:"));

    let token = client.index("onc", "patient", "/email", &"JANE@example.org", None).await.unwrap();
    assert_eq!(Value::String(token), encrypted["email_bidx"]);

    let err = client.encrypt("onc", "no-such-schema", &jane).await.unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::UnknownSchema), "{err}");
    let mut tampered = encrypted.clone();
    tampered["ssn"] = encrypted["diagnosis"].clone();
    let err = client.decrypt_value(&tampered, None).await.unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::CannotDecrypt), "{err}");
    assert!(!err.to_string().contains("C50.9"));
}

/// A call the sidecar drops at its deadline (its key service silent) is
/// retried after the sidecar's 503 `timeout`, under the call's one request
/// id: the sidecar logged the dropped attempt with the id that the retry's
/// audit event carries, and the call before had another. The unwrap the
/// dropped attempt sent is answered to the DEK cache, so the retry is a
/// cache hit and the key service unwraps (and audits) the DEK once.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_the_sidecar_times_out_is_retried_under_one_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(&dir.path().join("ks"), "");
    let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    // A DEK cache of one: the second encrypt's DEK pushes out the first's,
    // so the first record's decrypt needs the key service.
    let mut sc = Sidecar::start(
        &ks,
        &dir.path().join("sidecar"),
        "spiffe://test/sidecar-clinical",
        "[limits]\nrequest_timeout_ms = 1000\n[cache]\nmax_entries = 1\n",
    );
    let client = Client::builder()
        .unix_socket(sc.socket.clone())
        .retry_backoff(std::time::Duration::from_millis(10))
        .build()
        .unwrap();
    let encrypted = client.encrypt("onc", "patient", &record(1)).await.unwrap();
    client.encrypt("onc", "patient", &record(2)).await.unwrap();

    let ks_pid = ks.pid().unwrap();
    signal(ks_pid, "STOP");
    // The first attempt ends at the 1 s deadline; the retry waits the
    // sidecar's `Retry-After` (1 s). The key service is back as soon as the
    // sidecar has dropped the attempt, so it has that whole second to
    // answer the unwrap still out (whose DEK the retry then finds cached),
    // however slow the machine.
    let resume = async {
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !sc.log().contains("request dropped at its deadline") {
            assert!(std::time::Instant::now() < give_up, "no attempt dropped: {}", sc.log());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        signal(ks_pid, "CONT");
    };
    let started = std::time::Instant::now();
    let (decrypted, ()) = tokio::join!(client.decrypt::<Value>(&encrypted, None), resume);
    let decrypted = decrypted.unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_secs(2), "{:?}", started.elapsed());
    assert_eq!(decrypted.partial_record()["ssn"], record(1)["ssn"]);
    let record_key_id = decrypted.report.record_key_id.clone();

    sc.stop(); // flushes
    let (_, export) = ks.get(AUDITOR, "/v1/audit?tenant=onc").await;
    let events: Vec<Value> =
        export.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).collect();
    let request_ids = |action: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["action"] == action && e["actor"] == "spiffe://test/app")
            .flat_map(|e| e["detail"]["fields"]["request_ids"].as_array().unwrap().clone())
            .map(|id| id.as_str().unwrap().to_owned())
            .collect()
    };
    let decrypts = request_ids("record.decrypt");
    let [id] = decrypts.as_slice() else { panic!("one decrypt recorded: {decrypts:?}") };
    assert!(export.contains(&record_key_id));
    assert_eq!(id.len(), 32, "{id}");
    let encrypts = request_ids("record.encrypt");
    assert!(encrypts.len() == 2 && !encrypts.contains(id), "other calls, other ids: {encrypts:?}");
    let unwraps = events
        .iter()
        .filter(|e| {
            e["action"] == "dek.unwrap"
                && e["record_key_ids"].as_array().unwrap().iter().any(|i| *i == record_key_id)
        })
        .count();
    assert_eq!(unwraps, 1, "the retry unwrapped nothing: {export}");
    let decrypt = events.iter().find(|e| e["action"] == "record.decrypt").unwrap();
    assert_eq!(decrypt["detail"]["fields"]["cache_hit"], true, "{decrypt}");
    let log = sc.log();
    assert!(
        log.lines()
            .any(|l| l.contains(id.as_str()) && l.contains("request dropped at its deadline")),
        "the dropped attempt had the retry's id: {log}"
    );
}

/// An attempt outlasts the sidecar's request deadline, with room for the
/// answer's way back: it hears the sidecar's 503 `timeout` (and retries)
/// rather than giving up while the sidecar still works.
#[test]
fn an_attempt_outlasts_the_sidecars_request_deadline() {
    let deadline = std::time::Duration::from_millis(
        gateway::sidecar::config::SidecarLimits::default().request_timeout_ms,
    );
    let attempt = keygate_sdk::fuzzing::ATTEMPT_TIMEOUT;
    let margin = std::time::Duration::from_secs(5);
    assert!(deadline + margin <= attempt, "{deadline:?} leaves no margin before {attempt:?}");
}

/// The SDK drops an idle pooled connection well before the sidecar closes
/// it (its header read timeout closes idle HTTP/1 keep-alive connections,
/// and its idle timeout any connection): a request sent on a connection
/// the sidecar is closing would fail as a transport error.
#[test]
fn pooled_connections_idle_out_before_the_sidecar_closes_them() {
    let sidecar = gateway::abuse::SidecarAbuseConfig::default();
    let closes = sidecar.header_read_timeout_secs.min(sidecar.idle_timeout_secs);
    let margin = std::time::Duration::from_secs(5);
    let pool_idle = keygate_sdk::fuzzing::POOL_IDLE_TIMEOUT;
    assert!(
        pool_idle + margin <= std::time::Duration::from_secs(closes),
        "{pool_idle:?} leaves no margin before the sidecar's {closes} s"
    );
}
