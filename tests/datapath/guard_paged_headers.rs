//! The tc guard on live packets whose IP and UDP headers sit in paged data,
//! which `BPF_PROG_TEST_RUN` (it builds linear skbs) cannot make. A tap device
//! with `IFF_NAPI_FRAGS` puts a write's first iovec in the linear area and the
//! rest in page fragments, as drivers that build skbs with `napi_gro_frags` do;
//! with GRO off nothing pulls the headers before tc. The guard parses what is
//! linear and pulls only when that parse runs out (`natfix_tc_pull_headers`):
//! these packets must get the verdicts their linear twins get.

use natfix_testkit::root_setup;
use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use natfix::abi::Counter;
use natfix_testkit::{
    harness::{GuardHarness, flow_key, monotonic_ns},
    packet,
};

const TAP: &str = "nfxpaged0";
const HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct TunIfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca; // _IOW('T', 202, int)
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NAPI: libc::c_short = 0x0010;
const IFF_NAPI_FRAGS: libc::c_short = 0x0020;
const IFF_NO_PI: libc::c_short = 0x1000;

/// A tap whose writes become skbs with page fragments (closing it removes it).
fn napi_frags_tap() -> OwnedFd {
    let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").expect("open /dev/net/tun");
    let mut req = TunIfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI | IFF_NAPI | IFF_NAPI_FRAGS, _pad: [0; 22] };
    req.name[..TAP.len()].copy_from_slice(TAP.as_bytes());
    // SAFETY: TUNSETIFF reads a struct ifreq, which TunIfReq lays out.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &raw mut req) };
    assert_eq!(rc, 0, "TUNSETIFF (IFF_NAPI_FRAGS): {}", std::io::Error::last_os_error());
    OwnedFd::from(file)
}

fn sh(cmd: &[&str]) {
    let out = std::process::Command::new(cmd[0]).args(&cmd[1..]).output().expect("spawn");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Writes `frame` as one packet: its first `linear` bytes as the first
/// iovec (the linear area), the rest as a second (a page fragment).
fn inject(tap: &OwnedFd, frame: &[u8], linear: usize) {
    let (head, rest) = frame.split_at(linear);
    let iov = [
        libc::iovec { iov_base: head.as_ptr().cast_mut().cast(), iov_len: head.len() },
        libc::iovec { iov_base: rest.as_ptr().cast_mut().cast(), iov_len: rest.len() },
    ];
    let parts = if rest.is_empty() { 1 } else { 2 };
    // SAFETY: both iovecs point into `frame`, which outlives the call.
    let n = unsafe { libc::writev(tap.as_raw_fd(), iov.as_ptr(), parts) };
    assert_eq!(usize::try_from(n).ok(), Some(frame.len()), "writev: {}", std::io::Error::last_os_error());
}

/// Waits until the guard has counted `want` packets under `counter`.
fn counted(guard: &GuardHarness, counter: Counter, want: u64) -> u64 {
    let end = Instant::now() + Duration::from_secs(2);
    loop {
        let got = guard.counters().expect("counters")[counter].packets;
        if got >= want || Instant::now() > end {
            return got;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn tc_guard_judges_packets_whose_headers_are_paged_as_their_linear_twins() {
    root_setup();
    // A private namespace on a thread of its own: the tap vanishes with it.
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        let tap = napi_frags_tap();
        sh(&["ip", "link", "set", TAP, "up"]);
        // GRO would pull the headers into the linear area itself.
        sh(&["ethtool", "-K", TAP, "gro", "off"]);

        let plan = natfix_testkit::plans::plan(&["--guard", "20000-30000", "--guard-hook", "tc", "--flow-source", "own"]);
        let mut guard = GuardHarness::load(&plan).expect("guard loads");
        let solicited_port = 25000;
        guard
            .insert_flow(&flow_key(IpAddr::V4(HOST), solicited_port, Some((IpAddr::V4(PEER), 7000))), monotonic_ns())
            .expect("flow");
        let program: &mut SchedClassifier = guard.ingress_program_mut().unwrap().try_into().unwrap();
        let _link = program.attach(TAP, TcAttachType::Ingress).expect("tcx attach");

        let unsolicited = packet::udp4(PEER, 7000, HOST, 26000, b"probe that would steal the port");
        let reply = packet::udp4(PEER, 7000, HOST, solicited_port, b"reply of the container's flow");
        let tcp = {
            let mut l3 = packet::ipv4_header(PEER, HOST, 6, &[], 0, 20);
            l3.extend_from_slice(&[0x1f, 0x90, 0x61, 0xa8, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
            packet::eth(0x0800, &l3)
        };
        // Linear twins first, then only the Ethernet header linear, then the
        // split inside the IP header: every one judged as its linear twin.
        for (round, linear) in [usize::MAX, 14, 20].into_iter().enumerate() {
            let round = round as u64 + 1;
            let cut = |f: &[u8]| linear.min(f.len());
            inject(&tap, &unsolicited, cut(&unsolicited));
            inject(&tap, &reply, cut(&reply));
            inject(&tap, &tcp, cut(&tcp));
            let what = if linear == usize::MAX { "linear".to_owned() } else { format!("{linear} bytes linear") };
            assert_eq!(counted(&guard, Counter::GuardDropUnsolicited, round), round, "unsolicited, {what}: not dropped");
            assert_eq!(counted(&guard, Counter::GuardPassSolicited, round), round, "solicited reply, {what}: not passed as solicited");
            assert_eq!(counted(&guard, Counter::GuardOutOfScope, round), round, "TCP, {what}: not out of scope");
            assert_eq!(guard.counters().unwrap()[Counter::GuardMalformed].packets, 0, "{what}: judged malformed");
        }
    })
    .join()
    .expect("paged-headers test thread");
}
