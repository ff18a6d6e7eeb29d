//! `keygate admin master show|connect|rotate|create-pkcs11-key`.

use std::path::Path;

use serde::Deserialize;
use serde_json::{Value, json};

use super::Ctx;
use super::args::MasterCommand;
use super::client::decode;
use super::error::{AdminError, toml_error};
use super::output::{Table, emit, io_reason, print_json, println};
use crate::config::{RootConfig, ServerConfig};

/// Largest root-provider file read, in bytes.
const MAX_ROOT_FILE_BYTES: u64 = 64 * 1024;

/// A master key version.
#[derive(Debug, Deserialize)]
struct Master {
    id: i64,
    kind: String,
    #[serde(default)]
    key_ref: String,
    #[serde(default)]
    active: bool,
    #[serde(default)]
    keys_wrapped: Option<u64>,
    /// Absent from a key service older than this CLI.
    #[serde(default)]
    connection: Option<Connection>,
}

/// How the answering key service stands with a master.
#[derive(Debug, Deserialize)]
struct Connection {
    state: String,
    #[serde(default)]
    failures: Option<u32>,
    #[serde(default)]
    retry_in_secs: Option<u64>,
    #[serde(default)]
    last_error: Option<String>,
}

impl Connection {
    /// `connected`, `not tried`, `failing (3x, retry in 40 s): <error>`.
    fn summary(&self) -> String {
        let state = self.state.replace('_', " ");
        let Some(n) = self.failures else { return state };
        let retry = match self.retry_in_secs {
            Some(0) | None => "the next request retries".to_owned(),
            Some(secs) => format!("retry in {secs} s"),
        };
        match &self.last_error {
            Some(error) => format!("{state} ({n}x, {retry}): {error}"),
            // Only admins are shown the error.
            None => format!("{state} ({n}x, {retry})"),
        }
    }
}

/// `GET /v1/master`.
#[derive(Debug, Deserialize)]
struct Masters {
    #[serde(default)]
    active: Option<Master>,
    masters: Vec<Master>,
}

/// `POST /v1/master/rotate`.
#[derive(Debug, Deserialize)]
struct Rotated {
    master: Master,
    rewrapped: Rewrapped,
    remaining: u64,
    state: String,
}

#[derive(Debug, Deserialize)]
struct Rewrapped {
    tenant_keys: u64,
    index_roots: u64,
    audit_signing_keys: u64,
}

/// A file whose `[root]` table is the provider (a whole key service config
/// works too; its other keys are ignored here).
#[derive(Deserialize)]
struct WithRoot {
    root: RootConfig,
}

pub(crate) async fn run(ctx: &Ctx, command: MasterCommand) -> Result<(), AdminError> {
    match command {
        MasterCommand::Show => {
            let answer = ctx.client()?.get("/v1/master").await?;
            let masters: Masters = decode(&answer, "master show")?;
            let title = match &masters.active {
                Some(m) => format!("active master key: {} ({} {})", m.id, m.kind, m.key_ref),
                None => "no active master key".to_owned(),
            };
            emit(ctx.output, &answer, Some(&title), || {
                let mut table =
                    Table::new(&["ID", "KIND", "KEY_REF", "ACTIVE", "KEYS_WRAPPED", "CONNECTION"]);
                for m in &masters.masters {
                    table.row(vec![
                        m.id.to_string(),
                        m.kind.clone(),
                        m.key_ref.clone(),
                        if m.active { "yes" } else { "no" }.to_owned(),
                        m.keys_wrapped.map_or_else(|| "-".to_owned(), |n| n.to_string()),
                        m.connection.as_ref().map_or_else(|| "-".to_owned(), Connection::summary),
                    ]);
                }
                table
            })
        }
        MasterCommand::Connect { id } => {
            let answer = ctx.client()?.post_empty(&format!("/v1/master/{id}/connect")).await?;
            let master: Master = decode(&answer, "master connect")?;
            let state =
                master.connection.as_ref().map_or_else(|| "-".to_owned(), Connection::summary);
            match ctx.output {
                super::OutputFormat::Json => print_json(&answer)?,
                super::OutputFormat::Table => println(&format!(
                    "master key {} ({} {}): {state}",
                    master.id, master.kind, master.key_ref
                ))?,
            }
            Ok(())
        }
        MasterCommand::Rotate { to } => {
            let provider = read_root_provider(&to)?;
            let client = ctx.client()?;
            let answer = client.post("/v1/master/rotate", &json!({ "to": provider })).await?;
            let rotated: Rotated = decode(&answer, "master rotate")?;
            let r = &rotated.rewrapped;
            let summary = format!(
                "master key {} ({} {}) is active; rewrapped {} tenant keys, {} index roots, \
                 {} audit signing keys; {} remaining ({})",
                rotated.master.id,
                rotated.master.kind,
                rotated.master.key_ref,
                r.tenant_keys,
                r.index_roots,
                r.audit_signing_keys,
                rotated.remaining,
                rotated.state
            );
            match ctx.output {
                super::OutputFormat::Json => print_json(&answer)?,
                super::OutputFormat::Table => println(&summary)?,
            }
            if rotated.state != "complete" || rotated.remaining > 0 {
                return Err(AdminError::refused(format!(
                    "master rotation is not complete ({} keys remain); run the same command \
                     again to resume",
                    rotated.remaining
                )));
            }
            Ok(())
        }
        MasterCommand::CreatePkcs11Key { config } => create_pkcs11_key(&config),
    }
}

/// Reads `path` (TOML: the provider table at the top level or under
/// `[root]`), checks it is a valid root provider whose file paths are
/// absolute (the key service reads them on its own host), and returns it
/// as JSON.
fn read_root_provider(path: &Path) -> Result<Value, AdminError> {
    let shown = path.display();
    let fail = |reason: String| AdminError::usage(format!("--to {shown}: {reason}"));
    let meta = std::fs::metadata(path).map_err(|e| fail(io_reason(&e)))?;
    if !meta.is_file() || meta.len() > MAX_ROOT_FILE_BYTES {
        return Err(fail(format!("not a file of at most {MAX_ROOT_FILE_BYTES} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(io_reason(&e)))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| fail(toml_error(&text, &e)))?;
    let provider = if matches!(table.get("root"), Some(toml::Value::Table(_))) {
        toml::from_str::<WithRoot>(&text).map(|w| w.root)
    } else {
        toml::from_str::<RootConfig>(&text)
    }
    .map_err(|e| fail(toml_error(&text, &e)))?;
    if !provider.paths_are_absolute() {
        return Err(fail(
            "file paths must be absolute (the key service reads them on its own host)".to_owned(),
        ));
    }
    serde_json::to_value(&provider).map_err(|e| fail(format!("cannot convert to JSON: {e}")))
}

/// `master create-pkcs11-key --config FILE`: local, talks to the HSM only.
pub(crate) fn create_pkcs11_key(config: &Path) -> Result<(), AdminError> {
    let pkcs11 = ServerConfig::load(config)
        .and_then(|c| {
            c.root
                .pkcs11()?
                .ok_or_else(|| crate::config::ConfigError::new("[root] is not a pkcs11 provider"))
        })
        .map_err(|e| AdminError::usage(e.to_string()))?;
    let info = hsm_adapters::Pkcs11RootKey::create_master_key(&pkcs11)
        .map_err(|e| AdminError::refused(e.to_string()))?;
    println(&format!(
        "created master key {} (CKA_ID {}) in token {}: AES-256, sensitive, non-extractable",
        info.key_label, info.key_id, info.token_label
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_read_as_a_table_cell() {
        let cell = |value: Value| serde_json::from_value::<Connection>(value).unwrap().summary();
        assert_eq!(cell(json!({"state": "connected"})), "connected");
        assert_eq!(cell(json!({"state": "not_tried"})), "not tried");
        let failing = json!({"state": "failing", "failures": 3, "retry_in_secs": 40,
                             "last_error": "C_Login failed: CKR_PIN_INCORRECT"});
        assert_eq!(cell(failing), "failing (3x, retry in 40 s): C_Login failed: CKR_PIN_INCORRECT");
        let due = json!({"state": "failing", "failures": 1, "retry_in_secs": 0, "last_error": "x"});
        assert_eq!(cell(due), "failing (1x, the next request retries): x");
        let to_auditor = json!({"state": "failing", "failures": 2, "retry_in_secs": 9});
        assert_eq!(cell(to_auditor), "failing (2x, retry in 9 s)");
    }

    #[test]
    fn root_provider_files_top_level_or_under_root() {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("top.toml");
        std::fs::write(
            &top,
            "provider = \"pkcs11\"\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\n\
             token_label = \"kg\"\nkey_label = \"master-2\"\npin_file = \"/etc/keygate/pin\"\n",
        )
        .unwrap();
        let value = read_root_provider(&top).unwrap();
        assert_eq!(value["provider"], "pkcs11");
        assert_eq!(value["key_label"], "master-2");

        let nested = dir.path().join("nested.toml");
        std::fs::write(
            &nested,
            "listen = \"127.0.0.1:0\"\n[root]\nprovider = \"aws_kms\"\nregion = \"eu-west-1\"\n\
             key_id = \"alias/kg\"\n",
        )
        .unwrap();
        let value = read_root_provider(&nested).unwrap();
        assert_eq!(value["provider"], "aws_kms");
        assert_eq!(value["key_id"], "alias/kg");
        std::fs::write(&nested, "[root]\nprovider = \"dev_local\"\nkey_file = \"root.key\"\n")
            .unwrap();
        let e = read_root_provider(&nested).unwrap_err().to_string();
        assert!(e.contains("absolute"), "{e}");
    }

    #[test]
    fn bad_root_provider_files_name_the_line_and_never_echo_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "provider = \"pkcs11\"\nmodule = \"/m.so\"\ntoken_label = \"t\"\nkey_label = \"k\"\npin = \"123456\"\n").unwrap();
        let e = read_root_provider(&path).unwrap_err();
        assert_eq!(e.failure(), super::super::error::Failure::Usage);
        let text = e.to_string();
        assert!(text.contains("line 5") && !text.contains("123456"), "{text}");
        std::fs::write(&path, "provider = \"floppy\"\n").unwrap();
        let e = read_root_provider(&path).unwrap_err().to_string();
        assert!(e.contains("unknown variant"), "{e}");
        std::fs::write(&path, "provider = \n").unwrap();
        assert!(read_root_provider(&path).is_err());
        assert!(read_root_provider(&dir.path().join("absent.toml")).is_err());
    }
}
