//! The few bpf(2) queries aya 0.14 does not expose: a link's facts by id or
//! fd (its program and the interface it is attached to, 0 once detached)
//! and a program's name by id. Used to check records against the kernel.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use aya_obj::generated::{bpf_cmd, bpf_link_info, bpf_link_type, bpf_prog_info};

/// `union bpf_attr` for the `*_GET_FD_BY_ID` commands.
#[repr(C)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn bpf<T>(cmd: bpf_cmd, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, initialised attribute struct of the size
    // passed; the kernel reads at most that many bytes and writes only
    // through the pointers it holds (to buffers the caller owns).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_int, std::ptr::from_mut(attr).cast::<u8>(), size_of::<T>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn fd_by_id(cmd: bpf_cmd, id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdByIdAttr { id, next_id: 0, open_flags: 0 };
    let fd = bpf(cmd, &mut attr)?;
    // SAFETY: the kernel returned a fresh fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?) })
}

fn info_by_fd<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
    let mut attr = InfoByFdAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        info_len: u32::try_from(size_of::<T>()).unwrap_or(u32::MAX),
        info: std::ptr::from_mut(info) as u64,
    };
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

/// What the kernel says of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkFacts {
    pub id: u32,
    pub prog_id: u32,
    /// The interface an XDP or tcx link is attached to; 0 once its device is gone.
    pub ifindex: u32,
}

/// The facts of the link held by `fd`.
pub fn link_facts(fd: BorrowedFd<'_>) -> io::Result<LinkFacts> {
    // SAFETY: bpf_link_info is plain old data; all zeroes is a valid value.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    info_by_fd(fd, &mut info)?;
    let is_netdev_link = info.type_ == bpf_link_type::BPF_LINK_TYPE_XDP as u32 || info.type_ == bpf_link_type::BPF_LINK_TYPE_TCX as u32;
    // SAFETY: for XDP and tcx links the kernel filled the union's xdp/tcx
    // member, whose first field is the ifindex in both.
    let ifindex = if is_netdev_link { unsafe { info.__bindgen_anon_1.xdp.ifindex } } else { 0 };
    Ok(LinkFacts { id: info.id, prog_id: info.prog_id, ifindex })
}

/// The facts of link `id`; `NotFound` once the link is gone.
pub fn link_facts_by_id(id: u32) -> io::Result<LinkFacts> {
    let fd = fd_by_id(bpf_cmd::BPF_LINK_GET_FD_BY_ID, id)?;
    link_facts(std::os::fd::AsFd::as_fd(&fd))
}

/// The name the kernel keeps for program `id` (up to 15 bytes of it).
pub fn prog_name(id: u32) -> io::Result<String> {
    let fd = fd_by_id(bpf_cmd::BPF_PROG_GET_FD_BY_ID, id)?;
    // SAFETY: bpf_prog_info is plain old data; all zeroes is a valid value.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    info_by_fd(std::os::fd::AsFd::as_fd(&fd), &mut info)?;
    // c_char is i8 or u8 by target: take each one's byte as it is.
    let bytes: Vec<u8> = info.name.iter().take_while(|c| **c != 0).map(|c| c.to_ne_bytes()[0]).collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
