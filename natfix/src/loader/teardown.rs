//! Removing attachments: what a record says natfix made (links, clsact
//! filters, pins, host changes) is undone in the attachment's namespace.

use anyhow::{Context, Result};
use aya::programs::{TcAttachType, links::PinnedLink};
use tracing::{info, warn};

use crate::{
    overlay,
    pins::PinDir,
    record::{AttachMode, AttachmentMeta, Hook},
    sys::netns::Netns,
};

/// Removes a pinned attachment (or one whose foreground owner died).
pub fn detach_recorded(pin_dir: &PinDir, meta: &AttachmentMeta, netns: &Netns) -> Result<()> {
    let dir = pin_dir.clone();
    let meta = meta.clone();
    netns.run(move || remove_recorded_here(&dir, &meta))
}

/// Drops the record of an attachment whose namespace is gone (this one got
/// its inode). Nothing of it is left to undo, and undoing it here would
/// touch this namespace: its links went with its devices, its nftables table
/// and GRO setting with the namespace.
pub(super) fn forget_gone_namespace(dir: &PinDir, gone: &AttachmentMeta) -> Result<()> {
    info!(
        "removing the record of natfix on {} in namespace `{}`: that namespace is gone and inode {} now names another",
        gone.iface, gone.netns, gone.netns_inode
    );
    dir.remove()
}

/// Undoes everything a record says natfix did; runs in its namespace.
pub(super) fn remove_recorded_here(dir: &PinDir, meta: &AttachmentMeta) -> Result<()> {
    for p in &meta.programs {
        if p.mode == AttachMode::Clsact {
            // Netlink filters outlive natfix (kernels < 6.6): remove them by name.
            let attach = if p.hook == Hook::TcEgress { TcAttachType::Egress } else { TcAttachType::Ingress };
            if let Err(e) = aya::programs::tc::qdisc_detach_program(&meta.iface, attach, p.name.c_name()) {
                warn!("could not remove the {} filter {} from {}: {e}", p.hook.name(), p.name, meta.iface);
            }
            continue;
        }
        let path = dir.link(p.name);
        if path.exists() {
            // Unpinning drops the last reference: the kernel detaches the link.
            let link = PinnedLink::from_pin(&path).with_context(|| format!("cannot open {}", path.display()))?;
            drop(link.unpin().with_context(|| format!("cannot unpin {}", path.display()))?);
        }
    }
    dir.remove()?;
    undo_host_changes(meta);
    Ok(())
}

/// Restores what natfix changed outside BPF; runs in the attachment's namespace.
pub(super) fn undo_host_changes(meta: &AttachmentMeta) {
    if meta.created_clsact {
        remove_clsact(&meta.iface);
    }
    if let Some(o) = &meta.overlay {
        overlay::undo(&meta.iface, &o.changes);
    }
}

fn remove_clsact(iface: &str) {
    // aya 0.14 can add clsact but not remove it; iproute2 can. The child
    // inherits this thread's namespace.
    let ok = std::process::Command::new("tc")
        .args(["qdisc", "del", "dev", iface, "clsact"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        warn!("could not remove the clsact qdisc natfix added to {iface}");
    }
}
