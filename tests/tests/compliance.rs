//! Compliance as code (issue #9): `--profile production` refuses every
//! insecure configuration with the rule and HIPAA provision named; a good
//! production configuration starts and `GET /v1/compliance` reports it;
//! started processes have core dumps off.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use std::ffi::OsStr;
use std::path::Path;

use gateway::pki::{DevCa, Validity};
use keygate_tests::cluster::{PgSchema, pg_url};
use keygate_tests::keyservice::{
    KEY_SERVICE_IDENTITY, KeyService, Options, Pki, run_to_exit, write_private,
};
use keygate_tests::providers::softhsm2::{self, SoftHsm2};
use keygate_tests::sidecar::{Sidecar, Transport};
use serde_json::Value;

const ADMIN: &str = "spiffe://test/admin";
const AUDITOR: &str = "spiffe://test/auditor";
const ENC: &str = "spiffe://test/encryptor";
const SIDECAR: &str = "spiffe://test/sidecar-clinical";

/// A policy without wildcard data access, every-class or every-role grants.
const PRODUCTION_POLICY: &str = r#"
[[grant]]
identity = "spiffe://test/admin"
tenants = ["*"]
roles = ["admin", "auditor"]

[[grant]]
identity = "spiffe://test/auditor"
tenants = ["*"]
roles = ["auditor"]

[[grant]]
identity = "spiffe://test/encryptor"
tenants = ["onc"]
roles = ["encryptor"]

[[grant]]
identity = "spiffe://test/sidecar-clinical"
tenants = ["onc", "t-*"]
roles = ["encryptor", "decryptor"]
classes = ["phi.*", "pii.*"]
purposes = ["*"]
"#;

/// A waiting period between a shred's approval and its execution that the
/// production profile accepts.
const PRODUCTION_LIFECYCLE: &str = "[lifecycle]\nshred_delay_secs = 86400\n";

/// The wildcard grant the development test policy has.
const WILDCARD_GRANT: &str = "\n[[grant]]\nidentity = \"spiffe://test/reader\"\ntenants = [\"*\"]\nroles = [\"decryptor\"]\nclasses = [\"*\"]\npurposes = [\"*\"]\n";

/// Files of a production key service config that passes every check (its
/// PKCS#11 module does not exist: a start gets past the checks and then
/// fails connecting the root key).
fn write_server(
    dir: &Path,
    extra_top: &str,
    extra_tables: &str,
    policy: &str,
) -> std::path::PathBuf {
    let pki = Pki::create(&dir.join("pki"));
    write_private(&dir.join("pin"), "0000");
    std::fs::write(dir.join("policy.toml"), policy).unwrap();
    let config = format!(
        r#"{extra_top}
listen = "127.0.0.1:0"
data_dir = "data"
[tls]
cert = "{pki}/server.crt"
key = "{pki}/server.key"
client_ca = "{pki}/ca.crt"
[root]
provider = "pkcs11"
module = "/nonexistent/libpkcs11.so"
token_label = "t"
key_label = "k"
pin_file = "pin"
[policy]
file = "policy.toml"
{lifecycle}
{extra_tables}
"#,
        pki = pki.dir.display(),
        lifecycle = if extra_tables.contains("[lifecycle]") { "" } else { PRODUCTION_LIFECYCLE },
    );
    let path = dir.join("keygate.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Runs `keygate <command> --config <config> [--profile production]`
/// until it exits; returns (success, stderr).
fn run_once(command: &str, config: &Path, production_flag: bool) -> (bool, String) {
    run_once_with(command, config, production_flag, &[])
}

/// [`run_once`] with environment variables for the process.
fn run_once_with(
    command: &str,
    config: &Path,
    production_flag: bool,
    env: &[(&str, &str)],
) -> (bool, String) {
    let mut args = vec![OsStr::new(command), OsStr::new("--config"), config.as_os_str()];
    if production_flag {
        args.extend([OsStr::new("--profile"), OsStr::new("production")]);
    }
    run_to_exit(&args, env)
}

fn assert_refused(stderr: &str, rule: &str, provision: &str) {
    assert!(stderr.contains("production profile refuses to start"), "{stderr}");
    assert!(stderr.contains(&format!("[{rule}] violates HIPAA 45 CFR {provision}")), "{stderr}");
}

/// How many rules the final error line (`keygate: …`) names.
fn rules_named(stderr: &str) -> usize {
    stderr
        .lines()
        .filter(|l| l.starts_with("keygate: "))
        .map(|l| l.matches("violates HIPAA").count())
        .sum()
}

#[test]
fn insecure_key_service_configs_are_refused_naming_the_rule() {
    // The base configuration passes every check: the start fails later, at
    // the (absent) PKCS#11 module, not at compliance.
    let base = tempfile::tempdir().unwrap();
    let config = write_server(base.path(), "", "", PRODUCTION_POLICY);
    let (ok, stderr) = run_once("server", &config, true);
    assert!(!ok && !stderr.contains("production profile refuses"), "{stderr}");
    assert!(stderr.contains("root key (pkcs11)"), "{stderr}");

    let cases: Vec<(&str, &str, &str, &str, &str)> = vec![
        // (rule, provision, top-level TOML, tables, policy addition)
        (
            "keys.rotation_period",
            "164.312(a)(1)",
            "",
            "[keys]\nmax_rotation_period_days = 400\n",
            "",
        ),
        ("policy.least_privilege", "164.312(a)(1)", "", "", WILDCARD_GRANT),
        ("integrity.shred_delay", "164.312(c)(1)", "", "[lifecycle]\nshred_delay_secs = 60\n", ""),
        (
            "integrity.audit_checkpoints",
            "164.312(c)(1)",
            "",
            "[audit]\ncheckpoint_interval_secs = 86400\n",
            "",
        ),
        (
            "transmission.keystore_tls",
            "164.312(e)(1)",
            "storage_url = \"postgres://keygate@db.internal:5432/keygate\"",
            "",
            "",
        ),
        (
            // Read as the store connects: the `host` parameter wins.
            "transmission.keystore_tls",
            "164.312(e)(1)",
            "storage_url = \"postgres://keygate@localhost:5432/keygate?host=db.internal\"",
            "",
            "",
        ),
        (
            // The last `sslmode` wins, whatever the password says.
            "transmission.keystore_tls",
            "164.312(e)(1)",
            "storage_url = \"postgres://keygate:sslmode=verify-full@db.internal/keygate?sslmode=verify-full&sslmode=prefer\"",
            "",
            "",
        ),
    ];
    for (rule, provision, top, tables, grant) in cases {
        let dir = tempfile::tempdir().unwrap();
        let config = write_server(dir.path(), top, tables, &format!("{PRODUCTION_POLICY}{grant}"));
        let (ok, stderr) = run_once("server", &config, true);
        assert!(!ok, "{rule}: started");
        assert_refused(&stderr, rule, provision);
        // Only the broken rule is named.
        assert_eq!(rules_named(&stderr), 1, "{stderr}");
        // The development profile starts past the checks (and fails later
        // at the absent module).
        let (_, stderr) = run_once("server", &config, false);
        assert!(!stderr.contains("production profile refuses"), "{rule}: {stderr}");
    }

    // A local development root key; and the profile set in the file.
    let dir = tempfile::tempdir().unwrap();
    let config = write_server(dir.path(), "profile = \"production\"", "", PRODUCTION_POLICY);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "provider = \"pkcs11\"\nmodule = \"/nonexistent/libpkcs11.so\"\ntoken_label = \"t\"\nkey_label = \"k\"\npin_file = \"pin\"",
        "provider = \"dev_local\"\nkey_file = \"root.key\"\ncreate_if_missing = true",
    );
    std::fs::write(&config, text).unwrap();
    let (ok, stderr) = run_once("server", &config, false);
    assert!(!ok);
    assert_refused(&stderr, "root_key.hardware_backed", "164.312(a)(1)");
    assert!(stderr.contains("files.private_keys"), "the key file does not exist yet: {stderr}");
    assert!(!dir.path().join("root.key").exists(), "refused before anything is created");

    // Group/world-readable TLS key and PIN file.
    let dir = tempfile::tempdir().unwrap();
    let config = write_server(dir.path(), "", "", PRODUCTION_POLICY);
    set_mode(&dir.path().join("pki/server.key"), 0o644);
    set_mode(&dir.path().join("pin"), 0o640);
    let (ok, stderr) = run_once("server", &config, true);
    assert!(!ok);
    assert_refused(&stderr, "files.private_keys", "164.312(a)(1)");
    assert!(
        stderr.contains("server.key is mode 644") && stderr.contains("pin is mode 640"),
        "{stderr}"
    );

    // An empty client CA bundle: nobody could be authenticated.
    let dir = tempfile::tempdir().unwrap();
    let config = write_server(dir.path(), "", "", PRODUCTION_POLICY);
    std::fs::write(dir.path().join("pki/ca.crt"), "").unwrap();
    let (ok, stderr) = run_once("server", &config, true);
    assert!(!ok);
    assert_refused(&stderr, "authentication.client_certificates", "164.312(d)");

    // Certificates of a keygate development CA (`keygate up`, `keygate
    // admin pki`), whose key sits in a file: as the client CA, or as the
    // CA that issued the server's certificate.
    let development = DevCa::generate("keygate up development CA").unwrap();
    for file in ["ca.crt", "server.crt"] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_server(dir.path(), "", "", PRODUCTION_POLICY);
        if file == "ca.crt" {
            std::fs::write(dir.path().join("pki/ca.crt"), development.cert_pem()).unwrap();
        } else {
            let server = development.issue_server(&["localhost"], Validity::days(30)).unwrap();
            std::fs::write(dir.path().join("pki/server.crt"), &server.cert_pem).unwrap();
            write_private(&dir.path().join("pki/server.key"), &server.key_pem);
        }
        let (ok, stderr) = run_once("server", &config, true);
        assert!(!ok, "{file}: started");
        assert_refused(&stderr, "tls.development_pki", "164.312(d)");
        assert_eq!(rules_named(&stderr), 1, "{stderr}");
        assert!(stderr.contains(&format!("pki/{file}")), "{stderr}");
        let (_, stderr) = run_once("server", &config, false);
        assert!(!stderr.contains("production profile refuses"), "{file}: {stderr}");
    }

    // The keystore and audit chain in memory (tmpfs), where there is one.
    if Path::new("/dev/shm").is_dir() {
        let dir = tempfile::tempdir().unwrap();
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let config = write_server(dir.path(), "", "", PRODUCTION_POLICY);
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("data_dir = \"data\"", &format!("data_dir = \"{}\"", shm.path().display()));
        std::fs::write(&config, text).unwrap();
        let (ok, stderr) = run_once("server", &config, true);
        if stderr.contains("tmpfs") {
            assert!(!ok);
            assert_refused(&stderr, "audit.durable", "164.312(b)");
        }
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn insecure_sidecar_configs_are_refused_naming_the_rule() {
    let pinned = format!("server_identity = \"{KEY_SERVICE_IDENTITY}\"\n");
    let cases = [
        ("authentication.key_service_identity", "164.312(d)", "", ""),
        ("transmission.key_service_tls", "164.312(e)(1)", "", "urls = [\"http://127.0.0.1:1\"]"),
        ("authentication.app_callers", "164.312(d)", "listen = { tcp = \"127.0.0.1:0\" }", ""),
        ("audit.field_events", "164.312(b)", "", "[audit]\nmax_unreported_secs = 3600"),
        ("keys.revocation_bound", "164.312(a)(1)", "", "[cache]\nttl_secs = 3600"),
    ];
    for (rule, provision, top, table) in cases {
        let dir = tempfile::tempdir().unwrap();
        write_private(&dir.path().join("sidecar.key"), "not used");
        let urls = if table.starts_with("urls") { "" } else { "urls = [\"https://127.0.0.1:1\"]" };
        let (ks_extra, tables) = if table.starts_with("urls") { (table, "") } else { ("", table) };
        // Pinned but where the case is the pin's own.
        let pin = if rule == "authentication.key_service_identity" { "" } else { &pinned };
        let config = format!(
            "{top}\nschemas = []\n[key_service]\n{pin}{urls}{ks_extra}\nca = \"ca.crt\"\ncert = \"sidecar.crt\"\nkey = \"sidecar.key\"\n{tables}\n"
        );
        let path = dir.path().join("sidecar.toml");
        std::fs::write(&path, config).unwrap();
        let (ok, stderr) = run_once("sidecar", &path, true);
        assert!(!ok, "{rule}");
        assert_refused(&stderr, rule, provision);
        assert_eq!(rules_named(&stderr), 1, "{stderr}");
    }
    // A readable client key.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sidecar.key"), "not used").unwrap();
    set_mode(&dir.path().join("sidecar.key"), 0o644);
    let path = dir.path().join("sidecar.toml");
    std::fs::write(&path, format!("schemas = []\n[key_service]\n{pinned}urls = [\"https://127.0.0.1:1\"]\nca = \"ca.crt\"\ncert = \"sidecar.crt\"\nkey = \"sidecar.key\"\n")).unwrap();
    let (ok, stderr) = run_once("sidecar", &path, true);
    assert!(!ok);
    assert_refused(&stderr, "files.private_keys", "164.312(a)(1)");

    // The key service's CA (and the sidecar's certificate) from a keygate
    // development CA.
    let dir = tempfile::tempdir().unwrap();
    let development = DevCa::generate("keygate development CA").unwrap();
    let cert = development.issue_client(SIDECAR, Validity::days(30)).unwrap();
    std::fs::write(dir.path().join("ca.crt"), development.cert_pem()).unwrap();
    std::fs::write(dir.path().join("sidecar.crt"), &cert.cert_pem).unwrap();
    write_private(&dir.path().join("sidecar.key"), &cert.key_pem);
    let path = dir.path().join("sidecar.toml");
    std::fs::write(&path, format!("schemas = []\n[key_service]\n{pinned}urls = [\"https://127.0.0.1:1\"]\nca = \"ca.crt\"\ncert = \"sidecar.crt\"\nkey = \"sidecar.key\"\n")).unwrap();
    let (ok, stderr) = run_once("sidecar", &path, true);
    assert!(!ok);
    assert_refused(&stderr, "tls.development_pki", "164.312(d)");
    assert_eq!(rules_named(&stderr), 1, "{stderr}");
    assert!(stderr.contains("key_service.cert") && stderr.contains("key_service.ca"), "{stderr}");
}

/// `/proc/<pid>/limits` says no core file may be written.
fn assert_core_limit_zero(pid: u32) {
    let Ok(limits) = std::fs::read_to_string(format!("/proc/{pid}/limits")) else {
        return; // not readable (another user's non-dumpable process)
    };
    let line = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{line}");
}

/// A non-dumpable process's `/proc/<pid>` files belong to root.
fn assert_not_dumpable(pid: u32) {
    use std::os::unix::fs::MetadataExt;
    if let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/status")) {
        assert_eq!(meta.uid(), 0, "/proc/{pid}/status is root's: the process is not dumpable");
    }
}

/// The process restarted itself (same pid) with the allocator option that
/// keeps freed memory from staying locked and resident.
fn assert_allocates_from_the_os(pid: u32) {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return; // not readable (another user's non-dumpable process)
    };
    let wanted = format!(
        "{}={}",
        gateway::hygiene::ALLOCATOR_ENV,
        gateway::hygiene::ALLOCATOR_ARENA_MAX_KIB
    );
    assert!(
        environ.split(|b| *b == 0).any(|var| var == wanted.as_bytes()),
        "{wanted} in the environment of {pid}"
    );
}

/// A key service directory in `dir` (`ks/`, returned with its `[root]`
/// section and the `SOFTHSM2_CONF` path) with the production policy, a PIN
/// file and a master key created in `token` by the CLI.
fn hsm_key_service_dir(
    token: &SoftHsm2,
    dir: &Path,
) -> (std::path::PathBuf, String, std::path::PathBuf) {
    let ks_dir = dir.join("ks");
    std::fs::create_dir_all(&ks_dir).unwrap();
    write_private(&ks_dir.join("pin"), softhsm2::USER_PIN);
    std::fs::write(ks_dir.join("policy.toml"), PRODUCTION_POLICY).unwrap();
    let admin_config = dir.join("create-key.toml");
    std::fs::write(
        &admin_config,
        format!("listen = \"127.0.0.1:0\"\ndata_dir = \"ks/data\"\n[tls]\ncert = \"x\"\nkey = \"x\"\nclient_ca = \"x\"\n{}[policy]\nfile = \"x\"\n", token.root_section("ks/pin")),
    )
    .unwrap();
    token.create_key_with_cli(&admin_config);
    (ks_dir, token.root_section("pin"), token.conf())
}

/// Commits that can be lost are found wherever they were set, as the
/// database reports them for the keystore's own sessions: here a URL
/// option in a spelling a text search for `synchronous_commit=off` missed.
#[tokio::test(flavor = "multi_thread")]
async fn a_keystore_that_can_lose_commits_fails_audit_durable() {
    let (token, dir) = (SoftHsm2::new_token(), tempfile::tempdir().unwrap());
    let (ks_dir, root, conf) = hsm_key_service_dir(&token, dir.path());
    let schema = PgSchema::create();
    let base = pg_url();
    let joiner = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{joiner}options[synchronous_commit]=off");
    let env = [("SOFTHSM2_CONF", conf.to_str().unwrap())];
    let options = Options {
        root: Some(&root),
        env: &env,
        extra: PRODUCTION_LIFECYCLE,
        storage_url: Some(&url),
        storage_schema: Some(&schema.name),
        ..Options::default()
    };
    // The development profile starts, and the live report names it.
    let mut ks = KeyService::start_with(&ks_dir, &options);
    let (status, body) = ks.get(AUDITOR, "/v1/compliance").await;
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(&body).unwrap();
    let durable =
        report["checks"].as_array().unwrap().iter().find(|c| c["rule"] == "audit.durable");
    let durable = durable.unwrap();
    assert_eq!(durable["status"], "fail", "{durable}");
    assert!(durable["detail"].as_str().unwrap().contains("synchronous_commit=off"), "{durable}");
    ks.stop();

    // The production profile refuses to start, naming the rule.
    let config = ks_dir.join("keygate.toml");
    let (ok, stderr) = run_once_with("server", &config, true, &env);
    assert!(!ok, "started");
    assert_refused(&stderr, "audit.durable", "164.312(b)");
    assert_eq!(rules_named(&stderr), 1, "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_good_production_stack_starts_and_reports_every_check_passing() {
    let (token, dir) = (SoftHsm2::new_token(), tempfile::tempdir().unwrap());
    let (ks_dir, root, conf) = hsm_key_service_dir(&token, dir.path());
    let env = [("SOFTHSM2_CONF", conf.to_str().unwrap()), ("KEYGATE_PROFILE", "production")];
    let ks = KeyService::start_with(
        &ks_dir,
        &Options {
            root: Some(&root),
            env: &env,
            extra: PRODUCTION_LIFECYCLE,
            ..Options::default()
        },
    );

    let (status, body) = ks.get(ADMIN, "/v1/compliance").await;
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["profile"], "production");
    let checks = report["checks"].as_array().unwrap();
    assert!(checks.len() >= 10, "{report}");
    for check in checks {
        assert_eq!(check["status"], "pass", "{check}");
        assert!(check["hipaa"].as_str().unwrap().starts_with("164.312("), "{check}");
        assert!(!check["detail"].as_str().unwrap().is_empty());
    }
    for provision in ["164.312(a)(1)", "164.312(b)", "164.312(c)(1)", "164.312(d)", "164.312(e)(1)"]
    {
        assert!(checks.iter().any(|c| c["hipaa"] == provision), "{provision} covered");
    }
    let (status, _) = ks.get(AUDITOR, "/v1/compliance").await;
    assert_eq!(status, 200);
    let (status, _) = ks.get(ENC, "/v1/compliance").await;
    assert_eq!(status, 403);
    let pid = ks.pid().unwrap();
    assert_core_limit_zero(pid);
    assert_not_dumpable(pid);

    // Every live tenant must rotate on a schedule within the maximum.
    let (status, body) = ks.post(ADMIN, "/v1/tenants", &serde_json::json!({"tenant": "onc"})).await;
    assert_eq!(status, 201, "{body}");
    let failed_rules = |body: &str| -> Vec<String> {
        let report: Value = serde_json::from_str(body).unwrap();
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["status"] == "fail")
            .map(|c| format!("{}: {}", c["rule"].as_str().unwrap(), c["detail"]))
            .collect()
    };
    let (_, body) = ks.get(ADMIN, "/v1/compliance").await;
    let failed = failed_rules(&body);
    assert!(
        failed.len() == 1
            && failed[0].starts_with("keys.tenant_rotation: ")
            && failed[0].contains("onc"),
        "{failed:?}"
    );
    let response = ks
        .client(ADMIN)
        .put(format!("{}/v1/tenants/onc/keys/auto-rotate", ks.url))
        .json(&serde_json::json!({"every_secs": 90 * 86_400}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (_, body) = ks.get(ADMIN, "/v1/compliance").await;
    assert_eq!(failed_rules(&body), Vec::<String>::new());

    // A reload is held to the rules of the start: a wildcard grant is
    // refused, counted and named, and the policy in force stays.
    std::fs::write(ks_dir.join("policy.toml"), format!("{PRODUCTION_POLICY}{WILDCARD_GRANT}"))
        .unwrap();
    ks.sighup();
    let mut counted = false;
    for _ in 0..50 {
        let (_, metrics) = ks.get(ADMIN, "/metrics").await;
        if metrics.lines().any(|l| l == "keygate_policy_reload_failures_total 1") {
            counted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(counted, "the wildcard grant was refused");
    assert!(ks.log().contains("policy.least_privilege"), "{}", ks.log());
    let (_, body) = ks.get(ADMIN, "/v1/compliance").await;
    assert_eq!(failed_rules(&body), Vec::<String>::new());

    // No master rotation may take the keys out of the HSM: one admin
    // cannot move them under a key file on disk (nor have one created).
    let stolen = dir.path().join("stolen-root.key");
    let to_file = serde_json::json!({"to": {
        "provider": "dev_local",
        "key_file": stolen,
        "create_if_missing": true,
    }});
    let (status, body) = ks.post(ADMIN, "/v1/master/rotate", &to_file).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "refused_by_profile", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("development key file"), "{body}");
    assert!(!stolen.exists(), "no key file was created");
    let (status, body) = ks.get(ADMIN, "/v1/master").await;
    assert_eq!(status, 200, "{body}");
    let masters: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(masters["masters"].as_array().unwrap().len(), 1, "no master was added: {masters}");
    assert_eq!(masters["active"]["kind"], "pkcs11", "{masters}");
    let (status, export) = ks.get(AUDITOR, "/v1/audit").await;
    assert_eq!(status, 200);
    let refusal: Value = export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["action"] == "master.rotate")
        .expect("the refused rotation is audited");
    assert_eq!(refusal["outcome"], "denied", "{refusal}");
    assert_eq!(refusal["actor"], ADMIN);
    assert_eq!(refusal["detail"]["provider"], "dev_local");

    // A production sidecar beside it.
    let sc = Sidecar::start_with_key_service(
        &ks.pki,
        std::slice::from_ref(&ks.url),
        &dir.path().join("sc"),
        SIDECAR,
        &format!("server_identity = \"{KEY_SERVICE_IDENTITY}\""),
        "profile = \"production\"\n",
        Transport::Unix,
    );
    let (status, _) = sc.get("/healthz").await;
    assert_eq!(status, 200);
    let pid = sc.pid().unwrap();
    assert_core_limit_zero(pid);
    assert_not_dumpable(pid);
    assert_allocates_from_the_os(pid);
    assert!(sc.log().contains("core dumps disabled"), "{}", sc.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_development_profile_reports_what_production_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), "");
    let (status, body) = ks.get(ADMIN, "/v1/compliance").await;
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["profile"], "development");
    let failed: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .map(|c| c["rule"].as_str().unwrap())
        .collect();
    assert_eq!(
        failed,
        ["root_key.hardware_backed", "integrity.shred_delay", "policy.least_privilege"],
        "{report}"
    );
    assert!(ks.log().contains("compliance check failed"));
    let pid = ks.pid().unwrap();
    assert_core_limit_zero(pid);
    assert_not_dumpable(pid);
    assert_allocates_from_the_os(pid);
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_moved_to_a_development_master_fail_the_check_and_a_production_start() {
    let (token, dir) = (SoftHsm2::new_token(), tempfile::tempdir().unwrap());
    let (ks_dir, root, conf) = hsm_key_service_dir(&token, dir.path());
    // The development profile lets an admin move the keys to a key file.
    let env = [("SOFTHSM2_CONF", conf.to_str().unwrap())];
    let mut ks = KeyService::start_with(
        &ks_dir,
        &Options {
            root: Some(&root),
            env: &env,
            extra: PRODUCTION_LIFECYCLE,
            ..Options::default()
        },
    );
    let (status, body) = ks.post(ADMIN, "/v1/tenants", &serde_json::json!({"tenant": "onc"})).await;
    assert_eq!(status, 201, "{body}");
    let hardware_check = |body: &str| -> Value {
        let report: Value = serde_json::from_str(body).unwrap();
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["rule"] == "root_key.hardware_backed")
            .cloned()
            .unwrap()
    };
    let (_, body) = ks.get(ADMIN, "/v1/compliance").await;
    assert_eq!(hardware_check(&body)["status"], "pass", "{body}");
    let key_file = dir.path().join("dev-root.key");
    let to_file = serde_json::json!({"to": {
        "provider": "dev_local",
        "key_file": key_file,
        "create_if_missing": true,
    }});
    let (status, body) = ks.post(ADMIN, "/v1/master/rotate", &to_file).await;
    assert_eq!(status, 200, "{body}");

    // The configured [root] is still the HSM; the keys are not under it.
    let (_, body) = ks.get(ADMIN, "/v1/compliance").await;
    let check = hardware_check(&body);
    assert_eq!(check["status"], "fail", "{check}");
    assert!(check["detail"].as_str().unwrap().contains("local development key file"), "{check}");
    ks.stop();
    let (started, stderr) = run_once_with("server", &ks_dir.join("keygate.toml"), true, &env);
    assert!(!started, "{stderr}");
    assert_refused(&stderr, "root_key.hardware_backed", "164.312(a)(1)");
    assert!(stderr.contains("a master rotation moved them there"), "{stderr}");
}
