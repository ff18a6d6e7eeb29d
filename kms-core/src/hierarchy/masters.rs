//! The master keys an instance can use: the configured one, and any other
//! the keystore still has keys wrapped under (after a master rotation, or
//! in the middle of one), connected on first use from the provider
//! settings the keystore recorded.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;

use super::HierarchyError;
use crate::root::{RootKeyError, RootKeyProvider};
use crate::store::{KeyStore, MasterKeyId, MasterRecord};

/// Connects to a master key from what the keystore recorded about it
/// ([`MasterRecord::config`]); implemented where the providers live.
#[async_trait]
pub trait MasterConnector: Send + Sync + std::fmt::Debug {
    /// A provider for `master`, checked to be that very key.
    async fn connect(
        &self,
        master: &MasterRecord,
    ) -> Result<Arc<dyn RootKeyProvider>, RootKeyError>;
}

/// Providers by master key id.
#[derive(Debug)]
pub(super) struct Masters {
    providers: RwLock<HashMap<MasterKeyId, Arc<dyn RootKeyProvider>>>,
    connector: Option<Arc<dyn MasterConnector>>,
    /// One connection attempt at a time (HSM logins are not free).
    connecting: tokio::sync::Mutex<()>,
}

impl Masters {
    pub(super) fn new(connector: Option<Arc<dyn MasterConnector>>) -> Self {
        Self { providers: RwLock::default(), connector, connecting: tokio::sync::Mutex::new(()) }
    }

    pub(super) fn insert(&self, id: MasterKeyId, provider: Arc<dyn RootKeyProvider>) {
        if let Ok(mut map) = self.providers.write() {
            map.insert(id, provider);
        }
    }

    fn cached(&self, id: MasterKeyId) -> Option<Arc<dyn RootKeyProvider>> {
        self.providers.read().ok().and_then(|map| map.get(&id).cloned())
    }

    /// The provider of master `id`, connecting to it if needed.
    pub(super) async fn get(
        &self,
        store: &dyn KeyStore,
        id: MasterKeyId,
    ) -> Result<Arc<dyn RootKeyProvider>, HierarchyError> {
        if let Some(provider) = self.cached(id) {
            return Ok(provider);
        }
        let Some(connector) = &self.connector else {
            return Err(HierarchyError::ForeignMaster(id.0));
        };
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(provider) = self.cached(id) {
            return Ok(provider);
        }
        let record = store
            .masters()
            .await?
            .into_iter()
            .find(|m| m.id == id)
            .ok_or(HierarchyError::ForeignMaster(id.0))?;
        if record.config.is_none() {
            return Err(HierarchyError::ForeignMaster(id.0));
        }
        let provider = connector.connect(&record).await?;
        tracing::info!(master = id.0, provider = %provider.describe(), "connected to master key");
        self.insert(id, provider.clone());
        Ok(provider)
    }

    /// The keystore's active master key and its provider.
    pub(super) async fn active(
        &self,
        store: &dyn KeyStore,
    ) -> Result<(MasterKeyId, Arc<dyn RootKeyProvider>), HierarchyError> {
        let active = store.masters().await?.into_iter().find(|m| m.active).ok_or_else(|| {
            HierarchyError::Store(crate::store::StoreError::Corrupt(
                "the keystore has no active master key".into(),
            ))
        })?;
        Ok((active.id, self.get(store, active.id).await?))
    }
}
