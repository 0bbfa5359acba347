//! `#[repr(C)]` mirrors of `bpf-headers/natfix_abi.h`. Keep in sync: the size
//! asserts at the bottom catch layout drift at compile time.

use std::net::IpAddr;

/// Counter slots (enum `natfix_counter`). Stable: never renumber or reuse.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Counter {
    GuardOutOfScope = 0,
    GuardPassSolicited = 1,
    GuardDropUnsolicited = 2,
    GuardWouldDrop = 3,
    GuardExemptPort = 4,
    GuardExemptSrc = 5,
    GuardMalformed = 6,
    GuardFragment = 7,
    FlowLearned = 8,
    FlowRefreshed = 9,
    FlowLearnFailed = 10,
    FlowOutOfScope = 11,
    GuardDropTooDeep = 12,
    OverlayZeroed = 16,
    OverlayRecomputed = 17,
    OverlayCleartext = 18,
    OverlayNotVxlan = 19,
    OverlayMalformed = 20,
    OverlayError = 21,
    OverlayOtherSa = 22,
    OverlayRecomputedDelta = 23,
}

/// Number of slots in the counters map (`NATFIX_CNT_MAX`).
pub const COUNTER_SLOTS: u32 = 32;

impl Counter {
    pub const ALL: [Self; 21] = [
        Self::GuardOutOfScope,
        Self::GuardPassSolicited,
        Self::GuardDropUnsolicited,
        Self::GuardWouldDrop,
        Self::GuardExemptPort,
        Self::GuardExemptSrc,
        Self::GuardMalformed,
        Self::GuardFragment,
        Self::FlowLearned,
        Self::FlowRefreshed,
        Self::FlowLearnFailed,
        Self::FlowOutOfScope,
        Self::GuardDropTooDeep,
        Self::OverlayZeroed,
        Self::OverlayRecomputed,
        Self::OverlayCleartext,
        Self::OverlayNotVxlan,
        Self::OverlayMalformed,
        Self::OverlayError,
        Self::OverlayOtherSa,
        Self::OverlayRecomputedDelta,
    ];

    /// Which program family the counter belongs to.
    #[must_use]
    pub const fn family(self) -> Family {
        match self {
            Self::FlowLearned | Self::FlowRefreshed | Self::FlowLearnFailed | Self::FlowOutOfScope => Family::Flow,
            Self::OverlayZeroed
            | Self::OverlayRecomputed
            | Self::OverlayCleartext
            | Self::OverlayNotVxlan
            | Self::OverlayMalformed
            | Self::OverlayError
            | Self::OverlayOtherSa
            | Self::OverlayRecomputedDelta => Family::Overlay,
            _ => Family::Guard,
        }
    }

    /// The family's name (`guard`, `flow`, `overlay`): the `program` of
    /// `natfix stats` and of the metrics' labels.
    #[must_use]
    pub const fn program(self) -> &'static str {
        self.family().name()
    }

    /// The reason, as printed by `natfix stats` and used as a metrics label.
    #[must_use]
    pub const fn reason(self) -> &'static str {
        match self {
            Self::GuardOutOfScope | Self::FlowOutOfScope => "out_of_scope",
            Self::OverlayZeroed => "zeroed",
            Self::OverlayRecomputed => "recomputed",
            Self::OverlayCleartext => "cleartext_skipped",
            Self::OverlayNotVxlan => "not_vxlan",
            Self::OverlayMalformed | Self::GuardMalformed => "malformed",
            Self::OverlayError => "error",
            Self::OverlayOtherSa => "other_sa",
            Self::OverlayRecomputedDelta => "recomputed_incremental",
            Self::GuardPassSolicited => "passed_solicited",
            Self::GuardDropUnsolicited => "dropped_unsolicited",
            Self::GuardWouldDrop => "would_drop",
            Self::GuardExemptPort => "exempt_port",
            Self::GuardExemptSrc => "exempt_src",
            Self::GuardFragment => "fragment",
            Self::GuardDropTooDeep => "dropped_too_deep",
            Self::FlowLearned => "learned",
            Self::FlowRefreshed => "refreshed",
            Self::FlowLearnFailed => "learn_failed",
        }
    }

    #[must_use]
    pub fn from_slot(slot: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| *c as u32 == slot)
    }
}

/// The program families that count: the ingress guard, the egress flow
/// learner, and the overlay checksum fixer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Guard,
    Flow,
    Overlay,
}

impl Family {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Guard => "guard",
            Self::Flow => "flow",
            Self::Overlay => "overlay",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

/// `natfix_guard_config.flags` (fixed at load).
pub const GUARD_F_ENDPOINT_INDEP: u32 = 1 << 1;

/// The guard's `const volatile` configuration: what the verifier prunes on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardConfig {
    pub flags: u32,
    pub pad: u32,
}

/// `natfix_guard_settings.flags` (live).
pub const GUARD_S_DRY_RUN: u32 = 1 << 0;
pub const GUARD_S_ALLOW_SRC: u32 = 1 << 1;

/// The one entry of the `guard_settings` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardSettings {
    pub flags: u32,
    pub pad: u32,
    pub flow_timeout_ns: u64,
}

/// The `guard_ports` bit planes: `NATFIX_PORT_WORDS` u64 words each.
pub const PORT_WORDS: u32 = 1024;
pub const PORT_PLANE_GUARDED: u32 = 0;
pub const PORT_PLANE_EXEMPT: u32 = 1;
pub const PORT_PLANE_LEARN: u32 = 2;
pub const PORT_PLANES: u32 = 3;

pub const MAX_VXLAN_PORTS: usize = 8;
pub const OVERLAY_F_RECOMPUTE: u32 = 1 << 0;
/// Test builds only: skip the xfrm secpath gate so `BPF_PROG_TEST_RUN` reaches the rewrite.
pub const OVERLAY_F_NO_SECPATH: u32 = 1 << 2;
/// Decrypted packets may arrive `CHECKSUM_COMPLETE` (ESP hardware offload): the writer keeps skb->csum in step.
pub const OVERLAY_F_CSUM_COMPLETE: u32 = 1 << 3;

/// The overlay program's `const volatile` configuration.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverlayConfig {
    pub flags: u32,
    /// Recompute: jiffies a learned checksum delta is trusted (0 = always sum in full).
    pub delta_window_jiffies: u32,
}

/// `natfix_overlay_settings.flags` (live).
pub const OVERLAY_S_MATCH_REQID: u32 = 1 << 0;

/// The one entry of the `overlay_settings` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverlaySettings {
    pub vxlan_ports: [u16; MAX_VXLAN_PORTS],
    pub nr_ports: u32,
    pub flags: u32,
    pub reqid: u32,
    pub pad: u32,
}

/// A sampled event from the `natfix_events` ring buffer (struct `natfix_event`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub ts_ns: u64,
    pub counter: u32,
    pub ifindex: u32,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub len: u32,
    pub family: u8,
    pub pad: [u8; 7],
}

impl Event {
    /// Parses a ring-buffer record (None when it is not an event's size).
    #[must_use]
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != size_of::<Self>() {
            return None;
        }
        // SAFETY: Event is repr(C) plain integers; every bit pattern is valid;
        // read_unaligned copes with the ring buffer's alignment.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Self>()) })
    }

    fn addr(&self, words: [u32; 4]) -> IpAddr {
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        if self.family == FAMILY_V4 {
            IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
        } else {
            IpAddr::from(bytes)
        }
    }

    #[must_use]
    pub fn src(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.addr(self.saddr), u16::from_be(self.sport))
    }

    #[must_use]
    pub fn dst(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.addr(self.daddr), u16::from_be(self.dport))
    }
}

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub local_addr: [u32; 4],
    pub remote_addr: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u8,
    pub pad: [u8; 3],
}

impl FlowKey {
    /// The key of replies from `remote` to our `local`:`local_port`
    /// (`remote` None: the endpoint-independent wildcard). Byte order as the kernel's.
    #[must_use]
    pub fn new(local: IpAddr, local_port: u16, remote: Option<(IpAddr, u16)>) -> Self {
        let (local_addr, family) = addr_words(local);
        let (remote_addr, remote_port) = remote.map_or(([0; 4], 0), |(ip, port)| (addr_words(ip).0, port.to_be()));
        Self { local_addr, remote_addr, local_port: local_port.to_be(), remote_port, family, pad: [0; 3] }
    }
}

/// An address as the C side stores it: network-order bytes, IPv4 in the first word.
fn addr_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(a) => ([u32::from_ne_bytes(a.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(a) => {
            let o = a.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([word(0), word(4), word(8), word(12)], FAMILY_V6)
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub last_seen_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LpmV4 {
    pub prefixlen: u32,
    pub addr: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LpmV6 {
    pub prefixlen: u32,
    pub addr: [u32; 4],
}

// SAFETY: all are #[repr(C)] plain integers/arrays without padding holes the
// kernel could leak or reject (FlowKey's pad is explicit).
unsafe impl aya::Pod for CounterValue {}
unsafe impl aya::Pod for GuardConfig {}
unsafe impl aya::Pod for GuardSettings {}
unsafe impl aya::Pod for OverlayConfig {}
unsafe impl aya::Pod for OverlaySettings {}
unsafe impl aya::Pod for FlowKey {}
unsafe impl aya::Pod for FlowValue {}
unsafe impl aya::Pod for LpmV4 {}
unsafe impl aya::Pod for LpmV6 {}

const _: () = {
    assert!(size_of::<CounterValue>() == 16);
    assert!(size_of::<GuardConfig>() == 8);
    assert!(size_of::<GuardSettings>() == 16);
    assert!(size_of::<FlowKey>() == 40);
    assert!(size_of::<OverlayConfig>() == 8);
    assert!(size_of::<OverlaySettings>() == 32);
    assert!(size_of::<Event>() == 64);
    assert!(size_of::<FlowValue>() == 8);
    assert!(size_of::<LpmV4>() == 8);
    assert!(size_of::<LpmV6>() == 20);
};
