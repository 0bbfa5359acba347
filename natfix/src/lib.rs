//! natfix userspace. The layers, bottom up (ARCHITECTURE.md):
//! `error`, `config` (what the operator asks for), `sys` (host and kernel
//! access), `record`/`pins` (what an attachment leaves in bpffs),
//! `conntrack`, `overlay`, `flowsync`, `loader` (eBPF in and out of the
//! kernel), `observe` (counters, metrics, events), `diagnose`, `lab`,
//! `commands` (one per CLI command), and `cli` (clap, on top).

pub mod agent;
pub mod cli;
pub mod commands;
pub mod config;
pub mod conntrack;
pub mod diagnose;
pub mod docker;
pub mod error;
pub mod flowsync;
pub mod lab;
pub mod loader;
pub mod nat_rules;
pub mod observe;
pub mod overlay;
pub mod pins;
pub mod published;
pub mod reap;
pub mod record;
pub mod sys;
pub mod trace;

pub use natfix_ebpf::abi;
