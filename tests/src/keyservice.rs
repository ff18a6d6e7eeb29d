//! Running a real `keygate server` process for end-to-end tests: a dev
//! PKI, a config and policy in a temporary directory, the process, and
//! mTLS clients for any identity.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gateway::pki::{DevCa, Validity};

/// Runs `keygate <args>` until it exits; returns whether it succeeded and
/// its stderr (read as it comes, so a chatty process never blocks on a
/// full pipe). A process that should have been refused but started runs
/// until stopped: after 60 s it is killed and counts as a success, so the
/// test fails instead of hanging.
pub fn run_to_exit<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> (bool, String) {
    let mut child = Command::new(keygate_binary())
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut stderr = String::new();
        pipe.read_to_string(&mut stderr).unwrap();
        stderr
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let exited = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.wait();
    (exited.is_none_or(|s| s.success()), reader.join().unwrap())
}

/// Locates (building once if needed) the `keygate` binary of this profile.
pub fn keygate_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            // target/<profile>/deps/<test> → target/<profile>/keygate
            let exe = std::env::current_exe().expect("test executable path");
            let profile_dir = exe.parent().and_then(Path::parent).expect("target profile dir");
            let release = profile_dir.ends_with("release");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let mut build = Command::new(cargo);
            build.args(["build", "-p", "gateway", "--bin", "keygate"]);
            if release {
                build.arg("--release");
            }
            let status = build.status().expect("run cargo build");
            assert!(status.success(), "building keygate failed");
            profile_dir.join("keygate")
        })
        .clone()
}

/// A development PKI on disk: the trusted CA, an untrusted one, and
/// client certificates issued on demand.
pub struct Pki {
    /// Where the PEM files are.
    pub dir: PathBuf,
    /// The CA the server trusts for clients.
    pub ca: DevCa,
    /// A CA it does not trust.
    pub other_ca: DevCa,
}

impl Pki {
    /// A CA, a server certificate for `localhost`/`127.0.0.1`, written to
    /// `dir` (a new CA each time: restarted services get new certificates).
    pub fn create(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        // Not of the development organization: production-profile tests
        // use this PKI as the organization's own (`tls.development_pki`).
        let ca = DevCa::generate_for("keygate test CA", "keygate tests").unwrap();
        let other_ca = DevCa::generate("some other CA").unwrap();
        let server = ca
            .issue_server_with_identity(
                &["localhost", "127.0.0.1"],
                KEY_SERVICE_IDENTITY,
                Validity::days(30),
            )
            .unwrap();
        write_private(&dir.join("server.key"), &server.key_pem);
        std::fs::write(dir.join("server.crt"), &server.cert_pem).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.cert_pem()).unwrap();
        Self { dir: dir.to_owned(), ca, other_ca }
    }
}

/// The URI SAN of every test key service's certificate, for sidecars
/// that pin it (`key_service.server_identity`).
pub const KEY_SERVICE_IDENTITY: &str = "spiffe://test/key-service";

/// Writes a file readable only by its owner.
pub fn write_private(path: &Path, contents: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(contents.as_bytes()).unwrap();
}

/// The policy most tests use.
pub const TEST_POLICY: &str = r#"
[[grant]]
identity = "spiffe://test/admin"
tenants = ["*"]
roles = ["admin", "auditor"]

[[grant]]
identity = "spiffe://test/officer"
tenants = ["*"]
roles = ["security_officer"]

[[grant]]
identity = "spiffe://test/admin-officer"
tenants = ["*"]
roles = ["admin", "security_officer"]

[[grant]]
identity = "spiffe://test/encryptor"
tenants = ["onc", "t-*"]
roles = ["encryptor"]

[[grant]]
identity = "spiffe://test/decryptor"
tenants = ["onc", "t-*"]
roles = ["decryptor"]
classes = ["*"]
purposes = ["*"]

[[grant]]
identity = "spiffe://test/auditor"
tenants = ["*"]
roles = ["auditor"]

[[grant]]
identity = "spiffe://test/sidecar-clinical"
tenants = ["onc", "t-*"]
roles = ["encryptor", "decryptor"]
classes = ["phi.*", "pii.*"]
purposes = ["*"]

[[grant]]
identity = "spiffe://test/sidecar-contact"
tenants = ["onc"]
roles = ["encryptor", "decryptor"]
classes = ["pii.contact"]
masked = ["phi.identifier"]
purposes = ["*"]

[[grant]]
identity = "spiffe://test/app-b"
tenants = ["b"]
roles = ["encryptor", "decryptor"]
classes = ["*"]
purposes = ["*"]
"#;

/// A running key service.
pub struct KeyService {
    /// The service's directory (config, policy, data, log).
    pub dir: PathBuf,
    /// Its PKI (shared by the replicas of a cluster).
    pub pki: Arc<Pki>,
    /// `https://localhost:PORT`.
    pub url: String,
    child: Option<Child>,
    clients: Mutex<HashMap<String, reqwest::Client>>,
    env: Vec<(String, String)>,
}

/// How to start a key service (all optional).
#[derive(Default)]
pub struct Options<'a> {
    /// TOML appended to the config (tables such as `[limits]`).
    pub extra: &'a str,
    /// The `[root]` section (default: a local development key in the dir).
    pub root: Option<&'a str>,
    /// Environment variables for the process.
    pub env: &'a [(&'a str, &'a str)],
    /// A PKI shared with other services (default: a new one in the dir).
    pub pki: Option<Arc<Pki>>,
    /// Audit chain instance name (default `ks-test`).
    pub instance: Option<&'a str>,
    /// `storage_url` (default: SQLite in the data dir).
    pub storage_url: Option<&'a str>,
    /// `storage_schema` (PostgreSQL schema of the keystore).
    pub storage_schema: Option<&'a str>,
}

/// The development root key section.
const DEV_ROOT: &str =
    "[root]\nprovider = \"dev_local\"\nkey_file = \"root.key\"\ncreate_if_missing = true\n";

impl KeyService {
    /// Writes PKI, policy and config into `dir` (keeping any that exist,
    /// so a restart reuses them) and starts the server with the local
    /// (development) root key.
    pub fn start(dir: &Path, extra_config: &str) -> Self {
        Self::start_with_root(dir, extra_config, DEV_ROOT, &[])
    }

    /// Like [`KeyService::start`] with another `[root]` section and extra
    /// environment variables for the process (e.g. `SOFTHSM2_CONF`).
    pub fn start_with_root(
        dir: &Path,
        extra_config: &str,
        root: &str,
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_with(
            dir,
            &Options { extra: extra_config, root: Some(root), env, ..Options::default() },
        )
    }

    /// The general form: see [`Options`].
    pub fn start_with(dir: &Path, options: &Options<'_>) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let pki = options.pki.clone().unwrap_or_else(|| Arc::new(Pki::create(&dir.join("pki"))));
        let policy = dir.join("policy.toml");
        if !policy.exists() {
            std::fs::write(&policy, TEST_POLICY).unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut storage =
            options.storage_url.map(|url| format!("storage_url = \"{url}\"\n")).unwrap_or_default();
        if let Some(schema) = options.storage_schema {
            storage.push_str(&format!("storage_schema = \"{schema}\"\n"));
        }
        let (instance, root, extra, pki_dir) = (
            options.instance.unwrap_or("ks-test"),
            options.root.unwrap_or(DEV_ROOT),
            options.extra,
            pki.dir.display(),
        );
        let config = format!(
            r#"
listen = "127.0.0.1:{port}"
data_dir = "data"
instance = "{instance}"
{storage}
[tls]
cert = "{pki_dir}/server.crt"
key = "{pki_dir}/server.key"
client_ca = "{pki_dir}/ca.crt"
reload_interval_secs = 1
{root}
[policy]
file = "policy.toml"
[audit]
checkpoint_every = 50
checkpoint_interval_secs = 1
{extra}
"#
        );
        if !dir.join("keygate.toml").exists() {
            std::fs::write(dir.join("keygate.toml"), config).unwrap();
        }
        let env = options.env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let mut service = Self {
            dir: dir.to_owned(),
            pki,
            url: String::new(),
            child: None,
            clients: Mutex::default(),
            env,
        };
        service.spawn();
        service
    }

    fn spawn(&mut self) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        let mut command = Command::new(keygate_binary());
        command.args(["server", "--config"]).arg(self.dir.join("keygate.toml")).stderr(stderr);
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        let (child, line) = spawn_until_first_line(command, || self.log());
        let url = line.rsplit(' ').next().unwrap().to_owned();
        assert!(url.starts_with("https://127.0.0.1:"), "{line}");
        // Certificates name "localhost"; keep the port.
        self.url = url.replace("127.0.0.1", "localhost");
        self.child = Some(child);
    }

    /// Stops the server (SIGTERM, waits for a clean exit).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    assert!(status.success(), "keygate exited with {status}; log:\n{}", self.log());
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            panic!("keygate did not stop on SIGTERM");
        }
    }

    /// Stops and starts again on the same directory.
    pub fn restart(&mut self) {
        self.stop();
        self.clients.lock().unwrap().clear();
        self.spawn();
    }

    /// Kills the process (SIGKILL): no shutdown, no flush.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a stopped service again (same port, same files).
    pub fn resume(&mut self) {
        self.clients.lock().unwrap().clear();
        self.spawn();
    }

    /// Sends SIGHUP (reload TLS material and policy).
    pub fn sighup(&self) {
        signal(self.child.as_ref().unwrap().id(), "HUP");
    }

    /// The process id (for /proc checks), while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// The keystore file.
    pub fn database(&self) -> PathBuf {
        self.dir.join("data/keystore.sqlite3")
    }

    /// An mTLS client presenting a certificate for `identity` from the
    /// trusted CA (reused across calls, so connections are kept alive).
    pub fn client(&self, identity: &str) -> reqwest::Client {
        self.clients
            .lock()
            .unwrap()
            .entry(identity.to_owned())
            .or_insert_with(|| {
                let cert = self.pki.ca.issue_client(identity, Validity::days(1)).unwrap();
                client_with(self.pki.ca.cert_pem(), Some((&cert.cert_pem, &cert.key_pem)))
            })
            .clone()
    }

    /// POST JSON as `identity`; returns status and body.
    pub async fn post(
        &self,
        identity: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let response = self
            .client(identity)
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// GET as `identity`; returns status and body text.
    pub async fn get(&self, identity: &str, path: &str) -> (u16, String) {
        let response =
            self.client(identity).get(format!("{}{path}", self.url)).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }
}

impl Drop for KeyService {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Spawns `command` with stdout piped and waits for its first stdout line
/// (the "listening on …" line every keygate process prints when ready);
/// panics with `log()` if none comes within a minute.
pub fn spawn_until_first_line(mut command: Command, log: impl Fn() -> String) -> (Child, String) {
    let mut child = command.stdout(Stdio::piped()).spawn().expect("start keygate");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        for _ in lines {}
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(line) => (child, line),
        Err(_) => {
            let _ = child.kill();
            panic!("keygate did not start; log:\n{}", log())
        }
    }
}

/// A client trusting `ca_pem`, presenting `identity` (cert, key) if given.
pub fn client_with(ca_pem: &str, identity: Option<(&str, &str)>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .timeout(Duration::from_secs(60));
    if let Some((cert, key)) = identity {
        let pem = format!("{cert}\n{key}");
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

/// Sends the process `pid` the signal `name` (`STOP`: a key service then
/// takes connections, as the kernel does, and answers nothing, as a hung
/// or partitioned one, until `CONT`).
pub fn signal(pid: u32, name: &str) {
    let status =
        Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}
