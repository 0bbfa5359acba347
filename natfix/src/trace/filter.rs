//! The trace's filter language: pcap-filter primitives joined by `and`
//! (`udp and port 1812`, `host 10.254.10.105`, `src net 10.0.0.0/8 and dst port 53`).
//!
//! One parsed filter has three forms: [`Filter::matches`] (userspace, on
//! any tuple), nftables rule bodies ([`Filter::nft_packet_rules`] on headers,
//! [`Filter::nft_ct_rules`] on conntrack's tuples, so NAT'd packets and
//! replies of a matching flow are marked too), and the tracepoint programs'
//! rules ([`Filter::bpf_rules`]). A primitive without `src`/`dst` matches
//! either side; the nftables and BPF forms spell each such choice out as its
//! own rule, which is why their number is capped.

use std::{fmt::Write as _, net::IpAddr};

use natfix_ebpf::trace::{MAX_RULES, TraceRule, addr_bytes};

use super::tuple::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, Tuple};
use crate::config::Cidr;

/// What `--help` says about FILTER.
pub const SYNTAX: &str = "primitives joined by `and` (or `&&`): udp, tcp, sctp, icmp, icmp6, ip, ip6, \
[src|dst] host ADDR, [src|dst] net CIDR, [src|dst] port N (IPv4 or IPv6); at most 3 primitives \
without src/dst. Not supported: or, not, parentheses, portrange, ether, vlan";

/// At most this many primitives match either side (2^3 = `MAX_RULES` expansions).
const MAX_EITHER: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
    Either,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    text: String,
    pub proto: Option<u8>,
    /// 4 or 6, from `ip`/`ip6` or the addresses.
    pub family: Option<u8>,
    pub nets: Vec<(Side, Cidr)>,
    pub ports: Vec<(Side, u16)>,
}

/// One expansion: every primitive's side decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Alt {
    src: Option<Cidr>,
    dst: Option<Cidr>,
    sport: Option<u16>,
    dport: Option<u16>,
}

fn usage(msg: &str) -> String {
    format!("{msg} (FILTER: {SYNTAX})")
}

impl Filter {
    /// Parses FILTER; the error is one line saying what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut f = Self { text: text.trim().to_owned(), proto: None, family: None, nets: Vec::new(), ports: Vec::new() };
        let words: Vec<&str> = text.split_whitespace().collect();
        if words.is_empty() {
            return Err(usage("empty filter"));
        }
        for prim in words.split(|w| *w == "and" || *w == "&&") {
            f.primitive(prim)?;
        }
        f.check()?;
        Ok(f)
    }

    fn primitive(&mut self, words: &[&str]) -> Result<(), String> {
        if let Some(w) = words.iter().find(|w| ["or", "||", "not", "!"].contains(*w) || w.starts_with('(')) {
            return Err(usage(&format!("`{w}` is not supported")));
        }
        let (side, rest) = match words {
            ["src", rest @ ..] => (Side::Src, rest),
            ["dst", rest @ ..] => (Side::Dst, rest),
            rest => (Side::Either, rest),
        };
        match (side, rest) {
            (_, []) => Err(usage(&format!("`{}` is missing a primitive", words.join(" ")))),
            (Side::Either, [p]) if proto_of(p).is_some() => self.set_proto(p),
            (Side::Either, ["ip"]) => self.set_family(4),
            (Side::Either, ["ip6"]) => self.set_family(6),
            (_, ["host", a]) => {
                let addr: IpAddr = a.parse().map_err(|_| usage(&format!("`{a}` is not an IP address")))?;
                self.add_net(side, addr.to_string().parse()?)
            }
            (_, ["net", c]) => {
                let cidr: Cidr = c.parse().map_err(|e: String| usage(&e))?;
                self.add_net(side, cidr)
            }
            (_, ["port", p]) => {
                let port = p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| usage(&format!("`{p}` is not a port (1-65535)")))?;
                self.ports.push((side, port));
                Ok(())
            }
            _ => Err(usage(&format!("cannot parse `{}`", words.join(" ")))),
        }
    }

    fn set_proto(&mut self, word: &str) -> Result<(), String> {
        let p = proto_of(word).unwrap_or_default();
        if self.proto.is_some_and(|q| q != p) {
            return Err(usage(&format!("two protocols in one filter (`{word}`) match nothing")));
        }
        self.proto = Some(p);
        match p {
            IPPROTO_ICMP => self.set_family(4),
            IPPROTO_ICMPV6 => self.set_family(6),
            _ => Ok(()),
        }
    }

    fn set_family(&mut self, family: u8) -> Result<(), String> {
        if self.family.is_some_and(|f| f != family) {
            return Err(usage("IPv4 and IPv6 in one filter match nothing"));
        }
        self.family = Some(family);
        Ok(())
    }

    fn add_net(&mut self, side: Side, cidr: Cidr) -> Result<(), String> {
        self.set_family(if cidr.addr.is_ipv4() { 4 } else { 6 })?;
        self.nets.push((side, cidr));
        Ok(())
    }

    fn check(&self) -> Result<(), String> {
        if !self.ports.is_empty() && matches!(self.proto, Some(IPPROTO_ICMP | IPPROTO_ICMPV6)) {
            return Err(usage("icmp has no ports"));
        }
        let either = self.nets.iter().filter(|(s, _)| *s == Side::Either).count()
            + self.ports.iter().filter(|(s, _)| *s == Side::Either).count();
        if either > MAX_EITHER {
            return Err(usage(&format!("{either} primitives without src/dst; at most {MAX_EITHER}")));
        }
        if self.alternatives().is_empty() {
            return Err(usage(&format!("`{}` can match no packet", self.text)));
        }
        if self.both_ways().len() > MAX_RULES {
            return Err(usage(&format!("`{}` needs {} rules with its replies; at most {MAX_RULES}", self.text, self.both_ways().len())));
        }
        Ok(())
    }

    /// The filter as the user wrote it.
    #[must_use]
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether a packet with this tuple matches.
    #[must_use]
    pub fn matches(&self, t: &Tuple) -> bool {
        let on = |side: Side, src: bool, dst: bool| match side {
            Side::Src => src,
            Side::Dst => dst,
            Side::Either => src || dst,
        };
        self.proto.is_none_or(|p| p == t.proto)
            && self.family.is_none_or(|f| (f == 4) == t.src.is_ipv4())
            && self.nets.iter().all(|(s, c)| on(*s, c.contains(t.src), c.contains(t.dst)))
            && self.ports.iter().all(|(s, p)| t.has_ports() && on(*s, t.sport == *p, t.dport == *p))
    }

    /// Every choice of side for the primitives that have none, merged per
    /// side; choices that contradict themselves (two source ports) drop out.
    fn alternatives(&self) -> Vec<Alt> {
        let mut alts = vec![Alt::default()];
        for (side, cidr) in &self.nets {
            alts = expand(alts, *side, |a, src| merge_net(if src { &mut a.src } else { &mut a.dst }, *cidr));
        }
        for (side, port) in &self.ports {
            alts = expand(alts, *side, |a, src| merge_port(if src { &mut a.sport } else { &mut a.dport }, *port));
        }
        alts.dedup();
        alts
    }

    /// The alternatives, and the same turned around: the replies of the
    /// filter's packets (a `dst port 53` filter's answers come from port 53),
    /// which a namespace without conntrack can only recognise so.
    fn both_ways(&self) -> Vec<Alt> {
        let mut alts = self.alternatives();
        let turned: Vec<Alt> = alts.iter().map(|a| Alt { src: a.dst, dst: a.src, sport: a.dport, dport: a.sport }).collect();
        for t in turned {
            if !alts.contains(&t) {
                alts.push(t);
            }
        }
        alts
    }

    /// Rule bodies (before `meta nftrace set 1`) matching the packet's own
    /// headers: the filter's packets and their replies.
    #[must_use]
    pub fn nft_packet_rules(&self) -> Vec<String> {
        self.both_ways().iter().map(|a| self.nft_alt(a, None)).collect()
    }

    /// Rule bodies matching a packet whose conntrack entry's `dir`
    /// (`original` or `reply`) tuple matches: a reply of a flow whose
    /// request matched, a NAT'd request whose translated side matches.
    #[must_use]
    pub fn nft_ct_rules(&self, dir: &str) -> Vec<String> {
        let protos: Vec<Option<u8>> = match self.proto {
            // `ct ... proto-dst` needs one protocol for its type.
            None if !self.ports.is_empty() => vec![Some(IPPROTO_UDP), Some(IPPROTO_TCP)],
            p => vec![p],
        };
        let mut out = Vec::new();
        for a in self.alternatives() {
            for p in &protos {
                out.push(self.nft_alt(&a, Some((dir, *p))));
            }
        }
        out
    }

    fn nft_alt(&self, a: &Alt, ct: Option<(&str, Option<u8>)>) -> String {
        let mut s = String::new();
        let proto = ct.map_or(self.proto, |(_, p)| p);
        if a.src.is_none() && a.dst.is_none() {
            match self.family {
                Some(4) => s.push_str("meta nfproto ipv4 "),
                Some(6) => s.push_str("meta nfproto ipv6 "),
                _ => {}
            }
        }
        match proto {
            Some(p) => {
                let _ = write!(s, "meta l4proto {} ", nft_proto(p));
            }
            None if a.sport.is_some() || a.dport.is_some() => s.push_str("meta l4proto { tcp, udp, sctp } "),
            None => {}
        }
        let ct_prefix = ct.map_or(String::new(), |(dir, _)| format!("ct {dir} "));
        for (cidr, key) in [(a.src, "saddr"), (a.dst, "daddr")] {
            if let Some(c) = cidr {
                let fam = if c.addr.is_ipv4() { "ip" } else { "ip6" };
                let _ = write!(s, "{ct_prefix}{fam} {key} {} ", nft_cidr(&c));
            }
        }
        for (port, key, ct_key) in [(a.sport, "sport", "proto-src"), (a.dport, "dport", "proto-dst")] {
            if let Some(p) = port {
                let _ = if ct.is_some() { write!(s, "{ct_prefix}{ct_key} {p} ") } else { write!(s, "th {key} {p} ") };
            }
        }
        s.trim_end().to_owned()
    }

    /// The tracepoint programs' rules (one per alternative and its reply, at most `MAX_RULES`).
    #[must_use]
    pub fn bpf_rules(&self) -> Vec<TraceRule> {
        self.both_ways()
            .iter()
            .take(MAX_RULES)
            .map(|a| {
                let mut r = TraceRule {
                    proto: self.proto.unwrap_or(0),
                    family: self.family.unwrap_or(0),
                    sport: a.sport.unwrap_or(0).to_be(),
                    dport: a.dport.unwrap_or(0).to_be(),
                    ..TraceRule::default()
                };
                if let Some(c) = a.src {
                    (r.saddr, r.smask) = (addr_bytes(c.addr), mask_bytes(&c));
                }
                if let Some(c) = a.dst {
                    (r.daddr, r.dmask) = (addr_bytes(c.addr), mask_bytes(&c));
                }
                r
            })
            .collect()
    }
}

impl std::fmt::Display for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

fn proto_of(word: &str) -> Option<u8> {
    Some(match word {
        "udp" => IPPROTO_UDP,
        "tcp" => IPPROTO_TCP,
        "sctp" => IPPROTO_SCTP,
        "icmp" => IPPROTO_ICMP,
        "icmp6" => IPPROTO_ICMPV6,
        _ => return None,
    })
}

fn nft_proto(p: u8) -> &'static str {
    match p {
        IPPROTO_TCP => "tcp",
        IPPROTO_SCTP => "sctp",
        IPPROTO_ICMP => "icmp",
        IPPROTO_ICMPV6 => "ipv6-icmp",
        _ => "udp",
    }
}

fn nft_cidr(c: &Cidr) -> String {
    let full = if c.addr.is_ipv4() { 32 } else { 128 };
    if c.prefix_len == full { c.addr.to_string() } else { network(c).to_string() }
}

/// The prefix with its host bits cleared (nft refuses `10.0.0.1/8`).
fn network(c: &Cidr) -> Cidr {
    let addr = match c.addr {
        IpAddr::V4(a) => std::net::Ipv4Addr::from(u32::from(a) & u32::MAX.checked_shl(32 - u32::from(c.prefix_len)).unwrap_or(0)).into(),
        IpAddr::V6(a) => std::net::Ipv6Addr::from(u128::from(a) & u128::MAX.checked_shl(128 - u32::from(c.prefix_len)).unwrap_or(0)).into(),
    };
    Cidr { addr, prefix_len: c.prefix_len }
}

fn mask_bytes(c: &Cidr) -> [u8; 16] {
    let mut m = [0u8; 16];
    for (i, byte) in m.iter_mut().enumerate() {
        let bits = usize::from(c.prefix_len).saturating_sub(i * 8).min(8);
        *byte = u8::try_from((0xff00u16 >> bits) & 0xff).unwrap_or(0);
    }
    m
}

fn expand(alts: Vec<Alt>, side: Side, apply: impl Fn(&mut Alt, bool) -> bool) -> Vec<Alt> {
    let sides: &[bool] = match side {
        Side::Src => &[true],
        Side::Dst => &[false],
        Side::Either => &[true, false],
    };
    let mut out = Vec::new();
    for a in alts {
        for &src in sides {
            let mut b = a.clone();
            if apply(&mut b, src) {
                out.push(b);
            }
        }
    }
    out
}

/// Both prefixes must hold: the longer one if it lies in the other.
fn merge_net(slot: &mut Option<Cidr>, c: Cidr) -> bool {
    match *slot {
        None => *slot = Some(c),
        Some(old) if old.contains(c.addr) && c.prefix_len >= old.prefix_len => *slot = Some(c),
        Some(old) => return c.contains(old.addr) && old.prefix_len >= c.prefix_len,
    }
    true
}

fn merge_port(slot: &mut Option<u16>, p: u16) -> bool {
    *slot.get_or_insert(p) == p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Tuple {
        let (proto, rest) = s.split_once(' ').unwrap();
        let (a, b) = rest.split_once(" -> ").unwrap();
        let (a, b): (std::net::SocketAddr, std::net::SocketAddr) = (a.parse().unwrap(), b.parse().unwrap());
        Tuple { proto: proto_of(proto).unwrap(), src: a.ip(), sport: a.port(), dst: b.ip(), dport: b.port() }
    }

    #[test]
    fn primitives_match_like_pcap() {
        let f = Filter::parse("udp and port 1812").unwrap();
        assert!(f.matches(&t("udp 10.0.0.1:40000 -> 10.0.0.2:1812")));
        assert!(f.matches(&t("udp 10.0.0.2:1812 -> 10.0.0.1:40000")));
        assert!(!f.matches(&t("tcp 10.0.0.1:40000 -> 10.0.0.2:1812")));
        let f = Filter::parse("host 10.254.10.105").unwrap();
        assert!(f.matches(&t("tcp 10.254.10.105:1 -> 10.0.0.2:2")));
        assert!(!f.matches(&t("udp [fd00::1]:1 -> [fd00::2]:2")));
        let f = Filter::parse("src net 10.0.0.0/8 && dst port 53").unwrap();
        assert!(f.matches(&t("udp 10.9.9.9:5000 -> 1.1.1.1:53")));
        assert!(!f.matches(&t("udp 1.1.1.1:53 -> 10.9.9.9:5000")));
        let f = Filter::parse("host 10.0.0.1 and host 10.0.0.2").unwrap();
        assert!(f.matches(&t("udp 10.0.0.2:1 -> 10.0.0.1:2")));
        assert!(!f.matches(&t("udp 10.0.0.2:1 -> 10.0.0.3:2")));
        assert_eq!(f.bpf_rules().len(), 2, "src/dst of the same host drop out");
    }

    #[test]
    fn bad_filters_say_why() {
        for (text, says) in [
            ("", "empty"),
            ("udp or tcp", "`or` is not supported"),
            ("not udp", "`not` is not supported"),
            ("port 0", "not a port"),
            ("port 70000", "not a port"),
            ("host 10.0.0.300", "not an IP address"),
            ("net 10.0.0.0/33", "prefix length"),
            ("udp and tcp", "two protocols"),
            ("host 10.0.0.1 and host fd00::1", "IPv4 and IPv6"),
            ("icmp and port 5", "no ports"),
            ("port 1 and port 2 and port 3 and port 4", "at most 3"),
            ("src net 10.0.0.0/8 and net 10.1.0.0/16 and host 10.1.2.3 and port 5", "at most 8"),
            ("src port 1 and src port 2", "can match no packet"),
            ("ether host 00:11:22:33:44:55", "cannot parse"),
            ("udp and", "missing a primitive"),
            ("src", "missing a primitive"),
        ] {
            let err = Filter::parse(text).unwrap_err();
            assert!(err.contains(says), "{text:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn nft_rules_spell_out_each_side() {
        let f = Filter::parse("udp and port 1812").unwrap();
        assert_eq!(f.nft_packet_rules(), ["meta l4proto udp th sport 1812", "meta l4proto udp th dport 1812"]);
        let ct = f.nft_ct_rules("original");
        assert_eq!(ct, ["meta l4proto udp ct original proto-src 1812", "meta l4proto udp ct original proto-dst 1812"]);
        assert_eq!(f.nft_ct_rules("reply")[1], "meta l4proto udp ct reply proto-dst 1812");
        let f = Filter::parse("src net 10.1.2.3/8 and port 53").unwrap();
        assert_eq!(f.nft_packet_rules()[0], "meta l4proto { tcp, udp, sctp } ip saddr 10.0.0.0/8 th sport 53");
        // Without a protocol, the conntrack rules take UDP and TCP in turn.
        assert!(f.nft_ct_rules("original").iter().any(|r| r.starts_with("meta l4proto tcp ct original ip saddr 10.0.0.0/8")));
        assert_eq!(Filter::parse("ip6").unwrap().nft_packet_rules(), ["meta nfproto ipv6"]);
        // Directional filters mark their replies too.
        assert_eq!(Filter::parse("dst host fd00::5").unwrap().nft_packet_rules(), ["ip6 daddr fd00::5", "ip6 saddr fd00::5"]);
    }

    #[test]
    fn bpf_rules_carry_masks_and_network_order() {
        let f = Filter::parse("udp and src net 10.0.0.0/12 and dst port 1812").unwrap();
        let rules = f.bpf_rules();
        assert_eq!(rules.len(), 2, "the filter and its replies");
        let r = rules[0];
        assert_eq!((r.proto, r.family, r.dport, r.sport), (17, 4, 1812u16.to_be(), 0));
        assert_eq!(&r.smask[..3], &[0xff, 0xf0, 0]);
        assert_eq!(r.dmask, [0; 16]);
        assert_eq!(Filter::parse("port 1 and host 10.0.0.1 and port 2").unwrap().bpf_rules().len(), 4);
    }
}
