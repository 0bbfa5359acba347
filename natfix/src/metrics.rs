//! Prometheus metrics of running attachments.

use anyhow::Result;

/// Serves metrics until the future is dropped.
pub async fn serve(_addr: std::net::SocketAddr, _dir: crate::pins::PinDir) -> Result<()> {
    anyhow::bail!("metrics are being written")
}
