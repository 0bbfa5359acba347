//! How natfix's costs grow with the work: curves, one table per dimension.
//!
//! - `own`: the guard's cost per packet (XDP, own flow table; pass and drop
//!   paths) as the table holds 10^2, 10^4, 10^5 and 10^6 flows, each packet
//!   a different flow (the per-CPU flow cache then misses once the flows
//!   outnumber its 1,024 slots, as on a busy host); the table's kernel memory.
//! - `conntrack`: the same with `--flow-source conntrack` (the kfunc path) as
//!   conntrack holds 10^3 to 10^6 entries.
//! - `lru`: the default table (65,536 entries) filled past its size: how many
//!   flows it keeps and how many live flows' replies it then drops.
//! - `userspace`: attach time and RSS with 1, 16 and 64 attachments on one
//!   host; conntrack-sync CPU at 10^4 conntrack events/s.
//!
//! `test_run` rows are paired with an empty XDP program run on the same frames
//! in the same loop (`repeat` 1 per frame: every run a different flow).
//! `NATFIX_SCALING_PART=own,conntrack,lru,userspace` picks parts (all when
//! unset), `NATFIX_BENCH_RUNS` runs per row; `NATFIX_SCALING_MAX` caps the
//! largest table (development).

#![expect(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "bench arithmetic on timings, counts and rates far below 2^52; libc socket structs take u16/u32 constants"
)]

mod common;
#[path = "flood/rig.rs"]
#[allow(dead_code, reason = "the flood bench's rig; this bench uses its sweep")]
mod rig;

use std::{
    net::{IpAddr, Ipv4Addr},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use natfix::{abi::Counter, loader::object::load_program};
use natfix_ebpf::rig as rig_programs;
use natfix_testkit::{
    harness::{GuardHarness, XDP_DROP, XDP_PASS, flow_key, monotonic_ns, pin_to_cpu},
    packet,
};

const HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn plan(words: &[&str]) -> natfix::loader::GuardPlan {
    let mut argv = vec!["--guard", "20000-30000"];
    argv.extend_from_slice(words);
    natfix_testkit::plans::plan(&argv)
}

/// Flow `i` of a table: local port in the guarded range, a remote of its own.
fn flow(i: u32) -> (u16, Ipv4Addr, u16) {
    let port = u16::try_from(20000 + i % 10001).expect("in range");
    (port, Ipv4Addr::from(0x0a00_0000 + i), 7000)
}

/// The reply of flow `i` as it arrives.
fn reply(i: u32) -> Vec<u8> {
    let (lport, remote, rport) = flow(i);
    packet::udp4(remote, rport, HOST, lport, &[0u8; 18])
}

/// An unsolicited packet to the port of flow `i`, from a peer no flow has.
fn unsolicited(i: u32) -> Vec<u8> {
    let (lport, _, _) = flow(i);
    packet::udp4(Ipv4Addr::from(0xac10_0000 + i), 9, HOST, lport, &[0u8; 18])
}

/// An empty XDP program: the baseline of every row.
struct Empty(aya::Ebpf);

impl Empty {
    fn load() -> Self {
        let mut ebpf = aya::Ebpf::load(rig_programs::OBJECT).expect("rig object");
        load_program::<Xdp>(&mut ebpf, rig_programs::EMPTY_XDP).expect("empty XDP");
        Self(ebpf)
    }

    fn run(&self, frame: &[u8]) -> f64 {
        let p: &Xdp = self.0.program(rig_programs::EMPTY_XDP).expect("loaded").try_into().expect("xdp");
        p.test_run(TestRunOptions { data_in: Some(frame), repeat: 1, ..TestRunOptions::default() }).expect("test_run").duration.as_nanos() as f64
    }
}

/// `runs` runs over `frames` (each once per run, `repeat` 1): the subject's
/// and the empty program's mean ns per packet, run by run, and the verdicts
/// the subject gave in the last run.
fn paired_means(guard: &GuardHarness, empty: &Empty, frames: &[Vec<u8>], runs: usize) -> (Vec<f64>, Vec<f64>, Vec<u32>) {
    let (mut subject, mut base, mut verdicts) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (mut s, mut b) = (0.0, 0.0);
        verdicts.clear();
        for f in frames {
            b += empty.run(f);
            let (v, ns) = guard.run_ingress_repeat(f, 1).expect("test_run");
            s += ns;
            verdicts.push(v);
        }
        subject.push(s / frames.len() as f64);
        base.push(b / frames.len() as f64);
    }
    (subject, base, verdicts)
}

/// Up to 2,048 frames: flows spread over the table (a stride through it).
fn sample(n: u32, make: impl Fn(u32) -> Vec<u8>) -> Vec<Vec<u8>> {
    let k = n.min(2048);
    (0..k).map(|j| make((u64::from(j) * u64::from(n) / u64::from(k)) as u32)).collect()
}

fn own(runs: usize, max: u32) {
    const GROUP: &str = "scaling: guard per packet vs own flow table size";
    pin_to_cpu(0).expect("pin");
    let empty = Empty::load();
    for n in [100u32, 10_000, 100_000, 1_000_000].into_iter().filter(|n| *n <= max) {
        // The default table unless more is needed (as an operator sets --flow-table-size).
        let size = n.next_power_of_two().max(natfix::config::DEFAULT_FLOW_TABLE_SIZE);
        let mut guard = GuardHarness::load(&plan(&["--flow-source", "own", "--flow-table-size", &size.to_string()])).expect("guard");
        let t = Instant::now();
        let now = monotonic_ns();
        for i in 0..n {
            let (lport, remote, rport) = flow(i);
            guard.insert_flow(&flow_key(HOST.into(), lport, Some((IpAddr::V4(remote), rport))), now).expect("insert");
        }
        let fill_secs = t.elapsed().as_secs_f64();
        let memlock = flow_table_memlock(size);
        for (path, frames, want) in [("pass", sample(n, reply), XDP_PASS), ("drop", sample(n, unsolicited), XDP_DROP)] {
            let (s, b, verdicts) = paired_means(&guard, &empty, &frames, runs);
            assert!(verdicts.iter().all(|v| *v == want), "own table of {n}: {path} frames got verdicts other than {want}");
            let name = format!("guard xdp own, table holding {n} flows ({size} entries): {path}, each packet another of {} flows", frames.len());
            let detail = serde_json::json!({ "detail": format!(
                "table memory (memlock) {:.1} MB, {:.0} B per entry; {n} flows inserted from userspace in {fill_secs:.2} s",
                memlock as f64 / 1e6, memlock as f64 / f64::from(size)) });
            common::report_paired_with(GROUP, &name, "ns/packet", &s, "empty XDP, same frames", &b, false, &detail);
        }
    }
}

/// The host-wide conntrack limit raised for the run, restored on drop
/// (both from the host's namespace: only it may write the limit).
struct ConntrackMax {
    before: Option<String>,
}

impl ConntrackMax {
    const PATH: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

    fn at_least(n: u64) -> Result<Self> {
        let before = std::fs::read_to_string(Self::PATH)?.trim().to_owned();
        if before.parse::<u64>().unwrap_or(0) >= n {
            return Ok(Self { before: None });
        }
        std::fs::write(Self::PATH, n.to_string()).with_context(|| format!("raising {} to {n}", Self::PATH))?;
        eprintln!("scaling: {} raised from {before} to {n} for the run", Self::PATH);
        Ok(Self { before: Some(before) })
    }
}

impl Drop for ConntrackMax {
    fn drop(&mut self) {
        if let Some(before) = &self.before
            && let Err(e) = std::fs::write(Self::PATH, before)
        {
            eprintln!("scaling: restoring {} to {before}: {e}", Self::PATH);
        }
    }
}

/// The largest conntrack table the `conntrack` part fills.
fn conntrack_top(max: u32) -> u32 {
    [1_000u32, 10_000, 100_000, 1_000_000].into_iter().filter(|n| *n <= max).max().unwrap_or(1000)
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// In the calling thread's (fresh) namespace: a veth with the host's
/// address and no ARP (datagrams leave without a neighbour), conntrack on
/// (an nftables rule needs it), UDP entries kept an hour.
fn conntrack_host() -> Result<std::net::UdpSocket> {
    sh(&["ip", "link", "add", "ct0", "type", "veth", "peer", "name", "ct1"])?;
    sh(&["ip", "addr", "add", "198.51.100.10/24", "dev", "ct0"])?;
    sh(&["ip", "link", "set", "ct0", "arp", "off", "up"])?;
    sh(&["ip", "link", "set", "ct1", "up"])?;
    sh(&["nft", "add table ip b; add chain ip b c { type filter hook output priority 0; }; add rule ip b c ct state new accept"])?;
    std::fs::write("/proc/sys/net/netfilter/nf_conntrack_udp_timeout", "3600")?;
    // A raw socket: one socket sends from every source port.
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        bail!("raw socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    Ok(unsafe { <std::net::UdpSocket as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Sends flow `i`'s outgoing datagram (host:lport -> remote:rport) on the raw socket: conntrack confirms an entry for it.
fn send_flow(raw: &std::net::UdpSocket, i: u32) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let (lport, _, _) = flow(i);
    let rport = u16::try_from(1024 + i % 60000).expect("port");
    let dst = Ipv4Addr::from(u32::from(PEER) + i / 60000);
    let frame = packet::udp4(HOST, lport, dst, rport, &[0u8; 4]);
    let ip = &frame[14..];
    let addr = libc::sockaddr_in { sin_family: libc::AF_INET as u16, sin_port: 0, sin_addr: libc::in_addr { s_addr: u32::from(dst).to_be() }, sin_zero: [0; 8] };
    // SAFETY: buffer and address outlive the call.
    let n = unsafe { libc::sendto(raw.as_raw_fd(), ip.as_ptr().cast(), ip.len(), 0, (&raw const addr).cast(), size_of::<libc::sockaddr_in>() as u32) };
    if n < 0 {
        bail!("sendto: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The reply of conntrack flow `i` (remote:rport -> host:lport).
fn ct_reply(i: u32) -> Vec<u8> {
    let (lport, _, _) = flow(i);
    let rport = u16::try_from(1024 + i % 60000).expect("port");
    packet::udp4(Ipv4Addr::from(u32::from(PEER) + i / 60000), rport, HOST, lport, &[0u8; 18])
}

fn conntrack_count() -> u64 {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

fn conntrack(runs: usize, max: u32) -> Result<()> {
    const GROUP: &str = "scaling: guard per packet vs conntrack table size (kfunc path)";
    pin_to_cpu(0)?;
    let raw = conntrack_host()?;
    let buckets = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_buckets").unwrap_or_default().trim().to_owned();
    let empty = Empty::load();
    let guard = GuardHarness::load(&plan(&["--flow-source", "conntrack"]))?;
    let mut sent = 0u32;
    for n in [1_000u32, 10_000, 100_000, 1_000_000].into_iter().filter(|n| *n <= max) {
        let t = Instant::now();
        while sent < n {
            send_flow(&raw, sent)?;
            sent += 1;
        }
        let fill_secs = t.elapsed().as_secs_f64();
        let entries = conntrack_count();
        if entries < u64::from(n) {
            bail!("conntrack holds {entries} entries after {n} flows (nf_conntrack_max, memory?)");
        }
        for (path, frames, want) in [("pass", sample(n, ct_reply), XDP_PASS), ("drop", sample(n, unsolicited), XDP_DROP)] {
            let (s, b, verdicts) = paired_means(&guard, &empty, &frames, runs);
            let ok = verdicts.iter().filter(|v| **v == want).count();
            if ok != verdicts.len() {
                bail!("conntrack of {n}: {ok} of {} {path} frames got verdict {want}", verdicts.len());
            }
            let name = format!("guard xdp conntrack, {entries} entries: {path}, each packet another of {} flows", frames.len());
            let detail = serde_json::json!({ "detail": format!("nf_conntrack_buckets {buckets} (host-wide); entries made by {n} outgoing datagrams in {fill_secs:.1} s") });
            common::report_paired_with(GROUP, &name, "ns/packet", &s, "empty XDP, same frames", &b, false, &detail);
        }
    }
    Ok(())
}

/// The default table filled past its size: kept flows, and replies of the
/// flows it lost, which the guard then drops as unsolicited.
fn lru() {
    const GROUP: &str = "scaling: own flow table past its default size (LRU eviction)";
    pin_to_cpu(0).expect("pin");
    let size = natfix::config::DEFAULT_FLOW_TABLE_SIZE;
    for k in [size / 2, size, size + size / 4, size * 2] {
        let mut guard = GuardHarness::load(&plan(&["--flow-source", "own"])).expect("guard");
        let now = monotonic_ns();
        for i in 0..k {
            let (lport, remote, rport) = flow(i);
            guard.insert_flow(&flow_key(HOST.into(), lport, Some((IpAddr::V4(remote), rport))), now).expect("insert");
        }
        let before = guard.counters().expect("counters")[Counter::GuardDropUnsolicited].packets;
        let mut kept = 0u32;
        for i in 0..k {
            let (lport, remote, rport) = flow(i);
            if guard.flow(&flow_key(HOST.into(), lport, Some((IpAddr::V4(remote), rport)))).expect("lookup").is_some() {
                kept += 1;
            }
        }
        // Every flow's reply, as the live flows would send them.
        for i in 0..k {
            guard.run_ingress(&reply(i)).expect("test_run");
        }
        let dropped = guard.counters().expect("counters")[Counter::GuardDropUnsolicited].packets - before;
        let name = format!("{k} live flows inserted into the default table ({size} entries): flows kept");
        let detail = serde_json::json!({ "detail": format!(
            "{} flows evicted; their replies dropped as unsolicited: {dropped} of {k} (every flow's reply sent once)", k - kept) });
        common::report_paired_with(GROUP, &name, "flows", &[f64::from(kept)], "flows inserted", &[f64::from(k)], true, &detail);
    }
}

/// The memory (memlock) of this process's LRU hash map with `max_entries`
/// entries: the own flow table (the guard harness keeps its maps to itself).
fn flow_table_memlock(max_entries: u32) -> u64 {
    let field = |text: &str, key: &str| text.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_owned());
    std::fs::read_dir("/proc/self/fdinfo")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|t| field(t, "map_type:").as_deref() == Some("9") && field(t, "max_entries:") == Some(max_entries.to_string()))
        .find_map(|t| field(&t, "memlock:")?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    natfix_testkit::root_setup();
    rig::sweep_leftovers();
    // The release binary `cargo xtask bench` builds, unless NATFIX_BIN says otherwise.
    let release = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/natfix");
    if std::env::var_os("NATFIX_BIN").is_none() && release.exists() {
        // SAFETY: no other thread runs yet.
        unsafe { std::env::set_var("NATFIX_BIN", release) };
    }
    let runs = env_u32("NATFIX_BENCH_RUNS", 5) as usize;
    let max = env_u32("NATFIX_SCALING_MAX", 1_000_000);
    let parts = std::env::var("NATFIX_SCALING_PART").unwrap_or_default();
    let wants = |part: &str| parts.is_empty() || parts.split(',').any(|p| p.trim() == part);
    if wants("own") {
        natfix_testkit::in_fresh_netns(move || own(runs, max));
    }
    if wants("conntrack") {
        let limit = ConntrackMax::at_least(u64::from(conntrack_top(max)) + 100_000).unwrap_or_else(|e| panic!("scaling: {e:#}"));
        if let Err(e) = natfix_testkit::in_fresh_netns(move || conntrack(runs, max)) {
            panic!("scaling, conntrack part: {e:#}");
        }
        drop(limit);
    }
    if wants("lru") {
        natfix_testkit::in_fresh_netns(lru);
    }
    if wants("userspace") {
        userspace::run();
    }
}

#[path = "scaling/userspace.rs"]
mod userspace;
