//! The `audit export --cursor` file: how far an incremental export has
//! read each instance's audit chain.
//!
//! It holds `{"chains": {"<instance>": {"seq": N, "hash": "<hex>"}, …}}`:
//! per chain, the last sequence number read (rows that `--since` or
//! `--tenant` left out included) and that event's chain hash, which tells
//! the chain that was read from one rewritten since. A run holds
//! `FILE.lock` throughout, makes its temporary file before exporting, and
//! replaces FILE (never edits it) once every line is out, so a run that
//! fails leaves the one before it in force.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{AdminError, one_line};
use super::output::io_reason;
use crate::server::api::AuditHead;

/// Largest cursor file read, in bytes (one entry per instance that ever
/// wrote events).
const MAX_CURSOR_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// The file's contents.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Stored {
    chains: BTreeMap<String, Position>,
}

/// How far one chain was read.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(super) struct Position {
    /// The last sequence number read (from 1).
    pub(super) seq: i64,
    /// That event's chain hash, lowercase hex as the export writes it.
    pub(super) hash: String,
}

/// A cursor file held for one run: what it held when read, its lock, and
/// the temporary file its successor goes to.
#[derive(Debug)]
pub(super) struct Cursor {
    path: PathBuf,
    stored: Stored,
    /// Held until the process exits: a second run is refused, not left to
    /// write the file over this one's.
    _lock: File,
    temp: Temp,
}

/// The next cursor's file, made before the export so that a directory
/// that cannot be written fails before any line; removed unless it was
/// renamed over the cursor.
#[derive(Debug)]
struct Temp {
    path: PathBuf,
    file: File,
    renamed: bool,
}

impl Cursor {
    /// Locks `path` (through `path.lock`), reads it, and makes the
    /// temporary file. A missing file is a cursor at the start of every
    /// chain. Another run holding the lock is refused (exit 1); a path
    /// that cannot be used, or a file that is not a cursor, is bad input
    /// (exit 2). Either way FILE is left as it is.
    pub(super) fn open(path: &Path) -> Result<Self, AdminError> {
        let fail =
            |reason: String| AdminError::usage(format!("--cursor {}: {reason}", path.display()));
        let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            return Err(fail("not a file name".to_owned()));
        };
        let dir = parent(path);
        if !dir.is_dir() {
            return Err(fail(format!("{} is not a directory", dir.display())));
        }
        if path.is_dir() {
            return Err(fail("is a directory".to_owned()));
        }
        let lock = path.with_file_name(format!("{name}.lock"));
        let lock = crate::claim::claim(path, &lock, "another run of audit export --cursor")
            .map_err(|e| {
                // `claim` makes an error of kind `Other` only when the lock
                // is held; failing to open the lock file keeps the OS kind.
                if e.kind() == std::io::ErrorKind::Other {
                    AdminError::refused(format!(
                        "--cursor {e}; nothing was exported and the file is left as it is"
                    ))
                } else {
                    fail(format!("cannot lock it: {}", io_reason(&e)))
                }
            })?;
        remove_stale(dir, &name);
        let stored = read(path).map_err(fail)?;
        let temp = Temp::create(dir, &name)
            .map_err(|e| fail(format!("cannot write in {}: {}", dir.display(), io_reason(&e))))?;
        Ok(Self { path: path.to_owned(), stored, _lock: lock, temp })
    }

    /// The last sequence number read of `instance`'s chain (0: none).
    pub(super) fn position(&self, instance: &str) -> i64 {
        self.stored.chains.get(instance).map_or(0, |p| p.seq)
    }

    /// Every chain the cursor names, and how far it was read.
    pub(super) fn chains(&self) -> impl Iterator<Item = (&str, &Position)> {
        self.stored.chains.iter().map(|(i, p)| (i.as_str(), p))
    }

    /// Refuses (exit 1) a cursor that has read a chain further than the
    /// chain now goes, or a chain that is gone: resuming it would silently
    /// skip the events that take those places again.
    pub(super) fn check(&self, heads: &[AuditHead]) -> Result<(), AdminError> {
        for (instance, position) in &self.stored.chains {
            let head = heads.iter().find(|h| h.instance == *instance).map_or(0, |h| h.head_seq);
            if position.seq > head {
                return Err(AdminError::refused(format!(
                    "--cursor {}: it has read the audit chain of instance {instance} through seq \
                     {}, but that chain now ends at seq {head} (a restored keystore, a failover \
                     to a standby that was behind, or a cursor of another deployment?); nothing \
                     was exported and the file is left as it is",
                    self.path.display(),
                    position.seq
                )));
            }
        }
        Ok(())
    }

    /// Refuses (exit 1) a chain rewritten under the cursor: `found`, the
    /// event now at the place the cursor read `instance`'s chain to, must
    /// be the one it read. Events stored since a restore or a failover
    /// take places the cursor has passed, and would never be exported.
    pub(super) fn confirm(
        &self,
        instance: &str,
        found: Option<&Position>,
    ) -> Result<(), AdminError> {
        let Some(read) = self.stored.chains.get(instance) else { return Ok(()) };
        let now = match found {
            Some(found) if found.seq == read.seq && found.hash == read.hash => return Ok(()),
            Some(found) if found.seq == read.seq => "another event is there now",
            _ => "no event is there now",
        };
        Err(AdminError::refused(format!(
            "--cursor {}: the audit chain of instance {instance} no longer holds the event this \
             cursor read at seq {} ({now}): the keystore was probably restored from a backup or \
             failed over to a standby that had not received it, or this is another \
             deployment's cursor; events stored since take places the cursor has passed, so \
             nothing was exported and the file is left as it is (remove the chain's entry to \
             export it again from its start)",
            self.path.display(),
            read.seq
        )))
    }

    /// Records that `instance`'s chain has been read through `seq`, the
    /// event with chain hash `hash`; never moves backwards.
    pub(super) fn advance(&mut self, instance: &str, seq: i64, hash: &str) {
        if seq > self.position(instance) {
            let position = Position { seq, hash: hash.to_owned() };
            self.stored.chains.insert(instance.to_owned(), position);
        }
    }

    /// Replaces the file with this cursor: the temporary file (0600)
    /// written, synced and renamed over it, then the directory synced, so
    /// that a crash leaves the old cursor or the new one, whole. A failure
    /// before the rename leaves the old one (exit 2: the file named by
    /// --cursor cannot be written).
    pub(super) fn write(mut self) -> Result<(), AdminError> {
        let written = serde_json::to_string_pretty(&self.stored)
            .map_err(std::io::Error::other)
            .and_then(|text| self.temp.replace(format!("{text}\n").as_bytes(), &self.path));
        if let Err(e) = written {
            return Err(AdminError::usage(format!(
                "--cursor {}: cannot write it ({}); the events were exported and the next run \
                 exports them again",
                self.path.display(),
                io_reason(&e)
            )));
        }
        // The cursor has moved: an unsynced directory can only bring the
        // old one back after a crash (lines repeated, none skipped), so a
        // warning, not a failure that would say the move did not happen.
        let dir = parent(&self.path);
        if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
            eprintln!(
                "warning: {}",
                one_line(&format!(
                    "--cursor {}: moved, but its directory {} could not be synced ({}); after a \
                     crash the previous cursor may come back and the next run repeat lines",
                    self.path.display(),
                    dir.display(),
                    io_reason(&e)
                ))
            );
        }
        Ok(())
    }
}

/// Removes what runs killed before their end left (`.NAME.RANDOM.tmp`,
/// as [`Temp::create`] names them): under the lock no other run is
/// writing one. A directory that cannot be listed is left as it is.
fn remove_stale(dir: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let prefix = format!(".{name}.");
    for entry in entries.flatten() {
        let file = entry.file_name();
        let random = file.to_str().and_then(|f| f.strip_prefix(&prefix)?.strip_suffix(".tmp"));
        let ours = random.is_some_and(|r| {
            r.len() == 12 && r.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if ours {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl Temp {
    /// A new file `.NAME.RANDOM.tmp` in `dir`, mode 0600. The name is
    /// random, not the process id: runs in containers sharing a volume
    /// are all process 1, and must never remove each other's files.
    fn create(dir: &Path, name: &str) -> std::io::Result<Self> {
        let random = kms_core::crypto::rng::array::<6>().map_err(std::io::Error::other)?;
        let random = data_encoding::HEXLOWER.encode(&random);
        let path = dir.join(format!(".{name}.{random}.tmp"));
        let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        let temp = Self { path, file, renamed: false };
        // Whatever the umask.
        temp.file.set_permissions(Permissions::from_mode(0o600))?;
        Ok(temp)
    }

    /// Writes `text`, syncs it and renames the file to `to`.
    fn replace(&mut self, text: &[u8], to: &Path) -> std::io::Result<()> {
        self.file.write_all(text)?;
        self.file.sync_all()?;
        std::fs::rename(&self.path, to)?;
        self.renamed = true;
        Ok(())
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The cursor stored at `path` (none there: the start of every chain), or
/// why it cannot be read.
fn read(path: &Path) -> Result<Stored, String> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Stored::default()),
        Err(e) => return Err(io_reason(&e)),
    };
    let mut text = String::new();
    file.take(MAX_CURSOR_FILE_BYTES + 1).read_to_string(&mut text).map_err(|e| io_reason(&e))?;
    if u64::try_from(text.len()).unwrap_or(u64::MAX) > MAX_CURSOR_FILE_BYTES {
        return Err(format!("larger than {MAX_CURSOR_FILE_BYTES} bytes"));
    }
    let stored: Stored = serde_json::from_str(&text).map_err(|e| {
        format!(
            "not a cursor file ({e}); expected \
             {{\"chains\": {{\"<instance>\": {{\"seq\": <n>, \"hash\": \"<hex>\"}}}}}}"
        )
    })?;
    let hex = |h: &str| !h.is_empty() && data_encoding::HEXLOWER.decode(h.as_bytes()).is_ok();
    if let Some((instance, _)) =
        stored.chains.iter().find(|(i, p)| i.is_empty() || p.seq < 1 || !hex(&p.hash))
    {
        return Err(format!(
            "not a cursor file: chain {instance:?} needs a seq from 1 and a hash in lowercase hex"
        ));
    }
    Ok(stored)
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
        AuditHead { instance: instance.to_owned(), head_seq, head_hash: "ab".repeat(32) }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_missing_file_is_the_start_and_a_written_one_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("siem.cursor");
        let mut cursor = Cursor::open(&path).unwrap();
        assert_eq!(cursor.position("ks-a"), 0);
        cursor.advance("ks-a", 7, "07");
        cursor.advance("ks-a", 5, "05"); // never backwards
        cursor.advance("ks-b", 3, "03");
        cursor.write().unwrap();
        assert_eq!(mode(&path), 0o600);
        let again = Cursor::open(&path).unwrap();
        let read: Vec<_> = again.chains().map(|(i, p)| (i, p.seq, p.hash.as_str())).collect();
        assert_eq!(read, [("ks-a", 7, "07"), ("ks-b", 3, "03")]);
        // Replaced, not edited, and no temporary file left behind.
        std::fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        again.write().unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(names(dir.path()), ["siem.cursor", "siem.cursor.lock"]);
    }

    /// The temporary file exists from the start (0600, a random name each
    /// run) and is gone again when the run ends without writing.
    #[test]
    fn the_temporary_file_is_made_first_and_removed_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let mut seen = Vec::new();
        for _ in 0..2 {
            let cursor = Cursor::open(&path).unwrap();
            let temp = cursor.temp.path.clone();
            assert_eq!(mode(&temp), 0o600);
            let name = temp.file_name().unwrap().to_string_lossy().into_owned();
            let random = name.strip_prefix(".c.json.").unwrap().strip_suffix(".tmp").unwrap();
            assert!(random.len() == 12 && random.bytes().all(|b| b.is_ascii_hexdigit()), "{name}");
            drop(cursor);
            assert!(!temp.exists(), "{name} left behind");
            seen.push(name);
        }
        assert_ne!(seen[0], seen[1]);
        assert_eq!(names(dir.path()), ["c.json.lock"]);
        // A directory where no file can be made (as root too) fails at once.
        let e = Cursor::open(Path::new("/proc/keygate-test.cursor")).unwrap_err();
        assert_eq!(e.failure().code(), 2, "{e}");
    }

    /// What a run killed before its end left is removed by the next run;
    /// other files that only look alike are not.
    #[test]
    fn a_killed_runs_temporary_file_is_removed_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let stale = dir.path().join(".c.json.0123456789ab.tmp");
        std::fs::write(&stale, "half a cursor").unwrap();
        let kept = [".c.json.keep.tmp", ".c.json.0123456789AB.tmp", ".other.0123456789ab.tmp"];
        for name in kept {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let cursor = Cursor::open(&path).unwrap();
        assert!(!stale.exists());
        drop(cursor);
        let mut expected: Vec<&str> = kept.to_vec();
        expected.push("c.json.lock");
        expected.sort_unstable();
        assert_eq!(names(dir.path()), expected);
    }

    /// A second run with the same cursor is refused while the first holds it.
    #[test]
    fn one_run_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let first = Cursor::open(&path).unwrap();
        let e = Cursor::open(&path).unwrap_err();
        assert_eq!(e.failure().code(), 1, "{e}");
        assert!(e.to_string().contains("is in use: another run of audit export"), "{e}");
        drop(first);
        Cursor::open(&path).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_cursor_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        for text in [
            "",
            "not json",
            "{}",
            r#"{"chains": {"ks-a": 7}}"#,
            r#"{"chains": {"ks-a": {"seq": "7", "hash": "ab"}}}"#,
            r#"{"chains": {"ks-a": {"seq": 7}}}"#,
            r#"{"chains": {"ks-a": {"seq": 0, "hash": "ab"}}}"#,
            r#"{"chains": {"ks-a": {"seq": 7, "hash": "AB"}}}"#,
            r#"{"chains": {"ks-a": {"seq": 7, "hash": "abc"}}}"#,
            r#"{"chains": {"ks-a": {"seq": 7, "hash": ""}}}"#,
            r#"{"chains": {"": {"seq": 1, "hash": "ab"}}}"#,
            r#"{"chains": {"ks-a": {"seq": 1, "hash": "ab", "x": 1}}}"#,
            r#"{"chains": {"ks-a": {"seq": 1, "hash": "ab"}}, "extra": true}"#,
        ] {
            std::fs::write(&path, text).unwrap();
            let e = Cursor::open(&path).unwrap_err();
            assert_eq!(e.failure().code(), 2, "{text}: {e}");
            assert!(e.to_string().contains("not a cursor file"), "{text}: {e}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        }
        let e = Cursor::open(&dir.path().join("no-such-dir/c.json")).unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
        let e = Cursor::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
    }

    #[test]
    fn a_cursor_past_the_end_of_a_chain_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let text =
            r#"{"chains": {"ks-a": {"seq": 10, "hash": "0a"}, "ks-b": {"seq": 4, "hash": "04"}}}"#;
        std::fs::write(&path, text).unwrap();
        let cursor = Cursor::open(&path).unwrap();
        cursor.check(&[head("ks-a", 10), head("ks-b", 4), head("ks-c", 1)]).unwrap();
        for heads in [vec![head("ks-a", 9), head("ks-b", 4)], vec![head("ks-a", 10)]] {
            let e = cursor.check(&heads).unwrap_err();
            assert_eq!(e.failure().code(), 1, "{e}");
            assert!(e.to_string().contains("now ends at seq"), "{e}");
        }
    }

    /// The event at the cursor's place must be the one it read.
    #[test]
    fn a_chain_rewritten_under_the_cursor_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, r#"{"chains": {"ks-a": {"seq": 10, "hash": "0a"}}}"#).unwrap();
        let cursor = Cursor::open(&path).unwrap();
        let at = |seq, hash: &str| Position { seq, hash: hash.to_owned() };
        cursor.confirm("ks-a", Some(&at(10, "0a"))).unwrap();
        cursor.confirm("ks-new", None).unwrap();
        for (found, says) in [
            (Some(at(10, "0b")), "another event is there now"),
            (Some(at(11, "0a")), "no event is there now"),
            (None, "no event is there now"),
        ] {
            let e = cursor.confirm("ks-a", found.as_ref()).unwrap_err();
            assert_eq!(e.failure().code(), 1, "{e}");
            let text = e.to_string();
            assert!(text.contains("instance ks-a no longer holds the event"), "{text}");
            assert!(text.contains("at seq 10") && text.contains(says), "{text}");
            assert!(text.contains("restored from a backup or failed over"), "{text}");
        }
    }
}
