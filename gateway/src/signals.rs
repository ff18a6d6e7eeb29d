//! Shutdown signals shared by the key service and the sidecar.

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};

/// Resolves at SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled: call it before announcing
/// that the process listens, so a SIGTERM right after is a clean shutdown.
pub(crate) fn termination() -> std::io::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
