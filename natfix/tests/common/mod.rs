//! Shared by natfix's kernel-facing tests: plans from CLI words, root check.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use clap::Parser as _;
use natfix::{
    cli::{Cli, Command},
    loader::{self, GuardPlan},
};

/// Builds a guard plan exactly as `natfix attach <words>` would.
pub fn plan(words: &[&str]) -> GuardPlan {
    let mut argv = vec!["natfix", "attach", "--iface", "test0"];
    argv.extend_from_slice(words);
    let Command::Attach(args) = Cli::try_parse_from(argv).expect("valid words").command else {
        unreachable!()
    };
    loader::plan_guard(&args.guard).expect("valid plan")
}

/// BPF_PROG_TEST_RUN needs CAP_BPF/CAP_SYS_ADMIN; say so instead of failing obscurely.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIP: needs root (BPF_PROG_TEST_RUN)");
    false
}
pub mod frames;
