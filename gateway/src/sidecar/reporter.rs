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
//! Accesses that differ only in which records and when — same tenant, KEK
//! version, action, schema, purpose, field outcomes and cache hit — are
//! coalesced while they wait: one event lists every record key id (once
//! per access), the first and last time (`ts_ms`, `fields.last_ts_ms`) and
//! how many requests it covers (`fields.requests`). The facts are those of
//! one event per request; the key service chains and stores a fraction of
//! the events (single-record traffic made it spend a third of the CPU on
//! them).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kms_core::{KekVersion, Name, RecordKeyId, TenantId};
use serde::Serialize;
use serde::ser::SerializeMap;
use tokio::sync::Notify;

use super::config::ReportConfig;
use super::ks_client::KeyServiceClient;
use crate::audit_log::now_ms;
use crate::error::ApiError;

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

/// An event waiting to be reported.
#[derive(Debug)]
struct Pending {
    event: AccessEvent,
    first_ms: i64,
    last_ms: i64,
    requests: u32,
}

impl Pending {
    fn accesses(&self) -> usize {
        self.event.record_key_ids.len()
    }

    /// Adds `event` to this one if they differ only in records and time.
    /// Gives the event back when they cannot be coalesced.
    fn absorb(&mut self, event: AccessEvent, at_ms: i64) -> Option<AccessEvent> {
        let fits = self.accesses() + event.record_key_ids.len() <= MAX_IDS_PER_EVENT;
        if !fits
            || self.event.tenant != event.tenant
            || self.event.kek_version != event.kek_version
            || self.event.access != event.access
        {
            return Some(event);
        }
        self.event.record_key_ids.extend(event.record_key_ids);
        self.first_ms = self.first_ms.min(at_ms);
        self.last_ms = self.last_ms.max(at_ms);
        self.requests = self.requests.saturating_add(1);
        None
    }
}

/// The waiting events and how many record accesses they list.
#[derive(Debug, Default)]
struct Buffer {
    events: Vec<Pending>,
    accesses: usize,
    /// When the oldest unreported event was buffered (None: buffer empty).
    oldest: Option<Instant>,
}

impl Buffer {
    fn add(&mut self, event: AccessEvent, at_ms: i64) {
        if event.record_key_ids.is_empty() {
            return;
        }
        self.oldest.get_or_insert_with(Instant::now);
        self.accesses += event.record_key_ids.len();
        let start = self.events.len().saturating_sub(COALESCE_WINDOW);
        let mut event = Some(event);
        for waiting in self.events.iter_mut().skip(start).rev() {
            match event.take().map(|e| waiting.absorb(e, at_ms)) {
                Some(Some(back)) => event = Some(back),
                _ => return,
            }
        }
        if let Some(event) = event {
            self.events.push(Pending { event, first_ms: at_ms, last_ms: at_ms, requests: 1 });
        }
    }

    /// The oldest events, up to one report's worth (at least one event).
    fn take_report(&mut self) -> Vec<Pending> {
        let mut accesses = 0;
        let n = self
            .events
            .iter()
            .take(REPORT_EVENTS)
            .take_while(|p| {
                let first = accesses == 0;
                accesses += p.accesses();
                first || accesses <= REPORT_ACCESSES
            })
            .count();
        let batch: Vec<Pending> = self.events.drain(..n).collect();
        self.accesses -= batch.iter().map(Pending::accesses).sum::<usize>();
        batch
    }

    /// Puts a report that could not be delivered back in front.
    fn put_back(&mut self, batch: Vec<Pending>, oldest: Option<Instant>) {
        self.accesses += batch.iter().map(Pending::accesses).sum::<usize>();
        let newer = std::mem::replace(&mut self.events, batch);
        self.events.extend(newer);
        self.oldest = oldest;
    }
}

/// The event reporter.
pub(super) struct Reporter {
    client: Arc<KeyServiceClient>,
    config: ReportConfig,
    /// The application identity the sidecar serves (every event's actor).
    actor: String,
    state: Mutex<Buffer>,
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
            wake: Notify::new(),
        })
    }

    fn buffer(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether events can be accepted now (checked before plaintext leaves).
    pub(super) fn check(&self) -> Result<(), ApiError> {
        let buffer = self.buffer();
        let overdue = buffer
            .oldest
            .is_some_and(|at| at.elapsed() > Duration::from_secs(self.config.max_unreported_secs));
        if overdue || buffer.accesses >= self.config.max_buffered {
            return Err(ApiError::unavailable(
                "audit_unavailable",
                "field-level audit events cannot be delivered to the key service",
            ));
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
        self.buffer().accesses
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

    /// Sends everything buffered, in reports; keeps what fails.
    pub(super) async fn flush(&self) {
        loop {
            let (batch, oldest) = {
                let mut buffer = self.buffer();
                if buffer.events.is_empty() {
                    return;
                }
                (buffer.take_report(), buffer.oldest)
            };
            let report = Report { actor: &self.actor, events: &batch };
            match self.client.report(&report).await {
                Ok(()) => {
                    let mut buffer = self.buffer();
                    buffer.oldest =
                        if buffer.events.is_empty() { None } else { Some(Instant::now()) };
                }
                Err(e) => {
                    tracing::warn!(error = %e, events = batch.len(), "audit report failed; will retry");
                    self.buffer().put_back(batch, oldest);
                    return;
                }
            }
        }
    }
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

impl Serialize for WireEvent<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let p = self.pending;
        let (action, purpose) = match &p.event.access {
            Access::Encrypt { .. } => ("record.encrypt", None),
            Access::Decrypt { purpose, .. } => ("record.decrypt", purpose.as_ref()),
        };
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("actor", self.actor)?;
        map.serialize_entry("action", action)?;
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
        }
        map.serialize_entry("requests", &p.requests)?;
        map.serialize_entry("last_ts_ms", &p.last_ms)?;
        map.end()
    }
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
        buffer.put_back(first, None);
        assert_eq!(buffer.accesses, 22_500);
        assert_eq!(buffer.events[0].event.record_key_ids, first_ids);
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
