//! `cargo xtask`: set-up, tests, VM kernel tests and benchmarks for natfix.

mod deps;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the Debian packages natfix's build, tests and lab need.
    Deps,
    /// Boot a Debian kernel in qemu and run a scenario inside it.
    Vm(vm::VmArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Deps => deps::install(),
        Cmd::Vm(args) => vm::run(&args),
    }
}
