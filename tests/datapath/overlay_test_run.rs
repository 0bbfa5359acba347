//! The overlay fixer on crafted packets via `BPF_PROG_TEST_RUN`: verdict,
//! counter and output bytes per case, the checksum checked against
//! etherparse (an independent implementation) and the Rust model.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::UdpHeader;
use natfix::abi::{Counter, OVERLAY_F_CSUM_COMPLETE, OVERLAY_F_NO_SECPATH, OVERLAY_F_RECOMPUTE};
use natfix_testkit::{
    harness::{OverlayHarness, OverlaySetup, TC_NEXT},
    model::overlay,
    packet, root_setup,
};

const A: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const A6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 10);
const B6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);

/// Test-only flag of `config`: match Docker's reqid (a live setting, not a flag of the program's).
const MATCH_REQID: u32 = 1 << 31;

fn config(flags: u32) -> OverlaySetup {
    let reqid = (flags & MATCH_REQID != 0).then_some(0x00D0_C4E3);
    OverlaySetup::new(flags & !MATCH_REQID, &[4789, 7789], reqid)
}

/// `len` payload bytes: the low byte of `i * mul + add` for each index `i`.
#[expect(clippy::cast_possible_truncation, reason = "the low byte is the pattern")]
fn pattern(len: usize, mul: usize, add: usize) -> Vec<u8> {
    (0..len).map(|i| (i * mul + add) as u8).collect()
}

/// A VXLAN-in-UDP frame whose checksum was computed over pre-NAT addresses (wrong here).
/// (`BPF_PROG_TEST_RUN` takes skb frames up to about one page, so the largest
/// case is 3.4 KB; the same loop serves jumbo frames in the VM test.)
fn vxlan4(dport: u16, payload_len: usize) -> Vec<u8> {
    let payload = pattern(payload_len, 7, 3);
    let mut f = packet::udp4(A, 40000, B, dport, &payload);
    f[14 + 20 + 6] = 0xde; // stale checksum from before the NAT
    f[14 + 20 + 7] = 0xad;
    f
}

fn vxlan6(dport: u16, payload_len: usize) -> Vec<u8> {
    let payload = pattern(payload_len, 5, 1);
    let mut f = packet::udp6(A6, 40000, B6, dport, &payload);
    f[14 + 40 + 6] = 0xbe;
    f[14 + 40 + 7] = 0xef;
    f
}

/// etherparse's checksum for the datagram at `l4` in `frame`.
fn reference_checksum(frame: &[u8], l4: usize) -> u16 {
    let (udp, _) = UdpHeader::from_slice(&frame[l4..]).unwrap();
    let payload = &frame[l4 + 8..l4 + usize::from(udp.length)];
    match frame[12..14] {
        [0x08, 0x00] => udp
            .calc_checksum_ipv4_raw(frame[26..30].try_into().unwrap(), frame[30..34].try_into().unwrap(), payload)
            .unwrap(),
        _ => udp
            .calc_checksum_ipv6_raw(frame[22..38].try_into().unwrap(), frame[38..54].try_into().unwrap(), payload)
            .unwrap(),
    }
}

fn run(h: &OverlayHarness, cfg: &OverlaySetup, frame: &[u8], what: &str) -> (Counter, Vec<u8>) {
    let (verdict, moved, out) = h.classify(frame).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert_eq!(verdict, TC_NEXT, "{what}: the fixer never drops");
    let counter = moved.unwrap_or_else(|| panic!("{what}: no counter moved"));
    let (want_counter, want_out) = overlay::fix(cfg, None, frame);
    assert_eq!(counter, want_counter, "{what}: model disagrees on the counter");
    assert_eq!(out, want_out, "{what}: model disagrees on the bytes");
    (counter, out)
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn zero_mode_clears_ipv4_and_recomputes_ipv6() {
    root_setup();
    let cfg = config(OVERLAY_F_NO_SECPATH);
    let h = OverlayHarness::load(&cfg).unwrap();
    for len in [0, 1, 3, 50, 255, 256, 257, 1450, 3401] {
        let f = vxlan4(4789, len);
        let (c, out) = run(&h, &cfg, &f, &format!("v4 zero len {len}"));
        assert_eq!(c, Counter::OverlayZeroed);
        assert_eq!(&out[40..42], &[0, 0], "checksum zeroed");
        assert_eq!(&out[..40], &f[..40], "nothing else changed");
        assert_eq!(&out[42..], &f[42..]);

        let f6 = vxlan6(4789, len);
        let (c, out) = run(&h, &cfg, &f6, &format!("v6 zero-mode len {len}"));
        assert_eq!(c, Counter::OverlayRecomputed, "IPv6 cannot carry a zero checksum");
        assert_eq!(u16::from_be_bytes([out[60], out[61]]), reference_checksum(&f6, 54), "len {len}");
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn recompute_mode_matches_the_reference_checksum() {
    root_setup();
    let cfg = config(OVERLAY_F_NO_SECPATH | OVERLAY_F_RECOMPUTE);
    let h = OverlayHarness::load(&cfg).unwrap();
    for len in [0, 1, 2, 3, 4, 5, 63, 247, 248, 249, 255, 256, 257, 511, 512, 513, 1450, 1451, 3000, 3401] {
        for (f, l4) in [(vxlan4(7789, len), 34), (vxlan6(7789, len), 54)] {
            let (c, out) = run(&h, &cfg, &f, &format!("recompute len {len} l4 {l4}"));
            assert_eq!(c, Counter::OverlayRecomputed);
            let got = u16::from_be_bytes([out[l4 + 6], out[l4 + 7]]);
            assert_eq!(got, reference_checksum(&f, l4), "len {len}: matches etherparse");
            let mut rest = out.clone();
            rest[l4 + 6..l4 + 8].copy_from_slice(&f[l4 + 6..l4 + 8]);
            assert_eq!(rest, f, "only the checksum changed");
        }
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn out_of_scope_and_malformed_packets_are_untouched() {
    root_setup();
    let cfg = config(OVERLAY_F_NO_SECPATH | OVERLAY_F_RECOMPUTE);
    let h = OverlayHarness::load(&cfg).unwrap();
    let mut too_long = vxlan4(4789, 100);
    too_long[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&200u16.to_be_bytes()); // UDP length beyond the frame
    let mut padded = vxlan4(4789, 60);
    padded[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&30u16.to_be_bytes()); // datagram shorter than the frame
    let mut later_fragment = vxlan4(4789, 100);
    later_fragment[14 + 7] = 0x10;
    let tcp = packet::eth(0x0800, &packet::ipv4_header(A, B, 6, &[], 0, 20)).into_iter().chain([0u8; 20]).collect::<Vec<u8>>();
    let cases: Vec<(&str, Vec<u8>, Counter)> = vec![
        ("another UDP port", vxlan4(4790, 100), Counter::OverlayNotVxlan),
        ("TCP", tcp, Counter::OverlayNotVxlan),
        ("non-first fragment", later_fragment, Counter::OverlayNotVxlan),
        ("UDP length beyond the frame", too_long, Counter::OverlayMalformed),
        ("bad IHL", { let mut f = vxlan4(4789, 10); f[14] = 0x43; f }, Counter::OverlayMalformed),
    ];
    for (what, f, want) in cases {
        let (c, out) = run(&h, &cfg, &f, what);
        assert_eq!(c, want, "{what}");
        assert_eq!(out, f, "{what}: untouched");
    }
    // Trailing padding is not part of the datagram.
    let (c, out) = run(&h, &cfg, &padded, "padded");
    assert_eq!(c, Counter::OverlayRecomputed);
    assert_eq!(u16::from_be_bytes([out[40], out[41]]), reference_checksum(&padded, 34));
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn without_a_secpath_nothing_is_touched() {
    root_setup();
    // The production configuration: the secpath gate is on. BPF_PROG_TEST_RUN
    // packets never carry one, exactly like cleartext VXLAN.
    for flags in [0, OVERLAY_F_RECOMPUTE, MATCH_REQID] {
        let cfg = config(flags);
        let h = OverlayHarness::load(&cfg).unwrap();
        for f in [vxlan4(4789, 100), vxlan6(4789, 100)] {
            let (c, out) = run(&h, &cfg, &f, "cleartext");
            assert_eq!(c, Counter::OverlayCleartext);
            assert_eq!(out, f);
        }
    }
}

#[test]
fn model_checksum_agrees_with_etherparse() {
    for len in 0..600 {
        for (f, l4) in [(vxlan4(4789, len), 34), (vxlan6(4789, len), 54)] {
            let (src, dst): (IpAddr, IpAddr) = if l4 == 34 { (A.into(), B.into()) } else { (A6.into(), B6.into()) };
            assert_eq!(overlay::udp_checksum(src, dst, &f[l4..]), reference_checksum(&f, l4), "len {len}");
        }
    }
}

/// A datagram as a 1:1 NAT delivers it: its checksum sealed (inside ESP) over
/// `sealed`, its addresses now `src` -> `dst`.
fn natted(sealed: (IpAddr, IpAddr), src: IpAddr, dst: IpAddr, payload: &[u8]) -> (Vec<u8>, usize) {
    let (mut f, l4) = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (packet::udp4(s, 40000, d, 4789, payload), 34),
        (IpAddr::V6(s), IpAddr::V6(d)) => (packet::udp6(s, 40000, d, 4789, payload), 54),
        _ => unreachable!(),
    };
    let c = overlay::udp_checksum(sealed.0, sealed.1, &f[l4..]);
    f[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
    (f, l4)
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn recompute_learns_the_nat_delta_and_stays_exact() {
    root_setup();
    natfix_testkit::harness::pin_to_cpu(0).unwrap(); // learned deltas are per CPU
    let mut cfg = config(OVERLAY_F_NO_SECPATH | OVERLAY_F_RECOMPUTE);
    cfg.config.delta_window_jiffies = u32::MAX;
    let h = OverlayHarness::load(&cfg).unwrap();
    let mut cache = overlay::DeltaCache::default();
    let private = Ipv4Addr::new(10, 0, 0, 5);
    let private6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 5);
    for (sealed, src, dst) in [
        ((IpAddr::from(private), IpAddr::from(B)), IpAddr::from(A), IpAddr::from(B)),
        ((IpAddr::from(private6), IpAddr::from(B6)), IpAddr::from(A6), IpAddr::from(B6)),
    ] {
        for i in 0..40usize {
            let payload = pattern((i * 37) % 1500, 13, i);
            let (f, l4) = natted(sealed, src, dst, &payload);
            let (_, moved, out) = h.classify(&f).unwrap();
            let want = if i == 0 { Counter::OverlayRecomputed } else { Counter::OverlayRecomputedDelta };
            assert_eq!(moved, Some(want), "{src} packet {i}");
            assert_eq!(u16::from_be_bytes([out[l4 + 6], out[l4 + 7]]), reference_checksum(&f, l4), "{src} packet {i}: exact");
            assert_eq!((want, out), overlay::fix_with(&cfg, None, &f, &mut cache), "{src} packet {i}: model");
        }
    }
    // A sender without a checksum (IPv4 0) teaches nothing: summed every time.
    for i in 0..3 {
        let mut f = packet::udp4(Ipv4Addr::new(192, 0, 2, 9), 40000, B, 4789, &[i; 100]);
        f[40..42].copy_from_slice(&[0, 0]);
        let (_, moved, out) = h.classify(&f).unwrap();
        assert_eq!(moved, Some(Counter::OverlayRecomputed), "zero-checksum packet {i}");
        assert_eq!(u16::from_be_bytes([out[40], out[41]]), reference_checksum(&f, 34));
    }
}

/// A NAT that changes the mapping of a pair costs at most one window.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_learned_delta_is_relearned_after_its_window() {
    root_setup();
    natfix_testkit::harness::pin_to_cpu(0).unwrap(); // learned deltas are per CPU
    let hz = natfix::sys::features::kernel_hz().expect("HZ");
    let mut cfg = config(OVERLAY_F_NO_SECPATH | OVERLAY_F_RECOMPUTE);
    cfg.config.delta_window_jiffies = hz / 10; // 100 ms
    let h = OverlayHarness::load(&cfg).unwrap();
    let (first, _) = natted((Ipv4Addr::new(10, 0, 0, 5).into(), B.into()), A.into(), B.into(), b"one");
    assert_eq!(h.classify(&first).unwrap().1, Some(Counter::OverlayRecomputed));
    let (moved_nat, l4) = natted((Ipv4Addr::new(10, 0, 0, 99).into(), B.into()), A.into(), B.into(), b"two");
    let (_, c, out) = h.classify(&moved_nat).unwrap();
    assert_eq!(c, Some(Counter::OverlayRecomputedDelta), "within the window the old delta is used");
    assert_ne!(u16::from_be_bytes([out[l4 + 6], out[l4 + 7]]), reference_checksum(&moved_nat, l4), "and is wrong");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (_, c, out) = h.classify(&moved_nat).unwrap();
    assert_eq!(c, Some(Counter::OverlayRecomputed), "after it, summed in full");
    assert_eq!(u16::from_be_bytes([out[l4 + 6], out[l4 + 7]]), reference_checksum(&moved_nat, l4));
}

/// The in-place writer (tail call) and the `bpf_skb_store_bytes()` fallback
/// leave the same bytes and count the same.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn writer_and_helper_fallback_agree() {
    root_setup();
    for flags in [OVERLAY_F_NO_SECPATH, OVERLAY_F_NO_SECPATH | OVERLAY_F_RECOMPUTE] {
        let cfg = config(flags);
        let writer = OverlayHarness::load(&cfg).unwrap();
        let helper = OverlayHarness::load_without_writer(&cfg).unwrap();
        // As on an ESP-offloading NIC: the writer also keeps skb->csum in step.
        let complete = OverlayHarness::load(&config(flags | OVERLAY_F_CSUM_COMPLETE)).unwrap();
        for len in [0, 1, 255, 256, 1450, 3401] {
            for f in [vxlan4(4789, len), vxlan6(7789, len), vxlan4(9999, len)] {
                let (_, a_counter, a_out) = writer.classify(&f).unwrap();
                let (_, b_counter, b_out) = helper.classify(&f).unwrap();
                let (_, c_counter, c_out) = complete.classify(&f).unwrap();
                assert_eq!(a_counter, b_counter, "flags {flags:#x} len {len}");
                assert_eq!(a_out, b_out, "flags {flags:#x} len {len}");
                assert_eq!((a_counter, a_out), (c_counter, c_out), "flags {flags:#x} len {len}: csum-complete writer");
            }
        }
    }
}

/// Rewrites are the steady state: their events are sampled per CPU and
/// counter (the first, then every 64th) before the per-second budget, on
/// each path to a writer, and carry the packet's addresses and ports.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn rewrite_events_are_sampled_with_their_addresses() {
    root_setup();
    natfix_testkit::harness::pin_to_cpu(0).unwrap(); // learned deltas are per CPU
    let cfg = config(OVERLAY_F_NO_SECPATH);
    let mut h = OverlayHarness::load(&cfg).unwrap();
    let fast = vxlan4(4789, 100);
    // IPv4 with options: the general parser and the cb-directed writer.
    let payload = [0x5au8; 100];
    let mut l3 = packet::ipv4_header(A, B, 17, &[1, 1, 1, 1], 0, 8 + payload.len());
    l3.extend(packet::udp_header(40001, 7789, payload.len()));
    l3.extend_from_slice(&payload);
    let with_options = packet::eth(0x0800, &l3);

    let ev = |e: &natfix::abi::Event| (Counter::from_slot(e.counter), e.src().to_string(), e.dst().to_string(), e.len);
    let zeroed = |src: &str, dst: &str, len: usize| (Some(Counter::OverlayZeroed), src.to_owned(), dst.to_owned(), u32::try_from(len).unwrap());

    // This CPU's ZEROED count runs 1..=130: events at 1, 65 and 129.
    for _ in 0..130 {
        assert_eq!(run(&h, &cfg, &fast, "fast").0, Counter::OverlayZeroed);
    }
    let fast_ev = zeroed("203.0.113.10:40000", "198.51.100.2:4789", fast.len());
    assert_eq!(h.take_events().unwrap().iter().map(ev).collect::<Vec<_>>(), vec![fast_ev.clone(); 3]);
    // 131..=193 through the other writer: one event, at 193.
    for _ in 0..63 {
        assert_eq!(run(&h, &cfg, &with_options, "options").0, Counter::OverlayZeroed);
    }
    let opt_ev = zeroed("203.0.113.10:40001", "198.51.100.2:7789", with_options.len());
    assert_eq!(h.take_events().unwrap().iter().map(ev).collect::<Vec<_>>(), vec![opt_ev]);
    // IPv6 (recomputed: another counter, so its first is sampled).
    let v6 = vxlan6(7789, 100);
    let counter = run(&h, &cfg, &v6, "v6").0;
    let events: Vec<_> = h.take_events().unwrap().iter().map(ev).collect();
    assert_eq!(events, vec![(Some(counter), "[2001:db8:1::a]:40000".into(), "[2001:db8:2::2]:7789".into(), u32::try_from(v6.len()).unwrap())]);

    // Without the writers the helper writes, and samples alike.
    let mut helper = OverlayHarness::load_without_writer(&cfg).unwrap();
    for _ in 0..65 {
        run(&helper, &cfg, &fast, "helper");
    }
    assert_eq!(helper.take_events().unwrap().iter().map(ev).collect::<Vec<_>>(), vec![fast_ev; 2]);
}
