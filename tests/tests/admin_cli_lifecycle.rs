//! `keygate admin` lifecycle commands end to end: key usage,
//! auto-rotation, master key show and rotation, crypto-shredding under
//! dual control, approvals, and the compliance report — the real binary
//! against a real key service.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use keygate_tests::admin::{ADMIN, Admin};
use keygate_tests::keyservice::{KeyService, TEST_POLICY};
use serde_json::{Value, json};

const ENCRYPTOR: &str = "spiffe://test/encryptor";
const DECRYPTOR: &str = "spiffe://test/decryptor";
const OFFICER_A: &str = "spiffe://test/officer-a";
const OFFICER_B: &str = "spiffe://test/officer-b";

/// The test policy plus two security officers; officer A may also
/// administer (so it can file a request and then try to approve it).
fn officers_policy() -> String {
    format!(
        "{TEST_POLICY}
[[grant]]
identity = \"{OFFICER_A}\"
tenants = [\"*\"]
roles = [\"admin\", \"security_officer\", \"auditor\"]

[[grant]]
identity = \"{OFFICER_B}\"
tenants = [\"*\"]
roles = [\"security_officer\", \"auditor\"]
"
    )
}

fn now() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

fn service(dir: &Path) -> (KeyService, Admin) {
    let ks_dir = dir.join("ks");
    std::fs::create_dir_all(&ks_dir).unwrap();
    std::fs::write(ks_dir.join("policy.toml"), officers_policy()).unwrap();
    let ks = KeyService::start(&ks_dir, "");
    let admin = Admin::new(&ks, &dir.join("admin"), ADMIN);
    (ks, admin)
}

#[tokio::test(flavor = "multi_thread")]
async fn key_usage_shows_issues_and_unwraps_per_version() {
    let dir = tempfile::tempdir().unwrap();
    let (ks, admin) = service(dir.path());
    admin.run(&["tenant", "create", "onc"]).ok();
    let (status, issued) =
        ks.post(ENCRYPTOR, "/v1/tenants/onc/datakeys", &json!({"count": 5})).await;
    assert_eq!(status, 200, "{issued}");
    let items: Vec<Value> = issued["keys"].as_array().unwrap()[..2]
        .iter()
        .map(|k| json!({"record_key_id": k["record_key_id"], "kek_version": 1, "wrapped": k["wrapped"]}))
        .collect();
    let (status, body) = ks
        .post(
            DECRYPTOR,
            "/v1/tenants/onc/datakeys/unwrap",
            &json!({"items": items, "purpose": "treatment"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    admin.run(&["key", "rotate", "--tenant", "onc"]).ok();

    let usage = admin.run(&["key", "usage", "--tenant", "onc", "-o", "json"]).ok().json();
    assert_eq!(usage["tenant"], "onc");
    let v1 = &usage["versions"][0];
    assert_eq!((v1["version"].as_u64(), v1["state"].as_str()), (Some(1), Some("decrypt_only")));
    assert_eq!(v1["records_issued"], 5);
    assert_eq!(v1["unwraps_24h"], 2);
    assert!((v1["last_unwrap_at"].as_i64().unwrap() - now()).abs() < 600, "{v1}");
    assert_eq!(usage["versions"][1]["records_issued"], 0);
    assert!(usage["versions"][1]["last_unwrap_at"].is_null());

    let table = admin.run(&["key", "usage", "--tenant", "onc"]);
    let lines: Vec<&str> = table.ok().stdout.lines().collect();
    let columns: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        columns,
        ["VERSION", "STATE", "CREATED", "RECORDS_ISSUED", "UNWRAPS_24H", "LAST_UNWRAP"]
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!((row[0], row[1], row[3], row[4]), ("1", "decrypt_only", "5", "2"), "{lines:?}");
    assert!(row[2].ends_with('Z') && row[5].ends_with('Z'), "RFC 3339 UTC: {lines:?}");
    assert!(lines[2].trim_end().ends_with(" -"), "never unwrapped: {lines:?}");

    assert!(admin.run(&["key", "usage", "--tenant", "nope"]).fails(1).contains("unknown_tenant"));
}

#[test]
fn auto_rotation_on_and_off() {
    let dir = tempfile::tempdir().unwrap();
    let (_ks, admin) = service(dir.path());
    admin.run(&["tenant", "create", "onc"]).ok();

    let on = admin.run(&["key", "auto-rotate", "--tenant", "onc", "--every", "90d"]);
    assert!(
        on.ok().stdout.starts_with("tenant onc: rotates every 90d; next rotation at 20"),
        "{on:?}"
    );
    let json =
        admin.run(&["-o", "json", "key", "auto-rotate", "--tenant", "onc", "--every", "1d12h"]);
    let json = json.ok().json();
    assert_eq!(json["rotate_every_secs"], 129_600);
    let next = json["next_rotation_at"].as_i64().unwrap();
    assert!((next - now() - 129_600).abs() < 600, "{json}");

    let off = admin.run(&["key", "auto-rotate", "--tenant", "onc", "--off"]);
    assert_eq!(off.ok().stdout.trim(), "tenant onc: automatic rotation is off");
    let json =
        admin.run(&["-o", "json", "key", "auto-rotate", "--tenant", "onc", "--off"]).ok().json();
    assert!(json["rotate_every_secs"].is_null() && json["next_rotation_at"].is_null(), "{json}");

    let unknown = admin.run(&["key", "auto-rotate", "--tenant", "nope", "--every", "1d"]);
    assert!(unknown.fails(1).contains("unknown_tenant"));
}

#[test]
fn master_show_and_rotate_to_a_new_root_key() {
    let dir = tempfile::tempdir().unwrap();
    let (ks, admin) = service(dir.path());
    for t in ["onc", "t-one", "t-two"] {
        admin.run(&["tenant", "create", t]).ok();
    }
    let before = admin.run(&["master", "show", "-o", "json"]).ok().json();
    let first = before["active"]["id"].as_u64().unwrap();
    assert_eq!(before["masters"].as_array().unwrap().len(), 1, "{before}");
    let table = admin.run(&["master", "show"]);
    let out = &table.ok().stdout;
    assert!(out.starts_with(&format!("active master key: {first} (")), "{out}");
    assert!(out.lines().nth(1).unwrap().starts_with("ID  KIND"), "{out}");
    assert!(out.lines().nth(1).unwrap().ends_with("CONNECTION"), "{out}");
    assert!(out.lines().nth(2).unwrap().ends_with("connected"), "{out}");

    // The new provider, as a key service's [root] section.
    let new_root = dir.path().join("new-master.toml");
    std::fs::write(
        &new_root,
        format!(
            "# the next master key\n[root]\nprovider = \"dev_local\"\nkey_file = \"{}\"\ncreate_if_missing = true\n",
            dir.path().join("ks/root-2.key").display()
        ),
    )
    .unwrap();
    let rotated = admin.run(&["master", "rotate", "--to", new_root.to_str().unwrap()]);
    let out = &rotated.ok().stdout;
    assert!(
        out.contains("rewrapped 3 tenant keys, 3 index roots") && out.contains("(complete)"),
        "{out}"
    );

    let after = admin.run(&["master", "show", "-o", "json"]).ok().json();
    let second = after["active"]["id"].as_u64().unwrap();
    assert_ne!(second, first);
    let masters = after["masters"].as_array().unwrap();
    let old = masters.iter().find(|m| m["id"] == first).unwrap();
    let new = masters.iter().find(|m| m["id"] == second).unwrap();
    assert_eq!(
        (old["active"].as_bool(), old["keys_wrapped"].as_u64()),
        (Some(false), Some(0)),
        "{after}"
    );
    assert_eq!(new["active"], true);
    assert!(new["keys_wrapped"].as_u64().unwrap() >= 6, "{after}");
    for master in [old, new] {
        assert_eq!(master["connection"], json!({"state": "connected"}), "{after}");
    }

    // Keys still work, and the audit chain still verifies.
    admin.run(&["key", "rotate", "--tenant", "onc"]).ok();
    admin.run(&["audit", "verify"]).ok();
    let auditor = Admin::new(&ks, &dir.path().join("auditor"), "spiffe://test/auditor");
    assert!(
        auditor
            .run(&["master", "rotate", "--to", new_root.to_str().unwrap()])
            .fails(1)
            .contains("forbidden")
    );

    // `master connect`: admins only, known masters only.
    let (first, second) = (first.to_string(), second.to_string());
    let out = admin.run(&["master", "connect", &first]).ok().stdout.clone();
    assert!(out.starts_with(&format!("master key {first} (local ")), "{out}");
    assert!(out.trim_end().ends_with(": connected"), "{out}");
    assert!(auditor.run(&["master", "connect", &first]).fails(1).contains("forbidden"));
    assert!(admin.run(&["master", "connect", "999"]).fails(1).contains("no master key 999"));

    // (A master that cannot be reached, and reached once put right:
    // lifecycle.rs, `master_rotation_to_softhsm2_resumes_after_a_crash`.)
    let connected = admin.run(&["master", "connect", &second, "-o", "json"]).ok().json();
    assert_eq!(connected["connection"], json!({"state": "connected"}), "{connected}");
    assert_eq!(connected["active"], true, "{connected}");
    admin.run(&["key", "rotate", "--tenant", "t-one"]).ok();
}

#[test]
fn shredding_needs_a_second_security_officer() {
    let dir = tempfile::tempdir().unwrap();
    let (ks, _admin) = service(dir.path());
    let a = Admin::new(&ks, &dir.path().join("officer-a"), OFFICER_A);
    let b = Admin::new(&ks, &dir.path().join("officer-b"), OFFICER_B);
    a.run(&["tenant", "create", "onc"]).ok();
    a.run(&["key", "rotate", "--tenant", "onc"]).ok();

    // A request for one version, rejected by B.
    let one = a.run(&[
        "shred",
        "request",
        "--tenant",
        "onc",
        "--version",
        "1",
        "--reason",
        "old key",
        "-o",
        "json",
    ]);
    let one = one.ok().json();
    assert_eq!((one["action"].as_str(), one["version"].as_u64()), (Some("shred"), Some(1)));
    assert_eq!(
        (one["state"].as_str(), one["requested_by"].as_str()),
        (Some("pending"), Some(OFFICER_A))
    );
    let id_one = one["id"].as_str().unwrap().to_owned();
    let rejected = b.run(&["reject", &id_one, "--comment", "not yet"]);
    assert!(rejected.ok().stdout.contains("is now rejected"), "{rejected:?}");
    let late = b.run(&["approve", &id_one, "--tenant", "onc", "--version", "1"]);
    assert!(late.fails(1).contains("approval_not_pending"));

    // A request for the whole tenant: listed, self-approval refused,
    // approved by B.
    let filed =
        a.run(&["shred", "request", "--tenant", "onc", "--reason", "contract ended, SEC-42"]);
    let out = &filed.ok().stdout;
    assert!(out.contains("all versions") && out.contains("second security officer"), "{out}");
    let id = out.split_whitespace().nth(1).unwrap().trim_end_matches(':').to_owned();
    let pending = b.run(&["approvals", "list", "--state", "pending", "-o", "json"]).ok().json();
    let listed: Vec<&str> = pending["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [id.as_str()]);
    let table = b.run(&["approvals", "list"]);
    let out = &table.ok().stdout;
    assert!(out.starts_with("ID ") && out.contains(&id) && out.contains(&id_one), "{out}");
    assert!(out.contains("contract ended, SEC-42"), "{out}");

    let own = a.run(&["approve", &id, "--tenant", "onc", "--all-versions"]);
    assert!(own.fails(1).contains("(self_approval)"), "{own:?}");
    // The approver names what they mean: a request for anything else is
    // refused and nothing is decided.
    for scope in
        [&["--tenant", "onc", "--version", "1"][..], &["--tenant", "t-one", "--all-versions"]]
    {
        let other = b.run(&[&["approve", id.as_str()][..], scope].concat());
        let refused = other.fails(1);
        assert!(refused.contains("approval_mismatch"), "{refused}");
        assert!(refused.contains("tenant onc (all versions)"), "{refused}");
    }
    let listed = b.run(&["approvals", "list", "--state", "pending", "-o", "json"]).ok().json();
    assert_eq!(listed["approvals"][0]["id"], id.as_str(), "still pending");
    let approved =
        b.run(&["approve", &id, "--tenant", "onc", "--all-versions", "-o", "json"]).ok().json();
    assert_eq!(approved["decided_by"], OFFICER_B);
    let state = approved["state"].as_str().unwrap();
    assert!(state == "approved" || state == "executed", "{approved}");
    if state == "executed" {
        let gone = a.run(&["key", "rotate", "--tenant", "onc"]);
        assert!(gone.fails(1).contains("key_destroyed") || gone.stderr.contains("unknown_tenant"));
    }

    let unknown = b.run(&["approve", "deadbeef", "--tenant", "onc", "--all-versions"]);
    assert!(unknown.fails(1).contains("unknown_approval"));
    assert!(
        a.run(&["shred", "request", "--tenant", "nope", "--reason", "x"])
            .fails(1)
            .contains("unknown_tenant")
    );
    // An admin without the security officer role cannot decide.
    let admin = Admin::new(&ks, &dir.path().join("admin-only"), ADMIN);
    admin.run(&["reject", &id]).fails(1);
}

#[test]
fn compliance_report_table_json_and_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let (_ks, admin) = service(dir.path());
    let json = admin.run(&["compliance", "report", "-o", "json"]);
    let report = json.json();
    let checks = report["checks"].as_array().unwrap();
    assert!(!checks.is_empty() && report["profile"].is_string(), "{report}");
    for c in checks {
        assert!(
            c["rule"].is_string() && c["hipaa"].as_str().unwrap().starts_with("164.312"),
            "{c}"
        );
        assert!(c["status"] == "pass" || c["status"] == "fail", "{c}");
    }
    let failing = checks.iter().filter(|c| c["status"] == "fail").count();
    let table = admin.run(&["compliance", "report"]);
    if failing == 0 {
        json.ok();
        table.ok();
    } else {
        assert!(json.fails(1).contains("compliance check(s) fail"));
        table.fails(1);
    }
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert!(lines[0].starts_with("compliance profile "), "{lines:?}");
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["RULE", "HIPAA", "STATUS", "DETAIL"]
    );
    assert_eq!(lines.len(), checks.len() + 2);
}
