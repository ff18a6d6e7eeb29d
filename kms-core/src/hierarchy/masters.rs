//! The master keys an instance can use: the configured one, and any other
//! the keystore still has keys wrapped under (after a master rotation, or
//! in the middle of one), connected on first use from the provider
//! settings the keystore recorded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

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

/// How long a master that could not be connected is left alone before the
/// next attempt. Without a wait every request needing the master would try
/// again: with a wrong PIN that is a failed `C_Login` per request, which
/// can lock the HSM user out, and a provider that is down would be
/// hammered. Attempts never stop, since both can heal (a PIN file
/// rewritten, an HSM back); each failure in a row doubles the wait, up to
/// a ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectBackoff {
    /// The first wait after a failure that may pass by itself
    /// ([`RootKeyError::is_retryable`]: unavailable, throttled).
    pub transient: Duration,
    /// The longest wait after such failures.
    pub transient_ceiling: Duration,
    /// The first wait after any other failure (refused settings, a
    /// rejected PIN, a missing key), which needs someone to act.
    pub persistent: Duration,
    /// The longest wait after such failures.
    pub persistent_ceiling: Duration,
}

impl Default for ConnectBackoff {
    fn default() -> Self {
        Self {
            transient: Duration::from_secs(1),
            transient_ceiling: Duration::from_secs(60),
            // As long as the PKCS#11 provider's own wait after a rejected PIN.
            persistent: Duration::from_secs(30),
            persistent_ceiling: Duration::from_secs(15 * 60),
        }
    }
}

impl ConnectBackoff {
    /// No wait is longer than a day, whatever the settings say (so that the
    /// end of one is always a valid `Instant`).
    pub const LONGEST: Duration = Duration::from_secs(24 * 3600);

    /// The same wait after every failure.
    pub fn fixed(wait: Duration) -> Self {
        Self {
            transient: wait,
            transient_ceiling: wait,
            persistent: wait,
            persistent_ceiling: wait,
        }
    }

    /// The wait after the `failures`-th failure in a row (from 1).
    fn wait(&self, retryable: bool, failures: u32) -> Duration {
        let (first, ceiling) = if retryable {
            (self.transient, self.transient_ceiling)
        } else {
            (self.persistent, self.persistent_ceiling)
        };
        let doublings = failures.saturating_sub(1).min(31);
        first.saturating_mul(1 << doublings).min(ceiling).min(Self::LONGEST)
    }
}

/// What a connection to a master is made from: a change (new settings
/// recorded) is worth trying at once. Whether the master is active is not.
#[derive(Debug)]
struct Settings {
    kind: String,
    key_ref: String,
    config: Option<String>,
}

impl Settings {
    fn of(record: &MasterRecord) -> Self {
        Self {
            kind: record.kind.clone(),
            key_ref: record.key_ref.clone(),
            config: record.config.clone(),
        }
    }

    /// Whether `record` still records these settings.
    fn are_those_of(&self, record: &MasterRecord) -> bool {
        self.kind == record.kind && self.key_ref == record.key_ref && self.config == record.config
    }
}

/// A failed connection to a master, remembered until its wait is over or
/// the keystore records other settings for the master.
#[derive(Debug)]
struct Failure {
    settings: Settings,
    /// Failures in a row.
    count: u32,
    /// When the last one ended.
    at: Instant,
    /// Until then, requests do not try.
    until: Instant,
    /// Failed forced attempts in a row ([`Masters::connect_now`]).
    forced: u32,
    /// Until then, forced attempts do not try either (`None`: one may).
    forced_until: Option<Instant>,
    retryable: bool,
    /// The last error's detail (never a secret).
    detail: String,
}

impl Failure {
    /// The error to answer with instead of an attempt, saying why.
    fn error(&self, detail: String) -> RootKeyError {
        let provider = "recorded master";
        if self.retryable {
            RootKeyError::Unavailable { provider, detail }
        } else {
            RootKeyError::Misconfigured { provider, detail }
        }
    }
}

/// Who asks for a connection, and so which wait applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// A request that needs the master.
    Request,
    /// Someone who put the settings right ([`Masters::connect_now`]).
    Forced,
}

/// How this instance stands with a master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterConnection {
    /// Connected (the configured root, or a master reached since start).
    Connected,
    /// Not tried since start (no key under it was needed), or not with
    /// the settings the keystore records now.
    NotTried,
    /// The last attempt to connect failed.
    Failing {
        /// Failed attempts in a row.
        failures: u32,
        /// How long until the next attempt is allowed (zero: the next
        /// request that needs the master tries).
        retry_in: Duration,
        /// The last attempt's error.
        last_error: String,
    },
}

/// Providers by master key id.
#[derive(Debug)]
pub(super) struct Masters {
    providers: RwLock<HashMap<MasterKeyId, Arc<dyn RootKeyProvider>>>,
    connector: Option<Arc<dyn MasterConnector>>,
    /// One connection attempt at a time (HSM logins are not free).
    connecting: tokio::sync::Mutex<()>,
    failures: Mutex<HashMap<MasterKeyId, Failure>>,
    backoff: ConnectBackoff,
}

impl Masters {
    pub(super) fn new(
        connector: Option<Arc<dyn MasterConnector>>,
        backoff: ConnectBackoff,
    ) -> Self {
        Self {
            providers: RwLock::default(),
            connector,
            connecting: tokio::sync::Mutex::new(()),
            failures: Mutex::default(),
            backoff,
        }
    }

    pub(super) fn insert(&self, id: MasterKeyId, provider: Arc<dyn RootKeyProvider>) {
        self.failures().remove(&id);
        if let Ok(mut map) = self.providers.write() {
            map.insert(id, provider);
        }
    }

    fn cached(&self, id: MasterKeyId) -> Option<Arc<dyn RootKeyProvider>> {
        self.providers.read().ok().and_then(|map| map.get(&id).cloned())
    }

    /// The provider of master `id`, connecting to it if needed and if the
    /// last failed attempt's wait is over.
    pub(super) async fn get(
        &self,
        store: &dyn KeyStore,
        id: MasterKeyId,
    ) -> Result<Arc<dyn RootKeyProvider>, HierarchyError> {
        self.reach(store, id, Attempt::Request).await
    }

    /// The provider of master `id`, connecting to it now even in the wait
    /// after a failed attempt: for someone who has put its settings right
    /// (a PIN file rewritten, an HSM back) and will not wait up to
    /// [`ConnectBackoff::persistent_ceiling`]. Such attempts have a wait of
    /// their own after each that fails (the same schedule, counted on them
    /// alone): a script repeating them costs at most 8 failed logins in the
    /// first hour and 4 an hour after, not one per call. A failure also
    /// counts as one more in a row for requests.
    pub(super) async fn connect_now(
        &self,
        store: &dyn KeyStore,
        id: MasterKeyId,
    ) -> Result<Arc<dyn RootKeyProvider>, HierarchyError> {
        self.reach(store, id, Attempt::Forced).await
    }

    async fn reach(
        &self,
        store: &dyn KeyStore,
        id: MasterKeyId,
        attempt: Attempt,
    ) -> Result<Arc<dyn RootKeyProvider>, HierarchyError> {
        if let Some(provider) = self.cached(id) {
            return Ok(provider);
        }
        let Some(connector) = &self.connector else {
            return Err(HierarchyError::ForeignMaster(id.0));
        };
        let started = Instant::now();
        // In a wait, answer at once rather than queue behind another
        // master's connection attempt; once in line, look again (at the
        // settings as they are then: a rotation may have recorded new ones;
        // and an attempt that failed while this one queued starts a wait).
        let failed_before = self.failures().contains_key(&id);
        if failed_before
            && let Some(waiting) = self.still_waiting(&Self::record(store, id).await?, attempt)
        {
            return Err(waiting.into());
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(provider) = self.cached(id) {
            return Ok(provider);
        }
        let record = Self::record(store, id).await?;
        if let Some(waiting) = self.still_waiting(&record, attempt) {
            return Err(waiting.into());
        }
        // A forced attempt that queued behind one that failed meanwhile (a
        // request's, whose wait it may skip) answers with that failure: one
        // attempt however many arrive at once.
        if attempt == Attempt::Forced
            && let Some(failed) = self.failed_since(&record, started)
        {
            return Err(failed.into());
        }
        match connector.connect(&record).await {
            Ok(provider) => {
                tracing::info!(master = id.0, provider = %provider.describe(), "connected to master key");
                self.insert(id, provider.clone());
                Ok(provider)
            }
            Err(e) => {
                self.remember_failure(&record, &e, attempt);
                Err(e.into())
            }
        }
    }

    /// What the keystore records about master `id`, if it can be connected
    /// from that.
    async fn record(store: &dyn KeyStore, id: MasterKeyId) -> Result<MasterRecord, HierarchyError> {
        let record = store
            .masters()
            .await?
            .into_iter()
            .find(|m| m.id == id)
            .ok_or(HierarchyError::ForeignMaster(id.0))?;
        if record.config.is_none() {
            return Err(HierarchyError::ForeignMaster(id.0));
        }
        Ok(record)
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<MasterKeyId, Failure>> {
        self.failures.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The error to answer with instead of trying again, while the last
    /// failure's wait (for requests, or for forced attempts) lasts and the
    /// keystore still records the master as it did then.
    fn still_waiting(&self, record: &MasterRecord, attempt: Attempt) -> Option<RootKeyError> {
        let failures = self.failures();
        let failure = failures.get(&record.id).filter(|f| f.settings.are_those_of(record))?;
        let (until, count, what) = match attempt {
            Attempt::Request => (failure.until, failure.count, "failed attempt(s)"),
            Attempt::Forced => (failure.forced_until?, failure.forced, "failed forced attempt(s)"),
        };
        let left = until.checked_duration_since(Instant::now())?;
        Some(failure.error(format!(
            "not tried again for another {} s after {count} {what} in a row; the last: {}",
            left.as_secs().max(1),
            failure.detail
        )))
    }

    /// The failure of an attempt with the settings `record` holds that
    /// ended after `since`, as an error to answer with.
    fn failed_since(&self, record: &MasterRecord, since: Instant) -> Option<RootKeyError> {
        let failures = self.failures();
        let failure =
            failures.get(&record.id).filter(|f| f.settings.are_those_of(record) && f.at > since)?;
        Some(failure.error(format!(
            "an attempt that ended while this one waited its turn failed: {}",
            failure.detail
        )))
    }

    fn remember_failure(&self, record: &MasterRecord, error: &RootKeyError, attempt: Attempt) {
        let mut failures = self.failures();
        let id = record.id;
        // New settings start a new series.
        let same = failures.get(&id).filter(|f| f.settings.are_those_of(record));
        let count = same.map_or(0, |f| f.count).saturating_add(1);
        let retryable = error.is_retryable();
        let at = Instant::now();
        let forced_before = same.map_or(0, |f| f.forced);
        let (forced, forced_until) = match attempt {
            Attempt::Request => (forced_before, same.and_then(|f| f.forced_until)),
            Attempt::Forced => {
                let forced = forced_before.saturating_add(1);
                (forced, Some(at + self.backoff.wait(retryable, forced)))
            }
        };
        let wait = self.backoff.wait(retryable, count);
        tracing::warn!(
            master = id.0,
            failures = count,
            retry_after = ?wait,
            error = %error,
            "cannot connect to a master key; not trying again before the wait is over"
        );
        let detail = match error {
            RootKeyError::Unavailable { detail, .. }
            | RootKeyError::Misconfigured { detail, .. } => detail.clone(),
            other => other.to_string(),
        };
        let until = at + wait;
        let settings = Settings::of(record);
        failures.insert(
            id,
            Failure { settings, count, at, until, forced, forced_until, retryable, detail },
        );
    }

    /// How this instance stands with `master` as the keystore records it
    /// now: settings recorded since the last failure are not tried yet.
    pub(super) fn connection(&self, master: &MasterRecord) -> MasterConnection {
        if self.cached(master.id).is_some() {
            return MasterConnection::Connected;
        }
        match self.failures().get(&master.id).filter(|f| f.settings.are_those_of(master)) {
            Some(failure) => MasterConnection::Failing {
                failures: failure.count,
                retry_in: failure.until.saturating_duration_since(Instant::now()),
                last_error: failure.detail.clone(),
            },
            None => MasterConnection::NotTried,
        }
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::root::{ProviderInfo, WrapContext};
    use crate::secret::Key256;
    use crate::store::SqliteStore;

    /// A master that was reached; the tests only ask which it is.
    #[derive(Debug)]
    struct Reached(MasterRecord);

    #[async_trait]
    impl RootKeyProvider for Reached {
        fn describe(&self) -> ProviderInfo {
            ProviderInfo { kind: "local", key_ref: self.0.key_ref.clone() }
        }
        async fn wrap(&self, _: &Key256, _: &WrapContext) -> Result<Vec<u8>, RootKeyError> {
            Err(RootKeyError::CannotUnwrap)
        }
        async fn unwrap(&self, _: &[u8], _: &WrapContext) -> Result<Key256, RootKeyError> {
            Err(RootKeyError::CannotUnwrap)
        }
    }

    /// Answers connection attempts from a script (success once it runs
    /// out) and counts them.
    #[derive(Debug, Default)]
    struct Scripted {
        failures: std::sync::Mutex<VecDeque<RootKeyError>>,
        attempts: AtomicUsize,
    }

    impl Scripted {
        fn failing(failures: impl IntoIterator<Item = RootKeyError>) -> Arc<Self> {
            Arc::new(Self {
                failures: std::sync::Mutex::new(failures.into_iter().collect()),
                ..Default::default()
            })
        }
        fn attempts(&self) -> usize {
            self.attempts.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl MasterConnector for Scripted {
        async fn connect(
            &self,
            master: &MasterRecord,
        ) -> Result<Arc<dyn RootKeyProvider>, RootKeyError> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            // Slow enough for concurrent callers to pile up behind it.
            tokio::time::sleep(Duration::from_millis(20)).await;
            match self.failures.lock().unwrap().pop_front() {
                Some(error) => Err(error),
                None => Ok(Arc::new(Reached(master.clone()))),
            }
        }
    }

    fn pin_rejected() -> RootKeyError {
        RootKeyError::Misconfigured {
            provider: "pkcs11",
            detail: "C_Login failed: CKR_PIN_INCORRECT".into(),
        }
    }

    fn unreachable() -> RootKeyError {
        RootKeyError::Unavailable { provider: "pkcs11", detail: "CKR_DEVICE_REMOVED".into() }
    }

    /// A keystore recording a second master, and `Masters` reaching it
    /// through a connector that fails with `failures` first.
    struct Setup {
        _dir: tempfile::TempDir,
        store: SqliteStore,
        id: MasterKeyId,
        connector: Arc<Scripted>,
        masters: Masters,
    }

    async fn setup(
        failures: impl IntoIterator<Item = RootKeyError>,
        backoff: ConnectBackoff,
    ) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in_dir(dir.path()).await.unwrap();
        let info = ProviderInfo { kind: "local", key_ref: "second".into() };
        let id = store.register_master(&info).await.unwrap();
        store.set_master_config(id, r#"{"provider":"dev_local","key_file":"/k"}"#).await.unwrap();
        let connector = Scripted::failing(failures);
        let masters = Masters::new(Some(connector.clone()), backoff);
        Setup { _dir: dir, store, id, connector, masters }
    }

    async fn record(store: &SqliteStore, id: MasterKeyId) -> MasterRecord {
        store.masters().await.unwrap().into_iter().find(|m| m.id == id).unwrap()
    }

    /// How `masters` stands with master `id` as `store` records it now.
    async fn connection(
        masters: &Masters,
        store: &SqliteStore,
        id: MasterKeyId,
    ) -> MasterConnection {
        masters.connection(&record(store, id).await)
    }

    fn hours() -> ConnectBackoff {
        ConnectBackoff::fixed(Duration::from_secs(3600))
    }

    #[test]
    fn each_failure_in_a_row_doubles_the_wait_up_to_the_ceiling() {
        let backoff = ConnectBackoff::default();
        let secs = |retryable, n| backoff.wait(retryable, n).as_secs();
        assert_eq!([1, 2, 3, 4].map(|n| secs(false, n)), [30, 60, 120, 240]);
        assert_eq!([1, 2, 6, 7].map(|n| secs(true, n)), [1, 2, 32, 60]);
        assert_eq!(secs(false, 6), 900, "the ceiling");
        assert_eq!(secs(false, u32::MAX), 900, "no overflow");
        let endless = ConnectBackoff::fixed(Duration::MAX);
        assert_eq!(endless.wait(true, 1), ConnectBackoff::LONGEST);
    }

    #[tokio::test]
    async fn a_failed_connection_is_not_retried_until_its_wait_is_over() {
        let Setup { _dir, store, id, connector, masters } = setup([pin_rejected()], hours()).await;
        assert_eq!(connection(&masters, &store, id).await, MasterConnection::NotTried);

        // However many requests arrive at once, and however many follow
        // in the wait, the PIN is tried once.
        let (a, b, c, d) = tokio::join!(
            masters.get(&store, id),
            masters.get(&store, id),
            masters.get(&store, id),
            masters.get(&store, id)
        );
        let later = masters.get(&store, id).await;
        assert_eq!(connector.attempts(), 1, "a rejected PIN was tried again");
        let errors: Vec<String> =
            [a, b, c, d, later].into_iter().map(|r| r.unwrap_err().to_string()).collect();
        assert_eq!(
            errors.iter().filter(|e| e.contains("not tried again")).count(),
            4,
            "{errors:?}"
        );
        for error in &errors {
            assert!(error.contains("CKR_PIN_INCORRECT"), "{error}");
        }
        let waiting = masters.get(&store, id).await.unwrap_err();
        let HierarchyError::Root(e @ RootKeyError::Misconfigured { .. }) = &waiting else {
            panic!("a rejected PIN became retryable: {waiting:?}")
        };
        let text = e.to_string();
        assert!(text.contains("1 failed attempt(s) in a row"), "{text}");
        assert_eq!(text.matches("CKR_PIN_INCORRECT").count(), 1, "{text}");
        let MasterConnection::Failing { failures: 1, retry_in, last_error } =
            connection(&masters, &store, id).await
        else {
            panic!("{:?}", connection(&masters, &store, id).await)
        };
        assert!(retry_in > Duration::from_secs(3000), "{retry_in:?}");
        assert!(last_error.contains("CKR_PIN_INCORRECT"), "{last_error}");

        // Becoming the active master changes nothing about reaching it.
        store.activate_master(id).await.unwrap();
        masters.get(&store, id).await.unwrap_err();
        assert_eq!(connector.attempts(), 1, "activation reset the wait");

        // New settings for the master (a new rotation recorded them) are
        // tried at once.
        store.set_master_config(id, r#"{"provider":"dev_local","key_file":"/k2"}"#).await.unwrap();
        assert_eq!(connection(&masters, &store, id).await, MasterConnection::NotTried);
        let provider = masters.get(&store, id).await.unwrap();
        assert_eq!(provider.describe().key_ref, "second");
        assert_eq!(connector.attempts(), 2);
        assert_eq!(connection(&masters, &store, id).await, MasterConnection::Connected);
    }

    #[tokio::test]
    async fn attempts_resume_once_the_wait_is_over_and_stop_once_connected() {
        let short = Duration::from_millis(30);
        let backoff = ConnectBackoff {
            transient: short,
            transient_ceiling: short * 2,
            ..ConnectBackoff::fixed(Duration::from_secs(3600))
        };
        let Setup { _dir, store, id, connector, masters } =
            setup([unreachable(), unreachable()], backoff).await;

        // (Only waits longer than the backoff's: a stalled machine makes
        // them longer still, never shorter.)
        masters.get(&store, id).await.unwrap_err();
        assert_eq!(connector.attempts(), 1);
        tokio::time::sleep(short * 2).await;
        masters.get(&store, id).await.unwrap_err();
        assert_eq!(connector.attempts(), 2, "tried again after the wait");
        tokio::time::sleep(short * 3).await;
        masters.get(&store, id).await.unwrap();
        masters.get(&store, id).await.unwrap();
        assert_eq!(connector.attempts(), 3, "connected once, then kept");
    }

    #[tokio::test]
    async fn an_outage_stays_retryable_while_waiting() {
        let Setup { _dir, store, id, connector, masters } = setup([unreachable()], hours()).await;
        let first = masters.get(&store, id).await.unwrap_err();
        let waiting = masters.get(&store, id).await.unwrap_err();
        for error in [first, waiting] {
            assert!(
                matches!(&error, HierarchyError::Root(e @ RootKeyError::Unavailable { .. })
                    if e.is_retryable()),
                "{error:?}"
            );
        }
        assert_eq!(connector.attempts(), 1);
    }

    #[tokio::test]
    async fn a_master_put_in_place_ends_its_wait() {
        // Even an endless wait (as the settings could say) ends with a
        // rotation that connects the master itself, and never overflows.
        let Setup { _dir, store, id, connector, masters } =
            setup([unreachable()], ConnectBackoff::fixed(Duration::MAX)).await;
        masters.get(&store, id).await.unwrap_err();
        masters.insert(id, Arc::new(Reached(record(&store, id).await)));
        assert_eq!(connection(&masters, &store, id).await, MasterConnection::Connected);
        masters.get(&store, id).await.unwrap();
        assert_eq!(connector.attempts(), 1);
    }

    #[tokio::test]
    async fn a_forced_attempt_skips_the_requests_wait_then_waits_its_own() {
        let Setup { _dir, store, id, connector, masters } =
            setup([pin_rejected(), pin_rejected(), pin_rejected()], hours()).await;
        masters.get(&store, id).await.unwrap_err();

        // Still wrong: one login for two forced attempts at once (the one
        // that queued sees the first fail), one more failure in a row.
        let (a, b) = tokio::join!(masters.connect_now(&store, id), masters.connect_now(&store, id));
        let errors = [a.unwrap_err().to_string(), b.unwrap_err().to_string()];
        assert_eq!(connector.attempts(), 2, "{errors:?}");
        assert!(errors.iter().all(|e| e.contains("CKR_PIN_INCORRECT")), "{errors:?}");
        assert_eq!(errors.iter().filter(|e| e.contains("forced attempt")).count(), 1);
        let MasterConnection::Failing { failures: 2, retry_in, .. } =
            connection(&masters, &store, id).await
        else {
            panic!("{:?}", connection(&masters, &store, id).await)
        };
        assert!(retry_in > Duration::from_secs(3000), "{retry_in:?}");

        // Requests keep their wait; forced attempts now have one too.
        masters.get(&store, id).await.unwrap_err();
        let again = masters.connect_now(&store, id).await.unwrap_err().to_string();
        assert!(again.contains("1 failed forced attempt(s)"), "{again}");
        assert_eq!(connector.attempts(), 2, "a wait was skipped");

        // New settings: tried at once, by either.
        store.set_master_config(id, r#"{"provider":"dev_local","key_file":"/k2"}"#).await.unwrap();
        assert_eq!(connection(&masters, &store, id).await, MasterConnection::NotTried);
        masters.connect_now(&store, id).await.unwrap_err();
        assert_eq!(connector.attempts(), 3);
    }

    #[tokio::test]
    async fn a_forced_attempt_queued_behind_a_failing_request_does_not_try() {
        let Setup { _dir, store, id, connector, masters } =
            setup([pin_rejected(), pin_rejected()], hours()).await;
        let (a, b) = tokio::join!(masters.get(&store, id), masters.connect_now(&store, id));
        let errors = [a.unwrap_err().to_string(), b.unwrap_err().to_string()];
        assert_eq!(connector.attempts(), 1, "two logins for one failure: {errors:?}");
        // Later, the forced attempt skips the requests' wait.
        masters.connect_now(&store, id).await.unwrap_err();
        assert_eq!(connector.attempts(), 2);
    }

    #[tokio::test]
    async fn a_forced_attempt_brings_a_master_back_at_once() {
        let Setup { _dir, store, id, connector, masters } = setup([pin_rejected()], hours()).await;
        masters.get(&store, id).await.unwrap_err();
        masters.connect_now(&store, id).await.unwrap();
        assert_eq!(connector.attempts(), 2);
        assert_eq!(connection(&masters, &store, id).await, MasterConnection::Connected);
        masters.get(&store, id).await.unwrap();
        masters.connect_now(&store, id).await.unwrap();
        assert_eq!(connector.attempts(), 2, "connected once, then kept");
    }
}
