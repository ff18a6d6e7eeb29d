//! The `local` root key provider: a 256-bit root key in a file, for
//! development and `keygate up` only.
//!
//! The file is created with mode `0600` and refused if group or others have
//! any access to it, or if it belongs to another user than the process's
//! (or root), who could put a key of their choosing there. A symbolic link
//! is followed, and the file it ends at is checked. It may be sealed with a passphrase
//! (Argon2id + AES-256-GCM-SIV); the layout is documented in the `file`
//! module:
//!
//! ```text
//! plain:   "KGRK" ‖ 01 ‖ 00 ‖ root_key(32) ‖ check(16)
//! sealed:  "KGRK" ‖ 01 ‖ 01 ‖ u32 m_cost_kib ‖ u32 t_cost ‖ u32 p_cost ‖ salt(16)
//!          ‖ nonce(12) ‖ ciphertext(32) ‖ tag(16)
//! ```
//!
//! The root key itself is not kept after opening: the provider holds only
//! the wrapping key `HKDF(root, "keygate/v1/local-root-wrap")` (as a keyed
//! AES-256-GCM-SIV cipher, wiped on drop). Wrapped blobs are
//! `u8 version = 1 ‖ nonce(12) ‖ ciphertext(32) ‖ tag(16)` with
//! [`WrapContext::aad`] as associated data.
//!
//! Every successful `create` and `open` logs a warning that the local root
//! key is for development only, naming the path and fingerprint.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use kms_core::crypto::{Aead, NONCE_LEN, TAG_LEN, kdf};
use kms_core::{KEY_LEN, Key256, ProviderInfo, RootKeyError, RootKeyProvider, WrapContext};
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::secret_file::{Owner, Refusal, fill, open_checked};

mod error;
mod file;
mod passphrase;

pub use self::error::LocalKeyError;
pub use self::file::FormatError;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use self::file::fuzz as fuzz_root_key_file;
pub use self::passphrase::Argon2Params;

/// Provider kind reported by [`RootKeyProvider::describe`]: what tells a
/// development master key apart from an HSM's or a KMS's.
pub const PROVIDER_KIND: &str = "local";
/// HKDF label of the wrapping key.
const WRAP_LABEL: &[u8] = b"keygate/v1/local-root-wrap";
/// HKDF label of the fingerprint.
const FINGERPRINT_LABEL: &[u8] = b"keygate/v1/local-root-fingerprint";
/// Fingerprint length in bytes (printed as 16 hex digits).
const FINGERPRINT_LEN: usize = 8;
/// Version byte of a wrapped blob.
const WRAP_VERSION: u8 = 1;
/// Length of a wrapped blob.
const WRAPPED_LEN: usize = 1 + NONCE_LEN + KEY_LEN + TAG_LEN;
/// Group and other permission bits.
const GROUP_OTHER_BITS: u32 = 0o077;

/// The `local` root key provider: a root key file on this machine.
///
/// **For development only.** The root key sits on the same disk as the data
/// it protects, guarded only by file permissions and optionally a
/// passphrase; production deployments use the PKCS#11 or AWS KMS providers.
/// Opening or creating one logs a warning saying so.
///
/// `create` and `open` block (file I/O and, for sealed files, Argon2id,
/// which takes a few hundred milliseconds with the default parameters); call
/// them from `tokio::task::spawn_blocking` in async code. `wrap` and
/// `unwrap` are a single AES-GCM-SIV operation and safe to call
/// concurrently.
pub struct LocalRootKey {
    path: PathBuf,
    fingerprint: String,
    wrapping: Aead,
}

impl LocalRootKey {
    /// Creates a new root key file at `path` holding a fresh random key and
    /// returns the provider for it.
    ///
    /// The file is created with mode `0600` and never replaces an existing
    /// file ([`LocalKeyError::AlreadyExists`]); it is synced, and so is its
    /// directory, before this returns. With a passphrase, the key is
    /// sealed under Argon2id with `params` (use [`Argon2Params::DEFAULT`]
    /// outside tests); without one, `params` is unused and the key is
    /// stored in the clear.
    pub fn create(
        path: impl AsRef<Path>,
        passphrase: Option<&SecretString>,
        params: Argon2Params,
    ) -> Result<Self, LocalKeyError> {
        let path = path.as_ref();
        let root = Key256::generate()?;
        let contents = match passphrase {
            None => file::encode_plain(&root),
            Some(passphrase) => {
                if passphrase.expose_secret().is_empty() {
                    return Err(LocalKeyError::EmptyPassphrase);
                }
                let salt = file::random_salt()?;
                let passphrase_key = passphrase::derive_key(passphrase, &salt, params)?;
                Zeroizing::new(file::encode_sealed(&root, &passphrase_key, params, &salt)?)
            }
        };
        write_new_file(path, &contents)?;
        Ok(Self::from_root(path, &root, passphrase.is_some(), "created"))
    }

    /// Opens an existing root key file.
    ///
    /// Follows symbolic links, and refuses anything but a regular file
    /// ([`LocalKeyError::NotAFile`]), a file owned by
    /// another user than this process's or root ([`LocalKeyError::NotOwned`])
    /// and a file that group or others can access
    /// ([`LocalKeyError::LoosePermissions`]) before reading it. A sealed file
    /// needs its passphrase ([`LocalKeyError::PassphraseRequired`],
    /// [`LocalKeyError::WrongPassphrase`]); a plain file is refused when a
    /// passphrase is given ([`LocalKeyError::NotSealed`]), since the caller
    /// expected a protection the file does not have.
    pub fn open(
        path: impl AsRef<Path>,
        passphrase: Option<&SecretString>,
    ) -> Result<Self, LocalKeyError> {
        let path = path.as_ref();
        let contents = read_private_file(path)?;
        let malformed = |reason| LocalKeyError::Malformed { path: path.to_owned(), reason };
        let root = match (file::parse(&contents).map_err(malformed)?, passphrase) {
            (file::Parsed::Plain(root), None) => root,
            (file::Parsed::Plain(_), Some(_)) => {
                return Err(LocalKeyError::NotSealed { path: path.to_owned() });
            }
            (file::Parsed::Sealed(_), None) => {
                return Err(LocalKeyError::PassphraseRequired { path: path.to_owned() });
            }
            (file::Parsed::Sealed(sealed), Some(passphrase)) => {
                let passphrase_key =
                    passphrase::derive_key(passphrase, sealed.salt, sealed.params)?;
                sealed
                    .open(&passphrase_key)
                    .ok_or_else(|| LocalKeyError::WrongPassphrase { path: path.to_owned() })?
            }
        };
        Ok(Self::from_root(path, &root, passphrase.is_some(), "opened"))
    }

    /// The root key file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn from_root(path: &Path, root: &Key256, sealed: bool, action: &'static str) -> Self {
        let fingerprint = fingerprint(root);
        tracing::warn!(
            path = %path.display(),
            fingerprint = %fingerprint,
            sealed,
            "{action} the local root key file; it is for development only \
             (use the pkcs11 or aws-kms root key provider in production)"
        );
        Self {
            path: path.to_owned(),
            fingerprint,
            wrapping: Aead::new(&kdf::derive(root, WRAP_LABEL)),
        }
    }
}

impl fmt::Debug for LocalRootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalRootKey")
            .field("path", &self.path)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl RootKeyProvider for LocalRootKey {
    fn describe(&self) -> ProviderInfo {
        ProviderInfo { kind: PROVIDER_KIND, key_ref: self.fingerprint.clone() }
    }

    async fn wrap(&self, key: &Key256, context: &WrapContext) -> Result<Vec<u8>, RootKeyError> {
        let mut out = Vec::with_capacity(WRAPPED_LEN);
        out.push(WRAP_VERSION);
        self.wrapping.seal_random(&context.aad(), key.expose_secret(), &mut out).map_err(|e| {
            RootKeyError::Backend {
                provider: PROVIDER_KIND,
                operation: "wrap",
                detail: e.to_string(),
            }
        })?;
        Ok(out)
    }

    async fn unwrap(&self, wrapped: &[u8], context: &WrapContext) -> Result<Key256, RootKeyError> {
        let Some((&WRAP_VERSION, sealed)) = wrapped.split_first() else {
            return Err(RootKeyError::CannotUnwrap);
        };
        if wrapped.len() != WRAPPED_LEN {
            return Err(RootKeyError::CannotUnwrap);
        }
        let plaintext =
            self.wrapping.open(sealed, &context.aad()).map_err(|_| RootKeyError::CannotUnwrap)?;
        Key256::from_slice(&plaintext).ok_or(RootKeyError::CannotUnwrap)
    }
}

/// Hex of the first 8 bytes of `HKDF(root, "keygate/v1/local-root-fingerprint")`:
/// stable for a key, reveals nothing about it.
fn fingerprint(root: &Key256) -> String {
    let derived = kdf::derive(root, FINGERPRINT_LABEL);
    derived.expose_secret().iter().take(FINGERPRINT_LEN).map(|b| format!("{b:02x}")).collect()
}

/// Creates `path` holding `contents`, with mode 0600, never replacing a
/// file, durably: the contents go to a temporary file in the same
/// directory, which is synced, linked into place (`link` fails if `path`
/// exists, so nothing is replaced) and removed, and then the directory is
/// synced, so that the new name survives a crash. On failure nothing is
/// left at `path` (a crash before the temporary file is removed may leave
/// it behind, mode 0600).
fn write_new_file(path: &Path, contents: &[u8]) -> Result<(), LocalKeyError> {
    let io_error =
        |operation, source| LocalKeyError::Io { path: path.to_owned(), operation, source };
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io_error("create", io::Error::new(io::ErrorKind::InvalidInput, "no file name"))
    })?;
    // Spares the work if there is a file already; `hard_link` below is
    // what makes sure none is replaced.
    if fs::symlink_metadata(path).is_ok() {
        return Err(LocalKeyError::AlreadyExists { path: path.to_owned() });
    }
    let suffix: [u8; 8] = kms_core::crypto::rng::array()?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(name);
    temporary_name.push(".tmp-");
    temporary_name.push(suffix.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let temporary = parent.join(temporary_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(|e| io_error("create", e))?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    drop(file);
    let linked = written.map_err(|e| io_error("write", e)).and_then(|()| {
        fs::hard_link(&temporary, path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                LocalKeyError::AlreadyExists { path: path.to_owned() }
            } else {
                io_error("create", e)
            }
        })
    });
    if let Err(e) = fs::remove_file(&temporary) {
        // The key is in place either way; the stray name is a second link
        // to it (or to a key never used), owner-only like the key file.
        tracing::warn!(
            path = %temporary.display(),
            error = %e,
            "could not remove the temporary root key file; remove it by hand"
        );
    }
    linked?;
    if let Err(e) = File::open(parent).and_then(|dir| dir.sync_all()) {
        // Not durably created: take it back, so that a retry starts over.
        let _ = fs::remove_file(path);
        return Err(io_error("sync the directory of", e));
    }
    Ok(())
}

/// Opens `path`, checks it is a regular file owned
/// by this process's user or root that no one else can access, and reads
/// it (at most one byte more than the longest valid file).
fn read_private_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, LocalKeyError> {
    let (mut file, metadata) =
        open_checked(path, Owner::ThisUserOrRoot).map_err(|refusal| match refusal {
            Refusal::NotAFile => LocalKeyError::NotAFile { path: path.to_owned() },
            Refusal::Owner { owner, euid } => {
                LocalKeyError::NotOwned { path: path.to_owned(), owner, euid }
            }
            Refusal::Io { operation, source } => {
                LocalKeyError::Io { path: path.to_owned(), operation, source }
            }
        })?;
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & GROUP_OTHER_BITS != 0 {
        return Err(LocalKeyError::LoosePermissions { path: path.to_owned(), mode });
    }
    // Read into a buffer allocated once and wiped on drop, so no stray copy
    // of the key is left behind in freed memory. One byte more than the
    // longest valid file is enough to report trailing bytes.
    let mut contents = Zeroizing::new(vec![0u8; file::MAX_FILE_LEN + 1]);
    let len = fill(&mut file, &mut contents).map_err(|source| LocalKeyError::Io {
        path: path.to_owned(),
        operation: "read",
        source,
    })?;
    contents.truncate(len);
    Ok(contents)
}

#[cfg(test)]
mod tests;
