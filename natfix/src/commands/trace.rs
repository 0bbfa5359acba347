//! `natfix trace`: follows matching packets and their replies, then prints
//! their paths. Nothing it installs outlives it (see `trace`).

use std::io::Write as _;

use anyhow::{Result, bail};

use crate::{
    config::TraceSpec,
    error::UserError,
    sys::{features, netns::Netns},
    trace::{self, Filter, TraceOptions, render},
};

extern "C" fn on_signal(_: libc::c_int) {
    trace::STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// SIGINT/SIGTERM end the trace (printing what it saw) instead of the process.
fn catch_signals() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    // No SA_RESTART: the trace's poll returns at once.
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(())
}

/// `--netns` resolved (`self` is natfix's own), or the default set.
fn namespaces(specs: &[String]) -> Result<Vec<(String, Netns)>> {
    if specs.is_empty() {
        return trace::default_namespaces();
    }
    let mut out: Vec<(String, Netns)> = Vec::new();
    for spec in specs {
        let (label, ns) = if spec == "self" {
            let own = Netns::current()?;
            (trace::own_label(&own), own)
        } else {
            (spec.clone(), Netns::resolve(Some(spec))?)
        };
        if !out.iter().any(|(_, o)| o.inode == ns.inode) {
            out.push((label, ns));
        }
    }
    Ok(out)
}

fn require_nft() -> Result<()> {
    let ok = std::process::Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        bail!(UserError::Unsupported("`nft` (nftables) is not installed: natfix trace marks packets with it".into()));
    }
    Ok(())
}

/// Whether some traced namespace has interface `iface`.
fn iface_exists(namespaces: &[(String, Netns)], iface: &str) -> bool {
    namespaces.iter().any(|(_, ns)| {
        let name = iface.to_owned();
        ns.run(move || Ok(nix::net::if_::if_nametoindex(name.as_str()).is_ok())).unwrap_or(false)
    })
}

pub fn run(spec: &TraceSpec) -> Result<()> {
    let filter = Filter::parse(&spec.filter).map_err(UserError::Usage)?;
    features::require_privileges(true)?;
    let namespaces = namespaces(&spec.netns)?;
    require_nft()?;
    let iface = spec.iface.as_ref().map(ToString::to_string);
    if let Some(i) = &iface
        && !iface_exists(&namespaces, i)
    {
        bail!(UserError::NotFound(format!("no traced namespace has an interface `{i}`")));
    }
    catch_signals()?;
    let opts = TraceOptions { filter, namespaces, iface, count: spec.count, timeout: spec.timeout };
    let paths = trace::run(&opts)?;
    if paths.is_empty() {
        bail!(UserError::NotFound(format!(
            "no packet matched `{}` within {} s (everything natfix trace installed is removed)",
            opts.filter,
            spec.timeout.as_secs()
        )));
    }
    let text = if spec.json { render::json_lines(&paths)? } else { render::text(&paths) };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}
