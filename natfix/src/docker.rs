//! Docker's view of the node, through its API on the Docker socket
//! (bollard): the UDP ports it publishes, and the events after which those
//! or its network namespaces may have changed. Best effort by design: with
//! no daemon (or a restarting one) natfix works from the kernel's view.

use std::{collections::HashMap, time::Duration};

use anyhow::{Context, Result};
use bollard::{
    models::{EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum, PortSummaryTypeEnum},
    query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder},
};
use futures_util::{Stream, StreamExt};

use crate::published::Published;

/// Where dockerd listens unless `DOCKER_HOST` names another unix socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// A request that takes longer is given up (the events stream is exempt:
/// the timeout covers only its response head).
const REQUEST_TIMEOUT_SECS: u64 = 5;

/// The socket natfix talks to: `DOCKER_HOST=unix://PATH`, else the default.
#[must_use]
pub fn socket_path() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(str::to_owned))
        .unwrap_or_else(|| DEFAULT_SOCKET.to_owned())
}

/// A connection to dockerd, at the API version it speaks.
#[derive(Debug, Clone)]
pub struct Docker {
    client: bollard::Docker,
}

impl Docker {
    /// Connects and negotiates the API version down to the daemon's
    /// (Docker 20.10 speaks 1.41; a newer client version is refused).
    pub async fn connect() -> Result<Self> {
        let path = socket_path();
        let client = bollard::Docker::connect_with_unix(&path, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
            .with_context(|| format!("no Docker socket at {path}"))?;
        let client = client.negotiate_version().await.with_context(|| format!("Docker at {path} does not answer"))?;
        Ok(Self { client })
    }

    /// The UDP ports Docker publishes on this node: containers' port
    /// bindings (bridge `-p`, swarm `mode=host`) and, on a manager, swarm
    /// services' ingress ports.
    pub async fn published_udp(&self) -> Result<Published> {
        let mut out = Published::default();
        let containers = self
            .client
            .list_containers(Some(ListContainersOptionsBuilder::new().all(false).build()))
            .await
            .context("cannot list Docker's containers")?;
        for c in containers {
            let name = c.names.as_ref().and_then(|n| n.first()).map_or("?", |n| n.trim_start_matches('/')).to_owned();
            for p in c.ports.unwrap_or_default() {
                if let (Some(PortSummaryTypeEnum::UDP), Some(port)) = (p.typ, p.public_port) {
                    out.ports.entry(port).or_insert_with(|| format!("container {name}"));
                }
            }
        }
        // Only managers list services; a worker's error here is expected.
        if let Ok(services) = self.client.list_services(None).await {
            for s in services {
                let name = s.spec.as_ref().and_then(|sp| sp.name.clone()).unwrap_or_else(|| "?".into());
                for p in s.endpoint.and_then(|e| e.ports).unwrap_or_default() {
                    let udp = p.protocol == Some(EndpointPortConfigProtocolEnum::UDP);
                    let ingress = p.publish_mode != Some(EndpointPortConfigPublishModeEnum::HOST);
                    if let (true, true, Some(port)) = (udp, ingress, p.published_port.and_then(|p| u16::try_from(p).ok())) {
                        out.ports.entry(port).or_insert_with(|| format!("service {name} (ingress)"));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Events after which published ports or namespaces may have changed:
    /// containers starting and stopping, networks and services coming and
    /// going. The stream ends (or errs) when dockerd stops.
    pub fn changes(&self) -> impl Stream<Item = Result<String>> + use<> {
        let filters: HashMap<&str, Vec<&str>> = HashMap::from([
            ("type", vec!["container", "network", "service"]),
            ("event", vec!["start", "die", "destroy", "create", "remove", "update", "connect", "disconnect"]),
        ]);
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .to_string();
        self.client.events(Some(EventsOptionsBuilder::new().since(&since).filters(&filters).build())).map(|ev| {
            let ev = ev.context("Docker's event stream broke")?;
            let actor = ev.actor.and_then(|a| a.attributes).and_then(|a| a.get("name").cloned()).unwrap_or_default();
            Ok(format!("{} {} {actor}", ev.typ.map(|t| t.to_string()).unwrap_or_default(), ev.action.unwrap_or_default()))
        })
    }
}

/// Docker's published UDP ports, or none (with the reason logged at debug)
/// when there is no reachable daemon: for a one-shot `natfix attach`.
#[must_use]
pub fn published_now(limit: Duration) -> Option<Published> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
    let got = runtime.block_on(async {
        tokio::time::timeout(limit, async { Docker::connect().await?.published_udp().await }).await
    });
    match got {
        Ok(Ok(p)) => Some(p),
        Ok(Err(e)) => {
            tracing::debug!("Docker's published ports not read: {e:#}");
            None
        }
        Err(_) => {
            tracing::warn!("Docker did not answer within {limit:?}: its published ports are not exempted (DNAT rules still are)");
            None
        }
    }
}
