//! Model of the guard's decision (`bpf-headers/natfix_guard.h`,
//! `natfix_flow.h`, `guard_xdp.bpf.c`): which counter a packet lands in.
//! The per-CPU flow cache (`natfix_flow_cache.h`) is not modelled: it only
//! differs from the table within 125 ms of a flow's removal or expiry, which
//! the differential tests never do (and `guard_test_run` tests on its own).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use super::parse::{Parsed, parse_udp};
use natfix::{
    abi::Counter,
    config::{Cidr, PortRange},
};

/// A flow as the own table keys it: our (local) end and the peer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub local: IpAddr,
    pub local_port: u16,
    /// None: the endpoint-independent wildcard entry.
    pub remote: Option<(IpAddr, u16)>,
}

#[derive(Debug, Clone, Default)]
pub struct GuardModel {
    pub ranges: Vec<PortRange>,
    pub dry_run: bool,
    pub endpoint_independent: bool,
    pub allow_ports: HashSet<u16>,
    pub allow_src: Vec<Cidr>,
    /// Flow -> last seen (ns, `CLOCK_MONOTONIC`).
    pub flows: HashMap<Flow, u64>,
    pub timeout_ns: u64,
}

impl GuardModel {
    #[must_use]
    pub fn guarded(&self, port: u16) -> bool {
        self.ranges.iter().any(|r| (r.first..=r.last).contains(&port))
    }

    fn src_allowed(&self, src: IpAddr) -> bool {
        self.allow_src.iter().any(|c| cidr_contains(c, src))
    }

    fn live(&self, flow: &Flow, now: u64) -> bool {
        // Signed, as in C: a stamp a tick ahead of `now` is fresh.
        self.flows.get(flow).is_some_and(|seen| now.wrapping_sub(*seen).cast_signed() <= self.timeout_ns.cast_signed())
    }

    /// The counter the ingress guard bumps for `frame` at time `now`.
    #[must_use]
    pub fn verdict(&self, frame: &[u8], now: u64) -> Counter {
        let pkt = match parse_udp(frame) {
            Parsed::Udp(p) => p,
            Parsed::Fragment => return Counter::GuardFragment,
            Parsed::Malformed => return Counter::GuardMalformed,
            Parsed::TooDeep => return if self.dry_run { Counter::GuardWouldDrop } else { Counter::GuardDropTooDeep },
            Parsed::Other => return Counter::GuardOutOfScope,
        };
        if !self.guarded(pkt.dport) {
            return Counter::GuardOutOfScope;
        }
        if self.allow_ports.contains(&pkt.dport) {
            return Counter::GuardExemptPort;
        }
        if self.src_allowed(pkt.src) {
            return Counter::GuardExemptSrc;
        }
        let exact = Flow { local: pkt.dst, local_port: pkt.dport, remote: Some((pkt.src, pkt.sport)) };
        let any = Flow { remote: None, ..exact };
        // The C code takes the first entry found; a stale exact entry hides the wildcard.
        let solicited = if self.flows.contains_key(&exact) {
            self.live(&exact, now)
        } else {
            self.endpoint_independent && self.live(&any, now)
        };
        if solicited {
            Counter::GuardPassSolicited
        } else if self.dry_run {
            Counter::GuardWouldDrop
        } else {
            Counter::GuardDropUnsolicited
        }
    }

    /// Whether the packet is dropped (`XDP_DROP` / `TC_ACT_SHOT`).
    #[must_use]
    pub fn drops(&self, frame: &[u8], now: u64) -> bool {
        matches!(self.verdict(frame, now), Counter::GuardDropUnsolicited | Counter::GuardDropTooDeep)
    }
}

#[must_use]
pub fn cidr_contains(c: &Cidr, ip: IpAddr) -> bool {
    match (c.addr, ip) {
        (IpAddr::V4(net), IpAddr::V4(a)) => {
            let mask = if c.prefix_len == 0 { 0 } else { u32::MAX << (32 - u32::from(c.prefix_len)) };
            u32::from(net) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(a)) => {
            let mask = if c.prefix_len == 0 { 0 } else { u128::MAX << (128 - u32::from(c.prefix_len)) };
            u128::from(net) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}
