//! End-to-end tests of `keygate server`: the real process over mutual TLS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use gateway::pki::Validity;
use keygate_tests::keyservice::{KeyService, client_with};
use serde_json::{Value, json};

const ADMIN: &str = "spiffe://test/admin";
const ENC: &str = "spiffe://test/encryptor";
const DEC: &str = "spiffe://test/decryptor";
const AUDITOR: &str = "spiffe://test/auditor";

async fn create_tenant(ks: &KeyService, tenant: &str) {
    let (status, body) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": tenant})).await;
    assert_eq!(status, 201, "{body}");
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code in {body}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_requires_a_valid_client_certificate_from_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), "");
    let url = format!("{}/healthz", ks.url);
    let ca = ks.pki.ca.cert_pem();

    assert!(client_with(ca, None).get(&url).send().await.is_err(), "no client certificate");
    let foreign = ks.pki.other_ca.issue_client(ADMIN, Validity::days(1)).unwrap();
    let foreign = client_with(ca, Some((&foreign.cert_pem, &foreign.key_pem)));
    assert!(foreign.get(&url).send().await.is_err(), "certificate from another CA");
    let expired = ks.pki.ca.issue_client(ADMIN, Validity::expired()).unwrap();
    let expired = client_with(ca, Some((&expired.cert_pem, &expired.key_pem)));
    assert!(expired.get(&url).send().await.is_err(), "expired certificate");

    let (status, _) = ks.get(ADMIN, "/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_and_tenants_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), "");
    create_tenant(&ks, "onc").await;
    create_tenant(&ks, "b").await;

    // A valid identity without a grant for tenant b.
    let (status, body) = ks.post(ENC, "/v1/tenants/b/datakeys", &json!({"count": 1})).await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"));
    // An encryptor cannot unwrap; an auditor cannot issue.
    let (status, body) = ks.post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 1})).await;
    assert_eq!(status, 200, "{body}");
    let key = &body["keys"][0];
    let item = json!({"items": [{"record_key_id": key["record_key_id"], "kek_version": 1, "wrapped": key["wrapped"]}]});
    let (status, body) = ks.post(ENC, "/v1/tenants/onc/datakeys/unwrap", &item).await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"));
    let (status, body) = ks.post(AUDITOR, "/v1/tenants/onc/datakeys", &json!({"count": 1})).await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"));
    // An identity with no grants at all.
    let (status, _) =
        ks.post("spiffe://test/stranger", "/v1/tenants", &json!({"tenant": "x"})).await;
    assert_eq!(status, 403);
    // The decryptor can.
    let (status, body) = ks.post(DEC, "/v1/tenants/onc/datakeys/unwrap", &item).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["dek"], key["dek"]);
    // Denials are audited.
    let (_, export) = ks.get(AUDITOR, "/v1/audit").await;
    assert!(
        export.lines().any(|l| l.contains("\"outcome\":\"denied\"") && l.contains(ENC)),
        "{export}"
    );
}

/// Issues `total` DEKs in batches of `batch`; returns (record_key_id, dek, wrapped, version).
async fn issue(ks: &KeyService, tenant: &str, total: usize, batch: usize) -> Vec<Value> {
    let mut keys = Vec::new();
    while keys.len() < total {
        let (status, body) =
            ks.post(ENC, &format!("/v1/tenants/{tenant}/datakeys"), &json!({"count": batch})).await;
        assert_eq!(status, 200, "{body}");
        let version = body["kek_version"].clone();
        for mut k in body["keys"].as_array().unwrap().clone() {
            k["kek_version"] = version.clone();
            keys.push(k);
        }
    }
    keys
}

async fn unwrap_all(ks: &KeyService, tenant: &str, keys: &[Value], batch: usize) {
    for chunk in keys.chunks(batch) {
        let items: Vec<Value> = chunk
            .iter()
            .map(|k| json!({"record_key_id": k["record_key_id"], "kek_version": k["kek_version"], "wrapped": k["wrapped"]}))
            .collect();
        let (status, body) = ks
            .post(
                DEC,
                &format!("/v1/tenants/{tenant}/datakeys/unwrap"),
                &json!({"items": items, "purpose": "treatment"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let results = body["results"].as_array().unwrap();
        assert_eq!(results.len(), chunk.len());
        for (k, r) in chunk.iter().zip(results) {
            assert_eq!(r["record_key_id"], k["record_key_id"]);
            assert_eq!(r["dek"], k["dek"], "the DEK comes back as issued");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_deks_unwrap_cold_warm_and_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut ks = KeyService::start(dir.path(), "[keys]\nkek_ttl_secs = 600\n");
    create_tenant(&ks, "onc").await;
    let keys = issue(&ks, "onc", 10_000, 1_000).await;
    let ids: std::collections::HashSet<_> =
        keys.iter().map(|k| k["record_key_id"].to_string()).collect();
    assert_eq!(ids.len(), 10_000);
    unwrap_all(&ks, "onc", &keys, 1_000).await; // warm KEK cache
    ks.restart();
    unwrap_all(&ks, "onc", &keys[..2_000], 1_000).await; // cold, after restart

    // A wrapped DEK presented with another record key id, tenant or version fails.
    create_tenant(&ks, "t-other").await;
    let k = &keys[0];
    let other_id = &keys[1]["record_key_id"];
    let cases = [
        (
            "onc",
            json!({"record_key_id": other_id, "kek_version": 1, "wrapped": k["wrapped"]}),
            "cannot_decrypt",
        ),
        (
            "onc",
            json!({"record_key_id": k["record_key_id"], "kek_version": 2, "wrapped": k["wrapped"]}),
            "unknown_version",
        ),
        (
            "t-other",
            json!({"record_key_id": k["record_key_id"], "kek_version": 1, "wrapped": k["wrapped"]}),
            "cannot_decrypt",
        ),
    ];
    for (tenant, item, code) in cases {
        let (status, body) = ks
            .post(DEC, &format!("/v1/tenants/{tenant}/datakeys/unwrap"), &json!({"items": [item]}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["results"][0]["error"], code, "{body}");
        assert!(body["results"][0].get("dek").is_none());
    }
}

/// Two key services on one data directory would share its instance id
/// (so one audit chain) and, on SQLite, its keystore without hearing each
/// other's invalidations: the second is refused, the first serves on.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_key_service_on_one_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), "");
    let config = dir.path().join("keygate.toml");
    let args = ["server", "--config", config.to_str().unwrap()];
    let (ok, stderr) = keygate_tests::keyservice::run_to_exit(&args, &[]);
    assert!(!ok, "{stderr}");
    let data = dir.path().join("data");
    let expected = format!("{} is in use: another key service holds it", data.display());
    assert!(stderr.contains(&expected), "{stderr}");
    create_tenant(&ks, "onc").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_state_changes_and_rewrap_over_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), "");
    create_tenant(&ks, "onc").await;
    let old = issue(&ks, "onc", 2, 2).await;
    let (status, body) = ks.post(ADMIN, "/v1/tenants/onc/keys/rotate", &json!({})).await;
    assert_eq!((status, body["version"].as_u64()), (200, Some(2)), "{body}");
    let new = issue(&ks, "onc", 1, 1).await;
    assert_eq!(new[0]["kek_version"], 2);

    let items: Vec<Value> = old
        .iter()
        .map(|k| json!({"record_key_id": k["record_key_id"], "kek_version": 1, "wrapped": k["wrapped"]}))
        .collect();
    let (status, body) =
        ks.post(ENC, "/v1/tenants/onc/datakeys/rewrap", &json!({"items": items})).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.to_string().find("\"dek\"").is_none(), "no plaintext leaves a rewrap");
    let moved: Vec<Value> = old
        .iter()
        .zip(body["results"].as_array().unwrap())
        .map(|(k, r)| {
            assert_eq!(r["kek_version"], 2);
            json!({"record_key_id": k["record_key_id"], "kek_version": 2, "wrapped": r["wrapped"], "dek": k["dek"]})
        })
        .collect();

    let (status, body) =
        ks.post(ADMIN, "/v1/tenants/onc/keys/1/state", &json!({"action": "disable"})).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("disabled")), "{body}");
    let (_, body) =
        ks.post(DEC, "/v1/tenants/onc/datakeys/unwrap", &json!({"items": [items[0]]})).await;
    assert_eq!(body["results"][0]["error"], "key_version_disabled");
    unwrap_all(&ks, "onc", &moved, 10).await;
    let (status, body) =
        ks.post(ADMIN, "/v1/tenants/onc/keys/2/state", &json!({"action": "disable"})).await;
    assert_eq!((status, error_code(&body)), (409, "invalid_transition"));
    let (status, body) =
        ks.post(ADMIN, "/v1/tenants/onc/keys/1/state", &json!({"action": "enable"})).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("decrypt_only")));

    let (status, text) = ks.get(ADMIN, "/v1/tenants/onc").await;
    assert_eq!(status, 200);
    let view: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(view["active_version"], 2);
    assert!(!text.contains("wrapped"), "no key material in tenant views");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_specific_errors_and_the_service_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut ks = KeyService::start(dir.path(), "[limits]\nmax_batch = 100\n");
    create_tenant(&ks, "onc").await;
    let client = ks.client(ENC);
    let post = |path: &str, body: Vec<u8>| {
        client
            .post(format!("{}{path}", ks.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("/v1/tenants/onc/datakeys", b"{\"count\": ".to_vec(), 400, "malformed_json"),
        ("/v1/tenants/onc/datakeys", br#"{"count": "ten"}"#.to_vec(), 422, "invalid_request"),
        (
            "/v1/tenants/onc/datakeys",
            br#"{"count": 5, "extra": 1}"#.to_vec(),
            422,
            "invalid_request",
        ),
        ("/v1/tenants/onc/datakeys", br#"{"count": 101}"#.to_vec(), 400, "batch_too_large"),
        ("/v1/tenants/onc/datakeys", br#"{"count": 0}"#.to_vec(), 400, "batch_too_large"),
        ("/v1/tenants/onc/datakeys", br#"[5]"#.to_vec(), 422, "invalid_request"),
        ("/v1/tenants/Bad!/datakeys", br#"{"count": 1}"#.to_vec(), 400, "invalid_tenant"),
        // Not UTF-8 once percent-decoded: a JSON error, not axum's plain text.
        ("/v1/tenants/%FF%FE/datakeys", br#"{"count": 1}"#.to_vec(), 400, "invalid_request"),
        ("/v1/tenants/t-nobody/datakeys", br#"{"count": 1}"#.to_vec(), 404, "unknown_tenant"),
        ("/v1/no/such/route", b"{}".to_vec(), 404, "not_found"),
        ("/v1/tenants/onc/datakeys", vec![b' '; 50 * 1024 * 1024], 413, "body_too_large"),
    ];
    for (path, body, status, code) in cases {
        let response = post(path, body).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{path} {code}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(error_code(&body), code, "{path}: {body}");
    }
    let (status, _) = ks.get(ENC, "/healthz").await;
    assert_eq!(status, 200);
    assert!(ks.is_running());
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_reload_takes_effect_and_a_broken_file_keeps_the_old_policy() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), "");
    create_tenant(&ks, "late").await;
    let newcomer = "spiffe://test/newcomer";
    let (status, _) = ks.post(newcomer, "/v1/tenants/late/datakeys", &json!({"count": 1})).await;
    assert_eq!(status, 403);

    let policy = dir.path().join("policy.toml");
    let granted = format!(
        "{}\n[[grant]]\nidentity = \"{newcomer}\"\ntenants = [\"late\"]\nroles = [\"encryptor\"]\n",
        keygate_tests::keyservice::TEST_POLICY
    );
    std::fs::write(&policy, &granted).unwrap();
    ks.sighup();
    let mut allowed = false;
    for _ in 0..50 {
        let (status, _) =
            ks.post(newcomer, "/v1/tenants/late/datakeys", &json!({"count": 1})).await;
        if status == 200 {
            allowed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(allowed, "the new grant took effect without a restart");

    std::fs::write(&policy, "[[grant]]\nidentity = \"x\"\nroles = [\"emperor\"]\n").unwrap();
    ks.sighup();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (status, _) = ks.post(newcomer, "/v1/tenants/late/datakeys", &json!({"count": 1})).await;
    assert_eq!(status, 200, "the broken file was refused; the old policy still works");
    assert!(ks.log().contains("policy reload failed"));
    // Counted, for an alert: the edit did not take.
    let (_, metrics) = ks.get(newcomer, "/metrics").await;
    assert!(metrics.lines().any(|l| l == "keygate_policy_reload_failures_total 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_ca_reload_keeps_existing_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), "");
    let (status, _) = ks.get(ADMIN, "/healthz").await; // opens a kept-alive connection
    assert_eq!(status, 200);
    let other = ks.pki.other_ca.issue_client(ADMIN, Validity::days(1)).unwrap();
    let other_client = client_with(ks.pki.ca.cert_pem(), Some((&other.cert_pem, &other.key_pem)));
    let url = format!("{}/healthz", ks.url);
    assert!(other_client.get(&url).send().await.is_err());

    // Trust the second CA too, then SIGHUP.
    let bundle = format!("{}\n{}", ks.pki.ca.cert_pem(), ks.pki.other_ca.cert_pem());
    std::fs::write(ks.pki.dir.join("ca.crt"), bundle).unwrap();
    ks.sighup();
    let mut accepted = false;
    for _ in 0..50 {
        if other_client.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
            accepted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(accepted, "the new CA is trusted after the reload");
    let (status, _) = ks.get(ADMIN, "/healthz").await;
    assert_eq!(status, 200, "the existing client still works");
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), "[log]\nlevel = \"trace\"\n");
    create_tenant(&ks, "onc").await;
    let keys = issue(&ks, "onc", 20, 10).await;
    unwrap_all(&ks, "onc", &keys, 10).await;
    let (status, body) = ks
        .post(
            DEC,
            "/v1/tenants/onc/derived",
            &json!({"schema": "patient", "fields": [{"path": "/mrn", "mode": "deterministic"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let log = ks.log();
    assert!(log.len() > 1000, "debug logging produced output");
    let mut secrets: Vec<String> =
        keys.iter().map(|k| k["dek"].as_str().unwrap().to_owned()).collect();
    secrets.extend(
        body["keys"].as_array().unwrap().iter().map(|k| k["key"].as_str().unwrap().to_owned()),
    );
    for b64 in secrets {
        let raw = data_encoding::BASE64URL_NOPAD.decode(b64.as_bytes()).unwrap();
        for form in [
            b64.clone(),
            data_encoding::HEXLOWER.encode(&raw),
            data_encoding::HEXUPPER.encode(&raw),
            data_encoding::BASE64.encode(&raw),
        ] {
            assert!(!log.contains(&form), "a key appears in the log");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_ca_file_is_picked_up_without_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), ""); // polls its TLS files every second
    let other = ks.pki.other_ca.issue_client(ADMIN, Validity::days(1)).unwrap();
    let other_client = client_with(ks.pki.ca.cert_pem(), Some((&other.cert_pem, &other.key_pem)));
    let url = format!("{}/healthz", ks.url);
    assert!(other_client.get(&url).send().await.is_err());
    let bundle = format!("{}\n{}", ks.pki.ca.cert_pem(), ks.pki.other_ca.cert_pem());
    std::fs::write(ks.pki.dir.join("ca.crt"), bundle).unwrap();
    let mut accepted = false;
    for _ in 0..50 {
        if other_client.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
            accepted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(accepted, "the rewritten CA bundle was noticed without SIGHUP");
}
