//! natfix userspace: loader, CLI, daemon and the tools around them.

pub mod cli;
pub mod conntrack;
pub mod daemon;
pub mod diagnose;
pub mod error;
pub mod features;
pub mod flowsync;
pub mod harness;
pub mod kfunc;
pub mod lab;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod netns;
pub mod overlay;
pub mod pins;
pub mod stats;

pub use natfix_ebpf::abi;
