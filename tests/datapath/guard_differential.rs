//! Differential test: the guard programs (XDP and tc) against the Rust model
//! (`natfix_testkit::model`) on the kept corpus, then on random, structured and mutated
//! frames: same verdict for every frame, same counters.
//! `NATFIX_DIFF_CASES=1000000` is the fuzz run `cargo xtask test` does.

use natfix_testkit::root_setup;
use std::collections::BTreeMap;

use natfix_testkit::frames;
use natfix::abi::Counter;
use natfix_testkit::harness::GuardHarness;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// tc's `BPF_PROG_TEST_RUN` refuses IP frames shorter than the IP header; the
/// stack would not deliver them to tc either.
fn refused(hook: &str, frame: &[u8]) -> bool {
    hook == "tc" && frame.len() < 14 + 40
}

fn counter_map(h: &GuardHarness) -> BTreeMap<Counter, u64> {
    let totals = h.counters().unwrap();
    Counter::ALL.iter().map(|c| (*c, totals[*c].packets)).collect()
}

fn run(hook: &str, exemptions: bool) {
    let words = if exemptions { natfix_testkit::plans::GUARD_WORDS } else { natfix_testkit::plans::GUARD_WORDS_NO_EXEMPTIONS };
    let (h, model, now) = natfix_testkit::plans::guard_fixture_with(words, hook, &[]);
    let want_verdict = |frame: &[u8]| if model.drops(frame, now) { h.drop_verdict() } else { h.pass() };

    // The corpus, frame by frame, counters included.
    for frame in frames::corpus("guard.hex") {
        if refused(hook, &frame) {
            continue;
        }
        let (verdict, moved) = h.classify(&frame).unwrap();
        assert_eq!(moved, Some(model.verdict(&frame, now)), "{hook}: corpus frame {frame:02x?}");
        assert_eq!(verdict, want_verdict(&frame), "{hook}: corpus frame {frame:02x?}");
    }

    let cases = frames::cases(frames::PER_FRAME_COUNTER_CHECKS);
    let seen = std::cell::RefCell::new(BTreeMap::<Counter, u64>::new());
    let fast = std::cell::RefCell::new(BTreeMap::<Counter, u64>::new());
    let index = std::cell::Cell::new(0u32);
    let before = std::cell::RefCell::new(BTreeMap::new());
    let check = |frame: Vec<u8>| -> Result<(), TestCaseError> {
        if refused(hook, &frame) {
            return Ok(());
        }
        let want = model.verdict(&frame, now);
        let i = index.get();
        index.set(i + 1);
        if i < frames::PER_FRAME_COUNTER_CHECKS {
            let (verdict, moved) = h.classify(&frame).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
            proptest::prop_assert_eq!(moved, Some(want), "counter for frame {:02x?}", frame);
            proptest::prop_assert_eq!(verdict, want_verdict(&frame), "verdict for frame {:02x?}", frame);
            if i + 1 == frames::PER_FRAME_COUNTER_CHECKS {
                *before.borrow_mut() = counter_map(&h);
            }
        } else {
            let verdict = h.run_ingress(&frame).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
            proptest::prop_assert_eq!(verdict, want_verdict(&frame), "verdict for frame {:02x?}", frame);
            *fast.borrow_mut().entry(want).or_default() += 1;
        }
        *seen.borrow_mut().entry(want).or_default() += 1;
        Ok(())
    };
    let runner = |seed: u8, cases: u32| {
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]);
        TestRunner::new_with_rng(Config { cases, failure_persistence: None, ..Config::default() }, rng)
    };
    // Header edges of the one-pass IPv4 path first (counters checked for
    // each), then random, structured and mutated frames.
    let edges = 1500;
    runner(0x2e, edges).run(&frames::guard_v4_edge_frame(), check).unwrap();
    runner(0x4e, cases).run(&frames::guard_frame(), check).unwrap();

    // Counters of the frames checked by verdict only: equal in aggregate.
    let fast = fast.into_inner();
    if !fast.is_empty() {
        let (before, after) = (before.into_inner(), counter_map(&h));
        for c in Counter::ALL.iter().filter(|c| c.program() == "guard") {
            assert_eq!(after[c] - before[c], fast.get(c).copied().unwrap_or(0), "{hook}: counter {c:?} over the fuzz run");
        }
    }
    let seen = seen.into_inner();
    eprintln!("{hook} (exemptions: {exemptions}): {} frames compared: {seen:?}", index.get());
    assert!(index.get() > u32::midpoint(edges, cases), "too few frames compared");
    // The generator must reach every decision, or agreement proves little.
    let mut reasons =
        vec![Counter::GuardPassSolicited, Counter::GuardDropUnsolicited, Counter::GuardOutOfScope, Counter::GuardMalformed, Counter::GuardFragment];
    if exemptions {
        reasons.extend([Counter::GuardExemptPort, Counter::GuardExemptSrc]);
    }
    for reason in reasons {
        assert!(seen.contains_key(&reason), "{hook}: no generated frame reached {reason:?}");
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn xdp_guard_agrees_with_model() {
    root_setup();
    run("xdp", true);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn xdp_guard_without_exemptions_agrees_with_model() {
    root_setup();
    run("xdp", false);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn tc_guard_agrees_with_model() {
    root_setup();
    run("tc", true);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn tc_guard_without_exemptions_agrees_with_model() {
    root_setup();
    run("tc", false);
}
