//! A moto KMS emulator (`moto_server`, PyPI `moto[server]`) on a free
//! loopback port, for one test.
//!
//! `moto_server` is taken from the venv of `.ci/install-test-deps`
//! (`$KEYGATE_TEST_VENV`, default `$HOME/.cache/keygate/venv`), else from
//! `PATH`. It runs under a small `sh` wrapper that stops it when its stdin
//! closes, so the server goes away with the test process even if that is
//! killed; [`MotoServer`] stops it on drop. moto keeps its state in
//! memory: a restarted server has no keys.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use hsm_adapters::AwsKmsConfig;
use tempfile::TempDir;

use super::{missing_tool, on_path, test_venv};

/// The region every test uses.
pub const REGION: &str = "eu-west-1";
/// The static access key id the tests use.
pub const ACCESS_KEY_ID: &str = "AKIAKEYGATETEST00001";
/// The static secret access key: distinctive, so tests can assert it never
/// appears in a log line or an error.
pub const SECRET_ACCESS_KEY: &str = "aws-secret-5c1d9e77-do-not-log";
/// How moto is installed outside `.ci/install-test-deps`.
const INSTALL: &str = "python3 -m venv ~/.cache/keygate/venv && \
                       ~/.cache/keygate/venv/bin/pip install 'moto[server]'";
/// Starts moto, then waits for stdin to close and stops it.
const WRAPPER: &str = r#"
"$0" -H 127.0.0.1 -p "$1" >"$2" 2>&1 &
pid=$!
cat >/dev/null
kill "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
exit 0
"#;
/// How long moto may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running moto server.
pub struct MotoServer {
    wrapper: Child,
    stdin: Option<ChildStdin>,
    port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl MotoServer {
    /// Starts moto on a free loopback port.
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// Starts moto on `port` (e.g. the port of a server stopped earlier).
    pub fn start_on(port: u16) -> Self {
        let binary = Self::binary();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        let mut wrapper = Command::new("sh")
            .arg("-c")
            .arg(WRAPPER)
            .arg(&binary)
            .arg(port.to_string())
            .arg(&log)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = wrapper.stdin.take();
        let server = Self { wrapper, stdin, port, log, _dir: dir };
        server.wait_until_listening();
        server
    }

    /// `moto_server`: from the test venv, else `PATH`.
    pub fn binary() -> PathBuf {
        test_venv()
            .map(|venv| venv.join("bin/moto_server"))
            .filter(|candidate| candidate.is_file())
            .or_else(|| on_path("moto_server"))
            .unwrap_or_else(|| missing_tool("moto_server", INSTALL))
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The socket address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Stops the server and waits until the port no longer accepts.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// A provider configuration for `key_id` on this server (short
    /// timeouts and backoff, two attempts), or on `endpoint` if given.
    pub fn config(&self, key_id: &str) -> AwsKmsConfig {
        config_for(&self.endpoint(), key_id)
    }

    /// Creates a symmetric encryption key; returns its ARN.
    pub async fn create_key(&self) -> String {
        let client = self.client().await;
        let key = client.create_key().description("keygate test master key").send().await.unwrap();
        key.key_metadata.unwrap().arn.unwrap()
    }

    /// Creates `alias` (`alias/…`) for `key_id`.
    pub async fn create_alias(&self, alias: &str, key_id: &str) {
        let client = self.client().await;
        client.create_alias().alias_name(alias).target_key_id(key_id).send().await.unwrap();
    }

    async fn client(&self) -> aws_sdk_kms::Client {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(REGION))
            .endpoint_url(self.endpoint())
            .credentials_provider(credentials())
            .load()
            .await;
        aws_sdk_kms::Client::new(&config)
    }

    /// Waits until moto answers its own API (not just anything listening
    /// on the port, which a port race could produce).
    fn wait_until_listening(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer on port {} within {START_TIMEOUT:?}:\n{}",
                self.port,
                self.log_contents()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Whether `GET /moto-api/data.json` answers 200.
    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let request = "GET /moto-api/data.json HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
        let mut status = [0u8; 12];
        stream.write_all(request.as_bytes()).is_ok()
            && stream.read_exact(&mut status).is_ok()
            && status.starts_with(b"HTTP/1.")
            && status.ends_with(b" 200")
    }

    /// What moto logged.
    pub fn log_contents(&self) -> String {
        let mut contents = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log) {
            let _ = file.read_to_string(&mut contents);
        }
        contents
    }

    fn shutdown(&mut self) {
        // Closing stdin ends `cat`; the wrapper then stops moto and exits.
        if self.stdin.take().is_none() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.wrapper.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.wrapper.kill();
                let _ = self.wrapper.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A provider configuration for `key_id` at `endpoint`: 2 s per attempt,
/// two attempts, 20 ms initial backoff (so outage tests stay fast).
pub fn config_for(endpoint: &str, key_id: &str) -> AwsKmsConfig {
    let mut config = AwsKmsConfig::new(REGION, key_id);
    config.endpoint_url = Some(endpoint.to_owned());
    config.timeout = Duration::from_secs(2);
    config.max_attempts = 2;
    config.initial_backoff = Duration::from_millis(20);
    config
}

/// The static test credentials.
pub fn credentials() -> SharedCredentialsProvider {
    SharedCredentialsProvider::new(Credentials::new(
        ACCESS_KEY_ID,
        SECRET_ACCESS_KEY,
        None,
        None,
        "keygate-tests",
    ))
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
}
