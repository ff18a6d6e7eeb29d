//! Request and response bodies of the key service API.

use kms_core::store::{KekRecord, TenantRecord};
use kms_core::{KekVersion, Name, RecordKeyId, TenantId, WrappedDek};

pub(crate) use crate::wire::SecretB64;
use serde::{Deserialize, Serialize};

/// `POST /v1/tenants`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateTenant {
    pub(crate) tenant: TenantId,
}

/// A tenant as shown to admins and auditors.
#[derive(Debug, Serialize)]
pub(crate) struct TenantView {
    pub(crate) tenant: TenantId,
    pub(crate) created_at: i64,
    pub(crate) shredded: bool,
    pub(crate) active_version: Option<KekVersion>,
    pub(crate) versions: Vec<VersionView>,
}

/// One KEK version (never its material).
#[derive(Debug, Serialize)]
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
            versions: t.versions.iter().map(VersionView::from).collect(),
        }
    }
}

/// `POST /v1/tenants/{t}/keys/{v}/state`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChangeState {
    pub(crate) action: StateAction,
}

/// The state changes an admin may ask for.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StateAction {
    Enable,
    Disable,
    DecryptOnly,
}

/// `POST /v1/tenants/{t}/datakeys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IssueRequest {
    pub(crate) count: usize,
}

/// One issued DEK.
#[derive(Serialize)]
pub(crate) struct IssuedKey {
    pub(crate) record_key_id: RecordKeyId,
    pub(crate) dek: SecretB64,
    pub(crate) wrapped: WrappedDek,
}

/// `POST /v1/tenants/{t}/datakeys` response.
#[derive(Serialize)]
pub(crate) struct IssueResponse {
    pub(crate) kek_version: KekVersion,
    pub(crate) keys: Vec<IssuedKey>,
}

/// A wrapped DEK presented for unwrap or rewrap.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WrappedItem {
    pub(crate) record_key_id: RecordKeyId,
    pub(crate) kek_version: KekVersion,
    pub(crate) wrapped: WrappedDek,
}

/// `POST /v1/tenants/{t}/datakeys/unwrap` and `/rewrap`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchRequest {
    pub(crate) items: Vec<WrappedItem>,
    #[serde(default)]
    pub(crate) purpose: Option<Name>,
}

/// One unwrap result.
#[derive(Serialize)]
pub(crate) struct UnwrapResult {
    pub(crate) record_key_id: RecordKeyId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) dek: Option<SecretB64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<&'static str>,
}

/// One rewrap result.
#[derive(Serialize)]
pub(crate) struct RewrapResult {
    pub(crate) record_key_id: RecordKeyId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) kek_version: Option<KekVersion>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) wrapped: Option<WrappedDek>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<&'static str>,
}

/// `POST /v1/tenants/{t}/derived`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DerivedRequest {
    pub(crate) schema: Name,
    pub(crate) fields: Vec<DerivedField>,
}

/// A field whose index keys are wanted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DerivedField {
    pub(crate) path: String,
    pub(crate) mode: DerivedMode,
    #[serde(default)]
    pub(crate) namespace: Option<Name>,
}

/// The field modes that need derived keys.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DerivedMode {
    Deterministic,
    BlindIndex,
    Pseudonym,
}

/// One derived key.
#[derive(Serialize)]
pub(crate) struct DerivedKey {
    pub(crate) path: String,
    pub(crate) purpose: &'static str,
    pub(crate) key: SecretB64,
}

/// `{"results": […]}`: per-item results of a batch.
#[derive(Serialize)]
pub(crate) struct Results<T> {
    pub(crate) results: Vec<T>,
}

/// `POST /v1/tenants/{t}/datakeys/unwrap` response: per-item results and
/// the tenant's active version (so callers can flag stale records).
#[derive(Serialize)]
pub(crate) struct UnwrapResponse {
    pub(crate) active_version: kms_core::KekVersion,
    pub(crate) results: Vec<UnwrapResult>,
}

/// `{"keys": […]}`: derived index keys.
#[derive(Serialize)]
pub(crate) struct DerivedKeys {
    pub(crate) keys: Vec<DerivedKey>,
}

/// `POST /v1/audit/events`: field-level access events from a sidecar.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReportedEvents {
    pub(crate) events: Vec<ReportedEvent>,
}

/// One field-level access event (never values).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReportedEvent {
    /// The application identity the sidecar served.
    pub(crate) actor: String,
    /// `record.decrypt`, `record.encrypt`, …
    pub(crate) action: String,
    pub(crate) tenant: TenantId,
    #[serde(default)]
    pub(crate) kek_version: Option<KekVersion>,
    #[serde(default)]
    pub(crate) record_key_ids: Vec<RecordKeyId>,
    pub(crate) outcome: String,
    #[serde(default)]
    pub(crate) purpose: Option<Name>,
    /// Field pointers and what happened to them (revealed/masked/withheld).
    #[serde(default)]
    pub(crate) fields: serde_json::Map<String, serde_json::Value>,
    /// When it happened at the sidecar (unix ms).
    pub(crate) ts_ms: i64,
}

/// `GET /v1/audit` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    #[serde(default)]
    pub(crate) instance: Option<String>,
    #[serde(default)]
    pub(crate) after: i64,
    #[serde(default)]
    pub(crate) since_ms: Option<i64>,
    #[serde(default)]
    pub(crate) tenant: Option<TenantId>,
    #[serde(default = "default_limit")]
    pub(crate) limit: u32,
}

fn default_limit() -> u32 {
    10_000
}
