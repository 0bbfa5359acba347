//! The NAT rules of a namespace as nftables and iptables show them: which
//! UDP ports are DNAT'd (published: they take new flows by design, so the
//! guard exempts them) and which masquerade randomises ports. Parsers are
//! pure (tested on fixtures); `read_here` runs the tools.

use std::{collections::BTreeSet, process::Command};

use anyhow::{Context, Result};
use serde_json::Value;

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
    pub fn merge(&mut self, other: Self) {
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


/// Runs `cmd`; its stdout, or a one-line error.
fn output(cmd: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().map_err(|e| format!("cannot run {}: {e}", cmd[0]))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().replace('\n', "; ");
        return Err(format!("`{}` failed: {err}", cmd.join(" ")));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The calling thread's namespace's NAT rules, from nftables and (where
/// installed) iptables-save; what could not be read is in `errors`.
#[must_use]
pub fn read_here() -> NatRules {
    let mut rules = NatRules::default();
    match output(&["nft", "-j", "list", "ruleset"]).and_then(|j| parse_nft_ruleset(&j).map_err(|e| format!("{e:#}"))) {
        Ok(r) => rules.merge(r),
        Err(e) => rules.errors.push(format!("nftables: {e}")),
    }
    // Absent iptables is normal on nft-only hosts; only nft's failure counts.
    if let Ok(text) = output(&["iptables-save"]) {
        rules.merge(parse_iptables_save(&text));
    }
    rules
}

impl NatRules {
    /// Every published UDP port, spans expanded.
    #[must_use]
    pub fn published_ports(&self) -> BTreeSet<u16> {
        self.published.iter().flat_map(|(s, _)| s.first..=s.last).collect()
    }
}
