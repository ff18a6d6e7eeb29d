//! `keygate-bench`: a load generator that starts keygate's stack (or
//! attaches to one) and measures records/s, p50/p90/p99/max latency (HDR
//! histogram) and the sidecar's and key service's peak RSS and CPU time
//! for each scenario × records per request × concurrency; optionally the
//! same against OpenBao Transit (`--peer openbao`), and the in-process
//! limit (kms-core called directly) in the same run. Prints a Markdown
//! table and writes everything as JSON (`--out`).
//!
//! ```text
//! cargo run --release -p keygate-bench -- --peer openbao --out bench.json
//! ```

#![forbid(unsafe_code)]

mod cli;
mod dataset;
mod error;
mod inprocess;
mod load;
mod openbao;
mod ours;
mod procstat;
mod report;
mod run;
mod stack;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::json;

use crate::cli::{Args, Peer};
use crate::error::{Result, bail};
use crate::ours::{Keygate, SCENARIOS};
use crate::report::Report;
use crate::run::Plan;

/// The keygate binary's allocator (see gateway/src/main.rs): the
/// in-process reference must not be slower for a reason the sidecar has
/// not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keygate-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On SIGINT or SIGTERM the run is dropped, and with it every process
    // it started (each stopped and reaped) and their temporary directories;
    // the default action would leave the stack and OpenBao running.
    let outcome = runtime.block_on(async {
        tokio::select! {
            // The handlers first, so that they are in place before the
            // run starts any process.
            biased;
            signal = stop_signal() => Err(crate::error::BenchError(format!(
                "stopped by {signal}; the processes it started are stopped"
            ))),
            outcome = run(args) => outcome,
        }
    });
    // The in-process reference runs on blocking threads: not waited for.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The first SIGINT or SIGTERM, by name (never, if they cannot be caught).
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) =
        (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}

async fn run(args: Args) -> Result<()> {
    for s in &args.scenarios {
        if !SCENARIOS.contains(&s.as_str()) {
            bail!("unknown scenario {s}; known: {}", SCENARIOS.join(", "));
        }
    }
    if args.concurrency.iter().chain(&args.batch).any(|n| *n == 0) {
        bail!("--concurrency and --batch take positive numbers");
    }
    let plan = Plan {
        duration: Duration::from_secs_f64(args.duration().max(0.01)),
        warmup: Duration::from_secs_f64(args.warmup().max(0.0)),
        max_requests: args.requests,
        concurrency: args.concurrency.clone(),
        batches: args.batch.clone(),
    };
    let max_batch = plan.batches.iter().copied().max().unwrap_or(1);
    let records = dataset::patients(args.seed, args.records.max(max_batch));
    // The warm set: other records than the encrypt set (another seed).
    let warm = dataset::patients(args.seed.wrapping_add(1), args.warm_records().max(max_batch));
    let sizes: Vec<usize> =
        records.iter().map(|r| serde_json::to_vec(r).map_or(0, |v| v.len())).collect();
    let mean_size = sizes.iter().sum::<usize>() / sizes.len().max(1);
    eprintln!(
        "keygate-bench: {} cores; patient records of {mean_size} bytes on average, {} protected values each",
        report::Machine::this().cores,
        dataset::PROTECTED.len()
    );

    // Each system alone on the machine, one after the other, as many
    // rounds as asked; the order alternates from round to round (see
    // `round_order`).
    let bao = match args.peer {
        Peer::Openbao => Some(openbao::find_bao(args.bao.as_deref())?),
        Peer::None => None,
    };
    let mut cells = Vec::new();
    let mut orders = Vec::new();
    let mut warm_state = ours::WarmState::default();
    for round in 0..args.rounds {
        let order = round_order(round, bao.is_some(), !args.no_in_process);
        let names: Vec<&'static str> = order.iter().map(|s| s.name()).collect();
        if args.rounds > 1 {
            eprintln!("round {} of {}: {}", round + 1, args.rounds, names.join(" → "));
        }
        let mut measured = Vec::new();
        for system in order {
            match system {
                System::Keygate => {
                    let (keygate, stack) = ours_target(&args, warm.len()).await?;
                    if let Some(stack) = &stack {
                        eprintln!("keygate stack in {}", stack.dir().display());
                    }
                    let (ours, this_warm) = keygate
                        .run(&plan, &args.scenarios, &records, &warm, stack.as_ref())
                        .await?;
                    measured.extend(ours);
                    // The memory target is about the worst round.
                    if this_warm.sidecar_rss_kib >= warm_state.sidecar_rss_kib {
                        warm_state = this_warm;
                    }
                }
                System::Openbao => {
                    if let Some(bao) = &bao {
                        eprintln!("OpenBao: {}", bao.display());
                        let server = openbao::OpenBao::start(bao).await?;
                        measured.extend(server.run(&plan, &args.scenarios, &records, &warm).await?);
                    }
                }
                System::InProcess => {
                    let (plan, scenarios) = (plan.clone(), args.scenarios.clone());
                    let (records, warm) = (records.clone(), warm.clone());
                    let reference = tokio::task::spawn_blocking(move || {
                        inprocess::run(&plan, &scenarios, &records, &warm)
                    })
                    .await
                    .map_err(|e| error::BenchError(e.to_string()))??;
                    measured.extend(reference);
                }
            }
        }
        for cell in &mut measured {
            cell.round = round;
        }
        cells.extend(measured);
        orders.push(report::RoundOrder { round, order: names });
    }

    let comparisons = report::compare(&cells);
    let memory = report::memory(&cells, warm_state);
    let targets = report::targets(&comparisons, &memory);
    let machine = report::Machine::this();
    println!("{}", report::table(&comparisons));
    println!(
        "{} cores ({}); {:.1} s per cell after {:.1} s warm-up{}; records of {mean_size} bytes, {} protected values",
        machine.cores,
        machine.cpu,
        plan.duration.as_secs_f64(),
        plan.warmup.as_secs_f64(),
        if args.rounds > 1 {
            format!("; medians of {} rounds (lowest–highest round in brackets)", args.rounds)
        } else {
            String::new()
        },
        dataset::PROTECTED.len()
    );
    if let Some(kib) = memory.sidecar_rss_kib_cache_full {
        println!(
            "sidecar RSS with {} DEKs cached (idle): {:.1} MiB; peak across decrypt-warm cells: {:.1} MiB",
            memory.sidecar_cached_deks.map_or("?".into(), |n| report::thousands(n as f64)),
            kib as f64 / 1024.0,
            memory.sidecar_peak_rss_kib_decrypt_warm.unwrap_or(0) as f64 / 1024.0
        );
    }
    if let Some(kib) = memory.key_service_peak_rss_kib_datakeys {
        println!("key service peak RSS under datakeys: {:.1} MiB", kib as f64 / 1024.0);
    }
    if ["decrypt-warm", "decrypt-cold", "rewrap"]
        .iter()
        .any(|s| args.scenarios.iter().any(|x| x == s))
    {
        println!(
            "decrypt-warm, decrypt-cold and rewrap cycle through the same {} warm records on every system",
            report::thousands(warm.len() as f64)
        );
    }
    print!("{}", report::target_lines(&targets));

    let errors: u64 = cells.iter().map(|c| c.errors).sum();
    let not_warm: Vec<String> = cells
        .iter()
        .filter_map(|c| {
            let misses = c.dek_cache_misses.filter(|m| *m > 0)?;
            Some(format!(
                "round {} {} rec/req c={}: {misses} misses",
                c.round + 1,
                c.batch,
                c.concurrency
            ))
        })
        .collect();
    let report = Report {
        tool: "keygate-bench",
        format: 1,
        machine,
        options: json!({
            "quick": args.quick,
            "duration_s": plan.duration.as_secs_f64(),
            "warmup_s": plan.warmup.as_secs_f64(),
            "max_requests": args.requests,
            "concurrency": args.concurrency,
            "batch": args.batch,
            "scenarios": args.scenarios,
            "warm_records": warm.len(),
            "seed": args.seed,
            "rounds": args.rounds,
            "peer": format!("{:?}", args.peer).to_lowercase(),
        }),
        round_order: orders,
        record: json!({
            "schema": "patient (gateway::up::PATIENT_SCHEMA)",
            "mean_bytes": mean_size,
            "protected_values": dataset::PROTECTED.len(),
            "protected": dataset::PROTECTED,
        }),
        cells,
        comparisons,
        memory,
        targets,
    };
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        eprintln!("results written to {}", path.display());
    }
    if errors > 0 {
        bail!("{errors} requests failed (see the cells' first_error)");
    }
    if !not_warm.is_empty() {
        bail!(
            "decrypt-warm was not warm: the sidecar's DEK cache missed during {} (see the cells' \
             dek_cache_misses); these cells measured unwraps by the key service",
            not_warm.join("; ")
        );
    }
    Ok(())
}

/// A system measured in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Keygate,
    Openbao,
    InProcess,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            Self::Keygate => report::KEYGATE,
            Self::Openbao => report::OPENBAO,
            Self::InProcess => report::IN_PROCESS,
        }
    }
}

/// The order in which round `round` measures the systems it has: even
/// rounds keygate → OpenBao → in-process, odd rounds the reverse. Each
/// ratio sets keygate against a system measured minutes before or after
/// it; on a shared machine whose speed drifts, a fixed order would bias
/// every round the same way, alternating cancels it out over pairs of
/// rounds (an even number of rounds balances it exactly).
fn round_order(round: u32, peer: bool, in_process: bool) -> Vec<System> {
    let mut order = vec![System::Keygate];
    if peer {
        order.push(System::Openbao);
    }
    if in_process {
        order.push(System::InProcess);
    }
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// keygate to measure: a fresh stack, or the one given with --attach-…
/// `warm` is the size of the warm set, which the started sidecar's DEK
/// cache must hold.
async fn ours_target(args: &Args, warm: usize) -> Result<(Keygate, Option<stack::Stack>)> {
    if let Some(socket) = &args.attach_sidecar {
        let key_service = match (
            &args.attach_key_service,
            &args.attach_ca,
            &args.attach_cert,
            &args.attach_key,
        ) {
            (Some(url), Some(ca), Some(cert), Some(key)) => {
                let read = |p: &std::path::Path| std::fs::read_to_string(p);
                let client = stack::mtls_client(&read(ca)?, &read(cert)?, &read(key)?)?;
                Some((url.trim_end_matches('/').to_owned(), client))
            }
            _ => None,
        };
        let keygate = Keygate {
            sidecar: stack::unix_client(socket)?,
            sidecar_pid: args.sidecar_pid,
            cold: args.attach_cold_sidecar.as_deref().map(stack::unix_client).transpose()?,
            cold_pid: args.cold_sidecar_pid,
            key_service,
            key_service_pid: args.key_service_pid,
            tenant: args.tenant.clone(),
        };
        return Ok((keygate, None));
    }
    let binary = stack::keygate_binary(args.keygate.as_deref())?;
    let stack = stack::Stack::start(&binary, warm).await?;
    let keygate = Keygate {
        sidecar: stack::unix_client(&stack.sidecar_socket)?,
        sidecar_pid: Some(stack.sidecar.pid()),
        cold: Some(stack::unix_client(&stack.cold_socket)?),
        cold_pid: Some(stack.cold_sidecar.pid()),
        key_service: Some((stack.ks_url.clone(), stack.datakeys.clone())),
        key_service_pid: Some(stack.key_service.pid()),
        tenant: stack::TENANT.to_owned(),
    };
    Ok((keygate, Some(stack)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_alternate_the_order_of_the_systems() {
        use System::{InProcess, Keygate, Openbao};
        assert_eq!(round_order(0, true, true), [Keygate, Openbao, InProcess]);
        assert_eq!(round_order(1, true, true), [InProcess, Openbao, Keygate]);
        assert_eq!(round_order(2, true, true), [Keygate, Openbao, InProcess]);
        assert_eq!(round_order(3, true, true), [InProcess, Openbao, Keygate]);
        assert_eq!(round_order(0, false, true), [Keygate, InProcess]);
        assert_eq!(round_order(1, false, true), [InProcess, Keygate]);
        assert_eq!(round_order(1, true, false), [Openbao, Keygate]);
        assert_eq!(round_order(1, false, false), [Keygate]);
        // Over any two consecutive rounds, keygate runs once before and
        // once after each other system.
        for first in 0..4 {
            for other in [Openbao, InProcess] {
                let before = (first..first + 2)
                    .filter(|&r| {
                        let order = round_order(r, true, true);
                        let at = |s| order.iter().position(|x| *x == s);
                        at(Keygate) < at(other)
                    })
                    .count();
                assert_eq!(before, 1, "{other:?} from round {first}");
            }
        }
        assert_eq!(
            round_order(1, true, true).iter().map(|s| s.name()).collect::<Vec<_>>(),
            ["in-process", "openbao", "keygate"]
        );
    }
}
