//! Reading a small secret (a PIN, a passphrase) from a file. The path may
//! come from provider settings the keystore recorded, so from anyone who
//! can write the keystore: the file is looked at before it is opened.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use zeroize::Zeroizing;

/// A secret read from a file.
pub struct SecretFile {
    /// The contents, wiped on drop.
    pub contents: Zeroizing<Vec<u8>>,
    /// The permission bits of the file that was read (not of whatever the
    /// path names by now).
    pub mode: u32,
}

/// Reads `path`, a regular file of at most `max_len` bytes. A FIFO (which
/// would block) or a device (which might never end) is refused before it
/// is opened, the opened file is checked again (the path may have changed
/// in between), and a longer file is refused rather than cut.
pub fn read_secret_file(path: &Path, max_len: u64) -> io::Result<SecretFile> {
    let not_a_file = || io::Error::new(io::ErrorKind::InvalidInput, "not a regular file");
    if !std::fs::metadata(path)?.is_file() {
        return Err(not_a_file());
    }
    let file = File::open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(not_a_file());
    }
    // Sized up front, so that growing the buffer leaves no unwiped copy
    // of the secret behind (a file still growing may yet force one).
    let expected = usize::try_from(metadata.len().min(max_len)).unwrap_or(0);
    let mut contents = Zeroizing::new(Vec::with_capacity(expected.saturating_add(1)));
    file.take(max_len.saturating_add(1)).read_to_end(&mut contents)?;
    if contents.len() as u64 > max_len {
        let message = format!("longer than {max_len} bytes");
        return Err(io::Error::new(io::ErrorKind::InvalidData, message));
    }
    Ok(SecretFile { contents, mode: metadata.permissions().mode() })
}
