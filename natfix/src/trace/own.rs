//! natfix's own verdicts on a traced packet: the attachments in the traced
//! namespaces, their sampled events (every guard drop is offered to the
//! event budget; overlay rewrites are sampled), and the guard's reason for
//! letting a packet pass, from its record.
//!
//! An attachment's ring buffer has one reader: while a trace runs, the
//! events it reads do not reach a `natfix monitor` or `attach --log-events`.

use std::os::fd::{AsFd, BorrowedFd};

use aya::maps::{Map, MapData, RingBuf};

use super::{
    obs::OwnView,
    tuple::{IPPROTO_UDP, Tuple},
};
use crate::{
    abi::Event,
    config::parse_port_range,
    observe::events::EventRecord,
    pins,
    record::{AttachmentMeta, GuardMeta, Program},
};

/// One attachment in a traced namespace.
pub struct OwnAttachment {
    /// Index of its namespace among the traced ones.
    pub ns: usize,
    pub meta: AttachmentMeta,
    rings: Vec<RingBuf<MapData>>,
}

/// natfix's attachments whose namespace inode is in `inodes` (best effort:
/// no bpffs, or a record unreadable, means none).
#[must_use]
pub fn find(inodes: &[u64]) -> Vec<OwnAttachment> {
    let Ok(all) = pins::attachments() else { return Vec::new() };
    all.into_iter()
        .filter_map(|(dir, meta)| {
            let ns = inodes.iter().position(|i| *i == meta.netns_inode)?;
            let rings = [pins::GUARD_EVENTS, pins::OVERLAY_EVENTS]
                .iter()
                .filter_map(|f| MapData::from_pin(dir.map(f)).ok())
                .filter_map(|m| RingBuf::try_from(Map::RingBuf(m)).ok())
                .collect();
            Some(OwnAttachment { ns, meta, rings })
        })
        .collect()
}

impl OwnAttachment {
    /// Events waiting in its rings.
    pub fn drain(&mut self) -> Vec<EventRecord> {
        let mut out = Vec::new();
        for ring in &mut self.rings {
            while let Some(item) = ring.next() {
                if let Some(e) = Event::from_bytes(&item) {
                    out.push(EventRecord::from_event(&e, &self.meta));
                }
            }
        }
        out
    }

    pub fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.rings.iter().map(AsFd::as_fd)
    }

    /// `xdp` or `tc`, where its guard runs.
    #[must_use]
    pub fn guard_hook(&self) -> Option<&'static str> {
        if self.meta.has_program(Program::GuardXdp) {
            Some("xdp")
        } else if self.meta.has_program(Program::GuardTc) {
            Some("tc")
        } else {
            None
        }
    }

    #[must_use]
    pub fn view(&self) -> OwnView {
        OwnView { ns: self.ns, iface: self.meta.iface.clone(), guard_hook: self.guard_hook(), guard: self.meta.guard.clone() }
    }
}

/// Why a guard let a packet with tuple `t`, arriving on its interface,
/// through (it has no event for passes): its rules applied to the packet, in
/// its order.
#[must_use]
pub fn guard_pass_reason(g: &GuardMeta, t: &Tuple) -> String {
    let guarded = g
        .ranges
        .iter()
        .filter_map(|r| parse_port_range(r).ok())
        .any(|r| (r.first..=r.last).contains(&t.dport));
    if t.proto != IPPROTO_UDP || !guarded {
        format!("out of scope (not UDP to a guarded port: {})", g.ranges.join(", "))
    } else if g.allow_ports.contains(&t.dport) {
        format!("exempt port {} (--allow-port)", t.dport)
    } else if let Some(c) = g.allow_src.iter().find(|c| c.contains(t.src)) {
        format!("exempt source (--allow-src {c})")
    } else if g.dry_run {
        "solicited, or would be dropped (--dry-run)".into()
    } else {
        "solicited: a known flow".into()
    }
}

/// An event's packet as a tuple (the programs only report UDP).
#[must_use]
pub fn event_tuple(r: &EventRecord) -> Option<Tuple> {
    let (s, d): (std::net::SocketAddr, std::net::SocketAddr) = (r.src.parse().ok()?, r.dst.parse().ok()?);
    Some(Tuple { proto: IPPROTO_UDP, src: s.ip(), sport: s.port(), dst: d.ip(), dport: d.port() })
}
