//! Per-packet cost of every program path with `BPF_PROG_TEST_RUN`, as a ratio
//! to an empty program of the same type measured in the same run
//! (interleaved, so machine noise hits both alike). One JSON line per row.
//! Run by `cargo xtask bench`; `NATFIX_BENCH_RUNS`/`NATFIX_BENCH_REPEAT` override,
//! `NATFIX_BENCH_ONLY=<substring>` keeps the matching rows.


mod common;

use std::{net::Ipv4Addr, process::Command};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use natfix::{
    abi::{OVERLAY_F_CSUM_COMPLETE, OVERLAY_F_NO_SECPATH, OVERLAY_F_RECOMPUTE},
    loader::{GuardPlan, object::load_program},
};
use natfix_ebpf::rig;
use natfix_testkit::{
    harness::{GuardHarness, OverlayHarness, flow_key, monotonic_ns},
    packet,
};

const HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn plan(words: &[&str]) -> GuardPlan {
    let mut argv = vec!["--guard", "20000-30000"];
    argv.extend_from_slice(words);
    natfix_testkit::plans::plan(&argv)
}

struct Empty {
    ebpf: aya::Ebpf,
}

impl Empty {
    fn load() -> Self {
        let mut ebpf = aya::Ebpf::load(rig::OBJECT).unwrap();
        load_program::<Xdp>(&mut ebpf, rig::EMPTY_XDP).unwrap();
        load_program::<SchedClassifier>(&mut ebpf, rig::EMPTY_TC).unwrap();
        Self { ebpf }
    }

    #[expect(clippy::cast_precision_loss, reason = "ns of a test run, far below 2^52")]
    fn run(&self, xdp: bool, frame: &[u8], repeat: u32) -> f64 {
        let opts = TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::default() };
        let r = if xdp {
            let p: &Xdp = self.ebpf.program(rig::EMPTY_XDP).unwrap().try_into().unwrap();
            p.test_run(opts).unwrap()
        } else {
            let p: &SchedClassifier = self.ebpf.program(rig::EMPTY_TC).unwrap().try_into().unwrap();
            p.test_run(opts).unwrap()
        };
        r.duration.as_nanos() as f64
    }
}

type Subject = (String, bool, Vec<u8>, Box<dyn Fn(&[u8], u32) -> f64>);

fn main() {
    // Accept and ignore libtest's arguments (cargo bench passes --bench).
    let runs = env_u32("NATFIX_BENCH_RUNS", 7) as usize;
    let repeat = env_u32("NATFIX_BENCH_REPEAT", 500_000);
    natfix_testkit::in_fresh_netns(move || bench(runs, repeat));
}

fn bench(runs: usize, repeat: u32) {
    seed_conntrack();
    let empty = Empty::load();
    let mut subjects = guard_subjects();
    subjects.extend(overlay_subjects());
    if let Ok(only) = std::env::var("NATFIX_BENCH_ONLY") {
        subjects.retain(|s| s.0.contains(&only));
    }
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); subjects.len()];
    for _ in 0..runs {
        for (i, (_, xdp, frame, run)) in subjects.iter().enumerate() {
            // Baseline right before the subject, on the same frame.
            results[i].1.push(empty.run(*xdp, frame, repeat));
            results[i].0.push(run(frame, repeat));
        }
    }
    for ((name, xdp, _, _), (r, b)) in subjects.into_iter().zip(results) {
        let base = if xdp { "empty XDP" } else { "empty tc" };
        common::report_paired("test_run", &name, "ns/packet", &r, base, &b, false);
    }
}

/// Conntrack entries for the kfunc paths: a masqueraded flow's reply direction.
fn seed_conntrack() {
    let nft = Command::new("nft")
        .args(["add table ip b; add chain ip b c { type filter hook input priority 0; }; add rule ip b c ct state established accept"])
        .status();
    assert!(nft.is_ok_and(|s| s.success()), "nft");
    let ct = Command::new("conntrack")
        .args(["-I", "-p", "udp", "-s", "198.51.100.10", "-d", "198.51.100.20", "--sport", "25000", "--dport", "7000"])
        .args(["-r", "198.51.100.20", "-q", "198.51.100.10", "--reply-port-src", "7000", "--reply-port-dst", "25000", "-t", "600"])
        .output()
        .unwrap();
    assert!(ct.status.success(), "conntrack -I: {}", String::from_utf8_lossy(&ct.stderr));
}

/// The guard's paths under each hook, with its own flow table and with
/// conntrack, and the egress flow learner.
fn guard_subjects() -> Vec<Subject> {
    let solicited = packet::udp4(PEER, 7000, HOST, 25000, &[0u8; 18]);
    let unsolicited = packet::udp4(PEER, 7001, HOST, 25000, &[0u8; 18]);
    let out_of_scope = packet::udp4(PEER, 7000, HOST, 443, &[0u8; 18]);
    // To a guarded port no flow ever used: the port map decides (own table).
    let unused_port = packet::udp4(PEER, 7001, HOST, 29999, &[0u8; 18]);

    let mut subjects: Vec<Subject> = Vec::new();
    for (hook, xdp) in [("xdp", true), ("tc", false)] {
        let mut own = GuardHarness::load(&plan(&["--guard-hook", hook, "--flow-source", "own"])).unwrap();
        own.insert_flow(&flow_key(HOST.into(), 25000, Some((PEER.into(), 7000))), monotonic_ns()).unwrap();
        let own = std::rc::Rc::new(own);
        for (path, frame) in [
            ("pass", &solicited),
            ("drop", &unsolicited),
            ("drop, port without flows", &unused_port),
            ("out-of-scope", &out_of_scope),
        ] {
            let h = own.clone();
            subjects.push((
                format!("guard {hook} own: {path}"),
                xdp,
                frame.clone(),
                Box::new(move |f, r| h.run_ingress_repeat(f, r).unwrap().1),
            ));
        }
        if xdp {
            // The tc egress learner (the same program under either hook): an
            // outgoing packet of a known flow, and one it does not learn from.
            let reply_out = packet::udp4(HOST, 25000, PEER, 7000, &[0u8; 18]);
            let mut tcp = packet::ipv4_header(HOST, PEER, 6, &[], 0, 20);
            tcp.extend_from_slice(&[0u8; 20]);
            let tcp_out = packet::eth(0x0800, &tcp);
            for (path, frame) in [("refresh", reply_out), ("out-of-scope", tcp_out)] {
                let h = own.clone();
                subjects.push((format!("flow learner (tc egress): {path}"), false, frame, Box::new(move |f, r| h.run_egress_repeat(f, r).unwrap())));
            }
        }
        let ct = std::rc::Rc::new(GuardHarness::load(&plan(&["--guard-hook", hook, "--flow-source", "conntrack"])).unwrap());
        for (path, frame) in [("pass", &solicited), ("drop", &unsolicited)] {
            let h = ct.clone();
            subjects.push((
                format!("guard {hook} conntrack: {path}"),
                xdp,
                frame.clone(),
                Box::new(move |f, r| h.run_ingress_repeat(f, r).unwrap().1),
            ));
        }
    }
    subjects
}

/// The overlay fix's paths, on small and on overlay-sized frames.
fn overlay_subjects() -> Vec<Subject> {
    let mut subjects: Vec<Subject> = Vec::new();
    let overlay_cfg = |flags, delta_window_jiffies| {
        let mut c = natfix_testkit::harness::OverlaySetup::new(flags, &[4789], None);
        c.config.delta_window_jiffies = delta_window_jiffies;
        c
    };
    let hz = natfix::sys::features::kernel_hz().expect("HZ");
    let load = |flags, window| std::rc::Rc::new(OverlayHarness::load(&overlay_cfg(flags, window)).unwrap());
    let zero = load(OVERLAY_F_NO_SECPATH, hz);
    // On a NIC that decrypts ESP itself the writer also updates skb->csum.
    let zero_hw = load(OVERLAY_F_NO_SECPATH | OVERLAY_F_CSUM_COMPLETE, hz);
    // As attached: a delta learned per address pair, re-learned once a second.
    let learned = load(OVERLAY_F_NO_SECPATH | OVERLAY_F_RECOMPUTE, hz);
    // What a pair's first datagram (and one a second after) costs.
    let full = load(OVERLAY_F_NO_SECPATH | OVERLAY_F_RECOMPUTE, 0);
    let gated = load(0, hz);
    let fallback = std::rc::Rc::new({
        let cfg = overlay_cfg(OVERLAY_F_NO_SECPATH, hz);
        OverlayHarness::load_without_writer(&cfg).unwrap()
    });
    for size in [64usize, 1450] {
        // Sealed with the sender's pre-NAT address, as behind a 1:1 NAT.
        let mut frame = packet::udp4(PEER, 40000, HOST, 4789, &vec![0x5a; size - 42]);
        let sealed = natfix_testkit::model::overlay::udp_checksum(Ipv4Addr::new(10, 0, 0, 5).into(), HOST.into(), &frame[34..]);
        frame[40..42].copy_from_slice(&sealed.to_be_bytes());
        for (mode, h) in [
            ("zero", &zero),
            ("zero, ESP-offloading NIC (keeps skb->csum)", &zero_hw),
            ("zero, no writer (bpf_skb_store_bytes fallback)", &fallback),
            ("recompute, steady state (learned delta)", &learned),
            ("recompute, full sum (a pair's first datagram, then once a second)", &full),
            ("secpath gate (cleartext)", &gated),
        ] {
            let h = h.clone();
            subjects.push((format!("overlay {mode}: {size} B"), false, frame.clone(), Box::new(move |f, r| h.run_repeat(f, r).unwrap())));
        }
    }

    // What every other packet on the underlay costs the overlay fix: UDP
    // that is not VXLAN (counted `not_vxlan`), as attached (secpath gate on).
    for size in [64usize, 1450] {
        let frame = packet::udp4(PEER, 7000, HOST, 25000, &vec![0u8; size - 42]);
        let h = gated.clone();
        subjects.push((format!("overlay out-of-scope (UDP, not VXLAN): {size} B"), false, frame, Box::new(move |f, r| h.run_repeat(f, r).unwrap())));
    }
    subjects
}
