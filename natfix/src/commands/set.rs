//! `natfix set`: changes a running or pinned attachment's settings in place
//! (`loader::live`), and prints what is now in force.

use anyhow::{Result, bail};

use crate::{
    config::{IfaceName, SettingsChange},
    error::UserError,
    loader,
    pins,
    sys::{features, netns::Netns},
};

pub fn run(iface: &IfaceName, netns_spec: Option<&str>, change: SettingsChange, json: bool) -> Result<()> {
    features::require_privileges(netns_spec.is_some())?;
    if change.is_empty() {
        bail!(UserError::Usage("nothing to change: give at least one setting (see `natfix set --help`)".into()));
    }
    let netns = Netns::resolve(netns_spec)?;
    let Some((dir, meta)) = pins::attachments()?.into_iter().find(|(_, m)| m.netns_inode == netns.inode && m.iface == iface.as_str()) else {
        bail!(UserError::NotFound(format!("natfix is not attached to {iface} in namespace `{}` (see `natfix status`)", netns.spec)));
    };
    if meta.find_netns().is_err() {
        bail!(UserError::NotFound(format!(
            "the attachment on {iface} belonged to a namespace that was deleted; `natfix detach --iface {iface}{}` releases it",
            meta.netns_flag()
        )));
    }
    if let Some(m) = &meta.managed {
        tracing::warn!("{iface} is kept by natfix agent ({}): it puts its config back when it next checks; change the config instead", m.config);
    }
    let now = loader::live::change(&dir, &netns, change)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&now)?);
        return Ok(());
    }
    if let Some(g) = &now.guard {
        let allow_src: Vec<String> = g.allow_src.iter().map(ToString::to_string).collect();
        println!(
            "{iface}: guard ports {} allow-port {:?} allow-src [{}]{}",
            g.ranges.join(","),
            g.allow_ports,
            allow_src.join(", "),
            if g.dry_run { " dry-run" } else { "" }
        );
    }
    if let Some(o) = &now.overlay {
        println!("{iface}: overlay vxlan ports {:?} reqid {}", o.vxlan_ports, o.reqid.map_or_else(|| "any".into(), |r| format!("{r:#x}")));
    }
    if let Some(rate) = now.events_per_sec {
        println!("{iface}: events {rate} per CPU per second");
    }
    Ok(())
}
