//! `keygate admin key rotate|list|state|usage|auto-rotate`.

use serde::Deserialize;
use serde_json::json;

use super::Ctx;
use super::args::{KeyCommand, KeyState};
use super::client::decode;
use super::error::AdminError;
use super::output::{Table, emit, emit_line};
use super::tenant::{TenantView, VersionView, tenant_path, versions_table};
use super::timefmt::{format_duration, rfc3339, rfc3339_or_dash};

/// `GET /v1/tenants/{t}/keys/usage`.
#[derive(Debug, Deserialize)]
struct Usage {
    versions: Vec<VersionUsage>,
}

/// One version's usage.
#[derive(Debug, Deserialize)]
struct VersionUsage {
    version: u32,
    state: String,
    created_at: i64,
    records_issued: u64,
    #[serde(default)]
    unwraps_24h: u64,
    #[serde(default)]
    last_unwrap_at: Option<i64>,
}

/// `PUT /v1/tenants/{t}/keys/auto-rotate`.
#[derive(Debug, Deserialize)]
struct AutoRotate {
    rotate_every_secs: Option<u64>,
    next_rotation_at: Option<i64>,
}

pub(crate) async fn run(ctx: &Ctx, command: KeyCommand) -> Result<(), AdminError> {
    let client = ctx.client()?;
    match command {
        KeyCommand::Rotate(t) => {
            let path = format!("{}/keys/rotate", tenant_path(&t.tenant));
            let answer = client.post_empty(&path).await?;
            let v: VersionView = decode(&answer, "key rotate")?;
            emit_line(
                ctx.output,
                &answer,
                &format!(
                    "tenant {}: KEK version {} is active; older versions are decrypt-only \
                     (rewrap records with `keygate admin rewrap`)",
                    t.tenant, v.version
                ),
            )
        }
        KeyCommand::List(t) => {
            let answer = client.get(&tenant_path(&t.tenant)).await?;
            let view: TenantView = decode(&answer, "key list")?;
            emit(ctx.output, &answer, None, || versions_table(&view.versions))
        }
        KeyCommand::State { tenant, version, state } => {
            let action = match state {
                KeyState::Enable => "enable",
                KeyState::Disable => "disable",
                KeyState::DecryptOnly => "decrypt_only",
            };
            let path = format!("{}/keys/{version}/state", tenant_path(&tenant));
            let answer = client.post(&path, &json!({ "action": action })).await?;
            let v: VersionView = decode(&answer, "key state")?;
            emit_line(
                ctx.output,
                &answer,
                &format!("tenant {tenant}: KEK version {} is now {}", v.version, v.state),
            )
        }
        KeyCommand::Usage(t) => {
            let answer = client.get(&format!("{}/keys/usage", tenant_path(&t.tenant))).await?;
            let usage: Usage = decode(&answer, "key usage")?;
            emit(ctx.output, &answer, None, || {
                let mut table = Table::new(&[
                    "VERSION",
                    "STATE",
                    "CREATED",
                    "RECORDS_ISSUED",
                    "UNWRAPS_24H",
                    "LAST_UNWRAP",
                ]);
                for v in &usage.versions {
                    table.row(vec![
                        v.version.to_string(),
                        v.state.clone(),
                        rfc3339(v.created_at),
                        v.records_issued.to_string(),
                        v.unwraps_24h.to_string(),
                        rfc3339_or_dash(v.last_unwrap_at),
                    ]);
                }
                table
            })
        }
        KeyCommand::AutoRotate { tenant, every, off } => {
            let every = if off { None } else { every };
            let path = format!("{}/keys/auto-rotate", tenant_path(&tenant));
            let answer = client.put(&path, &json!({ "every_secs": every })).await?;
            let set: AutoRotate = decode(&answer, "key auto-rotate")?;
            let text = match set.rotate_every_secs {
                Some(secs) => format!(
                    "tenant {tenant}: rotates every {}; next rotation at {}",
                    format_duration(secs),
                    rfc3339_or_dash(set.next_rotation_at)
                ),
                None => format!("tenant {tenant}: automatic rotation is off"),
            };
            emit_line(ctx.output, &answer, &text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_answers_decode() {
        let answer = json!({"tenant":"t","versions":[{"version":1,"state":"active",
            "created_at":1700000000,"records_issued":12,"unwraps":30,"unwraps_24h":30,
            "last_unwrap_at":null}]});
        let usage: Usage = decode(&answer, "key usage").unwrap();
        assert_eq!(usage.versions.len(), 1);
        assert_eq!(usage.versions[0].last_unwrap_at, None);
        let off = json!({"tenant":"t","rotate_every_secs":null,"next_rotation_at":null});
        let off: AutoRotate = decode(&off, "key auto-rotate").unwrap();
        assert_eq!(off.rotate_every_secs, None);
    }
}
