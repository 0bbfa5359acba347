//! The ctnetlink sockets: a one-shot dump of the UDP entries, and the
//! subscription to NEW/UPDATE/DESTROY events.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use nix::sys::{
    socket::{setsockopt, sockopt},
    time::TimeVal,
};

use super::{
    Body, CtEntry, CtEvent, CtEventKind, EventsLost, Message,
    message::{
        CT_MSG_DELETE, NFNLGRP_CONNTRACK_DESTROY, NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_UPDATE, NFPROTO_UNSPEC, NLM_F_CREATE,
        delete_request, dump_request, errno_error, next_seq, parse_messages,
    },
};

/// Receive buffer for one datagram. The kernel caps netlink dump skbs at
/// 32 KiB and events are far smaller, so this never truncates in practice;
/// if it ever does we report it rather than parse half a message.
pub(super) const RECV_BUF_LEN: usize = 64 * 1024;

/// Default socket receive buffer of the event socket: large, because events
/// arrive in bursts (conntrack flushes, GC sweeps) and an overrun forces a
/// full re-dump.
pub const EVENT_RCVBUF: usize = 8 << 20;


/// Collects one dump's replies, datagram by datagram.
#[derive(Debug, Default)]
pub(super) struct DumpCollector {
    pub(super) seq: u32,
    pub(super) entries: Vec<CtEntry>,
}

impl DumpCollector {
    /// Feeds one datagram; `Ok(true)` once the dump is complete.
    pub(super) fn feed(&mut self, datagram: &[u8]) -> Result<bool> {
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


/// Receives one datagram, retrying on EINTR. Returns its full length, which
/// exceeds `buf.len()` if it was truncated.
pub(super) fn recv_datagram(sock: &Socket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
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
    // One request for both families (AF_UNSPEC: the kernel filters by family
    // only when one is given). Each dump walks conntrack's whole hash table,
    // every namespace's buckets (262,144 on a default host: about 18 ms of
    // system time here), so one walk instead of one per family halves what
    // `natfix set`, the agent's reload and reap wait for.
    dump_family(NFPROTO_UNSPEC)
}

/// UDP entries of one address family. UDP filtering happens here, because
/// the kernel's `CTA_FILTER` support varies by version.
pub(super) fn dump_family(family: u8) -> Result<Vec<CtEntry>> {
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

pub(super) fn event_of(msg: Message) -> Result<Option<CtEvent>> {
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


/// Deletes the UDP entries with these original tuples from the calling
/// thread's namespace; returns how many the kernel deleted (one gone
/// meanwhile, ENOENT, is not counted).
pub fn delete_udp(origs: &[super::CtTuple]) -> Result<usize> {
    let mut sock = Socket::new(NETLINK_NETFILTER).context("cannot open a NETLINK_NETFILTER socket")?;
    sock.bind_auto().context("cannot bind the netlink socket")?;
    let mut buf = vec![0u8; RECV_BUF_LEN];
    let mut deleted = 0;
    for orig in origs {
        let seq = next_seq();
        sock.send_to(&delete_request(seq, orig), &SocketAddr::new(0, 0), 0).context("cannot send a conntrack delete")?;
        loop {
            let (n, from) = recv_datagram(&sock, &mut buf).context("cannot read the conntrack delete's answer")?;
            if from.port_number() != 0 {
                continue;
            }
            let answer = super::parse_messages(&buf[..n.min(buf.len())])?.into_iter().find(|m| m.seq == seq);
            match answer.map(|m| m.body) {
                Some(Body::Error(0)) => {
                    deleted += 1;
                    break;
                }
                Some(Body::Error(libc::ENOENT)) => break,
                Some(Body::Error(e)) => return Err(anyhow::Error::new(io::Error::from_raw_os_error(e)).context("the kernel refused a conntrack delete")),
                _ => {}
            }
        }
    }
    Ok(deleted)
}
