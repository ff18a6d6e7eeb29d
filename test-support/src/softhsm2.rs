//! A throwaway SoftHSM2 token for one test, without the PKCS#11 side
//! (sessions, provider configurations), which stays with each caller.
//!
//! SoftHSM2 reads its configuration file from `SOFTHSM2_CONF` when the
//! module is initialized, once per process, and setting an environment
//! variable inside a running (multi-threaded) test process is unsound. So
//! [`for_test`] creates the token in a temporary directory
//! (`<tmp>/softhsm2.conf`, `<tmp>/tokens/`, `softhsm2-util --init-token`)
//! and runs the calling test again in a child process of the test binary,
//! with `SOFTHSM2_CONF` and `KEYGATE_TEST_SOFTHSM2_DIR=<tmp>` set; in the
//! child, `for_test` returns the token. The parent checks the child passed,
//! that it really ran the test, and that its output holds no PIN; then the
//! temporary directory is removed.
//!
//! The module is `$KEYGATE_TEST_PKCS11_MODULE`, else the first of the
//! usual install paths that exists (`/usr/lib/softhsm/libsofthsm2.so`, …).
//! A missing module or `softhsm2-util` fails the test, naming the install
//! command (it never skips).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

/// Label of the test token.
pub const TOKEN_LABEL: &str = "keygate-test";
/// The token's user PIN: distinctive, so tests can assert it never
/// appears in a log line, an error or a test's output.
pub const USER_PIN: &str = "user-pin-7f3a91c2-do-not-log";
/// The token's security officer PIN.
pub const SO_PIN: &str = "so-pin-2b8e44d0-do-not-log";
/// Environment variable that marks the child process and names its token
/// directory.
const CHILD_ENV: &str = "KEYGATE_TEST_SOFTHSM2_DIR";
/// Where distributions install the SoftHSM2 module.
const MODULE_CANDIDATES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
];
/// How the tools are installed on Debian.
const INSTALL: &str = "apt-get install softhsm2";

/// Which side of [`in_child_process`] this is; `T` is the caller's wrapper
/// of the token (see [`InProcess::map_child`]).
pub enum InProcess<T = Token> {
    /// The child: the token is usable here.
    Child(T),
    /// The parent: the child has finished with this output.
    Parent(Output),
}

impl<T> InProcess<T> {
    /// Wraps the child's token with `f`.
    pub fn map_child<U>(self, f: impl FnOnce(T) -> U) -> InProcess<U> {
        match self {
            Self::Child(token) => InProcess::Child(f(token)),
            Self::Parent(output) => InProcess::Parent(output),
        }
    }
}

/// In the parent process: creates a token and runs `test` (its full name
/// as the test binary knows it, e.g. `pkcs11::round_trip`) in a child
/// process that sees it, asserts the child passed, really ran the test and
/// printed no PIN, and returns `None`. In that child: returns the token.
pub fn for_test(test: &str) -> Option<Token> {
    let output = match in_child_process(&[test, "--exact", "--nocapture", "--test-threads=1"]) {
        InProcess::Child(token) => return Some(token),
        InProcess::Parent(output) => output,
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{test} failed in its SoftHSM2 child process:\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(stdout.contains("1 passed"), "the child process did not run {test}:\n{stdout}");
    for pin in [USER_PIN, SO_PIN] {
        assert!(
            !stdout.contains(pin) && !stderr.contains(pin),
            "a PIN appears in the output of {test}"
        );
    }
    None
}

/// In the parent process: creates a token, runs this executable again with
/// `args` in a child process that sees it, and returns the child's output.
/// In that child: returns the token.
pub fn in_child_process(args: &[&str]) -> InProcess {
    let module = module_path();
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        return InProcess::Child(Token { dir: PathBuf::from(dir), module, _owned: None });
    }
    let token = Token::create_with(module);
    let output = Command::new(std::env::current_exe().unwrap())
        .args(args)
        .env("SOFTHSM2_CONF", token.conf())
        .env(CHILD_ENV, &token.dir)
        .output()
        .unwrap();
    InProcess::Parent(output)
}

/// The SoftHSM2 module; fails naming the install command if absent.
fn module_path() -> PathBuf {
    let module = match std::env::var_os("KEYGATE_TEST_PKCS11_MODULE") {
        Some(module) => Some(PathBuf::from(module)).filter(|module| module.is_file()),
        None => MODULE_CANDIDATES.iter().map(PathBuf::from).find(|module| module.is_file()),
    };
    module.unwrap_or_else(|| missing_tool("the SoftHSM2 PKCS#11 module"))
}

/// Fails the test because `tool` is missing, naming the install command.
fn missing_tool(tool: &str) -> ! {
    panic!(
        "{tool} is required by the PKCS#11 tests but was not found.\n\
         Install the test tools with `.ci/install-test-deps` (as root, or with sudo), or: {INSTALL}"
    )
}

/// A SoftHSM2 token: its directory (configuration file and token storage)
/// and the module.
pub struct Token {
    dir: PathBuf,
    module: PathBuf,
    /// Set in the process that created the directory, which removes it.
    _owned: Option<TempDir>,
}

impl Token {
    /// A fresh token in a new temporary directory, without loading the
    /// module in this process (for tests that hand the token to another
    /// process via `SOFTHSM2_CONF`).
    pub fn create() -> Self {
        Self::create_with(module_path())
    }

    /// Creates the directory, configuration file and token.
    fn create_with(module: PathBuf) -> Self {
        let owned = tempfile::tempdir().unwrap();
        let token = Self { dir: owned.path().to_owned(), module, _owned: Some(owned) };
        std::fs::create_dir(token.tokens_dir()).unwrap();
        std::fs::write(
            token.conf(),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n\
                 slots.removable = false\n",
                token.tokens_dir().display()
            ),
        )
        .unwrap();
        // The PINs are on this throwaway token's command line; keygate itself
        // never takes a PIN as an argument.
        let output = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", TOKEN_LABEL])
            .args(["--so-pin", SO_PIN, "--pin", USER_PIN])
            .env("SOFTHSM2_CONF", token.conf())
            .output()
            .unwrap_or_else(|e| missing_tool(&format!("softhsm2-util ({e})")));
        assert!(
            output.status.success(),
            "softhsm2-util --init-token failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        token
    }

    /// The configuration file.
    pub fn conf(&self) -> PathBuf {
        self.dir.join("softhsm2.conf")
    }

    /// The token storage directory.
    pub fn tokens_dir(&self) -> PathBuf {
        self.dir.join("tokens")
    }

    /// The module.
    pub fn module(&self) -> &Path {
        &self.module
    }
}
