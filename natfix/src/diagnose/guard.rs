//! The guard's checks (seed 000): conntrack entries classified
//! (`analyze_conntrack`: unsolicited, masqueraded flows that lost their
//! port), and the findings with the `natfix attach --guard` or `natfix reap`
//! command that fixes each.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use super::{
    facts::NsFacts,
    parse::{NatRules, Span},
    report::{Finding, MAX_EVIDENCE, Severity, counted},
};
use crate::conntrack::{CtEntry, CtTuple, IPS_DST_NAT, IPS_SEEN_REPLY, IPS_SRC_NAT};

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

pub(super) fn guard_findings(t: &NsFacts, ns: Option<&str>, guarded: bool) -> Vec<Finding> {
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
        // A guard in place stops new entries; the old ones only a reap removes.
        let reap = format!("natfix reap{}", ns.map(|n| format!(" --netns {n}")).unwrap_or_default());
        let unsolicited_fix = if guarded { Some(reap.clone()) } else { fix.clone() };
        out.push(unsolicited_finding(a, unsolicited_fix, &reap, guarded));
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

fn unsolicited_finding(a: &CtAnalysis, fix: Option<String>, reap: &str, guarded: bool) -> Finding {
    let how = if guarded {
        format!("natfix's guard stops new ones; `{reap}` deletes these")
    } else {
        format!("attaching the guard deletes these as it starts; `{reap} --guard RANGE` deletes them without it")
    };
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
        lines.push(how);
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
    lines.push(how);
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

