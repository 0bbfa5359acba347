//! From an operator's spec to what the loader does on this kernel: the flow
//! source decided, the programs' `const volatile` configuration built, and
//! the record each part will leave.

use anyhow::{Result, bail};
use tracing::info;

use crate::{
    abi::{self, GuardConfig, OverlayConfig},
    config::{
        AttachSpec, CsumBackend, CsumMode, Filtering, FlowSource, GuardHook, GuardSpec, IfaceSel, OverlaySpec,
        ResolvedFlowSource, XdpMode, port_range_text,
    },
    error::UserError,
    loader::settings::GuardLive,
    record::{GuardMeta, Hook, OverlayChanges, OverlayMeta, Program},
    sys::{
        features::{self, CtKfuncs},
        netns::Netns,
    },
};

/// Everything needed to load and attach the guard, validated.
#[derive(Debug, Clone)]
pub struct GuardPlan {
    /// Fixed at load (`const volatile`).
    pub config: GuardConfig,
    /// Written into the maps, changeable live (`natfix set`).
    pub live: GuardLive,
    pub hook: GuardHook,
    pub xdp_mode: XdpMode,
    pub source: ResolvedFlowSource,
    pub source_reason: String,
    pub filtering: Filtering,
    pub flow_table_size: u32,
    /// Delete the conntrack entries unsolicited UDP made before attach.
    pub reap: bool,
    /// Exempt published ports (`live.published`, filled at attach).
    pub allow_published: bool,
}

impl GuardPlan {
    /// Validates `spec` and decides the flow source on this kernel.
    pub fn new(spec: &GuardSpec) -> Result<Self> {
        spec.validate().map_err(UserError::Usage)?;
        let (source, reason) = resolve_flow_source(spec)?;
        Ok(Self::with_source(spec, source, reason))
    }

    /// The plan for an already decided flow source (tests choose it).
    #[must_use]
    pub fn with_source(spec: &GuardSpec, source: ResolvedFlowSource, source_reason: String) -> Self {
        let flags = if spec.filtering == Filtering::EndpointIndependent { abi::GUARD_F_ENDPOINT_INDEP } else { 0 };
        Self {
            config: GuardConfig { flags, pad: 0 },
            live: GuardLive {
                ranges: spec.ranges.clone(),
                allow_ports: spec.allow_ports.clone(),
                published: Vec::new(),
                allow_src: spec.allow_src.clone(),
                dry_run: spec.dry_run,
                flow_timeout_ns: u64::try_from(spec.flow_timeout().as_nanos()).unwrap_or(u64::MAX),
            },
            hook: spec.hook,
            xdp_mode: spec.xdp_mode(),
            source,
            source_reason,
            filtering: spec.filtering,
            flow_table_size: spec.flow_table_size(),
            reap: !spec.no_reap,
            allow_published: !spec.no_allow_published,
        }
    }

    #[must_use]
    pub fn endpoint_independent(&self) -> bool {
        self.filtering == Filtering::EndpointIndependent
    }

    /// What the record says of the guard.
    #[must_use]
    pub fn meta(&self) -> GuardMeta {
        GuardMeta {
            ranges: self.live.ranges.iter().map(port_range_text).collect(),
            flow_source: self.source,
            flow_source_reason: self.source_reason.clone(),
            filtering: self.filtering,
            dry_run: self.live.dry_run,
            allow_ports: self.live.allow_ports.clone(),
            allow_src: self.live.allow_src.clone(),
            reaped: 0,
            published: self.live.published.clone(),
            no_allow_published: !self.allow_published,
        }
    }

    /// The program the guard runs at ingress.
    #[must_use]
    pub const fn ingress_program(&self) -> Program {
        match self.hook {
            GuardHook::Xdp => Program::GuardXdp,
            GuardHook::Tc => Program::GuardTc,
        }
    }

    /// `--replace` keeps the hook the attachment has: under `--xdp-mode
    /// auto` the XDP guard may have fallen back to tc ingress.
    pub fn resolve_hook_as(&mut self, has_tc_guard: bool) {
        if self.hook == GuardHook::Xdp && self.xdp_mode == XdpMode::Auto && has_tc_guard {
            self.hook = GuardHook::Tc;
        }
    }
}

/// Decides `--flow-source auto` (and checks an explicit conntrack).
fn resolve_flow_source(spec: &GuardSpec) -> Result<(ResolvedFlowSource, String)> {
    let ct = features::ct_kfuncs();
    Ok(match spec.flow_source {
        FlowSource::Own => (ResolvedFlowSource::Own, "requested with --flow-source own".to_owned()),
        FlowSource::Conntrack => match features::ct_kfuncs_unavailable_reason(&ct) {
            None => (ResolvedFlowSource::Conntrack, "requested with --flow-source conntrack".to_owned()),
            Some(why) => bail!(UserError::Unsupported(format!(
                "--flow-source conntrack is not possible on this kernel: {why}; use --flow-source own"
            ))),
        },
        FlowSource::Auto if spec.filtering == Filtering::EndpointIndependent => (
            ResolvedFlowSource::Own,
            "auto: --filtering endpoint-independent needs the own flow table (conntrack matches exact tuples)".to_owned(),
        ),
        FlowSource::Auto => match ct {
            CtKfuncs::Vmlinux => {
                (ResolvedFlowSource::Conntrack, "auto: the kernel's vmlinux BTF has bpf_xdp_ct_lookup".to_owned())
            }
            other => (
                ResolvedFlowSource::Own,
                format!("auto: {}", features::ct_kfuncs_unavailable_reason(&other).unwrap_or_default()),
            ),
        },
    })
}

/// Everything needed to load and attach the overlay fix, validated.
#[derive(Debug, Clone)]
pub struct OverlayPlan {
    pub config: OverlayConfig,
    pub backend: CsumBackend,
    pub csum: CsumMode,
    /// Empty until `resolve_ports` when `vxlan_auto`.
    pub ports: Vec<u16>,
    pub vxlan_auto: bool,
    pub reqid: Option<u32>,
}

impl OverlayPlan {
    pub fn new(spec: &OverlaySpec) -> Result<Self> {
        spec.validate().map_err(UserError::Usage)?;
        let config = OverlayConfig {
            flags: if spec.csum == CsumMode::Recompute { abi::OVERLAY_F_RECOMPUTE } else { 0 },
            // A learned checksum delta is re-checked once a second (natfix_csum.h).
            delta_window_jiffies: super::object::data_plane_hz(),
        };
        Ok(Self {
            config,
            backend: spec.backend,
            csum: spec.csum,
            ports: spec.vxlan_ports.clone(),
            vxlan_auto: spec.vxlan_auto(),
            reqid: spec.reqid,
        })
    }

    /// `--vxlan-port auto`: the ports of the VXLAN devices in `netns`, the
    /// host's and Docker's namespaces, else 4789.
    pub fn resolve_ports(&mut self, netns: &crate::sys::netns::Netns) {
        if self.vxlan_auto {
            let found = crate::sys::vxlan::discover(netns);
            self.ports = crate::sys::vxlan::auto_ports(&found);
            if found.seen.is_empty() {
                info!("--vxlan-port auto: no VXLAN device yet, using 4789 (Docker's default)");
            } else {
                info!("--vxlan-port auto: {:?} (from {})", self.ports, found.seen.join(", "));
            }
        }
    }

    /// Turns `auto` into the mechanism it stands for on this interface;
    /// `has_global_ipv6` is read in the attachment's namespace.
    pub fn resolve_backend(&mut self, has_global_ipv6: bool) {
        if self.backend == CsumBackend::Auto {
            let (backend, why) = CsumBackend::auto_choice(self.csum == CsumMode::Recompute, has_global_ipv6);
            info!("--csum-backend auto: {} ({why})", backend.name());
            self.backend = backend;
        }
    }

    /// An upgrade keeps the mechanisms the attachment has (`--replace` swaps
    /// programs; it cannot add or remove one atomically).
    pub fn resolve_backend_as(&mut self, old_has_tc: bool) {
        if self.backend == CsumBackend::Auto {
            self.backend = if old_has_tc { CsumBackend::Both } else { CsumBackend::Nft };
        }
    }

    /// What the record says of the overlay fix, with the host `changes` made for it.
    #[must_use]
    pub fn meta(&self, changes: OverlayChanges) -> OverlayMeta {
        OverlayMeta {
            vxlan_ports: self.ports.clone(),
            vxlan_auto: self.vxlan_auto,
            csum: self.csum,
            backend: self.backend,
            reqid: self.reqid,
            changes,
        }
    }
}

/// One attachment, planned: where, what, and how it is kept.
#[derive(Debug, Clone)]
pub struct AttachPlan {
    pub netns: Netns,
    pub iface: IfaceSel,
    pub guard: Option<GuardPlan>,
    pub overlay: Option<OverlayPlan>,
    /// Pin links, maps and record, and leave them attached.
    pub pin: bool,
    /// With `pin`: upgrade an existing pinned attachment in place.
    pub replace: bool,
    /// Sampled events per CPU per second (0: none).
    pub events_per_sec: u32,
    /// What Docker publishes (read by the caller; the namespace's own DNAT
    /// rules are read at attach, inside it).
    pub docker_published: Option<crate::published::Published>,
    /// Set by the agent: recorded so that it knows its own attachments.
    pub managed: Option<crate::record::Managed>,
}

impl AttachPlan {
    /// Plans `spec` in `netns`; nothing is loaded yet.
    pub fn new(spec: &AttachSpec, netns: Netns, pin: bool, replace: bool) -> Result<Self> {
        spec.validate().map_err(UserError::Usage)?;
        Ok(Self {
            netns,
            iface: spec.iface.clone(),
            guard: spec.guard.as_ref().map(GuardPlan::new).transpose()?,
            overlay: spec.overlay.as_ref().map(OverlayPlan::new).transpose()?,
            pin,
            replace,
            events_per_sec: spec.events_per_sec,
            docker_published: None,
            managed: None,
        })
    }

    /// The programs this plan puts where (after `auto` was resolved).
    #[must_use]
    pub fn programs(&self) -> Vec<(Program, Hook)> {
        let mut out = Vec::new();
        if let Some(g) = &self.guard {
            if g.source == ResolvedFlowSource::Own {
                out.push((Program::FlowEgress, Hook::TcEgress));
            }
            out.push(match g.hook {
                GuardHook::Xdp => (Program::GuardXdp, Hook::Xdp),
                GuardHook::Tc => (Program::GuardTc, Hook::TcIngress),
            });
        }
        if self.overlay.as_ref().is_some_and(|o| o.backend.uses_tc()) {
            out.push((Program::OverlayTc, Hook::TcIngress));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_keeps_the_mechanisms_attached() {
        let spec = OverlaySpec::default();
        let mut plan = OverlayPlan::new(&spec).unwrap();
        plan.resolve_backend_as(true);
        assert!(plan.backend.uses_tc() && plan.backend.uses_nft());
        assert_eq!(plan.meta(OverlayChanges::default()).backend, CsumBackend::Both);
        let mut plan = OverlayPlan::new(&spec).unwrap();
        plan.resolve_backend_as(false);
        assert!(!plan.backend.uses_tc() && plan.backend.uses_nft());
        let mut plan = OverlayPlan::new(&OverlaySpec { backend: CsumBackend::Tc, ..spec }).unwrap();
        plan.resolve_backend(true);
        assert!(plan.backend.uses_tc() && !plan.backend.uses_nft(), "an explicit backend is kept");
    }

    #[test]
    fn auto_flow_source_with_endpoint_independent_filtering_is_own() {
        let spec = GuardSpec {
            ranges: vec![crate::config::PortRange { first: 1000, last: 2000 }],
            filtering: Filtering::EndpointIndependent,
            ..GuardSpec::default()
        };
        let plan = GuardPlan::new(&spec).unwrap();
        assert_eq!(plan.source, ResolvedFlowSource::Own);
        assert!(plan.source_reason.contains("endpoint-independent"), "{}", plan.source_reason);
        assert_ne!(plan.config.flags & abi::GUARD_F_ENDPOINT_INDEP, 0);
    }
}
