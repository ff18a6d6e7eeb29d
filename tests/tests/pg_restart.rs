//! PostgreSQL restarted under a running key service: requests fail with a
//! 503 (never a panic, never a partial write), the service recovers by
//! itself, and the audit chain still verifies.
//!
//! This stops and starts the machine's PostgreSQL server, so it lives in
//! its own test binary (cargo runs test binaries one at a time).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use std::process::Command;
use std::time::Duration;

use keygate_tests::cluster::Cluster;
use serde_json::{Value, json};

const ADMIN: &str = "spiffe://test/admin";
const ENC: &str = "spiffe://test/encryptor";

fn pg_ctl(action: &str) {
    let versions = std::fs::read_dir("/etc/postgresql")
        .expect("a local PostgreSQL cluster (/etc/postgresql)")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    let version = versions.first().expect("a PostgreSQL version");
    let status = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", version, "main", action])
        .status()
        .unwrap();
    assert!(status.success(), "pg_ctlcluster {action}");
}

/// Starts PostgreSQL again even if the test fails half-way.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| pg_ctl("start"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restart_mid_load() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), 1, "");
    let ks = &cluster.replicas[0];
    let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    for _ in 0..5 {
        assert_eq!(ks.post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 10})).await.0, 200);
    }

    let _guard = Restart;
    pg_ctl("stop");
    // An admin change is recorded first: the audit log, on the same
    // database, is what refuses it.
    let (status, body) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "t-during"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("audit_unavailable")),
        "{body}"
    );
    let (status, body) = ks.post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 10})).await;
    assert_eq!(status, 503, "no key leaves without its audit event: {body}");
    assert!(body.get("keys").is_none());
    let (status, _) = ks.get(ADMIN, "/readyz").await;
    assert_eq!(status, 503);
    pg_ctl("start");

    let mut recovered = false;
    for _ in 0..100 {
        let (status, _) = ks.post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 10})).await;
        if status == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "the replica recovered by itself");
    let (status, _) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "t-after"})).await;
    assert_eq!(status, 201);
    let (_, verify) = ks.get(ADMIN, "/v1/audit/verify").await;
    let verify: Value = serde_json::from_str(&verify).unwrap();
    assert_eq!(verify["ok"], true, "{verify}");
}
