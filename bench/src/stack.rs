//! keygate's own stack for the benchmark: a key service (SQLite keystore,
//! local development root key, audit chain with group commit) and two
//! sidecars — one as deployed (DEK pool and DEK cache), one with the DEK
//! cache turned off (`cache.max_entries = 0`) so that every decrypt has
//! its DEKs unwrapped by the key service — each a real `keygate` process
//! with its own PID, in a temporary directory removed afterwards.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gateway::pki::{DevCa, Validity};
use gateway::up::PATIENT_SCHEMA;

use crate::error::{BenchError, Result, bail};

/// The tenant every scenario uses.
pub(crate) const TENANT: &str = "bench";
const ADMIN: &str = "spiffe://bench/admin";
const SIDECAR: &str = "spiffe://bench/sidecar";
const DATAKEYS: &str = "spiffe://bench/datakeys";

const POLICY: &str = r#"
[[grant]]
identity = "spiffe://bench/admin"
tenants = ["*"]
roles = ["admin", "auditor"]

[[grant]]
identity = "spiffe://bench/sidecar"
tenants = ["bench"]
roles = ["encryptor", "decryptor"]
classes = ["*"]
purposes = ["*"]

[[grant]]
identity = "spiffe://bench/datakeys"
tenants = ["bench"]
roles = ["encryptor"]
"#;

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub(crate) struct Process {
    name: &'static str,
    child: Option<Child>,
    pid: u32,
}

impl Process {
    /// Starts `command` and waits (up to a minute) for the first line it
    /// prints on stdout, which every keygate and OpenBao process prints
    /// once it listens; `log` is shown if none comes.
    pub(crate) fn spawn_until_line(
        name: &'static str,
        mut command: Command,
        log: &Path,
        ready: impl Fn(&str) -> bool + Send + 'static,
    ) -> Result<(Self, String)> {
        let stderr = std::fs::File::create(log)?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| BenchError(format!("cannot start {name}: {e}")))?;
        let pid = child.id();
        let stdout = child.stdout.take();
        let mut process = Self { name, child: Some(child), pid };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let Some(stdout) = stdout else { return };
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && ready(&line) {
                    sent = tx.send(line).is_ok();
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => Ok((process, line)),
            Err(_) => {
                process.stop();
                let text = std::fs::read_to_string(log).unwrap_or_default();
                bail!("{name} did not start within a minute; its log:\n{text}")
            }
        }
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGTERM, up to 15 s for a clean exit, then SIGKILL; always reaped.
    pub(crate) fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.name);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The running stack. Processes stop before the directory is removed
/// (fields drop in declaration order).
pub(crate) struct Stack {
    pub(crate) sidecar: Process,
    pub(crate) cold_sidecar: Process,
    pub(crate) key_service: Process,
    /// `https://localhost:PORT`.
    pub(crate) ks_url: String,
    /// mTLS client for the admin identity (tenant creation, rotation).
    pub(crate) admin: reqwest::Client,
    /// mTLS client for an encryptor identity (datakeys scenario).
    pub(crate) datakeys: reqwest::Client,
    pub(crate) sidecar_socket: PathBuf,
    pub(crate) cold_socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Stack {
    /// Writes a PKI, policy, schema and configs, starts the three
    /// processes and creates the tenant. The sidecar's DEK cache holds at
    /// least `warm` DEKs (the warm set's).
    pub(crate) async fn start(keygate: &Path, warm: usize) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("keygate-bench-").tempdir()?;
        let root = dir.path();
        let ca = DevCa::generate("keygate-bench CA").map_err(|e| BenchError(e.to_string()))?;
        let issue = |uri: &str| {
            ca.issue_client(uri, Validity::days(2)).map_err(|e| BenchError(e.to_string()))
        };
        let server = ca
            .issue_server(&["localhost", "127.0.0.1"], Validity::days(2))
            .map_err(|e| BenchError(e.to_string()))?;
        write_private(&root.join("server.key"), &server.key_pem)?;
        std::fs::write(root.join("server.crt"), &server.cert_pem)?;
        std::fs::write(root.join("ca.crt"), ca.cert_pem())?;
        let sidecar_cert = issue(SIDECAR)?;
        std::fs::write(root.join("sidecar.crt"), &sidecar_cert.cert_pem)?;
        write_private(&root.join("sidecar.key"), &sidecar_cert.key_pem)?;
        std::fs::write(root.join("policy.toml"), POLICY)?;
        std::fs::write(root.join("patient.toml"), PATIENT_SCHEMA)?;

        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        std::fs::write(
            root.join("keygate.toml"),
            format!(
                r#"listen = "127.0.0.1:{port}"
data_dir = "data"
instance = "bench"
[tls]
cert = "server.crt"
key = "server.key"
client_ca = "ca.crt"
[root]
provider = "dev_local"
key_file = "root.key"
create_if_missing = true
[policy]
file = "policy.toml"
[log]
level = "warn"
# Throughput, not the per-identity rate limiter, is measured: one sidecar
# makes a key service call per single-record decrypt-cold or rewrap, more
# than the default 5,000 a second at c=64 on a fast machine.
[abuse]
rate_per_sec = 1000000.0
burst = 1000000
"#
            ),
        )?;
        let mut command = Command::new(keygate);
        command.arg("server").arg("--config").arg(root.join("keygate.toml"));
        let (key_service, line) =
            Process::spawn_until_line("key service", command, &root.join("server.log"), |l| {
                l.contains("listening")
            })?;
        let url = line.rsplit(' ').next().unwrap_or_default().replace("127.0.0.1", "localhost");
        if !url.starts_with("https://localhost:") {
            bail!("unexpected key service banner: {line}");
        }

        let client = |uri: &str| -> Result<reqwest::Client> {
            let cert = issue(uri)?;
            mtls_client(ca.cert_pem(), &cert.cert_pem, &cert.key_pem)
        };
        let admin = client(ADMIN)?;
        let datakeys = client(DATAKEYS)?;
        let created = admin
            .post(format!("{url}/v1/tenants"))
            .json(&serde_json::json!({ "tenant": TENANT }))
            .send()
            .await?;
        if created.status().as_u16() != 201 {
            let body = created.text().await.unwrap_or_default();
            bail!("creating tenant {TENANT} failed: {body}");
        }

        let start_sidecar = |name: &str, cache: &str| -> Result<(Process, PathBuf)> {
            let socket = root.join(format!("{name}.sock"));
            let config = root.join(format!("{name}.toml"));
            std::fs::write(
                &config,
                format!(
                    r#"listen = {{ unix = "{name}.sock" }}
schemas = ["patient.toml"]
app_identity = "spiffe://bench/app"
[key_service]
urls = ["{url}"]
ca = "ca.crt"
cert = "sidecar.crt"
key = "sidecar.key"
[cache]
{cache}
[log]
level = "warn"
"#
                ),
            )?;
            let mut command = Command::new(keygate);
            command.arg("sidecar").arg("--config").arg(&config);
            let log = root.join(format!("{name}.log"));
            let (process, _) =
                Process::spawn_until_line("sidecar", command, &log, |l| l.contains("listening"))?;
            Ok((process, socket))
        };
        // The warm set must stay cached for the whole run: a TTL of ten
        // minutes (the default, 60 s, bounds how long a shred takes to
        // reach the sidecar; it does not change the cost of a hit).
        let (sidecar, sidecar_socket) = start_sidecar("sidecar", &warm_cache(warm))?;
        let (cold_sidecar, cold_socket) = start_sidecar("cold", "ttl_secs = 600\nmax_entries = 0")?;
        let stack = Self {
            sidecar,
            cold_sidecar,
            key_service,
            ks_url: url,
            admin,
            datakeys,
            sidecar_socket,
            cold_socket,
            dir,
        };
        for socket in [&stack.sidecar_socket, &stack.cold_socket] {
            wait_ready(&unix_client(socket)?).await?;
        }
        Ok(stack)
    }

    /// Rotates the tenant's KEK (new active version), for the rewrap scenario.
    pub(crate) async fn rotate(&self) -> Result<()> {
        let response = self
            .admin
            .post(format!("{}/v1/tenants/{TENANT}/keys/rotate", self.ks_url))
            .json(&serde_json::json!({}))
            .send()
            .await?;
        if !response.status().is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("rotating the KEK failed: {body}");
        }
        Ok(())
    }

    /// Where the logs are (kept only while the stack runs).
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// The warm sidecar's `[cache]` settings: a TTL of ten minutes, and room
/// for the whole warm set. The default size (100,000 DEKs) is kept when
/// the warm set fits, since the cache reserves its slab for `max_entries`
/// and the sidecar's resident set is measured as deployed; a larger warm
/// set gets a cache of its size (else decrypt-warm would miss, and fail).
fn warm_cache(warm: usize) -> String {
    let default = gateway::sidecar::config::CacheConfig::default().max_entries;
    if warm > default {
        format!("ttl_secs = 600\nmax_entries = {warm}")
    } else {
        "ttl_secs = 600".to_owned()
    }
}

/// Waits until a sidecar answers `/readyz` with 200.
pub(crate) async fn wait_ready(client: &reqwest::Client) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = client.get("http://localhost/readyz").send().await.map(|r| r.status());
        match status {
            Ok(s) if s.is_success() => return Ok(()),
            _ if Instant::now() > deadline => bail!("sidecar not ready after 30 s: {status:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// An HTTP client for a sidecar's unix socket (connections kept alive).
pub(crate) fn unix_client(socket: &Path) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .unix_socket(socket.to_owned())
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(120))
        .build()?)
}

/// An mTLS client trusting `ca_pem` and presenting `cert_pem`/`key_pem`.
pub(crate) fn mtls_client(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<reqwest::Client> {
    let identity = reqwest::Identity::from_pem(format!("{cert_pem}\n{key_pem}").as_bytes())?;
    Ok(reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes())?])
        .identity(identity)
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(120))
        .build()?)
}

/// Finds the `keygate` binary: the one given, else — when run through
/// cargo — builds it in this binary's profile, else the one beside this
/// binary.
pub(crate) fn keygate_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        if !path.is_file() {
            bail!("--keygate {}: no such file", path.display());
        }
        return Ok(path.to_owned());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or("the bench binary has no directory")?;
    let beside = dir.join("keygate");
    if let Ok(cargo) = std::env::var("CARGO") {
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "-p", "gateway", "--bin", "keygate"]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status()?;
        if !status.success() {
            bail!("building keygate failed ({status})");
        }
    }
    if !beside.is_file() {
        bail!(
            "no keygate binary at {}: build it (`cargo build --release -p gateway`) or pass --keygate",
            beside.display()
        );
    }
    Ok(beside)
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warm_cache_holds_the_warm_set() {
        assert_eq!(warm_cache(2_000), "ttl_secs = 600");
        assert_eq!(warm_cache(100_000), "ttl_secs = 600");
        assert_eq!(warm_cache(150_000), "ttl_secs = 600\nmax_entries = 150000");
    }
}
