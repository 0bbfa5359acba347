//! Model of `bpf-headers/natfix_parse.h`: the same decisions, byte for byte.
//! Written from the header's contract (VLAN priority tags walked, other
//! tags out of scope; IPv6 chains walked to a depth, deeper is too deep).

use std::net::IpAddr;

/// `enum natfix_parse_result`, with the parsed fields for UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    Udp(UdpPacket),
    Other,
    Fragment,
    Malformed,
    /// More VLAN tags or IPv6 extension headers than the parser walks.
    TooDeep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpPacket {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub l3_off: usize,
    pub l4_off: usize,
}

const ETH_HLEN: usize = 14;
const MAX_EXTHDRS: usize = 16;
const MAX_VLAN_TAGS: usize = 4;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

fn be16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(off)?, *b.get(off + 1)?]))
}

/// Parses an Ethernet frame down to UDP.
#[must_use]
pub fn parse_udp(frame: &[u8]) -> Parsed {
    let Some(mut proto) = be16(frame, 12) else { return Parsed::Malformed };
    let mut off = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let (Some(tci), Some(inner)) = (be16(frame, off), be16(frame, off + 2)) else { return Parsed::Malformed };
        if tci & 0x0fff != 0 {
            return Parsed::Other;
        }
        proto = inner;
        off += 4;
    }
    match proto {
        0x0800 => parse_ipv4(frame, off),
        0x86dd => parse_ipv6(frame, off),
        ETH_P_8021Q | ETH_P_8021AD => Parsed::TooDeep,
        _ => Parsed::Other,
    }
}

fn parse_udp_hdr(b: &[u8], off: usize, src: IpAddr, dst: IpAddr, l3_off: usize) -> Parsed {
    if b.len() < off + 8 {
        return Parsed::Malformed;
    }
    let (sport, dport, len) = (be16(b, off).unwrap_or(0), be16(b, off + 2).unwrap_or(0), be16(b, off + 4).unwrap_or(0));
    if len < 8 {
        return Parsed::Malformed;
    }
    Parsed::Udp(UdpPacket { src, dst, sport, dport, l3_off, l4_off: off })
}

fn parse_ipv4(b: &[u8], off: usize) -> Parsed {
    if b.len() < off + 20 {
        return Parsed::Malformed;
    }
    let version = b[off] >> 4;
    let ihl = usize::from(b[off] & 0x0f);
    if version != 4 || ihl < 5 {
        return Parsed::Malformed;
    }
    let hlen = ihl * 4;
    if usize::from(be16(b, off + 2).unwrap_or(0)) < hlen || b.len() < off + hlen {
        return Parsed::Malformed;
    }
    if b[off + 9] != 17 {
        return Parsed::Other;
    }
    if be16(b, off + 6).unwrap_or(0) & 0x1fff != 0 {
        return Parsed::Fragment;
    }
    let src = IpAddr::from(<[u8; 4]>::try_from(&b[off + 12..off + 16]).unwrap_or_default());
    let dst = IpAddr::from(<[u8; 4]>::try_from(&b[off + 16..off + 20]).unwrap_or_default());
    parse_udp_hdr(b, off + hlen, src, dst, off)
}

fn parse_ipv6(b: &[u8], l3_off: usize) -> Parsed {
    if b.len() < l3_off + 40 {
        return Parsed::Malformed;
    }
    if b[l3_off] >> 4 != 6 {
        return Parsed::Malformed;
    }
    let src = IpAddr::from(<[u8; 16]>::try_from(&b[l3_off + 8..l3_off + 24]).unwrap_or_default());
    let dst = IpAddr::from(<[u8; 16]>::try_from(&b[l3_off + 24..l3_off + 40]).unwrap_or_default());
    let mut nexthdr = b[l3_off + 6];
    let mut off = l3_off + 40;
    for _ in 0..MAX_EXTHDRS {
        match nexthdr {
            17 => return parse_udp_hdr(b, off, src, dst, l3_off),
            0 | 43 | 60 => {
                if b.len() < off + 2 {
                    return Parsed::Malformed;
                }
                nexthdr = b[off];
                off += (usize::from(b[off + 1]) + 1) * 8;
            }
            51 => {
                if b.len() < off + 2 {
                    return Parsed::Malformed;
                }
                nexthdr = b[off];
                off += (usize::from(b[off + 1]) + 2) * 4;
            }
            44 => {
                if b.len() < off + 8 {
                    return Parsed::Malformed;
                }
                if be16(b, off + 2).unwrap_or(0) & 0xfff8 != 0 {
                    return if b[off] == 17 { Parsed::Fragment } else { Parsed::Other };
                }
                nexthdr = b[off];
                off += 8;
            }
            _ => return Parsed::Other,
        }
    }
    match nexthdr {
        17 => parse_udp_hdr(b, off, src, dst, l3_off),
        0 | 43 | 44 | 51 | 60 => Parsed::TooDeep,
        _ => Parsed::Other,
    }
}
