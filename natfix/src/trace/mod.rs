//! `natfix trace`: follows the packets a filter matches, and their replies,
//! through every traced namespace, hook by hook.
//!
//! Three sources, joined by tuple (`flows`) and ordered per packet (`path`):
//! - nftables tracing (`nftrace`, `marking`, `ruleset`): a natfix-owned table
//!   in each traced namespace marks the filter's packets, and the kernel
//!   reports every rule that then matched them, over netlink;
//! - BPF tracepoints (`drops`): where a packet was dropped (with the kernel's
//!   reason), sent out of a device, or queued to a socket;
//! - conntrack events (`ct`): the entry a flow created, its NAT mapping, and
//!   the de-NAT its replies get; plus natfix's own programs' verdicts (`own`).
//!
//! Everything installed (marking tables, programs) goes when the session
//! does, and when the process dies: the tables are owned by an `nft` child
//! holding our pipe, the programs' links are our file descriptors.

pub mod ct;
pub mod drops;
pub mod filter;
pub mod flows;
pub mod marking;
pub mod nftrace;
pub mod obs;
pub mod own;
pub mod path;
pub mod render;
pub mod ruleset;
pub mod session;
pub mod steps;
pub mod tuple;

use std::{
    os::unix::fs::MetadataExt as _,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Result;

pub use filter::Filter;
pub use render::Path;
pub use session::Session;

use crate::sys::netns::{DOCKER_NETNS_DIR, IP_NETNS_DIR, Netns};

/// What to trace, resolved.
#[derive(Debug, Clone)]
pub struct TraceOptions {
    pub filter: Filter,
    /// (label, namespace) of every traced namespace.
    pub namespaces: Vec<(String, Netns)>,
    pub iface: Option<String>,
    /// Stop after this many packets (not counting replies) were traced.
    pub count: u64,
    pub timeout: Duration,
}

/// How steps name natfix's own namespace: `host` when it is PID 1's.
#[must_use]
pub fn own_label(own: &Netns) -> String {
    let init = std::fs::metadata("/proc/1/ns/net").map(|m| m.ino()).ok();
    if init == Some(own.inode) { "host".into() } else { "self".into() }
}

/// The default set: natfix's own namespace, every Docker namespace
/// (`/var/run/docker/netns`) and every `ip netns` one. Files that no longer
/// name a namespace (left behind by a deleted one) are skipped.
pub fn default_namespaces() -> Result<Vec<(String, Netns)>> {
    let own = Netns::current()?;
    let mut out = vec![(own_label(&own), own)];
    for dir in [DOCKER_NETNS_DIR, IP_NETNS_DIR] {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        for name in names {
            let path = format!("{dir}/{name}");
            match Netns::resolve(Some(&path)) {
                Ok(ns) if !out.iter().any(|(_, o)| o.inode == ns.inode) => out.push((name, ns)),
                Ok(_) => {}
                Err(e) => tracing::debug!("not tracing {path}: {e:#}"),
            }
        }
    }
    Ok(out)
}

/// Set by SIGINT/SIGTERM: stop tracing and print what was seen.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Quiet this long after the last observation: the packets counted have settled.
const SETTLE: Duration = Duration::from_secs(1);

/// Traces until `count` packets and their replies were seen (or settled),
/// the timeout passed, or [`STOP`] was set; returns their paths.
pub fn run(opts: &TraceOptions) -> Result<Vec<Path>> {
    let mut session = Session::start(opts)?;
    let ids: Vec<String> = session.prog_ids().iter().map(|(tp, id)| format!("{tp} {id}")).collect();
    tracing::info!("tracepoint programs attached (ids: {})", ids.join(", "));
    tracing::info!(
        "tracing `{}` in {} namespaces ({}); stop with Ctrl-C",
        opts.filter,
        opts.namespaces.len(),
        opts.namespaces.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>().join(", ")
    );
    let deadline = Instant::now() + opts.timeout;
    let (mut seen, mut last_change, mut last_check) = (0usize, Instant::now(), Instant::now());
    while !STOP.load(Ordering::Relaxed) && Instant::now() < deadline {
        session.poll(Duration::from_millis(50))?;
        let now = session.observed();
        if now != seen {
            (seen, last_change) = (now, Instant::now());
        }
        if last_check.elapsed() >= Duration::from_millis(200) && seen > 0 {
            last_check = Instant::now();
            if done(&session.paths(), opts.count, last_change.elapsed()) {
                break;
            }
        }
    }
    session.refresh_names();
    let paths = session.paths();
    Ok(keep_first(paths, opts.count))
}

/// `count` packets are in, each with its reply, or the trace went quiet.
fn done(paths: &[Path], count: u64, quiet: Duration) -> bool {
    let heads: Vec<usize> = (0..paths.len()).filter(|&i| !paths[i].reply).collect();
    if (heads.len() as u64) < count {
        return false;
    }
    let answered = heads.iter().take(usize::try_from(count).unwrap_or(usize::MAX)).all(|&i| {
        paths[i].dir_reply || paths.get(i + 1).is_some_and(|p| p.reply)
    });
    (answered && quiet >= Duration::from_millis(300)) || quiet >= SETTLE
}

/// The first `count` packets with their replies, numbered.
fn keep_first(paths: Vec<Path>, count: u64) -> Vec<Path> {
    let mut heads = 0u64;
    let mut out: Vec<Path> = paths
        .into_iter()
        .take_while(|p| {
            heads += u64::from(!p.reply);
            heads <= count
        })
        .collect();
    render::number(&mut out);
    out
}
