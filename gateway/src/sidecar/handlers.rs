//! The app-facing handlers: encrypt, decrypt, rewrap, index, pseudonym.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, State};
use kms_core::record::{
    EncryptedText, FieldOutcome, TextWorkspace, check_encryptable, index_token, pseudonym,
};
use kms_core::schema::Schema;
use kms_core::{DekRequest, Name, SecretBuf, TenantId};
use serde_json::{Value, json};

use super::api::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, IndexRequest, IndexResponse,
    PseudonymRequest, PseudonymResponse, RewrapRequest, RewrapResponse,
};
use super::pool::Taken;
use super::reporter::{Access, AccessEvent};
use super::request::RequestId;
use super::state::{SidecarState, ks_error};
use crate::error::ApiError;
use crate::extract::{ApiBody, ApiJson};
use crate::policy::{EffectiveGrants, Role};
use crate::wire::SecretJsonText;

type Shared = State<Arc<SidecarState>>;
/// The request's id (`super::request`), recorded in its audit events.
type Id = Extension<RequestId>;

/// An encrypted record is about twice its plaintext (each value becomes
/// nonce, ciphertext and tag in base64, plus the `_kg` header).
const ENCRYPT_GROWTH: usize = 2;
/// Room for the response's own members beyond its records.
const ENVELOPE_BYTES: usize = 256;
/// The largest encrypt answer, as a multiple of the body limit. Real
/// records grow about twofold; a body of many tiny protected values (an
/// array of thousands of one-digit numbers) grows some fortyfold (each a
/// token of a 16-byte padded plaintext, nonce and tag), which
/// would let one request make an answer of hundreds of MiB.
const MAX_ENCRYPT_GROWTH: usize = 4;

/// An answer with records, written record by record into one buffer sized
/// up front from the request and wiped when sent: records carry what the
/// app sent us (and, for decrypt, plaintext).
pub(super) struct Answer {
    out: SecretBuf,
    single: bool,
    count: usize,
}

impl Answer {
    /// `{"record":` or `{"records":[`, in a buffer of `size_hint` bytes.
    pub(super) fn new(single: bool, size_hint: usize) -> Self {
        let mut out = SecretBuf::with_capacity(size_hint.saturating_add(ENVELOPE_BYTES));
        out.extend_from_slice(if single { b"{\"record\":" } else { b"{\"records\":[" });
        Self { out, single, count: 0 }
    }

    /// Where the next record goes (after a separator if needed).
    pub(super) fn next_record(&mut self) -> &mut SecretBuf {
        if self.count > 0 {
            self.out.extend_from_slice(b",");
        }
        self.count += 1;
        &mut self.out
    }

    /// Closes the records; more members (`,"name":value`) may follow
    /// before [`Answer::finish`].
    pub(super) fn end_records(&mut self) -> &mut SecretBuf {
        if !self.single {
            self.out.extend_from_slice(b"]");
        }
        &mut self.out
    }

    pub(super) fn finish(mut self) -> SecretJsonText {
        self.out.extend_from_slice(b"}");
        SecretJsonText(self.out)
    }
}

/// This sidecar's grants, if they give one of `roles` on `tenant`.
async fn authorize(
    s: &SidecarState,
    tenant: &TenantId,
    roles: &[Role],
) -> Result<Arc<EffectiveGrants>, ApiError> {
    let grants = s.keyring.grants().await.map_err(ks_error)?;
    if roles.iter().any(|r| grants.authorize(tenant, *r)) {
        Ok(grants)
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
    params(("x-request-id" = Option<String>, Header, description = "The call's id: 32 hex digits or a UUID (the SDK sends 32 hex digits, the same on every retry); without it the sidecar makes one. Echoed in the answer and recorded in the field-level audit events the request makes (`fields.request_ids`)")),
    request_body = EncryptRequest<'_>,
    responses(
        (status = 200, description = "The encrypted record(s)", body = EncryptResponse, headers(("x-request-id" = String, description = "The request's id"))),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input (`invalid_request_id`: a bad `x-request-id`), 401 no token, 403 not granted, 404 unknown tenant or schema, 408 body too slow, 409/410 key disabled or destroyed, 413 too large, 422 cannot decrypt, 429 rate limited, 503 key service or audit unavailable (`key_service_unavailable`, `audit_unavailable`) or the request past its deadline (`timeout`, with `Retry-After`)", body = crate::openapi::ErrorBody, headers(("x-request-id" = String, description = "The request's id (none on answers given before the request reached the API: 400 `invalid_request_id`, 408, 413, 429, an unknown path)")))
    ),
)]
pub(super) async fn encrypt(
    State(s): Shared,
    Extension(id): Id,
    body: ApiBody,
) -> Result<SecretJsonText, ApiError> {
    let req: EncryptRequest<'_> = body.parse()?;
    let (records, single) = s.records(req.record, req.records, &body)?;
    authorize(&s, &req.tenant, &[Role::Encryptor]).await?;
    let schema = s.schema(req.schema.as_str(), req.schema_version)?.clone();
    // Refuse what cannot be encrypted before any DEK is spent on it.
    for (i, record) in records.iter().enumerate() {
        check_encryptable(record).map_err(|e| of_record(single, i, e.into()))?;
    }
    s.reporter.check([&req.tenant])?;
    let keys = s
        .keyring
        .schema_keys(&req.tenant, &schema)
        .await
        .map_err(|e| s.tenant_error(&req.tenant, e))?;
    let Taken { deks, asked_at } = s
        .pool
        .take(&req.tenant, records.len())
        .await
        .map_err(|e| s.tenant_error(&req.tenant, e))?;
    let mut answer = Answer::new(single, body.len().saturating_mul(ENCRYPT_GROWTH));
    // Warm the DEK cache (the app often reads back what it just wrote),
    // under one lock and from the pool's own keys, before they are spent.
    // Should a record then fail, its DEK is cached under an id no record
    // carries, until the TTL; the DEK was in this process already.
    s.cache.insert_many(
        &req.tenant,
        asked_at,
        deks.iter().map(|d| (d.record_key_id, d.kek_version, d.dek())),
    );
    if let Some(dek) = deks.last() {
        s.note_active(&req.tenant, dek.kek_version);
    }
    let mut ids = Vec::with_capacity(records.len());
    let mut workspace = TextWorkspace::default();
    let max_answer = s.limits.max_body_bytes.saturating_mul(MAX_ENCRYPT_GROWTH);
    for (i, (record, dek)) in records.into_iter().zip(deks).enumerate() {
        ids.push(dek.record_key_id);
        workspace
            .encrypt(record, &req.tenant, &schema, &keys, dek, answer.next_record())
            .map_err(|e| of_record(single, i, e.into()))?;
        if answer.out.len() > max_answer {
            return Err(ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                "answer_too_large",
                format!(
                    "the encrypted records would exceed {max_answer} bytes; send fewer or \
                     smaller records per request"
                ),
            ));
        }
    }
    answer.end_records();
    s.reporter.record(vec![AccessEvent {
        tenant: req.tenant.clone(),
        kek_version: None,
        access: Access::Encrypt { schema: schema.name.clone() },
        record_key_ids: ids,
        request_id: id,
    }]);
    Ok(answer.finish())
}

/// Decrypts the fields this sidecar's identity may see.
#[utoipa::path(
    post,
    path = "/v1/decrypt",
    tag = "records",
    params(("x-request-id" = Option<String>, Header, description = "The call's id: 32 hex digits or a UUID (the SDK sends 32 hex digits, the same on every retry); without it the sidecar makes one. Echoed in the answer and recorded in the field-level audit events the request makes (`fields.request_ids`)")),
    request_body = DecryptRequest<'_>,
    responses(
        (status = 200, description = "The record(s) with what the policy allows, and a report", body = DecryptResponse, headers(("x-request-id" = String, description = "The request's id"))),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input (`invalid_request_id`: a bad `x-request-id`), 401 no token, 403 not granted, 404 unknown tenant or schema, 408 body too slow, 409/410 key disabled or destroyed, 413 too large, 422 cannot decrypt, 429 rate limited, 503 key service or audit unavailable (`key_service_unavailable`, `audit_unavailable`) or the request past its deadline (`timeout`, with `Retry-After`)", body = crate::openapi::ErrorBody, headers(("x-request-id" = String, description = "The request's id (none on answers given before the request reached the API: 400 `invalid_request_id`, 408, 413, 429, an unknown path)")))
    ),
)]
pub(super) async fn decrypt(
    state: Shared,
    Extension(id): Id,
    body: ApiBody,
) -> Result<SecretJsonText, ApiError> {
    super::decrypt::decrypt(state, id, body).await
}

/// `error`, about record `i` of the request: named (`records[i]: …`)
/// when the request holds several, so that the one at fault can be found.
pub(super) fn of_record(single: bool, i: usize, error: ApiError) -> ApiError {
    if single { error } else { error.after(&format!("records[{i}]")) }
}

/// What the key service needs to unwrap or rewrap a record's DEK.
pub(super) fn dek_request(record: &EncryptedText<'_>) -> DekRequest {
    let header = record.header();
    DekRequest {
        record_key_id: *header.record_key_id(),
        kek_version: header.kek_version(),
        wrapped: *header.wrapped_dek(),
    }
}

/// The DEK requests of the records `wanted` keeps (by index), by tenant,
/// each beside its record's index, so that one call per tenant can serve
/// them and no result can shift onto another record. A tenant's id is
/// copied once per request, not once per record.
pub(super) fn dek_requests_by_tenant(
    parsed: &[EncryptedText<'_>],
    mut wanted: impl FnMut(usize) -> bool,
) -> BTreeMap<TenantId, Vec<(usize, DekRequest)>> {
    let mut by_tenant: BTreeMap<TenantId, Vec<(usize, DekRequest)>> = BTreeMap::new();
    for (i, record) in parsed.iter().enumerate().filter(|(i, _)| wanted(*i)) {
        let item = (i, dek_request(record));
        let tenant = record.header().tenant();
        match by_tenant.get_mut(tenant) {
            Some(items) => items.push(item),
            None => {
                by_tenant.insert(tenant.clone(), vec![item]);
            }
        }
    }
    by_tenant
}

/// Moves records' key parts to the active KEK version.
#[utoipa::path(
    post,
    path = "/v1/rewrap",
    tag = "records",
    params(("x-request-id" = Option<String>, Header, description = "The call's id: 32 hex digits or a UUID (the SDK sends 32 hex digits, the same on every retry); without it the sidecar makes one. Echoed in the answer and recorded in the field-level audit events the request makes (`fields.request_ids`)")),
    request_body = RewrapRequest<'_>,
    responses(
        (status = 200, description = "The records with their key part under the active KEK version", body = RewrapResponse, headers(("x-request-id" = String, description = "The request's id"))),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input (`invalid_request_id`: a bad `x-request-id`), 401 no token, 403 not granted, 404 unknown tenant or schema, 408 body too slow, 409/410 key disabled or destroyed, 413 too large, 422 cannot decrypt, 429 rate limited, 503 key service or audit unavailable (`key_service_unavailable`, `audit_unavailable`) or the request past its deadline (`timeout`, with `Retry-After`)", body = crate::openapi::ErrorBody, headers(("x-request-id" = String, description = "The request's id (none on answers given before the request reached the API: 400 `invalid_request_id`, 408, 413, 429, an unknown path)")))
    ),
)]
pub(super) async fn rewrap(State(s): Shared, body: ApiBody) -> Result<SecretJsonText, ApiError> {
    let req: RewrapRequest<'_> = body.parse()?;
    let (records, single) = s.records(req.record, req.records, &body)?;
    let parsed: Vec<EncryptedText<'_>> = records
        .into_iter()
        .enumerate()
        .map(|(i, record)| EncryptedText::parse(record).map_err(|e| of_record(single, i, e.into())))
        .collect::<Result<_, _>>()?;
    let mut new_parts: Vec<Option<(u32, kms_core::WrappedDek)>> = vec![None; parsed.len()];
    for (tenant, wanted) in dek_requests_by_tenant(&parsed, |_| true) {
        authorize(&s, &tenant, &[Role::Encryptor]).await?;
        let items = wanted.iter().map(|(_, item)| *item).collect();
        let results =
            s.rewraps.call(&tenant, items, None).await.map_err(|e| s.tenant_error(&tenant, e))?;
        for ((i, _), result) in wanted.iter().zip(results.results) {
            let moved =
                result.map_err(|code| of_record(single, *i, s.dek_error(&tenant, &code)))?;
            s.note_active(&tenant, moved.kek_version);
            if let Some(slot) = new_parts.get_mut(*i) {
                *slot = Some((moved.kek_version, moved.wrapped));
            }
        }
    }
    let mut changed = 0u64;
    let mut answer = Answer::new(single, body.len());
    for (record, part) in parsed.into_iter().zip(new_parts) {
        let header = record.header();
        let (version, wrapped) = part.unwrap_or((header.kek_version(), *header.wrapped_dek()));
        if version != header.kek_version() {
            changed += 1;
        }
        record.write_rewrapped(version, wrapped, answer.next_record())?;
    }
    let out = answer.end_records();
    out.extend_from_slice(b",\"rewrapped\":");
    out.extend_from_slice(changed.to_string().as_bytes());
    Ok(answer.finish())
}

/// The blind-index or deterministic token of a value.
#[utoipa::path(
    post,
    path = "/v1/index",
    tag = "records",
    params(("x-request-id" = Option<String>, Header, description = "The call's id: 32 hex digits or a UUID (the SDK sends 32 hex digits, the same on every retry); without it the sidecar makes one. Echoed in the answer and recorded in the field-level audit events the request makes (`fields.request_ids`)")),
    request_body = IndexRequest,
    responses(
        (status = 200, description = "The token to search for", body = IndexResponse, headers(("x-request-id" = String, description = "The request's id"))),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input (`invalid_request_id`: a bad `x-request-id`), 401 no token, 403 not granted (without `encryptor` on the tenant: also when the policy withholds the field's class for the purpose), 404 unknown tenant or schema, 408 body too slow, 409/410 key disabled or destroyed, 413 too large, 422 cannot decrypt, 429 rate limited, 503 key service or audit unavailable (`key_service_unavailable`, `audit_unavailable`) or the request past its deadline (`timeout`, with `Retry-After`)", body = crate::openapi::ErrorBody, headers(("x-request-id" = String, description = "The request's id (none on answers given before the request reached the API: 400 `invalid_request_id`, 408, 413, 429, an unknown path)")))
    ),
)]
pub(super) async fn index(
    State(s): Shared,
    Extension(id): Id,
    ApiJson(req): ApiJson<IndexRequest>,
) -> Result<Json<Value>, ApiError> {
    let grants = authorize(&s, &req.tenant, &[Role::Encryptor, Role::Decryptor]).await?;
    let schema = s.schema(req.schema.as_str(), req.schema_version)?.clone();
    // A token tests guesses against every stored record. An encryptor can
    // make the same test through /v1/encrypt, so only a caller without
    // that role is held to what it may see of the field.
    if !grants.authorize(&req.tenant, Role::Encryptor) {
        let purpose = req.purpose.as_ref().map(Name::as_str);
        may_search(&grants, &req.tenant, &schema, &req.path, purpose)?;
    }
    s.reporter.check([&req.tenant])?;
    let keys = s
        .keyring
        .schema_keys(&req.tenant, &schema)
        .await
        .map_err(|e| s.tenant_error(&req.tenant, e))?;
    let token = index_token(&schema, &keys, &req.path, req.value.get())?;
    // A token tests a value against every stored record: recorded, never
    // the value itself.
    s.reporter.record(vec![AccessEvent {
        tenant: req.tenant.clone(),
        kek_version: None,
        access: Access::Index { schema: schema.name.clone(), path: req.path.clone() },
        record_key_ids: Vec::new(),
        request_id: id,
    }]);
    Ok(Json(json!({ "token": token })))
}

/// Refuses the token of `path` to a caller whom decrypt would show nothing
/// of that field (for `tenant` and `purpose`). The masked form is enough:
/// a clerk shown `***-**-6789` still needs to find the record of the full
/// number a patient gives.
fn may_search(
    grants: &EffectiveGrants,
    tenant: &TenantId,
    schema: &Schema,
    path: &str,
    purpose: Option<&str>,
) -> Result<(), ApiError> {
    // A path the schema does not protect is refused by `index_token`,
    // with the same answer for every caller.
    let Some(field) = schema.fields.iter().find(|f| f.path.as_str() == path) else {
        return Ok(());
    };
    match super::decrypt::field_outcome(grants, tenant, field, purpose) {
        FieldOutcome::Revealed | FieldOutcome::Masked => Ok(()),
        FieldOutcome::Withheld => Err(ApiError::forbidden(format!(
            "the policy withholds {path} ({}) of tenant {tenant} from this sidecar's identity \
             for this purpose: it may not search by it",
            field.class
        ))),
    }
}

/// A stable pseudonym for a value.
#[utoipa::path(
    post,
    path = "/v1/pseudonym",
    tag = "records",
    params(("x-request-id" = Option<String>, Header, description = "The call's id: 32 hex digits or a UUID (the SDK sends 32 hex digits, the same on every retry); without it the sidecar makes one. Echoed in the answer and recorded in the field-level audit events the request makes (`fields.request_ids`)")),
    request_body = PseudonymRequest,
    responses(
        (status = 200, description = "The pseudonym", body = PseudonymResponse, headers(("x-request-id" = String, description = "The request's id"))),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input (`invalid_request_id`: a bad `x-request-id`), 401 no token, 403 not granted (`encryptor` on the tenant is needed), 404 unknown tenant, 408 body too slow, 409/410 key disabled or destroyed, 413 too large, 429 rate limited, 503 key service or audit unavailable (`key_service_unavailable`, `audit_unavailable`) or the request past its deadline (`timeout`, with `Retry-After`)", body = crate::openapi::ErrorBody, headers(("x-request-id" = String, description = "The request's id (none on answers given before the request reached the API: 400 `invalid_request_id`, 408, 413, 429, an unknown path)")))
    ),
)]
pub(super) async fn pseudonymize(
    State(s): Shared,
    Extension(id): Id,
    ApiJson(req): ApiJson<PseudonymRequest>,
) -> Result<Json<Value>, ApiError> {
    // A pseudonym tests a guessed value against every record that carries
    // one, and a pseudonym field is shown to exactly the readers it is
    // meant to de-identify (a researcher). So only the writer, who holds
    // the values in clear and could make the same test through
    // /v1/encrypt, may make one.
    let grants = authorize(&s, &req.tenant, &[Role::Encryptor, Role::Decryptor]).await?;
    if !grants.authorize(&req.tenant, Role::Encryptor) {
        return Err(ApiError::forbidden(format!(
            "pseudonyms of tenant {tenant} are made only for an identity with encryptor on it: \
             a pseudonym tests a guessed value against every record that carries one",
            tenant = req.tenant
        )));
    }
    s.reporter.check([&req.tenant])?;
    let key = s
        .keyring
        .namespace_key(&req.tenant, &req.namespace)
        .await
        .map_err(|e| s.tenant_error(&req.tenant, e))?;
    let answer = json!({ "pseudonym": pseudonym(&key, req.value.get()) });
    s.reporter.record(vec![AccessEvent {
        tenant: req.tenant.clone(),
        kek_version: None,
        access: Access::Pseudonym { namespace: req.namespace.clone() },
        record_key_ids: Vec::new(),
        request_id: id,
    }]);
    Ok(Json(answer))
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use kms_core::record::{Disclosure, SchemaKeys};
    use kms_core::schema::{FieldSpec, SchemaSet};
    use kms_core::{IssuedDek, Key256, RecordKeyId, WrappedDek};
    use serde_json::value::RawValue;

    use super::*;
    use crate::policy::FieldAccess;

    const LOOKUP: &str = "spiffe://test/lookup";

    /// The grants of a decryptor-only identity on `onc`: `grant` is the
    /// rest of its one grant (classes, masked, purposes).
    fn decryptor(grant: &str) -> EffectiveGrants {
        serde_json::from_value(json!({
            "identity": LOOKUP,
            "grants": [serde_json::from_str::<Value>(&format!(
                r#"{{"identity":"{LOOKUP}","tenants":["onc"],"roles":["decryptor"],{grant}}}"#
            ))
            .unwrap()],
        }))
        .unwrap()
    }

    fn patient() -> Arc<Schema> {
        let set = SchemaSet::from_toml(crate::up::PATIENT_SCHEMA, "patient.toml").unwrap();
        set.latest("patient").unwrap().clone()
    }

    /// `/email` (`pii.contact`, blind index, masked form `email`) and
    /// `/mrn` (`phi.identifier`, deterministic, no mask) are the patient
    /// schema's searchable fields.
    fn search(grants: &EffectiveGrants, path: &str, purpose: Option<&str>) -> Result<(), ApiError> {
        may_search(grants, &TenantId::new("onc").unwrap(), &patient(), path, purpose)
    }

    fn assert_withheld(result: Result<(), ApiError>, path: &str) {
        let error = result.expect_err(path);
        assert_eq!((error.status(), error.code()), (StatusCode::FORBIDDEN, "forbidden"));
        // The message names the path (it holds no value to name).
        let debug = format!("{error:?}");
        assert!(debug.contains(&format!("withholds {path} (")), "{debug}");
    }

    #[test]
    fn a_decryptor_may_search_only_by_a_field_it_sees_for_the_purpose() {
        let clear = decryptor(r#""classes":["pii.contact"],"purposes":["treatment"]"#);
        search(&clear, "/email", Some("treatment")).unwrap();
        assert_withheld(search(&clear, "/mrn", Some("treatment")), "/mrn");
        // The class is granted for one purpose: not for another, nor none.
        assert_withheld(search(&clear, "/email", Some("research")), "/email");
        assert_withheld(search(&clear, "/email", None), "/email");
        // Masked is enough; but a field masked by the policy and given no
        // mask by the schema is withheld on decrypt, and here too.
        let masked = decryptor(r#""masked":["pii.contact","phi.identifier"],"purposes":["*"]"#);
        search(&masked, "/email", None).unwrap();
        assert_withheld(search(&masked, "/mrn", None), "/mrn");
        // A path the schema does not protect is left to `index_token`,
        // which refuses it for everyone alike.
        search(&clear, "/name", Some("treatment")).unwrap();
    }

    /// Decrypt's own decision, field by field: what `field_outcome` says
    /// (and so what `may_search` allows) is what a record decrypted under
    /// the same grants shows of each field, the mask rule included.
    #[test]
    fn search_follows_what_decrypt_shows_of_every_field() {
        let onc = TenantId::new("onc").unwrap();
        let schema = patient();
        let keys = SchemaKeys::derive(&Key256::from_array(&mut [7; 32]), &onc, &schema);
        let wrapped = WrappedDek::from_slice(&[3; 60]).unwrap();
        let dek = IssuedDek::new(
            RecordKeyId::from_bytes([5; 16]),
            1,
            wrapped,
            Key256::from_array(&mut [8; 32]),
        );
        let record = RawValue::from_string(
            json!({"ssn": "123-45-6789", "mrn": "MRN-1", "email": "a@example.org",
                   "diagnosis": "C50.9", "patient_id": "P-1", "allergies": ["latex"]})
            .to_string(),
        )
        .unwrap();
        let mut workspace = TextWorkspace::default();
        let mut encrypted = SecretBuf::default();
        workspace.encrypt(&record, &onc, &schema, &keys, dek, &mut encrypted).unwrap();
        let encrypted =
            RawValue::from_string(String::from_utf8(encrypted.as_slice().to_vec()).unwrap())
                .unwrap();

        let grants = decryptor(
            r#""classes":["phi.clinical"],"masked":["phi.identifier","pii.contact"],"purposes":["treatment"]"#,
        );
        for purpose in [Some("treatment"), Some("billing"), None] {
            // As decrypt does: the class's disclosure, handed to kms-core.
            let disclose = |field: &FieldSpec| match grants.disclosure(&onc, &field.class, purpose)
            {
                FieldAccess::Reveal => Disclosure::Reveal,
                FieldAccess::Mask => Disclosure::Mask,
                FieldAccess::Withhold => Disclosure::Withhold,
            };
            let mut plain = SecretBuf::default();
            let text = EncryptedText::parse(&encrypted).unwrap();
            let dek = Key256::from_array(&mut [8; 32]);
            let reports =
                workspace.decrypt(text, &dek, &schema, &keys, &disclose, &mut plain).unwrap();
            let mut seen = Vec::new();
            for report in reports {
                // The patient schema's pointers hold no escapes.
                let tokens: Vec<String> =
                    report.pointer.split('/').skip(1).map(str::to_owned).collect();
                let field = schema.field_for(&tokens).unwrap();
                let predicted = super::super::decrypt::field_outcome(&grants, &onc, field, purpose);
                assert_eq!(predicted, report.outcome, "{} {purpose:?}", report.pointer);
                let searchable = may_search(&grants, &onc, &schema, field.path.as_str(), purpose);
                assert_eq!(searchable.is_ok(), report.outcome != FieldOutcome::Withheld);
                seen.push(report.outcome);
            }
            // Each outcome occurs, the mask rule's withholding among them.
            if purpose == Some("treatment") {
                for outcome in
                    [FieldOutcome::Revealed, FieldOutcome::Masked, FieldOutcome::Withheld]
                {
                    assert!(seen.contains(&outcome), "{outcome:?} in {seen:?}");
                }
            }
        }
    }
}
