//! Passphrase sealing: Argon2id parameters and key derivation.

use argon2::{Algorithm, Argon2, Version};
use kms_core::{KEY_LEN, Key256};
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use super::error::LocalKeyError;

/// Argon2id cost parameters for sealing a root key file with a passphrase.
///
/// The parameters are stored in the file, so a file opens with the
/// parameters it was created with. Bounds apply both when creating and when
/// reading a file, so that a file cannot make `open` allocate or compute
/// without limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    m_cost_kib: u32,
    t_cost: u32,
    p_cost: u32,
}

impl Argon2Params {
    /// Largest accepted memory cost: 1 GiB (2^20 KiB), 16 times the default.
    ///
    /// The bounds also limit what a crafted file can make `open` spend
    /// before the passphrase is checked: at most 16 passes over 1 GiB.
    pub const MAX_M_COST_KIB: u32 = 1 << 20;
    /// Largest accepted number of iterations (the default is 3).
    pub const MAX_T_COST: u32 = 16;
    /// Largest accepted number of lanes (the default is 1).
    pub const MAX_P_COST: u32 = 8;

    /// The default: 64 MiB, 3 iterations, 1 lane (stronger than the
    /// OWASP and RFC 9106 "second recommended" minimums).
    pub const DEFAULT: Self = Self { m_cost_kib: 64 * 1024, t_cost: 3, p_cost: 1 };

    /// Explicit parameters: memory in KiB, iterations and lanes.
    ///
    /// Accepted ranges: `1 ≤ p_cost ≤ 8`, `1 ≤ t_cost ≤ 16` and
    /// `8 × p_cost ≤ m_cost_kib ≤ 2^20` (1 GiB). Values below
    /// [`Self::DEFAULT`] are accepted (tests use cheap ones) but weaken a
    /// sealed file.
    pub fn new(m_cost_kib: u32, t_cost: u32, p_cost: u32) -> Result<Self, LocalKeyError> {
        Self::checked(m_cost_kib, t_cost, p_cost).ok_or(LocalKeyError::InvalidArgon2Params {
            m_cost_kib,
            t_cost,
            p_cost,
        })
    }

    /// The parameters if they are within bounds.
    pub(super) fn checked(m_cost_kib: u32, t_cost: u32, p_cost: u32) -> Option<Self> {
        let p_ok = (1..=Self::MAX_P_COST).contains(&p_cost);
        let t_ok = (1..=Self::MAX_T_COST).contains(&t_cost);
        let m_ok = p_ok && (8 * p_cost..=Self::MAX_M_COST_KIB).contains(&m_cost_kib);
        (p_ok && t_ok && m_ok).then_some(Self { m_cost_kib, t_cost, p_cost })
    }

    /// Memory cost in KiB.
    pub fn m_cost_kib(&self) -> u32 {
        self.m_cost_kib
    }

    /// Number of iterations.
    pub fn t_cost(&self) -> u32 {
        self.t_cost
    }

    /// Number of lanes.
    pub fn p_cost(&self) -> u32 {
        self.p_cost
    }
}

impl Default for Argon2Params {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// `Argon2id(passphrase, salt, params)` → a 256-bit key-encryption key.
///
/// The only place the passphrase is revealed. Takes as long as the
/// parameters say (hundreds of milliseconds with the default); blocking.
pub(super) fn derive_key(
    passphrase: &SecretString,
    salt: &[u8],
    params: Argon2Params,
) -> Result<Key256, LocalKeyError> {
    let kdf_error = |e: argon2::Error| LocalKeyError::Kdf { detail: e.to_string() };
    let argon_params =
        argon2::Params::new(params.m_cost_kib, params.t_cost, params.p_cost, Some(KEY_LEN))
            .map_err(kdf_error)?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, argon_params);
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    argon
        .hash_password_into(passphrase.expose_secret().as_bytes(), salt, out.as_mut_slice())
        .map_err(kdf_error)?;
    Ok(Key256::from_array(&mut out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_enforced() {
        assert!(Argon2Params::new(8, 1, 1).is_ok());
        assert!(Argon2Params::new(Argon2Params::MAX_M_COST_KIB, 16, 8).is_ok());
        assert!(Argon2Params::new(Argon2Params::DEFAULT.m_cost_kib, 3, 1).is_ok());
        for (m, t, p) in [
            (7, 1, 1),
            (8, 0, 1),
            (8, 1, 0),
            (15, 1, 2),
            (Argon2Params::MAX_M_COST_KIB + 1, 1, 1),
            (1 << 21, 1, 1),
            (8, 17, 1),
            (8, 64, 1),
            (1024, 1, 9),
            (1024, 1, 16),
            (u32::MAX, u32::MAX, u32::MAX),
        ] {
            let err = Argon2Params::new(m, t, p).unwrap_err();
            assert!(
                matches!(err, LocalKeyError::InvalidArgon2Params { m_cost_kib, t_cost, p_cost }
                    if (m_cost_kib, t_cost, p_cost) == (m, t, p)),
                "{m} {t} {p}: {err}"
            );
        }
        assert_eq!(Argon2Params::default(), Argon2Params::new(65536, 3, 1).unwrap());
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// RFC 9106 §5.3's vector sets a secret and associated data, which this
    /// module never does, so these known answers come from an independent
    /// implementation instead: pyca/cryptography 48 `Argon2id(salt=
    /// b"somesaltsomesalt", length=32, iterations=t, lanes=p, memory_cost=m)
    /// .derive(b"password")`.
    #[test]
    fn argon2id_known_answers() {
        let pass = SecretString::from("password");
        for ((m, t, p), expected) in [
            ((8, 1, 1), "05b6ca8f8038b683887ad4916533858b49cb52040126c134f4c6e9d8711b8c09"),
            ((32, 2, 2), "eb592784c0248f0c29efa7521712111e344188d31ebbd0f3eaa16bdc8ad338af"),
        ] {
            let params = Argon2Params::new(m, t, p).unwrap();
            let key = derive_key(&pass, b"somesaltsomesalt", params).unwrap();
            assert_eq!(hex(key.expose_secret()), expected, "m={m} t={t} p={p}");
        }
    }

    #[test]
    fn derivation_depends_on_every_input() {
        let params = Argon2Params::new(8, 1, 1).unwrap();
        let pass = SecretString::from("password");
        let a = derive_key(&pass, b"somesaltsomesalt", params).unwrap();
        let other_salt = derive_key(&pass, b"othersaltothersa", params).unwrap();
        assert_ne!(a.expose_secret(), other_salt.expose_secret());
        let other_pass =
            derive_key(&SecretString::from("Password"), b"somesaltsomesalt", params).unwrap();
        assert_ne!(a.expose_secret(), other_pass.expose_secret());
        let other_params =
            derive_key(&pass, b"somesaltsomesalt", Argon2Params::new(8, 2, 1).unwrap()).unwrap();
        assert_ne!(a.expose_secret(), other_params.expose_secret());
    }
}
