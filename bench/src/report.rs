//! Results: one [`Cell`] per system × scenario × records per request ×
//! concurrency, the comparisons between systems, the targets, a
//! Markdown table for people and the whole as JSON for machines.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::load::{Latency, Measured};
use crate::procstat::ProcUse;

/// keygate through its sidecar (and key service).
pub(crate) const KEYGATE: &str = "keygate";
/// OpenBao's Transit engine.
pub(crate) const OPENBAO: &str = "openbao";
/// kms-core called directly, no HTTP, no JSON text.
pub(crate) const IN_PROCESS: &str = "in-process";

/// One measured cell.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Cell {
    pub(crate) system: &'static str,
    pub(crate) scenario: &'static str,
    /// Records (DEKs for `datakeys`) per request.
    pub(crate) batch: usize,
    pub(crate) concurrency: usize,
    pub(crate) requests: u64,
    pub(crate) records: u64,
    pub(crate) errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) first_error: Option<String>,
    pub(crate) seconds: f64,
    pub(crate) records_per_s: f64,
    pub(crate) requests_per_s: f64,
    pub(crate) latency_us: Latency,
    /// Peak RSS and CPU time of each process involved (`client` is the
    /// load generator itself).
    pub(crate) processes: BTreeMap<String, ProcUse>,
}

impl Cell {
    pub(crate) fn new(
        system: &'static str,
        scenario: &'static str,
        batch: usize,
        concurrency: usize,
        measured: &Measured,
        processes: BTreeMap<String, ProcUse>,
    ) -> Self {
        Self {
            system,
            scenario,
            batch,
            concurrency,
            requests: measured.requests,
            records: measured.records,
            errors: measured.errors,
            first_error: measured.first_error.clone(),
            seconds: measured.seconds,
            records_per_s: measured.records_per_s(),
            requests_per_s: measured.requests_per_s(),
            latency_us: measured.latency(),
            processes,
        }
    }

    /// One line for the progress log.
    pub(crate) fn summary(&self) -> String {
        let mut line = format!(
            "{:<10} {:<12} {:>4} rec/req  c={:<3} {:>11} rec/s  p50 {:>8}  p99 {:>8}",
            self.system,
            self.scenario,
            self.batch,
            self.concurrency,
            thousands(self.records_per_s),
            micros(self.latency_us.p50),
            micros(self.latency_us.p99),
        );
        for (name, usage) in &self.processes {
            let _ = write!(
                line,
                "  {name}: {:.0} MiB {:.2} cpu-s",
                usage.peak_rss_kib as f64 / 1024.0,
                usage.cpu_s
            );
        }
        if self.errors > 0 {
            let _ = write!(
                line,
                "  ERRORS {} (first: {})",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            );
        }
        line
    }
}

/// The machine the run was on.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) cores: usize,
    pub(crate) cpu: String,
    pub(crate) kernel: String,
}

impl Machine {
    pub(crate) fn this() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        Self { cores: std::thread::available_parallelism().map_or(0, |n| n.get()), cpu, kernel }
    }
}

/// keygate against the peer and the in-process limit, for one scenario.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Comparison {
    pub(crate) scenario: &'static str,
    pub(crate) batch: usize,
    pub(crate) concurrency: usize,
    pub(crate) keygate_records_per_s: f64,
    pub(crate) keygate_p99_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) openbao_records_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) openbao_p99_us: Option<u64>,
    /// keygate records/s ÷ OpenBao records/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) vs_openbao: Option<f64>,
    /// keygate p99 ÷ OpenBao p99.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) p99_vs_openbao: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) in_process_records_per_s: Option<f64>,
    /// keygate records/s ÷ in-process records/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) vs_in_process: Option<f64>,
}

/// One of the targets, evaluated on this run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Target {
    pub(crate) name: String,
    pub(crate) measured: f64,
    pub(crate) required: String,
    pub(crate) met: bool,
}

/// Memory facts the targets ask about.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Memory {
    /// DEKs in the sidecar's cache after the warm set was encrypted.
    pub(crate) sidecar_cached_deks: Option<u64>,
    /// The sidecar's resident set (KiB) then, with no request in flight.
    pub(crate) sidecar_rss_kib_cache_full: Option<u64>,
    /// The sidecar's peak RSS (KiB) across the decrypt-warm cells.
    pub(crate) sidecar_peak_rss_kib_decrypt_warm: Option<u64>,
    /// The key service's peak RSS (KiB) across the datakeys cells.
    pub(crate) key_service_peak_rss_kib_datakeys: Option<u64>,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub(crate) tool: &'static str,
    pub(crate) format: u32,
    pub(crate) machine: Machine,
    pub(crate) options: serde_json::Value,
    pub(crate) record: serde_json::Value,
    pub(crate) cells: Vec<Cell>,
    pub(crate) comparisons: Vec<Comparison>,
    pub(crate) memory: Memory,
    pub(crate) targets: Vec<Target>,
}

/// Which OpenBao scenario a keygate scenario is compared with (OpenBao
/// has no DEK cache: its decrypt is the same whether "warm" or "cold").
fn peer_scenario(scenario: &str) -> &str {
    match scenario {
        "decrypt-warm" | "decrypt-cold" => "decrypt",
        other => other,
    }
}

fn find<'a>(
    cells: &'a [Cell],
    system: &str,
    scenario: &str,
    batch: Option<usize>,
    concurrency: usize,
) -> Option<&'a Cell> {
    cells.iter().find(|c| {
        c.system == system
            && c.scenario == scenario
            && batch.is_none_or(|b| b == c.batch)
            && c.concurrency == concurrency
    })
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// keygate against the others, cell by cell.
pub(crate) fn compare(cells: &[Cell]) -> Vec<Comparison> {
    let order = |c: &&Cell| {
        let at = crate::ours::SCENARIOS.iter().position(|s| *s == c.scenario);
        (at.unwrap_or(usize::MAX), c.batch, c.concurrency)
    };
    let mut ours: Vec<&Cell> = cells.iter().filter(|c| c.system == KEYGATE).collect();
    ours.sort_by_key(order);
    ours.into_iter()
        .map(|ours| {
            // datakeys: ours issues 1,000 per request; OpenBao has no batch.
            let same_batch = (ours.scenario != "datakeys").then_some(ours.batch);
            let peer =
                find(cells, OPENBAO, peer_scenario(ours.scenario), same_batch, ours.concurrency);
            let local = find(cells, IN_PROCESS, ours.scenario, same_batch, ours.concurrency);
            Comparison {
                scenario: ours.scenario,
                batch: ours.batch,
                concurrency: ours.concurrency,
                keygate_records_per_s: ours.records_per_s,
                keygate_p99_us: ours.latency_us.p99,
                openbao_records_per_s: peer.map(|p| p.records_per_s),
                openbao_p99_us: peer.map(|p| p.latency_us.p99),
                vs_openbao: peer.and_then(|p| ratio(ours.records_per_s, p.records_per_s)),
                p99_vs_openbao: peer
                    .and_then(|p| ratio(ours.latency_us.p99 as f64, p.latency_us.p99 as f64)),
                in_process_records_per_s: local.map(|l| l.records_per_s),
                vs_in_process: local.and_then(|l| ratio(ours.records_per_s, l.records_per_s)),
            }
        })
        .collect()
}

/// The sidecar's and key service's memory across the relevant cells.
pub(crate) fn memory(cells: &[Cell], warm: crate::ours::WarmState) -> Memory {
    let peak = |scenario: &str, process: &str| {
        cells
            .iter()
            .filter(|c| c.system == KEYGATE && c.scenario == scenario)
            .filter_map(|c| c.processes.get(process).map(|p| p.peak_rss_kib))
            .max()
    };
    Memory {
        sidecar_cached_deks: warm.cached_deks,
        sidecar_rss_kib_cache_full: warm.sidecar_rss_kib,
        sidecar_peak_rss_kib_decrypt_warm: peak("decrypt-warm", "sidecar"),
        key_service_peak_rss_kib_datakeys: peak("datakeys", "key_service"),
    }
}

/// The speed and memory targets, for what this run measured.
pub(crate) fn targets(comparisons: &[Comparison], memory: &Memory) -> Vec<Target> {
    let mut out = Vec::new();
    let get = |scenario: &str, batch: Option<usize>, concurrency: usize| {
        comparisons.iter().find(|c| {
            c.scenario == scenario
                && batch.is_none_or(|b| b == c.batch)
                && c.concurrency == concurrency
        })
    };
    let mut at_least = |name: String, value: Option<f64>, min: f64| {
        if let Some(v) = value {
            out.push(Target { name, measured: v, required: format!(">= {min}"), met: v >= min });
        }
    };
    for scenario in ["encrypt", "decrypt-warm"] {
        let batch = get(scenario, Some(100), 16);
        at_least(
            format!("{scenario}, 100 records/request, c=16: records/s vs OpenBao"),
            batch.and_then(|c| c.vs_openbao),
            5.0,
        );
        let single = get(scenario, Some(1), 16);
        at_least(
            format!("{scenario}, 1 record/request, c=16: records/s vs OpenBao"),
            single.and_then(|c| c.vs_openbao),
            3.0,
        );
        at_least(
            format!("{scenario}, 1 record/request, c=16: OpenBao p99 / keygate p99"),
            single.and_then(|c| c.p99_vs_openbao).filter(|r| *r > 0.0).map(|r| 1.0 / r),
            2.0,
        );
    }
    at_least(
        "decrypt-cold, 100 records/request, c=16: records/s vs OpenBao".into(),
        get("decrypt-cold", Some(100), 16).and_then(|c| c.vs_openbao),
        2.0,
    );
    at_least(
        "datakeys, c=16: DEKs/s vs OpenBao transit/datakey".into(),
        get("datakeys", None, 16).and_then(|c| c.vs_openbao),
        20.0,
    );
    at_least(
        "encrypt, 100 records/request, c=16: sidecar vs in-process".into(),
        get("encrypt", Some(100), 16).and_then(|c| c.vs_in_process),
        0.4,
    );
    let mut at_most_mib = |name: &str, kib: Option<u64>| {
        if let Some(kib) = kib {
            let mib = kib as f64 / 1024.0;
            out.push(Target {
                name: name.to_owned(),
                measured: mib,
                required: "<= 64 MiB".into(),
                met: mib <= 64.0,
            });
        }
    };
    at_most_mib("sidecar RSS with the DEK cache full (idle)", memory.sidecar_rss_kib_cache_full);
    at_most_mib("key service peak RSS, datakeys", memory.key_service_peak_rss_kib_datakeys);
    out
}

/// The comparison as a Markdown table.
pub(crate) fn table(comparisons: &[Comparison]) -> String {
    let mut out = String::from(
        "| scenario | records/request | concurrency | keygate records/s | keygate p99 ms | OpenBao records/s | OpenBao p99 ms | keygate/OpenBao | in-process records/s | keygate/in-process |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in comparisons {
        let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("–".to_owned(), f);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.scenario,
            thousands(c.batch as f64),
            c.concurrency,
            thousands(c.keygate_records_per_s),
            millis(c.keygate_p99_us),
            opt(c.openbao_records_per_s, &thousands),
            c.openbao_p99_us.map_or("–".to_owned(), millis),
            opt(c.vs_openbao, &|r| format!("{r:.1}×")),
            opt(c.in_process_records_per_s, &thousands),
            opt(c.vs_in_process, &|r| format!("{:.0}%", r * 100.0)),
        );
    }
    out
}

/// The targets as a Markdown list.
pub(crate) fn target_lines(targets: &[Target]) -> String {
    let mut out = String::new();
    for t in targets {
        let _ = writeln!(
            out,
            "- {} {}: {:.2} (required {})",
            if t.met { "met" } else { "NOT met" },
            t.name,
            t.measured,
            t.required
        );
    }
    out
}

/// `12,345`.
pub(crate) fn thousands(v: f64) -> String {
    let n = v.round().max(0.0) as u64;
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn millis(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn micros(us: u64) -> String {
    if us >= 10_000 { format!("{:.1} ms", us as f64 / 1000.0) } else { format!("{us} µs") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }
}
