//! Verifying a stored chain, in one call or streamed page by page.
//!
//! See the module docs of `audit` for what verification can and cannot
//! detect.

use std::collections::VecDeque;

use super::chain::{GENESIS_HASH, HASH_LEN, check_row};
use super::error::{BreakReason, ChainBreak};
use super::signing::AuditVerifyingKey;
use crate::store::{AuditRow, CheckpointRow};

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// The instance whose chain this is.
    pub instance: String,
    /// Events verified.
    pub events: u64,
    /// Checkpoints verified.
    pub checkpoints: u64,
    /// Anchors the chain passed through ([`ChainVerifier::expect_anchors`]).
    pub anchors: u64,
    /// Sequence number of the last event (`0`: no events).
    pub head_seq: i64,
    /// Hash of the last event ([`GENESIS_HASH`] when there are none).
    pub head_hash: [u8; HASH_LEN],
    /// Sequence number of the last verified checkpoint, if any. Events
    /// after it are not covered by any signature (see the module docs).
    pub last_checkpoint: Option<i64>,
}

impl VerifyReport {
    /// Events after the last checkpoint: those a tail truncation or a
    /// consistent rewrite could touch undetected.
    pub fn unsigned_tail(&self) -> i64 {
        self.head_seq.saturating_sub(self.last_checkpoint.unwrap_or(0))
    }
}

/// Where a chain stood when someone looked, kept outside the keystore (a
/// WORM bucket, a SIEM, a ticket): the event at `seq` had `hash`. Since
/// each event's hash covers every event before it, a chain that still has
/// that hash there has the same events up to there; one that ends before
/// `seq` was cut back. This is what closes the gap the module docs leave
/// open after the last checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Anchor {
    /// Sequence number of the anchored event (from 1).
    pub seq: i64,
    /// That event's hash.
    pub hash: [u8; HASH_LEN],
}

/// Verifies one instance's chain incrementally, holding only its head and
/// the checkpoints and anchors not yet reached.
///
/// Feed checkpoints in ascending order and each one **before** the event it
/// covers ([`ChainVerifier::push_checkpoints`]), the events in ascending
/// order ([`ChainVerifier::push_rows`]), then call
/// [`ChainVerifier::finish`]. A paging loop fetches checkpoints up to at
/// least the last sequence number of each page of events before pushing
/// that page. After the first break every call returns the same break.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    instance: String,
    key: AuditVerifyingKey,
    seq: i64,
    hash: [u8; HASH_LEN],
    pending: VecDeque<CheckpointRow>,
    /// Ascending, each after the head.
    anchors: VecDeque<Anchor>,
    events: u64,
    checkpoints: u64,
    anchors_matched: u64,
    last_checkpoint: Option<i64>,
    broken: Option<ChainBreak>,
}

impl ChainVerifier {
    /// Starts at the beginning of `instance`'s chain.
    pub fn new(instance: &str, key: AuditVerifyingKey) -> Self {
        Self {
            instance: instance.to_owned(),
            key,
            seq: 0,
            hash: GENESIS_HASH,
            pending: VecDeque::new(),
            anchors: VecDeque::new(),
            events: 0,
            checkpoints: 0,
            anchors_matched: 0,
            last_checkpoint: None,
            broken: None,
        }
    }

    /// Starts after a checkpoint (its signature is checked here), to verify
    /// only what was appended since a previous run; feed events from
    /// `anchor.seq + 1`.
    pub fn from_checkpoint(
        key: AuditVerifyingKey,
        anchor: &CheckpointRow,
    ) -> Result<Self, ChainBreak> {
        let broken = |reason| ChainBreak::new(&anchor.instance, anchor.seq, reason);
        let hash: [u8; HASH_LEN] = anchor
            .hash
            .as_slice()
            .try_into()
            .map_err(|_| broken(BreakReason::CheckpointMismatch))?;
        key.verify(anchor).map_err(|_| broken(BreakReason::CheckpointSignature))?;
        let mut verifier = Self::new(&anchor.instance, key);
        verifier.seq = anchor.seq;
        verifier.hash = hash;
        verifier.last_checkpoint = Some(anchor.seq);
        Ok(verifier)
    }

    /// Queues checkpoints (ascending) to be checked when their events pass.
    pub fn push_checkpoints(&mut self, checkpoints: &[CheckpointRow]) -> Result<(), ChainBreak> {
        for checkpoint in checkpoints {
            self.push_checkpoint(checkpoint)?;
        }
        Ok(())
    }

    /// Queues one checkpoint; one for the current head is checked at once.
    pub fn push_checkpoint(&mut self, checkpoint: &CheckpointRow) -> Result<(), ChainBreak> {
        self.guard(|v| {
            let position = checkpoint.seq;
            if checkpoint.instance != v.instance {
                return Err((position, BreakReason::WrongInstance));
            }
            let after = v.pending.back().map_or(v.seq, |last| last.seq);
            let for_head = v.pending.is_empty()
                && position == v.seq
                && position >= 1
                && v.last_checkpoint != Some(position);
            if for_head {
                return v.check_checkpoint(checkpoint);
            }
            if position <= after {
                return Err((position, BreakReason::CheckpointOutOfOrder));
            }
            v.pending.push_back(checkpoint.clone());
            Ok(())
        })
    }

    /// Requires the chain to pass through each of `anchors` (in any order;
    /// repeats count once): the event at an anchor's position must have its
    /// hash, and [`finish`](Self::finish) fails if the chain ends before an
    /// anchor. Give anchors before the events they name; two anchors that
    /// disagree on one position break the chain there.
    pub fn expect_anchors(&mut self, anchors: &[Anchor]) -> Result<(), ChainBreak> {
        self.guard(|v| {
            let mut all: Vec<Anchor> = v.anchors.drain(..).chain(anchors.iter().copied()).collect();
            all.sort_unstable();
            all.dedup();
            if let Some(seq) = all
                .iter()
                .zip(all.iter().skip(1))
                .find_map(|(a, b)| (a.seq == b.seq).then_some(a.seq))
            {
                return Err((seq, BreakReason::AnchorMismatch));
            }
            if let Some(first) = all.first().filter(|a| a.seq <= v.seq || a.seq < 1) {
                return Err((first.seq, BreakReason::AnchorOutOfOrder));
            }
            v.anchors = all.into();
            Ok(())
        })
    }

    /// Verifies events in ascending order.
    pub fn push_rows(&mut self, rows: &[AuditRow]) -> Result<(), ChainBreak> {
        for row in rows {
            self.push_row(row)?;
        }
        Ok(())
    }

    /// Verifies the next event, and the checkpoint at its position if one
    /// is queued.
    pub fn push_row(&mut self, row: &AuditRow) -> Result<(), ChainBreak> {
        self.guard(|v| {
            let expected = v.seq.saturating_add(1);
            if row.instance != v.instance {
                return Err((expected, BreakReason::WrongInstance));
            }
            if row.seq != expected {
                return Err((expected, BreakReason::UnexpectedSeq { found: row.seq }));
            }
            if row.prev_hash.as_slice() != v.hash.as_slice() {
                let reason = if row.prev_hash.len() == HASH_LEN {
                    BreakReason::BrokenLink
                } else {
                    BreakReason::MalformedHash
                };
                return Err((expected, reason));
            }
            let (_, hash) = check_row(row).map_err(|reason| (expected, reason))?;
            if let Some(anchor) = v.anchors.front().filter(|a| a.seq == expected) {
                if anchor.hash != hash {
                    return Err((expected, BreakReason::AnchorMismatch));
                }
                v.anchors.pop_front();
                v.anchors_matched += 1;
            }
            v.seq = expected;
            v.hash = hash;
            v.events += 1;
            match v.pending.front() {
                Some(next) if next.seq == expected => {
                    let checkpoint = v.pending.pop_front();
                    checkpoint.map_or(Ok(()), |c| v.check_checkpoint(&c))
                }
                _ => Ok(()),
            }
        })
    }

    /// The last verified sequence number and hash.
    pub fn head(&self) -> (i64, [u8; HASH_LEN]) {
        (self.seq, self.hash)
    }

    /// Ends verification: fails if an earlier call failed or a queued
    /// checkpoint covers an event that never came.
    pub fn finish(self) -> Result<VerifyReport, ChainBreak> {
        if let Some(broken) = self.broken {
            return Err(broken);
        }
        if let Some(orphan) = self.pending.front() {
            return Err(ChainBreak::new(
                &self.instance,
                orphan.seq,
                BreakReason::CheckpointPastEnd,
            ));
        }
        if let Some(anchor) = self.anchors.front() {
            return Err(ChainBreak::new(&self.instance, anchor.seq, BreakReason::AnchorPastEnd));
        }
        Ok(VerifyReport {
            instance: self.instance,
            events: self.events,
            checkpoints: self.checkpoints,
            anchors: self.anchors_matched,
            head_seq: self.seq,
            head_hash: self.hash,
            last_checkpoint: self.last_checkpoint,
        })
    }

    /// Checks a checkpoint for the current head.
    fn check_checkpoint(&mut self, checkpoint: &CheckpointRow) -> Result<(), (i64, BreakReason)> {
        let position = checkpoint.seq;
        if checkpoint.hash.as_slice() != self.hash.as_slice() {
            return Err((position, BreakReason::CheckpointMismatch));
        }
        self.key.verify(checkpoint).map_err(|_| (position, BreakReason::CheckpointSignature))?;
        self.checkpoints += 1;
        self.last_checkpoint = Some(position);
        Ok(())
    }

    /// Runs `step` unless already broken, latching its failure.
    fn guard(
        &mut self,
        step: impl FnOnce(&mut Self) -> Result<(), (i64, BreakReason)>,
    ) -> Result<(), ChainBreak> {
        if let Some(broken) = &self.broken {
            return Err(broken.clone());
        }
        step(self).map_err(|(position, reason)| {
            let broken = ChainBreak::new(&self.instance, position, reason);
            self.broken = Some(broken.clone());
            broken
        })
    }
}

/// Verifies a whole chain held in memory: `rows` and `checkpoints` of
/// `instance`, both ascending, under the SEC1 public key `public_key`.
pub fn verify_chain(
    instance: &str,
    rows: &[AuditRow],
    checkpoints: &[CheckpointRow],
    public_key: &[u8],
) -> Result<VerifyReport, ChainBreak> {
    let key = AuditVerifyingKey::from_sec1(public_key)
        .map_err(|_| ChainBreak::new(instance, 0, BreakReason::InvalidPublicKey))?;
    let mut verifier = ChainVerifier::new(instance, key);
    verifier.push_checkpoints(checkpoints)?;
    verifier.push_rows(rows)?;
    verifier.finish()
}
