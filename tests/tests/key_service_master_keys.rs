//! The key service with its master key in SoftHSM2 (PKCS#11) and in a
//! local AWS KMS emulator (moto): create a tenant, issue DEKs, restart the
//! key service (cold KEK cache), unwrap them again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use keygate_tests::keyservice::{KeyService, keygate_binary, write_private};
use keygate_tests::providers::moto::{self, MotoServer};
use keygate_tests::providers::softhsm2::{self, SoftHsm2};
use serde_json::{Value, json};

const ADMIN: &str = "spiffe://test/admin";
const ENC: &str = "spiffe://test/encryptor";
const DEC: &str = "spiffe://test/decryptor";

async fn issue_restart_unwrap(ks: &mut KeyService, describes: &str) {
    let (status, body) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201, "{body}\n{}", ks.log());
    let (status, issued) = ks.post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 50})).await;
    assert_eq!(status, 200, "{issued}");
    let keys = issued["keys"].as_array().unwrap().clone();
    ks.restart();
    let items: Vec<Value> = keys
        .iter()
        .map(|k| json!({"record_key_id": k["record_key_id"], "kek_version": 1, "wrapped": k["wrapped"]}))
        .collect();
    let (status, body) =
        ks.post(DEC, "/v1/tenants/onc/datakeys/unwrap", &json!({"items": items})).await;
    assert_eq!(status, 200, "{body}");
    for (k, r) in keys.iter().zip(body["results"].as_array().unwrap()) {
        assert_eq!(r["dek"], k["dek"], "same DEK after a restart, through the master key");
    }
    let (status, ready) = ks.get(ADMIN, "/readyz").await;
    assert_eq!(status, 200, "{ready}");
    let (_, verify) = ks.get(ADMIN, "/v1/audit/verify").await;
    assert!(verify.contains("\"ok\":true"), "{verify}");
    assert!(ks.log().contains(describes), "the log names the master key: {}", ks.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn master_key_in_softhsm2() {
    let token = SoftHsm2::new_token();
    let dir = tempfile::tempdir().unwrap();
    write_private(&dir.path().join("pin"), softhsm2::USER_PIN);
    let root = token.root_section("pin");
    let conf = token.conf();
    let env = [("SOFTHSM2_CONF", conf.to_str().unwrap())];

    // Without a master key in the token, the service refuses to start.
    let server_toml = dir.path().join("ks/keygate.toml");
    std::fs::create_dir_all(dir.path().join("ks")).unwrap();
    std::fs::copy(dir.path().join("pin"), dir.path().join("ks/pin")).unwrap();
    std::fs::write(&server_toml, format!("listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n[tls]\ncert = \"x\"\nkey = \"x\"\nclient_ca = \"x\"\n{root}[policy]\nfile = \"policy.toml\"\n")).unwrap();
    let said = token.create_key_with_cli(&server_toml);
    assert!(said.contains("non-extractable") && !said.contains(softhsm2::USER_PIN), "{said}");
    std::fs::remove_file(&server_toml).unwrap();

    let mut ks = KeyService::start_with_root(&dir.path().join("ks"), "", &root, &env);
    issue_restart_unwrap(&mut ks, "pkcs11").await;
    assert!(!ks.log().contains(softhsm2::USER_PIN), "the PIN never reaches the log");
}

/// The credentials moto takes, and no instance metadata to look for.
const MOTO_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", moto::ACCESS_KEY_ID),
    ("AWS_SECRET_ACCESS_KEY", moto::SECRET_ACCESS_KEY),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// A `[root]` section for `key_id` on `kms`.
fn kms_root(kms: &MotoServer, key_id: &str) -> String {
    format!(
        "[root]\nprovider = \"aws_kms\"\nregion = \"{}\"\nkey_id = \"{key_id}\"\n\
         endpoint_url = \"{}\"\n",
        moto::REGION,
        kms.endpoint()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn master_key_in_aws_kms() {
    let kms = MotoServer::start();
    let key = kms.create_key().await;
    let dir = tempfile::tempdir().unwrap();
    let root = kms_root(&kms, &key);
    // Endpoints from the environment (or a profile) never replace the
    // configured one, which alone passed the endpoint checks and the trust
    // list: here they lead nowhere.
    let env = [
        MOTO_ENV[0],
        MOTO_ENV[1],
        MOTO_ENV[2],
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
        ("AWS_ENDPOINT_URL_KMS", "http://127.0.0.1:9"),
    ];
    let mut ks = KeyService::start_with_root(dir.path(), "[log]\nlevel = \"debug\"\n", &root, &env);
    issue_restart_unwrap(&mut ks, "aws-kms").await;
    assert!(!ks.log().contains(moto::SECRET_ACCESS_KEY), "the AWS secret never reaches the log");

    // KMS gone: the audit log cannot be verified for now, which is not a
    // broken chain (an `ok: false` an auditor would take for tampering).
    kms.stop();
    let (status, body) = ks.get(ADMIN, "/v1/audit/verify").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("root_key_unavailable") && !body.contains("first_break"), "{body}");
}

/// A master named by the ARN of a key in another AWS account is refused
/// until the host lists that account (a key policy there could grant this
/// service's role a key its owner can decrypt with); [root]'s own account,
/// known once connected even when [root] names its key by alias, needs no
/// entry.
#[tokio::test(flavor = "multi_thread")]
async fn a_master_in_another_aws_account_needs_the_account_listed() {
    const OUTSIDER: &str = "999999999999";
    let kms = MotoServer::start();
    let root_key = kms.create_key().await;
    kms.create_alias("alias/master", &root_key).await;
    let next_key = kms.create_key().await;
    let account = next_key.split(':').nth(4).unwrap().to_owned();
    assert_ne!(account, OUTSIDER);
    let outsider_key = next_key.replace(&format!(":{account}:"), &format!(":{OUTSIDER}:"));
    let root = kms_root(&kms, "alias/master");
    let env = MOTO_ENV;
    let to = |key_id: &str| {
        json!({"to": {"provider": "aws_kms", "region": moto::REGION, "key_id": key_id,
                      "endpoint_url": kms.endpoint()}})
    };

    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start_with_root(&dir.path().join("ks"), "", &root, &env);
    let (status, body) = ks.post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = ks.post(ADMIN, "/v1/master/rotate", &to(&outsider_key)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("untrusted_provider")),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("account {OUTSIDER}"))
            && message.contains("trusted_masters.aws_kms_accounts"),
        "{message}"
    );
    let (_, export) = ks.get("spiffe://test/auditor", "/v1/audit").await;
    let refused = export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["action"] == "master.rotate")
        .unwrap();
    assert_eq!(
        (refused["outcome"].as_str(), refused["detail"]["rule"].as_str()),
        (Some("denied"), Some("trusted_masters")),
        "{refused}"
    );
    let (_, master) = ks.get(ADMIN, "/v1/master").await;
    assert!(master.contains(&root_key) && !master.contains(OUTSIDER), "{master}");

    // The same account as [root]'s key, which [root] names by alias.
    let (status, body) = ks.post(ADMIN, "/v1/master/rotate", &to(&next_key)).await;
    assert_eq!(status, 200, "{body}");
    let (_, master) = ks.get(ADMIN, "/v1/master").await;
    assert!(master.contains(&next_key), "{master}");
    drop(ks);

    // Listed, the outsider's account is let through to KMS. (moto ignores
    // an ARN's account and serves the key by its id: the refusal above was
    // this host's own, not KMS's.)
    let listed = format!("[trusted_masters]\naws_kms_accounts = [\"{OUTSIDER}\"]\n");
    let ks = KeyService::start_with_root(&dir.path().join("ks2"), &listed, &root, &env);
    let (status, body) = ks.post(ADMIN, "/v1/master/rotate", &to(&outsider_key)).await;
    assert_eq!(status, 200, "{body}");
}

/// Only the configured endpoint (or, without one, AWS's own) passed the
/// endpoint checks and `[trusted_masters]`: an endpoint from the
/// environment is never used instead, so this KMS, reachable only through
/// one, is never reached.
#[tokio::test(flavor = "multi_thread")]
async fn endpoints_from_the_environment_are_never_used() {
    let kms = MotoServer::start();
    let key = kms.create_key().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keygate.toml");
    std::fs::write(dir.path().join("policy.toml"), "").unwrap();
    let profile = dir.path().join("aws-config");
    std::fs::write(&profile, format!("[default]\nendpoint_url = {}\n", kms.endpoint())).unwrap();
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n[tls]\ncert = \"x\"\nkey = \"x\"\n\
             client_ca = \"x\"\n[policy]\nfile = \"policy.toml\"\n[root]\nprovider = \"aws_kms\"\n\
             region = \"{}\"\nkey_id = \"{key}\"\ntimeout_ms = 500\n",
            moto::REGION
        ),
    )
    .unwrap();
    let out = std::process::Command::new(keygate_binary())
        .args(["server", "--config"])
        .arg(&config)
        .env("AWS_ACCESS_KEY_ID", moto::ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", moto::SECRET_ACCESS_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_ENDPOINT_URL", kms.endpoint())
        .env("AWS_ENDPOINT_URL_KMS", kms.endpoint())
        .env("AWS_CONFIG_FILE", &profile)
        .env("AWS_PROFILE", "default")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "reached the KMS through the environment's endpoint");
    assert!(stderr.contains("root key (aws-kms)"), "{stderr}");
    assert!(!stderr.contains(&kms.endpoint()), "{stderr}");
}

#[test]
fn a_wrong_pin_or_unreachable_kms_stops_the_start_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let token = SoftHsm2::new_token();
    write_private(&dir.path().join("pin"), "not-the-pin");
    let config = dir.path().join("keygate.toml");
    let base = "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n[tls]\ncert = \"x\"\nkey = \"x\"\nclient_ca = \"x\"\n[policy]\nfile = \"policy.toml\"\n";
    std::fs::write(dir.path().join("policy.toml"), "").unwrap();
    let start = |root: &str| {
        std::fs::write(&config, format!("{base}{root}\n")).unwrap();
        std::process::Command::new(keygate_binary())
            .args(["server", "--config"])
            .arg(&config)
            .env("SOFTHSM2_CONF", token.conf())
            .env("AWS_ACCESS_KEY_ID", moto::ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", moto::SECRET_ACCESS_KEY)
            .output()
            .unwrap()
    };
    let out = start(&format!(
        "[root]\nprovider = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{}\"\nkey_label = \"nope\"\npin_file = \"pin\"",
        token.module().display(),
        softhsm2::TOKEN_LABEL
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("root key (pkcs11)") && stderr.contains("CKR_PIN_INCORRECT"),
        "{stderr}"
    );
    assert!(!stderr.contains("not-the-pin"));

    write_private(&dir.path().join("pin"), softhsm2::USER_PIN);
    let out = start(&format!(
        "[root]\nprovider = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{}\"\nkey_label = \"no-such-key\"\npin_file = \"pin\"",
        token.module().display(),
        softhsm2::TOKEN_LABEL
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("no-such-key"), "unknown key label: {stderr}");
    assert!(!stderr.contains(softhsm2::USER_PIN));

    let out = start(
        "[root]\nprovider = \"pkcs11\"\nmodule = \"/nonexistent/libmissing.so\"\ntoken_label = \"t\"\nkey_label = \"k\"\npin_file = \"pin\"",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("libmissing.so"), "{stderr}");

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = start(&format!(
        "[root]\nprovider = \"aws_kms\"\nregion = \"eu-west-1\"\nkey_id = \"alias/master\"\nendpoint_url = \"http://127.0.0.1:{port}\"\ntimeout_ms = 500"
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("root key (aws-kms)"), "{stderr}");
    assert!(!stderr.contains(moto::SECRET_ACCESS_KEY));
}
