//! Master keys: which exist, which is active, how this instance stands
//! with each, connecting to one now, and master rotation.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use kms_core::HierarchyError;
use kms_core::audit::{AuditEvent, Outcome};
use kms_core::store::{MasterKeyId, MasterRecord};

use super::{ApiJson, ApiPath};
use crate::audit_log::now_ms;
use crate::compliance::refused_root;
use crate::error::{ApiError, store_error};
use crate::policy::Role;
use crate::server::api::{
    ConnectionView, MasterEntry, MasterRotateRequest, MasterRotateView, MasterView, MastersView,
    RewrappedCounts,
};
use crate::server::handlers::compliance::ComplianceContext;
use crate::server::masters::recorded_settings;
use crate::server::startup::root_provider;
use crate::server::{AppState, Caller};

/// `GET /v1/master`.
#[utoipa::path(
    get,
    path = "/v1/master",
    tag = "master",
    responses(
        (status = 200, description = "The active master key and every registered one, with how the answering instance stands with each", body = MastersView),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<MastersView>, ApiError> {
    let identity =
        state.authorize_global(&caller, &[Role::Admin, Role::Auditor], "view master keys").await?;
    let admin = state.policy.current().authorize_any_tenant(&identity, Role::Admin);
    let store = state.hierarchy.store();
    let masters = store.masters().await.map_err(|e| store_error(&e))?;
    let counts = store.keys_per_master().await.map_err(|e| store_error(&e))?;
    Ok(Json(MastersView {
        active: masters.iter().find(|m| m.active).map(|m| MasterView {
            id: m.id.0,
            kind: m.kind.clone(),
            key_ref: m.key_ref.clone(),
        }),
        masters: masters.iter().map(|m| entry(&state, m, &counts, admin)).collect(),
    }))
}

/// `master` as `GET /v1/master` lists it.
fn entry(
    state: &AppState,
    master: &MasterRecord,
    keys_per_master: &[(MasterKeyId, u64)],
    admin: bool,
) -> MasterEntry {
    let keys_wrapped = keys_per_master.iter().find(|(m, _)| *m == master.id).map_or(0, |(_, n)| *n);
    MasterEntry {
        id: master.id.0,
        kind: master.kind.clone(),
        key_ref: master.key_ref.clone(),
        active: master.active,
        keys_wrapped,
        connection: ConnectionView::new(state.hierarchy.master_connection(master), admin),
    }
}

/// `POST /v1/master/{id}/connect`: connects the answering instance to a
/// master key now, even while it waits after a failed attempt; for after
/// the master's settings were put right (a PIN file rewritten, an HSM
/// back) rather than wait up to 15 minutes. Other instances keep their
/// own wait. A failed attempt counts as one more in a row, as a request's
/// would, and starts a wait for such attempts of their own (repeating them
/// costs at most 8 failed logins in the first hour, 4 an hour after);
/// attempts go one at a time.
#[utoipa::path(
    post,
    path = "/v1/master/{id}/connect",
    tag = "master",
    params(("id" = i64, Path, minimum = 1, description = "Master key id, as `GET /v1/master` lists it")),
    responses(
        (status = 200, description = "Connected: the master as the answering instance now stands with it", body = MasterEntry),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 no recorded settings to connect with, 503 the attempt failed (the message says why)", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn connect(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<MasterEntry>, ApiError> {
    let actor = state.authorize_global(&caller, &[Role::Admin], "connect to a master key").await?;
    let id = id.parse().ok().filter(|id| *id >= 1).map(MasterKeyId).ok_or_else(|| {
        ApiError::bad_request("invalid_master", "a master key id is a number from 1")
    })?;
    let store = state.hierarchy.store();
    let known = |masters: Vec<MasterRecord>| masters.into_iter().find(|m| m.id == id);
    let masters = store.masters().await.map_err(|e| store_error(&e))?;
    if known(masters).is_none() {
        return Err(ApiError::not_found("unknown_master", format!("no master key {}", id.0)));
    }
    let event = move |outcome| {
        AuditEvent::new(now_ms(), actor.as_str(), "master.connect", outcome)
            .with_detail("master", id.0)
    };
    let hierarchy = state.hierarchy.clone();
    let attempt = async move {
        match hierarchy.connect_master(id).await {
            Ok(_) => Ok(()),
            Err(HierarchyError::Root(e)) => Err(ApiError::unavailable(
                "master_unreachable",
                format!("cannot connect to master key {}: {e}", id.0),
            )),
            Err(HierarchyError::ForeignMaster(_)) => Err(ApiError::new(
                StatusCode::CONFLICT,
                "master_not_connectable",
                format!(
                    "the keystore records no provider settings for master key {}: only a key \
                     service configured with it as [root] can use it",
                    id.0
                ),
            )),
            Err(other) => Err(other.into()),
        }
    };
    state.audit.before(event, attempt).await?;
    // As the keystore records it now (a rotation may have run meanwhile).
    let masters = store.masters().await.map_err(|e| store_error(&e))?;
    let counts = store.keys_per_master().await.map_err(|e| store_error(&e))?;
    let master = known(masters)
        .ok_or_else(|| ApiError::not_found("unknown_master", format!("no master key {}", id.0)))?;
    Ok(Json(entry(&state, &master, &counts, true)))
}

/// `POST /v1/master/rotate`: connects to the new master (a real wrap and
/// unwrap first), makes it active and rewraps every stored key under it.
/// Resumable: after a crash or a timeout, the same request finishes the job.
#[utoipa::path(
    post,
    path = "/v1/master/rotate",
    tag = "master",
    request_body = MasterRotateRequest,
    responses(
        (status = 200, description = "Progress of the (resumable) master rotation", body = MasterRotateView),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn rotate(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(compliance): Extension<Arc<ComplianceContext>>,
    ApiJson(body): ApiJson<MasterRotateRequest>,
) -> Result<Json<MasterRotateView>, ApiError> {
    let actor = state.authorize_global(&caller, &[Role::Admin], "rotate the master key").await?;
    // The profile's rule on the master key holds for every master the keys
    // can be moved to, not only for the configured one.
    let kind = body.to.kind();
    if let Some(reason) = refused_root(compliance.config.profile, &body.to) {
        let message = format!("the production profile forbids this master key: {reason}");
        return Err(Refusal::PROFILE.refuse(&state, actor, kind, &reason, message).await);
    }
    if !body.to.paths_are_absolute() {
        return Err(ApiError::bad_request(
            "invalid_provider",
            "file paths in the provider settings must be absolute",
        ));
    }
    body.to.check_timers().map_err(|e| ApiError::bad_request("invalid_provider", e.to_string()))?;
    // One admin's request does not choose a library for the key service to
    // load, an endpoint to hand keys to or (if the host lists them) the key:
    // the host's configuration does.
    if let Some(reason) = state.master_trust.refusal(&body.to) {
        let message = format!("this key service does not use the new master key: {reason}");
        return Err(Refusal::UNTRUSTED.refuse(&state, actor, kind, &reason, message).await);
    }
    let settings = recorded_settings(&body.to).map_err(|e| crate::error::internal(&e))?;
    let store = state.hierarchy.store().clone();
    let Some(lock) = store.try_job_lock("master-rotate").await.map_err(|e| store_error(&e))? else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "master_rotation_in_progress",
            "another master rotation is running; retry when it is done",
        ));
    };
    let provider = root_provider(&body.to).await.map_err(|e| {
        tracing::warn!(error = %e, "master rotation: cannot use the new master key");
        ApiError::bad_request("invalid_provider", format!("the new master key is unusable: {e}"))
    })?;
    let target = provider.describe().to_string();
    // Which key an AWS KMS alias names shows only once connected.
    if let Some(reason) = state.master_trust.key_refusal(&target) {
        // Nothing to undo; the lock is not held across a slow audit write
        // (other replicas' rotations wait on it).
        drop(lock);
        let message = format!("this key service does not use the new master key: {reason}");
        return Err(Refusal::UNTRUSTED.refuse(&state, actor, kind, &reason, message).await);
    }
    let (by, to) = (actor.clone(), target.clone());
    let event = move |outcome| {
        AuditEvent::new(now_ms(), by.as_str(), "master.rotate", outcome)
            .with_detail("to", to.clone())
    };
    // Recorded first, then run to its end (its own task, see `before`)
    // whether or not the client waits: a rotation is not stopped halfway.
    let (hierarchy, audit) = (state.hierarchy.clone(), state.audit.clone());
    let rotation = async move {
        let result = hierarchy.rotate_master(provider, &settings).await;
        drop(lock);
        let report = result?;
        // What this run moved, for the record; the rotation itself is
        // already recorded, so this one is best effort.
        let moved = AuditEvent::new(now_ms(), actor, "master.rotate.done", Outcome::Ok)
            .with_detail("to", target)
            .with_detail("tenant_keys", report.tenant_keys)
            .with_detail("index_roots", report.index_roots)
            .with_detail("audit_signing_keys", report.audit_signing_keys);
        if audit.record(vec![moved]).await.is_err() {
            tracing::error!("could not record what a master rotation moved in the audit log");
        }
        Ok(report)
    };
    let report = state.audit.before(event, rotation).await?;
    let remaining = store.keys_not_under(report.master, 1).await.map_err(|e| store_error(&e))?;
    Ok(Json(MasterRotateView {
        master: MasterView {
            id: report.master.0,
            kind: report.info.kind.to_owned(),
            key_ref: report.info.key_ref.clone(),
        },
        rewrapped: RewrappedCounts {
            tenant_keys: report.tenant_keys,
            index_roots: report.index_roots,
            audit_signing_keys: report.audit_signing_keys,
        },
        remaining: remaining.len() as u64,
        state: if remaining.is_empty() { "complete" } else { "incomplete" },
    }))
}

/// A master rotation refused by a rule, before any key is moved.
struct Refusal {
    /// The rule, as the audit event names it.
    rule: &'static str,
    /// The API error code.
    code: &'static str,
}

impl Refusal {
    /// The production profile's rule on master keys.
    const PROFILE: Self = Self { rule: "root_key.hardware_backed", code: "refused_by_profile" };
    /// The host's `[trusted_masters]`.
    const UNTRUSTED: Self = Self { rule: "trusted_masters", code: "untrusted_provider" };

    /// Records the refusal as a denied `master.rotate` naming the rule and
    /// the reason (it stays refused if it cannot be recorded, as other
    /// denials) and gives the 403 answer.
    async fn refuse(
        self,
        state: &AppState,
        actor: String,
        provider: &'static str,
        reason: &str,
        message: String,
    ) -> ApiError {
        let event = AuditEvent::new(now_ms(), actor, "master.rotate", Outcome::Denied)
            .with_detail("provider", provider)
            .with_detail("rule", self.rule)
            .with_detail("reason", reason);
        if state.audit.record(vec![event]).await.is_err() {
            tracing::error!("could not record a refused master rotation in the audit log");
        }
        ApiError::new(StatusCode::FORBIDDEN, self.code, message)
    }
}
