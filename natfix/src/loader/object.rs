//! Loads natfix's eBPF objects: picks the object for the plan, sets its
//! `const volatile` configuration, writes its live settings
//! (`loader::settings`), reuses the maps of an attachment being upgraded,
//! and loads single programs with the verifier's log at hand.

use anyhow::{Context, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, ProgramArray},
    programs::{ProgramError, SchedClassifier, Xdp},
};
use natfix_ebpf::{maps as map_names, objects, programs as prog_names};

use super::{
    kfunc,
    plan::{GuardPlan, OverlayPlan},
    settings::{self, GuardLive},
};
use crate::{
    abi::{self, FlowKey, OverlayConfig, OverlaySettings},
    config::{GuardHook, ResolvedFlowSource},
    flowsync,
    overlay::esp,
    pins::{self, PinDir},
};

/// HZ for the data plane's jiffies windows; 0 (those features off) if unknown.
pub(super) fn data_plane_hz() -> u32 {
    crate::sys::features::kernel_hz().unwrap_or_else(|| {
        tracing::warn!("cannot tell the kernel's HZ: the guard's flow cache is off");
        0
    })
}

/// Maps of an existing attachment that an upgrade keeps (state survives).
fn reuse_pinned<'a>(loader: &mut EbpfLoader<'a>, dir: &PinDir, maps: &[(&'a str, &'a str)]) {
    for (name, file) in maps {
        let path = dir.map(file);
        if path.exists() {
            loader.map_pin_path(name, path);
        }
    }
}

/// The guard's maps an upgrade keeps (state survives): (object name, pin name).
const GUARD_KEPT_MAPS: [(&str, &str); 9] = [
    (map_names::COUNTERS, pins::GUARD_COUNTERS),
    (map_names::GUARD_FLOWS, pins::GUARD_FLOWS),
    (map_names::GUARD_FLOW_PORTS, pins::GUARD_FLOW_PORTS),
    (map_names::EVENTS, pins::GUARD_EVENTS),
    (map_names::GUARD_PORTS, pins::GUARD_PORTS),
    (map_names::GUARD_SETTINGS, pins::GUARD_SETTINGS),
    (map_names::GUARD_ALLOW_SRC4, pins::GUARD_ALLOW_SRC4),
    (map_names::GUARD_ALLOW_SRC6, pins::GUARD_ALLOW_SRC6),
    (map_names::EVENT_RATE, pins::GUARD_EVENT_RATE),
];

/// The overlay's maps an upgrade keeps.
const OVERLAY_KEPT_MAPS: [(&str, &str); 4] = [
    (map_names::COUNTERS, pins::OVERLAY_COUNTERS),
    (map_names::EVENTS, pins::OVERLAY_EVENTS),
    (map_names::OVERLAY_SETTINGS, pins::OVERLAY_SETTINGS),
    (map_names::EVENT_RATE, pins::OVERLAY_EVENT_RATE),
];

/// Every map of an attachment that other natfix commands open by pin.
pub const GUARD_PINNED_MAPS: [(&str, &str); 9] = GUARD_KEPT_MAPS;
pub const OVERLAY_PINNED_MAPS: [(&str, &str); 5] = [
    OVERLAY_KEPT_MAPS[0],
    OVERLAY_KEPT_MAPS[1],
    OVERLAY_KEPT_MAPS[2],
    OVERLAY_KEPT_MAPS[3],
    // A pin keeps the tail-call array filled after natfix exits (the
    // kernel clears a program array when no fd or pin holds it).
    (map_names::OVERLAY_WRITER, pins::OVERLAY_WRITER),
];

/// Loads the guard object for the plan's flow source and hook, configured
/// and with its live settings written; programs are not loaded yet. With
/// `reuse`, the pinned maps of that attachment are used instead of new ones
/// (and get the plan's settings).
pub fn load_guard_object(plan: &GuardPlan, events_per_sec: u32, reuse: Option<&PinDir>) -> Result<Ebpf> {
    let bytes = match (plan.source, plan.hook) {
        (ResolvedFlowSource::Own, _) => objects::GUARD_OWN.to_vec(),
        (ResolvedFlowSource::Conntrack, GuardHook::Xdp) => kfunc::relocate_kfuncs(objects::GUARD_XDP_CT)?,
        (ResolvedFlowSource::Conntrack, GuardHook::Tc) => kfunc::relocate_kfuncs(objects::GUARD_TC_CT)?,
    };
    let hz = data_plane_hz();
    let mut loader = EbpfLoader::new();
    loader.override_global(map_names::GUARD_CONFIG, &plan.config, true);
    loader.override_global(map_names::HZ, &hz, true);
    if plan.source == ResolvedFlowSource::Own {
        loader.map_max_entries(map_names::GUARD_FLOWS, plan.flow_table_size);
    }
    if let Some(dir) = reuse {
        reuse_pinned(&mut loader, dir, &GUARD_KEPT_MAPS);
    }
    let mut ebpf = loader.load(&bytes).context("cannot load the guard's eBPF object")?;
    if plan.source == ResolvedFlowSource::Own && reuse.is_some() {
        // A kept table may predate its port map (older natfix): mark its ports.
        mark_ports_of_table(&mut ebpf)?;
    }
    write_guard_live(&mut ebpf, &plan.live)?;
    settings::write_event_rate(&mut Array::try_from(map_mut(&mut ebpf, map_names::EVENT_RATE)?)?, events_per_sec)?;
    Ok(ebpf)
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name).with_context(|| format!("map {name} missing from the object"))
}

/// Writes the guard's live settings into a loaded object (whose maps may be
/// kept ones of an attachment being upgraded).
fn write_guard_live(ebpf: &mut Ebpf, live: &GuardLive) -> Result<()> {
    settings::write_allow_src4(&mut LpmTrie::try_from(map_mut(ebpf, map_names::GUARD_ALLOW_SRC4)?)?, &live.allow_src)?;
    settings::write_allow_src6(&mut LpmTrie::try_from(map_mut(ebpf, map_names::GUARD_ALLOW_SRC6)?)?, &live.allow_src)?;
    let mut ports: Array<&mut MapData, u64> = Array::try_from(map_mut(ebpf, map_names::GUARD_PORTS)?)?;
    settings::write_learned(&mut ports, &live.ranges)?;
    settings::write_guarded(&mut ports, &live.ranges, &live.exempt())?;
    settings::write_guard_settings(&mut Array::try_from(map_mut(ebpf, map_names::GUARD_SETTINGS)?)?, live)
}

/// Marks the local port of every flow in the own table (see `flowsync::mark_port`).
pub fn mark_ports_of_table(ebpf: &mut Ebpf) -> Result<()> {
    let flows: BpfHashMap<&MapData, FlowKey, abi::FlowValue> =
        BpfHashMap::try_from(ebpf.map(map_names::GUARD_FLOWS).context("flow table missing")?)?;
    let keys: Vec<FlowKey> = flows.keys().filter_map(Result::ok).collect();
    let mut ports: Array<&mut MapData, u8> =
        Array::try_from(ebpf.map_mut(map_names::GUARD_FLOW_PORTS).context("port map missing")?)?;
    for key in &keys {
        flowsync::mark_port(&mut ports, key)?;
    }
    Ok(())
}

/// Loads the overlay object for `iface` (in the calling thread's namespace):
/// the writer keeps skb->csum in step only where the NIC decrypts ESP.
pub fn load_overlay_object_for(plan: &OverlayPlan, iface: &str, events_per_sec: u32, reuse: Option<&PinDir>) -> Result<Ebpf> {
    let mut config = plan.config;
    if esp::decrypted_may_be_csum_complete(iface) {
        config.flags |= abi::OVERLAY_F_CSUM_COMPLETE;
    }
    load_overlay_object(&config, &settings::overlay_settings(&plan.ports, plan.reqid), events_per_sec, reuse)
}

/// Loads the overlay object with its configuration and live settings; the
/// program is not loaded yet.
pub fn load_overlay_object(config: &OverlayConfig, live: &OverlaySettings, events_per_sec: u32, reuse: Option<&PinDir>) -> Result<Ebpf> {
    let hz = data_plane_hz();
    let mut loader = EbpfLoader::new();
    loader.override_global(map_names::OVERLAY_CONFIG, config, true);
    loader.override_global(map_names::HZ, &hz, true);
    if let Some(dir) = reuse {
        reuse_pinned(&mut loader, dir, &OVERLAY_KEPT_MAPS);
    }
    let mut ebpf = loader.load(objects::OVERLAY).context("cannot load the overlay eBPF object")?;
    let mut s: Array<&mut MapData, OverlaySettings> = Array::try_from(map_mut(&mut ebpf, map_names::OVERLAY_SETTINGS)?)?;
    s.set(0, *live, 0).context("cannot write overlay_settings")?;
    settings::write_event_rate(&mut Array::try_from(map_mut(&mut ebpf, map_names::EVENT_RATE)?)?, events_per_sec)?;
    Ok(ebpf)
}

/// Loads the overlay's writers and puts them in the tail-call array of the
/// (not yet attached) overlay program, so that its first packets are written
/// in place (`overlay_tc.bpf.c` says why separate programs). The slots are
/// the C side's `OVERLAY_WRITER_ANY` and `OVERLAY_WRITER_V4_ZERO`.
pub fn install_overlay_writer(ebpf: &mut Ebpf) -> Result<()> {
    for (slot, name) in [(0u32, prog_names::OVERLAY_WRITE), (1, prog_names::OVERLAY_WRITE_V4_ZERO)] {
        let fd = load_program::<SchedClassifier>(ebpf, name)?
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

/// A program type natfix loads (aya's `load` is inherent on each type).
pub trait LoadableProgram {
    fn load_into_kernel(&mut self) -> Result<(), ProgramError>;
}

impl LoadableProgram for Xdp {
    fn load_into_kernel(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

impl LoadableProgram for SchedClassifier {
    fn load_into_kernel(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

/// Loads program `name` of the object (a no-op once loaded), with the
/// verifier's log in the debug log on failure.
pub fn load_program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P>
where
    P: LoadableProgram,
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog: &mut P = ebpf.program_mut(name).with_context(|| format!("program {name} missing from object"))?.try_into()?;
    match prog.load_into_kernel() {
        Ok(()) | Err(ProgramError::AlreadyLoaded) => Ok(prog),
        Err(ProgramError::LoadError { io_error, verifier_log }) => {
            tracing::debug!("verifier log for {name}:\n{verifier_log}");
            Err(anyhow::anyhow!("the kernel rejected program {name}: {io_error} (run with --log debug for the verifier log)"))
        }
        Err(e) => Err(anyhow::Error::from(e).context(format!("cannot load program {name}"))),
    }
}
