//! Conntrack's part of a path: the entry a flow's first packet created, the
//! NAT mapping it holds (original and reply tuples: the port masquerade
//! picked), and on the reply the de-NAT conntrack applies without any nat
//! chain running. Read from ctnetlink NEW/UPDATE events of each traced
//! namespace (`conntrack::CtEventStream`, UDP only) and matched to packets
//! by tuple.

use std::net::SocketAddr;

use super::{filter::Filter, tuple::Tuple};
use crate::conntrack::{CtEntry, CtEvent, CtEventKind};

/// Packets of the request direction carry these tuples: as sent, and after NAT.
#[must_use]
pub fn request_tuples(e: &CtEntry) -> [Tuple; 2] {
    [Tuple::from_ct(&e.orig), Tuple::from_ct(&e.reply).rev()]
}

/// Packets of the reply direction: as sent, and after conntrack's de-NAT.
#[must_use]
pub fn reply_tuples(e: &CtEntry) -> [Tuple; 2] {
    [Tuple::from_ct(&e.reply), Tuple::from_ct(&e.orig).rev()]
}

/// Whether any packet of the entry's flow matches the filter.
#[must_use]
pub fn relevant(filter: &Filter, e: &CtEntry) -> bool {
    request_tuples(e).iter().chain(&reply_tuples(e)).any(|t| filter.matches(t))
}

/// Whether the entry translates anything.
#[must_use]
pub fn has_nat(e: &CtEntry) -> bool {
    request_tuples(e)[0] != request_tuples(e)[1]
}

fn sock(a: std::net::IpAddr, p: u16) -> SocketAddr {
    SocketAddr::new(a, p)
}

/// What the entry's NAT does to the request, e.g.
/// `source 10.77.0.2:25000 -> 198.51.100.10:25001 (SNAT/masquerade)`.
#[must_use]
pub fn nat_text(e: &CtEntry) -> Option<String> {
    let (o, r) = (&e.orig, &e.reply);
    let mut parts = Vec::new();
    if (r.dst, r.dport) != (o.src, o.sport) {
        parts.push(format!("source {} -> {} (SNAT/masquerade)", sock(o.src, o.sport), sock(r.dst, r.dport)));
    }
    if (r.src, r.sport) != (o.dst, o.dport) {
        parts.push(format!("destination {} -> {} (DNAT)", sock(o.dst, o.dport), sock(r.src, r.sport)));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// What conntrack does to a reply of the entry, the NAT undone: its
/// destination at prerouting (the SNAT/masquerade side), its source at
/// postrouting (the DNAT side).
#[must_use]
pub fn denat_parts(e: &CtEntry) -> (Option<String>, Option<String>) {
    let (o, r) = (&e.orig, &e.reply);
    let dst = ((r.dst, r.dport) != (o.src, o.sport)).then(|| format!("destination {} -> {}", sock(r.dst, r.dport), sock(o.src, o.sport)));
    let src = ((r.src, r.sport) != (o.dst, o.dport)).then(|| format!("source {} -> {}", sock(r.src, r.sport), sock(o.dst, o.dport)));
    (dst, src)
}

/// When SNAT gave the flow another source port than its own: the reply
/// tuple it would have had, which another entry must have held.
#[must_use]
pub fn wanted_reply(e: &CtEntry) -> Option<Tuple> {
    let (o, r) = (&e.orig, &e.reply);
    let snat = r.dst != o.src;
    (snat && r.dport != o.sport).then(|| Tuple { dport: o.sport, ..Tuple::from_ct(r) })
}

/// The entry that holds `wanted` (as its original or its reply tuple).
#[must_use]
pub fn holder<'a>(entries: impl IntoIterator<Item = &'a CtEntry>, wanted: &Tuple) -> Option<&'a CtEntry> {
    entries
        .into_iter()
        .find(|c| Tuple::from_ct(&c.orig) == *wanted || Tuple::from_ct(&c.reply) == *wanted)
}

/// `udp A -> B, reply C -> D` as a step prints an entry.
#[must_use]
pub fn entry_text(e: &CtEntry) -> String {
    format!("{}, reply {}", Tuple::from_ct(&e.orig), Tuple::from_ct(&e.reply).to_string().trim_start_matches("udp "))
}

#[must_use]
pub const fn kind_name(e: &CtEvent) -> &'static str {
    match e.kind {
        CtEventKind::New => "new",
        CtEventKind::Update => "update",
        CtEventKind::Destroy => "destroy",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::CtTuple;

    fn tuple(s: &str, d: &str) -> CtTuple {
        let (s, d): (SocketAddr, SocketAddr) = (s.parse().unwrap(), d.parse().unwrap());
        CtTuple { src: s.ip(), sport: s.port(), dst: d.ip(), dport: d.port() }
    }

    fn entry(o: (&str, &str), r: (&str, &str)) -> CtEntry {
        CtEntry { orig: tuple(o.0, o.1), reply: tuple(r.0, r.1), status: 0, timeout_secs: None }
    }

    #[test]
    fn masquerade_and_its_culprit() {
        // Seed 000: the container's flow left on 25001; the probe's entry holds 25000.
        let flow = entry(("10.77.0.2:25000", "198.51.100.20:7000"), ("198.51.100.20:7000", "198.51.100.10:25001"));
        let probe = entry(("198.51.100.20:7000", "198.51.100.10:25000"), ("198.51.100.10:25000", "198.51.100.20:7000"));
        assert!(has_nat(&flow) && !has_nat(&probe));
        assert_eq!(nat_text(&flow).unwrap(), "source 10.77.0.2:25000 -> 198.51.100.10:25001 (SNAT/masquerade)");
        assert_eq!(denat_parts(&flow), (Some("destination 198.51.100.10:25001 -> 10.77.0.2:25000".into()), None));
        let wanted = wanted_reply(&flow).unwrap();
        assert_eq!(wanted.to_string(), "udp 198.51.100.20:7000 -> 198.51.100.10:25000");
        assert_eq!(holder([&flow, &probe], &wanted), Some(&probe));
        assert_eq!(wanted_reply(&probe), None);
        assert_eq!(reply_tuples(&flow)[1].to_string(), "udp 198.51.100.20:7000 -> 10.77.0.2:25000");
    }

    #[test]
    fn dnat_shows_both_ways() {
        let e = entry(("198.51.100.20:40000", "198.51.100.10:1812"), ("172.20.0.4:1812", "198.51.100.20:40000"));
        assert_eq!(nat_text(&e).unwrap(), "destination 198.51.100.10:1812 -> 172.20.0.4:1812 (DNAT)");
        assert_eq!(denat_parts(&e), (None, Some("source 172.20.0.4:1812 -> 198.51.100.10:1812".into())));
        assert!(relevant(&Filter::parse("host 172.20.0.4").unwrap(), &e));
        assert!(!relevant(&Filter::parse("port 53").unwrap(), &e));
        assert_eq!(entry_text(&e), "udp 198.51.100.20:40000 -> 198.51.100.10:1812, reply 172.20.0.4:1812 -> 198.51.100.20:40000");
    }
}
