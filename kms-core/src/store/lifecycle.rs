//! What the keystore keeps for the key lifecycle (DESIGN §7): master keys
//! and where every stored key is wrapped, usage counters per KEK version,
//! and destructive requests awaiting a second person.

use std::fmt;
use std::str::FromStr;

use super::MasterKeyId;
use crate::dek::KekVersion;
use crate::ids::TenantId;
use crate::kek::KekState;

/// A registered master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterRecord {
    /// Id.
    pub id: MasterKeyId,
    /// Provider kind (`local`, `pkcs11`, `aws-kms`).
    pub kind: String,
    /// Which key, in the provider's terms. Never a secret.
    pub key_ref: String,
    /// How to connect to it again (provider settings as JSON; secrets are
    /// referenced by file or variable name, never included).
    pub config: Option<String>,
    /// Whether new keys are wrapped under it. At most one is.
    pub active: bool,
    /// Unix seconds.
    pub created_at: i64,
}

/// A key the keystore holds wrapped by a master key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StoredKeyRef {
    /// A tenant KEK version.
    Kek {
        /// Tenant.
        tenant: TenantId,
        /// Version.
        version: KekVersion,
    },
    /// A tenant's index root.
    IndexRoot {
        /// Tenant.
        tenant: TenantId,
    },
    /// A key-service instance's audit signing key.
    AuditSigning {
        /// Instance.
        instance: String,
    },
}

impl fmt::Display for StoredKeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kek { tenant, version } => write!(f, "KEK {tenant} v{version}"),
            Self::IndexRoot { tenant } => write!(f, "index root of {tenant}"),
            Self::AuditSigning { instance } => write!(f, "audit signing key of {instance}"),
        }
    }
}

/// A stored wrapped key and the master it is wrapped under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// Which key.
    pub key: StoredKeyRef,
    /// The master that wrapped it.
    pub master: MasterKeyId,
    /// The wrapped bytes.
    pub wrapped: Vec<u8>,
}

/// Counts to add to one KEK version's usage in one hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDelta {
    /// Tenant.
    pub tenant: TenantId,
    /// Version.
    pub version: KekVersion,
    /// Unix hour (seconds / 3600).
    pub hour: i64,
    /// DEKs issued.
    pub issued: u64,
    /// DEKs unwrapped.
    pub unwraps: u64,
    /// Unix seconds of the last unwrap among them.
    pub last_unwrap_at: Option<i64>,
}

/// One KEK version's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionUsage {
    /// Version.
    pub version: KekVersion,
    /// State.
    pub state: KekState,
    /// Unix seconds.
    pub created_at: i64,
    /// DEKs issued under it, ever.
    pub issued: u64,
    /// DEKs unwrapped under it, ever.
    pub unwraps: u64,
    /// DEKs unwrapped under it in the hours since the one asked for.
    pub recent_unwraps: u64,
    /// Unix seconds of the last unwrap.
    pub last_unwrap_at: Option<i64>,
}

/// Where a request for approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApprovalState {
    /// Awaiting a second person.
    Pending,
    /// Approved; runs once its waiting period is over.
    Approved,
    /// Rejected; will never run.
    Rejected,
    /// Approved and done.
    Executed,
}

impl ApprovalState {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::Executed => "executed",
        }
    }
}

impl FromStr for ApprovalState {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "pending" => Self::Pending,
            "approved" => Self::Approved,
            "rejected" => Self::Rejected,
            "executed" => Self::Executed,
            _ => return Err(()),
        })
    }
}

impl fmt::Display for ApprovalState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A second person's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Let it run.
    Approve,
    /// Never let it run.
    Reject,
}

/// A destructive request under two-person control (today: crypto-shredding
/// a tenant, or one KEK version of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    /// Random id (hex).
    pub id: String,
    /// Tenant to shred.
    pub tenant: TenantId,
    /// One version only, or (`None`) the whole tenant.
    pub version: Option<KekVersion>,
    /// Why, in the requester's words.
    pub reason: String,
    /// Identity that asked.
    pub requested_by: String,
    /// Unix seconds.
    pub requested_at: i64,
    /// Where it stands.
    pub state: ApprovalState,
    /// Identity that approved or rejected.
    pub decided_by: Option<String>,
    /// Unix seconds.
    pub decided_at: Option<i64>,
    /// The decider's comment.
    pub comment: Option<String>,
    /// Unix seconds from which an approved request may run.
    pub execute_after: Option<i64>,
    /// Unix seconds when it ran.
    pub executed_at: Option<i64>,
}

impl Approval {
    /// A new pending request.
    pub fn new(
        id: String,
        tenant: TenantId,
        version: Option<KekVersion>,
        reason: String,
        requested_by: String,
        now: i64,
    ) -> Self {
        Self {
            id,
            tenant,
            version,
            reason,
            requested_by,
            requested_at: now,
            state: ApprovalState::Pending,
            decided_by: None,
            decided_at: None,
            comment: None,
            execute_after: None,
            executed_at: None,
        }
    }

    /// Whether `d` may be applied to this request: it must be pending,
    /// decided by someone other than its requester and, to be approved,
    /// no older than [`DecideApproval::approve_within_secs`]. The stores
    /// check it again as they write the decision ([`Approval::decide`]).
    pub fn check_decision(&self, d: &DecideApproval<'_>) -> Result<(), super::StoreError> {
        if self.state != ApprovalState::Pending {
            return Err(super::StoreError::ApprovalNotPending {
                id: self.id.clone(),
                state: self.state,
            });
        }
        if self.requested_by == d.by {
            return Err(super::StoreError::SelfApproval);
        }
        // A request nobody approved in time is stale: who asked, and why,
        // may no longer hold. Rejecting it still works.
        let age = d.now.saturating_sub(self.requested_at);
        if d.decision == Decision::Approve && age > d.approve_within_secs {
            return Err(super::StoreError::ApprovalExpired { id: self.id.clone() });
        }
        Ok(())
    }

    /// This request with `d` applied, if [`Approval::check_decision`]
    /// allows. (Used by the stores.)
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub(crate) fn decide(self, d: &DecideApproval<'_>) -> Result<Self, super::StoreError> {
        self.check_decision(d)?;
        let approved = d.decision == Decision::Approve;
        Ok(Self {
            state: if approved { ApprovalState::Approved } else { ApprovalState::Rejected },
            decided_by: Some(d.by.to_owned()),
            decided_at: Some(d.now),
            comment: d.comment.map(str::to_owned),
            execute_after: approved.then(|| d.now.saturating_add(d.delay_secs.max(0))),
            ..self
        })
    }

    /// Whether an approved request may run at `now` (see
    /// [`Approval::check_runnable`]).
    pub fn is_due(&self, now: i64) -> bool {
        self.check_runnable(now).is_ok()
    }

    /// Refuses to run a request that is not approved, or whose waiting
    /// period is not over at `now`: the stores check it in the
    /// transaction that destroys the keys, whoever asks.
    pub fn check_runnable(&self, now: i64) -> Result<(), super::StoreError> {
        if self.state != ApprovalState::Approved {
            return Err(super::StoreError::ApprovalNotPending {
                id: self.id.clone(),
                state: self.state,
            });
        }
        match self.execute_after {
            Some(execute_after) if execute_after <= now => Ok(()),
            execute_after => Err(super::StoreError::ApprovalNotDue {
                id: self.id.clone(),
                execute_after: execute_after.unwrap_or(i64::MAX),
            }),
        }
    }
}

/// A decision on a pending request.
#[derive(Debug, Clone)]
pub struct DecideApproval<'a> {
    /// Request id.
    pub id: &'a str,
    /// Approve or reject.
    pub decision: Decision,
    /// Who decides: must differ from the requester.
    pub by: &'a str,
    /// Optional comment.
    pub comment: Option<&'a str>,
    /// Unix seconds.
    pub now: i64,
    /// Seconds an approved request waits before it may run.
    pub delay_secs: i64,
    /// Seconds after it was made that a request may still be approved.
    pub approve_within_secs: i64,
}
