//! natfix's data plane as Rust sees it: the compiled eBPF objects (C, built by
//! `build.rs`) and `#[repr(C)]` mirrors of the ABI in `bpf-headers/natfix_abi.h`.

pub mod abi;
mod trace_abi;

/// Object bytes, aligned for aya's ELF parser.
pub mod objects {
    /// Guard with natfix's own flow table: `natfix_guard_xdp`, `natfix_guard_tc`
    /// (ingress) and `natfix_flow_egress`, sharing maps.
    pub static GUARD_OWN: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard.bpf.o"));
    /// Guard using the conntrack lookup kfunc, XDP flavour (`natfix_guard_xdp`).
    pub static GUARD_XDP_CT: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard_xdp_ct.bpf.o"));
    /// Guard using the conntrack lookup kfunc, tc flavour (`natfix_guard_tc`).
    pub static GUARD_TC_CT: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard_tc_ct.bpf.o"));
    /// Checksum repair of decrypted VXLAN: `natfix_overlay_tc` (tc ingress).
    pub static OVERLAY: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay.bpf.o"));
}

/// The test rig's programs (feature `rig`): never part of the product, and
/// named `rig_*` so that nothing takes them for natfix's.
#[cfg(feature = "rig")]
pub mod rig {
    /// Empty `rig_empty_xdp`/`rig_empty_tc` (benchmark baselines), the
    /// flood generator `rig_gen_xdp`, and the counting sinks
    /// `rig_drop_xdp`/`rig_count_pass_xdp`.
    pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rig.bpf.o"));
    pub const EMPTY_XDP: &str = "rig_empty_xdp";
    pub const EMPTY_TC: &str = "rig_empty_tc";
    pub const GEN_XDP: &str = "rig_gen_xdp";
    pub const DROP_XDP: &str = "rig_drop_xdp";
    pub const COUNT_PASS_XDP: &str = "rig_count_pass_xdp";
    pub const ACCEPT_TC: &str = "rig_accept_tc";
    /// Empty programs on natfix trace's tracepoints (program, tracepoint).
    pub const EMPTY_TP: [(&str, &str); 3] =
        [("rig_empty_tp_drop", "kfree_skb"), ("rig_empty_tp_xmit", "net_dev_start_xmit"), ("rig_empty_tp_deliver", "sk_data_ready")];
}

/// Program names (C function names) as aya looks them up.
pub mod programs {
    pub const GUARD_XDP: &str = "natfix_guard_xdp";
    pub const GUARD_TC: &str = "natfix_guard_tc";
    pub const FLOW_EGRESS: &str = "natfix_flow_egress";
    pub const OVERLAY_TC: &str = "natfix_overlay_tc";
    pub const OVERLAY_WRITE: &str = "natfix_overlay_write";
    pub const OVERLAY_WRITE_V4_ZERO: &str = "natfix_overlay_write_v4z";
}

/// Map and global names as they appear in the objects.
pub mod maps {
    pub const COUNTERS: &str = "natfix_counters";
    pub const GUARD_FLOWS: &str = "guard_flows";
    pub const GUARD_FLOW_PORTS: &str = "guard_flow_ports";
    pub const GUARD_PORTS: &str = "guard_ports";
    pub const GUARD_SETTINGS: &str = "guard_settings";
    pub const GUARD_ALLOW_SRC4: &str = "guard_allow_src4";
    pub const GUARD_ALLOW_SRC6: &str = "guard_allow_src6";
    pub const GUARD_CONFIG: &str = "natfix_guard_cfg";
    pub const OVERLAY_CONFIG: &str = "natfix_overlay_cfg";
    pub const EVENTS: &str = "natfix_events";
    pub const EVENT_RATE: &str = "natfix_event_rate";
    pub const OVERLAY_SETTINGS: &str = "overlay_settings";
    pub const HZ: &str = "natfix_hz";
    pub const OVERLAY_WRITER: &str = "overlay_writer";
}

/// `natfix trace`'s tracepoint programs (`trace_tp.bpf.c`), their maps, and
/// the mirror of `natfix_trace_abi.h`.
pub mod trace {
    pub use crate::trace_abi::*;

    pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/trace.bpf.o"));
    /// (program, tracepoint) pairs; the last one is missing before Linux 6.3.
    pub const PROGRAMS: [(&str, &str); 3] = [
        ("natfix_trace_drop", "kfree_skb"),
        ("natfix_trace_xmit", "net_dev_start_xmit"),
        ("natfix_trace_deliver", "sk_data_ready"),
    ];
    pub const FILTER_MAP: &str = "natfix_trace_filter";
    pub const FLOWS_MAP: &str = "natfix_trace_flows";
    pub const EVENTS_MAP: &str = "natfix_trace_events";
}
