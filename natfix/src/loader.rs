//! Loads natfix's eBPF objects, configures them, attaches them inside a
//! namespace, and undoes all of it (on detach, or when attach fails midway).

use std::{ffi::CString, net::IpAddr, time::Duration};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, LpmTrie, MapData, ProgramArray, lpm_trie::Key},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLinkId, qdisc_add_clsact},
        xdp::XdpLinkId,
    },
};
use tracing::{info, warn};

use crate::{
    abi::{self, GuardConfig, LpmV4, LpmV6, OverlayConfig, PortRange},
    cli::{CsumBackend, CsumMode, Filtering, FlowSource, GuardArgs, GuardHook, OverlayArgs, XdpModeArg},
    error::UserError,
    features::{self, CtKfuncs},
    kfunc,
    netns::Netns,
    overlay::{self, OverlayChanges},
    pins::{self, AttachmentMeta, GuardMeta, OverlayMeta, PinDir, ProgramMeta},
};
use natfix_ebpf::{maps as map_names, objects, programs as prog_names};

/// The flow source after `auto` was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedFlowSource {
    Own,
    Conntrack,
}

impl ResolvedFlowSource {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Own => "own",
            Self::Conntrack => "conntrack",
        }
    }
}

/// Everything needed to load and attach the guard, validated.
#[derive(Debug, Clone)]
pub struct GuardPlan {
    pub config: GuardConfig,
    pub hook: GuardHook,
    pub xdp_mode: XdpModeArg,
    pub source: ResolvedFlowSource,
    pub source_reason: String,
    pub flow_table_size: u32,
    pub allow_ports: Vec<u16>,
    pub allow_src: Vec<crate::cli::Cidr>,
    pub meta: GuardMeta,
}

impl GuardPlan {
    /// `--replace` keeps the hook the attachment has: under `--xdp-mode
    /// auto` the XDP guard may have fallen back to tc ingress.
    pub fn resolve_hook_as(&mut self, has_tc_guard: bool) {
        if self.hook == GuardHook::Xdp && self.xdp_mode == XdpModeArg::Auto && has_tc_guard {
            self.hook = GuardHook::Tc;
        }
    }
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

/// Validates the guard options and decides the flow source.
pub fn plan_guard(args: &GuardArgs) -> Result<GuardPlan> {
    crate::cli::validate_guard(args).map_err(UserError::Usage)?;
    let ct = features::ct_kfuncs();
    let (source, source_reason) = match args.flow_source {
        FlowSource::Own => (ResolvedFlowSource::Own, "requested with --flow-source own".to_owned()),
        FlowSource::Conntrack => match features::ct_kfuncs_unavailable_reason(&ct) {
            None => (ResolvedFlowSource::Conntrack, "requested with --flow-source conntrack".to_owned()),
            Some(why) => bail!(UserError::Unsupported(format!(
                "--flow-source conntrack is not possible on this kernel: {why}; use --flow-source own"
            ))),
        },
        FlowSource::Auto => match ct {
            CtKfuncs::Vmlinux => (
                ResolvedFlowSource::Conntrack,
                "auto: the kernel's vmlinux BTF has bpf_xdp_ct_lookup".to_owned(),
            ),
            other => (
                ResolvedFlowSource::Own,
                format!(
                    "auto: {}",
                    features::ct_kfuncs_unavailable_reason(&other).unwrap_or_default()
                ),
            ),
        },
    };
    let mut flags = 0;
    if args.dry_run {
        flags |= abi::GUARD_F_DRY_RUN;
    }
    if args.filtering == Filtering::EndpointIndependent {
        if source == ResolvedFlowSource::Conntrack {
            bail!(UserError::Usage(
                "--filtering endpoint-independent needs --flow-source own (conntrack matches exact tuples)".into()
            ));
        }
        flags |= abi::GUARD_F_ENDPOINT_INDEP;
    }
    if !args.allow_ports.is_empty() {
        flags |= abi::GUARD_F_ALLOW_PORTS;
    }
    if !args.allow_src.is_empty() {
        flags |= abi::GUARD_F_ALLOW_SRC;
    }
    let meta = GuardMeta {
        ranges: args
            .ranges
            .iter()
            .map(|r| if r.first == r.last { r.first.to_string() } else { format!("{}-{}", r.first, r.last) })
            .collect(),
        flow_source: source.name().into(),
        flow_source_reason: source_reason.clone(),
        filtering: match args.filtering {
            Filtering::PortRestricted => "port-restricted".into(),
            Filtering::EndpointIndependent => "endpoint-independent".into(),
        },
        dry_run: args.dry_run,
        allow_ports: args.allow_ports.clone(),
        allow_src: args.allow_src.iter().map(ToString::to_string).collect(),
    };
    Ok(GuardPlan {
        config: guard_config(&args.ranges, flags, args.flow_timeout),
        hook: args.guard_hook,
        xdp_mode: args.xdp_mode,
        source,
        source_reason,
        flow_table_size: args.flow_table_size,
        allow_ports: args.allow_ports.clone(),
        allow_src: args.allow_src.clone(),
        meta,
    })
}

/// Loads the guard object for `source`/`hook` with its configuration and
/// exemption maps filled; programs are not loaded yet.
/// Default budget of sampled events per CPU per second (`--events-rate`).
pub const DEFAULT_EVENTS_PER_SEC: u32 = 20;

pub fn load_guard_object(plan: &GuardPlan, events_per_sec: u32) -> Result<Ebpf> {
    load_guard_object_reusing(plan, events_per_sec, None)
}

/// Marks the local port of every flow in the own table (see flowsync::mark_port).
pub fn mark_ports_of_table(ebpf: &mut Ebpf) -> Result<()> {
    let flows: BpfHashMap<&MapData, abi::FlowKey, abi::FlowValue> =
        BpfHashMap::try_from(ebpf.map(map_names::GUARD_FLOWS).context("flow table missing")?)?;
    let keys: Vec<abi::FlowKey> = flows.keys().filter_map(Result::ok).collect();
    let mut ports: aya::maps::Array<&mut MapData, u8> =
        aya::maps::Array::try_from(ebpf.map_mut(map_names::GUARD_FLOW_PORTS).context("port map missing")?)?;
    for key in &keys {
        crate::flowsync::mark_port(&mut ports, key)?;
    }
    Ok(())
}

/// HZ for the data plane's jiffies windows; 0 (those features off) if unknown.
fn data_plane_hz() -> u32 {
    crate::features::kernel_hz().unwrap_or_else(|| {
        tracing::warn!("cannot tell the kernel's HZ: the guard's flow cache is off");
        0
    })
}

/// Maps of an existing attachment that an upgrade keeps (state survives).
fn reuse_pinned<'a>(loader: &mut EbpfLoader<'a>, dir: &PinDir, maps: &[(&'a str, &str)]) {
    for (name, file) in maps {
        let path = dir.map(file);
        if path.exists() {
            loader.map_pin_path(name, path);
        }
    }
}

fn load_guard_object_reusing(plan: &GuardPlan, events_per_sec: u32, reuse: Option<&PinDir>) -> Result<Ebpf> {
    let bytes = match (plan.source, plan.hook) {
        (ResolvedFlowSource::Own, _) => objects::GUARD_OWN.to_vec(),
        (ResolvedFlowSource::Conntrack, GuardHook::Xdp) => kfunc::relocate_kfuncs(objects::GUARD_XDP_CT)?,
        (ResolvedFlowSource::Conntrack, GuardHook::Tc) => kfunc::relocate_kfuncs(objects::GUARD_TC_CT)?,
    };
    let hz = data_plane_hz();
    let mut loader = EbpfLoader::new();
    loader.override_global(map_names::GUARD_CONFIG, &plan.config, true);
    loader.override_global(map_names::EVENTS_PER_SEC, &events_per_sec, true);
    loader.override_global(map_names::HZ, &hz, true);
    if plan.source == ResolvedFlowSource::Own {
        loader.map_max_entries(map_names::GUARD_FLOWS, plan.flow_table_size);
    }
    if let Some(dir) = reuse {
        reuse_pinned(
            &mut loader,
            dir,
            &[
                (map_names::COUNTERS, pins::GUARD_COUNTERS),
                (map_names::GUARD_FLOWS, pins::GUARD_FLOWS),
                (map_names::GUARD_FLOW_PORTS, pins::GUARD_FLOW_PORTS),
                (map_names::EVENTS, pins::GUARD_EVENTS),
            ],
        );
    }
    let mut ebpf = loader.load(&bytes).context("cannot load the guard's eBPF object")?;
    if plan.source == ResolvedFlowSource::Own && reuse.is_some() {
        // A kept table may predate its port map (older natfix): mark its ports.
        mark_ports_of_table(&mut ebpf)?;
    }

    if !plan.allow_ports.is_empty() {
        let mut ports: BpfHashMap<&mut MapData, u16, u8> =
            BpfHashMap::try_from(ebpf.map_mut(map_names::GUARD_ALLOW_PORTS).context("allow-ports map missing")?)?;
        for port in &plan.allow_ports {
            ports.insert(port.to_be(), 1, 0)?;
        }
    }
    for cidr in &plan.allow_src {
        match cidr.addr {
            IpAddr::V4(a) => {
                let mut trie: LpmTrie<&mut MapData, LpmV4Key, u8> =
                    LpmTrie::try_from(ebpf.map_mut(map_names::GUARD_ALLOW_SRC4).context("allow-src4 map missing")?)?;
                trie.insert(&Key::new(u32::from(cidr.prefix_len), u32::from_ne_bytes(a.octets())), 1, 0)?;
            }
            IpAddr::V6(a) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 16], u8> =
                    LpmTrie::try_from(ebpf.map_mut(map_names::GUARD_ALLOW_SRC6).context("allow-src6 map missing")?)?;
                trie.insert(&Key::new(u32::from(cidr.prefix_len), a.octets()), 1, 0)?;
            }
        }
    }
    Ok(ebpf)
}

/// Everything needed to load and attach the overlay fix, validated.
#[derive(Debug, Clone)]
pub struct OverlayPlan {
    pub config: OverlayConfig,
    pub backend: CsumBackend,
    pub ports: Vec<u16>,
    pub meta: OverlayMeta,
}

impl OverlayPlan {
    /// Call after `resolve_backend`: `auto` is not a mechanism.
    #[must_use]
    pub fn uses_tc(&self) -> bool {
        matches!(self.backend, CsumBackend::Tc | CsumBackend::Both)
    }

    #[must_use]
    pub fn uses_nft(&self) -> bool {
        matches!(self.backend, CsumBackend::Nft | CsumBackend::Both)
    }

    /// Turns `auto` into the mechanism it stands for on this interface, and
    /// records it; `has_global_ipv6` is read in the attachment's namespace.
    pub fn resolve_backend(&mut self, has_global_ipv6: bool) {
        if self.backend != CsumBackend::Auto {
            return;
        }
        let recompute = self.config.flags & abi::OVERLAY_F_RECOMPUTE != 0;
        let (backend, why) = overlay::auto_backend(recompute, has_global_ipv6);
        info!("--csum-backend auto: {} ({why})", backend.name());
        self.set_backend(backend);
    }

    /// An upgrade keeps the mechanisms the attachment has (`--replace` swaps
    /// programs; it cannot add or remove one atomically).
    pub fn resolve_backend_as(&mut self, old_has_tc: bool) {
        if self.backend == CsumBackend::Auto {
            self.set_backend(if old_has_tc { CsumBackend::Both } else { CsumBackend::Nft });
        }
    }

    fn set_backend(&mut self, backend: CsumBackend) {
        self.backend = backend;
        self.meta.backend = backend.name().into();
    }
}

/// Validates the overlay options; None when --overlay-fix is off.
pub fn plan_overlay(args: &OverlayArgs) -> Result<Option<OverlayPlan>> {
    crate::cli::validate_overlay(args).map_err(UserError::Usage)?;
    if !args.overlay_fix {
        return Ok(None);
    }
    let ports = args.ports();
    let mut config = OverlayConfig {
        nr_ports: u32::try_from(ports.len()).unwrap_or(0),
        reqid: args.reqid.unwrap_or(0),
        // A learned checksum delta is re-checked once a second (natfix_csum.h).
        delta_window_jiffies: data_plane_hz(),
        ..OverlayConfig::default()
    };
    for (slot, port) in config.vxlan_ports.iter_mut().zip(&ports) {
        *slot = *port;
    }
    if args.csum == CsumMode::Recompute {
        config.flags |= abi::OVERLAY_F_RECOMPUTE;
    }
    if args.reqid.is_some() {
        config.flags |= abi::OVERLAY_F_MATCH_REQID;
    }
    let meta = OverlayMeta {
        vxlan_ports: ports.clone(),
        csum: match args.csum {
            CsumMode::Zero => "zero".into(),
            CsumMode::Recompute => "recompute".into(),
        },
        backend: args.csum_backend.name().into(),
        reqid: args.reqid,
        changes: OverlayChanges::default(),
    };
    Ok(Some(OverlayPlan { config, backend: args.csum_backend, ports, meta }))
}

/// Loads the overlay object for `iface` (in the calling thread's namespace):
/// the writer keeps skb->csum in step only where the NIC decrypts ESP.
fn load_overlay_object_for(config: &OverlayConfig, iface: &str, events_per_sec: u32, reuse: Option<&PinDir>) -> Result<Ebpf> {
    let mut config = *config;
    if overlay::decrypted_may_be_csum_complete(iface) {
        config.flags |= abi::OVERLAY_F_CSUM_COMPLETE;
    }
    load_overlay_object_reusing(&config, events_per_sec, reuse)
}

/// Loads the overlay object with its configuration; the program is not loaded yet.
pub fn load_overlay_object(config: &OverlayConfig, events_per_sec: u32) -> Result<Ebpf> {
    load_overlay_object_reusing(config, events_per_sec, None)
}

fn load_overlay_object_reusing(config: &OverlayConfig, events_per_sec: u32, reuse: Option<&PinDir>) -> Result<Ebpf> {
    let hz = data_plane_hz();
    let mut loader = EbpfLoader::new();
    loader.override_global(map_names::OVERLAY_CONFIG, config, true);
    loader.override_global(map_names::EVENTS_PER_SEC, &events_per_sec, true);
    loader.override_global(map_names::HZ, &hz, true);
    if let Some(dir) = reuse {
        reuse_pinned(&mut loader, dir, &[(map_names::COUNTERS, pins::OVERLAY_COUNTERS), (map_names::EVENTS, pins::OVERLAY_EVENTS)]);
    }
    loader.load(objects::OVERLAY).context("cannot load the overlay eBPF object")
}

// The LPM key types of the C side are {prefixlen, addr}; aya's Key<K> adds
// the prefix itself, so K is just the address bytes.
type LpmV4Key = u32;
const _: () = assert!(size_of::<Key<LpmV4Key>>() == size_of::<LpmV4>());
const _: () = assert!(size_of::<Key<[u8; 16]>>() == size_of::<LpmV6>());

/// Loads the overlay's writers and puts them in the tail-call array of the
/// (not yet attached) overlay program, so that its first packets are written
/// in place (`overlay_tc.bpf.c` says why separate programs). The slots are
/// the C side's `OVERLAY_WRITER_ANY` and `OVERLAY_WRITER_V4_ZERO`.
pub fn install_overlay_writer(ebpf: &mut Ebpf) -> Result<()> {
    for (slot, name) in [(0u32, prog_names::OVERLAY_WRITE), (1, prog_names::OVERLAY_WRITE_V4_ZERO)] {
        load_tc(ebpf, name)?;
        let fd = ebpf
            .program(name)
            .with_context(|| format!("overlay writer {name} missing"))?
            .fd()
            .with_context(|| format!("overlay writer {name} not loaded"))?
            .try_clone()
            .context("cannot duplicate a writer's fd")?;
        let mut writers: ProgramArray<&mut MapData> =
            ProgramArray::try_from(ebpf.map_mut(map_names::OVERLAY_WRITER).context("overlay writer array missing")?)?;
        writers.set(slot, &fd, 0).with_context(|| format!("cannot install the overlay writer {name}"))?;
    }
    Ok(())
}

/// Loads one program of the object by its C name, with the verifier's log on failure.
pub fn load_xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from object"))?
        .try_into()?;
    prog.load().map_err(verifier_context(name))?;
    Ok(prog)
}

pub fn load_tc<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from object"))?
        .try_into()?;
    prog.load().map_err(verifier_context(name))?;
    Ok(prog)
}

fn verifier_context(name: &str) -> impl FnOnce(aya::programs::ProgramError) -> anyhow::Error + '_ {
    move |e| {
        if let aya::programs::ProgramError::LoadError { io_error, verifier_log } = &e {
            tracing::debug!("verifier log for {name}:\n{verifier_log}");
            return anyhow::anyhow!(
                "the kernel rejected program {name}: {io_error} (run with --log debug for the verifier log)"
            );
        }
        anyhow::Error::from(e).context(format!("cannot load program {name}"))
    }
}

enum LinkRef {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
}

/// Which loaded object a program belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feature {
    Guard,
    Overlay,
}

/// A live attachment: the loaded objects own the links; dropping them detaches.
pub struct Attachment {
    pub netns: Netns,
    pub iface: String,
    pub pin_dir: PinDir,
    pub meta: AttachmentMeta,
    guard: Option<Ebpf>,
    overlay: Option<Ebpf>,
    links: Vec<(Feature, String, LinkRef)>,
    /// Conntrack events subscribed before the own flow table was seeded; the
    /// daemon follows them (`FlowSync::follow`).
    pub ct_events: Option<crate::conntrack::CtEventStream>,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment").field("meta", &self.meta).finish_non_exhaustive()
    }
}

/// What to attach.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    pub netns: Netns,
    pub iface: String,
    pub guard: Option<GuardPlan>,
    pub overlay: Option<OverlayPlan>,
    pub pin: bool,
    /// With `pin`: upgrade an existing pinned attachment in place.
    pub replace: bool,
    /// Sampled events per CPU per second (0: none).
    pub events_per_sec: u32,
}

/// Attaches inside the request's namespace. On failure, everything done so
/// far is undone before the error is returned.
pub fn attach(req: AttachRequest) -> Result<Attachment> {
    pins::require_bpffs()?;
    let netns = req.netns.clone();
    netns.run(move || attach_here(req))
}

fn ifindex(iface: &str, netns: &Netns) -> Result<u32> {
    let c = CString::new(iface).map_err(|_| UserError::Usage(format!("bad interface name {iface:?}")))?;
    // SAFETY: plain libc call on a valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        let names: Vec<String> = nix::net::if_::if_nameindex()
            .map(|list| list.iter().map(|i| i.name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        bail!(UserError::NotFound(format!(
            "no interface `{iface}` in namespace `{}` (it has: {})",
            netns.spec,
            names.join(", ")
        )));
    }
    Ok(idx)
}

fn attach_here(mut req: AttachRequest) -> Result<Attachment> {
    let ifindex = ifindex(&req.iface, &req.netns)?;
    let pin_dir = PinDir::new(req.netns.inode, &req.iface);
    let cookie = crate::netns::current_cookie();
    if pin_dir.meta_path().exists() {
        match pin_dir.read_meta() {
            Ok(gone) if !gone.written_in(cookie) => forget_gone_namespace(&pin_dir, &gone)?,
            Ok(old) if old.pinned && req.replace => {
                if let Some(plan) = req.overlay.as_mut() {
                    plan.resolve_backend_as(old.programs.iter().any(|p| p.name == prog_names::OVERLAY_TC));
                }
                if let Some(plan) = req.guard.as_mut() {
                    plan.resolve_hook_as(old.programs.iter().any(|p| p.name == prog_names::GUARD_TC));
                }
                return upgrade_here(req, pin_dir, old, ifindex);
            }
            Ok(old) if old.is_live() => bail!(UserError::Conflict(format!(
                "natfix is already attached to {} in namespace `{}` ({}); run `natfix detach --iface {}{}` first",
                req.iface,
                req.netns.spec,
                old.pid.map_or_else(|| "pinned".to_owned(), |p| format!("owned by pid {p}")),
                req.iface,
                if req.netns.spec == "self" { String::new() } else { format!(" --netns {}", req.netns.spec) }
            ))),
            Ok(stale) => {
                info!("cleaning up after an attachment whose process is gone: {}", pin_dir.path.display());
                remove_recorded_here(&pin_dir, &stale)?;
            }
            Err(_) => pin_dir.remove()?,
        }
    }
    if let Some(plan) = req.overlay.as_mut() {
        plan.resolve_backend(overlay::has_global_ipv6(&req.iface));
    }

    let mut att = Attachment {
        meta: AttachmentMeta {
            natfix_version: env!("CARGO_PKG_VERSION").into(),
            netns: req.netns.spec.clone(),
            netns_path: req.netns.path.display().to_string(),
            netns_inode: req.netns.inode,
            netns_cookie: cookie,
            iface: req.iface.clone(),
            ifindex,
            pid: if req.pin { None } else { Some(std::process::id()) },
            pinned: req.pin,
            created_unix: pins::now_unix(),
            programs: Vec::new(),
            guard: req.guard.as_ref().map(|g| g.meta.clone()),
            overlay: req.overlay.as_ref().map(|o| o.meta.clone()),
            created_clsact: false,
        },
        guard: req.guard.as_ref().map(|g| load_guard_object(g, req.events_per_sec)).transpose()?,
        // The nftables backend alone needs no eBPF object.
        overlay: req
            .overlay
            .as_ref()
            .filter(|o| o.uses_tc())
            .map(|o| load_overlay_object_for(&o.config, &req.iface, req.events_per_sec, None))
            .transpose()?,
        links: Vec::new(),
        ct_events: None,
        netns: req.netns.clone(),
        iface: req.iface.clone(),
        pin_dir,
    };
    let result = (|| {
        // Maps first: the own flow table is seeded through its pin before the guard attaches.
        att.pin_maps()?;
        if let Some(guard) = &req.guard {
            att.attach_guard(guard, req.events_per_sec)?;
        }
        if let Some(overlay) = &req.overlay {
            att.attach_overlay(overlay)?;
        }
        att.publish(req.pin)
    })();
    match result {
        Ok(()) => {
            // Programs, and the overlay fix's nftables rule (alone for IPv4 by default: no program).
            let mut parts: Vec<String> = att.meta.programs.iter().map(|p| format!("{} ({} {})", p.name, p.hook, p.mode)).collect();
            parts.extend(att.meta.overlay.as_ref().and_then(|o| o.changes.nft_table.as_ref()).map(|t| format!("nftables table ip {t} (prerouting)")));
            info!(iface = %att.iface, netns = %att.netns.spec, "attached: {}", parts.join(", "));
            if let Some(guard) = &req.guard {
                info!("flow source {}: {}", guard.source.name(), guard.source_reason);
            }
            Ok(att)
        }
        Err(e) => {
            att.teardown_here();
            Err(e)
        }
    }
}

/// The programs an attach request puts where: (object, program, hook).
fn planned_programs(req: &AttachRequest) -> Vec<(Feature, &'static str, &'static str)> {
    let mut out = Vec::new();
    if let Some(g) = &req.guard {
        if g.source == ResolvedFlowSource::Own {
            out.push((Feature::Guard, prog_names::FLOW_EGRESS, "tc-egress"));
        }
        out.push(match g.hook {
            GuardHook::Xdp => (Feature::Guard, prog_names::GUARD_XDP, "xdp"),
            GuardHook::Tc => (Feature::Guard, prog_names::GUARD_TC, "tc-ingress"),
        });
    }
    if req.overlay.as_ref().is_some_and(OverlayPlan::uses_tc) {
        out.push((Feature::Overlay, prog_names::OVERLAY_TC, "tc-ingress"));
    }
    out
}

/// `attach --pin --replace`: swaps the programs of a pinned attachment
/// atomically (bpf_link_update: no packet sees no program) and keeps its
/// maps, so counters and learned flows survive the upgrade.
fn upgrade_here(req: AttachRequest, pin_dir: PinDir, old: AttachmentMeta, ifindex: u32) -> Result<Attachment> {
    let planned = planned_programs(&req);
    let mut want: Vec<(&str, &str)> = planned.iter().map(|(_, n, h)| (*n, *h)).collect();
    let mut have: Vec<(&str, &str)> = old.programs.iter().map(|p| (p.name.as_str(), p.hook.as_str())).collect();
    want.sort_unstable();
    have.sort_unstable();
    if want != have {
        bail!(UserError::Conflict(format!(
            "--replace keeps the same programs on the same hooks (attached: {have:?}, requested: {want:?}); detach and attach instead"
        )));
    }
    if old.programs.iter().any(|p| p.mode == "clsact") {
        bail!(UserError::Unsupported("--replace needs bpf_links (tcx, Linux >= 6.6); this attachment uses clsact filters".into()));
    }
    let mut att = Attachment {
        meta: AttachmentMeta {
            natfix_version: env!("CARGO_PKG_VERSION").into(),
            ifindex,
            created_unix: pins::now_unix(),
            programs: Vec::new(),
            guard: req.guard.as_ref().map(|g| g.meta.clone()),
            overlay: req.overlay.as_ref().map(|o| OverlayMeta {
                changes: old.overlay.as_ref().map(|m| m.changes.clone()).unwrap_or_default(),
                ..o.meta.clone()
            }),
            ..old.clone()
        },
        guard: req.guard.as_ref().map(|g| load_guard_object_reusing(g, req.events_per_sec, Some(&pin_dir))).transpose()?,
        overlay: req
            .overlay
            .as_ref()
            .filter(|o| o.uses_tc())
            .map(|o| load_overlay_object_for(&o.config, &req.iface, req.events_per_sec, Some(&pin_dir)))
            .transpose()?,
        links: Vec::new(),
        ct_events: None,
        netns: req.netns.clone(),
        iface: req.iface.clone(),
        pin_dir,
    };
    if let Some(object) = att.overlay.as_mut() {
        install_overlay_writer(object)?;
    }
    for (feature, name, hook) in planned {
        let old_mode = old.programs.iter().find(|p| p.name == name).map(|p| p.mode.clone()).unwrap_or_default();
        let path = att.pin_dir.link(name);
        let link = FdLink::from(PinnedLink::from_pin(&path).with_context(|| format!("cannot open {}", path.display()))?);
        let object = att.object(feature)?;
        let prog_id = if hook == "xdp" {
            let prog = load_xdp(object, name)?;
            let id = prog.attach_to_link(link.try_into().context("pinned XDP link")?).with_context(|| format!("cannot swap {name}"))?;
            // The pin keeps the link; our handle may go.
            drop(prog.take_link(id)?);
            prog.info()?.id()
        } else {
            let prog = load_tc(object, name)?;
            let id = prog.attach_to_link(link.try_into().context("pinned tcx link")?).with_context(|| format!("cannot swap {name}"))?;
            drop(prog.take_link(id)?);
            prog.info()?.id()
        };
        att.meta.programs.push(ProgramMeta { name: name.to_owned(), hook: hook.to_owned(), mode: old_mode, prog_id });
    }
    if let Some(map) = att.overlay.as_ref().and_then(|o| o.map(map_names::OVERLAY_WRITER)) {
        // The old array went with the old program; pin the new one in its place.
        let path = att.pin_dir.map(pins::OVERLAY_WRITER);
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("cannot unpin {}", path.display()))?;
        }
        map.pin(&path).with_context(|| format!("cannot pin {}", path.display()))?;
    }
    if let Some(plan) = req.overlay.as_ref().filter(|o| o.uses_nft()) {
        let mut changes = att.meta.overlay.as_ref().map(|m| m.changes.clone()).unwrap_or_default();
        let reqid = (plan.config.flags & abi::OVERLAY_F_MATCH_REQID != 0).then_some(plan.config.reqid);
        overlay::install_nft(ifindex, &req.iface, &plan.ports, reqid, &mut changes)?;
        if let Some(m) = att.meta.overlay.as_mut() {
            m.changes = changes;
        }
    }
    att.pin_dir.write_meta(&att.meta)?;
    info!(iface = %att.iface, netns = %att.netns.spec, "upgraded in place: {}", att.meta.programs.iter().map(|p| format!("{} (prog id {})", p.name, p.prog_id)).collect::<Vec<_>>().join(", "));
    Ok(att)
}

impl Attachment {
    fn ensure_clsact(&mut self) -> Result<()> {
        if features::has_tcx() || self.meta.created_clsact {
            return Ok(());
        }
        match qdisc_add_clsact(&self.iface) {
            Ok(()) => {
                self.meta.created_clsact = true;
                Ok(())
            }
            Err(e) if matches!(&e, aya::programs::tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST)) => Ok(()),
            Err(e) => Err(e).context("cannot add the clsact qdisc"),
        }
    }

    fn object(&mut self, feature: Feature) -> Result<&mut Ebpf> {
        match feature {
            Feature::Guard => self.guard.as_mut(),
            Feature::Overlay => self.overlay.as_mut(),
        }
        .context("object not loaded")
    }

    fn attach_tc(&mut self, feature: Feature, name: &str, attach_type: TcAttachType) -> Result<()> {
        self.ensure_clsact()?;
        let iface = self.iface.clone();
        let prog = load_tc(self.object(feature)?, name)?;
        let id = prog
            .attach(&iface, attach_type)
            .with_context(|| format!("cannot attach {name} to tc {attach_type:?} of {iface}"))?;
        let prog_id = prog.info()?.id();
        self.links.push((feature, name.to_owned(), LinkRef::Tc(id)));
        self.meta.programs.push(ProgramMeta {
            name: name.to_owned(),
            hook: match attach_type {
                TcAttachType::Egress => "tc-egress".into(),
                _ => "tc-ingress".into(),
            },
            mode: if features::has_tcx() { "tcx".into() } else { "clsact".into() },
            prog_id,
        });
        Ok(())
    }

    /// Attaches XDP program `name` in `mode` (`used` names it in the record).
    fn attach_xdp(&mut self, name: &str, mode: XdpMode, used: &str) -> Result<()> {
        let iface = self.iface.clone();
        let prog = load_xdp(self.object(Feature::Guard)?, name)?;
        let id = prog.attach(&iface, mode).with_context(|| format!("cannot attach {name} to {used} XDP of {iface}"))?;
        let prog_id = prog.info()?.id();
        self.links.push((Feature::Guard, name.to_owned(), LinkRef::Xdp(id)));
        self.meta.programs.push(ProgramMeta { name: name.to_owned(), hook: "xdp".into(), mode: used.into(), prog_id });
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
            (GuardHook::Tc, _) => self.attach_tc(Feature::Guard, prog_names::GUARD_TC, TcAttachType::Ingress),
            (GuardHook::Xdp, XdpModeArg::Native) => self.attach_xdp(prog_names::GUARD_XDP, XdpMode::Driver, "native").map_err(|e| {
                e.context(format!(
                    "native XDP is not available on {iface} ({why_not_native}); use --xdp-mode auto (tc ingress where native XDP is missing) or --guard-hook tc"
                ))
            }),
            (GuardHook::Xdp, XdpModeArg::Generic) => {
                warn!(
                    "generic XDP on {iface} turns GRO off on it (every TCP segment climbs the stack alone, and the overlay fix's tc program loses the ESP GRO path it needs); --guard-hook tc costs less"
                );
                self.attach_xdp(prog_names::GUARD_XDP, XdpMode::Skb, "generic")
                    .map_err(|e| e.context(format!("another XDP program may hold {iface} (`ip link show {iface}`)")))
            }
            (GuardHook::Xdp, XdpModeArg::Auto) => match self.attach_xdp(prog_names::GUARD_XDP, XdpMode::Driver, "native") {
                Ok(()) => Ok(()),
                Err(e) => {
                    warn!(
                        "{e:#} ({why_not_native}): the guard runs at tc ingress instead, also before conntrack (generic XDP would turn GRO off on {iface}; --xdp-mode generic insists on it)"
                    );
                    if plan.source == ResolvedFlowSource::Conntrack {
                        // The conntrack build is one object per hook; the maps pinned so far carry over.
                        let tc_plan = GuardPlan { hook: GuardHook::Tc, ..plan.clone() };
                        self.guard = Some(load_guard_object_reusing(&tc_plan, events_per_sec, Some(&self.pin_dir))?);
                    }
                    self.attach_tc(Feature::Guard, prog_names::GUARD_TC, TcAttachType::Ingress)
                }
            },
        }
    }

    fn attach_guard(&mut self, plan: &GuardPlan, events_per_sec: u32) -> Result<()> {
        // Learn before guarding, so replies to flows leaving meanwhile pass.
        if plan.source == ResolvedFlowSource::Own {
            self.attach_tc(Feature::Guard, prog_names::FLOW_EGRESS, TcAttachType::Egress)?;
            // Flows that exist already (or leave by another interface) enter the
            // table before the guard sees a single reply.
            let ranges = plan.config.ranges[..plan.config.nr_ranges as usize].to_vec();
            let eif = plan.config.flags & abi::GUARD_F_ENDPOINT_INDEP != 0;
            let mut sync = crate::flowsync::FlowSync::open(&self.pin_dir.map(pins::GUARD_FLOWS), ranges, eif)?;
            self.ct_events = Some(sync.subscribe_and_seed(&self.netns)?);
        }
        self.attach_guard_ingress(plan, events_per_sec)
    }

    /// The tc program (with the ESP GRO path it needs) and/or the nft table.
    fn attach_overlay(&mut self, plan: &OverlayPlan) -> Result<()> {
        let mut changes = OverlayChanges::default();
        let result = (|| {
            if plan.uses_tc() {
                let gro_path = overlay::load_esp_offload(&mut changes).and_then(|()| overlay::enable_gro(&self.iface, &mut changes));
                match (gro_path, plan.backend) {
                    (Ok(()), _) => {}
                    (Err(e), CsumBackend::Tc) => return Err(e.context(UserError::Unsupported("the tc backend needs the ESP GRO path".into()))),
                    (Err(e), _) => warn!("{e:#}; the nftables rule still covers IPv4, IPv6 stays unrepaired"),
                }
                install_overlay_writer(self.object(Feature::Overlay)?)?;
                self.attach_tc(Feature::Overlay, prog_names::OVERLAY_TC, TcAttachType::Ingress)?;
            }
            if plan.uses_nft() {
                let reqid = (plan.config.flags & abi::OVERLAY_F_MATCH_REQID != 0).then_some(plan.config.reqid);
                overlay::install_nft(self.meta.ifindex, &self.iface, &plan.ports, reqid, &mut changes)?;
            }
            Ok(())
        })();
        // Recorded even on failure, so the rollback undoes what was done.
        if let Some(meta) = self.meta.overlay.as_mut() {
            meta.changes = changes;
        }
        result
    }

    /// Pins maps (and links with --pin) and writes the record.
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
            for (feature, name, link) in std::mem::take(&mut self.links) {
                // None: a clsact filter (kernel < 6.6) stays attached by itself.
                if let Some(fd_link) = self.take_fd_link(feature, &name, link)? {
                    let path = self.pin_dir.link(&name);
                    fd_link.pin(&path).with_context(|| format!("cannot pin {}", path.display()))?;
                }
            }
        }
        self.pin_dir.write_meta(&self.meta)
    }

    /// The link as a pinnable fd; None for a clsact filter, which outlives
    /// natfix without a pin (detach removes it by name).
    fn take_fd_link(&mut self, feature: Feature, name: &str, link: LinkRef) -> Result<Option<FdLink>> {
        let program = self.object(feature)?.program_mut(name).context("program vanished")?;
        match link {
            LinkRef::Xdp(id) => {
                let prog: &mut Xdp = program.try_into()?;
                let fd_link: Result<FdLink, _> = prog.take_link(id)?.try_into();
                fd_link.map(Some).map_err(|e| {
                    anyhow::Error::from(UserError::Unsupported(format!(
                        "--pin needs XDP bpf_links (Linux >= 5.9); this kernel attached {name} without one ({e})"
                    )))
                })
            }
            LinkRef::Tc(id) => {
                let prog: &mut SchedClassifier = program.try_into()?;
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

    fn teardown_here(self) {
        let Self { guard, overlay, pin_dir, meta, .. } = self;
        // Closing the link fds makes the kernel detach tcx and XDP links.
        drop(guard);
        drop(overlay);
        if let Err(e) = pin_dir.remove() {
            warn!("cleanup of {} incomplete: {e:#}", pin_dir.path.display());
        }
        undo_host_changes(&meta);
    }
}

fn remove_clsact(iface: &str) {
    // aya 0.14 can add clsact but not remove it; iproute2 can. The child
    // inherits this thread's namespace.
    let ok = std::process::Command::new("tc")
        .args(["qdisc", "del", "dev", iface, "clsact"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        warn!("could not remove the clsact qdisc natfix added to {iface}");
    }
}

/// Removes a pinned attachment (or one whose foreground owner died).
pub fn detach_pinned(pin_dir: &PinDir, meta: &AttachmentMeta, netns: &Netns) -> Result<()> {
    let dir = pin_dir.clone();
    let meta = meta.clone();
    netns.run(move || remove_recorded_here(&dir, &meta))
}

/// Drops the record of an attachment whose namespace is gone (this one got
/// its inode). Nothing of it is left to undo, and undoing it here would
/// touch this namespace: its links went with its devices, its nftables table
/// and GRO setting with the namespace.
fn forget_gone_namespace(dir: &PinDir, gone: &AttachmentMeta) -> Result<()> {
    info!(
        "removing the record of natfix on {} in namespace `{}`: that namespace is gone and inode {} now names another",
        gone.iface, gone.netns, gone.netns_inode
    );
    dir.remove()
}

/// Undoes everything a record says natfix did; runs in its namespace.
fn remove_recorded_here(dir: &PinDir, meta: &AttachmentMeta) -> Result<()> {
    for p in &meta.programs {
        if p.mode == "clsact" {
            // Netlink filters outlive natfix (kernels < 6.6): remove them by name.
            let attach = if p.hook == "tc-egress" { TcAttachType::Egress } else { TcAttachType::Ingress };
            if let Err(e) = aya::programs::tc::qdisc_detach_program(&meta.iface, attach, &p.name) {
                warn!("could not remove the {} filter {} from {}: {e}", p.hook, p.name, meta.iface);
            }
            continue;
        }
        let path = dir.link(&p.name);
        if path.exists() {
            // Unpinning drops the last reference: the kernel detaches the link.
            let link = PinnedLink::from_pin(&path).with_context(|| format!("cannot open {}", path.display()))?;
            drop(link.unpin().with_context(|| format!("cannot unpin {}", path.display()))?);
        }
    }
    dir.remove()?;
    undo_host_changes(meta);
    Ok(())
}

/// Restores what natfix changed outside BPF; runs in the attachment's namespace.
fn undo_host_changes(meta: &AttachmentMeta) {
    if meta.created_clsact {
        remove_clsact(&meta.iface);
    }
    if let Some(o) = &meta.overlay {
        overlay::undo(&meta.iface, &o.changes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_keeps_the_mechanisms_attached() {
        let args = OverlayArgs {
            overlay_fix: true,
            vxlan_ports: vec![],
            reqid: None,
            csum: CsumMode::Zero,
            csum_backend: CsumBackend::Auto,
        };
        let mut plan = plan_overlay(&args).unwrap().unwrap();
        plan.resolve_backend_as(true);
        assert!(plan.uses_tc() && plan.uses_nft());
        assert_eq!(plan.meta.backend, "both");
        let mut plan = plan_overlay(&args).unwrap().unwrap();
        plan.resolve_backend_as(false);
        assert!(!plan.uses_tc() && plan.uses_nft());
        let mut plan = plan_overlay(&OverlayArgs { csum_backend: CsumBackend::Tc, ..args }).unwrap().unwrap();
        plan.resolve_backend(true);
        assert!(plan.uses_tc() && !plan.uses_nft(), "an explicit backend is kept");
    }
}
