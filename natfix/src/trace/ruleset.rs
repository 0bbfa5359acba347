//! The rule texts a trace prints. The kernel's trace messages name a rule by
//! (family, table, chain, handle) only, so, like `nft monitor trace`, natfix
//! reads the ruleset of each traced namespace: `nft -j -a list ruleset` for
//! the chains' hooks and priorities and for telling iptables-nft's tables
//! (their rules carry `xt` expressions), `nft -a -s list ruleset` for the
//! rules' text, and `iptables-nft-save` for iptables-nft rules in the words
//! that wrote them (the k-th rule of a chain is its k-th `-A` line).

use std::{
    collections::{HashMap, HashSet},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// The tables iptables-nft makes (`iptables -t`).
const IPTABLES_TABLES: [&str; 5] = ["filter", "nat", "mangle", "raw", "security"];

/// (nfgen family, table, chain).
pub type ChainKey = (u8, String, String);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainInfo {
    /// prerouting, input, forward, output, postrouting, ingress, egress; None: a regular chain.
    pub hook: Option<String>,
    pub prio: Option<i32>,
    /// filter, nat, route.
    pub ty: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleInfo {
    /// As `nft list ruleset` prints it.
    pub text: String,
    /// As `iptables-save` prints it, for iptables-nft's tables.
    pub iptables: Option<String>,
}

/// One namespace's ruleset, as far as traces need it.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    pub chains: HashMap<ChainKey, ChainInfo>,
    pub rules: HashMap<(u8, String, String, u64), RuleInfo>,
    /// (family, table) of tables iptables-nft wrote.
    pub iptables: HashSet<(u8, String)>,
    /// Some chain or rule makes conntrack run (nat chains, `ct` matches).
    pub uses_conntrack: bool,
}

/// nfgen family number of nft's family word.
#[must_use]
pub fn family_number(word: &str) -> u8 {
    match word {
        "inet" => 1,
        "ip" => 2,
        "arp" => 3,
        "netdev" => 5,
        "bridge" => 7,
        "ip6" => 10,
        _ => 0,
    }
}

#[must_use]
pub fn family_name(n: u8) -> &'static str {
    match n {
        1 => "inet",
        2 => "ip",
        3 => "arp",
        5 => "netdev",
        7 => "bridge",
        10 => "ip6",
        _ => "unknown",
    }
}

fn nft(args: &[&str]) -> Result<String> {
    let out = Command::new("nft").args(args).output().context("cannot run nft (install nftables)")?;
    if !out.status.success() {
        bail!("`nft {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl RuleSet {
    /// Reads the calling thread's namespace's ruleset.
    pub fn load() -> Result<Self> {
        let json = nft(&["-j", "-a", "list", "ruleset"])?;
        let text = nft(&["-a", "-s", "list", "ruleset"])?;
        let mut set = Self::parse(&json, &text)?;
        let tables: Vec<(u8, String)> = set.iptables.iter().cloned().collect();
        for (family, table) in tables {
            let tool = if family == 10 { "ip6tables-nft-save" } else { "iptables-nft-save" };
            // Best effort: the nft text stands in where iptables-save is missing.
            if let Ok(out) = Command::new(tool).args(["-t", &table]).output() {
                set.add_iptables_text(family, &table, &String::from_utf8_lossy(&out.stdout), &json);
            }
        }
        Ok(set)
    }

    /// From `nft -j -a list ruleset` and `nft -a -s list ruleset`.
    pub fn parse(json: &str, text: &str) -> Result<Self> {
        let doc: serde_json::Value = serde_json::from_str(json).context("`nft -j list ruleset` printed invalid JSON")?;
        let mut set = Self::default();
        for item in doc["nftables"].as_array().into_iter().flatten() {
            if let Some(c) = item.get("chain") {
                let key = (family_number(c["family"].as_str().unwrap_or("")), str_of(&c["table"]), str_of(&c["name"]));
                let info = ChainInfo {
                    hook: c["hook"].as_str().map(str::to_owned),
                    prio: c["prio"].as_i64().and_then(|p| i32::try_from(p).ok()),
                    ty: c["type"].as_str().map(str::to_owned),
                };
                set.uses_conntrack |= info.ty.as_deref() == Some("nat");
                set.chains.insert(key, info);
            } else if let Some(r) = item.get("rule") {
                let has_xt = r["expr"].as_array().into_iter().flatten().any(|e| e.get("xt").is_some());
                let expr = r["expr"].to_string();
                set.uses_conntrack |= expr.contains("\"ct\":") || expr.contains("\"name\":\"conntrack\"") || expr.contains("\"name\":\"state\"");
                if has_xt {
                    set.iptables.insert((family_number(r["family"].as_str().unwrap_or("")), str_of(&r["table"])));
                }
            }
        }
        set.mark_iptables_by_shape();
        for ((family, table, chain), handle, rule) in parse_text(text) {
            set.rules.insert((family, table, chain, handle), RuleInfo { text: rule, iptables: None });
        }
        Ok(set)
    }

    /// iptables-nft tables whose rules all translated natively carry no `xt`:
    /// an iptables table name with only iptables' uppercase base chains.
    fn mark_iptables_by_shape(&mut self) {
        let mut tables: HashMap<(u8, String), bool> = HashMap::new();
        for ((family, table, chain), info) in &self.chains {
            if (*family == 2 || *family == 10) && IPTABLES_TABLES.contains(&table.as_str()) {
                let ok = tables.entry((*family, table.clone())).or_insert(true);
                *ok &= info.hook.is_none() || chain.chars().all(|c| c.is_ascii_uppercase());
            }
        }
        self.iptables.extend(tables.into_iter().filter(|(_, ok)| *ok).map(|(k, _)| k));
    }

    /// Pairs each rule of `table` with its `-A` line, by position in its chain.
    pub fn add_iptables_text(&mut self, family: u8, table: &str, save: &str, json: &str) {
        let Ok(doc) = serde_json::from_str::<serde_json::Value>(json) else { return };
        let mut lines: HashMap<String, Vec<String>> = HashMap::new();
        for line in save.lines().filter_map(|l| l.strip_prefix("-A ")) {
            let chain = line.split_whitespace().next().unwrap_or("").to_owned();
            lines.entry(chain).or_default().push(format!("-A {line}"));
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        for r in doc["nftables"].as_array().into_iter().flatten().filter_map(|i| i.get("rule")) {
            if family_number(r["family"].as_str().unwrap_or("")) != family || r["table"] != table {
                continue;
            }
            let chain = str_of(&r["chain"]);
            let k = seen.entry(chain.clone()).or_default();
            let line = lines.get(&chain).and_then(|l| l.get(*k)).cloned();
            *k += 1;
            if let Some(handle) = r["handle"].as_u64() {
                let key = (family, table.to_owned(), chain, handle);
                self.rules.entry(key).or_default().iptables = line;
            }
        }
    }

    /// Keeps what `newer` has and what only this one had (rules deleted
    /// since may still be named by messages in flight).
    pub fn merge(&mut self, newer: Self) {
        self.chains.extend(newer.chains);
        self.rules.extend(newer.rules);
        self.iptables.extend(newer.iptables);
        self.uses_conntrack = newer.uses_conntrack;
    }
}

fn str_of(v: &serde_json::Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// Strips nft's quotes from a name.
fn name(word: &str) -> String {
    word.trim_matches('"').to_owned()
}

/// ((family, table, chain), handle, text) of every rule in `nft -a list ruleset` output.
#[must_use]
pub fn parse_text(text: &str) -> Vec<(ChainKey, u64, String)> {
    let mut out = Vec::new();
    let mut table: Option<(u8, String)> = None;
    let mut chain: Option<String> = None;
    let mut skip_depth = 0usize;
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        let words: Vec<&str> = line.split_whitespace().collect();
        if skip_depth > 0 {
            skip_depth = (skip_depth + line.matches('{').count()).saturating_sub(line.matches('}').count());
            continue;
        }
        match (&table, &chain, words.as_slice()) {
            (None, _, ["table", fam, t, "{", ..]) => table = Some((family_number(fam), name(t))),
            (Some(_), None, ["chain", c, "{", ..]) => chain = Some(name(c)),
            (Some(_), None, ["}"]) => table = None,
            (Some(_), None, [_, ..]) if line.contains('{') => {
                skip_depth = line.matches('{').count().saturating_sub(line.matches('}').count());
            }
            (Some(_), Some(_), ["}"]) => {
                chain = None;
                pending.clear();
            }
            (Some((fam, t)), Some(c), _) => {
                if pending.is_empty() && (line.starts_with("type ") || line.starts_with("policy ") || line.starts_with("comment ")) {
                    continue;
                }
                if !pending.is_empty() {
                    pending.push(' ');
                }
                pending.push_str(line);
                if let Some((rule, handle)) = pending.rsplit_once(" # handle ")
                    && let Ok(h) = handle.trim().parse::<u64>()
                {
                    out.push(((*fam, t.clone(), c.clone()), h, rule.trim().to_owned()));
                    pending.clear();
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"table ip nat { # handle 2
	chain PREROUTING { # handle 1
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local counter jump DOCKER # handle 5
	}

	chain DOCKER { # handle 3
		iifname != "docker0" meta l4proto udp udp dport 1812 counter dnat to 172.20.0.4:1812 # handle 9
	}
}
table inet natfix_trace_1 { # handle 7
	set flows4 { # handle 3
		type ipv4_addr . inet_proto . inet_service . ipv4_addr . inet_service
		elements = { 10.0.0.1 . udp . 1 . 10.0.0.2 . 2 }
	}
	chain pre { # handle 1
		type filter hook prerouting priority -350; policy accept;
		meta l4proto { tcp, udp } th dport 1812 meta nftrace set 1 # handle 5
	}
}
"#;

    const JSON: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
 {"table": {"family": "ip", "name": "nat", "handle": 2}},
 {"chain": {"family": "ip", "table": "nat", "name": "PREROUTING", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
 {"chain": {"family": "ip", "table": "nat", "name": "DOCKER", "handle": 3}},
 {"rule": {"family": "ip", "table": "nat", "chain": "PREROUTING", "handle": 5, "expr": [{"xt": {"type": "match", "name": "addrtype"}}]}},
 {"rule": {"family": "ip", "table": "nat", "chain": "DOCKER", "handle": 9, "expr": [{"xt": {"type": "target", "name": "DNAT"}}]}},
 {"chain": {"family": "inet", "table": "natfix_trace_1", "name": "pre", "handle": 1, "type": "filter", "hook": "prerouting", "prio": -350, "policy": "accept"}}
]}"#;

    #[test]
    fn rules_chains_and_iptables_tables() {
        let mut set = RuleSet::parse(JSON, TEXT).unwrap();
        let rule = |set: &RuleSet, f: u8, t: &str, c: &str, h: u64| set.rules.get(&(f, t.into(), c.into(), h)).cloned();
        assert_eq!(rule(&set, 2, "nat", "PREROUTING", 5).unwrap().text, "fib daddr type local counter jump DOCKER");
        assert_eq!(rule(&set, 2, "nat", "DOCKER", 9).unwrap().text, r#"iifname != "docker0" meta l4proto udp udp dport 1812 counter dnat to 172.20.0.4:1812"#);
        assert_eq!(rule(&set, 1, "natfix_trace_1", "pre", 5).unwrap().text, "meta l4proto { tcp, udp } th dport 1812 meta nftrace set 1");
        assert_eq!(set.rules.len(), 3, "set elements are no rules");
        let pre = &set.chains[&(2, "nat".into(), "PREROUTING".into())];
        assert_eq!((pre.hook.as_deref(), pre.prio), (Some("prerouting"), Some(-100)));
        assert!(set.iptables.contains(&(2, "nat".into())));
        assert!(set.uses_conntrack, "a nat chain");
        assert!(!set.iptables.iter().any(|(_, t)| t.starts_with("natfix")));
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n-A DOCKER ! -i docker0 -p udp -m udp --dport 1812 -j DNAT --to-destination 172.20.0.4:1812\nCOMMIT\n";
        set.add_iptables_text(2, "nat", save, JSON);
        assert_eq!(
            rule(&set, 2, "nat", "DOCKER", 9).unwrap().iptables.as_deref(),
            Some("-A DOCKER ! -i docker0 -p udp -m udp --dport 1812 -j DNAT --to-destination 172.20.0.4:1812")
        );
    }
}
