//! Loads natfix's eBPF objects: picks the object for the plan, sets its
//! `const volatile` configuration, fills its exemption maps, reuses the maps
//! of an attachment being upgraded, and loads single programs with the
//! verifier's log at hand.

use std::net::IpAddr;

use anyhow::{Context, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, ProgramArray, lpm_trie::Key},
    programs::{ProgramError, SchedClassifier, Xdp},
};
use natfix_ebpf::{maps as map_names, objects, programs as prog_names};

use super::{
    kfunc,
    plan::{GuardPlan, OverlayPlan},
};
use crate::{
    abi::{self, FlowKey, LpmV4, LpmV6, OverlayConfig},
    config::{Cidr, GuardHook, ResolvedFlowSource},
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
fn reuse_pinned<'a>(loader: &mut EbpfLoader<'a>, dir: &PinDir, maps: &[(&'a str, &str)]) {
    for (name, file) in maps {
        let path = dir.map(file);
        if path.exists() {
            loader.map_pin_path(name, path);
        }
    }
}

/// Loads the guard object for the plan's flow source and hook, configured
/// and with its exemption maps filled; programs are not loaded yet. With
/// `reuse`, the pinned maps of that attachment are used instead of new ones.
pub fn load_guard_object(plan: &GuardPlan, events_per_sec: u32, reuse: Option<&PinDir>) -> Result<Ebpf> {
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
    fill_allow_ports(&mut ebpf, &plan.allow_ports)?;
    fill_allow_src(&mut ebpf, &plan.allow_src)?;
    Ok(ebpf)
}

fn fill_allow_ports(ebpf: &mut Ebpf, allow_ports: &[u16]) -> Result<()> {
    if allow_ports.is_empty() {
        return Ok(());
    }
    let mut ports: BpfHashMap<&mut MapData, u16, u8> =
        BpfHashMap::try_from(ebpf.map_mut(map_names::GUARD_ALLOW_PORTS).context("allow-ports map missing")?)?;
    for port in allow_ports {
        ports.insert(port.to_be(), 1, 0)?;
    }
    Ok(())
}

// The LPM key types of the C side are {prefixlen, addr}; aya's Key<K> adds
// the prefix itself, so K is just the address bytes.
type LpmV4Key = u32;
const _: () = assert!(size_of::<Key<LpmV4Key>>() == size_of::<LpmV4>());
const _: () = assert!(size_of::<Key<[u8; 16]>>() == size_of::<LpmV6>());

fn fill_allow_src(ebpf: &mut Ebpf, allow_src: &[Cidr]) -> Result<()> {
    for cidr in allow_src {
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
    Ok(())
}

/// Marks the local port of every flow in the own table (see flowsync::mark_port).
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
    load_overlay_object(&config, events_per_sec, reuse)
}

/// Loads the overlay object with its configuration; the program is not loaded yet.
pub fn load_overlay_object(config: &OverlayConfig, events_per_sec: u32, reuse: Option<&PinDir>) -> Result<Ebpf> {
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
