//! Reaching master keys other than the configured one: the keystore records
//! each master's provider settings (paths and secret *names*, never
//! secrets), and after a master rotation — or in the middle of one — an
//! instance connects to the masters its keys are wrapped under from those,
//! if this host's configuration trusts what they name ([`MasterTrust`]).

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use kms_core::store::{KeyStore, MasterRecord, StoreError};
use kms_core::{MasterConnector, ProviderInfo, RootKeyError, RootKeyProvider};

use super::startup::connect_provider;
use crate::config::{RootConfig, TrustedMasters, arn_account};

/// What this host lets a master other than its configured root load or
/// reach: the configured root's PKCS#11 module, AWS KMS endpoint and AWS
/// account, and those listed in `[trusted_masters]`; and, if it lists
/// keys, which master keys.
#[derive(Debug, Clone)]
pub(crate) struct MasterTrust {
    /// The configured root's module, if it is a PKCS#11 one.
    root_module: Option<PathBuf>,
    /// The configured root's endpoint override, if it is an AWS KMS one.
    root_endpoint: Option<String>,
    /// The configured root's AWS account, if it is an AWS KMS key named by
    /// ARN (or, once connected, whatever named it).
    root_account: Option<String>,
    /// The configured root's key (`kind:key_ref`), once connected.
    root_key: Option<String>,
    trusted: TrustedMasters,
}

impl MasterTrust {
    pub(crate) fn new(root: &RootConfig, trusted: &TrustedMasters) -> Self {
        let (root_module, root_endpoint, root_account) = match root {
            RootConfig::Pkcs11 { module, .. } => (Some(module.clone()), None, None),
            RootConfig::AwsKms { endpoint_url, key_id, .. } => {
                (None, endpoint_url.clone(), arn_account(key_id).map(str::to_owned))
            }
            RootConfig::DevLocal { .. } => (None, None, None),
        };
        Self { root_module, root_endpoint, root_account, root_key: None, trusted: trusted.clone() }
    }

    /// The same, knowing the configured root's key (a rotation back to it
    /// needs no entry in `trusted_masters.keys`, and an AWS KMS root named
    /// by alias shows its account).
    pub(crate) fn with_root_key(mut self, root: &ProviderInfo) -> Self {
        if root.kind == hsm_adapters::AWS_KMS_PROVIDER_KIND
            && let Some(account) = arn_account(&root.key_ref)
        {
            self.root_account = Some(account.to_owned());
        }
        self.root_key = Some(root.to_string());
        self
    }

    /// Why `config` may not be used as a master, if it may not: it names a
    /// module or an endpoint this host does not trust, or (when
    /// `trusted_masters.keys` is set) a key that is not listed, as far as
    /// the settings tell before connecting. Modules compare as paths (no
    /// `..` or symlink resolved; a module path that is not absolute is
    /// refused when connecting), endpoints as text without a trailing `/`.
    pub(crate) fn refusal(&self, config: &RootConfig) -> Option<String> {
        match config {
            RootConfig::Pkcs11 { module, token_label, key_label, .. } => {
                let configured = self.root_module.as_ref() == Some(module);
                let listed = self.trusted.pkcs11_modules.iter().any(|m| m == module);
                if !configured && !listed {
                    return Some(format!(
                        "the PKCS#11 module {module:?} is neither [root]'s nor listed in \
                         trusted_masters.pkcs11_modules"
                    ));
                }
                self.key_refusal(&format!("pkcs11:{token_label}/{key_label}"))
            }
            RootConfig::AwsKms { endpoint_url, key_id, .. } => {
                if let Some(endpoint) = endpoint_url {
                    let same =
                        |other: &str| other.trim_end_matches('/') == endpoint.trim_end_matches('/');
                    let configured = self.root_endpoint.as_deref().is_some_and(same);
                    let listed = self.trusted.aws_kms_endpoints.iter().any(|e| same(e));
                    if !configured && !listed {
                        return Some(format!(
                            "the AWS KMS endpoint {:?} is neither [root]'s nor listed in \
                             trusted_masters.aws_kms_endpoints",
                            hsm_adapters::endpoint_without_userinfo(endpoint)
                        ));
                    }
                }
                let key = format!("aws-kms:{key_id}");
                // A key ARN names the key; an alias shows it only once connected.
                if crate::config::is_key_arn(key_id)
                    && let Some(reason) = self.key_refusal(&key)
                {
                    return Some(reason);
                }
                // Only an ARN reaches another account: the key service's
                // credentials may be granted a key someone else controls,
                // who could then unwrap every key wrapped under it.
                let account = arn_account(key_id)?;
                let root_account = self.root_account.as_deref() == Some(account);
                let listed_account = self.trusted.aws_kms_accounts.iter().any(|a| a == account);
                let listed_key = self.trusted.keys.iter().flatten().any(|k| *k == key);
                (!root_account && !listed_account && !listed_key).then(|| {
                    format!(
                        "the AWS KMS key {key_id} is in account {account}, neither [root]'s \
                         nor listed in trusted_masters.aws_kms_accounts"
                    )
                })
            }
            RootConfig::DevLocal { key_file, create_if_missing, .. } => {
                // A key made now has a fingerprint nobody could have listed.
                let listing = self.trusted.keys.is_some();
                let new_key = listing && *create_if_missing && !key_file.exists();
                new_key.then(|| {
                    format!(
                        "a new key file {key_file:?} could not be listed in trusted_masters.keys"
                    )
                })
            }
        }
    }

    /// Why the master key `key` (`kind:key_ref`, as `GET /v1/master` names
    /// it) may not be used, if it may not: `trusted_masters.keys` is set and
    /// names neither it nor the configured root's.
    pub(crate) fn key_refusal(&self, key: &str) -> Option<String> {
        let keys = self.trusted.keys.as_ref()?;
        let listed = self.root_key.as_deref() == Some(key) || keys.iter().any(|k| k == key);
        (!listed).then(|| {
            format!("the master key {key} is neither [root]'s nor listed in trusted_masters.keys")
        })
    }
}

/// Connects to recorded masters with the same code that connects the
/// configured root key, once [`MasterTrust`] allows what they name.
#[derive(Debug)]
pub(crate) struct RecordedMasters {
    trust: Arc<MasterTrust>,
}

impl RecordedMasters {
    pub(crate) fn new(trust: Arc<MasterTrust>) -> Self {
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
        config.check_timers().map_err(|e| misconfigured(format!("recorded settings: {e}")))?;
        // Recorded settings reach a key file that exists; they never make one.
        if let RootConfig::DevLocal { create_if_missing, .. } = &mut config {
            *create_if_missing = false;
        }
        // The key the row names is checked before anything is loaded or
        // logged in to; once connected, the provider must be that key.
        let named = format!("{}:{}", master.kind, master.key_ref);
        if let Some(reason) = self.trust.refusal(&config).or_else(|| self.trust.key_refusal(&named))
        {
            return Err(misconfigured(format!("recorded settings refused: {reason}")));
        }
        let provider = connect_provider(&config).await.map_err(|failure| {
            let detail =
                format!("master key #{}: {}: {}", master.id.0, failure.step, failure.detail);
            // An outage is tried again sooner than wrong settings.
            if failure.retryable {
                RootKeyError::Unavailable { provider: "recorded master", detail }
            } else {
                RootKeyError::Misconfigured { provider: "recorded master", detail }
            }
        })?;
        let info = provider.describe();
        if info.kind != master.kind || info.key_ref != master.key_ref {
            return Err(misconfigured(format!(
                "the recorded settings now reach {info}, not {}:{}",
                master.kind, master.key_ref
            )));
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
            aws_kms_accounts: Vec::new(),
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
        // What the refusal shows (in the answer and the audit log) holds no
        // credentials an endpoint might carry.
        let with_password = kms(Some("https://user:s3cret@kms.attacker.example/x"));
        let refused = hsm_root.refusal(&with_password).unwrap();
        assert!(refused.contains("\"https://kms.attacker.example/x\""), "{refused}");
        assert!(!refused.contains("s3cret") && !refused.contains("user"), "{refused}");
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
        let root = ProviderInfo { kind: "pkcs11", key_ref: "prod/master-1".into() };
        // No list: any key behind a trusted module or endpoint.
        let open = MasterTrust::new(&local(), &Default::default()).with_root_key(&root);
        assert_eq!(open.key_refusal("pkcs11:prod/other"), None);

        let trusted = TrustedMasters {
            pkcs11_modules: vec!["/opt/hsm/listed.so".into()],
            keys: Some(vec!["pkcs11:prod/master-2".into()]),
            ..Default::default()
        };
        let strict = MasterTrust::new(&local(), &trusted).with_root_key(&root);
        assert_eq!(strict.key_refusal("pkcs11:prod/master-2"), None);
        assert_eq!(strict.key_refusal("pkcs11:prod/master-1"), None, "[root]'s own key");
        let refused = strict.key_refusal("pkcs11:prod/master-3").unwrap();
        assert!(
            refused.contains("pkcs11:prod/master-3") && refused.contains("trusted_masters.keys"),
            "{refused}"
        );
        // An empty list: only the configured root's key.
        let none = TrustedMasters { keys: Some(Vec::new()), ..Default::default() };
        let only_root = MasterTrust::new(&local(), &none).with_root_key(&root);
        assert_eq!(only_root.key_refusal("pkcs11:prod/master-1"), None);
        assert!(only_root.key_refusal("pkcs11:prod/master-2").is_some());

        // Before connecting, as far as the settings name the key: a PKCS#11
        // token and label, an AWS KMS key ARN (an alias shows its key only
        // once connected), a new key file (which nobody could have listed).
        let hsm = |label: &str| {
            settings(json!({"provider": "pkcs11", "module": "/opt/hsm/listed.so",
                            "token_label": "prod", "key_label": label, "pin_env": "PIN"}))
        };
        assert_eq!(strict.refusal(&hsm("master-2")), None);
        assert!(strict.refusal(&hsm("master-3")).unwrap().contains("trusted_masters.keys"));
        let arn = "arn:aws:kms:eu-west-1:999999999999:key/0000";
        let kms_key = |key_id: &str| {
            settings(json!({"provider": "aws_kms", "region": "eu-west-1", "key_id": key_id}))
        };
        assert!(strict.refusal(&kms_key(arn)).is_some());
        assert_eq!(strict.refusal(&kms_key("alias/k")), None);
        let dir = tempfile::tempdir().unwrap();
        let new_file = settings(json!({"provider": "dev_local", "create_if_missing": true,
                                        "key_file": dir.path().join("new.key")}));
        assert!(strict.refusal(&new_file).unwrap().contains("could not be listed"));
        assert_eq!(open.refusal(&new_file), None, "no list, no refusal");
    }

    #[test]
    fn an_aws_kms_key_of_another_account_needs_the_account_listed() {
        let key_in = |account: &str| {
            settings(json!({"provider": "aws_kms", "region": "eu-west-1",
                            "key_id": format!("arn:aws:kms:eu-west-1:{account}:key/0000")}))
        };
        let alias_in = |account: &str| {
            settings(json!({"provider": "aws_kms", "region": "us-east-1",
                            "key_id": format!("arn:aws:kms:us-east-1:{account}:alias/prod")}))
        };
        let root_arn = "arn:aws:kms:eu-west-1:111122223333:key/root";
        let root = settings(json!({"provider": "aws_kms", "region": "eu-west-1",
                                   "key_id": root_arn}));

        // [root]'s account, in any region, by key or alias ARN.
        let kms_root = MasterTrust::new(&root, &Default::default());
        assert_eq!(kms_root.refusal(&key_in("111122223333")), None);
        assert_eq!(kms_root.refusal(&alias_in("111122223333")), None);
        // Another account is refused, by key or alias ARN, whatever endpoint.
        for target in [key_in("999999999999"), alias_in("999999999999")] {
            let refused = kms_root.refusal(&target).unwrap();
            assert!(
                refused.contains("account 999999999999")
                    && refused.contains("trusted_masters.aws_kms_accounts"),
                "{refused}"
            );
        }
        // A bare id or alias is looked up in the credentials' own account.
        assert_eq!(kms_root.refusal(&kms(None)), None);

        // A root named by alias shows its account once connected.
        let connected = ProviderInfo { kind: "aws-kms", key_ref: root_arn.into() };
        let by_alias = MasterTrust::new(&kms(None), &Default::default());
        assert!(by_alias.refusal(&key_in("111122223333")).is_some());
        let by_alias = by_alias.with_root_key(&connected);
        assert_eq!(by_alias.refusal(&key_in("111122223333")), None);
        assert!(by_alias.refusal(&key_in("999999999999")).is_some());

        // A root outside AWS KMS trusts no account by itself.
        let hsm_root =
            MasterTrust::new(&pkcs11("/usr/lib/softhsm/libsofthsm2.so"), &Default::default());
        assert!(hsm_root.refusal(&key_in("111122223333")).is_some());

        // Listed accounts, or the key itself listed.
        let listed =
            TrustedMasters { aws_kms_accounts: vec!["999999999999".into()], ..Default::default() };
        let with_account = MasterTrust::new(&local(), &listed);
        assert_eq!(with_account.refusal(&key_in("999999999999")), None);
        assert_eq!(with_account.refusal(&alias_in("999999999999")), None);
        assert!(with_account.refusal(&key_in("555555555555")).is_some());
        let other = "arn:aws:kms:eu-west-1:555555555555:key/0000";
        let keys =
            TrustedMasters { keys: Some(vec![format!("aws-kms:{other}")]), ..Default::default() };
        let with_key = MasterTrust::new(&local(), &keys);
        assert_eq!(with_key.refusal(&key_in("555555555555")), None);
        // With keys listed, an unlisted key is refused by the list first.
        let refused = with_key.refusal(&key_in("666666666666")).unwrap();
        assert!(refused.contains("trusted_masters.keys"), "{refused}");
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
        let connector =
            RecordedMasters::new(Arc::new(MasterTrust::new(&local(), &Default::default())));
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
}
