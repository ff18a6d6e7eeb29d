//! End-to-end tests of the sidecar's mutual TLS to the key service: its
//! certificate reloaded when renewed, and the key service pinned to its
//! identity.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::pki::Validity;
use keygate_tests::keyservice::{KeyService, Options, Pki, write_private};
use keygate_tests::sidecar::{Sidecar, Transport};
use serde_json::json;

const ADMIN: &str = "spiffe://test/admin";
/// Granted tenants `onc` and `t-*`, not `b`.
const CLINICAL: &str = "spiffe://test/sidecar-clinical";
/// Granted tenant `b` only.
const APP_B: &str = "spiffe://test/app-b";
const KEY_SERVICE: &str = "spiffe://test/key-service";

fn start(ks: &KeyService, dir: &Path, identity: &str, key_service: &str, extra: &str) -> Sidecar {
    let urls = std::slice::from_ref(&ks.url);
    Sidecar::start_with_key_service(
        &ks.pki,
        urls,
        dir,
        identity,
        key_service,
        extra,
        Transport::Unix,
    )
}

/// The status and error code of encrypting a record for `tenant`.
async fn encrypt(sc: &Sidecar, tenant: &str) -> (u16, String) {
    let record = json!({"name": "Jane Roe", "ssn": "123-45-6789", "age": 51});
    let (status, body) = sc
        .post("/v1/encrypt", &json!({"tenant": tenant, "schema": "patient", "record": record}))
        .await;
    (status, body["error"]["code"].as_str().unwrap_or_default().to_owned())
}

/// The value of the unlabelled counter `name` at the sidecar's `/metrics`.
async fn counter(sc: &Sidecar, name: &str) -> String {
    let (status, text) = sc.get("/metrics").await;
    assert_eq!(status, 200);
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_default();
    line.rsplit(' ').next().unwrap_or_default().to_owned()
}

/// A renewed certificate (here of another identity, which the key
/// service grants tenant `b`, so that the calls show which one they carry)
/// is taken up on SIGHUP, or at the next poll once its files change,
/// without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_renewed_client_certificate_is_used_after_sighup_or_once_its_files_change() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(&dir.path().join("ks"), "");
    for tenant in ["onc", "b"] {
        let (status, body) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": tenant})).await;
        assert_eq!(status, 201, "{body}");
    }
    // Grants cached for a second, so the new identity's show soon.
    let cache = "[cache]\nttl_secs = 1\n";
    let polled =
        start(&ks, &dir.path().join("polled"), CLINICAL, "tls_reload_interval_secs = 1", cache);
    let mut hup =
        start(&ks, &dir.path().join("hup"), CLINICAL, "tls_reload_interval_secs = 3600", cache);
    for sc in [&polled, &hup] {
        assert_eq!(encrypt(sc, "onc").await.0, 200);
        assert_eq!(encrypt(sc, "b").await, (403, "forbidden".to_owned()));
    }

    polled.renew_certificate(&ks.pki.ca, APP_B);
    hup.renew_certificate(&ks.pki.ca, APP_B);
    hup.sighup();
    let deadline = Instant::now() + Duration::from_secs(10);
    for sc in [&polled, &hup] {
        loop {
            let (status, code) = encrypt(sc, "b").await;
            if status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "still {status} {code}; log:\n{}", sc.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(encrypt(sc, "onc").await, (403, "forbidden".to_owned()), "no longer CLINICAL");
    }
    // (The polled one may have caught the new certificate beside the old
    // key between the two renames: a failure it counts, then mends.)
    assert_eq!(counter(&hup, "keygate_sidecar_tls_reload_failures_total").await, "0");
    assert!(hup.is_running(), "SIGHUP reloads, it does not end the sidecar");
    assert!(hup.log().contains("SIGHUP: reloading"), "{}", hup.log());
}

/// With `server_identity` set, a key service whose certificate chains to
/// the trusted CA and names the right host but is of another identity is
/// refused, and the refusal is logged and counted as a TLS failure.
#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_sidecar_refuses_a_key_service_of_another_identity() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki"));
    let server = pki
        .ca
        .issue_server_with_identity(&["localhost", "127.0.0.1"], KEY_SERVICE, Validity::days(1))
        .unwrap();
    std::fs::write(pki.dir.join("server.crt"), &server.cert_pem).unwrap();
    write_private(&pki.dir.join("server.key"), &server.key_pem);
    let ks = KeyService::start_with(
        &dir.path().join("ks"),
        &Options { pki: Some(Arc::new(pki)), ..Options::default() },
    );
    let (status, body) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201, "{body}");

    let pinned = format!("server_identity = \"{KEY_SERVICE}\"");
    let right = start(&ks, &dir.path().join("right"), CLINICAL, &pinned, "");
    assert_eq!(encrypt(&right, "onc").await.0, 200);
    assert_eq!(right.get("/readyz").await.0, 200);

    let impostor = "server_identity = \"spiffe://test/other-service\"";
    let wrong = start(&ks, &dir.path().join("wrong"), CLINICAL, impostor, "");
    assert_eq!(encrypt(&wrong, "onc").await, (503, "key_service_unavailable".to_owned()));
    assert_eq!(wrong.get("/readyz").await.0, 503);
    let failures = counter(&wrong, "keygate_sidecar_key_service_tls_failures_total").await;
    assert!(failures.parse::<u64>().unwrap() >= 1, "{failures}");
    let log = wrong.log();
    assert!(
        log.contains("TLS handshake with a key service replica failed")
            && log.contains(&format!("is of identity \\\"{KEY_SERVICE}\\\"")),
        "{log}"
    );
    // Logged once per minute per replica, however many calls failed.
    assert_eq!(log.matches("TLS handshake with a key service replica failed").count(), 1, "{log}");
}
