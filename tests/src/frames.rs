//! Random, structured and mutated frames for the differential tests and the
//! fuzz run: shaped so that every decision of the programs is reached.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::packet;
use proptest::prelude::*;

pub const HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const PEER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
pub const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
pub const PEER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x20);

pub fn v4_addr() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![Just(PEER), Just(HOST), Just(Ipv4Addr::new(203, 0, 113, 9)), any::<[u8; 4]>().prop_map(Ipv4Addr::from)]
}

pub fn v6_addr() -> impl Strategy<Value = Ipv6Addr> {
    prop_oneof![Just(PEER6), Just(HOST6), Just(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1)), any::<[u8; 16]>().prop_map(Ipv6Addr::from)]
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

/// IPv6 with extension chains of 0 to 17 headers: each side of the depth
/// the parser walks (16), and the one after it.
fn ipv6_frame() -> impl Strategy<Value = Vec<u8>> {
    let chain = prop_oneof![
        3 => prop::collection::vec(ext_header(), 0..4),
        2 => prop::collection::vec(ext_header(), 4..=17),
        2 => (14usize..=17).prop_map(|n| vec![(60u8, packet::opts_body()); n]),
    ];
    (v6_addr(), sport(), dport(), chain, prop::collection::vec(any::<u8>(), 0..32))
        .prop_map(|(src, sp, dp, exts, payload)| packet::udp6_with_ext(src, sp, HOST6, dp, &exts, &payload))
}

/// A VLAN tag's TCI: mostly VLAN id 0 (a priority tag, which the kernel
/// strips and delivers as untagged) with any priority bits, sometimes an id.
fn vlan_tci() -> impl Strategy<Value = u16> {
    prop_oneof![3 => (0u16..16).prop_map(|pcp_dei| pcp_dei << 12), 1 => 1u16..4096, 1 => any::<u16>()]
}

/// `base` behind a stack of 1 to 6 802.1Q/802.1ad tags.
fn vlan_stacked(base: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (base, prop::collection::vec((any::<bool>(), vlan_tci()), 1..=6)).prop_map(|(mut frame, tags)| {
        let stack: Vec<u8> = tags
            .into_iter()
            .flat_map(|(ad, tci)| {
                let tpid: u16 = if ad { 0x88a8 } else { 0x8100 };
                [tpid.to_be_bytes(), tci.to_be_bytes()].concat()
            })
            .collect();
        frame.splice(12..12, stack);
        frame
    })
}

pub fn guard_frame() -> impl Strategy<Value = Vec<u8>> {
    let base = prop_oneof![
        4 => ipv4_frame(),
        3 => ipv6_frame(),
        1 => (any::<u16>(), prop::collection::vec(any::<u8>(), 0..80)).prop_map(|(t, b)| packet::eth(t, &b)),
        2 => vlan_stacked(prop_oneof![ipv4_frame(), ipv6_frame()]),
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

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![4 => Just(4789u16), 1 => Just(7789), 1 => any::<u16>()]
}

/// Mostly a few recurring addresses, so that address pairs repeat (the
/// overlay's learned checksum deltas are per pair), sometimes any address.
fn overlay_addr<const N: usize>() -> impl Strategy<Value = [u8; N]> {
    prop_oneof![
        3 => (0u8..3).prop_map(|i| std::array::from_fn(|j| if j == 0 { 10 + i } else { u8::from(j + 1 == N) })),
        1 => any::<[u8; N]>(),
    ]
}

pub fn overlay_frame() -> impl Strategy<Value = Vec<u8>> {
    let v4 = (overlay_addr::<4>(), overlay_addr::<4>(), port(), prop::collection::vec(any::<u8>(), 0..1600), any::<u16>())
        .prop_map(|(s, d, p, payload, csum)| {
            let mut f = packet::udp4(Ipv4Addr::from(s), 40000, Ipv4Addr::from(d), p, &payload);
            f[40..42].copy_from_slice(&csum.to_be_bytes());
            f
        });
    let v6 = (overlay_addr::<16>(), overlay_addr::<16>(), port(), prop::collection::vec(any::<u8>(), 0..1600), any::<u16>())
        .prop_map(|(s, d, p, payload, csum)| {
            let mut f = packet::udp6(Ipv6Addr::from(s), 40000, Ipv6Addr::from(d), p, &payload);
            f[60..62].copy_from_slice(&csum.to_be_bytes());
            f
        });
    (prop_oneof![v4, v6], prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3), any::<Option<prop::sample::Index>>())
        .prop_map(|(mut f, flips, cut)| {
            for (i, b) in flips {
                let at = 12 + i.index(f.len() - 12);
                f[at] = b;
            }
            if let Some(cut) = cut {
                f.truncate(14 + cut.index(f.len() - 13));
            }
            f
        })
}


/// Option-less IPv4 datagrams from `base` with their header fields, each now
/// and then, at the edges the programs' one-pass IPv4 paths test (version/IHL
/// byte, total length, each fragment bit, protocol, UDP length): those paths
/// and the general parser must agree on each.
fn with_v4_edges(base: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    fn edge<T: Clone + std::fmt::Debug + 'static>(valid: T, edges: Vec<T>) -> impl Strategy<Value = T> {
        prop_oneof![2 => Just(valid), 1 => prop::sample::select(edges)]
    }
    let ver_ihl = edge(0x45u8, vec![0x44, 0x46, 0x55, 0x35, 0x4f]);
    let tot_len = edge(None, vec![Some(0u16), Some(19), Some(20), Some(21), Some(0xffff)]);
    let frag = edge(0u16, (0..16).map(|b| 1u16 << b).chain([0x1fff, 0xe000, 0x6000]).collect());
    let proto = edge(17u8, vec![6, 0x91]);
    // The UDP length: real, one off either way, or absolute.
    let udp_len = edge(Err(0i32), vec![Err(-1), Err(1), Ok(0u16), Ok(7), Ok(8), Ok(9), Ok(0xffff)]);
    (base, ver_ihl, tot_len, frag, proto, udp_len).prop_map(|(mut f, ver_ihl, tot_len, frag, proto, udp_len)| {
        f[14] = ver_ihl;
        if let Some(t) = tot_len {
            f[16..18].copy_from_slice(&t.to_be_bytes());
        }
        f[20..22].copy_from_slice(&frag.to_be_bytes());
        f[23] = proto;
        let real = i32::try_from(f.len() - 34).expect("small frame");
        let ulen = udp_len.unwrap_or_else(|delta| u16::try_from(real + delta).expect("small frame"));
        f[38..40].copy_from_slice(&ulen.to_be_bytes());
        f
    })
}

/// Header edges of option-less IPv4 VXLAN datagrams (the overlay's one-pass path).
pub fn overlay_v4_edge_frame() -> impl Strategy<Value = Vec<u8>> {
    with_v4_edges(
        (port(), prop::collection::vec(any::<u8>(), 12..64))
            .prop_map(|(dport, payload)| packet::udp4(PEER, 40000, HOST, dport, &payload)),
    )
}

/// Header edges of option-less IPv4 datagrams to the host (the guard's one-pass path).
pub fn guard_v4_edge_frame() -> impl Strategy<Value = Vec<u8>> {
    with_v4_edges(
        (v4_addr(), sport(), dport(), prop::collection::vec(any::<u8>(), 12..64))
            .prop_map(|(src, sport, dport, payload)| packet::udp4(src, sport, HOST, dport, &payload)),
    )
}

/// Frames kept in the repository: replayed first on every run, so a frame
/// that once exposed a difference keeps being checked. One hex frame per line.
///
/// # Panics
///
/// If the file is missing or not hex.
pub fn corpus(name: &str) -> Vec<Vec<u8>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| (0..l.len()).step_by(2).map(|i| u8::from_str_radix(&l[i..i + 2], 16).expect("hex")).collect())
        .collect()
}

/// How many random frames: `$NATFIX_DIFF_CASES` (the fuzz run sets 1,000,000).
#[must_use]
pub fn cases(default: u32) -> u32 {
    std::env::var("NATFIX_DIFF_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Frames checked one by one, counter included; beyond, verdicts and bytes
/// per frame and counters in aggregate (reading every counter per frame
/// would make a million frames take an hour).
pub const PER_FRAME_COUNTER_CHECKS: u32 = 3000;

/// Writes `count` generated frames (fixed seed) as a corpus file; run by hand
/// (`cargo test -p natfix --test guard_differential -- --ignored`) to refresh.
///
/// # Panics
///
/// If the file cannot be written.
pub fn write_corpus(name: &str, strategy: impl Strategy<Value = Vec<u8>>, count: usize, header: &str) {
    use proptest::strategy::ValueTree as _;
    let rng = proptest::test_runner::TestRng::from_seed(proptest::test_runner::RngAlgorithm::ChaCha, &[0x5e; 32]);
    let mut runner = proptest::test_runner::TestRunner::new_with_rng(proptest::test_runner::Config::default(), rng);
    let mut text = format!("# {header}\n# One frame per line, hex. Generated with a fixed seed; add frames that ever exposed a difference.\n");
    for _ in 0..count {
        let frame = strategy.new_tree(&mut runner).expect("tree").current();
        text.extend(frame.iter().map(|b| format!("{b:02x}")));
        text.push('\n');
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}
