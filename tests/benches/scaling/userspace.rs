//! natfix's userspace as the host grows: attach time, `status` and a
//! foreground attach's RSS with 1, 16 and 64 attachments (each on its own
//! veth, pinned), and the conntrack sync's CPU at 10^4 conntrack events/s.
//! The release binary (`NATFIX_BIN` overrides).

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use natfix::lab::scratch::ScratchNs;
use natfix_testkit::{Daemon, natfix_bin};

use crate::common;

/// Interfaces (veth pairs) the attachments go on; the last is the one measured.
const IFACES: usize = 64;

/// This run's namespaces, their veths, and every attachment on them,
/// detached (then the namespaces deleted) when dropped.
struct Host {
    a: ScratchNs,
    _b: ScratchNs,
    pinned: Vec<String>,
}

impl Host {
    fn new() -> Result<Self> {
        let a = ScratchNs::create(&format!("nfb{}-att-a", std::process::id()))?;
        let b = ScratchNs::create(&format!("nfb{}-att-b", std::process::id()))?;
        for i in 0..IFACES {
            let (va, vb) = (format!("va{i}"), format!("vb{i}"));
            a.exec(&["ip", "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns", &b.name])?;
            a.exec(&["ip", "link", "set", &va, "up"])?;
            b.exec(&["ip", "link", "set", &vb, "up"])?;
        }
        a.exec(&["ip", "addr", "add", "198.51.100.10/24", "dev", "va0"])?;
        b.exec(&["ip", "addr", "add", "198.51.100.20/24", "dev", "vb0"])?;
        Ok(Self { a, _b: b, pinned: Vec::new() })
    }

    fn attach_args<'a>(&'a self, iface: &'a str) -> Vec<&'a str> {
        vec!["--iface", iface, "--netns", &self.a.name, "--guard", "20000-30000", "--flow-source", "own"]
    }

    /// `natfix attach --pin` on `iface`: its wall time in ms.
    fn pin(&mut self, iface: &str) -> Result<f64> {
        let mut args = vec!["attach"];
        args.extend(self.attach_args(iface));
        args.push("--pin");
        let ms = timed(&args)?;
        self.pinned.push(iface.to_owned());
        Ok(ms)
    }

    fn detach(&mut self, iface: &str) -> Result<f64> {
        let ms = timed(&["detach", "--iface", iface, "--netns", &self.a.name])?;
        self.pinned.retain(|i| i != iface);
        Ok(ms)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for iface in std::mem::take(&mut self.pinned) {
            if let Err(e) = timed(&["detach", "--iface", &iface, "--netns", &self.a.name]) {
                eprintln!("scaling: {e:#}");
            }
        }
    }
}

/// Runs natfix with `args`: wall ms, or its stderr.
fn timed(args: &[&str]) -> Result<f64> {
    let t = Instant::now();
    let out = Command::new(natfix_bin()).args(args).env("NATFIX_LOG", "warn").output()?;
    if !out.status.success() {
        bail!("natfix {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

/// Max RSS (MB) and wall ms of `natfix <args>`, by /usr/bin/time.
fn rss_of(args: &[&str]) -> Result<(f64, f64)> {
    let t = Instant::now();
    let out = Command::new("/usr/bin/time").args(["-f", "%M"]).arg(natfix_bin()).args(args).env("NATFIX_LOG", "warn").output().context("/usr/bin/time")?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let kb: f64 = String::from_utf8_lossy(&out.stderr).lines().last().and_then(|l| l.trim().parse().ok()).context("max RSS from /usr/bin/time")?;
    Ok((kb / 1024.0, ms))
}

/// `VmRSS` (MB) of a process.
fn vm_rss(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok()).unwrap_or(0.0) / 1024.0
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = after_comm.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    // Fields 14 and 15 of stat; after the comm, state is the first (not numeric).
    let ticks = f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0);
    // SAFETY: sysconf is always safe.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Per level (attachments on the host): attach and detach latency of one
/// more, `status` RSS and time, a foreground attach's idle RSS.
fn attachments(host: &mut Host, runs: usize) -> Result<()> {
    const GROUP: &str = "scaling: userspace vs attachments on the host";
    let version = |_| timed(&["--version"]);
    let base: Vec<f64> = (0..runs).map(version).collect::<Result<_>>()?;
    let (base_rss, _) = rss_of(&["--version"])?;
    let measured = format!("va{}", IFACES - 1);
    let mut present = 0;
    for level in [1usize, 16, 64] {
        while present < level - 1 {
            host.pin(&format!("va{present}"))?;
            present += 1;
        }
        let (mut att, mut det) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            att.push(host.pin(&measured)?);
            det.push(host.detach(&measured)?);
        }
        host.pin(&measured)?;
        let (status_rss, status_ms) = rss_of(&["status", "--json"])?;
        host.detach(&measured)?;
        let daemon = Daemon::start(&host.attach_args(&measured))?;
        std::thread::sleep(Duration::from_secs(2));
        let idle_rss = vm_rss(daemon.child.id());
        daemon.stop()?;
        let what = |s: &str| format!("{s} with {level} attachment{} on the host", if level == 1 { "" } else { "s" });
        common::report_paired(GROUP, &what("`natfix attach --pin` (guard, own flows)"), "ms", &att, "`natfix --version`", &base, false);
        common::report_paired(GROUP, &what("`natfix detach`"), "ms", &det, "`natfix --version`", &base, false);
        common::report_paired(GROUP, &what("`natfix status --json`: wall time"), "ms", &[status_ms], "`natfix --version`", &base[..1], false);
        common::report_paired(GROUP, &what("`natfix status --json`: max RSS"), "MB", &[status_rss], "`natfix --version` max RSS", &[base_rss], false);
        common::report_paired(GROUP, &what("idle RSS of a foreground `natfix attach` (guard, own flows, conntrack sync)"), "MB", &[idle_rss], "`natfix --version` max RSS", &[base_rss], false);
    }
    Ok(())
}

/// New conntrack entries in `ns` at `rate` per second for `secs`: UDP from
/// a new source port each, out of va0 (a raw socket sends from any port).
fn new_flows(ns: &ScratchNs, rate: u32, secs: f64, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<Result<u64>>> {
    let netns = ns.netns()?;
    Ok(std::thread::spawn(move || {
        netns.run(move || {
            // SAFETY: plain socket(2).
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            if fd < 0 {
                bail!("raw socket: {}", std::io::Error::last_os_error());
            }
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed().as_secs_f64() < secs && !stop.load(Ordering::Relaxed) {
                let due = (start.elapsed().as_secs_f64() * f64::from(rate)) as u64;
                while sent < due {
                    let sport = u16::try_from(1024 + sent % 60000)?;
                    let dport = u16::try_from(40000 + sent / 60000)?;
                    let frame = natfix_testkit::packet::udp4([198, 51, 100, 10].into(), sport, [198, 51, 100, 20].into(), dport, &[0u8; 4]);
                    let ip = &frame[14..];
                    let addr = libc::sockaddr_in { sin_family: libc::AF_INET as u16, sin_port: 0, sin_addr: libc::in_addr { s_addr: u32::from_be_bytes([198, 51, 100, 20]).to_be() }, sin_zero: [0; 8] };
                    // SAFETY: buffer and address outlive the call.
                    let n = unsafe { libc::sendto(fd, ip.as_ptr().cast(), ip.len(), 0, (&raw const addr).cast(), size_of::<libc::sockaddr_in>() as u32) };
                    if n < 0 {
                        bail!("sendto: {}", std::io::Error::last_os_error());
                    }
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            // SAFETY: our fd.
            unsafe { libc::close(fd) };
            Ok(sent)
        })
    }))
}

/// The conntrack sync of a foreground attach (own flow table) at 10^4 new
/// conntrack entries per second, against `conntrack -E` reading the same
/// events, both over the same window.
fn conntrack_sync(host: &Host, runs: usize) -> Result<()> {
    const GROUP: &str = "scaling: conntrack sync";
    const RATE: u32 = 10_000;
    const SECS: f64 = 10.0;
    // conntrack on in the namespace, as on a Docker node.
    host.a.nft(include_str!("../data/docker-node.nft"))?;
    host.a.exec(&["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_udp_timeout=3600"])?;
    let (mut natfix_pct, mut ct_pct, mut detail) = (Vec::new(), Vec::new(), String::new());
    for _ in 0..runs {
        host.a.exec(&["conntrack", "-F"])?;
        let daemon = Daemon::start(&host.attach_args("va0"))?;
        let mut listener = Command::new("ip")
            .args(["netns", "exec", &host.a.name, "conntrack", "-E", "-e", "NEW", "-p", "udp"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let lines = Arc::new(AtomicU64::new(0));
        let counter = {
            let (lines, out) = (lines.clone(), listener.stdout.take().context("conntrack -E stdout")?);
            std::thread::spawn(move || BufReader::new(out).lines().map_while(Result::ok).for_each(|_| {
                lines.fetch_add(1, Ordering::Relaxed);
            }))
        };
        std::thread::sleep(Duration::from_millis(500));
        let (n0, c0, t0) = (cpu_secs(daemon.child.id()), cpu_secs(listener.id()), Instant::now());
        let sent = new_flows(&host.a, RATE, SECS, Arc::new(AtomicBool::new(false)))?.join().map_err(|_| anyhow::anyhow!("flow sender panicked"))??;
        let wall = t0.elapsed().as_secs_f64();
        let (n1, c1) = (cpu_secs(daemon.child.id()), cpu_secs(listener.id()));
        std::thread::sleep(Duration::from_millis(500));
        let _ = listener.kill();
        let _ = listener.wait();
        let _ = counter.join();
        daemon.stop()?;
        natfix_pct.push((n1 - n0) / wall * 100.0);
        ct_pct.push((c1 - c0) / wall * 100.0);
        detail = format!(
            "{sent} new UDP flows in {wall:.1} s ({:.0}/s), conntrack -E saw {} NEW events; CPU from /proc/<pid>/stat (10 ms ticks)",
            sent as f64 / wall,
            lines.load(Ordering::Relaxed)
        );
    }
    let name = format!("CPU of a foreground `natfix attach` (own flow table, conntrack sync) at {RATE} new conntrack entries/s");
    common::report_paired_with(GROUP, &name, "% of a CPU", &natfix_pct, "`conntrack -E` reading the same events", &ct_pct, false, &serde_json::json!({ "detail": detail }));
    Ok(())
}

pub fn run() {
    let runs = crate::env_u32("NATFIX_BENCH_RUNS", 5).min(5) as usize;
    assert!(natfix_bin().exists(), "{} missing: cargo build --release -p natfix (cargo xtask bench does)", natfix_bin().display());
    let mut host = Host::new().unwrap_or_else(|e| panic!("scaling: the attachments' namespaces: {e:#}"));
    if let Err(e) = attachments(&mut host, runs) {
        panic!("scaling, attachments: {e:#}");
    }
    drop(host);
    let host = Host::new().unwrap_or_else(|e| panic!("scaling: the attachments' namespaces: {e:#}"));
    if let Err(e) = conntrack_sync(&host, runs.min(3)) {
        panic!("scaling, conntrack sync: {e:#}");
    }
}
