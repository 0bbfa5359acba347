//! The record each attachment leaves in bpffs (`pins::PinDir::write_meta`):
//! what `status` shows and what `detach` needs to undo it. Its JSON is a
//! stable format, read by every later natfix: fields are only ever added
//! (with `#[serde(default)]`), and the enums serialise to the words earlier
//! versions wrote.

use std::{
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::{
    config::{Cidr, CsumBackend, CsumMode, Filtering, ResolvedFlowSource},
    sys::netns::{self, Netns},
};

/// One natfix attachment: a (namespace, interface) and what natfix put there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachmentMeta {
    pub natfix_version: String,
    /// The namespace as the user named it (`self` when none was given).
    pub netns: String,
    pub netns_path: String,
    pub netns_inode: u64,
    /// The namespace's cookie (`netns::current_cookie`); None from older
    /// records or kernels < 5.14. Pins are keyed by inode, which a later
    /// namespace can reuse: the cookie tells them apart.
    #[serde(default)]
    pub netns_cookie: Option<u64>,
    pub iface: String,
    pub ifindex: u32,
    /// The foreground `natfix attach` that owns it; None when pinned.
    pub pid: Option<u32>,
    pub pinned: bool,
    pub created_unix: u64,
    pub programs: Vec<ProgramMeta>,
    pub guard: Option<GuardMeta>,
    pub overlay: Option<OverlayMeta>,
    /// natfix added the clsact qdisc (kernels without tcx) and must remove it.
    pub created_clsact: bool,
    /// Tells this attachment from earlier and later ones on the same
    /// interface (random, set at attach); empty in records of natfix < 0.2.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// Sampled events per CPU per second (`--events-rate`); None in records of natfix < 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_per_sec: Option<u32>,
    /// Made and kept by `natfix agent`; None for `natfix attach`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<Managed>,
}

/// What the agent that keeps an attachment asked for, to tell on reload
/// what changed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Managed {
    /// The agent's config file.
    pub config: String,
    /// What only a reload of the programs changes (hook, flow source, ...).
    pub structure: String,
    /// What `natfix set` changes in place (ranges, exemptions, ...).
    pub settings: String,
}

/// natfix's eBPF programs, by the C function names records carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Program {
    #[serde(rename = "natfix_guard_xdp")]
    GuardXdp,
    #[serde(rename = "natfix_guard_tc")]
    GuardTc,
    #[serde(rename = "natfix_flow_egress")]
    FlowEgress,
    #[serde(rename = "natfix_overlay_tc")]
    OverlayTc,
}

impl Program {
    /// The C function name, as aya looks the program up in its object.
    #[must_use]
    pub const fn c_name(self) -> &'static str {
        use natfix_ebpf::programs as p;
        match self {
            Self::GuardXdp => p::GUARD_XDP,
            Self::GuardTc => p::GUARD_TC,
            Self::FlowEgress => p::FLOW_EGRESS,
            Self::OverlayTc => p::OVERLAY_TC,
        }
    }

    /// Which object the program is loaded from.
    #[must_use]
    pub const fn is_overlay(self) -> bool {
        matches!(self, Self::OverlayTc)
    }
}

impl std::fmt::Display for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.c_name())
    }
}

/// Where a program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hook {
    Xdp,
    TcIngress,
    TcEgress,
}

impl Hook {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Xdp => "xdp",
            Self::TcIngress => "tc-ingress",
            Self::TcEgress => "tc-egress",
        }
    }
}

/// How a program is attached to its hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachMode {
    /// Native (driver) XDP.
    Native,
    /// Generic (skb) XDP.
    Generic,
    /// tcx `bpf_link` (Linux >= 6.6).
    Tcx,
    /// A `cls_bpf` filter on the clsact qdisc (Linux < 6.6).
    Clsact,
}

impl AttachMode {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
            Self::Tcx => "tcx",
            Self::Clsact => "clsact",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProgramMeta {
    pub name: Program,
    pub hook: Hook,
    pub mode: AttachMode,
    pub prog_id: u32,
    /// The `bpf_link` that attaches it (XDP and tcx); None for clsact filters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_id: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuardMeta {
    /// As the user writes them: `20000-30000`, `5000`.
    pub ranges: Vec<String>,
    pub flow_source: ResolvedFlowSource,
    pub flow_source_reason: String,
    pub filtering: Filtering,
    pub dry_run: bool,
    pub allow_ports: Vec<u16>,
    pub allow_src: Vec<Cidr>,
    /// Conntrack entries of unsolicited UDP this attachment deleted (`reap`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reaped: u64,
    /// Published ports inside the ranges, exempt while they are published.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub published: Vec<u16>,
    /// `--no-allow-published`: published ports are guarded like the rest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_allow_published: bool,
}

#[expect(clippy::trivially_copy_pass_by_ref, reason = "serde's skip_serializing_if passes a reference")]
fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OverlayMeta {
    pub vxlan_ports: Vec<u16>,
    /// The ports were discovered (`--vxlan-port auto`): the agent follows them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vxlan_auto: bool,
    pub csum: CsumMode,
    pub backend: CsumBackend,
    pub reqid: Option<u32>,
    /// What natfix changed on the host, undone on detach.
    pub changes: OverlayChanges,
}

/// What natfix changed on the host for one overlay attachment.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct OverlayChanges {
    /// Modules natfix loaded (to unload on detach).
    pub loaded_modules: Vec<String>,
    /// natfix switched GRO on for the interface (to switch off on detach).
    pub enabled_gro: bool,
    /// The nftables table natfix created (`ip` family), if any.
    pub nft_table: Option<String>,
}

impl AttachmentMeta {
    /// Whether the record was written in the namespace whose cookie is
    /// `current` (the caller's). Only two known, different cookies say no:
    /// the recorded namespace is gone and its inode went to this one.
    #[must_use]
    pub fn written_in(&self, current: Option<u64>) -> bool {
        !matches!((self.netns_cookie, current), (Some(a), Some(b)) if a != b)
    }

    /// The namespace this record was written in, entered through any file
    /// that still names it: the recorded path, the owner's, then any other
    /// (`Netns::find_by_inode`). Fails when it is gone, even if a later
    /// namespace got its inode.
    pub fn find_netns(&self) -> Result<Netns> {
        let hints: Vec<PathBuf> =
            std::iter::once(self.netns_path.clone().into()).chain(self.pid.map(|pid| format!("/proc/{pid}/ns/net").into())).collect();
        let ns = Netns::find_by_inode(&self.netns, self.netns_inode, &hints)?;
        if self.netns_cookie.is_some() && !self.written_in(ns.run(|| Ok(netns::current_cookie()))?) {
            bail!("namespace `{}` is gone: inode {} now names another", self.netns, self.netns_inode);
        }
        Ok(ns)
    }

    /// Still owned by someone: pinned, or its foreground process is alive.
    #[must_use]
    pub fn is_live(&self) -> bool {
        self.pinned || self.pid.is_some_and(process_alive)
    }

    /// The program of `hook`, if the attachment has one there.
    #[must_use]
    pub fn program_at(&self, hook: Hook) -> Option<&ProgramMeta> {
        self.programs.iter().find(|p| p.hook == hook)
    }

    #[must_use]
    pub fn has_program(&self, program: Program) -> bool {
        self.programs.iter().any(|p| p.name == program)
    }

    /// `--netns NS` as the user would repeat it; empty for natfix's own.
    #[must_use]
    pub fn netns_flag(&self) -> String {
        if self.netns == "self" { String::new() } else { format!(" --netns {}", self.netns) }
    }
}

/// Whether process `pid` exists.
#[must_use]
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    // Signal 0 checks existence; EPERM still means it exists.
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// A new attachment id: 64 random bits in hex.
#[must_use]
pub fn new_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS's randomness per instance.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    format!("{:016x}", h.finish())
}

#[must_use]
pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
