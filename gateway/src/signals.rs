//! Signals shared by the key service and the sidecar: shutdown, and
//! SIGHUP for reloads.

use std::future::Future;

use tokio::signal::unix::{Signal, SignalKind, signal};

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

/// SIGHUP, if it can be listened for; if not, logged with `without` (what
/// then reloads only otherwise) and the rest runs on.
pub(crate) fn hangups(without: &str) -> Option<Signal> {
    signal(SignalKind::hangup())
        .map_err(|e| tracing::error!(error = %e, "cannot listen for SIGHUP: {without}"))
        .ok()
}

/// The next SIGHUP, or never when there is no handler for it.
pub(crate) async fn next_hangup(hup: &mut Option<Signal>) {
    let received = match hup.as_mut() {
        Some(hup) => hup.recv().await,
        None => None,
    };
    if received.is_none() {
        std::future::pending::<()>().await;
    }
}
