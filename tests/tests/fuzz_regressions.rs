//! Replays every fuzz seed (`fuzz/seeds/<target>/`) and every saved crash
//! (`fuzz/regressions/<target>/`) through the fuzz targets' own code, so a
//! crash the fuzzer once found stays fixed under plain `cargo test`.
//! The workflow is in `fuzz/README.md`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use std::path::{Path, PathBuf};

/// The fuzz targets' bodies, shared with `fuzz/fuzz_targets/*.rs`.
#[allow(unreachable_pub, missing_docs, dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod targets;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The regular files of `dir` (none if it does not exist), sorted.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_target_has_seeds_and_a_regressions_dir() {
    for (target, _) in targets::TARGETS {
        assert!(!inputs(&fuzz_dir().join("seeds").join(target)).is_empty(), "seeds for {target}");
        assert!(fuzz_dir().join("regressions").join(target).is_dir(), "regressions/{target}");
        let source = fuzz_dir().join("fuzz_targets").join(format!("{target}.rs"));
        assert!(source.is_file(), "{} exists", source.display());
    }
}

#[test]
fn seeds_and_saved_crashes_replay_without_panicking() {
    let mut replayed = 0;
    for (target, run) in targets::TARGETS {
        for kind in ["seeds", "regressions"] {
            for input in inputs(&fuzz_dir().join(kind).join(target)) {
                let data = std::fs::read(&input).unwrap();
                let outcome = std::panic::catch_unwind(|| run(&data));
                assert!(outcome.is_ok(), "{target} panics on {}", input.display());
                replayed += 1;
            }
        }
    }
    assert!(replayed >= 20, "replayed {replayed} inputs");
}
