//! Which flow, and which direction of it, a tuple belongs to. A conntrack
//! entry joins four tuples (the request as sent and after NAT, the reply as
//! sent and after de-NAT), and entries of different namespaces join through
//! the tuples they share, so one flow spans the host, the container and the
//! NAT between them. A tuple no entry names is a flow of its own (its first
//! sighting is its request).

use std::collections::{HashMap, HashSet};

use super::{ct, filter::Filter, tuple::Tuple};
use crate::conntrack::CtEntry;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    Request,
    Reply,
}

#[derive(Debug, Default)]
pub struct Flows {
    /// Per flow: its request tuples and its reply tuples (empty once merged away).
    sets: Vec<[HashSet<Tuple>; 2]>,
    index: HashMap<Tuple, (usize, Dir)>,
    relevant: Vec<bool>,
}

const fn slot(d: Dir) -> usize {
    match d {
        Dir::Request => 0,
        Dir::Reply => 1,
    }
}

impl Flows {
    /// Adds a conntrack entry's tuples (merging the flows they touch).
    pub fn add_entry(&mut self, e: &CtEntry) {
        self.insert(&ct::request_tuples(e), &ct::reply_tuples(e));
    }

    /// Adds a tuple seen on a packet, unless a flow already has it.
    pub fn add_tuple(&mut self, t: Tuple) {
        if !self.index.contains_key(&t) {
            self.insert(&[t], &[t.rev()]);
        }
    }

    fn insert(&mut self, req: &[Tuple], rep: &[Tuple]) {
        let mut set: [HashSet<Tuple>; 2] = [req.iter().copied().collect(), rep.iter().copied().collect()];
        // Every flow that shares a tuple joins, turned to this one's orientation.
        let mut hits: Vec<(usize, bool)> = Vec::new();
        for (tuples, dir) in [(req, Dir::Request), (rep, Dir::Reply)] {
            for t in tuples {
                if let Some((f, d)) = self.index.get(t)
                    && !hits.iter().any(|(h, _)| h == f)
                {
                    hits.push((*f, *d != dir));
                }
            }
        }
        for (f, flipped) in hits {
            let [a, b] = std::mem::take(&mut self.sets[f]);
            let (a, b) = if flipped { (b, a) } else { (a, b) };
            set[0].extend(a);
            set[1].extend(b);
        }
        let id = self.sets.len();
        for (i, dir) in [(0, Dir::Request), (1, Dir::Reply)] {
            for t in &set[i] {
                self.index.insert(*t, (id, dir));
            }
        }
        self.sets.push(set);
    }

    /// Decides which flows the filter wants: those with a matching tuple.
    pub fn judge(&mut self, filter: &Filter) {
        self.relevant = self.sets.iter().map(|s| s.iter().flatten().any(|t| filter.matches(t))).collect();
    }

    /// The flow and direction of `t`, if its flow is one the filter wants.
    #[must_use]
    pub fn lookup(&self, t: &Tuple) -> Option<(usize, Dir)> {
        let (f, d) = *self.index.get(t)?;
        self.relevant.get(f).copied().unwrap_or(false).then_some((f, d))
    }

    /// The flow's tuples of direction `d`.
    #[must_use]
    pub fn tuples(&self, flow: usize, d: Dir) -> Vec<Tuple> {
        self.sets.get(flow).map(|s| s[slot(d)].iter().copied().collect()).unwrap_or_default()
    }

}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::CtTuple;

    fn ct(o: (&str, &str), r: (&str, &str)) -> CtEntry {
        let t = |s: &str, d: &str| {
            let (s, d): (std::net::SocketAddr, std::net::SocketAddr) = (s.parse().unwrap(), d.parse().unwrap());
            CtTuple { src: s.ip(), sport: s.port(), dst: d.ip(), dport: d.port() }
        };
        CtEntry { orig: t(o.0, o.1), reply: t(r.0, r.1), status: 0, timeout_secs: None }
    }

    #[test]
    fn entries_of_two_namespaces_join_into_one_flow() {
        let mut flows = Flows::default();
        // The host DNATs 1812 to the container; the container sees the translated packet.
        flows.add_entry(&ct(("198.51.100.20:40000", "198.51.100.10:1812"), ("172.20.0.4:1812", "198.51.100.20:40000")));
        flows.add_entry(&ct(("198.51.100.20:40000", "172.20.0.4:1812"), ("172.20.0.4:1812", "198.51.100.20:40000")));
        let unrelated = Tuple::from_ct(&ct(("10.0.0.1:1", "10.0.0.2:2"), ("10.0.0.2:2", "10.0.0.1:1")).orig);
        flows.add_tuple(unrelated);
        flows.judge(&Filter::parse("udp and port 1812").unwrap());
        let req = Tuple::from_ct(&ct(("198.51.100.20:40000", "198.51.100.10:1812"), ("1.1.1.1:1", "1.1.1.1:1")).orig);
        let (f, d) = flows.lookup(&req).unwrap();
        assert_eq!(d, Dir::Request);
        let reply_in_ctr = req.rev();
        assert_eq!(flows.lookup(&reply_in_ctr), Some((f, Dir::Reply)), "the reply after de-NAT");
        let reply = Tuple { src: "172.20.0.4".parse().unwrap(), ..req.rev() };
        assert_eq!(flows.lookup(&reply), Some((f, Dir::Reply)));
        let in_ctr = Tuple { dst: "172.20.0.4".parse().unwrap(), ..req };
        assert_eq!(flows.lookup(&in_ctr), Some((f, Dir::Request)));
        assert_eq!(flows.lookup(&unrelated), None, "not the filter's");
        assert_eq!(flows.tuples(f, Dir::Request).len(), 2);
    }
}
