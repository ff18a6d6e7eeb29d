//! Paths this process alone uses: a directory made for it alone
//! ([`create_private_dir`]), and a path claimed with an advisory lock on a
//! file of its own, released when the process exits (however it exits).

use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Makes directory `path` and its missing parents with mode 0700 (less
/// what the umask takes away: never any access for group or others),
/// unless it exists; an existing one is left as it is, for the caller to
/// check or use.
pub(crate) fn create_private_dir(path: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}

/// Claims `path` by locking `lock` (created if need be, mode 0600) for as
/// long as the returned file is open. Another holder (another process, or
/// another claim in this one) means the path is in use: an error saying
/// so, which names `holder`, what holds it.
pub(crate) fn claim(path: &Path, lock: &Path, holder: &str) -> io::Result<File> {
    // O_NOFOLLOW: a link planted there must not make this create a file
    // elsewhere.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(lock)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", lock.display())))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => {
            Err(io::Error::other(format!("{} is in use: {holder} holds it", path.display())))
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_private_dir_is_made_for_its_owner_alone() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        create_private_dir(&nested).unwrap();
        for made in [dir.path().join("a"), nested.clone()] {
            let mode = std::fs::metadata(&made).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{}: {mode:o}", made.display());
        }
        // One that exists is kept as it is.
        std::fs::set_permissions(&nested, std::fs::Permissions::from_mode(0o750)).unwrap();
        create_private_dir(&nested).unwrap();
        assert_eq!(std::fs::metadata(&nested).unwrap().permissions().mode() & 0o777, 0o750);
    }

    #[test]
    fn a_path_is_claimed_once_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let (path, lock) = (dir.path(), dir.path().join("x.lock"));
        let first = claim(path, &lock, "another key service").unwrap();
        let e = claim(path, &lock, "another key service").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{} is in use: another key service holds it", path.display())
        );
        drop(first);
        claim(path, &lock, "another key service").expect("free once the holder lets go");
    }
}
