//! What wakes the agent, on an async runtime of its own thread: signals,
//! the config file changing, network namespaces appearing or going
//! (inotify), Docker publishing ports (its event stream, reconnected when
//! dockerd restarts), and the metrics/health endpoint.

use std::{
    path::{Path, PathBuf},
    sync::mpsc::Sender,
    time::Duration,
};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use inotify::{Inotify, WatchMask};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

use crate::{
    docker::Docker,
    observe::metrics::{self, Endpoints},
    published::Published,
    sys::netns::{DOCKER_NETNS_DIR, IP_NETNS_DIR},
};

/// Why the agent's loop wakes up.
#[derive(Debug)]
pub enum Trigger {
    /// Read the config again (SIGHUP, or the file changed).
    Reload(&'static str),
    /// A namespace file appeared or went.
    Namespaces,
    /// What Docker publishes now.
    Docker(Published),
    /// SIGTERM or SIGINT.
    Stop,
}

/// A change comes as several events (an editor's write, rename, chmod):
/// wait this long for the rest before acting once.
const SETTLE: Duration = Duration::from_millis(150);
/// Longest wait between attempts to reach Docker.
const DOCKER_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Runs every watcher until the receiving side is gone; `metrics` was bound
/// by the caller (a taken port fails the agent's start).
pub async fn run(tx: Sender<Trigger>, config: PathBuf, metrics: Option<(std::net::TcpListener, Endpoints)>) -> Result<()> {
    let serve = async {
        match metrics {
            Some((listener, endpoints)) => metrics::serve(listener, endpoints).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = signals(tx.clone()) => r,
        r = files(tx.clone(), &config) => r,
        r = docker(tx.clone()) => r,
        r = serve => r.context("metrics server stopped"),
    }
}

async fn signals(tx: Sender<Trigger>) -> Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        let trigger = tokio::select! {
            _ = hup.recv() => Trigger::Reload("SIGHUP"),
            _ = term.recv() => Trigger::Stop,
            _ = int.recv() => Trigger::Stop,
        };
        if tx.send(trigger).is_err() {
            return Ok(());
        }
    }
}

/// The config file's directory (editors and Kubernetes `ConfigMaps` replace
/// the file by rename), and the namespace directories. A directory that does
/// not exist yet is looked for again every few seconds.
async fn files(tx: Sender<Trigger>, config: &Path) -> Result<()> {
    let inotify = Inotify::init().context("cannot start inotify")?;
    let mut watches = inotify.watches();
    let config_dir = config.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned();
    let config_name = config.file_name().map(std::ffi::OsStr::to_owned);
    let file_mask = WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE | WatchMask::DELETE;
    let config_wd = watches.add(&config_dir, file_mask).with_context(|| format!("cannot watch {}", config_dir.display()))?;
    let mut ns_dirs: Vec<(PathBuf, Option<inotify::WatchDescriptor>)> =
        [DOCKER_NETNS_DIR, IP_NETNS_DIR].iter().map(|d| (PathBuf::from(d), None)).collect();
    let mut stream = inotify.into_event_stream(vec![0u8; 4096]).context("cannot read inotify events")?;
    let mut look_again = tokio::time::interval(Duration::from_secs(3));
    loop {
        tokio::select! {
            _ = look_again.tick() => {
                for (dir, wd) in &mut ns_dirs {
                    if wd.is_none() && dir.is_dir() {
                        match watches.add(&*dir, WatchMask::CREATE | WatchMask::DELETE | WatchMask::MOVED_TO) {
                            Ok(w) => {
                                debug!("watching {}", dir.display());
                                *wd = Some(w);
                                if tx.send(Trigger::Namespaces).is_err() { return Ok(()); }
                            }
                            Err(e) => debug!("cannot watch {}: {e}", dir.display()),
                        }
                    }
                }
            }
            event = stream.next() => {
                let Some(event) = event else { return Ok(()) };
                let event = event.context("inotify")?;
                let trigger = if event.wd == config_wd {
                    if event.name.as_deref() != config_name.as_deref() && !is_configmap_swap(event.name.as_deref()) {
                        continue;
                    }
                    tokio::time::sleep(SETTLE).await;
                    Trigger::Reload("the config file changed")
                } else {
                    if event.mask.contains(inotify::EventMask::IGNORED) {
                        // The directory itself went (dockerd cleaned up): look for it again.
                        for (_, wd) in &mut ns_dirs {
                            if wd.as_ref() == Some(&event.wd) { *wd = None; }
                        }
                    }
                    Trigger::Namespaces
                };
                if tx.send(trigger).is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// Kubernetes updates a mounted `ConfigMap` by swapping its `..data` link.
fn is_configmap_swap(name: Option<&std::ffi::OsStr>) -> bool {
    name.is_some_and(|n| n == "..data")
}

/// Follows Docker: its published ports at each (re)connection and after each
/// relevant event. Never gives up: a missing or restarting daemon is waited
/// for, with one warning per outage.
async fn docker(tx: Sender<Trigger>) -> Result<()> {
    let mut backoff = Duration::from_secs(1);
    let mut warned: Option<String> = None;
    loop {
        let mut connected = false;
        let Err(e) = follow_docker(&tx, &mut connected).await else { return Ok(()) };
        if connected {
            backoff = Duration::from_secs(1);
            warned = None;
        }
        let why = format!("{e:#}");
        if warned.as_deref() != Some(why.as_str()) {
            warn!("Docker: {why}; published ports come from the kernel's DNAT rules until it answers (retrying)");
            warned = Some(why);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(DOCKER_BACKOFF_MAX);
    }
}

/// One connection to Docker, until its event stream ends (an error) or the
/// agent stops (Ok).
async fn follow_docker(tx: &Sender<Trigger>, connected: &mut bool) -> Result<()> {
    let docker = Docker::connect().await?;
    *connected = true;
    // Subscribed before listing: nothing published in between is missed.
    let mut changes = Box::pin(docker.changes());
    info!("following Docker's events");
    if tx.send(Trigger::Docker(docker.published_udp().await?)).is_err() {
        return Ok(());
    }
    while let Some(change) = changes.next().await {
        let change = change?;
        debug!("Docker: {change}");
        // Coalesce a burst (a service's tasks starting together).
        while let Ok(Some(more)) = tokio::time::timeout(SETTLE, changes.next()).await {
            more?;
        }
        if tx.send(Trigger::Docker(docker.published_udp().await?)).is_err() {
            return Ok(());
        }
    }
    anyhow::bail!("Docker's event stream ended (dockerd stopped or restarting)")
}
