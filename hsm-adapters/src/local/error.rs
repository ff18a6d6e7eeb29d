//! Errors of the local root key provider.

use std::io;
use std::path::PathBuf;

use kms_core::RootKeyError;
use kms_core::crypto::rng::RandomError;

use super::file::FormatError;

/// Creating or opening a local root key file failed.
///
/// Messages name the file and say what to do; they never contain key bytes
/// or the passphrase.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalKeyError {
    /// Reading, writing or inspecting the file failed.
    #[error("cannot {operation} root key file {}: {source}", path.display())]
    Io {
        /// The root key file.
        path: PathBuf,
        /// What was being done (`open`, `read`, `create`, …).
        operation: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// [`LocalRootKey::create`](super::LocalRootKey::create) never replaces
    /// an existing file (that would destroy the only copy of a root key).
    #[error("root key file {} already exists; refusing to overwrite it", path.display())]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// The path names a directory, device or other non-regular file.
    #[error("root key path {} is not a regular file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file belongs to another user than the one this process runs as
    /// (or root), who could replace the key.
    #[error(
        "root key file {} is owned by uid {owner}, neither this process's user (uid {euid}) \
         nor root; run `chown` on it",
        path.display()
    )]
    NotOwned {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective user.
        euid: u32,
    },
    /// Group or others have some access to the file.
    #[error(
        "root key file {} has mode {mode:04o}, which gives group or others access to it; \
         run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    LoosePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits (`mode & 0o7777`).
        mode: u32,
    },
    /// The file is not a valid root key file (truncated, corrupted, another
    /// format or version).
    #[error("root key file {} is malformed: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        reason: FormatError,
    },
    /// The file is sealed with a passphrase but none was supplied.
    #[error("root key file {} is sealed with a passphrase, but no passphrase was given", path.display())]
    PassphraseRequired {
        /// The file.
        path: PathBuf,
    },
    /// A passphrase was supplied but the file is not sealed. Refused rather
    /// than ignored: the operator expects a protection the file lacks, or the
    /// sealed file was replaced.
    #[error(
        "root key file {} is not sealed with a passphrase, but a passphrase was given; \
         remove the passphrase setting or re-create the file sealed",
        path.display()
    )]
    NotSealed {
        /// The file.
        path: PathBuf,
    },
    /// The passphrase does not open the sealed key. A corrupted sealed key
    /// looks the same; the two cannot be told apart.
    #[error("wrong passphrase for root key file {} (or its sealed key is corrupted)", path.display())]
    WrongPassphrase {
        /// The file.
        path: PathBuf,
    },
    /// An empty passphrase was given for a new file.
    #[error("the passphrase for a new root key file must not be empty")]
    EmptyPassphrase,
    /// Argon2id parameters outside the accepted bounds (see
    /// [`Argon2Params::new`](super::Argon2Params::new)).
    #[error(
        "Argon2id parameters out of range: m_cost = {m_cost_kib} KiB, t_cost = {t_cost}, \
         p_cost = {p_cost}"
    )]
    InvalidArgon2Params {
        /// Memory cost in KiB.
        m_cost_kib: u32,
        /// Iterations.
        t_cost: u32,
        /// Lanes.
        p_cost: u32,
    },
    /// Argon2id itself failed (in practice: not enough memory).
    #[error("deriving the key from the passphrase failed: {detail}")]
    Kdf {
        /// The Argon2 error.
        detail: String,
    },
    /// The OS random number generator failed.
    #[error(transparent)]
    Random(#[from] RandomError),
}

impl From<LocalKeyError> for RootKeyError {
    /// Every failure to set up the local provider is a configuration problem
    /// that retrying will not fix.
    fn from(error: LocalKeyError) -> Self {
        RootKeyError::Misconfigured { provider: super::PROVIDER_KIND, detail: error.to_string() }
    }
}
