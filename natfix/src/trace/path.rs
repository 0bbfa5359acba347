//! Path assembly: observations in, one ordered path per packet out.
//!
//! - Flows (`flows`) say which flow and direction each tuple belongs to.
//! - nftables messages of one packet in one namespace form a run (same
//!   namespace and trace id, the same flow, close in time).
//! - Tracepoint events of one skb form a group (same address, until it is
//!   dropped or queued to a socket): a group crosses namespaces, since a
//!   veth hands the same skb over.
//! - A packet is a group plus the runs paired with it: per (flow, direction,
//!   namespace), runs and the groups that were marked there pair in order.
//! - Within a packet, the tracepoint events (kernel timestamps) order the
//!   namespaces; in each, the run's steps come before the events (the hooks
//!   run before a packet is sent, dropped after netfilter or delivered).
//!
//! Requests print in the order they started, each followed by its reply.

use std::collections::{BTreeMap, HashMap, HashSet};

use natfix_ebpf::trace::{KIND_DELIVER, KIND_DROP, KIND_XMIT, TraceEvent};

use super::{
    drops::Kallsyms,
    filter::Filter,
    flows::{Dir, Flows},
    nftrace::TraceMsg,
    obs::{NftObs, NsView, Observations, OwnView},
    render::{Kind, Path, Step},
    steps,
    tuple::Tuple,
};
use crate::conntrack::{CtEntry, CtEventKind};

/// Messages of one packet in one namespace further apart than this start a new run.
const RUN_GAP_NS: u64 = 50_000_000;
/// Events of one skb further apart than this belong to different packets.
const GROUP_GAP_NS: u64 = 1_000_000_000;
/// A copy of a packet (a new skb) appears in the next namespace within this.
const HOP_NS: u64 = 5_000_000;
/// A natfix event this close to a drop on its interface is that drop's cause.
const OWN_MATCH_NS: u64 = 100_000_000;

pub struct Context<'a> {
    pub filter: &'a Filter,
    pub namespaces: &'a [NsView],
    pub own: &'a [OwnView],
    pub reasons: &'a BTreeMap<u32, String>,
    pub syms: &'a Kallsyms,
}

struct Run<'o> {
    ns: usize,
    flow: Option<(usize, Dir)>,
    msgs: Vec<&'o TraceMsg>,
    t_ns: u64,
    last_ns: u64,
}

struct Group<'o> {
    flow: (usize, Dir),
    events: Vec<&'o TraceEvent>,
}

#[derive(Default)]
struct Packet {
    flow: usize,
    dir: Option<Dir>,
    group: Option<usize>,
    runs: Vec<usize>,
    own: Vec<usize>,
    start: u64,
}

/// A namespace's conntrack knowledge of a flow: the entry, and what held its port.
type CtKnown = HashMap<(usize, usize), (CtEntry, Option<CtEntry>)>;

struct Assembly<'a, 'o> {
    ctx: &'a Context<'a>,
    obs: &'o Observations,
    flows: Flows,
    runs: Vec<Run<'o>>,
    groups: Vec<Group<'o>>,
    packets: Vec<Packet>,
    ct: CtKnown,
}

/// Assembles the paths of every packet the filter wants.
#[must_use]
pub fn assemble(obs: &Observations, ctx: &Context<'_>) -> Vec<Path> {
    let mut a = Assembly { ctx, obs, flows: Flows::default(), runs: Vec::new(), groups: Vec::new(), packets: Vec::new(), ct: HashMap::new() };
    a.build_flows();
    a.build_runs();
    a.build_groups();
    a.build_packets();
    a.attach_own();
    a.paths()
}

impl Assembly<'_, '_> {
    fn build_flows(&mut self) {
        for c in &self.obs.ct {
            self.flows.add_entry(&c.ev.entry);
        }
        for m in &self.obs.nft {
            if let Some(t) = m.msg.tuple {
                self.flows.add_tuple(t);
            }
        }
        for b in &self.obs.bpf {
            if let Some(t) = Tuple::from_bpf(&b.ev.tuple) {
                self.flows.add_tuple(t);
            }
        }
        for o in &self.obs.own {
            if let Some(t) = super::own::event_tuple(&o.rec) {
                self.flows.add_tuple(t);
            }
        }
        self.flows.judge(self.ctx.filter);
        for c in &self.obs.ct {
            let Some((flow, _)) = self.flows.lookup(&Tuple::from_ct(&c.ev.entry.orig)) else { continue };
            if c.ev.kind != CtEventKind::Destroy {
                let holder = c.port_holder.clone().or_else(|| self.ct.get(&(flow, c.ns)).and_then(|(_, h)| h.clone()));
                self.ct.insert((flow, c.ns), (c.ev.entry.clone(), holder));
            }
        }
    }

    fn build_runs(&mut self) {
        let mut open: HashMap<(usize, u32), usize> = HashMap::new();
        for o in &self.obs.nft {
            let flow = o.msg.tuple.and_then(|t| self.flows.lookup(&t));
            let key = (o.ns, o.msg.id);
            let same = open.get(&key).copied().filter(|&i| {
                let r = &self.runs[i];
                o.t_ns.saturating_sub(r.last_ns) <= RUN_GAP_NS && (flow.is_none() || r.flow.is_none() || flow.map(|f| f.0) == r.flow.map(|f| f.0))
            });
            let target = same.or_else(|| self.continued_run(o, flow));
            if let Some(i) = target {
                open.insert(key, i);
                let r = &mut self.runs[i];
                r.msgs.push(&o.msg);
                r.last_ns = o.t_ns;
                r.flow = r.flow.or(flow);
            } else {
                open.insert(key, self.runs.len());
                self.runs.push(Run { ns: o.ns, flow, msgs: vec![&o.msg], t_ns: o.t_ns, last_ns: o.t_ns });
            }
        }
    }

    /// A packet's trace id changes with its input interface (a bridge
    /// passing it up, a loop through lo): a run that starts past natfix's
    /// marking chain continues the last run of its flow in the namespace.
    fn continued_run(&self, o: &NftObs, flow: Option<(usize, Dir)>) -> Option<usize> {
        if o.msg.table.starts_with(super::marking::TABLE_PREFIX) {
            return None;
        }
        let flow = flow?;
        self.runs
            .iter()
            .rposition(|r| r.ns == o.ns && r.flow == Some(flow))
            .filter(|&i| o.t_ns.saturating_sub(self.runs[i].last_ns) <= RUN_GAP_NS)
    }

    fn build_groups(&mut self) {
        let mut events: Vec<&TraceEvent> = self.obs.bpf.iter().map(|b| &b.ev).collect();
        events.sort_by_key(|e| e.ts_ns);
        let mut open: HashMap<u64, usize> = HashMap::new();
        let traced: HashSet<u64> = self.ctx.namespaces.iter().map(|n| n.inode).collect();
        // Other namespaces' packets may match too: not what was asked for.
        for ev in events.into_iter().filter(|e| e.netns == 0 || traced.contains(&u64::from(e.netns))) {
            let Some(flow) = Tuple::from_bpf(&ev.tuple).and_then(|t| self.flows.lookup(&t)) else { continue };
            let joins = open.get(&ev.skb).filter(|&&i| continues(&self.groups[i], flow, ev));
            if let Some(&i) = joins {
                self.groups[i].events.push(ev);
            } else {
                open.insert(ev.skb, self.groups.len());
                self.groups.push(Group { flow, events: vec![ev] });
            }
        }
        self.join_copies();
    }

    /// A veth with XDP (and other paths) may copy the skb: a group that
    /// starts in another namespace right after a group of its flow was sent
    /// out is that packet, continued.
    fn join_copies(&mut self) {
        let mut i = 1;
        while i < self.groups.len() {
            let g = &self.groups[i];
            let first = g.events[0];
            let before = (0..i).rev().find(|&j| {
                let f = &self.groups[j];
                let last = f.events[f.events.len() - 1];
                f.flow == g.flow
                    && last.kind == KIND_XMIT
                    && first.ts_ns.saturating_sub(last.ts_ns) < HOP_NS
                    && !f.events.iter().any(|e| e.netns == first.netns)
            });
            if let Some(j) = before {
                let moved = std::mem::take(&mut self.groups[i].events);
                self.groups[j].events.extend(moved);
                self.groups.remove(i);
            } else {
                i += 1;
            }
        }
    }

    fn inode_of(&self, ns: usize) -> u64 {
        self.ctx.namespaces.get(ns).map_or(0, |n| n.inode)
    }

    fn build_packets(&mut self) {
        for (i, g) in self.groups.iter().enumerate() {
            self.packets.push(Packet { flow: g.flow.0, dir: Some(g.flow.1), group: Some(i), start: g.events[0].ts_ns, ..Packet::default() });
        }
        // Runs pair with the groups marked in their namespace, in order.
        let mut by_key: BTreeMap<(usize, u8, usize), Vec<usize>> = BTreeMap::new();
        for (i, r) in self.runs.iter().enumerate() {
            if let Some((flow, dir)) = r.flow {
                by_key.entry((flow, u8::from(dir == Dir::Reply), r.ns)).or_default().push(i);
            }
        }
        for ((flow, reply, ns), runs) in by_key {
            let dir = if reply == 1 { Dir::Reply } else { Dir::Request };
            let inode = self.inode_of(ns);
            let mut marked: Vec<(u64, usize)> = self
                .packets
                .iter()
                .enumerate()
                .filter(|(_, p)| p.flow == flow && p.dir == Some(dir))
                .filter_map(|(pi, p)| {
                    let g = &self.groups[p.group?];
                    g.events.iter().find(|e| u64::from(e.netns) == inode && e.nf_trace != 0).map(|e| (e.ts_ns, pi))
                })
                .collect();
            marked.sort_unstable();
            let mut marked = marked.into_iter().map(|(_, pi)| pi);
            for run in runs {
                let target = marked.next().or_else(|| self.packet_without(flow, dir, inode));
                match target {
                    Some(pi) => self.packets[pi].runs.push(run),
                    None => self.packets.push(Packet { flow, dir: Some(dir), runs: vec![run], start: self.runs[run].t_ns, ..Packet::default() }),
                }
            }
        }
    }

    /// The first packet of (flow, dir) that has nothing in namespace `inode` yet.
    fn packet_without(&self, flow: usize, dir: Dir, inode: u64) -> Option<usize> {
        let mut candidates: Vec<(u64, usize)> = self
            .packets
            .iter()
            .enumerate()
            .filter(|(_, p)| p.flow == flow && p.dir == Some(dir))
            .filter(|(_, p)| !p.runs.iter().any(|&r| self.inode_of(self.runs[r].ns) == inode))
            .filter(|(_, p)| p.group.is_none_or(|g| !self.groups[g].events.iter().any(|e| u64::from(e.netns) == inode)))
            .map(|(i, p)| (p.start, i))
            .collect();
        candidates.sort_unstable();
        candidates.first().map(|(_, i)| *i)
    }

    /// natfix's events join the packet dropped right then on their interface, or stand alone (XDP).
    fn attach_own(&mut self) {
        for (i, o) in self.obs.own.iter().enumerate() {
            let Some(tuple) = super::own::event_tuple(&o.rec) else { continue };
            let Some((flow, dir)) = self.flows.lookup(&tuple) else { continue };
            // Dropped by natfix at tc (the kernel saw the drop), or at XDP right after it left its last hop.
            let near = |p: &Packet| {
                p.group.is_some_and(|g| {
                    let events = &self.groups[g].events;
                    let dropped = events.iter().any(|e| e.kind == KIND_DROP && e.dev_name() == o.rec.iface && e.ts_ns.abs_diff(o.rec.ts_ns) < OWN_MATCH_NS);
                    let last = events[events.len() - 1];
                    dropped || (last.kind == KIND_XMIT && last.ts_ns.abs_diff(o.rec.ts_ns) < OWN_MATCH_NS)
                })
            };
            match self.packets.iter().position(|p| p.flow == flow && p.dir == Some(dir) && near(p)) {
                Some(pi) => self.packets[pi].own.push(i),
                None => self.packets.push(Packet { flow, dir: Some(dir), own: vec![i], start: o.rec.ts_ns, ..Packet::default() }),
            }
        }
    }

    /// Every packet's path, requests in start order, each followed by its reply.
    fn paths(&self) -> Vec<Path> {
        let mut order: Vec<usize> = (0..self.packets.len()).collect();
        order.sort_by_key(|&i| self.packets[i].start);
        let mut done: HashSet<usize> = HashSet::new();
        let mut used_ct: HashSet<(usize, usize, bool)> = HashSet::new();
        let mut out = Vec::new();
        for &i in &order {
            if !done.insert(i) {
                continue;
            }
            let p = &self.packets[i];
            out.push(self.path(p, false, &mut used_ct));
            if p.dir != Some(Dir::Request) {
                continue;
            }
            let reply = order.iter().copied().find(|&j| {
                !done.contains(&j) && self.packets[j].flow == p.flow && self.packets[j].dir == Some(Dir::Reply) && self.packets[j].start >= p.start
            });
            if let Some(j) = reply {
                done.insert(j);
                out.push(self.path(&self.packets[j], true, &mut used_ct));
            }
        }
        out
    }

    fn path(&self, p: &Packet, answers: bool, used_ct: &mut HashSet<(usize, usize, bool)>) -> Path {
        let segments = self.segments(p);
        let mut steps = Vec::new();
        for (k, seg) in segments.iter().enumerate() {
            let last = k + 1 == segments.len();
            steps.extend(self.segment_steps(p, seg, last, used_ct));
        }
        // natfix's verdicts no kernel drop shows (XDP: the packet never became an skb) end the path.
        steps.extend(self.own_steps_unplaced(p));
        Path { reply: answers, dir_reply: p.dir == Some(Dir::Reply), tuple: self.first_tuple(p), steps }
    }

    fn first_tuple(&self, p: &Packet) -> Option<Tuple> {
        let first_run = p.runs.iter().map(|&r| &self.runs[r]).min_by_key(|r| r.t_ns);
        let from_run = first_run.and_then(|r| r.msgs.iter().find_map(|m| m.tuple));
        let group = p.group.map(|g| &self.groups[g]);
        let from_group = group.and_then(|g| g.events.iter().find_map(|e| Tuple::from_bpf(&e.tuple)));
        // The run's time is when natfix read it: after the kernel sent it.
        let runs_first = first_run.is_some_and(|r| group.is_none_or(|g| r.t_ns <= g.events[0].ts_ns));
        let from_own = || p.own.first().and_then(|&i| super::own::event_tuple(&self.obs.own[i].rec));
        if runs_first { from_run.or(from_group).or_else(from_own) } else { from_group.or(from_run).or_else(from_own) }
    }
}

/// One namespace's share of a packet: its run (if traced there) and events.
struct Segment<'o> {
    inode: u64,
    ns: Option<usize>,
    run: Option<usize>,
    events: Vec<&'o TraceEvent>,
}

impl<'o> Assembly<'_, 'o> {
    /// The packet's namespaces in the order its events happened, runs placed in them.
    fn segments(&self, p: &Packet) -> Vec<Segment<'o>> {
        let mut segs: Vec<Segment<'o>> = Vec::new();
        if let Some(g) = p.group {
            for &e in &self.groups[g].events {
                let inode = u64::from(e.netns);
                match segs.last_mut() {
                    Some(s) if s.inode == inode => s.events.push(e),
                    _ => segs.push(Segment { inode, ns: self.ns_of(inode), run: None, events: vec![e] }),
                }
            }
        }
        for &r in &p.runs {
            let run = &self.runs[r];
            let inode = self.inode_of(run.ns);
            if let Some(s) = segs.iter_mut().find(|s| s.inode == inode && s.run.is_none()) {
                s.run = Some(r);
            } else {
                let seg = Segment { inode, ns: Some(run.ns), run: Some(r), events: Vec::new() };
                // A locally sent packet starts where it was sent.
                let sent = run.msgs.iter().any(|m| m.table.starts_with(super::marking::TABLE_PREFIX) && m.chain.starts_with("out"));
                if sent { segs.insert(0, seg) } else { segs.push(seg) }
            }
        }
        segs
    }

    fn ns_of(&self, inode: u64) -> Option<usize> {
        self.ctx.namespaces.iter().position(|n| n.inode == inode)
    }

    fn label(&self, seg: &Segment<'_>) -> String {
        seg.ns.map_or_else(|| format!("netns:{}", seg.inode), |i| self.ctx.namespaces[i].label.clone())
    }

    fn segment_steps(&self, p: &Packet, seg: &Segment<'o>, last: bool, used_ct: &mut HashSet<(usize, usize, bool)>) -> Vec<Step> {
        let label = self.label(seg);
        let mut out = Vec::new();
        let run = seg.run.map(|r| {
            let ns = &self.ctx.namespaces[self.runs[r].ns];
            steps::run_steps(ns, &self.runs[r].msgs)
        });
        let reply = p.dir == Some(Dir::Reply);
        let ct = seg.ns.and_then(|ns| self.ct.get(&(p.flow, ns)).map(|c| (ns, c)));
        if let Some(run) = &run {
            out.extend(run.entry.clone());
            out.extend(self.guard_pass(seg, run));
        }
        let (denat_pre, denat_post) = match ct {
            Some((ns, (entry, _))) if reply && used_ct.insert((p.flow, ns, true)) => steps::denat_steps(&label, entry),
            _ => (None, None),
        };
        out.extend(denat_pre);
        if let Some(run) = &run {
            out.extend(run.body.iter().cloned());
            if !run.local_in && !run.forwarded && !run.dropped && run.entry.as_ref().is_some_and(|e| e.kind == Kind::Arrive) {
                out.extend(derived_route(&label, &seg.events));
            }
        }
        out.extend(denat_post);
        if let Some((ns, (entry, holder))) = ct
            && !reply
            && used_ct.insert((p.flow, ns, false))
        {
            out.push(steps::ct_new_step(&label, entry, holder.as_ref()));
        }
        for e in &seg.events {
            if e.kind == KIND_DROP {
                out.extend(self.own_steps_for(p, e));
            }
            out.push(steps::bpf_step(&label, e, self.ctx.reasons, self.ctx.syms));
        }
        let left = seg.events.iter().any(|e| matches!(e.kind, KIND_DROP | KIND_DELIVER | KIND_XMIT));
        let arrived = run.as_ref().is_some_and(|r| !r.dropped && r.entry.as_ref().is_some_and(|e| e.kind == Kind::Arrive));
        if last && !left && arrived && !run.as_ref().is_some_and(|r| r.forwarded) {
            out.push(Step::new(
                &label,
                Kind::Deliver,
                "delivered: no drop seen (taken by a UDP encapsulation socket such as VXLAN's, or queued on a kernel without sock:sk_data_ready)",
            ));
        }
        out
    }

    /// The guard on the device a packet arrived on let it through.
    fn guard_pass(&self, seg: &Segment<'_>, run: &steps::RunSteps) -> Option<Step> {
        let entry = run.entry.as_ref().filter(|e| e.kind == Kind::Arrive)?;
        let dev = entry.dev.as_deref()?;
        let own = self.ctx.own.iter().find(|o| Some(o.ns) == seg.ns && o.iface == dev && o.guard_hook.is_some())?;
        let reason = super::own::guard_pass_reason(own.guard.as_ref()?, run.entry_tuple.as_ref()?);
        let mut s = Step::new(&self.label(seg), Kind::Natfix, format!("natfix guard ({}) on {dev}: passed, {reason}", own.guard_hook.unwrap_or("?")));
        s.program = Some("guard");
        s.dev = Some(dev.to_owned());
        Some(s)
    }

    fn own_steps_for(&self, p: &Packet, drop: &TraceEvent) -> Vec<Step> {
        p.own
            .iter()
            .map(|&i| &self.obs.own[i])
            .filter(|o| o.rec.iface == drop.dev_name())
            .map(|o| self.own_step(o))
            .collect()
    }

    fn own_steps_unplaced(&self, p: &Packet) -> Vec<Step> {
        let drops: Vec<&TraceEvent> = p.group.map_or_else(Vec::new, |g| self.groups[g].events.iter().copied().filter(|e| e.kind == KIND_DROP).collect());
        p.own
            .iter()
            .map(|&i| &self.obs.own[i])
            .filter(|o| !drops.iter().any(|d| d.dev_name() == o.rec.iface))
            .map(|o| self.own_step(o))
            .collect()
    }

    fn own_step(&self, o: &super::obs::OwnObs) -> Step {
        let view = self.ctx.own.get(o.att);
        let label = view.and_then(|v| self.ctx.namespaces.get(v.ns)).map_or("?", |n| n.label.as_str());
        let hook = if o.rec.program == "guard" { view.and_then(|v| v.guard_hook) } else { Some("tc") };
        let tuple = super::own::event_tuple(&o.rec);
        steps::own_event_step(label, &o.rec, hook).tuple(tuple.as_ref())
    }
}

/// Whether `ev` is the same packet as `g` (skb addresses are reused at
/// once): same flow and direction, not after its end, not long after, and
/// not back in a namespace it already left.
fn continues(g: &Group<'_>, flow: (usize, Dir), ev: &TraceEvent) -> bool {
    let last = g.events[g.events.len() - 1];
    let left_before = g.events.iter().any(|e| e.netns == ev.netns) && last.netns != ev.netns;
    let repeated = g.events.iter().any(|e| e.netns == ev.netns && e.kind == ev.kind && e.ifindex == ev.ifindex);
    g.flow == flow
        && !matches!(last.kind, KIND_DROP | KIND_DELIVER)
        && ev.ts_ns.saturating_sub(last.ts_ns) < GROUP_GAP_NS
        && !left_before
        && !repeated
}

/// The routing decision of a namespace without chains after prerouting, from what happened next.
fn derived_route(label: &str, events: &[&TraceEvent]) -> Option<Step> {
    let first = events.first()?;
    match first.kind {
        KIND_DELIVER => Some(Step::new(label, Kind::Route, "routing: local delivery")),
        KIND_XMIT => {
            let dev = first.dev_name();
            Some(Step::new(label, Kind::Route, format!("routing: forward, out via {dev}")).dev(Some(dev)))
        }
        _ => None,
    }
}
