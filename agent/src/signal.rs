//! Leaving when the process is asked to stop (SIGTERM, SIGINT).

use std::io;
use std::time::Duration;

use tokio::time::timeout;

use crate::error::AgentError;
use crate::handle::Agent;

/// Longest wait, after the connections are closed, for the close to reach the gateway.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

impl Agent {
    /// Keeps serving until the process receives SIGTERM or SIGINT (on other platforms,
    /// Ctrl-C), then leaves: detaches, so the gateway stops routing to the agent at once, gives
    /// the requests in flight at most `grace` to finish, and closes every connection.
    ///
    /// This is what a long-running agent's `main` usually ends with: without it, a stopped
    /// process just vanishes, and the gateway keeps routing to it until its idle timeout.
    /// Returns `Ok` once detached, [`AgentError::Timeout`] if `grace` ran out first (the
    /// connections are closed anyway), or [`AgentError::Io`] if the signal handlers cannot
    /// be installed (then the agent keeps running).
    pub async fn serve_until_signal(self, grace: Duration) -> Result<(), AgentError> {
        termination_signal().await?;
        tracing::info!("termination signal: detaching");
        let shared = self.shared().clone();
        let result = match timeout(grace, self.detach()).await {
            Ok(result) => result,
            Err(_) => {
                // Other clones of the handle may keep the agent alive; close it regardless.
                shared.shutdown.send_replace(true);
                Err(AgentError::Timeout("requests in flight to finish"))
            }
        };
        // Let the CONNECTION_CLOSE frames leave before the caller exits the process.
        let _ = timeout(CLOSE_FLUSH, shared.endpoint.wait_idle()).await;
        result
    }
}

/// Resolves when the process receives SIGTERM or SIGINT. The handlers are installed when this
/// is first polled.
#[cfg(unix)]
async fn termination_signal() -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
async fn termination_signal() -> io::Result<()> {
    tokio::signal::ctrl_c().await
}
