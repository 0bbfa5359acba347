//! The host side of the overlay fix: the ESP GRO path the tc program needs
//! (`esp`), the nftables table that covers what never takes it (`nft`), the
//! interface facts `--csum-backend auto` decides on, and undoing all of it.
//! Every change is recorded (`record::OverlayChanges`) so that detach
//! restores exactly what natfix changed.

pub mod esp;
pub mod nft;

use std::process::Command;

use tracing::warn;

use crate::{record::OverlayChanges, sys::ethtool};

/// Whether `iface` has a global-scope IPv6 address in the calling thread's
/// namespace (`/proc/net/if_inet6`: address, index, prefix, scope, flags, name).
#[must_use]
pub fn has_global_ipv6(iface: &str) -> bool {
    // thread-self: /proc/net follows the main thread's namespace, not this thread's.
    std::fs::read_to_string("/proc/thread-self/net/if_inet6").is_ok_and(|text| if_inet6_has_global(&text, iface))
}

fn if_inet6_has_global(text: &str, iface: &str) -> bool {
    text.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() == 6 && f[5] == iface && f[3] == "00"
    })
}

/// Undoes `changes`; runs in the attachment's namespace. Best effort: logs what it could not undo.
pub fn undo(iface: &str, changes: &OverlayChanges) {
    if let Some(table) = &changes.nft_table
        && let Err(e) = crate::sys::nft::delete_table("ip", table)
    {
        warn!("{e:#}");
    }
    if changes.enabled_gro
        && let Err(e) = ethtool::set_gro(iface, false)
    {
        warn!("could not switch GRO back off on {iface}: {e}");
    }
    for module in changes.loaded_modules.iter().rev() {
        // Fails harmlessly while something else uses the module.
        if !Command::new("modprobe").args(["-r", module]).output().is_ok_and(|o| o.status.success()) {
            warn!("left kernel module {module} loaded (in use)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_global_ipv6_address_of_the_interface_counts() {
        // Real /proc/net/if_inet6 lines: global on eth0, link-local on eth1, ::1 on lo.
        let text = "\
20010db8000000000000000000000001 02 40 00 80     eth0
fe800000000000000000000000000001 03 40 20 80     eth1
00000000000000000000000000000001 01 80 10 80       lo
";
        assert!(if_inet6_has_global(text, "eth0"));
        assert!(!if_inet6_has_global(text, "eth1"));
        assert!(!if_inet6_has_global(text, "lo"));
        assert!(!if_inet6_has_global(text, "eth00"));
        assert!(!if_inet6_has_global("", "eth0"));
    }
}
