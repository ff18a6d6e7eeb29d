//! `keygate admin` end to end: the real binary as a subprocess against a
//! real key service (and sidecar): every command's happy path, its bad
//! input, and its exit code, with errors always one line on stderr.
//!
//! The lifecycle commands backed by newer endpoints (key usage,
//! auto-rotation, master rotation, shredding, approvals, compliance) are
//! in `admin_cli_lifecycle.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use gateway::pki::Validity;
use keygate_tests::admin::{ADMIN, AUDITOR, Admin, free_port, keygate};
use keygate_tests::keyservice::{KeyService, TEST_POLICY};
use keygate_tests::sidecar::Sidecar;
use kms_core::record::RecordHeader;
use serde_json::{Value, json};
use sqlx::Connection;

const CLINICAL: &str = "spiffe://test/sidecar-clinical";

fn service(dir: &Path) -> (KeyService, Admin) {
    let ks = KeyService::start(&dir.join("ks"), "");
    let admin = Admin::new(&ks, &dir.join("admin"), ADMIN);
    (ks, admin)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn tenants_and_key_versions() {
    let dir = tempfile::tempdir().unwrap();
    let (_ks, admin) = service(dir.path());

    let created = admin.run(&["tenant", "create", "onc"]);
    assert!(
        created.ok().stdout.contains("created tenant onc (KEK version 1 active)"),
        "{created:?}"
    );
    let again = admin.run(&["tenant", "create", "onc"]);
    assert!(again.fails(1).contains("(tenant_exists)"), "{again:?}");
    admin.run(&["tenant", "create", "t-two"]).ok();

    let list = admin.run(&["tenant", "list"]);
    let lines: Vec<&str> = list.ok().stdout.lines().collect();
    assert!(lines[0].starts_with("TENANT") && lines[0].contains("ACTIVE_VERSION"), "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with("onc ")), "{lines:?}");
    let json = admin.run(&["--output", "json", "tenant", "list"]).ok().json();
    let names: Vec<&str> =
        json.as_array().unwrap().iter().map(|t| t["tenant"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 2, "{json}");
    assert!(names.contains(&"onc") && names.contains(&"t-two"));

    let show = admin.run(&["tenant", "show", "onc", "-o", "json"]).ok().json();
    assert_eq!(show["active_version"], 1);
    let table = admin.run(&["tenant", "show", "onc"]);
    assert!(table.ok().stdout.starts_with("tenant onc: created 20"), "{table:?}");

    let rotated = admin.run(&["key", "rotate", "--tenant", "onc"]);
    assert!(rotated.ok().stdout.contains("KEK version 2 is active"), "{rotated:?}");
    let keys = admin.run(&["key", "list", "--tenant", "onc", "--output", "json"]).ok().json();
    let states: Vec<(u64, &str)> = keys["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["version"].as_u64().unwrap(), v["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [(1, "decrypt_only"), (2, "active")]);
    let table = admin.run(&["key", "list", "--tenant", "onc"]);
    let lines: Vec<&str> = table.ok().stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[0].starts_with("VERSION  STATE"), "{lines:?}");
    assert!(
        lines[1].starts_with("1        decrypt_only  20") && lines[1].contains('Z'),
        "{lines:?}"
    );

    let disabled = admin.run(&["key", "state", "--tenant", "onc", "--version", "1", "disable"]);
    assert!(disabled.ok().stdout.contains("KEK version 1 is now disabled"), "{disabled:?}");
    let json = admin.run(&[
        "-o",
        "json",
        "key",
        "state",
        "--tenant",
        "onc",
        "--version",
        "1",
        "decrypt-only",
    ]);
    assert_eq!(json.ok().json()["state"], "decrypt_only");
    let keys = admin.run(&["key", "list", "--tenant", "onc", "-o", "json"]).ok().json();
    assert_eq!(keys["versions"][0]["state"], "decrypt_only");
}

#[test]
fn bad_input_is_refused_with_one_line_and_the_right_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let (ks, admin) = service(dir.path());
    admin.run(&["tenant", "create", "onc"]).ok();

    // Refused by the key service: exit 1, its message and code.
    let unknown = admin.run(&["tenant", "show", "nope"]);
    assert_eq!(unknown.fails(1), "error: no tenant nope (unknown_tenant)");
    for args in [&["key", "rotate", "--tenant", "nope"][..], &["key", "list", "--tenant", "nope"]] {
        let run = admin.run(args);
        assert!(run.fails(1).contains("unknown_tenant"), "{run:?}");
    }
    // (The service answers unknown_version here: it looks up the version.)
    let run = admin.run(&["key", "state", "--tenant", "nope", "--version", "1", "disable"]);
    assert!(run.fails(1).contains("tenant nope"), "{run:?}");
    let v999 = admin.run(&["key", "state", "--tenant", "onc", "--version", "999", "disable"]);
    assert!(v999.fails(1).contains("(unknown_version)"), "{v999:?}");
    let auditor = Admin::new(&ks, &dir.path().join("auditor"), AUDITOR);
    assert!(auditor.run(&["tenant", "create", "t-x"]).fails(1).contains("(forbidden)"));
    assert!(auditor.run(&["key", "rotate", "--tenant", "onc"]).fails(1).contains("forbidden"));

    // Bad usage, caught before any call: exit 2.
    for args in [
        &["key", "state", "--tenant", "onc", "--version", "0", "disable"][..],
        &["key", "state", "--tenant", "onc", "--version", "x", "disable"],
        &["key", "state", "--tenant", "onc", "--version", "1", "destroy"],
        &["key", "state", "--tenant", "onc", "disable"],
        &["tenant", "create", "Bad Tenant"],
        &["tenant", "show"],
        &["key", "rotate"],
        &["key", "auto-rotate", "--tenant", "onc"],
        &["key", "auto-rotate", "--tenant", "onc", "--every", "1x"],
        &["key", "auto-rotate", "--tenant", "onc", "--every", "90d", "--off"],
        &["shred", "request", "--tenant", "onc"],
        &["shred", "request", "--tenant", "onc", "--reason", "  "],
        &["approve", "not-hex!", "--tenant", "onc", "--all-versions"],
        &["approve", "9f2c", "--tenant", "onc"],
        &["approve", "9f2c", "--tenant", "onc", "--version", "1", "--all-versions"],
        &["approve", "9f2c", "--all-versions"],
        &["reject"],
        &["approvals", "list", "--state", "maybe"],
        &["audit", "export", "--since", "yesterday"],
        &["master", "rotate"],
        &["rewrap", "--tenant", "onc", "--sidecar", "tcp://127.0.0.1:1"],
        &["rewrap", "--tenant", "onc", "--sidecar", "http://10.1.2.3:80"],
        &["rewrap", "--tenant", "onc", "--batch", "0"],
        &["frobnicate"],
        &[],
    ] {
        let run = admin.run(args);
        run.fails(2);
    }
    let zero = admin.run(&["key", "state", "--tenant", "onc", "--version", "0", "disable"]);
    assert!(zero.fails(2).contains("--version"), "{zero:?}");

    // Files given to commands: missing or malformed → exit 2, with a line number.
    let missing = admin.run(&["master", "rotate", "--to", "/nonexistent/new-master.toml"]);
    assert!(missing.fails(2).contains("/nonexistent/new-master.toml"));
    let bad = dir.path().join("bad-root.toml");
    std::fs::write(&bad, "provider = \"pkcs11\"\nmodule = \"/x.so\"\ntoken_label = \"t\"\nkey_label = \"k\"\npin = \"123456\"\n").unwrap();
    let line = admin.run(&["master", "rotate", "--to", bad.to_str().unwrap()]);
    let line = line.fails(2);
    assert!(line.contains("line 5") && !line.contains("123456"), "{line}");
    std::fs::write(&bad, "[root\nprovider = 1\n").unwrap();
    assert!(
        admin.run(&["master", "rotate", "--to", bad.to_str().unwrap()]).fails(2).contains("line 1")
    );
}

#[test]
fn connection_failures_are_one_line_with_exit_3_or_2() {
    let dir = tempfile::tempdir().unwrap();
    let (ks, admin) = service(dir.path());
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();

    // Nothing listening.
    let url = format!("https://localhost:{}", free_port());
    let down = admin.run(&["--url", &url, "tenant", "list"]);
    let line = down.fails(3);
    assert!(line.contains("cannot reach the key service") && line.contains("refused"), "{line}");

    // A client certificate from a CA the service does not trust, and an
    // expired one: the handshake fails.
    let foreign = ks.pki.other_ca.issue_client(ADMIN, Validity::days(1)).unwrap();
    let stranger = Admin::with_cert(&ks, &dir.path().join("stranger"), &foreign);
    // (The client sees the server's alert, or only the closed connection,
    // depending on timing; either way the message points at the certificate.)
    let line = stranger.run(&["tenant", "list"]);
    assert!(line.fails(3).contains("client certificate"), "{line:?}");
    let expired = ks.pki.ca.issue_client(ADMIN, Validity::expired()).unwrap();
    let expired = Admin::with_cert(&ks, &dir.path().join("expired"), &expired);
    let line = expired.run(&["tenant", "list"]);
    assert!(line.fails(3).contains("client certificate"), "{line:?}");

    // The service's certificate checked against the wrong CA.
    std::fs::write(dir.path().join("other-ca.crt"), ks.pki.other_ca.cert_pem()).unwrap();
    let other_ca = dir.path().join("other-ca.crt");
    let untrusted = admin.run(&["--ca", other_ca.to_str().unwrap(), "tenant", "list"]);
    assert!(untrusted.fails(3).contains("not trusted"), "{untrusted:?}");

    // Profiles: a missing one, none at all, a broken one, broken PEM files.
    let args = ["admin", "--profile", "/nonexistent/admin.toml", "tenant", "list"].map(OsStr::new);
    let missing = keygate(&args, &home, &[], None);
    assert!(missing.fails(2).contains("/nonexistent/admin.toml"), "{missing:?}");
    let none =
        keygate(&[OsStr::new("admin"), OsStr::new("tenant"), OsStr::new("list")], &home, &[], None);
    let line = none.fails(2);
    assert!(line.contains("--url") && line.contains("KEYGATE_ADMIN_URL"), "{line}");
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, format!("url = \"{}\"\nca = \"x\"\ncolour = \"red\"\n", ks.url))
        .unwrap();
    let args = [
        OsStr::new("admin"),
        OsStr::new("--profile"),
        broken.as_os_str(),
        OsStr::new("tenant"),
        OsStr::new("list"),
    ];
    let line = keygate(&args, &home, &[], None);
    assert!(line.fails(2).contains("line 3"), "{line:?}");
    std::fs::write(dir.path().join("junk.key"), "not a key").unwrap();
    let junk = dir.path().join("junk.key");
    let line = admin.run(&["--key", junk.to_str().unwrap(), "tenant", "list"]);
    let line = line.fails(2);
    assert!(line.contains("--key") && !line.contains("not a key"), "{line}");
    let plain = admin.run(&["--url", "http://localhost:1", "tenant", "list"]);
    assert!(plain.fails(2).contains("https"), "{plain:?}");

    // The default profile (~/.config/keygate/admin.toml) and env overrides.
    let config = home.join(".config/keygate");
    std::fs::create_dir_all(&config).unwrap();
    for name in ["admin.crt", "admin.key", "ca.crt"] {
        std::fs::copy(admin.dir.join(name), config.join(name)).unwrap();
    }
    std::fs::write(
        config.join("admin.toml"),
        "url = \"https://localhost:1\"\nca = \"ca.crt\"\ncert = \"admin.crt\"\nkey = \"admin.key\"\n",
    )
    .unwrap();
    let args = [OsStr::new("admin"), OsStr::new("tenant"), OsStr::new("list")];
    keygate(&args, &home, &[], None).fails(3);
    keygate(&args, &home, &[("KEYGATE_ADMIN_URL", OsStr::new(&ks.url))], None).ok();
    let with_flag = [
        OsStr::new("admin"),
        OsStr::new("--url"),
        OsStr::new(&ks.url),
        OsStr::new("tenant"),
        OsStr::new("list"),
    ];
    keygate(&with_flag, &home, &[], None).ok();
    keygate(
        &args[..],
        &dir.path().join("nowhere"),
        &[("KEYGATE_ADMIN_PROFILE", admin.profile.as_os_str())],
        None,
    )
    .ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_verify_and_export() {
    let dir = tempfile::tempdir().unwrap();
    let (ks, admin) = service(dir.path());
    admin.run(&["tenant", "create", "onc"]).ok();
    admin.run(&["tenant", "create", "t-two"]).ok();
    admin.run(&["key", "rotate", "--tenant", "onc"]).ok();

    let verify = admin.run(&["audit", "verify"]);
    let out = &verify.ok().stdout;
    assert!(
        out.starts_with("audit log verified: 1 instance(s)") && out.contains("ks-test"),
        "{out}"
    );
    let json = admin.run(&["audit", "verify", "-o", "json"]).ok().json();
    assert_eq!(json["ok"], true);

    let all = admin.run(&["audit", "export"]).ok().json_lines();
    let actions: Vec<&str> = all.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert!(actions.contains(&"tenant.create") && actions.contains(&"kek.rotate"), "{actions:?}");
    let onc = admin.run(&["audit", "export", "--since", "1h", "--tenant", "onc"]).ok().json_lines();
    assert!(!onc.is_empty() && onc.iter().all(|e| e["tenant"] == "onc"), "{onc:?}");
    assert!(onc.len() < all.len());
    let future = admin.run(&["audit", "export", "--since", "2099-01-01T00:00:00Z"]);
    assert_eq!(future.ok().stdout, "");
    let one = admin.run(&["audit", "export", "--instance", "ks-test"]).ok().json_lines();
    assert_eq!(one.len(), all.len());
    let auditor = Admin::new(&ks, &dir.path().join("auditor"), AUDITOR);
    auditor.run(&["audit", "verify"]).ok();

    // An anchor per chain, kept in a file (blank lines and extra fields
    // are fine), and verification through it.
    let anchors = auditor.run(&["audit", "anchor"]).ok().json_lines();
    assert_eq!(anchors.len(), 1, "{anchors:?}");
    let anchor = &anchors[0];
    let seq = anchor["seq"].as_i64().unwrap();
    assert_eq!(anchor["instance"], "ks-test");
    assert!(seq >= 3 && anchor["hash"].as_str().unwrap().len() == 64, "{anchor}");
    assert!(anchor["taken_at"].as_str().unwrap().ends_with('Z'), "{anchor}");
    let file = dir.path().join("anchors.jsonl");
    std::fs::write(&file, format!("{anchor}\n\n{anchor}\n")).unwrap();
    let file_arg = file.to_str().unwrap();
    let through = admin.run(&["audit", "verify", "--anchors", file_arg]);
    assert!(through.ok().stdout.contains("through 1 anchor(s)"), "{}", through.stdout);
    std::fs::write(&file, format!("{anchor}\n{{\"instance\": \"ks-test\"}}\n")).unwrap();
    let malformed = admin.run(&["audit", "verify", "--anchors", file_arg]);
    assert!(malformed.fails(2).contains("line 2: not an anchor"), "{}", malformed.stderr);
    // More anchors than one request takes (the old limit was 10,000): the
    // first part that breaks is the answer, here the first, all anchors of
    // a chain that is gone. (How anchors are split: audit::tests.)
    let gone: String = (1..=60_000)
        .map(|seq| {
            format!("{{\"instance\":\"ks-gone\",\"seq\":{seq},\"hash\":\"{}\"}}\n", "0".repeat(64))
        })
        .collect();
    std::fs::write(&file, format!("{anchor}\n{gone}")).unwrap();
    let many = admin.run(&["audit", "verify", "--anchors", file_arg]);
    let line = many.fails(1);
    assert!(line.contains("instance ks-gone is broken at position 1"), "{line}");
    assert!(line.contains("no chain is stored"), "{line}");
    let missing = admin.run(&["audit", "verify", "--anchors", "/nonexistent/anchors"]);
    assert!(missing.fails(2).contains("--anchors /nonexistent/anchors"));

    // The last event cut together with its checkpoint: the shorter chain
    // verifies alone, not through the anchor.
    let mut db = sqlx::SqliteConnection::connect(&format!("sqlite://{}", ks.database().display()))
        .await
        .unwrap();
    for statement in
        ["DELETE FROM audit_events WHERE seq >= ?", "DELETE FROM audit_checkpoints WHERE seq >= ?"]
    {
        sqlx::query(statement).bind(seq).execute(&mut db).await.unwrap();
    }
    std::fs::write(&file, format!("{anchor}\n")).unwrap();
    admin.run(&["audit", "verify"]).ok();
    let cut = admin.run(&["audit", "verify", "--anchors", file_arg]);
    let line = cut.fails(1);
    assert!(line.contains(&format!("broken at position {seq}")), "{line}");
    assert!(line.contains("past the end of the chain"), "{line}");

    // Edit one event: verification fails with exit 1 and names the place.
    sqlx::query("UPDATE audit_events SET actor = 'spiffe://test/mallory' WHERE seq = 2")
        .execute(&mut db)
        .await
        .unwrap();
    let broken = admin.run(&["audit", "verify"]);
    let line = broken.fails(1);
    assert!(line.contains("instance ks-test is broken at position"), "{line}");
    assert!(broken.stdout.contains("BROKEN"), "{}", broken.stdout);
    let json = admin.run(&["audit", "verify", "-o", "json"]);
    json.fails(1);
    assert_eq!(json.json()["ok"], false);
    // No anchor is taken of a broken log.
    let refused = admin.run(&["audit", "anchor"]);
    assert!(refused.fails(1).contains("no anchor taken"), "{}", refused.stderr);
    assert_eq!(refused.stdout, "");
}

/// An export of every instance goes on page after page to the end: each
/// page resumes after the last line's instance and sequence number, so
/// nothing is repeated or skipped however the pages fall.
#[tokio::test(flavor = "multi_thread")]
async fn audit_export_pages_through_every_instance() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ks, admin) = service(dir.path());
    admin.run(&["tenant", "create", "onc"]).ok();
    admin.run(&["key", "rotate", "--tenant", "onc"]).ok();
    // The same store under a second instance name: a second chain.
    ks.stop();
    let config = dir.path().join("ks/keygate.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("instance = \"ks-test\"", "instance = \"ks-b\"")).unwrap();
    ks.resume();
    admin.run(&["tenant", "create", "t-two"]).ok();
    admin.run(&["key", "rotate", "--tenant", "t-two"]).ok();

    let whole = admin.run(&["audit", "export"]).ok().json_lines();
    let chains: std::collections::BTreeSet<&str> =
        whole.iter().map(|e| e["instance"].as_str().unwrap()).collect();
    assert_eq!(chains.into_iter().collect::<Vec<_>>(), ["ks-b", "ks-test"]);
    for page_size in ["1", "2", "3", "5"] {
        let paged = admin.run(&["audit", "export", "--page-size", page_size]).ok().json_lines();
        assert_eq!(paged, whole, "page size {page_size}");
        let one = admin
            .run(&["audit", "export", "--instance", "ks-test", "--page-size", page_size])
            .ok()
            .json_lines();
        let expected: Vec<&Value> = whole.iter().filter(|e| e["instance"] == "ks-test").collect();
        assert_eq!(one.iter().collect::<Vec<_>>(), expected, "page size {page_size}");
    }
    let filtered =
        admin.run(&["audit", "export", "--tenant", "onc", "--page-size", "1"]).ok().json_lines();
    let expected: Vec<&Value> = whole.iter().filter(|e| e["tenant"] == "onc").collect();
    assert_eq!(filtered.iter().collect::<Vec<_>>(), expected);
    admin.run(&["audit", "export", "--page-size", "0"]).fails(2);

    // The API refuses a cursor into one chain and another at once.
    let (status, body) = ks.get(AUDITOR, "/v1/audit?instance=ks-b&after_instance=ks-b").await;
    assert_eq!(status, 400, "{body}");
}

/// Runs `audit export --cursor FILE ARGS…` and returns its lines.
fn cursor_export(admin: &Admin, cursor: &Path, args: &[&str]) -> Vec<Value> {
    let mut full = vec!["audit", "export", "--cursor", cursor.to_str().unwrap()];
    full.extend_from_slice(args);
    admin.run(&full).ok().json_lines()
}

/// The cursor file's `{instance: {seq, hash}}`.
fn cursor_chains(cursor: &Path) -> Value {
    let stored: Value = serde_json::from_str(&std::fs::read_to_string(cursor).unwrap()).unwrap();
    stored["chains"].clone()
}

/// Where `line` is in its chain, as the cursor records it.
fn place(line: &Value) -> Value {
    json!({"seq": line["seq"], "hash": line["hash"]})
}

/// Each line's (instance, seq).
fn positions(lines: &[Value]) -> Vec<(String, i64)> {
    lines
        .iter()
        .map(|e| (e["instance"].as_str().unwrap().to_owned(), e["seq"].as_i64().unwrap()))
        .collect()
}

/// Restarts the key service under another instance name: the same store,
/// another audit chain.
fn rename_instance(ks: &mut KeyService, dir: &Path, from: &str, to: &str) {
    ks.stop();
    let config = dir.join("ks/keygate.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let (from, to) = (format!("instance = \"{from}\""), format!("instance = \"{to}\""));
    assert!(text.contains(&from), "{text}");
    std::fs::write(&config, text.replace(&from, &to)).unwrap();
    ks.resume();
}

/// A periodic export with a cursor gets every event exactly once: one
/// stored after the last run with an older timestamp (which `--since`
/// misses), and each chain resumed where it was, a new chain from its
/// start; with `--instance`, only that chain's entry moves.
#[tokio::test(flavor = "multi_thread")]
async fn audit_export_cursor_catches_late_events_and_resumes_every_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ks, admin) = service(dir.path());
    admin.run(&["tenant", "create", "onc"]).ok();
    let cursor = dir.path().join("siem/keygate.cursor");
    std::fs::create_dir(dir.path().join("siem")).unwrap();

    // No file yet: every chain from its start.
    let first = cursor_export(&admin, &cursor, &[]);
    assert_eq!(first, admin.run(&["audit", "export"]).ok().json_lines());
    assert_eq!(mode(&cursor), 0o600);
    let (status, heads) = ks.get(AUDITOR, "/v1/audit/heads").await;
    assert_eq!(status, 200, "{heads}");
    let last = first.last().unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&heads).unwrap()["instances"],
        json!([{"instance": "ks-test", "head_seq": last["seq"], "head_hash": last["hash"]}])
    );
    assert_eq!(cursor_chains(&cursor), json!({"ks-test": place(last)}));
    assert_eq!(cursor_export(&admin, &cursor, &[]), Vec::<Value>::new(), "nothing new");

    // A sidecar's report of an access two hours ago, stored only now.
    let late_ts = now_ms() - 2 * 3_600_000;
    let event = json!({"events": [{
        "actor": "spiffe://test/app", "action": "record.decrypt", "tenant": "onc", "kek_version": 1,
        "record_key_ids": ["00112233445566778899aabbccddeeff"], "outcome": "ok",
        "fields": {"/ssn": "masked"}, "ts_ms": late_ts
    }]});
    let (status, body) = ks.post(CLINICAL, "/v1/audit/events", &event).await;
    assert_eq!(status, 200, "{body}");
    let by_time = admin.run(&["audit", "export", "--since", "1h"]).ok().json_lines();
    assert!(by_time.iter().all(|e| e["action"] != "record.decrypt"), "{by_time:?}");
    let late = cursor_export(&admin, &cursor, &[]);
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(
        (&late[0]["action"], &late[0]["ts_ms"]),
        (&json!("record.decrypt"), &json!(late_ts))
    );
    let mut exported = [first, late].concat();

    // A second chain, then new events on both, not yet exported.
    rename_instance(&mut ks, dir.path(), "ks-test", "ks-b");
    admin.run(&["tenant", "create", "t-two"]).ok();
    rename_instance(&mut ks, dir.path(), "ks-b", "ks-test");
    admin.run(&["tenant", "create", "t-three"]).ok();
    let before = cursor_chains(&cursor);
    let b = cursor_export(&admin, &cursor, &["--instance", "ks-b"]);
    assert!(!b.is_empty() && b.iter().all(|e| e["instance"] == "ks-b"), "{b:?}");
    assert_eq!(b[0]["seq"], 1, "a chain the cursor does not know is read from its start");
    let chains = cursor_chains(&cursor);
    assert_eq!(chains["ks-test"], before["ks-test"], "only the chain exported moves");
    assert_eq!(chains["ks-b"], place(b.last().unwrap()));
    let rest = cursor_export(&admin, &cursor, &[]);
    assert!(!rest.is_empty() && rest.iter().all(|e| e["instance"] == "ks-test"), "{rest:?}");
    assert!(rest.iter().any(|e| e["tenant"] == "t-three"), "{rest:?}");
    exported.extend(b);
    exported.extend(rest);

    // Every event once, in no other order than each chain's.
    let mut seen = positions(&exported);
    let mut whole = positions(&admin.run(&["audit", "export"]).ok().json_lines());
    seen.sort();
    whole.sort();
    assert_eq!(seen, whole);
}

/// The cursor records how far each chain was read, not the last line
/// printed, so a filtered-out tail is not read again; a file that is not
/// a cursor, that has read further than a chain now goes, or that read
/// another event than the one now at its place, is refused and left
/// untouched; an export that fails leaves the cursor where it was (and
/// no temporary file), so the next run repeats lines rather than skipping
/// any.
#[test]
fn audit_export_cursor_moves_only_past_what_was_read_and_written() {
    let dir = tempfile::tempdir().unwrap();
    let (_ks, admin) = service(dir.path());
    admin.run(&["tenant", "create", "onc"]).ok();
    admin.run(&["tenant", "create", "t-two"]).ok();
    let whole = admin.run(&["audit", "export"]).ok().json_lines();
    let head = whole.last().unwrap()["seq"].as_i64().unwrap();
    let hash = whole.last().unwrap()["hash"].as_str().unwrap();
    assert_eq!(whole.last().unwrap()["tenant"], "t-two", "{whole:?}");
    let cursor = dir.path().join("onc.cursor");

    let onc = cursor_export(&admin, &cursor, &["--tenant", "onc"]);
    let printed = onc.last().unwrap()["seq"].as_i64().unwrap();
    assert!(printed < head, "the tail is t-two's: {onc:?}");
    assert_eq!(
        cursor_chains(&cursor),
        json!({"ks-test": place(whole.last().unwrap())}),
        "read through the tail, with its hash"
    );
    assert_eq!(cursor_export(&admin, &cursor, &["--tenant", "onc"]), Vec::<Value>::new());

    let export = |args: &[&str]| {
        let mut full = vec!["audit", "export", "--cursor", cursor.to_str().unwrap()];
        full.extend_from_slice(args);
        admin.run(&full)
    };
    let at = |seq: i64, hash: &str| json!({"seq": seq, "hash": hash});
    for (text, code, says) in [
        (json!({"chains": {"ks-test": 3}}).to_string(), 2, "not a cursor file".to_owned()),
        ("garbage\n".to_owned(), 2, "not a cursor file".to_owned()),
        (
            json!({"chains": {"ks-test": at(head + 10, hash)}}).to_string(),
            1,
            format!(
                "instance ks-test through seq {}, but that chain now ends at seq {head}",
                head + 10
            ),
        ),
        (
            json!({"chains": {"ks-test": at(head, hash), "ks-gone": at(4, "04")}}).to_string(),
            1,
            "instance ks-gone through seq 4, but that chain now ends at seq 0".to_owned(),
        ),
        (
            json!({"chains": {"ks-test": at(head, &"0".repeat(64))}}).to_string(),
            1,
            format!("instance ks-test no longer holds the event this cursor read at seq {head}"),
        ),
    ] {
        std::fs::write(&cursor, &text).unwrap();
        let refused = export(&[]);
        assert!(refused.fails(code).contains(&says), "{text}: {}", refused.stderr);
        assert_eq!(refused.stdout, "", "{text}");
        assert_eq!(std::fs::read_to_string(&cursor).unwrap(), text, "left untouched");
    }

    // Stdout cannot be written: the export fails and the cursor stays.
    let kept = json!({"chains": {"ks-test": place(&whole[0])}}).to_string();
    std::fs::write(&cursor, &kept).unwrap();
    let failed = std::process::Command::new(keygate_tests::keyservice::keygate_binary())
        .args([OsStr::new("admin"), OsStr::new("--profile"), admin.profile.as_os_str()])
        .args(["audit", "export", "--cursor", cursor.to_str().unwrap()])
        .env("HOME", &admin.dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot write to stdout"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&cursor).unwrap(), kept);
    assert_eq!(temporary_files(dir.path(), "onc.cursor"), Vec::<String>::new());
    let again = cursor_export(&admin, &cursor, &[]);
    assert_eq!(positions(&again), positions(&whole[1..]), "from where the cursor was");
    assert_eq!(cursor_chains(&cursor), json!({"ks-test": place(whole.last().unwrap())}));
}

/// The temporary files of the cursor `name` in `dir`.
fn temporary_files(dir: &Path, name: &str) -> Vec<String> {
    let prefix = format!(".{name}.");
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix) && n.ends_with(".tmp"))
        .collect()
}

/// The time now, in Unix milliseconds.
fn now_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    i64::try_from(now.as_millis()).unwrap()
}

/// The head of `instance`'s audit chain.
async fn head_seq(ks: &KeyService, instance: &str) -> i64 {
    let (status, body) = ks.get(AUDITOR, "/v1/audit/heads").await;
    assert_eq!(status, 200, "{body}");
    let heads: Value = serde_json::from_str(&body).unwrap();
    let head = heads["instances"].as_array().unwrap().iter().find(|h| h["instance"] == instance);
    head.map_or(0, |h| h["head_seq"].as_i64().unwrap())
}

/// A keystore restored from a backup older than the cursor, whose chain
/// then takes the places the cursor had read again with new events, is
/// refused (with the chain's head back where the cursor was, and past
/// it): nothing exported, the file left byte for byte. Without the
/// chain's entry, the chain is exported again from its start.
#[tokio::test(flavor = "multi_thread")]
async fn audit_export_cursor_refuses_a_chain_rewritten_under_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ks, admin) = service(dir.path());
    admin.run(&["tenant", "create", "onc"]).ok();
    let backup = dir.path().join("backup.sqlite3");
    let url = format!("sqlite://{}", ks.database().display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("VACUUM INTO ?").bind(backup.to_str().unwrap()).execute(&mut db).await.unwrap();
    db.close().await.unwrap();
    admin.run(&["tenant", "create", "t-two"]).ok();
    admin.run(&["key", "rotate", "--tenant", "onc"]).ok();
    let cursor = dir.path().join("siem.cursor");
    cursor_export(&admin, &cursor, &[]);
    let read = cursor_chains(&cursor)["ks-test"]["seq"].as_i64().unwrap();
    let kept = std::fs::read(&cursor).unwrap();

    ks.stop();
    for suffix in ["", "-wal", "-shm"] {
        let file = format!("{}{suffix}", ks.database().display());
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{file}: {e}"),
            _ => {}
        }
    }
    std::fs::copy(&backup, ks.database()).unwrap();
    ks.resume();
    let restored = head_seq(&ks, "ks-test").await;
    assert!(restored < read, "the backup ends at {restored}, the cursor at {read}");

    let event = json!({
        "actor": "spiffe://test/app", "action": "record.decrypt", "tenant": "onc",
        "kek_version": 1, "record_key_ids": ["00112233445566778899aabbccddeeff"],
        "outcome": "ok", "fields": {"/ssn": "masked"}, "ts_ms": now_ms()
    });
    for target in [read, read + 3] {
        let missing = usize::try_from(target - head_seq(&ks, "ks-test").await).unwrap();
        let events = json!({"events": vec![event.clone(); missing]});
        let (status, body) = ks.post(CLINICAL, "/v1/audit/events", &events).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(head_seq(&ks, "ks-test").await, target);
        let refused = admin.run(&[
            "audit",
            "export",
            "--cursor",
            cursor.to_str().unwrap(),
            "--tenant",
            "onc",
        ]);
        let line = refused.fails(1);
        assert!(
            line.contains(&format!(
                "instance ks-test no longer holds the event this cursor read at seq {read} \
                 (another event is there now)"
            )),
            "{line}"
        );
        assert!(line.contains("restored from a backup or failed over"), "{line}");
        assert_eq!(refused.stdout, "");
        assert_eq!(std::fs::read(&cursor).unwrap(), kept, "left byte for byte");
        assert_eq!(temporary_files(dir.path(), "siem.cursor"), Vec::<String>::new());
    }

    std::fs::write(&cursor, "{\"chains\": {}}").unwrap();
    let again = cursor_export(&admin, &cursor, &[]);
    assert_eq!(positions(&again), positions(&admin.run(&["audit", "export"]).ok().json_lines()));
}

/// A cursor that cannot be written fails before any line is exported
/// (exit 2), and a second run while one holds the cursor is refused at
/// once (exit 1); the first goes on and moves the cursor.
#[test]
fn audit_export_cursor_fails_first_when_unwritable_or_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let (ks, admin) = service(dir.path());
    admin.run(&["tenant", "create", "onc"]).ok();

    // A directory where no file can be made, even by root.
    let unwritable = admin.run(&["audit", "export", "--cursor", "/proc/keygate-test.cursor"]);
    let line = unwritable.fails(2);
    assert!(line.contains("--cursor /proc/keygate-test.cursor: cannot lock it"), "{line}");
    assert_eq!(unwritable.stdout, "", "nothing exported");

    // A first run waits for the stopped key service, holding the cursor
    // from the moment its temporary file is there.
    let cursor = dir.path().join("siem.cursor");
    let pid = ks.pid().unwrap();
    let signal = |name: &str| keygate_tests::keyservice::signal(pid, name);
    signal("STOP");
    let first = std::process::Command::new(keygate_tests::keyservice::keygate_binary())
        .args([OsStr::new("admin"), OsStr::new("--profile"), admin.profile.as_os_str()])
        .args(["audit", "export", "--cursor", cursor.to_str().unwrap()])
        .env("HOME", &admin.dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while temporary_files(dir.path(), "siem.cursor").is_empty() {
        assert!(std::time::Instant::now() < deadline, "the first run never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let second = admin.run(&["audit", "export", "--cursor", cursor.to_str().unwrap()]);
    signal("CONT");
    let line = second.fails(1);
    assert!(line.contains("is in use: another run of audit export --cursor holds it"), "{line}");
    assert_eq!(second.stdout, "");
    let first = first.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    let lines = String::from_utf8_lossy(&first.stdout).lines().count();
    assert!(lines > 0 && cursor.exists(), "{stderr}");
    assert_eq!(temporary_files(dir.path(), "siem.cursor"), Vec::<String>::new());
}

#[test]
fn policy_check_is_local_and_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let check = |file: &Path, json: bool| {
        let mut args =
            vec![OsStr::new("admin"), OsStr::new("policy"), OsStr::new("check"), file.as_os_str()];
        if json {
            args.extend([OsStr::new("--output"), OsStr::new("json")]);
        }
        keygate(&args, home, &[], None)
    };
    let good = dir.path().join("policy.toml");
    std::fs::write(&good, TEST_POLICY).unwrap();
    let grants = TEST_POLICY.matches("[[grant]]").count();
    let ok = check(&good, false);
    let out = &ok.ok().stdout;
    let summary = format!("{grants} grant(s) for {grants} identity pattern(s)");
    assert!(out.starts_with("OK: ") && out.contains(&summary), "{out}");
    assert!(
        out.contains("spiffe://test/sidecar-contact") && out.contains("phi.identifier"),
        "{out}"
    );
    let json = check(&good, true).ok().json();
    assert_eq!(json["grants"].as_array().unwrap().len(), grants);

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, format!("{TEST_POLICY}\n[[grant]]\nidentity = \"spiffe://x\"\ntenants = [\"*\"]\nroles = [\"decrypter\"]\n")).unwrap();
    let line_no = TEST_POLICY.lines().count() + 5;
    let invalid = check(&bad, false);
    let line = invalid.fails(2);
    assert!(line.contains(&format!("line {line_no}")) && line.contains("decrypter"), "{line}");
    std::fs::write(
        &bad,
        "[[grant]]\nidentity = \"spiffe://x\"\ntenants = [\"*\"\nroles = [\"admin\"]\n",
    )
    .unwrap();
    let syntax = check(&bad, false);
    assert!(syntax.fails(2).contains("line "), "{syntax:?}");
    check(&dir.path().join("absent.toml"), false).fails(2);
}

#[test]
fn pki_init_and_issue_make_certificates_a_key_service_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let home = dir.path();
    let run = |args: &[&str]| {
        let mut full = vec![OsStr::new("admin"), OsStr::new("pki")];
        full.extend(args.iter().map(OsStr::new));
        keygate(&full, home, &[], None)
    };
    let dir_arg = pki.to_str().unwrap();
    run(&["init", "--dir", dir_arg]).ok();
    assert_eq!(mode(&pki), 0o700);
    assert_eq!(mode(&pki.join("ca.key")), 0o600);
    assert_eq!(mode(&pki.join("server.key")), 0o600);
    assert!(run(&["init", "--dir", dir_arg]).fails(2).contains("already holds a CA"));
    let issued =
        run(&["issue", "--dir", dir_arg, "--identity", ADMIN, "--out", "admin", "-o", "json"]);
    assert_eq!(issued.ok().json()["identity"], ADMIN);
    assert_eq!(mode(&pki.join("admin.key")), 0o600);
    run(&["issue", "--dir", dir_arg, "--identity", AUDITOR]).ok(); // default name: last segment
    assert_eq!(mode(&pki.join("auditor.key")), 0o600);
    run(&["issue", "--dir", dir_arg, "--identity", ADMIN]).fails(2); // admin.crt exists
    run(&["issue", "--dir", dir_arg, "--identity", ADMIN, "--out", "admin"]).fails(2);
    run(&["issue", "--dir", dir_arg, "--identity", "not a uri"]).fails(2);
    run(&["issue", "--dir", dir_arg, "--identity", ADMIN, "--out", "../escape"]).fails(2);
    run(&["issue", "--dir", dir.path().join("nope").to_str().unwrap(), "--identity", ADMIN])
        .fails(2);
    let leaky = dir.path().join("leaky");
    std::fs::create_dir_all(&leaky).unwrap();
    std::fs::copy(pki.join("ca.crt"), leaky.join("ca.crt")).unwrap();
    std::fs::copy(pki.join("ca.key"), leaky.join("ca.key")).unwrap();
    std::fs::set_permissions(leaky.join("ca.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let line = run(&["issue", "--dir", leaky.to_str().unwrap(), "--identity", ADMIN]);
    assert!(line.fails(2).contains("chmod 600"), "{line:?}");

    // A key service serving pki/server.crt and trusting pki/ca.crt (swapped
    // in while it runs: it reloads changed TLS files) accepts the issued
    // admin certificate.
    let ks = KeyService::start(&dir.path().join("ks"), "");
    for name in ["ca.crt", "server.crt", "server.key"] {
        std::fs::copy(pki.join(name), ks.pki.dir.join(name)).unwrap();
    }
    let args = [
        "admin",
        "--url",
        &ks.url,
        "--ca",
        &format!("{dir_arg}/ca.crt"),
        "--cert",
        &format!("{dir_arg}/admin.crt"),
        "--key",
        &format!("{dir_arg}/admin.key"),
        "tenant",
        "create",
        "onc",
    ];
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let run = keygate(&args, home, &[], None);
        if run.code == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never accepted: {run:?}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

#[test]
fn help_examples_exit_codes_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        keygate(&args, dir.path(), &[], None)
    };
    let help = run(&["admin", "--help"]);
    let out = &help.ok().stdout;
    assert!(out.contains("Exit codes:") && out.contains("3  unavailable"), "{out}");
    for path in [
        &["tenant"][..],
        &["tenant", "create"],
        &["tenant", "list"],
        &["tenant", "show"],
        &["key"],
        &["key", "rotate"],
        &["key", "list"],
        &["key", "state"],
        &["key", "usage"],
        &["key", "auto-rotate"],
        &["master"],
        &["master", "show"],
        &["master", "rotate"],
        &["master", "create-pkcs11-key"],
        &["shred"],
        &["shred", "request"],
        &["approvals"],
        &["approvals", "list"],
        &["approve"],
        &["reject"],
        &["rewrap"],
        &["audit"],
        &["audit", "verify"],
        &["audit", "export"],
        &["policy"],
        &["policy", "check"],
        &["pki"],
        &["pki", "init"],
        &["pki", "issue"],
        &["compliance"],
        &["compliance", "report"],
    ] {
        let mut args = vec!["admin"];
        args.extend_from_slice(path);
        args.push("--help");
        let help = run(&args);
        assert!(help.ok().stdout.contains("Example: keygate admin"), "{path:?}:\n{}", help.stdout);
    }
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&["completions", shell]);
        let out = &script.ok().stdout;
        assert!(
            out.len() > 1000 && out.contains("rewrap") && out.contains("auto-rotate"),
            "{shell}"
        );
    }
    run(&["completions", "tcsh"]).fails(2);
}

fn patient(i: usize) -> Value {
    json!({
        "name": format!("Patient {i}"), "ssn": format!("123-45-{i:04}"), "mrn": format!("MRN-{i:06}"),
        "email": format!("p{i}@example.org"), "diagnosis": {"code": "C50.9", "stage": i % 4},
        "patient_id": format!("P-{i}"), "allergies": ["latex", {"substance": "nuts", "severity": 2.5}],
        "age": 30 + i,
    })
}

async fn encrypt(sc: &Sidecar, tenant: &str, count: usize) -> Vec<Value> {
    let records: Vec<Value> = (0..count).map(patient).collect();
    let (status, body) = sc
        .post("/v1/encrypt", &json!({"tenant": tenant, "schema": "patient", "records": records}))
        .await;
    assert_eq!(status, 200, "{body}");
    body["records"].as_array().unwrap().clone()
}

fn jsonl(records: &[Value]) -> Vec<u8> {
    records.iter().map(|r| format!("{r}\n")).collect::<String>().into_bytes()
}

/// Records as a store may hold them: with members the sidecar does not
/// protect, written as serde_json would not print them back (an integer
/// past f64, a trailing zero, an exponent, spacing, keys out of order).
fn stored_lines(records: &[Value]) -> Vec<String> {
    let unprotected = r#"{"zeta" : 1e3, "acct":123456789012345678901234,"amount":12.30,"#;
    records.iter().map(|r| format!("{unprotected}{}", &r.to_string()[1..])).collect()
}

fn as_input(lines: &[String]) -> String {
    lines.iter().map(|line| format!("{line}\n")).collect()
}

/// Each output line is its input line with only the `_kg` header changed.
fn only_the_header_changed(input: &[String], output: &str) {
    let output: Vec<&str> = output.lines().collect();
    assert_eq!(input.len(), output.len());
    for (old, new) in input.iter().zip(output) {
        let header = |line: &str| {
            let record: Value = serde_json::from_str(line).unwrap();
            record["_kg"].as_str().unwrap().to_owned()
        };
        assert_eq!(old.replace(&header(old), &header(new)), new, "byte for byte but the header");
    }
}

fn version(record: &Value) -> u32 {
    RecordHeader::parse(record["_kg"].as_str().unwrap()).unwrap().kek_version()
}

fn same_fields(a: &Value, b: &Value) {
    let (a, b) = (a.as_object().unwrap(), b.as_object().unwrap());
    assert_eq!(a.len(), b.len());
    for (key, value) in a.iter().filter(|(k, _)| *k != "_kg") {
        assert_eq!(Some(value), b.get(key), "{key} must be byte-identical");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rewrap_moves_records_to_the_active_version_through_a_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let (ks, admin) = service(dir.path());
    admin.run(&["tenant", "create", "onc"]).ok();
    admin.run(&["tenant", "create", "t-other"]).ok();
    let sc = Sidecar::start(&ks, &dir.path().join("sidecar"), CLINICAL, "");
    let socket = format!("unix://{}", sc.socket.display());
    let v1 = encrypt(&sc, "onc", 7).await;
    let other = encrypt(&sc, "t-other", 1).await;
    assert!(v1.iter().all(|r| version(r) == 1));
    admin.run(&["key", "rotate", "--tenant", "onc"]).ok();

    let rewrap = |input: &[u8], extra: &[&str]| {
        let mut args =
            vec!["rewrap", "--tenant", "onc", "--sidecar", &socket, "--progress-every", "0"];
        args.extend_from_slice(extra);
        admin.run_with_stdin(&args, Some(input))
    };
    let mut input = jsonl(&v1);
    input.extend_from_slice(b"\n"); // blank lines are skipped
    let run = rewrap(&input, &["--batch", "3"]);
    assert_eq!(run.ok().stderr.trim(), "rewrap: done: 7 records read, 7 rewrapped, 0 unchanged");
    let v2 = run.json_lines();
    assert_eq!(v2.len(), 7);
    for (old, new) in v1.iter().zip(&v2) {
        assert_eq!(version(new), 2);
        assert_ne!(old["_kg"], new["_kg"]);
        same_fields(old, new);
    }
    // What the sidecar does not change passes through as it was written;
    // a record already on the active version, wholly.
    let stored = stored_lines(&v1);
    let run = rewrap(as_input(&stored).as_bytes(), &[]);
    only_the_header_changed(&stored, &run.ok().stdout);
    let stored_v2: Vec<String> = run.stdout.lines().map(str::to_owned).collect();
    let again = rewrap(as_input(&stored_v2).as_bytes(), &[]);
    assert_eq!(again.ok().stdout, run.stdout);

    // Already on v2: unchanged, byte for byte; mixed input counts both.
    let mut mixed = v2[..3].to_vec();
    mixed.extend_from_slice(&v1[3..]);
    let run = rewrap(&jsonl(&mixed), &[]);
    assert!(run.ok().stderr.contains("7 records read, 4 rewrapped, 3 unchanged"), "{}", run.stderr);
    let out = run.json_lines();
    assert_eq!(&out[..3], &v2[..3]);
    assert!(out.iter().all(|r| version(r) == 2));

    // The rewrapped records decrypt to the original values.
    let (status, body) = sc.post("/v1/decrypt", &json!({"records": v2})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["records"][4]["diagnosis"], patient(4)["diagnosis"]);
    assert_eq!(body["records"][4]["ssn"], patient(4)["ssn"]);
    assert_eq!(body["report"][4]["kek_version"], 2);

    // Malformed line 5 with batches of 2: lines 1–4 are written, whole.
    let mut bad = jsonl(&v1[..4]);
    bad.extend_from_slice(b"{\"_kg\": oops\n");
    bad.extend_from_slice(&jsonl(&v1[4..]));
    let run = rewrap(&bad, &["--batch", "2"]);
    let line = run.fails(2);
    assert!(line.starts_with("error: line 5: not valid JSON"), "{line}");
    let written = run.json_lines();
    assert_eq!(written.len(), 4);
    assert!(written.iter().all(|r| version(r) == 2));

    // Another tenant's record at line 3; a non-object; a plain record.
    let mut foreign = jsonl(&v1[..2]);
    foreign.extend_from_slice(&jsonl(&other));
    let run = rewrap(&foreign, &[]);
    assert_eq!(run.fails(2), "error: line 3: the record belongs to tenant t-other, not onc");
    assert_eq!(run.stdout.lines().count(), 2, "lines before the bad one are written");
    assert!(rewrap(b"[1,2]\n", &[]).fails(2).starts_with("error: line 1: not a JSON object"));
    let plain = rewrap(format!("{}\n", patient(1)).as_bytes(), &[]);
    assert!(plain.fails(2).contains("line 1: not an encrypted record"));
    let tampered = rewrap(b"{\"_kg\":\"kg1h:AAAA\"}\n", &[]);
    assert!(tampered.fails(2).contains("line 1: the _kg header"));

    // A batch the sidecar refuses for one record names that record's line.
    admin.run(&["key", "state", "--tenant", "onc", "--version", "1", "disable"]).ok();
    let mut one_old = jsonl(&v2[..2]);
    one_old.extend_from_slice(b"\n");
    one_old.extend_from_slice(&jsonl(&v1[2..3]));
    let run = rewrap(&one_old, &[]);
    let line = run.fails(1);
    assert!(
        line.contains("lines 1-4: the sidecar refused line 4: records[2]:")
            && line.contains("(key_version_disabled)"),
        "{line}"
    );

    // No sidecar there: exit 3.
    let gone = format!("unix://{}", dir.path().join("absent.sock").display());
    let run = admin
        .run_with_stdin(&["rewrap", "--tenant", "onc", "--sidecar", &gone], Some(&jsonl(&v1[..1])));
    assert!(run.fails(3).contains("cannot reach the sidecar"), "{run:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rewrap_presents_the_sidecar_token() {
    let dir = tempfile::tempdir().unwrap();
    let (ks, admin) = service(dir.path());
    admin.run(&["tenant", "create", "onc"]).ok();
    let sc_dir = dir.path().join("sidecar");
    std::fs::create_dir_all(&sc_dir).unwrap();
    keygate_tests::keyservice::write_private(
        &sc_dir.join("token"),
        "a-long-enough-sidecar-token-0123\n",
    );
    let sc = Sidecar::start(&ks, &sc_dir, CLINICAL, "token_file = \"token\"\n");
    let records = {
        let client = reqwest::Client::builder().unix_socket(sc.socket.clone()).build().unwrap();
        let body: Value = client
            .post("http://localhost/v1/encrypt")
            .bearer_auth("a-long-enough-sidecar-token-0123")
            .json(
                &json!({"tenant": "onc", "schema": "patient", "records": [patient(1), patient(2)]}),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["records"].as_array().unwrap().clone()
    };
    admin.run(&["key", "rotate", "--tenant", "onc"]).ok();
    let socket = format!("unix://{}", sc.socket.display());
    let input = jsonl(&records);
    let args = ["rewrap", "--tenant", "onc", "--sidecar", &socket, "--progress-every", "0"];
    let refused = admin.run_with_stdin(&args, Some(&input));
    let line = refused.fails(1);
    assert!(
        line.contains("lines 1-2: the sidecar refused") && line.contains("(unauthorized)"),
        "{line}"
    );
    assert_eq!(refused.stdout, "");
    let token = sc_dir.join("token");
    let mut with_token = args.to_vec();
    with_token.extend(["--token-file", token.to_str().unwrap()]);
    let run = admin.run_with_stdin(&with_token, Some(&input));
    assert_eq!(run.ok().json_lines().len(), 2);
    assert!(!run.stderr.contains("a-long-enough"), "the token is never printed");
    let missing = ["--token-file", "/nonexistent/token"];
    let mut bad = args.to_vec();
    bad.extend(missing);
    admin.run_with_stdin(&bad, Some(&input)).fails(2);
}
