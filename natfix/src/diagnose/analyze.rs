//! The judgement: facts in, findings out, never touching the system.
//! Conntrack entries are classified first (`analyze_conntrack`), then each
//! check of the module documentation's table becomes a finding.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::IpAddr,
    time::Duration,
};

use super::{
    facts::{AttachmentFacts, DropSample, Facts, KernelFacts, ModuleState, NsFacts},
    parse::{VxlanDev, XfrmState},
    guard::guard_findings,
    report::{Finding, Report, Severity},
};
use crate::{
    config::{DOCKER_REQID, VXLAN_PORT},
    sys::features::CtKfuncs,
};

/// `natfix attach --overlay-fix`, naming the VXLAN ports found when they
/// are not just Docker's default (`auto` would find them too; named, the
/// command says what it fixes).
fn overlay_command(iface: &str, netns: Option<&str>, facts: &Facts) -> String {
    let mut cmd = format!("natfix attach --iface {iface}");
    if let Some(ns) = netns {
        let _ = write!(cmd, " --netns {ns}");
    }
    cmd.push_str(" --overlay-fix");
    let ports: BTreeSet<u16> = std::iter::once(&facts.target)
        .chain(&facts.docker)
        .filter_map(|n| n.vxlan.as_ref().ok())
        .flatten()
        .map(|d| d.port)
        .collect();
    if ports.iter().any(|p| *p != VXLAN_PORT) {
        for p in ports.iter().take(crate::abi::MAX_VXLAN_PORTS) {
            let _ = write!(cmd, " --vxlan-port {p}");
        }
    }
    cmd
}


/// Judges `facts`; never touches the system.
#[must_use]
pub fn analyze(facts: &Facts) -> Report {
    let mut findings = kernel_findings(&facts.kernel);
    let t = &facts.target;
    let ns = facts.netns_spec.as_deref();

    // Docker's ESP SAs, and the interfaces towards their peers (the underlay).
    let docker_sas: Vec<&XfrmState> = match &t.xfrm {
        Ok(s) => s
            .iter()
            .filter(|s| s.reqid == DOCKER_REQID && s.proto == "esp")
            .collect(),
        Err(_) => Vec::new(),
    };
    let underlays: BTreeSet<String> = docker_sas
        .iter()
        .flat_map(|s| [&s.src, &s.dst])
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .filter(|a| !t.addrs.contains(a))
        .filter_map(|a| t.routes.get(&a).cloned())
        .collect();
    let underlay = underlays
        .iter()
        .next()
        .cloned()
        .unwrap_or_else(|| "<underlay-iface>".into());
    let has_sas = !docker_sas.is_empty();

    findings.push(esp_offload_finding(&facts.kernel.esp_offload, has_sas));
    findings.push(gro_finding(t, has_sas, &underlays));
    findings.push(xfrm_finding(t, &docker_sas));
    findings.push(vxlan_finding(facts, has_sas, &underlay, ns));
    findings.extend(csum_findings(facts, has_sas, &underlay, ns));
    findings.push(drops_finding(&facts.drops, facts.target.window));
    let guarded = facts.attachments.as_ref().is_ok_and(|l| l.iter().any(|a| a.guard && a.effective));
    findings.extend(guard_findings(t, ns, guarded));
    findings.push(attachments_finding(&facts.attachments));
    findings.extend(flow_table_findings(&facts.attachments));
    super::trace_hint::with_trace_hints(Report { findings }, facts)
}

/// natfix's own attachments: do they still protect what they were made for?
fn attachments_finding(attachments: &Result<Vec<AttachmentFacts>, String>) -> Finding {
    let list = match attachments {
        Ok(list) => list,
        Err(why) => return Finding::new("natfix.collect", Severity::Warning, format!("cannot read natfix's attachments: {why}")),
    };
    let lines = list.iter().flat_map(|a| {
        std::iter::once(format!("{} ({}): {}", a.iface, a.netns, a.state)).chain(a.problems.iter().map(|p| format!("  {p}")))
    });
    let troubled: Vec<&AttachmentFacts> = list.iter().filter(|a| !a.effective || a.state == "shadowed").collect();
    if troubled.is_empty() {
        let summary = format!("{} of natfix's attachments here, all attached as recorded", list.len());
        return Finding::new("natfix.attachments", Severity::Info, summary).evidence(lines);
    }
    let fix = troubled.iter().find(|a| !a.effective).map(|a| {
        let ns = if a.netns == "self" { String::new() } else { format!(" --netns {}", a.netns) };
        format!("natfix detach --iface {}{ns} (then attach again)", a.iface)
    });
    let summary = format!(
        "{} of natfix's {} attachments here do not protect as recorded (another program runs first, or something recorded is gone)",
        troubled.len(),
        list.len()
    );
    Finding::new("natfix.attachments", Severity::Warning, summary).evidence(lines).fix(fix)
}

/// Own flow tables near their size or past it (flows evicted since attach):
/// LRU evicts live flows and their replies are dropped as unsolicited (the
/// guard cannot tell them apart).
fn flow_table_findings(attachments: &Result<Vec<AttachmentFacts>, String>) -> Vec<Finding> {
    let Ok(list) = attachments else { return Vec::new() };
    list.iter()
        .filter_map(|a| {
            let place = if a.netns == "self" { a.iface.clone() } else { format!("{} (namespace {})", a.iface, a.netns) };
            match &a.flow_table {
                Ok(Some(o)) if o.nearly_full() || o.evicted_at_least() > 0 => {
                    let evicted = match o.evicted_at_least() {
                        0 => String::new(),
                        n => format!(" (at least {n} evicted since attach)"),
                    };
                    let summary = format!(
                        "the own flow table on {place} holds {} of {} flows{evicted}: past its size the kernel evicts the flows used longest ago, and their replies are dropped as unsolicited",
                        o.entries, o.size
                    );
                    let ns = if a.netns == "self" { String::new() } else { format!(" --netns {}", a.netns) };
                    let fix = format!(
                        "natfix detach --iface {}{ns}, then attach again with --flow-table-size {} (above the host's concurrent UDP flows)",
                        a.iface,
                        o.size.saturating_mul(4).min(*crate::config::FLOW_TABLE_SIZES.end())
                    );
                    Some(Finding::new("guard.flow-table", Severity::Warning, summary).fix(Some(fix)))
                }
                Ok(Some(o)) => Some(Finding::new("guard.flow-table", Severity::Info, format!("the own flow table on {place} holds {} of {} flows, none evicted", o.entries, o.size))),
                Ok(None) => None,
                Err(why) => Some(Finding::new("guard.flow-table", Severity::Warning, format!("cannot read the own flow table on {place}: {why}"))),
            }
        })
        .collect()
}

fn kernel_findings(k: &KernelFacts) -> Vec<Finding> {
    use Severity::{Info, Warning};
    let mut out = Vec::new();
    out.push(if k.btf {
        Finding::new("kernel.btf", Info, "kernel BTF present").evidence(["/sys/kernel/btf/vmlinux exists".into()])
    } else {
        Finding::new(
            "kernel.btf",
            Warning,
            "no kernel BTF: conntrack kfuncs are unusable, the guard needs --flow-source own",
        )
        .evidence(["/sys/kernel/btf/vmlinux missing (CONFIG_DEBUG_INFO_BTF off)".into()])
    });
    out.push(
        Finding::new(
            "kernel.tcx",
            Info,
            if k.tcx {
                "tc programs attach through tcx links"
            } else {
                "no tcx (kernel < 6.6): tc programs attach through clsact"
            },
        )
        .evidence([format!("kernel {}", k.release)]),
    );
    out.push(match &k.xdp {
        Ok(true) => Finding::new(
            "kernel.xdp",
            Info,
            "XDP programs load (native mode depends on the driver; where it has none, natfix runs the guard at tc ingress)",
        ),
        Ok(false) => Finding::new(
            "kernel.xdp",
            Warning,
            "the kernel does not load XDP programs: run the guard on tc",
        )
        .fix(Some(
            "natfix attach --iface <ext> --guard <range> --guard-hook tc".into(),
        )),
        Err(e) => Finding::new("kernel.xdp", Warning, "could not probe XDP support").evidence([e.clone()]),
    });
    out.push(match &k.ct_kfuncs {
        CtKfuncs::Vmlinux => Finding::new(
            "kernel.ct-kfuncs",
            Info,
            "conntrack lookup kfuncs in vmlinux BTF: the guard can use --flow-source conntrack",
        ),
        other => Finding::new(
            "kernel.ct-kfuncs",
            Info,
            "no usable conntrack lookup kfuncs: the guard uses its own flow table (--flow-source own)",
        )
        .evidence(crate::sys::features::ct_kfuncs_unavailable_reason(other)),
    });
    out
}

fn esp_offload_finding(state: &ModuleState, has_sas: bool) -> Finding {
    use Severity::Info;
    // Only natfix's tc program needs the ESP GRO path; the default for IPv4,
    // the nftables rule, sees decrypted packets on every path.
    let tc_only = "only natfix's tc program needs it (IPv6 underlays, --csum recompute, --csum-backend tc or both)";
    match state {
        ModuleState::Loaded => Finding::new("kernel.esp-offload", Info, "esp4_offload is loaded (ESP GRO path)")
            .evidence(["/sys/module/esp4_offload exists".into()]),
        ModuleState::Available(how) => Finding::new(
            "kernel.esp-offload",
            Info,
            format!("esp4_offload is available but not loaded; {tc_only}, and natfix loads it then"),
        )
        .evidence([how.clone()]),
        ModuleState::Missing(how) if has_sas => Finding::new(
            "kernel.esp-offload",
            Info,
            format!("esp4_offload is not available: {tc_only}; the default nftables rule repairs IPv4 without it"),
        )
        .evidence([how.clone()]),
        ModuleState::Missing(how) => Finding::new(
            "kernel.esp-offload",
            Info,
            "esp4_offload is not available (only matters for natfix's tc overlay program: the default nftables rule works without it)",
        )
        .evidence([how.clone()]),
    }
}

fn gro_finding(t: &NsFacts, has_sas: bool, underlays: &BTreeSet<String>) -> Finding {
    let mut off: Vec<&str> = Vec::new();
    let mut lines = Vec::new();
    let mut sorted: Vec<&(String, Result<bool, String>)> = t.gro.iter().collect();
    // GRO-off interfaces first: they are the interesting ones.
    sorted.sort_by_key(|(name, g)| (!matches!(g, Ok(false)), name.clone()));
    for (name, g) in sorted {
        match g {
            Ok(true) => lines.push(format!("{name}: gro on")),
            Ok(false) => {
                off.push(name);
                lines.push(format!("{name}: gro off"));
            }
            Err(e) => lines.push(format!("{name}: gro unknown ({e})")),
        }
    }
    let underlay_off: Vec<&&str> = off.iter().filter(|n| underlays.contains(**n)).collect();
    if has_sas && !underlay_off.is_empty() {
        return Finding::new(
            "iface.gro",
            Severity::Info,
            format!(
                "GRO is off on the underlay ({}); only natfix's tc overlay program needs it (IPv6, --csum recompute), and natfix switches it on then",
                underlay_off.iter().map(|s| **s).collect::<Vec<_>>().join(", ")
            ),
        )
        .evidence(lines);
    }
    let summary = if t.gro.is_empty() {
        format!("no interfaces besides lo in namespace {}", t.label)
    } else {
        format!(
            "GRO on for {} of {} interfaces in namespace {}",
            t.gro.len() - off.len(),
            t.gro.len(),
            t.label
        )
    };
    Finding::new("iface.gro", Severity::Info, summary).evidence(lines)
}

fn xfrm_finding(t: &NsFacts, docker_sas: &[&XfrmState]) -> Finding {
    match &t.xfrm {
        Err(e) => Finding::new("overlay.xfrm", Severity::Warning, "could not read xfrm states").evidence([e.clone()]),
        Ok(all) if docker_sas.is_empty() => Finding::new(
            "overlay.xfrm",
            Severity::Info,
            format!(
                "no ESP SAs with Docker's reqid {DOCKER_REQID:#x}: no encrypted overlay in namespace {}",
                t.label
            ),
        )
        .evidence([format!("{} xfrm states in total", all.len())]),
        Ok(_) => Finding::new(
            "overlay.xfrm",
            Severity::Info,
            format!(
                "{} ESP SAs with Docker's reqid {DOCKER_REQID:#x}: encrypted overlay in use",
                docker_sas.len()
            ),
        )
        .evidence(
            docker_sas
                .iter()
                .map(|s| format!("{} -> {} spi {} mode {}", s.src, s.dst, s.spi, s.mode)),
        ),
    }
}

fn vxlan_line(label: &str, d: &VxlanDev) -> String {
    let csum = match d.udp_csum {
        Some(true) => "udpcsum",
        Some(false) => "noudpcsum",
        None => "udpcsum unknown",
    };
    let vni = d.vni.map_or_else(|| "?".into(), |v| v.to_string());
    format!(
        "{} in namespace {label}: vni {vni}, dstport {}, {csum}, {}",
        d.name,
        d.port,
        if d.up { "up" } else { "down" }
    )
}

fn vxlan_finding(facts: &Facts, has_sas: bool, underlay: &str, ns: Option<&str>) -> Finding {
    let mut lines = Vec::new();
    let mut sending = 0;
    let mut total = 0;
    let mut errors = Vec::new();
    for n in std::iter::once(&facts.target).chain(&facts.docker) {
        match &n.vxlan {
            Ok(devs) => {
                for d in devs {
                    total += 1;
                    if d.udp_csum != Some(false) {
                        sending += 1;
                    }
                    lines.push(vxlan_line(&n.label, d));
                }
            }
            Err(e) => errors.push(format!("namespace {}: {e}", n.label)),
        }
    }
    lines.extend(errors.iter().cloned());
    if total == 0 {
        let sev = if errors.is_empty() {
            Severity::Info
        } else {
            Severity::Warning
        };
        return Finding::new("overlay.vxlan-csum", sev, "no VXLAN devices found").evidence(lines);
    }
    if sending == 0 {
        return Finding::new(
            "overlay.vxlan-csum",
            Severity::Info,
            format!("{total} VXLAN devices, none sends UDP checksums"),
        )
        .evidence(lines);
    }
    if has_sas {
        // Through 1:1 NAT the checksum these send is wrong once the receiver decrypts.
        Finding::new(
            "overlay.vxlan-csum",
            Severity::Warning,
            format!(
                "{sending} of {total} VXLAN devices send UDP checksums inside ESP: peers behind 1:1 NAT drop them after decryption (fix on each receiving host)"
            ),
        )
        .evidence(lines)
        .fix(Some(overlay_command(underlay, ns, facts)))
    } else {
        Finding::new(
            "overlay.vxlan-csum",
            Severity::Info,
            format!("{sending} of {total} VXLAN devices send UDP checksums (harmless without ESP: NAT rewrites them)"),
        )
        .evidence(lines)
    }
}

fn csum_findings(facts: &Facts, has_sas: bool, underlay: &str, ns: Option<&str>) -> Vec<Finding> {
    let mut out = Vec::new();
    let all: Vec<&NsFacts> = std::iter::once(&facts.target).chain(&facts.docker).collect();
    let mut quiet = Vec::new();
    for n in all {
        let (before, after) = match &n.csum_errors {
            Ok(v) => *v,
            Err(e) => {
                quiet.push(format!("namespace {}: not read ({e})", n.label));
                continue;
            }
        };
        let rise = after.saturating_sub(before);
        let line = format!(
            "namespace {}: UdpInCsumErrors {before} -> {after} (+{rise}) in {:.1} s",
            n.label,
            n.window.as_secs_f64()
        );
        if rise == 0 {
            quiet.push(line);
            continue;
        }
        let vxlan_ports: BTreeSet<u16> = n
            .vxlan
            .as_ref()
            .map(|d| d.iter().map(|d| d.port).collect())
            .unwrap_or_default();
        let ports = if vxlan_ports.is_empty() {
            format!("{VXLAN_PORT}")
        } else {
            vxlan_ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
        };
        let mut evidence = vec![line, format!("VXLAN ports in this namespace: {ports}")];
        out.push(if has_sas && n.label == facts.target.label {
            evidence.push(
                "Docker ESP SAs exist: decrypted VXLAN with a checksum broken by 1:1 NAT is being dropped".into(),
            );
            Finding::new(
                "overlay.csum-errors",
                Severity::Problem,
                format!(
                    "UDP checksum errors rising in namespace {} while Docker's encrypted overlay is in use",
                    n.label
                ),
            )
            .evidence(evidence)
            .fix(Some(overlay_command(underlay, ns, facts)))
        } else {
            evidence.push(
                "no Docker ESP SAs here: not the encrypted-overlay NAT problem natfix fixes (bad NIC, or tampering)"
                    .into(),
            );
            Finding::new(
                "overlay.csum-errors",
                Severity::Warning,
                format!("UDP checksum errors rising in namespace {}", n.label),
            )
            .evidence(evidence)
        });
    }
    if out.is_empty() {
        out.push(
            Finding::new(
                "overlay.csum-errors",
                Severity::Info,
                "UdpInCsumErrors did not rise during the sample",
            )
            .evidence(quiet),
        );
    }
    out
}


/// Reasons that hit UDP/VXLAN receive (the tracepoint carries no port).
const UDP_REASONS: [&str; 6] = [
    "UDP_CSUM",
    "XFRM_POLICY",
    "VXLAN_INVALID_HDR",
    "VXLAN_VNI_NOT_FOUND",
    "NO_SOCKET",
    "SOCKET_RCVBUFF",
];

pub(super) fn drops_finding(drops: &DropSample, window: Duration) -> Finding {
    match drops {
        DropSample::NotChecked(why) => {
            Finding::new("overlay.drop-reasons", Severity::Info, "drop reasons not checked").evidence([why.clone()])
        }
        DropSample::Counts(counts) => {
            let total: u64 = counts.iter().map(|(_, n)| n).sum();
            let udp_csum = counts.iter().find(|(r, _)| r == "UDP_CSUM").map_or(0, |(_, n)| *n);
            let mut lines = vec![format!(
                "skb:kfree_skb over {:.1} s, all namespaces (the tracepoint carries no port): {total} IP packets dropped",
                window.as_secs_f64()
            )];
            lines.extend(counts.iter().map(|(r, n)| {
                let mark = if UDP_REASONS.contains(&r.as_str()) {
                    " (UDP receive path)"
                } else {
                    ""
                };
                format!("{r}: {n}{mark}")
            }));
            let (sev, summary) = if udp_csum > 0 {
                (
                    Severity::Warning,
                    format!("the kernel dropped {udp_csum} packets for a bad UDP checksum"),
                )
            } else {
                (
                    Severity::Info,
                    format!("{total} IP packet drops during the sample, none for a bad UDP checksum"),
                )
            };
            Finding::new("overlay.drop-reasons", sev, summary).evidence(lines)
        }
    }
}

