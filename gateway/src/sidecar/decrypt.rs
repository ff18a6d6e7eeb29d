//! `POST /v1/decrypt`: DEKs from the cache or one unwrap call per tenant,
//! need-to-know per field, a report per record, and field-level audit
//! events.
//!
//! Per request, each (tenant, schema) pair's disclosures are resolved once
//! (not once per field of every record), and records that share tenant,
//! KEK version, schema, field outcomes and cache hit share one
//! `record.decrypt` event listing all their record key ids — the same
//! facts as one event per record, at a fraction of the audit volume. The
//! report is written as text as records are decrypted ([`super::report`]),
//! each kind of record's `fields` list once.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use kms_core::record::{
    Disclosure, EncryptedText, FieldOutcome, FieldReport, SchemaKeys, TextWorkspace,
};
use kms_core::schema::{FieldSpec, Schema};
use kms_core::{DekRequest, KekVersion, Key256, Name, RecordKeyId, TenantId};

use super::api::DecryptRequest;
use super::handlers::{Answer, dek_requests_by_tenant, of_record};
use super::report::{FieldEntry, FieldsKey, Report, ReportContext};
use super::reporter::{Access, AccessEvent};
use super::request::RequestId;
use super::state::{SidecarState, ks_error};
use crate::error::ApiError;
use crate::extract::ApiBody;
use crate::policy::{EffectiveGrants, FieldAccess, Role};
use crate::wire::SecretJsonText;

/// A schema, its derived keys, and what this caller may see of each of
/// its field classes, for one tenant (resolved once per request).
struct Resolved {
    tenant: TenantId,
    schema: Arc<Schema>,
    keys: Arc<SchemaKeys>,
    access: Vec<(String, FieldAccess)>,
    active: Option<KekVersion>,
    report: ReportContext,
}

impl Resolved {
    fn access(&self, class: &str) -> FieldAccess {
        self.access
            .iter()
            .find(|(c, _)| c == class)
            .map_or(FieldAccess::Withhold, |(_, access)| *access)
    }
}

/// Records decrypted alike, reported as one audit event.
struct EventGroup {
    tenant: TenantId,
    kek_version: KekVersion,
    schema: Name,
    cached: bool,
    outcomes: Vec<(String, &'static str)>,
    ids: Vec<RecordKeyId>,
}

/// The answer: `record` or `records`, then `report`. Plaintext leaves in
/// it: one buffer, sized from the request (records shrink as their
/// ciphertexts open, and each gains a report of about that size), wiped
/// once sent. The report, which holds no values, is written beside it as
/// the records are decrypted and copied in at the end.
pub(super) async fn decrypt(
    State(s): State<Arc<SidecarState>>,
    request_id: RequestId,
    body: ApiBody,
) -> Result<SecretJsonText, ApiError> {
    let req: DecryptRequest<'_> = body.parse()?;
    let (records, single) = s.records(req.record, req.records, &body)?;
    let grants = s.keyring.grants().await.map_err(ks_error)?;
    let parsed: Vec<EncryptedText<'_>> = records
        .into_iter()
        .enumerate()
        .map(|(i, record)| EncryptedText::parse(record).map_err(|e| of_record(single, i, e.into())))
        .collect::<Result<_, _>>()?;
    for record in &parsed {
        let tenant = record.header().tenant();
        if !grants.authorize(tenant, Role::Decryptor) {
            return Err(ApiError::forbidden(format!(
                "this sidecar's identity may not decrypt for tenant {tenant}"
            )));
        }
    }
    s.reporter.check(parsed.iter().map(|record| record.header().tenant()))?;
    let deks = deks(&s, &parsed, req.purpose.as_ref(), single).await?;

    let purpose = req.purpose.as_ref().map(|p| p.as_str());
    let mut answer = Answer::new(single, body.len());
    let mut workspace = TextWorkspace::default();
    let mut report = Report::with_capacity(parsed.len());
    let mut groups: Vec<EventGroup> = Vec::new();
    let mut resolved: Vec<Resolved> = Vec::new();
    for (i, (record, dek)) in parsed.into_iter().zip(deks).enumerate() {
        let (dek, cached) = dek.ok_or_else(crate::error::cannot_decrypt)?;
        let header = record.header();
        let (version, id) = (header.kek_version(), *header.record_key_id());
        let at = match resolved.iter().position(|r| {
            &r.tenant == header.tenant()
                && &r.schema.name == header.schema()
                && r.schema.version == header.schema_version()
        }) {
            Some(at) => at,
            None => {
                let entry = resolve(&s, &grants, header.tenant(), header, purpose).await?;
                resolved.push(entry);
                resolved.len() - 1
            }
        };
        let r = resolved.get(at).ok_or_else(crate::error::cannot_decrypt)?;
        let disclose = |field: &FieldSpec| match r.access(&field.class) {
            FieldAccess::Reveal => Disclosure::Reveal,
            FieldAccess::Mask => Disclosure::Mask,
            FieldAccess::Withhold => Disclosure::Withhold,
        };
        let fields = workspace
            .decrypt(record, &dek, &r.schema, &r.keys, &disclose, answer.next_record())
            .map_err(|e| of_record(single, i, e.into()))?;
        let same_outcomes = |g: &EventGroup| {
            g.outcomes.len() == fields.len()
                && g.outcomes
                    .iter()
                    .zip(fields)
                    .all(|((p, o), f)| *p == f.pointer && *o == outcome(f.outcome))
        };
        let group = match groups.iter().position(|g| {
            g.cached == cached
                && g.kek_version == version
                && g.tenant == r.tenant
                && g.schema == r.schema.name
                && same_outcomes(g)
        }) {
            Some(group) => group,
            None => {
                groups.push(EventGroup {
                    tenant: r.tenant.clone(),
                    kek_version: version,
                    schema: r.schema.name.clone(),
                    cached,
                    outcomes: fields
                        .iter()
                        .map(|f| (f.pointer.clone(), outcome(f.outcome)))
                        .collect(),
                    ids: Vec::new(),
                });
                groups.len() - 1
            }
        };
        if let Some(g) = groups.get_mut(group) {
            g.ids.push(id);
        }
        // The event group fixes every field's pointer and outcome, and the
        // resolved schema version each one's class (a schema's paths never
        // overlap, so a pointer names one field) and the access that gives
        // its reason: together they fix the `fields` list.
        let listed = report.fields(FieldsKey { group, resolved: at }, || {
            fields
                .iter()
                .map(|f| FieldEntry {
                    outcome: outcome(f.outcome),
                    class: &f.class,
                    pointer: &f.pointer,
                    reason: reason(f, r.access(&f.class)),
                })
                .collect()
        });
        let stale = r.active.is_some_and(|active| active != version);
        report.record(listed, version, &id, stale, &r.report);
    }
    s.reporter.record(
        groups
            .into_iter()
            .map(|g| AccessEvent {
                tenant: g.tenant,
                kek_version: Some(g.kek_version),
                access: Access::Decrypt {
                    schema: g.schema,
                    purpose: req.purpose.clone(),
                    cache_hit: g.cached,
                    fields: g.outcomes,
                },
                record_key_ids: g.ids,
                request_id,
            })
            .collect(),
    );
    let out = answer.end_records();
    out.extend_from_slice(b",\"report\":");
    out.extend_from_slice(&report.finish());
    Ok(answer.finish())
}

/// Each record's DEK and whether it came from the cache: cache first, then
/// the misses of each tenant in one unwrap (a call this request may share
/// with others: [`super::shared_calls`]); the records that repeat the
/// first (id, version, wrapped DEK) seen for an id are asked for once.
async fn deks(
    s: &SidecarState,
    parsed: &[EncryptedText<'_>],
    purpose: Option<&Name>,
    single: bool,
) -> Result<Vec<Option<(Arc<Key256>, bool)>>, ApiError> {
    let mut deks: Vec<Option<(Arc<Key256>, bool)>> = parsed
        .iter()
        .map(|r| {
            let h = r.header();
            s.cache.get(h.record_key_id(), h.tenant(), h.kek_version()).map(|k| (k, true))
        })
        .collect();
    let misses = dek_requests_by_tenant(parsed, |i| deks.get(i).is_some_and(Option::is_none));
    for (tenant, missed) in misses {
        let (items, which) = distinct(missed.iter().map(|(_, item)| item));
        let asked_at = std::time::Instant::now();
        let unwrapped = s
            .unwraps
            .call(&tenant, items, purpose)
            .await
            .map_err(|e| s.tenant_error(&tenant, e))?;
        s.note_active(&tenant, unwrapped.common);
        // A refused key fails the request, naming the first record it is.
        let refused = |at: usize, code: String| {
            let error = s.dek_error(&tenant, &code);
            match missed.iter().zip(&which).find(|(_, w)| **w == at) {
                Some(((i, _), _)) => of_record(single, *i, error),
                None => error,
            }
        };
        let keys = unwrapped
            .results
            .into_iter()
            .enumerate()
            .map(|(at, result)| result.map(Arc::new).map_err(|code| refused(at, code)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut fresh = Vec::with_capacity(keys.len());
        for ((i, item), &at) in missed.iter().zip(&which) {
            let Some(key) = keys.get(at) else { continue };
            // Distinct requests are numbered in order of first sight.
            if at == fresh.len() {
                fresh.push((item.record_key_id, item.kek_version, key.clone()));
            }
            if let Some(slot) = deks.get_mut(*i) {
                *slot = Some((key.clone(), false));
            }
        }
        s.cache.insert_many(&tenant, asked_at, fresh);
    }
    Ok(deks)
}

/// The distinct DEK requests among `items`, and the index among them of
/// each of `items`. Alike means the same id, version and wrapped DEK: a
/// record carrying a known id with another wrapped part (rewrapped, or
/// tampered with) is still the key service's to unwrap or refuse.
fn distinct<'a>(
    items: impl ExactSizeIterator<Item = &'a DekRequest>,
) -> (Vec<DekRequest>, Vec<usize>) {
    let n = items.len();
    let mut unique: Vec<DekRequest> = Vec::with_capacity(n);
    let mut which = Vec::with_capacity(n);
    // The ids come from the app's records: std's keyed hasher, not foldhash.
    let mut first: HashMap<RecordKeyId, usize> = HashMap::with_capacity(n);
    for item in items {
        let alike = |u: &DekRequest| {
            u.kek_version == item.kek_version && u.wrapped.as_bytes() == item.wrapped.as_bytes()
        };
        let at = match first.get(&item.record_key_id) {
            Some(&at) if unique.get(at).is_some_and(alike) => at,
            _ => {
                first.entry(item.record_key_id).or_insert(unique.len());
                unique.push(*item);
                unique.len() - 1
            }
        };
        which.push(at);
    }
    (unique, which)
}

/// Schema, derived keys and the caller's access to each field class.
async fn resolve(
    s: &SidecarState,
    grants: &EffectiveGrants,
    tenant: &TenantId,
    header: &kms_core::record::RecordHeader,
    purpose: Option<&str>,
) -> Result<Resolved, ApiError> {
    let schema = s.schema(header.schema().as_str(), Some(header.schema_version()))?.clone();
    let keys =
        s.keyring.schema_keys(tenant, &schema).await.map_err(|e| s.tenant_error(tenant, e))?;
    let mut access: Vec<(String, FieldAccess)> = Vec::new();
    for field in &schema.fields {
        if !access.iter().any(|(c, _)| *c == field.class) {
            access.push((field.class.clone(), grants.disclosure(tenant, &field.class, purpose)));
        }
    }
    let report = ReportContext::new(tenant, &schema.name, schema.version);
    Ok(Resolved { tenant: tenant.clone(), schema, keys, access, active: s.active(tenant), report })
}

/// What decrypt shows of `field` in a record of `tenant` to the holder of
/// `grants`, decrypting for `purpose`: its class's disclosure, where the
/// masked form needs a mask in the schema (kms-core withholds a field
/// without one), so `/v1/index` decides as decrypt does.
pub(super) fn field_outcome(
    grants: &EffectiveGrants,
    tenant: &TenantId,
    field: &FieldSpec,
    purpose: Option<&str>,
) -> FieldOutcome {
    match grants.disclosure(tenant, &field.class, purpose) {
        FieldAccess::Reveal => FieldOutcome::Revealed,
        FieldAccess::Mask if field.mask.is_some() => FieldOutcome::Masked,
        FieldAccess::Mask | FieldAccess::Withhold => FieldOutcome::Withheld,
    }
}

/// Why a field was not revealed (for the caller; never a value).
fn reason(field: &FieldReport, access: FieldAccess) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kms_core::record::TextWorkspace;
    use kms_core::schema::SchemaSet;
    use kms_core::{IssuedDek, SecretBuf, WRAPPED_DEK_LEN, WrappedDek};
    use serde_json::json;
    use serde_json::value::RawValue;

    use super::*;
    use crate::sidecar::cache::DekCache;
    use crate::sidecar::config::{PoolConfig, ReportConfig, SidecarLimits};
    use crate::sidecar::keyring::Keyring;
    use crate::sidecar::ks_client::KeyServiceClient;
    use crate::sidecar::pool::DekPool;
    use crate::sidecar::pool::tests::fake_key_service;
    use crate::sidecar::reporter::Reporter;
    use crate::sidecar::shared_calls::{Rewraps, SharedCalls, Unwraps};
    use crate::sidecar::state::ActiveVersions;

    fn patient() -> Arc<Schema> {
        let set = SchemaSet::from_toml(crate::up::PATIENT_SCHEMA, "patient.toml").unwrap();
        set.latest("patient").unwrap().clone()
    }

    fn state(client: Arc<KeyServiceClient>) -> SidecarState {
        let ttl = Duration::from_secs(60);
        let wait = Duration::from_secs(10);
        let cache = Arc::new(DekCache::new(ttl, 100));
        let unwraps = Unwraps { client: client.clone(), cache: cache.clone() };
        SidecarState {
            schemas: SchemaSet::from_toml(crate::up::PATIENT_SCHEMA, "patient.toml").unwrap(),
            unwraps: SharedCalls::new(unwraps, 1_000, wait),
            rewraps: SharedCalls::new(Rewraps(client.clone()), 1_000, wait),
            pool: DekPool::new(client.clone(), PoolConfig::default(), ttl),
            cache,
            keyring: Keyring::new(client.clone(), ttl),
            reporter: Reporter::new(client, ReportConfig::default(), "spiffe://test/app".into()),
            limits: SidecarLimits::default(),
            token: None,
            metrics: crate::metrics::Metrics::default(),
            active_versions: ActiveVersions::default(),
        }
    }

    /// A patient record of tenant `onc` encrypted under a DEK of id
    /// `[n; 16]` (and bytes `[n; 32]`) wrapped as `[wrapped; 60]`.
    fn record(n: u8, wrapped: u8) -> Box<RawValue> {
        let onc = TenantId::new("onc").unwrap();
        let schema = patient();
        let keys = SchemaKeys::derive(&Key256::from_array(&mut [7; 32]), &onc, &schema);
        let dek = IssuedDek::new(
            RecordKeyId::from_bytes([n; 16]),
            1,
            WrappedDek::from_slice(&[wrapped; WRAPPED_DEK_LEN]).unwrap(),
            Key256::from_array(&mut [n; 32]),
        );
        let plain = RawValue::from_string(
            json!({"ssn": "123-45-6789", "mrn": "MRN-1", "email": "a@example.org",
                   "diagnosis": "C50.9", "patient_id": "P-1", "allergies": ["latex"]})
            .to_string(),
        )
        .unwrap();
        let mut out = SecretBuf::default();
        TextWorkspace::default().encrypt(&plain, &onc, &schema, &keys, dek, &mut out).unwrap();
        RawValue::from_string(String::from_utf8(out.as_slice().to_vec()).unwrap()).unwrap()
    }

    /// A batch repeating records asks the key service for each DEK once,
    /// and gives it to every record that carries it.
    #[tokio::test]
    async fn a_record_repeated_in_a_batch_is_unwrapped_once() {
        let dir = tempfile::tempdir().unwrap();
        let (client, fake) = fake_key_service(dir.path()).await;
        let s = state(client);
        let (a, b) = (record(5, 1), record(6, 1));
        let batch = [&a, &a, &b, &a, &b];
        let parsed: Vec<EncryptedText<'_>> =
            batch.iter().map(|r| EncryptedText::parse(r).unwrap()).collect();
        let deks = deks(&s, &parsed, None, false).await.unwrap();
        assert_eq!(fake.unwrap_items.load(std::sync::atomic::Ordering::Relaxed), 2);
        for (dek, n) in deks.iter().zip([5, 5, 6, 5, 6]) {
            let (key, cached) = dek.as_ref().expect("every record has its DEK");
            assert_eq!((key.expose_secret(), *cached), (&[n; 32], false));
        }
        assert_eq!(s.cache.stats().2, 2);
    }

    /// Records alike in id but not in version or wrapped part are asked
    /// for apart: the key service, not this sidecar, vouches for each.
    #[test]
    fn only_identical_dek_requests_are_merged() {
        let item = |id: u8, version: u32, wrapped: u8| DekRequest {
            record_key_id: RecordKeyId::from_bytes([id; 16]),
            kek_version: version,
            wrapped: WrappedDek::from_slice(&[wrapped; WRAPPED_DEK_LEN]).unwrap(),
        };
        let items = [
            item(1, 1, 1),
            item(1, 1, 1),
            item(1, 2, 1),
            item(1, 1, 2),
            item(2, 1, 1),
            item(1, 1, 1),
        ];
        let (unique, which) = distinct(items.iter());
        assert_eq!(unique.len(), 4);
        assert_eq!(which, [0, 0, 1, 2, 3, 0]);
    }
}
