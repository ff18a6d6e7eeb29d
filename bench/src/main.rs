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

    // Ours first, alone on the machine; then the peer, alone; then the
    // in-process reference, alone; as many rounds as asked.
    let bao = match args.peer {
        Peer::Openbao => Some(openbao::find_bao(args.bao.as_deref())?),
        Peer::None => None,
    };
    let mut cells = Vec::new();
    let mut warm_state = ours::WarmState::default();
    for round in 0..args.rounds {
        if args.rounds > 1 {
            eprintln!("round {} of {}", round + 1, args.rounds);
        }
        let (mut measured, this_warm) = {
            let (keygate, stack) = ours_target(&args).await?;
            if let Some(stack) = &stack {
                eprintln!("keygate stack in {}", stack.dir().display());
            }
            keygate.run(&plan, &args.scenarios, &records, &warm, stack.as_ref()).await?
        };
        // The memory target is about the worst round.
        if this_warm.sidecar_rss_kib >= warm_state.sidecar_rss_kib {
            warm_state = this_warm;
        }
        if let Some(bao) = &bao {
            eprintln!("OpenBao: {}", bao.display());
            let server = openbao::OpenBao::start(bao).await?;
            measured.extend(server.run(&plan, &args.scenarios, &records, &warm).await?);
        }
        if !args.no_in_process {
            let (plan, scenarios) = (plan.clone(), args.scenarios.clone());
            let (records, warm) = (records.clone(), warm.clone());
            let reference = tokio::task::spawn_blocking(move || {
                inprocess::run(&plan, &scenarios, &records, &warm)
            })
            .await
            .map_err(|e| error::BenchError(e.to_string()))??;
            measured.extend(reference);
        }
        for cell in &mut measured {
            cell.round = round;
        }
        cells.extend(measured);
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
    print!("{}", report::target_lines(&targets));

    let errors: u64 = cells.iter().map(|c| c.errors).sum();
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
    Ok(())
}

/// keygate to measure: a fresh stack, or the one given with --attach-…
async fn ours_target(args: &Args) -> Result<(Keygate, Option<stack::Stack>)> {
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
    let stack = stack::Stack::start(&binary).await?;
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
