//! `natfix detach`: removes an attachment. A foreground owner is asked to
//! detach (it holds its namespace open even after the namespace's name is
//! gone); otherwise its record is undone, or, when unreadable, what its
//! directory holds is cleared. The interface is found by its recorded name
//! or, after a rename, by its index.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tracing::info;

use crate::{
    config::IfaceName,
    error::UserError,
    loader,
    pins::{self, ChangeLock, Entry, PinDir},
    record::AttachmentMeta,
    sys::{
        features, iface,
        netns::{self, Netns},
    },
};

pub fn run(iface: &IfaceName, netns_spec: Option<&str>) -> Result<()> {
    features::require_privileges(netns_spec.is_some())?;
    pins::require_bpffs()?;
    let spec = netns_spec.unwrap_or("self");
    let netns = match Netns::resolve(netns_spec) {
        Ok(ns) => ns,
        Err(e) => {
            // No namespace by that name now: records of one that had it may remain.
            if release_by_gone_name(spec, iface)? {
                return Ok(());
            }
            return Err(e);
        }
    };
    let entries = pins::entries()?;
    let here = |dir: &PinDir| dir.netns_inode() == Some(netns.inode);
    for entry in &entries {
        if let Entry::Corrupt(dir, why) = entry
            && here(dir)
            && dir.iface_name().as_deref() == Some(iface.as_str())
        {
            info!("the record of {iface} is unreadable ({why}); removing what its directory holds");
            loader::detach_unrecorded(dir, &netns)?;
            println!("detached natfix from {iface} in namespace `{}` (its record was unreadable)", netns.spec);
            return Ok(());
        }
    }
    let cookie = netns.run(|| Ok(netns::current_cookie()))?;
    let ours: Vec<(PinDir, AttachmentMeta)> = entries
        .into_iter()
        .filter_map(|e| match e {
            Entry::Attachment(dir, meta) if here(&dir) => Some((dir, meta)),
            _ => None,
        })
        .collect();
    let found = match ours.iter().find(|(_, m)| m.iface == iface.as_str()) {
        Some(hit) => Some(hit.clone()),
        None => renamed(&ours, iface, &netns),
    };
    let Some((dir, meta)) = found else {
        if release_by_gone_name(spec, iface)? {
            return Ok(());
        }
        bail!(UserError::NotFound(format!("natfix is not attached to {iface} in namespace `{}` (see `natfix status`)", netns.spec)));
    };
    if !meta.written_in(cookie) {
        let _lock = ChangeLock::acquire()?;
        dir.remove()?;
        bail!(UserError::NotFound(format!(
            "natfix is not attached to {iface} in namespace `{}`: the record there was left by a deleted namespace with the same inode, and is removed now",
            netns.spec
        )));
    }
    if ask_owner(&dir, &meta)? {
        return Ok(());
    }
    loader::detach_recorded(&dir, &meta, &netns)?;
    println!("detached natfix from {iface} in namespace `{}`", netns.spec);
    Ok(())
}

/// The attachment whose interface is now called `iface` (renamed since attach).
fn renamed(ours: &[(PinDir, AttachmentMeta)], iface: &IfaceName, netns: &Netns) -> Option<(PinDir, AttachmentMeta)> {
    let name = iface.clone();
    let label = netns.spec.clone();
    let Ok(ifindex) = netns.run(move || iface::index(&name, &label)) else { return None };
    let hit = ours.iter().find(|(_, m)| m.ifindex == ifindex).cloned();
    if let Some((_, m)) = &hit {
        info!("{iface} was {} when natfix attached", m.iface);
    }
    hit
}

/// A foreground `natfix attach` owns the attachment: asks it to detach and
/// waits for it. False when there is no live owner.
fn ask_owner(dir: &PinDir, meta: &AttachmentMeta) -> Result<bool> {
    let Some(pid) = meta.pid.filter(|_| !meta.pinned && meta.is_live()) else { return Ok(false) };
    info!("asking natfix attach (pid {pid}) to detach");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid)?), nix::sys::signal::Signal::SIGTERM)
        .with_context(|| format!("cannot signal pid {pid}"))?;
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if !dir.meta_path().exists() || !crate::record::process_alive(pid) {
            println!("natfix attach (pid {pid}) detached from {} in namespace `{}`", meta.iface, meta.netns);
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("pid {pid} did not detach within 10 s")
}

/// Releases the records of `iface` in namespaces once called `spec` that no
/// file names any more: a live foreground owner is asked to detach (it holds
/// the namespace open); otherwise the pins go (the links went with the
/// devices; what natfix changed inside the namespace cannot be reached).
/// True if there was one.
fn release_by_gone_name(spec: &str, iface: &IfaceName) -> Result<bool> {
    let mut released = false;
    for (dir, meta) in pins::attachments()? {
        if meta.netns != spec || meta.iface != iface.as_str() || meta.find_netns().is_ok() {
            continue;
        }
        if ask_owner(&dir, &meta)? {
            released = true;
            continue;
        }
        let _lock = ChangeLock::acquire()?;
        dir.remove()?;
        released = true;
        println!(
            "removed natfix's record of {iface} in namespace `{spec}` (inode {}): that namespace is gone or out of reach, and natfix's pins for it are released",
            meta.netns_inode
        );
    }
    Ok(released)
}
