//! Persistent storage of wrapped keys and audit events (DESIGN §8).
//!
//! One [`KeyStore`] trait, implemented by the embedded SQLite store
//! (feature `sqlite`, one key-service instance) and the PostgreSQL store
//! (feature `postgres`, several replicas on one database). Both pass the
//! same contract suite (`tests/store_contract/`). Stores hold only wrapped
//! material. Every operation that changes more than one row is one
//! transaction.

mod coordination;
mod durability;
mod lifecycle;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod rows;
#[cfg(feature = "sqlite")]
mod sqlite;

use async_trait::async_trait;

pub use self::coordination::{Invalidation, Invalidations, JobLock};
pub use self::durability::Durability;
pub use self::lifecycle::{
    Approval, ApprovalState, DecideApproval, Decision, MasterRecord, StoredKey, StoredKeyRef,
    UsageDelta, VersionUsage,
};
#[cfg(feature = "postgres")]
pub use self::postgres::{PgStoreOptions, PgTarget, PostgresStore};
#[cfg(feature = "sqlite")]
pub use self::sqlite::{KEYSTORE_FILE, SqliteStore};
use crate::dek::KekVersion;
use crate::ids::TenantId;
use crate::kek::{InvalidTransition, KekState, StateChange};
use crate::root::ProviderInfo;

/// A registered master key (version of the root key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MasterKeyId(pub i64);

/// A tenant to create: its first KEK and its index root, both already wrapped.
#[derive(Debug, Clone)]
pub struct NewTenant {
    /// Tenant id.
    pub id: TenantId,
    /// Index root wrapped by the master key.
    pub index_root_wrapped: Vec<u8>,
    /// KEK version 1 wrapped by the master key.
    pub kek_wrapped: Vec<u8>,
    /// The master key that wrapped both.
    pub master: MasterKeyId,
    /// Unix seconds.
    pub created_at: i64,
}

/// One KEK version as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekRecord {
    /// Version number.
    pub version: KekVersion,
    /// State.
    pub state: KekState,
    /// Wrapped material; `None` once destroyed.
    pub wrapped: Option<Vec<u8>>,
    /// The master key that wrapped it.
    pub master: MasterKeyId,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds of the last state change.
    pub state_changed_at: i64,
}

/// A tenant as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRecord {
    /// Tenant id.
    pub id: TenantId,
    /// Unix seconds.
    pub created_at: i64,
    /// Wrapped index root; `None` once shredded.
    pub index_root_wrapped: Option<Vec<u8>>,
    /// The master key that wrapped the index root.
    pub index_root_master: MasterKeyId,
    /// Auto-rotation period in seconds, if any.
    pub rotate_every_secs: Option<i64>,
    /// Every KEK version, ascending.
    pub versions: Vec<KekRecord>,
}

impl TenantRecord {
    /// The active version.
    pub fn active(&self) -> Option<&KekRecord> {
        self.versions.iter().find(|v| v.state == KekState::Active)
    }
}

/// One stored audit event (the chain itself is built by the key service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    /// Key-service instance whose chain this is.
    pub instance: String,
    /// Position in that chain, from 1.
    pub seq: i64,
    /// Unix milliseconds.
    pub ts_ms: i64,
    /// Identity that acted.
    pub actor: String,
    /// What it did.
    pub action: String,
    /// Tenant concerned.
    pub tenant: Option<String>,
    /// KEK version concerned.
    pub kek_version: Option<i64>,
    /// Record key ids concerned (JSON array of hex strings).
    pub record_key_ids: String,
    /// `ok`, `denied`, `error`, …
    pub outcome: String,
    /// Further detail (JSON object; never values or secrets).
    pub detail: String,
    /// Hash of the previous event in the chain.
    pub prev_hash: Vec<u8>,
    /// This event's chain hash.
    pub hash: Vec<u8>,
}

/// One signed checkpoint of an audit chain, as stored: the signer vouches
/// that the event at `seq` of `instance`'s chain has chain hash `hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRow {
    /// Key-service instance whose chain this is.
    pub instance: String,
    /// Sequence number of the event the checkpoint covers.
    pub seq: i64,
    /// That event's chain hash (32 bytes).
    pub hash: Vec<u8>,
    /// ECDSA P-256 signature, `r ‖ s` (64 bytes).
    pub signature: Vec<u8>,
    /// Unix milliseconds when it was signed.
    pub ts_ms: i64,
}

/// A key-service instance's audit signing key, wrapped by a master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSigningKeyRecord {
    /// Key-service instance.
    pub instance: String,
    /// The P-256 scalar wrapped by the root provider for
    /// `WrapContext { purpose: AuditSigning, owner: instance, version: 1 }`.
    pub wrapped: Vec<u8>,
    /// The master key that wrapped it.
    pub master: MasterKeyId,
    /// The public key, SEC1 uncompressed. Not authoritative on its own:
    /// whoever can write the keystore can replace it, so verifiers compare
    /// it with the key derived from `wrapped` or pin it out of band.
    pub public_key: Vec<u8>,
    /// Unix seconds.
    pub created_at: i64,
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database cannot be reached or refused the operation (I/O,
    /// locked, full, closed); the operation had no effect.
    #[error("keystore unavailable: {0}")]
    Unavailable(String),
    /// The database did not say whether the operation took effect: no
    /// answer in time, or the connection lost while it committed. It may
    /// have: read the state again before repeating what is not idempotent
    /// (a rotation adds one more version each time).
    #[error("keystore outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// A tenant with this id exists.
    #[error("tenant {0} already exists")]
    TenantExists(TenantId),
    /// No such tenant.
    #[error("unknown tenant {0}")]
    UnknownTenant(TenantId),
    /// No such KEK version.
    #[error("tenant {tenant} has no KEK version {version}")]
    UnknownVersion {
        /// Tenant.
        tenant: TenantId,
        /// Version asked for.
        version: KekVersion,
    },
    /// Another writer added a version first; re-read and retry.
    #[error("tenant {0} was rotated concurrently")]
    VersionConflict(TenantId),
    /// The tenant's keys were shredded: it takes no new KEK version.
    #[error("the keys of tenant {0} were destroyed")]
    Shredded(TenantId),
    /// New or moved key material goes under the active master only, and
    /// this one is not (any more): a master rotation came between the wrap
    /// and the write. Wrap again under the active master.
    #[error("master key #{0} is not the active master key")]
    MasterNotActive(i64),
    /// The state change is not allowed.
    #[error(transparent)]
    InvalidTransition(#[from] InvalidTransition),
    /// An audit event with this instance and sequence number exists.
    #[error("audit event {instance}#{seq} already exists")]
    AuditConflict {
        /// Instance.
        instance: String,
        /// Sequence number.
        seq: i64,
    },
    /// No such master key.
    #[error("unknown master key #{0}")]
    UnknownMaster(i64),
    /// No such request for approval.
    #[error("no request for approval {0}")]
    UnknownApproval(String),
    /// The request was decided already.
    #[error("request {id} is {state}, not pending")]
    ApprovalNotPending {
        /// Request id.
        id: String,
        /// Its state.
        state: ApprovalState,
    },
    /// The requester tried to decide their own request.
    #[error("a request must be decided by someone other than its requester")]
    SelfApproval,
    /// The request waited longer than it may to be approved.
    #[error("request {id} is too old to be approved")]
    ApprovalExpired {
        /// Request id.
        id: String,
    },
    /// The approved request's waiting period is not over.
    #[error("request {id} may not run before {execute_after}")]
    ApprovalNotDue {
        /// Request id.
        id: String,
        /// Unix seconds from which it may run.
        execute_after: i64,
    },
    /// Stored data violates the keystore's invariants.
    #[error("keystore data is inconsistent: {0}")]
    Corrupt(String),
    /// Migrations failed.
    #[error("keystore migration failed: {0}")]
    Migration(String),
    /// The store's configuration is unusable (a malformed URL, a bad schema
    /// name); retrying will not help.
    #[error("keystore configuration: {0}")]
    Config(String),
}

/// Storage of tenants, KEK versions, master key references and audit events.
#[async_trait]
pub trait KeyStore: Send + Sync + std::fmt::Debug {
    /// Answers only if the database really does.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Whether a commit this store acknowledges survives a crash, as the
    /// database's settings for its sessions say.
    async fn durability(&self) -> Result<Durability, StoreError>;

    /// Registers a master key (idempotent) and returns its id.
    async fn register_master(&self, info: &ProviderInfo) -> Result<MasterKeyId, StoreError>;

    /// Creates a tenant with KEK version 1 (active) and its index root, all
    /// or nothing.
    async fn create_tenant(&self, tenant: NewTenant) -> Result<TenantRecord, StoreError>;

    /// A tenant with all its versions.
    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError>;

    /// All tenants, by id.
    async fn list_tenants(&self) -> Result<Vec<TenantRecord>, StoreError>;

    /// One KEK version.
    async fn kek(
        &self,
        id: &TenantId,
        version: KekVersion,
    ) -> Result<Option<KekRecord>, StoreError>;

    /// Adds `version` as the new active version and makes the previous
    /// active one decrypt-only, atomically. `version` must be exactly one
    /// above the current highest; otherwise [`StoreError::VersionConflict`].
    /// A shredded tenant takes none: [`StoreError::Shredded`].
    async fn add_kek_version(
        &self,
        id: &TenantId,
        version: KekVersion,
        wrapped: &[u8],
        master: MasterKeyId,
        now: i64,
    ) -> Result<KekRecord, StoreError>;

    /// Applies a state change, validated against the current state in the
    /// same transaction.
    async fn change_kek_state(
        &self,
        id: &TenantId,
        version: KekVersion,
        change: StateChange,
        now: i64,
    ) -> Result<KekRecord, StoreError>;

    /// Sets (or with `None` clears) a tenant's auto-rotation period.
    async fn set_rotation_period(
        &self,
        id: &TenantId,
        every_secs: Option<i64>,
    ) -> Result<TenantRecord, StoreError>;

    /// Crypto-shreds: erases the wrapped material of one KEK version (which
    /// must not be the active one) or, with `None`, of every version and
    /// the index root, marking the versions `destroyed`; one transaction,
    /// announced to every replica. Destroying what is destroyed is a no-op.
    /// Stores also purge what their files may still hold of the erased
    /// bytes where the database allows it (SQLite: `secure_delete` and a
    /// WAL truncation).
    async fn destroy_keys(
        &self,
        id: &TenantId,
        version: Option<KekVersion>,
        now: i64,
    ) -> Result<TenantRecord, StoreError>;

    /// Every registered master key, by id.
    async fn masters(&self) -> Result<Vec<MasterRecord>, StoreError>;

    /// Records how to connect to a master key again.
    async fn set_master_config(&self, id: MasterKeyId, config: &str) -> Result<(), StoreError>;

    /// Makes `id` the only active master key, atomically.
    async fn activate_master(&self, id: MasterKeyId) -> Result<(), StoreError>;

    /// Up to `limit` stored keys wrapped under a master other than `master`
    /// (destroyed material is not stored, so never listed).
    async fn keys_not_under(
        &self,
        master: MasterKeyId,
        limit: u32,
    ) -> Result<Vec<StoredKey>, StoreError>;

    /// Replaces a stored key's wrapping if it is still wrapped under
    /// `from` and not destroyed (compare and swap); `false` if it changed
    /// in the meantime. `to` must be the active master
    /// ([`StoreError::MasterNotActive`]).
    async fn replace_wrapped(
        &self,
        key: &StoredKeyRef,
        from: MasterKeyId,
        wrapped: &[u8],
        to: MasterKeyId,
    ) -> Result<bool, StoreError>;

    /// How many stored keys each master key wraps (masters wrapping none
    /// are left out).
    async fn keys_per_master(&self) -> Result<Vec<(MasterKeyId, u64)>, StoreError>;

    /// Adds usage counts.
    async fn add_usage(&self, deltas: &[UsageDelta]) -> Result<(), StoreError>;

    /// Usage of every version of a tenant; `recent_unwraps` counts the
    /// hours from `since_hour` on.
    async fn usage(&self, id: &TenantId, since_hour: i64) -> Result<Vec<VersionUsage>, StoreError>;

    /// Stores a new request for approval.
    async fn create_approval(&self, approval: &Approval) -> Result<(), StoreError>;

    /// One request for approval.
    async fn approval(&self, id: &str) -> Result<Option<Approval>, StoreError>;

    /// Requests for approval (in one state, or all), oldest first.
    async fn approvals(&self, state: Option<ApprovalState>) -> Result<Vec<Approval>, StoreError>;

    /// Approves or rejects a pending request, atomically, as
    /// [`Approval::check_decision`] allows: refused with
    /// [`StoreError::SelfApproval`] when the decider asked for it,
    /// [`StoreError::ApprovalNotPending`] when it was decided already, and
    /// [`StoreError::ApprovalExpired`] when it is too old to be approved.
    async fn decide_approval(&self, decision: &DecideApproval<'_>) -> Result<Approval, StoreError>;

    /// Runs an approved shred in one transaction: the request must still
    /// be approved (else [`StoreError::ApprovalNotPending`], naming its
    /// state: withdrawn or run meanwhile) and due at `now` (else
    /// [`StoreError::ApprovalNotDue`]), its keys are destroyed as by
    /// [`KeyStore::destroy_keys`], and it is marked executed. Returns the
    /// request and the tenant as they are afterwards.
    async fn execute_approval(
        &self,
        id: &str,
        now: i64,
    ) -> Result<(Approval, TenantRecord), StoreError>;

    /// Withdraws a request that has not run and is still in state `from`
    /// (pending, or approved and waiting for its execution time): it
    /// becomes `rejected`, with `comment` in place of the decision's (the
    /// decider, if any, is kept), and never runs.
    /// [`StoreError::ApprovalNotPending`] (naming its state) if it is in
    /// another state by now: who may withdraw depends on the state, so a
    /// withdrawal decided on a request that has moved on is not made.
    async fn withdraw_approval(
        &self,
        id: &str,
        from: ApprovalState,
        comment: &str,
    ) -> Result<Approval, StoreError>;

    /// Appends audit events atomically (all or none).
    async fn append_audit(&self, rows: &[AuditRow]) -> Result<(), StoreError>;

    /// Audit events of one instance with `seq > after`, ascending, at most `limit`.
    async fn audit_rows(
        &self,
        instance: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError>;

    /// Appends audit events and, optionally, a checkpoint in one
    /// transaction: all of them or none. An event or checkpoint whose
    /// instance and sequence number exist already is refused with
    /// [`StoreError::AuditConflict`] and nothing is written.
    async fn append_audit_batch(
        &self,
        rows: &[AuditRow],
        checkpoint: Option<&CheckpointRow>,
    ) -> Result<(), StoreError>;

    /// The event with the highest sequence number of one instance.
    async fn last_audit_row(&self, instance: &str) -> Result<Option<AuditRow>, StoreError>;

    /// Checkpoints of one instance with `seq > after_seq`, ascending, at
    /// most `limit`.
    async fn audit_checkpoints(
        &self,
        instance: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<CheckpointRow>, StoreError>;

    /// The checkpoint with the highest sequence number of one instance.
    async fn last_audit_checkpoint(
        &self,
        instance: &str,
    ) -> Result<Option<CheckpointRow>, StoreError>;

    /// Every instance that has audit events, checkpoints or a signing key,
    /// sorted.
    async fn audit_instances(&self) -> Result<Vec<String>, StoreError>;

    /// The audit signing key of one instance.
    async fn audit_signing_key(
        &self,
        instance: &str,
    ) -> Result<Option<AuditSigningKeyRecord>, StoreError>;

    /// Stores `record` unless the instance has a signing key already, and
    /// returns the stored one either way, so that two instances starting
    /// at once agree on a single key.
    async fn insert_audit_signing_key(
        &self,
        record: &AuditSigningKeyRecord,
    ) -> Result<AuditSigningKeyRecord, StoreError>;

    /// Takes the lock of a scheduled job (auto-rotation, audit
    /// checkpointing, …) if no holder has it: `None` means someone else
    /// runs the job now. At most one holder at a time among everyone using
    /// this keystore — across replicas for PostgreSQL (a session-level
    /// advisory lock); within this process for SQLite, which only one
    /// process may use. See [`JobLock`] for how a lock can be lost.
    async fn try_job_lock(&self, job: &str) -> Result<Option<JobLock>, StoreError>;

    /// Tells every replica that `tenant` changed, so they drop what they
    /// cached of it. [`KeyStore::add_kek_version`] and
    /// [`KeyStore::change_kek_state`] announce their own changes (inside
    /// their transaction, so a committed change is never unannounced);
    /// this is for changes made otherwise. A no-op for SQLite.
    async fn notify_tenant_changed(&self, tenant: &TenantId) -> Result<(), StoreError>;

    /// Subscribes to the changes other replicas announce (and this one's),
    /// or `None` if this store has no other replicas (SQLite). Once this
    /// returns, every change committed afterwards is delivered — unless
    /// the listener loses its connection, which the subscription reports
    /// as [`Invalidation::All`]. See [`Invalidations`].
    async fn subscribe_invalidations(&self) -> Result<Option<Invalidations>, StoreError>;
}
