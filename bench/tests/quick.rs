//! `keygate-bench --quick` runs every scenario against a real stack (a
//! key service and two sidecars as processes) and the in-process
//! reference, and writes well-formed JSON — so the benchmark cannot rot.
//! Nothing here asserts a speed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use std::process::Command;

use serde_json::Value;

/// Runs keygate-bench against a fresh stack with `args` (and `--out`):
/// its stdout, stderr and JSON report; panics if it fails.
fn bench(args: &[&str]) -> (String, String, Value) {
    let keygate = keygate_tests::keyservice::keygate_binary();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results.json");
    let output = Command::new(env!("CARGO_BIN_EXE_keygate-bench"))
        .args(args)
        .arg("--keygate")
        .arg(&keygate)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "keygate-bench failed:\n{stderr}");
    let report = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    (String::from_utf8_lossy(&output.stdout).into_owned(), stderr, report)
}

#[test]
fn quick_run_against_a_real_stack_writes_well_formed_json() {
    let (stdout, _, report) = bench(&[
        "--quick",
        "--duration",
        "0.15",
        "--warmup",
        "0.05",
        "--concurrency",
        "2",
        "--batch",
        "1,10",
        "--records",
        "200",
        "--warm-records",
        "300",
    ]);
    assert!(stdout.contains("| scenario |"), "no table:\n{stdout}");
    assert_eq!(report["tool"], "keygate-bench");
    assert!(report["machine"]["cores"].as_u64().unwrap() >= 1);
    let cells = report["cells"].as_array().unwrap();
    for system in ["keygate", "in-process"] {
        for scenario in ["encrypt", "decrypt-warm", "decrypt-cold", "rewrap", "datakeys"] {
            let found: Vec<&Value> = cells
                .iter()
                .filter(|c| c["system"] == system && c["scenario"] == scenario)
                .collect();
            let expected = if scenario == "datakeys" { 1 } else { 2 };
            assert_eq!(found.len(), expected, "{system} {scenario}");
            for cell in found {
                assert_eq!(cell["errors"], 0, "{cell}");
                assert!(cell["records"].as_u64().unwrap() > 0, "{cell}");
                assert!(cell["records_per_s"].as_f64().unwrap() > 0.0, "{cell}");
                let l = &cell["latency_us"];
                let (p50, p90, p99, max) = (
                    l["p50"].as_u64().unwrap(),
                    l["p90"].as_u64().unwrap(),
                    l["p99"].as_u64().unwrap(),
                    l["max"].as_u64().unwrap(),
                );
                assert!(p50 <= p90 && p90 <= p99 && p99 <= max, "{cell}");
                assert!(cell["processes"]["client"]["peak_rss_kib"].as_u64().unwrap() > 0);
                if system == "keygate" {
                    let ks = &cell["processes"]["key_service"];
                    assert!(ks["peak_rss_kib"].as_u64().unwrap() > 0, "{cell}");
                    assert!(ks["cpu_s"].as_f64().unwrap() >= 0.0, "{cell}");
                    if scenario != "datakeys" {
                        assert!(cell["processes"]["sidecar"]["peak_rss_kib"].as_u64().unwrap() > 0);
                    }
                }
            }
        }
    }
    let comparisons = report["comparisons"].as_array().unwrap();
    assert_eq!(comparisons.len(), 9);
    assert!(comparisons.iter().all(|c| c["vs_in_process"].as_f64().is_some_and(|r| r > 0.0)));
    assert!(report["memory"]["sidecar_cached_deks"].as_u64().unwrap() >= 300);
    // decrypt-warm was checked warm: no DEK cache miss during its cells.
    for cell in cells.iter().filter(|c| c["system"] == "keygate" && c["scenario"] == "decrypt-warm")
    {
        assert_eq!(cell["dek_cache_misses"], 0, "{cell}");
    }
    assert!(report["memory"]["sidecar_peak_rss_kib_decrypt_warm"].as_u64().unwrap() > 0);
    assert!(report["memory"]["sidecar_rss_kib_cache_full"].as_u64().unwrap() > 0);
    assert!(!report["targets"].as_array().unwrap().is_empty());
}

/// `--rounds 2` measures every cell twice, each round on its own stack,
/// and compares the medians.
#[test]
fn rounds_measure_every_cell_again() {
    let (stdout, stderr, report) = bench(&[
        "--quick",
        "--duration",
        "0.1",
        "--warmup",
        "0.02",
        "--rounds",
        "2",
        "--concurrency",
        "2",
        "--batch",
        "10",
        "--scenarios",
        "decrypt-cold",
        "--records",
        "50",
        "--warm-records",
        "50",
    ]);
    assert!(stderr.contains("round 2 of 2"), "{stderr}");
    assert_eq!(stderr.matches("keygate stack in").count(), 2, "{stderr}");
    assert!(stdout.contains("medians of 2 rounds"), "{stdout}");
    assert_eq!(report["options"]["rounds"], 2);
    let rounds: Vec<(u64, &str)> = report["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["round"].as_u64().unwrap(), c["system"].as_str().unwrap()))
        .collect();
    // The second round measures the systems in the reverse order.
    assert_eq!(rounds, [(0, "keygate"), (0, "in-process"), (1, "in-process"), (1, "keygate")]);
    assert!(stderr.contains("round 2 of 2: in-process → keygate"), "{stderr}");
    assert_eq!(
        report["round_order"],
        serde_json::json!([
            {"round": 0, "order": ["keygate", "in-process"]},
            {"round": 1, "order": ["in-process", "keygate"]},
        ])
    );
    let [comparison] = report["comparisons"].as_array().unwrap().as_slice() else {
        panic!("one comparison: {}", report["comparisons"]);
    };
    assert_eq!(comparison["rounds"], 2);
    let (low, high) =
        (&comparison["vs_in_process_range"][0], &comparison["vs_in_process_range"][1]);
    let median = comparison["vs_in_process"].as_f64().unwrap();
    assert!(low.as_f64().unwrap() <= median && median <= high.as_f64().unwrap(), "{comparison}");

    // Out of range: refused before anything starts.
    let refused =
        Command::new(env!("CARGO_BIN_EXE_keygate-bench")).args(["--rounds", "0"]).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--rounds"));
}

/// The pids of `parent`'s children (from `/proc/<pid>/stat`).
fn children_of(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces, so read after its ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if ppid.and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            found.push(pid);
        }
    }
    found
}

/// Kills the processes still running among its pids when dropped.
struct Reap(Vec<u32>);

impl Drop for Reap {
    fn drop(&mut self) {
        for pid in &self.0 {
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
            }
        }
    }
}

#[test]
fn a_run_stopped_by_sigterm_stops_the_stack_it_started() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let keygate = keygate_tests::keyservice::keygate_binary();
    let mut bench = Command::new(env!("CARGO_BIN_EXE_keygate-bench"))
        .args(["--quick", "--scenarios", "encrypt", "--batch", "1", "--concurrency", "1"])
        .args(["--duration", "60", "--warm-records", "100", "--no-in-process", "--keygate"])
        .arg(&keygate)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The key service and both sidecars.
    let deadline = Instant::now() + Duration::from_secs(120);
    let stack = loop {
        let children = children_of(bench.id());
        if children.len() >= 3 {
            break children;
        }
        assert!(Instant::now() < deadline, "the stack did not start");
        assert!(bench.try_wait().unwrap().is_none(), "keygate-bench ended early");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Should this test fail, what the bench left behind is killed.
    let _reap = Reap(stack.clone());
    std::thread::sleep(Duration::from_millis(500));
    let status = Command::new("kill").arg("-TERM").arg(bench.id().to_string()).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = bench.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "keygate-bench did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut bench.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
    for pid in stack {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} of the stack is still running"
        );
    }
}
