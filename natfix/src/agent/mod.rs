//! `natfix agent`: one long-running process per node that keeps the
//! attachments its config file lists (`config`), follows the node (`watch`:
//! signals, the file, namespaces, Docker), and makes the node match on every
//! wake-up (`reconcile`), with one `/metrics` and `/healthz` for all.
//!
//! Its attachments are pinned and recorded as the agent's: a restarted (or
//! killed) agent finds and keeps them; a stopping one detaches them unless
//! the config says `pin = true`.

pub mod config;
mod follow;
mod reconcile;
mod watch;

use std::{
    path::Path,
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::json;
use tracing::{error, info, warn};

use self::{
    reconcile::{Reconciler, Status},
    watch::Trigger,
};
use crate::{
    error::UserError,
    observe::metrics::{self, Configured, Endpoints},
    pins,
    sys::features,
};

/// After a start, a reload or a namespace event, entries that wait are
/// retried this often for `FAST_FOR` (a namespace file appears before
/// Docker mounts the namespace on it, and before its interfaces exist).
const FAST_RETRY: Duration = Duration::from_millis(200);
const FAST_FOR: Duration = Duration::from_secs(10);
/// Otherwise waiting entries are retried this often.
const SLOW_RETRY: Duration = Duration::from_secs(1);
/// Everything is checked against the kernel (and the DNAT rules read) this often.
const FULL_PASS: Duration = Duration::from_secs(10);
/// `/healthz` fails when the loop has not completed a pass for this long.
const STUCK_AFTER: Duration = Duration::from_mins(1);

/// What `/healthz` and `/metrics` say of the agent's entries.
#[derive(Default)]
struct Health {
    last_pass: Option<Instant>,
    report: Vec<(Configured, Status, String)>,
}

pub fn run(path: &Path) -> Result<()> {
    let config = config::load(path).map_err(UserError::Usage)?;
    // One malloc arena: the agent's threads (one per namespace entered) would
    // each keep one, holding the memory of every BTF parse for good.
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    features::require_privileges(true)?;
    pins::require_bpffs()?;
    let health = Arc::new(Mutex::new(Health::default()));
    let metrics = config.metrics.map(metrics::bind).transpose()?.map(|l| (l, endpoints(&health)));
    let (tx, rx) = mpsc::channel();
    let watcher = {
        let (tx, path) = (tx.clone(), path.to_owned());
        std::thread::Builder::new().name("natfix-watch".into()).spawn(move || {
            let outcome = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")
                .and_then(|rt| rt.block_on(watch::run(tx.clone(), path, metrics)));
            if let Err(e) = outcome {
                error!("{e:#}");
            }
            // Whatever ended the watchers ends the agent (its attachments are handled below).
            let _ = tx.send(Trigger::Stop);
        })?
    };
    info!("natfix agent: {} entries from {}", config.entries.len(), path.display());
    let mut rec = Reconciler::new(config);
    run_loop(&mut rec, &rx, path, &health);
    // The config in force now says (a reload may have changed it).
    if rec.pins() {
        rec.leave_attached();
        info!("stopping; the attachments stay (pin = true)");
    } else {
        info!("stopping; detaching the agent's attachments");
        rec.detach_all();
    }
    drop(rx);
    drop(watcher);
    Ok(())
}

/// Passes until told to stop.
fn run_loop(rec: &mut Reconciler, rx: &mpsc::Receiver<Trigger>, path: &Path, health: &Mutex<Health>) {
    let mut fast_until = Instant::now() + FAST_FOR;
    let mut last_full = Instant::now();
    let mut full = true;
    // When the config was last read again, until the pass after it is done.
    let mut reloaded: Option<Instant> = None;
    loop {
        let started = Instant::now();
        let waiting = rec.pass(full);
        if full {
            last_full = started;
        }
        if let Some(at) = reloaded.take() {
            info!("reload applied in {:.1} ms", at.elapsed().as_secs_f64() * 1000.0);
        }
        if let Ok(mut h) = health.lock() {
            h.last_pass = Some(Instant::now());
            h.report = rec.report();
        }
        let now = Instant::now();
        let mut wait = if !waiting {
            FULL_PASS
        } else if now < fast_until {
            FAST_RETRY
        } else {
            SLOW_RETRY
        };
        wait = wait.min((last_full + FULL_PASS).saturating_duration_since(now));
        full = false;
        let mut next = rx.recv_timeout(wait);
        // Everything queued is handled by one pass.
        loop {
            match next {
                Ok(Trigger::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Ok(Trigger::Reload(why)) => {
                    let at = Instant::now();
                    if reload(rec, path, why) {
                        reloaded = Some(at);
                    }
                    fast_until = Instant::now() + FAST_FOR;
                    full = true;
                }
                Ok(Trigger::Namespaces) => {
                    fast_until = Instant::now() + FAST_FOR;
                    full = true;
                }
                Ok(Trigger::Docker(published)) => {
                    rec.set_docker(published);
                    full = true;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            match rx.try_recv() {
                Ok(t) => next = Ok(t),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        }
        if Instant::now() >= last_full + FULL_PASS {
            full = true;
        }
    }
}

/// Reads the config again; a bad one is refused and everything stays.
fn reload(rec: &mut Reconciler, path: &Path, why: &str) -> bool {
    match config::load(path) {
        Ok(new) => {
            info!("reloading {} ({why}): {} entries", path.display(), new.entries.len());
            if new.metrics != rec.metrics_addr() {
                warn!("{}: a new `metrics` address takes effect at the agent's next start", path.display());
            }
            rec.set_config(new);
            true
        }
        Err(e) => {
            error!("config not reloaded ({why}), the running attachments stay: {e}");
            false
        }
    }
}

/// `/metrics` (every attachment on the host, and whether each configured
/// one is attached) and `/healthz` (the loop is alive; per entry state).
fn endpoints(health: &Arc<Mutex<Health>>) -> Endpoints {
    let for_scrape = Arc::clone(health);
    let for_health = Arc::clone(health);
    Endpoints {
        scrape: Arc::new(move || {
            let configured: Vec<Configured> = for_scrape.lock().map(|h| h.report.iter().map(|(c, _, _)| c.clone()).collect()).unwrap_or_default();
            metrics::scrape_all(&configured)
        }),
        health: Some(Arc::new(move || {
            let Ok(h) = for_health.lock() else { return (false, json!({"healthy": false, "why": "state poisoned"}).to_string()) };
            let age = h.last_pass.map(|t| t.elapsed());
            let healthy = age.is_some_and(|a| a < STUCK_AFTER);
            let entries: Vec<_> = h
                .report
                .iter()
                .map(|(c, status, place)| {
                    let (state, detail) = match status {
                        Status::Attached => ("attached", String::new()),
                        Status::Waiting(why) => ("waiting", why.clone()),
                        Status::Failed(why) => ("failed", why.clone()),
                    };
                    json!({"netns": c.netns, "iface": c.iface, "state": state, "detail": detail, "config": place})
                })
                .collect();
            let body = json!({"healthy": healthy, "last_pass_seconds_ago": age.map(|a| a.as_secs_f64()), "attachments": entries});
            (healthy, format!("{body}\n"))
        })),
    }
}
