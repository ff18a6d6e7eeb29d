//! Reaching master keys other than the configured one: the keystore records
//! each master's provider settings (paths and secret *names*, never
//! secrets), and after a master rotation — or in the middle of one — an
//! instance connects to the masters its keys are wrapped under from those.

use std::sync::Arc;

use async_trait::async_trait;
use kms_core::store::{KeyStore, MasterRecord, StoreError};
use kms_core::{MasterConnector, RootKeyError, RootKeyProvider};

use super::startup::root_provider;
use crate::config::RootConfig;

/// Connects to recorded masters with the same code that connects the
/// configured root key.
#[derive(Debug, Default)]
pub(crate) struct RecordedMasters;

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
        let config: RootConfig = serde_json::from_str(settings)
            .map_err(|e| misconfigured(format!("recorded settings unreadable: {e}")))?;
        crate::config::check_durations(config.durations())
            .map_err(|e| misconfigured(format!("recorded settings: {e}")))?;
        let provider = root_provider(&config).await.map_err(|e| misconfigured(e.to_string()))?;
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
