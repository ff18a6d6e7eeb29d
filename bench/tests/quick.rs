//! `keygate-bench --quick` runs every scenario against a real stack (a
//! key service and two sidecars as processes) and the in-process
//! reference, and writes well-formed JSON — so the benchmark cannot rot.
//! Nothing here asserts a speed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use std::process::Command;

use serde_json::Value;

#[test]
fn quick_run_against_a_real_stack_writes_well_formed_json() {
    let keygate = keygate_tests::keyservice::keygate_binary();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results.json");
    let output = Command::new(env!("CARGO_BIN_EXE_keygate-bench"))
        .args(["--quick", "--duration", "0.15", "--warmup", "0.05"])
        .args([
            "--concurrency",
            "2",
            "--batch",
            "1,10",
            "--records",
            "200",
            "--warm-records",
            "300",
        ])
        .arg("--keygate")
        .arg(&keygate)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "keygate-bench failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("| scenario |"), "no table:\n{stdout}");

    let report: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
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
    assert!(report["memory"]["sidecar_peak_rss_kib_decrypt_warm"].as_u64().unwrap() > 0);
    assert!(report["memory"]["sidecar_rss_kib_cache_full"].as_u64().unwrap() > 0);
    assert!(!report["targets"].as_array().unwrap().is_empty());
}
