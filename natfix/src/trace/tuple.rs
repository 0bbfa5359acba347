//! A packet's addresses, ports and protocol: what the filter matches, what
//! joins the trace's sources (nftables headers, tracepoint events,
//! conntrack tuples), and how steps print a packet.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

/// Ports are in host byte order, 0 for protocols without ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub proto: u8,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

impl Tuple {
    /// The same flow's other direction.
    #[must_use]
    pub const fn rev(&self) -> Self {
        Self { proto: self.proto, src: self.dst, sport: self.dport, dst: self.src, dport: self.sport }
    }

    #[must_use]
    pub fn has_ports(&self) -> bool {
        matches!(self.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
    }

    /// From a conntrack tuple (`conntrack::CtTuple` is UDP-only).
    #[must_use]
    pub const fn from_ct(t: &crate::conntrack::CtTuple) -> Self {
        Self { proto: IPPROTO_UDP, src: t.src, sport: t.sport, dst: t.dst, dport: t.dport }
    }

    /// Parses the start of an IP packet (as nftables trace events carry it:
    /// up to 40 bytes of network header, then the transport header).
    #[must_use]
    pub fn from_headers(network: &[u8], transport: &[u8]) -> Option<Self> {
        let (proto, src, dst, l4) = match network.first()? >> 4 {
            4 => {
                let b: &[u8; 20] = network.get(..20)?.try_into().ok()?;
                let ihl = usize::from(b[0] & 0xf) * 4;
                let fragment_offset = u16::from_be_bytes([b[6], b[7]]) & 0x1fff;
                let first_fragment = fragment_offset == 0;
                let l4 = if first_fragment { network.get(ihl..).filter(|s| s.len() >= 4) } else { None };
                let src: [u8; 4] = b[12..16].try_into().ok()?;
                let dst: [u8; 4] = b[16..20].try_into().ok()?;
                (b[9], IpAddr::from(src), IpAddr::from(dst), l4)
            }
            6 => {
                let b: &[u8; 40] = network.get(..40)?.try_into().ok()?;
                let src: [u8; 16] = b[8..24].try_into().ok()?;
                let dst: [u8; 16] = b[24..40].try_into().ok()?;
                (b[6], IpAddr::from(src), IpAddr::from(dst), network.get(40..).filter(|s| s.len() >= 4))
            }
            _ => return None,
        };
        let mut t = Self { proto, src, sport: 0, dst, dport: 0 };
        let l4 = if transport.len() >= 4 { Some(transport) } else { l4 };
        if let Some(p) = l4.filter(|_| t.has_ports()) {
            t.sport = u16::from_be_bytes([p[0], p[1]]);
            t.dport = u16::from_be_bytes([p[2], p[3]]);
        }
        Some(t)
    }

    /// From a tracepoint event's tuple; None when its headers were not read.
    #[must_use]
    pub fn from_bpf(t: &natfix_ebpf::trace::TraceTuple) -> Option<Self> {
        Some(Self {
            proto: t.proto,
            src: t.src()?,
            sport: u16::from_be(t.sport),
            dst: t.dst()?,
            dport: u16::from_be(t.dport),
        })
    }

    /// The form the programs' flow map takes.
    #[must_use]
    pub fn to_bpf(&self) -> natfix_ebpf::trace::TraceTuple {
        natfix_ebpf::trace::TraceTuple::new(self.proto, self.src, self.sport, self.dst, self.dport)
    }
}

#[must_use]
pub fn proto_name(proto: u8) -> String {
    match proto {
        IPPROTO_ICMP => "icmp".into(),
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMPV6 => "icmpv6".into(),
        IPPROTO_SCTP => "sctp".into(),
        50 => "esp".into(),
        n => format!("proto {n}"),
    }
}

impl std::fmt::Display for Tuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.has_ports() {
            let (s, d) = (SocketAddr::new(self.src, self.sport), SocketAddr::new(self.dst, self.dport));
            write!(f, "{} {s} -> {d}", proto_name(self.proto))
        } else {
            write!(f, "{} {} -> {}", proto_name(self.proto), self.src, self.dst)
        }
    }
}

/// A tuple in `--json`: `{"proto","src","dst"}` with `addr:port` where there are ports.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TupleJson {
    pub proto: String,
    pub src: String,
    pub dst: String,
}

impl From<&Tuple> for TupleJson {
    fn from(t: &Tuple) -> Self {
        let side = |a: IpAddr, p: u16| if t.has_ports() { SocketAddr::new(a, p).to_string() } else { a.to_string() };
        Self { proto: proto_name(t.proto), src: side(t.src, t.sport), dst: side(t.dst, t.dport) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_give_the_tuple() {
        // IPv4 UDP 10.0.0.1:40000 -> 10.0.0.2:1812, transport header separate.
        let mut ip = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
        let udp = [0x9c, 0x40, 0x07, 0x14, 0, 8, 0, 0];
        let t = Tuple::from_headers(&ip, &udp).unwrap();
        assert_eq!(t.to_string(), "udp 10.0.0.1:40000 -> 10.0.0.2:1812");
        assert_eq!(t.rev().to_string(), "udp 10.0.0.2:1812 -> 10.0.0.1:40000");
        // Ports inside the network-header dump when there is no transport header.
        ip.extend_from_slice(&udp);
        assert_eq!(Tuple::from_headers(&ip, &[]).unwrap(), t);
        // A non-first fragment has no ports.
        ip[6] = 0x00;
        ip[7] = 0x10;
        assert_eq!(Tuple::from_headers(&ip, &[]).unwrap().dport, 0);
        assert!(Tuple::from_headers(&[0x45, 0], &[]).is_none());
        assert!(Tuple::from_headers(&[], &[]).is_none());
        let bpf = t.to_bpf();
        assert_eq!(Tuple::from_bpf(&bpf), Some(t));
    }
}
