//! The ESP GRO path: with `esp4_offload`/`esp6_offload` loaded and GRO on
//! the receiving device, decrypted packets are re-injected through GRO and
//! reach tc ingress, where the overlay program can repair them.

use std::process::Command;

use anyhow::{Context, Result, bail};
use tracing::{info, warn};

use crate::{record::OverlayChanges, sys::ethtool};

fn module_loaded(name: &str) -> bool {
    std::path::Path::new("/sys/module").join(name).exists()
}

/// Loads `esp4_offload` (required) and `esp6_offload` (for IPv6 underlays)
/// where missing; they put decrypted packets back through GRO, the only path
/// on which tc sees them.
pub fn load_offload_modules(changes: &mut OverlayChanges) -> Result<()> {
    for (module, required) in [("esp4_offload", true), ("esp6_offload", false)] {
        if module_loaded(module) {
            continue;
        }
        let out = Command::new("modprobe").arg(module).output().context("cannot run modprobe")?;
        if out.status.success() && module_loaded(module) {
            info!("loaded kernel module {module} (ESP GRO path)");
            changes.loaded_modules.push(module.to_owned());
        } else if required {
            bail!(
                "cannot load {module} ({}): without it decrypted packets never reach tc; use --csum-backend nft (IPv4)",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        } else {
            warn!("cannot load {module}: decrypted IPv6 underlay packets will not reach tc (IPv4 is covered)");
        }
    }
    Ok(())
}

/// Switches GRO on for `iface` (in the calling thread's namespace) if it is off.
pub fn enable_gro(iface: &str, changes: &mut OverlayChanges) -> Result<()> {
    if !ethtool::gro_enabled(iface).with_context(|| format!("cannot read GRO state of {iface}"))? {
        ethtool::set_gro(iface, true).with_context(|| format!("cannot enable GRO on {iface}"))?;
        info!("enabled GRO on {iface} (ESP GRO path)");
        changes.enabled_gro = true;
    }
    Ok(())
}

/// Whether decrypted packets may reach the overlay program as
/// CHECKSUM_COMPLETE: only when `iface` decrypts ESP in hardware (software
/// decryption, esp_input(), leaves CHECKSUM_NONE). Unknown counts as yes.
#[must_use]
pub fn decrypted_may_be_csum_complete(iface: &str) -> bool {
    ethtool::netdev_feature_active(iface, "esp-hw-offload").unwrap_or_else(|e| {
        warn!("cannot read {iface}'s features ({e}); assuming ESP hardware offload");
        true
    })
}
