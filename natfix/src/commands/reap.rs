//! `natfix reap`: deletes, on demand, the conntrack entries that unsolicited
//! UDP created to guarded ports (`crate::reap`), in one namespace; what the
//! guard's attach does by itself. Counted in the attachments' records.

use anyhow::{Result, bail};
use serde::Serialize;
use tracing::warn;

use crate::{
    config::{IfaceName, PortRange, parse_port_range},
    error::UserError,
    pins::{self, ChangeLock, PinDir},
    reap::{ReapScope, Reaped, reap_here},
    sys::{features, iface, netns::Netns},
};

/// What to reap: explicit ranges, or (none given) each guard's own.
#[derive(Debug, Clone, Default)]
pub struct ReapRequest {
    pub iface: Option<IfaceName>,
    pub ranges: Vec<PortRange>,
    pub allow_ports: Vec<u16>,
    pub allow_src: Vec<crate::config::Cidr>,
    pub dry_run: bool,
}

#[derive(Serialize)]
struct Report<'a> {
    netns: &'a str,
    dry_run: bool,
    count: usize,
    entries: &'a [Reaped],
}

pub fn run(netns_spec: Option<&str>, req: &ReapRequest, json: bool) -> Result<()> {
    features::require_privileges(netns_spec.is_some())?;
    let netns = Netns::resolve(netns_spec)?;
    let guards: Vec<(PinDir, ReapScope)> = pins::attachments()?
        .into_iter()
        .filter(|(_, m)| m.netns_inode == netns.inode && req.iface.as_ref().is_none_or(|i| i.as_str() == m.iface))
        .filter_map(|(dir, m)| {
            let g = m.guard?;
            let ranges = g.ranges.iter().filter_map(|r| parse_port_range(r).ok()).collect();
            Some((dir, ReapScope { iface: m.iface, ranges, exempt: g.allow_ports, trusted: g.allow_src }))
        })
        .collect();
    let scopes = if req.ranges.is_empty() {
        if guards.is_empty() {
            bail!(UserError::NotFound(format!(
                "no natfix guard in namespace `{}`{}: give --guard RANGE to say which ports to reap",
                netns.spec,
                req.iface.as_ref().map(|i| format!(" on {i}")).unwrap_or_default()
            )));
        }
        guards.iter().map(|(_, s)| s.clone()).collect()
    } else {
        let iface = explicit_iface(&netns, req.iface.as_ref())?;
        vec![ReapScope { iface, ranges: req.ranges.clone(), exempt: req.allow_ports.clone(), trusted: req.allow_src.clone() }]
    };
    let dry_run = req.dry_run;
    let reaped = netns.run(move || reap_here(&scopes, dry_run))?;
    if !dry_run && !reaped.is_empty() {
        count_in_records(&netns, &guards, &reaped);
    }
    print(&netns.spec, dry_run, &reaped, json)
}

/// The interface an explicit reap checks sources against: --iface, else the
/// namespace's default route.
fn explicit_iface(netns: &Netns, iface: Option<&IfaceName>) -> Result<String> {
    if let Some(i) = iface {
        return Ok(i.to_string());
    }
    match netns.run(iface::default_route)? {
        Some(i) => Ok(i.to_string()),
        None => bail!(UserError::Usage(format!("namespace `{}` has no default route: name the interface with --iface", netns.spec))),
    }
}

/// Adds each attachment's share to its record's `reaped`, under the change lock.
fn count_in_records(netns: &Netns, guards: &[(PinDir, ReapScope)], reaped: &[Reaped]) {
    let Ok(_lock) = ChangeLock::acquire() else { return };
    for (dir, scope) in guards {
        let n = reaped.iter().filter(|r| r.iface == scope.iface).count() as u64;
        if n == 0 {
            continue;
        }
        let updated = dir.read_meta().and_then(|mut m| {
            if let Some(g) = m.guard.as_mut() {
                g.reaped += n;
            }
            dir.write_meta(&m)
        });
        if let Err(e) = updated {
            warn!("{} in namespace `{}`: reaped {n} entries but could not count them in the record: {e:#}", scope.iface, netns.spec);
        }
    }
}

fn print(netns: &str, dry_run: bool, reaped: &[Reaped], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&Report { netns, dry_run, count: reaped.len(), entries: reaped })?);
        return Ok(());
    }
    let verb = if dry_run { "would delete" } else { "deleted" };
    println!("{verb} {} conntrack entries of unsolicited UDP in namespace `{netns}`", reaped.len());
    for r in reaped {
        println!("  {}  {} -> {}", r.iface, r.src, r.dst);
    }
    Ok(())
}
