//! The guard programs (XDP and tc, own flow table) on crafted packets via
//! `BPF_PROG_TEST_RUN`: verdict and counter per case, checked against the Rust model too.

use std::net::{Ipv4Addr, Ipv6Addr};

use natfix::abi::Counter;
use natfix_testkit::{
    frames::{HOST, HOST6, PEER, PEER6},
    harness::flow_key,
    packet,
    plans::guard_fixture as setup,
    root_setup,
};

const OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 99);
const ALLOWED_NET_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const ALLOWED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);


struct Case {
    what: &'static str,
    frame: Vec<u8>,
    want: Counter,
}

fn v4(src: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    packet::udp4(src, sport, HOST, dport, b"hello")
}

fn cases() -> Vec<Case> {
    let mut all = ipv4_cases();
    all.extend(vlan_cases());
    all.extend(ipv6_cases());
    all
}

/// IPv4: flows, the range and its exemptions, then header shapes.
fn ipv4_cases() -> Vec<Case> {
    use packet::*;
    let udp_over = |ipv4: Vec<u8>| {
        let mut l3 = ipv4;
        l3.extend(udp_header(7000, 25000, 5));
        l3.extend_from_slice(b"hello");
        eth(0x0800, &l3)
    };
    let mut truncated = v4(PEER, 7000, 25000);
    truncated.truncate(14 + 20 + 4);
    let mut bad_ihl = v4(PEER, 7000, 25000);
    bad_ihl[14] = 0x44;
    let mut short_udp_len = v4(PEER, 7001, 25000);
    short_udp_len[14 + 20 + 5] = 7;
    vec![
        Case { what: "reply to a learned flow", frame: v4(PEER, 7000, 25000), want: Counter::GuardPassSolicited },
        Case { what: "same port, other peer port", frame: v4(PEER, 7001, 25000), want: Counter::GuardDropUnsolicited },
        Case { what: "unknown peer", frame: v4(OTHER, 7000, 25000), want: Counter::GuardDropUnsolicited },
        Case { what: "flow idle past its timeout", frame: v4(PEER, 7000, 25002), want: Counter::GuardDropUnsolicited },
        Case { what: "port below the range", frame: v4(OTHER, 7000, 19999), want: Counter::GuardOutOfScope },
        Case { what: "port above the range", frame: v4(OTHER, 7000, 30001), want: Counter::GuardOutOfScope },
        Case { what: "range edge 20000", frame: v4(OTHER, 7000, 20000), want: Counter::GuardDropUnsolicited },
        Case { what: "range edge 30000", frame: v4(OTHER, 7000, 30000), want: Counter::GuardDropUnsolicited },
        Case { what: "single-port range", frame: v4(OTHER, 7000, 40000), want: Counter::GuardDropUnsolicited },
        Case { what: "published port", frame: v4(OTHER, 7000, 25001), want: Counter::GuardExemptPort },
        Case { what: "allowed source prefix", frame: v4(ALLOWED_NET_HOST, 7000, 25003), want: Counter::GuardExemptSrc },
        Case {
            what: "TCP to a guarded port",
            frame: eth(0x0800, &ipv4_header(OTHER, HOST, 6, &[], 0, 20)).into_iter().chain([0u8; 20]).collect(),
            want: Counter::GuardOutOfScope,
        },
        Case {
            what: "IPv4 options, learned flow",
            frame: udp_over(ipv4_header(PEER, HOST, 17, &[1, 1, 1, 0], 0, 13)),
            want: Counter::GuardPassSolicited,
        },
        Case {
            what: "IPv4 options, unknown flow",
            frame: udp_over(ipv4_header(OTHER, HOST, 17, &[1, 1, 1, 0, 1, 1, 1, 0], 0, 13)),
            want: Counter::GuardDropUnsolicited,
        },
        Case {
            what: "first fragment of unsolicited UDP",
            frame: udp_over(ipv4_header(OTHER, HOST, 17, &[], 0x2000, 13)),
            want: Counter::GuardDropUnsolicited,
        },
        Case {
            what: "non-first fragment",
            frame: eth(0x0800, &ipv4_header(OTHER, HOST, 17, &[], 0x0010, 8)).into_iter().chain([0u8; 8]).collect(),
            want: Counter::GuardFragment,
        },
        Case { what: "UDP header cut short", frame: truncated, want: Counter::GuardMalformed },
        Case { what: "IHL below 5", frame: bad_ihl, want: Counter::GuardMalformed },
        Case { what: "UDP length below 8", frame: short_udp_len, want: Counter::GuardMalformed },
        // (BPF_PROG_TEST_RUN for tc refuses IPv4 frames with less than a full
        // IP header, so truncation is covered by the UDP case above.)
        Case { what: "IP version 5 in an IPv4 frame", frame: eth(0x0800, &[0x55; 28]), want: Counter::GuardMalformed },
    ]
}

/// VLAN tags and other link layers.
fn vlan_cases() -> Vec<Case> {
    use packet::*;
    // 802.1Q (0x8100) and 802.1ad (0x88a8) tags: (TPID, TCI).
    let tagged = |frame: Vec<u8>, tags: &[(u16, u16)]| {
        let mut f = frame;
        let stack: Vec<u8> = tags.iter().flat_map(|(tpid, tci)| [tpid.to_be_bytes(), tci.to_be_bytes()].concat()).collect();
        f.splice(12..12, stack);
        f
    };
    vec![
        Case { what: "VLAN 100 (a VLAN device's)", frame: tagged(v4(PEER, 7001, 25000), &[(0x8100, 100)]), want: Counter::GuardOutOfScope },
        Case {
            what: "802.1Q priority tag (VLAN 0), unknown",
            frame: tagged(v4(PEER, 7001, 25000), &[(0x8100, 0xa000)]),
            want: Counter::GuardDropUnsolicited,
        },
        Case {
            what: "802.1Q priority tag, learned flow",
            frame: tagged(v4(PEER, 7000, 25000), &[(0x8100, 0)]),
            want: Counter::GuardPassSolicited,
        },
        Case {
            what: "802.1ad VLAN 0 over 802.1Q VLAN 0, unknown",
            frame: tagged(v4(PEER, 7001, 25000), &[(0x88a8, 0), (0x8100, 0)]),
            want: Counter::GuardDropUnsolicited,
        },
        Case {
            what: "IPv6 under a priority tag, unknown",
            frame: tagged(udp6(PEER6, 7009, HOST6, 25000, b"x"), &[(0x8100, 0)]),
            want: Counter::GuardDropUnsolicited,
        },
        Case {
            what: "priority tag over VLAN 7",
            frame: tagged(v4(PEER, 7001, 25000), &[(0x8100, 0), (0x8100, 7)]),
            want: Counter::GuardOutOfScope,
        },
        Case {
            what: "four priority tags, unknown",
            frame: tagged(v4(PEER, 7001, 25000), &[(0x8100, 0); 4]),
            want: Counter::GuardDropUnsolicited,
        },
        Case {
            what: "five priority tags (deeper than walked)",
            frame: tagged(v4(PEER, 7001, 25000), &[(0x8100, 0); 5]),
            want: Counter::GuardDropTooDeep,
        },
        Case { what: "ARP", frame: eth(0x0806, &[0u8; 28]), want: Counter::GuardOutOfScope },
    ]
}

/// IPv6, with extension headers.
fn ipv6_cases() -> Vec<Case> {
    use packet::*;
    let dstopts = |n: usize| -> Vec<(u8, Vec<u8>)> { (0..n).map(|_| (60, opts_body())).collect() };
    vec![
        Case { what: "IPv6 learned flow", frame: udp6(PEER6, 7000, HOST6, 25000, b"x"), want: Counter::GuardPassSolicited },
        Case { what: "IPv6 unknown", frame: udp6(PEER6, 7009, HOST6, 25000, b"x"), want: Counter::GuardDropUnsolicited },
        Case {
            what: "IPv6 hop-by-hop + dstopts, unknown",
            frame: udp6_with_ext(PEER6, 7009, HOST6, 25000, &[(0, opts_body()), (60, opts_body())], b"x"),
            want: Counter::GuardDropUnsolicited,
        },
        Case {
            what: "IPv6 first fragment, unknown",
            frame: udp6_with_ext(PEER6, 7009, HOST6, 25000, &[(44, frag_body(0, true))], b"x"),
            want: Counter::GuardDropUnsolicited,
        },
        Case {
            what: "IPv6 non-first fragment",
            frame: udp6_with_ext(PEER6, 7009, HOST6, 25000, &[(44, frag_body(3, false))], b"x"),
            want: Counter::GuardFragment,
        },
        Case {
            what: "IPv6 8 destination-options headers, unknown",
            frame: udp6_with_ext(PEER6, 7009, HOST6, 25000, &dstopts(8), b"x"),
            want: Counter::GuardDropUnsolicited,
        },
        Case {
            what: "IPv6 12 destination-options headers, unknown",
            frame: udp6_with_ext(PEER6, 7009, HOST6, 25000, &dstopts(12), b"x"),
            want: Counter::GuardDropUnsolicited,
        },
        Case {
            what: "IPv6 16 destination-options headers, learned flow",
            frame: udp6_with_ext(PEER6, 7000, HOST6, 25000, &dstopts(16), b"x"),
            want: Counter::GuardPassSolicited,
        },
        Case {
            what: "IPv6 17 destination-options headers (deeper than walked)",
            frame: udp6_with_ext(PEER6, 7000, HOST6, 25000, &dstopts(17), b"x"),
            want: Counter::GuardDropTooDeep,
        },
        Case { what: "IPv6 allowed prefix", frame: udp6(ALLOWED6, 7009, HOST6, 25000, b"x"), want: Counter::GuardExemptSrc },
    ]
}

fn run_table(hook: &str, extra: &[&str], adjust: impl Fn(Counter) -> Counter) {
    let (h, model, now) = setup(hook, extra);
    for case in cases() {
        let want = adjust(case.want);
        let (verdict, moved) = h.classify(&case.frame).unwrap_or_else(|e| panic!("{hook}: {}: {e:#}", case.what));
        assert_eq!(moved, Some(want), "{hook}: {}: counter", case.what);
        let drops = matches!(want, Counter::GuardDropUnsolicited | Counter::GuardDropTooDeep);
        let want_verdict = if drops { h.drop_verdict() } else { h.pass() };
        assert_eq!(verdict, want_verdict, "{hook}: {}: verdict", case.what);
        assert_eq!(model.verdict(&case.frame, now), want, "model disagrees on {}", case.what);
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn xdp_guard_table() {
    root_setup();
    run_table("xdp", &[], |c| c);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn tc_guard_table() {
    root_setup();
    run_table("tc", &[], |c| c);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn dry_run_drops_nothing_and_counts_would_drop() {
    root_setup();
    for hook in ["xdp", "tc"] {
        run_table(hook, &["--dry-run"], |c| match c {
            Counter::GuardDropUnsolicited | Counter::GuardDropTooDeep => Counter::GuardWouldDrop,
            other => other,
        });
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn egress_learning_admits_replies() {
    root_setup();
    for hook in ["xdp", "tc"] {
        let (h, _, _) = setup(hook, &[]);
        let remote = Ipv4Addr::new(192, 0, 2, 50);
        let reply = packet::udp4(remote, 9000, HOST, 26000, b"r");
        assert_eq!(h.classify(&reply).unwrap().1, Some(Counter::GuardDropUnsolicited), "{hook}: before learning");

        let before = h.counters().unwrap();
        let out = packet::udp4(HOST, 26000, remote, 9000, b"o");
        assert_eq!(h.run_egress(&out).unwrap(), natfix_testkit::harness::TC_NEXT, "egress never drops");
        let after = h.counters().unwrap();
        assert_eq!(after[Counter::FlowLearned].packets, before[Counter::FlowLearned].packets + 1, "{hook}: learned counted");
        assert!(h.flow(&flow_key(HOST.into(), 26000, Some((remote.into(), 9000)))).unwrap().is_some());

        assert_eq!(h.classify(&reply).unwrap(), (h.pass(), Some(Counter::GuardPassSolicited)), "{hook}: after learning");
        // Port-restricted: another peer port of the same host is still unsolicited.
        let other = packet::udp4(remote, 9001, HOST, 26000, b"r");
        assert_eq!(h.classify(&other).unwrap().1, Some(Counter::GuardDropUnsolicited));
        // A second packet of the flow refreshes; a source port outside the ranges is not learned.
        h.run_egress(&out).unwrap();
        let out_of_range = packet::udp4(HOST, 45000, remote, 9000, b"o");
        h.run_egress(&out_of_range).unwrap();
        let last = h.counters().unwrap();
        assert_eq!(last[Counter::FlowRefreshed].packets, after[Counter::FlowRefreshed].packets + 1);
        assert_eq!(last[Counter::FlowOutOfScope].packets, after[Counter::FlowOutOfScope].packets + 1);
        assert!(h.flow(&flow_key(HOST.into(), 45000, Some((remote.into(), 9000)))).unwrap().is_none());
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn endpoint_independent_filtering_admits_any_peer_after_egress() {
    root_setup();
    let (h, _, _) = setup("xdp", &["--filtering", "endpoint-independent"]);
    let out = packet::udp4(HOST, 27000, Ipv4Addr::new(192, 0, 2, 1), 3478, b"o");
    h.run_egress(&out).unwrap();
    assert!(h.flow(&flow_key(HOST.into(), 27000, None)).unwrap().is_some(), "wildcard entry");
    let third_party = packet::udp4(Ipv4Addr::new(192, 0, 2, 77), 5555, HOST, 27000, b"r");
    assert_eq!(h.classify(&third_party).unwrap().1, Some(Counter::GuardPassSolicited));
    let never_sent = packet::udp4(Ipv4Addr::new(192, 0, 2, 77), 5555, HOST, 27001, b"r");
    assert_eq!(h.classify(&never_sent).unwrap().1, Some(Counter::GuardDropUnsolicited));
}

/// The per-CPU flow cache (`natfix_flow_cache.h`) may admit a flow for one
/// window (125 ms) after the table stops knowing it, never longer.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn flow_cache_forgets_a_removed_flow_within_its_window() {
    root_setup();
    // The cache is per CPU: stay on one so the second run sees the first one's slot.
    natfix_testkit::harness::pin_to_cpu(0).unwrap();
    for hook in ["xdp", "tc"] {
        let (mut h, _, _) = setup(hook, &[]);
        let reply = v4(PEER, 7000, 25000);
        assert_eq!(h.classify(&reply).unwrap().1, Some(Counter::GuardPassSolicited), "{hook}: learned flow");
        h.remove_flow(&flow_key(HOST.into(), 25000, Some((PEER.into(), 7000)))).unwrap();
        assert_eq!(h.classify(&reply).unwrap().1, Some(Counter::GuardPassSolicited), "{hook}: cached for one window");
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(h.classify(&reply).unwrap().1, Some(Counter::GuardDropUnsolicited), "{hook}: asked the table again");
    }
}

/// The flow cache's slot for an IPv4 tuple, as `flow_cache_slot_of()` computes
/// it on a little-endian machine (fields loaded as they sit in the packet).
fn cache_slot(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> u32 {
    let addr = |a: Ipv4Addr| u32::from_le_bytes(a.octets());
    let port = |p: u16| u32::from(u16::from_le_bytes(p.to_be_bytes()));
    let mix = addr(dst) ^ addr(src) ^ (port(dport) << 16 | port(sport));
    mix.wrapping_mul(0x9e37_79b1) >> (32 - 10)
}

/// The cache admits only the exact tuple it holds: a tuple that shares its
/// slot but differs in one field asks the table, which does not know it.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn flow_cache_admits_only_its_exact_tuple() {
    root_setup();
    natfix_testkit::harness::pin_to_cpu(0).unwrap();
    let slot = cache_slot(PEER, 7000, HOST, 25000);
    let near = |a: Ipv4Addr| (1u32..1 << 16).map(move |i| Ipv4Addr::from(u32::from(a) ^ i));
    let src = near(PEER).find(|s| cache_slot(*s, 7000, HOST, 25000) == slot).expect("a remote address in the slot");
    let dst = near(HOST).find(|d| cache_slot(PEER, 7000, *d, 25000) == slot).expect("a local address in the slot");
    let sport = (1..=u16::MAX).find(|p| *p != 7000 && cache_slot(PEER, *p, HOST, 25000) == slot).expect("a remote port");
    let dport = (20000..=30000)
        .find(|p| ![25000, 25001, 25002].contains(p) && cache_slot(PEER, 7000, HOST, *p) == slot)
        .expect("a guarded local port in the slot");
    let variants = [
        ("remote address", packet::udp4(src, 7000, HOST, 25000, b"hello")),
        ("local address", packet::udp4(PEER, 7000, dst, 25000, b"hello")),
        ("remote port", v4(PEER, sport, 25000)),
        ("local port", v4(PEER, 7000, dport)),
    ];
    for hook in ["xdp", "tc"] {
        let (h, _, _) = setup(hook, &[]);
        let reply = v4(PEER, 7000, 25000);
        assert_eq!(h.classify(&reply).unwrap().1, Some(Counter::GuardPassSolicited), "{hook}: the flow, now cached");
        for (what, frame) in &variants {
            assert_eq!(h.classify(frame).unwrap().1, Some(Counter::GuardDropUnsolicited), "{hook}: same slot, other {what}");
        }
        assert_eq!(h.classify(&reply).unwrap().1, Some(Counter::GuardPassSolicited), "{hook}: the flow still passes");
    }
}

/// The port map (`guard_flow_ports`): a port that never had a flow is
/// unsolicited without a table lookup, so every way a flow enters the table
/// must mark its port first; an upgrade marks the ports of a kept table.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn flows_count_only_on_marked_ports() {
    root_setup();
    for hook in ["xdp", "tc"] {
        let (mut h, _, now) = setup(hook, &[]);
        let key = flow_key(HOST.into(), 26500, Some((PEER.into(), 7000)));
        h.insert_flow_unmarked(&key, now).unwrap();
        let reply = v4(PEER, 7000, 26500);
        assert_eq!(h.classify(&reply).unwrap().1, Some(Counter::GuardDropUnsolicited), "{hook}: unmarked port");
        h.mark_ports_of_table().unwrap();
        assert_eq!(h.classify(&reply).unwrap().1, Some(Counter::GuardPassSolicited), "{hook}: after marking");
    }
}
