//! What `gather` read, as plain data: everything `analyze` judges.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use super::parse::{NatRules, VxlanDev, XfrmState};
use crate::{conntrack::CtEntry, sys::features::CtKfuncs};

/// Everything [`analyze`] judges.
#[derive(Debug, Clone)]
pub struct Facts {
    /// `--netns` as given, repeated in the fix commands.
    pub netns_spec: Option<String>,
    pub kernel: KernelFacts,
    pub target: NsFacts,
    /// Docker's namespaces other than the target: VXLAN devices and counters only.
    pub docker: Vec<NsFacts>,
    pub drops: DropSample,
    /// natfix's own attachments in the target namespace, checked against the kernel.
    pub attachments: Result<Vec<AttachmentFacts>, String>,
}

/// One of natfix's attachments as `observe::state` found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentFacts {
    pub iface: String,
    /// `state::State` by name (`pinned`, `shadowed`, ...).
    pub state: String,
    /// Whether it still protects what it was made for.
    pub effective: bool,
    pub problems: Vec<String>,
    /// `--netns` as its record names it (`self`: none).
    pub netns: String,
    /// It has a guard (so `natfix reap` knows its ports).
    pub guard: bool,
    /// Its own flow table's occupancy (`None`: it has none); Err: why it could not be read.
    pub flow_table: Result<Option<crate::observe::flow_table::Occupancy>, String>,
}

#[derive(Debug, Clone)]
pub struct KernelFacts {
    pub release: String,
    pub btf: bool,
    pub tcx: bool,
    /// Whether XDP programs load; Err if the probe itself failed.
    pub xdp: Result<bool, String>,
    pub ct_kfuncs: CtKfuncs,
    pub esp_offload: ModuleState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleState {
    Loaded,
    /// Present on disk (or built in) but not loaded.
    Available(String),
    /// Neither; the string says where we looked.
    Missing(String),
}

/// One namespace's facts; fields that could not be read hold the reason.
#[derive(Debug, Clone)]
pub struct NsFacts {
    /// How the namespace is named in findings.
    pub label: String,
    pub vxlan: Result<Vec<VxlanDev>, String>,
    /// `UdpInCsumErrors` at the start and the end of the sample window.
    pub csum_errors: Result<(u64, u64), String>,
    pub window: Duration,
    /// The remaining fields are read for the target namespace only.
    pub xfrm: Result<Vec<XfrmState>, String>,
    pub addrs: Vec<IpAddr>,
    pub conntrack: Result<Vec<CtEntry>, String>,
    pub nat: NatRules,
    pub gro: Vec<(String, Result<bool, String>)>,
    /// Local ports with an unconnected UDP socket (host services).
    pub udp_listeners: BTreeSet<u16>,
    /// Outgoing interface per remote address of interest (`ip route get`).
    pub routes: BTreeMap<IpAddr, String>,
}

impl NsFacts {
    pub(super) fn empty(label: String) -> Self {
        let skipped = || Err("not read".to_owned());
        Self {
            label,
            vxlan: Ok(Vec::new()),
            csum_errors: skipped(),
            window: Duration::ZERO,
            xfrm: Ok(Vec::new()),
            addrs: Vec::new(),
            conntrack: Ok(Vec::new()),
            nat: NatRules::default(),
            gro: Vec::new(),
            udp_listeners: BTreeSet::new(),
            routes: BTreeMap::new(),
        }
    }
}

/// What the `skb:kfree_skb` sample found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropSample {
    NotChecked(String),
    /// Drops of IPv4/IPv6 packets by reason, most frequent first.
    Counts(Vec<(String, u64)>),
}
