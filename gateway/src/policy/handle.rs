//! The live policy: loaded from a file, swapped atomically on reload.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::Policy;
use super::parse::{MAX_POLICY_BYTES, PolicyError};

/// The policy in force, shared by every request, and the file it came from.
///
/// Readers take a snapshot with [`current`](Self::current) and decide with
/// it; [`reload`](Self::reload) (on SIGHUP) replaces the whole policy at once
/// or, if the new file is bad, not at all.
#[derive(Debug)]
pub struct PolicyHandle {
    path: PathBuf,
    current: ArcSwap<Policy>,
}

impl PolicyHandle {
    /// Reads and validates the policy file at `path`.
    ///
    /// Blocking file I/O of at most [`MAX_POLICY_BYTES`]; async callers may
    /// want `spawn_blocking`.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, PolicyError> {
        let path = path.into();
        let policy = read_policy(&path)?;
        tracing::info!(file = %path.display(), grants = policy.grants().len(), "policy loaded");
        Ok(Self { path, current: ArcSwap::from_pointee(policy) })
    }

    /// The file this policy is loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A snapshot of the policy in force. Cheap; hold it for one request,
    /// not longer, so a reload takes effect.
    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    /// Re-reads the file and swaps the new policy in if it is valid. If it
    /// is not, the policy in force stays, a warning is logged, and the error
    /// is returned.
    ///
    /// Blocking file I/O, as for [`load`](Self::load).
    pub fn reload(&self) -> Result<(), PolicyError> {
        self.reload_checked(|_| Ok::<(), std::convert::Infallible>(())).map_err(|refused| {
            match refused {
                Refused::Invalid(error) => error,
                Refused::Check(never) => match never {},
            }
        })
    }

    /// Re-reads the file and swaps in the new policy if it is valid and
    /// `check` accepts it: the very policy judged is the one put in force
    /// (a file changed meanwhile cannot slip in unjudged).
    ///
    /// Blocking file I/O, as for [`load`](Self::load).
    pub fn reload_checked<E>(
        &self,
        check: impl FnOnce(&Policy) -> Result<(), E>,
    ) -> Result<(), Refused<E>> {
        let policy = read_policy(&self.path).map_err(|error| {
            tracing::warn!(
                file = %self.path.display(),
                %error,
                "policy reload failed; keeping the policy in force"
            );
            Refused::Invalid(error)
        })?;
        check(&policy).map_err(Refused::Check)?;
        tracing::info!(
            file = %self.path.display(),
            grants = policy.grants().len(),
            "policy reloaded"
        );
        self.current.store(Arc::new(policy));
        Ok(())
    }
}

/// Why [`PolicyHandle::reload_checked`] kept the policy in force.
#[derive(Debug)]
pub enum Refused<E> {
    /// The file could not be read or is not a valid policy.
    Invalid(PolicyError),
    /// The check refused it.
    Check(E),
}

fn read_policy(path: &Path) -> Result<Policy, PolicyError> {
    let file = path.display().to_string();
    let too_large = || PolicyError::TooLarge { file: file.clone(), limit: MAX_POLICY_BYTES };
    let read_error = |source| PolicyError::Read { file: file.clone(), source };
    let handle = std::fs::File::open(path).map_err(read_error)?;
    if handle.metadata().map_err(read_error)?.len() > MAX_POLICY_BYTES {
        return Err(too_large());
    }
    // The file may grow between the check and the read: read one byte past
    // the limit to notice.
    let mut text = String::new();
    handle
        .take(MAX_POLICY_BYTES.saturating_add(1))
        .read_to_string(&mut text)
        .map_err(read_error)?;
    if u64::try_from(text.len()).map_or(true, |len| len > MAX_POLICY_BYTES) {
        return Err(too_large());
    }
    Policy::from_toml(&text, &file)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use kms_core::TenantId;

    use super::*;
    use crate::policy::Role;

    fn grant(identity: &str) -> String {
        format!("[[grant]]\nidentity = \"{identity}\"\ntenants = [\"*\"]\nroles = [\"admin\"]\n")
    }

    fn write(path: &Path, text: &str) {
        let mut f = std::fs::File::create(path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f.sync_all().unwrap();
    }

    #[test]
    fn reload_swaps_on_success_and_keeps_the_old_policy_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        write(&path, &grant("spiffe://a"));
        let handle = PolicyHandle::load(&path).unwrap();
        assert_eq!(handle.path(), path);
        let onc = TenantId::new("onc").unwrap();
        let before = handle.current();
        assert!(before.authorize("spiffe://a", &onc, Role::Admin));

        // A broken file: the error names the line, the old policy stays.
        write(&path, &format!("{}roles = [\"root\"]\n", grant("spiffe://b")));
        let e = handle.reload().unwrap_err();
        assert!(e.to_string().contains("line 5"), "{e}");
        assert!(handle.current().authorize("spiffe://a", &onc, Role::Admin));
        assert!(!handle.current().authorize("spiffe://b", &onc, Role::Admin));

        // A good file: swapped in; a snapshot taken earlier is unchanged.
        write(&path, &grant("spiffe://b"));
        handle.reload().unwrap();
        assert!(!handle.current().authorize("spiffe://a", &onc, Role::Admin));
        assert!(handle.current().authorize("spiffe://b", &onc, Role::Admin));
        assert!(before.authorize("spiffe://a", &onc, Role::Admin));

        // A vanished file: a read error, the policy in force stays.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(handle.reload(), Err(PolicyError::Read { .. })));
        assert!(handle.current().authorize("spiffe://b", &onc, Role::Admin));
    }

    #[test]
    fn load_refuses_missing_oversized_and_non_utf8_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        assert!(matches!(PolicyHandle::load(&path), Err(PolicyError::Read { .. })));
        let mut big = grant("spiffe://a");
        big.push_str(&"#".repeat(usize::try_from(MAX_POLICY_BYTES).unwrap()));
        write(&path, &big);
        let e = PolicyHandle::load(&path).unwrap_err();
        assert!(matches!(e, PolicyError::TooLarge { .. }), "{e:?}");
        std::fs::write(&path, b"# \xff\n").unwrap();
        assert!(matches!(PolicyHandle::load(&path), Err(PolicyError::Read { .. })));
    }
}
