//! Dual control: `shred request`, `approvals list`, `approve`, `reject`.

use kms_core::TenantId;
use serde::Deserialize;
use serde_json::json;

use super::Ctx;
use super::args::{ApprovalState, DecisionArgs};
use super::client::decode;
use super::error::AdminError;
use super::output::{Table, emit, emit_line, or_dash};
use super::tenant::tenant_path;
use super::timefmt::{rfc3339, rfc3339_or_dash};

/// A request that needs a second person.
#[derive(Debug, Deserialize)]
struct Approval {
    id: String,
    action: String,
    tenant: String,
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    reason: String,
    requested_by: String,
    requested_at: i64,
    state: String,
    #[serde(default)]
    decided_by: Option<String>,
    #[serde(default)]
    execute_after: Option<i64>,
}

impl Approval {
    /// "shred of tenant onc (all versions)".
    fn what(&self) -> String {
        let scope = match self.version {
            Some(v) => format!("KEK version {v}"),
            None => "all versions".to_owned(),
        };
        format!("{} of tenant {} ({scope})", self.action, self.tenant)
    }
}

/// `GET /v1/approvals`.
#[derive(Debug, Deserialize)]
struct Approvals {
    approvals: Vec<Approval>,
}

/// `shred request`: files the request; a second security officer must
/// approve it before anything is destroyed.
pub(crate) async fn shred(
    ctx: &Ctx,
    tenant: &TenantId,
    version: Option<u32>,
    reason: &str,
) -> Result<(), AdminError> {
    let path = format!("{}/shred", tenant_path(tenant));
    let answer =
        ctx.client()?.post(&path, &json!({ "version": version, "reason": reason })).await?;
    let approval: Approval = decode(&answer, "shred request")?;
    emit_line(
        ctx.output,
        &answer,
        &format!(
            "request {id}: {what} is {state}; it needs a second security officer: \
             keygate admin approve {id}",
            id = approval.id,
            what = approval.what(),
            state = approval.state
        ),
    )
}

/// `approvals list [--state S]`.
pub(crate) async fn list(ctx: &Ctx, state: Option<ApprovalState>) -> Result<(), AdminError> {
    let path = match state {
        Some(s) => format!("/v1/approvals?state={}", state_name(s)),
        None => "/v1/approvals".to_owned(),
    };
    let answer = ctx.client()?.get(&path).await?;
    let list: Approvals = decode(&answer, "approvals list")?;
    emit(ctx.output, &answer, None, || {
        let mut table = Table::new(&[
            "ID",
            "ACTION",
            "TENANT",
            "VERSION",
            "STATE",
            "REQUESTED_BY",
            "REQUESTED_AT",
            "DECIDED_BY",
            "REASON",
        ]);
        for a in &list.approvals {
            table.row(vec![
                a.id.clone(),
                a.action.clone(),
                a.tenant.clone(),
                a.version.map_or_else(|| "all".to_owned(), |v| v.to_string()),
                a.state.clone(),
                a.requested_by.clone(),
                rfc3339(a.requested_at),
                or_dash(a.decided_by.as_deref()),
                a.reason.clone(),
            ]);
        }
        table
    })
}

/// `approve ID` / `reject ID`.
pub(crate) async fn decide(
    ctx: &Ctx,
    decision: &DecisionArgs,
    approve: bool,
) -> Result<(), AdminError> {
    let body = json!({
        "decision": if approve { "approve" } else { "reject" },
        "comment": decision.comment,
    });
    // The id is checked to be hexadecimal, so it needs no escaping.
    let answer = ctx.client()?.post(&format!("/v1/approvals/{}", decision.id), &body).await?;
    let approval: Approval = decode(&answer, "approval decision")?;
    let mut text = format!(
        "request {}: {} is now {} (requested by {})",
        approval.id,
        approval.what(),
        approval.state,
        approval.requested_by
    );
    if approval.state == "approved" && approval.execute_after.is_some() {
        text.push_str(&format!("; runs after {}", rfc3339_or_dash(approval.execute_after)));
    }
    emit_line(ctx.output, &answer, &text)
}

fn state_name(state: ApprovalState) -> &'static str {
    match state {
        ApprovalState::Pending => "pending",
        ApprovalState::Approved => "approved",
        ApprovalState::Rejected => "rejected",
        ApprovalState::Executed => "executed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approvals_decode_and_describe_themselves() {
        let answer = json!({"approvals":[{"id":"9f2c","action":"shred","tenant":"onc",
            "version":null,"reason":"r","requested_by":"spiffe://a","requested_at":1700000000,
            "state":"pending","decided_by":null,"decided_at":null,"execute_after":null}]});
        let list: Approvals = decode(&answer, "x").unwrap();
        assert_eq!(list.approvals[0].what(), "shred of tenant onc (all versions)");
        assert_eq!(state_name(ApprovalState::Executed), "executed");
    }
}
