//! Randomness.
//!
//! Keys, record key ids and nonces all come straight from the operating
//! system's CSPRNG (`getrandom`), one call per value. (A userspace CSPRNG
//! seeded from the OS would be cheaper per call; the performance work will
//! measure whether it matters.)

/// The operating system's random number generator failed.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random number generator failed")]
#[non_exhaustive]
pub struct RandomError;

/// Fills `buf` from the operating system's CSPRNG.
pub fn fill_os(buf: &mut [u8]) -> Result<(), RandomError> {
    getrandom::fill(buf).map_err(|_| RandomError)
}

/// A fresh random array.
pub fn array<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut out = [0u8; N];
    fill_os(&mut out)?;
    Ok(out)
}
