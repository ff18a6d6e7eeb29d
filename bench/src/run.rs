//! Running one cell: warm-up (not counted), then the measured phase with
//! the processes' peak RSS reset and their CPU time noted around it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::load::{LoadSpec, run_async, run_threads};
use crate::procstat::{Watch, own_pid};
use crate::report::Cell;

/// How every cell runs.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) duration: Duration,
    pub(crate) warmup: Duration,
    pub(crate) max_requests: Option<u64>,
    pub(crate) concurrency: Vec<usize>,
    pub(crate) batches: Vec<usize>,
}

impl Plan {
    fn spec(&self, concurrency: usize) -> LoadSpec {
        LoadSpec { concurrency, duration: self.duration, max_requests: self.max_requests }
    }

    fn warm_spec(&self, concurrency: usize) -> LoadSpec {
        LoadSpec { concurrency, duration: self.warmup, max_requests: None }
    }
}

/// What a cell is, for the report.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CellId {
    pub(crate) system: &'static str,
    pub(crate) scenario: &'static str,
    pub(crate) batch: usize,
    pub(crate) concurrency: usize,
}

fn watched<'a>(procs: &[(&'a str, u32)]) -> Vec<(&'a str, u32)> {
    let mut all = procs.to_vec();
    all.push(("client", own_pid()));
    all
}

/// Measures an async (HTTP) cell.
pub(crate) async fn cell_async<F, Fut>(
    plan: &Plan,
    id: CellId,
    procs: &[(&str, u32)],
    op: F,
) -> Cell
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<u64, String>> + Send + 'static,
{
    let op = Arc::new(op);
    if !plan.warmup.is_zero() {
        let _ = run_async(plan.warm_spec(id.concurrency), &op).await;
    }
    let watch = Watch::begin(&watched(procs));
    let measured = run_async(plan.spec(id.concurrency), &op).await;
    let cell = Cell::new(id.system, id.scenario, id.batch, id.concurrency, &measured, watch.end());
    eprintln!("{}", cell.summary());
    cell
}

/// Measures an in-process cell on `concurrency` OS threads.
pub(crate) fn cell_threads<F>(plan: &Plan, id: CellId, op: &F) -> Cell
where
    F: Fn(u64) -> Result<u64, String> + Sync,
{
    if !plan.warmup.is_zero() {
        let _ = run_threads(plan.warm_spec(id.concurrency), op);
    }
    let watch = Watch::begin(&watched(&[]));
    let measured = run_threads(plan.spec(id.concurrency), op);
    let cell = Cell::new(id.system, id.scenario, id.batch, id.concurrency, &measured, watch.end());
    eprintln!("{}", cell.summary());
    cell
}

/// POSTs a JSON body; the answer's body if the status is 2xx, else why not.
pub(crate) async fn post(
    client: &reqwest::Client,
    url: &str,
    body: Bytes,
    token: Option<&str>,
) -> Result<Bytes, String> {
    let mut request =
        client.post(url).header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
    if let Some(token) = token {
        request = request.header("X-Vault-Token", token);
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = response.bytes().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(bytes)
    } else {
        let text: String = String::from_utf8_lossy(&bytes).chars().take(300).collect();
        Err(format!("HTTP {status}: {text}"))
    }
}

/// `pick(i)` over a non-empty list of bodies, round robin.
pub(crate) fn pick(bodies: &[Bytes], i: u64) -> Bytes {
    let n = bodies.len().max(1) as u64;
    bodies.get(usize::try_from(i % n).unwrap_or(0)).cloned().unwrap_or_default()
}
