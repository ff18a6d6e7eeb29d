//! A throwaway SoftHSM2 token for one unit test.
//!
//! SoftHSM2 reads its configuration file from `SOFTHSM2_CONF` once per
//! process, and setting an environment variable in a running test process
//! is unsound; so, as in `tests/src/providers/softhsm2.rs`,
//! [`Token::for_test`] creates the token in a temporary directory and runs
//! the calling test again in a child process of the test binary that sees
//! it; in the child, `for_test` returns the token. The parent checks that
//! the child passed, really ran the test and printed no PIN.

use std::path::{Path, PathBuf};
use std::process::Command;

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::session::{Session, UserType};
use secrecy::SecretString;

use super::super::{Pkcs11Config, module};

/// Label of the test token.
pub(super) const TOKEN_LABEL: &str = "hsm-adapters-test";
/// The token's user PIN: distinctive, so the parent can check it is
/// never printed.
pub(super) const USER_PIN: &str = "user-pin-0c51d7e2-do-not-print";
/// The token's security officer PIN.
const SO_PIN: &str = "so-pin-93fa0b6e-do-not-print";
/// Marks the child process and names its token directory.
const CHILD_ENV: &str = "KEYGATE_HSM_ADAPTERS_TEST_SOFTHSM2_DIR";
/// Where distributions install the SoftHSM2 module.
const MODULE_CANDIDATES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
];

/// The test token, in the child process.
pub(super) struct Token {
    module: PathBuf,
}

impl Token {
    /// In the parent process: creates a token, runs `test` (its path as
    /// `module_path!()` gives it, plus `::name`) in a child process that
    /// sees it, asserts the child passed and returns `None`. In that
    /// child: returns the token.
    pub(super) fn for_test(test: &str) -> Option<Self> {
        let module = module_path();
        if std::env::var_os(CHILD_ENV).is_some() {
            return Some(Self { module });
        }
        let test = test.strip_prefix("hsm_adapters::").unwrap_or(test);
        let dir = tempfile::tempdir().unwrap();
        let conf = create_token(dir.path());
        let output = Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env("SOFTHSM2_CONF", &conf)
            .env(CHILD_ENV, dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{test} failed in its SoftHSM2 child process:\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        );
        assert!(stdout.contains("1 passed"), "the child process did not run {test}:\n{stdout}");
        for pin in [USER_PIN, SO_PIN] {
            assert!(!stdout.contains(pin) && !stderr.contains(pin), "a PIN appears in the output");
        }
        None
    }

    /// A provider configuration for the test token and `key_label`.
    pub(super) fn config(&self, key_label: &str) -> Pkcs11Config {
        Pkcs11Config::new(&self.module, TOKEN_LABEL, key_label, SecretString::from(USER_PIN))
    }

    /// A read-write session logged in as the user, on the provider's own
    /// instance of the module (login state is shared with the provider).
    pub(super) fn user_session(&self) -> Session {
        let module = module::load(&self.module).unwrap();
        let slot = module::find_token(module.context(), TOKEN_LABEL).unwrap();
        let session = module.context().open_rw_session(slot).unwrap();
        match session.login(UserType::User, Some(&SecretString::from(USER_PIN))) {
            Ok(()) | Err(CryptokiError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => panic!("C_Login: {e}"),
        }
        session
    }
}

/// The SoftHSM2 module; fails naming the install command if absent.
fn module_path() -> PathBuf {
    let module = match std::env::var_os("KEYGATE_TEST_PKCS11_MODULE") {
        Some(module) => Some(PathBuf::from(module)).filter(|module| module.is_file()),
        None => MODULE_CANDIDATES.iter().map(PathBuf::from).find(|module| module.is_file()),
    };
    module.unwrap_or_else(|| panic!("the SoftHSM2 module is missing: apt-get install softhsm2"))
}

/// Writes `dir/softhsm2.conf`, initializes the test token in `dir/tokens`
/// and returns the configuration file.
fn create_token(dir: &Path) -> PathBuf {
    let tokens = dir.join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n\
             slots.removable = false\n",
            tokens.display()
        ),
    )
    .unwrap();
    // The PINs are on this throwaway token's command line only.
    let output = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", TOKEN_LABEL])
        .args(["--so-pin", SO_PIN, "--pin", USER_PIN])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap_or_else(|e| panic!("softhsm2-util: {e} (apt-get install softhsm2)"));
    assert!(
        output.status.success(),
        "softhsm2-util --init-token failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    conf
}
