//! Data keys: batch issue, unwrap and rewrap; index-derived keys.
//!
//! Every call is authorized for its tenant and recorded in the audit chain
//! before any key leaves: if the event cannot be made durable, the keys
//! are dropped (and wiped) and the caller gets 503 `audit_unavailable`.

use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kms_core::audit::{AuditEvent, Outcome};
use kms_core::record::{IndexPurpose, derive_path_key, derive_pseudonym_key};
use kms_core::{
    DekError, DekRequest, HierarchyError, Name, PathPattern, RecordKeyId, SecretBuf, TenantId,
};

use super::{ApiJson, ApiPath, tenant_id};
use crate::abuse::SecretSends;
use crate::audit_log::now_ms;
use crate::error::ApiError;
use crate::extract::{has_media_type, read_bytes};
use crate::policy::Role;
use crate::server::api::{
    BatchRequest, DerivedKey, DerivedKeys, DerivedMode, DerivedRequest, IssueRequest,
    IssueResponse, IssuedKeys, RewrapResponse, RewrapResult, SecretB64, UnwrapResponse,
    UnwrapResult, WrappedItem,
};
use crate::server::{AppState, Caller};
use crate::wire::{SecretBytes, SecretJson};
use crate::{issue_binary, unwrap_binary};

/// JSON bytes of one issued key:
/// `{"record_key_id":"<32>","dek":"<43>","wrapped":"<80>"},`.
const ISSUED_KEY_JSON_LEN: usize = 198;
/// JSON bytes of one unwrapped key: `{"record_key_id":"<32>","dek":"<43>"},`.
const UNWRAPPED_KEY_JSON_LEN: usize = 105;

/// Issues `count` fresh DEKs (role `encryptor`); audited before they leave.
///
/// With `Accept: application/vnd.keygate.datakeys.v1` (what the sidecar's
/// DEK pool sends) it answers in that binary form.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/datakeys",
    tag = "datakeys",
    params(("tenant" = String, Path, description = "Tenant id, `[a-z0-9][a-z0-9_-]{0,62}`")),
    request_body = IssueRequest,
    responses(
        (status = 200, description = "Fresh DEKs, each with its wrapped form. In the binary form (asked with `Accept: application/vnd.keygate.datakeys.v1`): the KEK version (u32, big-endian), then per key its record key id (16 bytes), wrapped DEK (60 bytes) and DEK (32 bytes)", content(
            (IssueResponse<'_> = "application/json"),
            (crate::openapi::BinaryBody = "application/vnd.keygate.datakeys.v1"),
        )),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn issue(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    sends: Option<Extension<SecretSends>>,
    ApiPath(tenant): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<IssueRequest>,
) -> Result<Response, ApiError> {
    let tenant = tenant_id(&tenant)?;
    let actor = state.authorize(&caller, &tenant, &[Role::Encryptor], "issue data keys").await?;
    check_batch(&state, body.count)?;
    let room = state.room_for_keys(&actor, body.count, sends.map(|Extension(s)| s)).await?;
    // The ids and version are fixed and audited first; the keys are made
    // only once the event is durable, so requests waiting for the audit
    // commit hold ids, not keys.
    let prepared = match state.hierarchy.prepare_issue(&tenant, body.count).await {
        Ok(prepared) => prepared,
        Err(e) => return Err(failed(&state, &actor, "dek.issue", &tenant, [], e).await),
    };
    let kek_version = prepared.kek_version();
    let event = AuditEvent::new(now_ms(), actor, "dek.issue", Outcome::Ok)
        .with_tenant(tenant)
        .with_kek_version(kek_version)
        .with_record_key_ids(prepared.record_key_ids().iter().copied())
        .with_detail("count", body.count);
    state.audit.record(vec![event]).await?;
    let issued = state.hierarchy.issue(prepared)?;
    let room = room.sending();
    if issue_binary::is_asked(&headers) {
        let out = issue_binary::write_answer(kek_version, &issued);
        return Ok(SecretBytes::new(out, issue_binary::CONTENT_TYPE, Some(room)).into_response());
    }
    let size_hint = 64 + issued.len() * ISSUED_KEY_JSON_LEN;
    Ok(SecretJson::new(IssuedKeys { kek_version, issued }, size_hint).holding(room).into_response())
}

/// Unwraps a batch of DEKs (role `decryptor`); audited before they leave.
///
/// Asked in the binary form (`Content-Type:
/// application/vnd.keygate.unwrap.v1`, what the sidecar sends), it answers
/// in that form.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/datakeys/unwrap",
    tag = "datakeys",
    params(("tenant" = String, Path, description = "Tenant id, `[a-z0-9][a-z0-9_-]{0,62}`")),
    request_body(
        content(
            (BatchRequest = "application/json"),
            (crate::openapi::BinaryBody = "application/vnd.keygate.unwrap.v1"),
        ),
        description = "The wrapped DEKs: JSON, or the binary form the sidecar sends: the purpose's length in one byte (0: none; at most 63), the purpose, then per item the record key id (16 bytes), the KEK version (u32, big-endian) and the wrapped DEK (60 bytes). A binary body off by any length is refused whole (400 `malformed_body`)."
    ),
    responses(
        (status = 200, description = "Per item: the DEK or an error code. In the binary form: the active version (u32, big-endian), then per item, in order, either 0 and the DEK (32 bytes) or an error code's length (1 to 63) and the code (`[a-z0-9_]`)", content(
            (UnwrapResponse = "application/json"),
            (crate::openapi::BinaryBody = "application/vnd.keygate.unwrap.v1"),
        )),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 415 neither JSON nor the binary form, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn unwrap(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    sends: Option<Extension<SecretSends>>,
    ApiPath(tenant): ApiPath<String>,
    body: UnwrapCall,
) -> Result<Response, ApiError> {
    let tenant = tenant_id(&tenant)?;
    let actor = state.authorize(&caller, &tenant, &[Role::Decryptor], "unwrap data keys").await?;
    let UnwrapCall { items, purpose, binary } = body;
    check_batch(&state, items.len())?;
    let room = state.room_for_keys(&actor, items.len(), sends.map(|Extension(s)| s)).await?;
    let ids = || items.iter().map(|i| i.record_key_id);
    let deks = match state.hierarchy.unwrap_deks(&tenant, &items).await {
        Ok(deks) => deks,
        Err(e) => return Err(failed(&state, &actor, "dek.unwrap", &tenant, ids(), e).await),
    };
    // A shredded tenant has no active version: every item failed above,
    // and the call fails here, recorded like the rest.
    let active_version = match state.hierarchy.active_version(&tenant).await {
        Ok(version) => version,
        Err(e) => return Err(failed(&state, &actor, "dek.unwrap", &tenant, ids(), e).await),
    };
    let (ok, failed) = split_ids(&items, deks.iter().map(Result::is_ok));
    let mut event = AuditEvent::new(now_ms(), actor, "dek.unwrap", outcome(ok.len(), failed))
        .with_tenant(tenant)
        .with_record_key_ids(ok)
        .with_detail("failed", failed);
    if let Some(v) = single_version(&items) {
        event = event.with_kek_version(v);
    }
    if let Some(purpose) = &purpose {
        event = event.with_purpose(purpose.as_str());
    }
    // Durable before any DEK is returned.
    state.audit.record(vec![event]).await?;
    let room = room.sending();
    if binary {
        let mut out = SecretBuf::with_capacity(4 + deks.len() * unwrap_binary::ANSWER_KEY_LEN);
        unwrap_binary::write_active_version(&mut out, active_version);
        for dek in &deks {
            match dek {
                Ok(dek) => unwrap_binary::write_key(&mut out, dek),
                Err(e) => unwrap_binary::write_error(&mut out, dek_error_code(*e)),
            }
        }
        return Ok(SecretBytes::new(out, unwrap_binary::CONTENT_TYPE, Some(room)).into_response());
    }
    let results: Vec<UnwrapResult> = items
        .iter()
        .zip(deks)
        .map(|(item, dek)| match dek {
            Ok(dek) => UnwrapResult {
                record_key_id: item.record_key_id,
                dek: Some(SecretB64(dek)),
                error: None,
            },
            Err(e) => UnwrapResult {
                record_key_id: item.record_key_id,
                dek: None,
                error: Some(dek_error_code(e)),
            },
        })
        .collect();
    let size_hint = 64 + results.len() * UNWRAPPED_KEY_JSON_LEN;
    Ok(SecretJson::new(UnwrapResponse { active_version, results }, size_hint)
        .holding(room)
        .into_response())
}

/// An unwrap request in either form, and which form to answer in.
pub(crate) struct UnwrapCall {
    items: Vec<DekRequest>,
    purpose: Option<Name>,
    binary: bool,
}

impl<S: Send + Sync> FromRequest<S> for UnwrapCall {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        if !has_media_type(request.headers(), unwrap_binary::CONTENT_TYPE) {
            let ApiJson(body) = ApiJson::<BatchRequest>::from_request(request, state).await?;
            return Ok(Self { items: requests(&body.items), purpose: body.purpose, binary: false });
        }
        let bytes = read_bytes(request, state).await?;
        let request = unwrap_binary::decode_request(&bytes)
            .map_err(|e| ApiError::bad_request("malformed_body", e.to_string()))?;
        Ok(Self { items: request.items, purpose: request.purpose, binary: true })
    }
}

/// Rewraps a batch of DEKs under the active KEK version (role `encryptor`).
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/datakeys/rewrap",
    tag = "datakeys",
    params(("tenant" = String, Path, description = "Tenant id, `[a-z0-9][a-z0-9_-]{0,62}`")),
    request_body = BatchRequest,
    responses(
        (status = 200, description = "Per item: the DEK wrapped under the active version, or an error code (no plaintext)", body = RewrapResponse),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn rewrap(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(tenant): ApiPath<String>,
    ApiJson(body): ApiJson<BatchRequest>,
) -> Result<Json<RewrapResponse>, ApiError> {
    let tenant = tenant_id(&tenant)?;
    let actor = state.authorize(&caller, &tenant, &[Role::Encryptor], "rewrap data keys").await?;
    check_batch(&state, body.items.len())?;
    let requests = requests(&body.items);
    let rewrapped = match state.hierarchy.rewrap_deks(&tenant, &requests).await {
        Ok(rewrapped) => rewrapped,
        Err(e) => {
            let ids = requests.iter().map(|r| r.record_key_id);
            return Err(failed(&state, &actor, "dek.rewrap", &tenant, ids, e).await);
        }
    };
    let (ok, failed) = split_ids(&requests, rewrapped.iter().map(Result::is_ok));
    let mut event = AuditEvent::new(now_ms(), actor, "dek.rewrap", outcome(ok.len(), failed))
        .with_tenant(tenant)
        .with_record_key_ids(ok)
        .with_detail("failed", failed);
    if let Some(Ok(r)) = rewrapped.first() {
        event = event.with_kek_version(r.kek_version);
    }
    state.audit.record(vec![event]).await?;
    let results: Vec<RewrapResult> = body
        .items
        .iter()
        .zip(rewrapped)
        .map(|(item, r)| match r {
            Ok(r) => RewrapResult {
                record_key_id: item.record_key_id,
                kek_version: Some(r.kek_version),
                wrapped: Some(r.wrapped),
                error: None,
            },
            Err(e) => RewrapResult {
                record_key_id: item.record_key_id,
                kek_version: None,
                wrapped: None,
                error: Some(dek_error_code(e)),
            },
        })
        .collect();
    Ok(Json(RewrapResponse { results }))
}

/// Index-derived keys for a schema's fields (roles `encryptor`, `decryptor`).
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/derived",
    tag = "datakeys",
    params(("tenant" = String, Path, description = "Tenant id, `[a-z0-9][a-z0-9_-]{0,62}`")),
    request_body = DerivedRequest,
    responses(
        (status = 200, description = "Index-derived keys per field and purpose", body = DerivedKeys),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn derived(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(tenant): ApiPath<String>,
    ApiJson(body): ApiJson<DerivedRequest>,
) -> Result<SecretJson<DerivedKeys>, ApiError> {
    let tenant = tenant_id(&tenant)?;
    let actor = state
        .authorize(&caller, &tenant, &[Role::Encryptor, Role::Decryptor], "derive index keys")
        .await?;
    check_batch(&state, body.fields.len())?;
    let mut paths = Vec::with_capacity(body.fields.len());
    for field in &body.fields {
        let path = PathPattern::parse(&field.path)
            .map_err(|e| ApiError::bad_request("invalid_path", format!("{}: {e}", field.path)))?;
        paths.push(path);
    }
    let root = match state.hierarchy.index_root(&tenant).await {
        Ok(root) => root,
        Err(e) => return Err(failed(&state, &actor, "index.derive", &tenant, [], e).await),
    };
    let mut keys = Vec::new();
    for (field, path) in body.fields.iter().zip(&paths) {
        let purposes: &[IndexPurpose] = match field.mode {
            DerivedMode::Deterministic => {
                &[IndexPurpose::DeterministicEncryption, IndexPurpose::DeterministicNonce]
            }
            DerivedMode::BlindIndex => &[IndexPurpose::BlindIndex],
            DerivedMode::Pseudonym => &[IndexPurpose::Pseudonym],
        };
        for purpose in purposes {
            let key = match purpose {
                IndexPurpose::Pseudonym => derive_pseudonym_key(
                    &root,
                    &tenant,
                    field.namespace.as_ref().unwrap_or(&body.schema),
                ),
                other => derive_path_key(&root, &tenant, &body.schema, path, *other),
            };
            keys.push(DerivedKey {
                path: field.path.clone(),
                purpose: purpose.label(),
                key: SecretB64(key),
            });
        }
    }
    let event = AuditEvent::new(now_ms(), actor, "index.derive", Outcome::Ok)
        .with_tenant(tenant)
        .with_detail("schema", body.schema.as_str())
        .with_detail("paths", body.fields.iter().map(|f| f.path.clone()).collect::<Vec<_>>());
    state.audit.record(vec![event]).await?;
    // `{"keys":[` and `]}`, then `{"path":"…","purpose":"…","key":"<43>"},`
    // per key (paths as sent; one with escapes costs a wiped copy).
    let size_hint = 11 + keys.iter().map(|k| k.path.len() + k.purpose.len() + 77).sum::<usize>();
    Ok(SecretJson::new(DerivedKeys { keys }, size_hint))
}

/// A call that failed as a whole once authorized (the tenant's keys
/// shredded, no such tenant, the keystore or root provider down) is
/// recorded too: who tried, on which records, and why it failed. Best
/// effort: the caller gets the call's own error either way.
async fn failed(
    state: &AppState,
    actor: &str,
    action: &str,
    tenant: &TenantId,
    record_key_ids: impl IntoIterator<Item = RecordKeyId>,
    e: HierarchyError,
) -> ApiError {
    let error = ApiError::from(e);
    let outcome = match error.status() {
        status if status.is_server_error() => Outcome::Error,
        StatusCode::GONE | StatusCode::CONFLICT => Outcome::Denied,
        _ => Outcome::Invalid,
    };
    let event = AuditEvent::new(now_ms(), actor, action, outcome)
        .with_tenant(tenant.clone())
        .with_record_key_ids(record_key_ids)
        .with_detail("error", error.code());
    if let Err(audit) = state.audit.record(vec![event]).await {
        tracing::warn!(action, error = audit.code(), "a failed call could not be recorded");
    }
    error
}

fn check_batch(state: &AppState, count: usize) -> Result<(), ApiError> {
    let max = state.limits.max_batch;
    if count == 0 || count > max {
        return Err(ApiError::bad_request(
            "batch_too_large",
            format!("a batch must hold 1 to {max} items, not {count}"),
        ));
    }
    Ok(())
}

fn requests(items: &[WrappedItem]) -> Vec<DekRequest> {
    items
        .iter()
        .map(|i| DekRequest {
            record_key_id: i.record_key_id,
            kek_version: i.kek_version,
            wrapped: i.wrapped,
        })
        .collect()
}

fn split_ids(items: &[DekRequest], ok: impl Iterator<Item = bool>) -> (Vec<RecordKeyId>, usize) {
    let mut good = Vec::with_capacity(items.len());
    let mut failed = 0;
    for (item, ok) in items.iter().zip(ok) {
        if ok {
            good.push(item.record_key_id);
        } else {
            failed += 1;
        }
    }
    (good, failed)
}

fn single_version(items: &[DekRequest]) -> Option<u32> {
    let first = items.first()?.kek_version;
    items.iter().all(|i| i.kek_version == first).then_some(first)
}

/// `ok` if anything succeeded (the count of failures is in the detail),
/// `invalid` if every item was refused.
fn outcome(ok: usize, failed: usize) -> Outcome {
    if ok == 0 && failed > 0 { Outcome::Invalid } else { Outcome::Ok }
}

fn dek_error_code(e: DekError) -> &'static str {
    match e {
        DekError::CannotDecrypt => "cannot_decrypt",
        DekError::UnknownVersion => "unknown_version",
        DekError::VersionDisabled => "key_version_disabled",
        DekError::KeyDestroyed => "key_destroyed",
        _ => "cannot_decrypt",
    }
}
