//! rtnetlink, for the one thing natfix asks it: which XDP programs a device
//! runs (`RTM_GETLINK`, `IFLA_XDP`), in the calling thread's namespace.

use std::io;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const IFINFOMSG_LEN: usize = 16;
const AF_UNSPEC: u8 = 0;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
const IFLA_XDP_HW_PROG_ID: u16 = 7;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// The XDP programs on a device, by mode (0: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XdpProgs {
    pub native: u32,
    pub generic: u32,
    pub offloaded: u32,
}

impl XdpProgs {
    /// Every attached program id.
    #[must_use]
    pub fn ids(&self) -> Vec<u32> {
        [self.native, self.generic, self.offloaded].into_iter().filter(|id| *id != 0).collect()
    }
}

fn request(ifindex: u32) -> Vec<u8> {
    let len = NLMSG_HDRLEN + IFINFOMSG_LEN;
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    req.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id
    // struct ifinfomsg { family, pad, type, index, flags, change }
    req.extend_from_slice(&[AF_UNSPEC, 0, 0, 0]);
    req.extend_from_slice(&i32::try_from(ifindex).unwrap_or(0).to_ne_bytes());
    req.extend_from_slice(&[0; 8]);
    req
}

/// Netlink attributes of `buf` as (type, payload); stops at the first malformed one.
fn attrs(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((ty, &buf[4..len]));
        buf = buf.get(len.div_ceil(4) * 4..).unwrap_or(&[]);
    }
    out
}

fn u32_of(p: &[u8]) -> u32 {
    p.get(..4).map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Parses an `RTM_NEWLINK` reply into the device's XDP programs.
fn parse_reply(reply: &[u8]) -> io::Result<XdpProgs> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed RTM_NEWLINK reply");
    let hdr = reply.get(..NLMSG_HDRLEN).ok_or_else(bad)?;
    let msg_type = u16::from_ne_bytes([hdr[4], hdr[5]]);
    if msg_type == NLMSG_ERROR {
        let errno = i32::from_ne_bytes(reply.get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if msg_type != RTM_NEWLINK {
        return Err(bad());
    }
    let body = reply.get(NLMSG_HDRLEN + IFINFOMSG_LEN..).ok_or_else(bad)?;
    let mut progs = XdpProgs::default();
    for (ty, payload) in attrs(body) {
        if ty != IFLA_XDP {
            continue;
        }
        for (xty, x) in attrs(payload) {
            match xty {
                IFLA_XDP_DRV_PROG_ID => progs.native = u32_of(x),
                IFLA_XDP_SKB_PROG_ID => progs.generic = u32_of(x),
                IFLA_XDP_HW_PROG_ID => progs.offloaded = u32_of(x),
                _ => {}
            }
        }
    }
    Ok(progs)
}

/// The XDP programs on device `ifindex` of the calling thread's namespace.
pub fn xdp_progs(ifindex: u32) -> io::Result<XdpProgs> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.send_to(&request(ifindex), &SocketAddr::new(0, 0), 0)?;
    let mut buf = vec![0u8; 32 * 1024];
    let n = sock.recv(&mut &mut buf[..], 0)?;
    parse_reply(&buf[..n.min(buf.len())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_xdp_program_ids_and_errors() {
        // RTM_NEWLINK with IFLA_IFNAME and IFLA_XDP { ATTACHED, PROG_ID, DRV_PROG_ID }.
        let mut msg = vec![0u8; NLMSG_HDRLEN];
        msg[4..6].copy_from_slice(&RTM_NEWLINK.to_ne_bytes());
        msg.extend_from_slice(&[0; IFINFOMSG_LEN]);
        msg.extend_from_slice(&[8, 0, 3, 0, b'e', b't', b'h', 0]);
        let mut xdp = vec![5, 0, 2, 0, 1, 0, 0, 0];
        xdp.extend_from_slice(&[8, 0, 4, 0]);
        xdp.extend_from_slice(&77u32.to_ne_bytes());
        xdp.extend_from_slice(&[8, 0, 5, 0]);
        xdp.extend_from_slice(&77u32.to_ne_bytes());
        msg.extend_from_slice(&u16::try_from(xdp.len() + 4).unwrap().to_ne_bytes());
        msg.extend_from_slice(&(IFLA_XDP | 0x8000).to_ne_bytes());
        msg.extend_from_slice(&xdp);
        assert_eq!(parse_reply(&msg).unwrap(), XdpProgs { native: 77, generic: 0, offloaded: 0 });
        let mut err = vec![0u8; NLMSG_HDRLEN];
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&(-libc::ENODEV).to_ne_bytes());
        assert_eq!(parse_reply(&err).unwrap_err().raw_os_error(), Some(libc::ENODEV));
    }

    #[test]
    fn lo_runs_no_xdp() {
        assert_eq!(xdp_progs(1).unwrap().ids(), Vec::<u32>::new());
        assert!(xdp_progs(u32::MAX - 7).is_err(), "no such device");
    }
}
