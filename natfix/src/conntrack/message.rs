//! ctnetlink messages: the netlink framing, attribute parsing and the
//! requests natfix sends. Pure: malformed input is an error, never a panic.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, anyhow, bail};

use super::{Body, CtEntry, CtTuple, Message};

// Netlink framing (linux/netlink.h).
pub(super) const NLMSG_HDRLEN: usize = 16;
pub(super) const NLA_HDRLEN: usize = 4;
pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLMSG_DONE: u16 = 3;
pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_DUMP: u16 = 0x300;
pub(super) const NLM_F_CREATE: u16 = 0x400;
pub(super) const NLA_TYPE_MASK: u16 = 0x3fff;

// nfnetlink (linux/netfilter/nfnetlink.h).
pub(super) const NFGENMSG_LEN: usize = 4;
pub(super) const NFNETLINK_V0: u8 = 0;
// nfgen_family (linux/netfilter.h): the same numbers as AF_INET and AF_INET6.
pub(super) const NFPROTO_IPV4: u8 = 2;
pub(super) const NFPROTO_IPV6: u8 = 10;
/// Every family: a dump request with it walks the table once for all.
pub(super) const NFPROTO_UNSPEC: u8 = 0;
pub(super) const NFNL_SUBSYS_CTNETLINK: u16 = 1;
pub(super) const NFNLGRP_CONNTRACK_NEW: u32 = 1;
pub(super) const NFNLGRP_CONNTRACK_UPDATE: u32 = 2;
pub(super) const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;

// ctnetlink (linux/netfilter/nfnetlink_conntrack.h).
pub(super) const IPCTNL_MSG_CT_NEW: u16 = 0;
pub(super) const IPCTNL_MSG_CT_GET: u16 = 1;
pub(super) const IPCTNL_MSG_CT_DELETE: u16 = 2;
/// `nlmsg_type` of dump replies and NEW/UPDATE events.
pub(crate) const CT_MSG_NEW: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW;
/// `nlmsg_type` of DESTROY events.
pub(crate) const CT_MSG_DELETE: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE;
pub(super) const CT_MSG_GET: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET;

pub(super) const CTA_TUPLE_ORIG: u16 = 1;
pub(super) const CTA_TUPLE_REPLY: u16 = 2;
pub(super) const CTA_STATUS: u16 = 3;
pub(super) const CTA_TIMEOUT: u16 = 7;
pub(super) const CTA_TUPLE_IP: u16 = 1;
pub(super) const CTA_TUPLE_PROTO: u16 = 2;
pub(super) const CTA_IP_V4_SRC: u16 = 1;
pub(super) const CTA_IP_V4_DST: u16 = 2;
pub(super) const CTA_IP_V6_SRC: u16 = 3;
pub(super) const CTA_IP_V6_DST: u16 = 4;
pub(super) const CTA_PROTO_NUM: u16 = 1;
pub(super) const CTA_PROTO_SRC_PORT: u16 = 2;
pub(super) const CTA_PROTO_DST_PORT: u16 = 3;

pub(super) const IPPROTO_UDP: u8 = 17;


pub(super) fn align4(len: usize) -> usize {
    len.saturating_add(3) & !3
}

/// Iterates over netlink attributes; after the first error it stops.
pub(super) struct Attrs<'a> {
    rest: &'a [u8],
}

pub(super) fn attrs(buf: &[u8]) -> Attrs<'_> {
    Attrs { rest: buf }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.rest;
        if rest.is_empty() {
            return None;
        }
        self.rest = &[];
        let [l0, l1, t0, t1, ..] = *rest else {
            return Some(Err(anyhow!("truncated attribute header ({} bytes)", rest.len())));
        };
        let len = usize::from(u16::from_ne_bytes([l0, l1]));
        let ty = u16::from_ne_bytes([t0, t1]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > rest.len() {
            return Some(Err(anyhow!(
                "attribute {ty} has length {len}, {} bytes left",
                rest.len()
            )));
        }
        // The last attribute's padding may be missing; the kernel allows that too.
        self.rest = rest.get(align4(len)..).unwrap_or(&[]);
        Some(Ok((ty, &rest[NLA_HDRLEN..len])))
    }
}

pub(super) fn be16(ty: u16, p: &[u8]) -> Result<u16> {
    let b: [u8; 2] = p
        .try_into()
        .map_err(|_| anyhow!("attribute {ty}: {} bytes, want 2", p.len()))?;
    Ok(u16::from_be_bytes(b))
}

pub(super) fn be32(ty: u16, p: &[u8]) -> Result<u32> {
    let b: [u8; 4] = p
        .try_into()
        .map_err(|_| anyhow!("attribute {ty}: {} bytes, want 4", p.len()))?;
    Ok(u32::from_be_bytes(b))
}

pub(super) fn ipv4(ty: u16, p: &[u8]) -> Result<IpAddr> {
    let b: [u8; 4] = p
        .try_into()
        .map_err(|_| anyhow!("IPv4 attribute {ty}: {} bytes", p.len()))?;
    Ok(IpAddr::V4(Ipv4Addr::from(b)))
}

pub(super) fn ipv6(ty: u16, p: &[u8]) -> Result<IpAddr> {
    let b: [u8; 16] = p
        .try_into()
        .map_err(|_| anyhow!("IPv6 attribute {ty}: {} bytes", p.len()))?;
    Ok(IpAddr::V6(Ipv6Addr::from(b)))
}

/// A tuple as found; any part may be missing.
#[derive(Default)]
pub(super) struct RawTuple {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    proto: Option<u8>,
    sport: Option<u16>,
    dport: Option<u16>,
}

impl RawTuple {
    fn complete(&self) -> Option<CtTuple> {
        Some(CtTuple {
            src: self.src?,
            dst: self.dst?,
            sport: self.sport?,
            dport: self.dport?,
        })
    }
}

pub(super) fn parse_tuple(buf: &[u8]) -> Result<RawTuple> {
    let mut t = RawTuple::default();
    for a in attrs(buf) {
        let (ty, p) = a?;
        match ty {
            CTA_TUPLE_IP => {
                for a in attrs(p) {
                    let (ty, p) = a?;
                    match ty {
                        CTA_IP_V4_SRC => t.src = Some(ipv4(ty, p)?),
                        CTA_IP_V4_DST => t.dst = Some(ipv4(ty, p)?),
                        CTA_IP_V6_SRC => t.src = Some(ipv6(ty, p)?),
                        CTA_IP_V6_DST => t.dst = Some(ipv6(ty, p)?),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for a in attrs(p) {
                    let (ty, p) = a?;
                    match ty {
                        CTA_PROTO_NUM => match p {
                            [n] => t.proto = Some(*n),
                            _ => bail!("protocol number attribute: {} bytes, want 1", p.len()),
                        },
                        CTA_PROTO_SRC_PORT => t.sport = Some(be16(ty, p)?),
                        CTA_PROTO_DST_PORT => t.dport = Some(be16(ty, p)?),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if let (Some(s), Some(d)) = (t.src, t.dst)
        && s.is_ipv4() != d.is_ipv4()
    {
        bail!("tuple mixes address families: {s} -> {d}");
    }
    Ok(t)
}

/// Parses a ctnetlink message payload (nfgenmsg + attributes).
pub(super) fn parse_entry(payload: &[u8]) -> Result<Option<CtEntry>> {
    let attrs_buf = payload
        .get(NFGENMSG_LEN..)
        .ok_or_else(|| anyhow!("ctnetlink message without nfgenmsg ({} bytes)", payload.len()))?;
    let (mut orig, mut reply, mut status, mut timeout) = (None, None, 0, None);
    for a in attrs(attrs_buf) {
        let (ty, p) = a?;
        match ty {
            CTA_TUPLE_ORIG => orig = Some(parse_tuple(p).context("original tuple")?),
            CTA_TUPLE_REPLY => reply = Some(parse_tuple(p).context("reply tuple")?),
            CTA_STATUS => status = be32(ty, p)?,
            CTA_TIMEOUT => timeout = Some(be32(ty, p)?),
            _ => {}
        }
    }
    let (Some(orig), Some(reply)) = (orig, reply) else {
        return Ok(None);
    };
    if orig.proto != Some(IPPROTO_UDP) {
        return Ok(None);
    }
    if reply.proto.is_some_and(|p| p != IPPROTO_UDP) {
        bail!("original tuple is UDP, reply tuple is protocol {:?}", reply.proto);
    }
    // Without both full tuples the entry is of no use to the flow table.
    let (Some(orig), Some(reply)) = (orig.complete(), reply.complete()) else {
        return Ok(None);
    };
    Ok(Some(CtEntry {
        orig,
        reply,
        status,
        timeout_secs: timeout,
    }))
}

/// Splits a netlink datagram into messages and decodes the ctnetlink ones.
///
/// Malformed framing or attributes give an error for the whole datagram;
/// non-UDP entries come back as `Body::Conntrack(None)`.
pub fn parse_messages(buf: &[u8]) -> Result<Vec<Message>> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        let Some(hdr) = rest.get(..NLMSG_HDRLEN) else {
            bail!("truncated netlink header ({} bytes)", rest.len());
        };
        let word = |i: usize| u32::from_ne_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let len = usize::try_from(word(0)).unwrap_or(usize::MAX);
        let msg_type = u16::from_ne_bytes([hdr[4], hdr[5]]);
        let flags = u16::from_ne_bytes([hdr[6], hdr[7]]);
        let seq = word(8);
        if len < NLMSG_HDRLEN || len > rest.len() {
            bail!(
                "netlink message of type {msg_type:#x} has length {len}, {} bytes left",
                rest.len()
            );
        }
        let payload = &rest[NLMSG_HDRLEN..len];
        let errno = || -> Result<i32> {
            let b: [u8; 4] = payload
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| anyhow!("netlink message of type {msg_type:#x} too short for an error code"))?;
            Ok(i32::from_ne_bytes(b).saturating_neg())
        };
        let body = match msg_type {
            // A DONE without payload (older kernels) means success.
            NLMSG_DONE if payload.is_empty() => Body::Done(0),
            NLMSG_DONE => Body::Done(errno()?),
            NLMSG_ERROR => Body::Error(errno()?),
            CT_MSG_NEW | CT_MSG_DELETE => {
                Body::Conntrack(parse_entry(payload).with_context(|| format!("conntrack message seq {seq}"))?)
            }
            _ => Body::Other,
        };
        out.push(Message {
            msg_type,
            flags,
            seq,
            body,
        });
        rest = rest.get(align4(len)..).unwrap_or(&[]);
    }
    Ok(out)
}

pub(super) fn errno_error(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}


pub(super) fn dump_request(seq: u32, family: u8) -> Vec<u8> {
    let len = NLMSG_HDRLEN + NFGENMSG_LEN;
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    req.extend_from_slice(&CT_MSG_GET.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&seq.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    req.extend_from_slice(&[family, NFNETLINK_V0, 0, 0]);
    req
}

pub(super) fn next_seq() -> u32 {
    static SEQ: AtomicU32 = AtomicU32::new(1);
    SEQ.fetch_add(1, Ordering::Relaxed)
}


/// Flag of a netlink attribute holding attributes.
pub(super) const NLA_F_NESTED: u16 = 0x8000;
pub(super) const NLM_F_ACK: u16 = 0x4;

/// One attribute: header, payload, padding to 4 bytes.
pub(super) fn nla(ty: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(NLA_HDRLEN + payload.len()).unwrap_or(u16::MAX);
    let mut v = Vec::with_capacity(align4(usize::from(len)));
    v.extend_from_slice(&len.to_ne_bytes());
    v.extend_from_slice(&ty.to_ne_bytes());
    v.extend_from_slice(payload);
    v.resize(align4(v.len()), 0);
    v
}

/// `CTA_TUPLE_*` of one direction, nested.
fn tuple_attr(ty: u16, t: &CtTuple) -> Vec<u8> {
    let ip = match (t.src, t.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => [nla(CTA_IP_V4_SRC, &s.octets()), nla(CTA_IP_V4_DST, &d.octets())].concat(),
        (IpAddr::V6(s), IpAddr::V6(d)) => [nla(CTA_IP_V6_SRC, &s.octets()), nla(CTA_IP_V6_DST, &d.octets())].concat(),
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            [nla(CTA_IP_V6_SRC, &v6(s).octets()), nla(CTA_IP_V6_DST, &v6(d).octets())].concat()
        }
    };
    let proto = [
        nla(CTA_PROTO_NUM, &[IPPROTO_UDP]),
        nla(CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes()),
        nla(CTA_PROTO_DST_PORT, &t.dport.to_be_bytes()),
    ]
    .concat();
    nla(ty | NLA_F_NESTED, &[nla(CTA_TUPLE_IP | NLA_F_NESTED, &ip), nla(CTA_TUPLE_PROTO | NLA_F_NESTED, &proto)].concat())
}

/// `IPCTNL_MSG_CT_DELETE` of the UDP entry whose original tuple is `orig`, asking for an ACK.
pub(super) fn delete_request(seq: u32, orig: &CtTuple) -> Vec<u8> {
    let family = if orig.src.is_ipv4() { NFPROTO_IPV4 } else { NFPROTO_IPV6 };
    let attrs = tuple_attr(CTA_TUPLE_ORIG, orig);
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    req.extend_from_slice(&CT_MSG_DELETE.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    req.extend_from_slice(&seq.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[family, NFNETLINK_V0, 0, 0]);
    req.extend(attrs);
    req
}
