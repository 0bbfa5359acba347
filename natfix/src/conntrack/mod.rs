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


mod message;
mod socket;
#[cfg(test)]
mod tests;

use std::net::IpAddr;

pub use socket::{CtEventStream, EVENT_RCVBUF, delete_udp, dump_udp, parse_events};
pub use message::parse_messages;

// A few `ip_conntrack_status` bits (linux/netfilter/nf_conntrack_common.h)
// callers may want to look at in `CtEntry::status`.
pub const IPS_SEEN_REPLY: u32 = 1 << 1;
pub const IPS_ASSURED: u32 = 1 << 2;
pub const IPS_CONFIRMED: u32 = 1 << 3;
pub const IPS_SRC_NAT: u32 = 1 << 4;
pub const IPS_DST_NAT: u32 = 1 << 5;
pub const IPS_DYING: u32 = 1 << 9;


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

