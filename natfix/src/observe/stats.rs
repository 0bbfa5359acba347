//! Reads the per-CPU counters of attachments and sums them per reason.

use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray};
use serde::Serialize;
use tracing::warn;

use crate::{
    abi::{Counter, CounterValue, Family},
    config::IfaceName,
    overlay,
    pins::{self, Entry, PinDir},
    record::{AttachmentMeta, Hook, Program},
    sys::netns,
};

/// The reason of the row the overlay fix's nftables rule counts: decrypted
/// VXLAN it set to checksum 0 (with the tc program too, also what that
/// program zeroed first, since the rule sees those packets after it).
pub const NFT_ZEROED: &str = "nft_zeroed";

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CounterRow {
    /// `guard`, `flow` or `overlay`.
    #[serde(serialize_with = "family_name")]
    pub program: Family,
    pub reason: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

#[expect(clippy::trivially_copy_pass_by_ref, reason = "serde's serialize_with passes a reference")]
fn family_name<S: serde::Serializer>(family: &Family, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(family.name())
}

#[derive(Debug, Clone, Serialize)]
pub struct AttachmentStats {
    pub netns: String,
    pub netns_inode: u64,
    pub iface: String,
    pub counters: Vec<CounterRow>,
    /// Conntrack entries of unsolicited UDP the guard deleted (at attach,
    /// `set` and `natfix reap`); from the record, the kernel keeps no count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conntrack_reaped: Option<u64>,
}

pub(super) fn open_counters(dir: &PinDir, file: &str) -> Result<PerCpuArray<MapData, CounterValue>> {
    let path = dir.map(file);
    let data = MapData::from_pin(&path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?)
}

/// Counter totals (summed over CPUs) from the attachment's pinned counter maps.
pub fn read_counters(dir: &PinDir, meta: &AttachmentMeta) -> Result<Vec<CounterRow>> {
    let has_flow = meta.program_at(Hook::TcEgress).is_some();
    let has_overlay_tc = meta.has_program(Program::OverlayTc);
    let guard = if meta.guard.is_some() { Some(open_counters(dir, pins::GUARD_COUNTERS)?) } else { None };
    let overlay = if has_overlay_tc { Some(open_counters(dir, pins::OVERLAY_COUNTERS)?) } else { None };
    let mut rows = Vec::new();
    for counter in Counter::ALL {
        let map = match counter.family() {
            Family::Flow if !has_flow => continue,
            Family::Overlay => overlay.as_ref(),
            Family::Guard | Family::Flow => guard.as_ref(),
        };
        let Some(map) = map else { continue };
        let per_cpu = map.get(&(counter as u32), 0)?;
        let total = per_cpu.iter().fold(CounterValue::default(), |acc, v| CounterValue {
            packets: acc.packets + v.packets,
            bytes: acc.bytes + v.bytes,
        });
        rows.push(CounterRow {
            program: counter.family(),
            reason: counter.reason(),
            packets: total.packets,
            bytes: total.bytes,
        });
    }
    if let Some(table) = meta.overlay.as_ref().and_then(|o| o.changes.nft_table.clone()) {
        // One attachment whose namespace is out of reach must not hide the others' counters.
        match nft_rule_counter(meta, table) {
            Ok((packets, bytes)) => rows.push(CounterRow { program: Family::Overlay, reason: NFT_ZEROED, packets, bytes }),
            Err(e) => warn!("{} in namespace `{}`: no {NFT_ZEROED} counter: {e:#}", meta.iface, meta.netns),
        }
    }
    Ok(rows)
}

/// The overlay fix's nftables rule counter, read in the attachment's namespace.
fn nft_rule_counter(meta: &AttachmentMeta, table: String) -> Result<(u64, u64)> {
    if netns::current_inode()? == meta.netns_inode && meta.written_in(netns::current_cookie()) {
        return overlay::nft::rule_counter(&table);
    }
    meta.find_netns()?.run(move || overlay::nft::rule_counter(&table))
}

/// Stats of every recorded attachment matching the filters. A directory
/// whose record cannot be read is named in a warning, not fatal.
pub fn collect(iface: Option<&IfaceName>, netns_inode: Option<u64>) -> Result<Vec<AttachmentStats>> {
    let mut out = Vec::new();
    for entry in pins::entries()? {
        let (dir, meta) = match entry {
            Entry::Attachment(dir, meta) => (dir, meta),
            Entry::Corrupt(dir, why) => {
                warn!("{}: no counters: {why}", dir.path.display());
                continue;
            }
            Entry::Staging(..) => continue,
        };
        if iface.is_some_and(|i| i.as_str() != meta.iface) || netns_inode.is_some_and(|n| n != meta.netns_inode) {
            continue;
        }
        out.push(AttachmentStats {
            counters: read_counters(&dir, &meta)?,
            conntrack_reaped: meta.guard.as_ref().map(|g| g.reaped),
            netns: meta.netns,
            netns_inode: meta.netns_inode,
            iface: meta.iface,
        });
    }
    Ok(out)
}

/// Packets per second by (interface, netns inode, program, reason).
pub type Rates = std::collections::HashMap<(String, u64, &'static str, &'static str), f64>;

/// Packets per second of each row since `before` (by attachment, program
/// and reason), as `stats --watch` shows beside the totals.
#[must_use]
pub fn rates(before: &[AttachmentStats], now: &[AttachmentStats], elapsed: std::time::Duration) -> Rates {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let mut out = std::collections::HashMap::new();
    for a in now {
        let Some(b) = before.iter().find(|b| b.iface == a.iface && b.netns_inode == a.netns_inode) else { continue };
        for r in &a.counters {
            if let Some(old) = b.counters.iter().find(|o| o.program == r.program && o.reason == r.reason) {
                #[expect(clippy::cast_precision_loss, reason = "a rate to print")]
                let rate = r.packets.saturating_sub(old.packets) as f64 / secs;
                out.insert((a.iface.clone(), a.netns_inode, r.program.name(), r.reason), rate);
            }
        }
    }
    out
}

/// The table `natfix stats` prints; with `rates`, packets per second beside each total.
#[must_use]
pub fn render_table(stats: &[AttachmentStats], rates: Option<&Rates>) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for a in stats {
        let _ = writeln!(s, "{} (netns {}, inode {})", a.iface, a.netns, a.netns_inode);
        for r in &a.counters {
            let _ = write!(s, "  {:<6} {:<20} {:>14} pkts {:>16} bytes", r.program.name(), r.reason, r.packets, r.bytes);
            if let Some(rate) = rates.and_then(|m| m.get(&(a.iface.clone(), a.netns_inode, r.program.name(), r.reason))) {
                let _ = write!(s, " {rate:>12.1} pkts/s");
            }
            s.push('\n');
        }
        if let Some(n) = a.conntrack_reaped {
            let _ = writeln!(s, "  {:<6} {:<20} {n:>14} conntrack entries deleted", "guard", "reaped");
        }
    }
    s
}
