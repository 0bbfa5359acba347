//! Attaching: under the namespace's lock, settles what an earlier
//! attachment on the interface left, refuses hooks another natfix holds,
//! then builds the attachment in a staging directory (its record kept as a
//! journal of every change made so far), and publishes it by one rename.
//! A failure at any step undoes what this attach made, and only that.

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode,
        links::FdLink,
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, qdisc_add_clsact},
    },
};
use tracing::{info, warn};

use super::{
    object::{self, load_program},
    plan::{AttachPlan, GuardPlan, OverlayPlan},
    teardown,
};
use crate::{
    config::{CsumBackend, GuardHook, IfaceName, IfaceSel, ResolvedFlowSource, XdpMode},
    error::UserError,
    observe::state,
    overlay,
    pins::{self, ChangeLock, PinDir},
    record::{self, AttachMode, AttachmentMeta, Hook, OverlayChanges, Program, ProgramMeta},
    sys::{features, hooks, iface, netns::Netns},
};

/// The `cls_bpf` priority of natfix's filters on clsact (kernels < 6.6): 1 runs first.
const CLSACT_PRIORITY: u16 = 1;

/// A link this process owns: closing (dropping) it detaches the program,
/// unless the link was pinned.
pub(super) enum OwnedLink {
    /// XDP and tcx `bpf_link`s.
    Fd(FdLink),
    /// A `cls_bpf` filter on clsact (kernels < 6.6).
    Clsact(SchedClassifierLink),
}

/// A live attachment: dropping it detaches what it owns.
pub struct Attachment {
    pub netns: Netns,
    pub iface: IfaceName,
    pub pin_dir: PinDir,
    pub meta: AttachmentMeta,
    pub(super) guard: Option<Ebpf>,
    pub(super) overlay: Option<Ebpf>,
    pub(super) links: Vec<(Program, OwnedLink)>,
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
    if plan.pin {
        // Pins in a private bpffs would vanish with this process.
        pins::require_bpffs()?;
    } else {
        pins::require_bpffs_or_mount_private()?;
    }
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
    let lock = ChangeLock::acquire()?;
    teardown::sweep_staging_here(plan.netns.inode);
    let final_dir = PinDir::new(plan.netns.inode, &iface);
    let cookie = crate::sys::netns::current_cookie();
    if let Some(o) = plan.overlay.as_mut() {
        o.resolve_ports(&plan.netns);
    }
    if let Some(g) = plan.guard.as_mut().filter(|g| g.allow_published) {
        let mut published = crate::published::Published::kernel_here();
        if let Some(docker) = &plan.docker_published {
            published.merge(docker);
        }
        g.live.published = published.inside(&g.live.ranges);
        if !g.live.published.is_empty() {
            info!("published UDP ports inside the guarded ranges take new flows: {}", published.describe(&g.live.published));
        }
    }
    if let Some(old) = settle_existing(&plan, &iface, &final_dir, cookie)? {
        if let Some(o) = plan.overlay.as_mut() {
            o.resolve_backend_as(old.has_program(Program::OverlayTc));
        }
        if let Some(g) = plan.guard.as_mut() {
            g.resolve_hook_as(old.has_program(Program::GuardTc));
        }
        let mut att = super::upgrade::upgrade_here(&plan, iface, &final_dir, &old, ifindex)?;
        att.reap(plan.guard.as_ref());
        return Ok(att);
    }
    refuse_foreign_programs(&iface, ifindex)?;
    if let Some(o) = plan.overlay.as_mut() {
        o.resolve_backend(overlay::has_global_ipv6(iface.as_str()));
    }
    let staging = PinDir::staging(plan.netns.inode, &iface);
    let meta = new_record(&plan, &iface, ifindex, cookie, None);
    let mut att = Attachment::load(&plan, iface, staging, meta, None)?;
    match att.build(&plan, &final_dir) {
        Ok(()) => {
            att.reap(plan.guard.as_ref());
            drop(lock);
            att.log_attached(plan.guard.as_ref());
            Ok(att)
        }
        Err(e) => {
            att.teardown_here();
            Err(e)
        }
    }
}

/// Decides what an existing record on the interface means for this attach:
/// `Some(old)` to upgrade it in place (`--replace`); None to attach anew
/// (after releasing what the record held, where nothing of it works any
/// more); a conflict while it still protects the interface.
fn settle_existing(plan: &AttachPlan, iface: &IfaceName, dir: &PinDir, cookie: Option<u64>) -> Result<Option<AttachmentMeta>> {
    if !dir.path.exists() {
        return Ok(None);
    }
    let old = match dir.read_meta() {
        Ok(old) => old,
        Err(e) => {
            warn!("{e:#}: removing what the unreadable record's directory holds");
            teardown::remove_unrecorded_here(dir);
            return Ok(None);
        }
    };
    if !old.written_in(cookie) {
        teardown::forget_gone_namespace(dir, &old)?;
        return Ok(None);
    }
    let kernel = state::check_here(&old);
    let effective = kernel.state.is_effective();
    if effective && old.pinned && plan.replace {
        return Ok(Some(old));
    }
    if effective && old.is_live() {
        bail!(UserError::Conflict(format!(
            "natfix is already attached to {iface} in namespace `{}` ({}); run `natfix detach --iface {iface}{}` first",
            plan.netns.spec,
            old.pid.map_or_else(|| "pinned".to_owned(), |p| format!("owned by pid {p}")),
            old.netns_flag(),
        )));
    }
    let why = if old.is_live() { kernel.problems.join("; ") } else { "its process is gone".to_owned() };
    info!("releasing the earlier attachment on {iface} ({why})");
    teardown::remove_recorded_here(dir, &old)?;
    Ok(None)
}

/// natfix programs on the interface that no record here has belong to
/// another natfix (one with its own bpffs, e.g. a container started without
/// `-v /sys/fs/bpf:/sys/fs/bpf`): attaching beside them would run two guards.
fn refuse_foreign_programs(iface: &IfaceName, ifindex: u32) -> Result<()> {
    let view = hooks::view(ifindex)?;
    let foreign: Vec<String> = view.natfix_progs().map(|p| format!("{} (prog id {})", p.name, p.prog_id)).collect();
    if !foreign.is_empty() {
        bail!(UserError::Conflict(format!(
            "natfix programs are already on {iface}'s hooks but no record in this bpffs has them: {}; another natfix (with its own bpffs?) holds {iface}: detach it there",
            foreign.join(", ")
        )));
    }
    Ok(())
}

/// Pins `maps` of `object` in `dir`; with `missing_only`, those not pinned
/// yet (an upgrade keeps the others).
pub(super) fn pin_object_maps(object: Option<&Ebpf>, maps: &[(&str, &str)], dir: &PinDir, missing_only: bool) -> Result<()> {
    let Some(object) = object else { return Ok(()) };
    for (name, file) in maps {
        let path = dir.map(file);
        if missing_only && path.exists() {
            continue;
        }
        if let Some(map) = object.map(name) {
            map.pin(&path).with_context(|| format!("cannot pin {}", path.display()))?;
        }
    }
    Ok(())
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
        id: old.map_or_else(record::new_id, |m| m.id.clone()),
        events_per_sec: Some(plan.events_per_sec),
        managed: plan.managed.clone(),
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

    /// Everything an attach does after loading, in the staging directory,
    /// ending with the rename to `final_dir`.
    fn build(&mut self, plan: &AttachPlan, final_dir: &PinDir) -> Result<()> {
        // Maps first: the own flow table is seeded through its pin before the guard attaches.
        self.pin_maps()?;
        self.journal()?;
        if let Some(guard) = &plan.guard {
            self.attach_guard(guard, plan.events_per_sec)?;
        }
        if let Some(overlay) = &plan.overlay {
            self.attach_overlay(overlay)?;
        }
        self.publish(plan.pin, final_dir)
    }

    /// With the guard in place (so no new ones appear), deletes the conntrack
    /// entries unsolicited UDP made before: they hold ports until they
    /// expire. A failure is logged; the attachment stands.
    /// Under dry-run only counts them (and says so).
    pub(super) fn reap(&mut self, guard: Option<&GuardPlan>) {
        let Some(g) = guard.filter(|g| g.reap) else { return };
        let scope = crate::reap::ReapScope {
            iface: self.iface.to_string(),
            ranges: g.live.ranges.clone(),
            exempt: g.live.allow_ports.clone(),
            trusted: g.live.allow_src.clone(),
        };
        match crate::reap::reap_here(&[scope], g.live.dry_run) {
            Ok(reaped) if reaped.is_empty() => {}
            Ok(reaped) if g.live.dry_run => {
                info!("dry-run: {} conntrack entries of unsolicited UDP hold guarded ports; `natfix reap` would delete them", reaped.len());
            }
            Ok(reaped) => {
                info!("deleted {} conntrack entries that unsolicited UDP created before natfix (they held ports)", reaped.len());
                if let Some(m) = self.meta.guard.as_mut() {
                    m.reaped += reaped.len() as u64;
                }
                if let Err(e) = self.journal() {
                    warn!("{e:#}");
                }
            }
            Err(e) => warn!("could not reap conntrack entries of unsolicited UDP: {e:#}"),
        }
    }

    /// Writes the record as it stands (in the staging directory: the journal
    /// a sweep undoes after a crash).
    fn journal(&self) -> Result<()> {
        self.pin_dir.write_meta(&self.meta)
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
                self.journal()
            }
            Err(e) if matches!(&e, aya::programs::tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST)) => Ok(()),
            Err(e) => Err(e).context("cannot add the clsact qdisc"),
        }
    }

    pub(super) fn object(&mut self, program: Program) -> Result<&mut Ebpf> {
        if program.is_overlay() { self.overlay.as_mut() } else { self.guard.as_mut() }.context("object not loaded")
    }

    /// Takes ownership of a new link, records it, and journals.
    fn keep_link(&mut self, program: Program, hook: Hook, mode: AttachMode, prog_id: u32, link: OwnedLink) -> Result<()> {
        let link_id = match &link {
            OwnedLink::Fd(fd) => Some(fd.info().context("cannot read the new link's info")?.id()),
            OwnedLink::Clsact(_) => None,
        };
        self.links.push((program, link));
        self.meta.programs.push(ProgramMeta { name: program, hook, mode, prog_id, link_id });
        self.journal()
    }

    /// Attaches a tc program first in its hook's chain (tcx) or at natfix's
    /// `cls_bpf` priority (clsact): programs added earlier cannot decide a
    /// packet before natfix sees it.
    fn attach_tc(&mut self, program: Program, hook: Hook) -> Result<()> {
        self.ensure_clsact()?;
        let iface = self.iface.clone();
        let attach_type = if hook == Hook::TcEgress { TcAttachType::Egress } else { TcAttachType::Ingress };
        let tcx = features::has_tcx();
        let options = if tcx {
            TcAttachOptions::TcxOrder(LinkOrder::first())
        } else {
            TcAttachOptions::Netlink(NlOptions { priority: CLSACT_PRIORITY, ..NlOptions::default() })
        };
        let prog = load_program::<SchedClassifier>(self.object(program)?, program.c_name())?;
        let id = prog
            .attach_with_options(iface.as_str(), attach_type, options)
            .with_context(|| format!("cannot attach {program} to tc {attach_type:?} of {iface}"))?;
        let prog_id = prog.info()?.id();
        let link = prog.take_link(id)?;
        let (mode, link) = if tcx {
            (AttachMode::Tcx, OwnedLink::Fd(link.try_into().context("tcx link")?))
        } else {
            (AttachMode::Clsact, OwnedLink::Clsact(link))
        };
        self.keep_link(program, hook, mode, prog_id, link)
    }

    /// Attaches the XDP guard in `mode` (native or generic); another XDP
    /// program on the device is a conflict (exit 6).
    fn attach_xdp(&mut self, mode: AttachMode) -> Result<()> {
        let iface = self.iface.clone();
        let flags = if mode == AttachMode::Native { AyaXdpMode::Driver } else { AyaXdpMode::Skb };
        let prog = load_program::<Xdp>(self.object(Program::GuardXdp)?, Program::GuardXdp.c_name())?;
        let id = match prog.attach(iface.as_str(), flags) {
            Ok(id) => id,
            Err(ProgramError::SyscallError(e)) if matches!(e.io_error.raw_os_error(), Some(libc::EBUSY | libc::EEXIST)) => {
                bail!(UserError::Conflict(format!(
                    "another XDP program holds {iface} (`ip link show {iface}`); natfix's guard cannot attach there: detach it, or use --guard-hook tc"
                )))
            }
            Err(e) => return Err(e).with_context(|| format!("cannot attach {} to {} XDP of {iface}", Program::GuardXdp, mode.name())),
        };
        let prog_id = prog.info()?.id();
        let link: Result<FdLink, _> = prog.take_link(id)?.try_into();
        let link = link.map_err(|e| {
            anyhow::Error::from(UserError::Unsupported(format!("natfix needs XDP bpf_links (Linux >= 5.9); this kernel attached XDP without one ({e})")))
        })?;
        self.keep_link(Program::GuardXdp, Hook::Xdp, mode, prog_id, OwnedLink::Fd(link))
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
                if crate::error::exit_code(&e) == 6 {
                    return e;
                }
                e.context(format!(
                    "native XDP is not available on {iface} ({why_not_native}); use --xdp-mode auto (tc ingress where native XDP is missing) or --guard-hook tc"
                ))
            }),
            (GuardHook::Xdp, XdpMode::Generic) => {
                warn!(
                    "generic XDP on {iface} turns GRO off on it (every TCP segment climbs the stack alone, and the overlay fix's tc program loses the ESP GRO path it needs); --guard-hook tc costs less"
                );
                self.attach_xdp(AttachMode::Generic)
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
            let mut sync = crate::flowsync::FlowSync::open(&self.pin_dir, plan.endpoint_independent())?;
            self.ct_events = Some(sync.subscribe_and_seed(&self.netns)?);
        }
        self.attach_guard_ingress(plan, events_per_sec)
    }

    /// The tc program (with the ESP GRO path it needs) and/or the nft table.
    /// Each host change is journaled before it is made, so a crash leaves a
    /// record that undoes it.
    fn attach_overlay(&mut self, plan: &OverlayPlan) -> Result<()> {
        if plan.backend.uses_tc() {
            let gro_path = self.prepare_gro_path();
            match (gro_path, plan.backend) {
                (Ok(()), _) => {}
                (Err(e), CsumBackend::Tc) => return Err(e.context(UserError::Unsupported("the tc backend needs the ESP GRO path".into()))),
                (Err(e), _) => warn!("{e:#}; the nftables rule still covers IPv4, IPv6 stays unrepaired"),
            }
            object::install_overlay_writer(self.object(Program::OverlayTc)?)?;
            self.attach_tc(Program::OverlayTc, Hook::TcIngress)?;
        }
        if plan.backend.uses_nft() {
            let table = overlay::nft::table_name(self.meta.ifindex);
            self.change_overlay(|c| c.nft_table = Some(table))?;
            let mut changes = self.overlay_changes();
            overlay::nft::install(self.meta.ifindex, self.iface.as_str(), &plan.ports, plan.reqid, &mut changes)?;
        }
        Ok(())
    }

    /// `esp4_offload`/`esp6_offload` loaded and GRO on: the path on which
    /// decrypted packets reach tc.
    fn prepare_gro_path(&mut self) -> Result<()> {
        let missing = overlay::esp::missing_offload_modules();
        self.change_overlay(|c| c.loaded_modules.clone_from(&missing))?;
        let loaded = overlay::esp::load_offload_modules(&missing);
        self.change_overlay(|c| c.loaded_modules = loaded.as_ref().map_or_else(|(l, _)| l.clone(), Clone::clone))?;
        loaded.map_err(|(_, e)| e)?;
        if !overlay::esp::gro_on(self.iface.as_str())? {
            self.change_overlay(|c| c.enabled_gro = true)?;
            overlay::esp::enable_gro(self.iface.as_str())?;
        }
        Ok(())
    }

    fn overlay_changes(&self) -> OverlayChanges {
        self.meta.overlay.as_ref().map(|o| o.changes.clone()).unwrap_or_default()
    }

    /// Records (and journals) a host change before it is made.
    fn change_overlay(&mut self, change: impl FnOnce(&mut OverlayChanges)) -> Result<()> {
        if let Some(o) = self.meta.overlay.as_mut() {
            change(&mut o.changes);
        }
        self.journal()
    }

    /// Pins the maps, so that other natfix commands (and an upgrade) find them.
    fn pin_maps(&mut self) -> Result<()> {
        self.pin_dir.create()?;
        pin_object_maps(self.guard.as_ref(), &object::GUARD_PINNED_MAPS, &self.pin_dir, false)?;
        pin_object_maps(self.overlay.as_ref(), &object::OVERLAY_PINNED_MAPS, &self.pin_dir, false)
    }

    /// Pins the links (with --pin), writes the final record, and moves the
    /// staging directory into place.
    fn publish(&mut self, pin_links: bool, final_dir: &PinDir) -> Result<()> {
        if pin_links {
            for (program, link) in std::mem::take(&mut self.links) {
                match link {
                    OwnedLink::Fd(fd_link) => {
                        let path = self.pin_dir.link(program);
                        fd_link.pin(&path).with_context(|| format!("cannot pin {}", path.display()))?;
                    }
                    // Dropping a netlink link would delete the filter: a clsact
                    // filter outlives natfix by itself (detach removes it by name).
                    OwnedLink::Clsact(link) => std::mem::forget(link),
                }
            }
        }
        self.journal()?;
        self.pin_dir.publish(final_dir)?;
        self.pin_dir = final_dir.clone();
        Ok(())
    }

    /// Detaches, unpins, and removes what this attachment made; runs in its
    /// namespace, under its lock. Pins published since by another attachment
    /// on the interface (another id) are left alone.
    pub fn detach(self) -> Result<()> {
        let netns = self.netns.clone();
        netns.run(move || {
            let _lock = ChangeLock::acquire()?;
            match self.pin_dir.read_meta() {
                Ok(now) if now.id != self.meta.id => {
                    warn!("{} now holds another attachment's record: leaving it", self.pin_dir.path.display());
                    let Self { guard, overlay, links, .. } = self;
                    drop((links, guard, overlay));
                }
                _ => self.teardown_here(),
            }
            Ok(())
        })
    }

    pub(super) fn teardown_here(self) {
        let Self { guard, overlay, pin_dir, meta, links, .. } = self;
        // Closing the link fds makes the kernel detach tcx and XDP links.
        drop(links);
        drop(guard);
        drop(overlay);
        if let Err(e) = pin_dir.remove() {
            warn!("cleanup of {} incomplete: {e:#}", pin_dir.path.display());
        }
        teardown::undo_host_changes(&meta);
    }
}
