//! Keeps the own flow table in step with conntrack: seeds it when natfix
//! attaches and follows conntrack events, so flows that began before natfix
//! started, or that leave by another interface, still count as solicited.

use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use tracing::{debug, warn};

use crate::{
    abi::{FlowKey, FlowValue, PortRange},
    conntrack::{self, CtEntry, CtEventKind, CtEventStream, IPS_SEEN_REPLY},
    sys::netns::Netns,
};

/// CLOCK_MONOTONIC_COARSE in ns: the clock of bpf_ktime_get_coarse_ns(),
/// which stamps the own flow table.
#[must_use]
pub fn flow_clock_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .unwrap_or(nix::sys::time::TimeSpec::new(0, 0));
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}

/// Which own-table keys a conntrack entry stands for.
///
/// Replies to flows this host started arrive as the entry's reply tuple
/// (remote -> our post-SNAT address). A flow the remote started is
/// solicited once it has seen a reply (the seed's ESTABLISHED); its packets
/// arrive as the original tuple. Only guarded local ports matter.
#[must_use]
pub fn keys_for(entry: &CtEntry, ranges: &[PortRange], endpoint_independent: bool) -> Vec<FlowKey> {
    let guarded = |port: u16| ranges.iter().any(|r| (r.first..=r.last).contains(&port));
    let mut keys = Vec::new();
    let r = &entry.reply;
    if guarded(r.dport) {
        keys.push(FlowKey::new(r.dst, r.dport, Some((r.src, r.sport))));
        if endpoint_independent {
            keys.push(FlowKey::new(r.dst, r.dport, None));
        }
    }
    let o = &entry.orig;
    if entry.status & IPS_SEEN_REPLY != 0 && guarded(o.dport) {
        keys.push(FlowKey::new(o.dst, o.dport, Some((o.src, o.sport))));
    }
    keys
}

/// Marks `key`'s local port in the guard's port map (`guard_flow_ports` in
/// natfix_flow.h). Must happen before the flow enters the table: the guard
/// drops packets to unmarked ports without looking the flow up.
pub fn mark_port<T: std::borrow::BorrowMut<MapData>>(ports: &mut Array<T, u8>, key: &FlowKey) -> Result<()> {
    ports.set(u32::from(u16::from_be(key.local_port)), 1, 0).context("cannot mark a flow's port")
}

/// Writes conntrack-derived flows into the pinned own flow table.
pub struct FlowSync {
    flows: BpfHashMap<MapData, FlowKey, FlowValue>,
    ports: Array<MapData, u8>,
    ranges: Vec<PortRange>,
    endpoint_independent: bool,
}

impl FlowSync {
    /// `flows_pin`: the pinned flow table; its port map is pinned beside it.
    pub fn open(flows_pin: &Path, ranges: Vec<PortRange>, endpoint_independent: bool) -> Result<Self> {
        let data = MapData::from_pin(flows_pin).with_context(|| format!("cannot open {}", flows_pin.display()))?;
        let flows = BpfHashMap::try_from(aya::maps::Map::LruHashMap(data))?;
        let ports_pin = flows_pin.with_file_name(crate::pins::GUARD_FLOW_PORTS);
        let data = MapData::from_pin(&ports_pin).with_context(|| format!("cannot open {}", ports_pin.display()))?;
        let ports = Array::try_from(aya::maps::Map::Array(data))?;
        Ok(Self { flows, ports, ranges, endpoint_independent })
    }

    /// Inserts the keys of `entries`; returns how many keys were written.
    pub fn apply(&mut self, entries: &[CtEntry]) -> usize {
        let now = FlowValue { last_seen_ns: flow_clock_ns() };
        let mut written = 0;
        for entry in entries {
            for key in keys_for(entry, &self.ranges, self.endpoint_independent) {
                if let Err(e) = mark_port(&mut self.ports, &key) {
                    warn!("{e:#}; not adding the flow");
                    continue;
                }
                match self.flows.insert(key, now, 0) {
                    Ok(()) => written += 1,
                    Err(e) => warn!("cannot add a conntrack flow to the own table: {e}"),
                }
            }
        }
        written
    }

    /// Seeds from a full conntrack dump taken inside `netns`.
    pub fn seed(&mut self, netns: &Netns) -> Result<usize> {
        let entries = netns.run(conntrack::dump_udp).context("cannot dump conntrack")?;
        let n = self.apply(&entries);
        debug!("seeded {n} flow keys from {} conntrack UDP entries", entries.len());
        Ok(n)
    }

    /// Subscribes to conntrack events, then seeds: no flow can start unseen
    /// between the dump and the subscription.
    pub fn subscribe_and_seed(&mut self, netns: &Netns) -> Result<CtEventStream> {
        let stream = netns.run(CtEventStream::open).context("cannot subscribe to conntrack events")?;
        self.seed(netns)?;
        Ok(stream)
    }

    /// Follows conntrack events until the stream fails; re-seeds when the
    /// kernel reports lost events.
    pub async fn follow(mut self, stream: CtEventStream, netns: Netns) -> Result<()> {
        stream.set_nonblocking(true)?;
        // SAFETY: the stream owns its socket for as long as the AsyncFd lives.
        let mut fd = unsafe { tokio::io::unix::AsyncFd::register(stream) }?;
        loop {
            let mut guard = fd.readable_mut().await?;
            match guard.get_inner_mut().try_recv() {
                Ok(Some(events)) => {
                    let entries: Vec<CtEntry> = events
                        .into_iter()
                        .filter(|e| !matches!(e.kind, CtEventKind::Destroy))
                        .map(|e| e.entry)
                        .collect();
                    self.apply(&entries);
                }
                Ok(None) => guard.clear_ready(),
                Err(e) if conntrack::is_events_lost(&e) => {
                    warn!("conntrack events were lost; re-reading the table");
                    self.seed(&netns)?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::CtTuple;

    fn entry(orig: (&str, u16, &str, u16), reply: (&str, u16, &str, u16), status: u32) -> CtEntry {
        let t = |(s, sp, d, dp): (&str, u16, &str, u16)| CtTuple {
            src: s.parse().unwrap(),
            dst: d.parse().unwrap(),
            sport: sp,
            dport: dp,
        };
        CtEntry { orig: t(orig), reply: t(reply), status, timeout_secs: None }
    }

    const RANGES: &[PortRange] = &[PortRange { first: 20000, last: 30000 }];

    #[test]
    fn masqueraded_flow_admits_its_reply() {
        // container 10.77.0.2:25000 -> remote:7000, SNAT to 198.51.100.10:25000
        let e = entry(("10.77.0.2", 25000, "198.51.100.20", 7000), ("198.51.100.20", 7000, "198.51.100.10", 25000), 0);
        let keys = keys_for(&e, RANGES, false);
        let want = FlowKey::new("198.51.100.10".parse().unwrap(), 25000, Some(("198.51.100.20".parse().unwrap(), 7000)));
        assert_eq!(keys, vec![want]);
        let eif = keys_for(&e, RANGES, true);
        assert_eq!(eif.len(), 2);
        assert!(eif.contains(&FlowKey::new("198.51.100.10".parse().unwrap(), 25000, None)));
    }

    #[test]
    fn remote_started_flow_counts_only_once_answered() {
        let orig = ("198.51.100.20", 7000, "198.51.100.10", 25000);
        let reply = ("198.51.100.10", 25000, "198.51.100.20", 7000);
        assert!(keys_for(&entry(orig, reply, 0), RANGES, false).is_empty(), "unanswered probe stays unsolicited");
        let answered = keys_for(&entry(orig, reply, IPS_SEEN_REPLY), RANGES, false);
        assert_eq!(
            answered,
            vec![FlowKey::new("198.51.100.10".parse().unwrap(), 25000, Some(("198.51.100.20".parse().unwrap(), 7000)))]
        );
    }

    #[test]
    fn unguarded_ports_are_ignored() {
        let e = entry(("10.0.0.2", 5000, "192.0.2.1", 53), ("192.0.2.1", 53, "198.51.100.10", 5000), IPS_SEEN_REPLY);
        assert!(keys_for(&e, RANGES, true).is_empty());
    }
}
