//! Builders of test frames (Ethernet + IPv4/IPv6 + UDP), checksums left zero.

use std::net::{Ipv4Addr, Ipv6Addr};

const ETH: [u8; 12] = [0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];

/// Sets the destination MAC (frames for a real device must carry its address).
pub fn set_dst_mac(frame: &mut [u8], mac: [u8; 6]) {
    frame[..6].copy_from_slice(&mac);
}

#[must_use]
pub fn udp_header(sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    let len = u16::try_from(8 + payload_len).unwrap_or(u16::MAX);
    let mut h = Vec::with_capacity(8);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h
}

/// IPv4 header with options (`options.len()` a multiple of 4) and frag field.
#[must_use]
pub fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, options: &[u8], frag: u16, l4_len: usize) -> Vec<u8> {
    let ihl = 5 + options.len() / 4;
    let total = u16::try_from(ihl * 4 + l4_len).unwrap_or(u16::MAX);
    let mut h = vec![0x40 | u8::try_from(ihl).unwrap_or(15), 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(options);
    // A valid header checksum: the stack drops bad ones before netfilter.
    let sum: u32 = h.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let csum = !u16::try_from((folded & 0xffff) + (folded >> 16)).unwrap_or(0xffff);
    h[10..12].copy_from_slice(&csum.to_be_bytes());
    h
}

#[must_use]
pub fn eth(proto: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = ETH.to_vec();
    f.extend_from_slice(&proto.to_be_bytes());
    f.extend_from_slice(l3);
    f
}

/// A well-formed UDP/IPv4 frame.
#[must_use]
pub fn udp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut l3 = ipv4_header(src, dst, 17, &[], 0, 8 + payload.len());
    l3.extend(udp_header(sport, dport, payload.len()));
    l3.extend_from_slice(payload);
    eth(0x0800, &l3)
}

/// IPv6 extension header bytes: (type, body) where body fills to the header's length.
#[must_use]
pub fn udp6_with_ext(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, exts: &[(u8, Vec<u8>)], payload: &[u8]) -> Vec<u8> {
    let mut chain = Vec::new();
    let first = exts.first().map_or(17, |e| e.0);
    for (i, (_, body)) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(17, |e| e.0);
        let mut h = vec![next];
        h.extend_from_slice(body);
        chain.extend(h);
    }
    let mut l4 = udp_header(sport, dport, payload.len());
    l4.extend_from_slice(payload);
    let plen = u16::try_from(chain.len() + l4.len()).unwrap_or(u16::MAX);
    let mut l3 = vec![0x60, 0, 0, 0];
    l3.extend_from_slice(&plen.to_be_bytes());
    l3.extend_from_slice(&[first, 64]);
    l3.extend_from_slice(&src.octets());
    l3.extend_from_slice(&dst.octets());
    l3.extend(chain);
    l3.extend(l4);
    eth(0x86dd, &l3)
}

#[must_use]
pub fn udp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    udp6_with_ext(src, sport, dst, dport, &[], payload)
}

/// Body of a hop-by-hop/destination-options header of 8 bytes (after next-header).
#[must_use]
pub fn opts_body() -> Vec<u8> {
    vec![0, 1, 4, 0, 0, 0, 0] // hdrlen 0, PadN
}

/// Body of a fragment header (after next-header) with offset (in 8-byte units) and M flag.
#[must_use]
pub fn frag_body(offset_units: u16, more: bool) -> Vec<u8> {
    let fo = (offset_units << 3) | u16::from(more);
    let mut b = vec![0];
    b.extend_from_slice(&fo.to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, 1]);
    b
}

/// Sends whole Ethernet frames out of `iface` (in the calling thread's
/// namespace) through an `AF_PACKET` socket: how the tests put frames on a
/// veth that no socket API would build (VLAN stacks, extension chains).
pub fn send_frames(iface: &str, frames: &[Vec<u8>]) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let ifindex = nix::net::if_::if_nametoindex(iface)?;
    // SAFETY: plain socket(2); the fd is owned below.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data; zeroes are valid, the fields set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or_default();
    addr.sll_ifindex = i32::try_from(ifindex).unwrap_or_default();
    addr.sll_halen = 6;
    for frame in frames {
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the frame and the address outlive the call; sendto only reads them.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                u32::try_from(size_of::<libc::sockaddr_ll>()).unwrap_or_default(),
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Fills in the UDP checksum of an IPv6 frame (`udp6_with_ext`'s shape):
/// the kernel drops IPv6 UDP with checksum 0 before conntrack sees it.
///
/// # Panics
///
/// If `frame` is too short for an IPv6 header.
pub fn fix_udp6_checksum(frame: &mut [u8], udp_at: usize) {
    let src: [u8; 16] = frame[22..38].try_into().expect("IPv6 frame");
    let dst: [u8; 16] = frame[38..54].try_into().expect("IPv6 frame");
    let csum = crate::model::overlay::udp_checksum(Ipv6Addr::from(src).into(), Ipv6Addr::from(dst).into(), &frame[udp_at..]);
    frame[udp_at + 6..udp_at + 8].copy_from_slice(&csum.to_be_bytes());
}
