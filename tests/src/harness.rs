//! Runs natfix's programs on crafted packets with `BPF_PROG_TEST_RUN`: the
//! benches and the `test_run`/differential tests share it.

use std::net::IpAddr;

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};

use natfix::{
    abi::{Counter, CounterValue, Event, FlowKey, FlowValue},
    config::{DEFAULT_EVENTS_PER_SEC, GuardHook},
    loader::{GuardPlan, object},
};
use natfix_ebpf::{maps as map_names, programs as prog_names};

pub use crate::model::overlay::OverlaySetup;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_SHOT: u32 = 2;
/// `TC_ACT_UNSPEC` (-1): "next", natfix's pass verdict in tc.
pub const TC_NEXT: u32 = u32::MAX;

/// Keeps the calling thread on one CPU (modulo the CPUs there are): per-CPU
/// state (flow cache, learned deltas, counters) is then the one it sees, and
/// a benchmark's threads stay where they were put.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    let mut one = nix::sched::CpuSet::new();
    one.set(cpu % std::thread::available_parallelism().map_or(1, std::num::NonZero::get))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one)?;
    Ok(())
}

/// The guard object loaded with one configuration, programs loaded, nothing attached.
pub struct GuardHarness {
    ebpf: Ebpf,
    pub hook: GuardHook,
}

impl GuardHarness {
    pub fn load(plan: &GuardPlan) -> Result<Self> {
        let mut ebpf = object::load_guard_object(plan, DEFAULT_EVENTS_PER_SEC, None)?;
        match plan.hook {
            GuardHook::Xdp => {
                object::load_program::<Xdp>(&mut ebpf, prog_names::GUARD_XDP)?;
            }
            GuardHook::Tc => {
                object::load_program::<SchedClassifier>(&mut ebpf, prog_names::GUARD_TC)?;
            }
        }
        if ebpf.program(prog_names::FLOW_EGRESS).is_some() {
            object::load_program::<SchedClassifier>(&mut ebpf, prog_names::FLOW_EGRESS)?;
        }
        Ok(Self { ebpf, hook: plan.hook })
    }

    fn ingress_name(&self) -> &'static str {
        match self.hook {
            GuardHook::Xdp => prog_names::GUARD_XDP,
            GuardHook::Tc => prog_names::GUARD_TC,
        }
    }

    /// The loaded ingress guard program, to attach it (benchmarks).
    pub fn ingress_program_mut(&mut self) -> Result<&mut aya::programs::Program> {
        self.ebpf.program_mut(self.ingress_name()).context("no guard program")
    }

    /// The loaded ingress guard program (benchmarks read its run statistics).
    pub fn ingress_program(&self) -> Result<&aya::programs::Program> {
        self.ebpf.program(self.ingress_name()).context("no guard program")
    }

    /// The loaded egress flow learner (benchmarks read its run statistics).
    pub fn egress_program(&self) -> Result<&aya::programs::Program> {
        self.ebpf.program(prog_names::FLOW_EGRESS).context("no flow learner in this object")
    }

    /// The loaded egress flow learner (own flow table only), to attach it (benchmarks).
    pub fn egress_program_mut(&mut self) -> Result<&mut aya::programs::Program> {
        self.ebpf.program_mut(prog_names::FLOW_EGRESS).context("no flow learner in this object")
    }

    /// Runs the ingress guard once; returns the program's return value.
    pub fn run_ingress(&self, frame: &[u8]) -> Result<u32> {
        Ok(self.run_ingress_repeat(frame, 1)?.0)
    }

    /// Runs the ingress guard `repeat` times; returns the verdict and the mean ns per run.
    #[expect(clippy::cast_precision_loss, reason = "ns of a test run, far below 2^52")]
    pub fn run_ingress_repeat(&self, frame: &[u8], repeat: u32) -> Result<(u32, f64)> {
        let opts = || TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::default() };
        let result = match self.hook {
            GuardHook::Xdp => {
                let p: &Xdp = self.ebpf.program(prog_names::GUARD_XDP).context("no xdp")?.try_into()?;
                p.test_run(opts())?
            }
            GuardHook::Tc => {
                let p: &SchedClassifier = self.ebpf.program(prog_names::GUARD_TC).context("no tc")?.try_into()?;
                p.test_run(opts())?
            }
        };
        Ok((result.return_value, result.duration.as_nanos() as f64))
    }

    /// Runs the egress flow learner once (own flow table only).
    pub fn run_egress(&self, frame: &[u8]) -> Result<u32> {
        let p: &SchedClassifier =
            self.ebpf.program(prog_names::FLOW_EGRESS).context("no flow learner in this object")?.try_into()?;
        Ok(p.test_run(TestRunOptions { data_in: Some(frame), ..TestRunOptions::default() })?.return_value)
    }

    /// Runs the egress flow learner `repeat` times; returns the mean ns per run.
    #[expect(clippy::cast_precision_loss, reason = "ns of a test run, far below 2^52")]
    pub fn run_egress_repeat(&self, frame: &[u8], repeat: u32) -> Result<f64> {
        let p: &SchedClassifier =
            self.ebpf.program(prog_names::FLOW_EGRESS).context("no flow learner in this object")?.try_into()?;
        Ok(p.test_run(TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::default() })?.duration.as_nanos() as f64)
    }

    /// Counter totals, summed over CPUs.
    pub fn counters(&self) -> Result<CounterTotals> {
        counters_of(&self.ebpf)
    }

    /// Runs the ingress guard once and says which counter moved.
    pub fn classify(&self, frame: &[u8]) -> Result<(u32, Option<Counter>)> {
        let before = self.counters()?;
        let verdict = self.run_ingress(frame)?;
        let after = self.counters()?;
        Ok((verdict, moved(&before, &after)))
    }

    /// Inserts an own-table flow with the given last-seen time, its port marked first.
    pub fn insert_flow(&mut self, key: &FlowKey, last_seen_ns: u64) -> Result<()> {
        let mut ports: aya::maps::Array<&mut MapData, u8> =
            aya::maps::Array::try_from(self.ebpf.map_mut(map_names::GUARD_FLOW_PORTS).context("no port map")?)?;
        natfix::flowsync::mark_port(&mut ports, key)?;
        self.insert_flow_unmarked(key, last_seen_ns)
    }

    /// Inserts a flow without marking its port, as a table kept from an
    /// older natfix (without the port map) would hold it.
    pub fn insert_flow_unmarked(&mut self, key: &FlowKey, last_seen_ns: u64) -> Result<()> {
        let mut flows: BpfHashMap<&mut MapData, FlowKey, FlowValue> =
            BpfHashMap::try_from(self.ebpf.map_mut(map_names::GUARD_FLOWS).context("no flow table")?)?;
        flows.insert(key, FlowValue { last_seen_ns }, 0)?;
        Ok(())
    }

    /// What an in-place upgrade does to a kept table: marks its flows' ports.
    pub fn mark_ports_of_table(&mut self) -> Result<()> {
        object::mark_ports_of_table(&mut self.ebpf)
    }

    /// Removes an own-table flow (as LRU eviction would).
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        let mut flows: BpfHashMap<&mut MapData, FlowKey, FlowValue> =
            BpfHashMap::try_from(self.ebpf.map_mut(map_names::GUARD_FLOWS).context("no flow table")?)?;
        flows.remove(key)?;
        Ok(())
    }

    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>> {
        let flows: BpfHashMap<&MapData, FlowKey, FlowValue> =
            BpfHashMap::try_from(self.ebpf.map(map_names::GUARD_FLOWS).context("no flow table")?)?;
        match flows.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The pass verdict of this hook.
    #[must_use]
    pub const fn pass(&self) -> u32 {
        match self.hook {
            GuardHook::Xdp => XDP_PASS,
            GuardHook::Tc => TC_NEXT,
        }
    }

    #[must_use]
    pub const fn drop_verdict(&self) -> u32 {
        match self.hook {
            GuardHook::Xdp => XDP_DROP,
            GuardHook::Tc => TC_ACT_SHOT,
        }
    }
}

/// The overlay object loaded with one configuration, its program loaded.
pub struct OverlayHarness {
    ebpf: Ebpf,
}

impl OverlayHarness {
    /// As attached: the in-place writer installed.
    pub fn load(setup: &OverlaySetup) -> Result<Self> {
        let mut ebpf = object::load_overlay_object(&setup.config, &setup.settings, DEFAULT_EVENTS_PER_SEC, None)?;
        object::install_overlay_writer(&mut ebpf)?;
        object::load_program::<SchedClassifier>(&mut ebpf, prog_names::OVERLAY_TC)?;
        Ok(Self { ebpf })
    }

    /// Without the writer: the program's `bpf_skb_store_bytes()` fallback.
    pub fn load_without_writer(setup: &OverlaySetup) -> Result<Self> {
        let mut ebpf = object::load_overlay_object(&setup.config, &setup.settings, DEFAULT_EVENTS_PER_SEC, None)?;
        object::load_program::<SchedClassifier>(&mut ebpf, prog_names::OVERLAY_TC)?;
        Ok(Self { ebpf })
    }

    fn program(&self) -> Result<&SchedClassifier> {
        Ok(self.ebpf.program(prog_names::OVERLAY_TC).context("no overlay program")?.try_into()?)
    }

    /// The tc program, to attach it to a live interface.
    pub fn program_mut(&mut self) -> Result<&mut aya::programs::Program> {
        self.ebpf.program_mut(prog_names::OVERLAY_TC).context("no overlay program")
    }

    /// The tc program (benchmarks read its run statistics).
    pub fn loaded_program(&self) -> Result<&aya::programs::Program> {
        self.ebpf.program(prog_names::OVERLAY_TC).context("no overlay program")
    }

    /// Counter totals, summed over CPUs.
    pub fn counters(&self) -> Result<CounterTotals> {
        counters_of(&self.ebpf)
    }

    /// Runs once; returns the verdict and the frame as the program left it.
    pub fn run(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self.program()?.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// Runs `repeat` times; returns the mean ns per run.
    #[expect(clippy::cast_precision_loss, reason = "ns of a test run, far below 2^52")]
    pub fn run_repeat(&self, frame: &[u8], repeat: u32) -> Result<f64> {
        let result = self.program()?.test_run(TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::default() })?;
        Ok(result.duration.as_nanos() as f64)
    }

    /// Drains the events the program has emitted so far, oldest first.
    pub fn take_events(&mut self) -> Result<Vec<Event>> {
        let mut ring = RingBuf::try_from(self.ebpf.map_mut(map_names::EVENTS).context("no events map")?)?;
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            events.push(Event::from_bytes(&item).context("a ring record of another size")?);
        }
        Ok(events)
    }

    /// Runs once and says which counter moved and what came out.
    pub fn classify(&self, frame: &[u8]) -> Result<(u32, Option<Counter>, Vec<u8>)> {
        let before = counters_of(&self.ebpf)?;
        let (verdict, out) = self.run(frame)?;
        let after = counters_of(&self.ebpf)?;
        Ok((verdict, moved(&before, &after), out))
    }
}

/// Counter totals summed over CPUs, indexed by `Counter` (not by position
/// in `Counter::ALL`, which skips unused slots).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterTotals(Vec<CounterValue>);

impl std::ops::Index<Counter> for CounterTotals {
    type Output = CounterValue;

    fn index(&self, counter: Counter) -> &CounterValue {
        &self.0[counter as usize]
    }
}

fn counters_of(ebpf: &Ebpf) -> Result<CounterTotals> {
    let map: PerCpuArray<&MapData, CounterValue> =
        PerCpuArray::try_from(ebpf.map(map_names::COUNTERS).context("no counters map")?)?;
    let slots = (0..natfix_ebpf::abi::COUNTER_SLOTS)
        .map(|slot| {
            let v = map.get(&slot, 0)?;
            Ok(v.iter().fold(CounterValue::default(), |a, x| CounterValue {
                packets: a.packets + x.packets,
                bytes: a.bytes + x.bytes,
            }))
        })
        .collect::<Result<_>>()?;
    Ok(CounterTotals(slots))
}

fn moved(before: &CounterTotals, after: &CounterTotals) -> Option<Counter> {
    Counter::ALL.iter().copied().find(|c| after[*c].packets != before[*c].packets)
}

/// The own-table key for (local, lport) <- (remote, rport); `remote` None = wildcard.
#[must_use]
pub fn flow_key(local: IpAddr, local_port: u16, remote: Option<(IpAddr, u16)>) -> FlowKey {
    FlowKey::new(local, local_port, remote)
}

/// The own flow table's clock (see `flowsync::flow_clock_ns`).
pub use natfix::flowsync::flow_clock_ns as monotonic_ns;

