//! A pure-Rust model of the data plane's verdicts: a deliberate second
//! implementation of the C programs, written from their documented contracts
//! (bpf-headers/*.h), used only to test them differentially.

pub mod guard;
pub mod overlay;
pub mod parse;
