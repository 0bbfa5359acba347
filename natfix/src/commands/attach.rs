//! `natfix attach`: plans and attaches; pinned attachments are left in the
//! kernel, foreground ones are served (conntrack sync, metrics, events)
//! until SIGINT/SIGTERM and then detached.

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::{
    config::{AttachSpec, ResolvedFlowSource},
    flowsync::FlowSync,
    loader::{self, AttachPlan},
    observe,
    sys::{features, netns::Netns},
};

/// How the command keeps the attachment.
#[derive(Debug, Clone, Default)]
pub struct AttachOptions {
    pub pin: bool,
    pub replace: bool,
    pub log_events: bool,
    pub metrics: Option<std::net::SocketAddr>,
}

pub fn run(spec: &AttachSpec, opts: &AttachOptions) -> Result<()> {
    features::require_privileges(spec.netns.is_some())?;
    let netns = Netns::resolve(spec.netns.as_deref())?;
    let mut plan = AttachPlan::new(spec, netns.clone(), opts.pin, opts.replace)?;
    if plan.guard.as_ref().is_some_and(|g| g.allow_published) {
        plan.docker_published = crate::docker::published_now(std::time::Duration::from_secs(2));
    }
    let metrics_listener = opts.metrics.map(observe::metrics::bind).transpose()?;
    let own_flows = plan.guard.as_ref().filter(|g| g.source == ResolvedFlowSource::Own).map(loader::GuardPlan::endpoint_independent);
    let mut att = loader::attach(plan)?;
    // The own flow table also learns from conntrack (flows older than natfix,
    // or leaving by another interface): seeded by the loader before the guard
    // attached; followed from here.
    let sync = match own_flows {
        Some(eif) => {
            let sync = FlowSync::open(&att.pin_dir, eif)?;
            att.ct_events.take().map(|stream| (sync, stream))
        }
        None => None,
    };
    if opts.pin {
        if own_flows.is_some() {
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
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
    let metrics_dir = att.pin_dir.clone();
    let events_dir = opts.log_events.then(|| att.pin_dir.clone());
    let outcome = runtime.block_on(async {
        let follow = async {
            match sync {
                Some((sync, stream)) => sync.follow(stream, netns).await.context("conntrack sync stopped"),
                None => std::future::pending().await,
            }
        };
        let metrics = async {
            match metrics_listener {
                Some(listener) => observe::metrics::serve(listener, observe::metrics::Endpoints::one(metrics_dir)).await.context("metrics server stopped"),
                None => std::future::pending().await,
            }
        };
        let events = async {
            match events_dir {
                Some(dir) => observe::events::log_events(dir).await.context("event logging stopped"),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = super::wait_for_shutdown() => r,
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
