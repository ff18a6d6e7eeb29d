//! The app-facing handlers: encrypt, decrypt, rewrap, index, pseudonym.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use kms_core::record::{EncryptedRecord, encrypt_record, index_token, pseudonym};
use kms_core::{DekRequest, TenantId};
use serde_json::{Map, Value, json};

use super::api::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, IndexRequest, IndexResponse,
    PseudonymRequest, PseudonymResponse, RewrapRequest, RewrapResponse, one_or_many,
};
use super::reporter::{Access, AccessEvent};
use super::state::{SidecarState, ks_error};
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiJsonLen};
use crate::policy::Role;
use crate::wire::SecretJson;

type Shared = State<Arc<SidecarState>>;

/// An encrypted record is about twice its plaintext (each value becomes
/// nonce, ciphertext and tag in base64, plus the `_kg` header).
const ENCRYPT_GROWTH: usize = 2;
/// Room for the response's own members beyond its records.
const ENVELOPE_BYTES: usize = 256;

/// The answer with its records, in one buffer sized up front from the
/// request (`size_hint`) and wiped when sent: records carry what the app
/// sent us, and axum's `Json` would leave every outgrown copy unwiped.
fn respond(
    records: Vec<Value>,
    single: bool,
    extra: Map<String, Value>,
    size_hint: usize,
) -> SecretJson<Value> {
    let mut body = extra;
    if single {
        body.insert("record".into(), records.into_iter().next().unwrap_or(Value::Null));
    } else {
        body.insert("records".into(), Value::Array(records));
    }
    SecretJson::new(Value::Object(body), size_hint.saturating_add(ENVELOPE_BYTES))
}

async fn authorize(s: &SidecarState, tenant: &TenantId, roles: &[Role]) -> Result<(), ApiError> {
    let grants = s.keyring.grants().await.map_err(ks_error)?;
    if roles.iter().any(|r| grants.authorize(tenant, *r)) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "this sidecar's identity has no grant for tenant {tenant}"
        )))
    }
}

/// Encrypts the schema's protected fields of one or many records.
#[utoipa::path(
    post,
    path = "/v1/encrypt",
    tag = "records",
    request_body = EncryptRequest,
    responses(
        (status = 200, description = "The encrypted record(s)", body = EncryptResponse),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 401 no token, 403 not granted, 404 unknown tenant or schema, 408 body too slow, 409/410 key disabled or destroyed, 413 too large, 422 cannot decrypt, 429 rate limited, 503 key service or audit unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(super) async fn encrypt(
    State(s): Shared,
    ApiJsonLen(req, request_len): ApiJsonLen<EncryptRequest>,
) -> Result<SecretJson<Value>, ApiError> {
    let (records, single) =
        one_or_many(req.record, req.records, s.limits.max_records, s.limits.max_depth)?;
    authorize(&s, &req.tenant, &[Role::Encryptor]).await?;
    let schema = s.schema(req.schema.as_str(), req.schema_version)?.clone();
    // Refuse what cannot be encrypted before any DEK is spent on it.
    for record in &records {
        match record {
            Value::Object(map) if map.contains_key(kms_core::record::HEADER_MEMBER) => {
                return Err(kms_core::record::RecordError::AlreadyEncrypted.into());
            }
            Value::Object(_) => {}
            _ => return Err(kms_core::record::RecordError::NotAnObject.into()),
        }
    }
    s.reporter.check()?;
    let keys = s
        .keyring
        .schema_keys(&req.tenant, &schema)
        .await
        .map_err(|e| s.tenant_error(&req.tenant, e))?;
    let deks = s
        .pool
        .take(&req.tenant, records.len())
        .await
        .map_err(|e| s.tenant_error(&req.tenant, e))?;
    let mut out = Vec::with_capacity(records.len());
    let mut ids = Vec::with_capacity(records.len());
    // Warm the DEK cache (the app often reads back what it just wrote):
    // collected here, inserted under one lock after the loop.
    let mut warm = Vec::with_capacity(records.len());
    for (record, dek) in records.into_iter().zip(deks) {
        ids.push(dek.record_key_id);
        warm.push((dek.record_key_id, dek.kek_version, Arc::new(dek.dek().duplicate())));
        out.push(encrypt_record(record, &req.tenant, &schema, &keys, dek)?);
    }
    if let Some((_, version, _)) = warm.last() {
        s.note_active(&req.tenant, *version);
    }
    s.cache.insert_many(&req.tenant, warm);
    s.reporter.record(vec![AccessEvent {
        tenant: req.tenant.clone(),
        kek_version: None,
        access: Access::Encrypt { schema: schema.name.clone() },
        record_key_ids: ids,
    }]);
    Ok(respond(out, single, Map::new(), request_len.saturating_mul(ENCRYPT_GROWTH)))
}

/// Decrypts the fields this sidecar's identity may see.
#[utoipa::path(
    post,
    path = "/v1/decrypt",
    tag = "records",
    request_body = DecryptRequest,
    responses(
        (status = 200, description = "The record(s) with what the policy allows, and a report", body = DecryptResponse),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 401 no token, 403 not granted, 404 unknown tenant or schema, 408 body too slow, 409/410 key disabled or destroyed, 413 too large, 422 cannot decrypt, 429 rate limited, 503 key service or audit unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(super) async fn decrypt(
    state: Shared,
    req: ApiJsonLen<DecryptRequest>,
) -> Result<SecretJson<super::decrypt::DecryptResponse>, ApiError> {
    super::decrypt::decrypt(state, req).await
}

/// What the key service needs to unwrap or rewrap a record's DEK.
pub(super) fn dek_request(record: &EncryptedRecord) -> DekRequest {
    let header = record.header();
    DekRequest {
        record_key_id: *header.record_key_id(),
        kek_version: header.kek_version(),
        wrapped: *header.wrapped_dek(),
    }
}

/// Moves records' key parts to the active KEK version.
#[utoipa::path(
    post,
    path = "/v1/rewrap",
    tag = "records",
    request_body = RewrapRequest,
    responses(
        (status = 200, description = "The records with their key part under the active KEK version", body = RewrapResponse),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 401 no token, 403 not granted, 404 unknown tenant or schema, 408 body too slow, 409/410 key disabled or destroyed, 413 too large, 422 cannot decrypt, 429 rate limited, 503 key service or audit unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(super) async fn rewrap(
    State(s): Shared,
    ApiJsonLen(req, request_len): ApiJsonLen<RewrapRequest>,
) -> Result<SecretJson<Value>, ApiError> {
    let (records, single) =
        one_or_many(req.record, req.records, s.limits.max_records, s.limits.max_depth)?;
    let parsed: Vec<EncryptedRecord> =
        records.into_iter().map(EncryptedRecord::parse).collect::<Result<_, _>>()?;
    let mut by_tenant: BTreeMap<TenantId, Vec<usize>> = BTreeMap::new();
    for (i, r) in parsed.iter().enumerate() {
        by_tenant.entry(r.header().tenant().clone()).or_default().push(i);
    }
    let mut new_parts: Vec<Option<(u32, kms_core::WrappedDek)>> = vec![None; parsed.len()];
    for (tenant, indices) in by_tenant {
        authorize(&s, &tenant, &[Role::Encryptor]).await?;
        let items: Vec<DekRequest> =
            indices.iter().filter_map(|i| parsed.get(*i)).map(dek_request).collect();
        let results =
            s.client.rewrap(&tenant, &items).await.map_err(|e| s.tenant_error(&tenant, e))?;
        for (i, result) in indices.iter().zip(results) {
            let moved = result.map_err(|code| s.dek_error(&tenant, &code))?;
            s.note_active(&tenant, moved.kek_version);
            if let Some(slot) = new_parts.get_mut(*i) {
                *slot = Some((moved.kek_version, moved.wrapped));
            }
        }
    }
    let mut changed = 0u64;
    let out: Vec<Value> = parsed
        .into_iter()
        .zip(new_parts)
        .map(|(record, part)| {
            let header = record.header();
            let (version, wrapped) = part.unwrap_or((header.kek_version(), *header.wrapped_dek()));
            if version != header.kek_version() {
                changed += 1;
            }
            record.into_rewrapped(version, wrapped)
        })
        .collect();
    let mut extra = Map::new();
    extra.insert("rewrapped".into(), json!(changed));
    Ok(respond(out, single, extra, request_len))
}

/// The blind-index or deterministic token of a value.
#[utoipa::path(
    post,
    path = "/v1/index",
    tag = "records",
    request_body = IndexRequest,
    responses(
        (status = 200, description = "The token to search for", body = IndexResponse),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 401 no token, 403 not granted, 404 unknown tenant or schema, 408 body too slow, 409/410 key disabled or destroyed, 413 too large, 422 cannot decrypt, 429 rate limited, 503 key service or audit unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(super) async fn index(
    State(s): Shared,
    ApiJson(req): ApiJson<IndexRequest>,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &req.tenant, &[Role::Encryptor, Role::Decryptor]).await?;
    let schema = s.schema(req.schema.as_str(), req.schema_version)?.clone();
    let keys = s
        .keyring
        .schema_keys(&req.tenant, &schema)
        .await
        .map_err(|e| s.tenant_error(&req.tenant, e))?;
    let token = index_token(&schema, &keys, &req.path, &req.value)?;
    Ok(Json(json!({ "token": token })))
}

/// A stable pseudonym for a value.
#[utoipa::path(
    post,
    path = "/v1/pseudonym",
    tag = "records",
    request_body = PseudonymRequest,
    responses(
        (status = 200, description = "The pseudonym", body = PseudonymResponse),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 401 no token, 403 not granted, 404 unknown tenant or schema, 408 body too slow, 409/410 key disabled or destroyed, 413 too large, 422 cannot decrypt, 429 rate limited, 503 key service or audit unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(super) async fn pseudonymize(
    State(s): Shared,
    ApiJson(req): ApiJson<PseudonymRequest>,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &req.tenant, &[Role::Encryptor, Role::Decryptor]).await?;
    let key = s
        .keyring
        .namespace_key(&req.tenant, &req.namespace)
        .await
        .map_err(|e| s.tenant_error(&req.tenant, e))?;
    Ok(Json(json!({ "pseudonym": pseudonym(&key, &req.value) })))
}
