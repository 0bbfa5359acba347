//! Differential test: the overlay fixer against the Rust model on random,
//! structured and mutated packets: same counter, same output bytes.

mod common;

use std::net::{Ipv4Addr, Ipv6Addr};

use natfix::{
    abi::{Counter, OVERLAY_F_NO_SECPATH, OVERLAY_F_RECOMPUTE, OverlayConfig},
    harness::{OverlayHarness, packet},
    model::overlay,
};
use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![4 => Just(4789u16), 1 => Just(7789), 1 => any::<u16>()]
}

fn frame() -> impl Strategy<Value = Vec<u8>> {
    let v4 = (any::<[u8; 4]>(), any::<[u8; 4]>(), port(), prop::collection::vec(any::<u8>(), 0..1600), any::<u16>())
        .prop_map(|(s, d, p, payload, csum)| {
            let mut f = packet::udp4(Ipv4Addr::from(s), 40000, Ipv4Addr::from(d), p, &payload);
            f[40..42].copy_from_slice(&csum.to_be_bytes());
            f
        });
    let v6 = (any::<[u8; 16]>(), any::<[u8; 16]>(), port(), prop::collection::vec(any::<u8>(), 0..1600))
        .prop_map(|(s, d, p, payload)| packet::udp6(Ipv6Addr::from(s), 40000, Ipv6Addr::from(d), p, &payload));
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

fn run(flags: u32) {
    let mut cfg = OverlayConfig { nr_ports: 2, flags, ..OverlayConfig::default() };
    cfg.vxlan_ports[..2].copy_from_slice(&[4789, 7789]);
    let h = OverlayHarness::load(&cfg).unwrap();
    let cases: u32 = std::env::var("NATFIX_DIFF_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let seen = std::cell::RefCell::new(std::collections::BTreeMap::<Counter, u32>::new());
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
        .run(&frame(), |f| {
            let (_, moved, out) = match h.classify(&f) {
                Ok(r) => r,
                // test_run refuses IP frames shorter than the IP header (tc).
                Err(_) if f.len() < 14 + 40 => return Ok(()),
                Err(e) => return Err(TestCaseError::fail(format!("{e:#}"))),
            };
            let (want, want_out) = overlay::fix(&cfg, None, &f);
            prop_assert_eq!(moved, Some(want), "counter for {:02x?}", f);
            prop_assert_eq!(out, want_out, "bytes for {:02x?}", f);
            *seen.borrow_mut().entry(want).or_default() += 1;
            Ok(())
        })
        .unwrap();
    let seen = seen.into_inner();
    eprintln!("flags {flags:#x}: {seen:?}");
    let fixed = if flags & OVERLAY_F_RECOMPUTE != 0 { Counter::OverlayRecomputed } else { Counter::OverlayZeroed };
    for c in [fixed, Counter::OverlayNotVxlan, Counter::OverlayMalformed] {
        assert!(seen.contains_key(&c), "no generated packet reached {c:?}");
    }
}

#[test]
fn zero_mode_agrees_with_model() {
    if common::require_root() {
        run(OVERLAY_F_NO_SECPATH);
    }
}

#[test]
fn recompute_mode_agrees_with_model() {
    if common::require_root() {
        run(OVERLAY_F_NO_SECPATH | OVERLAY_F_RECOMPUTE);
    }
}
