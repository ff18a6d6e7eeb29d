//! `keygate admin tenant create|list|show`.

use kms_core::TenantId;
use serde::Deserialize;
use serde_json::json;

use super::Ctx;
use super::args::TenantCommand;
use super::client::decode;
use super::error::AdminError;
use super::output::{Table, emit, emit_line, or_dash};
use super::timefmt::{format_duration, rfc3339};

/// A tenant as the key service shows it (`GET /v1/tenants/{t}`).
#[derive(Debug, Deserialize)]
pub(crate) struct TenantView {
    pub(crate) tenant: String,
    pub(crate) created_at: i64,
    #[serde(default)]
    pub(crate) shredded: bool,
    pub(crate) active_version: Option<u32>,
    #[serde(default)]
    pub(crate) rotate_every_secs: Option<i64>,
    pub(crate) versions: Vec<VersionView>,
}

/// One KEK version.
#[derive(Debug, Deserialize)]
pub(crate) struct VersionView {
    pub(crate) version: u32,
    pub(crate) state: String,
    pub(crate) created_at: i64,
    #[serde(default)]
    pub(crate) state_changed_at: Option<i64>,
}

pub(crate) async fn run(ctx: &Ctx, command: TenantCommand) -> Result<(), AdminError> {
    let client = ctx.client()?;
    match command {
        TenantCommand::Create { tenant } => {
            let answer = client.post("/v1/tenants", &json!({ "tenant": tenant })).await?;
            let view: TenantView = decode(&answer, "tenant create")?;
            emit_line(
                ctx.output,
                &answer,
                &format!(
                    "created tenant {} (KEK version {} active)",
                    view.tenant,
                    or_dash(view.active_version)
                ),
            )
        }
        TenantCommand::List => {
            let answer = client.get("/v1/tenants").await?;
            let tenants: Vec<TenantView> = decode(&answer, "tenant list")?;
            emit(ctx.output, &answer, None, || {
                let mut table =
                    Table::new(&["TENANT", "ACTIVE_VERSION", "VERSIONS", "CREATED", "SHREDDED"]);
                for t in &tenants {
                    table.row(vec![
                        t.tenant.clone(),
                        or_dash(t.active_version),
                        t.versions.len().to_string(),
                        rfc3339(t.created_at),
                        if t.shredded { "yes" } else { "no" }.to_owned(),
                    ]);
                }
                table
            })
        }
        TenantCommand::Show { tenant } => {
            let answer = client.get(&tenant_path(&tenant)).await?;
            let view: TenantView = decode(&answer, "tenant show")?;
            let rotation = match view.rotate_every_secs.and_then(|s| u64::try_from(s).ok()) {
                Some(secs) => format!(", rotates every {}", format_duration(secs)),
                None => String::new(),
            };
            let title = format!(
                "tenant {}: created {}, active version {}{rotation}{}",
                view.tenant,
                rfc3339(view.created_at),
                or_dash(view.active_version),
                if view.shredded { ", SHREDDED" } else { "" }
            );
            emit(ctx.output, &answer, Some(&title), || versions_table(&view.versions))
        }
    }
}

/// `/v1/tenants/{t}` (tenant ids need no escaping: `[a-z0-9_-]` only).
pub(crate) fn tenant_path(tenant: &TenantId) -> String {
    format!("/v1/tenants/{}", tenant.as_str())
}

/// VERSION STATE CREATED STATE_CHANGED.
pub(crate) fn versions_table(versions: &[VersionView]) -> Table {
    let mut table = Table::new(&["VERSION", "STATE", "CREATED", "STATE_CHANGED"]);
    for v in versions {
        table.row(vec![
            v.version.to_string(),
            v.state.clone(),
            rfc3339(v.created_at),
            v.state_changed_at.map_or_else(|| "-".to_owned(), rfc3339),
        ]);
    }
    table
}
