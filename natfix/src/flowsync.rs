//! Keeps the own flow table in step with conntrack: seeds it when natfix
//! attaches and follows conntrack events, so flows that began before natfix
//! started, or that leave by another interface, still count as solicited.

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use tracing::{debug, warn};

use crate::{
    abi::{self, FlowKey, FlowValue},
    conntrack::{self, CtEntry, CtEventKind, CtEventStream, IPS_SEEN_REPLY},
    pins::{self, PinDir},
    sys::netns::Netns,
};

/// `CLOCK_MONOTONIC_COARSE` in ns: the clock of `bpf_ktime_get_coarse_ns()`,
/// which stamps the own flow table.
pub use crate::sys::clock::monotonic_coarse_ns as flow_clock_ns;

/// Which own-table keys a conntrack entry stands for.
///
/// Replies to flows this host started arrive as the entry's reply tuple
/// (remote -> our post-SNAT address). A flow the remote started is
/// solicited once it has seen a reply (the seed's ESTABLISHED); its packets
/// arrive as the original tuple. Only local ports whose flows are learned
/// (`guarded`) matter.
#[must_use]
pub fn keys_for(entry: &CtEntry, guarded: impl Fn(u16) -> bool, endpoint_independent: bool) -> Vec<FlowKey> {
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
/// `natfix_flow.h`). Must happen before the flow enters the table: the guard
/// drops packets to unmarked ports without looking the flow up.
pub fn mark_port<T: std::borrow::BorrowMut<MapData>>(ports: &mut Array<T, u8>, key: &FlowKey) -> Result<()> {
    ports.set(u32::from(u16::from_be(key.local_port)), 1, 0).context("cannot mark a flow's port")
}

/// Writes conntrack-derived flows into the pinned own flow table.
pub struct FlowSync {
    flows: BpfHashMap<MapData, FlowKey, FlowValue>,
    ports: Array<MapData, u8>,
    /// The guard's port planes: which local ports' flows are learned, read
    /// live so that `natfix set` changing the ranges is followed.
    planes: Array<MapData, u64>,
    endpoint_independent: bool,
}

fn open_pin(dir: &PinDir, name: &str) -> Result<MapData> {
    let path = dir.map(name);
    MapData::from_pin(&path).with_context(|| format!("cannot open {}", path.display()))
}

impl FlowSync {
    /// Opens the own flow table of the attachment in `dir` and the maps beside it.
    pub fn open(dir: &PinDir, endpoint_independent: bool) -> Result<Self> {
        let flows = BpfHashMap::try_from(aya::maps::Map::LruHashMap(open_pin(dir, pins::GUARD_FLOWS)?))?;
        let ports = Array::try_from(aya::maps::Map::Array(open_pin(dir, pins::GUARD_FLOW_PORTS)?))?;
        let planes = Array::try_from(aya::maps::Map::Array(open_pin(dir, pins::GUARD_PORTS)?))?;
        Ok(Self { flows, ports, planes, endpoint_independent })
    }

    /// Whether flows from local `port` are learned (the LEARN plane).
    fn learned(&self, port: u16) -> bool {
        let word = abi::PORT_PLANE_LEARN * abi::PORT_WORDS + u32::from(port >> 6);
        self.planes.get(&word, 0).is_ok_and(|bits| bits >> (port & 63) & 1 == 1)
    }

    /// Inserts the keys of `entries`; returns how many keys were written.
    pub fn apply(&mut self, entries: &[CtEntry]) -> usize {
        let now = FlowValue { last_seen_ns: flow_clock_ns() };
        let mut written = 0;
        for entry in entries {
            for key in keys_for(entry, |p| self.learned(p), self.endpoint_independent) {
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

    fn guarded(port: u16) -> bool {
        (20000..=30000).contains(&port)
    }

    #[test]
    fn masqueraded_flow_admits_its_reply() {
        // container 10.77.0.2:25000 -> remote:7000, SNAT to 198.51.100.10:25000
        let e = entry(("10.77.0.2", 25000, "198.51.100.20", 7000), ("198.51.100.20", 7000, "198.51.100.10", 25000), 0);
        let keys = keys_for(&e, guarded, false);
        let want = FlowKey::new("198.51.100.10".parse().unwrap(), 25000, Some(("198.51.100.20".parse().unwrap(), 7000)));
        assert_eq!(keys, vec![want]);
        let eif = keys_for(&e, guarded, true);
        assert_eq!(eif.len(), 2);
        assert!(eif.contains(&FlowKey::new("198.51.100.10".parse().unwrap(), 25000, None)));
    }

    #[test]
    fn remote_started_flow_counts_only_once_answered() {
        let orig = ("198.51.100.20", 7000, "198.51.100.10", 25000);
        let reply = ("198.51.100.10", 25000, "198.51.100.20", 7000);
        assert!(keys_for(&entry(orig, reply, 0), guarded, false).is_empty(), "unanswered probe stays unsolicited");
        let answered = keys_for(&entry(orig, reply, IPS_SEEN_REPLY), guarded, false);
        assert_eq!(
            answered,
            vec![FlowKey::new("198.51.100.10".parse().unwrap(), 25000, Some(("198.51.100.20".parse().unwrap(), 7000)))]
        );
    }

    #[test]
    fn unguarded_ports_are_ignored() {
        let e = entry(("10.0.0.2", 5000, "192.0.2.1", 53), ("192.0.2.1", 53, "198.51.100.10", 5000), IPS_SEEN_REPLY);
        assert!(keys_for(&e, guarded, true).is_empty());
    }
}
