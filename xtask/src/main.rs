//! `cargo xtask`: set-up, tests, VM kernel tests and benchmarks for natfix.

mod bench;
mod bench_agent;
mod deps;
mod docker;
mod image;
mod run;
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
    /// Set up and run the demo: `natfix lab` in throwaway namespaces.
    Lab,
    /// Set up and run every test: unit, `BPF_PROG_TEST_RUN`, namespaces, VM.
    Test(run::TestArgs),
    /// Run the benchmarks and write BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Boot a Debian kernel in qemu and run a scenario inside it.
    Vm(vm::VmArgs),
    /// Build the runtime image natfix:latest (deploy/Dockerfile) from a release build.
    Image,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Deps => deps::install(),
        Cmd::Lab => run::lab(),
        Cmd::Test(args) => run::test(&args),
        Cmd::Bench(args) => bench::bench(&args),
        Cmd::Vm(args) => vm::run(&args),
        Cmd::Image => image::build(),
    }
}
