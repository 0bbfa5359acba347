//! The flood, measured at the receiver: how many unsolicited packets each
//! filter disposes of per second of the receiving CPU, and that CPU's time
//! per packet.
//!
//! The receive path runs on a CPU of its own: the receiving veth's NAPI is
//! threaded (`/sys/class/net/fr0/threaded`, once the veth has NAPI: an XDP
//! program, or GRO on), its `napi/fr0-N` kthread pinned to CPU 1 at nice
//! -20; the generator runs on CPU 0. The kthread's CPU time
//! (`/proc/<pid>/schedstat`) over the frames the filter counted is the
//! receiver's time per packet: the XDP program, the skb, GRO, the IP stack
//! and netfilter, whatever the configuration runs (this kernel has no
//! `IRQ_TIME_ACCOUNTING` split, so softirq work done in its context counts
//! too). Capacity is its inverse: packets per second of receiver CPU.
//!
//! A row is receiver-limited when the kthread was runnable (on the CPU or
//! waiting for it) nearly all the window and the generator out-ran it: the
//! veth ring overflowed (`tx_queue_0_xdp_xmit_errors` of the sender). Rows
//! that were not say so; their capacity is then taken from the time per
//! packet, which a receiver that sleeps between frames makes larger (per-poll
//! overhead spreads over fewer frames): conservative.
//!
//! Configurations: XDP drop-all (the least an XDP receiver can do), natfix's
//! XDP and tc guards (own flow table, the flooded port holding a flow of
//! another peer, so every packet is looked up), the seed's iptables INPUT
//! rule, an nftables prerouting `ct state new drop`, Debian's xdp-filter
//! (stateless, by destination port), and no filter (UDP, no socket). Without
//! an XDP program the veth runs with GRO on (as a NIC does), which gives it
//! NAPI. Then the conntrack-pressure rows: 100,000 distinct flows on a Docker
//! node's netfilter (conntrack on), through no filter (what fills the
//! table), the iptables rule (conntrack allocates an entry per packet and
//! frees it when INPUT drops it, unconfirmed) and natfix's XDP guard
//! (nothing allocated); conntrack's table size after each.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};
use natfix::abi::Counter;
use natfix_ebpf::rig as rig_programs;
use natfix_testkit::harness::{GuardHarness, flow_key, monotonic_ns};

use crate::{
    SMALL_PAYLOAD, bench_count, guard_plan, iptables_counter, nft_counter, snmp_udp_noports,
    rig::{GenProgram, Generator, Rig, in_ns, ok},
};

/// What the receiver runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Config {
    DropAll,
    NatfixXdp,
    /// The flooded port never had a flow: the guard's port map decides, no table lookup.
    NatfixXdpPortWithoutFlows,
    NatfixTc,
    Iptables,
    Nft,
    XdpFilter,
    NoFilter,
}

impl Config {
    pub fn name(self) -> &'static str {
        match self {
            Self::DropAll => "XDP drop-all, no work (the least an XDP receiver does)",
            Self::NatfixXdp => "natfix XDP guard",
            Self::NatfixXdpPortWithoutFlows => "natfix XDP guard, flooded port without flows (the port map decides, no table lookup)",
            Self::NatfixTc => "natfix tc guard",
            Self::Iptables => "seed's iptables INPUT rule",
            Self::Nft => "nftables prerouting ct state new drop",
            Self::XdpFilter => "xdp-filter (xdp-tools, stateless: drops by destination port)",
            Self::NoFilter => "no filter (packets reach UDP, no socket)",
        }
    }
}

/// The receiver's netfilter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    Bare,
    /// `data/docker-node.nft`: conntrack and NAT hooks on every packet.
    DockerNode,
}

/// One measurement window.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Frames the configuration counted (dropped, or `NoPorts`).
    pub handled: f64,
    pub sent: f64,
    /// Frames the full veth ring refused.
    pub ring_drops: f64,
    pub wall_secs: f64,
    /// The NAPI kthread: on a CPU, and runnable but waiting.
    pub rx_cpu_secs: f64,
    pub rx_wait_secs: f64,
    pub gen_cpu_secs: f64,
    /// Busy share of CPU 1 (the receiver's) and CPU 0 (the generator's), /proc/stat.
    pub cpu1_busy: f64,
    pub cpu0_busy: f64,
    /// conntrack entries in the receiver's namespace after the window.
    pub ct_entries: f64,
}

impl Sample {
    pub fn ns_per_packet(&self) -> f64 {
        self.rx_cpu_secs * 1e9 / self.handled
    }

    /// Packets disposed of per second of receiver CPU.
    pub fn capacity(&self) -> f64 {
        self.handled / self.rx_cpu_secs
    }

    pub fn runnable(&self) -> f64 {
        (self.rx_cpu_secs + self.rx_wait_secs) / self.wall_secs
    }

    pub fn ring_drop_share(&self) -> f64 {
        self.ring_drops / self.sent
    }

    /// The receiver, not the generator, set the rate.
    pub fn receiver_limited(&self) -> bool {
        self.runnable() >= 0.9 && self.ring_drop_share() >= 0.01
    }
}

/// Pids of the `napi/<dev>-N` kthreads.
fn napi_kthreads(dev: &str) -> BTreeSet<i32> {
    let prefix = format!("napi/{dev}-");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            std::fs::read_to_string(e.path().join("comm")).ok().filter(|c| c.starts_with(&prefix)).map(|_| pid)
        })
        .collect()
}

/// Turns fr0's NAPI threaded and puts its kthread on CPU 1 at nice -20;
/// returns its pid. fr0 must have NAPI already (XDP program or GRO).
pub fn threaded_napi(rig: &Rig) -> Result<i32> {
    let before = napi_kthreads("fr0");
    rig.rx_ns.exec(&["sh", "-c", "echo 1 > /sys/class/net/fr0/threaded"]).context(
        "turning fr0's NAPI threaded (/sys/class/net/fr0/threaded: Linux >= 5.12, and the veth needs NAPI first: an XDP program or GRO)",
    )?;
    let new: Vec<i32> = napi_kthreads("fr0").difference(&before).copied().collect();
    let [pid] = new[..] else { bail!("expected one new napi/fr0-* kthread after turning NAPI threaded, found {new:?}") };
    let mut cpu1 = nix::sched::CpuSet::new();
    cpu1.set(1)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(pid), &cpu1).context("pinning the NAPI kthread to CPU 1")?;
    // SAFETY: plain syscall on a pid.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, pid.try_into()?, -20) } != 0 {
        bail!("renice of the NAPI kthread: {}", std::io::Error::last_os_error());
    }
    Ok(pid)
}

/// (ns on a CPU, ns runnable but waiting) of a thread.
pub fn schedstat(pid: i32) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).with_context(|| format!("the NAPI kthread {pid} is gone"))?;
    let f: Vec<u64> = text.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    Ok((f[0], f[1]))
}

/// (busy, total) jiffies of each CPU in /proc/stat.
fn cpu_times() -> Vec<(u64, u64)> {
    std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let f: Vec<u64> = l.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
            let total: u64 = f.iter().take(8).sum();
            (total - f[3] - f[4], total)
        })
        .collect()
}

/// Frames the sender's veth could not put on the receiver's full ring.
fn ring_drops(rig: &Rig) -> Result<u64> {
    let out = rig.gen_ns.exec(&["ethtool", "-S", "fg0"])?;
    Ok(out.lines().filter(|l| l.contains("xdp_xmit_errors")).filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok()).sum())
}

/// Entries in the receiver's conntrack table.
fn ct_entries(rig: &Rig) -> f64 {
    rig.rx_ns.exec(&["cat", "/proc/sys/net/netfilter/nf_conntrack_count"]).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0.0)
}

/// Debian's xdp-filter on fr0, run by a shell in the receiver's namespace
/// and a mount namespace of its own with a fresh bpffs on /sys/fs/bpf:
/// xdp-filter pins its maps under /sys/fs/bpf/xdp-filter, keyed by
/// interface name and shared by every interface (an operator's xdp-filter,
/// or a concurrent run's fr0, would share them). The pins die with the
/// shell; its program goes with fr0's namespace.
pub struct XdpFilter {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl XdpFilter {
    pub fn available() -> Result<()> {
        Command::new("xdp-filter").arg("help").output().map(drop).context("xdp-filter is not installed (Debian: apt install xdp-tools)")
    }

    fn start(rig: &Rig) -> Result<Self> {
        let net = format!("--net={}", rig.rx_ns.path().display());
        let mut child = Command::new("nsenter")
            .args([net.as_str(), "unshare", "--mount", "--propagation", "private", "sh"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("nsenter/unshare for xdp-filter")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut f = Self { child, stdin, stdout };
        f.cmd("mount -t bpf bpf /sys/fs/bpf")?;
        f.cmd("xdp-filter load fr0 --mode native --features udp --policy allow")?;
        // One entry per port; the lookup costs the same however many there are.
        f.cmd("xdp-filter port 25000 --mode dst --proto udp")?;
        f.cmd("xdp-filter port 25001 --mode dst --proto udp")?;
        Ok(f)
    }

    /// Runs one shell line; its output, or its failure with the output.
    fn cmd(&mut self, line: &str) -> Result<String> {
        writeln!(self.stdin, "{line} 2>&1; echo \"__rc=$?\"").context("xdp-filter's shell is gone")?;
        let mut out = String::new();
        loop {
            let mut l = String::new();
            if self.stdout.read_line(&mut l)? == 0 {
                bail!("xdp-filter's shell ended during `{line}`: {out}");
            }
            if let Some(rc) = l.trim().strip_prefix("__rc=") {
                if rc != "0" {
                    bail!("`{line}` failed ({rc}): {}", out.trim());
                }
                return Ok(out);
            }
            out.push_str(&l);
        }
    }

    /// `XDP_DROP` packets of `xdp-filter status` (which exits non-zero after
    /// printing them when features it was not loaded with have no maps).
    fn drops(&mut self) -> Result<u64> {
        let out = self.cmd("xdp-filter status; true")?;
        out.lines()
            .find_map(|l| l.trim().strip_prefix("XDP_DROP").and_then(|r| r.split_whitespace().next()?.parse().ok()))
            .with_context(|| format!("no XDP_DROP line in xdp-filter status: {out}"))
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        if let Err(e) = self.cmd("xdp-filter unload fr0") {
            eprintln!("flood: {e:#}");
        }
        let _ = writeln!(self.stdin, "exit");
        let _ = self.child.wait();
    }
}

/// What a configuration attached, kept until the window ends.
#[derive(Default)]
struct Attached {
    xdp: Option<aya::Ebpf>,
    guard: Option<GuardHarness>,
    xdp_filter: Option<XdpFilter>,
}

impl Attached {
    /// The configuration's own count of the flood's frames.
    fn count(&mut self, config: Config, rig: &Rig) -> Result<u64> {
        Ok(match config {
            Config::DropAll => bench_count(self.xdp.as_ref().context("drop-all program")?, "natfix_bench_drops"),
            Config::NatfixXdp | Config::NatfixXdpPortWithoutFlows | Config::NatfixTc => self.guard.as_ref().context("guard")?.counters()?[Counter::GuardDropUnsolicited].packets,
            Config::Iptables => iptables_counter(&rig.rx_ns),
            Config::Nft => nft_counter(&rig.rx_ns),
            Config::XdpFilter => self.xdp_filter.as_mut().context("xdp-filter")?.drops()?,
            Config::NoFilter => snmp_udp_noports(&rig.rx_ns),
        })
    }
}

/// Sets `config` up on fr0 (inside the receiver's namespace where programs attach).
fn attach(config: Config, rig: &Rig) -> Result<Attached> {
    let mut a = Attached::default();
    let rx = rig.rx_ns.netns()?;
    match config {
        Config::DropAll => {
            a.xdp = Some(in_ns(&rx, || {
                let mut ebpf = aya::Ebpf::load(rig_programs::OBJECT)?;
                let p: &mut Xdp = ebpf.program_mut(rig_programs::DROP_XDP).context("drop program")?.try_into()?;
                p.load()?;
                p.attach("fr0", XdpMode::Driver)?;
                Ok(ebpf)
            })?);
        }
        Config::NatfixXdp | Config::NatfixXdpPortWithoutFlows | Config::NatfixTc => {
            let hook = if config == Config::NatfixTc { "tc" } else { "xdp" };
            let flows = config != Config::NatfixXdpPortWithoutFlows;
            if config == Config::NatfixTc {
                rig.rx_ns.exec(&["ethtool", "-K", "fr0", "gro", "on"])?;
            }
            a.guard = Some(in_ns(&rx, move || {
                let mut guard = GuardHarness::load(&guard_plan(hook))?;
                // The flooded ports have a flow (another peer's): every packet is looked up.
                let local = std::net::Ipv4Addr::new(198, 51, 100, 10).into();
                let peer = std::net::Ipv4Addr::new(198, 51, 100, 99).into();
                for port in [25000, 25001].into_iter().filter(|_| flows) {
                    guard.insert_flow(&flow_key(local, port, Some((peer, 7000))), monotonic_ns())?;
                }
                if hook == "xdp" {
                    // Detached when the harness (its program) is dropped.
                    let p: &mut Xdp = guard.ingress_program_mut()?.try_into()?;
                    p.attach("fr0", XdpMode::Driver)?;
                } else {
                    let p: &mut SchedClassifier = guard.ingress_program_mut()?.try_into()?;
                    p.attach("fr0", TcAttachType::Ingress)?;
                }
                Ok(guard)
            })?);
        }
        Config::Iptables | Config::Nft | Config::NoFilter => {
            rig.rx_ns.exec(&["ethtool", "-K", "fr0", "gro", "on"])?;
            if config == Config::Iptables {
                rig.rx_ns.exec(&["iptables", "-A", "INPUT", "-p", "udp", "--dport", "20000:30000", "-m", "state", "!", "--state", "RELATED,ESTABLISHED", "-j", "DROP"])?;
            }
            if config == Config::Nft {
                rig.rx_ns.nft("table ip bench {\n chain pre {\n type filter hook prerouting priority -150;\n udp dport 20000-30000 ct state new counter drop\n }\n}\n")?;
            }
        }
        Config::XdpFilter => a.xdp_filter = Some(XdpFilter::start(rig)?),
    }
    Ok(a)
}

/// Development: with `NATFIX_FLOOD_PERF=<dir>`, `perf record -e cpu-clock
/// -g` of the receiver's CPU during each window, into `<dir>/<tag>.data`
/// (`perf report -i ... --no-children --sort sym`): where the receiver's
/// time goes. Stopped (SIGINT) when dropped.
struct Perf(Option<Child>);

impl Perf {
    fn start(config: Config, tag: &str) -> Self {
        let Ok(dir) = std::env::var("NATFIX_FLOOD_PERF") else { return Self(None) };
        let out = format!("{dir}/{tag}.data");
        eprintln!("flood: perf record of CPU 1 for {} into {out}", config.name());
        let child = Command::new("perf").args(["record", "-q", "-e", "cpu-clock", "-C", "1", "-g", "-o", &out]).stdin(Stdio::null()).spawn();
        std::thread::sleep(Duration::from_millis(300)); // perf is up before the window
        Self(child.map_err(|e| eprintln!("flood: perf: {e}")).ok())
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id().try_into().unwrap_or(0)), nix::sys::signal::Signal::SIGINT);
            let _ = child.wait();
        }
    }
}

/// Frames per generator burst (a burst is about 0.1-0.5 s).
const BURST: u32 = 500_000;

/// One window of `secs` seconds of flood through `config`.
pub fn measure(config: Config, host: Host, program: GenProgram, secs: f64, tag: &str) -> Sample {
    let rig = Rig::new(tag, SMALL_PAYLOAD);
    if host == Host::DockerNode {
        ok(rig.rx_ns.nft(include_str!("../data/docker-node.nft")), "loading the Docker node's netfilter");
    }
    let mut attached = ok(attach(config, &rig), &format!("setting up {}", config.name()));
    let kthread = ok(threaded_napi(&rig), "the receiver's NAPI kthread");
    let mut generator = Generator::start_with(&rig, program, true);
    generator.burst(BURST); // warm-up: page pool, caches, the kthread's placement
    std::thread::sleep(Duration::from_millis(50));
    let what = config.name();
    let count0 = ok(attached.count(config, &rig), what);
    let (run0, wait0) = ok(schedstat(kthread), what);
    let (stat0, drops0) = (cpu_times(), ok(ring_drops(&rig), "ethtool -S fg0"));
    let perf = Perf::start(config, tag);
    let start = Instant::now();
    let (mut sent, mut gen_cpu) = (0u64, 0.0);
    while start.elapsed().as_secs_f64() < secs {
        gen_cpu += generator.burst(BURST).cpu_secs;
        sent += u64::from(BURST);
    }
    let wall = start.elapsed().as_secs_f64();
    drop(perf);
    std::thread::sleep(Duration::from_millis(50)); // the ring drains
    let (run1, wait1) = ok(schedstat(kthread), what);
    let stat1 = cpu_times();
    let handled = ok(attached.count(config, &rig), what) - count0;
    let refused = ok(ring_drops(&rig), "ethtool -S fg0") - drops0;
    let busy = |cpu: usize| {
        let (b, t) = (stat1[cpu].0 - stat0[cpu].0, stat1[cpu].1 - stat0[cpu].1);
        b as f64 / t.max(1) as f64
    };
    let s = Sample {
        handled: handled as f64,
        sent: sent as f64,
        ring_drops: refused as f64,
        wall_secs: wall,
        rx_cpu_secs: (run1 - run0) as f64 / 1e9,
        rx_wait_secs: (wait1 - wait0) as f64 / 1e9,
        gen_cpu_secs: gen_cpu,
        cpu1_busy: busy(1),
        cpu0_busy: busy(0),
        ct_entries: ct_entries(&rig),
    };
    assert!(
        s.handled > 0.0 && s.rx_cpu_secs > 0.0,
        "{what}: the receiver counted {handled} of {sent} frames ({refused} refused by the full ring) in {wall:.2} s, its NAPI kthread ran {:.3} s: \
         the flood did not reach the filter",
        s.rx_cpu_secs
    );
    drop(generator);
    drop(attached);
    s
}

/// A row that could not be measured on this host, and why.
pub fn report_skipped(group: &str, name: &str, why: &str) {
    eprintln!("flood: {name}: not measured: {why}");
    println!("{}", serde_json::json!({ "group": group, "name": name, "skipped": why }));
}

/// Why the receiver/generator split cannot run here, if it cannot.
fn split_unavailable() -> Option<String> {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if cpus < 2 {
        return Some(format!("the receiver needs a CPU of its own and this host has {cpus}"));
    }
    let threaded = std::path::Path::new("/sys/class/net/lo/threaded").exists();
    (!threaded).then(|| "this kernel has no threaded NAPI (/sys/class/net/<dev>/threaded, Linux >= 5.12)".to_owned())
}

fn median(v: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.into_iter().collect();
    crate::common::summary(&mut v).0
}

/// What the windows of a configuration show about who set the rate.
fn evidence(samples: &[Sample]) -> String {
    let m = |f: fn(&Sample) -> f64| median(samples.iter().map(f));
    let limited = samples.iter().filter(|s| s.receiver_limited()).count();
    let counted = m(|s| s.handled / (s.sent - s.ring_drops).max(1.0));
    let head = format!(
        "kthread on CPU {:.0}% and runnable {:.0}% of the window, {:.0}% of frames refused by the full veth ring, {:.2} Mpps, {:.0}% of delivered frames counted; \
         /proc/stat busy: CPU 1 {:.0}%, CPU 0 {:.0}%; generator {:.0} ns/frame",
        m(|s| s.rx_cpu_secs / s.wall_secs) * 100.0,
        m(Sample::runnable) * 100.0,
        m(Sample::ring_drop_share) * 100.0,
        m(|s| s.handled / s.wall_secs) / 1e6,
        counted * 100.0,
        m(|s| s.cpu1_busy) * 100.0,
        m(|s| s.cpu0_busy) * 100.0,
        m(|s| s.gen_cpu_secs * 1e9 / s.sent)
    );
    if limited == samples.len() {
        format!("{head}: receiver-limited")
    } else {
        format!("{head}: **generator-limited in {} of {} windows**, capacity from CPU time per packet", samples.len() - limited, samples.len())
    }
}

/// `rounds` rounds of every configuration in `configs` (the order rotated
/// each round), `secs` of flood each; the samples by configuration.
fn rounds_of(configs: &[Config], host: Host, program: GenProgram, rounds: usize, secs: f64, tag: &str) -> Vec<Vec<Sample>> {
    let mut samples = vec![Vec::new(); configs.len()];
    for r in 0..rounds {
        for k in 0..configs.len() {
            let i = (k + r) % configs.len();
            let s = measure(configs[i], host, program, secs, &format!("{tag}{r}{i}"));
            eprintln!(
                "flood: {} round {r}: {:.0} ns/packet, {:.2} M/s per receiver CPU; kthread on CPU {:.2}, runnable {:.2}; ring drops {:.0}%; \
                 {:.2} Mpps of {:.2} sent; CPU busy 0: {:.2} 1: {:.2}; generator {:.0} ns/frame",
                configs[i].name(),
                s.ns_per_packet(),
                s.capacity() / 1e6,
                s.rx_cpu_secs / s.wall_secs,
                s.runnable(),
                s.ring_drop_share() * 100.0,
                s.handled / s.wall_secs / 1e6,
                s.sent / s.wall_secs / 1e6,
                s.cpu0_busy,
                s.cpu1_busy,
                s.gen_cpu_secs * 1e9 / s.sent
            );
            samples[i].push(s);
        }
    }
    samples
}

/// The receiver-side flood table: every configuration's drop capacity per
/// receiver CPU and CPU time per packet against the seed's iptables rule,
/// and natfix's XDP guard against the nftables rule.
pub fn flood(rounds: usize, secs: f64) {
    const CAPACITY: &str = "flood: receiver drop capacity";
    const PER_PACKET: &str = "flood: receiver CPU per packet";
    let mut configs = vec![Config::DropAll, Config::NatfixXdp, Config::NatfixXdpPortWithoutFlows, Config::NatfixTc, Config::Iptables, Config::Nft, Config::XdpFilter, Config::NoFilter];
    if let Some(why) = split_unavailable() {
        for c in configs {
            report_skipped(CAPACITY, c.name(), &why);
        }
        return;
    }
    if let Err(e) = XdpFilter::available() {
        report_skipped(CAPACITY, Config::XdpFilter.name(), &format!("{e:#}"));
        configs.retain(|c| *c != Config::XdpFilter);
    }
    // Development: `NATFIX_FLOOD_ONLY=<part of a name>` measures those alone (no rows).
    if let Ok(only) = std::env::var("NATFIX_FLOOD_ONLY") {
        configs.retain(|c| c.name().contains(&only));
        rounds_of(&configs, Host::Bare, GenProgram::Rig, rounds, secs, "f");
        return;
    }
    let samples = rounds_of(&configs, Host::Bare, GenProgram::Rig, rounds, secs, "f");
    let of = |c: Config| &samples[configs.iter().position(|x| *x == c).expect("measured")];
    let cap = |c: Config| of(c).iter().map(Sample::capacity).collect::<Vec<_>>();
    let ns = |c: Config| of(c).iter().map(Sample::ns_per_packet).collect::<Vec<_>>();
    let ipt = Config::Iptables;
    for &c in &configs {
        let detail = serde_json::json!({ "detail": evidence(of(c)) });
        crate::common::report_paired_with(CAPACITY, c.name(), "packets/s per CPU", &cap(c), ipt.name(), &cap(ipt), true, &detail);
    }
    let name = format!("{} against the nftables rule", Config::NatfixXdp.name());
    crate::common::report_paired(CAPACITY, &name, "packets/s per CPU", &cap(Config::NatfixXdp), Config::Nft.name(), &cap(Config::Nft), true);
    for &c in &configs {
        crate::common::report_paired(PER_PACKET, c.name(), "ns/packet", &ns(c), ipt.name(), &ns(ipt), false);
    }
}

/// Distinct flows of the conntrack-pressure rows.
pub const PRESSURE_FLOWS: u32 = 100_000;

/// The unsolicited flood from 100,000 distinct flows on a Docker node's
/// netfilter (conntrack on): no filter (what fills the table), the seed's
/// iptables rule, natfix's XDP guard; receiver CPU per packet and the
/// conntrack table after each.
pub fn pressure(rounds: usize, secs: f64) {
    const GROUP: &str = "flood: conntrack under pressure (100,000 flows, Docker node)";
    let configs = [Config::NoFilter, Config::Iptables, Config::NatfixXdp];
    if let Some(why) = split_unavailable() {
        for c in configs {
            report_skipped(GROUP, c.name(), &why);
        }
        return;
    }
    let samples = rounds_of(&configs, Host::DockerNode, GenProgram::Flows(PRESSURE_FLOWS), rounds, secs, "p");
    let ns = |i: usize| samples[i].iter().map(Sample::ns_per_packet).collect::<Vec<_>>();
    for (i, c) in configs.iter().enumerate() {
        let entries = median(samples[i].iter().map(|s| s.ct_entries));
        let name = format!("{}: receiver CPU per packet; conntrack entries after the window: {entries:.0}", c.name());
        let detail = serde_json::json!({ "detail": evidence(&samples[i]) });
        crate::common::report_paired_with(GROUP, &name, "ns/packet", &ns(i), Config::Iptables.name(), &ns(1), false, &detail);
    }
}
