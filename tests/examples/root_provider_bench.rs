//! Root key provider throughput: wrap + unwrap pairs per second for the
//! `local` provider (the in-process reference), `pkcs11` on a throwaway
//! SoftHSM2 token and `aws-kms` on a local moto server, each at several
//! concurrencies, with the latency of one pair (p50/p99).
//!
//! ```sh
//! .ci/install-test-deps        # softhsm2 and moto, once
//! cargo run --release -p keygate-tests --example root_provider_bench -- [seconds] [concurrency,…]
//! ```
//!
//! Defaults: 3 seconds per measurement, concurrencies 1,16. SoftHSM2 reads
//! its configuration once per process, so the benchmark re-runs itself in
//! a child process that sees the token (see `providers::softhsm2`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark binary

use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm_adapters::{Argon2Params, AwsKmsRootKey, LocalRootKey, Pkcs11RootKey};
use keygate_tests::providers::moto::{self, MotoServer};
use keygate_tests::providers::softhsm2::{InProcess, SoftHsm2};
use kms_core::{Key256, KeyPurpose, RootKeyProvider, WrapContext};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let token =
        match SoftHsm2::in_child_process(&args.iter().map(String::as_str).collect::<Vec<_>>()) {
            InProcess::Child(token) => token,
            InProcess::Parent(output) => {
                print!("{}", String::from_utf8_lossy(&output.stdout));
                eprint!("{}", String::from_utf8_lossy(&output.stderr));
                std::process::exit(output.status.code().unwrap_or(1));
            }
        };
    let seconds: u64 = args.first().map_or(3, |s| s.parse().expect("seconds"));
    let concurrencies: Vec<usize> = args
        .get(1)
        .map_or_else(|| "1,16".to_owned(), Clone::clone)
        .split(',')
        .map(|c| c.parse().expect("concurrency"))
        .collect();
    let duration = Duration::from_secs(seconds);

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn RootKeyProvider> = Arc::new(
            LocalRootKey::create(dir.path().join("root.key"), None, Argon2Params::DEFAULT).unwrap(),
        );

        token.create_key();
        let mut config = token.config();
        config.pool_size = concurrencies.iter().copied().max().unwrap_or(1).max(1);
        let pkcs11: Arc<dyn RootKeyProvider> = Arc::new(
            tokio::task::spawn_blocking(move || Pkcs11RootKey::connect(config))
                .await
                .unwrap()
                .unwrap(),
        );

        let moto = MotoServer::start();
        let arn = moto.create_key().await;
        let aws: Arc<dyn RootKeyProvider> = Arc::new(
            AwsKmsRootKey::connect_with_credentials(moto.config(&arn), moto::credentials())
                .await
                .unwrap(),
        );

        println!(
            "root key providers, wrap+unwrap pairs of a 32-byte key, {} s per row, {} CPUs",
            seconds,
            std::thread::available_parallelism().map_or(0, usize::from)
        );
        println!();
        println!("| provider | concurrency | pairs/s | p50 µs | p99 µs |");
        println!("|---|---:|---:|---:|---:|");
        for (name, provider) in [
            ("local (reference)", &local),
            ("pkcs11 (SoftHSM2)", &pkcs11),
            ("aws-kms (moto)", &aws),
        ] {
            for &concurrency in &concurrencies {
                let (rate, p50, p99) = measure(provider, concurrency, duration).await;
                println!("| {name} | {concurrency} | {rate:.0} | {p50} | {p99} |");
            }
        }
        drop(moto);
    });
}

/// Runs `concurrency` tasks doing wrap + unwrap pairs for `duration` (after
/// a short warm-up); returns pairs/s and the p50/p99 latency of a pair.
async fn measure(
    provider: &Arc<dyn RootKeyProvider>,
    concurrency: usize,
    duration: Duration,
) -> (f64, u128, u128) {
    run(provider, concurrency, Duration::from_millis(300)).await;
    let started = Instant::now();
    let mut latencies = run(provider, concurrency, duration).await;
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let percentile = |p: usize| latencies.get(latencies.len() * p / 100).copied().unwrap_or(0);
    (latencies.len() as f64 / elapsed, percentile(50), percentile(99))
}

/// The pair latencies (µs) of `concurrency` tasks running for `duration`.
async fn run(
    provider: &Arc<dyn RootKeyProvider>,
    concurrency: usize,
    duration: Duration,
) -> Vec<u128> {
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let provider = Arc::clone(provider);
            tokio::spawn(async move {
                let context = WrapContext {
                    purpose: KeyPurpose::TenantKek,
                    owner: format!("tenant-{task}"),
                    version: 1,
                };
                let key = Key256::generate().unwrap();
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let start = Instant::now();
                    let wrapped = provider.wrap(&key, &context).await.unwrap();
                    let back = provider.unwrap(&wrapped, &context).await.unwrap();
                    assert_eq!(back.expose_secret(), key.expose_secret());
                    latencies.push(start.elapsed().as_micros());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}
