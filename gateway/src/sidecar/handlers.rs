//! The app-facing handlers: encrypt, decrypt, rewrap, index, pseudonym.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use kms_core::record::{
    Disclosure, EncryptedRecord, FieldOutcome, encrypt_record, index_token, pseudonym,
};
use kms_core::{DekRequest, Key256, TenantId};
use serde_json::{Map, Value, json};

use super::api::{
    DecryptRequest, EncryptRequest, IndexRequest, PseudonymRequest, RewrapRequest, one_or_many,
};
use super::state::{SidecarState, dek_error, ks_error};
use crate::audit_log::now_ms;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::policy::{FieldAccess, Role};

type Shared = State<Arc<SidecarState>>;

fn respond(records: Vec<Value>, single: bool, extra: Map<String, Value>) -> Json<Value> {
    let mut body = extra;
    if single {
        body.insert("record".into(), records.into_iter().next().unwrap_or(Value::Null));
    } else {
        body.insert("records".into(), Value::Array(records));
    }
    Json(Value::Object(body))
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

pub(super) async fn encrypt(
    State(s): Shared,
    ApiJson(req): ApiJson<EncryptRequest>,
) -> Result<Json<Value>, ApiError> {
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
    let keys = s.keyring.schema_keys(&req.tenant, &schema).await.map_err(ks_error)?;
    let deks = s.pool.take(&req.tenant, records.len()).await.map_err(ks_error)?;
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
    s.reporter.record(vec![json!({
        "actor": s.app, "action": "record.encrypt", "tenant": req.tenant, "record_key_ids": ids,
        "outcome": "ok", "ts_ms": now_ms(), "fields": {"schema": schema.name, "records": out.len()},
    })]);
    Ok(respond(out, single, Map::new()))
}

pub(super) async fn decrypt(
    State(s): Shared,
    ApiJson(req): ApiJson<DecryptRequest>,
) -> Result<Json<Value>, ApiError> {
    let (records, single) =
        one_or_many(req.record, req.records, s.limits.max_records, s.limits.max_depth)?;
    let grants = s.keyring.grants().await.map_err(ks_error)?;
    s.reporter.check()?;
    let parsed: Vec<EncryptedRecord> =
        records.into_iter().map(EncryptedRecord::parse).collect::<Result<_, _>>()?;
    for record in &parsed {
        let tenant = record.header().tenant();
        if !grants.authorize(tenant, Role::Decryptor) {
            return Err(ApiError::forbidden(format!(
                "this sidecar's identity may not decrypt for tenant {tenant}"
            )));
        }
    }

    // DEKs: cache first, then one unwrap call per tenant for all misses.
    let mut deks: Vec<Option<(Arc<Key256>, bool)>> = parsed
        .iter()
        .map(|r| {
            let h = r.header();
            s.cache.get(h.record_key_id(), h.tenant(), h.kek_version()).map(|k| (k, true))
        })
        .collect();
    let mut misses: BTreeMap<TenantId, Vec<usize>> = BTreeMap::new();
    for (i, dek) in deks.iter().enumerate() {
        if dek.is_none() {
            if let Some(r) = parsed.get(i) {
                misses.entry(r.header().tenant().clone()).or_default().push(i);
            }
        }
    }
    for (tenant, indices) in misses {
        let items: Vec<DekRequest> =
            indices.iter().filter_map(|i| parsed.get(*i)).map(dek_request).collect();
        let unwrapped =
            s.client.unwrap(&tenant, &items, req.purpose.as_ref()).await.map_err(ks_error)?;
        s.note_active(&tenant, unwrapped.active_version);
        let mut fresh = Vec::with_capacity(items.len());
        for ((i, item), result) in indices.iter().zip(&items).zip(unwrapped.results) {
            let key = Arc::new(result.map_err(|code| dek_error(&code))?);
            fresh.push((item.record_key_id, item.kek_version, key.clone()));
            if let Some(slot) = deks.get_mut(*i) {
                *slot = Some((key, false));
            }
        }
        s.cache.insert_many(&tenant, fresh);
    }

    let purpose = req.purpose.as_ref().map(|p| p.as_str());
    let mut out = Vec::with_capacity(parsed.len());
    let mut reports = Vec::with_capacity(parsed.len());
    let mut events = Vec::with_capacity(parsed.len());
    // Schema and derived keys, resolved once per (tenant, schema, version)
    // rather than once per record.
    let mut resolved: Vec<(
        TenantId,
        Arc<kms_core::schema::Schema>,
        Arc<kms_core::record::SchemaKeys>,
    )> = Vec::new();
    for (record, dek) in parsed.into_iter().zip(deks) {
        let (dek, cached) = dek.ok_or_else(crate::error::cannot_decrypt)?;
        let header = record.header();
        let (tenant, version, id) =
            (header.tenant().clone(), header.kek_version(), *header.record_key_id());
        let known = resolved.iter().find(|(t, schema, _)| {
            t == &tenant
                && &schema.name == header.schema()
                && schema.version == header.schema_version()
        });
        let (schema, keys) = match known {
            Some((_, schema, keys)) => (schema.clone(), keys.clone()),
            None => {
                let schema =
                    s.schema(header.schema().as_str(), Some(header.schema_version()))?.clone();
                let keys = s.keyring.schema_keys(&tenant, &schema).await.map_err(ks_error)?;
                resolved.push((tenant.clone(), schema.clone(), keys.clone()));
                (schema, keys)
            }
        };
        let disclose = |field: &kms_core::schema::FieldSpec| match grants.disclosure(
            &tenant,
            &field.class,
            purpose,
        ) {
            FieldAccess::Reveal => Disclosure::Reveal,
            FieldAccess::Mask => Disclosure::Mask,
            _ => Disclosure::Withhold,
        };
        let decrypted = record.decrypt(&dek, &schema, &keys, &disclose)?;
        let stale = s.active(&tenant).is_some_and(|active| active != version);
        let fields: Vec<Value> = decrypted
            .fields
            .iter()
            .map(|f| {
                let mut entry = Map::new();
                entry.insert("pointer".into(), json!(f.pointer));
                entry.insert("class".into(), json!(f.class));
                entry.insert("outcome".into(), json!(outcome(f.outcome)));
                if let Some(reason) = reason(f, grants.disclosure(&tenant, &f.class, purpose)) {
                    entry.insert("reason".into(), json!(reason));
                }
                Value::Object(entry)
            })
            .collect();
        let field_outcomes: Map<String, Value> = decrypted
            .fields
            .iter()
            .map(|f| (f.pointer.clone(), json!(outcome(f.outcome))))
            .collect();
        events.push(json!({
            "actor": s.app, "action": "record.decrypt", "tenant": tenant, "kek_version": version,
            "record_key_ids": [id], "outcome": "ok", "purpose": purpose, "ts_ms": now_ms(),
            "fields": {"cache_hit": cached, "schema": schema.name, "fields": field_outcomes},
        }));
        reports.push(json!({
            "record_key_id": id, "tenant": tenant, "schema": schema.name, "schema_version": schema.version,
            "kek_version": version, "stale_key_version": stale, "fields": fields,
        }));
        out.push(decrypted.record);
    }
    s.reporter.record(events);
    let mut extra = Map::new();
    extra.insert("report".into(), Value::Array(reports));
    Ok(respond(out, single, extra))
}

/// What the key service needs to unwrap or rewrap a record's DEK.
fn dek_request(record: &EncryptedRecord) -> DekRequest {
    let header = record.header();
    DekRequest {
        record_key_id: *header.record_key_id(),
        kek_version: header.kek_version(),
        wrapped: *header.wrapped_dek(),
    }
}

/// Why a field was not revealed (for the caller; never a value).
fn reason(field: &kms_core::record::FieldReport, access: FieldAccess) -> Option<String> {
    let class = &field.class;
    match (field.outcome, access) {
        (FieldOutcome::Revealed, _) => None,
        (FieldOutcome::Masked, _) => {
            Some(format!("the policy allows only the masked form of {class}"))
        }
        (FieldOutcome::Withheld, FieldAccess::Mask) => {
            Some(format!("the policy allows only a masked {class}, and the schema defines no mask"))
        }
        (FieldOutcome::Withheld, _) => {
            Some(format!("the policy does not grant {class} for this tenant and purpose"))
        }
    }
}

fn outcome(o: FieldOutcome) -> &'static str {
    match o {
        FieldOutcome::Revealed => "revealed",
        FieldOutcome::Masked => "masked",
        FieldOutcome::Withheld => "withheld",
    }
}

pub(super) async fn rewrap(
    State(s): Shared,
    ApiJson(req): ApiJson<RewrapRequest>,
) -> Result<Json<Value>, ApiError> {
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
        let results = s.client.rewrap(&tenant, &items).await.map_err(ks_error)?;
        for (i, result) in indices.iter().zip(results) {
            let moved = result.map_err(|code| dek_error(&code))?;
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
    Ok(respond(out, single, extra))
}

pub(super) async fn index(
    State(s): Shared,
    ApiJson(req): ApiJson<IndexRequest>,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &req.tenant, &[Role::Encryptor, Role::Decryptor]).await?;
    let schema = s.schema(req.schema.as_str(), req.schema_version)?.clone();
    let keys = s.keyring.schema_keys(&req.tenant, &schema).await.map_err(ks_error)?;
    let token = index_token(&schema, &keys, &req.path, &req.value)?;
    Ok(Json(json!({ "token": token })))
}

pub(super) async fn pseudonymize(
    State(s): Shared,
    ApiJson(req): ApiJson<PseudonymRequest>,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &req.tenant, &[Role::Encryptor, Role::Decryptor]).await?;
    let key = s.keyring.namespace_key(&req.tenant, &req.namespace).await.map_err(ks_error)?;
    Ok(Json(json!({ "pseudonym": pseudonym(&key, &req.value) })))
}
