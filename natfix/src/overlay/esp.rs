//! The ESP GRO path: with `esp4_offload`/`esp6_offload` loaded and GRO on
//! the receiving device, decrypted packets are re-injected through GRO and
//! reach tc ingress, where the overlay program can repair them.

use std::process::Command;

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::sys::ethtool;

fn module_loaded(name: &str) -> bool {
    std::path::Path::new("/sys/module").join(name).exists()
}

/// The ESP offload modules natfix needs and this host has not loaded:
/// `esp4_offload` (required) and `esp6_offload` (for IPv6 underlays). They
/// put decrypted packets back through GRO, the only path on which tc sees them.
#[must_use]
pub fn missing_offload_modules() -> Vec<String> {
    ["esp4_offload", "esp6_offload"].into_iter().filter(|m| !module_loaded(m)).map(str::to_owned).collect()
}

/// Loads `modules`; Ok: those loaded. Err: those loaded before the required
/// `esp4_offload` failed, and why.
pub fn load_offload_modules(modules: &[String]) -> Result<Vec<String>, (Vec<String>, anyhow::Error)> {
    let mut loaded = Vec::new();
    for module in modules {
        let out = match Command::new("modprobe").arg(module).output() {
            Ok(out) => out,
            Err(e) => return Err((loaded, anyhow::Error::new(e).context("cannot run modprobe"))),
        };
        if out.status.success() && module_loaded(module) {
            info!("loaded kernel module {module} (ESP GRO path)");
            loaded.push(module.clone());
        } else if module == "esp4_offload" {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            return Err((
                loaded,
                anyhow::anyhow!("cannot load {module} ({why}): without it decrypted packets never reach tc; use --csum-backend nft (IPv4)"),
            ));
        } else {
            warn!("cannot load {module}: decrypted IPv6 underlay packets will not reach tc (IPv4 is covered)");
        }
    }
    Ok(loaded)
}

/// Whether GRO is on for `iface` (in the calling thread's namespace).
pub fn gro_on(iface: &str) -> Result<bool> {
    ethtool::gro_enabled(iface).with_context(|| format!("cannot read GRO state of {iface}"))
}

/// Switches GRO on for `iface` (in the calling thread's namespace).
pub fn enable_gro(iface: &str) -> Result<()> {
    ethtool::set_gro(iface, true).with_context(|| format!("cannot enable GRO on {iface}"))?;
    info!("enabled GRO on {iface} (ESP GRO path)");
    Ok(())
}

/// Whether decrypted packets may reach the overlay program as
/// `CHECKSUM_COMPLETE`: only when `iface` decrypts ESP in hardware (software
/// decryption, `esp_input()`, leaves `CHECKSUM_NONE`). Unknown counts as yes.
#[must_use]
pub fn decrypted_may_be_csum_complete(iface: &str) -> bool {
    ethtool::netdev_feature_active(iface, "esp-hw-offload").unwrap_or_else(|e| {
        warn!("cannot read {iface}'s features ({e}); assuming ESP hardware offload");
        true
    })
}
