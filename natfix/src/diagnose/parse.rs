//! Parsers of what tools and /proc print (`ip -j`, `nft -j`,
//! `iptables-save`, `/proc/net/*`): pure functions, tested on fixtures.

use std::collections::{BTreeMap, BTreeSet};


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

pub use crate::nat_rules::{NatRules, Span, parse_iptables_save, parse_nft_ruleset};

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

