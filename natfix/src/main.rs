use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser;
use natfix::{
    cli::{Cli, Command, LabScenario, LogFormat},
    commands, error,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_filter(), cli.log_format);
    match run(&cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("natfix: error: {e:#}");
            ExitCode::from(u8::try_from(error::exit_code(&e)).unwrap_or(1))
        }
    }
}

/// Logs go to stderr, coloured only on a terminal (`Cli::log_filter` picks
/// the filter; a malformed one falls back to info).
fn init_logging(filter: &str, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
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
        Command::Set(s) => commands::set::run(&s.iface, s.netns.as_deref(), s.change().map_err(usage)?, s.json)?,
        Command::Reap(r) => {
            let req = commands::reap::ReapRequest {
                iface: r.iface.clone(),
                ranges: r.ranges.clone(),
                allow_ports: r.allow_ports.clone(),
                allow_src: r.allow_src.clone(),
                dry_run: r.dry_run,
            };
            commands::reap::run(r.netns.as_deref(), &req, r.json)?;
        }
        Command::Agent { config } => natfix::agent::run(config)?,
        Command::Health { addr } => commands::health::run(*addr)?,
        Command::Completions { shell } => commands::completions::completions(natfix::cli::command(), *shell, &mut std::io::stdout())?,
        Command::Man { command } => commands::completions::man(natfix::cli::command(), command.as_deref(), &mut std::io::stdout())?,
        Command::Trace(t) => commands::trace::run(&t.spec())?,
    }
    Ok(0)
}
