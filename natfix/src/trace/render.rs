//! How a trace prints: one numbered line a step, packet by packet, each
//! request followed by its reply; `--json`: one object a step (the schema is
//! in the README and stable: fields are only added).

use std::fmt::Write as _;

use serde::Serialize;

use super::tuple::{Tuple, TupleJson};

/// What a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Entered a namespace through a device (its first netfilter hook saw it).
    Arrive,
    /// Sent by a local socket.
    Send,
    /// A natfix program's verdict.
    Natfix,
    /// A netfilter rule that matched.
    Rule,
    /// A base chain's policy applied.
    Policy,
    /// The routing decision.
    Route,
    /// Conntrack created an entry (and its NAT mapping).
    Conntrack,
    /// Conntrack reversed a flow's NAT on a reply.
    Denat,
    /// Handed to a device for sending.
    Xmit,
    /// Queued to a socket.
    Deliver,
    /// Freed with a drop reason.
    Drop,
}

/// A conntrack entry in `--json`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CtJson {
    pub event: &'static str,
    pub orig: TupleJson,
    pub reply: TupleJson,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat: Option<String>,
    /// The entry that held the port masquerade would have kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_holder: Option<Box<CtJson>>,
}

/// One step of a packet's path.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Step {
    /// Set by [`number`]: the packet's number, 1-based, counting requests and replies.
    pub packet: usize,
    pub direction: &'static str,
    pub step: usize,
    pub netns: String,
    pub kind: Kind,
    /// The line as printed (without number and namespace).
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tuple: Option<TupleJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<u64>,
    /// The rule as `nft list ruleset` prints it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The rule as `iptables-save` prints it (iptables-nft's tables).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iptables: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ct: Option<CtJson>,
    /// Drops: the kernel's `skb_drop_reason`; natfix steps: its counter reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Drops: the function that freed the packet (`name+0xoff`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// natfix steps: `guard` or `overlay`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub program: Option<&'static str>,
    /// Tracepoint steps: `CLOCK_MONOTONIC` of the kernel, ns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts_ns: Option<u64>,
}

impl Step {
    #[must_use]
    pub fn new(netns: &str, kind: Kind, text: impl Into<String>) -> Self {
        Self {
            packet: 0,
            direction: "request",
            step: 0,
            netns: netns.to_owned(),
            kind,
            text: text.into(),
            tuple: None,
            dev: None,
            family: None,
            table: None,
            chain: None,
            hook: None,
            priority: None,
            handle: None,
            rule: None,
            iptables: None,
            verdict: None,
            ct: None,
            reason: None,
            location: None,
            program: None,
            ts_ns: None,
        }
    }

    #[must_use]
    pub fn tuple(mut self, t: Option<&Tuple>) -> Self {
        self.tuple = t.map(TupleJson::from);
        self
    }

    #[must_use]
    pub fn dev(mut self, dev: Option<String>) -> Self {
        self.dev = dev;
        self
    }
}

/// A packet's path, before numbering.
#[derive(Debug, Clone)]
pub struct Path {
    /// Printed as the reply of the packet before it.
    pub reply: bool,
    /// The packet goes the flow's reply direction.
    pub dir_reply: bool,
    /// The packet as it started (before any NAT).
    pub tuple: Option<Tuple>,
    pub steps: Vec<Step>,
}

/// Numbers packets and steps; the paths come in print order.
pub fn number(paths: &mut [Path]) {
    for (i, p) in paths.iter_mut().enumerate() {
        let direction = if p.dir_reply { "reply" } else { "request" };
        for (j, s) in p.steps.iter_mut().enumerate() {
            (s.packet, s.direction, s.step) = (i + 1, direction, j + 1);
        }
    }
}

/// The human form: a heading per packet, a numbered line per step.
#[must_use]
pub fn text(paths: &[Path]) -> String {
    let mut out = String::new();
    for (i, p) in paths.iter().enumerate() {
        let what = if p.reply { "reply" } else { "packet" };
        let tuple = p.tuple.map_or_else(|| "(headers not seen)".to_owned(), |t| t.to_string());
        let _ = writeln!(out, "{what} {}: {tuple}", i + 1);
        let width = p.steps.len().to_string().len();
        for s in &p.steps {
            let _ = writeln!(out, "  {:>width$}. [{}] {}", s.step, s.netns, s.text);
        }
    }
    out
}

/// One JSON object per line, per step.
pub fn json_lines(paths: &[Path]) -> serde_json::Result<String> {
    let mut out = String::new();
    for s in paths.iter().flat_map(|p| &p.steps) {
        out.push_str(&serde_json::to_string(s)?);
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_number_and_print() {
        let t: Tuple = Tuple { proto: 17, src: "10.0.0.1".parse().unwrap(), sport: 1, dst: "10.0.0.2".parse().unwrap(), dport: 2 };
        let mut paths = vec![
            Path { reply: false, dir_reply: false, tuple: Some(t), steps: vec![Step::new("host", Kind::Arrive, "arrived on eth0").tuple(Some(&t))] },
            Path { reply: true, dir_reply: true, tuple: Some(t.rev()), steps: vec![Step::new("host", Kind::Deliver, "delivered to a socket")] },
        ];
        number(&mut paths);
        assert_eq!(text(&paths), "packet 1: udp 10.0.0.1:1 -> 10.0.0.2:2\n  1. [host] arrived on eth0\nreply 2: udp 10.0.0.2:2 -> 10.0.0.1:1\n  1. [host] delivered to a socket\n");
        let json = json_lines(&paths).unwrap();
        let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
        assert_eq!(first["kind"], "arrive");
        assert_eq!(first["tuple"]["src"], "10.0.0.1:1");
        assert!(first.get("table").is_none(), "absent fields are left out");
        let second: serde_json::Value = serde_json::from_str(json.lines().nth(1).unwrap()).unwrap();
        assert_eq!((second["packet"].as_u64(), second["direction"].as_str()), (Some(2), Some("reply")));
    }
}
