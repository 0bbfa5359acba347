use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser;
use natfix::{
    cli::{Cli, Command, LabScenario},
    commands, error,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    match run(&cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("natfix: error: {e:#}");
            ExitCode::from(u8::try_from(error::exit_code(&e)).unwrap_or(1))
        }
    }
}

/// Logs go to stderr, coloured only on a terminal; NATFIX_LOG, then
/// RUST_LOG, then `--log` choose the filter.
fn init_logging(flag: &str) {
    let filter = std::env::var("NATFIX_LOG").or_else(|_| std::env::var("RUST_LOG")).unwrap_or_else(|_| flag.to_owned());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// Runs the command; Ok carries the exit code.
fn run(command: &Command) -> anyhow::Result<u8> {
    let usage = |e: String| anyhow::Error::from(error::UserError::Usage(e));
    match command {
        Command::Attach(a) => {
            let spec = a.spec().map_err(usage)?;
            let opts = commands::attach::AttachOptions { pin: a.pin, replace: a.replace, log_events: a.log_events, metrics: a.metrics };
            commands::attach::run(&spec, &opts)?;
        }
        Command::Detach(t) => commands::detach::run(&t.iface, t.netns.as_deref())?,
        Command::Status { json } => commands::status::run(*json)?,
        Command::Stats(s) => commands::stats::run(s.iface.as_ref(), s.netns.as_deref(), s.json, s.watch)?,
        Command::Lab(l) => commands::lab::run(
            matches!(l.scenario, LabScenario::Guard | LabScenario::All),
            matches!(l.scenario, LabScenario::Overlay | LabScenario::All),
        )?,
        Command::Diagnose(d) => {
            if commands::diagnose::run(d.netns.as_deref(), d.json, d.sample)? {
                return Ok(error::EXIT_PROBLEMS);
            }
        }
        Command::Monitor(m) => commands::monitor::run(m.iface.as_ref(), m.netns.as_deref(), m.json, m.count)?,
        Command::Trace(t) => commands::trace::run(&t.spec())?,
    }
    Ok(0)
}
