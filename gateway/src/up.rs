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
/// The key service's identity (a URI SAN of its certificate), which the
/// sidecar pins as production requires.
pub const KEY_SERVICE_IDENTITY: &str = "spiffe://keygate.dev/key-service";
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
/// until Ctrl-C. If either process fails, the other is stopped and its
/// error is what `up` reports.
pub async fn run(dir: &Path) -> Result<(), UpError> {
    refuse_overrides(std::env::vars_os())?;
    let dir = std::path::absolute(dir).map_err(err)?;
    prepare(&dir)?;
    let port = free_port()?;
    let server = server_config(&dir, port)?;
    let sidecar = SidecarConfig::load(&dir.join("sidecar.toml")).map_err(err)?;
    let mut server_task = tokio::spawn(async move {
        crate::server::run(server).await.map_err(|e| err(format!("the key service failed: {e}")))
    });
    let mut sidecar_task = tokio::spawn(async move {
        // Let the key service bind first; the sidecar retries its calls anyway.
        tokio::time::sleep(Duration::from_millis(300)).await;
        crate::sidecar::run(sidecar).await.map_err(|e| err(format!("the sidecar failed: {e}")))
    });
    // Whichever way `run` returns, neither process outlives it.
    let _abort = AbortOnDrop([server_task.abort_handle(), sidecar_task.abort_handle()]);
    tokio::select! {
        created = create_demo_tenant(&dir, port) => created?,
        stopped = &mut server_task => return Err(stopped_early("key service", stopped)),
        stopped = &mut sidecar_task => return Err(stopped_early("sidecar", stopped)),
    }
    print_banner(&dir);
    // Both stop at Ctrl-C; one that fails takes the other down with it.
    tokio::select! {
        stopped = &mut server_task => {
            joined("key service", stopped)?;
            joined("sidecar", sidecar_task.await)
        }
        stopped = &mut sidecar_task => {
            joined("sidecar", stopped)?;
            joined("key service", server_task.await)
        }
    }
}

/// Aborts the tasks when dropped.
struct AbortOnDrop<const N: usize>([tokio::task::AbortHandle; N]);

impl<const N: usize> Drop for AbortOnDrop<N> {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

type Joined = Result<Result<(), UpError>, tokio::task::JoinError>;

/// A process task's outcome.
fn joined(name: &str, outcome: Joined) -> Result<(), UpError> {
    outcome.map_err(|e| err(format!("the {name} task failed: {e}")))?
}

/// The error of a process that stopped before the demo tenant was made.
fn stopped_early(name: &str, outcome: Joined) -> UpError {
    match joined(name, outcome) {
        Err(e) => e,
        Ok(()) => err(format!("the {name} stopped before the stack was up")),
    }
}

/// `up` builds its configuration itself: `KEYGATE_…` variables, which the
/// config loaders merge over any file (a production `KEYGATE_STORAGE_URL`,
/// `KEYGATE_TLS__CLIENT_CA` or `KEYGATE_OPS_LISTEN` in this shell), would
/// point a stack with a development root key elsewhere. Every one the
/// key service's or sidecar's config would take is refused (others, such
/// as the tests' `KEYGATE_TEST_PG_URL` or the admin CLI's, are left
/// alone). Only names are shown: values may be secrets.
fn refuse_overrides(
    vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<(), UpError> {
    let mut names: Vec<String> = vars
        .into_iter()
        .map(|(name, _)| name.to_string_lossy().into_owned())
        .filter(|name| {
            crate::config::is_override(name, crate::config::TOP_LEVEL_KEYS)
                || crate::config::is_override(name, crate::sidecar::config::TOP_LEVEL_KEYS)
        })
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    Err(err(format!(
        "the environment sets {}: the key service and sidecar would take these over the \
         development configuration `up` writes (a production keystore, CA or listener for a \
         stack with a development root key); unset them first (`env -u NAME keygate up`)",
        names.join(", ")
    )))
}

/// Writes `path` as a new file (mode 0600 if `private`, else 0644): an old
/// file, or a symbolic link, at `path` is removed first, never written
/// through.
fn write(path: &Path, contents: &str, private: bool) -> Result<(), UpError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |e: std::io::Error| err(format!("{}: {e}", path.display()));
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(failed(e)),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true).mode(if private { 0o600 } else { 0o644 });
    options.open(path).and_then(|mut f| f.write_all(contents.as_bytes())).map_err(failed)
}

/// What `up` may find in its directory and use as it is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A directory.
    Dir,
    /// A file others may read but not write (certificates, policy, schema).
    Public,
    /// A file only its owner may read (private keys).
    Secret,
}

/// Checks that `path`, if it exists, is the right kind, belongs to this
/// process's user and is not writable (nor, if secret, readable) by its
/// group or others: another local user who made it could otherwise read
/// the keys written into it, or plant a CA, a policy or keys of their own.
/// A symbolic link is refused: whoever owns it could point it elsewhere
/// between this check and the writes. Returns whether it exists.
fn check_owned(path: &Path, kind: Kind) -> Result<bool, UpError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let p = path.display();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(err(format!("{p}: {e}"))),
    };
    let (right_kind, wanted) = match kind {
        Kind::Dir => (meta.is_dir(), "directory"),
        Kind::Public | Kind::Secret => (meta.is_file(), "regular file"),
    };
    if !right_kind {
        let link = if meta.is_symlink() { " but a symbolic link" } else { "" };
        return Err(err(format!("{p} is not a {wanted}{link}")));
    }
    let euid = rustix::process::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(err(format!(
            "{p} belongs to uid {}, not to you (uid {euid}): `up` writes private keys in its \
             directory and uses the CA, policy and schemas it finds there; choose a directory \
             of your own with --dir",
            meta.uid()
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(err(format!(
            "{p} is writable by its group or others (mode {mode:o}): they could replace the \
             CA, policy or keys `up` uses; run `chmod go-w {p}` or choose another --dir"
        )));
    }
    if kind == Kind::Secret && mode & 0o077 != 0 {
        return Err(err(format!(
            "{p} is readable by its group or others (mode {mode:o}): a private key must be \
             yours alone; run `chmod 600 {p}`, or remove the pki directory to get new keys"
        )));
    }
    Ok(true)
}

/// Makes directory `path` (mode 0700) unless it exists, then checks it.
fn own_dir(path: &Path) -> Result<(), UpError> {
    crate::claim::create_private_dir(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    check_owned(path, Kind::Dir).map(drop)
}

/// The certificates `up` writes into `pki/`, each with its key.
const PKI_NAMES: [&str; 5] = ["ca", "server", "sidecar", "admin", "officer"];
/// Certificates are renewed once they would expire within this long.
const RENEW_BEFORE: Duration = Duration::from_secs(7 * 86_400);
/// How long the certificates `up` issues last.
const CERT_DAYS: u64 = 365;

/// Writes the PKI, policy, schema and configs unless they exist. The
/// directory and everything in it that is used as it is must be the
/// user's own ([`check_owned`]).
fn prepare(dir: &Path) -> Result<(), UpError> {
    own_dir(dir)?;
    let pki = dir.join("pki");
    own_dir(&pki)?;
    own_dir(&dir.join("schemas"))?;
    // The key service's; made here so that it is private whatever the umask.
    own_dir(&dir.join("data"))?;
    if pki_is_current(&pki)? {
        for name in PKI_NAMES {
            check_owned(&pki.join(format!("{name}.crt")), Kind::Public)?;
            if name != "ca" {
                check_owned(&pki.join(format!("{name}.key")), Kind::Secret)?;
            }
        }
    } else {
        write_pki(&pki)?;
    }
    for (path, contents) in
        [(dir.join("policy.toml"), POLICY), (dir.join("schemas/patient.toml"), PATIENT_SCHEMA)]
    {
        if !check_owned(&path, Kind::Public)? {
            write(&path, contents, false)?;
        }
    }
    // Made by the key service (0600); checked if it is there already.
    check_owned(&dir.join("root.key"), Kind::Secret)?;
    Ok(())
}

/// Whether every certificate and key of `pki/` is there, no certificate
/// expires within [`RENEW_BEFORE`], and the key service's names
/// [`KEY_SERVICE_IDENTITY`] (those of earlier versions do not, and the
/// sidecar pins it).
fn pki_is_current(pki: &Path) -> Result<bool, UpError> {
    let renew_at = time::OffsetDateTime::now_utc() + RENEW_BEFORE;
    for name in PKI_NAMES {
        let cert = pki.join(format!("{name}.crt"));
        if name != "ca" && !pki.join(format!("{name}.key")).exists() {
            return Ok(false);
        }
        let pem = match std::fs::read(&cert) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(err(format!("{}: {e}", cert.display()))),
        };
        if not_after(&pem).is_none_or(|end| end <= renew_at) {
            return Ok(false);
        }
        if name == "server" && identity(&pem).as_deref() != Some(KEY_SERVICE_IDENTITY) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The identity the (first) certificate in `pem` names, as the key
/// service and the sidecar read one.
fn identity(pem: &[u8]) -> Option<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    crate::tls::identity_of(Some(&[pem.contents.into()]))
}

/// When the (first) certificate in `pem` expires.
fn not_after(pem: &[u8]) -> Option<time::OffsetDateTime> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let (_, cert) = X509Certificate::from_der(&pem.contents).ok()?;
    Some(cert.validity().not_after.to_datetime())
}

/// A new CA and every certificate `up` uses, replacing any there. The CA's
/// key is not kept (nothing else is issued from it): renewing makes a new
/// CA, which only the configs and profiles `up` rewrites at each start
/// trust.
fn write_pki(pki: &Path) -> Result<(), UpError> {
    // `ca.crt`, written last, is there only with the rest complete: a
    // renewal cut short is made again in full next time.
    match std::fs::remove_file(pki.join("ca.crt")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let validity = Validity::days(CERT_DAYS);
    let ca = DevCa::generate("keygate up development CA").map_err(err)?;
    let server = ca
        .issue_server_with_identity(&["localhost", "127.0.0.1"], KEY_SERVICE_IDENTITY, validity)
        .map_err(err)?;
    let sidecar = ca.issue_client(SIDECAR_IDENTITY, validity).map_err(err)?;
    let admin = ca.issue_client(ADMIN_IDENTITY, validity).map_err(err)?;
    let officer = ca.issue_client(OFFICER_IDENTITY, validity).map_err(err)?;
    let certs =
        [("server", &server), ("sidecar", &sidecar), ("admin", &admin), ("officer", &officer)];
    for (name, cert) in certs {
        write(&pki.join(format!("{name}.key")), &cert.key_pem, true)?;
        write(&pki.join(format!("{name}.crt")), &cert.cert_pem, false)?;
    }
    write(&pki.join("ca.crt"), ca.cert_pem(), false)
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
server_identity = "{KEY_SERVICE_IDENTITY}"
"#
    );
    write(&dir.join("sidecar.toml"), &sidecar, false)?;
    // `keygate admin --profile …` profiles (the port changes every run).
    for name in ["admin", "officer"] {
        let profile = format!(
            "# keygate up: `keygate admin --profile {name}.toml …`\n\
             url = \"https://localhost:{port}\"\nca = \"pki/ca.crt\"\n\
             cert = \"pki/{name}.crt\"\nkey = \"pki/{name}.key\"\n"
        );
        write(&dir.join(format!("{name}.toml")), &profile, false)?;
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

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn set_mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn config_variables_in_the_environment_are_refused_by_name() {
        let vars = |names: &[&str]| {
            names
                .iter()
                .map(|n| (OsString::from(n), OsString::from("postgres://prod-secret")))
                .collect::<Vec<_>>()
        };
        let unrelated = ["HOME", "KEYGATE_ADMIN_PROFILE", "KEYGATEWAY", "KEYGATE_TEST_PG_URL"];
        assert!(refuse_overrides(vars(&unrelated)).is_ok());
        // The sidecar's keys count too.
        let e = refuse_overrides(vars(&["KEYGATE_APP_IDENTITY"])).unwrap_err().to_string();
        assert!(e.contains("KEYGATE_APP_IDENTITY"), "{e}");
        // The loaders take the prefix in any case.
        let e = refuse_overrides(vars(&["keygate_storage_url"])).unwrap_err().to_string();
        assert!(e.contains("keygate_storage_url"), "{e}");
        let e = refuse_overrides(vars(&["KEYGATE_TLS__CLIENT_CA", "PATH", "KEYGATE_STORAGE_URL"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sets KEYGATE_STORAGE_URL, KEYGATE_TLS__CLIENT_CA:"), "{e}");
        assert!(!e.contains("prod-secret"), "values are not shown: {e}");
    }

    #[test]
    fn a_new_directory_is_private_and_kept_as_it_is_next_time() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dev");
        prepare(&dir).unwrap();
        for sub in ["", "pki", "schemas", "data"] {
            assert_eq!(mode(&dir.join(sub)), 0o700, "{sub}");
        }
        for name in ["server", "sidecar", "admin", "officer"] {
            assert_eq!(mode(&dir.join(format!("pki/{name}.key"))), 0o600, "{name}");
        }
        assert!(!dir.join("pki/ca.key").exists(), "the CA's key is not kept");
        let ca = std::fs::read(dir.join("pki/ca.crt")).unwrap();
        let policy = dir.join("policy.toml");
        std::fs::write(&policy, "# edited\n").unwrap();
        prepare(&dir).unwrap();
        assert_eq!(std::fs::read(dir.join("pki/ca.crt")).unwrap(), ca);
        assert_eq!(std::fs::read_to_string(&policy).unwrap(), "# edited\n");
    }

    #[test]
    fn directories_and_keys_others_could_touch_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dev");
        // Made by someone else, writable by everyone, before `up` ran.
        std::fs::create_dir(&dir).unwrap();
        set_mode(&dir, 0o777);
        let e = prepare(&dir).unwrap_err().to_string();
        assert!(e.contains("is writable by its group or others (mode 777)"), "{e}");
        assert!(!dir.join("pki").exists(), "nothing written: {e}");

        set_mode(&dir, 0o700);
        prepare(&dir).unwrap();
        for (path, bad, wanted) in [
            ("pki", 0o770, "writable by its group"),
            ("schemas", 0o757, "writable by its group"),
            ("pki/ca.crt", 0o664, "writable by its group"),
            ("policy.toml", 0o666, "writable by its group"),
            ("pki/admin.key", 0o640, "readable by its group or others (mode 640)"),
            ("pki/server.key", 0o604, "readable by its group or others (mode 604)"),
        ] {
            let path = dir.join(path);
            let good = mode(&path);
            set_mode(&path, bad);
            let e = prepare(&dir).unwrap_err().to_string();
            assert!(e.contains(&path.display().to_string()) && e.contains(wanted), "{e}");
            set_mode(&path, good);
        }
        prepare(&dir).unwrap();

        // Another user's directory (as root: one given to `nobody`).
        let theirs = if rustix::process::geteuid().is_root() {
            let theirs = tmp.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            set_mode(&theirs, 0o755);
            std::os::unix::fs::chown(&theirs, Some(65_534), Some(65_534)).unwrap();
            theirs
        } else {
            PathBuf::from("/")
        };
        let e = check_owned(&theirs, Kind::Dir).unwrap_err().to_string();
        assert!(e.contains("not to you"), "{e}");
    }

    #[test]
    fn files_are_replaced_not_written_through() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, "theirs").unwrap();
        // A link planted where a key goes is replaced, its target untouched.
        let link = tmp.path().join("admin.key");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        write(&link, "secret", true).unwrap();
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "theirs");
        let meta = std::fs::symlink_metadata(&link).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // An existing readable file is not reused with its old mode: what
        // another reference to it (a hard link, an open descriptor) sees
        // stays as it was.
        let old = tmp.path().join("server.key");
        std::fs::write(&old, "old").unwrap();
        set_mode(&old, 0o644);
        let held = tmp.path().join("held");
        std::fs::hard_link(&old, &held).unwrap();
        write(&old, "secret", true).unwrap();
        assert_eq!(mode(&old), 0o600);
        assert_eq!(std::fs::read_to_string(&held).unwrap(), "old");
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "secret");
    }

    /// A link owned by someone else could be repointed after the check.
    #[test]
    fn a_directory_reached_through_a_link_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        prepare(&real).unwrap();
        let link = tmp.path().join("dev");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = prepare(&link).unwrap_err().to_string();
        assert!(e.contains("is not a directory but a symbolic link"), "{e}");
    }

    #[test]
    fn certificates_near_their_end_are_renewed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dev");
        prepare(&dir).unwrap();
        let read = |name: &str| std::fs::read(dir.join("pki").join(name)).unwrap();
        let lasts = |name: &str| not_after(&read(name)).unwrap() - time::OffsetDateTime::now_utc();
        let ca = read("ca.crt");
        // The admin certificate ends in three days.
        let other = DevCa::generate("other").unwrap();
        let short = other.issue_client(ADMIN_IDENTITY, Validity::days(3)).unwrap();
        write(&dir.join("pki/admin.crt"), &short.cert_pem, false).unwrap();
        assert!(lasts("admin.crt") < time::Duration::days(4));
        prepare(&dir).unwrap();
        assert!(lasts("admin.crt") > time::Duration::days(CERT_DAYS as i64 - 1));
        assert_ne!(read("ca.crt"), ca, "renewed with a new CA");
        // A renewal cut short (no ca.crt) is made again in full.
        let admin = read("admin.crt");
        std::fs::remove_file(dir.join("pki/ca.crt")).unwrap();
        prepare(&dir).unwrap();
        assert_ne!(read("admin.crt"), admin);
        assert!(dir.join("pki/ca.crt").exists());
    }

    /// The sidecar pins the key service's identity, so a PKI from before
    /// the key service's certificate named one is made anew.
    #[test]
    fn the_key_service_certificate_names_the_identity_the_sidecar_pins() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dev");
        prepare(&dir).unwrap();
        let read = |name: &str| std::fs::read(dir.join("pki").join(name)).unwrap();
        assert_eq!(identity(&read("server.crt")).as_deref(), Some(KEY_SERVICE_IDENTITY));
        server_config(&dir, 1).unwrap();
        let sidecar = SidecarConfig::load(&dir.join("sidecar.toml")).unwrap();
        assert_eq!(sidecar.key_service.server_identity.as_deref(), Some(KEY_SERVICE_IDENTITY));
        // An earlier version's server certificate, with DNS names only.
        let ca = read("ca.crt");
        let old = DevCa::generate("older up").unwrap();
        let server = old.issue_server(&["localhost", "127.0.0.1"], Validity::days(300)).unwrap();
        write(&dir.join("pki/server.crt"), &server.cert_pem, false).unwrap();
        prepare(&dir).unwrap();
        assert_eq!(identity(&read("server.crt")).as_deref(), Some(KEY_SERVICE_IDENTITY));
        assert_ne!(read("ca.crt"), ca, "renewed with a new CA");
    }
}
