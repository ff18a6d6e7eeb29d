//! The root key file format.
//!
//! ```text
//! header:            magic "KGRK" ‖ u8 version = 1 ‖ u8 kind
//! kind 0, plain:     header ‖ root_key(32) ‖ check(16)                        54 bytes
//! kind 1, sealed:    header ‖ u32 m_cost_kib ‖ u32 t_cost ‖ u32 p_cost ‖ salt(16)
//!                    ‖ nonce(12) ‖ ciphertext(32) ‖ tag(16)                   94 bytes
//! ```
//!
//! Integers are big-endian.
//!
//! - **Plain**: `check` is the first 16 bytes of
//!   `HKDF-SHA256(root_key, "keygate/v1/local-root-check")`, so a corrupted
//!   or truncated key is detected instead of silently used.
//! - **Sealed**: `nonce ‖ ciphertext ‖ tag` is AES-256-GCM-SIV of the root
//!   key under `Argon2id(passphrase, salt, m_cost_kib, t_cost, p_cost)`
//!   (version 0x13, 32-byte output), with every byte before the nonce
//!   (header, parameters, salt) as associated data, so the parameters and
//!   salt cannot be changed without the file failing to open.
//!
//! The parser is strict and total: exact lengths, known version and kind,
//! Argon2 parameters within [`Argon2Params`]'s bounds (checked before any
//! Argon2 work), and any input yields a value or an error, never a panic.

use kms_core::crypto::rng::{self, RandomError};
use kms_core::crypto::{Aead, NONCE_LEN, TAG_LEN, ct_eq, kdf};
use kms_core::{KEY_LEN, Key256};
use zeroize::Zeroizing;

use super::passphrase::Argon2Params;

/// First four bytes of every root key file.
pub(super) const MAGIC: &[u8; 4] = b"KGRK";
/// The only format version.
pub(super) const VERSION: u8 = 1;
/// Kind byte of a plain file.
pub(super) const KIND_PLAIN: u8 = 0;
/// Kind byte of a passphrase-sealed file.
pub(super) const KIND_SEALED: u8 = 1;
/// Length of magic, version and kind.
pub(super) const HEADER_LEN: usize = 6;
/// Length of a plain file's check value.
pub(super) const CHECK_LEN: usize = 16;
/// Length of a sealed file's Argon2 salt.
pub(super) const SALT_LEN: usize = 16;
/// Length of a plain file.
pub(super) const PLAIN_LEN: usize = HEADER_LEN + KEY_LEN + CHECK_LEN;
/// Length of a sealed file's associated data (everything before the nonce).
pub(super) const SEALED_AAD_LEN: usize = HEADER_LEN + 3 * 4 + SALT_LEN;
/// Length of a sealed file.
pub(super) const SEALED_LEN: usize = SEALED_AAD_LEN + NONCE_LEN + KEY_LEN + TAG_LEN;
/// Longest valid file.
pub(super) const MAX_FILE_LEN: usize = SEALED_LEN;

const CHECK_LABEL: &[u8] = b"keygate/v1/local-root-check";

/// Why bytes are not a valid root key file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Does not start with the `KGRK` magic.
    #[error("not a keygate root key file (no KGRK magic)")]
    BadMagic,
    /// A format version this build does not know.
    #[error("unsupported format version {0} (this build reads version 1)")]
    UnsupportedVersion(u8),
    /// A kind byte other than 0 (plain) or 1 (sealed).
    #[error("unknown kind {0} (expected 0 = plain or 1 = sealed)")]
    UnknownKind(u8),
    /// Shorter than its format requires.
    #[error("truncated: {actual} bytes, expected {expected}")]
    Truncated {
        /// Bytes the format requires (at least).
        expected: usize,
        /// Bytes present.
        actual: usize,
    },
    /// Longer than its format allows.
    #[error("trailing bytes: {actual} bytes, expected {expected}")]
    TrailingBytes {
        /// Bytes the format requires.
        expected: usize,
        /// Bytes present (or read before giving up).
        actual: usize,
    },
    /// A plain file's check value does not match its key.
    #[error("check value does not match the key (the file is corrupted)")]
    CheckMismatch,
    /// Sealed with Argon2id parameters outside the accepted bounds.
    #[error(
        "Argon2id parameters out of range: m_cost = {m_cost_kib} KiB, t_cost = {t_cost}, \
         p_cost = {p_cost}"
    )]
    Argon2ParamsOutOfRange {
        /// Memory cost in KiB.
        m_cost_kib: u32,
        /// Iterations.
        t_cost: u32,
        /// Lanes.
        p_cost: u32,
    },
}

/// A parsed root key file.
pub(super) enum Parsed<'a> {
    /// A plain file whose check value matched.
    Plain(Key256),
    /// A sealed file, not yet opened.
    Sealed(SealedFile<'a>),
}

/// The parts of a sealed file.
pub(super) struct SealedFile<'a> {
    /// Argon2id parameters (within bounds).
    pub(super) params: Argon2Params,
    /// Argon2id salt.
    pub(super) salt: &'a [u8],
    /// Associated data: every byte before the nonce.
    aad: &'a [u8],
    /// `nonce ‖ ciphertext ‖ tag`.
    sealed: &'a [u8],
}

impl SealedFile<'_> {
    /// Opens the sealed root key with the passphrase-derived key; `None` if
    /// authentication fails (wrong passphrase or corrupted file).
    pub(super) fn open(&self, passphrase_key: &Key256) -> Option<Key256> {
        let plaintext = Aead::new(passphrase_key).open(self.sealed, self.aad).ok()?;
        Key256::from_slice(&plaintext)
    }
}

/// Encodes a plain file. The result holds the key; it is wiped on drop.
pub(super) fn encode_plain(root: &Key256) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(PLAIN_LEN));
    push_header(&mut out, KIND_PLAIN);
    out.extend_from_slice(root.expose_secret());
    out.extend_from_slice(&check_value(root));
    out
}

/// The associated data of a sealed file: header, parameters and salt.
pub(super) fn sealed_aad(params: Argon2Params, salt: &[u8; SALT_LEN]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(SEALED_AAD_LEN);
    push_header(&mut aad, KIND_SEALED);
    aad.extend_from_slice(&params.m_cost_kib().to_be_bytes());
    aad.extend_from_slice(&params.t_cost().to_be_bytes());
    aad.extend_from_slice(&params.p_cost().to_be_bytes());
    aad.extend_from_slice(salt);
    aad
}

/// Encodes a sealed file: `root` sealed under `passphrase_key`, which must
/// have been derived with `params` and `salt`.
pub(super) fn encode_sealed(
    root: &Key256,
    passphrase_key: &Key256,
    params: Argon2Params,
    salt: &[u8; SALT_LEN],
) -> Result<Vec<u8>, RandomError> {
    let aad = sealed_aad(params, salt);
    let mut out = Vec::with_capacity(SEALED_LEN);
    out.extend_from_slice(&aad);
    // AES-GCM-SIV's only failure is an input over 2^36 bytes; 34 bytes of
    // AAD and a 32-byte key are far below that.
    Aead::new(passphrase_key).seal_random(&aad, root.expose_secret(), &mut out)?;
    Ok(out)
}

/// Parses a root key file; verifies a plain file's check value.
pub(super) fn parse(bytes: &[u8]) -> Result<Parsed<'_>, FormatError> {
    // Report foreign files as such even when they are shorter than the magic.
    if !MAGIC.starts_with(bytes.get(..MAGIC.len()).unwrap_or(bytes)) {
        return Err(FormatError::BadMagic);
    }
    let mut r = Reader::new(bytes);
    r.take(MAGIC.len())?;
    let version = r.u8()?;
    if version != VERSION {
        return Err(FormatError::UnsupportedVersion(version));
    }
    let kind = r.u8()?;
    let expected = match kind {
        KIND_PLAIN => PLAIN_LEN,
        KIND_SEALED => SEALED_LEN,
        other => return Err(FormatError::UnknownKind(other)),
    };
    // Check the whole length before reading further, so a short file is
    // reported with the length its kind needs.
    if bytes.len() < expected {
        return Err(FormatError::Truncated { expected, actual: bytes.len() });
    }
    if bytes.len() > expected {
        return Err(FormatError::TrailingBytes { expected, actual: bytes.len() });
    }
    if kind == KIND_PLAIN {
        let key = Key256::from_slice(r.take(KEY_LEN)?).ok_or(r.truncated())?;
        let check = r.take(CHECK_LEN)?;
        r.finish()?;
        if !ct_eq(&check_value(&key), check) {
            return Err(FormatError::CheckMismatch);
        }
        return Ok(Parsed::Plain(key));
    }
    let (m_cost_kib, t_cost, p_cost) = (r.u32()?, r.u32()?, r.u32()?);
    let params = Argon2Params::checked(m_cost_kib, t_cost, p_cost)
        .ok_or(FormatError::Argon2ParamsOutOfRange { m_cost_kib, t_cost, p_cost })?;
    let salt = r.take(SALT_LEN)?;
    let aad = bytes.get(..SEALED_AAD_LEN).ok_or(r.truncated())?;
    let sealed = r.take(NONCE_LEN + KEY_LEN + TAG_LEN)?;
    r.finish()?;
    Ok(Parsed::Sealed(SealedFile { params, salt, aad, sealed }))
}

/// The first 16 bytes of `HKDF(root, "keygate/v1/local-root-check")`.
fn check_value(root: &Key256) -> [u8; CHECK_LEN] {
    let derived = kdf::derive(root, CHECK_LABEL);
    // 16 of 32 bytes: `first_chunk` cannot fail here.
    derived.expose_secret().first_chunk().copied().unwrap_or([0u8; CHECK_LEN])
}

fn push_header(out: &mut Vec<u8>, kind: u8) {
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(kind);
}

/// A fresh random salt.
pub(super) fn random_salt() -> Result<[u8; SALT_LEN], RandomError> {
    rng::array::<SALT_LEN>()
}

/// Reads a byte string front to back without ever indexing out of bounds.
struct Reader<'a> {
    all: &'a [u8],
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { all: bytes, rest: bytes }
    }

    fn truncated(&self) -> FormatError {
        let actual = self.all.len();
        FormatError::Truncated { expected: actual.max(HEADER_LEN), actual }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let (head, rest) = self.rest.split_at_checked(n).ok_or(self.truncated())?;
        self.rest = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, FormatError> {
        let [b] = self.take(1)? else { return Err(self.truncated()) };
        Ok(*b)
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        let bytes: [u8; 4] = self.take(4)?.try_into().map_err(|_| self.truncated())?;
        Ok(u32::from_be_bytes(bytes))
    }

    fn finish(self) -> Result<(), FormatError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            let expected = self.all.len() - self.rest.len();
            Err(FormatError::TrailingBytes { expected, actual: self.all.len() })
        }
    }
}

/// The passphrase-derived key the fuzz seeds of sealed files are sealed
/// under (Argon2id is too slow to run per fuzz input, so the fuzzer opens
/// with the derived key directly).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) const FUZZ_PASSPHRASE_KEY: [u8; KEY_LEN] = [0x7f; KEY_LEN];

/// The body of the `root_key_file` fuzz target (see `crate::fuzzing`).
#[cfg(any(test, feature = "fuzzing"))]
#[allow(clippy::panic, clippy::expect_used)] // a failed property is a bug
pub(crate) fn fuzz(data: &[u8]) {
    let passphrase_key = Key256::from_array(&mut FUZZ_PASSPHRASE_KEY.clone());
    match parse(data) {
        Ok(Parsed::Plain(key)) => {
            assert_eq!(&encode_plain(&key)[..], data, "a plain file has one encoding");
            for i in 0..data.len() {
                let changed = with_byte_changed(data, i);
                assert!(parse(&changed).is_err(), "plain file accepted with byte {i} changed");
            }
        }
        Ok(Parsed::Sealed(sealed)) => {
            assert_eq!(data.len(), SEALED_LEN);
            let salt: [u8; SALT_LEN] = sealed.salt.try_into().expect("a salt of SALT_LEN bytes");
            assert_eq!(
                Some(sealed_aad(sealed.params, &salt).as_slice()),
                data.get(..SEALED_AAD_LEN),
                "the associated data is what sealing binds"
            );
            if sealed.open(&passphrase_key).is_some() {
                for i in 0..data.len() {
                    match parse(&with_byte_changed(data, i)) {
                        Ok(Parsed::Sealed(other)) => assert!(
                            other.open(&passphrase_key).is_none(),
                            "sealed file opened with byte {i} changed"
                        ),
                        Ok(Parsed::Plain(_)) => panic!("byte {i} turned a sealed file plain"),
                        Err(_) => {}
                    }
                }
            }
        }
        Err(error) => {
            let _ = error.to_string();
            match error {
                FormatError::Truncated { expected, actual } => {
                    assert!(actual == data.len() && expected > actual, "{error}");
                }
                FormatError::TrailingBytes { expected, actual } => {
                    assert!(actual == data.len() && expected < actual, "{error}");
                }
                _ => {}
            }
        }
    }
}

/// `data` with one bit of byte `i` flipped.
#[cfg(any(test, feature = "fuzzing"))]
fn with_byte_changed(data: &[u8], i: usize) -> Vec<u8> {
    data.iter().enumerate().map(|(j, b)| if j == i { b ^ 0x01 } else { *b }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> Argon2Params {
        Argon2Params::new(8, 1, 1).unwrap()
    }

    fn root(byte: u8) -> Key256 {
        Key256::from_array(&mut [byte; KEY_LEN])
    }

    fn sealed_file() -> Vec<u8> {
        let salt = [9u8; SALT_LEN];
        encode_sealed(&root(1), &root(2), cheap(), &salt).unwrap()
    }

    #[test]
    fn lengths_match_the_documented_layout() {
        assert_eq!(PLAIN_LEN, 54);
        assert_eq!(SEALED_AAD_LEN, 34);
        assert_eq!(SEALED_LEN, 94);
        assert_eq!(encode_plain(&root(1)).len(), PLAIN_LEN);
        assert_eq!(sealed_file().len(), SEALED_LEN);
    }

    #[test]
    fn plain_round_trip() {
        let bytes = encode_plain(&root(7));
        assert_eq!(&bytes[..6], b"KGRK\x01\x00");
        let Parsed::Plain(key) = parse(&bytes).unwrap() else { panic!("not plain") };
        assert_eq!(key.expose_secret(), &[7u8; KEY_LEN]);
    }

    #[test]
    fn sealed_round_trip_and_wrong_key() {
        let bytes = sealed_file();
        assert_eq!(&bytes[..6], b"KGRK\x01\x01");
        let Parsed::Sealed(sealed) = parse(&bytes).unwrap() else { panic!("not sealed") };
        assert_eq!(sealed.params, cheap());
        assert_eq!(sealed.salt, &[9u8; SALT_LEN]);
        assert_eq!(sealed.open(&root(2)).unwrap().expose_secret(), &[1u8; KEY_LEN]);
        assert!(sealed.open(&root(3)).is_none());
    }

    #[test]
    fn every_prefix_is_truncated() {
        for full in [encode_plain(&root(1)).to_vec(), sealed_file()] {
            for len in 0..full.len() {
                let err = parse(&full[..len]).err().unwrap();
                assert!(
                    matches!(err, FormatError::Truncated { actual, .. } if actual == len),
                    "prefix {len} of {}: {err}",
                    full.len()
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        for full in [encode_plain(&root(1)).to_vec(), sealed_file()] {
            let mut long = full.clone();
            long.push(0);
            assert_eq!(
                parse(&long).err().unwrap(),
                FormatError::TrailingBytes { expected: full.len(), actual: full.len() + 1 }
            );
        }
    }

    #[test]
    fn header_fields_are_checked() {
        let mut bytes = encode_plain(&root(1)).to_vec();
        bytes[0] = b'X';
        assert_eq!(parse(&bytes).err().unwrap(), FormatError::BadMagic);
        let mut bytes = encode_plain(&root(1)).to_vec();
        bytes[4] = 2;
        assert_eq!(parse(&bytes).err().unwrap(), FormatError::UnsupportedVersion(2));
        let mut bytes = encode_plain(&root(1)).to_vec();
        bytes[5] = 2;
        assert_eq!(parse(&bytes).err().unwrap(), FormatError::UnknownKind(2));
        assert_eq!(parse(b"not a key file at all").err().unwrap(), FormatError::BadMagic);
        assert_eq!(parse(b"-").err().unwrap(), FormatError::BadMagic);
        assert!(matches!(parse(b"").err().unwrap(), FormatError::Truncated { actual: 0, .. }));
    }

    #[test]
    fn every_flipped_bit_of_a_plain_file_is_rejected() {
        let full = encode_plain(&root(0x5a)).to_vec();
        for bit in 0..full.len() * 8 {
            let mut bytes = full.clone();
            bytes[bit / 8] ^= 1 << (bit % 8);
            assert!(parse(&bytes).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn every_flipped_bit_of_a_sealed_file_fails_to_open() {
        let full = sealed_file();
        for bit in 0..full.len() * 8 {
            let mut bytes = full.clone();
            bytes[bit / 8] ^= 1 << (bit % 8);
            // Either the parser rejects it (header, parameter bounds) or
            // authentication fails (parameters, salt, nonce, ciphertext, tag).
            if let Ok(Parsed::Sealed(sealed)) = parse(&bytes) {
                assert!(sealed.open(&root(2)).is_none(), "bit {bit}");
            } else {
                assert!(parse(&bytes).is_err(), "bit {bit}");
            }
        }
    }

    #[test]
    fn argon2_params_from_the_file_are_bounded() {
        let mut bytes = sealed_file();
        bytes[6..10].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            parse(&bytes).err().unwrap(),
            FormatError::Argon2ParamsOutOfRange { m_cost_kib: u32::MAX, t_cost: 1, p_cost: 1 }
        );
        let mut bytes = sealed_file();
        bytes[10..14].copy_from_slice(&0u32.to_be_bytes());
        assert!(matches!(
            parse(&bytes).err().unwrap(),
            FormatError::Argon2ParamsOutOfRange { t_cost: 0, .. }
        ));
        let mut bytes = sealed_file();
        bytes[14..18].copy_from_slice(&1000u32.to_be_bytes());
        assert!(matches!(
            parse(&bytes).err().unwrap(),
            FormatError::Argon2ParamsOutOfRange { p_cost: 1000, .. }
        ));
        // Beyond 1 GiB, 16 passes or 8 lanes (the old ceilings, 2 GiB, 64
        // and 16, included) is refused too, before any Argon2 work.
        let with_params = |m: u32, t: u32, p: u32| {
            let mut bytes = sealed_file();
            bytes[6..10].copy_from_slice(&m.to_be_bytes());
            bytes[10..14].copy_from_slice(&t.to_be_bytes());
            bytes[14..18].copy_from_slice(&p.to_be_bytes());
            parse(&bytes).err()
        };
        for (m, t, p) in [
            ((1 << 20) + 1, 1, 1),
            (1 << 21, 1, 1),
            (64, 17, 1),
            (64, 64, 1),
            (128, 1, 9),
            (128, 1, 16),
        ] {
            assert_eq!(
                with_params(m, t, p),
                Some(FormatError::Argon2ParamsOutOfRange { m_cost_kib: m, t_cost: t, p_cost: p })
            );
        }
        // At the ceilings the header parses (the tag check fails later).
        assert_eq!(with_params(1 << 20, 16, 8), None);
    }

    #[test]
    fn the_fuzz_properties_hold_for_valid_files() {
        let passphrase_key = Key256::from_array(&mut FUZZ_PASSPHRASE_KEY.clone());
        let sealed = encode_sealed(&root(3), &passphrase_key, cheap(), &[9; SALT_LEN]).unwrap();
        // The sealed file opens under the fuzz key, so the target checks
        // every changed byte of it, not only its layout.
        let Parsed::Sealed(parsed) = parse(&sealed).unwrap() else { panic!("not sealed") };
        assert!(parsed.open(&passphrase_key).is_some());
        fuzz(&sealed);
        fuzz(&encode_plain(&root(3)));
        for len in 0..sealed.len() {
            fuzz(&sealed[..len]);
        }
        fuzz(&[sealed.as_slice(), b"x"].concat());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic sweep over short inputs, many starting with
        // a valid header.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 100) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|i| (state >> (i % 56)) as u8).collect();
            if state.is_multiple_of(3) && len >= 6 {
                bytes[..6].copy_from_slice(b"KGRK\x01\x00");
                bytes[5] = (state % 2) as u8;
            }
            let _ = parse(&bytes);
        }
    }
}
