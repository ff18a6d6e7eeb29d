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
    /// Which round of `--rounds` (from 0).
    pub(crate) round: u32,
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
    /// keygate's decrypt-warm: the sidecar's DEK cache misses during the
    /// cell, warm-up included (`keygate_dek_cache_misses` before and
    /// after); more than 0 fails the run, the cell was not warm.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) dek_cache_misses: Option<u64>,
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
            round: 0,
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
            dek_cache_misses: None,
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
/// With several rounds, every figure is the median over the rounds, and
/// each ratio the median of the rounds' own ratios (a round's keygate
/// against the same round's peer), with the lowest and highest beside it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Comparison {
    pub(crate) scenario: &'static str,
    pub(crate) batch: usize,
    pub(crate) concurrency: usize,
    /// Rounds this comparison is the median of.
    pub(crate) rounds: usize,
    pub(crate) keygate_records_per_s: f64,
    pub(crate) keygate_p99_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) openbao_records_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) openbao_p99_us: Option<u64>,
    /// keygate records/s ÷ OpenBao records/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) vs_openbao: Option<f64>,
    /// The lowest and highest round's `vs_openbao`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) vs_openbao_range: Option<(f64, f64)>,
    /// keygate p99 ÷ OpenBao p99.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) p99_vs_openbao: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) in_process_records_per_s: Option<f64>,
    /// keygate records/s ÷ in-process records/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) vs_in_process: Option<f64>,
    /// The lowest and highest round's `vs_in_process`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) vs_in_process_range: Option<(f64, f64)>,
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

/// The order in which one round measured the systems.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RoundOrder {
    pub(crate) round: u32,
    /// System names, first measured first.
    pub(crate) order: Vec<&'static str>,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub(crate) tool: &'static str,
    pub(crate) format: u32,
    pub(crate) machine: Machine,
    pub(crate) options: serde_json::Value,
    pub(crate) record: serde_json::Value,
    /// Each round's order of the systems (it alternates: see `main`).
    pub(crate) round_order: Vec<RoundOrder>,
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
    round: u32,
    system: &str,
    scenario: &str,
    batch: Option<usize>,
    concurrency: usize,
) -> Option<&'a Cell> {
    cells.iter().find(|c| {
        c.round == round
            && c.system == system
            && c.scenario == scenario
            && batch.is_none_or(|b| b == c.batch)
            && c.concurrency == concurrency
    })
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// The median (the mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => None,
        n if n % 2 == 1 => values.get(mid).copied(),
        _ => Some((values.get(mid - 1)? + values.get(mid)?) / 2.0),
    }
}

/// The median, lowest and highest of some rounds' values.
fn spread(values: Vec<f64>) -> (Option<f64>, Option<(f64, f64)>) {
    let low = values.iter().copied().reduce(f64::min);
    let high = values.iter().copied().reduce(f64::max);
    (median(values), low.zip(high))
}

/// keygate against the others, cell by cell (medians over rounds).
pub(crate) fn compare(cells: &[Cell]) -> Vec<Comparison> {
    let order = |c: &&Cell| {
        let at = crate::ours::SCENARIOS.iter().position(|s| *s == c.scenario);
        (at.unwrap_or(usize::MAX), c.batch, c.concurrency)
    };
    let rounds = cells.iter().map(|c| c.round).max().map_or(0, |r| r + 1);
    let mut ours: Vec<&Cell> =
        cells.iter().filter(|c| c.system == KEYGATE && c.round == 0).collect();
    ours.sort_by_key(order);
    ours.into_iter()
        .map(|first| {
            // datakeys: ours issues 1,000 per request; OpenBao has no batch.
            let same_batch = (first.scenario != "datakeys").then_some(first.batch);
            let (scenario, concurrency) = (first.scenario, first.concurrency);
            let mut per = PerRound::default();
            for round in 0..rounds {
                let Some(ours) =
                    find(cells, round, KEYGATE, scenario, Some(first.batch), concurrency)
                else {
                    continue;
                };
                per.ours.push(ours.records_per_s);
                per.ours_p99.push(ours.latency_us.p99 as f64);
                let peer =
                    find(cells, round, OPENBAO, peer_scenario(scenario), same_batch, concurrency);
                if let Some(peer) = peer {
                    per.peer.push(peer.records_per_s);
                    per.peer_p99.push(peer.latency_us.p99 as f64);
                    per.vs_peer.extend(ratio(ours.records_per_s, peer.records_per_s));
                    per.p99_vs_peer
                        .extend(ratio(ours.latency_us.p99 as f64, peer.latency_us.p99 as f64));
                }
                if let Some(local) =
                    find(cells, round, IN_PROCESS, scenario, same_batch, concurrency)
                {
                    per.local.push(local.records_per_s);
                    per.vs_local.extend(ratio(ours.records_per_s, local.records_per_s));
                }
            }
            let (vs_openbao, vs_openbao_range) = spread(per.vs_peer);
            let (vs_in_process, vs_in_process_range) = spread(per.vs_local);
            Comparison {
                scenario,
                batch: first.batch,
                concurrency,
                rounds: per.ours.len(),
                keygate_records_per_s: median(per.ours).unwrap_or(0.0),
                keygate_p99_us: median(per.ours_p99).map_or(0, |v| v.round() as u64),
                openbao_records_per_s: median(per.peer),
                openbao_p99_us: median(per.peer_p99).map(|v| v.round() as u64),
                vs_openbao,
                vs_openbao_range,
                p99_vs_openbao: median(per.p99_vs_peer),
                in_process_records_per_s: median(per.local),
                vs_in_process,
                vs_in_process_range,
            }
        })
        .collect()
}

/// One cell's figures, round by round.
#[derive(Default)]
struct PerRound {
    ours: Vec<f64>,
    ours_p99: Vec<f64>,
    peer: Vec<f64>,
    peer_p99: Vec<f64>,
    vs_peer: Vec<f64>,
    p99_vs_peer: Vec<f64>,
    local: Vec<f64>,
    vs_local: Vec<f64>,
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
            opt(c.vs_openbao, &|r| with_range(format!("{r:.2}×"), c.vs_openbao_range, &|v| {
                format!("{v:.2}")
            })),
            opt(c.in_process_records_per_s, &thousands),
            opt(c.vs_in_process, &|r| with_range(
                format!("{:.0}%", r * 100.0),
                c.vs_in_process_range,
                &|v| format!("{:.0}", v * 100.0)
            )),
        );
    }
    out
}

/// `median (low–high)` when the rounds differ, else the median alone.
fn with_range(median: String, range: Option<(f64, f64)>, show: &dyn Fn(f64) -> String) -> String {
    match range {
        Some((low, high)) if show(low) != show(high) => {
            format!("{median} ({}–{})", show(low), show(high))
        }
        _ => median,
    }
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

    fn cell(round: u32, system: &'static str, scenario: &'static str, rate: f64, p99: u64) -> Cell {
        Cell {
            round,
            system,
            scenario,
            batch: 100,
            concurrency: 16,
            requests: 1,
            records: 100,
            errors: 0,
            first_error: None,
            seconds: 1.0,
            records_per_s: rate,
            requests_per_s: rate / 100.0,
            latency_us: Latency { p99, ..Latency::default() },
            processes: BTreeMap::new(),
            dek_cache_misses: None,
        }
    }

    #[test]
    fn one_round_compares_its_cells() {
        let cells = [
            cell(0, KEYGATE, "decrypt-cold", 120.0, 20),
            cell(0, OPENBAO, "decrypt", 60.0, 100),
            cell(0, IN_PROCESS, "decrypt-cold", 400.0, 1),
        ];
        let [c] = compare(&cells).try_into().unwrap();
        assert_eq!((c.rounds, c.keygate_records_per_s, c.keygate_p99_us), (1, 120.0, 20));
        assert_eq!((c.openbao_records_per_s, c.openbao_p99_us), (Some(60.0), Some(100)));
        assert_eq!((c.vs_openbao, c.vs_openbao_range), (Some(2.0), Some((2.0, 2.0))));
        assert_eq!(c.p99_vs_openbao, Some(0.2));
        assert_eq!(c.vs_in_process, Some(0.3));
        assert!(table(&[c]).contains("| 2.00× | 400 | 30% |"), "{}", table(&compare(&cells)));
    }

    /// Each round's keygate is set against the same round's peer: a round
    /// where the machine was slow for both does not skew the ratio.
    #[test]
    fn rounds_give_medians_of_their_own_ratios() {
        let cells = [
            cell(0, KEYGATE, "decrypt-cold", 120.0, 10),
            cell(0, OPENBAO, "decrypt", 60.0, 50),
            cell(1, KEYGATE, "decrypt-cold", 60.0, 30),
            cell(1, OPENBAO, "decrypt", 40.0, 60),
            cell(2, KEYGATE, "decrypt-cold", 100.0, 20),
            cell(2, OPENBAO, "decrypt", 50.0, 70),
        ];
        let [c] = compare(&cells).try_into().unwrap();
        assert_eq!(c.rounds, 3);
        assert_eq!((c.keygate_records_per_s, c.keygate_p99_us), (100.0, 20));
        assert_eq!((c.openbao_records_per_s, c.openbao_p99_us), (Some(50.0), Some(60)));
        // Ratios 2.0, 1.5 and 2.0; the ratio of the medians would be 2.0 too,
        // but its range would not show the slow round.
        assert_eq!((c.vs_openbao, c.vs_openbao_range), (Some(2.0), Some((1.5, 2.0))));
        assert_eq!(c.vs_in_process, None);
        let shown = table(&[c]);
        assert!(shown.contains("| 2.00× (1.50–2.00) |"), "{shown}");
        let targets = targets(&compare(&cells), &Memory::default());
        let cold = targets.iter().find(|t| t.name.starts_with("decrypt-cold")).unwrap();
        assert!(cold.met && cold.measured == 2.0, "{cold:?}");
    }

    #[test]
    fn medians_of_even_counts_are_the_middle_mean() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0]), Some(3.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(vec![5.0, 1.0, 3.0]), Some(3.0));
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }
}
