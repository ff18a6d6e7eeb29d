//! Reaching master keys other than the configured one: the keystore records
//! each master's provider settings (paths and secret *names*, never
//! secrets), and after a master rotation — or in the middle of one — an
//! instance connects to the masters its keys are wrapped under from those,
//! if this host's configuration trusts what they name ([`MasterTrust`]).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use kms_core::store::{KeyStore, MasterRecord, StoreError};
use kms_core::{MasterConnector, ProviderInfo, RootKeyError, RootKeyProvider};

use super::startup::root_provider;
use crate::config::{RootConfig, TrustedMasters};

/// What this host lets a master other than its configured root load or
/// reach: the configured root's PKCS#11 module and AWS KMS endpoint, and
/// those listed in `[trusted_masters]`; and, if it lists keys, which
/// master keys.
#[derive(Debug, Clone)]
pub(crate) struct MasterTrust {
    root: RootConfig,
    /// The configured root's key (`kind:key_ref`), once connected.
    root_key: Option<String>,
    trusted: TrustedMasters,
}

impl MasterTrust {
    pub(crate) fn new(root: &RootConfig, trusted: &TrustedMasters) -> Self {
        Self { root: root.clone(), root_key: None, trusted: trusted.clone() }
    }

    /// The same, knowing the configured root's key (a rotation back to it
    /// needs no entry in `trusted_masters.keys`).
    pub(crate) fn with_root_key(mut self, root: &ProviderInfo) -> Self {
        self.root_key = Some(root.to_string());
        self
    }

    /// Why the master key `key`, reached through trusted settings, may not
    /// be used, if it may not: `trusted_masters.keys` is set and names
    /// neither it nor the configured root's.
    pub(crate) fn key_refusal(&self, key: &ProviderInfo) -> Option<String> {
        let keys = self.trusted.keys.as_ref()?;
        let name = key.to_string();
        let listed = self.root_key.as_ref() == Some(&name) || keys.contains(&name);
        (!listed).then(|| {
            format!("the master key {name} is neither [root]'s nor listed in trusted_masters.keys")
        })
    }

    /// Why `config` may not be used as a master, if it may not: it names a
    /// module or an endpoint this host does not trust. Modules compare as
    /// paths (no `..` or symlink resolved; a module may be a bare name the
    /// loader searches for), endpoints as text without a trailing `/`.
    pub(crate) fn refusal(&self, config: &RootConfig) -> Option<String> {
        match config {
            RootConfig::Pkcs11 { module, .. } => {
                let configured =
                    matches!(&self.root, RootConfig::Pkcs11 { module: ours, .. } if ours == module);
                let listed = self.trusted.pkcs11_modules.iter().any(|m| m == module);
                (!configured && !listed).then(|| {
                    format!(
                        "the PKCS#11 module {} is neither [root]'s nor listed in \
                         trusted_masters.pkcs11_modules",
                        quoted(module)
                    )
                })
            }
            RootConfig::AwsKms { endpoint_url: Some(endpoint), .. } => {
                let same =
                    |other: &str| other.trim_end_matches('/') == endpoint.trim_end_matches('/');
                let configured = matches!(
                    &self.root,
                    RootConfig::AwsKms { endpoint_url: Some(ours), .. } if same(ours)
                );
                let listed = self.trusted.aws_kms_endpoints.iter().any(|e| same(e));
                (!configured && !listed).then(|| {
                    format!(
                        "the AWS KMS endpoint {endpoint:?} is neither [root]'s nor listed in \
                         trusted_masters.aws_kms_endpoints"
                    )
                })
            }
            RootConfig::AwsKms { endpoint_url: None, .. } | RootConfig::DevLocal { .. } => None,
        }
    }
}

fn quoted(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// Connects to recorded masters with the same code that connects the
/// configured root key, once [`MasterTrust`] allows what they name.
#[derive(Debug)]
pub(crate) struct RecordedMasters {
    trust: MasterTrust,
}

impl RecordedMasters {
    pub(crate) fn new(trust: MasterTrust) -> Self {
        Self { trust }
    }
}

#[async_trait]
impl MasterConnector for RecordedMasters {
    async fn connect(
        &self,
        master: &MasterRecord,
    ) -> Result<Arc<dyn RootKeyProvider>, RootKeyError> {
        let misconfigured = |detail: String| RootKeyError::Misconfigured {
            provider: "recorded master",
            detail: format!("master key #{}: {detail}", master.id.0),
        };
        let settings = master
            .config
            .as_deref()
            .ok_or_else(|| misconfigured("no connection settings recorded".into()))?;
        let mut config: RootConfig = serde_json::from_str(settings)
            .map_err(|e| misconfigured(format!("recorded settings unreadable: {e}")))?;
        crate::config::check_durations(config.durations())
            .map_err(|e| misconfigured(format!("recorded settings: {e}")))?;
        if let Some(reason) = self.trust.refusal(&config) {
            return Err(misconfigured(format!("recorded settings refused: {reason}")));
        }
        // Recorded settings reach a key file that exists; they never make one.
        if let RootConfig::DevLocal { create_if_missing, .. } = &mut config {
            *create_if_missing = false;
        }
        let provider = root_provider(&config).await.map_err(|e| misconfigured(e.to_string()))?;
        let info = provider.describe();
        if info.kind != master.kind || info.key_ref != master.key_ref {
            return Err(misconfigured(format!(
                "the recorded settings now reach {info}, not {}:{}",
                master.kind, master.key_ref
            )));
        }
        if let Some(reason) = self.trust.key_refusal(&info) {
            return Err(misconfigured(format!("recorded settings refused: {reason}")));
        }
        Ok(provider)
    }
}

/// The settings to record for `config`.
pub(crate) fn recorded_settings(config: &RootConfig) -> Result<String, String> {
    let absolute = config.with_absolute_paths().map_err(|e| e.to_string())?;
    serde_json::to_string(&absolute).map_err(|e| e.to_string())
}

/// The masters in use (the active one, and every one that still wraps a
/// key), as (kind, key reference): what `root_key.hardware_backed` checks
/// besides the configured root.
pub(crate) async fn masters_in_use(
    store: &dyn KeyStore,
) -> Result<Vec<(String, String)>, StoreError> {
    let counts = store.keys_per_master().await?;
    let wraps_keys =
        |master: &MasterRecord| counts.iter().any(|(id, n)| *id == master.id && *n > 0);
    Ok(store
        .masters()
        .await?
        .into_iter()
        .filter(|m| m.active || wraps_keys(m))
        .map(|m| (m.kind, m.key_ref))
        .collect())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn settings(value: serde_json::Value) -> RootConfig {
        serde_json::from_value(value).unwrap()
    }

    fn pkcs11(module: &str) -> RootConfig {
        settings(json!({"provider": "pkcs11", "module": module, "token_label": "t",
                        "key_label": "k", "pin_env": "PIN"}))
    }

    fn kms(endpoint: Option<&str>) -> RootConfig {
        settings(json!({"provider": "aws_kms", "region": "eu-west-1", "key_id": "alias/k",
                        "endpoint_url": endpoint}))
    }

    fn local() -> RootConfig {
        settings(json!({"provider": "dev_local", "key_file": "/keys/root.key"}))
    }

    #[test]
    fn modules_and_endpoints_must_be_the_roots_or_listed() {
        let trusted = TrustedMasters {
            pkcs11_modules: vec!["/opt/hsm/listed.so".into()],
            aws_kms_endpoints: vec!["https://vpce.example:443/".into()],
            keys: None,
        };
        let hsm_root = MasterTrust::new(&pkcs11("/usr/lib/softhsm/libsofthsm2.so"), &trusted);
        assert_eq!(hsm_root.refusal(&pkcs11("/usr/lib/softhsm/libsofthsm2.so")), None);
        assert_eq!(hsm_root.refusal(&pkcs11("/opt/hsm/listed.so")), None);
        let refused = hsm_root.refusal(&pkcs11("/tmp/evil.so")).unwrap();
        assert!(
            refused.contains("\"/tmp/evil.so\"")
                && refused.contains("trusted_masters.pkcs11_modules"),
            "{refused}"
        );
        // Exactly as written: another spelling, or a bare name the loader
        // would search for, is not the listed file.
        assert!(hsm_root.refusal(&pkcs11("/opt/hsm/../hsm/listed.so")).is_some());
        assert!(hsm_root.refusal(&pkcs11("listed.so")).is_some());

        // No endpoint override: AWS's own endpoint, nothing to list.
        assert_eq!(hsm_root.refusal(&kms(None)), None);
        assert_eq!(hsm_root.refusal(&kms(Some("https://vpce.example:443"))), None);
        let refused = hsm_root.refusal(&kms(Some("https://kms.attacker.example"))).unwrap();
        assert!(refused.contains("trusted_masters.aws_kms_endpoints"), "{refused}");
        assert_eq!(hsm_root.refusal(&local()), None);

        // The configured root's own endpoint and module need no entry.
        let kms_root = MasterTrust::new(&kms(Some("http://127.0.0.1:5000")), &Default::default());
        assert_eq!(kms_root.refusal(&kms(Some("http://127.0.0.1:5000/"))), None);
        assert!(kms_root.refusal(&kms(Some("http://127.0.0.1:5001"))).is_some());
        assert!(kms_root.refusal(&pkcs11("/usr/lib/softhsm/libsofthsm2.so")).is_some());
        let local_root = MasterTrust::new(&local(), &Default::default());
        assert!(local_root.refusal(&pkcs11("/usr/lib/softhsm/libsofthsm2.so")).is_some());
    }

    #[test]
    fn listed_keys_bound_which_master_keys_may_be_used() {
        let key = |kind, key_ref: &str| ProviderInfo { kind, key_ref: key_ref.to_owned() };
        let root = key("pkcs11", "prod/master-1");
        // No list: any key behind a trusted module or endpoint.
        let open = MasterTrust::new(&local(), &Default::default()).with_root_key(&root);
        assert_eq!(open.key_refusal(&key("pkcs11", "prod/other")), None);

        let trusted = TrustedMasters {
            keys: Some(vec!["pkcs11:prod/master-2".into()]),
            ..Default::default()
        };
        let strict = MasterTrust::new(&local(), &trusted).with_root_key(&root);
        assert_eq!(strict.key_refusal(&key("pkcs11", "prod/master-2")), None);
        assert_eq!(strict.key_refusal(&root), None, "the configured root's own key");
        let refused = strict.key_refusal(&key("pkcs11", "prod/master-3")).unwrap();
        assert!(
            refused.contains("pkcs11:prod/master-3") && refused.contains("trusted_masters.keys"),
            "{refused}"
        );
        let arn = "arn:aws:kms:eu-west-1:999999999999:key/0000";
        assert!(strict.key_refusal(&key("aws-kms", arn)).is_some());
        // An empty list: only the configured root's key.
        let none = TrustedMasters { keys: Some(Vec::new()), ..Default::default() };
        let only_root = MasterTrust::new(&local(), &none).with_root_key(&root);
        assert_eq!(only_root.key_refusal(&root), None);
        assert!(only_root.key_refusal(&key("pkcs11", "prod/master-2")).is_some());
    }

    fn recorded(settings: serde_json::Value) -> MasterRecord {
        MasterRecord {
            id: kms_core::store::MasterKeyId(2),
            kind: "local".into(),
            key_ref: "recorded".into(),
            config: Some(settings.to_string()),
            active: true,
            created_at: 0,
        }
    }

    #[tokio::test]
    async fn recorded_settings_are_checked_and_never_create_a_key_file() {
        let connector = RecordedMasters::new(MasterTrust::new(&local(), &Default::default()));
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("new-root.key");
        let asks_to_create = recorded(json!({"provider": "dev_local", "key_file": key_file,
                                             "create_if_missing": true}));
        let error = connector.connect(&asks_to_create).await.unwrap_err().to_string();
        assert!(error.contains("master key #2"), "{error}");
        assert!(!key_file.exists(), "recorded settings created a key file");

        // A module nobody listed is refused by name, not tried (a missing
        // file would otherwise be reported as such).
        let module = dir.path().join("evil.so");
        let unlisted = recorded(json!({"provider": "pkcs11", "module": module,
                                       "token_label": "t", "key_label": "k", "pin_env": "PIN"}));
        let error = connector.connect(&unlisted).await.unwrap_err().to_string();
        assert!(
            error.contains("recorded settings refused") && error.contains("evil.so"),
            "{error}"
        );
    }

    #[test]
    fn the_server_config_reads_the_trusted_masters_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.toml");
        let base = "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\
                    [tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\n\
                    [root]\nprovider = \"dev_local\"\nkey_file = \"root.key\"\n\
                    [policy]\nfile = \"policy.toml\"\n";
        std::fs::write(&path, base).unwrap();
        let config = crate::config::ServerConfig::load(&path).unwrap();
        assert!(config.trusted_masters.pkcs11_modules.is_empty());
        assert!(config.trusted_masters.aws_kms_endpoints.is_empty());
        assert_eq!(config.trusted_masters.keys, None);

        let table = "[trusted_masters]\npkcs11_modules = [\"/usr/lib/softhsm/libsofthsm2.so\"]\n\
                     aws_kms_endpoints = [\"https://kms.example\"]\n\
                     keys = [\"pkcs11:prod/master-2\"]\n";
        std::fs::write(&path, format!("{base}{table}")).unwrap();
        let config = crate::config::ServerConfig::load(&path).unwrap();
        let trusted = config.trusted_masters;
        assert_eq!(trusted.pkcs11_modules, [Path::new("/usr/lib/softhsm/libsofthsm2.so")]);
        assert_eq!(trusted.aws_kms_endpoints, ["https://kms.example"]);
        assert_eq!(trusted.keys, Some(vec!["pkcs11:prod/master-2".to_owned()]));

        std::fs::write(&path, format!("{base}[trusted_masters]\nmodules = []\n")).unwrap();
        let error = crate::config::ServerConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains("unknown field"), "{error}");
    }
}
