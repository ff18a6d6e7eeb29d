//! Configuration of the PKCS#11 provider, and where its PIN comes from.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use super::error::Pkcs11Error;
use crate::secret_file::read_secret_file;

/// Longest PIN file read (PKCS#11 PINs are short; this only bounds the read).
const MAX_PIN_FILE_LEN: u64 = 4096;
/// PKCS#11 token labels are 32 bytes, blank padded.
const MAX_TOKEN_LABEL_LEN: usize = 32;
/// Upper bound of the session pool (HSMs limit sessions per partition).
pub(super) const MAX_POOL_SIZE: usize = 1024;

/// Where to find the master key in a PKCS#11 token.
///
/// Build it with [`Pkcs11Config::new`] and adjust the public fields. `Debug`
/// prints `pin: "[redacted]"`.
#[non_exhaustive]
pub struct Pkcs11Config {
    /// Absolute path of the PKCS#11 module (shared library), e.g.
    /// `/usr/lib/softhsm/libsofthsm2.so`. A module file that group or
    /// others may write is refused.
    pub module: PathBuf,
    /// Label of the token holding the master key.
    pub token_label: String,
    /// Label (`CKA_LABEL`) of the master key: an AES-256 secret key.
    pub key_label: String,
    /// The token's user PIN. Load it with [`PinSource::load`]; never take
    /// it from a command-line argument.
    pub pin: SecretString,
    /// Most PKCS#11 sessions open at once, which is also the most wrap and
    /// unwrap calls in flight; further calls wait for a session.
    pub pool_size: usize,
    /// After `C_Login` fails for a reason other than the PIN (a device or
    /// session error), how long the provider waits before the next login;
    /// doubled after each failure in a row, up to 5 minutes. Calls in
    /// between fail at once with [`Pkcs11Error::LoginDeferred`].
    ///
    /// A PIN the token refuses (`CKR_PIN_INCORRECT`, `_INVALID`,
    /// `_LEN_RANGE`, `_EXPIRED`, `_LOCKED`) is never tried again in this
    /// process, whatever this says: every later call fails at once with
    /// [`Pkcs11Error::PinRefused`], so that a stale PIN cannot exhaust the
    /// token's failed-login counter and lock the user out.
    pub pin_retry_interval: Duration,
    /// The longest a wrap or unwrap waits for a session and the module's
    /// answer (default 10 s); then it fails as unavailable. A network HSM
    /// on a half-open connection can leave a call blocked for as long as
    /// TCP takes to give up, and nothing else would bound it.
    pub call_timeout: Duration,
}

impl Pkcs11Config {
    /// Default [`pool_size`](Self::pool_size).
    pub const DEFAULT_POOL_SIZE: usize = 8;
    /// Default [`pin_retry_interval`](Self::pin_retry_interval).
    pub const DEFAULT_PIN_RETRY_INTERVAL: Duration = Duration::from_secs(30);
    /// Default [`call_timeout`](Self::call_timeout).
    pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

    /// A configuration with the default pool size and PIN retry interval.
    pub fn new(
        module: impl Into<PathBuf>,
        token_label: impl Into<String>,
        key_label: impl Into<String>,
        pin: SecretString,
    ) -> Self {
        Self {
            module: module.into(),
            token_label: token_label.into(),
            key_label: key_label.into(),
            pin,
            pool_size: Self::DEFAULT_POOL_SIZE,
            pin_retry_interval: Self::DEFAULT_PIN_RETRY_INTERVAL,
            call_timeout: Self::DEFAULT_CALL_TIMEOUT,
        }
    }

    /// Checks the values that can be checked without the token.
    pub(super) fn validate(&self) -> Result<(), Pkcs11Error> {
        let invalid = |reason: String| Err(Pkcs11Error::InvalidConfig { reason });
        if self.module.as_os_str().is_empty() {
            return invalid("the module path is empty".to_owned());
        }
        if !self.module.is_absolute() {
            return invalid(format!(
                "the module path {} is not absolute; give the full path of the PKCS#11 \
                 library (a relative one would depend on the working directory)",
                self.module.display()
            ));
        }
        if self.token_label.trim().is_empty() {
            return invalid("the token label is empty".to_owned());
        }
        if self.token_label.len() > MAX_TOKEN_LABEL_LEN {
            return invalid(format!(
                "the token label {:?} is longer than {MAX_TOKEN_LABEL_LEN} bytes",
                self.token_label
            ));
        }
        if self.key_label.is_empty() {
            return invalid("the key label is empty".to_owned());
        }
        if self.call_timeout.is_zero() {
            return invalid("the call timeout is zero".to_owned());
        }
        if !(1..=MAX_POOL_SIZE).contains(&self.pool_size) {
            return invalid(format!(
                "the session pool size {} is outside 1..={MAX_POOL_SIZE}",
                self.pool_size
            ));
        }
        if self.pin.expose_secret().is_empty() {
            return Err(Pkcs11Error::EmptyPin);
        }
        Ok(())
    }
}

impl fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("key_label", &self.key_label)
            .field("pin", &"[redacted]")
            .field("pool_size", &self.pool_size)
            .field("pin_retry_interval", &self.pin_retry_interval)
            .field("call_timeout", &self.call_timeout)
            .finish()
    }
}

/// Where the user PIN is read from: a file or an environment variable,
/// never a command-line argument (visible to every user in `ps`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PinSource {
    /// A file holding the PIN; one trailing newline is ignored. It must be
    /// a regular file (or a symbolic link to one). A file that group or
    /// others can read is used, with a warning.
    File(PathBuf),
    /// An environment variable holding the PIN.
    Env(String),
}

impl PinSource {
    /// Reads the PIN. Errors name the file or variable, never the PIN.
    pub fn load(&self) -> Result<SecretString, Pkcs11Error> {
        match self {
            Self::File(path) => read_pin_file(path),
            Self::Env(var) => {
                let value = Zeroizing::new(
                    std::env::var(var)
                        .map_err(|_| Pkcs11Error::PinEnvMissing { var: var.clone() })?,
                );
                pin_from(value.as_bytes())
            }
        }
    }
}

/// Reads a PIN file (bounded), warning if group or others can read it.
fn read_pin_file(path: &Path) -> Result<SecretString, Pkcs11Error> {
    let io_error = |source| Pkcs11Error::PinFile { path: path.to_owned(), source };
    let file = read_secret_file(path, MAX_PIN_FILE_LEN).map_err(io_error)?;
    let mode = file.mode;
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format_args!("{:04o}", mode & 0o7777),
            "the PKCS#11 PIN file is accessible to group or others; run `chmod 600` on it"
        );
    }
    pin_from(&file.contents)
}

/// A PIN from raw bytes: UTF-8, one trailing `\n` or `\r\n` dropped,
/// not empty.
fn pin_from(bytes: &[u8]) -> Result<SecretString, Pkcs11Error> {
    let trimmed =
        bytes.strip_suffix(b"\r\n").or_else(|| bytes.strip_suffix(b"\n")).unwrap_or(bytes);
    if trimmed.is_empty() {
        return Err(Pkcs11Error::EmptyPin);
    }
    let text = std::str::from_utf8(trimmed).map_err(|_| Pkcs11Error::InvalidConfig {
        reason: "the PKCS#11 PIN is not valid UTF-8".to_owned(),
    })?;
    // `to_owned` allocates exactly, so the conversion to a boxed str inside
    // `SecretString` does not leave a stray copy behind.
    Ok(SecretString::from(text.to_owned()))
}
