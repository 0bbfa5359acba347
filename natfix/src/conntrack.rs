//! The kernel's conntrack table over ctnetlink: a one-shot dump of its UDP
//! entries and a subscription to its NEW/UPDATE/DESTROY events.
//!
//! natfix seeds its own UDP flow table from [`dump_udp`] at start and keeps it
//! in sync from a [`CtEventStream`], so flows that existed before natfix
//! started still count as solicited. Everything that is not UDP is filtered
//! out here, so callers only ever see UDP entries.
//!
//! Both sockets are opened in the calling thread's network namespace. The
//! parser ([`parse_messages`]) is pure and fuzz-safe: malformed input yields an
//! error, never a panic.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use nix::sys::{
    socket::{setsockopt, sockopt},
    time::TimeVal,
};

// Netlink framing (linux/netlink.h).
const NLMSG_HDRLEN: usize = 16;
const NLA_HDRLEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLA_TYPE_MASK: u16 = 0x3fff;

// nfnetlink (linux/netfilter/nfnetlink.h).
const NFGENMSG_LEN: usize = 4;
const NFNETLINK_V0: u8 = 0;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const NFNLGRP_CONNTRACK_NEW: u32 = 1;
const NFNLGRP_CONNTRACK_UPDATE: u32 = 2;
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;

// ctnetlink (linux/netfilter/nfnetlink_conntrack.h).
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
/// `nlmsg_type` of dump replies and NEW/UPDATE events.
pub const CT_MSG_NEW: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW;
/// `nlmsg_type` of DESTROY events.
pub const CT_MSG_DELETE: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE;
const CT_MSG_GET: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_TIMEOUT: u16 = 7;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

const IPPROTO_UDP: u8 = 17;

// A few `ip_conntrack_status` bits (linux/netfilter/nf_conntrack_common.h)
// callers may want to look at in `CtEntry::status`.
pub const IPS_SEEN_REPLY: u32 = 1 << 1;
pub const IPS_ASSURED: u32 = 1 << 2;
pub const IPS_CONFIRMED: u32 = 1 << 3;
pub const IPS_SRC_NAT: u32 = 1 << 4;
pub const IPS_DST_NAT: u32 = 1 << 5;
pub const IPS_DYING: u32 = 1 << 9;

/// Receive buffer for one datagram. The kernel caps netlink dump skbs at
/// 32 KiB and events are far smaller, so this never truncates in practice;
/// if it ever does we report it rather than parse half a message.
const RECV_BUF_LEN: usize = 64 * 1024;

/// Default socket receive buffer of the event socket: large, because events
/// arrive in bursts (conntrack flushes, GC sweeps) and an overrun forces a
/// full re-dump.
pub const EVENT_RCVBUF: usize = 8 << 20;

/// One direction of a connection. Ports are in host byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtTuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

/// A UDP conntrack entry. `reply` is the tuple a remote peer's packets carry
/// on their way back, i.e. after SNAT it names this host's public side.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CtEntry {
    pub orig: CtTuple,
    pub reply: CtTuple,
    /// `IPS_*` bits; 0 when the message did not carry `CTA_STATUS`.
    pub status: u32,
    /// Seconds left, when the message carries `CTA_TIMEOUT` (DESTROY events
    /// from older kernels do not).
    pub timeout_secs: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CtEventKind {
    New,
    Update,
    Destroy,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CtEvent {
    pub kind: CtEventKind,
    pub entry: CtEntry,
}

/// One netlink message of a datagram, as far as natfix cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub msg_type: u16,
    pub flags: u16,
    pub seq: u32,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// A ctnetlink entry (dump reply or event); `None` when it is not UDP or
    /// lacks the tuples/ports natfix needs.
    Conntrack(Option<CtEntry>),
    /// `NLMSG_DONE`, with the dump's errno (0 = success).
    Done(i32),
    /// `NLMSG_ERROR`, with a positive errno (0 = ACK).
    Error(i32),
    /// Anything else (`NLMSG_NOOP`, other ctnetlink messages, ...).
    Other,
}

/// The event socket overran (`ENOBUFS`) or a datagram did not fit: events
/// were lost and the caller should re-dump the table with [`dump_udp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsLost {
    truncated: bool,
}

impl std::fmt::Display for EventsLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.truncated {
            f.write_str("conntrack event datagram truncated: events lost, re-dump the table")
        } else {
            f.write_str("conntrack event socket overran (ENOBUFS): events lost, re-dump the table")
        }
    }
}

impl std::error::Error for EventsLost {}

/// Whether `err` means events were lost (see [`EventsLost`]).
#[must_use]
pub fn is_events_lost(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.downcast_ref::<EventsLost>().is_some())
}

fn align4(len: usize) -> usize {
    len.saturating_add(3) & !3
}

/// Iterates over netlink attributes; after the first error it stops.
struct Attrs<'a> {
    rest: &'a [u8],
}

fn attrs(buf: &[u8]) -> Attrs<'_> {
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

fn be16(ty: u16, p: &[u8]) -> Result<u16> {
    let b: [u8; 2] = p
        .try_into()
        .map_err(|_| anyhow!("attribute {ty}: {} bytes, want 2", p.len()))?;
    Ok(u16::from_be_bytes(b))
}

fn be32(ty: u16, p: &[u8]) -> Result<u32> {
    let b: [u8; 4] = p
        .try_into()
        .map_err(|_| anyhow!("attribute {ty}: {} bytes, want 4", p.len()))?;
    Ok(u32::from_be_bytes(b))
}

fn ipv4(ty: u16, p: &[u8]) -> Result<IpAddr> {
    let b: [u8; 4] = p
        .try_into()
        .map_err(|_| anyhow!("IPv4 attribute {ty}: {} bytes", p.len()))?;
    Ok(IpAddr::V4(Ipv4Addr::from(b)))
}

fn ipv6(ty: u16, p: &[u8]) -> Result<IpAddr> {
    let b: [u8; 16] = p
        .try_into()
        .map_err(|_| anyhow!("IPv6 attribute {ty}: {} bytes", p.len()))?;
    Ok(IpAddr::V6(Ipv6Addr::from(b)))
}

/// A tuple as found; any part may be missing.
#[derive(Default)]
struct RawTuple {
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

fn parse_tuple(buf: &[u8]) -> Result<RawTuple> {
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
fn parse_entry(payload: &[u8]) -> Result<Option<CtEntry>> {
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

fn errno_error(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// Collects one dump's replies, datagram by datagram.
#[derive(Debug, Default)]
struct DumpCollector {
    seq: u32,
    entries: Vec<CtEntry>,
}

impl DumpCollector {
    /// Feeds one datagram; `Ok(true)` once the dump is complete.
    fn feed(&mut self, datagram: &[u8]) -> Result<bool> {
        for msg in parse_messages(datagram)? {
            // Stale replies of some earlier request on this socket are not ours.
            if msg.seq != self.seq {
                continue;
            }
            match msg.body {
                Body::Conntrack(Some(e)) => self.entries.push(e),
                Body::Conntrack(None) | Body::Other | Body::Error(0) => {}
                Body::Done(0) => return Ok(true),
                Body::Done(e) => {
                    return Err(anyhow::Error::new(errno_error(e)).context("conntrack dump ended with an error"));
                }
                Body::Error(e) => {
                    return Err(
                        anyhow::Error::new(errno_error(e)).context("kernel rejected the conntrack dump request")
                    );
                }
            }
        }
        Ok(false)
    }
}

fn dump_request(seq: u32, family: u8) -> Vec<u8> {
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

fn next_seq() -> u32 {
    static SEQ: AtomicU32 = AtomicU32::new(1);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// Receives one datagram, retrying on EINTR. Returns its full length, which
/// exceeds `buf.len()` if it was truncated.
fn recv_datagram(sock: &Socket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    loop {
        let mut space = &mut buf[..];
        // MSG_TRUNC makes netlink return the real length, so truncation is detectable.
        match sock.recv_from(&mut space, libc::MSG_TRUNC) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// All UDP conntrack entries (IPv4 and IPv6) of the calling thread's network
/// namespace. Needs `CAP_NET_ADMIN` there.
pub fn dump_udp() -> Result<Vec<CtEntry>> {
    // One dump per family, as `conntrack -L -f ipv4/ipv6` asks: the form every
    // kernel version serves the same way.
    let mut entries = dump_family(libc::AF_INET as u8)?;
    entries.extend(dump_family(libc::AF_INET6 as u8)?);
    Ok(entries)
}

/// UDP entries of one address family. UDP filtering happens here, because
/// the kernel's CTA_FILTER support varies by version.
fn dump_family(family: u8) -> Result<Vec<CtEntry>> {
    let mut sock = Socket::new(NETLINK_NETFILTER).context("cannot open a NETLINK_NETFILTER socket")?;
    sock.bind_auto().context("cannot bind the netlink socket")?;
    let seq = next_seq();
    sock.send_to(&dump_request(seq, family), &SocketAddr::new(0, 0), 0)
        .context("cannot send the conntrack dump request")?;
    let mut buf = vec![0u8; RECV_BUF_LEN];
    let mut dump = DumpCollector {
        seq,
        entries: Vec::new(),
    };
    loop {
        let (n, from) = recv_datagram(&sock, &mut buf).context("cannot read the conntrack dump")?;
        if n > buf.len() {
            bail!(
                "conntrack dump datagram of {n} bytes exceeds the {}-byte buffer",
                buf.len()
            );
        }
        if from.port_number() != 0 {
            continue; // not from the kernel
        }
        if dump.feed(&buf[..n])? {
            return Ok(dump.entries);
        }
    }
}

fn event_of(msg: Message) -> Result<Option<CtEvent>> {
    match msg.body {
        Body::Conntrack(Some(entry)) => {
            let kind = match msg.msg_type {
                CT_MSG_DELETE => CtEventKind::Destroy,
                // The kernel flags NEW events NLM_F_CREATE|NLM_F_EXCL; UPDATE has neither.
                _ if msg.flags & NLM_F_CREATE != 0 => CtEventKind::New,
                _ => CtEventKind::Update,
            };
            Ok(Some(CtEvent { kind, entry }))
        }
        Body::Error(e) if e != 0 => {
            Err(anyhow::Error::new(errno_error(e)).context("error on the conntrack event socket"))
        }
        _ => Ok(None),
    }
}

/// Turns one event datagram into its UDP events.
pub fn parse_events(datagram: &[u8]) -> Result<Vec<CtEvent>> {
    parse_messages(datagram)?
        .into_iter()
        .filter_map(|m| event_of(m).transpose())
        .collect()
}

/// A netlink socket subscribed to conntrack NEW, UPDATE and DESTROY events,
/// in the network namespace of the thread that opened it.
///
/// Blocking by default; for tokio, call `set_nonblocking(true)`, wrap it in
/// `AsyncFd` and use [`CtEventStream::try_recv`].
pub struct CtEventStream {
    sock: Socket,
    buf: Vec<u8>,
}

impl std::fmt::Debug for CtEventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CtEventStream")
            .field("fd", &self.sock.as_raw_fd())
            .finish_non_exhaustive()
    }
}

impl CtEventStream {
    /// Opens the socket with an [`EVENT_RCVBUF`]-byte receive buffer.
    pub fn open() -> Result<Self> {
        Self::open_with_rcvbuf(EVENT_RCVBUF)
    }

    /// Opens the socket with a receive buffer of about `rcvbuf` bytes
    /// (the kernel doubles it for bookkeeping).
    pub fn open_with_rcvbuf(rcvbuf: usize) -> Result<Self> {
        let mut sock = Socket::new(NETLINK_NETFILTER).context("cannot open a NETLINK_NETFILTER socket")?;
        // SO_RCVBUFFORCE ignores net.core.rmem_max but needs CAP_NET_ADMIN.
        if let Err(force) = setsockopt(&sock, sockopt::RcvBufForce, &rcvbuf) {
            setsockopt(&sock, sockopt::RcvBuf, &rcvbuf)
                .with_context(|| format!("cannot set the receive buffer (SO_RCVBUFFORCE: {force})"))?;
        }
        tracing::debug!(
            rcvbuf = sock.get_rx_buf_sz().ok(),
            "conntrack event socket receive buffer"
        );
        sock.bind(&SocketAddr::new(0, 0))
            .context("cannot bind the netlink socket")?;
        for group in [
            NFNLGRP_CONNTRACK_NEW,
            NFNLGRP_CONNTRACK_UPDATE,
            NFNLGRP_CONNTRACK_DESTROY,
        ] {
            sock.add_membership(group)
                .with_context(|| format!("cannot join conntrack event group {group} (needs CAP_NET_ADMIN)"))?;
        }
        Ok(Self {
            sock,
            buf: vec![0u8; RECV_BUF_LEN],
        })
    }

    /// Receives one datagram and returns the UDP events in it (possibly none).
    ///
    /// Errors: [`EventsLost`] (see [`is_events_lost`]) after an overrun; an
    /// `io::Error` of kind `WouldBlock` if the socket is non-blocking or the
    /// read timeout expired.
    pub fn recv(&mut self) -> Result<Vec<CtEvent>> {
        self.try_recv()?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                "no conntrack event ready (non-blocking socket or read timeout)",
            )
            .into()
        })
    }

    /// Like [`CtEventStream::recv`], but `Ok(None)` when nothing is ready.
    pub fn try_recv(&mut self) -> Result<Option<Vec<CtEvent>>> {
        let (n, from) = match recv_datagram(&self.sock, &mut self.buf) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                return Err(EventsLost { truncated: false }.into());
            }
            Err(e) => return Err(anyhow::Error::new(e).context("cannot read conntrack events")),
        };
        if n > self.buf.len() {
            return Err(EventsLost { truncated: true }.into());
        }
        // Only the kernel (port 0) speaks for conntrack; drop anything else.
        if from.port_number() != 0 {
            return Ok(Some(Vec::new()));
        }
        parse_events(&self.buf[..n]).map(Some)
    }

    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<()> {
        self.sock
            .set_non_blocking(nonblocking)
            .context("cannot change O_NONBLOCK on the conntrack event socket")
    }

    /// Bounds how long a blocking [`CtEventStream::recv`] waits; `None` waits forever.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        let tv = match timeout {
            None => TimeVal::new(0, 0),
            Some(d) if d.is_zero() => bail!("a zero read timeout would mean none"),
            Some(d) => TimeVal::new(
                libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
                libc::suseconds_t::from(d.subsec_micros()),
            ),
        };
        setsockopt(&self.sock, sockopt::ReceiveTimeout, &tv).context("cannot set SO_RCVTIMEO")
    }
}

impl AsFd for CtEventStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl AsRawFd for CtEventStream {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
