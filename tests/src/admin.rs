//! Running `keygate admin …` as a subprocess against a test key service:
//! an admin certificate and profile on disk, a clean environment, and
//! assertions on exit codes and one-line errors.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use gateway::pki::{IssuedCert, Validity};
use serde_json::Value;

use crate::keyservice::{KeyService, keygate_binary, write_private};

/// The admin identity of [`crate::keyservice::TEST_POLICY`].
pub const ADMIN: &str = "spiffe://test/admin";
/// The auditor identity (no admin role).
pub const AUDITOR: &str = "spiffe://test/auditor";

/// An admin's files (certificate, key, CA, profile) for one key service.
pub struct Admin {
    /// Where the files are; also `HOME` for the process.
    pub dir: PathBuf,
    /// The profile file (`url`, `ca`, `cert`, `key`).
    pub profile: PathBuf,
}

impl Admin {
    /// A certificate for `identity` from the service's trusted CA, and a
    /// profile pointing at the service.
    pub fn new(ks: &KeyService, dir: &Path, identity: &str) -> Self {
        let cert = ks.pki.ca.issue_client(identity, Validity::days(1)).unwrap();
        Self::with_cert(ks, dir, &cert)
    }

    /// A profile presenting `cert` (from any CA) to the service.
    pub fn with_cert(ks: &KeyService, dir: &Path, cert: &IssuedCert) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("admin.crt"), &cert.cert_pem).unwrap();
        write_private(&dir.join("admin.key"), &cert.key_pem);
        std::fs::write(dir.join("ca.crt"), ks.pki.ca.cert_pem()).unwrap();
        let profile = dir.join("admin.toml");
        std::fs::write(
            &profile,
            format!(
                "url = \"{}\"\nca = \"ca.crt\"\ncert = \"admin.crt\"\nkey = \"admin.key\"\n",
                ks.url
            ),
        )
        .unwrap();
        Self { dir: dir.to_owned(), profile }
    }

    /// `keygate admin --profile P ARGS…`.
    pub fn run(&self, args: &[&str]) -> Run {
        self.run_with_stdin(args, None)
    }

    /// Like [`Admin::run`], feeding `stdin`.
    pub fn run_with_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Run {
        let mut full: Vec<&OsStr> = vec![OsStr::new("admin"), OsStr::new("--profile")];
        full.push(self.profile.as_os_str());
        full.extend(args.iter().map(OsStr::new));
        keygate(&full, &self.dir, &[], stdin)
    }
}

/// Runs `keygate ARGS…` with `HOME` set to `home`, no `KEYGATE_ADMIN_…` or
/// `XDG_CONFIG_HOME` from the test's environment, `RUST_BACKTRACE=1` (so
/// a panic would show), plus `env`.
pub fn keygate(args: &[&OsStr], home: &Path, env: &[(&str, &OsStr)], stdin: Option<&[u8]>) -> Run {
    let mut command = Command::new(keygate_binary());
    command.args(args).env("HOME", home).env("RUST_BACKTRACE", "1").env_remove("XDG_CONFIG_HOME");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEYGATE_ADMIN_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().map(|(k, v)| (*k, *v)));
    command.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("start keygate");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let input = input.to_vec();
        // Write on a thread: the child may stop reading (bad input) early.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let output = child.wait_with_output().unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        args: args.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" "),
    }
}

/// What a `keygate` run did.
#[derive(Debug)]
pub struct Run {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// The arguments, for failure messages.
    pub args: String,
}

impl Run {
    /// Asserts exit code 0 and returns itself.
    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "keygate {} failed\nstdout:\n{}\nstderr:\n{}",
            self.args, self.stdout, self.stderr
        );
        self
    }

    /// Stdout as one JSON document.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!("keygate {}: stdout is not JSON ({e}):\n{}", self.args, self.stdout)
        })
    }

    /// Stdout as JSON lines.
    #[track_caller]
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!("keygate {}: line is not JSON ({e}): {l}", self.args)
                })
            })
            .collect()
    }

    /// Asserts exit code `code` and that stderr is exactly one line
    /// `error: …` with no panic, backtrace or `Debug` dump; returns it.
    #[track_caller]
    pub fn fails(&self, code: i32) -> &str {
        assert_eq!(
            self.code, code,
            "keygate {}: expected exit {code}\nstdout:\n{}\nstderr:\n{}",
            self.args, self.stdout, self.stderr
        );
        assert_one_error_line(&self.stderr, &self.args);
        self.stderr.trim_end()
    }
}

/// Asserts `stderr` is one line starting with `error: ` and shows no
/// panic, backtrace or `Debug` formatting.
#[track_caller]
pub fn assert_one_error_line(stderr: &str, what: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "keygate {what}: stderr is not one line:\n{stderr}");
    let line = lines.first().copied().unwrap_or_default();
    assert!(line.starts_with("error: "), "keygate {what}: {line}");
    for bad in
        ["panicked", "backtrace", "RUST_BACKTRACE", "Error {", "Os {", "kind: ", "Some(", "None,"]
    {
        assert!(!line.contains(bad), "keygate {what}: stderr shows {bad:?}: {line}");
    }
}

/// A free loopback TCP port (nothing listens on it afterwards).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
