//! DAST: schemathesis against a live stack (issue #9), on both APIs, from
//! the OpenAPI documents they serve. Checks: no 5xx, every response
//! conforms to the documented schema, no stack traces or debug output
//! (`tests/dast/hooks.py`).
//!
//! schemathesis comes from `.ci/install-test-deps` (the venv in
//! `$KEYGATE_TEST_VENV`, default `~/.cache/keygate/venv`). Without it the
//! test is skipped, except in CI (`CI=true`), where it fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use std::path::{Path, PathBuf};
use std::process::Command;

use gateway::pki::Validity;
use keygate_tests::keyservice::{KeyService, write_private};
use keygate_tests::sidecar::Sidecar;
use serde_json::json;

const ADMIN: &str = "spiffe://test/admin";
const SIDECAR: &str = "spiffe://test/sidecar-clinical";
/// Test cases per API operation (bounds the run: about a minute in all).
const MAX_EXAMPLES: &str = "30";

fn schemathesis() -> Option<PathBuf> {
    let venv = std::env::var_os("KEYGATE_TEST_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/keygate/venv")));
    let in_venv = venv.map(|v| v.join("bin/schemathesis")).filter(|p| p.is_file());
    in_venv.or_else(|| {
        let found = Command::new("sh").args(["-c", "command -v schemathesis"]).output().ok()?;
        let path = String::from_utf8(found.stdout).ok()?.trim().to_owned();
        (!path.is_empty()).then(|| PathBuf::from(path))
    })
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Runs schemathesis on `spec` against `base`; panics with its output on
/// any failure.
fn run(st: &Path, name: &str, spec: &Path, base: &str, extra: &[&str], dir: &Path) {
    let hooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("dast/hooks.py");
    let out = Command::new(st)
        .arg("run")
        .arg(spec)
        .args(["--url", base])
        .args(["--checks", "not_a_server_error,response_schema_conformance,no_debug_output"])
        .args(["--max-examples", MAX_EXAMPLES, "--seed", "20261122", "--workers", "1"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--request-timeout", "30", "--no-color"])
        .args(["--suppress-health-check", "all"])
        .args(extra)
        // Extra schemathesis options for a local investigation, e.g.
        // KEYGATE_DAST_ARGS="--include-path-regex derived --report vcr".
        .args(std::env::var("KEYGATE_DAST_ARGS").unwrap_or_default().split_whitespace())
        .env("SCHEMATHESIS_HOOKS", &hooks)
        .current_dir(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Ok(keep) = std::env::var("KEYGATE_DAST_KEEP") {
        let _ = std::fs::create_dir_all(&keep);
        let _ = Command::new("cp").arg("-r").arg(dir).arg(&keep).status();
    }
    assert!(
        out.status.success(),
        "schemathesis found problems in the {name} API:\n{stdout}\n{stderr}"
    );
    let tail: Vec<&str> = stdout.lines().rev().take(40).collect();
    println!("--- {name}:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_errors_schema_violations_or_debug_output() {
    let Some(st) = schemathesis() else {
        assert!(
            !in_ci(),
            "schemathesis is not installed; run .ci/install-test-deps (venv at $KEYGATE_TEST_VENV)"
        );
        eprintln!("SKIPPED: schemathesis not installed (run .ci/install-test-deps)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(&dir.path().join("ks"), "");
    let (status, body) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201, "{body}");

    // The admin/auditor identity's certificate for schemathesis.
    let cert = ks.pki.ca.issue_client(ADMIN, Validity::days(1)).unwrap();
    let work = dir.path().join("dast");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("client.crt"), &cert.cert_pem).unwrap();
    write_private(&work.join("client.key"), &cert.key_pem);
    std::fs::write(work.join("ca.crt"), ks.pki.ca.cert_pem()).unwrap();

    // Key service: its live document, over mutual TLS.
    let (status, spec) = ks.get(ADMIN, "/v1/openapi.json").await;
    assert_eq!(status, 200);
    let ks_spec = work.join("keyservice.json");
    std::fs::write(&ks_spec, spec).unwrap();
    let cert_args = [
        "--request-cert",
        work.join("client.crt").to_str().unwrap(),
        "--request-cert-key",
        work.join("client.key").to_str().unwrap(),
        "--tls-verify",
        work.join("ca.crt").to_str().unwrap(),
    ]
    .map(str::to_owned);
    let mut cert_args: Vec<&str> = cert_args.iter().map(String::as_str).collect();
    // Not fuzzed: a master rotation connects to whatever provider the body
    // names (files, PKCS#11 modules, KMS endpoints off this machine).
    cert_args.extend(["--exclude-path", "/v1/master/rotate"]);
    run(&st, "key service", &ks_spec, &ks.url, &cert_args, &work);

    // Sidecar over loopback TCP beside it.
    let sc = Sidecar::start_tcp(&ks, &dir.path().join("sc"), SIDECAR, "");
    let (status, spec) = sc.get("/v1/openapi.json").await;
    assert_eq!(status, 200);
    let sc_spec = work.join("sidecar.json");
    std::fs::write(&sc_spec, spec).unwrap();
    run(&st, "sidecar", &sc_spec, &sc.base, &[], &work);

    // Both still serve.
    let (status, _) = ks.get(ADMIN, "/healthz").await;
    assert_eq!(status, 200);
    let (status, _) = sc.get("/healthz").await;
    assert_eq!(status, 200);
}
