//! VXLAN devices and the UDP ports they receive on: the overlay fix's
//! `--vxlan-port auto` reads them in the attachment's namespace, the host's
//! and Docker's (swarm's `--data-path-port` changes the port from 4789).

use std::{collections::BTreeSet, path::Path, process::Command};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::netns::{DOCKER_NETNS_DIR, Netns};
use crate::{abi::MAX_VXLAN_PORTS, config::VXLAN_PORT};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanDev {
    pub name: String,
    pub vni: Option<u64>,
    pub port: u16,
    /// `IFLA_VXLAN_UDP_CSUM`; None if iproute2 did not say.
    pub udp_csum: Option<bool>,
    pub up: bool,
}

/// Devices in `ip -d -j link show type vxlan` output (empty output: none).
pub fn parse_vxlan_links(json: &str) -> Result<Vec<VxlanDev>> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_str(json).context("`ip -d -j link` printed invalid JSON")?;
    let mut out = Vec::new();
    for link in v.as_array().into_iter().flatten() {
        let info = &link["linkinfo"];
        if info["info_kind"] != "vxlan" {
            continue;
        }
        let data = &info["info_data"];
        out.push(VxlanDev {
            name: link["ifname"].as_str().unwrap_or("?").to_owned(),
            vni: data["id"].as_u64(),
            port: data["port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(VXLAN_PORT),
            udp_csum: data["udp_csum"].as_bool(),
            up: link["flags"].as_array().is_some_and(|f| f.iter().any(|x| x == "UP")),
        });
    }
    Ok(out)
}


/// The VXLAN devices of the calling thread's namespace (`ip -d -j link`).
pub fn read_here() -> Result<Vec<VxlanDev>> {
    let out = Command::new("ip").args(["-d", "-j", "link", "show", "type", "vxlan"]).output().context("cannot run ip")?;
    if !out.status.success() {
        bail!("`ip -d -j link show type vxlan` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    parse_vxlan_links(&String::from_utf8_lossy(&out.stdout))
}

/// VXLAN ports found, and where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discovered {
    pub ports: BTreeSet<u16>,
    /// `dev@namespace:port` for each device, for the log.
    pub seen: Vec<String>,
}

/// The ports of the VXLAN devices in `target`, natfix's own namespace (the
/// host's, as deployed) and every Docker namespace. A namespace that cannot
/// be read is skipped: discovery is best effort, 4789 stands in for none.
#[must_use]
pub fn discover(target: &Netns) -> Discovered {
    let mut namespaces = vec![target.clone()];
    if let Ok(own) = Netns::current() {
        namespaces.push(own);
    }
    namespaces.extend(docker_namespaces());
    let mut seen_inodes = BTreeSet::new();
    let mut found = Discovered::default();
    for ns in namespaces {
        if !seen_inodes.insert(ns.inode) {
            continue;
        }
        let Ok(devs) = ns.run(read_here) else { continue };
        for d in devs {
            found.ports.insert(d.port);
            found.seen.push(format!("{}@{}:{}", d.name, ns.spec, d.port));
        }
    }
    found
}

/// The ports `--vxlan-port auto` stands for: those discovered, else 4789
/// (Docker's default, for a swarm not yet created).
#[must_use]
pub fn auto_ports(found: &Discovered) -> Vec<u16> {
    if found.ports.is_empty() { vec![VXLAN_PORT] } else { found.ports.iter().copied().take(MAX_VXLAN_PORTS).collect() }
}

fn docker_namespaces() -> Vec<Netns> {
    let Ok(dir) = std::fs::read_dir(Path::new(DOCKER_NETNS_DIR)) else { return Vec::new() };
    dir.filter_map(Result::ok).filter_map(|e| Netns::resolve(Some(e.path().to_str()?)).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_what_was_found_else_4789() {
        assert_eq!(auto_ports(&Discovered::default()), vec![4789]);
        let found = Discovered { ports: BTreeSet::from([4789, 4777]), seen: vec![] };
        assert_eq!(auto_ports(&found), vec![4777, 4789]);
        let many = Discovered { ports: (5000..5020).collect(), seen: vec![] };
        assert_eq!(auto_ports(&many).len(), MAX_VXLAN_PORTS, "the data plane holds at most 8");
    }
}
