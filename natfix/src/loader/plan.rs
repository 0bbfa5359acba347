//! From an operator's spec to what the loader does on this kernel: the flow
//! source decided, the programs' `const volatile` configuration built, and
//! the record each part will leave.

use std::time::Duration;

use anyhow::{Result, bail};
use tracing::info;

use crate::{
    abi::{self, GuardConfig, OverlayConfig, PortRange},
    config::{
        AttachSpec, Cidr, CsumBackend, CsumMode, Filtering, FlowSource, GuardHook, GuardSpec, IfaceSel, OverlaySpec,
        ResolvedFlowSource, XdpMode, port_range_text,
    },
    error::UserError,
    record::{GuardMeta, Hook, OverlayChanges, OverlayMeta, Program},
    sys::{
        features::{self, CtKfuncs},
        netns::Netns,
    },
};

/// Everything needed to load and attach the guard, validated.
#[derive(Debug, Clone)]
pub struct GuardPlan {
    pub config: GuardConfig,
    pub ranges: Vec<PortRange>,
    pub hook: GuardHook,
    pub xdp_mode: XdpMode,
    pub source: ResolvedFlowSource,
    pub source_reason: String,
    pub filtering: Filtering,
    pub flow_table_size: u32,
    pub allow_ports: Vec<u16>,
    pub allow_src: Vec<Cidr>,
    pub dry_run: bool,
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
        let mut flags = 0;
        if spec.dry_run {
            flags |= abi::GUARD_F_DRY_RUN;
        }
        if spec.filtering == Filtering::EndpointIndependent {
            flags |= abi::GUARD_F_ENDPOINT_INDEP;
        }
        if !spec.allow_ports.is_empty() {
            flags |= abi::GUARD_F_ALLOW_PORTS;
        }
        if !spec.allow_src.is_empty() {
            flags |= abi::GUARD_F_ALLOW_SRC;
        }
        Self {
            config: guard_config(&spec.ranges, flags, spec.flow_timeout()),
            ranges: spec.ranges.clone(),
            hook: spec.hook,
            xdp_mode: spec.xdp_mode(),
            source,
            source_reason,
            filtering: spec.filtering,
            flow_table_size: spec.flow_table_size(),
            allow_ports: spec.allow_ports.clone(),
            allow_src: spec.allow_src.clone(),
            dry_run: spec.dry_run,
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
            ranges: self.ranges.iter().map(port_range_text).collect(),
            flow_source: self.source,
            flow_source_reason: self.source_reason.clone(),
            filtering: self.filtering,
            dry_run: self.dry_run,
            allow_ports: self.allow_ports.clone(),
            allow_src: self.allow_src.clone(),
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

/// Builds the `const volatile` configuration of the guard.
#[must_use]
pub fn guard_config(ranges: &[PortRange], flags: u32, flow_timeout: Duration) -> GuardConfig {
    let mut cfg = GuardConfig {
        nr_ranges: u32::try_from(ranges.len().min(abi::MAX_PORT_RANGES)).unwrap_or(0),
        flags,
        flow_timeout_ns: u64::try_from(flow_timeout.as_nanos()).unwrap_or(u64::MAX),
        ..GuardConfig::default()
    };
    for (slot, r) in cfg.ranges.iter_mut().zip(ranges) {
        *slot = *r;
    }
    cfg
}

/// Everything needed to load and attach the overlay fix, validated.
#[derive(Debug, Clone)]
pub struct OverlayPlan {
    pub config: OverlayConfig,
    pub backend: CsumBackend,
    pub csum: CsumMode,
    pub ports: Vec<u16>,
    pub reqid: Option<u32>,
}

impl OverlayPlan {
    pub fn new(spec: &OverlaySpec) -> Result<Self> {
        spec.validate().map_err(UserError::Usage)?;
        let ports = spec.ports();
        let mut config = OverlayConfig {
            nr_ports: u32::try_from(ports.len()).unwrap_or(0),
            reqid: spec.reqid.unwrap_or(0),
            // A learned checksum delta is re-checked once a second (natfix_csum.h).
            delta_window_jiffies: super::object::data_plane_hz(),
            ..OverlayConfig::default()
        };
        for (slot, port) in config.vxlan_ports.iter_mut().zip(&ports) {
            *slot = *port;
        }
        if spec.csum == CsumMode::Recompute {
            config.flags |= abi::OVERLAY_F_RECOMPUTE;
        }
        if spec.reqid.is_some() {
            config.flags |= abi::OVERLAY_F_MATCH_REQID;
        }
        Ok(Self { config, backend: spec.backend, csum: spec.csum, ports, reqid: spec.reqid })
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
        OverlayMeta { vxlan_ports: self.ports.clone(), csum: self.csum, backend: self.backend, reqid: self.reqid, changes }
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
            ranges: vec![PortRange { first: 1000, last: 2000 }],
            filtering: Filtering::EndpointIndependent,
            ..GuardSpec::default()
        };
        let plan = GuardPlan::new(&spec).unwrap();
        assert_eq!(plan.source, ResolvedFlowSource::Own);
        assert!(plan.source_reason.contains("endpoint-independent"), "{}", plan.source_reason);
        assert_ne!(plan.config.flags & abi::GUARD_F_ENDPOINT_INDEP, 0);
    }
}
