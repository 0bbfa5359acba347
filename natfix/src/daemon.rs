//! The commands that manage attachments: foreground `attach`, `detach`, `status`, `stats`.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tracing::{info, warn};

use crate::{
    cli::{AttachArgs, LabArgs, LabScenario, StatsArgs, TargetArgs},
    lab,
    error::UserError,
    features,
    flowsync::FlowSync,
    loader::{self, AttachRequest},
    netns::Netns,
    pins::{self, AttachmentMeta, PinDir},
    stats,
};

pub fn attach(args: &AttachArgs) -> Result<()> {
    if !args.guard.enabled() && !args.overlay.overlay_fix {
        crate::cli::validate_overlay(&args.overlay).map_err(UserError::Usage)?;
        bail!(UserError::Usage("nothing to attach: give --guard RANGE and/or --overlay-fix".into()));
    }
    let overlay = loader::plan_overlay(&args.overlay)?;
    let guard = if args.guard.enabled() { Some(loader::plan_guard(&args.guard)?) } else { None };
    features::require_privileges(args.target.netns.is_some())?;
    let netns = Netns::resolve(args.target.netns.as_deref())?;
    let metrics_listener = args.metrics.map(crate::metrics::bind).transpose()?;
    let own_flows = guard.as_ref().is_some_and(|g| g.source == loader::ResolvedFlowSource::Own);
    let eif = guard.as_ref().is_some_and(|g| g.config.flags & crate::abi::GUARD_F_ENDPOINT_INDEP != 0);
    let mut att = loader::attach(AttachRequest {
        netns: netns.clone(),
        iface: args.target.iface.clone(),
        guard,
        overlay,
        pin: args.pin,
        replace: args.replace,
        events_per_sec: args.events_rate,
    })?;
    // The own flow table also learns from conntrack (flows older than natfix,
    // or leaving by another interface).
    let sync = if own_flows {
        // Seeded by the loader before the guard attached; follow from here.
        let sync = FlowSync::open(&att.pin_dir.map(pins::GUARD_FLOWS), args.guard.ranges.clone(), eif)?;
        att.ct_events.take().map(|stream| (sync, stream))
    } else {
        None
    };
    if args.pin {
        if own_flows {
            warn!("--pin: the own flow table was seeded from conntrack once; it keeps learning from egress only");
        }
        println!("natfix pinned on {} ({}); remove with `natfix detach`", att.iface, att.pin_dir.path.display());
        // Links and maps live on in bpffs; dropping our handles keeps them.
        drop(att);
        return Ok(());
    }
    // Loading parsed the kernel's BTF (megabytes) and the objects: hand the
    // freed heap back to the system before idling for days.
    // SAFETY: glibc's malloc_trim only releases free memory.
    unsafe { libc::malloc_trim(0) };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let metrics_dir = att.pin_dir.clone();
    let events_dir = args.log_events.then(|| att.pin_dir.clone());
    let outcome = runtime.block_on(async {
        let follow = async {
            match sync {
                Some((sync, stream)) => sync.follow(stream, netns).await.context("conntrack sync stopped"),
                None => std::future::pending().await,
            }
        };
        let metrics = async {
            match metrics_listener {
                Some(listener) => crate::metrics::serve(listener, metrics_dir).await.context("metrics server stopped"),
                None => std::future::pending().await,
            }
        };
        let events = async {
            match events_dir {
                Some(dir) => crate::monitor::log_events(dir).await.context("event logging stopped"),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = wait_for_shutdown() => r,
            r = follow => r,
            r = metrics => r,
            r = events => r,
        }
    });
    info!("detaching from {}", att.iface);
    // Detach whatever ended the wait: a failing task must not leave programs behind.
    let detached = att.detach();
    outcome.and(detached)
}

async fn wait_for_shutdown() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
    Ok(())
}

pub fn detach(args: &TargetArgs) -> Result<()> {
    features::require_privileges(args.netns.is_some())?;
    pins::require_bpffs()?;
    let resolved = Netns::resolve(args.netns.as_deref());
    let dir = resolved.as_ref().ok().map(|ns| PinDir::new(ns.inode, &args.iface)).filter(|d| d.meta_path().exists());
    let Some(dir) = dir else {
        // Nothing here under that name now; records of an earlier namespace
        // by that name (deleted, or recreated with another inode) may remain.
        let spec = args.netns.as_deref().unwrap_or("self");
        if forget_records_of_gone_namespaces(spec, &args.iface)? > 0 {
            return Ok(());
        }
        let netns = resolved?;
        bail!(UserError::NotFound(format!(
            "natfix is not attached to {} in namespace `{}` (see `natfix status`)",
            args.iface, netns.spec
        )));
    };
    let netns = resolved?;
    let meta = dir.read_meta()?;
    if !meta.written_in(netns.run(|| Ok(crate::netns::current_cookie()))?) {
        dir.remove()?;
        bail!(UserError::NotFound(format!(
            "natfix is not attached to {} in namespace `{}`: the record there was left by a deleted namespace with the same inode, and is removed now",
            args.iface, netns.spec
        )));
    }
    if !meta.pinned
        && let Some(pid) = meta.pid.filter(|_| meta.is_live())
    {
        // A foreground attach owns it: ask it to clean up, and wait.
        info!("asking natfix attach (pid {pid}) to detach");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid)?), nix::sys::signal::Signal::SIGTERM)
            .with_context(|| format!("cannot signal pid {pid}"))?;
        for _ in 0..100 {
            if !dir.meta_path().exists() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("pid {pid} did not detach within 10 s");
    }
    loader::detach_pinned(&dir, &meta, &netns)?;
    println!("detached natfix from {} in namespace `{}`", args.iface, netns.spec);
    Ok(())
}

/// Removes the records of `iface` in namespaces once called `spec` that no
/// file names any more (or whose inode went to another namespace); returns
/// how many. Their links are gone with their devices; what natfix changed
/// inside such a namespace cannot be reached from here, so only pins go.
fn forget_records_of_gone_namespaces(spec: &str, iface: &str) -> Result<usize> {
    let mut forgotten = 0;
    for dir in PinDir::list_all() {
        let Ok(meta) = dir.read_meta() else { continue };
        // A namespace still reachable is detached the normal way, by its current name.
        if meta.netns != spec || meta.iface != iface || meta.find_netns().is_ok() {
            continue;
        }
        dir.remove()?;
        forgotten += 1;
        println!(
            "removed natfix's record of {iface} in namespace `{spec}` (inode {}): that namespace is gone or out of reach, and natfix's pins for it are released",
            meta.netns_inode
        );
    }
    Ok(forgotten)
}

#[derive(serde::Serialize)]
struct StatusEntry {
    state: &'static str,
    #[serde(flatten)]
    meta: AttachmentMeta,
}

pub fn status(json: bool) -> Result<()> {
    pins::require_bpffs()?;
    let mut entries = Vec::new();
    for dir in PinDir::list_all() {
        let meta = dir.read_meta()?;
        // A pinned record outlives its namespace (pins are keyed by inode);
        // only the cookie check can say so, and only for records that have one.
        let gone = meta.netns_cookie.is_some() && meta.find_netns().is_err();
        let state = if gone {
            "stale"
        } else if meta.pinned {
            "pinned"
        } else if meta.is_live() {
            "running"
        } else {
            "stale"
        };
        entries.push(StatusEntry { state, meta });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "attachments": entries }))?);
        return Ok(());
    }
    if entries.is_empty() {
        println!("no natfix attachments");
    }
    for e in &entries {
        let owner = e.meta.pid.map_or_else(String::new, |p| format!(" pid {p}"));
        println!(
            "{} netns {} (inode {}) {}{}",
            e.meta.iface, e.meta.netns, e.meta.netns_inode, e.state, owner
        );
        if e.state == "stale" {
            let ns = if e.meta.netns == "self" { String::new() } else { format!(" --netns {}", e.meta.netns) };
            println!("  its namespace or process is gone: `natfix detach --iface {}{ns}` releases it", e.meta.iface);
        }
        for p in &e.meta.programs {
            println!("  {:<20} {:<10} {:<8} prog id {}", p.name, p.hook, p.mode, p.prog_id);
        }
        if let Some(o) = &e.meta.overlay {
            println!(
                "  overlay vxlan ports {:?} csum {} backend {}{}",
                o.vxlan_ports,
                o.csum,
                o.backend,
                o.changes.nft_table.as_ref().map_or_else(String::new, |t| format!(" (nft table ip {t})"))
            );
        }
        if let Some(g) = &e.meta.guard {
            println!(
                "  guard ports {} flow source {} ({}){}",
                g.ranges.join(","),
                g.flow_source,
                g.filtering,
                if g.dry_run { " dry-run" } else { "" }
            );
        }
    }
    Ok(())
}

pub fn stats(args: &StatsArgs) -> Result<()> {
    pins::require_bpffs()?;
    let netns_inode = match &args.netns {
        Some(spec) => Some(Netns::resolve(Some(spec))?.inode),
        None => None,
    };
    loop {
        let all = stats::collect(args.iface.as_deref(), netns_inode)?;
        if all.is_empty() && (args.iface.is_some() || netns_inode.is_some()) {
            bail!(UserError::NotFound("no natfix attachment matches (see `natfix status`)".into()));
        }
        if args.json {
            println!("{}", serde_json::to_string(&serde_json::json!({ "attachments": all }))?);
        } else {
            print!("{}", stats::render_table(&all));
        }
        let Some(every) = args.watch else { return Ok(()) };
        std::thread::sleep(every);
    }
}

pub fn lab(args: &LabArgs) -> Result<()> {
    features::require_privileges(true)?;
    pins::require_bpffs()?;
    let mut ok = true;
    let mut skipped = false;
    if matches!(args.scenario, LabScenario::Guard | LabScenario::All) {
        ok &= lab::run_guard_lab()?;
    }
    if matches!(args.scenario, LabScenario::Overlay | LabScenario::All) {
        match lab::run_overlay_lab()? {
            Some(fixed) => ok &= fixed,
            None => skipped = true,
        }
    }
    if !ok {
        bail!("the lab did not show every problem fixed (see above)");
    }
    if skipped {
        bail!(UserError::Unsupported(
            "the overlay scenario needs ESP, which this kernel lacks: run `cargo xtask vm --scenario esp-nat --mode baseline,natfix-auto`".into()
        ));
    }
    println!("lab: every problem reproduced and fixed");
    Ok(())
}
