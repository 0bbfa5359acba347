//! `#[repr(C)]` mirrors of `bpf-headers/natfix_trace_abi.h` (`natfix trace`'s
//! tracepoint programs). The size asserts at the bottom catch layout drift.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// `enum natfix_trace_kind`.
pub const KIND_DROP: u32 = 1;
pub const KIND_XMIT: u32 = 2;
pub const KIND_DELIVER: u32 = 3;

pub const MAX_RULES: usize = 8;

/// `struct natfix_trace_tuple`: ports in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TraceTuple {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// 4 or 6; 0 when the headers were not IP or unreadable.
    pub family: u8,
    pub pad: [u8; 2],
}

/// Bytes of an address as the C side stores it (IPv4 in the first 4).
#[must_use]
pub fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(a) => out[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => out = a.octets(),
    }
    out
}

impl TraceTuple {
    /// A tuple from host-order ports.
    #[must_use]
    pub fn new(proto: u8, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Self {
        Self {
            saddr: addr_bytes(src),
            daddr: addr_bytes(dst),
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto,
            family: if src.is_ipv4() { 4 } else { 6 },
            pad: [0; 2],
        }
    }

    fn addr(&self, bytes: [u8; 16]) -> Option<IpAddr> {
        match self.family {
            4 => Some(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))),
            6 => Some(IpAddr::V6(Ipv6Addr::from(bytes))),
            _ => None,
        }
    }

    #[must_use]
    pub fn src(&self) -> Option<IpAddr> {
        self.addr(self.saddr)
    }

    #[must_use]
    pub fn dst(&self) -> Option<IpAddr> {
        self.addr(self.daddr)
    }
}

/// `struct natfix_trace_rule`: zero fields and masks are wildcards.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceRule {
    pub saddr: [u8; 16],
    pub smask: [u8; 16],
    pub daddr: [u8; 16],
    pub dmask: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub pad: [u8; 2],
}

/// `struct natfix_trace_filter`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceFilter {
    pub rules: [TraceRule; MAX_RULES],
    pub nr_rules: u32,
    pub pad: u32,
}

/// `struct natfix_trace_event`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceEvent {
    pub ts_ns: u64,
    pub skb: u64,
    pub location: u64,
    pub kind: u32,
    pub reason: u32,
    pub netns: u32,
    pub ifindex: u32,
    pub len: u32,
    pub mark: u32,
    pub nf_trace: u8,
    pub pad: [u8; 7],
    pub dev: [u8; 16],
    pub tuple: TraceTuple,
}

impl TraceEvent {
    /// Decodes a ring buffer record; None when it is too short.
    #[must_use]
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < size_of::<Self>() {
            return None;
        }
        // SAFETY: length checked; every bit pattern is a valid TraceEvent
        // (plain integers and byte arrays); read_unaligned copes with any alignment.
        Some(unsafe { b.as_ptr().cast::<Self>().read_unaligned() })
    }

    /// The device name (NUL-terminated in the record).
    #[must_use]
    pub fn dev_name(&self) -> String {
        let end = self.dev.iter().position(|&c| c == 0).unwrap_or(self.dev.len());
        String::from_utf8_lossy(&self.dev[..end]).into_owned()
    }
}

// SAFETY: #[repr(C)] plain integers and byte arrays, padding explicit.
unsafe impl aya::Pod for TraceTuple {}
unsafe impl aya::Pod for TraceFilter {}
unsafe impl aya::Pod for TraceEvent {}

const _: () = {
    assert!(size_of::<TraceTuple>() == 40);
    assert!(size_of::<TraceRule>() == 72);
    assert!(size_of::<TraceFilter>() == 72 * MAX_RULES + 8);
    assert!(size_of::<TraceEvent>() == 112);
};
