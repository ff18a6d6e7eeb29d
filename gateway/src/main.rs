//! The `keygate` binary.

/// mimalloc rather than the system allocator: profiles of the sidecar
/// under load spent a third of its CPU in glibc's malloc and free (JSON
/// trees of every record, per-field buffers), and glibc's per-thread
/// arenas kept the peak resident set far above what is live.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    gateway::cli::main()
}
