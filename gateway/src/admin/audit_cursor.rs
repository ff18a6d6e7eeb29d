//! The `audit export --cursor` file: how far an incremental export has
//! read each instance's audit chain.
//!
//! It holds `{"chains": {"<instance>": <seq>, …}}`, the last sequence
//! number read of each chain, rows that `--since` or `--tenant` left out
//! included. It is replaced (never edited in place) once every line is
//! out, so a run that fails leaves the one before it in force.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::AdminError;
use super::output::io_reason;
use crate::server::api::AuditHead;

/// Largest cursor file read, in bytes (one entry per instance that ever
/// wrote events).
const MAX_CURSOR_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// The file's contents.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Stored {
    /// Per instance, the last sequence number read of its chain.
    chains: BTreeMap<String, i64>,
}

/// A cursor file and what it held when read.
#[derive(Debug)]
pub(super) struct Cursor {
    path: PathBuf,
    stored: Stored,
}

impl Cursor {
    /// Reads `path`; a missing file is a cursor at the start of every
    /// chain. A file that is not a cursor is refused (exit 2), and left
    /// as it is.
    pub(super) fn read(path: &Path) -> Result<Self, AdminError> {
        let fail =
            |reason: String| AdminError::usage(format!("--cursor {}: {reason}", path.display()));
        let dir = parent(path);
        if !dir.is_dir() {
            return Err(fail(format!("{} is not a directory", dir.display())));
        }
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self { path: path.to_owned(), stored: Stored::default() });
            }
            Err(e) => return Err(fail(io_reason(&e))),
        };
        let mut text = String::new();
        file.take(MAX_CURSOR_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| fail(io_reason(&e)))?;
        if u64::try_from(text.len()).unwrap_or(u64::MAX) > MAX_CURSOR_FILE_BYTES {
            return Err(fail(format!("larger than {MAX_CURSOR_FILE_BYTES} bytes")));
        }
        let stored: Stored = serde_json::from_str(&text).map_err(|e| {
            fail(format!(
                "not a cursor file ({e}); expected {{\"chains\": {{\"<instance>\": <seq>}}}}"
            ))
        })?;
        if let Some((instance, seq)) = stored.chains.iter().find(|(i, s)| i.is_empty() || **s < 0) {
            return Err(fail(format!("not a cursor file: chain {instance:?} at seq {seq}")));
        }
        Ok(Self { path: path.to_owned(), stored })
    }

    /// The last sequence number read of `instance`'s chain (0: none).
    pub(super) fn position(&self, instance: &str) -> i64 {
        self.stored.chains.get(instance).copied().unwrap_or(0)
    }

    /// Refuses (exit 1) a cursor that has read a chain further than the
    /// chain now goes, or a chain that is gone: resuming it would silently
    /// skip the events that take those places again.
    pub(super) fn check(&self, heads: &[AuditHead]) -> Result<(), AdminError> {
        for (instance, &seq) in &self.stored.chains {
            let head = heads.iter().find(|h| h.instance == *instance).map_or(0, |h| h.head_seq);
            if seq > head {
                return Err(AdminError::refused(format!(
                    "--cursor {}: it has read the audit chain of instance {instance} through seq \
                     {seq}, but that chain now ends at seq {head} (a restored keystore, or a \
                     cursor of another deployment?); nothing was exported and the file is left \
                     as it is",
                    self.path.display()
                )));
            }
        }
        Ok(())
    }

    /// Records that `instance`'s chain has been read through `seq`.
    pub(super) fn advance(&mut self, instance: &str, seq: i64) {
        let entry = self.stored.chains.entry(instance.to_owned()).or_insert(0);
        *entry = (*entry).max(seq);
    }

    /// Replaces the file with this cursor: a temporary file (0600) in the
    /// same directory, synced, renamed over it, and the directory synced,
    /// so that a crash leaves the old cursor or the new one, whole.
    pub(super) fn write(&self) -> Result<(), AdminError> {
        let fail = |e: &std::io::Error| {
            AdminError::usage(format!(
                "--cursor {}: cannot write it ({}); the events were exported and the next run \
                 exports them again",
                self.path.display(),
                io_reason(e)
            ))
        };
        let dir = parent(&self.path);
        let name = self.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        // The process id keeps two runs apart; a stale file of a crashed
        // run with the same id is replaced.
        let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let mut text = serde_json::to_string_pretty(&self.stored)
            .map_err(|e| fail(&std::io::Error::other(e)))?;
        text.push('\n');
        let written = (|| {
            match std::fs::remove_file(&temp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let mut file =
                OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
            // Whatever the umask.
            file.set_permissions(Permissions::from_mode(0o600))?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temp, &self.path)?;
            File::open(dir)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(fail(&e));
        }
        Ok(())
    }
}

/// The directory `path` is in (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(instance: &str, head_seq: i64) -> AuditHead {
        AuditHead { instance: instance.to_owned(), head_seq }
    }

    #[test]
    fn a_missing_file_is_the_start_and_a_written_one_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("siem.cursor");
        let mut cursor = Cursor::read(&path).unwrap();
        assert_eq!(cursor.position("ks-a"), 0);
        cursor.advance("ks-a", 7);
        cursor.advance("ks-a", 5); // never backwards
        cursor.advance("ks-b", 3);
        cursor.write().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = Cursor::read(&path).unwrap();
        assert_eq!((again.position("ks-a"), again.position("ks-b")), (7, 3));
        // Replaced, not edited, and no temporary file left behind.
        std::fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        again.write().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["siem.cursor"]);
    }

    #[test]
    fn a_file_that_is_not_a_cursor_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        for text in [
            "",
            "not json",
            "{}",
            r#"{"chains": {"ks-a": "7"}}"#,
            r#"{"chains": {"ks-a": -1}}"#,
            r#"{"chains": {"": 1}}"#,
            r#"{"chains": {"ks-a": 1}, "extra": true}"#,
        ] {
            std::fs::write(&path, text).unwrap();
            let e = Cursor::read(&path).unwrap_err();
            assert_eq!(e.failure().code(), 2, "{text}: {e}");
            assert!(e.to_string().contains("not a cursor file"), "{text}: {e}");
        }
        let e = Cursor::read(&dir.path().join("no-such-dir/c.json")).unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
    }

    #[test]
    fn a_cursor_past_the_end_of_a_chain_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, r#"{"chains": {"ks-a": 10, "ks-b": 4}}"#).unwrap();
        let cursor = Cursor::read(&path).unwrap();
        cursor.check(&[head("ks-a", 10), head("ks-b", 4), head("ks-c", 1)]).unwrap();
        for heads in [vec![head("ks-a", 9), head("ks-b", 4)], vec![head("ks-a", 10)]] {
            let e = cursor.check(&heads).unwrap_err();
            assert_eq!(e.failure().code(), 1, "{e}");
            assert!(e.to_string().contains("now ends at seq"), "{e}");
        }
    }
}
