//! Root key provider test environment: a throwaway SoftHSM2 token and a
//! moto KMS server that the tests start (and tear down) themselves, the
//! provider contract suite that every provider must pass, and a log
//! capture to prove secrets never reach a log line.
//!
//! External tools come from `.ci/install-test-deps`; when one is missing
//! the fixture fails with the command that installs it (it never skips).

pub mod contract;
pub mod logs;
pub mod moto;
pub mod softhsm2;
pub mod tcp_proxy;

use std::path::PathBuf;

/// The fixed place `.ci/install-test-deps` puts its Python venv:
/// `$KEYGATE_TEST_VENV`, else `$HOME/.cache/keygate/venv`.
pub fn test_venv() -> Option<PathBuf> {
    if let Some(venv) = std::env::var_os("KEYGATE_TEST_VENV") {
        return Some(PathBuf::from(venv));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/keygate/venv"))
}

/// The first `name` on `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| candidate.is_file())
}

/// Fails the test because `tool` is missing, naming the install command.
pub fn missing_tool(tool: &str, install: &str) -> ! {
    panic!(
        "{tool} is required by the root key provider tests but was not found.\n\
         Install the test tools with `.ci/install-test-deps` (as root, or with sudo), or: {install}"
    )
}
