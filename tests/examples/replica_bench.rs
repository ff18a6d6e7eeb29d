//! Key-service throughput with 1, 2 and 3 replicas on PostgreSQL against
//! one replica on SQLite, on this machine:
//! - datakeys: DEKs issued per second (batches of 1,000);
//! - decrypt-cold: DEKs unwrapped per second (batches of 100, each DEK
//!   unwrapped once, so every one is a real unwrap by the key service).
//!
//! ```text
//! cargo run --release -p keygate-tests --example replica_bench [SECONDS] [CONCURRENCY]
//! ```
//! Needs PostgreSQL at `KEYGATE_TEST_PG_URL` (default the machine's
//! server). Clients and replicas share the machine's cores, so compare the
//! rows with each other, not with another machine.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // a benchmark

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keygate_tests::cluster::Cluster;
use keygate_tests::keyservice::KeyService;
use serde_json::{Value, json};

const ADMIN: &str = "spiffe://test/admin";
const ENC: &str = "spiffe://test/encryptor";
const DEC: &str = "spiffe://test/decryptor";

async fn run_for<F, Fut>(seconds: u64, concurrency: usize, work: F) -> f64
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = u64> + Send,
{
    let work = Arc::new(work);
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..concurrency)
        .map(|worker| {
            let (work, done) = (work.clone(), done.clone());
            tokio::spawn(async move {
                let mut round = 0;
                while Instant::now() < deadline {
                    done.fetch_add(work(worker, round).await, Ordering::Relaxed);
                    round += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

async fn measure(replicas: Arc<Vec<KeyService>>, seconds: u64, concurrency: usize) -> (f64, f64) {
    let (status, _) = replicas[0].post(ADMIN, "/v1/tenants", &json!({"tenant": "onc"})).await;
    assert_eq!(status, 201);
    let n = replicas.len();
    let r = replicas.clone();
    let datakeys = run_for(seconds, concurrency, move |worker, round| {
        let r = r.clone();
        async move {
            let (status, _) = r[(worker + round as usize) % n]
                .post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 1000}))
                .await;
            if status == 200 { 1000 } else { 0 }
        }
    })
    .await;

    // Distinct DEKs, each unwrapped once: the rate is DEKs / time to unwrap
    // them all (not capped by how many were prepared).
    let mut items: Vec<Value> = Vec::new();
    while items.len() < 100_000 {
        let (_, body) =
            replicas[0].post(ENC, "/v1/tenants/onc/datakeys", &json!({"count": 1000})).await;
        for k in body["keys"].as_array().unwrap() {
            items.push(json!({"record_key_id": k["record_key_id"], "kek_version": body["kek_version"], "wrapped": k["wrapped"]}));
        }
    }
    let batches: Arc<Vec<Value>> =
        Arc::new(items.chunks(100).map(|c| json!({"items": c})).collect());
    let next = Arc::new(AtomicU64::new(0));
    let unwrapped = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|worker| {
            let (r, batches, next, unwrapped) =
                (replicas.clone(), batches.clone(), next.clone(), unwrapped.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(batch) = batches.get(i) else { break };
                    let (status, _) = r[(worker + i) % n]
                        .post(DEC, "/v1/tenants/onc/datakeys/unwrap", batch)
                        .await;
                    if status == 200 {
                        unwrapped.fetch_add(100, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let cold = unwrapped.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    (datakeys, cold)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().map_or(5, |s| s.parse().unwrap());
    let concurrency: usize = args.next().map_or(8, |s| s.parse().unwrap());
    let quiet = "[log]\nlevel = \"warn\"\n";
    println!("| keystore | replicas | datakeys (DEKs/s) | decrypt-cold (DEKs/s) |");
    println!("|---|---:|---:|---:|");
    {
        let dir = tempfile::tempdir().unwrap();
        let ks = Arc::new(vec![KeyService::start(dir.path(), quiet)]);
        let (d, c) = measure(ks, seconds, concurrency).await;
        println!("| SQLite | 1 | {d:.0} | {c:.0} |");
    }
    for n in 1..=3 {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path(), n, quiet);
        let Cluster { replicas, schema, .. } = cluster;
        let (d, c) = measure(Arc::new(replicas), seconds, concurrency).await;
        drop(schema);
        println!("| PostgreSQL | {n} | {d:.0} | {c:.0} |");
    }
    println!(
        "\n{} cores, {seconds} s per cell, {concurrency} concurrent clients",
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
}
