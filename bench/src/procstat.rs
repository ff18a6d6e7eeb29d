//! Peak memory and CPU time of the processes under test, from `/proc`:
//! `VmHWM` (peak resident set) of `/proc/<pid>/status`, reset before each
//! measurement by writing `5` to `/proc/<pid>/clear_refs`, and user +
//! system time (`utime` + `stime`) of `/proc/<pid>/stat`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Serialize;

/// One process's use of the machine during a measurement.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct ProcUse {
    /// Peak resident set during the measurement (KiB), if the kernel let
    /// us reset the peak; otherwise the peak since the process started.
    pub(crate) peak_rss_kib: u64,
    /// Resident set at the end (KiB).
    pub(crate) rss_kib: u64,
    /// CPU seconds (user + system) spent during the measurement.
    pub(crate) cpu_s: f64,
}

/// Watches a set of named processes across one measurement.
pub(crate) struct Watch {
    procs: Vec<(String, u32, f64)>,
}

impl Watch {
    /// Resets each process's peak RSS and notes its CPU time.
    pub(crate) fn begin(procs: &[(&str, u32)]) -> Self {
        let procs = procs
            .iter()
            .map(|(name, pid)| {
                reset_peak(*pid);
                ((*name).to_owned(), *pid, cpu_seconds(*pid).unwrap_or(0.0))
            })
            .collect();
        Self { procs }
    }

    /// Each process's peak RSS and CPU seconds since [`Watch::begin`].
    pub(crate) fn end(self) -> BTreeMap<String, ProcUse> {
        self.procs
            .into_iter()
            .map(|(name, pid, cpu0)| {
                let status = status_kib(pid);
                let usage = ProcUse {
                    peak_rss_kib: status.0,
                    rss_kib: status.1,
                    cpu_s: (cpu_seconds(pid).unwrap_or(cpu0) - cpu0).max(0.0),
                };
                (name, usage)
            })
            .collect()
    }
}

/// This process's id.
pub(crate) fn own_pid() -> u32 {
    std::process::id()
}

fn reset_peak(pid: u32) {
    // Best effort: older kernels or foreign processes refuse; the peak is
    // then the lifetime peak, which is still an upper bound.
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// (VmHWM, VmRSS) in KiB; zeros if the process is gone.
pub(crate) fn status_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// User + system CPU seconds of `pid` so far.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted after its closing parenthesis; utime and stime are
    // fields 14 and 15, i.e. the 12th and 13th after it.
    let after = text.rsplit_once(')')?.1;
    let mut fields = after.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

/// `sysconf(_SC_CLK_TCK)`, asked of `getconf` once (100 on every Linux
/// this runs on; the fallback).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let pid = own_pid();
        let burn: u64 = (0..5_000_000u64).fold(0, |a, b| a.wrapping_add(b * b));
        assert!(burn > 0);
        assert!(cpu_seconds(pid).is_some_and(|s| s > 0.0));
        let watch = Watch::begin(&[("me", pid)]);
        let used = watch.end();
        let me = used.get("me").copied().unwrap_or_default();
        assert!(me.peak_rss_kib > 0 && me.rss_kib > 0, "{me:?}");
    }
}
