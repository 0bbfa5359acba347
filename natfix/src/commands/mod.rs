//! The bodies of natfix's commands. Each takes `config` types (never clap's)
//! and returns what `main` turns into an exit code.

pub mod attach;
pub mod completions;
pub mod detach;
pub mod diagnose;
pub mod health;
pub mod lab;
pub mod monitor;
pub mod reap;
pub mod set;
pub mod status;
pub mod stats;
pub mod trace;

use anyhow::Result;
use tracing::info;

/// Waits for SIGTERM or SIGINT.
pub(crate) async fn wait_for_shutdown() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
    Ok(())
}
