//! Differential test: the overlay fixer against the Rust model on the kept
//! corpus, then on random, structured and mutated frames: same counter and
//! same output bytes. `NATFIX_DIFF_CASES=1000000` is the fuzz run.

use natfix_testkit::root_setup;
use std::collections::BTreeMap;

use natfix_testkit::frames;
use natfix::abi::{Counter, OVERLAY_F_NO_SECPATH, OVERLAY_F_RECOMPUTE};
use natfix_testkit::{
    harness::{OverlayHarness, OverlaySetup},
    model::overlay,
};
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

fn refused(frame: &[u8]) -> bool {
    frame.len() < 14 + 40
}

fn run(flags: u32, cpu: usize) {
    // Learned deltas never expire within the run, and are per CPU: stay on one
    // (each test its own, so the two run side by side).
    let mut cfg = OverlaySetup::new(flags, &[4789, 7789], None);
    cfg.config.delta_window_jiffies = u32::MAX;
    natfix_testkit::harness::pin_to_cpu(cpu).unwrap();
    let h = OverlayHarness::load(&cfg).unwrap();
    let cache = std::cell::RefCell::new(overlay::DeltaCache::default());

    for frame in frames::corpus("overlay.hex") {
        if refused(&frame) {
            continue;
        }
        let (_, moved, out) = h.classify(&frame).unwrap();
        let (want, want_out) = overlay::fix_with(&cfg, None, &frame, &mut cache.borrow_mut());
        assert_eq!(moved, Some(want), "corpus frame {frame:02x?}");
        assert_eq!(out, want_out, "corpus frame {frame:02x?}");
    }

    let seen = std::cell::RefCell::new(BTreeMap::<Counter, u64>::new());
    let index = std::cell::Cell::new(0u32);
    let check = |f: Vec<u8>| -> Result<(), TestCaseError> {
        if refused(&f) {
            return Ok(());
        }
        let (want, want_out) = overlay::fix_with(&cfg, None, &f, &mut cache.borrow_mut());
        let i = index.get();
        index.set(i + 1);
        if i < frames::PER_FRAME_COUNTER_CHECKS {
            let (_, moved, out) = h.classify(&f).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
            proptest::prop_assert_eq!(moved, Some(want), "counter for {:02x?}", f);
            proptest::prop_assert_eq!(out, want_out, "bytes for {:02x?}", f);
        } else {
            let (_, out) = h.run(&f).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
            proptest::prop_assert_eq!(out, want_out, "bytes for {:02x?}", f);
        }
        *seen.borrow_mut().entry(want).or_default() += 1;
        Ok(())
    };
    // Header edges of the one-pass IPv4 path first (counters checked for each),
    // then random, structured and mutated frames.
    let runner = |seed: u8, cases: u32| {
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]);
        TestRunner::new_with_rng(Config { cases, failure_persistence: None, ..Config::default() }, rng)
    };
    runner(0x1e, 1500).run(&frames::overlay_v4_edge_frame(), check).unwrap();
    runner(0x0f, frames::cases(2000)).run(&frames::overlay_frame(), check).unwrap();
    let seen = seen.into_inner();
    eprintln!("flags {flags:#x}: {} frames compared: {seen:?}", index.get());
    let fixed = if flags & OVERLAY_F_RECOMPUTE != 0 { Counter::OverlayRecomputed } else { Counter::OverlayZeroed };
    for c in [fixed, Counter::OverlayRecomputedDelta, Counter::OverlayNotVxlan, Counter::OverlayMalformed] {
        assert!(seen.contains_key(&c), "no generated frame reached {c:?}");
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn zero_mode_agrees_with_model() {
    root_setup();
    run(OVERLAY_F_NO_SECPATH, 0);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn recompute_mode_agrees_with_model() {
    root_setup();
    run(OVERLAY_F_NO_SECPATH | OVERLAY_F_RECOMPUTE, 1);
}
