//! What a trace collected, source by source, each item numbered in the order
//! it arrived (`seq`), and what the namespaces looked like: the input of
//! path assembly (`path`), kept apart from the sockets and programs so that
//! assembly is a pure function, tested on recorded observations.

use std::collections::HashMap;

use natfix_ebpf::trace::TraceEvent;

use super::{nftrace::TraceMsg, ruleset::RuleSet};
use crate::{conntrack::{CtEntry, CtEvent}, observe::events::EventRecord};

/// An nftables trace message from traced namespace `ns`.
#[derive(Debug, Clone)]
pub struct NftObs {
    pub seq: u64,
    pub ns: usize,
    /// `CLOCK_MONOTONIC` when natfix read it (after the kernel sent it), ns.
    pub t_ns: u64,
    pub msg: TraceMsg,
}

/// A tracepoint event (it names its namespace by inode).
#[derive(Debug, Clone)]
pub struct BpfObs {
    pub seq: u64,
    pub ev: TraceEvent,
}

/// A conntrack event of traced namespace `ns`.
#[derive(Debug, Clone)]
pub struct CtObs {
    pub seq: u64,
    pub ns: usize,
    pub ev: CtEvent,
    /// For a NEW entry whose masquerade changed the source port: the entry
    /// that held the wanted port (from a dump right after the event).
    pub port_holder: Option<CtEntry>,
}

/// A sampled event of natfix's own attachment `att` (index into the trace's attachments).
#[derive(Debug, Clone)]
pub struct OwnObs {
    pub seq: u64,
    pub att: usize,
    pub rec: EventRecord,
}

#[derive(Debug, Clone, Default)]
pub struct Observations {
    pub nft: Vec<NftObs>,
    pub bpf: Vec<BpfObs>,
    pub ct: Vec<CtObs>,
    pub own: Vec<OwnObs>,
    seq: u64,
}

impl Observations {
    /// The next arrival number.
    pub fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.nft.is_empty() && self.bpf.is_empty() && self.ct.is_empty() && self.own.is_empty()
    }
}

/// A traced namespace as assembly sees it.
#[derive(Debug, Clone, Default)]
pub struct NsView {
    /// How steps name it: the `--netns` spelling, or `host` for natfix's own.
    pub label: String,
    pub inode: u64,
    pub rules: RuleSet,
    pub ifnames: HashMap<u32, String>,
}

impl NsView {
    #[must_use]
    pub fn ifname(&self, index: u32) -> String {
        self.ifnames.get(&index).cloned().unwrap_or_else(|| format!("if{index}"))
    }
}

/// natfix's attachment as assembly sees it.
#[derive(Debug, Clone)]
pub struct OwnView {
    pub ns: usize,
    pub iface: String,
    /// `xdp`/`tc` where the guard runs, if it has one.
    pub guard_hook: Option<&'static str>,
    pub guard: Option<crate::record::GuardMeta>,
}
