//! What a foreground `natfix attach` does for its attachment while it runs,
//! done by the agent for each of its pinned ones: the own flow table kept in
//! step with conntrack events, and sampled events logged. One thread each,
//! stopped when the attachment goes or changes place.

use std::{thread::JoinHandle, time::Duration};

use anyhow::{Context, Result};
use tokio::sync::oneshot;
use tracing::warn;

use crate::{flowsync::FlowSync, observe, pins::PinDir, sys::netns::Netns};

pub struct Follower {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl Follower {
    /// `own`: the attachment has the own flow table (`Some(endpoint_independent)`).
    pub fn start(dir: PinDir, netns: Netns, own: Option<bool>, log_events: bool) -> Result<Self> {
        // Subscribed and seeded here, so an error is the caller's to report.
        let sync = match own {
            Some(eif) => {
                let mut sync = FlowSync::open(&dir, eif)?;
                let stream = sync.subscribe_and_seed(&netns)?;
                Some((sync, stream))
            }
            None => None,
        };
        let (stop, stopped) = oneshot::channel();
        let label = format!("{} in {}", dir.iface_name().unwrap_or_default(), netns.spec);
        let thread = std::thread::Builder::new()
            .name("natfix-follow".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(r) => r,
                    Err(e) => return warn!("{label}: cannot start a runtime: {e}"),
                };
                let outcome = runtime.block_on(async {
                    let follow = async {
                        match sync {
                            Some((sync, stream)) => sync.follow(stream, netns).await.context("conntrack sync stopped"),
                            None => std::future::pending().await,
                        }
                    };
                    let events = async {
                        if log_events { observe::events::log_events(dir).await.context("event logging stopped") } else { std::future::pending().await }
                    };
                    tokio::select! {
                        _ = stopped => Ok(()),
                        r = follow => r,
                        r = events => r,
                    }
                });
                if let Err(e) = outcome {
                    warn!("{label}: {e:#}");
                }
            })
            .context("cannot spawn a follower thread")?;
        Ok(Self { stop, thread })
    }

    /// Whether it ended by itself (an error it logged): started again on the next pass.
    #[must_use]
    pub fn finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Stops it and waits (briefly) for its thread.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let end = std::time::Instant::now() + Duration::from_secs(2);
        while !self.thread.is_finished() && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.thread.is_finished() {
            let _ = self.thread.join();
        }
    }
}
