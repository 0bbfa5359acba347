//! Guard plans from `natfix attach` words, and the loaded guard with a
//! fixed set of flows beside the model holding the same state.

use std::net::IpAddr;

use clap::Parser as _;
use natfix::{
    cli::{Cli, Command},
    loader::GuardPlan,
};

use crate::{
    frames::{HOST, HOST6, PEER, PEER6},
    harness::{GuardHarness, flow_key, monotonic_ns},
    model::guard::{Flow, GuardModel},
};

/// Builds a guard plan exactly as `natfix attach <words>` would.
///
/// # Panics
///
/// If `words` do not make a valid guard.
#[must_use]
pub fn plan(words: &[&str]) -> GuardPlan {
    let mut cmdline = vec!["natfix", "attach", "--iface", "test0"];
    cmdline.extend_from_slice(words);
    let Command::Attach(args) = Cli::try_parse_from(cmdline).expect("valid words").command else {
        unreachable!()
    };
    let spec = args.spec().expect("valid words");
    GuardPlan::new(spec.guard.as_ref().expect("a guard")).expect("valid plan")
}


/// The guard's test configuration: ranges, exemptions, own flow table.
pub const GUARD_WORDS: &[&str] = &[
    "--guard", "20000-30000", "--guard", "40000", "--allow-port", "25001",
    "--allow-src", "203.0.113.0/24", "--allow-src", "2001:db8:ff::/48", "--flow-source", "own",
];

/// As `GUARD_WORDS` without exemptions: the programs then take their
/// register-only IPv4 path, which exemptions switch off.
pub const GUARD_WORDS_NO_EXEMPTIONS: &[&str] = &["--guard", "20000-30000", "--guard", "40000", "--flow-source", "own"];

/// Loads the guard for `hook` with `GUARD_WORDS` + `extra`, with five flows
/// (fresh and stale IPv4, fresh IPv6, two that are also exempt), and the
/// same state into the model.
#[must_use]
pub fn guard_fixture(hook: &str, extra: &[&str]) -> (GuardHarness, GuardModel, u64) {
    guard_fixture_with(GUARD_WORDS, hook, extra)
}

/// `guard_fixture()` with `base` in place of `GUARD_WORDS`.
///
/// # Panics
///
/// If the guard does not load, or the flows cannot be put in.
#[must_use]
pub fn guard_fixture_with(base: &[&str], hook: &str, extra: &[&str]) -> (GuardHarness, GuardModel, u64) {
    let mut words = base.to_vec();
    words.extend_from_slice(&["--guard-hook", hook]);
    words.extend_from_slice(extra);
    let plan = plan(&words);
    let mut h = GuardHarness::load(&plan).expect("guard loads and verifies");
    let now = monotonic_ns();
    let stale = now - plan.live.flow_timeout_ns - 10_000_000_000;
    let mut model = GuardModel {
        ranges: plan.live.ranges.clone(),
        dry_run: extra.contains(&"--dry-run"),
        endpoint_independent: extra.contains(&"endpoint-independent"),
        allow_ports: plan.live.allow_ports.iter().copied().collect(),
        allow_src: plan.live.allow_src.clone(),
        timeout_ns: plan.live.flow_timeout_ns,
        ..GuardModel::default()
    };
    // The last two are also exempt (port, source): exemptions must win.
    let flows: [(IpAddr, u16, IpAddr, u16, u64); 5] = [
        (HOST.into(), 25000, PEER.into(), 7000, now),
        (HOST.into(), 25002, PEER.into(), 7000, stale),
        (HOST6.into(), 25000, PEER6.into(), 7000, now),
        (HOST.into(), 25001, PEER.into(), 7000, now),
        (HOST.into(), 25000, std::net::Ipv4Addr::new(203, 0, 113, 9).into(), 7000, now),
    ];
    for (l, lp, r, rp, seen) in flows {
        h.insert_flow(&flow_key(l, lp, Some((r, rp))), seen).unwrap();
        model.flows.insert(Flow { local: l, local_port: lp, remote: Some((r, rp)) }, seen);
    }
    (h, model, now)
}
