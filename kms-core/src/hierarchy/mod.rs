//! The key hierarchy service object (DESIGN §2): creates tenants, rotates
//! KEKs, issues batches of DEKs and unwraps or rewraps them.
//!
//! Tenant keys leave the store only wrapped and are unwrapped by the root
//! key provider; unwrapped keys are held in a bounded-TTL cache and wiped on
//! expiry. Plaintext DEKs are returned to the caller and never stored.

mod cache;
mod lifecycle;
mod masters;
mod usage;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use self::cache::CacheStats;
use self::cache::{Cached, KeyCache, Slot};
pub use self::lifecycle::MasterRotation;
use self::masters::Masters;
pub use self::masters::{ConnectBackoff, MasterConnection, MasterConnector};
use self::usage::UsageMeter;
use crate::crypto::Aead;
use crate::crypto::rng::RandomError;
use crate::dek::{self, DekBinding, IssuedDek, KekVersion, WrappedDek};
use crate::ids::{RecordKeyId, TenantId};
use crate::kek::{InvalidTransition, KekState, StateChange};
use crate::record::SchemaKeys;
use crate::root::{RootKeyError, RootKeyProvider, WrapContext};
use crate::schema::Schema;
use crate::secret::Key256;
use crate::store::{
    KekRecord, KeyStore, MasterKeyId, MasterRecord, NewTenant, StoreError, TenantRecord,
};

/// How many times a rotation is retried when another writer rotates first.
const ROTATION_ATTEMPTS: usize = 32;

/// Tunables.
#[derive(Debug, Clone)]
pub struct HierarchyConfig {
    /// How long unwrapped tenant keys (and the KEK states cached with them)
    /// stay in memory; also the bound on how long another instance's state
    /// change can go unnoticed here.
    pub key_ttl: Duration,
    /// Most DEKs one issue, unwrap or rewrap call handles.
    pub max_batch: usize,
    /// How long a master that could not be connected is left alone.
    pub master_backoff: ConnectBackoff,
}

impl Default for HierarchyConfig {
    fn default() -> Self {
        Self {
            key_ttl: Duration::from_secs(60),
            max_batch: 10_000,
            master_backoff: ConnectBackoff::default(),
        }
    }
}

/// A hierarchy operation failed as a whole.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HierarchyError {
    /// No such tenant.
    #[error("unknown tenant {0}")]
    UnknownTenant(TenantId),
    /// The tenant exists already.
    #[error("tenant {0} already exists")]
    TenantExists(TenantId),
    /// No such KEK version.
    #[error("tenant {tenant} has no KEK version {version}")]
    UnknownVersion {
        /// Tenant.
        tenant: TenantId,
        /// Version.
        version: KekVersion,
    },
    /// The tenant has no active KEK (shredded), so it can issue nothing.
    #[error("tenant {0} has no active key")]
    NoActiveKey(TenantId),
    /// The tenant's key material was destroyed.
    #[error("the keys of tenant {0} were destroyed")]
    KeyDestroyed(TenantId),
    /// A batch was empty or larger than allowed.
    #[error("batch of {requested} is outside 1..={max}")]
    BatchSize {
        /// Requested size.
        requested: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The requested state change is not allowed.
    #[error(transparent)]
    InvalidTransition(#[from] InvalidTransition),
    /// A key is wrapped under a master key this instance does not hold.
    #[error("key is wrapped under master key #{0}, which this instance is not configured with")]
    ForeignMaster(i64),
    /// The keystore failed.
    #[error(transparent)]
    Store(StoreError),
    /// The root key provider failed.
    #[error(transparent)]
    Root(#[from] RootKeyError),
    /// The OS random number generator failed.
    #[error(transparent)]
    Random(#[from] RandomError),
}

impl From<StoreError> for HierarchyError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TenantExists(t) => Self::TenantExists(t),
            StoreError::UnknownTenant(t) => Self::UnknownTenant(t),
            StoreError::UnknownVersion { tenant, version } => {
                Self::UnknownVersion { tenant, version }
            }
            StoreError::InvalidTransition(t) => Self::InvalidTransition(t),
            StoreError::Shredded(t) => Self::KeyDestroyed(t),
            other => Self::Store(other),
        }
    }
}

/// Why one DEK of a batch could not be unwrapped or rewrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DekError {
    /// Tampered, or presented with another record key id, tenant or version.
    #[error("cannot decrypt")]
    CannotDecrypt,
    /// The KEK version does not exist.
    #[error("unknown KEK version")]
    UnknownVersion,
    /// The KEK version is disabled.
    #[error("KEK version is disabled")]
    VersionDisabled,
    /// The KEK version was destroyed.
    #[error("KEK version was destroyed")]
    KeyDestroyed,
}

/// A wrapped DEK presented for unwrapping or rewrapping.
#[derive(Debug, Clone, Copy)]
pub struct DekRequest {
    /// The record's DEK id.
    pub record_key_id: RecordKeyId,
    /// KEK version it is wrapped under.
    pub kek_version: KekVersion,
    /// The wrapped DEK.
    pub wrapped: WrappedDek,
}

/// A DEK moved to another KEK version (no plaintext leaves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewrapped {
    /// The version it is now wrapped under.
    pub kek_version: KekVersion,
    /// The new wrapped DEK.
    pub wrapped: WrappedDek,
}

/// The key hierarchy of one key-service instance.
#[derive(Debug)]
pub struct KeyHierarchy {
    store: Arc<dyn KeyStore>,
    masters: Masters,
    cache: KeyCache,
    usage: UsageMeter,
    config: HierarchyConfig,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache").finish_non_exhaustive()
    }
}

impl KeyHierarchy {
    /// Registers the root provider's master key in the store (active if
    /// the store has none yet) and returns the hierarchy. Keys wrapped
    /// under any other master are refused with
    /// [`HierarchyError::ForeignMaster`]; see [`KeyHierarchy::open`].
    pub async fn new(
        store: Arc<dyn KeyStore>,
        root: Arc<dyn RootKeyProvider>,
        config: HierarchyConfig,
    ) -> Result<Self, HierarchyError> {
        Self::open(store, root, None, None, config).await
    }

    /// Like [`KeyHierarchy::new`], also recording `root_config` (how to
    /// connect to the configured master again, without secrets) and using
    /// `connector` to reach the other masters the store has keys under —
    /// after a master rotation the store's active master may not be the
    /// configured one, and in the middle of one both hold keys.
    pub async fn open(
        store: Arc<dyn KeyStore>,
        root: Arc<dyn RootKeyProvider>,
        root_config: Option<&str>,
        connector: Option<Arc<dyn MasterConnector>>,
        config: HierarchyConfig,
    ) -> Result<Self, HierarchyError> {
        let info = root.describe();
        let configured = store.register_master(&info).await?;
        if let Some(root_config) = root_config {
            store.set_master_config(configured, root_config).await?;
        }
        let masters = Masters::new(connector, config.master_backoff);
        masters.insert(configured, root);
        match store.masters().await?.into_iter().find(|m| m.active) {
            None => store.activate_master(configured).await?,
            Some(active) if active.id != configured => tracing::warn!(
                configured = %info,
                active = format!("{}:{}", active.kind, active.key_ref),
                "the keystore's active master key is not the configured one (a master \
                 rotation moved it): new keys are wrapped under the active one; update \
                 the configured root key to match"
            ),
            Some(_) => {}
        }
        let hierarchy = Self {
            store,
            masters,
            cache: KeyCache::new(config.key_ttl),
            usage: UsageMeter::default(),
            config,
        };
        // Connect now to every master holding keys, so a missing one shows
        // at start; one that fails is retried when a key needs it.
        for (master, _) in hierarchy.store.keys_per_master().await? {
            if let Err(e) = hierarchy.masters.get(hierarchy.store.as_ref(), master).await {
                tracing::error!(master = master.0, error = %e, "cannot reach a master key");
            }
        }
        Ok(hierarchy)
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// How this instance stands with `master` (as the keystore records it
    /// now): connected, not tried since start, or failing (and when it may
    /// be tried again).
    pub fn master_connection(&self, master: &MasterRecord) -> MasterConnection {
        self.masters.connection(master)
    }

    /// Connects to master key `id` now, even while this instance waits
    /// after a failed attempt ([`ConnectBackoff`]), unless it is connected
    /// already; for after its settings were put right. Only this instance
    /// stops waiting.
    pub async fn connect_master(
        &self,
        id: MasterKeyId,
    ) -> Result<Arc<dyn RootKeyProvider>, HierarchyError> {
        self.masters.connect_now(self.store.as_ref(), id).await
    }

    /// The store's active master key (new keys are wrapped under it) and
    /// its provider.
    pub async fn active_master(
        &self,
    ) -> Result<(MasterKeyId, Arc<dyn RootKeyProvider>), HierarchyError> {
        self.masters.active(self.store.as_ref()).await
    }

    /// The provider of a master key the store references.
    pub async fn master(
        &self,
        id: MasterKeyId,
    ) -> Result<Arc<dyn RootKeyProvider>, HierarchyError> {
        self.masters.get(self.store.as_ref(), id).await
    }

    /// The configuration.
    pub fn config(&self) -> &HierarchyConfig {
        &self.config
    }

    /// Creates a tenant: a random KEK v1 and index root, wrapped by the
    /// master key and stored in one transaction.
    pub async fn create_tenant(&self, id: &TenantId) -> Result<TenantRecord, HierarchyError> {
        let kek = Key256::generate()?;
        let index_root = Key256::generate()?;
        let mut attempts = 0;
        loop {
            let (master, root) = self.active_master().await?;
            let kek_wrapped = root.wrap(&kek, &WrapContext::tenant_kek(id, 1)).await?;
            let index_root_wrapped = root.wrap(&index_root, &WrapContext::index_root(id)).await?;
            let created = self
                .store
                .create_tenant(NewTenant {
                    id: id.clone(),
                    index_root_wrapped,
                    kek_wrapped,
                    master,
                    created_at: unix_now(),
                })
                .await;
            match created {
                // A master rotation activated another master meanwhile:
                // wrap under that one.
                Err(StoreError::MasterNotActive(_)) if attempts < 2 => attempts += 1,
                other => return Ok(other?),
            }
        }
    }

    /// A tenant's metadata and versions.
    pub async fn tenant(&self, id: &TenantId) -> Result<TenantRecord, HierarchyError> {
        self.store.tenant(id).await?.ok_or_else(|| HierarchyError::UnknownTenant(id.clone()))
    }

    /// Adds a new active KEK version; the previous one becomes decrypt-only.
    /// Safe under concurrency: racing rotations each get their own version
    /// and exactly one ends up active.
    pub async fn rotate(&self, id: &TenantId) -> Result<KekRecord, HierarchyError> {
        for _ in 0..ROTATION_ATTEMPTS {
            let tenant = self.tenant(id).await?;
            match self.rotate_from(&tenant).await {
                Ok(Some(record)) => return Ok(record),
                // Another rotation, or a master rotation, came first.
                Ok(None) | Err(HierarchyError::Store(StoreError::MasterNotActive(_))) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(HierarchyError::Store(StoreError::VersionConflict(id.clone())))
    }

    /// Adds the version after the highest of `tenant` as read; `None` if
    /// another writer added one first.
    async fn rotate_from(
        &self,
        tenant: &TenantRecord,
    ) -> Result<Option<KekRecord>, HierarchyError> {
        let prepared = self.prepare_rotation(tenant).await?;
        self.commit_rotation(prepared).await
    }

    /// The first half of a rotation of `tenant` (as read): the new
    /// version's number, and its KEK made and wrapped under the active
    /// master, nothing stored. A caller that must record the rotation
    /// durably before it is made (the key service's audit) does so between
    /// this and [`KeyHierarchy::commit_rotation`].
    pub async fn prepare_rotation(
        &self,
        tenant: &TenantRecord,
    ) -> Result<PreparedRotation, HierarchyError> {
        let id = &tenant.id;
        if tenant.index_root_wrapped.is_none() {
            return Err(HierarchyError::KeyDestroyed(id.clone()));
        }
        let version = tenant.versions.last().map_or(1, |v| v.version + 1);
        let kek = Key256::generate()?;
        let (master, root) = self.active_master().await?;
        let wrapped = root.wrap(&kek, &WrapContext::tenant_kek(id, version)).await?;
        Ok(PreparedRotation { tenant: id.clone(), version, wrapped, master })
    }

    /// Stores a prepared rotation: its version becomes the active one.
    /// `None` if another writer added that version first (prepare again);
    /// [`StoreError::MasterNotActive`] if the master it was wrapped under
    /// stopped being the active one meanwhile (prepare again too).
    pub async fn commit_rotation(
        &self,
        prepared: PreparedRotation,
    ) -> Result<Option<KekRecord>, HierarchyError> {
        let PreparedRotation { tenant, version, wrapped, master } = prepared;
        let added =
            self.store.add_kek_version(&tenant, version, &wrapped, master, unix_now()).await;
        // Whatever the answer: an error may hide a commit whose reply was lost.
        self.cache.invalidate_tenant(&tenant);
        match added {
            Ok(record) => Ok(Some(record)),
            Err(StoreError::VersionConflict(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Changes a KEK version's state (enable, disable, decrypt-only).
    pub async fn change_state(
        &self,
        id: &TenantId,
        version: KekVersion,
        change: StateChange,
    ) -> Result<KekRecord, HierarchyError> {
        let changed = self.store.change_kek_state(id, version, change, unix_now()).await;
        // Whatever the answer: an error may hide a commit whose reply was
        // lost, and a version just disabled must not stay usable here.
        self.cache.invalidate_tenant(id);
        match changed {
            Err(StoreError::UnknownVersion { .. }) if self.store.tenant(id).await?.is_none() => {
                Err(HierarchyError::UnknownTenant(id.clone()))
            }
            other => Ok(other?),
        }
    }

    /// Issues `count` fresh DEKs under the tenant's active KEK version,
    /// each with its own random record key id.
    pub async fn issue_deks(
        &self,
        id: &TenantId,
        count: usize,
    ) -> Result<Vec<IssuedDek>, HierarchyError> {
        let issue = self.prepare_issue(id, count).await?;
        self.issue(issue)
    }

    /// The first half of [`KeyHierarchy::issue_deks`]: fixes the KEK
    /// version and the record key ids, and makes no key. A caller that
    /// must record the issue durably before the keys exist (the key
    /// service's audit) does so between this and [`KeyHierarchy::issue`];
    /// while it waits it holds ids, not keys.
    pub async fn prepare_issue(
        &self,
        id: &TenantId,
        count: usize,
    ) -> Result<DekIssue, HierarchyError> {
        self.check_batch(count)?;
        // The active version (perhaps cached) and its KEK are two lookups;
        // a rotation, here or on another replica, can come between them.
        // Then the version read is no longer active: forget what this
        // instance cached of the tenant and look again. A tenant that
        // really has no active version answers so from the store.
        let mut attempts = 0;
        let (version, kek) = loop {
            let version = self.active_version(id).await?;
            match self.kek(id, version).await? {
                (KekState::Active, Some(kek)) => break (version, kek),
                _ if attempts < 2 => {
                    attempts += 1;
                    self.cache.invalidate_tenant(id);
                }
                _ => {
                    self.cache.invalidate_tenant(id);
                    return Err(HierarchyError::NoActiveKey(id.clone()));
                }
            }
        };
        let record_key_ids =
            (0..count).map(|_| RecordKeyId::generate()).collect::<Result<Vec<_>, _>>()?;
        Ok(DekIssue { tenant: id.clone(), version, kek, record_key_ids })
    }

    /// Makes the DEKs of a prepared issue: a fresh key per record key id,
    /// wrapped under the KEK version the issue was prepared with (even if
    /// the tenant rotated meanwhile: that version stays usable for
    /// decryption, and it is the one the caller recorded).
    pub fn issue(&self, issue: DekIssue) -> Result<Vec<IssuedDek>, HierarchyError> {
        let DekIssue { tenant, version, kek, record_key_ids } = issue;
        let mut out = Vec::with_capacity(record_key_ids.len());
        for record_key_id in record_key_ids {
            let dek = Key256::generate()?;
            let binding =
                DekBinding { tenant: &tenant, kek_version: version, record_key_id: &record_key_id };
            let wrapped = dek::wrap_dek(&kek, &binding, &dek)?;
            out.push(IssuedDek::new(record_key_id, version, wrapped, dek));
        }
        self.usage.issued(&tenant, version, out.len(), unix_now());
        Ok(out)
    }

    /// Unwraps a batch of DEKs of one tenant. The batch fails as a whole
    /// only when the tenant or the infrastructure does; each item otherwise
    /// gets its own result.
    pub async fn unwrap_deks(
        &self,
        id: &TenantId,
        requests: &[DekRequest],
    ) -> Result<Vec<Result<Key256, DekError>>, HierarchyError> {
        self.check_batch(requests.len())?;
        let mut keks: Vec<(KekVersion, Result<Arc<Aead>, DekError>)> = Vec::new();
        let mut out = Vec::with_capacity(requests.len());
        for request in requests {
            let kek = match keks.iter().find(|(v, _)| *v == request.kek_version) {
                Some((_, kek)) => kek.clone(),
                None => {
                    let kek = self.unwrapping_kek(id, request.kek_version).await?;
                    keks.push((request.kek_version, kek.clone()));
                    kek
                }
            };
            out.push(kek.and_then(|kek| {
                let binding = DekBinding {
                    tenant: id,
                    kek_version: request.kek_version,
                    record_key_id: &request.record_key_id,
                };
                dek::unwrap_dek(&kek, &binding, &request.wrapped)
                    .map_err(|_| DekError::CannotDecrypt)
            }));
        }
        let now = unix_now();
        for (version, _) in &keks {
            let unwrapped = requests
                .iter()
                .zip(&out)
                .filter(|(r, result)| r.kek_version == *version && result.is_ok())
                .count();
            self.usage.unwrapped(id, *version, unwrapped, now);
        }
        Ok(out)
    }

    /// Moves a batch of wrapped DEKs to the active KEK version without
    /// returning any plaintext. DEKs already on the active version come back
    /// unchanged.
    pub async fn rewrap_deks(
        &self,
        id: &TenantId,
        requests: &[DekRequest],
    ) -> Result<Vec<Result<Rewrapped, DekError>>, HierarchyError> {
        self.check_batch(requests.len())?;
        let active = self.active_version(id).await?;
        let (KekState::Active, Some(active_kek)) = self.kek(id, active).await? else {
            // Rotated away since the active version was cached.
            self.cache.invalidate_tenant(id);
            return Err(HierarchyError::NoActiveKey(id.clone()));
        };
        let unwrapped = self.unwrap_deks(id, requests).await?;
        let mut out = Vec::with_capacity(requests.len());
        for (request, dek) in requests.iter().zip(unwrapped) {
            out.push(match dek {
                Err(e) => Err(e),
                Ok(_) if request.kek_version == active => {
                    Ok(Rewrapped { kek_version: active, wrapped: request.wrapped })
                }
                Ok(dek) => {
                    let binding = DekBinding {
                        tenant: id,
                        kek_version: active,
                        record_key_id: &request.record_key_id,
                    };
                    Ok(Rewrapped {
                        kek_version: active,
                        wrapped: dek::wrap_dek(&active_kek, &binding, &dek)?,
                    })
                }
            });
        }
        Ok(out)
    }

    /// Derives the index keys of a schema for a tenant.
    pub async fn schema_keys(
        &self,
        id: &TenantId,
        schema: &Schema,
    ) -> Result<SchemaKeys, HierarchyError> {
        let root = self.index_root(id).await?;
        Ok(SchemaKeys::derive(&root, id, schema))
    }

    /// The tenant's unwrapped index root (cached).
    pub async fn index_root(&self, id: &TenantId) -> Result<Arc<Key256>, HierarchyError> {
        if let Some(Cached::IndexRoot(root)) = self.cache.get(id, Slot::IndexRoot) {
            return Ok(root);
        }
        let generation = self.cache.generation(id);
        let tenant = self.tenant(id).await?;
        let wrapped =
            tenant.index_root_wrapped.ok_or_else(|| HierarchyError::KeyDestroyed(id.clone()))?;
        let master = self.master(tenant.index_root_master).await?;
        let root = Arc::new(master.unwrap(&wrapped, &WrapContext::index_root(id)).await?);
        self.cache.insert(id, generation, Slot::IndexRoot, Cached::IndexRoot(root.clone()));
        Ok(root)
    }

    /// Forgets every cached key and state of a tenant (another instance
    /// changed it); the next use reads the store again.
    pub fn invalidate_tenant(&self, id: &TenantId) {
        self.cache.invalidate_tenant(id);
    }

    /// Forgets everything cached (notifications may have been missed).
    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
    }

    /// Drops expired keys from memory; returns how many.
    pub fn evict_expired(&self) -> usize {
        self.cache.evict_expired()
    }

    /// Cache statistics.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    fn check_batch(&self, count: usize) -> Result<(), HierarchyError> {
        if count == 0 || count > self.config.max_batch {
            return Err(HierarchyError::BatchSize { requested: count, max: self.config.max_batch });
        }
        Ok(())
    }

    /// The tenant's active KEK version (cached for the key TTL).
    pub async fn active_version(&self, id: &TenantId) -> Result<KekVersion, HierarchyError> {
        if let Some(Cached::ActiveVersion(v)) = self.cache.get(id, Slot::ActiveVersion) {
            return Ok(v);
        }
        let generation = self.cache.generation(id);
        let tenant = self.tenant(id).await?;
        let active = tenant.active().ok_or_else(|| {
            if tenant.index_root_wrapped.is_none() {
                HierarchyError::KeyDestroyed(id.clone())
            } else {
                HierarchyError::NoActiveKey(id.clone())
            }
        })?;
        self.cache.insert(
            id,
            generation,
            Slot::ActiveVersion,
            Cached::ActiveVersion(active.version),
        );
        Ok(active.version)
    }

    /// A KEK version's state and, if it is usable, its cipher (cached).
    async fn kek(
        &self,
        id: &TenantId,
        version: KekVersion,
    ) -> Result<(KekState, Option<Arc<Aead>>), HierarchyError> {
        if let Some(Cached::Kek { state, aead }) = self.cache.get(id, Slot::Kek(version)) {
            return Ok((state, aead));
        }
        let generation = self.cache.generation(id);
        let record = match self.store.kek(id, version).await? {
            Some(record) => record,
            None if self.store.tenant(id).await?.is_none() => {
                return Err(HierarchyError::UnknownTenant(id.clone()));
            }
            None => return Err(HierarchyError::UnknownVersion { tenant: id.clone(), version }),
        };
        let aead = match (&record.wrapped, record.state.can_unwrap()) {
            (Some(wrapped), true) => {
                let master = self.master(record.master).await?;
                let key = master.unwrap(wrapped, &WrapContext::tenant_kek(id, version)).await?;
                Some(Arc::new(Aead::new(&key)))
            }
            _ => None,
        };
        self.cache.insert(
            id,
            generation,
            Slot::Kek(version),
            Cached::Kek { state: record.state, aead: aead.clone() },
        );
        Ok((record.state, aead))
    }

    /// The cipher for unwrapping under `version`, or why it cannot be used.
    async fn unwrapping_kek(
        &self,
        id: &TenantId,
        version: KekVersion,
    ) -> Result<Result<Arc<Aead>, DekError>, HierarchyError> {
        match self.kek(id, version).await {
            Ok((_, Some(aead))) => Ok(Ok(aead)),
            Ok((KekState::Destroyed, None)) => Ok(Err(DekError::KeyDestroyed)),
            Ok((_, None)) => Ok(Err(DekError::VersionDisabled)),
            Err(HierarchyError::UnknownVersion { .. }) => Ok(Err(DekError::UnknownVersion)),
            Err(e) => Err(e),
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A KEK rotation about to be stored (see
/// [`KeyHierarchy::prepare_rotation`]): the new version's number and its
/// KEK, wrapped under the active master. Holds no plaintext key.
#[derive(Debug)]
pub struct PreparedRotation {
    tenant: TenantId,
    version: KekVersion,
    wrapped: Vec<u8>,
    master: MasterKeyId,
}

impl PreparedRotation {
    /// The version the rotation adds (and makes active).
    pub fn version(&self) -> KekVersion {
        self.version
    }
}

/// DEKs about to be issued (see [`KeyHierarchy::prepare_issue`]): the
/// tenant's active KEK version and one fresh record key id per DEK, the
/// KEK already unwrapped. Holds no DEK.
pub struct DekIssue {
    tenant: TenantId,
    version: KekVersion,
    kek: Arc<Aead>,
    record_key_ids: Vec<RecordKeyId>,
}

impl DekIssue {
    /// The KEK version the DEKs will be wrapped under.
    pub fn kek_version(&self) -> KekVersion {
        self.version
    }

    /// The record key ids, one per DEK, in issue order.
    pub fn record_key_ids(&self) -> &[RecordKeyId] {
        &self.record_key_ids
    }
}

impl std::fmt::Debug for DekIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DekIssue")
            .field("tenant", &self.tenant)
            .field("kek_version", &self.version)
            .field("count", &self.record_key_ids.len())
            .finish_non_exhaustive()
    }
}
