//! Field-level access events, reported to the key service in batches.
//!
//! Events are buffered in memory and flushed every `flush_interval` and on
//! clean shutdown. When the key service cannot take them for longer than
//! `max_unreported`, or too many record accesses are waiting, new requests
//! that would produce events are refused (503 `audit_unavailable`): nothing
//! is silently lost. (A crash loses at most one flush interval of buffered
//! events; the key service has already recorded every DEK unwrap behind
//! them.)
//!
//! A report the key service refuses as a whole (a 4xx other than 408 and
//! 429: a tenant this sidecar no longer serves, a report over its limits)
//! is split by tenant, and a report refused for its size (413, or 400
//! `batch_too_large` for too many events) in halves, until the tenants
//! whose events are refused are found. Their events are kept aside and
//! offered again every [`REFUSED_RETRY`], per tenant, in reports of the
//! usual bounds; until they are taken, requests for those tenants are
//! refused (503 `audit_unavailable`), while every other tenant's events
//! flow as before. One tenant's refused events never hold up the rest: they
//! do not count toward `max_buffered` (a held tenant adds none, its
//! requests being refused, so what waits aside is at most what it had
//! buffered when it was held).
//!
//! Accesses that differ only in which records and when — same tenant, KEK
//! version, action, schema, purpose, field outcomes and cache hit — are
//! coalesced while they wait: one event lists every record key id (once
//! per access), the first and last time (`ts_ms`, `fields.last_ts_ms`),
//! how many requests it covers (`fields.requests`) and their ids
//! (`fields.request_ids`, one per request, in order). The ids are the
//! app's (the SDK sends one per call, the same on each retry) or the
//! sidecar's own: an id listed twice says the app presents the two
//! requests as one call retried, and each is still an access. The facts are those of
//! one event per request; the key service chains and stores a fraction of
//! the events (single-record traffic made it spend a third of the CPU on
//! them).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kms_core::{KekVersion, Name, RecordKeyId, TenantId};
use serde::Serialize;
use serde::ser::SerializeMap;
use tokio::sync::Notify;

use super::config::ReportConfig;
use super::ks_client::{KeyServiceClient, KsError};
use super::request::RequestId;
use crate::audit_log::now_ms;
use crate::error::ApiError;
use crate::wire::ReportedAction;

/// What happened to the records of one event, apart from which records
/// and when: accesses with equal `Access` (and tenant and KEK version)
/// can share an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Access {
    /// `record.encrypt` under a schema.
    Encrypt {
        /// The schema.
        schema: Name,
    },
    /// `record.decrypt`: what each protected field became.
    Decrypt {
        /// The schema.
        schema: Name,
        /// The declared purpose, if any.
        purpose: Option<Name>,
        /// Whether the DEKs came from the sidecar's cache.
        cache_hit: bool,
        /// Each protected pointer and `revealed`/`masked`/`withheld`.
        fields: Vec<(String, &'static str)>,
    },
    /// `field.index`: the search token (blind index or deterministic) of a
    /// value the app sent, for one path. No record is read, but a token is
    /// an equality test against every stored record, so it is recorded.
    Index {
        /// The schema.
        schema: Name,
        /// The path asked for.
        path: String,
    },
    /// `field.pseudonym`: the pseudonym of a value the app sent.
    Pseudonym {
        /// The pseudonym namespace.
        namespace: Name,
    },
}

impl Access {
    /// Whether events of this kind list records (one access per record);
    /// the others count one access per request.
    fn lists_records(&self) -> bool {
        matches!(self, Self::Encrypt { .. } | Self::Decrypt { .. })
    }
}

impl AccessEvent {
    /// The accesses it adds to the buffer.
    fn weight(&self) -> usize {
        if self.access.lists_records() { self.record_key_ids.len() } else { 1 }
    }
}

/// One access event as a request produces it.
#[derive(Debug)]
pub(super) struct AccessEvent {
    /// The tenant.
    pub(super) tenant: TenantId,
    /// The KEK version of the records' DEKs, when one is known.
    pub(super) kek_version: Option<KekVersion>,
    /// What happened.
    pub(super) access: Access,
    /// The records, one entry per access.
    pub(super) record_key_ids: Vec<RecordKeyId>,
    /// The request's id (`super::request`).
    pub(super) request_id: RequestId,
}

/// Most record key ids one coalesced event lists (keeps each event, and
/// the key service's row for it, bounded).
const MAX_IDS_PER_EVENT: usize = 1_000;
/// How many of the newest waiting events a new one may be coalesced into.
const COALESCE_WINDOW: usize = 8;
/// Most record accesses sent in one report (≈ 30 bytes of JSON each).
const REPORT_ACCESSES: usize = 10_000;
/// Most events sent in one report (the key service's default limit is 10,000).
const REPORT_EVENTS: usize = 1_000;
/// Most bytes of JSON, as estimated, in one report (the key service's
/// default body limit is 8 MiB). A decrypt event lists each protected
/// pointer of its records, so its size is not fixed by its record count.
const REPORT_BYTES: usize = 1024 * 1024;
/// How often events the key service refused are offered again.
const REFUSED_RETRY: Duration = Duration::from_secs(5);

/// An event waiting to be reported.
#[derive(Debug)]
struct Pending {
    event: AccessEvent,
    first_ms: i64,
    last_ms: i64,
    requests: u32,
    /// The id of each request it covers, in order, with how many of its
    /// record key ids that request added (the halves of a split event list
    /// the requests whose records each holds; one split across both is in
    /// both).
    request_ids: Vec<Covered>,
    /// When its first access was buffered.
    buffered_at: Instant,
    /// Random, reported as `fields.event_id`: a report whose answer was
    /// lost is sent again (maybe to another replica), and the same id on
    /// both copies tells an auditor they are one access, not two. (None
    /// only if the system's random source failed.)
    id: Option<[u8; 16]>,
    /// The id of the event this one is half of (split after a refusal as
    /// too large), reported as `fields.split_from`: a copy of that event
    /// may have been recorded before (its answer lost), so the halves
    /// carry ids of their own and say whose parts they are.
    split_from: Option<[u8; 16]>,
    /// Offered to the key service once: it takes no further accesses, so
    /// every copy under its id says the same.
    sealed: bool,
}

impl Pending {
    fn accesses(&self) -> usize {
        if self.event.access.lists_records() {
            self.event.record_key_ids.len()
        } else {
            self.requests as usize
        }
    }

    /// About how many bytes of JSON it is on the wire (over, not under).
    fn wire_bytes(&self) -> usize {
        let fields = match &self.event.access {
            Access::Encrypt { .. } | Access::Pseudonym { .. } => 0,
            Access::Decrypt { fields, .. } => {
                fields.iter().map(|(pointer, _)| 2 * pointer.len() + 16).sum()
            }
            Access::Index { path, .. } => 2 * path.len(),
        };
        let ids: usize = self.request_ids.iter().map(|(id, _)| id.len() + 3).sum();
        512 + 36 * self.accesses() + fields + ids
    }

    /// Splits off the second half of its records as an event of the same
    /// facts (each half counts the requests it may come from).
    fn split_records(&mut self) -> Self {
        let whole = self.split_from.or(self.id);
        self.id = new_event_id();
        self.split_from = whole;
        let half = self.event.record_key_ids.len() / 2;
        let rest = self.event.record_key_ids.split_off(half);
        let (kept, moved) = if self.event.access.lists_records() {
            split_requests(&self.request_ids, half)
        } else {
            // No records to halve (index, pseudonym): the requests are.
            let mut kept = std::mem::take(&mut self.request_ids);
            let moved = kept.split_off(kept.len() - kept.len() / 2);
            (kept, moved)
        };
        self.request_ids = kept;
        self.requests = count(self.request_ids.len());
        Self {
            event: AccessEvent {
                tenant: self.event.tenant.clone(),
                kek_version: self.event.kek_version,
                access: self.event.access.clone(),
                record_key_ids: rest,
                request_id: self.event.request_id,
            },
            first_ms: self.first_ms,
            last_ms: self.last_ms,
            requests: count(moved.len()),
            request_ids: moved,
            buffered_at: self.buffered_at,
            id: new_event_id(),
            split_from: whole,
            sealed: self.sealed,
        }
    }

    /// Adds `event` to this one if they differ only in records and time.
    /// Gives the event back when they cannot be coalesced.
    fn absorb(&mut self, event: AccessEvent, at_ms: i64) -> Option<AccessEvent> {
        let fits = self.accesses() + event.weight() <= MAX_IDS_PER_EVENT;
        if !fits
            || self.sealed
            || self.event.tenant != event.tenant
            || self.event.kek_version != event.kek_version
            || self.event.access != event.access
        {
            return Some(event);
        }
        self.request_ids.push((event.request_id, event.record_key_ids.len()));
        self.event.record_key_ids.extend(event.record_key_ids);
        self.first_ms = self.first_ms.min(at_ms);
        self.last_ms = self.last_ms.max(at_ms);
        self.requests = self.requests.saturating_add(1);
        None
    }
}

/// A request an event covers, and how many of its record key ids it added.
type Covered = (RequestId, usize);

/// `requests` (each with the record key ids it added, in order) split at
/// record `at`: those with records before it, and those with records from
/// it on; one with records on both sides is in both, with its part of them.
fn split_requests(requests: &[Covered], at: usize) -> (Vec<Covered>, Vec<Covered>) {
    let (mut first, mut rest) = (Vec::new(), Vec::new());
    let mut start = 0;
    for &(id, records) in requests {
        let end = start + records;
        if records == 0 {
            // Listed where its place in the order falls.
            if start <= at { first.push((id, 0)) } else { rest.push((id, 0)) }
        } else {
            if start < at {
                first.push((id, end.min(at) - start));
            }
            if end > at {
                rest.push((id, end - start.max(at)));
            }
        }
        start = end;
    }
    (first, rest)
}

/// A number of requests, as counted on the wire.
fn count(requests: usize) -> u32 {
    u32::try_from(requests).unwrap_or(u32::MAX)
}

/// An event the key service refused on its own.
#[derive(Debug)]
struct Refused {
    pending: Pending,
    /// The key service's error code.
    code: String,
    tried_at: Instant,
}

/// The waiting events and how many record accesses they list.
#[derive(Debug, Default)]
struct Buffer {
    /// In the order their first access was buffered.
    events: Vec<Pending>,
    /// Accesses in `events` (what `max_buffered` bounds).
    accesses: usize,
    refused: Vec<Refused>,
    /// Accesses in `refused`: they hold up only their tenants, whose new
    /// requests are refused meanwhile, so they count apart.
    refused_accesses: usize,
    /// The tenants of refused events and the key service's code, as of
    /// the last refusal or retry (unchanged while a retry is under way).
    held: Vec<(TenantId, String)>,
    /// When the oldest event of the report being sent was buffered: out
    /// of `events` while it is sent, still not delivered.
    in_flight: Option<Instant>,
}

impl Buffer {
    /// When the oldest event still to be delivered was buffered (waiting
    /// or being sent).
    fn oldest(&self) -> Option<Instant> {
        let waiting = self.events.first().map(|p| p.buffered_at);
        match (waiting, self.in_flight) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The error code of a refused event of `tenant`, if one waits.
    fn refused_code(&self, tenant: &TenantId) -> Option<&str> {
        self.held.iter().find(|(t, _)| t == tenant).map(|(_, code)| code.as_str())
    }

    fn add(&mut self, event: AccessEvent, at_ms: i64) {
        if event.weight() == 0 {
            return;
        }
        self.accesses += event.weight();
        let start = self.events.len().saturating_sub(COALESCE_WINDOW);
        let mut event = Some(event);
        for waiting in self.events.iter_mut().skip(start).rev() {
            match event.take().map(|e| waiting.absorb(e, at_ms)) {
                Some(Some(back)) => event = Some(back),
                _ => return,
            }
        }
        if let Some(event) = event {
            self.events.push(Pending {
                request_ids: vec![(event.request_id, event.record_key_ids.len())],
                event,
                first_ms: at_ms,
                last_ms: at_ms,
                requests: 1,
                buffered_at: Instant::now(),
                id: new_event_id(),
                split_from: None,
                sealed: false,
            });
        }
    }

    /// The oldest events, up to one report's worth (at least one event).
    fn take_report(&mut self) -> Vec<Pending> {
        let n = report_len(&self.events);
        let mut batch: Vec<Pending> = self.events.drain(..n).collect();
        for pending in &mut batch {
            pending.sealed = true;
        }
        self.accesses -= batch.iter().map(Pending::accesses).sum::<usize>();
        self.in_flight = batch.iter().map(|p| p.buffered_at).min();
        batch
    }

    /// Puts events that could not be delivered back in front, in order.
    fn put_back(&mut self, batch: Vec<Pending>) {
        self.accesses += batch.iter().map(Pending::accesses).sum::<usize>();
        let newer = std::mem::replace(&mut self.events, batch);
        self.events.extend(newer);
    }

    /// Keeps an event the key service refused (or could not take while
    /// it was offered again), holding its tenant; offered again after
    /// [`REFUSED_RETRY`].
    fn set_aside(&mut self, pending: Pending, code: String) {
        self.refused_accesses += pending.accesses();
        if self.refused_code(&pending.event.tenant).is_none() {
            self.held.push((pending.event.tenant.clone(), code.clone()));
        }
        self.refused.push(Refused { pending, code, tried_at: Instant::now() });
    }

    /// Refused events due to be offered again (taken out; their tenants
    /// stay held until [`Buffer::refresh_held`]).
    fn take_refused_due(&mut self) -> Vec<Refused> {
        let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.refused)
            .into_iter()
            .partition(|r| r.tried_at.elapsed() >= REFUSED_RETRY);
        self.refused = wait;
        self.refused_accesses -= due.iter().map(|r| r.pending.accesses()).sum::<usize>();
        due
    }

    /// Holds exactly the tenants that still have refused events; returns
    /// the tenants released.
    fn refresh_held(&mut self) -> Vec<TenantId> {
        let before = std::mem::take(&mut self.held);
        for r in &self.refused {
            if !self.held.iter().any(|(t, _)| *t == r.pending.event.tenant) {
                self.held.push((r.pending.event.tenant.clone(), r.code.clone()));
            }
        }
        before
            .into_iter()
            .map(|(tenant, _)| tenant)
            .filter(|tenant| self.refused_code(tenant).is_none())
            .collect()
    }
}

/// How many of `events`, from the first, make one report: at least one,
/// then as many as fit [`REPORT_EVENTS`], [`REPORT_ACCESSES`] and
/// [`REPORT_BYTES`].
fn report_len(events: &[Pending]) -> usize {
    let (mut accesses, mut bytes, mut first) = (0, 0, true);
    events
        .iter()
        .take(REPORT_EVENTS)
        .take_while(|p| {
            accesses += p.accesses();
            bytes += p.wire_bytes();
            std::mem::take(&mut first) || (accesses <= REPORT_ACCESSES && bytes <= REPORT_BYTES)
        })
        .count()
}

/// Where events being delivered came from, and so where they go back.
enum Source {
    /// The buffer: put back in front if the key service is unreachable.
    Buffer,
    /// Refused before, with this code: set aside again if unreachable.
    Refused(String),
}

/// What became of a report.
enum Delivery {
    Taken,
    /// Not now (the key service unreachable, busy or failing): try again.
    Later(String),
    /// The key service refused it as it is: its error code, and whether
    /// it was for its size (413, or `batch_too_large` for too many events).
    Refused {
        code: String,
        too_large: bool,
    },
}

impl From<Result<(), KsError>> for Delivery {
    fn from(result: Result<(), KsError>) -> Self {
        match result {
            Ok(()) => Self::Taken,
            Err(KsError::Api { status, code, .. })
                if (400..500).contains(&status) && status != 408 && status != 429 =>
            {
                let too_large = status == 413 || code == "batch_too_large";
                Self::Refused { code, too_large }
            }
            Err(e) => Self::Later(e.to_string()),
        }
    }
}

/// The event reporter.
pub(super) struct Reporter {
    client: Arc<KeyServiceClient>,
    config: ReportConfig,
    /// The application identity the sidecar serves (every event's actor).
    actor: String,
    state: Mutex<Buffer>,
    /// Whether any tenant is held (so that requests need not take the
    /// buffer's lock to learn that none is).
    any_held: AtomicBool,
    wake: Notify,
}

impl Reporter {
    /// A reporter; run [`Reporter::run`] in the background.
    pub(super) fn new(
        client: Arc<KeyServiceClient>,
        config: ReportConfig,
        actor: String,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            config,
            actor,
            state: Mutex::new(Buffer::default()),
            any_held: AtomicBool::new(false),
            wake: Notify::new(),
        })
    }

    fn buffer(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether events of `tenants` can be accepted now (checked before
    /// plaintext leaves): not while events wait too long or too many, nor
    /// for a tenant while the key service refuses one of its events.
    pub(super) fn check<'a>(
        &self,
        tenants: impl IntoIterator<Item = &'a TenantId>,
    ) -> Result<(), ApiError> {
        let buffer = self.buffer();
        let overdue = buffer
            .oldest()
            .is_some_and(|at| at.elapsed() > Duration::from_secs(self.config.max_unreported_secs));
        if overdue || buffer.accesses >= self.config.max_buffered {
            return Err(ApiError::unavailable(
                "audit_unavailable",
                "field-level audit events cannot be delivered to the key service",
            ));
        }
        if !self.any_held.load(Ordering::Acquire) {
            return Ok(());
        }
        // A batch's records are mostly of one tenant: each distinct run is
        // looked up once.
        let mut last = None;
        for tenant in tenants {
            if last == Some(tenant) {
                continue;
            }
            last = Some(tenant);
            if let Some(code) = buffer.refused_code(tenant) {
                return Err(ApiError::unavailable(
                    "audit_unavailable",
                    format!(
                        "the key service refuses this sidecar's audit events of tenant {tenant} \
                         ({code})"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Buffers events, stamped now (call [`Reporter::check`] first).
    pub(super) fn record(&self, events: Vec<AccessEvent>) {
        if events.is_empty() {
            return;
        }
        let at_ms = now_ms();
        let mut buffer = self.buffer();
        for event in events {
            buffer.add(event, at_ms);
        }
        if buffer.accesses >= REPORT_ACCESSES {
            self.wake.notify_one();
        }
    }

    /// Record accesses waiting to be reported.
    pub(super) fn pending(&self) -> usize {
        let buffer = self.buffer();
        buffer.accesses + buffer.refused_accesses
    }

    /// Flushes every interval until `stop` fires, then once more.
    pub(super) async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick =
            tokio::time::interval(Duration::from_millis(self.config.flush_interval_ms.max(10)));
        loop {
            tokio::select! {
                _ = tick.tick() => self.flush().await,
                () = self.wake.notified() => self.flush().await,
                _ = stop.changed() => break,
            }
        }
        self.flush().await;
        let left = self.pending();
        if left > 0 {
            tracing::error!(accesses = left, "shutdown: audit events could not be delivered");
        }
    }

    /// First offers again the refused events that are due, then sends
    /// what was buffered when the flush began, in reports; keeps what
    /// fails. (Events buffered meanwhile wait for the next flush, so that
    /// steady traffic cannot keep a flush, and the retries, from ending.)
    pub(super) async fn flush(&self) {
        self.retry_refused().await;
        let mut left = self.buffer().events.len();
        while left > 0 {
            let batch = {
                let mut buffer = self.buffer();
                if buffer.events.is_empty() {
                    break;
                }
                buffer.take_report()
            };
            left = left.saturating_sub(batch.len());
            let delivered = self.deliver(batch, Source::Buffer).await;
            self.buffer().in_flight = None;
            if !delivered {
                return;
            }
        }
    }

    async fn send(&self, events: &[Pending]) -> Delivery {
        self.client.report(&Report { actor: &self.actor, events }).await.into()
    }

    /// Sends `batch`. What the key service refuses as a whole is split by
    /// tenant; a tenant's events refused for their size are halved (by
    /// events, then by records); a tenant's events refused otherwise are
    /// set aside together. `false` if the key service could not take
    /// reports now: what was not delivered goes back where it came from.
    async fn deliver(&self, batch: Vec<Pending>, source: Source) -> bool {
        // Parts waiting their turn, the next one last.
        let mut todo = vec![batch];
        while let Some(mut batch) = todo.pop() {
            match self.send(&batch).await {
                Delivery::Taken => {}
                Delivery::Later(error) => {
                    tracing::warn!(%error, events = batch.len(), "audit report failed; will retry");
                    batch.extend(todo.into_iter().rev().flatten());
                    let mut buffer = self.buffer();
                    match source {
                        Source::Buffer => buffer.put_back(batch),
                        Source::Refused(code) => {
                            for pending in batch {
                                buffer.set_aside(pending, code.clone());
                            }
                        }
                    }
                    return false;
                }
                Delivery::Refused { code, .. } if spans_tenants(&batch) => {
                    tracing::warn!(%code, events = batch.len(), "audit report refused; splitting it by tenant");
                    todo.extend(by_tenant(batch, |p| &p.event.tenant).into_iter().rev());
                }
                Delivery::Refused { too_large: true, .. } if batch.len() > 1 => {
                    let second = batch.split_off(batch.len() / 2);
                    todo.push(second);
                    todo.push(batch);
                }
                Delivery::Refused { too_large: true, .. }
                    if batch.first().is_some_and(|p| p.accesses() > 1) =>
                {
                    let Some(mut one) = batch.pop() else { continue };
                    let second = one.split_records();
                    todo.push(vec![second]);
                    todo.push(vec![one]);
                }
                Delivery::Refused { code, .. } => {
                    let Some(tenant) = batch.first().map(|p| p.event.tenant.clone()) else {
                        continue;
                    };
                    tracing::error!(
                        %code,
                        %tenant,
                        events = batch.len(),
                        "the key service refuses audit events; requests for their tenant are \
                         refused until they are taken"
                    );
                    let mut buffer = self.buffer();
                    for pending in batch {
                        buffer.set_aside(pending, code.clone());
                    }
                    self.any_held.store(true, Ordering::Release);
                }
            }
        }
        true
    }

    /// Offers the refused events that are due again, per tenant, in
    /// reports of the usual size, split as [`Reporter::deliver`] splits;
    /// releases the tenants all of whose events were taken.
    async fn retry_refused(&self) {
        let due = self.buffer().take_refused_due();
        if due.is_empty() {
            return;
        }
        let mut reachable = true;
        for group in by_tenant(due, |r| &r.pending.event.tenant) {
            let code = group.first().map(|r| r.code.clone()).unwrap_or_default();
            let mut events: Vec<Pending> = group.into_iter().map(|r| r.pending).collect();
            while !events.is_empty() {
                let report: Vec<Pending> = events.drain(..report_len(&events)).collect();
                if reachable {
                    reachable = self.deliver(report, Source::Refused(code.clone())).await;
                } else {
                    // Not reachable now: back aside until the next round.
                    let mut buffer = self.buffer();
                    for pending in report {
                        buffer.set_aside(pending, code.clone());
                    }
                }
            }
        }
        let mut buffer = self.buffer();
        for tenant in buffer.refresh_held() {
            tracing::info!(%tenant, "refused audit events were taken; the tenant is served again");
        }
        self.any_held.store(!buffer.held.is_empty(), Ordering::Release);
    }
}

/// Whether `batch` holds events of more than one tenant.
fn spans_tenants(batch: &[Pending]) -> bool {
    batch
        .split_first()
        .is_some_and(|(first, rest)| rest.iter().any(|p| p.event.tenant != first.event.tenant))
}

/// `items` split into one group per tenant, each in the order given, the
/// groups in the order of their tenants' first items.
fn by_tenant<T>(items: Vec<T>, tenant: impl Fn(&T) -> &TenantId) -> Vec<Vec<T>> {
    let mut groups: Vec<Vec<T>> = Vec::new();
    for item in items {
        let same = |group: &&mut Vec<T>| group.first().is_some_and(|g| tenant(g) == tenant(&item));
        match groups.iter_mut().find(same) {
            Some(group) => group.push(item),
            None => groups.push(vec![item]),
        }
    }
    groups
}

/// The body of `POST /v1/audit/events`.
struct Report<'a> {
    actor: &'a str,
    events: &'a [Pending],
}

impl Serialize for Report<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1))?;
        let events: Vec<WireEvent<'_>> =
            self.events.iter().map(|pending| WireEvent { actor: self.actor, pending }).collect();
        map.serialize_entry("events", &events)?;
        map.end()
    }
}

/// One event in the key service's `ReportedEvent` form.
struct WireEvent<'a> {
    actor: &'a str,
    pending: &'a Pending,
}

impl Pending {
    fn action(&self) -> ReportedAction {
        match self.event.access {
            Access::Encrypt { .. } => ReportedAction::RecordEncrypt,
            Access::Decrypt { .. } => ReportedAction::RecordDecrypt,
            Access::Index { .. } => ReportedAction::FieldIndex,
            Access::Pseudonym { .. } => ReportedAction::FieldPseudonym,
        }
    }
}

impl Serialize for WireEvent<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let p = self.pending;
        let action = p.action();
        let purpose = match &p.event.access {
            Access::Decrypt { purpose, .. } => purpose.as_ref(),
            _ => None,
        };
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("actor", self.actor)?;
        map.serialize_entry("action", &action)?;
        map.serialize_entry("tenant", &p.event.tenant)?;
        if let Some(version) = p.event.kek_version {
            map.serialize_entry("kek_version", &version)?;
        }
        map.serialize_entry("record_key_ids", &p.event.record_key_ids)?;
        map.serialize_entry("outcome", "ok")?;
        if let Some(purpose) = purpose {
            map.serialize_entry("purpose", purpose)?;
        }
        map.serialize_entry("ts_ms", &p.first_ms)?;
        map.serialize_entry("fields", &Detail(p))?;
        map.end()
    }
}

/// The event's `fields` detail.
struct Detail<'a>(&'a Pending);

impl Serialize for Detail<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let p = self.0;
        let mut map = serializer.serialize_map(None)?;
        match &p.event.access {
            Access::Encrypt { schema } => {
                map.serialize_entry("schema", schema)?;
                map.serialize_entry("records", &p.accesses())?;
            }
            Access::Decrypt { schema, cache_hit, fields, .. } => {
                map.serialize_entry("cache_hit", cache_hit)?;
                map.serialize_entry("schema", schema)?;
                map.serialize_entry("fields", &Outcomes(fields))?;
            }
            Access::Index { schema, path } => {
                map.serialize_entry("schema", schema)?;
                map.serialize_entry("path", path)?;
            }
            Access::Pseudonym { namespace } => {
                map.serialize_entry("namespace", namespace)?;
            }
        }
        map.serialize_entry("requests", &p.requests)?;
        let ids: Vec<&RequestId> = p.request_ids.iter().map(|(id, _)| id).collect();
        map.serialize_entry("request_ids", &ids)?;
        map.serialize_entry("last_ts_ms", &p.last_ms)?;
        if let Some(id) = &p.id {
            map.serialize_entry("event_id", &data_encoding::HEXLOWER.encode(id))?;
        }
        if let Some(whole) = &p.split_from {
            map.serialize_entry("split_from", &data_encoding::HEXLOWER.encode(whole))?;
        }
        map.end()
    }
}

/// A fresh random event id.
fn new_event_id() -> Option<[u8; 16]> {
    kms_core::crypto::rng::array().ok()
}

/// Pointer → outcome, as a JSON object.
struct Outcomes<'a>(&'a [(String, &'static str)]);

impl Serialize for Outcomes<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(pointer, outcome)| (pointer, outcome)))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn tenant(name: &str) -> TenantId {
        TenantId::new(name).unwrap()
    }

    fn ids(n: usize, from: u8) -> Vec<RecordKeyId> {
        (0..n).map(|i| RecordKeyId::from_bytes([from.wrapping_add(i as u8); 16])).collect()
    }

    /// The id of request `n`.
    fn rid(n: u8) -> RequestId {
        RequestId::parse(format!("{n:032x}").as_bytes()).unwrap()
    }

    /// Request `from`'s decrypt of `n` records.
    fn decrypt(tenant_name: &str, cache_hit: bool, n: usize, from: u8) -> AccessEvent {
        AccessEvent {
            tenant: tenant(tenant_name),
            kek_version: Some(1),
            access: Access::Decrypt {
                schema: Name::new("patient").unwrap(),
                purpose: Some(Name::new("treatment").unwrap()),
                cache_hit,
                fields: vec![("/ssn".into(), "revealed"), ("/name".into(), "masked")],
            },
            record_key_ids: ids(n, from),
            request_id: rid(from),
        }
    }

    fn wire(batch: &[Pending]) -> Value {
        serde_json::to_value(Report { actor: "spiffe://t/app", events: batch }).unwrap()
    }

    #[test]
    fn alike_accesses_share_one_event_with_every_id_and_both_times() {
        let mut buffer = Buffer::default();
        buffer.add(decrypt("onc", true, 1, 0), 1_000);
        buffer.add(decrypt("onc", true, 1, 0), 1_150); // the same record again
        buffer.add(decrypt("onc", true, 1, 9), 1_100);
        assert_eq!((buffer.events.len(), buffer.accesses), (1, 3));
        let body = wire(&buffer.take_report());
        let event = &body["events"][0];
        assert_eq!(event["action"], "record.decrypt");
        assert_eq!(event["actor"], "spiffe://t/app");
        assert_eq!(event["purpose"], "treatment");
        assert_eq!(event["kek_version"], 1);
        assert_eq!(event["ts_ms"], 1_000);
        assert_eq!(event["fields"]["last_ts_ms"], 1_150);
        assert_eq!(event["fields"]["requests"], 3);
        assert_eq!(event["fields"]["fields"], json!({"/ssn": "revealed", "/name": "masked"}));
        let listed = event["record_key_ids"].as_array().unwrap();
        assert_eq!(listed.len(), 3, "one entry per access, repeats included: {event}");
        assert_eq!(listed[0], listed[1]);
        assert_eq!(buffer.accesses, 0);
    }

    #[test]
    fn accesses_that_differ_in_any_fact_stay_apart() {
        let mut buffer = Buffer::default();
        buffer.add(decrypt("onc", true, 1, 0), 1);
        buffer.add(decrypt("onc", false, 1, 1), 1); // cache miss
        buffer.add(decrypt("card", true, 1, 2), 1); // other tenant
        let mut other_version = decrypt("onc", true, 1, 3);
        other_version.kek_version = Some(2);
        buffer.add(other_version, 1);
        let mut other_outcome = decrypt("onc", true, 1, 4);
        if let Access::Decrypt { fields, .. } = &mut other_outcome.access {
            fields[1].1 = "withheld";
        }
        buffer.add(other_outcome, 1);
        buffer.add(
            AccessEvent {
                tenant: tenant("onc"),
                kek_version: None,
                access: Access::Encrypt { schema: Name::new("patient").unwrap() },
                record_key_ids: ids(2, 5),
                request_id: rid(5),
            },
            1,
        );
        assert_eq!(buffer.events.len(), 6);
        let body = wire(&buffer.take_report());
        let encrypt = &body["events"][5];
        assert_eq!(encrypt["action"], "record.encrypt");
        assert_eq!(encrypt["fields"]["records"], 2);
        assert!(encrypt.get("kek_version").is_none() && encrypt.get("purpose").is_none());
    }

    #[test]
    fn events_and_reports_stay_bounded() {
        let mut buffer = Buffer::default();
        for i in 0..25 {
            buffer.add(decrypt("onc", true, 100, i), 1);
        }
        // 2,500 accesses: events of at most 1,000 ids each.
        assert_eq!(buffer.accesses, 2_500);
        let sizes: Vec<usize> = buffer.events.iter().map(Pending::accesses).collect();
        assert_eq!(sizes, [1_000, 1_000, 500]);
        for i in 0..100 {
            buffer.add(decrypt(&format!("t{i}"), true, 200, 0), 1);
        }
        let first = buffer.take_report();
        let sent: usize = first.iter().map(Pending::accesses).sum();
        assert!(sent <= REPORT_ACCESSES, "{sent}");
        assert_eq!(buffer.accesses, 2_500 + 20_000 - sent);
        // A failed report goes back in front, in order.
        let first_ids = first[0].event.record_key_ids.clone();
        buffer.put_back(first);
        assert_eq!(buffer.accesses, 22_500);
        assert_eq!(buffer.events[0].event.record_key_ids, first_ids);
    }

    #[test]
    fn reports_are_bounded_in_bytes_and_halves_keep_every_record() {
        let mut buffer = Buffer::default();
        // Events of one record each, with many protected pointers: about
        // 40 KiB each, so a report of 1 MiB takes a few dozen of them.
        let fields: Vec<(String, &'static str)> =
            (0..1_000).map(|i| (format!("/allergies/{i}"), "revealed")).collect();
        for i in 0..100u8 {
            let mut event = decrypt(&format!("t{i}"), true, 1, i); // not coalesced
            if let Access::Decrypt { fields: f, .. } = &mut event.access {
                f.clone_from(&fields);
            }
            buffer.add(event, i64::from(i));
        }
        let report = buffer.take_report();
        let bytes = serde_json::to_vec(&Report { actor: "a", events: &report }).unwrap().len();
        assert!(report.len() > 1 && report.len() < 100, "{}", report.len());
        assert!(bytes <= REPORT_BYTES, "{bytes}");
        let estimated: usize = report.iter().map(Pending::wire_bytes).sum();
        assert!(estimated >= bytes, "the estimate is an upper bound: {estimated} < {bytes}");

        let mut pending = Buffer::default();
        pending.add(decrypt("onc", true, 5, 0), 7);
        pending.add(decrypt("onc", true, 1, 5), 8); // coalesced: 6 ids, 2 requests
        let mut first = pending.take_report().pop().unwrap();
        let whole = first.id;
        let mut second = first.split_records();
        // A copy of the whole may have been recorded (its answer lost):
        // the halves are new events that say whose parts they are.
        assert!(whole.is_some() && first.id != whole && second.id != whole);
        assert_ne!(first.id, second.id);
        assert_eq!((first.split_from, second.split_from), (whole, whole));
        let mut both = first.event.record_key_ids.clone();
        both.extend(second.event.record_key_ids.clone());
        assert_eq!(both, ids(5, 0).into_iter().chain(ids(1, 5)).collect::<Vec<_>>());
        assert_eq!((first.accesses(), second.accesses()), (3, 3));
        // The first request's five records straddle the split.
        assert_eq!((first.requests, second.requests), (1, 2));
        assert_eq!(first.request_ids, [(rid(0), 3)]);
        assert_eq!(second.request_ids, [(rid(0), 2), (rid(5), 1)]);
        assert_eq!(first.event.access, second.event.access);
        assert_eq!((second.first_ms, second.last_ms), (7, 8));
        let quarter = second.split_records();
        assert_eq!(quarter.split_from, whole, "halves of a half name the whole");
        let wired = wire(&[quarter]);
        assert_eq!(
            wired["events"][0]["fields"]["split_from"],
            data_encoding::HEXLOWER.encode(&whole.unwrap())
        );
    }

    #[test]
    fn refused_events_are_kept_apart_and_hold_only_their_tenant() {
        let mut buffer = Buffer::default();
        buffer.add(decrypt("onc", true, 2, 0), 1);
        buffer.add(decrypt("card", true, 3, 2), 1);
        let mut report = buffer.take_report();
        let card = report.pop().unwrap();
        buffer.put_back(report);
        buffer.set_aside(card, "forbidden".into());
        assert_eq!(
            (buffer.accesses, buffer.refused_accesses),
            (2, 3),
            "set aside, counted apart from what max_buffered bounds"
        );
        assert_eq!(buffer.refused_code(&tenant("card")), Some("forbidden"));
        assert_eq!(buffer.refused_code(&tenant("onc")), None);
        assert!(buffer.take_refused_due().is_empty(), "not due yet");
        buffer.refused[0].tried_at -= REFUSED_RETRY;
        let due = buffer.take_refused_due();
        assert_eq!(
            (due.len(), buffer.refused_accesses, buffer.refused_code(&tenant("card"))),
            (1, 0, Some("forbidden")),
            "held while it is being offered again"
        );
        // Refused again: aside once more, still held.
        for r in due {
            buffer.set_aside(r.pending, "forbidden".into());
        }
        assert!(buffer.refresh_held().is_empty());
        assert_eq!(
            (buffer.refused_accesses, buffer.refused_code(&tenant("card"))),
            (3, Some("forbidden"))
        );
        // Taken this time: released.
        buffer.refused[0].tried_at -= REFUSED_RETRY;
        let due = buffer.take_refused_due();
        assert_eq!(due.len(), 1);
        assert_eq!(buffer.refresh_held(), [tenant("card")]);
        assert_eq!((buffer.refused_accesses, buffer.refused_code(&tenant("card"))), (0, None));
        // The age that decides refusals is the oldest waiting event's own.
        let oldest = buffer.oldest().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        buffer.add(decrypt("onc", false, 1, 9), 2);
        let first = buffer.take_report();
        buffer.put_back(first);
        assert_eq!(buffer.oldest(), Some(oldest), "put back with its own time");
    }

    #[test]
    fn search_tokens_and_pseudonyms_are_counted_per_request_and_path() {
        let index = |path: &str, request: u8| AccessEvent {
            tenant: tenant("onc"),
            kek_version: None,
            access: Access::Index { schema: Name::new("patient").unwrap(), path: path.into() },
            record_key_ids: Vec::new(),
            request_id: rid(request),
        };
        let mut buffer = Buffer::default();
        buffer.add(index("/mrn", 1), 1);
        buffer.add(index("/mrn", 3), 3);
        buffer.add(index("/email", 2), 2);
        buffer.add(
            AccessEvent {
                tenant: tenant("onc"),
                kek_version: None,
                access: Access::Pseudonym { namespace: Name::new("patient").unwrap() },
                record_key_ids: Vec::new(),
                request_id: rid(4),
            },
            4,
        );
        assert_eq!((buffer.events.len(), buffer.accesses), (3, 4), "one access per request");
        let body = wire(&buffer.take_report());
        assert_eq!(buffer.accesses, 0);
        let mut mrn = body["events"][0].clone();
        assert_eq!(mrn["action"], "field.index");
        assert_eq!(mrn["record_key_ids"], json!([]));
        assert!(mrn["fields"]["event_id"].is_string(), "{mrn}");
        mrn["fields"].as_object_mut().unwrap().remove("event_id");
        assert_eq!(
            mrn["fields"],
            json!({"schema": "patient", "path": "/mrn", "requests": 2, "last_ts_ms": 3,
                   "request_ids": [rid(1).as_str(), rid(3).as_str()]})
        );
        assert_eq!(body["events"][1]["fields"]["path"], "/email");
        let pseudonym = &body["events"][2];
        assert_eq!(pseudonym["action"], "field.pseudonym");
        assert_eq!(pseudonym["fields"]["namespace"], "patient");
    }

    /// An event listing no records (index, pseudonym) splits its requests,
    /// ids included, so that halving always makes it smaller.
    #[test]
    fn an_event_without_records_splits_its_requests() {
        let index = |request: u8| AccessEvent {
            tenant: tenant("onc"),
            kek_version: None,
            access: Access::Index { schema: Name::new("patient").unwrap(), path: "/mrn".into() },
            record_key_ids: Vec::new(),
            request_id: rid(request),
        };
        let mut buffer = Buffer::default();
        for n in 1..=5 {
            buffer.add(index(n), i64::from(n));
        }
        let mut whole = buffer.take_report().pop().unwrap();
        assert_eq!(whole.requests, 5);
        let half = whole.split_records();
        let ids = |p: &Pending| p.request_ids.iter().map(|(id, _)| *id).collect::<Vec<_>>();
        assert_eq!((whole.requests, ids(&whole)), (3, vec![rid(1), rid(2), rid(3)]));
        assert_eq!((half.requests, ids(&half)), (2, vec![rid(4), rid(5)]));
        assert_eq!((whole.accesses(), half.accesses()), (3, 2));
    }

    #[test]
    fn requests_are_split_where_their_records_fall() {
        let r = |n: u8, records: usize| (rid(n), records);
        let requests = [r(1, 2), r(2, 3), r(3, 1)];
        assert_eq!(split_requests(&requests, 2), (vec![r(1, 2)], vec![r(2, 3), r(3, 1)]));
        assert_eq!(split_requests(&requests, 3), (vec![r(1, 2), r(2, 1)], vec![r(2, 2), r(3, 1)]));
        assert_eq!(split_requests(&requests, 6), (requests.to_vec(), vec![]));
        assert_eq!(split_requests(&[r(1, 0), r(2, 2)], 0), (vec![r(1, 0)], vec![r(2, 2)]));
    }

    /// Each request's id is listed in the event that covers it, once per
    /// request: a call the app retried (its first answer lost after the
    /// sidecar recorded it) shows as its id twice, not as two calls.
    #[test]
    fn coalesced_events_list_each_requests_id() {
        let mut buffer = Buffer::default();
        buffer.add(decrypt("onc", true, 2, 1), 1);
        buffer.add(decrypt("onc", true, 2, 1), 2); // the same call again
        buffer.add(decrypt("onc", true, 1, 9), 3);
        assert_eq!(buffer.events.len(), 1);
        let mut whole = buffer.take_report().pop().unwrap();
        let listed = [rid(1), rid(1), rid(9)];
        let ids_of = |p: &Pending| p.request_ids.iter().map(|(id, _)| *id).collect::<Vec<_>>();
        assert_eq!((whole.requests, ids_of(&whole)), (3, listed.to_vec()));
        let body = wire(std::slice::from_ref(&whole));
        let ids: Vec<&str> = listed.iter().map(RequestId::as_str).collect();
        assert_eq!(body["events"][0]["fields"]["request_ids"], json!(ids));
        // Records 0-1 came from the first request, 2-3 from its retry and
        // 4 from the third: each half lists the requests of its records.
        let half = whole.split_records();
        assert_eq!((whole.requests, ids_of(&whole)), (1, vec![rid(1)]));
        assert_eq!((half.requests, ids_of(&half)), (2, vec![rid(1), rid(9)]));
        let estimated = whole.wire_bytes();
        let bytes = serde_json::to_vec(&wire(&[whole])).unwrap().len();
        assert!(estimated >= bytes, "{estimated} < {bytes}");
    }

    /// A report whose answer was lost is sent again, maybe to another
    /// replica, and may then be recorded twice: each event carries an id,
    /// the same on every copy, and an event once offered takes no more
    /// accesses, so that every copy under one id says the same.
    #[test]
    fn a_resent_event_keeps_its_id_and_takes_no_new_accesses() {
        let mut buffer = Buffer::default();
        buffer.add(decrypt("onc", true, 1, 0), 1_000);
        buffer.add(decrypt("card", true, 1, 1), 1_000);
        let first = wire(&buffer.take_report());
        let id = |body: &Value, i: usize| body["events"][i]["fields"]["event_id"].clone();
        let (onc, card) = (id(&first, 0), id(&first, 1));
        assert_eq!(onc.as_str().map(str::len), Some(32), "{first}");
        assert_ne!(onc, card, "one id per event");
        // The answer is lost: both go back, and an alike access comes.
        let mut offered = Buffer::default();
        offered.add(decrypt("onc", true, 1, 0), 1_000);
        offered.add(decrypt("card", true, 1, 1), 1_000);
        let batch = offered.take_report();
        let sent = wire(&batch);
        offered.put_back(batch);
        offered.add(decrypt("onc", true, 1, 7), 1_200);
        assert_eq!(offered.events.len(), 3, "the new access is an event of its own");
        let again = wire(&offered.take_report());
        assert_eq!(again["events"][0], sent["events"][0], "the same event, the same id");
        assert_eq!(again["events"][1], sent["events"][1]);
        assert_ne!(id(&again, 2), id(&sent, 0));
        assert_eq!(again["events"][2]["record_key_ids"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn a_report_being_sent_still_counts_for_the_age_bound() {
        let mut buffer = Buffer::default();
        buffer.add(decrypt("onc", true, 1, 0), 1);
        let buffered = buffer.oldest().unwrap();
        let report = buffer.take_report();
        assert!(buffer.events.is_empty());
        assert_eq!(buffer.oldest(), Some(buffered), "in flight, not delivered");
        buffer.add(decrypt("card", true, 1, 1), 2);
        assert_eq!(buffer.oldest(), Some(buffered), "the older of waiting and in flight");
        buffer.in_flight = None; // delivered
        assert!(buffer.oldest().unwrap() > buffered);
        drop(report);
    }

    #[test]
    fn refused_reports_split_by_tenant_keeping_order() {
        let mut buffer = Buffer::default();
        for (i, t) in ["a", "b", "a", "c", "b"].iter().enumerate() {
            // Different KEK versions keep them from coalescing.
            let mut event = decrypt(t, true, 1, i as u8);
            event.kek_version = Some(u32::try_from(i).unwrap());
            buffer.add(event, i64::try_from(i).unwrap());
        }
        let batch = buffer.take_report();
        assert!(spans_tenants(&batch));
        let parts = by_tenant(batch, |p| &p.event.tenant);
        let shape: Vec<Vec<(String, i64)>> = parts
            .iter()
            .map(|part| part.iter().map(|p| (p.event.tenant.to_string(), p.first_ms)).collect())
            .collect();
        assert_eq!(
            shape,
            [
                vec![("a".to_owned(), 0), ("a".to_owned(), 2)],
                vec![("b".to_owned(), 1), ("b".to_owned(), 4)],
                vec![("c".to_owned(), 3)],
            ]
        );
        assert!(parts.iter().all(|part| !spans_tenants(part)));
    }

    #[test]
    fn only_client_errors_other_than_408_and_429_are_refusals() {
        let api = |status| {
            Delivery::from(Err(KsError::Api {
                status,
                code: "c".into(),
                message: String::new(),
                retry_after: None,
            }))
        };
        assert!(matches!(api(403), Delivery::Refused { too_large: false, .. }));
        assert!(matches!(api(413), Delivery::Refused { too_large: true, .. }));
        assert!(matches!(api(400), Delivery::Refused { too_large: false, .. }));
        // Too many events for the key service's batch limit is a size too.
        let too_many = Delivery::from(Err(KsError::Api {
            status: 400,
            code: "batch_too_large".into(),
            message: String::new(),
            retry_after: None,
        }));
        assert!(matches!(too_many, Delivery::Refused { too_large: true, .. }));
        assert!(matches!(api(408), Delivery::Later(_)));
        assert!(matches!(api(429), Delivery::Later(_)));
        assert!(matches!(api(503), Delivery::Later(_)));
        assert!(matches!(
            Delivery::from(Err(KsError::Unavailable("x".into()))),
            Delivery::Later(_)
        ));
        assert!(matches!(Delivery::from(Ok(())), Delivery::Taken));
    }

    #[test]
    fn an_oversized_single_request_is_still_one_report() {
        let mut buffer = Buffer::default();
        let mut big = decrypt("onc", true, 0, 0);
        big.record_key_ids = (0..(REPORT_ACCESSES + 5) as u32)
            .map(|i| {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&i.to_be_bytes());
                RecordKeyId::from_bytes(b)
            })
            .collect();
        buffer.add(big, 1);
        assert_eq!(buffer.take_report().len(), 1, "never an empty report");
        assert_eq!(buffer.accesses, 0);
        buffer.add(decrypt("onc", true, 0, 0), 1);
        assert!(buffer.events.is_empty(), "no event for no records");
    }
}
