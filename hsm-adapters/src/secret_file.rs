//! Reading a small secret (a PIN, a passphrase) from a file. The path may
//! come from provider settings the keystore recorded, so from anyone who
//! can write the keystore: the file is looked at before it is opened.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use zeroize::Zeroizing;

/// Reads `path`, a regular file of at most `max_len` bytes, into a buffer
/// wiped on drop. A FIFO (which would block) or a device (which might
/// never end) is refused before it is opened, and a longer file is
/// refused rather than cut.
pub fn read_secret_file(path: &Path, max_len: u64) -> io::Result<Zeroizing<Vec<u8>>> {
    if !std::fs::metadata(path)?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    let mut contents = Zeroizing::new(Vec::new());
    File::open(path)?.take(max_len.saturating_add(1)).read_to_end(&mut contents)?;
    if contents.len() as u64 > max_len {
        let message = format!("longer than {max_len} bytes");
        return Err(io::Error::new(io::ErrorKind::InvalidData, message));
    }
    Ok(contents)
}
