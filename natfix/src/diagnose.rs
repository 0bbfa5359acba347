//! `natfix diagnose`: inspects a live host for the problems natfix fixes and
//! says which command fixes each.
//!
//! The work is split in two so the judgement can be tested on fixtures:
//! [`gather`] reads the host (kernel features, and per network namespace
//! VXLAN devices, `/proc/net/snmp`, xfrm states, conntrack, NAT rules, GRO)
//! into plain [`Facts`], and [`analyze`] turns those facts into [`Finding`]s
//! without touching the system. The parsers of tool output (`ip`, `nft`,
//! `iptables-save`, `/proc`) are pure functions as well.
//!
//! # Checks
//!
//! | check                   | what it looks at |
//! |-------------------------|------------------|
//! | `kernel.btf`            | `/sys/kernel/btf/vmlinux` |
//! | `kernel.tcx`            | kernel >= 6.6 (tcx links) or clsact |
//! | `kernel.xdp`            | whether the kernel loads XDP programs |
//! | `kernel.ct-kfuncs`      | conntrack lookup kfuncs in vmlinux BTF |
//! | `kernel.esp-offload`    | `esp4_offload` loaded (`/sys/module`) or available (`modinfo`, `/lib/modules`) |
//! | `iface.gro`             | GRO of every interface of the namespace (`ETHTOOL_GGRO`) |
//! | `overlay.xfrm`          | xfrm states (`ip xfrm state`) with Docker's reqid 0xd0c4e3 |
//! | `overlay.vxlan-csum`    | VXLAN devices (target and Docker namespaces) that send UDP checksums |
//! | `overlay.csum-errors`   | `UdpInCsumErrors` rising over `--sample` seconds |
//! | `overlay.drop-reasons`  | `skb:kfree_skb` drop reasons over the sample (needs tracefs mounted) |
//! | `guard.unsolicited`     | conntrack entries created by unsolicited inbound UDP |
//! | `guard.port-moved`      | masqueraded flows whose source port NAT changed, and what held the port |
//! | `guard.random-fully`    | masquerade/SNAT rules that always randomise ports |
//! | `guard.published-ports` | DNAT'd (published) UDP ports, which a guard must exempt |
//! | `<group>.collect`       | a data source that could not be read (e.g. `guard.collect`) |
//!
//! # JSON (`--json`), schema version 1
//!
//! ```json
//! {"findings": [
//!   {"check": "guard.port-moved", "severity": "problem",
//!    "summary": "one line",
//!    "evidence": ["one fact per line", "..."],
//!    "fix": "natfix attach --iface ext --guard 25000-25999"}
//! ]}
//! ```
//! `severity` is `info`, `warning` or `problem`; `fix` is absent when no
//! natfix command fixes the finding. Findings come in the order of the table
//! above; new checks and new keys may be added, existing ones keep their meaning.
//!
//! # Exit codes
//!
//! * 0: no finding of severity `problem` (warnings do not change the code);
//! * [`EXIT_PROBLEMS`] (10): at least one `problem` finding; the report is printed in full first;
//! * otherwise natfix's usual error codes (1 internal, 3 namespace not found,
//!   4 missing privileges, ...) when diagnose itself cannot run.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    cli::DiagnoseArgs,
    conntrack::{CtEntry, CtTuple, IPS_DST_NAT, IPS_SEEN_REPLY, IPS_SRC_NAT},
    features::CtKfuncs,
    netns::{DOCKER_NETNS_DIR, Netns},
};

/// Exit code of `natfix diagnose` when at least one finding is a problem.
pub const EXIT_PROBLEMS: i32 = 10;

/// Docker's reqid for the SAs of encrypted overlay networks.
pub const DOCKER_REQID: u32 = 0x00d0_c4e3;

/// Default VXLAN port, for findings when no VXLAN device tells us better.
const VXLAN_PORT: u16 = crate::cli::VXLAN_PORT;

/// Evidence lists longer than this are cut, with a count of the rest.
const MAX_EVIDENCE: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Problem,
}

impl Severity {
    fn name(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Problem => "problem",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub check: String,
    pub severity: Severity,
    pub summary: String,
    pub evidence: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn new(check: &str, severity: Severity, summary: impl Into<String>) -> Self {
        Self {
            check: check.to_owned(),
            severity,
            summary: summary.into(),
            evidence: Vec::new(),
            fix: None,
        }
    }

    fn evidence(mut self, lines: impl IntoIterator<Item = String>) -> Self {
        let mut lines: Vec<String> = lines.into_iter().collect();
        if lines.len() > MAX_EVIDENCE {
            let rest = lines.len() - (MAX_EVIDENCE - 1);
            lines.truncate(MAX_EVIDENCE - 1);
            lines.push(format!("... and {rest} more"));
        }
        self.evidence.extend(lines);
        self
    }

    fn fix(mut self, fix: Option<String>) -> Self {
        self.fix = fix;
        self
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    #[must_use]
    pub fn count(&self, severity: Severity) -> usize {
        self.findings.iter().filter(|f| f.severity == severity).count()
    }
}

// ---------------------------------------------------------------------------
// Facts: what gather() read, as plain data.

/// Everything [`analyze`] judges.
#[derive(Debug, Clone)]
pub struct Facts {
    /// `--netns` as given, repeated in the fix commands.
    pub netns_spec: Option<String>,
    pub kernel: KernelFacts,
    pub target: NsFacts,
    /// Docker's namespaces other than the target: VXLAN devices and counters only.
    pub docker: Vec<NsFacts>,
    pub drops: DropSample,
}

#[derive(Debug, Clone)]
pub struct KernelFacts {
    pub release: String,
    pub btf: bool,
    pub tcx: bool,
    /// Whether XDP programs load; Err if the probe itself failed.
    pub xdp: Result<bool, String>,
    pub ct_kfuncs: CtKfuncs,
    pub esp_offload: ModuleState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleState {
    Loaded,
    /// Present on disk (or built in) but not loaded.
    Available(String),
    /// Neither; the string says where we looked.
    Missing(String),
}

/// One namespace's facts; fields that could not be read hold the reason.
#[derive(Debug, Clone)]
pub struct NsFacts {
    /// How the namespace is named in findings.
    pub label: String,
    pub vxlan: Result<Vec<VxlanDev>, String>,
    /// `UdpInCsumErrors` at the start and the end of the sample window.
    pub csum_errors: Result<(u64, u64), String>,
    pub window: Duration,
    /// The remaining fields are read for the target namespace only.
    pub xfrm: Result<Vec<XfrmState>, String>,
    pub addrs: Vec<IpAddr>,
    pub conntrack: Result<Vec<CtEntry>, String>,
    pub nat: NatRules,
    pub gro: Vec<(String, Result<bool, String>)>,
    /// Local ports with an unconnected UDP socket (host services).
    pub udp_listeners: BTreeSet<u16>,
    /// Outgoing interface per remote address of interest (`ip route get`).
    pub routes: BTreeMap<IpAddr, String>,
}

impl NsFacts {
    fn empty(label: String) -> Self {
        let skipped = || Err("not read".to_owned());
        Self {
            label,
            vxlan: Ok(Vec::new()),
            csum_errors: skipped(),
            window: Duration::ZERO,
            xfrm: Ok(Vec::new()),
            addrs: Vec::new(),
            conntrack: Ok(Vec::new()),
            nat: NatRules::default(),
            gro: Vec::new(),
            udp_listeners: BTreeSet::new(),
            routes: BTreeMap::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// Parsers (pure).

/// The `Udp:` counters of `/proc/net/snmp` by name.
#[must_use]
pub fn parse_snmp_udp(text: &str) -> BTreeMap<String, u64> {
    // The file pairs a header line with a value line per protocol.
    let udp: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
    let mut out = BTreeMap::new();
    if let [names, values, ..] = udp.as_slice() {
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()).skip(1) {
            if let Ok(v) = v.parse() {
                out.insert(n.to_owned(), v);
            }
        }
    }
    out
}

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XfrmState {
    pub src: String,
    pub dst: String,
    pub proto: String,
    pub spi: String,
    pub reqid: u32,
    pub mode: String,
}

fn parse_u32_auto(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// States in `ip xfrm state` text: each starts with an unindented
/// `src A dst B` line, followed by an indented `proto P spi S reqid R mode M`.
#[must_use]
pub fn parse_xfrm_states(text: &str) -> Vec<XfrmState> {
    let mut out = Vec::new();
    let mut cur: Option<XfrmState> = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if !line.starts_with(char::is_whitespace) && words.first() == Some(&"src") {
            out.extend(cur.take());
            let after = |k: &str| words.iter().position(|w| *w == k).and_then(|i| words.get(i + 1));
            cur = Some(XfrmState {
                src: after("src").map_or_else(String::new, |s| (*s).to_owned()),
                dst: after("dst").map_or_else(String::new, |s| (*s).to_owned()),
                proto: String::new(),
                spi: String::new(),
                reqid: 0,
                mode: String::new(),
            });
        } else if let Some(st) = cur.as_mut()
            && words.first() == Some(&"proto")
        {
            for pair in words.windows(2) {
                match pair[0] {
                    "proto" => pair[1].clone_into(&mut st.proto),
                    "spi" => pair[1].clone_into(&mut st.spi),
                    "reqid" => st.reqid = parse_u32_auto(pair[1]).unwrap_or(0),
                    "mode" => pair[1].clone_into(&mut st.mode),
                    _ => {}
                }
            }
        }
    }
    out.extend(cur);
    out
}

/// A span of ports (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span {
    pub first: u16,
    pub last: u16,
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// NAT rules that matter to the guard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatRules {
    /// Masquerade/SNAT rules that randomise ports (where, and which flag).
    pub random: Vec<String>,
    /// DNAT'd UDP destination ports (published ports), with the rule's place.
    pub published: Vec<(Span, String)>,
    /// How many masquerade/SNAT rules exist at all.
    pub masquerade_rules: usize,
    /// Rule sources that could not be read (tool missing, ...).
    pub errors: Vec<String>,
}

impl NatRules {
    fn merge(&mut self, other: Self) {
        for r in other.random {
            if !self.random.contains(&r) {
                self.random.push(r);
            }
        }
        for p in other.published {
            // iptables-nft rules show up in both sources; keep one per span.
            if !self.published.iter().any(|(s, _)| *s == p.0) {
                self.published.push(p);
            }
        }
        self.masquerade_rules += other.masquerade_rules;
        self.errors.extend(other.errors);
    }
}

fn json_port(v: &Value) -> Option<u16> {
    v.as_u64().and_then(|p| u16::try_from(p).ok())
}

/// Port spans of an nft match's right-hand side: a number, `{"range":[a,b]}`,
/// or an anonymous `{"set":[...]}` of those. Named sets (`"@x"`) are skipped.
fn json_spans(v: &Value) -> Vec<Span> {
    if let Some(p) = json_port(v) {
        return vec![Span { first: p, last: p }];
    }
    if let Some([a, b]) = v.get("range").and_then(Value::as_array).map(Vec::as_slice)
        && let (Some(a), Some(b)) = (json_port(a), json_port(b))
    {
        return vec![Span {
            first: a.min(b),
            last: a.max(b),
        }];
    }
    if let Some(items) = v.get("set").and_then(Value::as_array) {
        return items.iter().flat_map(json_spans).collect();
    }
    Vec::new()
}

fn nft_flags(v: &Value) -> Vec<String> {
    match v.get("flags") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    }
}

/// NAT rules in `nft -j list ruleset` output. iptables-nft rules appear with
/// opaque `xt` targets here; [`parse_iptables_save`] covers those.
pub fn parse_nft_ruleset(json: &str) -> Result<NatRules> {
    let v: Value = serde_json::from_str(json).context("`nft -j list ruleset` printed invalid JSON")?;
    let mut out = NatRules::default();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let Some(rule) = item.get("rule") else { continue };
        let place = format!(
            "nft {} {} chain {} (handle {})",
            rule["family"].as_str().unwrap_or("?"),
            rule["table"].as_str().unwrap_or("?"),
            rule["chain"].as_str().unwrap_or("?"),
            rule["handle"].as_u64().unwrap_or(0)
        );
        let exprs = rule["expr"].as_array().cloned().unwrap_or_default();
        let l4_udp = exprs.iter().any(|e| {
            let m = &e["match"];
            m["left"]["meta"]["key"] == "l4proto" && (m["right"] == "udp" || m["right"] == 17)
        });
        let mut udp_dports = Vec::new();
        for e in &exprs {
            let m = &e["match"];
            let payload = &m["left"]["payload"];
            let udp = payload["protocol"] == "udp" || (payload["protocol"] == "th" && l4_udp);
            if udp && payload["field"] == "dport" && matches!(m["op"].as_str(), Some("==" | "in")) {
                udp_dports.extend(json_spans(&m["right"]));
            }
            for kind in ["masquerade", "snat"] {
                if let Some(stmt) = e.get(kind) {
                    out.masquerade_rules += 1;
                    for flag in nft_flags(stmt) {
                        if flag == "fully-random" || flag == "random" {
                            out.random.push(format!("{place}: {kind} {flag}"));
                        }
                    }
                }
            }
        }
        if exprs.iter().any(|e| e.get("dnat").is_some()) {
            out.published.extend(udp_dports.into_iter().map(|s| (s, place.clone())));
        }
    }
    Ok(out)
}

fn parse_ipt_spans(s: &str) -> Vec<Span> {
    s.split(',')
        .filter_map(|part| {
            let (a, b) = part.split_once(':').unwrap_or((part, part));
            let (a, b) = (a.parse::<u16>().ok()?, b.parse::<u16>().ok()?);
            Some(Span {
                first: a.min(b),
                last: a.max(b),
            })
        })
        .collect()
}

/// NAT rules in `iptables-save` text (all tables; only `-A` lines matter).
#[must_use]
pub fn parse_iptables_save(text: &str) -> NatRules {
    let mut out = NatRules::default();
    let mut table = String::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            t.trim().clone_into(&mut table);
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() != Some(&"-A") {
            continue;
        }
        let chain = words.get(1).copied().unwrap_or("?");
        let place = format!("iptables {table} {chain}: {}", line.trim());
        let after = |k: &str| {
            words
                .iter()
                .position(|w| *w == k)
                .and_then(|i| words.get(i + 1))
                .copied()
        };
        let target = after("-j").unwrap_or("");
        match target {
            "MASQUERADE" | "SNAT" => {
                out.masquerade_rules += 1;
                for flag in ["--random-fully", "--random"] {
                    if words.contains(&flag) {
                        out.random.push(place.clone());
                        break;
                    }
                }
            }
            "DNAT" if after("-p") == Some("udp") => {
                let mut spans = Vec::new();
                for key in ["--dport", "--destination-port", "--dports", "--destination-ports"] {
                    if let Some(v) = after(key) {
                        spans.extend(parse_ipt_spans(v));
                    }
                }
                out.published.extend(spans.into_iter().map(|s| (s, place.clone())));
            }
            _ => {}
        }
    }
    out
}

/// Local ports of unconnected UDP sockets in `/proc/net/udp` or `udp6` text.
#[must_use]
pub fn parse_proc_udp(text: &str) -> BTreeSet<u16> {
    let port = |field: &str| {
        field
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, remote) = (port(f.get(1)?)?, port(f.get(2)?)?);
            (remote == 0).then_some(local)
        })
        .collect()
}

/// The `dev` of `ip -j route get ADDR` output.
#[must_use]
pub fn parse_route_dev(json: &str) -> Option<String> {
    let v: Value = serde_json::from_str(json).ok()?;
    v.get(0)?.get("dev")?.as_str().map(str::to_owned)
}

// ---------------------------------------------------------------------------
// Conntrack analysis (pure).

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

// ---------------------------------------------------------------------------
// Analysis (pure): facts -> findings.

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
    Report { findings }
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
        .evidence(crate::features::ct_kfuncs_unavailable_reason(other)),
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

/// What the `skb:kfree_skb` sample found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropSample {
    NotChecked(String),
    /// Drops of IPv4/IPv6 packets by reason, most frequent first.
    Counts(Vec<(String, u64)>),
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

fn drops_finding(drops: &DropSample, window: Duration) -> Finding {
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

// ---------------------------------------------------------------------------
// Output.

fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The human table: one row per finding, evidence and fix indented below it.
#[must_use]
pub fn render_table(report: &Report) -> String {
    let width = report.findings.iter().map(|f| f.check.len()).max().unwrap_or(5).max(5);
    let mut s = format!("{:<8}  {:<width$}  SUMMARY\n", "SEVERITY", "CHECK");
    let pad = " ".repeat(8 + 2 + width + 2);
    for f in &report.findings {
        let _ = writeln!(s, "{:<8}  {:<width$}  {}", f.severity.name(), f.check, f.summary);
        for e in &f.evidence {
            let _ = writeln!(s, "{pad}- {e}");
        }
        if let Some(fix) = &f.fix {
            let _ = writeln!(s, "{pad}fix: {fix}");
        }
    }
    let _ = writeln!(
        s,
        "\n{}, {}, {} info",
        counted(report.count(Severity::Problem), "problem", "problems"),
        counted(report.count(Severity::Warning), "warning", "warnings"),
        report.count(Severity::Info)
    );
    s
}

pub fn run(args: &DiagnoseArgs) -> Result<()> {
    use std::io::Write as _;
    let facts = gather(args)?;
    let report = analyze(&facts);
    let text = if args.json {
        let mut j = serde_json::to_string_pretty(&report)?;
        j.push('\n');
        j
    } else {
        render_table(&report)
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    if report.count(Severity::Problem) > 0 {
        // The report is out; the code lets scripts act on it.
        std::process::exit(EXIT_PROBLEMS);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Gathering (reads the system).

fn cmd_output(cmd: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", cmd[0]))?;
    if !out.status.success() {
        // One line: evidence is printed line by line.
        let err = String::from_utf8_lossy(&out.stderr).trim().replace('\n', "; ");
        return Err(format!("`{}` failed: {err}", cmd.join(" ")));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn read_csum_errors() -> Result<u64, String> {
    // thread-self: /proc/net follows the main thread's namespace, not this thread's.
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp")
        .map_err(|e| format!("/proc/thread-self/net/snmp: {e}"))?;
    parse_snmp_udp(&text)
        .get("InCsumErrors")
        .copied()
        .ok_or_else(|| "no Udp InCsumErrors in /proc/net/snmp".into())
}

fn read_vxlan() -> Result<Vec<VxlanDev>, String> {
    let json = cmd_output(&["ip", "-d", "-j", "link", "show", "type", "vxlan"])?;
    parse_vxlan_links(&json).map_err(|e| format!("{e:#}"))
}

/// GRO per interface, as the overlay fix reads it.
fn gro_state(iface: &str) -> std::io::Result<bool> {
    crate::overlay::gro_enabled(iface)
}

fn local_addrs() -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .map(|it| {
            it.filter_map(|ifa| {
                let a = ifa.address?;
                a.as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            })
            .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

fn read_nat_rules() -> NatRules {
    let mut rules = NatRules::default();
    match cmd_output(&["nft", "-j", "list", "ruleset"])
        .and_then(|j| parse_nft_ruleset(&j).map_err(|e| format!("{e:#}")))
    {
        Ok(r) => rules.merge(r),
        Err(e) => rules.errors.push(format!("nftables: {e}")),
    }
    // Absent iptables is normal on nft-only hosts; only nft's failure counts.
    if let Ok(text) = cmd_output(&["iptables-save"]) {
        rules.merge(parse_iptables_save(&text));
    }
    rules
}

/// The target namespace's facts, apart from the end of the sample window.
fn gather_target(label: String) -> NsFacts {
    let mut n = NsFacts::empty(label);
    n.vxlan = read_vxlan();
    n.xfrm = cmd_output(&["ip", "xfrm", "state"]).map(|t| parse_xfrm_states(&t));
    n.addrs = local_addrs();
    n.conntrack = crate::conntrack::dump_udp().map_err(|e| format!("{e:#}"));
    n.nat = read_nat_rules();
    if let Ok(ifs) = nix::net::if_::if_nameindex() {
        for i in &ifs {
            let name = i.name().to_string_lossy().into_owned();
            if name != "lo" {
                let g = gro_state(&name).map_err(|e| e.to_string());
                n.gro.push((name, g));
            }
        }
    }
    for file in ["/proc/thread-self/net/udp", "/proc/thread-self/net/udp6"] {
        if let Ok(t) = std::fs::read_to_string(file) {
            n.udp_listeners.extend(parse_proc_udp(&t));
        }
    }
    // Routes towards the peers the fix commands name an interface for.
    let mut remotes: BTreeSet<IpAddr> = BTreeSet::new();
    if let Ok(entries) = &n.conntrack {
        remotes.extend(
            analyze_conntrack(entries, &n.addrs)
                .moved
                .iter()
                .map(|m| m.flow.reply.src),
        );
    }
    if let Ok(states) = &n.xfrm {
        for s in states.iter().filter(|s| s.reqid == DOCKER_REQID) {
            remotes.extend([&s.src, &s.dst].into_iter().filter_map(|a| a.parse::<IpAddr>().ok()));
        }
    }
    for r in remotes.into_iter().filter(|r| !n.addrs.contains(r)).take(16) {
        if let Some(dev) = cmd_output(&["ip", "-j", "route", "get", &r.to_string()])
            .ok()
            .and_then(|j| parse_route_dev(&j))
        {
            n.routes.insert(r, dev);
        }
    }
    n
}

/// Runs `f` in `ns`, or right here for natfix's own namespace (no setns,
/// so an unprivileged user still gets the checks that need no privileges).
fn in_ns<T: Send + 'static>(ns: Option<&Netns>, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    match ns {
        Some(ns) => ns.run(f),
        None => f(),
    }
}

fn esp_offload_state(release: &str) -> ModuleState {
    if Path::new("/sys/module/esp4_offload").exists() {
        return ModuleState::Loaded;
    }
    if let Ok(out) = cmd_output(&["modinfo", "-F", "filename", "esp4_offload"]) {
        return ModuleState::Available(format!("modinfo: {}", out.trim()));
    }
    let dir = PathBuf::from("/lib/modules").join(release);
    if let Ok(builtin) = std::fs::read_to_string(dir.join("modules.builtin"))
        && builtin.lines().any(|l| l.ends_with("/esp4_offload.ko"))
    {
        return ModuleState::Available(format!("built in ({}/modules.builtin)", dir.display()));
    }
    if let Ok(dep) = std::fs::read_to_string(dir.join("modules.dep"))
        && let Some(line) = dep.lines().find(|l| l.contains("/esp4_offload.ko"))
    {
        return ModuleState::Available(format!("{}/{}", dir.display(), line.split(':').next().unwrap_or("")));
    }
    ModuleState::Missing(format!(
        "not in /sys/module, `modinfo esp4_offload` fails, not under {}",
        dir.display()
    ))
}

fn kernel_facts() -> KernelFacts {
    let release =
        nix::sys::utsname::uname().map_or_else(|_| "unknown".into(), |u| u.release().to_string_lossy().into_owned());
    KernelFacts {
        btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
        tcx: crate::features::has_tcx(),
        xdp: aya::sys::is_program_supported(aya::programs::ProgramType::Xdp).map_err(|e| e.to_string()),
        ct_kfuncs: crate::features::ct_kfuncs(),
        esp_offload: esp_offload_state(&release),
        release,
    }
}

/// Docker's namespaces (files under /var/run/docker/netns), except `skip` (by inode).
fn docker_namespaces(skip: u64) -> Vec<Netns> {
    let Ok(dir) = std::fs::read_dir(DOCKER_NETNS_DIR) else {
        return Vec::new();
    };
    let mut out: Vec<Netns> = dir
        .filter_map(Result::ok)
        .filter_map(|e| Netns::resolve(Some(e.path().to_str()?)).ok())
        .filter(|n| n.inode != skip)
        .collect();
    out.sort_by(|a, b| a.spec.cmp(&b.spec));
    out
}

/// Reads the host into [`Facts`]; takes `--sample` seconds.
pub fn gather(args: &DiagnoseArgs) -> Result<Facts> {
    let target_ns = match &args.netns {
        Some(spec) => Some(Netns::resolve(Some(spec))?),
        None => None,
    };
    let own_inode = crate::netns::current_inode()?;
    let target_inode = target_ns.as_ref().map_or(own_inode, |n| n.inode);
    let label = args.netns.clone().unwrap_or_else(|| "self".into());

    let kernel = kernel_facts();
    let mut target = in_ns(target_ns.as_ref(), {
        let label = label.clone();
        move || Ok(gather_target(label))
    })?;
    let mut docker: Vec<(Netns, NsFacts)> = Vec::new();
    let mut docker_errors = Vec::new();
    for ns in docker_namespaces(target_inode) {
        let label = ns.spec.clone();
        match ns.run(move || {
            let mut n = NsFacts::empty(label);
            n.vxlan = read_vxlan();
            Ok(n)
        }) {
            Ok(n) => docker.push((ns, n)),
            Err(e) => docker_errors.push(format!("{}: {e:#}", ns.spec)),
        }
    }

    // The sample window: counters at both ends, drop tracing in between.
    let first = |ns: Option<&Netns>| in_ns(ns, || Ok((read_csum_errors(), Instant::now())));
    let t0 = first(target_ns.as_ref())?;
    let d0: Vec<_> = docker.iter().map(|(ns, _)| first(Some(ns)).ok()).collect();
    let tracer = DropTracer::start();
    std::thread::sleep(args.sample);
    let drops = match tracer {
        Ok(t) => t.finish(),
        Err(why) => DropSample::NotChecked(why),
    };
    let end = |n: &mut NsFacts, start: (Result<u64, String>, Instant), ns: Option<&Netns>| {
        let (after, t1) = match first(ns) {
            Ok(v) => v,
            Err(e) => (Err(format!("{e:#}")), Instant::now()),
        };
        n.window = t1.duration_since(start.1);
        n.csum_errors = match (start.0, after) {
            (Ok(a), Ok(b)) => Ok((a, b)),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
    };
    end(&mut target, t0, target_ns.as_ref());
    for ((ns, n), start) in docker.iter_mut().zip(d0) {
        if let Some(start) = start {
            end(n, start, Some(ns));
        }
    }
    let mut docker: Vec<NsFacts> = docker.into_iter().map(|(_, n)| n).collect();
    if !docker_errors.is_empty() {
        let mut n = NsFacts::empty(DOCKER_NETNS_DIR.into());
        n.vxlan = Err(format!("cannot inspect: {}", docker_errors.join("; ")));
        docker.push(n);
    }
    Ok(Facts {
        netns_spec: args.netns.clone(),
        kernel,
        target,
        docker,
        drops,
    })
}

// ---------------------------------------------------------------------------
// Drop reasons from the skb:kfree_skb tracepoint, through a private tracefs
// instance so the user's own tracing is left alone.

const TRACEFS_CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// `{ 11, "UDP_CSUM" }` pairs of the `reason` field's `__print_symbolic` in a tracepoint format.
#[must_use]
pub fn parse_reason_symbols(format: &str) -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    let Some(start) = format.find("__print_symbolic(REC->reason") else {
        return out;
    };
    for part in format[start..].split('{').skip(1) {
        let Some((num, rest)) = part.split_once(',') else {
            continue;
        };
        let Some(name) = rest.split('"').nth(1) else { continue };
        if let Ok(n) = num.trim().parse() {
            out.insert(n, name.to_owned());
        }
    }
    out
}

/// Counts `reason: X` in trace output lines, most frequent first.
#[must_use]
pub fn count_trace_reasons(trace: &str) -> Vec<(String, u64)> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for line in trace
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("kfree_skb:"))
    {
        if let Some((_, reason)) = line.rsplit_once("reason: ") {
            *counts.entry(reason.trim().to_owned()).or_default() += 1;
        }
    }
    let mut v: Vec<(String, u64)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

const TRACE_INSTANCE_PREFIX: &str = "natfix-diagnose-";

/// Removes instances left by diagnose runs that were killed mid-sample
/// (their event would otherwise keep filling a buffer nobody reads).
fn remove_stale_instances(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(TRACE_INSTANCE_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::write(e.path().join("events/skb/kfree_skb/enable"), "0");
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

struct DropTracer {
    instance: PathBuf,
}

impl DropTracer {
    /// Enables `kfree_skb` (IP packets only) in a fresh tracefs instance; Err says why not.
    fn start() -> Result<Self, String> {
        let Some(root) = TRACEFS_CANDIDATES
            .iter()
            .map(Path::new)
            .find(|p| p.join("instances").is_dir())
        else {
            return Err(
                "tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing to enable this check)".into(),
            );
        };
        let format = std::fs::read_to_string(root.join("events/skb/kfree_skb/format"))
            .map_err(|e| format!("no skb:kfree_skb tracepoint ({e})"))?;
        if parse_reason_symbols(&format).is_empty() {
            return Err("this kernel's skb:kfree_skb has no drop reasons (Linux < 5.17)".into());
        }
        remove_stale_instances(&root.join("instances"));
        let instance = root
            .join("instances")
            .join(format!("{TRACE_INSTANCE_PREFIX}{}", std::process::id()));
        std::fs::create_dir(&instance).map_err(|e| format!("cannot create {}: {e}", instance.display()))?;
        let tracer = Self { instance };
        tracer.setup().map_err(|e| format!("{e:#}"))?;
        Ok(tracer)
    }

    fn setup(&self) -> Result<()> {
        let ev = self.instance.join("events/skb/kfree_skb");
        let write =
            |p: PathBuf, v: &str| std::fs::write(&p, v).with_context(|| format!("cannot write {}", p.display()));
        write(self.instance.join("buffer_size_kb"), "1024")?;
        // ETH_P_IP / ETH_P_IPV6, in host order as the tracepoint records them.
        write(ev.join("filter"), "protocol == 2048 || protocol == 34525")?;
        write(ev.join("enable"), "1")?;
        Ok(())
    }

    fn finish(self) -> DropSample {
        let _ = std::fs::write(self.instance.join("events/skb/kfree_skb/enable"), "0");
        match std::fs::read_to_string(self.instance.join("trace")) {
            Ok(t) => DropSample::Counts(count_trace_reasons(&t)),
            Err(e) => DropSample::NotChecked(format!("cannot read the trace buffer: {e}")),
        }
        // Drop removes the instance.
    }
}

impl Drop for DropTracer {
    fn drop(&mut self) {
        let _ = std::fs::write(self.instance.join("events/skb/kfree_skb/enable"), "0");
        if let Err(e) = std::fs::remove_dir(&self.instance) {
            tracing::warn!("cannot remove tracefs instance {}: {e}", self.instance.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::{IPS_ASSURED, IPS_CONFIRMED};

    const SNMP: &str = "\
Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 1000
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 57 3 12 58 0 0 12 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
UdpLite: 0 0 0 0 0 0 99 0 0
";

    // `ip xfrm state` of a Docker encrypted overlay (iproute2 6.1 layout),
    // plus an unrelated SA, and reqid printed with -s's hex suffix.
    const XFRM: &str = "\
src 192.0.2.10 dst 203.0.113.5
\tproto esp spi 0xc0ffee01 reqid 13681891 mode transport
\treplay-window 0 
\taead rfc4106(gcm(aes)) 0x0102030405060708090a0b0c0d0e0f1011121314 64
\tanti-replay context: seq 0x0, oseq 0x2a, bitmap 0x00000000
\tsel src 0.0.0.0/0 dst 0.0.0.0/0 
src 203.0.113.5 dst 192.0.2.10
\tproto esp spi 0xc0ffee02 reqid 13681891 (0x00d0c4e3) mode transport
\treplay-window 0 
\tsel src 0.0.0.0/0 dst 0.0.0.0/0 
src 192.0.2.10 dst 198.51.100.99
\tproto esp spi 0x00000100 reqid 1 mode tunnel
\treplay-window 32 flag af-unspec
";

    // `ip -d -j link show type vxlan` (iproute2 6.1, trimmed).
    const VXLAN: &str = r#"[{"ifindex":2,"ifname":"vx0","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1450,
"linkinfo":{"info_kind":"vxlan","info_data":{"id":42,"remote":"10.0.0.2","local":"10.0.0.1","port":4789,"udp_csum":true}}},
{"ifindex":3,"ifname":"vx1","flags":["BROADCAST","MULTICAST"],"mtu":1450,
"linkinfo":{"info_kind":"vxlan","info_data":{"id":43,"port":4790,"udp_csum":false}}},
{"ifindex":4,"ifname":"br0","flags":["UP"],"linkinfo":{"info_kind":"bridge","info_data":{}}}]"#;

    // `nft -j list ruleset` (nftables 1.0.6): native DNAT/masquerade rules
    // and two iptables-nft rules with opaque xt targets.
    const NFT: &str = r#"{"nftables": [
{"metainfo":{"version":"1.0.6","release_name":"Lester Gooch #5","json_schema_version":1}},
{"rule":{"family":"ip","table":"t","chain":"pre","handle":3,"expr":[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"ext"}},{"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":25500}},{"dnat":{"addr":"10.77.0.2","port":25500}}]}},
{"rule":{"family":"ip","table":"t","chain":"pre","handle":5,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":{"set":[3478,{"range":[5000,5010]}]}}},{"dnat":{"addr":"10.77.0.3"}}]}},
{"rule":{"family":"ip","table":"t","chain":"pre","handle":6,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":6000}},{"dnat":{"addr":"10.77.0.4","port":6001}}]}},
{"rule":{"family":"ip","table":"t","chain":"pre","handle":7,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":80}},{"dnat":{"addr":"10.77.0.2"}}]}},
{"rule":{"family":"ip","table":"t","chain":"pre","handle":8,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":{"range":[7000,7002]}}},{"dnat":{"addr":"10.77.0.5"}}]}},
{"rule":{"family":"ip","table":"t","chain":"post","handle":9,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":{"prefix":{"addr":"10.77.0.0","len":24}}}},{"match":{"op":"==","left":{"meta":{"key":"oifname"}},"right":"ext"}},{"masquerade":{"flags":"fully-random"}}]}},
{"rule":{"family":"ip","table":"t","chain":"post","handle":10,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":{"prefix":{"addr":"10.78.0.0","len":24}}}},{"masquerade":{"flags":["fully-random","persistent"]}}]}},
{"rule":{"family":"ip","table":"t","chain":"post","handle":11,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":{"prefix":{"addr":"10.79.0.0","len":24}}}},{"masquerade":null}]}},
{"rule":{"family":"ip","table":"t","chain":"post","handle":12,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":{"prefix":{"addr":"10.80.0.0","len":24}}}},{"snat":{"addr":"1.2.3.4","flags":"fully-random"}}]}},
{"rule":{"family":"ip","table":"nat","chain":"POSTROUTING","handle":2,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":{"prefix":{"addr":"172.17.0.0","len":16}}}},{"counter":{"packets":0,"bytes":0}},{"xt":{"type":"target","name":"MASQUERADE"}}]}},
{"rule":{"family":"ip","table":"nat","chain":"PREROUTING","handle":4,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":9999}},{"counter":{"packets":0,"bytes":0}},{"xt":{"type":"target","name":"DNAT"}}]}}
]}"#;

    const IPTABLES: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE --random-fully
-A POSTROUTING -s 172.18.0.0/16 ! -o br-1 -j MASQUERADE
-A DOCKER ! -i docker0 -p udp -m udp --dport 9999 -j DNAT --to-destination 172.17.0.2:9999
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
-A DOCKER -p udp -m multiport --dports 3478,40000:40010 -j DNAT --to-destination 172.17.0.3
COMMIT
*filter
-A FORWARD -p udp --dport 53 -j ACCEPT
COMMIT
";

    const PROC_UDP: &str = "\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  123: 00000000:12B5 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1001 2 0000000000000000 0
  124: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1002 2 0000000000000000 0
  125: 0A00000A:9C40 1400000A:1B58 01 00000000:00000000 00:00000000 00000000     0        0 1003 2 0000000000000000 0
";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn tuple(src: &str, sport: u16, dst: &str, dport: u16) -> CtTuple {
        CtTuple {
            src: ip(src),
            dst: ip(dst),
            sport,
            dport,
        }
    }

    fn entry(orig: CtTuple, reply: CtTuple, status: u32) -> CtEntry {
        CtEntry {
            orig,
            reply,
            status: status | IPS_CONFIRMED,
            timeout_secs: Some(29),
        }
    }

    const HOST: &str = "198.51.100.10";
    const REMOTE: &str = "198.51.100.20";
    const CTR: &str = "10.77.0.2";

    fn local() -> Vec<IpAddr> {
        vec![ip("127.0.0.1"), ip("10.77.0.1"), ip(HOST)]
    }

    /// Seed 000: the remote's probe of host:25000, then the container's flow
    /// from :25000 to the remote, moved to :41061.
    fn seed_000() -> (CtEntry, CtEntry) {
        let probe = entry(tuple(REMOTE, 7000, HOST, 25000), tuple(HOST, 25000, REMOTE, 7000), 0);
        let flow = entry(
            tuple(CTR, 25000, REMOTE, 7000),
            tuple(REMOTE, 7000, HOST, 41061),
            IPS_SRC_NAT,
        );
        (probe, flow)
    }

    #[test]
    fn snmp_udp_counters_pair_names_with_values() {
        let c = parse_snmp_udp(SNMP);
        assert_eq!(c.get("InCsumErrors"), Some(&12), "Udp, not UdpLite");
        assert_eq!(c.get("NoPorts"), Some(&3));
        assert!(
            parse_snmp_udp("Udp: InCsumErrors\n").is_empty(),
            "header without values"
        );
    }

    #[test]
    fn xfrm_states_parse_with_reqid_in_both_spellings() {
        let s = parse_xfrm_states(XFRM);
        assert_eq!(s.len(), 3);
        assert_eq!((s[0].src.as_str(), s[0].dst.as_str()), ("192.0.2.10", "203.0.113.5"));
        assert_eq!(
            (s[0].proto.as_str(), s[0].spi.as_str(), s[0].mode.as_str()),
            ("esp", "0xc0ffee01", "transport")
        );
        assert_eq!(s[0].reqid, DOCKER_REQID);
        assert_eq!(s[1].reqid, DOCKER_REQID, "decimal followed by (0x...)");
        assert_eq!((s[2].reqid, s[2].mode.as_str()), (1, "tunnel"));
        assert!(parse_xfrm_states("").is_empty());
    }

    #[test]
    fn vxlan_links_report_csum_and_state() {
        let d = parse_vxlan_links(VXLAN).unwrap();
        assert_eq!(
            d,
            vec![
                VxlanDev {
                    name: "vx0".into(),
                    vni: Some(42),
                    port: 4789,
                    udp_csum: Some(true),
                    up: true
                },
                VxlanDev {
                    name: "vx1".into(),
                    vni: Some(43),
                    port: 4790,
                    udp_csum: Some(false),
                    up: false
                },
            ]
        );
        assert!(parse_vxlan_links("").unwrap().is_empty());
        assert!(parse_vxlan_links("[]").unwrap().is_empty());
        assert!(parse_vxlan_links("{not json").is_err());
    }

    #[test]
    fn nft_ruleset_yields_published_udp_ports_and_random_masquerade() {
        let r = parse_nft_ruleset(NFT).unwrap();
        let spans: Vec<(u16, u16)> = r.published.iter().map(|(s, _)| (s.first, s.last)).collect();
        // tcp dport 80 is not UDP; the xt DNAT rule (9999) is opaque here.
        assert_eq!(
            spans,
            vec![(25500, 25500), (3478, 3478), (5000, 5010), (6000, 6000), (7000, 7002)]
        );
        assert_eq!(r.published[0].1, "nft ip t chain pre (handle 3)");
        assert_eq!(
            r.random,
            vec![
                "nft ip t chain post (handle 9): masquerade fully-random",
                "nft ip t chain post (handle 10): masquerade fully-random",
                "nft ip t chain post (handle 12): snat fully-random",
            ]
        );
        assert_eq!(
            r.masquerade_rules, 4,
            "three masquerades and one snat; xt targets are not counted"
        );
        assert!(parse_nft_ruleset("nope").is_err());
    }

    #[test]
    fn iptables_save_yields_published_udp_ports_and_random_fully() {
        let r = parse_iptables_save(IPTABLES);
        let spans: Vec<(u16, u16)> = r.published.iter().map(|(s, _)| (s.first, s.last)).collect();
        assert_eq!(spans, vec![(9999, 9999), (3478, 3478), (40000, 40010)]);
        assert!(
            r.published[0]
                .1
                .starts_with("iptables nat DOCKER: -A DOCKER ! -i docker0 -p udp")
        );
        assert_eq!(r.random.len(), 1);
        assert!(r.random[0].contains("172.17.0.0/16") && r.random[0].contains("--random-fully"));
        assert_eq!(r.masquerade_rules, 2);
    }

    #[test]
    fn merged_sources_keep_one_entry_per_published_span() {
        let mut r = parse_nft_ruleset(NFT).unwrap();
        let n = r.published.len();
        r.merge(parse_iptables_save(IPTABLES));
        // 9999 is new (xt in nft), 3478 was already there.
        assert_eq!(r.published.len(), n + 2);
        assert_eq!(r.random.len(), 4);
    }

    #[test]
    fn proc_udp_lists_unconnected_sockets() {
        assert_eq!(parse_proc_udp(PROC_UDP), BTreeSet::from([4789, 53]));
    }

    #[test]
    fn route_get_names_the_device() {
        let j = r#"[{"dst":"198.51.100.20","dev":"ext","prefsrc":"198.51.100.10","flags":[],"uid":0,"cache":[]}]"#;
        assert_eq!(parse_route_dev(j).as_deref(), Some("ext"));
        assert_eq!(parse_route_dev("[]"), None);
    }

    #[test]
    fn seed_000_collision_is_found() {
        let (probe, flow) = seed_000();
        let a = analyze_conntrack(&[probe.clone(), flow.clone()], &local());
        assert_eq!(a.unsolicited, vec![probe.clone()]);
        assert_eq!(a.contested, vec![probe.clone()]);
        assert_eq!(
            a.moved,
            vec![MovedFlow {
                flow,
                culprit: Some(probe)
            }]
        );
        assert_eq!(a.masqueraded, 1);
    }

    #[test]
    fn solicited_published_and_internal_entries_are_not_unsolicited() {
        let l = local();
        let replied = entry(
            tuple(REMOTE, 7000, HOST, 25000),
            tuple(HOST, 25000, REMOTE, 7000),
            IPS_SEEN_REPLY | IPS_ASSURED,
        );
        let published = entry(
            tuple(REMOTE, 7001, HOST, 25500),
            tuple(CTR, 25500, REMOTE, 7001),
            IPS_DST_NAT,
        );
        let outbound = entry(tuple(HOST, 5353, REMOTE, 53), tuple(REMOTE, 53, HOST, 5353), 0);
        // A container talking to the host, while also masqueraded elsewhere.
        let to_host = entry(
            tuple(CTR, 40000, "10.77.0.1", 53),
            tuple("10.77.0.1", 53, CTR, 40000),
            0,
        );
        let kept = entry(
            tuple(CTR, 30000, REMOTE, 7000),
            tuple(REMOTE, 7000, HOST, 30000),
            IPS_SRC_NAT,
        );
        let a = analyze_conntrack(&[replied, published, outbound, to_host, kept], &l);
        assert!(a.unsolicited.is_empty(), "{:?}", a.unsolicited);
        assert!(a.moved.is_empty(), "a flow that kept its port did not move");
        assert_eq!(a.masqueraded, 1);
    }

    #[test]
    fn a_moved_flow_without_a_holder_has_no_culprit() {
        // The probe came from another peer: no tuple clash, so not the cause.
        let (_, flow) = seed_000();
        let other = entry(
            tuple("203.0.113.9", 7000, HOST, 25000),
            tuple(HOST, 25000, "203.0.113.9", 7000),
            0,
        );
        let a = analyze_conntrack(&[other.clone(), flow], &local());
        assert_eq!(a.moved.len(), 1);
        assert_eq!(a.moved[0].culprit, None);
        assert_eq!(a.contested, vec![other], "it still holds the wanted port");
    }

    #[test]
    fn guard_ranges_cover_the_ports_in_whole_thousands() {
        let r = |p: &[u16]| guard_range(p).map(|s| (s.first, s.last));
        assert_eq!(r(&[25000]), Some((25000, 25999)));
        assert_eq!(r(&[25999, 21234]), Some((21000, 25999)));
        assert_eq!(r(&[1500]), Some((1024, 1999)));
        assert_eq!(r(&[500]), Some((500, 999)), "a low port itself stays covered");
        assert_eq!(r(&[65535]), Some((65000, 65535)));
        assert_eq!(r(&[]), None);
    }

    #[test]
    fn guard_commands_allow_only_ports_inside_the_range() {
        let cmd = guard_command(
            "ext",
            Some("blue"),
            Span {
                first: 25000,
                last: 25999,
            },
            &BTreeSet::from([53, 25500]),
        );
        assert_eq!(
            cmd,
            "natfix attach --iface ext --netns blue --guard 25000-25999 --allow-port 25500"
        );
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let crate::cli::Command::Attach(a) = <crate::cli::Cli as clap::Parser>::try_parse_from(words)
            .unwrap()
            .command
        else {
            panic!("not attach")
        };
        crate::cli::validate_guard(&a.guard).unwrap();
    }

    fn kernel() -> KernelFacts {
        KernelFacts {
            release: "6.18.0".into(),
            btf: true,
            tcx: true,
            xdp: Ok(true),
            ct_kfuncs: CtKfuncs::Vmlinux,
            esp_offload: ModuleState::Missing("nowhere".into()),
        }
    }

    fn facts(target: NsFacts) -> Facts {
        Facts {
            netns_spec: Some("/run/netns/h".into()),
            kernel: kernel(),
            target,
            docker: Vec::new(),
            drops: DropSample::NotChecked("tracefs is not mounted".into()),
        }
    }

    fn ns(label: &str) -> NsFacts {
        let mut n = NsFacts::empty(label.into());
        n.csum_errors = Ok((5, 5));
        n.window = Duration::from_secs(2);
        n.addrs = local();
        n
    }

    fn find<'a>(r: &'a Report, check: &str) -> &'a Finding {
        let f: Vec<&Finding> = r.findings.iter().filter(|f| f.check == check).collect();
        assert_eq!(f.len(), 1, "{check}: {:#?}", r.findings);
        f[0]
    }

    #[test]
    fn a_clean_namespace_has_only_info() {
        let r = analyze(&facts(ns("/run/netns/h")));
        assert!(
            r.findings.iter().all(|f| f.severity == Severity::Info),
            "{:#?}",
            r.findings
        );
        let checks: Vec<&str> = r.findings.iter().map(|f| f.check.as_str()).collect();
        assert_eq!(
            checks,
            [
                "kernel.btf",
                "kernel.tcx",
                "kernel.xdp",
                "kernel.ct-kfuncs",
                "kernel.esp-offload",
                "iface.gro",
                "overlay.xfrm",
                "overlay.vxlan-csum",
                "overlay.csum-errors",
                "overlay.drop-reasons",
                "guard.unsolicited",
                "guard.port-moved",
                "guard.random-fully",
                "guard.published-ports",
            ],
            "documented order"
        );
        assert_eq!(find(&r, "overlay.drop-reasons").evidence, ["tracefs is not mounted"]);
    }

    #[test]
    #[allow(clippy::many_single_char_names)]
    fn rising_csum_errors_with_docker_sas_are_a_problem_with_the_overlay_fix() {
        let mut t = ns("/run/netns/h");
        t.addrs.push(ip("192.0.2.10"));
        t.xfrm = Ok(parse_xfrm_states(XFRM));
        t.routes.insert(ip("203.0.113.5"), "eth0".into());
        t.csum_errors = Ok((100, 160));
        t.vxlan = Ok(parse_vxlan_links(VXLAN).unwrap());
        t.gro = vec![("eth0".into(), Ok(false)), ("veth1".into(), Ok(true))];
        let r = analyze(&facts(t));
        let f = find(&r, "overlay.csum-errors");
        assert_eq!(f.severity, Severity::Problem);
        assert_eq!(
            f.fix.as_deref(),
            Some("natfix attach --iface eth0 --netns /run/netns/h --overlay-fix")
        );
        assert!(
            f.evidence[0].contains("UdpInCsumErrors 100 -> 160 (+60) in 2.0 s"),
            "{:?}",
            f.evidence
        );
        assert!(f.evidence[1].contains("4789, 4790"), "{:?}", f.evidence);
        let x = find(&r, "overlay.xfrm");
        assert!(
            x.summary.starts_with("2 ESP SAs with Docker's reqid 0xd0c4e3"),
            "{}",
            x.summary
        );
        let v = find(&r, "overlay.vxlan-csum");
        assert_eq!(
            v.severity,
            Severity::Warning,
            "checksums inside ESP break behind 1:1 NAT"
        );
        assert!(
            v.evidence
                .iter()
                .any(|l| l.starts_with("vx0 in namespace /run/netns/h: vni 42, dstport 4789, udpcsum, up"))
        );
        // The default (the nftables rule) needs neither the module nor GRO.
        let e = find(&r, "kernel.esp-offload");
        assert_eq!((e.severity, e.fix.as_deref()), (Severity::Info, None));
        assert!(e.summary.contains("the default nftables rule repairs IPv4 without it"), "{}", e.summary);
        let g = find(&r, "iface.gro");
        assert!(g.summary.contains("GRO is off on the underlay (eth0)"), "{}", g.summary);
        assert_eq!(g.evidence[0], "eth0: gro off");
    }

    #[test]
    fn rising_csum_errors_without_sas_are_a_warning_without_fix() {
        let mut t = ns("n1");
        t.csum_errors = Ok((0, 7));
        let r = analyze(&facts(t));
        let f = find(&r, "overlay.csum-errors");
        assert_eq!((f.severity, f.fix.as_deref()), (Severity::Warning, None));
        // Docker namespaces are sampled too, each on its own.
        let mut t = ns("n1");
        let mut d = ns("1-abc");
        d.csum_errors = Ok((1, 3));
        t.csum_errors = Ok((1, 1));
        let mut fx = facts(t);
        fx.docker.push(d);
        let r = analyze(&fx);
        let f = find(&r, "overlay.csum-errors");
        assert!(f.summary.contains("1-abc"), "{}", f.summary);
    }

    #[test]
    fn seed_000_is_a_problem_with_a_guard_command() {
        let (probe, flow) = seed_000();
        let mut t = ns("/run/netns/h");
        t.conntrack = Ok(vec![probe, flow]);
        t.routes.insert(ip(REMOTE), "ext".into());
        t.nat = parse_nft_ruleset(NFT).unwrap();
        t.udp_listeners = BTreeSet::from([25010, 53]);
        let r = analyze(&facts(t));
        let m = find(&r, "guard.port-moved");
        assert_eq!(m.severity, Severity::Problem);
        assert_eq!(
            m.evidence[..2],
            [
                "container flow 10.77.0.2:25000 -> 198.51.100.20:7000 left as 198.51.100.10:41061 (wanted port 25000)"
                    .to_owned(),
                "port 25000 held by unsolicited entry udp 198.51.100.20:7000 -> 198.51.100.10:25000 [UNREPLIED], \
                 reply 198.51.100.10:25000 -> 198.51.100.20:7000, 29 s left"
                    .to_owned(),
            ]
        );
        let want =
            "natfix attach --iface ext --netns /run/netns/h --guard 25000-25999 --allow-port 25010 --allow-port 25500";
        assert_eq!(m.fix.as_deref(), Some(want));
        assert_eq!(find(&r, "guard.unsolicited").severity, Severity::Warning);
        assert_eq!(find(&r, "guard.random-fully").severity, Severity::Warning);
        let p = find(&r, "guard.published-ports");
        assert!(
            p.summary.contains("inside the suggested guard range 25000-25999"),
            "{}",
            p.summary
        );
        assert_eq!(r.count(Severity::Problem), 1);
    }

    #[test]
    fn unreadable_conntrack_is_reported_not_fatal() {
        let mut t = ns("x");
        t.conntrack = Err("permission denied".into());
        let r = analyze(&facts(t));
        let c = find(&r, "guard.collect");
        assert_eq!(
            (c.severity, c.evidence.as_slice()),
            (Severity::Warning, ["permission denied".to_owned()].as_slice())
        );
        // No "nothing found" claims from data that was never read.
        assert!(
            !r.findings
                .iter()
                .any(|f| f.check == "guard.unsolicited" || f.check == "guard.port-moved")
        );
        assert!(
            r.findings.iter().any(|f| f.check == "guard.random-fully"),
            "rules were read"
        );
        let mut t = ns("x");
        t.nat.errors.push("nftables: permission denied".into());
        let r = analyze(&facts(t));
        assert!(
            !r.findings
                .iter()
                .any(|f| f.check == "guard.random-fully" || f.check == "guard.published-ports")
        );
        assert_eq!(find(&r, "guard.collect").evidence, ["nftables: permission denied"]);
    }

    #[test]
    fn json_follows_the_documented_schema() {
        let (probe, flow) = seed_000();
        let mut t = ns("h");
        t.conntrack = Ok(vec![probe, flow]);
        let r = analyze(&facts(t));
        let v: Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v.as_object().unwrap().keys().collect::<Vec<_>>(), ["findings"]);
        for f in v["findings"].as_array().unwrap() {
            let keys: BTreeSet<&str> = f.as_object().unwrap().keys().map(String::as_str).collect();
            let want: BTreeSet<&str> = if f.get("fix").is_some() {
                BTreeSet::from(["check", "severity", "summary", "evidence", "fix"])
            } else {
                BTreeSet::from(["check", "severity", "summary", "evidence"])
            };
            assert_eq!(keys, want, "{f}");
            assert!(["info", "warning", "problem"].contains(&f["severity"].as_str().unwrap()));
        }
        let m = v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["check"] == "guard.port-moved")
            .unwrap();
        assert_eq!(m["severity"], "problem");
        assert!(m["fix"].as_str().unwrap().contains("--guard 25000-25999"));
        // Round trip: consumers can read it back.
        let back: Report = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn table_lists_evidence_and_fix_under_each_finding() {
        let (probe, flow) = seed_000();
        let mut t = ns("h");
        t.conntrack = Ok(vec![probe, flow]);
        let text = render_table(&analyze(&facts(t)));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SEVERITY  CHECK"));
        let i = lines
            .iter()
            .position(|l| l.starts_with("problem   guard.port-moved"))
            .expect(&text);
        assert!(
            lines[i + 1]
                .trim_start()
                .starts_with("- container flow 10.77.0.2:25000"),
            "{text}"
        );
        assert!(
            lines[i + 3]
                .trim_start()
                .starts_with("fix: natfix attach --iface <external-iface> --netns /run/netns/h --guard 25000-25999"),
            "{text}"
        );
        assert!(text.ends_with("1 problem, 1 warning, 12 info\n"), "{text}");
    }

    #[test]
    fn long_evidence_is_cut_with_a_count() {
        let f = Finding::new("x", Severity::Info, "s").evidence((0..100).map(|i| i.to_string()));
        assert_eq!(f.evidence.len(), MAX_EVIDENCE);
        assert_eq!(
            f.evidence.last().unwrap(),
            &format!("... and {} more", 100 - (MAX_EVIDENCE - 1))
        );
    }

    const KFREE_FORMAT: &str = "name: kfree_skb\nID: 2310\nformat:\n\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;\n\n\
print fmt: \"skbaddr=%p rx_sk=%p protocol=%u location=%pS reason: %s\", REC->skbaddr, REC->rx_sk, REC->protocol, REC->location, \
__print_symbolic(REC->reason, { 2, \"NOT_SPECIFIED\" }, { 3, \"NO_SOCKET\" }, { 11, \"UDP_CSUM\" }, { 128, \"MAX\" })";

    const TRACE: &str = "\
# tracer: nop
#
#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION
          <idle>-0       [001] ..s2.   100.000001: kfree_skb: skbaddr=0000000012345678 rx_sk=0000000000000000 protocol=2048 location=__udp4_lib_rcv+0x3c/0x80 reason: UDP_CSUM
          <idle>-0       [001] ..s2.   100.000002: kfree_skb: skbaddr=0000000012345679 rx_sk=0000000000000000 protocol=2048 location=__udp4_lib_rcv+0x3c/0x80 reason: UDP_CSUM
          <idle>-0       [000] ..s2.   100.000003: kfree_skb: skbaddr=000000001234567a rx_sk=0000000000000000 protocol=2048 location=ip_rcv+0x10/0x20 reason: NO_SOCKET
";

    #[test]
    fn drop_reasons_parse_from_format_and_trace() {
        let sym = parse_reason_symbols(KFREE_FORMAT);
        assert_eq!(sym.get(&11).map(String::as_str), Some("UDP_CSUM"));
        assert_eq!(sym.len(), 4);
        assert!(parse_reason_symbols("print fmt: \"no reasons\"").is_empty());
        assert_eq!(
            count_trace_reasons(TRACE),
            vec![("UDP_CSUM".into(), 2), ("NO_SOCKET".into(), 1)]
        );
        let f = drops_finding(&DropSample::Counts(count_trace_reasons(TRACE)), Duration::from_secs(2));
        assert_eq!(f.severity, Severity::Warning);
        assert!(
            f.summary.contains("dropped 2 packets for a bad UDP checksum"),
            "{}",
            f.summary
        );
        assert_eq!(f.evidence[1], "UDP_CSUM: 2 (UDP receive path)");
    }
}
