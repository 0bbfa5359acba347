//! Attaching: loads the planned objects, pins their maps, attaches each
//! program where the plan says, installs the overlay's host changes, and
//! writes the record. A failure at any step undoes what this attach made.

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode,
        links::FdLink,
        tc::{SchedClassifierLinkId, qdisc_add_clsact},
        xdp::XdpLinkId,
    },
};
use natfix_ebpf::maps as map_names;
use tracing::{info, warn};

use super::{
    object::{self, load_program},
    plan::{AttachPlan, GuardPlan, OverlayPlan},
    teardown,
};
use crate::{
    config::{CsumBackend, GuardHook, IfaceName, IfaceSel, ResolvedFlowSource, XdpMode},
    error::UserError,
    overlay,
    pins::{self, PinDir},
    record::{self, AttachMode, AttachmentMeta, Hook, OverlayChanges, Program, ProgramMeta},
    sys::{features, iface, netns::Netns},
};

pub(super) enum LinkRef {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
}

/// A live attachment: the loaded objects own the links; dropping them detaches.
pub struct Attachment {
    pub netns: Netns,
    pub iface: IfaceName,
    pub pin_dir: PinDir,
    pub meta: AttachmentMeta,
    pub(super) guard: Option<Ebpf>,
    pub(super) overlay: Option<Ebpf>,
    pub(super) links: Vec<(Program, LinkRef)>,
    /// Conntrack events subscribed before the own flow table was seeded; the
    /// foreground command follows them (`FlowSync::follow`).
    pub ct_events: Option<crate::conntrack::CtEventStream>,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment").field("meta", &self.meta).finish_non_exhaustive()
    }
}

/// Attaches inside the plan's namespace. On failure, everything done so
/// far is undone before the error is returned.
pub fn attach(plan: AttachPlan) -> Result<Attachment> {
    pins::require_bpffs()?;
    let netns = plan.netns.clone();
    netns.run(move || attach_here(plan))
}

/// The interface the plan names, in the calling thread's namespace.
fn resolve_iface(sel: &IfaceSel, netns: &Netns) -> Result<IfaceName> {
    match sel {
        IfaceSel::Name(name) => Ok(name.clone()),
        IfaceSel::DefaultRoute => iface::default_route()?.ok_or_else(|| {
            UserError::NotFound(format!("--iface auto: namespace `{}` has no IPv4 default route", netns.spec)).into()
        }),
    }
}

fn attach_here(mut plan: AttachPlan) -> Result<Attachment> {
    let iface = resolve_iface(&plan.iface, &plan.netns)?;
    let ifindex = iface::index(&iface, &plan.netns.spec)?;
    let pin_dir = PinDir::new(plan.netns.inode, &iface);
    let cookie = crate::sys::netns::current_cookie();
    if pin_dir.meta_path().exists() {
        match pin_dir.read_meta() {
            Ok(gone) if !gone.written_in(cookie) => teardown::forget_gone_namespace(&pin_dir, &gone)?,
            Ok(old) if old.pinned && plan.replace => {
                if let Some(o) = plan.overlay.as_mut() {
                    o.resolve_backend_as(old.has_program(Program::OverlayTc));
                }
                if let Some(g) = plan.guard.as_mut() {
                    g.resolve_hook_as(old.has_program(Program::GuardTc));
                }
                return super::upgrade::upgrade_here(&plan, iface, pin_dir, &old, ifindex);
            }
            Ok(old) if old.is_live() => bail!(UserError::Conflict(format!(
                "natfix is already attached to {iface} in namespace `{}` ({}); run `natfix detach --iface {iface}{}` first",
                plan.netns.spec,
                old.pid.map_or_else(|| "pinned".to_owned(), |p| format!("owned by pid {p}")),
                old.netns_flag(),
            ))),
            Ok(stale) => {
                info!("cleaning up after an attachment whose process is gone: {}", pin_dir.path.display());
                teardown::remove_recorded_here(&pin_dir, &stale)?;
            }
            Err(_) => pin_dir.remove()?,
        }
    }
    if let Some(o) = plan.overlay.as_mut() {
        o.resolve_backend(overlay::has_global_ipv6(iface.as_str()));
    }
    let meta = new_record(&plan, &iface, ifindex, cookie, None);
    let mut att = Attachment::load(&plan, iface, pin_dir, meta, None)?;
    let result = (|| {
        // Maps first: the own flow table is seeded through its pin before the guard attaches.
        att.pin_maps()?;
        if let Some(guard) = &plan.guard {
            att.attach_guard(guard, plan.events_per_sec)?;
        }
        if let Some(overlay) = &plan.overlay {
            att.attach_overlay(overlay)?;
        }
        att.publish(plan.pin)
    })();
    match result {
        Ok(()) => {
            att.log_attached(plan.guard.as_ref());
            Ok(att)
        }
        Err(e) => {
            att.teardown_here();
            Err(e)
        }
    }
}

/// The record of an attachment made from `plan`; an upgrade (`old`) keeps
/// the identity and host changes of the attachment it replaces.
pub(super) fn new_record(
    plan: &AttachPlan,
    iface: &IfaceName,
    ifindex: u32,
    cookie: Option<u64>,
    old: Option<&AttachmentMeta>,
) -> AttachmentMeta {
    let changes = old.and_then(|m| m.overlay.as_ref()).map(|o| o.changes.clone()).unwrap_or_default();
    AttachmentMeta {
        natfix_version: env!("CARGO_PKG_VERSION").into(),
        netns: old.map_or_else(|| plan.netns.spec.clone(), |m| m.netns.clone()),
        netns_path: old.map_or_else(|| plan.netns.path.display().to_string(), |m| m.netns_path.clone()),
        netns_inode: plan.netns.inode,
        netns_cookie: old.map_or(cookie, |m| m.netns_cookie),
        iface: iface.to_string(),
        ifindex,
        pid: if plan.pin { None } else { Some(std::process::id()) },
        pinned: plan.pin,
        created_unix: record::now_unix(),
        programs: Vec::new(),
        guard: plan.guard.as_ref().map(GuardPlan::meta),
        overlay: plan.overlay.as_ref().map(|o| o.meta(changes)),
        created_clsact: old.is_some_and(|m| m.created_clsact),
    }
}

impl Attachment {
    /// Loads the plan's objects (reusing `reuse`'s pinned maps); nothing attached yet.
    pub(super) fn load(plan: &AttachPlan, iface: IfaceName, pin_dir: PinDir, meta: AttachmentMeta, reuse: Option<&PinDir>) -> Result<Self> {
        let guard = plan.guard.as_ref().map(|g| object::load_guard_object(g, plan.events_per_sec, reuse)).transpose()?;
        // The nftables backend alone needs no eBPF object.
        let overlay = plan
            .overlay
            .as_ref()
            .filter(|o| o.backend.uses_tc())
            .map(|o| object::load_overlay_object_for(o, iface.as_str(), plan.events_per_sec, reuse))
            .transpose()?;
        Ok(Self { netns: plan.netns.clone(), iface, pin_dir, meta, guard, overlay, links: Vec::new(), ct_events: None })
    }

    fn log_attached(&self, guard: Option<&GuardPlan>) {
        // Programs, and the overlay fix's nftables rule (alone for IPv4 by default: no program).
        let mut parts: Vec<String> =
            self.meta.programs.iter().map(|p| format!("{} ({} {})", p.name, p.hook.name(), p.mode.name())).collect();
        parts.extend(
            self.meta.overlay.as_ref().and_then(|o| o.changes.nft_table.as_ref()).map(|t| format!("nftables table ip {t} (prerouting)")),
        );
        info!(iface = %self.iface, netns = %self.netns.spec, "attached: {}", parts.join(", "));
        if let Some(g) = guard {
            info!("flow source {}: {}", g.source.name(), g.source_reason);
        }
    }

    fn ensure_clsact(&mut self) -> Result<()> {
        if features::has_tcx() || self.meta.created_clsact {
            return Ok(());
        }
        match qdisc_add_clsact(self.iface.as_str()) {
            Ok(()) => {
                self.meta.created_clsact = true;
                Ok(())
            }
            Err(e) if matches!(&e, aya::programs::tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST)) => Ok(()),
            Err(e) => Err(e).context("cannot add the clsact qdisc"),
        }
    }

    pub(super) fn object(&mut self, program: Program) -> Result<&mut Ebpf> {
        if program.is_overlay() { self.overlay.as_mut() } else { self.guard.as_mut() }.context("object not loaded")
    }

    fn attach_tc(&mut self, program: Program, hook: Hook) -> Result<()> {
        self.ensure_clsact()?;
        let iface = self.iface.clone();
        let attach_type = if hook == Hook::TcEgress { TcAttachType::Egress } else { TcAttachType::Ingress };
        let prog = load_program::<SchedClassifier>(self.object(program)?, program.c_name())?;
        let id = prog
            .attach(iface.as_str(), attach_type)
            .with_context(|| format!("cannot attach {program} to tc {attach_type:?} of {iface}"))?;
        let prog_id = prog.info()?.id();
        self.links.push((program, LinkRef::Tc(id)));
        let mode = if features::has_tcx() { AttachMode::Tcx } else { AttachMode::Clsact };
        self.meta.programs.push(ProgramMeta { name: program, hook, mode, prog_id });
        Ok(())
    }

    /// Attaches the XDP guard in `mode` (native or generic).
    fn attach_xdp(&mut self, mode: AttachMode) -> Result<()> {
        let iface = self.iface.clone();
        let flags = if mode == AttachMode::Native { AyaXdpMode::Driver } else { AyaXdpMode::Skb };
        let prog = load_program::<Xdp>(self.object(Program::GuardXdp)?, Program::GuardXdp.c_name())?;
        let id = prog
            .attach(iface.as_str(), flags)
            .with_context(|| format!("cannot attach {} to {} XDP of {iface}", Program::GuardXdp, mode.name()))?;
        let prog_id = prog.info()?.id();
        self.links.push((Program::GuardXdp, LinkRef::Xdp(id)));
        self.meta.programs.push(ProgramMeta { name: Program::GuardXdp, hook: Hook::Xdp, mode, prog_id });
        Ok(())
    }

    /// The guard's ingress program where `plan` says. `--xdp-mode auto`
    /// falls back to tc ingress, not generic XDP: generic XDP sets the
    /// device's `xdp_prog`, which turns GRO off on it (`netif_elide_gro`:
    /// every TCP segment climbs the stack alone, and the ESP GRO path the
    /// overlay fix's tc program needs is gone), and copies non-linear skbs;
    /// tc ingress also runs before conntrack, and coexists with another
    /// owner's XDP program.
    fn attach_guard_ingress(&mut self, plan: &GuardPlan, events_per_sec: u32) -> Result<()> {
        let iface = self.iface.clone();
        let why_not_native = "the driver has no native XDP, the MTU is too large for it, or another program holds the device's XDP";
        match (plan.hook, plan.xdp_mode) {
            (GuardHook::Tc, _) => self.attach_tc(Program::GuardTc, Hook::TcIngress),
            (GuardHook::Xdp, XdpMode::Native) => self.attach_xdp(AttachMode::Native).map_err(|e| {
                e.context(format!(
                    "native XDP is not available on {iface} ({why_not_native}); use --xdp-mode auto (tc ingress where native XDP is missing) or --guard-hook tc"
                ))
            }),
            (GuardHook::Xdp, XdpMode::Generic) => {
                warn!(
                    "generic XDP on {iface} turns GRO off on it (every TCP segment climbs the stack alone, and the overlay fix's tc program loses the ESP GRO path it needs); --guard-hook tc costs less"
                );
                self.attach_xdp(AttachMode::Generic)
                    .map_err(|e| e.context(format!("another XDP program may hold {iface} (`ip link show {iface}`)")))
            }
            (GuardHook::Xdp, XdpMode::Auto) => match self.attach_xdp(AttachMode::Native) {
                Ok(()) => Ok(()),
                Err(e) => {
                    warn!(
                        "{e:#} ({why_not_native}): the guard runs at tc ingress instead, also before conntrack (generic XDP would turn GRO off on {iface}; --xdp-mode generic insists on it)"
                    );
                    if plan.source == ResolvedFlowSource::Conntrack {
                        // The conntrack build is one object per hook; the maps pinned so far carry over.
                        let tc_plan = GuardPlan { hook: GuardHook::Tc, ..plan.clone() };
                        self.guard = Some(object::load_guard_object(&tc_plan, events_per_sec, Some(&self.pin_dir))?);
                    }
                    self.attach_tc(Program::GuardTc, Hook::TcIngress)
                }
            },
        }
    }

    fn attach_guard(&mut self, plan: &GuardPlan, events_per_sec: u32) -> Result<()> {
        // Learn before guarding, so replies to flows leaving meanwhile pass.
        if plan.source == ResolvedFlowSource::Own {
            self.attach_tc(Program::FlowEgress, Hook::TcEgress)?;
            // Flows that exist already (or leave by another interface) enter the
            // table before the guard sees a single reply.
            let mut sync =
                crate::flowsync::FlowSync::open(&self.pin_dir.map(pins::GUARD_FLOWS), plan.ranges.clone(), plan.endpoint_independent())?;
            self.ct_events = Some(sync.subscribe_and_seed(&self.netns)?);
        }
        self.attach_guard_ingress(plan, events_per_sec)
    }

    /// The tc program (with the ESP GRO path it needs) and/or the nft table.
    fn attach_overlay(&mut self, plan: &OverlayPlan) -> Result<()> {
        let mut changes = OverlayChanges::default();
        let result = self.install_overlay(plan, &mut changes);
        // Recorded even on failure, so the rollback undoes what was done.
        if let Some(meta) = self.meta.overlay.as_mut() {
            meta.changes = changes;
        }
        result
    }

    fn install_overlay(&mut self, plan: &OverlayPlan, changes: &mut OverlayChanges) -> Result<()> {
        if plan.backend.uses_tc() {
            let gro_path =
                overlay::esp::load_offload_modules(changes).and_then(|()| overlay::esp::enable_gro(self.iface.as_str(), changes));
            match (gro_path, plan.backend) {
                (Ok(()), _) => {}
                (Err(e), CsumBackend::Tc) => return Err(e.context(UserError::Unsupported("the tc backend needs the ESP GRO path".into()))),
                (Err(e), _) => warn!("{e:#}; the nftables rule still covers IPv4, IPv6 stays unrepaired"),
            }
            object::install_overlay_writer(self.object(Program::OverlayTc)?)?;
            self.attach_tc(Program::OverlayTc, Hook::TcIngress)?;
        }
        if plan.backend.uses_nft() {
            overlay::nft::install(self.meta.ifindex, self.iface.as_str(), &plan.ports, plan.reqid, changes)?;
        }
        Ok(())
    }

    /// Pins the maps, so that other natfix commands (and an upgrade) find them.
    fn pin_maps(&mut self) -> Result<()> {
        self.pin_dir.create()?;
        let maps = [
            (self.guard.as_ref(), map_names::COUNTERS, pins::GUARD_COUNTERS),
            (self.guard.as_ref(), map_names::GUARD_FLOWS, pins::GUARD_FLOWS),
            (self.guard.as_ref(), map_names::GUARD_FLOW_PORTS, pins::GUARD_FLOW_PORTS),
            (self.guard.as_ref(), map_names::EVENTS, pins::GUARD_EVENTS),
            (self.overlay.as_ref(), map_names::COUNTERS, pins::OVERLAY_COUNTERS),
            (self.overlay.as_ref(), map_names::EVENTS, pins::OVERLAY_EVENTS),
            // A pin keeps the tail-call array filled after natfix exits (the
            // kernel clears a program array when no fd or pin holds it).
            (self.overlay.as_ref(), map_names::OVERLAY_WRITER, pins::OVERLAY_WRITER),
        ];
        for (object, name, file) in maps {
            if let Some(map) = object.and_then(|o| o.map(name)) {
                let path = self.pin_dir.map(file);
                map.pin(&path).with_context(|| format!("cannot pin {}", path.display()))?;
            }
        }
        Ok(())
    }

    /// Pins the links (with --pin) and writes the record.
    fn publish(&mut self, pin_links: bool) -> Result<()> {
        if pin_links {
            for (program, link) in std::mem::take(&mut self.links) {
                // None: a clsact filter (kernel < 6.6) stays attached by itself.
                if let Some(fd_link) = self.take_fd_link(program, link)? {
                    let path = self.pin_dir.link(program);
                    fd_link.pin(&path).with_context(|| format!("cannot pin {}", path.display()))?;
                }
            }
        }
        self.pin_dir.write_meta(&self.meta)
    }

    /// The link as a pinnable fd; None for a clsact filter, which outlives
    /// natfix without a pin (detach removes it by name).
    fn take_fd_link(&mut self, program: Program, link: LinkRef) -> Result<Option<FdLink>> {
        let prog = self.object(program)?.program_mut(program.c_name()).context("program vanished")?;
        match link {
            LinkRef::Xdp(id) => {
                let prog: &mut Xdp = prog.try_into()?;
                let fd_link: Result<FdLink, _> = prog.take_link(id)?.try_into();
                fd_link.map(Some).map_err(|e| {
                    anyhow::Error::from(UserError::Unsupported(format!(
                        "--pin needs XDP bpf_links (Linux >= 5.9); this kernel attached {program} without one ({e})"
                    )))
                })
            }
            LinkRef::Tc(id) => {
                let prog: &mut SchedClassifier = prog.try_into()?;
                let link = prog.take_link(id)?;
                if features::has_tcx() {
                    let fd_link: FdLink = link.try_into().context("tcx link")?;
                    return Ok(Some(fd_link));
                }
                // Dropping a netlink link would delete the filter: keep it in the kernel.
                std::mem::forget(link);
                Ok(None)
            }
        }
    }

    /// Detaches, unpins, and removes what natfix created. Runs in the namespace.
    pub fn detach(self) -> Result<()> {
        let netns = self.netns.clone();
        netns.run(move || {
            self.teardown_here();
            Ok(())
        })
    }

    pub(super) fn teardown_here(self) {
        let Self { guard, overlay, pin_dir, meta, .. } = self;
        // Closing the link fds makes the kernel detach tcx and XDP links.
        drop(guard);
        drop(overlay);
        if let Err(e) = pin_dir.remove() {
            warn!("cleanup of {} incomplete: {e:#}", pin_dir.path.display());
        }
        teardown::undo_host_changes(&meta);
    }
}
