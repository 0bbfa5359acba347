//! A running trace: per traced namespace a marking table, an nftables trace
//! socket and a conntrack event socket (each opened inside its namespace,
//! where it stays); the tracepoint programs; natfix's attachments. `poll`
//! reads whatever arrived; `paths` assembles what was seen so far.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    os::fd::{AsFd, AsRawFd as _, BorrowedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{
    TraceOptions, ct,
    drops::{Kallsyms, Probes, drop_reason_names},
    filter::Filter,
    marking::{MarkPlan, MarkTable},
    nftrace::TraceSocket,
    obs::{BpfObs, CtObs, NftObs, NsView, Observations, OwnObs, OwnView},
    own::{self, OwnAttachment},
    path::{self, Context as PathContext},
    render::Path,
    ruleset::RuleSet,
    tuple::Tuple,
};
use crate::{
    conntrack::{self, CtEventKind, CtEventStream},
    sys::netns::Netns,
};

/// Observations kept at most; beyond, what arrives is read and dropped
/// (a filter that matches a flood must not exhaust memory).
const MAX_OBSERVATIONS: usize = 200_000;

/// Ruleset re-reads after a commit are at most this frequent.
const RULES_REFRESH: Duration = Duration::from_millis(200);

struct Traced {
    netns: Netns,
    view: NsView,
    socket: TraceSocket,
    ct: Option<CtEventStream>,
    /// Held for its side effect: the marking table lives as long as this.
    mark: MarkTable,
    rules_stale: Option<Instant>,
    lost_reported: bool,
}

pub struct Session {
    filter: Filter,
    traced: Vec<Traced>,
    probes: Probes,
    own: Vec<OwnAttachment>,
    own_views: Vec<OwnView>,
    obs: Observations,
    reasons: BTreeMap<u32, String>,
    syms: Kallsyms,
    learned: HashSet<Tuple>,
    started: Instant,
    full_reported: bool,
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec()).unwrap_or(0))
}

/// Interface index -> name in the calling thread's namespace.
fn ifnames() -> HashMap<u32, String> {
    nix::net::if_::if_nameindex()
        .map(|list| list.iter().map(|i| (i.index(), i.name().to_string_lossy().into_owned())).collect())
        .unwrap_or_default()
}

/// Sets up one namespace, inside it: sockets first, so nothing the marking table causes is missed.
fn trace_namespace(label: String, netns: &Netns, filter: &Filter, iface: Option<&str>) -> Result<Traced> {
    let (filter, iface, inode) = (filter.clone(), iface.map(str::to_owned), netns.inode);
    let ns = netns.clone();
    let (socket, ct, mark, rules, names) = netns.run(move || {
        let socket = TraceSocket::open()?;
        let rules = RuleSet::load()?;
        let ct = match CtEventStream::open() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("no conntrack events in this namespace: {e:#}");
                None
            }
        };
        let mark = MarkTable::install(&MarkPlan::new(&filter, iface.as_deref(), rules.uses_conntrack))?;
        let mut rules = rules;
        rules.merge(RuleSet::load()?);
        // The ruleset commits the table made are read already: no re-read for them.
        let mut socket = socket;
        while let Ok(Some(_)) = socket.try_recv() {}
        Ok((socket, ct, mark, rules, ifnames()))
    })
    .with_context(|| format!("cannot trace namespace `{label}`"))?;
    if let Some(c) = &ct {
        c.set_nonblocking(true)?;
    }
    let view = NsView { label, inode, rules, ifnames: names };
    Ok(Traced { netns: ns, view, socket, ct, mark, rules_stale: None, lost_reported: false })
}

impl Session {
    /// Installs everything; fails before tracing with the first problem.
    pub fn start(opts: &TraceOptions) -> Result<Self> {
        // The programs first: a kernel without the tracing needed fails before any namespace is touched.
        let probes = Probes::attach(&opts.filter)?;
        let mut traced = Vec::new();
        for (label, ns) in &opts.namespaces {
            traced.push(trace_namespace(label.clone(), ns, &opts.filter, opts.iface.as_deref())?);
        }
        let inodes: Vec<u64> = traced.iter().map(|t| t.netns.inode).collect();
        let own = own::find(&inodes);
        let own_views = own.iter().map(OwnAttachment::view).collect();
        Ok(Self {
            filter: opts.filter.clone(),
            traced,
            probes,
            own,
            own_views,
            obs: Observations::default(),
            reasons: drop_reason_names(),
            syms: Kallsyms::load(),
            learned: HashSet::new(),
            started: Instant::now(),
            full_reported: false,
        })
    }

    /// Whether `sock:sk_data_ready` is traced (else deliveries are inferred).
    #[must_use]
    pub fn sees_deliveries(&self) -> bool {
        self.probes.deliveries
    }

    /// Program (tracepoint, id) pairs, for their run time.
    #[must_use]
    pub fn prog_ids(&self) -> &[(String, u32)] {
        &self.probes.prog_ids
    }

    /// How many observations so far.
    #[must_use]
    pub fn observed(&self) -> usize {
        self.obs.nft.len() + self.obs.bpf.len() + self.obs.ct.len() + self.obs.own.len()
    }

    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds: Vec<BorrowedFd<'_>> = vec![self.probes.as_fd()];
        for t in &self.traced {
            fds.push(t.socket.as_fd());
            fds.extend(t.ct.as_ref().map(AsFd::as_fd));
        }
        fds.extend(self.own.iter().flat_map(OwnAttachment::fds));
        fds
    }

    /// Waits up to `wait` for anything, then reads everything waiting.
    pub fn poll(&mut self, wait: Duration) -> Result<()> {
        let mut polled: Vec<libc::pollfd> =
            self.fds().iter().map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
        let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `polled` is a valid array of its length; the fds stay open (borrowed from self) during the call.
        let rc = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, ms) };
        if rc < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Err(anyhow::Error::new(std::io::Error::last_os_error()).context("poll failed"));
        }
        if self.observed() >= MAX_OBSERVATIONS {
            self.discard();
            return Ok(());
        }
        self.read_traces()?;
        self.read_conntrack();
        for ev in self.probes.drain() {
            let seq = self.obs.next_seq();
            self.obs.bpf.push(BpfObs { seq, ev });
        }
        for (att, a) in self.own.iter_mut().enumerate() {
            for rec in a.drain() {
                let seq = self.obs.next_seq();
                self.obs.own.push(OwnObs { seq, att, rec });
            }
        }
        self.refresh_rules();
        Ok(())
    }

    /// Empties every source, keeping nothing.
    fn discard(&mut self) {
        if !self.full_reported {
            self.full_reported = true;
            tracing::warn!("{MAX_OBSERVATIONS} observations kept: later ones are dropped (narrow the filter)");
        }
        for t in &mut self.traced {
            while let Ok(Some(_)) = t.socket.try_recv() {}
            while let Some(Ok(Some(_))) = t.ct.as_mut().map(CtEventStream::try_recv) {}
        }
        self.probes.drain();
        for a in &mut self.own {
            a.drain();
        }
    }

    fn read_traces(&mut self) -> Result<()> {
        for (ns, t) in self.traced.iter_mut().enumerate() {
            while let Some(got) = t.socket.try_recv().with_context(|| format!("namespace `{}`", t.view.label))? {
                if got.new_generation && t.rules_stale.is_none() {
                    t.rules_stale = Some(Instant::now());
                }
                if got.lost && !t.lost_reported {
                    t.lost_reported = true;
                    tracing::warn!("namespace `{}`: nftables trace messages were lost (the filter marks more packets than natfix reads): some paths miss rules", t.view.label);
                }
                let t_ns = monotonic_ns();
                for msg in got.traces {
                    let seq = self.obs.next_seq();
                    self.obs.nft.push(NftObs { seq, ns, t_ns, msg });
                }
            }
        }
        Ok(())
    }

    fn read_conntrack(&mut self) {
        let mut learn: Vec<Tuple> = Vec::new();
        for ns in 0..self.traced.len() {
            loop {
                let got = match self.traced[ns].ct.as_mut().map(CtEventStream::try_recv) {
                    None | Some(Ok(None)) => break,
                    Some(Ok(Some(events))) => events,
                    Some(Err(e)) => {
                        tracing::warn!("namespace `{}`: {e:#}", self.traced[ns].view.label);
                        break;
                    }
                };
                for ev in got {
                    let e = &ev.entry;
                    let known = ct::request_tuples(e).iter().chain(&ct::reply_tuples(e)).any(|t| self.learned.contains(t));
                    if ev.kind == CtEventKind::Destroy || !(ct::relevant(&self.filter, e) || known) {
                        continue;
                    }
                    if ct::has_nat(e) {
                        learn.extend(ct::request_tuples(e).into_iter().chain(ct::reply_tuples(e)));
                    }
                    let port_holder = self.port_holder(ns, e);
                    let seq = self.obs.next_seq();
                    self.obs.ct.push(CtObs { seq, ns, ev, port_holder });
                }
            }
        }
        self.learn(learn);
    }

    /// When masquerade moved a new flow's port: the entry holding the port, read right away.
    fn port_holder(&self, ns: usize, e: &conntrack::CtEntry) -> Option<conntrack::CtEntry> {
        let wanted = ct::wanted_reply(e)?;
        let entries = self.traced[ns].netns.run(conntrack::dump_udp).ok()?;
        ct::holder(&entries, &wanted).cloned()
    }

    /// A NAT'd flow's tuples are marked in every namespace and reported by the drop program.
    fn learn(&mut self, tuples: Vec<Tuple>) {
        let new: Vec<Tuple> = tuples.into_iter().filter(|t| self.learned.insert(*t)).collect();
        if new.is_empty() {
            return;
        }
        self.probes.add_flows(&new);
        for t in &mut self.traced {
            if let Err(e) = t.mark.add_flows(&new) {
                tracing::warn!("namespace `{}`: cannot mark a learned flow: {e:#}", t.view.label);
            }
        }
    }

    fn refresh_rules(&mut self) {
        for t in &mut self.traced {
            if t.rules_stale.is_some_and(|at| at.elapsed() >= RULES_REFRESH) {
                t.rules_stale = None;
                match t.netns.run(RuleSet::load) {
                    Ok(newer) => t.view.rules.merge(newer),
                    Err(e) => tracing::warn!("namespace `{}`: cannot re-read the ruleset: {e:#}", t.view.label),
                }
            }
        }
    }

    /// Re-reads interface names (devices may have come since the start).
    pub fn refresh_names(&mut self) {
        for t in &mut self.traced {
            if let Ok(names) = t.netns.run(|| Ok(ifnames())) {
                t.view.ifnames.extend(names);
            }
        }
    }

    /// The paths of what was seen so far.
    #[must_use]
    pub fn paths(&self) -> Vec<Path> {
        let namespaces: Vec<NsView> = self.traced.iter().map(|t| t.view.clone()).collect();
        let ctx = PathContext { filter: &self.filter, namespaces: &namespaces, own: &self.own_views, reasons: &self.reasons, syms: &self.syms };
        path::assemble(&self.obs, &ctx)
    }

    /// Everything observed (for tests of assembly on recorded input).
    #[must_use]
    pub fn observations(&self) -> &Observations {
        &self.obs
    }

    #[must_use]
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}
