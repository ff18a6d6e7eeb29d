//! `keygate admin compliance report`: the key service's compliance checks
//! (each mapped to a HIPAA §164.312 technical safeguard); exit 1 if any
//! fails.

use serde::Deserialize;

use super::Ctx;
use super::client::decode;
use super::error::AdminError;
use super::output::{Table, emit};

/// `GET /v1/compliance`.
#[derive(Debug, Deserialize)]
struct Report {
    profile: String,
    checks: Vec<Check>,
}

#[derive(Debug, Deserialize)]
struct Check {
    rule: String,
    #[serde(default)]
    hipaa: String,
    status: String,
    #[serde(default)]
    detail: String,
}

pub(crate) async fn report(ctx: &Ctx) -> Result<(), AdminError> {
    let answer = ctx.client()?.get("/v1/compliance").await?;
    let report: Report = decode(&answer, "compliance report")?;
    let failed: Vec<&str> =
        report.checks.iter().filter(|c| c.status != "pass").map(|c| c.rule.as_str()).collect();
    let title = format!(
        "compliance profile {}: {} of {} checks pass",
        report.profile,
        report.checks.len() - failed.len(),
        report.checks.len()
    );
    emit(ctx.output, &answer, Some(&title), || {
        let mut table = Table::new(&["RULE", "HIPAA", "STATUS", "DETAIL"]);
        for c in &report.checks {
            table.row(vec![c.rule.clone(), c.hipaa.clone(), c.status.clone(), c.detail.clone()]);
        }
        table
    })?;
    if failed.is_empty() {
        Ok(())
    } else {
        Err(AdminError::refused(format!(
            "{} compliance check(s) fail: {}",
            failed.len(),
            failed.join(", ")
        )))
    }
}
