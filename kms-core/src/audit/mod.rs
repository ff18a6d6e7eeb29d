//! The tamper-evident audit chain (DESIGN §6).
//!
//! Every operation of a key-service instance becomes an [`AuditEvent`]. An
//! [`AuditChain`] seals events into [`AuditRow`]s that form a SHA-256 hash
//! chain per instance; an [`AuditSigner`] (ECDSA P-256, one key per
//! instance, stored wrapped by the root provider like a KEK, under
//! [`AuditSigner::wrap_context`]) signs checkpoints of the chain head. A
//! [`ChainVerifier`] checks a stored chain event by event and names the
//! first position where it breaks.
//!
//! # Bytes hashed and signed
//!
//! Values are encoded canonically and self-delimiting: a byte string as
//! `u64be(len) ‖ bytes`, an integer as `i64be` (8 bytes), an absent option
//! as `0x00`, a present one as `0x01 ‖ value`. Text columns are hashed as
//! stored (UTF-8), so verification never re-serialises JSON.
//!
//! ```text
//! hash_n = SHA-256( "keygate/v1/audit" ‖ hash_{n-1} ‖ encode_row(row_n) )   hash_0 = 0³²
//! encode_row(row) = bytes(instance) ‖ int(seq) ‖ int(ts_ms) ‖ bytes(actor)
//!                 ‖ bytes(action) ‖ opt(bytes(tenant)) ‖ opt(int(kek_version))
//!                 ‖ bytes(record_key_ids) ‖ bytes(outcome) ‖ bytes(detail)
//! checkpoint message = bytes("keygate/v1/audit-checkpoint") ‖ bytes(instance)
//!                 ‖ int(seq) ‖ bytes(hash) ‖ int(ts_ms)
//! ```
//!
//! The chain label is raw (16 ASCII bytes) and the previous hash raw (32
//! bytes); the checkpoint message starts with a length prefix, so it can
//! never equal a chain hash input. Checkpoint signatures are ECDSA P-256
//! over SHA-256 with RFC 6979 nonces, stored as `r ‖ s` (64 bytes); public
//! keys as uncompressed SEC1 points (65 bytes). `record_key_ids` is stored
//! as a JSON array of lowercase hex strings, `detail` as a JSON object.
//!
//! # What verification proves, and what it cannot
//!
//! A chain that verifies has consecutive sequence numbers from 1, every
//! event links to the one before and matches its own hash, and every
//! checkpoint matches the event hash at its position and carries a valid
//! signature of the instance's key. So an edited, deleted, inserted,
//! swapped or reordered event is found, as is a forged checkpoint, a
//! checkpoint past the end (a truncated tail), and a consistent rewrite of
//! the events up to any checkpoint, since that needs the signing key.
//!
//! Events **after the last checkpoint** are protected by the hash chain
//! alone: deleting that tail, or rewriting it and recomputing its hashes,
//! leaves a chain that verifies; nor can a deleted checkpoint be told from
//! one never written. Only an external anchor closes that gap (the last
//! checkpoint or head copied to a log, a ticket or another system): the
//! [`VerifyReport`] names the head and the last verified checkpoint, and
//! [`ChainVerifier::expect_anchors`] (or the `anchors` of
//! [`verify_stored_chain`]) requires a chain to still pass through such
//! copies ([`Anchor`]). Writers keep the gap small by signing a checkpoint
//! every so many events or seconds, and at shutdown.
//!
//! The public key must come from a trusted source: the instance's wrapped
//! signing key unwrapped by the root provider (compare
//! [`AuditSigner::public_key_sec1`] with the stored copy), or a pinned copy.
//! The keystore's `public_key` column alone proves nothing, since whoever
//! can rewrite events can rewrite it too.
//!
//! This module is pure logic: it performs no I/O except through a
//! [`KeyStore`](crate::store::KeyStore) handed to
//! [`verify_stored_chain`]. Batching, group commit and the writer task
//! belong to the key service.
//!
//! Events never contain field values, keys, or digests of values; the
//! purpose of use is kept in `detail` under [`PURPOSE_KEY`].
//!
//! [`AuditRow`]: crate::store::AuditRow

mod chain;
mod encode;
mod error;
mod event;
mod signing;
mod stored;
mod verify;

pub use self::chain::{AuditChain, CHAIN_LABEL, GENESIS_HASH, HASH_LEN, chain_hash, encode_row};
pub use self::error::{BreakReason, ChainBreak};
pub use self::event::{AuditEvent, MalformedEvent, Outcome, PURPOSE_KEY};
pub use self::signing::{
    AuditSigner, AuditVerifyingKey, CHECKPOINT_LABEL, CheckpointError, SIGNATURE_LEN, SignerError,
    checkpoint_message, verify_checkpoint,
};
pub use self::stored::{VerifyStoredError, verify_stored_chain};
pub use self::verify::{Anchor, ChainVerifier, VerifyReport, verify_chain};
