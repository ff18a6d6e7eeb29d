//! How a chain fails verification.

/// An audit chain does not verify: the first position at which it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit chain {instance:?} is broken at seq {position}: {reason}")]
#[non_exhaustive]
pub struct ChainBreak {
    /// The instance whose chain this is.
    pub instance: String,
    /// Sequence number of the first event or checkpoint that fails; every
    /// event before it verified. `0` when nothing could be checked at all
    /// (an unusable public key).
    pub position: i64,
    /// What is wrong there.
    pub reason: BreakReason,
}

impl ChainBreak {
    pub(super) fn new(instance: &str, position: i64, reason: BreakReason) -> Self {
        Self { instance: instance.to_owned(), position, reason }
    }
}

/// Why a chain breaks at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BreakReason {
    /// The event at this position belongs to another instance's chain.
    #[error("the event belongs to another instance")]
    WrongInstance,
    /// The next event carries another sequence number: when `found` is
    /// greater, the events from the position up to `found - 1` are missing
    /// (deleted); when smaller, events are repeated or out of order.
    #[error("expected this sequence number, found {found}")]
    UnexpectedSeq {
        /// The sequence number the next event carries.
        found: i64,
    },
    /// The event's `hash` or `prev_hash` is not 32 bytes.
    #[error("the event's hash columns are malformed")]
    MalformedHash,
    /// The event's `prev_hash` is not the previous event's hash (events
    /// swapped, reordered, or one before it rewritten).
    #[error("the event does not link to the previous event")]
    BrokenLink,
    /// The event's hash does not match its contents (the event was edited).
    #[error("the event's contents do not match its hash")]
    HashMismatch,
    /// A checkpoint's hash differs from the event hash at its position.
    #[error("the checkpoint does not match the event hash")]
    CheckpointMismatch,
    /// A checkpoint's signature does not verify under the instance's key.
    #[error("the checkpoint's signature does not verify")]
    CheckpointSignature,
    /// A checkpoint arrived after the events it covers were verified, or
    /// twice; checkpoints must be supplied in ascending order before their
    /// events.
    #[error("the checkpoint is out of order")]
    CheckpointOutOfOrder,
    /// A checkpoint covers an event that does not exist: the chain's tail
    /// was truncated (or the checkpoint was forged).
    #[error("the checkpoint covers an event past the end of the chain")]
    CheckpointPastEnd,
    /// The event at an anchor's position is not the anchored one: the chain
    /// up to there was rewritten since the anchor was taken (or two
    /// anchors disagree on this position).
    #[error("the event differs from the one anchored at this position")]
    AnchorMismatch,
    /// An anchor names an event past the end of the chain: events the
    /// anchor saw were deleted since (the tail was cut back).
    #[error("the anchored event is past the end of the chain")]
    AnchorPastEnd,
    /// An anchor names a position before 1, or one already verified;
    /// anchors must be supplied before their events.
    #[error("the anchor is out of order")]
    AnchorOutOfOrder,
    /// The public key is not a valid P-256 point, so no checkpoint can be
    /// verified.
    #[error("the audit public key is invalid")]
    InvalidPublicKey,
}
