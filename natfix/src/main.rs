use std::process::ExitCode;

use clap::Parser;
use natfix::{
    cli::{Cli, Command},
    daemon, error,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("NATFIX_LOG").unwrap_or_else(|_| cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let result = match &cli.command {
        Command::Attach(a) => daemon::attach(a),
        Command::Detach(t) => daemon::detach(t),
        Command::Status { json } => daemon::status(*json),
        Command::Stats(s) => daemon::stats(s),
        Command::Lab(args) => daemon::lab(args),
        Command::Diagnose(args) => natfix::diagnose::run(args),
        Command::Monitor(args) => natfix::monitor::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("natfix: error: {e:#}");
            ExitCode::from(u8::try_from(error::exit_code(&e)).unwrap_or(1))
        }
    }
}
