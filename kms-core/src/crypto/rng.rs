//! Randomness.
//!
//! Every key, record key id and nonce is bytes of the operating system's
//! CSPRNG (`getrandom`), fetched in blocks: each thread keeps a buffer of
//! [`BUFFER_LEN`] bytes, filled by one `getrandom` call and handed out in
//! pieces, each piece wiped from the buffer as it leaves. One system call
//! for 32 bytes costs more than sealing a field (≈ 285 ns against
//! ≈ 190 ns); one per 4 KiB makes randomness a few nanoseconds per value.
//!
//! Why a buffer of the kernel's output rather than a userspace CSPRNG
//! seeded from it (`rand`'s thread RNG, ChaCha20 reseeded every 64 KiB):
//! the bytes stay exactly the OS CSPRNG's (DESIGN §3), nothing in memory
//! can regenerate an output once it has been handed out (a ChaCha state
//! regenerates every output since its last reseed, keys included), and it
//! needs no dependency. What is buffered is only bytes not yet used, wiped
//! when the thread exits. Like any buffering it would hand a forked child
//! the parent's unused bytes; keygate never forks (its only children are
//! spawned with exec).

use std::cell::RefCell;

use zeroize::Zeroize;

/// Bytes fetched per `getrandom` call, per thread.
pub const BUFFER_LEN: usize = 4096;
/// Requests larger than this go straight to the OS.
const MAX_BUFFERED_REQUEST: usize = 256;

/// The operating system's random number generator failed.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random number generator failed")]
#[non_exhaustive]
pub struct RandomError;

struct Buffer {
    bytes: Box<[u8; BUFFER_LEN]>,
    /// Bytes before `used` have been handed out (and wiped).
    used: usize,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

thread_local! {
    static BUFFER: RefCell<Buffer> =
        RefCell::new(Buffer { bytes: Box::new([0; BUFFER_LEN]), used: BUFFER_LEN });
}

/// Fills `buf` straight from the operating system's CSPRNG (one system call).
pub fn fill_os(buf: &mut [u8]) -> Result<(), RandomError> {
    getrandom::fill(buf).map_err(|_| RandomError)
}

/// Fills `buf` with bytes of the operating system's CSPRNG, from this
/// thread's buffer (refilled with one system call when it runs short).
pub fn fill(buf: &mut [u8]) -> Result<(), RandomError> {
    if buf.len() > MAX_BUFFERED_REQUEST {
        return fill_os(buf);
    }
    BUFFER.with(|cell| {
        let Ok(mut buffer) = cell.try_borrow_mut() else {
            // Only reachable from a destructor running inside `fill`.
            return fill_os(buf);
        };
        if BUFFER_LEN - buffer.used < buf.len() {
            fill_os(buffer.bytes.as_mut_slice())?;
            buffer.used = 0;
        }
        let start = buffer.used;
        let end = start + buf.len();
        let piece = buffer.bytes.get_mut(start..end).ok_or(RandomError)?;
        buf.copy_from_slice(piece);
        piece.zeroize();
        buffer.used = end;
        Ok(())
    })
}

/// A fresh random array.
pub fn array<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut out = [0u8; N];
    fill(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_differ_within_and_across_refills() -> Result<(), RandomError> {
        // 1,000 ids span several buffer refills.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1_000 {
            assert!(seen.insert(array::<16>()?), "a 128-bit value repeated");
        }
        let big = {
            let mut b = vec![0u8; 1024];
            fill(&mut b)?;
            b
        };
        assert!(big.iter().any(|b| *b != 0));
        Ok(())
    }

    #[test]
    fn handed_out_bytes_are_wiped_from_the_buffer() -> Result<(), RandomError> {
        let value = array::<32>()?;
        BUFFER.with(|cell| {
            let buffer = cell.borrow();
            let used = buffer.bytes.get(..buffer.used).unwrap_or_default();
            assert!(used.iter().all(|b| *b == 0), "used bytes still in the buffer");
            assert!(!used.windows(32).any(|w| w == value));
        });
        Ok(())
    }

    #[test]
    fn threads_get_independent_bytes() -> Result<(), RandomError> {
        let here = array::<16>()?;
        let there = std::thread::spawn(array::<16>).join().map_err(|_| RandomError)??;
        assert_ne!(here, there);
        Ok(())
    }
}
