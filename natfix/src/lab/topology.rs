//! Seed 000's world in namespaces: a container behind a masquerading host,
//! and a remote peer. The lab and the end-to-end tests build it.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;

use super::scratch::{ScratchNs, sock, veth};

/// Seed 000's world: a container behind a masquerading host, and a remote peer.
///
/// ```text
/// container 10.77.0.2 --[c0|h0]-- host 10.77.0.1 / 198.51.100.10 --[ext|r0]-- remote 198.51.100.20
/// ```
/// The host masquerades 10.77.0.0/24 out of `ext` and publishes UDP
/// `PUBLISHED_PORT` to the container (DNAT), like `docker run -p`.
pub struct GuardTopology {
    pub container: ScratchNs,
    pub host: ScratchNs,
    pub remote: ScratchNs,
}

pub const CONTAINER_IP: &str = "10.77.0.2";
pub const HOST_IP: &str = "198.51.100.10";
pub const REMOTE_IP: &str = "198.51.100.20";
pub const HOST_EXT_IF: &str = "ext";
pub const PUBLISHED_PORT: u16 = 25500;

impl GuardTopology {
    pub fn build(prefix: &str) -> Result<Self> {
        let t = Self {
            container: ScratchNs::create(&format!("{prefix}-ctr"))?,
            host: ScratchNs::create(&format!("{prefix}-host"))?,
            remote: ScratchNs::create(&format!("{prefix}-remote"))?,
        };
        veth(&t.container, "c0", "10.77.0.2/24", &t.host, "h0", "10.77.0.1/24")?;
        veth(&t.host, HOST_EXT_IF, "198.51.100.10/24", &t.remote, "r0", "198.51.100.20/24")?;
        t.container.exec(&["ip", "route", "add", "default", "via", "10.77.0.1"])?;
        t.host.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        t.host.nft(&format!(
            "table ip lab_nat {{
               chain pre {{ type nat hook prerouting priority -100; iifname \"{HOST_EXT_IF}\" udp dport {PUBLISHED_PORT} dnat to {CONTAINER_IP}:{PUBLISHED_PORT}; }}
               chain post {{ type nat hook postrouting priority 100; ip saddr 10.77.0.0/24 oifname \"{HOST_EXT_IF}\" masquerade; }}
             }}"
        ))?;
        Ok(t)
    }

    /// The container sends from `port` to the remote's 7000; returns the
    /// source the remote saw (the container's external port).
    pub fn container_flow_source(&self, port: u16) -> Result<Option<SocketAddr>> {
        let rx = self.remote.recv_udp(sock(REMOTE_IP, 7000), Duration::from_millis(600))?;
        self.container.send_udp(sock(CONTAINER_IP, port), sock(REMOTE_IP, 7000), 1)?;
        Ok(rx.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??.first().copied())
    }

    /// The remote probes the host's `port` before the container has sent anything.
    pub fn remote_probe(&self, port: u16, from_port: u16) -> Result<()> {
        self.remote.send_udp(sock(REMOTE_IP, from_port), sock(HOST_IP, port), 1)
    }
}
