//! `natfix detach`: removes an attachment, by asking its foreground owner
//! to detach or by undoing its record.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tracing::info;

use crate::{
    config::IfaceName,
    error::UserError,
    loader,
    pins::{self, PinDir},
    sys::{features, netns::{self, Netns}},
};

pub fn run(iface: &IfaceName, netns_spec: Option<&str>) -> Result<()> {
    features::require_privileges(netns_spec.is_some())?;
    pins::require_bpffs()?;
    let resolved = Netns::resolve(netns_spec);
    let dir = resolved.as_ref().ok().map(|ns| PinDir::new(ns.inode, iface)).filter(|d| d.meta_path().exists());
    let Some(dir) = dir else {
        // Nothing here under that name now; records of an earlier namespace
        // by that name (deleted, or recreated with another inode) may remain.
        let spec = netns_spec.unwrap_or("self");
        if forget_records_of_gone_namespaces(spec, iface)? > 0 {
            return Ok(());
        }
        let netns = resolved?;
        bail!(UserError::NotFound(format!(
            "natfix is not attached to {iface} in namespace `{}` (see `natfix status`)",
            netns.spec
        )));
    };
    let netns = resolved?;
    let meta = dir.read_meta()?;
    if !meta.written_in(netns.run(|| Ok(netns::current_cookie()))?) {
        dir.remove()?;
        bail!(UserError::NotFound(format!(
            "natfix is not attached to {iface} in namespace `{}`: the record there was left by a deleted namespace with the same inode, and is removed now",
            netns.spec
        )));
    }
    if !meta.pinned
        && let Some(pid) = meta.pid.filter(|_| meta.is_live())
    {
        // A foreground attach owns it: ask it to clean up, and wait.
        info!("asking natfix attach (pid {pid}) to detach");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid)?), nix::sys::signal::Signal::SIGTERM)
            .with_context(|| format!("cannot signal pid {pid}"))?;
        for _ in 0..100 {
            if !dir.meta_path().exists() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("pid {pid} did not detach within 10 s");
    }
    loader::detach_recorded(&dir, &meta, &netns)?;
    println!("detached natfix from {iface} in namespace `{}`", netns.spec);
    Ok(())
}

/// Removes the records of `iface` in namespaces once called `spec` that no
/// file names any more (or whose inode went to another namespace); returns
/// how many. Their links are gone with their devices; what natfix changed
/// inside such a namespace cannot be reached from here, so only pins go.
fn forget_records_of_gone_namespaces(spec: &str, iface: &IfaceName) -> Result<usize> {
    let mut forgotten = 0;
    for dir in PinDir::list_all() {
        let Ok(meta) = dir.read_meta() else { continue };
        // A namespace still reachable is detached the normal way, by its current name.
        if meta.netns != spec || meta.iface != iface.as_str() || meta.find_netns().is_ok() {
            continue;
        }
        dir.remove()?;
        forgotten += 1;
        println!(
            "removed natfix's record of {iface} in namespace `{spec}` (inode {}): that namespace is gone or out of reach, and natfix's pins for it are released",
            meta.netns_inode
        );
    }
    Ok(forgotten)
}
