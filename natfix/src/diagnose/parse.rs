//! Parsers of what tools and /proc print (`ip -j`, `nft -j`,
//! `iptables-save`, `/proc/net/*`): pure functions, tested on fixtures.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use serde_json::Value;


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

pub use crate::sys::vxlan::{VxlanDev, parse_vxlan_links};

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
    pub(super) fn merge(&mut self, other: Self) {
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

