//! Dual control: `shred request`, `approvals list`, `approve`, `reject`.

use kms_core::TenantId;
use serde::Deserialize;
use serde_json::json;

use super::Ctx;
use super::args::{ApprovalState, ApproveArgs, DecisionArgs};
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
    decided_at: Option<i64>,
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
             keygate admin approve {id} --tenant {tenant} {scope}",
            id = approval.id,
            what = approval.what(),
            state = approval.state,
            tenant = approval.tenant,
            scope = approval
                .version
                .map_or_else(|| "--all-versions".to_owned(), |v| format!("--version {v}")),
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
            "EXECUTE_AFTER",
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
                rfc3339_or_dash(a.execute_after),
                a.reason.clone(),
            ]);
        }
        table
    })
}

/// `approve ID --tenant T (--version V | --all-versions)`: the key service
/// refuses the decision if the request is for another tenant or scope.
pub(crate) async fn approve(ctx: &Ctx, approve: &ApproveArgs) -> Result<(), AdminError> {
    let expect = json!({ "tenant": approve.tenant.as_str(), "version": approve.version });
    decide(ctx, &approve.decision, "approve", Some(expect)).await
}

/// `reject ID`.
pub(crate) async fn reject(ctx: &Ctx, decision: &DecisionArgs) -> Result<(), AdminError> {
    decide(ctx, decision, "reject", None).await
}

async fn decide(
    ctx: &Ctx,
    decision: &DecisionArgs,
    verb: &str,
    expect: Option<serde_json::Value>,
) -> Result<(), AdminError> {
    let mut body = json!({ "decision": verb, "comment": decision.comment });
    // Sent only with an approval: a key service from before `expect`
    // refuses unknown fields, and a rejection needs none.
    if let (Some(expect), Some(fields)) = (expect, body.as_object_mut()) {
        fields.insert("expect".to_owned(), expect);
    }
    // The id is checked to be hexadecimal, so it needs no escaping.
    let answer = ctx.client()?.post(&format!("/v1/approvals/{}", decision.id), &body).await?;
    let approval: Approval = decode(&answer, "approval decision")?;
    let mut text = format!(
        "request {}: {} is now {} (requested by {}: {})",
        approval.id,
        approval.what(),
        approval.state,
        approval.requested_by,
        approval.reason
    );
    if approval.state == "approved" {
        // Due at once yet still approved: running it failed a moment, and
        // the scheduler runs it.
        text.push_str(&match approval.execute_after {
            Some(at) if Some(at) > approval.decided_at => format!("; runs after {}", rfc3339(at)),
            _ => "; it runs at the key service's next scheduler round".to_owned(),
        });
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
