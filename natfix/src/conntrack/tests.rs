//! ctnetlink parsing on crafted messages (and fuzzed bytes), and the
//! sockets against the kernel.

use std::io;

use anyhow::anyhow;

use super::{message::*, socket::*, *};
use proptest::prelude::*;

const NLA_F_NESTED: u16 = 0x8000;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_EXCL: u16 = 0x200;

fn nla(ty: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(NLA_HDRLEN + payload.len()).unwrap();
    let mut v = Vec::new();
    v.extend_from_slice(&len.to_ne_bytes());
    v.extend_from_slice(&ty.to_ne_bytes());
    v.extend_from_slice(payload);
    v.resize(align4(v.len()), 0);
    v
}

fn nested(ty: u16, children: &[Vec<u8>]) -> Vec<u8> {
    nla(ty | NLA_F_NESTED, &children.concat())
}

fn ip_attr(ty_v4: u16, addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => nla(ty_v4, &a.octets()),
        IpAddr::V6(a) => nla(ty_v4 + 2, &a.octets()),
    }
}

fn tuple(ty: u16, t: CtTuple, proto: u8) -> Vec<u8> {
    nested(
        ty,
        &[
            nested(
                CTA_TUPLE_IP,
                &[ip_attr(CTA_IP_V4_SRC, t.src), ip_attr(CTA_IP_V4_DST, t.dst)],
            ),
            nested(
                CTA_TUPLE_PROTO,
                &[
                    nla(CTA_PROTO_NUM, &[proto]),
                    nla(CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes()),
                    nla(CTA_PROTO_DST_PORT, &t.dport.to_be_bytes()),
                ],
            ),
        ],
    )
}

fn msg(msg_type: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(NLMSG_HDRLEN + payload.len()).unwrap();
    let mut v = Vec::new();
    v.extend_from_slice(&len.to_ne_bytes());
    v.extend_from_slice(&msg_type.to_ne_bytes());
    v.extend_from_slice(&flags.to_ne_bytes());
    v.extend_from_slice(&seq.to_ne_bytes());
    v.extend_from_slice(&1234u32.to_ne_bytes());
    v.extend_from_slice(payload);
    v.resize(align4(v.len()), 0);
    v
}

fn ct_msg(msg_type: u16, flags: u16, seq: u32, family: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
    let mut p = vec![family, NFNETLINK_V0, 0, 0];
    p.extend_from_slice(&attrs.concat());
    msg(msg_type, flags, seq, &p)
}

fn entry_msg(msg_type: u16, flags: u16, seq: u32, e: &CtEntry, proto: u8) -> Vec<u8> {
    let family = if e.orig.src.is_ipv4() { 2 } else { 10 };
    let mut a = vec![
        tuple(CTA_TUPLE_ORIG, e.orig, proto),
        tuple(CTA_TUPLE_REPLY, e.reply, proto),
        nla(CTA_STATUS, &e.status.to_be_bytes()),
    ];
    if let Some(t) = e.timeout_secs {
        a.push(nla(CTA_TIMEOUT, &t.to_be_bytes()));
    }
    // An attribute natfix does not know (CTA_MARK) must be skipped.
    a.push(nla(8, &7u32.to_be_bytes()));
    ct_msg(msg_type, flags, seq, family, &a)
}

fn done(seq: u32, errno: i32) -> Vec<u8> {
    msg(NLMSG_DONE, NLM_F_MULTI, seq, &(-errno).to_ne_bytes())
}

fn t(src: &str, dst: &str, sport: u16, dport: u16) -> CtTuple {
    CtTuple {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        sport,
        dport,
    }
}

fn v4_entry() -> CtEntry {
    CtEntry {
        orig: t("198.51.100.20", "198.51.100.10", 7000, 25000),
        reply: t("198.51.100.10", "203.0.113.5", 25000, 40000),
        status: IPS_CONFIRMED | IPS_SRC_NAT,
        timeout_secs: Some(60),
    }
}

fn v6_entry() -> CtEntry {
    CtEntry {
        orig: t("2001:db8::20", "2001:db8::10", 7001, 25001),
        reply: t("2001:db8::10", "2001:db8::20", 25001, 7001),
        status: IPS_CONFIRMED,
        timeout_secs: Some(30),
    }
}

fn tcp_entry() -> CtEntry {
    CtEntry {
        orig: t("198.51.100.20", "198.51.100.10", 7002, 80),
        reply: t("198.51.100.10", "198.51.100.20", 80, 7002),
        status: IPS_CONFIRMED,
        timeout_secs: Some(100),
    }
}

/// One dump datagram: IPv4 UDP, TCP, IPv6 UDP, DONE.
fn dump_fixture(seq: u32) -> Vec<u8> {
    [
        entry_msg(CT_MSG_NEW, NLM_F_MULTI, seq, &v4_entry(), IPPROTO_UDP),
        entry_msg(CT_MSG_NEW, NLM_F_MULTI, seq, &tcp_entry(), 6),
        entry_msg(CT_MSG_NEW, NLM_F_MULTI, seq, &v6_entry(), IPPROTO_UDP),
        done(seq, 0),
    ]
    .concat()
}

#[test]
fn dump_keeps_udp_v4_and_v6_and_drops_tcp() {
    let msgs = parse_messages(&dump_fixture(9)).unwrap();
    let bodies: Vec<_> = msgs.iter().map(|m| m.body.clone()).collect();
    assert_eq!(
        bodies,
        vec![
            Body::Conntrack(Some(v4_entry())),
            Body::Conntrack(None),
            Body::Conntrack(Some(v6_entry())),
            Body::Done(0),
        ]
    );
    assert!(msgs.iter().all(|m| m.seq == 9));
    assert_eq!(msgs[0].msg_type, 0x100);
}

/// Bytes as the kernel lays them out, written out by hand rather than by
/// the builders above, so builder and parser cannot share a mistake.
#[test]
fn literal_kernel_layout() {
    #[rustfmt::skip]
    let mut m: Vec<u8> = vec![
        0, 0, 0, 0,             // nlmsg_len, patched below
        0x00, 0x01,             // type 0x0100 (little endian): CTNETLINK | CT_NEW
        0x00, 0x06,             // flags NLM_F_CREATE|NLM_F_EXCL
        5, 0, 0, 0,             // seq
        0, 0, 0, 0,             // pid
        2, 0, 0, 0,             // nfgenmsg: AF_INET, v0, res_id 0
        52, 0, 0x01, 0x80,      // CTA_TUPLE_ORIG | NLA_F_NESTED
          20, 0, 0x01, 0x80,    //   CTA_TUPLE_IP
            8, 0, 1, 0, 10, 0, 0, 1,        // V4_SRC 10.0.0.1
            8, 0, 2, 0, 10, 0, 0, 2,        // V4_DST 10.0.0.2
          28, 0, 0x02, 0x80,    //   CTA_TUPLE_PROTO
            5, 0, 1, 0, 17, 0, 0, 0,        // PROTO_NUM 17 (+3 padding)
            6, 0, 2, 0, 0x1f, 0x90, 0, 0,   // SRC_PORT 8080 (be)
            6, 0, 3, 0, 0x00, 0x35, 0, 0,   // DST_PORT 53 (be)
        52, 0, 0x02, 0x80,      // CTA_TUPLE_REPLY | NLA_F_NESTED
          20, 0, 0x01, 0x80,
            8, 0, 1, 0, 10, 0, 0, 2,
            8, 0, 2, 0, 192, 0, 2, 9,
          28, 0, 0x02, 0x80,
            5, 0, 1, 0, 17, 0, 0, 0,
            6, 0, 2, 0, 0x00, 0x35, 0, 0,
            6, 0, 3, 0, 0xea, 0x60, 0, 0,   // 60000
        8, 0, 3, 0, 0, 0, 0x01, 0x98,       // CTA_STATUS 0x198
        8, 0, 7, 0, 0, 0, 0, 120,           // CTA_TIMEOUT 120
    ];
    if cfg!(target_endian = "big") {
        return; // the literal above is little-endian framing
    }
    let len = u32::try_from(m.len()).unwrap();
    m[..4].copy_from_slice(&len.to_ne_bytes());
    let events = parse_events(&m).unwrap();
    assert_eq!(
        events,
        vec![CtEvent {
            kind: CtEventKind::New,
            entry: CtEntry {
                orig: t("10.0.0.1", "10.0.0.2", 8080, 53),
                reply: t("10.0.0.2", "192.0.2.9", 53, 60000),
                status: 0x198,
                timeout_secs: Some(120),
            },
        }]
    );
}

#[test]
fn event_kinds_from_type_and_flags() {
    let e = v4_entry();
    let mut destroyed = e.clone();
    destroyed.timeout_secs = None;
    let dgram = [
        entry_msg(CT_MSG_NEW, NLM_F_CREATE | NLM_F_EXCL, 0, &e, IPPROTO_UDP),
        entry_msg(CT_MSG_NEW, 0, 0, &e, IPPROTO_UDP),
        entry_msg(CT_MSG_NEW, NLM_F_CREATE | NLM_F_EXCL, 0, &tcp_entry(), 6),
        entry_msg(CT_MSG_DELETE, 0, 0, &destroyed, IPPROTO_UDP),
    ]
    .concat();
    let got = parse_events(&dgram).unwrap();
    let kinds: Vec<_> = got.iter().map(|ev| ev.kind).collect();
    assert_eq!(kinds, [CtEventKind::New, CtEventKind::Update, CtEventKind::Destroy]);
    assert_eq!(got[0].entry, e);
    assert_eq!(got[2].entry, destroyed);
}

#[test]
fn multipart_dump_across_datagrams() {
    let seq = 77;
    let mut d = DumpCollector {
        seq,
        entries: Vec::new(),
    };
    let first = [
        entry_msg(CT_MSG_NEW, NLM_F_MULTI, seq, &v4_entry(), IPPROTO_UDP),
        // A reply to some other request must be ignored.
        entry_msg(CT_MSG_NEW, NLM_F_MULTI, seq + 1, &v6_entry(), IPPROTO_UDP),
    ]
    .concat();
    assert!(!d.feed(&first).unwrap());
    let second = [
        entry_msg(CT_MSG_NEW, NLM_F_MULTI, seq, &tcp_entry(), 6),
        entry_msg(CT_MSG_NEW, NLM_F_MULTI, seq, &v6_entry(), IPPROTO_UDP),
    ]
    .concat();
    assert!(!d.feed(&second).unwrap());
    assert!(d.feed(&done(seq, 0)).unwrap());
    assert_eq!(d.entries, vec![v4_entry(), v6_entry()]);
}

#[test]
fn nlmsg_error_and_failed_done_carry_errno_text() {
    let mut d = DumpCollector {
        seq: 3,
        entries: Vec::new(),
    };
    let mut payload = (-libc::EPERM).to_ne_bytes().to_vec();
    payload.extend_from_slice(&dump_request(3, 0)[..NLMSG_HDRLEN]);
    let err = d.feed(&msg(NLMSG_ERROR, 0, 3, &payload)).unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("Operation not permitted"), "{text}");
    assert_eq!(
        err.root_cause().downcast_ref::<io::Error>().unwrap().raw_os_error(),
        Some(libc::EPERM)
    );

    let mut d = DumpCollector {
        seq: 3,
        entries: Vec::new(),
    };
    let err = d.feed(&done(3, libc::ENOMEM)).unwrap_err();
    assert!(format!("{err:#}").contains("Cannot allocate memory"), "{err:#}");

    // An ACK (error 0) is not an error.
    let mut d = DumpCollector {
        seq: 3,
        entries: Vec::new(),
    };
    assert!(!d.feed(&msg(NLMSG_ERROR, 0, 3, &0i32.to_ne_bytes())).unwrap());

    assert!(parse_events(&msg(NLMSG_ERROR, 0, 0, &(-libc::EINVAL).to_ne_bytes())).is_err());
}

#[test]
fn dump_request_layout() {
    let r = dump_request(0x0102_0304, 0);
    assert_eq!(r.len(), 20);
    assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 20);
    assert_eq!(u16::from_ne_bytes([r[4], r[5]]), 0x0101);
    assert_eq!(u16::from_ne_bytes([r[6], r[7]]), 0x0301);
    assert_eq!(u32::from_ne_bytes(r[8..12].try_into().unwrap()), 0x0102_0304);
    assert_eq!(&r[16..], &[0, 0, 0, 0]);
}

#[test]
fn events_lost_is_distinguishable() {
    let err: anyhow::Error = EventsLost { truncated: false }.into();
    assert!(is_events_lost(&err));
    assert!(is_events_lost(&err.context("while following conntrack")));
    assert!(!is_events_lost(&anyhow!("something else")));
}

#[test]
fn every_truncation_errors_without_panicking() {
    // Cutting the datagram: an error unless the cut falls on a message boundary.
    let full = dump_fixture(1);
    let mut ends = Vec::new();
    let mut off = 0;
    while off < full.len() {
        let len = u32::from_ne_bytes(full[off..off + 4].try_into().unwrap());
        off += align4(usize::try_from(len).unwrap());
        ends.push(off);
    }
    for cut in 1..full.len() {
        assert_eq!(
            parse_messages(&full[..cut]).is_ok(),
            ends.contains(&cut),
            "cut at {cut}"
        );
    }

    // Shrinking one message (nlmsg_len and buffer) truncates its attributes:
    // an error, or at an attribute boundary a skipped or partial entry, never
    // wrong tuples.
    let one = entry_msg(CT_MSG_NEW, 0, 0, &v4_entry(), IPPROTO_UDP);
    for len in NLMSG_HDRLEN..one.len() {
        let mut m = one[..len].to_vec();
        m[..4].copy_from_slice(&u32::try_from(len).unwrap().to_ne_bytes());
        match parse_messages(&m) {
            Err(_) => {}
            // Cut after the tuples: status and timeout are optional.
            Ok(msgs) => match &msgs[0].body {
                Body::Conntrack(None) => {}
                Body::Conntrack(Some(e)) => {
                    assert_eq!((e.orig, e.reply), (v4_entry().orig, v4_entry().reply), "len {len}");
                }
                other => panic!("len {len}: {other:?}"),
            },
        }
    }
}

#[test]
fn truncated_attribute_is_an_error() {
    let e = v4_entry();
    let mut m = entry_msg(CT_MSG_NEW, 0, 0, &e, IPPROTO_UDP);
    // Claim a longer CTA_TUPLE_ORIG than the message holds.
    let off = NLMSG_HDRLEN + NFGENMSG_LEN;
    m[off..off + 2].copy_from_slice(&u16::MAX.to_ne_bytes());
    assert!(parse_messages(&m).is_err());
    // An attribute length below the header size.
    m[off..off + 2].copy_from_slice(&2u16.to_ne_bytes());
    assert!(parse_messages(&m).is_err());
    // A port attribute of the wrong size.
    let bad = ct_msg(
        CT_MSG_NEW,
        0,
        0,
        2,
        &[nested(
            CTA_TUPLE_ORIG,
            &[nested(CTA_TUPLE_PROTO, &[nla(CTA_PROTO_SRC_PORT, &[1, 2, 3])])],
        )],
    );
    assert!(parse_messages(&bad).is_err());
    // An IPv4 address attribute of 3 bytes.
    let bad = ct_msg(
        CT_MSG_NEW,
        0,
        0,
        2,
        &[nested(
            CTA_TUPLE_ORIG,
            &[nested(CTA_TUPLE_IP, &[nla(CTA_IP_V4_SRC, &[1, 2, 3])])],
        )],
    );
    assert!(parse_messages(&bad).is_err());
    // No nfgenmsg at all.
    assert!(parse_messages(&msg(CT_MSG_NEW, 0, 0, &[2, 0])).is_err());
}

#[test]
fn incomplete_udp_entry_is_skipped() {
    // UDP without ports in the reply tuple: nothing natfix can use.
    let e = v4_entry();
    let reply_no_ports = nested(
        CTA_TUPLE_REPLY,
        &[
            nested(
                CTA_TUPLE_IP,
                &[ip_attr(CTA_IP_V4_SRC, e.reply.src), ip_attr(CTA_IP_V4_DST, e.reply.dst)],
            ),
            nested(CTA_TUPLE_PROTO, &[nla(CTA_PROTO_NUM, &[IPPROTO_UDP])]),
        ],
    );
    let m = ct_msg(
        CT_MSG_NEW,
        0,
        0,
        2,
        &[tuple(CTA_TUPLE_ORIG, e.orig, IPPROTO_UDP), reply_no_ports],
    );
    assert_eq!(parse_messages(&m).unwrap()[0].body, Body::Conntrack(None));
    // No reply tuple at all.
    let m = ct_msg(CT_MSG_NEW, 0, 0, 2, &[tuple(CTA_TUPLE_ORIG, e.orig, IPPROTO_UDP)]);
    assert_eq!(parse_messages(&m).unwrap()[0].body, Body::Conntrack(None));
}

#[test]
fn unpadded_last_attribute_and_missing_nested_flag_are_accepted() {
    let e = v4_entry();
    // Old kernels set no NLA_F_NESTED; masking must not depend on it.
    let plain = |ty, children: &[Vec<u8>]| nla(ty, &children.concat());
    let tup = |ty, t: CtTuple| {
        plain(
            ty,
            &[
                plain(
                    CTA_TUPLE_IP,
                    &[ip_attr(CTA_IP_V4_SRC, t.src), ip_attr(CTA_IP_V4_DST, t.dst)],
                ),
                plain(
                    CTA_TUPLE_PROTO,
                    &[
                        nla(CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes()),
                        nla(CTA_PROTO_DST_PORT, &t.dport.to_be_bytes()),
                        nla(CTA_PROTO_NUM, &[IPPROTO_UDP])[..5].to_vec(), // unpadded, last
                    ],
                ),
            ],
        )
    };
    let mut p = vec![2, 0, 0, 0];
    p.extend(tup(CTA_TUPLE_ORIG, e.orig));
    p.extend(tup(CTA_TUPLE_REPLY, e.reply));
    let got = parse_messages(&msg(CT_MSG_NEW, 0, 0, &p)).unwrap();
    let Body::Conntrack(Some(entry)) = &got[0].body else {
        panic!("{got:?}")
    };
    assert_eq!(
        (entry.orig, entry.reply, entry.status, entry.timeout_secs),
        (e.orig, e.reply, 0, None)
    );
}

fn arb_ip(v6: bool) -> BoxedStrategy<IpAddr> {
    if v6 {
        any::<[u8; 16]>().prop_map(|b| IpAddr::V6(b.into())).boxed()
    } else {
        any::<[u8; 4]>().prop_map(|b| IpAddr::V4(b.into())).boxed()
    }
}

fn arb_entry() -> impl Strategy<Value = CtEntry> {
    any::<bool>().prop_flat_map(|v6| {
        let tup = || {
            (arb_ip(v6), arb_ip(v6), any::<u16>(), any::<u16>()).prop_map(|(src, dst, sport, dport)| CtTuple {
                src,
                dst,
                sport,
                dport,
            })
        };
        (tup(), tup(), any::<u32>(), any::<Option<u32>>()).prop_map(|(orig, reply, status, timeout_secs)| CtEntry {
            orig,
            reply,
            status,
            timeout_secs,
        })
    })
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_messages(&bytes);
        let _ = parse_events(&bytes);
    }

    #[test]
    fn mutated_fixture_never_panics(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut buf = dump_fixture(1);
        for (i, b) in flips {
            let i = i.index(buf.len());
            buf[i] = b;
        }
        let end = cut.index(buf.len() + 1);
        let _ = parse_messages(&buf[..end]);
        let _ = parse_events(&buf[..end]);
    }

    #[test]
    fn entries_round_trip(e in arb_entry(), new in any::<bool>()) {
        let flags = if new { NLM_F_CREATE | NLM_F_EXCL } else { 0 };
        let got = parse_events(&entry_msg(CT_MSG_NEW, flags, 0, &e, IPPROTO_UDP)).unwrap();
        let kind = if new { CtEventKind::New } else { CtEventKind::Update };
        prop_assert_eq!(got, vec![CtEvent { kind, entry: e }]);
    }
}
