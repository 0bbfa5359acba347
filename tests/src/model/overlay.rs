//! Model of the overlay fixer (`natfix-ebpf/src/overlay_tc.bpf.c`,
//! `bpf-headers/natfix_csum.h`): which counter a packet lands in and the
//! bytes it leaves with.

use std::net::IpAddr;

use super::parse::{Parsed, parse_udp};
use natfix::abi::{Counter, OVERLAY_F_NO_SECPATH, OVERLAY_F_RECOMPUTE, OVERLAY_S_MATCH_REQID, OverlayConfig, OverlaySettings};

/// Everything the overlay program is told: its `const volatile`
/// configuration and its live settings (`overlay_settings`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverlaySetup {
    pub config: OverlayConfig,
    pub settings: OverlaySettings,
}

impl OverlaySetup {
    /// Flags of the configuration, VXLAN ports, and a reqid to match (if any).
    #[must_use]
    pub fn new(flags: u32, ports: &[u16], reqid: Option<u32>) -> Self {
        Self {
            config: OverlayConfig { flags, delta_window_jiffies: 0 },
            settings: natfix::loader::settings::overlay_settings(ports, reqid),
        }
    }
}

/// Largest datagram the program recomputes (`NATFIX_CSUM_MAX_LEN`).
pub const MAX_RECOMPUTE_LEN: usize = 256 * 64;

/// The xfrm state of the skb: None for cleartext, Some(reqid) after decryption.
pub type Secpath = Option<u32>;

/// Ones' complement sum of `bytes` as 16-bit big-endian words (odd tail zero-padded).
#[must_use]
pub fn ones_sum(bytes: &[u8]) -> u64 {
    bytes.chunks(2).map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

#[must_use]
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(u16::try_from(sum).unwrap_or(0xffff))
}

/// UDP checksum of `datagram` (header + payload, checksum field ignored), 0 written as 0xffff.
#[must_use]
pub fn udp_checksum(src: IpAddr, dst: IpAddr, datagram: &[u8]) -> u16 {
    let len = datagram.len();
    let mut pseudo = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            pseudo.extend_from_slice(&v6(s));
            pseudo.extend_from_slice(&v6(d));
            pseudo.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 17]);
        }
    }
    let mut body = datagram.to_vec();
    body[6] = 0;
    body[7] = 0;
    let c = fold(ones_sum(&pseudo) + ones_sum(&body));
    if c == 0 { 0xffff } else { c }
}

/// One CPU's learned checksum deltas (`csum_delta_*` in `natfix_csum.h`):
/// direct-mapped slots keyed by address pair. The model never lets a delta's
/// window run out; tests give the program a window of 0 (off) or `u32::MAX`.
#[derive(Debug, Clone)]
pub struct DeltaCache {
    slots: Vec<Option<DeltaSlot>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DeltaSlot {
    src: IpAddr,
    dst: IpAddr,
    delta: u32,
}

impl Default for DeltaCache {
    fn default() -> Self {
        Self { slots: vec![None; 256] }
    }
}

/// The address as the program's `__u32 addr[4]` holds it (x86: little-endian loads).
fn words(ip: IpAddr) -> [u32; 4] {
    let b: [u8; 16] = match ip {
        IpAddr::V4(a) => {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    };
    std::array::from_fn(|i| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]))
}

impl DeltaCache {
    fn index(src: IpAddr, dst: IpAddr) -> usize {
        let (s, d) = (words(src), words(dst));
        let h = s[0] ^ s[3] ^ d[0] ^ d[3];
        (h.wrapping_mul(0x9e37_79b1) >> 24) as usize
    }
}

/// The checksum a learned delta gives for a sent one; 0 goes out as 0xffff.
/// (Ones' complement sums do not care about byte order: big-endian here.)
#[must_use]
pub fn delta_apply(sent: u16, delta: u32) -> u16 {
    let c = fold(u64::from(!sent) + u64::from(delta));
    if c == 0 { 0xffff } else { c }
}

#[must_use]
pub fn delta_learn(sent: u16, right: u16) -> u32 {
    u32::from(!right) + u32::from(sent)
}

/// The program's verdict: counter and output frame, with no deltas learned.
#[must_use]
pub fn fix(cfg: &OverlaySetup, secpath: Secpath, frame: &[u8]) -> (Counter, Vec<u8>) {
    fix_with(cfg, secpath, frame, &mut DeltaCache::default())
}

/// The program's verdict on one CPU whose learned deltas are `cache`.
#[must_use]
pub fn fix_with(setup: &OverlaySetup, secpath: Secpath, frame: &[u8], cache: &mut DeltaCache) -> (Counter, Vec<u8>) {
    let (cfg, live) = (&setup.config, &setup.settings);
    let untouched = |c| (c, frame.to_vec());
    let pkt = match parse_udp(frame) {
        Parsed::Malformed => return untouched(Counter::OverlayMalformed),
        Parsed::Udp(p) => p,
        Parsed::Other | Parsed::Fragment | Parsed::TooDeep => return untouched(Counter::OverlayNotVxlan),
    };
    let ports = &live.vxlan_ports[..(live.nr_ports as usize).min(live.vxlan_ports.len())];
    if !ports.contains(&pkt.dport) {
        return untouched(Counter::OverlayNotVxlan);
    }
    if cfg.flags & OVERLAY_F_NO_SECPATH == 0 {
        match secpath {
            None => return untouched(Counter::OverlayCleartext),
            Some(reqid) if live.flags & OVERLAY_S_MATCH_REQID != 0 && reqid != live.reqid => {
                return untouched(Counter::OverlayOtherSa);
            }
            Some(_) => {}
        }
    }
    let udp_len = usize::from(u16::from_be_bytes([frame[pkt.l4_off + 4], frame[pkt.l4_off + 5]]));
    if pkt.l4_off + udp_len > frame.len() {
        return untouched(Counter::OverlayMalformed);
    }
    let mut out = frame.to_vec();
    let check_at = pkt.l4_off + 6;
    if pkt.src.is_ipv4() && cfg.flags & OVERLAY_F_RECOMPUTE == 0 {
        out[check_at..check_at + 2].copy_from_slice(&[0, 0]);
        return (Counter::OverlayZeroed, out);
    }
    let sent = u16::from_be_bytes([frame[check_at], frame[check_at + 1]]);
    let learning = sent != 0 && cfg.delta_window_jiffies != 0;
    let slot = DeltaCache::index(pkt.src, pkt.dst);
    if learning && let Some(s) = cache.slots[slot].filter(|s| s.src == pkt.src && s.dst == pkt.dst) {
        out[check_at..check_at + 2].copy_from_slice(&delta_apply(sent, s.delta).to_be_bytes());
        return (Counter::OverlayRecomputedDelta, out);
    }
    if udp_len > MAX_RECOMPUTE_LEN {
        return untouched(Counter::OverlayError);
    }
    let c = udp_checksum(pkt.src, pkt.dst, &frame[pkt.l4_off..pkt.l4_off + udp_len]);
    if learning {
        cache.slots[slot] = Some(DeltaSlot { src: pkt.src, dst: pkt.dst, delta: delta_learn(sent, c) });
    }
    out[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
    (Counter::OverlayRecomputed, out)
}
