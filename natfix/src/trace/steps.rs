//! Observations turned into steps: one namespace's run of nftables trace
//! messages (with the routing decision between its hooks), a tracepoint
//! event, a conntrack entry, a natfix event.

use std::{collections::BTreeMap, fmt::Write as _};

use natfix_ebpf::trace::{KIND_DELIVER, KIND_DROP, KIND_XMIT, TraceEvent};

use super::{
    ct,
    drops::Kallsyms,
    marking::TABLE_PREFIX,
    nftrace::{TRACE_TYPE_POLICY, TraceMsg},
    obs::NsView,
    render::{CtJson, Kind, Step},
    ruleset::family_name,
    tuple::{Tuple, TupleJson},
};
use crate::{conntrack::CtEntry, observe::events::EventRecord};

/// Prefix of the overlay fix's nftables tables (`overlay::nft::table_name`).
const OVERLAY_TABLE_PREFIX: &str = "natfix_overlay_";

/// nftables' verdict code in words.
#[must_use]
pub fn verdict_name(code: i32, target: Option<&str>) -> String {
    let target = target.unwrap_or("?");
    match code {
        -1 => "continue".into(),
        -2 => "break".into(),
        -3 => format!("jump {target}"),
        -4 => format!("goto {target}"),
        -5 => "return".into(),
        c if c >= 0 => match c & 0xff {
            0 => "drop",
            1 => "accept",
            2 => "stolen",
            3 => "queue",
            4 => "repeat",
            _ => "unknown",
        }
        .into(),
        _ => "unknown".into(),
    }
}

/// One namespace's run, as steps.
#[derive(Debug, Default)]
pub struct RunSteps {
    /// Arrived on a device, or sent by a local socket (from natfix's marking chain).
    pub entry: Option<Step>,
    /// The packet as it entered (or left the socket).
    pub entry_tuple: Option<Tuple>,
    pub body: Vec<Step>,
    /// The hooks it passed decided local delivery.
    pub local_in: bool,
    /// It passed the forward hook.
    pub forwarded: bool,
    /// A rule or policy dropped it.
    pub dropped: bool,
}

/// The hook and priority of the base chain a run is in.
#[derive(Debug, Clone, Default)]
struct Base {
    hook: String,
    prio: i32,
}

/// Turns one run (messages of one packet in one namespace, in order) into steps.
#[must_use]
pub fn run_steps(ns: &NsView, msgs: &[&TraceMsg]) -> RunSteps {
    let mut out = RunSteps::default();
    let mut base = Base::default();
    for m in msgs {
        let key = (m.family, m.table.clone(), m.chain.clone());
        if let Some(info) = ns.rules.chains.get(&key)
            && let Some(hook) = &info.hook
        {
            let next = Base { hook: hook.clone(), prio: info.prio.unwrap_or(0) };
            route_step(ns, &mut out, &base.hook, &next.hook, m);
            base = next;
        }
        if m.table.starts_with(TABLE_PREFIX) {
            entry_step(ns, &mut out, m);
            continue;
        }
        if let Some(step) = message_step(ns, m, &base) {
            // A rule that rewrote is followed by its chain's policy: not "left alone".
            let rewrote = |s: &Step| s.kind == Kind::Natfix && s.table == step.table && s.handle.is_some();
            if step.kind == Kind::Natfix && step.handle.is_none() && out.body.iter().any(rewrote) {
                continue;
            }
            out.dropped |= step.verdict.as_deref() == Some("drop");
            out.body.push(step);
        }
    }
    out
}

/// Where the packet came from, from the first message of natfix's marking chains.
fn entry_step(ns: &NsView, out: &mut RunSteps, m: &TraceMsg) {
    if out.entry.is_some() || m.tuple.is_none() {
        return;
    }
    let outgoing = m.chain.starts_with("out");
    out.entry_tuple = m.tuple;
    out.entry = Some(if outgoing {
        let via = m.oif.map(|i| ns.ifname(i));
        let text = via.as_ref().map_or_else(|| "sent by a local socket".to_owned(), |d| format!("sent by a local socket, routed out via {d}"));
        Step::new(&ns.label, Kind::Send, text).tuple(m.tuple.as_ref()).dev(via)
    } else {
        let dev = m.iif.map(|i| ns.ifname(i));
        let text = format!("arrived on {}", dev.as_deref().unwrap_or("an unknown device"));
        Step::new(&ns.label, Kind::Arrive, text).tuple(m.tuple.as_ref()).dev(dev)
    });
}

/// The routing decision happened between prerouting and the next hook.
fn route_step(ns: &NsView, out: &mut RunSteps, from: &str, to: &str, m: &TraceMsg) {
    if from != "prerouting" || to == "prerouting" {
        return;
    }
    let step = match to {
        "input" => {
            out.local_in = true;
            Step::new(&ns.label, Kind::Route, "routing: local delivery")
        }
        "forward" | "postrouting" => {
            out.forwarded = true;
            let dev = m.oif.map(|i| ns.ifname(i));
            let text = format!("routing: forward, out via {}", dev.as_deref().unwrap_or("?"));
            Step::new(&ns.label, Kind::Route, text).dev(dev)
        }
        _ => return,
    };
    out.body.push(step.tuple(m.tuple.as_ref()));
}

fn message_step(ns: &NsView, m: &TraceMsg, base: &Base) -> Option<Step> {
    let overlay = m.table.starts_with(OVERLAY_TABLE_PREFIX);
    let policy = m.ty == TRACE_TYPE_POLICY;
    if m.handle.is_none() && !policy {
        return None; // the end of a regular chain: back to the caller
    }
    let verdict = if policy {
        if m.policy == Some(0) { "drop" } else { "accept" }.to_owned()
    } else {
        verdict_name(m.verdict.unwrap_or(-1), m.jump_target.as_deref())
    };
    let family = family_name(m.family);
    let rule = m.handle.and_then(|h| ns.rules.rules.get(&(m.family, m.table.clone(), m.chain.clone(), h)));
    let iptables = ns.rules.iptables.contains(&(m.family, m.table.clone()));
    let mut step = if overlay {
        let did = if policy { "left alone (not decrypted VXLAN on its interface)" } else { "rewrote: UDP checksum set to 0" };
        let mut s = Step::new(&ns.label, Kind::Natfix, format!("natfix overlay fix (nftables rule, table {}): {did}", m.table));
        s.program = Some("overlay");
        s
    } else if policy {
        let tag = if iptables { ", iptables-nft" } else { "" };
        let text = format!("{family} {} {} ({} {}{tag}): policy {verdict}", m.table, m.chain, base.hook, base.prio);
        Step::new(&ns.label, Kind::Policy, text)
    } else {
        let shown = rule.and_then(|r| r.iptables.clone().or_else(|| Some(r.text.clone())));
        let shown = shown.unwrap_or_else(|| format!("rule handle {} (its text is unknown)", m.handle.unwrap_or(0)));
        let tag = if iptables { ", iptables-nft" } else { "" };
        let text = format!("{family} {} {} ({} {}{tag}): {shown} => {verdict}", m.table, m.chain, base.hook, base.prio);
        Step::new(&ns.label, Kind::Rule, text)
    };
    step.family = Some(family);
    step.table = Some(m.table.clone());
    step.chain = Some(m.chain.clone());
    step.hook = (!base.hook.is_empty()).then(|| base.hook.clone());
    step.priority = (!base.hook.is_empty()).then_some(base.prio);
    step.handle = m.handle;
    step.rule = rule.map(|r| r.text.clone());
    step.iptables = rule.and_then(|r| r.iptables.clone());
    step.verdict = Some(verdict);
    Some(step.tuple(m.tuple.as_ref()))
}

/// A tracepoint event as a step.
#[must_use]
pub fn bpf_step(label: &str, ev: &TraceEvent, reasons: &BTreeMap<u32, String>, syms: &Kallsyms) -> Step {
    let tuple = Tuple::from_bpf(&ev.tuple);
    let dev = (ev.ifindex != 0).then(|| ev.dev_name());
    let mut step = match ev.kind {
        KIND_DROP => {
            let reason = reasons.get(&ev.reason).cloned().unwrap_or_else(|| format!("reason {}", ev.reason));
            let location = syms.symbolize(ev.location);
            let on = dev.as_ref().map_or(String::new(), |d| format!(" on {d}"));
            let mut s = Step::new(label, Kind::Drop, format!("dropped{on}: {reason} (in {location})"));
            s.reason = Some(reason);
            s.location = Some(location);
            s
        }
        KIND_XMIT => Step::new(label, Kind::Xmit, format!("sent out of {}", dev.as_deref().unwrap_or("?"))),
        KIND_DELIVER => Step::new(label, Kind::Deliver, "delivered to a socket"),
        k => Step::new(label, Kind::Xmit, format!("unknown tracepoint event {k}")),
    };
    step.ts_ns = Some(ev.ts_ns);
    step.tuple(tuple.as_ref()).dev(dev)
}

fn ct_json(event: &'static str, e: &CtEntry, holder: Option<&CtEntry>) -> CtJson {
    CtJson {
        event,
        orig: TupleJson::from(&Tuple::from_ct(&e.orig)),
        reply: TupleJson::from(&Tuple::from_ct(&e.reply)),
        nat: ct::nat_text(e),
        port_holder: holder.map(|h| Box::new(ct_json("existing", h, None))),
    }
}

/// The entry the request created, with its NAT mapping and, when masquerade
/// had to pick another port, the entry that held the wanted one.
#[must_use]
pub fn ct_new_step(label: &str, e: &CtEntry, holder: Option<&CtEntry>) -> Step {
    let mut text = format!("conntrack: new entry {}", ct::entry_text(e));
    let _ = match ct::nat_text(e) {
        Some(nat) => write!(text, "; NAT {nat}"),
        None => write!(text, "; no NAT"),
    };
    if let Some(wanted) = ct::wanted_reply(e) {
        let _ = match holder {
            Some(h) => write!(
                text,
                "; port {} was taken: its reply tuple {} belongs to the existing entry {}",
                e.orig.sport,
                wanted.to_string().trim_start_matches("udp "),
                ct::entry_text(h)
            ),
            None => write!(text, "; port {} was taken (no entry holds it now)", e.orig.sport),
        };
    }
    let mut step = Step::new(label, Kind::Conntrack, text);
    step.ct = Some(ct_json("new", e, holder));
    step
}

/// The reply meets the entry: conntrack undoes the NAT, no nat chain runs.
/// (before the hooks: the destination, at prerouting; after: the source, at postrouting).
#[must_use]
pub fn denat_steps(label: &str, e: &CtEntry) -> (Option<Step>, Option<Step>) {
    let (dst, src) = ct::denat_parts(e);
    let step = |what: String, hook: &str| {
        let text = format!("conntrack: reply of entry {}: {what} (NAT reversed at {hook} by conntrack, no nat chain)", ct::entry_text(e));
        let mut s = Step::new(label, Kind::Denat, text);
        s.hook = Some(hook.to_owned());
        s.ct = Some(ct_json("reply", e, None));
        s
    };
    (dst.map(|d| step(d, "prerouting")), src.map(|s| step(s, "postrouting")))
}

/// A natfix program's sampled event.
#[must_use]
pub fn own_event_step(label: &str, rec: &EventRecord, hook: Option<&str>) -> Step {
    let verb = if rec.reason.starts_with("dropped") { "dropped" } else { "rewrote" };
    let hook = hook.map_or(String::new(), |h| format!(" ({h})"));
    let mut s = Step::new(label, Kind::Natfix, format!("natfix {}{hook} on {}: {verb} ({})", rec.program, rec.iface, rec.reason));
    s.program = Some(rec.program);
    s.reason = Some(rec.reason.to_owned());
    s.dev = Some(rec.iface.clone());
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::ruleset::RuleSet;

    #[test]
    fn verdicts_read_like_nft() {
        assert_eq!(verdict_name(1, None), "accept");
        assert_eq!(verdict_name(0x0001_0000, None), "drop", "NF_DROP_ERR bits");
        assert_eq!(verdict_name(-3, Some("DOCKER")), "jump DOCKER");
        assert_eq!(verdict_name(-1, None), "continue");
    }

    #[test]
    fn a_run_gets_its_entry_routing_and_rules() {
        let json = r#"{"nftables": [
 {"chain": {"family": "ip", "table": "nat", "name": "PREROUTING", "type": "nat", "hook": "prerouting", "prio": -100}},
 {"chain": {"family": "ip", "table": "nat", "name": "DOCKER"}},
 {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "type": "filter", "hook": "forward", "prio": 0}},
 {"chain": {"family": "inet", "table": "natfix_trace_9", "name": "pre", "type": "filter", "hook": "prerouting", "prio": -350}}]}"#;
        let text = "table ip nat {\n\tchain DOCKER {\n\t\tudp dport 1812 dnat to 172.20.0.4:1812 # handle 9\n\t}\n}\n";
        let ns = NsView { label: "host".into(), rules: RuleSet::parse(json, text).unwrap(), ifnames: [(2, "ext".to_owned()), (5, "br0".to_owned())].into(), ..NsView::default() };
        let t = Tuple { proto: 17, src: "198.51.100.20".parse().unwrap(), sport: 40000, dst: "198.51.100.10".parse().unwrap(), dport: 1812 };
        let msg = |family, table: &str, chain: &str, handle, verdict, ty| TraceMsg { family, table: table.into(), chain: chain.into(), handle, verdict, ty, ..TraceMsg::default() };
        let mut ours = msg(1, "natfix_trace_9", "pre", Some(5), Some(-1), 3);
        (ours.tuple, ours.iif) = (Some(t), Some(2));
        let pre = msg(2, "nat", "PREROUTING", None, None, 1);
        let dnat = msg(2, "nat", "DOCKER", Some(9), Some(1), 3);
        let mut fwd = msg(2, "filter", "FORWARD", Some(4), Some(1), 3);
        fwd.oif = Some(5);
        let steps = run_steps(&ns, &[&ours, &pre, &dnat, &fwd]);
        assert_eq!(steps.entry.unwrap().text, "arrived on ext");
        let lines: Vec<&str> = steps.body.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(lines[0], "ip nat PREROUTING (prerouting -100, iptables-nft): policy accept");
        // Named and shaped as iptables-nft makes its tables.
        assert_eq!(lines[1], "ip nat DOCKER (prerouting -100, iptables-nft): udp dport 1812 dnat to 172.20.0.4:1812 => accept");
        assert_eq!(lines[2], "routing: forward, out via br0");
        assert_eq!(lines[3], "ip filter FORWARD (forward 0, iptables-nft): rule handle 4 (its text is unknown) => accept");
        assert!(steps.forwarded && !steps.local_in && !steps.dropped);
    }
}
