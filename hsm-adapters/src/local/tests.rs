//! Tests of the local provider: files on disk, permissions, passphrases,
//! wrap and unwrap, and the format-stability vectors in
//! `tests/vectors/local_root_v1.txt` (made with an independent
//! implementation by `tests/vectors/local_root_v1.py`).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kms_core::KeyPurpose;
use tempfile::TempDir;

use super::*;

const VECTORS: &str = include_str!("../../tests/vectors/local_root_v1.txt");

fn cheap() -> Argon2Params {
    Argon2Params::new(8, 1, 1).unwrap()
}

fn pass(s: &str) -> SecretString {
    SecretString::from(s)
}

fn context(owner: &str, version: u32) -> WrapContext {
    WrapContext { purpose: KeyPurpose::TenantKek, owner: owner.to_owned(), version }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn vectors() -> HashMap<&'static str, &'static str> {
    VECTORS
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| line.split_once(" = ").unwrap())
        .collect()
}

/// A directory with a path for a key file that does not exist yet.
fn scratch() -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root.key");
    (dir, path)
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) {
    let _ = fs::remove_file(path);
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).unwrap();
    file.write_all(bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn provider_is_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<LocalRootKey>();
    check::<LocalKeyError>();
}

#[tokio::test]
async fn plain_create_open_round_trip() {
    let (_dir, path) = scratch();
    let created = LocalRootKey::create(&path, None, cheap()).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), file::PLAIN_LEN as u64);
    let opened = LocalRootKey::open(&path, None).unwrap();
    assert_eq!(created.describe(), opened.describe());
    assert_eq!(opened.path(), path);

    let key = Key256::generate().unwrap();
    let blob = created.wrap(&key, &context("acme", 1)).await.unwrap();
    let back = opened.unwrap(&blob, &context("acme", 1)).await.unwrap();
    assert_eq!(back.expose_secret(), key.expose_secret());
}

#[tokio::test]
async fn sealed_create_open_round_trip() {
    let (_dir, path) = scratch();
    let created = LocalRootKey::create(&path, Some(&pass("hunter2 hunter2")), cheap()).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), file::SEALED_LEN as u64);
    let opened = LocalRootKey::open(&path, Some(&pass("hunter2 hunter2"))).unwrap();
    assert_eq!(created.describe(), opened.describe());

    let key = Key256::generate().unwrap();
    let blob = created.wrap(&key, &context("acme", 3)).await.unwrap();
    let back = opened.unwrap(&blob, &context("acme", 3)).await.unwrap();
    assert_eq!(back.expose_secret(), key.expose_secret());
}

#[test]
fn default_argon2_params_work() {
    let (_dir, path) = scratch();
    let created = LocalRootKey::create(&path, Some(&pass("pw")), Argon2Params::DEFAULT).unwrap();
    let bytes = fs::read(&path).unwrap();
    assert_eq!(&bytes[6..18], &[0, 1, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1], "m = 65536, t = 3, p = 1");
    let opened = LocalRootKey::open(&path, Some(&pass("pw"))).unwrap();
    assert_eq!(created.describe(), opened.describe());
}

#[test]
fn describe_is_stable_and_distinct() {
    let (_dir, path) = scratch();
    let first = LocalRootKey::create(&path, None, cheap()).unwrap().describe();
    assert_eq!(first.kind, "local");
    assert_eq!(first.key_ref.len(), 16);
    assert!(first.key_ref.bytes().all(|b| b.is_ascii_hexdigit()));
    for _ in 0..3 {
        assert_eq!(LocalRootKey::open(&path, None).unwrap().describe(), first);
    }
    let (_dir2, other) = scratch();
    assert_ne!(LocalRootKey::create(&other, None, cheap()).unwrap().describe(), first);
}

#[tokio::test]
async fn wrap_is_randomised_and_bound_to_its_context() {
    let (_dir, path) = scratch();
    let provider = LocalRootKey::create(&path, None, cheap()).unwrap();
    let key = Key256::generate().unwrap();
    let ctx = context("acme", 2);
    let a = provider.wrap(&key, &ctx).await.unwrap();
    let b = provider.wrap(&key, &ctx).await.unwrap();
    assert_eq!(a.len(), WRAPPED_LEN);
    assert_eq!(a[0], WRAP_VERSION);
    assert_ne!(a, b, "same key wrapped twice gives different blobs");
    assert!(!hex(&a).contains(&hex(key.expose_secret())));

    let others = [
        context("acme", 3),
        context("acmf", 2),
        WrapContext { purpose: KeyPurpose::IndexRoot, owner: "acme".into(), version: 2 },
    ];
    for other in &others {
        assert!(matches!(provider.unwrap(&a, other).await, Err(RootKeyError::CannotUnwrap)));
    }
    assert!(provider.unwrap(&a, &ctx).await.is_ok());
}

#[tokio::test]
async fn tampered_blobs_cannot_unwrap() {
    let (_dir, path) = scratch();
    let provider = LocalRootKey::create(&path, None, cheap()).unwrap();
    let ctx = context("acme", 1);
    let blob = provider.wrap(&Key256::generate().unwrap(), &ctx).await.unwrap();
    for bit in 0..blob.len() * 8 {
        let mut tampered = blob.clone();
        tampered[bit / 8] ^= 1 << (bit % 8);
        let result = provider.unwrap(&tampered, &ctx).await;
        assert!(matches!(result, Err(RootKeyError::CannotUnwrap)), "bit {bit}");
    }
    for len in 0..blob.len() {
        let result = provider.unwrap(&blob[..len], &ctx).await;
        assert!(matches!(result, Err(RootKeyError::CannotUnwrap)), "prefix {len}");
    }
    let mut long = blob.clone();
    long.push(0);
    assert!(matches!(provider.unwrap(&long, &ctx).await, Err(RootKeyError::CannotUnwrap)));

    // Another root key cannot unwrap it either.
    let (_dir2, other_path) = scratch();
    let other = LocalRootKey::create(&other_path, None, cheap()).unwrap();
    assert!(matches!(other.unwrap(&blob, &ctx).await, Err(RootKeyError::CannotUnwrap)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_wraps_and_unwraps() {
    let (_dir, path) = scratch();
    let provider = Arc::new(LocalRootKey::create(&path, None, cheap()).unwrap());
    let tasks: Vec<_> = (0..64u32)
        .map(|i| {
            let provider = Arc::clone(&provider);
            tokio::spawn(async move {
                let ctx = context("acme", i);
                let key = Key256::from_array(&mut [i as u8; KEY_LEN]);
                let blob = provider.wrap(&key, &ctx).await.unwrap();
                let back = provider.unwrap(&blob, &ctx).await.unwrap();
                assert_eq!(back.expose_secret(), &[i as u8; KEY_LEN]);
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

#[test]
fn wrong_passphrase_is_a_clear_error() {
    let (_dir, path) = scratch();
    LocalRootKey::create(&path, Some(&pass("Tr0ub4dor&3")), cheap()).unwrap();
    let err = LocalRootKey::open(&path, Some(&pass("c0rrect-h0rse"))).unwrap_err();
    assert!(matches!(&err, LocalKeyError::WrongPassphrase { path: p } if *p == path), "{err}");
    let message = err.to_string();
    assert!(message.contains("wrong passphrase") && message.contains(&path.display().to_string()));
    assert!(!message.contains("Tr0ub4dor") && !message.contains("c0rrect"), "{message}");
    assert!(!format!("{err:?}").contains("c0rrect"));
}

#[test]
fn sealed_file_needs_its_passphrase_and_plain_file_refuses_one() {
    let (_dir, sealed) = scratch();
    LocalRootKey::create(&sealed, Some(&pass("pw")), cheap()).unwrap();
    let err = LocalRootKey::open(&sealed, None).unwrap_err();
    assert!(matches!(err, LocalKeyError::PassphraseRequired { .. }), "{err}");
    assert!(err.to_string().contains("sealed with a passphrase"));

    let (_dir2, plain) = scratch();
    LocalRootKey::create(&plain, None, cheap()).unwrap();
    let err = LocalRootKey::open(&plain, Some(&pass("pw"))).unwrap_err();
    assert!(matches!(err, LocalKeyError::NotSealed { .. }), "{err}");
}

#[test]
fn empty_passphrase_is_refused_on_create() {
    let (_dir, path) = scratch();
    let err = LocalRootKey::create(&path, Some(&pass("")), cheap()).unwrap_err();
    assert!(matches!(err, LocalKeyError::EmptyPassphrase), "{err}");
    assert!(!path.exists());
}

#[test]
fn sealed_parameters_cannot_be_swapped() {
    let (_dir, path) = scratch();
    LocalRootKey::create(&path, Some(&pass("pw")), cheap()).unwrap();
    let original = fs::read(&path).unwrap();
    // t_cost 1 → 2, then a changed salt byte: both are authenticated.
    for offset in [13, 20] {
        let mut bytes = original.clone();
        bytes[offset] ^= 3;
        write_file(&path, &bytes, 0o600);
        let err = LocalRootKey::open(&path, Some(&pass("pw"))).unwrap_err();
        assert!(matches!(err, LocalKeyError::WrongPassphrase { .. }), "offset {offset}: {err}");
    }
}

#[test]
fn every_truncation_of_a_file_is_malformed() {
    for passphrase in [None, Some(pass("pw"))] {
        let (_dir, path) = scratch();
        LocalRootKey::create(&path, passphrase.as_ref(), cheap()).unwrap();
        let full = fs::read(&path).unwrap();
        for len in 0..full.len() {
            write_file(&path, &full[..len], 0o600);
            let err = LocalRootKey::open(&path, passphrase.as_ref()).unwrap_err();
            assert!(
                matches!(&err, LocalKeyError::Malformed {
                    path: p, reason: FormatError::Truncated { actual, .. }
                } if *p == path && *actual == len),
                "prefix {len}: {err}"
            );
            assert!(err.to_string().contains("truncated"), "{err}");
        }
    }
}

#[test]
fn trailing_garbage_is_malformed() {
    let (_dir, path) = scratch();
    LocalRootKey::create(&path, None, cheap()).unwrap();
    let full = fs::read(&path).unwrap();
    for extra in [1, 40, 4096] {
        let mut bytes = full.clone();
        bytes.resize(full.len() + extra, 0xee);
        write_file(&path, &bytes, 0o600);
        let err = LocalRootKey::open(&path, None).unwrap_err();
        assert!(
            matches!(
                err,
                LocalKeyError::Malformed { reason: FormatError::TrailingBytes { .. }, .. }
            ),
            "{extra}: {err}"
        );
    }
}

#[test]
fn corrupted_plain_key_fails_its_check_value() {
    let (_dir, path) = scratch();
    LocalRootKey::create(&path, None, cheap()).unwrap();
    let mut bytes = fs::read(&path).unwrap();
    bytes[10] ^= 0x01;
    write_file(&path, &bytes, 0o600);
    let err = LocalRootKey::open(&path, None).unwrap_err();
    assert!(
        matches!(err, LocalKeyError::Malformed { reason: FormatError::CheckMismatch, .. }),
        "{err}"
    );
}

#[test]
fn loose_permissions_are_refused_with_the_mode_and_a_fix() {
    let (_dir, path) = scratch();
    LocalRootKey::create(&path, None, cheap()).unwrap();
    for mode in [0o644, 0o640, 0o604, 0o660, 0o601, 0o610, 0o666, 0o777] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let err = LocalRootKey::open(&path, None).unwrap_err();
        assert!(
            matches!(&err, LocalKeyError::LoosePermissions { path: p, mode: m }
                if *p == path && *m == mode),
            "{mode:o}: {err}"
        );
        let message = err.to_string();
        assert!(message.contains(&format!("{mode:04o}")), "{message}");
        assert!(message.contains("chmod 600") && message.contains(&path.display().to_string()));
    }
    for mode in [0o600, 0o400, 0o700] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        assert!(LocalRootKey::open(&path, None).is_ok(), "{mode:o}");
    }
}

#[test]
fn create_uses_mode_0600_and_never_overwrites() {
    let (_dir, path) = scratch();
    let first = LocalRootKey::create(&path, None, cheap()).unwrap();
    assert_eq!(mode_of(&path), 0o600);
    let before = fs::read(&path).unwrap();
    for passphrase in [None, Some(pass("pw"))] {
        let err = LocalRootKey::create(&path, passphrase.as_ref(), cheap()).unwrap_err();
        assert!(matches!(&err, LocalKeyError::AlreadyExists { path: p } if *p == path), "{err}");
    }
    assert_eq!(fs::read(&path).unwrap(), before);
    assert_eq!(LocalRootKey::open(&path, None).unwrap().describe(), first.describe());

    let (_dir2, sealed) = scratch();
    LocalRootKey::create(&sealed, Some(&pass("pw")), cheap()).unwrap();
    assert_eq!(mode_of(&sealed), 0o600);
}

/// The entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn create_leaves_only_the_key_file_behind() {
    let (dir, path) = scratch();
    LocalRootKey::create(&path, None, cheap()).unwrap();
    assert_eq!(entries(dir.path()), ["root.key"]);
    let before = fs::read(&path).unwrap();
    let err = LocalRootKey::create(&path, Some(&pass("pw")), cheap()).unwrap_err();
    assert!(matches!(err, LocalKeyError::AlreadyExists { .. }), "{err}");
    assert_eq!(entries(dir.path()), ["root.key"]);
    assert_eq!(fs::read(&path).unwrap(), before);
}

#[test]
fn create_never_replaces_a_symbolic_link_or_writes_through_it() {
    let (dir, path) = scratch();
    let target = dir.path().join("elsewhere");
    std::os::unix::fs::symlink(&target, &path).unwrap();
    let err = LocalRootKey::create(&path, None, cheap()).unwrap_err();
    assert!(matches!(err, LocalKeyError::AlreadyExists { .. }), "{err}");
    assert!(!target.exists(), "the key was written through the link");
    assert_eq!(entries(dir.path()), ["root.key"]);
}

/// As in a Kubernetes secret volume, the key file may be reached through
/// a link; the file it ends at is what is checked.
#[test]
fn a_symbolic_link_to_a_key_file_is_followed_and_the_file_checked() {
    let (dir, path) = scratch();
    LocalRootKey::create(&path, None, cheap()).unwrap();
    let link = dir.path().join("link.key");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let through_link = LocalRootKey::open(&link, None).unwrap();
    let direct = LocalRootKey::open(&path, None).unwrap();
    assert_eq!(through_link.describe(), direct.describe());
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = LocalRootKey::open(&link, None).unwrap_err();
    assert!(matches!(err, LocalKeyError::LoosePermissions { .. }), "{err}");
}

#[test]
fn a_fifo_is_refused_without_blocking() {
    let (_dir, path) = scratch();
    crate::secret_file::tests::mkfifo(&path);
    let opened = path.clone();
    let err = crate::secret_file::tests::within_seconds(move || {
        LocalRootKey::open(&opened, None).map(|_| ())
    })
    .unwrap_err();
    assert!(matches!(&err, LocalKeyError::NotAFile { path: p } if *p == path), "{err}");
}

/// Needs to run as root (to give a file away); skipped otherwise.
#[test]
fn a_key_file_of_another_user_is_refused() {
    let (_dir, path) = scratch();
    LocalRootKey::create(&path, None, cheap()).unwrap();
    let nobody = 65534;
    if std::os::unix::fs::chown(&path, Some(nobody), None).is_err() {
        eprintln!("skipped: cannot give a file to another user (not root)");
        return;
    }
    let err = LocalRootKey::open(&path, None).unwrap_err();
    assert!(
        matches!(&err, LocalKeyError::NotOwned { path: p, owner, .. }
            if *p == path && *owner == nobody),
        "{err}"
    );
    assert!(err.to_string().contains("owned by uid 65534"), "{err}");
}

#[test]
fn missing_files_and_directories_are_clear_errors() {
    let (dir, path) = scratch();
    let err = LocalRootKey::open(&path, None).unwrap_err();
    assert!(matches!(&err, LocalKeyError::Io { path: p, .. } if *p == path), "{err}");
    assert!(err.to_string().contains(&path.display().to_string()));

    let err = LocalRootKey::open(dir.path(), None).unwrap_err();
    assert!(matches!(err, LocalKeyError::NotAFile { .. }), "{err}");

    let err = LocalRootKey::create(dir.path().join("no/such/dir/root.key"), None, cheap());
    assert!(matches!(err, Err(LocalKeyError::Io { operation: "create", .. })));
}

#[test]
fn debug_shows_only_path_and_fingerprint() {
    let (_dir, path) = scratch();
    let provider = LocalRootKey::create(&path, None, cheap()).unwrap();
    let bytes = fs::read(&path).unwrap();
    let root = Key256::from_slice(&bytes[6..38]).unwrap();
    let wrap_key = kdf::derive(&root, WRAP_LABEL);
    let debug = format!("{provider:?}");
    assert!(debug.contains(&provider.describe().key_ref), "{debug}");
    assert!(debug.contains("root.key"), "{debug}");
    for secret in [root.expose_secret(), wrap_key.expose_secret()] {
        assert!(!debug.contains(&hex(secret)), "{debug}");
        assert!(!debug.contains(format!("{:?}", &secret[..4]).trim_end_matches(']')), "{debug}");
    }
}

#[test]
fn errors_convert_to_misconfigured() {
    let err: RootKeyError = LocalKeyError::EmptyPassphrase.into();
    assert!(matches!(err, RootKeyError::Misconfigured { provider: "local", .. }));
    assert!(!err.is_retryable());
}

/// The stored vectors must keep opening and unwrapping, whatever changes.
#[tokio::test]
async fn format_stability_vectors() {
    let v = vectors();
    let (dir, plain) = scratch();
    write_file(&plain, &unhex(v["plain_file"]), 0o600);
    let provider = LocalRootKey::open(&plain, None).unwrap();
    assert_eq!(provider.describe().key_ref, v["fingerprint"]);

    let sealed = dir.path().join("sealed.key");
    write_file(&sealed, &unhex(v["sealed_file"]), 0o600);
    let from_sealed = LocalRootKey::open(&sealed, Some(&pass(v["passphrase"]))).unwrap();
    assert_eq!(from_sealed.describe().key_ref, v["fingerprint"]);
    let err = LocalRootKey::open(&sealed, Some(&pass("not it"))).unwrap_err();
    assert!(matches!(err, LocalKeyError::WrongPassphrase { .. }), "{err}");

    // Our encoder produces the same plain file for the same key.
    let root = Key256::from_slice(&unhex(v["root_key"])).unwrap();
    assert_eq!(hex(&file::encode_plain(&root)), v["plain_file"]);
    assert_eq!(fingerprint(&root), v["fingerprint"]);

    let blob = unhex(v["wrapped_blob"]);
    for p in [&provider, &from_sealed] {
        let key = p.unwrap(&blob, &context("acme", 7)).await.unwrap();
        assert_eq!(hex(key.expose_secret()), v["wrapped_key"]);
        assert!(matches!(
            p.unwrap(&blob, &context("acme", 6)).await,
            Err(RootKeyError::CannotUnwrap)
        ));
    }
}
