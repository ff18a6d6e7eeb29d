//! Closed-loop load: `concurrency` workers each send a request, wait for
//! its answer, record the latency and send the next, until the duration
//! (or the request budget) is spent.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// How long and how hard one phase runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoadSpec {
    /// Workers, each with one request in flight.
    pub(crate) concurrency: usize,
    /// How long.
    pub(crate) duration: Duration,
    /// Stop after this many requests, if sooner.
    pub(crate) max_requests: Option<u64>,
}

/// What one cell measured.
pub(crate) struct Measured {
    /// Requests answered successfully.
    pub(crate) requests: u64,
    /// Records (or DEKs) those requests carried.
    pub(crate) records: u64,
    /// Failed requests.
    pub(crate) errors: u64,
    /// The first failure, for the operator.
    pub(crate) first_error: Option<String>,
    /// Measured wall-clock seconds.
    pub(crate) seconds: f64,
    /// Latency of successful requests, in microseconds.
    pub(crate) histogram: Histogram<u64>,
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Latency {
    pub(crate) p50: u64,
    pub(crate) p90: u64,
    pub(crate) p99: u64,
    pub(crate) max: u64,
}

impl Measured {
    /// Records per second.
    pub(crate) fn records_per_s(&self) -> f64 {
        if self.seconds > 0.0 { self.records as f64 / self.seconds } else { 0.0 }
    }

    /// Requests per second.
    pub(crate) fn requests_per_s(&self) -> f64 {
        if self.seconds > 0.0 { self.requests as f64 / self.seconds } else { 0.0 }
    }

    /// p50/p90/p99/max.
    pub(crate) fn latency(&self) -> Latency {
        let h = &self.histogram;
        Latency {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
        }
    }
}

/// A histogram of microseconds from 1 µs to 10 minutes, 3 significant digits.
#[allow(clippy::expect_used)] // bench code: constant bounds that hdrhistogram accepts
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

struct Tally {
    requests: u64,
    records: u64,
    errors: u64,
    first_error: Option<String>,
    histogram: Histogram<u64>,
}

impl Tally {
    fn new() -> Self {
        Self { requests: 0, records: 0, errors: 0, first_error: None, histogram: histogram() }
    }

    fn note(&mut self, started: Instant, result: Result<u64, String>) {
        match result {
            Ok(records) => {
                let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                self.histogram.saturating_record(micros.max(1));
                self.requests += 1;
                self.records += records;
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn merge(&mut self, other: Self) {
        self.requests += other.requests;
        self.records += other.records;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        let _ = self.histogram.add(&other.histogram);
    }

    fn finish(self, seconds: f64) -> Measured {
        Measured {
            requests: self.requests,
            records: self.records,
            errors: self.errors,
            first_error: self.first_error,
            seconds,
            histogram: self.histogram,
        }
    }
}

/// Runs `op(i)` (i = 0, 1, 2, … across all workers) in a closed loop on
/// the tokio runtime. `op` answers the number of records the request
/// carried (0: nothing left, the worker stops), or why it failed.
pub(crate) async fn run_async<F, Fut>(spec: LoadSpec, op: &Arc<F>) -> Measured
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<u64, String>> + Send + 'static,
{
    let start = Instant::now();
    let tally = phase_async(op, spec.concurrency, spec.duration, spec.max_requests).await;
    tally.finish(start.elapsed().as_secs_f64())
}

async fn phase_async<F, Fut>(
    op: &Arc<F>,
    concurrency: usize,
    duration: Duration,
    max_requests: Option<u64>,
) -> Tally
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<u64, String>> + Send + 'static,
{
    let deadline = Instant::now() + duration;
    let sequence = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (op, sequence) = (op.clone(), sequence.clone());
            tokio::spawn(async move {
                let mut tally = Tally::new();
                while Instant::now() < deadline {
                    let i = sequence.fetch_add(1, Ordering::Relaxed);
                    if max_requests.is_some_and(|max| i >= max) {
                        break;
                    }
                    let started = Instant::now();
                    let result = op(i).await;
                    if matches!(result, Ok(0)) {
                        break; // nothing left to send
                    }
                    tally.note(started, result);
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::new();
    for worker in workers {
        match worker.await {
            Ok(tally) => total.merge(tally),
            Err(e) => total.note(Instant::now(), Err(format!("worker failed: {e}"))),
        }
    }
    total
}

/// The same on OS threads, for the in-process reference: `op(i)` runs
/// synchronously, `concurrency` threads at a time.
pub(crate) fn run_threads<F>(spec: LoadSpec, op: &F) -> Measured
where
    F: Fn(u64) -> Result<u64, String> + Sync,
{
    let start = Instant::now();
    let tally = phase_threads(op, spec.concurrency, spec.duration, spec.max_requests);
    tally.finish(start.elapsed().as_secs_f64())
}

fn phase_threads<F>(
    op: &F,
    concurrency: usize,
    duration: Duration,
    max_requests: Option<u64>,
) -> Tally
where
    F: Fn(u64) -> Result<u64, String> + Sync,
{
    let deadline = Instant::now() + duration;
    let sequence = AtomicU64::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..concurrency.max(1))
            .map(|_| {
                scope.spawn(|| {
                    let mut tally = Tally::new();
                    while Instant::now() < deadline {
                        let i = sequence.fetch_add(1, Ordering::Relaxed);
                        if max_requests.is_some_and(|max| i >= max) {
                            break;
                        }
                        let started = Instant::now();
                        let result = op(i);
                        if matches!(result, Ok(0)) {
                            break; // nothing left to do
                        }
                        tally.note(started, result);
                    }
                    tally
                })
            })
            .collect();
        let mut total = Tally::new();
        for worker in workers {
            match worker.join() {
                Ok(tally) => total.merge(tally),
                Err(_) => total.note(Instant::now(), Err("worker thread panicked".to_owned())),
            }
        }
        total
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_count_records_and_errors() {
        let spec = LoadSpec {
            concurrency: 4,
            duration: Duration::from_secs(5),
            max_requests: Some(1_000),
        };
        let m = run_threads(spec, &|i| if i % 10 == 0 { Err("ten".into()) } else { Ok(2) });
        assert_eq!(m.requests + m.errors, 1_000);
        assert_eq!(m.records, 2 * m.requests);
        assert_eq!(m.first_error.as_deref(), Some("ten"));
        assert!(m.latency().max >= m.latency().p50);
    }
}
