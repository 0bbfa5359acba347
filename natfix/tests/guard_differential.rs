//! Differential test: the guard programs (XDP and tc) against the Rust model
//! (natfix::model) on random, structured and mutated packets. Every packet
//! must get the same verdict and the same counter from both.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use natfix::{
    abi::Counter,
    harness::{GuardHarness, flow_key, monotonic_ns, packet},
    model::guard::{Flow, GuardModel},
};
use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};

const HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const PEER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x20);

fn v4_addr() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![Just(PEER), Just(HOST), Just(Ipv4Addr::new(203, 0, 113, 9)), any::<[u8; 4]>().prop_map(Ipv4Addr::from)]
}

fn v6_addr() -> impl Strategy<Value = Ipv6Addr> {
    prop_oneof![Just(PEER6), Just(HOST6), Just("2001:db8:ff::1".parse().unwrap()), any::<[u8; 16]>().prop_map(Ipv6Addr::from)]
}

fn sport() -> impl Strategy<Value = u16> {
    prop_oneof![Just(7000u16), Just(7001), any::<u16>()]
}

fn dport() -> impl Strategy<Value = u16> {
    prop_oneof![
        Just(25000u16), Just(25001), Just(25002), Just(20000), Just(30000), Just(19999), Just(30001), Just(40000),
        any::<u16>()
    ]
}

fn ipv4_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        v4_addr(), sport(), dport(),
        prop_oneof![4 => Just(17u8), 1 => Just(6u8), 1 => any::<u8>()],
        prop::collection::vec(any::<u8>(), 0..=10).prop_map(|w| w.into_iter().flat_map(|b| [1, 1, 1, b & 1]).collect::<Vec<u8>>()),
        prop_oneof![Just(0u16), Just(0x2000), Just(0x4000), Just(0x0001), Just(0x2010), any::<u16>()],
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(src, sp, dp, proto, options, frag, payload)| {
            let mut l3 = packet::ipv4_header(src, HOST, proto, &options, frag, 8 + payload.len());
            l3.extend(packet::udp_header(sp, dp, payload.len()));
            l3.extend(payload);
            packet::eth(0x0800, &l3)
        })
}

fn ext_header() -> impl Strategy<Value = (u8, Vec<u8>)> {
    prop_oneof![
        Just((0u8, packet::opts_body())),
        Just((60u8, packet::opts_body())),
        Just((43u8, vec![0, 0, 0, 0, 0, 0, 0])),
        (any::<u16>(), any::<bool>()).prop_map(|(o, m)| (44u8, packet::frag_body(o & 0x1fff, m))),
        Just((51u8, vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])), // AH, hdrlen 1 -> 12 bytes
        (any::<u8>(), prop::collection::vec(any::<u8>(), 7)).prop_map(|(t, b)| (t, b)),
    ]
}

fn ipv6_frame() -> impl Strategy<Value = Vec<u8>> {
    (v6_addr(), sport(), dport(), prop::collection::vec(ext_header(), 0..10), prop::collection::vec(any::<u8>(), 0..32))
        .prop_map(|(src, sp, dp, exts, payload)| packet::udp6_with_ext(src, sp, HOST6, dp, &exts, &payload))
}

fn any_frame() -> impl Strategy<Value = Vec<u8>> {
    let base = prop_oneof![
        4 => ipv4_frame(),
        3 => ipv6_frame(),
        1 => (any::<u16>(), prop::collection::vec(any::<u8>(), 0..80)).prop_map(|(t, b)| packet::eth(t, &b)),
        1 => ipv4_frame().prop_map(|mut f| { f.splice(12..12, [0x81, 0x00, 0x00, 0x07]); f }),
    ];
    (base, prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4), any::<Option<prop::sample::Index>>())
        .prop_map(|(mut frame, flips, cut)| {
            // Mutations only after the Ethernet addresses keep the frame deliverable.
            for (i, b) in flips {
                if frame.len() > 12 {
                    let at = 12 + i.index(frame.len() - 12);
                    frame[at] = b;
                }
            }
            if let Some(cut) = cut {
                frame.truncate(14 + cut.index(frame.len().saturating_sub(13).max(1)));
            }
            frame
        })
}

fn run(hook: &str) {
    let plan = common::plan(&[
        "--guard", "20000-30000", "--guard", "40000", "--allow-port", "25001", "--allow-src", "203.0.113.0/24",
        "--allow-src", "2001:db8:ff::/48", "--flow-source", "own", "--guard-hook", hook,
    ]);
    let mut h = GuardHarness::load(&plan).unwrap();
    let now = monotonic_ns();
    let stale = now - plan.config.flow_timeout_ns - 10_000_000_000;
    let mut model = GuardModel {
        ranges: plan.config.ranges[..plan.config.nr_ranges as usize].to_vec(),
        allow_ports: plan.allow_ports.iter().copied().collect(),
        allow_src: plan.allow_src.clone(),
        timeout_ns: plan.config.flow_timeout_ns,
        ..GuardModel::default()
    };
    let flows: [(IpAddr, u16, IpAddr, u16, u64); 3] = [
        (HOST.into(), 25000, PEER.into(), 7000, now),
        (HOST.into(), 25002, PEER.into(), 7000, stale),
        (HOST6.into(), 25000, PEER6.into(), 7000, now),
    ];
    for (l, lp, r, rp, seen) in flows {
        h.insert_flow(&flow_key(l, lp, Some((r, rp))), seen).unwrap();
        model.flows.insert(Flow { local: l, local_port: lp, remote: Some((r, rp)) }, seen);
    }
    let cases: u32 = std::env::var("NATFIX_DIFF_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let compared = std::cell::Cell::new(0u32);
    let refused = std::cell::Cell::new(0u32);
    let seen = std::cell::RefCell::new(std::collections::BTreeMap::<Counter, u32>::new());
    runner
        .run(&any_frame(), |frame| {
            let (verdict, moved) = match h.classify(&frame) {
                Ok(r) => r,
                // tc's BPF_PROG_TEST_RUN refuses IP frames shorter than the IP header;
                // the stack would not deliver them to tc either.
                Err(_) if hook == "tc" && frame.len() < 14 + 40 => {
                    refused.set(refused.get() + 1);
                    return Ok(());
                }
                Err(e) => return Err(TestCaseError::fail(format!("test_run failed: {e:#}"))),
            };
            let want = model.verdict(&frame, now);
            prop_assert_eq!(moved, Some(want), "counter for frame {:02x?}", frame);
            let want_verdict = if model.drops(&frame, now) { h.drop_verdict() } else { h.pass() };
            prop_assert_eq!(verdict, want_verdict, "verdict for frame {:02x?}", frame);
            compared.set(compared.get() + 1);
            *seen.borrow_mut().entry(want).or_default() += 1;
            Ok(())
        })
        .unwrap();
    let (compared, refused) = (compared.get(), refused.get());
    eprintln!("{hook}: {compared} packets compared, {refused} refused by test_run");
    assert!(compared > cases / 2, "too few packets compared: {compared}");
    // The generator must reach every decision, or agreement proves little.
    let seen = seen.into_inner();
    eprintln!("{hook}: by reason {seen:?}");
    for reason in [
        Counter::GuardPassSolicited, Counter::GuardDropUnsolicited, Counter::GuardOutOfScope, Counter::GuardExemptPort,
        Counter::GuardExemptSrc, Counter::GuardMalformed, Counter::GuardFragment,
    ] {
        assert!(seen.contains_key(&reason), "{hook}: no generated packet reached {reason:?}");
    }
}

#[test]
fn xdp_guard_agrees_with_model() {
    if common::require_root() {
        run("xdp");
    }
}

#[test]
fn tc_guard_agrees_with_model() {
    if common::require_root() {
        run("tc");
    }
}
