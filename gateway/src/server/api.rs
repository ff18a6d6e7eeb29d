//! Request and response bodies of the key service API.

use std::collections::BTreeMap;

use kms_core::audit::{Anchor, HASH_LEN};
use kms_core::store::{Approval, KekRecord, TenantRecord, VersionUsage};
use kms_core::{KekVersion, Name, RecordKeyId, TenantId, WrappedDek};

pub(crate) use crate::wire::{ReportedAction, SecretB64};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::ApiError;

/// `POST /v1/tenants`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateTenant {
    /// `[a-z0-9][a-z0-9_-]{0,62}`.
    #[schema(value_type = String, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) tenant: TenantId,
}

/// A tenant as shown to admins and auditors.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TenantView {
    #[schema(value_type = String, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) tenant: TenantId,
    pub(crate) created_at: i64,
    pub(crate) shredded: bool,
    pub(crate) active_version: Option<KekVersion>,
    pub(crate) rotate_every_secs: Option<i64>,
    pub(crate) versions: Vec<VersionView>,
}

/// One KEK version (never its material).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct VersionView {
    pub(crate) version: KekVersion,
    pub(crate) state: &'static str,
    pub(crate) created_at: i64,
    pub(crate) state_changed_at: i64,
}

impl From<&KekRecord> for VersionView {
    fn from(v: &KekRecord) -> Self {
        Self {
            version: v.version,
            state: v.state.as_str(),
            created_at: v.created_at,
            state_changed_at: v.state_changed_at,
        }
    }
}

impl From<&TenantRecord> for TenantView {
    fn from(t: &TenantRecord) -> Self {
        Self {
            tenant: t.id.clone(),
            created_at: t.created_at,
            shredded: t.index_root_wrapped.is_none(),
            active_version: t.active().map(|v| v.version),
            rotate_every_secs: t.rotate_every_secs,
            versions: t.versions.iter().map(VersionView::from).collect(),
        }
    }
}

/// `POST /v1/tenants/{t}/keys/{v}/state`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChangeState {
    pub(crate) action: StateAction,
}

/// The state changes an admin may ask for.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StateAction {
    Enable,
    Disable,
    DecryptOnly,
}

/// `POST /v1/tenants/{t}/datakeys`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct IssueRequest {
    /// How many DEKs (1 to `limits.max_batch`).
    pub(crate) count: usize,
}

/// One issued DEK.
#[derive(Serialize, ToSchema)]
pub(crate) struct IssuedKey<'a> {
    /// 32 hex digits.
    #[schema(value_type = String)]
    pub(crate) record_key_id: RecordKeyId,
    /// The plaintext DEK, base64url.
    #[schema(value_type = String)]
    #[serde(serialize_with = "crate::wire::key_b64")]
    pub(crate) dek: &'a kms_core::Key256,
    /// The DEK wrapped under the KEK version, base64url.
    #[schema(value_type = String)]
    pub(crate) wrapped: WrappedDek,
}

/// `POST /v1/tenants/{t}/datakeys` response.
#[derive(Serialize, ToSchema)]
pub(crate) struct IssueResponse<'a> {
    pub(crate) kek_version: KekVersion,
    pub(crate) keys: Vec<IssuedKey<'a>>,
}

/// Issued DEKs, serialized as an [`IssueResponse`] straight from the
/// keys (no copy of a key is made for the response).
pub(crate) struct IssuedKeys {
    pub(crate) kek_version: KekVersion,
    pub(crate) issued: Vec<kms_core::IssuedDek>,
}

impl Serialize for IssuedKeys {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let keys = self
            .issued
            .iter()
            .map(|d| IssuedKey { record_key_id: d.record_key_id, dek: d.dek(), wrapped: d.wrapped })
            .collect();
        IssueResponse { kek_version: self.kek_version, keys }.serialize(s)
    }
}

/// A wrapped DEK presented for unwrap or rewrap.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct WrappedItem {
    /// 32 hex digits.
    #[schema(value_type = String)]
    pub(crate) record_key_id: RecordKeyId,
    pub(crate) kek_version: KekVersion,
    /// base64url of the 60-byte wrapped DEK.
    #[schema(value_type = String)]
    pub(crate) wrapped: WrappedDek,
}

/// `POST /v1/tenants/{t}/datakeys/unwrap` and `/rewrap`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchRequest {
    /// 1 to `limits.max_batch` items.
    pub(crate) items: Vec<WrappedItem>,
    /// The purpose of use, recorded in the audit event.
    #[serde(default)]
    #[schema(value_type = Option<String>, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) purpose: Option<Name>,
}

/// One unwrap result: the DEK, or an error code.
#[derive(Serialize, ToSchema)]
pub(crate) struct UnwrapResult {
    #[schema(value_type = String)]
    pub(crate) record_key_id: RecordKeyId,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub(crate) dek: Option<SecretB64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<&'static str>,
}

/// One rewrap result: the new wrapping, or an error code.
#[derive(Serialize, ToSchema)]
pub(crate) struct RewrapResult {
    #[schema(value_type = String)]
    pub(crate) record_key_id: RecordKeyId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) kek_version: Option<KekVersion>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub(crate) wrapped: Option<WrappedDek>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<&'static str>,
}

/// `POST /v1/tenants/{t}/derived`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DerivedRequest {
    #[schema(value_type = String, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) schema: Name,
    pub(crate) fields: Vec<DerivedField>,
}

/// A field whose index keys are wanted.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DerivedField {
    /// A JSON pointer, `*` for every array element.
    pub(crate) path: String,
    pub(crate) mode: DerivedMode,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub(crate) namespace: Option<Name>,
}

/// The field modes that need derived keys.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DerivedMode {
    Deterministic,
    BlindIndex,
    Pseudonym,
}

/// One derived key.
#[derive(Serialize, ToSchema)]
pub(crate) struct DerivedKey {
    pub(crate) path: String,
    #[schema(value_type = String)]
    pub(crate) purpose: &'static str,
    /// base64url.
    #[schema(value_type = String)]
    pub(crate) key: SecretB64,
}

/// `POST /v1/tenants/{t}/datakeys/rewrap` response: per-item results.
#[derive(Serialize, ToSchema)]
pub(crate) struct RewrapResponse {
    pub(crate) results: Vec<RewrapResult>,
}

/// `POST /v1/tenants/{t}/datakeys/unwrap` response: per-item results and
/// the tenant's active version (so callers can flag stale records).
#[derive(Serialize, ToSchema)]
pub(crate) struct UnwrapResponse {
    pub(crate) active_version: kms_core::KekVersion,
    pub(crate) results: Vec<UnwrapResult>,
}

/// `{"keys": […]}`: derived index keys.
#[derive(Serialize, ToSchema)]
pub(crate) struct DerivedKeys {
    pub(crate) keys: Vec<DerivedKey>,
}

/// `POST /v1/audit/events`: field-level access events from a sidecar.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReportedEvents {
    pub(crate) events: Vec<ReportedEvent>,
}

/// One field-level access event (never values).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReportedEvent {
    /// The application identity the sidecar served.
    pub(crate) actor: String,
    /// What the sidecar did: a sidecar reports nothing else, so no other
    /// action (a key service's own, say) can be written through this call.
    pub(crate) action: ReportedAction,
    #[schema(value_type = String, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) tenant: TenantId,
    #[serde(default)]
    pub(crate) kek_version: Option<KekVersion>,
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub(crate) record_key_ids: Vec<RecordKeyId>,
    /// `ok`, `denied`, `invalid`, `error`, …
    pub(crate) outcome: String,
    #[serde(default)]
    #[schema(value_type = Option<String>, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) purpose: Option<Name>,
    /// Field pointers and what happened to them (revealed/masked/withheld).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub(crate) fields: serde_json::Map<String, serde_json::Value>,
    /// When it happened at the sidecar (unix ms).
    pub(crate) ts_ms: i64,
}

/// `GET /v1/audit` query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct AuditQuery {
    /// Only this instance's chain.
    #[serde(default)]
    pub(crate) instance: Option<String>,
    /// Only events after this sequence number: of `instance`'s chain, or
    /// with `after_instance`, of that chain (then every later instance from
    /// its start); alone, of every chain. An incremental export keeps, per
    /// chain, the `head_seq` of `GET /v1/audit/heads` taken before it read,
    /// as its next `after`: sequence numbers follow the order events are
    /// stored, timestamps do not.
    #[serde(default)]
    pub(crate) after: i64,
    /// Resumes an export of every instance: the last line's `instance`
    /// (with its `seq` as `after`). Instances come in byte order.
    #[serde(default)]
    pub(crate) after_instance: Option<String>,
    #[serde(default)]
    pub(crate) since_ms: Option<i64>,
    #[serde(default)]
    #[param(value_type = Option<String>)]
    pub(crate) tenant: Option<TenantId>,
    #[serde(default = "default_limit")]
    pub(crate) limit: u32,
}

fn default_limit() -> u32 {
    10_000
}

/// `GET /v1/audit/heads` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct AuditHeads {
    /// Every instance with an audit chain, in byte order.
    pub(crate) instances: Vec<AuditHead>,
}

/// How far one instance's chain reaches.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct AuditHead {
    pub(crate) instance: String,
    /// The sequence number of its last event (0: none yet). Every event up
    /// to it is stored: an export with `instance` and `after` below it
    /// reads them all, whenever they were timestamped.
    pub(crate) head_seq: i64,
    /// Its last event's chain hash, in hex as the export's `hash` (empty:
    /// none yet). An export resuming at `head_seq` compares it with the
    /// event found there: a chain rewritten since (a restored keystore, a
    /// failover) has other events at the same places.
    pub(crate) head_hash: String,
}

/// `GET /v1/tenants/{t}/keys/usage` response.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UsageView {
    #[schema(value_type = String)]
    pub(crate) tenant: TenantId,
    pub(crate) versions: Vec<VersionUsageView>,
}

/// One KEK version's usage.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct VersionUsageView {
    pub(crate) version: KekVersion,
    #[schema(value_type = String)]
    pub(crate) state: &'static str,
    pub(crate) created_at: i64,
    pub(crate) records_issued: u64,
    pub(crate) unwraps: u64,
    pub(crate) unwraps_24h: u64,
    pub(crate) last_unwrap_at: Option<i64>,
}

impl From<&VersionUsage> for VersionUsageView {
    fn from(u: &VersionUsage) -> Self {
        Self {
            version: u.version,
            state: u.state.as_str(),
            created_at: u.created_at,
            records_issued: u.issued,
            unwraps: u.unwraps,
            unwraps_24h: u.recent_unwraps,
            last_unwrap_at: u.last_unwrap_at,
        }
    }
}

/// `PUT /v1/tenants/{t}/keys/auto-rotate`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AutoRotate {
    /// Seconds between rotations; `null` turns auto-rotation off.
    pub(crate) every_secs: Option<u64>,
}

/// `PUT /v1/tenants/{t}/keys/auto-rotate` response.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AutoRotateView {
    #[schema(value_type = String)]
    pub(crate) tenant: TenantId,
    pub(crate) rotate_every_secs: Option<i64>,
    pub(crate) next_rotation_at: Option<i64>,
}

impl From<&TenantRecord> for AutoRotateView {
    fn from(t: &TenantRecord) -> Self {
        let next = match (t.rotate_every_secs, t.active()) {
            (Some(every), Some(active)) => Some(active.created_at.saturating_add(every)),
            _ => None,
        };
        Self {
            tenant: t.id.clone(),
            rotate_every_secs: t.rotate_every_secs,
            next_rotation_at: next,
        }
    }
}

/// `POST /v1/tenants/{t}/shred`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ShredRequest {
    /// One version, or (absent/null) the whole tenant.
    #[serde(default)]
    pub(crate) version: Option<KekVersion>,
    pub(crate) reason: String,
}

/// A request for approval.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ApprovalView {
    pub(crate) id: String,
    #[schema(value_type = String)]
    pub(crate) action: &'static str,
    #[schema(value_type = String)]
    pub(crate) tenant: TenantId,
    pub(crate) version: Option<KekVersion>,
    pub(crate) reason: String,
    pub(crate) requested_by: String,
    pub(crate) requested_at: i64,
    #[schema(value_type = String)]
    pub(crate) state: &'static str,
    pub(crate) decided_by: Option<String>,
    pub(crate) decided_at: Option<i64>,
    pub(crate) comment: Option<String>,
    pub(crate) execute_after: Option<i64>,
    pub(crate) executed_at: Option<i64>,
}

impl From<&Approval> for ApprovalView {
    fn from(a: &Approval) -> Self {
        Self {
            id: a.id.clone(),
            action: "shred",
            tenant: a.tenant.clone(),
            version: a.version,
            reason: a.reason.clone(),
            requested_by: a.requested_by.clone(),
            requested_at: a.requested_at,
            state: a.state.as_str(),
            decided_by: a.decided_by.clone(),
            decided_at: a.decided_at,
            comment: a.comment.clone(),
            execute_after: a.execute_after,
            executed_at: a.executed_at,
        }
    }
}

/// `GET /v1/approvals` response.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ApprovalList {
    pub(crate) approvals: Vec<ApprovalView>,
}

/// `GET /v1/approvals` query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ApprovalQuery {
    #[serde(default)]
    pub(crate) state: Option<String>,
}

/// `POST /v1/approvals/{id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DecideRequest {
    pub(crate) decision: DecisionBody,
    #[serde(default)]
    pub(crate) comment: Option<String>,
    /// What the decider believes the request is; a request for another
    /// tenant or scope is refused (409 `approval_mismatch`).
    /// `keygate admin approve` always sends it.
    #[serde(default)]
    pub(crate) expect: Option<ExpectedRequest>,
}

/// The tenant and scope a decider expects a request to name.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExpectedRequest {
    pub(crate) tenant: String,
    /// One KEK version, or absent (or null) for the whole tenant.
    #[serde(default)]
    pub(crate) version: Option<KekVersion>,
}

/// Approve or reject.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DecisionBody {
    Approve,
    Reject,
}

/// `POST /v1/master/rotate`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MasterRotateRequest {
    /// The new master's provider settings, as in the `[root]` table of the
    /// key service configuration (absolute paths).
    #[schema(value_type = Object)]
    pub(crate) to: crate::config::RootConfig,
}

/// A master key.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MasterView {
    pub(crate) id: i64,
    pub(crate) kind: String,
    pub(crate) key_ref: String,
}

/// `POST /v1/master/rotate` response.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MasterRotateView {
    pub(crate) master: MasterView,
    pub(crate) rewrapped: RewrappedCounts,
    pub(crate) remaining: u64,
    #[schema(value_type = String)]
    pub(crate) state: &'static str,
}

/// What a master rotation moved.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RewrappedCounts {
    pub(crate) tenant_keys: u64,
    pub(crate) index_roots: u64,
    pub(crate) audit_signing_keys: u64,
}

/// `GET /v1/master` response.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MastersView {
    pub(crate) active: Option<MasterView>,
    pub(crate) masters: Vec<MasterEntry>,
}

/// One registered master key.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MasterEntry {
    pub(crate) id: i64,
    pub(crate) kind: String,
    pub(crate) key_ref: String,
    pub(crate) active: bool,
    pub(crate) keys_wrapped: u64,
    /// How the instance that answers stands with this master.
    pub(crate) connection: ConnectionView,
}

/// How one key service instance stands with a master key.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ConnectionView {
    /// `connected`, `not_tried` (no key under it needed since start) or
    /// `failing`.
    #[schema(value_type = String)]
    pub(crate) state: &'static str,
    /// Failed attempts in a row (`failing` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) failures: Option<u32>,
    /// Seconds until a request that needs the master may try again
    /// (`failing` only; 0: the next one tries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) retry_in_secs: Option<u64>,
    /// The last attempt's error (`failing` only, and only to admins: it
    /// may name module paths, PIN sources and endpoints).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) last_error: Option<String>,
}

impl ConnectionView {
    /// `connection` as shown to a caller who may (`with_error`) or may not
    /// see the last error.
    pub(crate) fn new(connection: kms_core::MasterConnection, with_error: bool) -> Self {
        let state = |state| Self { state, failures: None, retry_in_secs: None, last_error: None };
        match connection {
            kms_core::MasterConnection::Connected => state("connected"),
            kms_core::MasterConnection::NotTried => state("not_tried"),
            kms_core::MasterConnection::Failing { failures, retry_in, last_error } => Self {
                state: "failing",
                failures: Some(failures),
                // Rounded up: 0 only once the wait is over.
                retry_in_secs: Some(retry_in.as_secs() + u64::from(retry_in.subsec_nanos() > 0)),
                last_error: with_error.then_some(last_error),
            },
        }
    }
}

/// `POST /v1/audit/events` response.
#[derive(Serialize, ToSchema)]
pub(crate) struct Recorded {
    /// Events appended to the audit chain.
    pub(crate) recorded: usize,
}

/// `POST /v1/audit/verify` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct VerifyRequest {
    /// Where chains stood before, kept outside the keystore (`keygate
    /// admin audit anchor`): 1 to 50,000, in any order.
    pub(crate) anchors: Vec<AnchorEntry>,
}

/// Where one instance's chain stood: the event at `seq` had `hash`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AnchorEntry {
    /// The instance (a report's `instance`).
    pub(crate) instance: String,
    /// Sequence number of the event, from 1 (a report's `head_seq`).
    #[schema(minimum = 1)]
    pub(crate) seq: i64,
    /// That event's hash: 64 lowercase hex digits (a report's `head_hash`).
    pub(crate) hash: String,
}

impl VerifyRequest {
    /// Most anchors in one request.
    pub(crate) const MAX_ANCHORS: usize = 50_000;
    /// Longest instance name in an anchor, in bytes.
    const MAX_INSTANCE_BYTES: usize = 1024;

    /// The anchors, checked, by instance.
    pub(crate) fn anchors_by_instance(&self) -> Result<BTreeMap<String, Vec<Anchor>>, ApiError> {
        let count = self.anchors.len();
        if count == 0 || count > Self::MAX_ANCHORS {
            return Err(ApiError::bad_request(
                "invalid_anchor",
                format!("give 1 to {} anchors, not {count}", Self::MAX_ANCHORS),
            ));
        }
        let mut by_instance: BTreeMap<String, Vec<Anchor>> = BTreeMap::new();
        for (i, entry) in self.anchors.iter().enumerate() {
            let invalid = |what: &str| {
                ApiError::bad_request("invalid_anchor", format!("anchors[{i}]: {what}"))
            };
            if entry.instance.is_empty() || entry.instance.len() > Self::MAX_INSTANCE_BYTES {
                return Err(invalid("the instance must be 1 to 1024 bytes"));
            }
            if entry.seq < 1 {
                return Err(invalid("seq must be 1 or more"));
            }
            let hash = data_encoding::HEXLOWER
                .decode(entry.hash.as_bytes())
                .ok()
                .and_then(|bytes| <[u8; HASH_LEN]>::try_from(bytes).ok())
                .ok_or_else(|| invalid("hash must be 64 lowercase hex digits"))?;
            let anchor = Anchor { seq: entry.seq, hash };
            by_instance.entry(entry.instance.clone()).or_default().push(anchor);
        }
        Ok(by_instance)
    }
}

/// `GET /v1/audit/verify` and `POST /v1/audit/verify` response.
#[derive(Serialize, ToSchema)]
pub(crate) struct VerifyReport {
    /// Every chain and checkpoint signature verified (and every anchor held).
    pub(crate) ok: bool,
    /// Per instance: `{instance, events, checkpoints, head_seq, head_hash,
    /// last_checkpoint, anchors}`; `head_seq` and `head_hash` make an
    /// anchor for later, `anchors` counts those the chain passed through.
    #[schema(value_type = Vec<Object>)]
    pub(crate) instances: Vec<serde_json::Value>,
    /// When `ok` is false: `{instance, position, reason}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub(crate) first_break: Option<serde_json::Value>,
}
