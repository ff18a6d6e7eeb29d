//! Background work of the key service: the lifecycle scheduler (auto-
//! rotation and approved shreds whose wait is over; one replica at a time,
//! under the keystore's job lock) and the usage-counter flush.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kms_core::audit::AuditEvent;
use kms_core::store::{Approval, ApprovalState};
use tokio::sync::watch;

use super::AppState;
use super::handlers::tenants::rotate_once;
use crate::audit_log::now_ms;
use crate::error::{ApiError, store_error};

/// The actor named in the audit events of scheduled work.
const SCHEDULER: &str = "keygate:scheduler";
/// The job lock the scheduler holds while it runs.
const LIFECYCLE_JOB: &str = "lifecycle";

/// Unix seconds now.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Destroys what an approved request names and marks it executed. The
/// audit event (naming requester and approver) is durable before any key
/// is destroyed: with the audit log down, nothing is destroyed. Run under
/// the job lock; the request is read again first, so one withdrawn (or
/// run) since the caller read it is left as it is.
async fn execute_shred(state: &AppState, approval: &Approval) -> Result<Approval, ApiError> {
    let store = state.hierarchy.store();
    let approval = &store
        .approval(&approval.id)
        .await
        .map_err(|e| store_error(&e))?
        .ok_or_else(|| crate::error::internal(&"approval vanished"))?;
    if approval.state != ApprovalState::Approved {
        return Ok(approval.clone());
    }
    let action = if approval.version.is_some() { "kek.shred" } else { "tenant.shred" };
    let recorded = approval.clone();
    let event = move |outcome| {
        let a = &recorded;
        let e =
            AuditEvent::new(now_ms(), a.decided_by.clone().unwrap_or_default(), action, outcome)
                .with_tenant(a.tenant.clone())
                .with_detail("approval", a.id.clone())
                .with_detail("requested_by", a.requested_by.clone())
                .with_detail("approved_by", a.decided_by.clone())
                .with_detail("reason", a.reason.clone());
        match a.version {
            Some(v) => e.with_kek_version(v),
            None => e,
        }
    };
    // The keys are destroyed and the request marked executed in one
    // transaction, and only if it is still approved: should the job lock
    // have been lost and the request withdrawn meanwhile, nothing is
    // destroyed (and the event records the refusal).
    let (hierarchy, shred) = (state.hierarchy.clone(), approval.clone());
    let executed = async move { Ok(hierarchy.execute_approval(&shred).await?) };
    match state.audit.before(event, executed).await {
        Ok((executed, _)) => {
            tracing::warn!(tenant = %executed.tenant, version = ?executed.version,
                approval = executed.id, "crypto-shredded");
            Ok(executed)
        }
        // Withdrawn or run elsewhere since it was read (the lock was lost):
        // nothing was destroyed here; the request as it is now.
        Err(e) if e.code() == "approval_not_pending" => {
            tracing::warn!(approval = approval.id, "a shred was withdrawn or run elsewhere first");
            store
                .approval(&approval.id)
                .await
                .map_err(|e| store_error(&e))?
                .ok_or_else(|| crate::error::internal(&"approval vanished"))
        }
        Err(e) => Err(e),
    }
}

/// Runs a shred approved just now with no waiting period, under the
/// scheduler's job lock, so that it runs once: the scheduler (on this
/// replica or another) may find the same approval due meanwhile. If the
/// scheduler ran it first, the approval as it is now; if the lock stays
/// taken for `within`, the approval is left to the scheduler's next round.
///
/// It runs in a task of its own: a request that goes away (the client
/// gone, the request timed out) must not release the lock while the
/// destruction it started goes on, nor leave the approval unmarked.
pub(crate) async fn execute_shred_now(
    state: &AppState,
    approval: &Approval,
    within: Duration,
) -> Result<Approval, ApiError> {
    let (state, approval) = (state.clone(), approval.clone());
    tokio::spawn(async move { shred_under_lock(&state, &approval, within).await })
        .await
        .map_err(|e| crate::error::internal(&e))?
}

/// Withdraws a shred before it runs (approved and waiting, or pending and
/// withdrawn by its requester), audited before it is made
/// (`shred.withdraw`). Only if it is still in the state `approval` was read
/// in (409 `approval_not_pending` otherwise). Not under the scheduler's job
/// lock: the keystore makes a withdrawal and an execution exclusive (the
/// execution locks the approval's row and checks its state, a withdrawal
/// changes it only from the state read), and a long round (thousands of
/// tenants due at once) must not keep an officer from stopping a shred
/// that round would then run.
pub(crate) async fn withdraw_shred(
    state: &AppState,
    actor: String,
    approval: &Approval,
    comment: Option<String>,
) -> Result<Approval, ApiError> {
    let (state, approval) = (state.clone(), approval.clone());
    tokio::spawn(async move {
        let store = state.hierarchy.store().clone();
        // The approval's own comment stays, the withdrawal's after it.
        let approved = approval.comment.as_deref().map(|c| format!("{c}; ")).unwrap_or_default();
        let text = match &comment {
            Some(c) => format!("{approved}withdrawn by {actor}: {c}"),
            None => format!("{approved}withdrawn by {actor}"),
        };
        let recorded = approval.clone();
        let event = move |outcome| {
            let e = AuditEvent::new(now_ms(), actor.as_str(), "shred.withdraw", outcome)
                .with_tenant(recorded.tenant.clone())
                .with_detail("approval", recorded.id.clone())
                .with_detail("requested_by", recorded.requested_by.clone())
                .with_detail("approved_by", recorded.decided_by.clone())
                .with_detail("comment", comment.clone());
            match recorded.version {
                Some(v) => e.with_kek_version(v),
                None => e,
            }
        };
        // Only from the state the caller's right to withdraw was judged in.
        let (id, from) = (approval.id.clone(), approval.state);
        let withdraw = async move {
            store.withdraw_approval(&id, from, &text).await.map_err(|e| store_error(&e))
        };
        state.audit.before(event, withdraw).await
    })
    .await
    .map_err(|e| crate::error::internal(&e))?
}

/// The scheduler's job lock, waiting up to `within` for a round to end.
async fn wait_for_lock(
    state: &AppState,
    within: Duration,
) -> Result<Option<kms_core::store::JobLock>, ApiError> {
    let store = state.hierarchy.store();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match store.try_job_lock(LIFECYCLE_JOB).await.map_err(|e| store_error(&e))? {
            Some(lock) => return Ok(Some(lock)),
            None if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None => return Ok(None),
        }
    }
}

async fn shred_under_lock(
    state: &AppState,
    approval: &Approval,
    within: Duration,
) -> Result<Approval, ApiError> {
    let Some(lock) = wait_for_lock(state, within).await? else {
        return Ok(approval.clone());
    };
    let result = execute_shred(state, approval).await;
    drop(lock);
    result
}

/// Starts the scheduler and the usage flush; both stop when `stop` turns
/// true (the flush adds what is left first).
pub(crate) fn spawn(
    state: AppState,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let scheduler_every = Duration::from_millis(state.lifecycle.scheduler_interval_ms.max(10));
    let flush_every = Duration::from_millis(state.lifecycle.usage_flush_interval_ms.max(10));
    tokio::spawn(async move {
        let mut schedule = tokio::time::interval(scheduler_every);
        let mut flush = tokio::time::interval(flush_every);
        schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = schedule.tick() => run_scheduled(&state).await,
                _ = flush.tick() => {
                    if let Err(e) = state.hierarchy.flush_usage().await {
                        tracing::warn!(error = %e, "usage counts not flushed; retrying later");
                    }
                }
                _ = stop.changed() => break,
            }
        }
        if let Err(e) = state.hierarchy.flush_usage().await {
            tracing::warn!(error = %e, "usage counts lost at shutdown");
        }
    })
}

/// Whether the scheduler still certainly holds its lock: on PostgreSQL the
/// lock lives on a database session, and if that ended another replica may
/// be running the same round (a rotation or a shred twice).
async fn still_held(lock: &mut kms_core::store::JobLock) -> bool {
    match lock.check().await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "scheduler: the job lock may be lost; this round stops");
            false
        }
    }
}

/// One scheduler round, if this replica gets the job lock.
async fn run_scheduled(state: &AppState) {
    let store = state.hierarchy.store();
    let mut lock = match store.try_job_lock(LIFECYCLE_JOB).await {
        Ok(Some(lock)) => lock,
        Ok(None) => return, // another replica runs it now
        Err(e) => {
            tracing::warn!(error = %e, "scheduler: keystore unavailable");
            return;
        }
    };
    let now = unix_now();
    // Each due tenant once: one rotated meanwhile by anyone (another
    // replica, an operator) has its version taken and is left as it is.
    match state.hierarchy.due_for_rotation(now).await {
        Ok(due) => {
            for tenant in &due {
                if !still_held(&mut lock).await {
                    return;
                }
                if let Err(e) = rotate_once(state, SCHEDULER, tenant, true).await {
                    tracing::error!(tenant = %tenant.id, error = e.code(), "scheduled rotation failed");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "scheduler: auto-rotation failed"),
    }
    match store.approvals(Some(ApprovalState::Approved)).await {
        Ok(approved) => {
            for approval in approved.iter().filter(|a| a.execute_after.is_some_and(|t| t <= now)) {
                if !still_held(&mut lock).await {
                    return;
                }
                if let Err(e) = execute_shred(state, approval).await {
                    tracing::error!(
                        approval = approval.id,
                        error = e.code(),
                        "scheduled shred failed"
                    );
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "scheduler: cannot read approvals"),
    }
    drop(lock);
}
