//! Reading a small secret (a PIN, a passphrase, the local root key) from a
//! file. The path may come from provider settings the keystore recorded, so
//! from anyone who can write the keystore: the file is looked at before it
//! is opened, opened without blocking, and the opened file is checked
//! again. Symbolic links are followed: a Kubernetes secret volume is made
//! of them, and whoever could change a link in the file's directory could
//! as well replace the file.

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use zeroize::Zeroizing;

/// A secret read from a file.
pub struct SecretFile {
    /// The contents, wiped on drop.
    pub contents: Zeroizing<Vec<u8>>,
    /// The permission bits of the file that was read (not of whatever the
    /// path names by now).
    pub mode: u32,
}

/// Reads `path`, a regular file of at most `max_len` bytes. Its owner is
/// not checked: a PIN or passphrase file rendered by an agent running as
/// another user, or bind-mounted with its host owner, is usable (whoever
/// owns it knows the secret anyway; the caller judges the mode). A FIFO
/// (which would block) or a device (which might never end) is refused
/// before it is opened, and the opened file is checked again (the path may
/// have changed in between; it is opened non-blocking, so a FIFO put there
/// meanwhile cannot hang the call). A longer file is refused rather than
/// cut. Whether the mode is acceptable is the caller's decision
/// ([`SecretFile::mode`]).
pub fn read_secret_file(path: &Path, max_len: u64) -> io::Result<SecretFile> {
    let (mut file, metadata) = open_checked(path, Owner::Anyone).map_err(Refusal::into_io)?;
    // One byte more than allowed, to tell a longer file from one of exactly
    // `max_len` bytes; at most what the file holds, so a large `max_len`
    // allocates nothing it does not need.
    let capacity = usize::try_from(metadata.len().min(max_len).saturating_add(1))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too large to read"))?;
    // Allocated once, zeroed and never grown, and read into directly with
    // `read`: no copy of the secret is left in a freed buffer or in a
    // reader's scratch buffer (`read_to_end` reads small files through one
    // on the stack, which is not wiped).
    let mut contents = Zeroizing::new(vec![0u8; capacity]);
    let len = fill(&mut file, &mut contents)?;
    contents.truncate(len);
    if len == capacity {
        let message = if len as u64 > max_len {
            format!("longer than {max_len} bytes")
        } else {
            "the file grew while it was read".to_owned()
        };
        return Err(io::Error::new(io::ErrorKind::InvalidData, message));
    }
    Ok(SecretFile { contents, mode: metadata.permissions().mode() })
}

/// Why [`open_checked`] refused a path.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// Not a regular file (a directory, FIFO, device, socket).
    NotAFile,
    /// Owned by someone other than this process's effective user or root.
    Owner {
        /// The file's owner.
        owner: u32,
        /// This process's effective user.
        euid: u32,
    },
    /// Inspecting or opening the file failed.
    Io {
        /// `inspect` or `open`.
        operation: &'static str,
        /// The operating system's error.
        source: io::Error,
    },
}

impl Refusal {
    /// The refusal as an I/O error whose message says what is wrong.
    fn into_io(self) -> io::Error {
        match self {
            Self::NotAFile => io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            Self::Owner { owner, euid } => io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("owned by uid {owner}, neither this process's user (uid {euid}) nor root"),
            ),
            Self::Io { source, .. } => source,
        }
    }
}

/// Opens `path` for reading if it is (or links to) a regular file owned by
/// this process's effective user or by root; returns the file and its
/// metadata (of the opened file, not of the path).
///
/// The path is inspected first, so that a FIFO or device is normally never
/// opened; the open itself does not block (`O_NONBLOCK`), and the opened
/// file is checked again, since the path may have changed in between.
pub(crate) fn open_checked(path: &Path, owner: Owner) -> Result<(File, Metadata), Refusal> {
    let before =
        std::fs::metadata(path).map_err(|source| Refusal::Io { operation: "inspect", source })?;
    if !before.is_file() {
        return Err(Refusal::NotAFile);
    }
    let file =
        open_nonblocking(path).map_err(|source| Refusal::Io { operation: "open", source })?;
    let metadata =
        file.metadata().map_err(|source| Refusal::Io { operation: "inspect", source })?;
    if !metadata.is_file() {
        return Err(Refusal::NotAFile);
    }
    if owner == Owner::ThisUserOrRoot {
        let euid = rustix::process::geteuid().as_raw();
        let owner = metadata.uid();
        if owner != euid && owner != 0 {
            return Err(Refusal::Owner { owner, euid });
        }
    }
    Ok((file, metadata))
}

/// Who may own a file [`open_checked`] opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// This process's effective user or root: for a file whose owner could
    /// replace what it holds with something of their choosing (a root key).
    ThisUserOrRoot,
    /// Anyone.
    Anyone,
}

/// `open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)`: a FIFO opens at once
/// instead of waiting for a writer.
pub(crate) fn open_nonblocking(path: &Path) -> io::Result<File> {
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = rustix::fs::open(path, flags, Mode::empty())?;
    Ok(File::from(fd))
}

/// Reads into `buf` until it is full or the file ends; returns the number
/// of bytes read.
pub(crate) fn fill(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut len = 0;
    while let Some(rest) = buf.get_mut(len..).filter(|rest| !rest.is_empty()) {
        match file.read(rest) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(len)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::{FileTypeExt, symlink};
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    /// Makes a FIFO at `path`.
    pub(crate) fn mkfifo(path: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
    }

    /// Runs `f` on another thread; fails if it has not returned within
    /// five seconds (the thread is left behind, blocked).
    pub(crate) fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (send, receive) = mpsc::channel();
        std::thread::spawn(move || send.send(f()));
        receive.recv_timeout(Duration::from_secs(5)).expect("the call blocked")
    }

    #[test]
    fn a_secret_is_read_whole_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, b"0123456789").unwrap();
        for max_len in [10, 11, 4096] {
            let file = read_secret_file(&path, max_len).unwrap();
            assert_eq!(&file.contents[..], b"0123456789", "{max_len}");
        }
        let error = read_secret_file(&path, 9).map(|_| ()).unwrap_err();
        assert_eq!(error.to_string(), "longer than 9 bytes");
        std::fs::write(&path, b"").unwrap();
        assert!(read_secret_file(&path, 10).unwrap().contents.is_empty());
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        let path = fifo.clone();
        let error = within_seconds(move || read_secret_file(&path, 64).map(|_| ())).unwrap_err();
        assert_eq!(error.to_string(), "not a regular file");
        // Even when the FIFO appears after the path was inspected: the open
        // itself does not wait for a writer.
        let opened = within_seconds(move || open_nonblocking(&fifo).map(|file| file.metadata()));
        assert!(opened.unwrap().unwrap().file_type().is_fifo());
    }

    /// A Kubernetes secret volume: `pin -> ..data/pin`, `..data ->
    /// ..2026_12_07/`. The file at the end is read and checked; a link to
    /// a FIFO is refused as the FIFO is, without blocking.
    #[test]
    fn symbolic_links_are_followed_to_a_checked_file() {
        let dir = tempfile::tempdir().unwrap();
        let version = dir.path().join("..2026_12_07");
        std::fs::create_dir(&version).unwrap();
        std::fs::write(version.join("pin"), b"1234").unwrap();
        symlink("..2026_12_07", dir.path().join("..data")).unwrap();
        symlink("..data/pin", dir.path().join("pin")).unwrap();
        let read = read_secret_file(&dir.path().join("pin"), 64).unwrap();
        assert_eq!(&read.contents[..], b"1234");

        mkfifo(&dir.path().join("fifo"));
        let link = dir.path().join("to-fifo");
        symlink("fifo", &link).unwrap();
        let error = within_seconds(move || read_secret_file(&link, 64).map(|_| ())).unwrap_err();
        assert_eq!(error.to_string(), "not a regular file");
    }

    /// Needs to run as root (to give a file away); skipped otherwise.
    #[test]
    fn a_file_of_another_user_is_read_as_a_secret_and_refused_as_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, b"1234").unwrap();
        let nobody = 65534;
        if std::os::unix::fs::chown(&path, Some(nobody), None).is_err() {
            eprintln!("skipped: cannot give a file to another user (not root)");
            return;
        }
        assert_eq!(&read_secret_file(&path, 64).unwrap().contents[..], b"1234");
        let refused = open_checked(&path, Owner::ThisUserOrRoot).map(|_| ()).unwrap_err();
        let error = refused.into_io();
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied);
        assert!(error.to_string().contains(&format!("owned by uid {nobody}")), "{error}");
        std::os::unix::fs::chown(&path, Some(0), None).unwrap();
        assert!(open_checked(&path, Owner::ThisUserOrRoot).is_ok(), "a file of root's is");
    }
}
