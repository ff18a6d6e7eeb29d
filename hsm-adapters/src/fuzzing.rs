//! Entry points for the fuzz targets (`fuzz/`) and their regression tests:
//! the local root key file parser. Compiled only for this crate's tests or
//! with the `fuzzing` feature (which `fuzz/` and the `tests/` crate
//! enable); never part of a release build. Must never panic on any input;
//! asserts inside are properties, and a failed one is a bug.

/// The root key file parser: any bytes give a file or an error, never a
/// panic. A plain file re-encodes to the same bytes and any changed byte
/// breaks it; a sealed file's associated data is exactly what sealing
/// would bind, and a sealed file that opens under the seeds' passphrase
/// key (`[0x7f; 32]`: Argon2id per input would be too slow) stops opening
/// when any byte changes.
pub fn root_key_file(data: &[u8]) {
    crate::local::fuzz_root_key_file(data);
}
