//! `keygate up`: the whole stack on one machine with embedded defaults —
//! a development CA and certificates, a local root key, SQLite, a default
//! policy and a sample `patient` schema — for trying keygate out.
//! **Development only**: it says so, loudly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{LogConfig, LogFormat, ServerConfig};
use crate::pki::{DevCa, Validity};
use crate::sidecar::SidecarConfig;

/// The identity the sidecar presents to the key service.
pub const SIDECAR_IDENTITY: &str = "spiffe://keygate.dev/sidecar";
/// The identity of the admin certificate `up` writes.
pub const ADMIN_IDENTITY: &str = "spiffe://keygate.dev/admin";
/// The identity of the second person `up` writes, who approves shreds.
pub const OFFICER_IDENTITY: &str = "spiffe://keygate.dev/officer";
/// The tenant `up` creates.
pub const DEMO_TENANT: &str = "demo";

const POLICY: &str = r#"# keygate up: development policy.
[[grant]]
identity = "spiffe://keygate.dev/admin"
tenants = ["*"]
roles = ["admin", "auditor", "security_officer"]

# The second person of two-person control (shred approvals).
[[grant]]
identity = "spiffe://keygate.dev/officer"
tenants = ["*"]
roles = ["security_officer", "auditor"]

[[grant]]
identity = "spiffe://keygate.dev/sidecar"
tenants = ["demo"]
roles = ["encryptor", "decryptor"]
classes = ["*"]
purposes = ["*"]
"#;

/// The sample schema `up` installs.
pub const PATIENT_SCHEMA: &str = r#"# A patient record with one field of every kind.
[[schema]]
name = "patient"
version = 1
fields = [
  { path = "/ssn",        mode = "randomized",    class = "phi.identifier", mask = "last4" },
  { path = "/mrn",        mode = "deterministic", class = "phi.identifier" },
  { path = "/email",      mode = "blind_index", bits = 32, normalize = ["trim", "lowercase"], class = "pii.contact", mask = "email" },
  { path = "/diagnosis",  mode = "randomized",    class = "phi.clinical" },
  { path = "/patient_id", mode = "pseudonym",     class = "pii.identifier" },
  { path = "/allergies/*", mode = "randomized",   class = "phi.clinical" },
]
"#;

const SAMPLE: &str = r#"{"tenant":"demo","schema":"patient","record":{"name":"Jane Roe","ssn":"123-45-6789","mrn":"MRN-000123","email":"Jane.Roe@example.org","diagnosis":"C50.9","patient_id":"P-42","allergies":["penicillin","latex"],"age":51}}"#;

/// `keygate up` failed.
#[derive(Debug, thiserror::Error)]
#[error("keygate up: {0}")]
pub struct UpError(String);

fn err(e: impl std::fmt::Display) -> UpError {
    UpError(e.to_string())
}

/// Creates (once) everything under `dir`, starts the key service and the
/// sidecar, creates the demo tenant, prints how to use them, and runs
/// until Ctrl-C.
pub async fn run(dir: &Path) -> Result<(), UpError> {
    let dir = std::path::absolute(dir).map_err(err)?;
    prepare(&dir)?;
    let port = free_port()?;
    let server = server_config(&dir, port)?;
    let sidecar = SidecarConfig::load(&dir.join("sidecar.toml")).map_err(err)?;
    let server_task = tokio::spawn(crate::server::run(server));
    let sidecar_task = tokio::spawn(async move {
        // Let the key service bind first; the sidecar retries its calls anyway.
        tokio::time::sleep(Duration::from_millis(300)).await;
        crate::sidecar::run(sidecar).await
    });
    create_demo_tenant(&dir, port).await?;
    print_banner(&dir);
    let (a, b) = tokio::join!(server_task, sidecar_task);
    a.map_err(err)?.map_err(err)?;
    b.map_err(err)?.map_err(err)?;
    Ok(())
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), UpError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true).mode(if private { 0o600 } else { 0o644 });
    options
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(|e| err(format!("{}: {e}", path.display())))
}

/// Writes the PKI, policy, schema and configs unless they exist.
fn prepare(dir: &Path) -> Result<(), UpError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir.join("pki")).map_err(err)?;
    std::fs::create_dir_all(dir.join("schemas")).map_err(err)?;
    if !dir.join("pki/ca.crt").exists() {
        let ca = DevCa::generate("keygate up development CA").map_err(err)?;
        let server =
            ca.issue_server(&["localhost", "127.0.0.1"], Validity::days(365)).map_err(err)?;
        let sidecar = ca.issue_client(SIDECAR_IDENTITY, Validity::days(365)).map_err(err)?;
        let admin = ca.issue_client(ADMIN_IDENTITY, Validity::days(365)).map_err(err)?;
        let officer = ca.issue_client(OFFICER_IDENTITY, Validity::days(365)).map_err(err)?;
        write(&dir.join("pki/ca.crt"), ca.cert_pem(), false)?;
        let certs =
            [("server", &server), ("sidecar", &sidecar), ("admin", &admin), ("officer", &officer)];
        for (name, cert) in certs {
            write(&dir.join(format!("pki/{name}.crt")), &cert.cert_pem, false)?;
            write(&dir.join(format!("pki/{name}.key")), &cert.key_pem, true)?;
        }
    }
    if !dir.join("policy.toml").exists() {
        write(&dir.join("policy.toml"), POLICY, false)?;
    }
    if !dir.join("schemas/patient.toml").exists() {
        write(&dir.join("schemas/patient.toml"), PATIENT_SCHEMA, false)?;
    }
    Ok(())
}

fn free_port() -> Result<u16, UpError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(err)?;
    Ok(listener.local_addr().map_err(err)?.port())
}

fn server_config(dir: &Path, port: u16) -> Result<ServerConfig, UpError> {
    let text = format!(
        r#"# keygate up: development key service.
listen = "127.0.0.1:{port}"
data_dir = "data"
[tls]
cert = "pki/server.crt"
key = "pki/server.key"
client_ca = "pki/ca.crt"
[root]
provider = "dev_local"
key_file = "root.key"
create_if_missing = true
[policy]
file = "policy.toml"
[log]
format = "text"
level = "warn"
"#
    );
    write(&dir.join("server.toml"), &text, false)?;
    let sidecar = format!(
        r#"# keygate up: development sidecar.
listen = {{ unix = "sidecar.sock" }}
schemas = ["schemas/patient.toml"]
app_identity = "spiffe://keygate.dev/app"
[key_service]
urls = ["https://localhost:{port}"]
ca = "pki/ca.crt"
cert = "pki/sidecar.crt"
key = "pki/sidecar.key"
"#
    );
    write(&dir.join("sidecar.toml"), &sidecar, false)?;
    // `keygate admin --profile …` profiles (the port changes every run).
    for name in ["admin", "officer"] {
        if dir.join(format!("pki/{name}.crt")).exists() {
            let profile = format!(
                "# keygate up: `keygate admin --profile {name}.toml …`\n\
                 url = \"https://localhost:{port}\"\nca = \"pki/ca.crt\"\n\
                 cert = \"pki/{name}.crt\"\nkey = \"pki/{name}.key\"\n"
            );
            write(&dir.join(format!("{name}.toml")), &profile, false)?;
        }
    }
    let mut config = ServerConfig::load(&dir.join("server.toml")).map_err(err)?;
    config.log = LogConfig { level: "warn".into(), format: LogFormat::Text };
    Ok(config)
}

async fn create_demo_tenant(dir: &Path, port: u16) -> Result<(), UpError> {
    let read = |name: &str| std::fs::read(dir.join("pki").join(name)).map_err(err);
    let mut pem = zeroize::Zeroizing::new(read("admin.crt")?);
    pem.push(b'\n');
    pem.extend_from_slice(&zeroize::Zeroizing::new(read("admin.key")?));
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&read("ca.crt")?).map_err(err)?])
        .identity(reqwest::Identity::from_pem(&pem).map_err(err)?)
        .build()
        .map_err(err)?;
    let url = format!("https://localhost:{port}/v1/tenants");
    for _ in 0..100 {
        match client.post(&url).json(&serde_json::json!({ "tenant": DEMO_TENANT })).send().await {
            Ok(r) if r.status().is_success() || r.status() == reqwest::StatusCode::CONFLICT => {
                return Ok(());
            }
            Ok(r) => return Err(err(format!("creating the demo tenant: HTTP {}", r.status()))),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Err(err("the key service did not come up"))
}

fn print_banner(dir: &Path) {
    let socket: PathBuf = dir.join("sidecar.sock");
    let s = socket.display();
    let curl = format!("curl -s --unix-socket {s} -H 'content-type: application/json'");
    println!(
        "
================================================================================
  keygate up — DEVELOPMENT SETUP. NOT FOR REAL PATIENT DATA.
  The root key is a local file ({dir}/root.key), the CA is a throwaway dev CA,
  and every identity's private key sits in {dir}/pki.
================================================================================
  key service : {dir}/server.toml   (mTLS; admin cert: {dir}/pki/admin.crt)
  sidecar     : unix:{s}
  tenant      : {DEMO_TENANT}    schema: patient ({dir}/schemas/patient.toml)

  Encrypt a record:
    {curl} http://localhost/v1/encrypt -d '{SAMPLE}'

  Encrypt and decrypt it again (round trip):
    {curl} http://localhost/v1/encrypt -d '{SAMPLE}' | {curl} http://localhost/v1/decrypt -d @-

  Administer it (the officer profile approves what the admin asks to shred):
    keygate admin --profile {dir}/admin.toml tenant show {DEMO_TENANT}
    keygate admin --profile {dir}/admin.toml key usage --tenant {DEMO_TENANT}

  Stop with Ctrl-C.
",
        dir = dir.display()
    );
}
