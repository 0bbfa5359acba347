//! Healing a host that already suffers (seed 000): the conntrack entries
//! that unsolicited UDP created before the guard was there hold ports, and
//! masquerade gives a container's flow another one for as long as they live.
//! `reap` deletes exactly those entries: UDP, never replied to, not DNAT'd
//! (published), the original direction from an address outside to one of
//! this namespace's own, to a guarded, not exempt port, and from a source
//! routed through the guarded interface (a container's or the host's own
//! flows never are). Runs in the calling thread's namespace.

use std::{collections::BTreeMap, net::IpAddr, process::Command};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::{
    config::{Cidr, PortRange},
    conntrack::{self, CtEntry, IPS_DST_NAT, IPS_SEEN_REPLY},
    error::UserError,
};

/// What to reap on one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReapScope {
    pub iface: String,
    pub ranges: Vec<PortRange>,
    /// Exempt (published) ports: their entries stay.
    pub exempt: Vec<u16>,
    /// Trusted sources (`--allow-src`): their entries stay.
    pub trusted: Vec<Cidr>,
}

impl ReapScope {
    fn covers(&self, src: IpAddr, port: u16) -> bool {
        self.ranges.iter().any(|r| r.contains(port)) && !self.exempt.contains(&port) && !self.trusted.iter().any(|c| c.contains(src))
    }
}

/// One entry reaped (or that would be, under dry-run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reaped {
    pub iface: String,
    pub src: String,
    pub dst: String,
}

/// Whether `e` was created by unsolicited inbound UDP to a port `scope`
/// covers (the source's route is checked apart).
#[must_use]
pub fn is_unsolicited_inbound(e: &CtEntry, local: &[IpAddr], scope: &ReapScope) -> bool {
    local.contains(&e.orig.dst)
        && !local.contains(&e.orig.src)
        && scope.covers(e.orig.src, e.orig.dport)
        && e.status & (IPS_SEEN_REPLY | IPS_DST_NAT) == 0
}

/// This namespace's own addresses.
#[must_use]
pub fn local_addrs() -> Vec<IpAddr> {
    nix::ifaddrs::getifaddrs()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            let a = i.address?;
            a.as_sockaddr_in().map(|s| IpAddr::V4(s.ip())).or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        })
        .collect()
}

/// The interface `ip route get ADDR` would send to `addr` by.
fn route_dev(addr: IpAddr) -> Option<String> {
    let out = Command::new("ip").args(["-j", "route", "get", &addr.to_string()]).output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get(0)?.get("dev")?.as_str().map(str::to_owned)
}

/// Finds, and unless `dry_run` deletes, the entries `scopes` cover.
pub fn reap_here(scopes: &[ReapScope], dry_run: bool) -> Result<Vec<Reaped>> {
    let entries = conntrack::dump_udp().map_err(|e| {
        let unsupported = e.chain().filter_map(|c| c.downcast_ref::<std::io::Error>()).any(|io| {
            matches!(io.raw_os_error(), Some(libc::EPROTONOSUPPORT | libc::EAFNOSUPPORT | libc::ENOENT))
        });
        if unsupported {
            anyhow::Error::from(UserError::Unsupported("conntrack is not available in this namespace (nf_conntrack not loaded)".into()))
        } else {
            e.context("cannot read the conntrack table")
        }
    })?;
    let local = local_addrs();
    let mut routes: BTreeMap<IpAddr, Option<String>> = BTreeMap::new();
    let mut found: Vec<(String, CtEntry)> = Vec::new();
    for e in entries {
        let Some(scope) = scopes.iter().find(|s| is_unsolicited_inbound(&e, &local, s)) else { continue };
        let dev = routes.entry(e.orig.src).or_insert_with(|| route_dev(e.orig.src));
        if dev.as_deref() == Some(scope.iface.as_str()) {
            found.push((scope.iface.clone(), e));
        }
    }
    if !dry_run {
        let origs: Vec<_> = found.iter().map(|(_, e)| e.orig).collect();
        conntrack::delete_udp(&origs).context("cannot delete conntrack entries")?;
    }
    Ok(found
        .into_iter()
        .map(|(iface, e)| Reaped {
            iface,
            src: std::net::SocketAddr::new(e.orig.src, e.orig.sport).to_string(),
            dst: std::net::SocketAddr::new(e.orig.dst, e.orig.dport).to_string(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::CtTuple;

    fn entry(src: &str, sport: u16, dst: &str, dport: u16, status: u32) -> CtEntry {
        let (s, d): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        CtEntry {
            orig: CtTuple { src: s, dst: d, sport, dport },
            reply: CtTuple { src: d, dst: s, sport: dport, dport: sport },
            status,
            timeout_secs: None,
        }
    }

    #[test]
    fn only_unreplied_inbound_to_a_covered_port_is_reaped() {
        let local: Vec<IpAddr> = vec!["198.51.100.10".parse().unwrap()];
        let scope = ReapScope {
            iface: "ext".into(),
            ranges: vec![PortRange { first: 20000, last: 30000 }],
            exempt: vec![25500],
            trusted: vec!["203.0.113.0/24".parse().unwrap()],
        };
        let yes = entry("198.51.100.20", 7000, "198.51.100.10", 25000, 0);
        assert!(is_unsolicited_inbound(&yes, &local, &scope));
        for (no, why) in [
            (entry("198.51.100.20", 7000, "198.51.100.10", 25000, IPS_SEEN_REPLY), "replied"),
            (entry("198.51.100.20", 7000, "198.51.100.10", 25500, 0), "exempt port"),
            (entry("198.51.100.20", 7000, "198.51.100.10", 31000, 0), "port not guarded"),
            (entry("203.0.113.9", 7000, "198.51.100.10", 25000, 0), "trusted source"),
            (entry("198.51.100.20", 7000, "198.51.100.10", 25000, IPS_DST_NAT), "published (DNAT)"),
            (entry("198.51.100.10", 25000, "198.51.100.20", 7000, 0), "opened by the host"),
            (entry("10.77.0.2", 25000, "198.51.100.20", 7000, 0), "opened by a container"),
        ] {
            assert!(!is_unsolicited_inbound(&no, &local, &scope), "{why}");
        }
    }
}
