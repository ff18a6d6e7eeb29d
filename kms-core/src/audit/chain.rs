//! The SHA-256 hash chain: one per key-service instance.
//!
//! The hash of event `n` is
//!
//! ```text
//! hash_n = SHA-256( "keygate/v1/audit" ‖ hash_{n-1} ‖ encode_row(row_n) )
//! encode_row(row) = bytes(instance) ‖ int(seq) ‖ int(ts_ms) ‖ bytes(actor)
//!                 ‖ bytes(action) ‖ opt_bytes(tenant) ‖ opt_int(kek_version)
//!                 ‖ bytes(record_key_ids) ‖ bytes(outcome) ‖ bytes(detail)
//! ```
//!
//! with `hash_0` = 32 zero bytes, the 16-byte ASCII label without a length
//! prefix, the 32-byte previous hash raw, and the value encodings of the
//! `encode` module (`bytes` = `u64be(len) ‖ bytes`, `int` = `i64be`,
//! options `0x00` / `0x01 ‖ value`). Text columns are hashed exactly as
//! stored (UTF-8), so verification never re-serialises JSON.

use sha2::Digest;

use super::encode::{Encoder, Sink};
use super::error::{BreakReason, ChainBreak};
use super::event::AuditEvent;
use crate::store::AuditRow;

/// Length of a chain hash.
pub const HASH_LEN: usize = 32;

/// The `prev_hash` of the first event of every chain.
pub const GENESIS_HASH: [u8; HASH_LEN] = [0; HASH_LEN];

/// Domain-separation label that starts every chain hash input.
pub const CHAIN_LABEL: &[u8] = b"keygate/v1/audit";

/// The canonical encoding of a row's contents: every column but
/// `prev_hash` and `hash`, in table order (see the module docs).
pub fn encode_row(row: &AuditRow) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + row.detail.len() + row.record_key_ids.len());
    write_row(&mut out, row);
    out
}

/// `SHA-256(CHAIN_LABEL ‖ prev_hash ‖ encode_row(row))`, streamed without
/// building the encoding. Ignores `row.prev_hash` and `row.hash`.
pub fn chain_hash(prev_hash: &[u8; HASH_LEN], row: &AuditRow) -> [u8; HASH_LEN] {
    let mut hasher = sha2::Sha256::new();
    hasher.update(CHAIN_LABEL);
    hasher.update(prev_hash);
    write_row(&mut hasher, row);
    hasher.finalize().into()
}

fn write_row<S: Sink>(sink: &mut S, row: &AuditRow) {
    Encoder(sink)
        .bytes(row.instance.as_bytes())
        .int(row.seq)
        .int(row.ts_ms)
        .bytes(row.actor.as_bytes())
        .bytes(row.action.as_bytes())
        .opt_bytes(row.tenant.as_deref().map(str::as_bytes))
        .opt_int(row.kek_version)
        .bytes(row.record_key_ids.as_bytes())
        .bytes(row.outcome.as_bytes())
        .bytes(row.detail.as_bytes());
}

/// Checks a row's own consistency: 32-byte hash columns, and a `hash` that
/// matches its contents and `prev_hash`. Returns `(prev_hash, hash)`.
pub(super) fn check_row(row: &AuditRow) -> Result<([u8; HASH_LEN], [u8; HASH_LEN]), BreakReason> {
    let prev: [u8; HASH_LEN] =
        row.prev_hash.as_slice().try_into().map_err(|_| BreakReason::MalformedHash)?;
    let hash: [u8; HASH_LEN] =
        row.hash.as_slice().try_into().map_err(|_| BreakReason::MalformedHash)?;
    if chain_hash(&prev, row) != hash {
        return Err(BreakReason::HashMismatch);
    }
    Ok((prev, hash))
}

/// The writing end of one instance's chain: its head (last sequence number
/// and hash), from which it seals new events into rows.
///
/// Sealing only advances this in-memory state. If storing the rows fails,
/// restore a clone taken before sealing (or [`AuditChain::resume`] from the
/// store), or the next rows will not link to what is stored. A
/// [`StoreError::AuditConflict`](crate::store::StoreError::AuditConflict)
/// means another writer uses the same instance name: each instance's chain
/// must have exactly one writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditChain {
    instance: String,
    seq: i64,
    hash: [u8; HASH_LEN],
}

impl AuditChain {
    /// A new, empty chain for `instance`.
    pub fn new(instance: &str) -> Self {
        Self { instance: instance.to_owned(), seq: 0, hash: GENESIS_HASH }
    }

    /// Continues after `last`, the stored event with the highest sequence
    /// number (`None`: the chain is empty).
    ///
    /// `last` is checked on its own (instance, hash columns, hash matching
    /// its contents), so a head edited while the service was down is caught
    /// before anything is chained onto it. Earlier events are the
    /// verifier's business.
    pub fn resume(instance: &str, last: Option<&AuditRow>) -> Result<Self, ChainBreak> {
        let Some(last) = last else {
            return Ok(Self::new(instance));
        };
        let broken = |reason| ChainBreak::new(instance, last.seq, reason);
        if last.instance != instance {
            return Err(broken(BreakReason::WrongInstance));
        }
        if last.seq < 1 {
            return Err(ChainBreak::new(
                instance,
                1,
                BreakReason::UnexpectedSeq { found: last.seq },
            ));
        }
        let (_, hash) = check_row(last).map_err(broken)?;
        Ok(Self { instance: instance.to_owned(), seq: last.seq, hash })
    }

    /// Appends `event` as the next position: assigns its sequence number,
    /// `prev_hash` and `hash`, and advances the head.
    pub fn seal(&mut self, event: AuditEvent) -> AuditRow {
        // 2^63 events are out of reach; saturating would make the store
        // refuse the duplicate rather than wrap around.
        let seq = self.seq.saturating_add(1);
        let mut row = event.into_row(&self.instance, seq);
        let hash = chain_hash(&self.hash, &row);
        row.prev_hash = self.hash.to_vec();
        row.hash = hash.to_vec();
        self.seq = seq;
        self.hash = hash;
        row
    }

    /// Seals several events in order.
    pub fn seal_all(&mut self, events: impl IntoIterator<Item = AuditEvent>) -> Vec<AuditRow> {
        events.into_iter().map(|event| self.seal(event)).collect()
    }

    /// The last sequence number and hash (`(0, GENESIS_HASH)` when empty).
    pub fn head(&self) -> (i64, [u8; HASH_LEN]) {
        (self.seq, self.hash)
    }

    /// The instance whose chain this is.
    pub fn instance(&self) -> &str {
        &self.instance
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Outcome;

    fn row(actor: &str, action: &str) -> AuditRow {
        AuditEvent::new(1, actor, action, Outcome::Ok).into_row("i", 1)
    }

    #[test]
    fn encoding_is_injective_across_field_boundaries() {
        assert_ne!(encode_row(&row("ab", "c")), encode_row(&row("a", "bc")));
        assert_ne!(
            chain_hash(&GENESIS_HASH, &row("ab", "c")),
            chain_hash(&GENESIS_HASH, &row("a", "bc"))
        );
        // An absent tenant differs from an empty one; an instance ending in
        // the bytes of a sequence number does not collide with it.
        let mut absent = row("a", "b");
        let mut empty = absent.clone();
        empty.tenant = Some(String::new());
        assert_ne!(encode_row(&absent), encode_row(&empty));
        absent.kek_version = Some(0);
        empty.tenant = None;
        assert_ne!(encode_row(&absent), encode_row(&empty));
        let mut a = row("x", "y");
        a.instance = "i\0".into();
        let mut b = row("x", "y");
        b.instance = "i".into();
        assert_ne!(encode_row(&a), encode_row(&b));
    }

    /// A format-stability vector: changing the encoding or the label would
    /// invalidate every stored chain.
    #[test]
    fn known_answer() {
        let row = AuditRow {
            instance: "ks".into(),
            seq: 1,
            ts_ms: 2,
            actor: "a".into(),
            action: "b".into(),
            tenant: Some("t".into()),
            kek_version: None,
            record_key_ids: "[]".into(),
            outcome: "ok".into(),
            detail: "{}".into(),
            prev_hash: Vec::new(),
            hash: Vec::new(),
        };
        let hex = data_encoding::HEXLOWER.encode(&encode_row(&row));
        assert_eq!(
            hex,
            "00000000000000026b73\
             0000000000000001\
             0000000000000002\
             000000000000000161\
             000000000000000162\
             01000000000000000174\
             00\
             00000000000000025b5d\
             00000000000000026f6b\
             00000000000000027b7d"
        );
        // Computed independently with Python's hashlib over
        // b"keygate/v1/audit" + bytes(32) + the encoding above.
        assert_eq!(
            data_encoding::HEXLOWER.encode(&chain_hash(&GENESIS_HASH, &row)),
            "04b66d7c52e873c4cb5b7b082898a69f7ccd9408cd6b44b6ad11bfcbb13b882b"
        );
    }

    #[test]
    fn seal_links_and_resume_continues() {
        let mut chain = AuditChain::new("ks-1");
        assert_eq!(chain.head(), (0, GENESIS_HASH));
        let rows = chain.seal_all((0..3).map(|i| AuditEvent::new(i, "a", "b", Outcome::Ok)));
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(rows[0].prev_hash, GENESIS_HASH);
        assert_eq!(rows[1].prev_hash, rows[0].hash);
        assert_eq!(rows[2].prev_hash, rows[1].hash);
        assert_eq!(chain.head().1.as_slice(), rows[2].hash.as_slice());

        let mut resumed = AuditChain::resume("ks-1", rows.last()).unwrap();
        assert_eq!(resumed, chain);
        let next = resumed.seal(AuditEvent::new(9, "a", "b", Outcome::Ok));
        assert_eq!((next.seq, &next.prev_hash), (4, &rows[2].hash));
        assert_eq!(AuditChain::resume("ks-1", None).unwrap().head(), (0, GENESIS_HASH));
    }

    #[test]
    fn resume_refuses_a_tampered_head() {
        let mut chain = AuditChain::new("ks-1");
        let mut last = chain.seal(AuditEvent::new(0, "a", "b", Outcome::Ok));
        let other = AuditChain::resume("ks-2", Some(&last)).unwrap_err();
        assert_eq!((other.position, other.reason), (1, BreakReason::WrongInstance));
        last.actor = "mallory".into();
        let edited = AuditChain::resume("ks-1", Some(&last)).unwrap_err();
        assert_eq!((edited.position, edited.reason), (1, BreakReason::HashMismatch));
        last.hash.pop();
        let short = AuditChain::resume("ks-1", Some(&last)).unwrap_err();
        assert_eq!(short.reason, BreakReason::MalformedHash);
    }
}
