//! End to end on the running kernel: after `natfix::kfunc`'s fix-up, aya 0.14
//! loads both conntrack guard objects, the verifier accepts them, and their
//! `bpf_*_ct_lookup` calls find the entries `conntrack -I` put into a fresh
//! network namespace (run through `BPF_PROG_TEST_RUN`).
//!
//! Needs root, and a kernel whose vmlinux BTF has the conntrack kfuncs:
//! reported skipped (`natfix_testkit::skip`) otherwise.

use std::process::Command;

use aya::{
    Ebpf, TestRun, TestRunOptions, TestRunResult,
    maps::{MapData, PerCpuArray},
    programs::{SchedClassifier, Xdp},
};
use natfix::{
    abi::{Counter, CounterValue},
    config::{DEFAULT_EVENTS_PER_SEC, GuardHook, ResolvedFlowSource},
    loader::{GuardPlan, object},
    sys::features::{self, CtKfuncs},
};
use natfix_ebpf::{maps::COUNTERS, programs};
use natfix_testkit::{plans, root_setup, scratch_ns, skip};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_UNSPEC: u32 = u32::MAX; // -1

const LOCAL: [u8; 4] = [198, 51, 100, 10];

/// One test packet (arriving at LOCAL) and what the guard must make of it.
struct Case {
    what: &'static str,
    src: [u8; 4],
    sport: u16,
    dport: u16,
    pass: bool,
    counter: Counter,
}

const CASES: &[Case] = &[
    Case {
        what: "reply to a flow LOCAL:25000 opened (conntrack reply direction)",
        src: [198, 51, 100, 20],
        sport: 7000,
        dport: 25000,
        pass: true,
        counter: Counter::GuardPassSolicited,
    },
    Case {
        what: "inbound flow that has seen a reply (SEEN_REPLY)",
        src: [198, 51, 100, 30],
        sport: 7001,
        dport: 25001,
        pass: true,
        counter: Counter::GuardPassSolicited,
    },
    Case {
        what: "inbound flow conntrack has, never answered (UNREPLIED)",
        src: [198, 51, 100, 40],
        sport: 7002,
        dport: 25002,
        pass: false,
        counter: Counter::GuardDropUnsolicited,
    },
    Case {
        what: "unknown flow to a guarded port",
        src: [198, 51, 100, 50],
        sport: 7003,
        dport: 25000,
        pass: false,
        counter: Counter::GuardDropUnsolicited,
    },
    Case {
        what: "unknown flow to port 40000, outside 20000-30000",
        src: [198, 51, 100, 50],
        sport: 7003,
        dport: 40000,
        pass: true,
        counter: Counter::GuardOutOfScope,
    },
];

/// The conntrack entries behind CASES, as `conntrack -I` arguments.
const ENTRIES: &[&[&str]] = &[
    // LOCAL:25000 sent to .20:7000; no reply yet.
    &["-s", "198.51.100.10", "-d", "198.51.100.20", "--sport", "25000", "--dport", "7000"],
    // .30:7001 opened a flow to LOCAL:25001 and LOCAL answered.
    &["-s", "198.51.100.30", "-d", "198.51.100.10", "--sport", "7001", "--dport", "25001", "--status", "SEEN_REPLY"],
    // .40:7002 sent to LOCAL:25002; never answered.
    &["-s", "198.51.100.40", "-d", "198.51.100.10", "--sport", "7002", "--dport", "25002"],
];

#[test]
#[ignore = "needs root: cargo xtask test"]
fn conntrack_guard_passes_solicited_and_drops_unsolicited() {
    root_setup();
    if let other @ (CtKfuncs::Module | CtKfuncs::Absent(_)) = features::ct_kfuncs() {
        skip(&format!("conntrack kfuncs not in vmlinux BTF: {other:?}"));
        return;
    }
    scratch_ns("kfunc")
        .run(|| {
            in_scratch_netns();
            Ok(())
        })
        .unwrap();
}

fn in_scratch_netns() {
    // A conntrack user in this namespace, as on a real host.
    run(&["nft", "add", "table", "ip", "t"]);
    run(&["nft", "add", "chain", "ip", "t", "c", "{ type filter hook input priority 0; }"]);
    run(&["nft", "add", "rule", "ip", "t", "c", "ct", "state", "established", "accept"]);
    for entry in ENTRIES {
        let mut args = vec!["conntrack", "-I", "-p", "udp", "-t", "120"];
        args.extend_from_slice(entry);
        run(&args);
    }
    let listed = run(&["conntrack", "-L", "-p", "udp"]);
    assert_eq!(listed.lines().count(), ENTRIES.len(), "conntrack entries in the test namespace:\n{listed}");
    eprintln!("conntrack entries:\n{listed}");

    let plan = plan();
    assert_eq!(plan.source, ResolvedFlowSource::Conntrack);

    let mut xdp_plan = plan.clone();
    xdp_plan.hook = GuardHook::Xdp;
    let mut ebpf = object::load_guard_object(&xdp_plan, DEFAULT_EVENTS_PER_SEC, None).expect("load GUARD_XDP_CT");
    let prog = object::load_program::<Xdp>(&mut ebpf, programs::GUARD_XDP).expect("verifier accepts natfix_guard_xdp");
    assert_btf_loaded(prog.info().unwrap().btf_id(), programs::GUARD_XDP);
    let prog: &Xdp = ebpf.program(programs::GUARD_XDP).unwrap().try_into().unwrap();
    check("xdp", &ebpf, prog, XDP_PASS, XDP_DROP);

    let mut tc_plan = plan;
    tc_plan.hook = GuardHook::Tc;
    let mut ebpf = object::load_guard_object(&tc_plan, DEFAULT_EVENTS_PER_SEC, None).expect("load GUARD_TC_CT");
    let prog = object::load_program::<SchedClassifier>(&mut ebpf, programs::GUARD_TC).expect("verifier accepts natfix_guard_tc");
    assert_btf_loaded(prog.info().unwrap().btf_id(), programs::GUARD_TC);
    let prog: &SchedClassifier = ebpf.program(programs::GUARD_TC).unwrap().try_into().unwrap();
    check("tc", &ebpf, prog, TC_ACT_UNSPEC, TC_ACT_SHOT);
}

fn plan() -> GuardPlan {
    plans::plan(&["--guard", "20000-30000", "--flow-source", "conntrack"])
}

/// aya drops the object's BTF silently when the kernel rejects it; the
/// patched `.BTF` (no extern FUNC, no `.ksyms`) must be accepted.
fn assert_btf_loaded(btf_id: Option<u32>, name: &str) {
    assert!(btf_id.is_some_and(|id| id != 0), "{name} was loaded without its BTF");
}

fn check<P>(hook: &str, ebpf: &Ebpf, prog: &P, pass: u32, drop: u32)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    for case in CASES {
        let before = counters(ebpf);
        let packet = udp_packet(case.src, case.sport, LOCAL, case.dport);
        let result = prog
            .test_run(TestRunOptions { data_in: Some(&packet), ..TestRunOptions::default() })
            .unwrap_or_else(|e| panic!("{hook}: BPF_PROG_TEST_RUN for {}: {e}", case.what));
        let after = counters(ebpf);
        let expected = if case.pass { pass } else { drop };
        assert_eq!(result.return_value, expected, "{hook}: verdict for {}", case.what);
        // The counter says why: a solicited pass means the lookup found the entry.
        let changed: Vec<Counter> =
            Counter::ALL.into_iter().filter(|c| after[*c as usize] != before[*c as usize]).collect();
        assert_eq!(changed, [case.counter], "{hook}: counted reason for {}", case.what);
        assert_eq!(after[case.counter as usize], before[case.counter as usize] + 1);
    }
}

/// Packets per counter slot, summed over CPUs.
fn counters(ebpf: &Ebpf) -> Vec<u64> {
    let map: PerCpuArray<&MapData, CounterValue> =
        PerCpuArray::try_from(ebpf.map(COUNTERS).expect("counters map")).unwrap();
    (0..map.len()).map(|slot| map.get(&slot, 0).unwrap().iter().map(|v| v.packets).sum()).collect()
}

/// Ethernet + IPv4 + UDP, as it would arrive from the wire.
fn udp_packet(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let payload = b"natfix kfunc test";
    let udp_len = u16::try_from(8 + payload.len()).unwrap();
    let ip_len = 20 + udp_len;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let sum: u32 = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !u16::try_from((folded & 0xffff) + (folded >> 16)).unwrap();
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());

    let mut p = Vec::new();
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02]);
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
    p.extend_from_slice(payload);
    p
}

/// Runs a command in this thread's namespace; fails the test if it fails.
fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("cannot run {}: {e}", args[0]));
    assert!(out.status.success(), "`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
