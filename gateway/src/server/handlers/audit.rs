//! Audit: sidecar event ingest, export as JSON lines, chain verification,
//! and the caller's own policy.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use axum::{Extension, Json};
use http_body_util::channel::Channel;
use kms_core::audit::{Anchor, AuditEvent, AuditSigner, BreakReason, Outcome, verify_stored_chain};
use kms_core::store::{KeyStore, StoreError};
use kms_core::{HierarchyError, RootKeyError};
use serde_json::{Value, json};

use super::ApiJson;
use crate::error::ApiError;
use crate::extract::ApiQuery;
use crate::policy::Role;
use crate::server::api::{
    AuditHead, AuditHeads, AuditQuery, Recorded, ReportedEvents, VerifyRequest,
};
use crate::server::{AppState, Caller};

/// Verification reads the chain this many rows at a time.
const VERIFY_PAGE: u32 = 5_000;

/// `POST /v1/audit/events`: field-level access events reported by a
/// sidecar. The reporter must serve the tenant (encryptor or decryptor).
#[utoipa::path(
    post,
    path = "/v1/audit/events",
    tag = "audit",
    request_body = ReportedEvents,
    responses(
        (status = 200, description = "The events are in the audit chain", body = Recorded),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn ingest(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<ReportedEvents>,
) -> Result<Json<Recorded>, ApiError> {
    let reporter = state.identity(&caller)?.to_owned();
    if body.events.is_empty() || body.events.len() > state.limits.max_batch {
        return Err(ApiError::bad_request(
            "batch_too_large",
            format!("send 1 to {} events at a time", state.limits.max_batch),
        ));
    }
    let mut events = Vec::with_capacity(body.events.len());
    for reported in body.events {
        state
            .authorize(
                &caller,
                &reported.tenant,
                &[Role::Encryptor, Role::Decryptor],
                "report audit events",
            )
            .await?;
        check_actor(&reported.actor)?;
        let outcome = reported.outcome.parse::<Outcome>().map_err(|_| {
            ApiError::bad_request(
                "invalid_request",
                format!("unknown outcome {:?}", reported.outcome),
            )
        })?;
        // A sidecar's clock may run ahead; an event from the future would
        // sort after events written later.
        let ts_ms = reported.ts_ms.min(crate::audit_log::now_ms());
        let mut event = AuditEvent::new(ts_ms, reported.actor, reported.action.as_str(), outcome)
            .with_tenant(reported.tenant)
            .with_record_key_ids(reported.record_key_ids)
            .with_detail("reported_by", reporter.clone())
            .with_detail("fields", Value::Object(reported.fields));
        if let Some(v) = reported.kek_version {
            event = event.with_kek_version(v);
        }
        if let Some(p) = reported.purpose {
            event = event.with_purpose(p.as_str());
        }
        events.push(event);
    }
    let count = events.len();
    state.audit.record(events).await?;
    Ok(Json(Recorded { recorded: count }))
}

/// See [`crate::wire::is_reportable_actor`].
fn check_actor(actor: &str) -> Result<(), ApiError> {
    if !crate::wire::is_reportable_actor(actor) {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!(
                "actor must be 1 to {} bytes with no control characters",
                crate::wire::MAX_ACTOR_LEN
            ),
        ));
    }
    Ok(())
}

/// `GET /v1/audit`: the audit events as JSON lines (auditors with a grant
/// on every tenant).
#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "audit",
    params(AuditQuery),
    responses(
        (status = 200, description = "Audit events, one JSON object per line", content_type = "application/x-ndjson", body = String),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn export(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<Response, ApiError> {
    state.authorize_global(&caller, &[Role::Auditor], "export the audit log").await?;
    let store = state.hierarchy.store();
    let mut instances = match (&query.instance, &query.after_instance) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "give instance (one chain) or after_instance (resuming all of them), not both",
            ));
        }
        (Some(i), None) => vec![i.clone()],
        (None, _) => store.audit_instances().await.map_err(|e| crate::error::store_error(&e))?,
    };
    // Byte order, whatever the database's collation, so that a cursor
    // (`after_instance`, `after`) resumes exactly where a page ended.
    instances.sort_unstable();
    if let Some(from) = &query.after_instance {
        instances.retain(|i| i >= from);
    }
    let limit = query.limit.clamp(1, 100_000);
    let mut pages = ExportPages {
        store: store.clone(),
        instances: instances.into_iter(),
        current: None,
        query,
        limit,
        written: 0,
        chunk_bytes: EXPORT_CHUNK_BYTES,
    };
    // The first lines are read before answering, so that a keystore that
    // cannot be read is a 503 rather than a broken stream.
    let first = pages.next_chunk().await.map_err(|e| crate::error::store_error(&e))?;
    let (mut sender, body) = Channel::<Bytes, StoreError>::new(2);
    tokio::spawn(async move {
        let mut chunk = first;
        while let Some(bytes) = chunk {
            if sender.send_data(bytes).await.is_err() {
                return; // the client went away
            }
            chunk = match pages.next_chunk().await {
                Ok(next) => next,
                Err(e) => {
                    // The status is sent: the stream breaks off, so the
                    // client sees a failed export, never a short one.
                    tracing::error!(error = %e, "audit export: the keystore failed mid-stream");
                    sender.abort(e);
                    return;
                }
            };
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::new(body))
        .map_err(|e| crate::error::internal(&e))
}

/// `GET /v1/audit/heads`: each chain's last sequence number and hash, so
/// that an incremental export can record how far it read each chain, rows
/// its filters left out included, and tell a chain rewritten under it
/// (auditors with a grant on every tenant).
#[utoipa::path(
    get,
    path = "/v1/audit/heads",
    tag = "audit",
    responses(
        (status = 200, description = "Each instance's chain and the sequence number and hash of its last event", body = AuditHeads),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn heads(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<AuditHeads>, ApiError> {
    state.authorize_global(&caller, &[Role::Auditor], "export the audit log").await?;
    read_heads(state.hierarchy.store().as_ref())
        .await
        .map(Json)
        .map_err(|e| crate::error::store_error(&e))
}

/// Every chain's head, in byte order as the export goes. Each instance's
/// writer commits its batches one after another, so every event up to a
/// head is stored once the head is.
async fn read_heads(store: &dyn KeyStore) -> Result<AuditHeads, StoreError> {
    let mut instances = store.audit_instances().await?;
    instances.sort_unstable();
    let mut heads = Vec::with_capacity(instances.len());
    for instance in instances {
        let (head_seq, head_hash) = store
            .last_audit_row(&instance)
            .await?
            .map_or((0, String::new()), |row| (row.seq, data_encoding::HEXLOWER.encode(&row.hash)));
        heads.push(AuditHead { instance, head_seq, head_hash });
    }
    Ok(AuditHeads { instances: heads })
}

/// Events read from the keystore at a time for an export, and the most
/// bytes of lines gathered before they are sent. A page of the export (up
/// to 100,000 events, each listing every record key id of its call, some
/// tens of KB for a large batch) is streamed, never held whole.
const EXPORT_ROWS: u32 = 500;
const EXPORT_CHUNK_BYTES: usize = 1 << 20;

/// An export's reading position: the chains left, and the one being read.
struct ExportPages {
    store: Arc<dyn KeyStore>,
    instances: std::vec::IntoIter<String>,
    /// The chain being read and the last sequence number read of it.
    current: Option<(String, i64)>,
    query: AuditQuery,
    limit: u32,
    written: u32,
    /// [`EXPORT_CHUNK_BYTES`], smaller in tests.
    chunk_bytes: usize,
}

impl ExportPages {
    /// The next lines (about `chunk_bytes`), or `None` at the end.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, StoreError> {
        let mut out = String::new();
        while self.written < self.limit && out.len() < self.chunk_bytes {
            let Some((instance, after)) = self.current.take() else {
                let Some(next) = self.instances.next() else { break };
                let after = match &self.query.after_instance {
                    Some(from) if *from != next => 0,
                    _ => self.query.after,
                };
                self.current = Some((next, after));
                continue;
            };
            let asked = (self.limit - self.written).min(EXPORT_ROWS);
            let rows = self.store.audit_rows(&instance, after, asked).await?;
            let Some(last) = rows.last() else { continue }; // this chain is done
            self.current = Some((instance, last.seq));
            for row in &rows {
                if self.query.since_ms.is_some_and(|since| row.ts_ms < since)
                    || self
                        .query
                        .tenant
                        .as_ref()
                        .is_some_and(|t| row.tenant.as_deref() != Some(t.as_str()))
                {
                    continue;
                }
                let line = json!({
                    "instance": row.instance,
                    "seq": row.seq,
                    "ts_ms": row.ts_ms,
                    "actor": row.actor,
                    "action": row.action,
                    "tenant": row.tenant,
                    "kek_version": row.kek_version,
                    "record_key_ids": serde_json::from_str::<Value>(&row.record_key_ids).unwrap_or(Value::Null),
                    "outcome": row.outcome,
                    "detail": serde_json::from_str::<Value>(&row.detail).unwrap_or(Value::Null),
                    "hash": data_encoding::HEXLOWER.encode(&row.hash),
                });
                out.push_str(&line.to_string());
                out.push('\n');
                self.written += 1;
            }
        }
        Ok((!out.is_empty()).then(|| Bytes::from(out)))
    }
}

/// `GET /v1/audit/verify`: verifies every instance's chain and checkpoint
/// signatures. 200 with `ok: false` and the first broken position when
/// verification fails.
#[utoipa::path(
    get,
    path = "/v1/audit/verify",
    tag = "audit",
    responses(
        (status = 200, description = "`{ok: true, instances}` or `{ok: false, instances, first_break: {instance, position, reason}}`", body = crate::server::api::VerifyReport),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn verify(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    state.authorize_global(&caller, &[Role::Auditor], "verify the audit log").await?;
    verify_chains(&state, &BTreeMap::new()).await.map(Json)
}

/// `POST /v1/audit/verify`: verifies as `GET` does, and requires each
/// chain to still pass through the anchors given (taken earlier from a
/// report's `head_seq` and `head_hash`, and kept outside the keystore): a
/// chain cut back or rewritten after its last checkpoint verifies alone,
/// but not through an anchor taken before.
#[utoipa::path(
    post,
    path = "/v1/audit/verify",
    tag = "audit",
    request_body = VerifyRequest,
    responses(
        (status = 200, description = "`{ok: true, instances}` or `{ok: false, instances, first_break: {instance, position, reason}}`; an anchor whose instance has no chain any more breaks at the anchor", body = crate::server::api::VerifyReport),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn verify_anchored(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<VerifyRequest>,
) -> Result<Json<Value>, ApiError> {
    state.authorize_global(&caller, &[Role::Auditor], "verify the audit log").await?;
    let anchors = body.anchors_by_instance()?;
    verify_chains(&state, &anchors).await.map(Json)
}

/// Verifies every stored chain, each through its `anchors`; anchors of an
/// instance with no chain stored break at the first of them.
async fn verify_chains(
    state: &AppState,
    anchors: &BTreeMap<String, Vec<Anchor>>,
) -> Result<Value, ApiError> {
    let store = state.hierarchy.store();
    let instances = store.audit_instances().await.map_err(|e| crate::error::store_error(&e))?;
    // A chain gone whole breaks its anchors before any chain is walked.
    if let Some((instance, anchored)) = anchors.iter().find(|(i, _)| !instances.contains(i)) {
        let first = anchored.iter().map(|a| a.seq).min().unwrap_or(1);
        let reason = BreakReason::AnchorPastEnd;
        let reason = format!("{reason} (no chain is stored for this instance)");
        return Ok(broken(instance, first, &reason, Vec::new()));
    }
    let mut reports = Vec::new();
    for instance in &instances {
        // The public key is taken from the wrapped signing key (only the
        // master key can have made it), not from the stored copy.
        let Some(record) =
            store.audit_signing_key(instance).await.map_err(|e| crate::error::store_error(&e))?
        else {
            return Ok(broken(instance, 0, "no signing key is stored for this instance", reports));
        };
        let root = state.hierarchy.master(record.master).await?;
        let key = match root.unwrap(&record.wrapped, &AuditSigner::wrap_context(instance)).await {
            Ok(key) => key,
            // A provider that does not answer says nothing of the chain.
            Err(e) if !matches!(e, RootKeyError::CannotUnwrap) => {
                return Err(HierarchyError::Root(e).into());
            }
            Err(e) => {
                tracing::error!(error = %e, instance, "cannot unwrap an audit signing key");
                return Ok(broken(
                    instance,
                    0,
                    "the signing key does not unwrap under the master key",
                    reports,
                ));
            }
        };
        let signer = AuditSigner::from_key(&key).map_err(|e| crate::error::internal(&e))?;
        let anchored = anchors.get(instance).map_or(&[][..], Vec::as_slice);
        let verified = verify_stored_chain(
            store.as_ref(),
            instance,
            signer.verifying_key(),
            anchored,
            VERIFY_PAGE,
        )
        .await;
        match verified {
            Ok(report) => reports.push(json!({
                "instance": report.instance,
                "events": report.events,
                "checkpoints": report.checkpoints,
                "head_seq": report.head_seq,
                "head_hash": data_encoding::HEXLOWER.encode(&report.head_hash),
                "last_checkpoint": report.last_checkpoint,
                "anchors": report.anchors,
            })),
            Err(kms_core::audit::VerifyStoredError::Broken(b)) => {
                return Ok(broken(instance, b.position, &b.reason.to_string(), reports));
            }
            Err(kms_core::audit::VerifyStoredError::Store(e)) => {
                return Err(crate::error::store_error(&e));
            }
            Err(e) => return Err(crate::error::internal(&e)),
        }
    }
    Ok(json!({ "ok": true, "instances": reports }))
}

fn broken(instance: &str, position: i64, reason: &str, verified: Vec<Value>) -> Value {
    json!({
        "ok": false,
        "instances": verified,
        "first_break": { "instance": instance, "position": position, "reason": reason },
    })
}

/// `GET /v1/policy/self`: the caller's effective grants.
#[utoipa::path(
    get,
    path = "/v1/policy/self",
    tag = "policy",
    responses(
        (status = 200, description = "The caller's effective grants", body = crate::policy::EffectiveGrants),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn policy_self(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<crate::policy::EffectiveGrants>, ApiError> {
    let identity = state.identity(&caller)?;
    Ok(Json(state.policy.current().effective(identity)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code
mod tests {
    use kms_core::audit::AuditChain;
    use kms_core::store::SqliteStore;

    use super::*;

    /// Every line of `pages`, as (instance, seq).
    async fn read_all(mut pages: ExportPages) -> Vec<(String, i64)> {
        let mut seen = Vec::new();
        let mut chunks = 0;
        while let Some(chunk) = pages.next_chunk().await.unwrap() {
            chunks += 1;
            let text = std::str::from_utf8(&chunk).unwrap();
            assert!(text.ends_with('\n'), "a chunk ends on a whole line");
            for line in text.lines() {
                let event: Value = serde_json::from_str(line).unwrap();
                seen.push((
                    event["instance"].as_str().unwrap().to_owned(),
                    event["seq"].as_i64().unwrap(),
                ));
            }
        }
        // About 250 bytes a line: more than one chunk for more than 500.
        assert!(chunks > 1 || seen.len() < 500, "{chunks} chunks for {}", seen.len());
        seen
    }

    /// Streamed in chunks, an export is what one read would have been:
    /// every event once, in order, across chains and the keystore's read
    /// size, resumed from a cursor, and no more than the limit.
    #[tokio::test]
    async fn an_export_streams_every_event_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn KeyStore> =
            Arc::new(SqliteStore::open(&dir.path().join("k.db")).await.unwrap());
        for (instance, count) in [("ks-a", 1_234), ("ks-b", 10)] {
            let mut chain = AuditChain::new(instance);
            let events = (0..count).map(|i| AuditEvent::new(i, "t", "dek.issue", Outcome::Ok));
            let sealed = chain.seal_all(events);
            store.append_audit_batch(&sealed, None).await.unwrap();
        }
        let pages = |after_instance: Option<&str>, after: i64, limit: u32| ExportPages {
            store: store.clone(),
            instances: vec!["ks-a".to_owned(), "ks-b".to_owned()]
                .into_iter()
                .filter(|i| after_instance.is_none_or(|from| i.as_str() >= from))
                .collect::<Vec<_>>()
                .into_iter(),
            current: None,
            query: AuditQuery {
                instance: None,
                after,
                after_instance: after_instance.map(str::to_owned),
                since_ms: None,
                tenant: None,
                limit,
            },
            limit,
            written: 0,
            chunk_bytes: 64 * 1024,
        };
        // (instance, seq) for each of `a`'s and `b`'s sequence numbers.
        let expected = |a: &[i64], b: &[i64]| {
            let a = a.iter().map(|seq| ("ks-a".to_owned(), *seq));
            a.chain(b.iter().map(|seq| ("ks-b".to_owned(), *seq))).collect::<Vec<_>>()
        };
        let seqs = |range: std::ops::RangeInclusive<i64>| range.collect::<Vec<_>>();
        let (a_all, b_all) = (seqs(1..=1_234), seqs(1..=10));
        assert_eq!(read_all(pages(None, 0, 100_000)).await, expected(&a_all, &b_all));
        assert_eq!(
            read_all(pages(Some("ks-a"), 1_000, 100_000)).await,
            expected(&a_all[1_000..], &b_all)
        );
        assert_eq!(read_all(pages(None, 0, 700)).await, expected(&a_all[..700], &[]));
        assert_eq!(read_all(pages(Some("ks-b"), 4, 100_000)).await, expected(&[], &b_all[4..]));
    }

    /// Heads name every chain in byte order with its last sequence number
    /// and hash, and an event stored later with an older timestamp lands
    /// after its chain's head, where an export resuming there reads it.
    #[tokio::test]
    async fn heads_name_every_chain_and_where_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn KeyStore> =
            Arc::new(SqliteStore::open(&dir.path().join("k.db")).await.unwrap());
        let mut chains = Vec::new();
        for (instance, count) in [("ks-b", 3), ("ks-a", 5)] {
            let mut chain = AuditChain::new(instance);
            let events =
                (0..count).map(|i| AuditEvent::new(1_000 + i, "t", "dek.issue", Outcome::Ok));
            store.append_audit_batch(&chain.seal_all(events), None).await.unwrap();
            chains.push(chain);
        }
        let heads = |h: AuditHeads| {
            h.instances.into_iter().map(|h| (h.instance, h.head_seq)).collect::<Vec<_>>()
        };
        let named = |list: &[(&str, i64)]| {
            list.iter().map(|(i, s)| ((*i).to_owned(), *s)).collect::<Vec<_>>()
        };
        let before = heads(read_heads(store.as_ref()).await.unwrap());
        assert_eq!(before, named(&[("ks-a", 5), ("ks-b", 3)]));
        let late = chains[0].seal_all([AuditEvent::new(1, "t", "record.decrypt", Outcome::Ok)]);
        store.append_audit_batch(&late, None).await.unwrap();
        let after = store.audit_rows("ks-b", 3, 10).await.unwrap();
        assert_eq!(after.iter().map(|r| (r.seq, r.ts_ms)).collect::<Vec<_>>(), [(4, 1)]);
        let now = read_heads(store.as_ref()).await.unwrap();
        for head in &now.instances {
            let last = store.last_audit_row(&head.instance).await.unwrap().unwrap();
            assert_eq!(head.head_hash, data_encoding::HEXLOWER.encode(&last.hash));
        }
        assert_eq!(heads(now), named(&[("ks-a", 5), ("ks-b", 4)]));
    }
}
