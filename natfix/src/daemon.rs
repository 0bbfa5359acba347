//! The commands that manage attachments: foreground `attach`, `detach`, `status`, `stats`.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tracing::info;

use crate::{
    cli::{AttachArgs, StatsArgs, TargetArgs},
    error::UserError,
    features,
    loader::{self, AttachRequest},
    netns::Netns,
    pins::{self, AttachmentMeta, PinDir},
    stats,
};

pub fn attach(args: &AttachArgs) -> Result<()> {
    if !args.guard.enabled() {
        bail!(UserError::Usage("nothing to attach: give at least one --guard RANGE".into()));
    }
    features::require_privileges(args.target.netns.is_some())?;
    let netns = Netns::resolve(args.target.netns.as_deref())?;
    let plan = loader::plan_guard(&args.guard)?;
    let att = loader::attach(AttachRequest {
        netns,
        iface: args.target.iface.clone(),
        guard: plan,
        pin: args.pin,
    })?;
    if args.pin {
        println!("natfix pinned on {} ({}); remove with `natfix detach`", att.iface, att.pin_dir.path.display());
        // Links and maps live on in bpffs; dropping our handles keeps them.
        drop(att);
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(wait_for_shutdown())?;
    info!("detaching from {}", att.iface);
    att.detach()
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
    let netns = Netns::resolve(args.netns.as_deref())?;
    let dir = PinDir::new(netns.inode, &args.iface);
    if !dir.meta_path().exists() {
        bail!(UserError::NotFound(format!(
            "natfix is not attached to {} in namespace `{}` (see `natfix status`)",
            args.iface, netns.spec
        )));
    }
    let meta = dir.read_meta()?;
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
        let state = if meta.pinned {
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
        for p in &e.meta.programs {
            println!("  {:<20} {:<10} {:<8} prog id {}", p.name, p.hook, p.mode, p.prog_id);
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
