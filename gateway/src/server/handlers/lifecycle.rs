//! Key lifecycle: usage, auto-rotation, and crypto-shredding under
//! two-person control (DESIGN §7).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use kms_core::audit::AuditEvent;
use kms_core::store::{Approval, ApprovalState, DecideApproval, Decision};
use kms_core::{KekState, TenantId};

use super::{ApiJson, tenant_id};
use crate::audit_log::now_ms;
use crate::error::{ApiError, store_error};
use crate::extract::{ApiPath, ApiQuery};
use crate::policy::Role;
use crate::server::api::{
    ApprovalList, ApprovalQuery, ApprovalView, AutoRotate, AutoRotateView, DecideRequest,
    DecisionBody, ExpectedRequest, ShredRequest, UsageView, VersionUsageView,
};
use crate::server::jobs::{execute_shred_now, unix_now, withdraw_shred};
use crate::server::{AppState, Caller};

/// Longest reason or comment kept with a request for approval.
const MAX_TEXT: usize = 1_000;
/// How long an approval with no waiting period waits for a scheduler round
/// under way to end before it is left to the next round.
const SHRED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `GET /v1/tenants/{t}/keys/usage`.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/keys/usage",
    tag = "lifecycle",
    params(("tenant" = String, Path, description = "Tenant id, `[a-z0-9][a-z0-9_-]{0,62}`")),
    responses(
        (status = 200, description = "Per KEK version: records issued, unwraps (all, last 24 h), last unwrap", body = UsageView),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn usage(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(tenant): ApiPath<String>,
) -> Result<Json<UsageView>, ApiError> {
    let tenant = tenant_id(&tenant)?;
    state.authorize(&caller, &tenant, &[Role::Admin, Role::Auditor], "view key usage").await?;
    let versions = state.hierarchy.usage(&tenant).await?;
    Ok(Json(UsageView { tenant, versions: versions.iter().map(VersionUsageView::from).collect() }))
}

/// `PUT /v1/tenants/{t}/keys/auto-rotate`.
#[utoipa::path(
    put,
    path = "/v1/tenants/{tenant}/keys/auto-rotate",
    tag = "lifecycle",
    params(("tenant" = String, Path, description = "Tenant id, `[a-z0-9][a-z0-9_-]{0,62}`")),
    request_body = AutoRotate,
    responses(
        (status = 200, description = "The tenant's auto-rotation period and next rotation", body = AutoRotateView),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn auto_rotate(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(tenant): ApiPath<String>,
    ApiJson(body): ApiJson<AutoRotate>,
) -> Result<Json<AutoRotateView>, ApiError> {
    let tenant = tenant_id(&tenant)?;
    let actor = state.authorize(&caller, &tenant, &[Role::Admin], "schedule rotations").await?;
    let every = match body.every_secs {
        Some(0) => {
            return Err(ApiError::bad_request(
                "invalid_period",
                "every_secs must be at least 1 (or null to turn auto-rotation off)",
            ));
        }
        Some(secs) if secs > state.keys.max_rotation_period_days.saturating_mul(86_400) => {
            return Err(ApiError::bad_request(
                "invalid_period",
                format!(
                    "every_secs is longer than keys.max_rotation_period_days ({} days)",
                    state.keys.max_rotation_period_days
                ),
            ));
        }
        Some(secs) if i64::try_from(secs).is_err() => {
            return Err(ApiError::bad_request("invalid_period", "every_secs is too large"));
        }
        other => other.map(Duration::from_secs),
    };
    let (id, every_secs) = (tenant.clone(), body.every_secs);
    let event = move |outcome| {
        AuditEvent::new(now_ms(), actor.as_str(), "kek.auto_rotate", outcome)
            .with_tenant(id.clone())
            .with_detail("every_secs", every_secs)
    };
    let hierarchy = state.hierarchy.clone();
    let set = async move { Ok(hierarchy.set_rotation_period(&tenant, every).await?) };
    let record = state.audit.before(event, set).await?;
    Ok(Json(AutoRotateView::from(&record)))
}

/// `POST /v1/tenants/{t}/shred`: asks for a crypto-shred, which runs only
/// once a different security officer approves it.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/shred",
    tag = "lifecycle",
    params(("tenant" = String, Path, description = "Tenant id, `[a-z0-9][a-z0-9_-]{0,62}`")),
    request_body = ShredRequest,
    responses(
        (status = 202, description = "A pending request for a security officer's approval", body = ApprovalView),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn request_shred(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(tenant): ApiPath<String>,
    ApiJson(body): ApiJson<ShredRequest>,
) -> Result<(StatusCode, Json<ApprovalView>), ApiError> {
    let tenant = tenant_id(&tenant)?;
    let actor = state.authorize(&caller, &tenant, &[Role::Admin], "request a shred").await?;
    let reason = body.reason.trim();
    if reason.is_empty() || reason.len() > MAX_TEXT {
        return Err(ApiError::bad_request(
            "invalid_reason",
            format!("give a reason of 1 to {MAX_TEXT} bytes"),
        ));
    }
    check_shreddable(&state, &tenant, body.version).await?;
    let id = data_encoding::HEXLOWER
        .encode(&kms_core::crypto::rng::array::<16>().map_err(|e| crate::error::internal(&e))?);
    let approval = Approval::new(
        id,
        tenant.clone(),
        body.version,
        reason.to_owned(),
        actor.clone(),
        unix_now(),
    );
    let (id, reason, version) = (approval.id.clone(), approval.reason.clone(), body.version);
    let event = move |outcome| {
        let event = AuditEvent::new(now_ms(), actor.as_str(), "shred.request", outcome)
            .with_tenant(tenant.clone())
            .with_detail("approval", id.clone())
            .with_detail("reason", reason.clone());
        match version {
            Some(v) => event.with_kek_version(v),
            None => event,
        }
    };
    let (store, request) = (state.hierarchy.store().clone(), approval.clone());
    let created = async move { store.create_approval(&request).await.map_err(|e| store_error(&e)) };
    state.audit.before(event, created).await?;
    Ok((StatusCode::ACCEPTED, Json(ApprovalView::from(&approval))))
}

/// Refuses, before anyone is asked to approve, a shred that could not run.
async fn check_shreddable(
    state: &AppState,
    tenant: &TenantId,
    version: Option<u32>,
) -> Result<(), ApiError> {
    let record = state.hierarchy.tenant(tenant).await?;
    let Some(version) = version else { return Ok(()) };
    match record.versions.iter().find(|v| v.version == version) {
        None => Err(ApiError::not_found(
            "unknown_version",
            format!("tenant {tenant} has no KEK version {version}"),
        )),
        Some(v) if v.state == KekState::Active => Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_transition",
            format!("version {version} is active: rotate first, or shred the whole tenant"),
        )),
        Some(_) => Ok(()),
    }
}

/// `GET /v1/approvals[?state=…]`: the requests the caller may see (admin,
/// security officer or auditor of their tenant).
#[utoipa::path(
    get,
    path = "/v1/approvals",
    tag = "lifecycle",
    params(ApprovalQuery),
    responses(
        (status = 200, description = "The requests the caller may see", body = ApprovalList),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict, 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn list_approvals(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiQuery(query): ApiQuery<ApprovalQuery>,
) -> Result<Json<ApprovalList>, ApiError> {
    let identity = state.identity(&caller)?;
    let filter = match query.state.as_deref() {
        None => None,
        Some(s) => Some(s.parse::<ApprovalState>().map_err(|()| {
            ApiError::bad_request(
                "invalid_state",
                "state is one of pending, approved, rejected, executed",
            )
        })?),
    };
    let approvals = state.hierarchy.store().approvals(filter).await.map_err(|e| store_error(&e))?;
    let policy = state.policy.current();
    let visible = |t: &TenantId| {
        [Role::Admin, Role::SecurityOfficer, Role::Auditor]
            .iter()
            .any(|role| policy.authorize(identity, t, *role))
    };
    Ok(Json(ApprovalList {
        approvals: approvals
            .iter()
            .filter(|a| visible(&a.tenant))
            .map(ApprovalView::from)
            .collect(),
    }))
}

/// `POST /v1/approvals/{id}`: a security officer other than the requester
/// approves or rejects. An approved shred runs at once unless a waiting
/// period is configured (then the scheduler runs it when it is over);
/// while it waits, `reject` from any security officer withdraws it. The
/// requester may withdraw their own pending request (`reject`). A request
/// older than `lifecycle.approval_ttl_secs`, or whose requester no longer
/// administers the tenant, may only be rejected; `expect` (what the
/// decider believes the request is) must match it if given.
#[utoipa::path(
    post,
    path = "/v1/approvals/{id}",
    tag = "lifecycle",
    params(("id" = String, Path, description = "Approval request id")),
    request_body = DecideRequest,
    responses(
        (status = 200, description = "The request after the decision (an approved shred whose immediate run failed for a while, the audit log or keystore unavailable, is `approved`, and the scheduler runs it; one whose run was refused is answered with that refusal, saying the approval is recorded)", body = ApprovalView),
        (status = "default", description = "An error (`{\"error\":{\"code\",\"message\"}}`): 400 bad input, 403 not granted, 404 unknown, 409 conflict (decided already, expired, not what `expect` says, requester no longer an admin), 413 too large, 422 wrong shape, 429 rate limited, 503 a dependency is unavailable", body = crate::openapi::ErrorBody)
    ),
)]
pub(crate) async fn decide(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<DecideRequest>,
) -> Result<Json<ApprovalView>, ApiError> {
    let store = state.hierarchy.store().clone();
    let unknown = || ApiError::not_found("unknown_approval", "no such request for approval");
    if id.len() > 64 {
        return Err(unknown());
    }
    let pending = store.approval(&id).await.map_err(|e| store_error(&e))?.ok_or_else(unknown)?;
    let decision = match body.decision {
        DecisionBody::Approve => Decision::Approve,
        DecisionBody::Reject => Decision::Reject,
    };
    // Whoever asked may take back a request nobody has decided, with the
    // role they asked with.
    let withdraws_own = decision == Decision::Reject
        && pending.state == ApprovalState::Pending
        && state.identity(&caller)? == pending.requested_by;
    let roles: &[Role] = if withdraws_own {
        &[Role::Admin, Role::SecurityOfficer]
    } else {
        &[Role::SecurityOfficer]
    };
    let actor =
        state.authorize(&caller, &pending.tenant, roles, "decide requests for approval").await?;
    if body.comment.as_ref().is_some_and(|c| c.len() > MAX_TEXT) {
        return Err(ApiError::bad_request("invalid_comment", format!("at most {MAX_TEXT} bytes")));
    }
    // An id passed on for another request than it is: worth a trace in
    // the audit log, whoever meant what.
    if let Some(Err(refused)) = body.expect.as_ref().map(|e| check_expected(&pending, e)) {
        let what = "decide a request other than the one named";
        state.audit.record_denial(&actor, what, Some(&pending.tenant)).await;
        return Err(refused);
    }
    // Rejecting an approved shred that waits for its time withdraws it:
    // the waiting period is there so that a mistaken approval can be
    // stopped, and stopping takes one officer, whoever approved it.
    if withdraws_own || (pending.state == ApprovalState::Approved && decision == Decision::Reject) {
        let withdrawn = withdraw_shred(&state, actor, &pending, body.comment).await?;
        return Ok(Json(ApprovalView::from(&withdrawn)));
    }
    let terms = DecisionTerms::new(&state, decision);
    // Refused before anything is recorded as decided (the keystore checks
    // again, should the request change meanwhile).
    if let Err(e) = pending.check_decision(&terms.of(&id, &actor, None)) {
        let denial = match e {
            kms_core::store::StoreError::SelfApproval => Some("approve own request"),
            kms_core::store::StoreError::ApprovalExpired { .. } => {
                Some("approve an expired request")
            }
            _ => None,
        };
        if let Some(what) = denial {
            state.audit.record_denial(&actor, what, Some(&pending.tenant)).await;
        }
        return Err(store_error(&e));
    }
    // The requester's authority is what the request stands on: if it has
    // been taken away since, the request may only be rejected.
    if decision == Decision::Approve
        && !state.policy.current().authorize(&pending.requested_by, &pending.tenant, Role::Admin)
    {
        state
            .audit
            .record_denial(
                &actor,
                "approve a request its requester may no longer make",
                Some(&pending.tenant),
            )
            .await;
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "requester_not_authorized",
            format!(
                "{} no longer administers tenant {}; reject the request",
                pending.requested_by, pending.tenant
            ),
        ));
    }
    let action = if decision == Decision::Approve { "shred.approve" } else { "shred.reject" };
    let (by, request) = (actor.clone(), pending.clone());
    let event = move |outcome| {
        let event = AuditEvent::new(now_ms(), by.as_str(), action, outcome)
            .with_tenant(request.tenant.clone())
            .with_detail("approval", request.id.clone())
            .with_detail("requested_by", request.requested_by.clone());
        match request.version {
            Some(v) => event.with_kek_version(v),
            None => event,
        }
    };
    let decide = async move {
        let decision = terms.of(&id, &actor, body.comment.as_deref());
        store.decide_approval(&decision).await.map_err(|e| store_error(&e))
    };
    let decided = state.audit.before(event, decide).await?;
    if !decided.is_due(unix_now()) {
        return Ok(Json(ApprovalView::from(&decided)));
    }
    // The approval is recorded: should running it now fail for a while
    // (the audit log or keystore unavailable a moment), the scheduler runs
    // it at its next round, so the answer is the approval, not an error.
    // A refusal (4xx) is said as it is.
    match execute_shred_now(&state, &decided, SHRED_LOCK_WAIT).await {
        Ok(executed) => Ok(Json(ApprovalView::from(&executed))),
        Err(e) if !e.status().is_server_error() => Err(e.after(&format!(
            "request {} is approved (recorded), but running it now was refused",
            decided.id
        ))),
        Err(e) => {
            tracing::warn!(
                approval = decided.id,
                error = e.code(),
                "an approved shred did not run at once; the scheduler runs it"
            );
            Ok(Json(ApprovalView::from(&decided)))
        }
    }
}

/// The settings a decision is made under, taken once per request.
#[derive(Clone, Copy)]
struct DecisionTerms {
    decision: Decision,
    now: i64,
    delay_secs: i64,
    approve_within_secs: i64,
}

impl DecisionTerms {
    fn new(state: &AppState, decision: Decision) -> Self {
        let secs = |s: u64| i64::try_from(s).unwrap_or(i64::MAX);
        Self {
            decision,
            now: unix_now(),
            delay_secs: secs(state.lifecycle.shred_delay_secs),
            approve_within_secs: secs(state.lifecycle.approval_ttl_secs),
        }
    }

    fn of<'a>(&self, id: &'a str, by: &'a str, comment: Option<&'a str>) -> DecideApproval<'a> {
        DecideApproval {
            id,
            decision: self.decision,
            by,
            comment,
            now: self.now,
            delay_secs: self.delay_secs,
            approve_within_secs: self.approve_within_secs,
        }
    }
}

/// Refuses a decision on a request other than the one the decider names:
/// an id passed on by the requester may stand for another tenant or scope.
fn check_expected(pending: &Approval, expected: &ExpectedRequest) -> Result<(), ApiError> {
    if pending.tenant.as_str() == expected.tenant && pending.version == expected.version {
        return Ok(());
    }
    let scope = |version: Option<u32>| match version {
        Some(v) => format!("KEK version {v}"),
        None => "all versions".to_owned(),
    };
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "approval_mismatch",
        format!(
            "request {} is a shred of tenant {} ({}), not of tenant {} ({}); nothing was decided",
            pending.id,
            pending.tenant,
            scope(pending.version),
            expected.tenant,
            scope(expected.version)
        ),
    ))
}
