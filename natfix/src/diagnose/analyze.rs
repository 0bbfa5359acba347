//! The judgement: facts in, findings out, never touching the system.
//! Conntrack entries are classified first (`analyze_conntrack`), then each
//! check of the module documentation's table becomes a finding.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use super::{
    facts::{AttachmentFacts, DropSample, Facts, KernelFacts, ModuleState, NsFacts},
    parse::{NatRules, Span, VxlanDev, XfrmState},
    report::{Finding, MAX_EVIDENCE, Report, Severity, counted},
};
use crate::{
    config::{DOCKER_REQID, VXLAN_PORT},
    conntrack::{CtEntry, CtTuple, IPS_DST_NAT, IPS_SEEN_REPLY, IPS_SRC_NAT},
    sys::features::CtKfuncs,
};

fn tuple_str(t: &CtTuple) -> String {
    format!(
        "{} -> {}",
        SocketAddr::new(t.src, t.sport),
        SocketAddr::new(t.dst, t.dport)
    )
}

fn entry_str(e: &CtEntry) -> String {
    let mut s = format!("udp {}", tuple_str(&e.orig));
    if e.status & IPS_SEEN_REPLY == 0 {
        s.push_str(" [UNREPLIED]");
    }
    let _ = write!(s, ", reply {}", tuple_str(&e.reply));
    if let Some(t) = e.timeout_secs {
        let _ = write!(s, ", {t} s left");
    }
    s
}

/// A masqueraded flow that left on another port than its source port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovedFlow {
    pub flow: CtEntry,
    /// The unsolicited entry whose tuple the flow's natural reply would have
    /// collided with: it held the port.
    pub culprit: Option<CtEntry>,
}

impl MovedFlow {
    #[must_use]
    pub fn wanted_port(&self) -> u16 {
        self.flow.orig.sport
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CtAnalysis {
    /// Entries opened from outside to a local address that nobody answered.
    pub unsolicited: Vec<CtEntry>,
    /// Of those, the ones on a port a masqueraded flow wants or uses.
    pub contested: Vec<CtEntry>,
    pub moved: Vec<MovedFlow>,
    /// All masqueraded flows (for context).
    pub masqueraded: usize,
}

/// Finds unsolicited entries and masqueraded flows that lost their port.
///
/// Unsolicited: the original direction goes from a non-local address to a
/// local one, there was never a reply, and it was not DNAT'd (published
/// ports take new flows by design). Sources that are themselves masqueraded
/// elsewhere (containers talking to the host) are not "from outside".
#[must_use]
pub fn analyze_conntrack(entries: &[CtEntry], local: &[IpAddr]) -> CtAnalysis {
    let is_local = |a: &IpAddr| local.contains(a);
    let nat: Vec<&CtEntry> = entries
        .iter()
        .filter(|e| e.status & IPS_SRC_NAT != 0 && !is_local(&e.orig.src))
        .collect();
    let inside: HashSet<IpAddr> = nat.iter().map(|e| e.orig.src).collect();
    let unsolicited: Vec<CtEntry> = entries
        .iter()
        .filter(|e| {
            is_local(&e.orig.dst)
                && !is_local(&e.orig.src)
                && !inside.contains(&e.orig.src)
                && e.status & (IPS_SEEN_REPLY | IPS_DST_NAT) == 0
        })
        .cloned()
        .collect();
    let moved: Vec<MovedFlow> = nat
        .iter()
        .filter(|f| f.orig.sport != f.reply.dport)
        .map(|f| {
            // The reply tuple the flow would have had with its own port.
            let wanted = CtTuple {
                dport: f.orig.sport,
                ..f.reply
            };
            let culprit = unsolicited.iter().find(|u| u.orig == wanted).cloned();
            MovedFlow {
                flow: (*f).clone(),
                culprit,
            }
        })
        .collect();
    let contested = unsolicited
        .iter()
        .filter(|u| {
            nat.iter()
                .any(|f| f.reply.dst == u.orig.dst && (f.orig.sport == u.orig.dport || f.reply.dport == u.orig.dport))
        })
        .cloned()
        .collect();
    CtAnalysis {
        unsolicited,
        contested,
        moved,
        masqueraded: nat.len(),
    }
}

/// A guard range covering `ports`, widened to whole thousands (apps that
/// punch holes tend to pick nearby ports), never below 1024.
#[must_use]
pub fn guard_range(ports: &[u16]) -> Option<Span> {
    let (lo, hi) = (*ports.iter().min()?, *ports.iter().max()?);
    let first = (lo / 1000 * 1000).max(1024).min(lo);
    let last = u16::try_from((u32::from(hi) / 1000 * 1000 + 999).min(65535)).unwrap_or(u16::MAX);
    Some(Span { first, last })
}

/// `natfix attach` for the guard: the range plus `--allow-port` for published
/// ports and host listeners inside it (the guard would drop their new flows).
#[must_use]
pub fn guard_command(iface: &str, netns: Option<&str>, range: Span, allow: &BTreeSet<u16>) -> String {
    let mut cmd = format!("natfix attach --iface {iface}");
    if let Some(ns) = netns {
        let _ = write!(cmd, " --netns {ns}");
    }
    let _ = write!(cmd, " --guard {}-{}", range.first, range.last);
    for p in allow.iter().filter(|p| (range.first..=range.last).contains(*p)) {
        let _ = write!(cmd, " --allow-port {p}");
    }
    cmd
}

fn overlay_command(iface: &str, netns: Option<&str>, extra: &str) -> String {
    let mut cmd = format!("natfix attach --iface {iface}");
    if let Some(ns) = netns {
        let _ = write!(cmd, " --netns {ns}");
    }
    cmd.push_str(" --overlay-fix");
    cmd.push_str(extra);
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
    findings.extend(guard_findings(t, ns));
    findings.push(attachments_finding(&facts.attachments));
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
        .fix(Some(overlay_command(underlay, ns, "")))
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
            .fix(Some(overlay_command(underlay, ns, "")))
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

fn guard_findings(t: &NsFacts, ns: Option<&str>) -> Vec<Finding> {
    let mut out = Vec::new();
    let a = match &t.conntrack {
        Ok(e) => Some(analyze_conntrack(e, &t.addrs)),
        Err(e) => {
            out.push(
                Finding::new(
                    "guard.collect",
                    Severity::Warning,
                    "could not read conntrack: port theft not checked",
                )
                .evidence([e.clone()]),
            );
            None
        }
    };
    let a = a.as_ref();
    let moved: &[MovedFlow] = a.map_or(&[], |a| a.moved.as_slice());

    // The guard suggestion: cover the ports the moved flows wanted.
    let wanted: Vec<u16> = moved.iter().map(MovedFlow::wanted_port).collect();
    let range = guard_range(&wanted);
    let mut allow: BTreeSet<u16> = BTreeSet::new();
    if let Some(r) = range {
        for (s, _) in &t.nat.published {
            allow.extend((s.first.max(r.first)..=s.last.min(r.last)).take(16));
        }
        allow.extend(t.udp_listeners.iter().filter(|p| (r.first..=r.last).contains(*p)));
    }
    let ext = moved
        .iter()
        .find_map(|m| t.routes.get(&m.flow.reply.src))
        .cloned()
        .unwrap_or_else(|| "<external-iface>".into());
    let fix = range.map(|r| guard_command(&ext, ns, r, &allow));

    if let Some(a) = a {
        out.push(unsolicited_finding(a, fix.clone()));
        out.push(moved_finding(a, &t.nat, fix.clone()));
    }
    for e in &t.nat.errors {
        out.push(Finding::new("guard.collect", Severity::Warning, "could not read NAT rules").evidence([e.clone()]));
    }
    // With a rule source unreadable, "none found" would claim too much.
    let rules_complete = t.nat.errors.is_empty();
    if rules_complete || !t.nat.random.is_empty() {
        out.push(random_finding(&t.nat));
    }
    if rules_complete || !t.nat.published.is_empty() {
        out.push(published_finding(&t.nat, range, fix));
    }
    out
}

fn unsolicited_finding(a: &CtAnalysis, fix: Option<String>) -> Finding {
    let listed = |v: &[CtEntry]| v.iter().map(entry_str).collect::<Vec<_>>();
    if a.unsolicited.is_empty() {
        return Finding::new(
            "guard.unsolicited",
            Severity::Info,
            "no conntrack entries from unsolicited inbound UDP",
        );
    }
    if !a.contested.is_empty() {
        let took = a.moved.iter().filter(|m| m.culprit.is_some()).count();
        let mut lines = listed(&a.contested);
        let others = a.unsolicited.len() - a.contested.len();
        if others > 0 {
            lines.push(format!(
                "{others} more unsolicited entries on ports no masqueraded flow uses"
            ));
        }
        let summary = format!(
            "{} ports that masqueraded flows want or use ({took} took a container's port)",
            counted(
                a.contested.len(),
                "unsolicited inbound UDP entry holds",
                "unsolicited inbound UDP entries hold"
            ),
        );
        return Finding::new("guard.unsolicited", Severity::Warning, summary)
            .evidence(lines)
            .fix(fix);
    }
    let mut by_port: BTreeMap<u16, usize> = BTreeMap::new();
    for u in &a.unsolicited {
        *by_port.entry(u.orig.dport).or_default() += 1;
    }
    let mut lines = listed(&a.unsolicited);
    lines.truncate(MAX_EVIDENCE / 2);
    lines.push(format!(
        "destination ports: {}",
        by_port
            .iter()
            .map(|(p, n)| format!("{p} ({n})"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let summary = format!(
        "{}, none on a port a masqueraded flow uses now",
        counted(
            a.unsolicited.len(),
            "unsolicited inbound UDP entry",
            "unsolicited inbound UDP entries"
        )
    );
    Finding::new("guard.unsolicited", Severity::Info, summary).evidence(lines)
}

fn moved_finding(a: &CtAnalysis, nat: &NatRules, fix: Option<String>) -> Finding {
    if a.moved.is_empty() {
        return Finding::new(
            "guard.port-moved",
            Severity::Info,
            format!(
                "no masqueraded UDP flow left on another port ({} masqueraded flows)",
                a.masqueraded
            ),
        );
    }
    let stolen = a.moved.iter().filter(|m| m.culprit.is_some()).count();
    let mut lines = Vec::new();
    for m in &a.moved {
        let f = &m.flow;
        lines.push(format!(
            "container flow {} left as {} (wanted port {})",
            tuple_str(&f.orig),
            SocketAddr::new(f.reply.dst, f.reply.dport),
            m.wanted_port()
        ));
        lines.push(match &m.culprit {
            Some(c) => format!("port {} held by unsolicited entry {}", m.wanted_port(), entry_str(c)),
            None => format!(
                "port {} is held by no unsolicited entry now (it expired, another container's flow has it, or NAT randomises)",
                m.wanted_port()
            ),
        });
    }
    if !nat.random.is_empty() {
        lines.push(format!(
            "{} NAT rules randomise ports (see guard.random-fully)",
            nat.random.len()
        ));
    }
    let (sev, summary) = if stolen > 0 {
        (
            Severity::Problem,
            format!(
                "{} left on another port because unsolicited inbound UDP held theirs (hole punching breaks)",
                counted(stolen, "container flow", "container flows")
            ),
        )
    } else {
        (
            Severity::Warning,
            format!(
                "{} left on another port than their own",
                counted(a.moved.len(), "container flow", "container flows")
            ),
        )
    };
    Finding::new("guard.port-moved", sev, summary).evidence(lines).fix(fix)
}

fn random_finding(nat: &NatRules) -> Finding {
    if nat.random.is_empty() {
        return Finding::new(
            "guard.random-fully",
            Severity::Info,
            format!(
                "no masquerade/SNAT rule randomises ports ({} masquerade/SNAT rules)",
                nat.masquerade_rules
            ),
        );
    }
    // No natfix command helps: the rule itself must lose the flag.
    Finding::new(
        "guard.random-fully",
        Severity::Warning,
        "NAT rules randomise source ports: their flows never keep their port, with or without the guard; drop the flag where ports matter",
    )
    .evidence(nat.random.clone())
}

fn published_finding(nat: &NatRules, range: Option<Span>, fix: Option<String>) -> Finding {
    if nat.published.is_empty() {
        return Finding::new(
            "guard.published-ports",
            Severity::Info,
            "no published (DNAT'd) UDP ports",
        );
    }
    let mut lines: Vec<String> = nat
        .published
        .iter()
        .map(|(s, place)| format!("udp {s}: {place}"))
        .collect();
    let summary = match range {
        Some(r) => {
            let inside: Vec<String> = nat
                .published
                .iter()
                .filter(|(s, _)| s.first <= r.last && s.last >= r.first)
                .map(|(s, _)| s.to_string())
                .collect();
            if inside.is_empty() {
                format!(
                    "{} published UDP port spans, none inside the suggested guard range {r}",
                    nat.published.len()
                )
            } else {
                lines.push(format!("inside the suggested guard range {r}: {}", inside.join(", ")));
                format!("published UDP ports inside the suggested guard range {r} need --allow-port")
            }
        }
        None => format!(
            "{} published UDP port spans: any --guard range must exempt them with --allow-port",
            nat.published.len()
        ),
    };
    Finding::new("guard.published-ports", Severity::Info, summary)
        .evidence(lines)
        .fix(fix)
}

