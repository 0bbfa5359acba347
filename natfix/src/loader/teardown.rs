//! Removing attachments: what a record says natfix made (links, clsact
//! filters, pins, host changes) is undone in the attachment's namespace;
//! staging left by dead processes, and directories whose record cannot be
//! read, are cleared of what can be found.

use anyhow::{Context, Result};
use aya::programs::{TcAttachType, links::PinnedLink};
use tracing::{info, warn};

use crate::{
    overlay,
    pins::{self, Entry, ChangeLock, PinDir},
    record::{AttachMode, AttachmentMeta, Hook},
    sys::{iface, netns::Netns},
};

/// Removes a pinned attachment (or one whose foreground owner died), under
/// the namespace's lock.
pub fn detach_recorded(pin_dir: &PinDir, meta: &AttachmentMeta, netns: &Netns) -> Result<()> {
    let dir = pin_dir.clone();
    let meta = meta.clone();
    let inode = netns.inode;
    netns.run(move || {
        let _lock = ChangeLock::acquire()?;
        sweep_staging_here(inode);
        remove_recorded_here(&dir, &meta)
    })
}

/// Removes a directory whose record cannot be read, in namespace `netns`.
pub fn detach_unrecorded(pin_dir: &PinDir, netns: &Netns) -> Result<()> {
    let dir = pin_dir.clone();
    netns.run(move || {
        let _lock = ChangeLock::acquire()?;
        remove_unrecorded_here(&dir);
        Ok(())
    })
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

/// Clears a directory without a readable record: unpins every link in it
/// (detaching them), removes its pins, and the overlay fix's nftables table
/// of its interface if there is one. GRO and modules it may have changed
/// cannot be known, and are said so.
pub(super) fn remove_unrecorded_here(dir: &PinDir) {
    for entry in std::fs::read_dir(&dir.path).into_iter().flatten().flatten() {
        let is_link = entry.file_name().to_str().is_some_and(|n| n.starts_with("link_"));
        if is_link && let Ok(link) = PinnedLink::from_pin(entry.path()) {
            drop(link.unpin());
        }
    }
    if let Err(e) = dir.remove() {
        warn!("cannot remove {}: {e:#}", dir.path.display());
    }
    if let Some(ifindex) = dir.iface_name().and_then(|n| n.parse().ok()).and_then(|n| iface::index(&n, "").ok()) {
        let table = overlay::nft::table_name(ifindex);
        if crate::sys::nft::delete_table("ip", &table).is_ok() {
            info!("removed nftables table ip {table}");
        }
    }
    warn!(
        "{}: without its record, natfix cannot tell whether it changed GRO, loaded modules or added a clsact qdisc there; check `ethtool -k`, `lsmod`, `tc qdisc`",
        dir.path.display()
    );
}

/// Undoes the staging directories of this namespace whose process is gone
/// (a crash or kill mid-attach): their journal says what was done. Runs in
/// the namespace, under its lock.
pub(super) fn sweep_staging_here(netns_inode: u64) {
    let Ok(entries) = pins::entries() else { return };
    for entry in entries {
        let Entry::Staging(dir, pid) = entry else { continue };
        if dir.netns_inode() != Some(netns_inode) || crate::record::process_alive(pid) {
            continue;
        }
        info!("undoing what a natfix attach (pid {pid}, gone) left half made: {}", dir.path.display());
        match dir.read_meta() {
            Ok(journal) => {
                if let Err(e) = remove_recorded_here(&dir, &journal) {
                    warn!("{e:#}");
                }
            }
            Err(_) => remove_unrecorded_here(&dir),
        }
    }
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
