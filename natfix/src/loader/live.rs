//! Changing a running attachment's settings in place (`natfix set`, the
//! agent's reload): the new settings are validated first, then written into
//! the attachment's pinned maps (`settings`), and the overlay's nftables
//! table is replaced in one transaction; no program is reloaded, so
//! counters, flows and caches stay. Under the change lock, in the
//! attachment's namespace. A failure puts the previous settings back.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use aya::maps::{Array, LpmTrie, MapData};
use tracing::{info, warn};

use super::settings::{self, GuardLive};
use crate::{
    config::{GuardSpec, OverlaySpec, PortRange, ResolvedFlowSource, SettingsChange, parse_port_range},
    error::UserError,
    flowsync::FlowSync,
    overlay,
    pins::{self, ChangeLock, PinDir},
    published::Published,
    record::{AttachmentMeta, GuardMeta, Managed, OverlayMeta, Program},
    sys::netns::Netns,
};

/// Applies `change` to the attachment recorded in `dir`; returns the new record.
pub fn change(dir: &PinDir, netns: &Netns, change: SettingsChange) -> Result<AttachmentMeta> {
    change_with(dir, netns, change, None, None)
}

/// `change`, for the agent: also records what it now asks for; `docker` is
/// what Docker publishes, which the agent follows (else it is asked).
pub fn change_managed(dir: &PinDir, netns: &Netns, change: SettingsChange, managed: &Managed, docker: &Published) -> Result<AttachmentMeta> {
    change_with(dir, netns, change, Some(managed.clone()), Some(docker.clone()))
}

fn change_with(dir: &PinDir, netns: &Netns, change: SettingsChange, managed: Option<Managed>, docker: Option<Published>) -> Result<AttachmentMeta> {
    let dir = dir.clone();
    let ns = netns.clone();
    netns.run(move || {
        let _lock = ChangeLock::acquire()?;
        let mut meta = dir.read_meta()?;
        if managed.is_some() {
            meta.managed = managed;
        }
        change_here(&dir, &ns, meta, &change, docker.as_ref())
    })
}

fn change_here(dir: &PinDir, netns: &Netns, mut meta: AttachmentMeta, change: &SettingsChange, docker: Option<&Published>) -> Result<AttachmentMeta> {
    let usage = |e: String| anyhow::Error::from(UserError::Usage(e));
    let guard_next = match (&meta.guard, change.touches_guard()) {
        (None, true) => bail!(UserError::Usage(format!("{} has no guard to change (attach with --guard)", meta.iface))),
        (Some(g), true) => Some(change.apply_guard(&guard_spec(g, flow_timeout_now(dir)?)?).map_err(usage)?),
        _ => None,
    };
    let overlay_next = match (&meta.overlay, change.touches_overlay()) {
        (None, true) => bail!(UserError::Usage(format!("{} has no overlay fix to change (attach with --overlay-fix)", meta.iface))),
        (Some(o), true) => Some(change.apply_overlay(&overlay_spec(o)).map_err(usage)?),
        _ => None,
    };
    let before = meta.clone();
    let applied = apply(dir, netns, &mut meta, guard_next.as_ref(), overlay_next.as_ref(), change.events_per_sec, docker);
    if let Err(e) = applied {
        warn!("{e:#}: putting the previous settings back");
        let timeout = flow_timeout_now(dir)?;
        let guard_before = before.guard.as_ref().map(|g| guard_spec(g, timeout)).transpose()?;
        let restore = apply(dir, netns, &mut before.clone(), guard_before.as_ref(), before.overlay.as_ref().map(overlay_spec).as_ref(), before.events_per_sec, docker);
        if let Err(r) = restore {
            warn!("could not put every previous setting back: {r:#}");
        }
        return Err(e);
    }
    let grew = before.guard.as_ref().zip(meta.guard.as_ref()).is_some_and(|(b, a)| guards_more(b, a));
    if change.touches_guard() && !change.no_reap && grew {
        reap(&mut meta);
    }
    dir.write_meta(&meta)?;
    info!(iface = %meta.iface, netns = %meta.netns, "settings changed in place");
    Ok(meta)
}

/// Whether `after` guards a datagram `before` let through: a port newly
/// guarded or no longer exempt, a source no longer trusted, dry-run turned
/// off. Only then can unsolicited UDP have left entries the guard now wants
/// gone (reaping dumps conntrack: a walk of the host's whole table).
fn guards_more(before: &GuardMeta, after: &GuardMeta) -> bool {
    let ranges = |g: &GuardMeta| g.ranges.iter().filter_map(|r| parse_port_range(r).ok()).collect::<Vec<PortRange>>();
    let (old, new) = (ranges(before), ranges(after));
    let guarded = |rs: &[PortRange], g: &GuardMeta, p: u16| rs.iter().any(|r| r.contains(p)) && !g.allow_ports.contains(&p) && !g.published.contains(&p);
    (before.dry_run && !after.dry_run)
        || before.allow_src.iter().any(|c| !after.allow_src.contains(c))
        || new.iter().flat_map(|r| r.first..=r.last).any(|p| guarded(&new, after, p) && !guarded(&old, before, p))
}

/// Heals under the guard settings now in force (ports newly guarded or no
/// longer exempt, dry-run turned off): as at attach, a failure is logged.
fn reap(meta: &mut AttachmentMeta) {
    let Some(g) = meta.guard.as_mut().filter(|g| !g.dry_run) else { return };
    let scope = crate::reap::ReapScope {
        iface: meta.iface.clone(),
        ranges: g.ranges.iter().filter_map(|r| parse_port_range(r).ok()).collect(),
        exempt: [g.allow_ports.as_slice(), g.published.as_slice()].concat(),
        trusted: g.allow_src.clone(),
    };
    match crate::reap::reap_here(&[scope], false) {
        Ok(reaped) => {
            if !reaped.is_empty() {
                info!("deleted {} conntrack entries of unsolicited UDP to the ports now guarded", reaped.len());
            }
            g.reaped += reaped.len() as u64;
        }
        Err(e) => warn!("could not reap conntrack entries of unsolicited UDP: {e:#}"),
    }
}

/// Writes the settings into the maps (and the nft table), and into `meta`.
fn apply(
    dir: &PinDir,
    netns: &Netns,
    meta: &mut AttachmentMeta,
    guard: Option<&GuardSpec>,
    overlay: Option<&OverlaySpec>,
    events: Option<u32>,
    docker: Option<&Published>,
) -> Result<()> {
    if let (Some(next), Some(g)) = (guard, meta.guard.as_mut()) {
        let own = g.flow_source == ResolvedFlowSource::Own;
        let eif = g.filtering == crate::config::Filtering::EndpointIndependent;
        let published = if g.no_allow_published {
            Vec::new()
        } else if next.range_texts() == g.ranges {
            g.published.clone()
        } else {
            published_inside(&next.ranges, docker)
        };
        apply_guard(dir, netns, next, published.clone(), own, eif)?;
        g.published = published;
        g.ranges = next.range_texts();
        g.allow_ports.clone_from(&next.allow_ports);
        g.allow_src.clone_from(&next.allow_src);
        g.dry_run = next.dry_run;
    }
    if let Some(next) = overlay {
        apply_overlay(dir, netns, meta, next)?;
    }
    if let Some(rate) = events {
        for name in [pins::GUARD_EVENT_RATE, pins::OVERLAY_EVENT_RATE] {
            if dir.map(name).exists() {
                settings::write_event_rate(&mut Array::try_from(open(dir, name)?)?, rate)?;
            }
        }
        meta.events_per_sec = Some(rate);
    }
    Ok(())
}

fn open(dir: &PinDir, name: &str) -> Result<aya::maps::Map> {
    let path = dir.map(name);
    let data = MapData::from_pin(&path).with_context(|| format!("cannot open {} (attached by an older natfix? attach --pin --replace first)", path.display()))?;
    Ok(match name {
        pins::GUARD_ALLOW_SRC4 | pins::GUARD_ALLOW_SRC6 => aya::maps::Map::LpmTrie(data),
        _ => aya::maps::Map::Array(data),
    })
}

/// The guard: prefixes before the switch that uses them; with the own flow
/// table, flows of newly guarded ports are learned (egress and a conntrack
/// seed) before the ports are guarded, so no reply of a running flow meets
/// a guard that does not know it.
fn apply_guard(dir: &PinDir, netns: &Netns, next: &GuardSpec, published: Vec<u16>, own_table: bool, endpoint_independent: bool) -> Result<()> {
    let live = GuardLive {
        ranges: next.ranges.clone(),
        allow_ports: next.allow_ports.clone(),
        published,
        allow_src: next.allow_src.clone(),
        dry_run: next.dry_run,
        flow_timeout_ns: u64::try_from(next.flow_timeout().as_nanos()).unwrap_or(u64::MAX),
    };
    let mut ports: Array<MapData, u64> = Array::try_from(open(dir, pins::GUARD_PORTS)?)?;
    // Ports the guard starts to guard have their running flows learned first
    // (a conntrack dump: a walk of the host's whole table, so only then).
    if own_table && !learned_already(&ports, &next.ranges)? {
        let mut learn: Vec<PortRange> = guarded_now(&ports)?;
        learn.extend(&next.ranges);
        settings::write_learned(&mut ports, &learn)?;
        let mut sync = FlowSync::open(dir, endpoint_independent)?;
        sync.seed(netns).context("cannot seed the own flow table for the new ports")?;
    }
    let mut settings_map = Array::try_from(open(dir, pins::GUARD_SETTINGS)?)?;
    let src4 = |d: &PinDir| -> Result<()> { settings::write_allow_src4(&mut LpmTrie::try_from(open(d, pins::GUARD_ALLOW_SRC4)?)?, &live.allow_src) };
    let src6 = |d: &PinDir| -> Result<()> { settings::write_allow_src6(&mut LpmTrie::try_from(open(d, pins::GUARD_ALLOW_SRC6)?)?, &live.allow_src) };
    if live.allow_src.is_empty() {
        settings::write_guard_settings(&mut settings_map, &live)?;
        src4(dir)?;
        src6(dir)?;
    } else {
        src4(dir)?;
        src6(dir)?;
        settings::write_guard_settings(&mut settings_map, &live)?;
    }
    settings::write_guarded(&mut ports, &live.ranges, &live.exempt())?;
    settings::write_learned(&mut ports, &live.ranges)
}

/// The published ports inside `ranges`, read now (the namespace's DNAT
/// rules, in the calling thread's namespace, and Docker's).
fn published_inside(ranges: &[PortRange], docker: Option<&Published>) -> Vec<u16> {
    let mut all = Published::kernel_here();
    match docker {
        Some(d) => all.merge(d),
        None => {
            if let Some(d) = crate::docker::published_now(std::time::Duration::from_secs(2)) {
                all.merge(&d);
            }
        }
    }
    all.inside(ranges)
}

/// Follows what is published: makes the attachment in `dir` exempt exactly
/// the ports of `published` inside its ranges (unless it guards published
/// ports too). Only the exempt plane and the record change. Returns the new
/// list when it changed.
pub fn set_published(dir: &PinDir, netns: &Netns, published: &Published) -> Result<Option<Vec<u16>>> {
    let dir = dir.clone();
    let published = published.clone();
    netns.run(move || {
        let _lock = ChangeLock::acquire()?;
        let mut meta = dir.read_meta()?;
        let Some(g) = meta.guard.as_mut().filter(|g| !g.no_allow_published) else { return Ok(None) };
        let ranges: Vec<PortRange> = g.ranges.iter().map(|r| parse_port_range(r).map_err(anyhow::Error::msg)).collect::<Result<_>>()?;
        let mut now = Published::kernel_here();
        now.merge(&published);
        let inside = now.inside(&ranges);
        if inside == g.published {
            return Ok(None);
        }
        let mut exempt = g.allow_ports.clone();
        exempt.extend(&inside);
        let mut ports: Array<MapData, u64> = Array::try_from(open(&dir, pins::GUARD_PORTS)?)?;
        settings::write_guarded(&mut ports, &ranges, &exempt)?;
        info!(iface = %meta.iface, netns = %meta.netns, "published ports exempt: {}", if inside.is_empty() { "none".into() } else { now.describe(&inside) });
        g.published.clone_from(&inside);
        dir.write_meta(&meta)?;
        Ok(Some(inside))
    })
}

/// The ranges the GUARDED plane holds now (for learning across a change).
/// Whether every port of `ranges` is learned already (the LEARN plane).
fn learned_already(ports: &Array<MapData, u64>, ranges: &[PortRange]) -> Result<bool> {
    // One read per 64-port word.
    let mut words = std::collections::BTreeMap::new();
    for r in ranges {
        for port in r.first..=r.last {
            let word = crate::abi::PORT_PLANE_LEARN * crate::abi::PORT_WORDS + u32::from(port >> 6);
            let bits = match words.get(&word) {
                Some(b) => *b,
                None => *words.entry(word).or_insert(ports.get(&word, 0)?),
            };
            if bits >> (port & 63) & 1 == 0 {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

fn guarded_now(ports: &Array<MapData, u64>) -> Result<Vec<PortRange>> {
    let mut out = Vec::new();
    let mut start: Option<u16> = None;
    for word in 0..crate::abi::PORT_WORDS {
        let bits = ports.get(&(crate::abi::PORT_PLANE_GUARDED * crate::abi::PORT_WORDS + word), 0)?;
        for bit in 0..64u32 {
            let port = u16::try_from(word * 64 + bit).unwrap_or(u16::MAX);
            match (bits >> bit & 1 == 1, start) {
                (true, None) => start = Some(port),
                (false, Some(s)) => {
                    out.push(PortRange { first: s, last: port - 1 });
                    start = None;
                }
                _ => {}
            }
        }
    }
    if let Some(s) = start {
        out.push(PortRange { first: s, last: u16::MAX });
    }
    Ok(out)
}

fn apply_overlay(dir: &PinDir, netns: &Netns, meta: &mut AttachmentMeta, next: &OverlaySpec) -> Result<()> {
    let ports =
        if next.vxlan_auto() { crate::sys::vxlan::auto_ports(&crate::sys::vxlan::discover(netns)) } else { next.vxlan_ports.clone() };
    if meta.has_program(Program::OverlayTc) {
        settings::write_overlay_settings(&mut Array::try_from(open(dir, pins::OVERLAY_SETTINGS)?)?, &ports, next.reqid)?;
    }
    let (ifindex, iface) = (meta.ifindex, meta.iface.clone());
    if let Some(o) = meta.overlay.as_mut() {
        if o.changes.nft_table.is_some() {
            overlay::nft::install(ifindex, &iface, &ports, next.reqid, &mut o.changes)?;
        }
        o.vxlan_ports = ports;
        o.vxlan_auto = next.vxlan_auto();
        o.reqid = next.reqid;
    }
    Ok(())
}

/// The own flow table's idle timeout in force (the record does not hold it).
fn flow_timeout_now(dir: &PinDir) -> Result<Option<Duration>> {
    if !dir.map(pins::GUARD_SETTINGS).exists() {
        return Ok(None);
    }
    let map: Array<MapData, crate::abi::GuardSettings> = Array::try_from(open(dir, pins::GUARD_SETTINGS)?)?;
    Ok(Some(Duration::from_nanos(map.get(&0, 0)?.flow_timeout_ns)))
}

/// The guard's spec as its record (and the timeout in force) hold it, for
/// changes to start from.
fn guard_spec(g: &GuardMeta, flow_timeout: Option<Duration>) -> Result<GuardSpec> {
    let ranges = g.ranges.iter().map(|r| parse_port_range(r).map_err(anyhow::Error::msg)).collect::<Result<_>>()?;
    Ok(GuardSpec {
        ranges,
        flow_source: match g.flow_source {
            ResolvedFlowSource::Own => crate::config::FlowSource::Own,
            ResolvedFlowSource::Conntrack => crate::config::FlowSource::Conntrack,
        },
        filtering: g.filtering,
        allow_ports: g.allow_ports.clone(),
        allow_src: g.allow_src.clone(),
        dry_run: g.dry_run,
        // Conntrack's own timeouts apply there: the spec has none.
        flow_timeout: flow_timeout.filter(|_| g.flow_source == ResolvedFlowSource::Own),
        ..GuardSpec::default()
    })
}

fn overlay_spec(o: &OverlayMeta) -> OverlaySpec {
    let vxlan_ports = if o.vxlan_auto { Vec::new() } else { o.vxlan_ports.clone() };
    OverlaySpec { vxlan_ports, reqid: o.reqid, csum: o.csum, backend: o.backend }
}
