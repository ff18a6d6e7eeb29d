//! The audit log writer: one task per key-service instance that appends
//! events to the instance's hash chain with **group commit**.
//!
//! Requests hand their events to the writer and wait; the writer takes
//! everything queued, seals it into the chain, writes it (with a signed
//! checkpoint when one is due) in one transaction, and only then answers
//! every waiter. So an unwrap's event is durable before its DEKs leave, and
//! concurrent requests share one commit. When a commit fails, every waiting
//! request is refused (fail closed) and readiness reports it until a commit
//! succeeds again.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use kms_core::audit::{AuditChain, AuditEvent, AuditSigner, ChainVerifier, HASH_LEN, Outcome};
use kms_core::store::{AuditSigningKeyRecord, KeyStore};
use kms_core::{KeyHierarchy, TenantId};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::config::AuditConfig;
use crate::error::ApiError;
use crate::metrics::Metrics;

/// Most events sealed into one commit.
const MAX_EVENTS_PER_COMMIT: usize = 20_000;

/// Events read at a time when checking the chain's tail at start-up.
const TAIL_PAGE: u32 = 1_000;

/// Most heads of unconfirmed batches remembered (the oldest are dropped:
/// a head dropped and then found stored halts the writer, safely).
const MAX_UNCONFIRMED: usize = 64;

/// The actor of the writer's own events.
const WRITER: &str = "keygate:audit";

/// How long a commit may be outstanding before readiness fails. A commit
/// takes milliseconds; one waiting this long has a keystore that does not
/// answer (stuck, or silent behind a partition), and every audited request
/// waits behind it. The PostgreSQL store gives up on its own later (after
/// `acquire_timeout` plus `statement_timeout` plus `acquire_timeout`, 50 s
/// by default), and then reports the failure; until then this does.
const STALLED_AFTER: Duration = Duration::from_secs(30);

/// The audit log could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditStartError {
    /// The keystore failed.
    #[error("audit store: {0}")]
    Store(#[from] kms_core::store::StoreError),
    /// The root key provider could not wrap or unwrap the signing key.
    #[error("audit signing key: {0}")]
    Root(#[from] kms_core::RootKeyError),
    /// The master key of the signing key cannot be used.
    #[error("audit signing key: {0}")]
    Master(#[from] kms_core::HierarchyError),
    /// The stored chain or signing key is inconsistent.
    #[error("audit chain: {0}")]
    Chain(String),
}

struct Job {
    events: Vec<AuditEvent>,
    ack: oneshot::Sender<Result<(), ()>>,
}

struct Shared {
    healthy: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// When the commit in progress (with its resync) started.
    busy_since: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

impl Shared {
    /// How long the commit in progress has been waiting, once that is
    /// longer than [`STALLED_AFTER`].
    fn stalled_for(&self) -> Option<Duration> {
        let since = *self.busy_since.lock().unwrap_or_else(|p| p.into_inner());
        since.map(|t| t.elapsed()).filter(|waited| *waited > STALLED_AFTER)
    }
}

/// Marks a commit in progress until dropped (also if the writer's task is
/// aborted mid-commit).
struct Busy<'a>(&'a Shared);

impl<'a> Busy<'a> {
    fn start(shared: &'a Shared) -> Self {
        *shared.busy_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        Self(shared)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        *self.0.busy_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Handle to the audit writer; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    instance: Arc<str>,
}

impl AuditLog {
    /// Loads (or creates, wrapped by the active master key) the instance's
    /// signing key, resumes its chain and starts the writer task.
    ///
    /// The events after the last checkpoint must link to it (else start-up
    /// fails: events were changed or deleted). If there are any (a crash
    /// left them unsigned, or someone wrote them), the first event recorded
    /// is `audit.resume`, naming them: the next checkpoint covers them, and
    /// says so.
    pub async fn start(
        hierarchy: &KeyHierarchy,
        instance: &str,
        config: &AuditConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, JoinHandle<()>), AuditStartError> {
        let store = hierarchy.store().clone();
        let signer = load_signer(hierarchy, instance).await?;
        let last = store.last_audit_row(instance).await?;
        let chain = AuditChain::resume(instance, last.as_ref())
            .map_err(|e| AuditStartError::Chain(e.to_string()))?;
        let unsigned = check_tail(store.as_ref(), instance, &signer, chain.head()).await?;
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let shared = Arc::new(Shared {
            healthy: AtomicBool::new(true),
            last_error: Mutex::new(None),
            busy_since: Mutex::new(None),
            metrics,
        });
        let writer = Writer {
            store,
            signer,
            chain,
            rx,
            shared: shared.clone(),
            checkpoint_every: config.checkpoint_every.max(1),
            checkpoint_interval: Duration::from_secs(config.checkpoint_interval_secs.max(1)),
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            unconfirmed: Vec::new(),
            halted: false,
        };
        let task = tokio::spawn(writer.run());
        let log = Self { tx, shared, instance: instance.into() };
        if let Some((from, to)) = unsigned {
            tracing::warn!(
                instance,
                from,
                to,
                "audit events after the last checkpoint were found unsigned; recording that"
            );
            let event = AuditEvent::new(now_ms(), WRITER, "audit.resume", Outcome::Ok)
                .with_detail("unsigned_from", from)
                .with_detail("unsigned_to", to);
            log.record(vec![event]).await.map_err(|_| {
                AuditStartError::Chain(format!(
                    "could not record that events {from} to {to} were found unsigned: {}",
                    log.last_error().unwrap_or_default()
                ))
            })?;
        }
        Ok((log, task))
    }

    /// This instance's chain name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Appends events and waits until they are durable. Fails closed: any
    /// failure means the caller must not proceed with what it audits.
    pub async fn record(&self, events: Vec<AuditEvent>) -> Result<(), ApiError> {
        let unavailable = || {
            ApiError::unavailable("audit_unavailable", "the audit log cannot record this operation")
        };
        let count = events.len() as u64;
        let (ack, done) = oneshot::channel();
        // Counted before the writer can see (and uncount) the job.
        self.shared.metrics.audit_queue_depth.inc_by(count);
        if self.tx.try_send(Job { events, ack }).is_err() {
            self.shared.metrics.audit_queue_depth.dec_by(count);
            return Err(unavailable());
        }
        match done.await {
            Ok(Ok(())) => Ok(()),
            _ => Err(unavailable()),
        }
    }

    /// Makes a change only once its event is durable, so that no change
    /// goes unaudited (fail closed): records `event(Outcome::Ok)`, then
    /// runs `change`. If the change fails, the same event is recorded again
    /// with the failure's outcome (`denied`, `invalid` or `error`), and the
    /// change's error is returned. So an admin event means "authorized and
    /// made", unless a later event of the same action says it failed; or
    /// that the keystore did not confirm it (`error` with detail
    /// `outcome_unknown`: it may have been made, and the state says).
    ///
    /// All of it runs in a task of its own: a request dropped halfway (the
    /// client gone, the request timeout) leaves neither an event for a
    /// change never attempted nor a failure unrecorded.
    pub async fn before<T, E, C>(&self, event: E, change: C) -> Result<T, ApiError>
    where
        T: Send + 'static,
        E: Fn(Outcome) -> AuditEvent + Send + 'static,
        C: Future<Output = Result<T, ApiError>> + Send + 'static,
    {
        let log = self.clone();
        tokio::spawn(async move { log.record_then(event, change).await })
            .await
            .map_err(|e| crate::error::internal(&e))?
    }

    async fn record_then<T>(
        &self,
        event: impl Fn(Outcome) -> AuditEvent,
        change: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        self.record(vec![event(Outcome::Ok)]).await?;
        let error = match change.await {
            Ok(done) => return Ok(done),
            Err(error) => error,
        };
        let outcome = match error.status() {
            StatusCode::FORBIDDEN => Outcome::Denied,
            status if status.is_client_error() => Outcome::Invalid,
            _ => Outcome::Error,
        };
        let mut failed = event(outcome);
        if error.code() == crate::error::OUTCOME_UNKNOWN {
            // Not a failure for certain: the keystore may have made it.
            failed = failed.with_detail("outcome_unknown", true);
        }
        let action = failed.action.clone();
        if self.record(vec![failed]).await.is_err() {
            tracing::error!(
                action,
                "a change failed after its event was recorded; its failure could not be recorded"
            );
        }
        Err(error)
    }

    /// Records a refused request. Best effort: a denial stays a denial even
    /// if it cannot be recorded (that failure is logged).
    pub async fn record_denial(
        &self,
        identity: &str,
        action: &'static str,
        tenant: Option<&TenantId>,
    ) {
        let mut event = AuditEvent::new(now_ms(), identity, action, Outcome::Denied);
        if let Some(t) = tenant {
            event = event.with_tenant(t.clone());
        }
        if self.record(vec![event]).await.is_err() {
            tracing::error!(identity, action, "could not record a denied request in the audit log");
        }
    }

    /// Whether the last commit succeeded, none has been waiting for the
    /// keystore longer than [`STALLED_AFTER`], and the writer is running.
    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
            && self.shared.stalled_for().is_none()
            && !self.tx.is_closed()
    }

    /// Why the writer is not healthy: a commit waiting too long, else why
    /// the last commit failed, if it did.
    pub fn last_error(&self) -> Option<String> {
        if let Some(waited) = self.shared.stalled_for() {
            return Some(format!(
                "an audit commit has waited {} s for the keystore",
                waited.as_secs()
            ));
        }
        self.shared.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Checks, under this instance's own key, that the events after its last
/// checkpoint link to it and end at `head`; returns the range of those
/// events (no signature covers them yet), if there are any.
async fn check_tail(
    store: &dyn KeyStore,
    instance: &str,
    signer: &AuditSigner,
    head: (i64, [u8; HASH_LEN]),
) -> Result<Option<(i64, i64)>, AuditStartError> {
    let broken = |what: String| {
        AuditStartError::Chain(format!(
            "instance {instance}: {what}; see `keygate admin audit verify` before starting again"
        ))
    };
    let mut verifier = match store.last_audit_checkpoint(instance).await? {
        Some(checkpoint) if checkpoint.seq > head.0 => {
            return Err(broken(format!(
                "the last checkpoint signs event {} but the chain ends at event {}: signed \
                 events were deleted",
                checkpoint.seq, head.0
            )));
        }
        Some(checkpoint) => ChainVerifier::from_checkpoint(signer.verifying_key(), &checkpoint)
            .map_err(|e| broken(e.to_string()))?,
        None => ChainVerifier::new(instance, signer.verifying_key()),
    };
    let signed = verifier.head().0;
    while verifier.head().0 < head.0 {
        let rows = store.audit_rows(instance, verifier.head().0, TAIL_PAGE).await?;
        if rows.is_empty() {
            break;
        }
        verifier.push_rows(&rows).map_err(|e| broken(e.to_string()))?;
    }
    if verifier.head() != head {
        return Err(broken(format!(
            "the events after the last checkpoint (event {signed}) do not end at the chain's \
             head (event {}): another writer uses this instance name, or events were changed",
            head.0
        )));
    }
    Ok((head.0 > signed).then_some((signed + 1, head.0)))
}

async fn load_signer(
    hierarchy: &KeyHierarchy,
    instance: &str,
) -> Result<AuditSigner, AuditStartError> {
    let store = hierarchy.store();
    let context = AuditSigner::wrap_context(instance);
    let record = match store.audit_signing_key(instance).await? {
        Some(record) => record,
        None => {
            // A new key over a chain that has events would sign whatever
            // those events now say: the key row's disappearance is either
            // tampering or a restore gone wrong, and a person must decide.
            if let Some(last) = store.last_audit_row(instance).await? {
                return Err(AuditStartError::Chain(format!(
                    "instance {instance} has {} audit events but no signing key; refusing to \
                     sign them with a new one (restore its audit_signing_keys row, or run this \
                     key service under a new instance name)",
                    last.seq
                )));
            }
            let signer =
                AuditSigner::generate().map_err(|e| AuditStartError::Chain(e.to_string()))?;
            let mut attempts = 0;
            loop {
                let (master, root) = hierarchy.active_master().await?;
                let wrapped = root.wrap(&signer.to_key(), &context).await?;
                let inserted = store
                    .insert_audit_signing_key(&AuditSigningKeyRecord {
                        instance: instance.to_owned(),
                        wrapped,
                        master,
                        public_key: signer.public_key_sec1(),
                        created_at: now_ms() / 1000,
                    })
                    .await;
                match inserted {
                    // A master rotation came between: wrap under the new one.
                    Err(kms_core::store::StoreError::MasterNotActive(_)) if attempts < 2 => {
                        attempts += 1
                    }
                    other => break other?,
                }
            }
        }
    };
    let root = hierarchy.master(record.master).await?;
    let key = root.unwrap(&record.wrapped, &context).await?;
    let signer = AuditSigner::from_key(&key).map_err(|e| AuditStartError::Chain(e.to_string()))?;
    if signer.public_key_sec1() != record.public_key {
        return Err(AuditStartError::Chain(format!(
            "the stored public key of instance {instance} does not match its signing key"
        )));
    }
    Ok(signer)
}

/// Whether every store can hold `event`'s free text (the rest is typed
/// or written as escaped JSON).
fn storable(event: &AuditEvent) -> bool {
    !event.actor.contains('\0') && !event.action.contains('\0')
}

struct Writer {
    store: Arc<dyn KeyStore>,
    signer: AuditSigner,
    chain: AuditChain,
    rx: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    checkpoint_every: u64,
    checkpoint_interval: Duration,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    /// Heads of batches sent whose commit could not be confirmed either way
    /// (a reply lost after COMMIT): the stored chain may end at one of them.
    unconfirmed: Vec<(i64, [u8; HASH_LEN])>,
    /// The stored chain moved to a head this writer never wrote: another
    /// writer with this instance name, or rows written behind its back.
    /// Nothing more is signed until a restart (and a person) looks.
    halted: bool,
}

impl Writer {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.checkpoint_interval);
        loop {
            tokio::select! {
                job = self.rx.recv() => match job {
                    Some(job) => self.commit(job).await,
                    None => break,
                },
                _ = tick.tick() => {
                    if self.since_checkpoint > 0 && self.last_checkpoint.elapsed() >= self.checkpoint_interval {
                        self.commit_jobs(Vec::new(), true).await;
                    }
                }
            }
        }
        // Shutting down: leave the chain's head under a signature.
        if self.since_checkpoint > 0 {
            self.commit_jobs(Vec::new(), true).await;
        }
    }

    async fn commit(&mut self, first: Job) {
        let mut jobs = vec![first];
        let mut count = jobs.iter().map(|j| j.events.len()).sum::<usize>();
        while count < MAX_EVENTS_PER_COMMIT {
            match self.rx.try_recv() {
                Ok(job) => {
                    count += job.events.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        self.commit_jobs(jobs, false).await;
    }

    async fn commit_jobs(&mut self, jobs: Vec<Job>, force_checkpoint: bool) {
        if self.halted {
            self.refuse(jobs);
            return;
        }
        // One job whose text no store can hold (PostgreSQL refuses NUL)
        // must not fail the commit of every other.
        let (jobs, unstorable): (Vec<Job>, Vec<Job>) =
            jobs.into_iter().partition(|job| job.events.iter().all(storable));
        if !unstorable.is_empty() {
            tracing::error!("refused to record audit events whose text holds a NUL character");
            self.refuse(unstorable);
        }
        let count = jobs.iter().map(|j| j.events.len() as u64).sum::<u64>();
        if jobs.is_empty() && !force_checkpoint {
            return;
        }
        let before = self.chain.clone();
        // The events move into the chain; only the acknowledgements stay.
        let mut acks = Vec::with_capacity(jobs.len());
        let mut events = Vec::with_capacity(jobs.iter().map(|j| j.events.len()).sum());
        for job in jobs {
            events.extend(job.events);
            acks.push(job.ack);
        }
        let rows = self.chain.seal_all(events);
        let due = force_checkpoint
            || self.since_checkpoint + count >= self.checkpoint_every
            || self.last_checkpoint.elapsed() >= self.checkpoint_interval;
        let (seq, hash) = self.chain.head();
        let checkpoint = if due && seq > 0 {
            match self.signer.sign_checkpoint(self.chain.instance(), seq, &hash, now_ms()) {
                Ok(cp) => Some(cp),
                Err(e) => {
                    tracing::error!(error = %e, "audit checkpoint signing failed");
                    None
                }
            }
        } else {
            None
        };
        let shared = Arc::clone(&self.shared);
        let _busy = Busy::start(&shared);
        let result = self.store.append_audit_batch(&rows, checkpoint.as_ref()).await;
        let metrics = &self.shared.metrics;
        metrics.audit_queue_depth.dec_by(count);
        match result {
            Ok(()) => {
                metrics.audit_events.inc_by(count);
                metrics.audit_commits.inc();
                // Events stored right after `before` prove that no batch
                // this writer could not confirm is there; a checkpoint
                // alone proves nothing about them.
                if count > 0 {
                    self.unconfirmed.clear();
                }
                if checkpoint.is_some() {
                    self.since_checkpoint = 0;
                    self.last_checkpoint = Instant::now();
                } else {
                    self.since_checkpoint += count;
                }
                self.shared.healthy.store(true, Ordering::Relaxed);
                for ack in acks {
                    let _ = ack.send(Ok(()));
                }
            }
            Err(e) => {
                metrics.audit_failures.inc();
                tracing::error!(error = %e, events = count, "audit commit failed; refusing the operations it records");
                *self.shared.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(e.to_string());
                self.shared.healthy.store(false, Ordering::Relaxed);
                // Refused before the writer looks at what the database
                // holds: with the database away, that look waits out a
                // connection attempt of its own (`acquire_timeout`), and
                // the requests would wait twice as long for their 503.
                for ack in acks {
                    let _ = ack.send(Err(()));
                }
                self.resync(before).await;
            }
        }
    }

    /// Answers `jobs` that none of their events was recorded.
    fn refuse(&self, jobs: Vec<Job>) {
        for job in jobs {
            self.shared.metrics.audit_queue_depth.dec_by(job.events.len() as u64);
            let _ = job.ack.send(Err(()));
        }
    }

    /// After a failed commit the database may or may not hold the batch
    /// (a lost connection after COMMIT): continue from what it holds, but
    /// only if that is where this writer left it. Any other head was
    /// written by someone else, and continuing would sign it.
    async fn resync(&mut self, before: AuditChain) {
        let attempted = self.chain.head();
        if !self.unconfirmed.contains(&attempted) {
            // Bounded: a long outage would otherwise add one per commit.
            if self.unconfirmed.len() >= MAX_UNCONFIRMED {
                self.unconfirmed.remove(0);
            }
            self.unconfirmed.push(attempted);
        }
        let instance = before.instance().to_owned();
        self.chain = before;
        let last = match self.store.last_audit_row(&instance).await {
            Ok(last) => last,
            // Unknown: the next commit conflicts if the batch is there.
            Err(_) => return,
        };
        let stored = last.as_ref().map_or((0, kms_core::audit::GENESIS_HASH), |row| {
            (row.seq, row.hash.as_slice().try_into().unwrap_or([0; HASH_LEN]))
        });
        if stored == self.chain.head() {
            // Not proof that the attempt failed: a COMMIT given up on (a
            // standby that does not confirm, say) may still become visible.
            // Kept until a commit of ours lands after `before`, so that one
            // that shows up later is adopted, not taken for another writer.
            return;
        }
        if self.unconfirmed.contains(&stored)
            && let Ok(chain) = AuditChain::resume(&instance, last.as_ref())
        {
            self.chain = chain;
            self.unconfirmed.clear();
            return;
        }
        self.halted = true;
        let error = format!(
            "the stored audit chain of instance {instance} ends at event {}, which this writer \
             did not write (another key service with this instance name, or rows written \
             behind its back): recording nothing more until restarted",
            stored.0
        );
        tracing::error!("{error}");
        *self.shared.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code
mod tests {
    use super::*;

    fn writer(store: Arc<dyn KeyStore>, chain: AuditChain) -> Writer {
        Writer {
            store,
            signer: AuditSigner::generate().unwrap(),
            chain,
            rx: mpsc::channel(1).1,
            shared: Arc::new(Shared {
                healthy: AtomicBool::new(true),
                last_error: Mutex::new(None),
                busy_since: Mutex::new(None),
                metrics: Arc::new(Metrics::default()),
            }),
            checkpoint_every: 1_000,
            checkpoint_interval: Duration::from_secs(3_600),
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            unconfirmed: Vec::new(),
            halted: false,
        }
    }

    fn job(action: &str) -> (Job, oneshot::Receiver<Result<(), ()>>) {
        let (ack, done) = oneshot::channel();
        (Job { events: vec![AuditEvent::new(1, "t", action, Outcome::Ok)], ack }, done)
    }

    /// A COMMIT given up on (its answer never came: a standby that does
    /// not confirm, say) is not visible when the writer looks, and lands
    /// later: the writer then finds its own batch at the head and carries
    /// on from it, rather than halting as if another writer had been there.
    #[tokio::test]
    async fn a_batch_that_lands_after_its_commit_was_given_up_on_is_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn KeyStore> =
            Arc::new(kms_core::store::SqliteStore::open(&dir.path().join("k.db")).await.unwrap());
        let mut w = writer(store.clone(), AuditChain::new("i"));
        let (first, done) = job("one");
        w.commit_jobs(vec![first], false).await;
        assert_eq!(done.await.unwrap(), Ok(()));
        // The second batch is sealed and sent; its commit is given up on
        // before the database shows it.
        let before = w.chain.clone();
        let late = w.chain.seal_all([AuditEvent::new(2, "t", "two", Outcome::Ok)]);
        w.resync(before).await;
        assert!(!w.halted && w.unconfirmed.len() == 1, "the attempt stays unconfirmed");
        // It lands; the writer's next batch collides with it.
        store.append_audit_batch(&late, None).await.unwrap();
        let (third, done) = job("three");
        w.commit_jobs(vec![third], false).await;
        assert_eq!(done.await.unwrap(), Err(()), "that batch is refused");
        assert!(!w.halted, "its own batch, adopted: {:?}", w.shared.last_error);
        let (fourth, done) = job("four");
        w.commit_jobs(vec![fourth], false).await;
        assert_eq!(done.await.unwrap(), Ok(()));
        let head = store.last_audit_row("i").await.unwrap().unwrap();
        assert_eq!((head.seq, head.action.as_str()), (3, "four"));
    }

    #[test]
    fn a_commit_waiting_too_long_fails_readiness() {
        let shared = Arc::new(Shared {
            healthy: AtomicBool::new(true),
            last_error: Mutex::new(None),
            busy_since: Mutex::new(None),
            metrics: Arc::new(Metrics::default()),
        });
        let (tx, _rx) = mpsc::channel(1);
        let log = AuditLog { tx, shared: Arc::clone(&shared), instance: "i".into() };
        let busy = Busy::start(&shared);
        assert!(log.is_healthy(), "a commit just started");
        // Where the monotonic clock is younger than that (a fresh VM), no
        // commit can have waited so long: nothing to check.
        let Some(long_ago) = Instant::now().checked_sub(STALLED_AFTER + Duration::from_secs(1))
        else {
            return;
        };
        *shared.busy_since.lock().unwrap() = Some(long_ago);
        assert!(!log.is_healthy());
        assert!(log.last_error().unwrap().contains("waited"));
        drop(busy);
        assert!(log.is_healthy(), "the commit ended");
    }
}
