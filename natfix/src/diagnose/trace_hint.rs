//! The `natfix trace` command that shows each problem found, packet by
//! packet: the flow whose port unsolicited traffic took, decrypted VXLAN
//! dropped for its checksum. Added to findings as `trace`.

use super::{
    guard::analyze_conntrack,
    facts::Facts,
    report::{Report, Severity},
};
use crate::config::VXLAN_PORT;

/// `--netns` for the trace: its default set (natfix's own, Docker's and
/// `ip netns` namespaces) covers named namespaces; others are named.
fn netns_flags(spec: Option<&str>) -> String {
    match spec {
        Some(s) if s.starts_with('/') || s.starts_with("pid:") => format!(" --netns self --netns {s}"),
        _ => String::new(),
    }
}

/// The report with a `trace` command on the problems a trace shows.
#[must_use]
pub fn with_trace_hints(mut report: Report, facts: &Facts) -> Report {
    let netns = netns_flags(facts.netns_spec.as_deref());
    let moved = facts.target.conntrack.as_ref().map(|e| analyze_conntrack(e, &facts.target.addrs).moved).unwrap_or_default();
    let vxlan_port = facts.target.vxlan.as_ref().ok().and_then(|d| d.first().map(|d| d.port)).unwrap_or(VXLAN_PORT);
    for f in &mut report.findings {
        if f.severity == Severity::Info {
            continue;
        }
        f.trace = match f.check.as_str() {
            // The unsolicited packet and the container's flow both use the wanted port with the peer.
            "guard.port-moved" => moved.first().map(|m| {
                format!("natfix trace{netns} --count 2 'udp and host {} and port {}'", m.flow.orig.dst, m.wanted_port())
            }),
            // The decrypted VXLAN packet ends in a UDP_CSUM drop where the checksum is broken.
            "overlay.csum-errors" | "overlay.drop-reasons" => Some(format!("natfix trace{netns} 'udp and port {vxlan_port}'")),
            _ => None,
        };
    }
    report
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        conntrack::{CtEntry, CtTuple, IPS_CONFIRMED, IPS_SRC_NAT},
        diagnose::{DropSample, NsFacts, analyze},
    };

    fn t(s: &str, sport: u16, d: &str, dport: u16) -> CtTuple {
        CtTuple { src: s.parse().unwrap(), sport, dst: d.parse().unwrap(), dport }
    }

    /// Seed 000 on a host: the probe holds :25000, the container's flow left on :41061.
    fn seed_000(netns: Option<&str>) -> Facts {
        let entry = |orig, reply, status| CtEntry { orig, reply, status: status | IPS_CONFIRMED, timeout_secs: Some(29) };
        let mut target = NsFacts::empty("host".into());
        target.addrs = vec!["198.51.100.10".parse().unwrap(), "10.77.0.1".parse().unwrap()];
        target.conntrack = Ok(vec![
            entry(t("198.51.100.20", 7000, "198.51.100.10", 25000), t("198.51.100.10", 25000, "198.51.100.20", 7000), 0),
            entry(t("10.77.0.2", 25000, "198.51.100.20", 7000), t("198.51.100.20", 7000, "198.51.100.10", 41061), IPS_SRC_NAT),
        ]);
        target.window = Duration::from_secs(2);
        let kernel = crate::diagnose::tests::kernel();
        let drops = DropSample::Counts(vec![("UDP_CSUM".into(), 7)]);
        Facts { netns_spec: netns.map(str::to_owned), kernel, target, docker: Vec::new(), drops, attachments: Ok(Vec::new()) }
    }

    #[test]
    fn problems_come_with_the_trace_that_shows_them() {
        let report = analyze(&seed_000(None));
        let trace = |check: &str| report.findings.iter().find(|f| f.check == check).and_then(|f| f.trace.clone());
        assert_eq!(trace("guard.port-moved").as_deref(), Some("natfix trace --count 2 'udp and host 198.51.100.20 and port 25000'"));
        assert_eq!(trace("overlay.drop-reasons").as_deref(), Some("natfix trace 'udp and port 4789'"));
        assert!(trace("kernel.btf").is_none(), "info findings have none");
        let json = serde_json::to_value(&report).unwrap();
        assert!(json["findings"].as_array().unwrap().iter().any(|f| f["trace"].is_string()));
        assert!(crate::diagnose::render_table(&report).contains("trace: natfix trace --count 2"));
        // A namespace outside the trace's default set is named.
        let report = analyze(&seed_000(Some("pid:42")));
        let moved = report.findings.iter().find(|f| f.check == "guard.port-moved").unwrap();
        assert!(moved.trace.as_deref().unwrap().starts_with("natfix trace --netns self --netns pid:42 "));
    }
}
