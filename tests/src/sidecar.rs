//! Running a real `keygate sidecar` process beside a test key service.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use gateway::pki::{DevCa, Validity};
use serde_json::Value;

use crate::PATIENT_SCHEMA;
use crate::keyservice::{KeyService, Pki, keygate_binary, spawn_until_first_line, write_private};

/// A running sidecar, listening on a unix socket (or loopback TCP).
pub struct Sidecar {
    /// Its directory (config, certificate, socket, log).
    pub dir: PathBuf,
    /// The socket apps talk to (unused when listening on TCP).
    pub socket: PathBuf,
    /// `http://localhost` on the socket, `http://127.0.0.1:PORT` on TCP.
    pub base: String,
    child: Option<Child>,
    http: reqwest::Client,
}

/// Where a test sidecar listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `sidecar.sock` in its directory.
    Unix,
    /// A free loopback TCP port.
    Tcp,
}

impl Sidecar {
    /// Starts a sidecar with the client identity `identity` (a certificate
    /// from the key service's CA) and `extra` TOML appended to its config.
    pub fn start(ks: &KeyService, dir: &Path, identity: &str, extra: &str) -> Self {
        Self::start_with(&ks.pki, std::slice::from_ref(&ks.url), dir, identity, extra)
    }

    /// Like [`Sidecar::start`], listening on a loopback TCP port.
    pub fn start_tcp(ks: &KeyService, dir: &Path, identity: &str, extra: &str) -> Self {
        Self::start_on(&ks.pki, std::slice::from_ref(&ks.url), dir, identity, extra, Transport::Tcp)
    }

    /// A sidecar talking to several key-service replicas (failover in order).
    pub fn start_with(pki: &Pki, urls: &[String], dir: &Path, identity: &str, extra: &str) -> Self {
        Self::start_on(pki, urls, dir, identity, extra, Transport::Unix)
    }

    /// The general form.
    pub fn start_on(
        pki: &Pki,
        urls: &[String],
        dir: &Path,
        identity: &str,
        extra: &str,
        transport: Transport,
    ) -> Self {
        Self::start_with_key_service(pki, urls, dir, identity, "", extra, transport)
    }

    /// Like [`Sidecar::start_on`], with `key_service` (TOML lines such as
    /// `server_identity = "…"`) added to its `[key_service]` table.
    pub fn start_with_key_service(
        pki: &Pki,
        urls: &[String],
        dir: &Path,
        identity: &str,
        key_service: &str,
        extra: &str,
        transport: Transport,
    ) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let cert = pki.ca.issue_client(identity, Validity::days(1)).unwrap();
        std::fs::write(dir.join("sidecar.crt"), &cert.cert_pem).unwrap();
        write_private(&dir.join("sidecar.key"), &cert.key_pem);
        std::fs::write(dir.join("ca.crt"), pki.ca.cert_pem()).unwrap();
        let urls: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
        let urls = urls.join(", ");
        // A test may have written schemas of its own there.
        if !dir.join("patient.toml").exists() {
            std::fs::write(dir.join("patient.toml"), PATIENT_SCHEMA).unwrap();
        }
        let socket = dir.join("sidecar.sock");
        // Top-level keys of `extra` go before the first table, tables after.
        let split = if extra.starts_with('[') {
            0
        } else {
            extra.find("\n[").map_or(extra.len(), |i| i + 1)
        };
        let (top, tables) = extra.split_at(split);
        let audit =
            if tables.contains("[audit]") { "" } else { "[audit]\nflush_interval_ms = 100\n" };
        let listen = match transport {
            Transport::Unix => "{ unix = \"sidecar.sock\" }".to_owned(),
            Transport::Tcp => {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port();
                format!("{{ tcp = \"127.0.0.1:{port}\" }}")
            }
        };
        let config = format!(
            r#"
{top}
listen = {listen}
schemas = ["patient.toml"]
app_identity = "spiffe://test/app"
[key_service]
urls = [{urls}]
ca = "ca.crt"
cert = "sidecar.crt"
key = "sidecar.key"
timeout_ms = 2000
{key_service}
{audit}
{tables}
"#,
        );
        std::fs::write(dir.join("sidecar.toml"), config).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("sidecar.log"))
            .unwrap();
        let mut command = Command::new(keygate_binary());
        command.args(["sidecar", "--config"]).arg(dir.join("sidecar.toml")).stderr(log);
        let log_path = dir.join("sidecar.log");
        let (child, line) = spawn_until_first_line(command, || {
            std::fs::read_to_string(&log_path).unwrap_or_default()
        });
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(60));
        let base = match transport {
            Transport::Unix => {
                assert!(line.contains("listening on unix:"), "{line}");
                http = http.unix_socket(socket.clone());
                "http://localhost".to_owned()
            }
            Transport::Tcp => {
                let url = line.rsplit(' ').next().unwrap();
                assert!(url.starts_with("http://127.0.0.1:"), "{line}");
                url.to_owned()
            }
        };
        Self { dir: dir.to_owned(), socket, base, child: Some(child), http: http.build().unwrap() }
    }

    /// The process id (for /proc checks).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Replaces its client certificate and key with a certificate of
    /// `identity` from `ca`, each file by a rename (a new inode), as
    /// cert-manager and SPIRE agents renew them.
    pub fn renew_certificate(&self, ca: &DevCa, identity: &str) {
        let cert = ca.issue_client(identity, Validity::days(1)).unwrap();
        let next = self.dir.join("next.pem");
        std::fs::write(&next, &cert.cert_pem).unwrap();
        std::fs::rename(&next, self.dir.join("sidecar.crt")).unwrap();
        write_private(&next, &cert.key_pem);
        std::fs::rename(&next, self.dir.join("sidecar.key")).unwrap();
    }

    /// Sends SIGHUP (reload the key service client's TLS files).
    pub fn sighup(&self) {
        let pid = self.pid().unwrap().to_string();
        let status = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
        assert!(status.success(), "kill -HUP {pid}");
    }

    /// A new HTTP client to this sidecar (its own connections).
    pub fn new_client(&self) -> reqwest::Client {
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(60));
        if self.base == "http://localhost" {
            http = http.unix_socket(self.socket.clone());
        }
        http.build().unwrap()
    }

    /// POST JSON to the sidecar; returns status and body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, serde_json::to_vec(body).unwrap()).await
    }

    /// POST raw bytes as JSON.
    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// GET; returns status and body text.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self.http.get(format!("{}{path}", self.base)).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// Stops the sidecar with SIGTERM (it flushes its audit events).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
        }
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sidecar.log")).unwrap_or_default()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
