//! `keygate up` from nothing: it starts, and the curl and admin lines it
//! prints work when pasted into a shell.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use keygate_tests::keyservice::keygate_binary;
use serde_json::Value;

#[test]
fn keygate_up_prints_curl_lines_that_work() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(keygate_binary())
        .args(["up", "--dir"])
        .arg(dir.path().join("dev"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let mut banner = Vec::new();
    let mut sidecar_ready = false;
    while !(sidecar_ready && banner.iter().any(|l: &String| l.contains("Stop with Ctrl-C"))) {
        let line =
            rx.recv_timeout(Duration::from_secs(120)).expect("keygate up printed its banner");
        sidecar_ready |= line.contains("keygate sidecar listening");
        banner.push(line);
    }
    let text = banner.join("\n");
    assert!(text.contains("DEVELOPMENT SETUP"), "{text}");
    let curls: Vec<&str> =
        banner.iter().map(|l| l.trim()).filter(|l| l.starts_with("curl ")).collect();
    assert_eq!(curls.len(), 2, "{text}");

    let run = |line: &str| {
        let out = Command::new("bash").arg("-c").arg(line).output().unwrap();
        assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap_or_else(|_| panic!("{line}: {}", String::from_utf8_lossy(&out.stdout)))
    };
    let encrypted = run(curls[0]);
    let record = &encrypted["record"];
    assert!(record["_kg"].as_str().unwrap().starts_with("kg1h:"), "{encrypted}");
    assert!(!encrypted.to_string().contains("123-45-6789"));
    let round_trip = run(curls[1]);
    let decrypted = &round_trip["record"];
    assert_eq!(decrypted["ssn"], "123-45-6789", "{round_trip}");
    assert_eq!(decrypted["diagnosis"], "C50.9");
    assert_eq!(decrypted["allergies"], serde_json::json!(["penicillin", "latex"]));
    assert!(decrypted["patient_id"].as_str().unwrap().starts_with("kgp:"));

    // The admin lines work too (with this build's binary in place of `keygate`).
    let admin: Vec<String> = banner
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.starts_with("keygate admin "))
        .map(|l| l.replacen("keygate", &keygate_binary().display().to_string(), 1))
        .collect();
    assert_eq!(admin.len(), 2, "{text}");
    for line in &admin {
        let out =
            Command::new("bash").arg("-c").arg(format!("{line} --output json")).output().unwrap();
        assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
        let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(shown.to_string().contains("demo"), "{line}: {shown}");
    }

    let _ = Command::new("kill").arg("-INT").arg(child.id().to_string()).status();
    for _ in 0..200 {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("keygate up did not stop on Ctrl-C");
}
