//! Field-level access events, reported to the key service in batches.
//!
//! Events are buffered in memory and flushed every `flush_interval` and on
//! clean shutdown. When the key service cannot take them for longer than
//! `max_unreported`, or the buffer is full, new requests that would produce
//! events are refused (503 `audit_unavailable`): nothing is silently lost.
//! (A crash loses at most one flush interval of buffered events; the key
//! service has already recorded every DEK unwrap behind them.)

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::Notify;

use super::config::ReportConfig;
use super::ks_client::KeyServiceClient;
use crate::error::ApiError;

struct State {
    buffer: Vec<Value>,
    /// When the oldest unreported event was buffered (None: buffer empty).
    oldest: Option<Instant>,
}

/// The event reporter.
pub(super) struct Reporter {
    client: Arc<KeyServiceClient>,
    config: ReportConfig,
    state: Mutex<State>,
    wake: Notify,
}

/// Most events sent in one report.
const REPORT_BATCH: usize = 5_000;

impl Reporter {
    /// A reporter; run [`Reporter::run`] in the background.
    pub(super) fn new(client: Arc<KeyServiceClient>, config: ReportConfig) -> Arc<Self> {
        Arc::new(Self {
            client,
            config,
            state: Mutex::new(State { buffer: Vec::new(), oldest: None }),
            wake: Notify::new(),
        })
    }

    /// Whether events can be accepted now (checked before plaintext leaves).
    pub(super) fn check(&self) -> Result<(), ApiError> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let overdue = state
            .oldest
            .is_some_and(|at| at.elapsed() > Duration::from_secs(self.config.max_unreported_secs));
        if overdue || state.buffer.len() >= self.config.max_buffered {
            return Err(ApiError::unavailable(
                "audit_unavailable",
                "field-level audit events cannot be delivered to the key service",
            ));
        }
        Ok(())
    }

    /// Buffers events (call [`Reporter::check`] first).
    pub(super) fn record(&self, events: Vec<Value>) {
        if events.is_empty() {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.oldest.get_or_insert_with(Instant::now);
        state.buffer.extend(events);
        if state.buffer.len() >= REPORT_BATCH {
            self.wake.notify_one();
        }
    }

    /// Events waiting to be reported.
    pub(super) fn pending(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).buffer.len()
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
            tracing::error!(events = left, "shutdown: audit events could not be delivered");
        }
    }

    /// Sends everything buffered, in batches; keeps what fails.
    pub(super) async fn flush(&self) {
        loop {
            let (batch, oldest) = {
                let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if state.buffer.is_empty() {
                    return;
                }
                let n = state.buffer.len().min(REPORT_BATCH);
                (state.buffer.drain(..n).collect::<Vec<_>>(), state.oldest)
            };
            match self.client.report(&json!({ "events": batch })).await {
                Ok(()) => {
                    let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    state.oldest =
                        if state.buffer.is_empty() { None } else { Some(Instant::now()) };
                }
                Err(e) => {
                    tracing::warn!(error = %e, events = batch.len(), "audit report failed; will retry");
                    let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    let newer = std::mem::take(&mut state.buffer);
                    state.buffer = batch;
                    state.buffer.extend(newer);
                    state.oldest = oldest;
                    return;
                }
            }
        }
    }
}
