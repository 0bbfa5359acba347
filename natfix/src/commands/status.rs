//! `natfix status`: every attachment on the host, from the records.

use anyhow::Result;
use serde::Serialize;

use crate::{
    pins::{self, PinDir},
    record::AttachmentMeta,
};

#[derive(Serialize)]
struct StatusEntry {
    state: &'static str,
    #[serde(flatten)]
    meta: AttachmentMeta,
}

pub fn run(json: bool) -> Result<()> {
    pins::require_bpffs()?;
    let mut entries = Vec::new();
    for dir in PinDir::list_all() {
        let meta = dir.read_meta()?;
        // A pinned record outlives its namespace (pins are keyed by inode);
        // only the cookie check can say so, and only for records that have one.
        let gone = meta.netns_cookie.is_some() && meta.find_netns().is_err();
        let state = if gone {
            "stale"
        } else if meta.pinned {
            "pinned"
        } else if meta.is_live() {
            "running"
        } else {
            "stale"
        };
        entries.push(StatusEntry { state, meta });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "attachments": entries }))?);
        return Ok(());
    }
    if entries.is_empty() {
        println!("no natfix attachments");
    }
    for e in &entries {
        print_entry(e);
    }
    Ok(())
}

fn print_entry(e: &StatusEntry) {
    let m = &e.meta;
    let owner = m.pid.map_or_else(String::new, |p| format!(" pid {p}"));
    println!("{} netns {} (inode {}) {}{}", m.iface, m.netns, m.netns_inode, e.state, owner);
    if e.state == "stale" {
        println!("  its namespace or process is gone: `natfix detach --iface {}{}` releases it", m.iface, m.netns_flag());
    }
    for p in &m.programs {
        println!("  {:<20} {:<10} {:<8} prog id {}", p.name, p.hook.name(), p.mode.name(), p.prog_id);
    }
    if let Some(o) = &m.overlay {
        println!(
            "  overlay vxlan ports {:?} csum {} backend {}{}",
            o.vxlan_ports,
            o.csum.name(),
            o.backend.name(),
            o.changes.nft_table.as_ref().map_or_else(String::new, |t| format!(" (nft table ip {t})"))
        );
    }
    if let Some(g) = &m.guard {
        println!(
            "  guard ports {} flow source {} ({}){}",
            g.ranges.join(","),
            g.flow_source.name(),
            g.filtering.name(),
            if g.dry_run { " dry-run" } else { "" }
        );
    }
}
