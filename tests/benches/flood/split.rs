//! The small-packet rows' costs at the receiver (part `split`): solicited
//! 64 B and 1,400 B UDP through the tc configurations with the receive path
//! on a CPU of its own, as in the flood's receiver table (threaded NAPI on
//! `fr0`, its kthread on CPU 1; the generator `SCHED_FIFO` on CPU 0), and the
//! receiver's CPU time per packet per window. Each configuration's window
//! runs between two baseline windows (`flanked_sequence`), programs swapped
//! between windows as in the legit part.
//!
//! What a row's ratio says: packets per second of receiver CPU through the
//! configuration over those through the baseline beside it, which is the
//! throughput ratio of a receiver whose CPU is the bottleneck (the `>= 97%`
//! rows' question without the generator on the same CPU). The detail splits
//! the difference in ns per packet into the hook's share (an empty tc
//! program, an empty nftables chain at the rule's hook) and natfix's share
//! on top of it.
//!
//! The frames reach a bound socket whose buffer is full from the first
//! window on (no reader: CPU 1 is the receiver's): the path measured ends
//! at the socket's enqueue, the same in every window.

use std::{collections::HashMap, net::Ipv4Addr, time::Duration};

use aya::programs::SchedClassifier;
use natfix::lab::scratch::{bind_udp, sock};
use natfix_testkit::harness::{GuardHarness, flow_key, monotonic_ns};

use crate::{
    Host, LARGE_PAYLOAD, LegitRates, SMALL_PAYLOAD, TcSubjects, Window, attach_counting_xdp, bench_count, flanked_sequence, guard_plan, load_program,
    overlay_as_attached,
    receiver::threaded_napi,
    rig::{GenProgram, Generator, Rig, ok},
    rig_programs,
};
use crate::common::{self, TrafficWindow};

/// Every tc configuration of the legit part, and its baseline.
const CONFIGS: [Window; 7] = [Window::Baseline, Window::EmptyTc, Window::Natfix, Window::Overlay, Window::OverlayTc, Window::OverlayNft, Window::EmptyNft];

/// Windows of `configs` with the receiver on CPU 1: each window's frames
/// (counted by the XDP program every frame passes first) over the NAPI
/// kthread's CPU time.
fn split_windows(host: Host, payload: usize, rounds: usize, window: u32) -> LegitRates {
    let tag = format!("s{}{}", if host == Host::DockerNode { "d" } else { "b" }, if payload == SMALL_PAYLOAD { "" } else { "L" });
    let rig = Rig::new(&tag, payload);
    if host == Host::DockerNode {
        ok(rig.rx_ns.nft(include_str!("../data/docker-node.nft")), "loading the Docker node's netfilter");
    }
    let netns = ok(rig.rx_ns.netns(), "the receiver's namespace");
    ok(crate::rig::in_ns(&netns, move || Ok(split_in_receiver(&rig, rounds, window))), "the split windows")
}

fn split_in_receiver(rig: &Rig, rounds: usize, window: u32) -> LegitRates {
    let mut guard = ok(GuardHarness::load(&guard_plan("tc")), "the tc guard");
    let (local, peer) = (Ipv4Addr::new(198, 51, 100, 10).into(), Ipv4Addr::new(198, 51, 100, 20).into());
    ok(guard.insert_flow(&flow_key(local, 25000, Some((peer, 7000))), monotonic_ns()), "the flow");
    let _socket = ok(bind_udp(sock("198.51.100.10", 25000)).map_err(Into::into), "the application's socket");
    let mut base = ok(aya::Ebpf::load(rig_programs::OBJECT).map_err(Into::into), "the rig's programs");
    // The counting XDP program stays on fr0 in every window: it gives the veth NAPI and counts the frames.
    let mut xdp_link = Some(attach_counting_xdp(&mut base));
    ok(load_program::<SchedClassifier>(&mut base, rig_programs::EMPTY_TC).map(drop), "the empty tc program");
    let mut s = TcSubjects { guard, overlay: overlay_as_attached(), base, with_learner: false, guard_xdp: None };
    let kthread = ok(threaded_napi(rig), "the receiver's NAPI kthread");
    let mut generator = Generator::start_with(rig, GenProgram::Rig, true);
    generator.burst(window); // warm-up; fills the socket's buffer
    let fr0 = nix::net::if_::if_nametoindex("fr0").expect("fr0");
    let mut rates = LegitRates::new(0.0);
    let passes = |s: &TcSubjects| bench_count(&s.base, "natfix_bench_passes");
    s.rotate(&flanked_sequence(&CONFIGS, rounds), "tc", fr0, &mut xdp_link, |s, w| {
        let (p0, (c0, _)) = (passes(s), ok(crate::receiver::schedstat(kthread), "schedstat"));
        generator.burst(window);
        std::thread::sleep(Duration::from_millis(5)); // the ring drains
        let (p1, (c1, _)) = (passes(s), ok(crate::receiver::schedstat(kthread), "schedstat"));
        rates.push(w, TrafficWindow { frames: (p1 - p0) as f64, secs: (c1 - c0) as f64 / 1e9 });
    });
    drop(xdp_link);
    rates
}

/// Median over rounds of (window's ns per packet - the mean of the
/// baseline windows beside it): the configuration's cost in ns per packet.
fn flanked_ns(r: &LegitRates, w: Window) -> f64 {
    let ns = |t: &TrafficWindow| t.secs * 1e9 / t.frames;
    let seq = &r.sequence;
    let mut d: Vec<f64> = (1..seq.len().saturating_sub(1))
        .filter(|&i| seq[i].0 == w && seq[i - 1].0 == Window::Baseline && seq[i + 1].0 == Window::Baseline)
        .map(|i| ns(&seq[i].1) - f64::midpoint(ns(&seq[i - 1].1), ns(&seq[i + 1].1)))
        .collect();
    common::summary(&mut d).0
}

pub fn split(rounds: usize, window: u32) {
    const GROUP: &str = "throughput at the receiver: solicited UDP, receiver CPU per packet";
    for (host, payload, on) in [
        (Host::DockerNode, SMALL_PAYLOAD, "on a Docker node, 64 B frames"),
        (Host::DockerNode, LARGE_PAYLOAD, "on a Docker node, 1,400 B frames"),
        (Host::Bare, LARGE_PAYLOAD, "on a bare receiver, 1,400 B frames"),
    ] {
        let r = split_windows(host, payload, rounds, window);
        let d: HashMap<Window, f64> = CONFIGS.iter().map(|&w| (w, if w == Window::Baseline { 0.0 } else { flanked_ns(&r, w) })).collect();
        let base_ns = {
            let mut v: Vec<f64> = r.of(Window::Baseline).iter().map(|t| t.secs * 1e9 / t.frames).collect();
            common::summary(&mut v).0
        };
        let (tc, nft) = (d[&Window::EmptyTc], d[&Window::EmptyNft]);
        for (w, what, hook) in [
            (Window::Natfix, "natfix's tc guard", tc),
            (Window::Overlay, "natfix's overlay fix with both mechanisms (--csum-backend both: tc program + nftables rule)", tc + nft),
            (Window::OverlayTc, "the overlay fix's tc program alone", tc),
            (Window::OverlayNft, "the overlay fix as attached by default for IPv4 (its nftables rule alone)", nft),
            (Window::EmptyTc, "an empty tc program (the tc hook's own cost)", 0.0),
            (Window::EmptyNft, "an empty nftables chain at the rule's hook (the netfilter hook's own cost)", 0.0),
        ] {
            let total = d[&w];
            let detail = if hook == 0.0 && matches!(w, Window::EmptyTc | Window::EmptyNft) {
                format!("receiver {base_ns:.0} ns/packet through the baseline; this hook adds {total:.1} ns/packet")
            } else {
                format!(
                    "receiver {base_ns:.0} ns/packet through the baseline; this adds {total:.1} ns/packet: the hook{} {hook:.1}, natfix's programs {:.1}",
                    if w == Window::Overlay { "s (tc + netfilter)" } else { "" },
                    total - hook
                )
            };
            let name = format!("solicited UDP {on} through {what}");
            let ratios = r.flanked(w);
            common::report_flanked_with(GROUP, &name, "packets/s per CPU", &r.of(w), "a counting pass-all XDP program alone", &r.of(Window::Baseline), &ratios, &serde_json::json!({ "detail": detail }));
        }
    }
}
