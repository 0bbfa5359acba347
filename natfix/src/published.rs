//! Published UDP ports: those that take new flows by design, so the guard
//! exempts them (unless told not to). Two sources, merged: the kernel's DNAT
//! rules in the attachment's namespace (Docker's `-p`, swarm `mode=host`,
//! Kubernetes hostPort: whatever the kernel will DNAT), and Docker's API
//! (swarm ingress ports, which IPVS rather than a DNAT rule forwards inside
//! `ingress_sbox`).

use std::collections::BTreeMap;

use tracing::debug;

use crate::config::PortRange;

/// Port -> who publishes it (for logs and `status`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    pub ports: BTreeMap<u16, String>,
}

impl Published {
    /// The UDP ports the calling thread's namespace DNATs.
    #[must_use]
    pub fn kernel_here() -> Self {
        let rules = crate::nat_rules::read_here();
        for e in &rules.errors {
            debug!("published ports: {e}");
        }
        Self { ports: rules.published_ports().into_iter().map(|p| (p, "a DNAT rule".to_owned())).collect() }
    }

    /// Adds `other`'s ports (the first source named stays).
    pub fn merge(&mut self, other: &Self) {
        for (port, who) in &other.ports {
            self.ports.entry(*port).or_insert_with(|| who.clone());
        }
    }

    /// The published ports inside `ranges`: those the guard would judge.
    #[must_use]
    pub fn inside(&self, ranges: &[PortRange]) -> Vec<u16> {
        self.ports.keys().copied().filter(|p| ranges.iter().any(|r| r.contains(*p))).collect()
    }

    /// `25600 (container web)` for each port in `ports`.
    #[must_use]
    pub fn describe(&self, ports: &[u16]) -> String {
        ports
            .iter()
            .map(|p| match self.ports.get(p) {
                Some(who) => format!("{p} ({who})"),
                None => p.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_keeps_the_guarded_ports_and_merge_keeps_the_first_source() {
        let mut a = Published { ports: BTreeMap::from([(25600, "a DNAT rule".into()), (40000, "a DNAT rule".into())]) };
        let b = Published { ports: BTreeMap::from([(25600, "container web".into()), (25601, "service s (ingress)".into())]) };
        a.merge(&b);
        let ranges = [PortRange { first: 20000, last: 30000 }];
        assert_eq!(a.inside(&ranges), vec![25600, 25601]);
        assert_eq!(a.describe(&[25600, 25601]), "25600 (a DNAT rule), 25601 (service s (ingress))");
    }
}
