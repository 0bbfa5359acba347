//! nftables trace events over netlink (`NFNLGRP_NFTRACE`): what `nft monitor
//! trace` reads, decoded by natfix itself. The kernel sends a namespace's
//! events only to listeners in that namespace, so the trace opens one socket
//! per traced namespace. The same socket joins `NFNLGRP_NFTABLES`, whose
//! `NFT_MSG_NEWGEN` says the ruleset changed (the rule texts must be re-read).
//!
//! The parser is pure and panic-free: a malformed message is skipped.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
};

use anyhow::{Context, Result};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use super::tuple::Tuple;
use crate::error::UserError;

const NFNLGRP_NFTABLES: u32 = 7;
const NFNLGRP_NFTRACE: u32 = 9;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_TRACE: u16 = 17;
const NLMSG_HDRLEN: usize = 16;

// enum nft_trace_attributes (uapi nf_tables.h); 18-21 exist since Linux 6.16.
const NFTA_TRACE_TABLE: u16 = 1;
const NFTA_TRACE_CHAIN: u16 = 2;
const NFTA_TRACE_RULE_HANDLE: u16 = 3;
const NFTA_TRACE_TYPE: u16 = 4;
const NFTA_TRACE_VERDICT: u16 = 5;
const NFTA_TRACE_ID: u16 = 6;
const NFTA_TRACE_NETWORK_HEADER: u16 = 8;
const NFTA_TRACE_TRANSPORT_HEADER: u16 = 9;
const NFTA_TRACE_IIF: u16 = 10;
const NFTA_TRACE_OIF: u16 = 12;
const NFTA_TRACE_MARK: u16 = 14;
const NFTA_TRACE_POLICY: u16 = 16;
const NFTA_TRACE_CT_ID: u16 = 18;
const NFTA_TRACE_CT_DIRECTION: u16 = 19;
const NFTA_TRACE_CT_STATE: u16 = 21;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

/// `enum nft_trace_types`: POLICY, RETURN, RULE.
pub const TRACE_TYPE_POLICY: u32 = 1;

/// One trace message: a rule (or a chain's policy) that decided something
/// about a marked packet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceMsg {
    /// `nfgen_family` of the table: 1 inet, 2 ip, 3 arp, 5 netdev, 7 bridge, 10 ip6.
    pub family: u8,
    pub table: String,
    pub chain: String,
    /// Present when a rule (not the end of a chain, not a policy) produced it.
    pub handle: Option<u64>,
    pub ty: u32,
    /// Verdict code: `NF_DROP` 0, `NF_ACCEPT` 1, `NFT_CONTINUE` -1, BREAK -2, JUMP -3, GOTO -4, RETURN -5.
    pub verdict: Option<i32>,
    pub jump_target: Option<String>,
    /// Opaque, the same for one packet while its input interface is unchanged.
    pub id: u32,
    /// The packet as the chain saw it (first message of each base chain's run).
    pub tuple: Option<Tuple>,
    pub iif: Option<u32>,
    pub oif: Option<u32>,
    pub mark: Option<u32>,
    /// Base chain policy (0 drop, 1 accept) of a POLICY message.
    pub policy: Option<u32>,
    /// Linux >= 6.16: conntrack's id (as ctnetlink's `CTA_ID`), direction, state bits.
    pub ct_id: Option<u32>,
    pub ct_dir: Option<u8>,
    pub ct_state: Option<u32>,
}

/// What one datagram of the trace socket carried.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Received {
    pub traces: Vec<TraceMsg>,
    /// A ruleset commit happened (rule texts may be stale).
    pub new_generation: bool,
    /// The socket overran (ENOBUFS): messages before these were lost.
    pub lost: bool,
}

fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let [l0, l1, t0, t1, ..] = *b else { return None };
        let len = usize::from(u16::from_ne_bytes([l0, l1]));
        let ty = u16::from_ne_bytes([t0, t1]) & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        let value = &b[4..len];
        b = b.get((len + 3) & !3..).unwrap_or(&[]);
        Some((ty, value))
    })
}

fn be32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
}

fn be64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?))
}

fn string(v: &[u8]) -> String {
    let end = v.iter().position(|&c| c == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// Decodes an `NFT_MSG_TRACE` payload (nfgenmsg + attributes).
#[must_use]
pub fn parse_trace(payload: &[u8]) -> Option<TraceMsg> {
    let mut m = TraceMsg { family: *payload.first()?, ..TraceMsg::default() };
    let (mut network, mut transport) = (None, None);
    for (ty, v) in attrs(payload.get(4..)?) {
        match ty {
            NFTA_TRACE_TABLE => m.table = string(v),
            NFTA_TRACE_CHAIN => m.chain = string(v),
            NFTA_TRACE_RULE_HANDLE => m.handle = be64(v),
            NFTA_TRACE_TYPE => m.ty = be32(v)?,
            NFTA_TRACE_VERDICT => {
                for (t, vv) in attrs(v) {
                    match t {
                        NFTA_VERDICT_CODE => m.verdict = be32(vv).map(u32::cast_signed),
                        NFTA_VERDICT_CHAIN => m.jump_target = Some(string(vv)),
                        _ => {}
                    }
                }
            }
            // Opaque: read it as the kernel wrote it, only equality matters.
            NFTA_TRACE_ID => m.id = u32::from_ne_bytes(v.get(..4)?.try_into().ok()?),
            NFTA_TRACE_NETWORK_HEADER => network = Some(v),
            NFTA_TRACE_TRANSPORT_HEADER => transport = Some(v),
            NFTA_TRACE_IIF => m.iif = be32(v),
            NFTA_TRACE_OIF => m.oif = be32(v),
            NFTA_TRACE_MARK => m.mark = be32(v),
            NFTA_TRACE_POLICY => m.policy = be32(v),
            NFTA_TRACE_CT_ID => m.ct_id = be32(v),
            NFTA_TRACE_CT_DIRECTION => m.ct_dir = v.first().copied(),
            NFTA_TRACE_CT_STATE => m.ct_state = be32(v),
            _ => {}
        }
    }
    if let Some(n) = network {
        m.tuple = Tuple::from_headers(n, transport.unwrap_or(&[]));
    }
    Some(m)
}

/// Splits a datagram into netlink messages and keeps the nftables ones.
#[must_use]
pub fn parse_datagram(mut buf: &[u8]) -> Received {
    let mut out = Received::default();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        if ty >> 8 == NFNL_SUBSYS_NFTABLES {
            match ty & 0xff {
                NFT_MSG_TRACE => out.traces.extend(parse_trace(&buf[NLMSG_HDRLEN..len])),
                NFT_MSG_NEWGEN => out.new_generation = true,
                _ => {}
            }
        }
        buf = buf.get((len + 3) & !3..).unwrap_or(&[]);
    }
    out
}

/// A trace socket in the namespace of the thread that opened it (it stays
/// there when the thread leaves).
pub struct TraceSocket {
    sock: Socket,
    buf: Vec<u8>,
}

impl TraceSocket {
    pub fn open() -> Result<Self> {
        let mut sock = Socket::new(NETLINK_NETFILTER).context("cannot open a NETLINK_NETFILTER socket")?;
        // Bursts of traced packets: a large buffer, or the kernel drops messages (ENOBUFS).
        let size = crate::conntrack::EVENT_RCVBUF;
        if nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBufForce, &size).is_err() {
            let _ = nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBuf, &size);
        }
        sock.bind(&SocketAddr::new(0, 0)).context("cannot bind the nftables trace socket")?;
        sock.add_membership(NFNLGRP_NFTRACE).map_err(|e| {
            UserError::Unsupported(format!("the kernel has no nftables tracing (joining NFNLGRP_NFTRACE failed: {e})"))
        })?;
        sock.add_membership(NFNLGRP_NFTABLES).context("cannot join the nftables ruleset group")?;
        sock.set_non_blocking(true).context("cannot make the trace socket non-blocking")?;
        Ok(Self { sock, buf: vec![0u8; 256 * 1024] })
    }

    /// The next datagram's messages; None when nothing is waiting. An
    /// overrun (ENOBUFS) comes back as `lost`.
    pub fn try_recv(&mut self) -> Result<Option<Received>> {
        let mut space = &mut self.buf[..];
        match self.sock.recv_from(&mut space, 0) {
            Ok((n, from)) if from.port_number() == 0 => Ok(Some(parse_datagram(&self.buf[..n.min(self.buf.len())]))),
            Ok(_) => Ok(Some(Received::default())),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => Ok(None),
            // Messages were lost; the socket goes on with the next ones.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(Some(Received { lost: true, ..Received::default() })),
            Err(e) => Err(anyhow::Error::new(e).context("cannot read nftables trace messages")),
        }
    }
}

impl AsFd for TraceSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl AsRawFd for TraceSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, v: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&u16::try_from(4 + v.len()).unwrap().to_ne_bytes());
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(v);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn message(ty: u16, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&u32::try_from(16 + body.len()).unwrap().to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        m
    }

    /// The FORWARD accept of the research capture: ip filter FORWARD, handle 3, accept, with headers.
    fn forward_accept() -> Vec<u8> {
        let mut body = vec![2, 0, 0, 0];
        body.extend(attr(NFTA_TRACE_TABLE, b"filter\0"));
        body.extend(attr(NFTA_TRACE_CHAIN, b"FORWARD\0"));
        body.extend(attr(NFTA_TRACE_RULE_HANDLE, &3u64.to_be_bytes()));
        body.extend(attr(NFTA_TRACE_TYPE, &3u32.to_be_bytes()));
        let mut verdict = attr(NFTA_VERDICT_CODE, &1u32.to_be_bytes());
        verdict.extend(attr(NFTA_VERDICT_CHAIN, b"DOCKER\0"));
        body.extend(attr(NFTA_TRACE_VERDICT | 0x8000, &verdict));
        body.extend(attr(NFTA_TRACE_ID, &0xb9fa_f344u32.to_ne_bytes()));
        let ip = [0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 201, 0, 2, 10, 202, 0, 2];
        body.extend(attr(NFTA_TRACE_NETWORK_HEADER, &ip));
        body.extend(attr(NFTA_TRACE_TRANSPORT_HEADER, &[0x9c, 0x40, 0x15, 0xb3, 0, 8, 0, 0]));
        body.extend(attr(NFTA_TRACE_IIF, &2u32.to_be_bytes()));
        body.extend(attr(NFTA_TRACE_OIF, &3u32.to_be_bytes()));
        body.extend(attr(NFTA_TRACE_CT_DIRECTION, &[1]));
        message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_TRACE, &body)
    }

    #[test]
    fn decodes_a_trace_message() {
        let mut dgram = forward_accept();
        dgram.extend(message((NFNL_SUBSYS_NFTABLES << 8) | 0x0f, &[0, 0, 0, 0]));
        let got = parse_datagram(&dgram);
        assert!(got.new_generation);
        let m = &got.traces[0];
        assert_eq!((m.family, m.table.as_str(), m.chain.as_str(), m.handle, m.verdict), (2, "filter", "FORWARD", Some(3), Some(1)));
        assert_eq!(m.jump_target.as_deref(), Some("DOCKER"));
        assert_eq!(m.id, 0xb9fa_f344);
        assert_eq!((m.iif, m.oif, m.ct_dir), (Some(2), Some(3), Some(1)));
        assert_eq!(m.tuple.unwrap().to_string(), "udp 10.201.0.2:40000 -> 10.202.0.2:5555");
    }

    #[test]
    fn malformed_input_never_panics() {
        let good = forward_accept();
        for cut in 0..good.len() {
            let _ = parse_datagram(&good[..cut]);
            let mut bad = good.clone();
            bad[cut] ^= 0xff;
            let _ = parse_datagram(&bad);
        }
        assert!(parse_trace(&[]).is_none());
    }
}
